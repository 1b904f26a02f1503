"""Step caching (--deepcache, ldm.models.diffusion.step_cache) and token merging (--token_merging_ratio,
ldm.modules.token_merging) on the tiny model: off changes nothing, on changes the picture; the deep blocks
run on the full steps only, with every sampler; merging merges the expected tokens and unmerging restores
them; seeds repeat pictures; the infotext fields and their reading back; one-line refusals."""
import numpy as np
import pytest
import torch

from helpers import txt2img
from ldm.generate.infotext import png_option_defaults
from ldm.generate.rng import noise_source
from ldm.generate.speedups import Speedups, for_pass
from ldm.models.diffusion import samplers
from ldm.models.diffusion.sampling import GuidedDenoiser
from ldm.models.diffusion.step_cache import StepCache, deep_blocks, full_steps
from ldm.modules.token_merging import Merge, destination_mask, highest_resolution_transformers, transformer_levels
from ldm.pipeline import Pipeline
from tiny_model import write_tiny_checkpoint

QUICK = dict(num_inference_steps=6, height=64, width=64, seed=3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pipe(ckpt):
    return Pipeline.from_pretrained(ckpt, device="cpu", log=lambda line: None)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"))


def unet_of(pipe):
    return pipe.loaded.model.model.diffusion_model


# --- off: nothing changes ----------------------------------------------------------------------------------------
def test_off_leaves_the_unet_untouched_and_on_then_off_makes_the_same_picture(pipe):
    unet = unet_of(pipe)
    transformer_blocks = [block for transformer in highest_resolution_transformers(unet)
                          for block in transformer.transformer_blocks]

    def untouched(info):
        assert unet.block_runner is None
        assert not any(block._forward_pre_hooks or block.attn1._forward_hooks for block in transformer_blocks)

    before = pixels(pipe("a circle", **QUICK, callback=untouched))
    assert not np.array_equal(pixels(pipe("a circle", **QUICK, deepcache=2, token_merging_ratio=0.5)), before)
    assert np.array_equal(pixels(pipe("a circle", **QUICK, deepcache=0, token_merging_ratio=0.0, callback=untouched)),
                          before)


# --- step caching -------------------------------------------------------------------------------------------------
def test_uniform_and_non_uniform_full_steps_are_deepcaches():
    assert full_steps(10, 3) == {0, 3, 6, 9}
    # DeepCache's sample_from_quad_center(50, 17, center=15, pow=1.4), as its code computes it
    assert sorted(full_steps(50, 3, "non-uniform")) == [0, 3, 6, 8, 11, 13, 15, 17, 20, 22, 25, 28, 32, 35, 38, 42, 46]
    with pytest.raises(ValueError, match="reuses nothing"):
        full_steps(10, 1)


def test_a_cached_step_runs_only_the_shallow_branch(pipe):
    unet = unet_of(pipe)
    deep = deep_blocks(unet)
    shallow = [block for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
               if all(block is not other for other in deep)]
    assert shallow == [unet.input_blocks[0], unet.output_blocks[-1]]  # DeepCache's branch 0


def counted_sampling(pipe, sampler, steps, interval, seed=0):
    """(latents, StepCache, the step of each UNet call, the step of each call that ran the middle block)."""
    model = pipe.loaded.model
    unet = model.model.diffusion_model
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(seed))
    denoiser = GuidedDenoiser(model, cond, torch.zeros_like(cond), 5.0, dtype=torch.float32, device="cpu")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    call_steps, deep_steps = [], []
    with StepCache(unet, full_steps(steps, interval)) as cache:
        handles = [unet.input_blocks[0].register_forward_hook(lambda *_: call_steps.append(cache.steps)),
                   unet.middle_block.register_forward_hook(lambda *_: deep_steps.append(cache.steps))]
        try:
            latents = samplers.sample(sampler, denoiser, x, steps, callback=cache.counting(None),
                                      noise_source=noise_source("cpu", seed))
        finally:
            for handle in handles:
                handle.remove()
    return latents, cache, call_steps, deep_steps


def test_the_deep_blocks_run_on_the_full_steps_only(pipe):
    _, cache, call_steps, deep_steps = counted_sampling(pipe, "ddim", 10, 3)
    assert call_steps == list(range(10)) and deep_steps == [0, 3, 6, 9]
    assert (cache.calls, cache.full_calls, cache.steps) == (10, 4, 10)
    # two model calls a step: both run whole on a full step, neither on the others
    _, cache, call_steps, deep_steps = counted_sampling(pipe, "heun", 6, 2)
    assert deep_steps == [step for step in call_steps if step % 2 == 0] and len(call_steps) > 6
    assert unet_of(pipe).block_runner is None


@pytest.mark.parametrize("sampler", sorted(samplers.REGISTRY))
def test_every_sampler_samples_with_the_cache(pipe, sampler):
    latents, cache, _, _ = counted_sampling(pipe, sampler, 6, 2)
    assert torch.isfinite(latents).all()
    assert 0 < cache.full_calls < cache.calls


# --- token merging ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("height, width, ratio, merged", [(8, 8, 0.5, 32), (8, 8, 0.75, 48), (7, 9, 0.5, 31),
                                                           (7, 9, 0.75, 47)])
def test_merge_removes_the_expected_tokens_and_unmerge_restores_the_shape(height, width, ratio, merged):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, height * width, 16, generator=generator)
    merge = Merge(tokens, height, width, int(height * width * ratio), generator)
    assert merge.merge(tokens).shape == (2, height * width - merged, 16)
    assert Merge(tokens, height, width, height * width, generator).r == height * width - (height // 2) * (width // 2)
    restored = merge.unmerge(merge.merge(tokens))
    assert restored.shape == tokens.shape
    for row in range(2):  # a kept source comes back as it was; a merged one as its destination's mean
        kept = merge.source_index[0, merge.kept[row, :, 0], 0]
        assert torch.equal(restored[row, kept], tokens[row, kept])
        sources = merge.source_index[0, merge.merged[row, :, 0], 0]
        destinations = merge.destination_index[0, merge.match[row, :, 0], 0]
        for source, destination in zip(sources.tolist(), destinations.tolist()):
            group = [destination] + [s for s, d in zip(sources.tolist(), destinations.tolist()) if d == destination]
            torch.testing.assert_close(restored[row, source], tokens[row, group].mean(0))


def test_destinations_are_one_per_cell_and_follow_the_seed():
    mask = destination_mask(6, 8, torch.Generator().manual_seed(1)).view(6, 8)
    assert torch.equal(mask.view(3, 2, 4, 2).sum((1, 3)), torch.ones(3, 4, dtype=torch.long))
    assert torch.equal(mask, destination_mask(6, 8, torch.Generator().manual_seed(1)).view(6, 8))
    assert not torch.equal(mask, destination_mask(6, 8, torch.Generator().manual_seed(2)).view(6, 8))
    assert destination_mask(5, 5, None).view(5, 5)[4].sum() == 0  # the partial last row: sources only


def test_merging_runs_in_the_highest_resolution_blocks_only(pipe):
    unet = unet_of(pipe)
    levels = transformer_levels(unet)
    assert [level for level, _ in levels] == [0, 1, 1, 1, 1, 0, 0]  # input, middle, output blocks
    tokens_seen = []
    with for_pass(Speedups(token_merging_ratio=0.5), unet, 1, seed=0):
        # registered after the merging hooks: sees what the self-attention gets
        handles = [transformer.transformer_blocks[0].attn1.register_forward_pre_hook(
            lambda module, args, level=level: tokens_seen.append((level, args[0].shape[1]))) for level, transformer in levels]
        try:
            unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), context=torch.randn(2, 77, 32))
        finally:
            for handle in handles:
                handle.remove()
    assert tokens_seen == [(0, 32), (1, 16), (1, 16), (1, 16), (1, 16), (0, 32), (0, 32)]  # 8x8 -> 32; 4x4 as is


def test_seeds_repeat_pictures_and_ratio_zero_is_off(pipe):
    merged = pixels(pipe("a circle", **QUICK, token_merging_ratio=0.5))
    assert np.array_equal(pixels(pipe("a circle", **QUICK, token_merging_ratio=0.5)), merged)
    assert not np.array_equal(pixels(pipe("a circle", **QUICK)), merged)
    assert np.array_equal(pixels(pipe("a circle", **QUICK, token_merging_ratio=0)), pixels(pipe("a circle", **QUICK)))
    cached = pixels(pipe("a circle", **QUICK, deepcache=3))
    assert np.array_equal(pixels(pipe("a circle", **QUICK, deepcache=3)), cached)


# --- infotext and refusals ----------------------------------------------------------------------------------------
def test_infotext_fields_and_reading_them_back(pipe):
    text = pipe("a circle", **QUICK, deepcache=2, deepcache_schedule="non-uniform", token_merging_ratio=0.5,
                hr_scale=2, hr_second_pass_steps=2).infotexts[0]
    for field in ("Token merging ratio: 0.5", "Token merging ratio hr: 0.5", "DeepCache: 2",
                  "DeepCache schedule: non-uniform"):
        assert field in text
    assert "Token merging ratio hr: 0.3" in pipe("a circle", **QUICK, hr_scale=2, hr_second_pass_steps=2,
                                                 token_merging_ratio_hr=0.3).infotexts[0]
    plain = pipe("a circle", **QUICK).infotexts[0]
    assert "Token merging" not in plain and "DeepCache" not in plain
    dests = {"token_merging_ratio", "token_merging_ratio_hr", "deepcache", "deepcache_schedule"}
    assert png_option_defaults(text, dests, log=lambda line: None) == {
        "token_merging_ratio": "0.5", "token_merging_ratio_hr": "0.5", "deepcache": "2",
        "deepcache_schedule": "non-uniform"}


@pytest.mark.parametrize("options, words", [
    (dict(deepcache=1), "deepcache 1 caches nothing"),
    (dict(deepcache=6), "never reuses the cache"),
    (dict(deepcache=-2), "caches nothing"),
    (dict(deepcache_schedule="non-uniform"), "step caching, which is off"),
    (dict(token_merging_ratio=0.9), "token_merging_ratio 0.9 is outside [0, 0.75]"),
    (dict(token_merging_ratio=float("nan")), "is outside"),
    (dict(token_merging_ratio_hr=0.3), "applies to the hires fix, which is off"),
    (dict(hr_scale=2, token_merging_ratio_hr=0.8), "token_merging_ratio_hr 0.8 is outside"),
])
def test_meaningless_options_are_refused_in_one_line(pipe, options, words):
    with pytest.raises(ValueError) as raised:
        pipe("a circle", **QUICK, **options)
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_the_script_refuses_with_one_line_and_status_2(ckpt, tmp_path):
    result = txt2img("--ckpt", ckpt, "--outdir", tmp_path, "--ddim_steps", 4, "--deepcache", 1)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["error: --deepcache 1 caches nothing: give 2 or more (the deep "
                                                  "blocks run every N-th step), or 0 for off"]
    assert not tmp_path.joinpath("samples").exists()
