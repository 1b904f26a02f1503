"""SDXL base and refiner: configs, key layout, loading, conditioning (two text encoders, pooled output, size
micro-conditioning) and generation.

Fast tests use the tiny SDXL config (configs/tiny/sdxl-tiny.yaml: the same classes, a few channels). The slow
tests (`pytest -m slow`, run them under `flock /tmp/bigmem.lock`: they build full-size networks one at a time,
about 10 GB each) write a full-size SDXL base checkpoint with seeded random weights as an fp16 .safetensors,
load it through our loader and compare the UNet with its added conditions, both text encoders and the VAE with
diffusers' models converted by diffusers' own single-file conversion functions, built from local configs.
"""
import gc
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO
from helpers import loaded_in_memory, meta_state_dict, random_state_dict, relative_error, txt2img
from ldm.checkpoint import (CheckpointError, find_config, guess_config, load_model, parameters_on_meta,
                            read_checkpoint)
from ldm.generate.conditioning import Conditioner, resolve
from ldm.generate.errors import UserError
from ldm.generate.options import check_size_conditioning
from ldm.generate.run import Job, job_fields
from ldm.models.diffusion.sampling import GuidedDenoiser
from ldm.modules.encoders.sdxl_conditioner import SizeConditioning
from ldm.safetensors_writer import PlannedTensor, StreamingWriter
from ldm.util import instantiate_from_config
from tiny_model import tiny_model, write_tiny_checkpoint

TINY_SDXL = REPO / "configs" / "tiny" / "sdxl-tiny.yaml"
BASE = REPO / "configs" / "sdxl" / "sd_xl_base.yaml"
REFINER = REPO / "configs" / "sdxl" / "sd_xl_refiner.yaml"
TINY_POOLED, TINY_CLIP_WIDTH, TINY_EMBED = 16, 32, 128  # the tiny config's pooled width, first encoder's, outdim
SDXL_BASE_UNET_PARAMETERS = 2_567_463_684  # the published size of SDXL 1.0 base's UNet


@pytest.fixture(scope="module")
def loaded():
    return loaded_in_memory(tiny_model(config=TINY_SDXL), TINY_SDXL)


def conditioned(loaded, prompts, negative=False, steps=4, size=None, emphasis="original"):
    """The resolved SDXL conditioning of a batch of prompts (negative: read as a negative prompt)."""
    conditioner = Conditioner(loaded, print, emphasis=emphasis, size=size)
    return resolve(conditioner(prompts, composable=not negative), steps)


def at_call(cond, call=0):
    text, vectors = cond["c_crossattn"][0], cond["c_adm"]
    return text.at(call, text.length_at(call)), vectors.at(call)


def sinusoid(values, dim):
    """diffusers' get_timestep_embedding with SDXL's add_time_proj settings, per value, concatenated."""
    from diffusers.models.embeddings import get_timestep_embedding

    embedded = get_timestep_embedding(torch.tensor(values, dtype=torch.float32), dim, flip_sin_to_cos=True,
                                      downscale_freq_shift=0)
    return embedded.reshape(1, -1)


# --- configs, keys, detection, loading -------------------------------------------------------------------------
def test_base_and_refiner_configs_build_the_checkpoint_key_layout():
    base, refiner = meta_state_dict(BASE), meta_state_dict(REFINER)
    unet = sum(t.numel() for k, t in base.items() if k.startswith("model.diffusion_model."))
    assert unet == SDXL_BASE_UNET_PARAMETERS
    assert base["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert refiner["model.diffusion_model.label_emb.0.0.weight"].shape == (1536, 2560)
    assert base["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    assert base["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    assert "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in base
    assert refiner["conditioner.embedders.0.model.text_projection"].shape == (1280, 1280)
    assert not any(k.startswith("cond_stage_model.") or k.endswith("logit_scale") for k in {**base, **refiner})
    # level 0 has no transformer, the middle block has 10 (transformer_depth [0, 2, 10])
    assert not any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in base)
    assert "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight" in base


def test_the_refiners_vector_ends_with_the_aesthetic_score():
    with parameters_on_meta():
        refiner = instantiate_from_config(OmegaConf.load(REFINER).model.params.conditioner_config)
    size = SizeConditioning(original_size=(1024, 768), target_size=(512, 512), crop_coords=(0, 16))
    pooled = torch.randn(2, 1280, generator=torch.Generator().manual_seed(0))
    vector = refiner.vector(pooled, size.values(negative=True))
    assert vector.shape == (2, 2560) and torch.equal(vector[:, :1280], pooled)
    expected = torch.cat([sinusoid([1024, 768], 256), sinusoid([0, 16], 256), sinusoid([2.5], 256)], dim=1)
    torch.testing.assert_close(vector[:, 1280:], expected.expand(2, -1), rtol=0, atol=1e-5)


def test_sdxl_checkpoints_are_recognised_by_their_keys():
    for config, name in ((BASE, "sd_xl_base.yaml"), (REFINER, "sd_xl_refiner.yaml")):
        keys = meta_state_dict(config)
        assert guess_config(keys) == name
        assert find_config(Path("/nowhere/model.safetensors"), keys) == config


def write_fp16(path, state_dict, extra=None):
    """A .safetensors of the state dict in fp16 (as the released SDXL files), plus `extra` tensors as they are;
    streamed, one fp16 copy at a time."""
    tensors = {**state_dict, **(extra or {})}

    def stored(key):
        tensor = tensors[key]
        return tensor.half() if key in state_dict and tensor.is_floating_point() else tensor

    planned = [PlannedTensor(key, torch.float16 if key in state_dict and t.is_floating_point() else t.dtype,
                             tuple(t.shape)) for key, t in tensors.items()]
    with open(path, "wb") as f:
        writer = StreamingWriter(f, planned)
        for entry in writer.order:
            writer.write(entry.name, stored(entry.name))
        writer.finish()
    return path


def test_an_fp16_safetensors_loads_strictly_with_what_released_files_carry_or_lack(tmp_path):
    model = tiny_model(seed=3, config=TINY_SDXL)
    state_dict = model.state_dict()
    # released files carry the denoiser's sigmas and OpenCLIP's logit_scale; merged ones often lack the latter
    extra = {"denoiser.sigmas": torch.linspace(0.03, 14.6, 1000), "conditioner.embedders.1.model.logit_scale":
             torch.tensor(4.6)}
    write_fp16(tmp_path / "sdxl.safetensors", state_dict, extra)
    (tmp_path / "sdxl.yaml").write_text(TINY_SDXL.read_text())
    for low_memory in (False, True):
        result = load_model(tmp_path / "sdxl.safetensors", dtype=torch.float32, log=lambda line: None,
                            low_memory=low_memory)
        result.use("cond_stage_model")
        loaded_keys = result.model.state_dict()
        assert set(loaded_keys) == set(state_dict)
        for key in ("conditioner.embedders.1.model.text_projection", "model.diffusion_model.label_emb.0.0.weight"):
            assert torch.equal(loaded_keys[key].float(), state_dict[key].half().float())
    write_fp16(tmp_path / "sdxl.safetensors", {k: v for k, v in state_dict.items() if "text_projection" not in k})
    with pytest.raises(CheckpointError, match="1 missing.*text_projection"):
        load_model(tmp_path / "sdxl.safetensors", log=lambda line: None)


# --- conditioning ----------------------------------------------------------------------------------------------
def test_plain_prompts_give_sgms_conditioning_and_the_unet_gets_y(loaded):
    size = SizeConditioning(original_size=(96, 80), target_size=(64, 48), crop_coords=(8, 4))
    context, vector = at_call(conditioned(loaded, ["a red cat", "a blue dog"], size=size))
    reference = loaded.model.get_learned_conditioning(["a red cat", "a blue dog"], size=size)
    assert torch.equal(context, reference["c_crossattn"][0]) and context.shape == (2, 77, 48)
    assert torch.equal(vector, reference["c_adm"]) and vector.shape == (2, 784)
    expected_sizes = torch.cat([sinusoid([96, 80], TINY_EMBED), sinusoid([8, 4], TINY_EMBED),
                                sinusoid([64, 48], TINY_EMBED)], dim=1)
    torch.testing.assert_close(vector[:, TINY_POOLED:], expected_sizes.expand(2, -1), rtol=0, atol=1e-5)

    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500, 500])
    cond = conditioned(loaded, ["a red cat", "a blue dog"], size=size)
    output, _ = GuidedDenoiser(loaded.model, cond, dtype=torch.float32, device="cpu").model_output(x, 500)
    unet = loaded.model.model.diffusion_model
    assert torch.equal(output, unet(x, t, context=reference["c_crossattn"][0], y=reference["c_adm"]))


def test_weights_go_through_both_encoders_and_leave_the_pooled_output_alone(loaded):
    plain_context, plain_vector = at_call(conditioned(loaded, ["a red cat"]))
    same_context, _ = at_call(conditioned(loaded, ["a (red:1.0) cat"]))
    weighted_context, weighted_vector = at_call(conditioned(loaded, ["a (red:1.5) cat"]))
    assert torch.equal(same_context, plain_context)
    first, second = weighted_context.split([TINY_CLIP_WIDTH, TINY_POOLED], dim=-1)
    assert not torch.equal(first, plain_context[..., :TINY_CLIP_WIDTH])
    assert not torch.equal(second, plain_context[..., TINY_CLIP_WIDTH:])
    assert torch.equal(weighted_vector, plain_vector)  # as A1111: pooled from the unweighted pass


def test_a_long_prompt_is_two_chunks_and_pools_its_first(loaded):
    long_context, long_vector = at_call(conditioned(loaded, [" ".join(["cat"] * 100)]))
    first_context, first_vector = at_call(conditioned(loaded, [" ".join(["cat"] * 75)]))
    assert long_context.shape[1] == 154
    torch.testing.assert_close(long_context[:, :77], first_context, rtol=0, atol=1e-6)
    torch.testing.assert_close(long_vector, first_vector, rtol=0, atol=1e-6)


def test_an_empty_negative_prompt_has_zero_text_embeddings_and_its_own_aesthetic_score(loaded):
    context, vector = at_call(conditioned(loaded, ["", ""], negative=True))
    assert not context.any() and not vector[:, :TINY_POOLED].any()
    assert torch.equal(vector[:, TINY_POOLED:], at_call(conditioned(loaded, ["x", "x"], negative=True))[1][:, TINY_POOLED:])
    positive_context, positive_vector = at_call(conditioned(loaded, [""]))
    assert positive_context.abs().sum() > 0 and positive_vector[:, :TINY_POOLED].abs().sum() > 0
    size = SizeConditioning((64, 64), (64, 64), aesthetic_score=6.0, negative_aesthetic_score=2.5)
    assert size.values(True)["aesthetic_score"] == [2.5] and size.values(False)["aesthetic_score"] == [6.0]


def test_prompt_editing_switches_the_vector_with_the_text(loaded):
    cond = conditioned(loaded, ["[a red cat:a blue dog:2]"], steps=4)
    _, red = at_call(conditioned(loaded, ["a red cat"]))
    _, blue = at_call(conditioned(loaded, ["a blue dog"]))
    # A1111's [from:to:2]: model calls 0 to 2 read "from"
    assert all(torch.allclose(at_call(cond, call)[1], red, atol=1e-6) for call in (0, 1, 2))
    assert torch.allclose(at_call(cond, 3)[1], blue, atol=1e-6)


def test_and_parts_get_their_own_vectors_in_a_guided_call(loaded, monkeypatch):
    calls = []
    real = loaded.model.apply_model
    monkeypatch.setattr(loaded.model, "apply_model", lambda x, t, cond: calls.append(cond) or real(x, t, cond))
    cond = conditioned(loaded, ["a red cat AND a blue dog"])
    uncond = conditioned(loaded, [""], negative=True)
    GuidedDenoiser(loaded.model, cond, uncond, 5.0, dtype=torch.float32, device="cpu")(torch.randn(1, 4, 8, 8), 500)
    y = calls[0]["c_adm"]
    assert y.shape == (3, 784) and calls[0]["c_crossattn"][0].shape == (3, 77, 48)
    assert not y[0, :TINY_POOLED].any() and not torch.equal(y[1], y[2])


# --- the command line and the job -----------------------------------------------------------------------------
def test_size_options_are_refused_for_other_models_and_out_of_range(loaded):
    from helpers import loaded_tiny
    from types import SimpleNamespace

    args = SimpleNamespace(original_size=[512, 512], crop_coords=None, target_size=None)
    with pytest.raises(UserError, match="--original_size applies to SDXL models only"):
        check_size_conditioning(args, loaded_tiny())
    check_size_conditioning(args, loaded)
    with pytest.raises(UserError, match="--crop_coords takes a top and a left of 0 or more"):
        check_size_conditioning(SimpleNamespace(original_size=None, crop_coords=[-1, 0], target_size=None), loaded)
    job = Job(batches=[["x"]], height=64, width=48, original_size=(128, 96), crop_coords=(4, 0))
    assert job.size_conditioning() == SizeConditioning((128, 96), (64, 48), (4, 0))
    fields = job_fields(job, SimpleNamespace(hash="0", name="m", vae_path=None, embeddings=None), 1, 0)
    assert fields["Original size"] == "96x128" and fields["Crop top"] == 4 and "Target size" not in fields


def test_a_hires_pass_is_told_the_upscaled_size(loaded, tmp_path, monkeypatch):
    from ldm.generate.hires import HiresSettings
    from ldm.generate.output import OutputFolder
    from ldm.generate.run import run
    from ldm.generate.txt2img import TextToImage

    vectors = []
    real = loaded.model.apply_model
    monkeypatch.setattr(loaded.model, "apply_model", lambda x, t, cond: vectors.append(cond["c_adm"]) or real(x, t, cond))
    job = Job(batches=[["a red cat"]], steps=2, sampler="euler", height=64, width=48, save_grid=False,
              watermark=False)
    run(job, TextToImage(HiresSettings(scale=2.0, steps=1, strength=0.5)), loaded, OutputFolder(tmp_path),
        log=lambda line: None)
    original_sizes = [vector[:1, TINY_POOLED:TINY_POOLED + 2 * TINY_EMBED] for vector in (vectors[0], vectors[-1])]
    torch.testing.assert_close(original_sizes[0], sinusoid([64, 48], TINY_EMBED), rtol=0, atol=1e-5)
    torch.testing.assert_close(original_sizes[1], sinusoid([128, 96], TINY_EMBED), rtol=0, atol=1e-5)


def test_txt2img_makes_sdxl_pictures_at_the_asked_size_conditioning(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path, "sdxl.safetensors", config=TINY_SDXL)
    result = txt2img("--ckpt", ckpt, "--prompt", "a (red:1.2) cat", "--n_samples", 1, "--n_iter", 1,
                     "--ddim_steps", 2, "--sampler", "euler", "--target_size", 32, 32, "--outdir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    from PIL import Image

    with Image.open(tmp_path / "out" / "samples" / "00000.png") as image:
        assert image.size == (64, 64)  # the tiny model's native size
        assert "Target size: 32x32" in image.text["parameters"]


# --- full size, random weights, against diffusers (slow) -------------------------------------------------------
@pytest.fixture(scope="module")
def full_size_checkpoint(tmp_path_factory):
    """A full-size SDXL base with seeded random weights as an fp16 .safetensors (no YAML beside it)."""
    path = tmp_path_factory.mktemp("sdxl-full") / "sd_xl_random.safetensors"
    template = meta_state_dict(BASE)
    weights = random_state_dict(template, seed=11)  # the noise schedule (real buffers) is not in SDXL files
    write_fp16(path, {key: weights[key] for key, tensor in template.items() if tensor.device.type == "meta"})
    del weights
    gc.collect()
    yield path
    path.unlink()


def loaded_full_size(path):
    """Our model from the file, one component converted at a time (the loader picks the config by its keys)."""
    return load_model(path, dtype=torch.float32, low_memory=True, log=lambda line: None)


def original_keys(path):
    return read_checkpoint(path)[0]


def diffusers_model(model_class, make_config, convert, path):
    """diffusers' `model_class` in fp32, configured by `make_config` from our YAML and loaded strictly from the
    file converted by `convert` (diffusers' single-file functions)."""
    from accelerate import init_empty_weights

    checkpoint = original_keys(path)
    config = make_config(OmegaConf.to_container(OmegaConf.load(BASE)), checkpoint)
    with init_empty_weights():
        model = model_class(**config)
    model.load_state_dict({k: v.float() for k, v in convert(checkpoint, config).items()}, strict=True, assign=True)
    return model.eval()


@pytest.mark.slow
def test_full_size_text_encoders_equal_diffusers(full_size_checkpoint):
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    result = loaded_full_size(full_size_checkpoint)
    conditioner = result.use("cond_stage_model")
    # diffusers' SDXL tokenizers pad CLIP-L with the end token and OpenCLIP with "!" (id 0), as ours do
    ids_l, ids_g = (encoder.tokenize(["a photo of a cat"]) for encoder in conditioner.text_encoders)
    assert ids_l[0, -1] == 49407 and ids_g[0, -1] == 0
    with torch.no_grad():
        ours_l = conditioner.text_encoders[0].encode_tokens(ids_l)
        ours_g = conditioner.text_encoders[1].encode_tokens(ids_g)
        ours_pooled = conditioner.text_encoders[1].last_pooled
    del result, conditioner
    gc.collect()

    checkpoint = original_keys(full_size_checkpoint)
    common = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5)
    with init_empty_weights():
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, hidden_act="quick_gelu", **common))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            hidden_act="gelu", projection_dim=1280, bos_token_id=0, eos_token_id=2, pad_token_id=1, **common))
    state_l = convert_ldm_clip_checkpoint(checkpoint)
    if not hasattr(clip_l, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        state_l = {k.removeprefix("text_model."): v for k, v in state_l.items()}
    clip_l.load_state_dict({k: v.float() for k, v in state_l.items() if not k.endswith("position_ids")},
                           strict=False, assign=True)
    state_g = convert_open_clip_checkpoint(clip_g, checkpoint, prefix="conditioner.embedders.1.model.")
    clip_g.load_state_dict({k: v.float() for k, v in state_g.items()}, strict=False, assign=True)
    with torch.no_grad():
        theirs_l = clip_l(ids_l, output_hidden_states=True).hidden_states[-2]
        theirs_g = clip_g(ids_g, output_hidden_states=True)
    assert relative_error(ours_l, theirs_l) < 1e-4
    assert relative_error(ours_g, theirs_g.hidden_states[-2]) < 1e-4
    assert relative_error(ours_pooled, theirs_g.text_embeds) < 1e-4


@pytest.mark.slow
def test_full_size_unet_with_added_conditions_equals_diffusers(full_size_checkpoint):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    generator = torch.Generator().manual_seed(5)
    x, context = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 77, 2048, generator=generator)
    pooled = torch.randn(1, 1280, generator=generator)
    size = SizeConditioning(original_size=(1024, 896), target_size=(768, 640), crop_coords=(64, 32))
    t = torch.tensor([421])
    result = loaded_full_size(full_size_checkpoint)
    y = result.model.cond_stage_model.vector(pooled, size.values(False))
    result.use("model")
    with torch.no_grad():
        ours = result.model.apply_model(x, t, {"c_crossattn": [context], "c_adm": y})
    del result
    gc.collect()

    unet = diffusers_model(UNet2DConditionModel, create_unet_diffusers_config_from_ldm, convert_ldm_unet_checkpoint,
                           full_size_checkpoint)
    time_ids = torch.tensor([[1024, 896, 64, 32, 768, 640]], dtype=torch.float32)
    with torch.no_grad():
        theirs = unet(x, t, encoder_hidden_states=context,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert relative_error(ours, theirs) < 1e-4


@pytest.mark.slow
def test_full_size_vae_equals_diffusers_with_sdxls_scale_factor(full_size_checkpoint):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    generator = torch.Generator().manual_seed(6)
    latent, image = torch.randn(1, 4, 8, 8, generator=generator), torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    result = loaded_full_size(full_size_checkpoint)
    result.use("first_stage_model")
    with torch.no_grad():
        ours_decoded = result.model.decode_first_stage(latent)
        ours_mean = result.model.first_stage_model.encode(image).mean
    scale_factor = result.model.scale_factor
    del result
    gc.collect()

    vae = diffusers_model(AutoencoderKL, create_vae_diffusers_config_from_ldm, convert_ldm_vae_checkpoint,
                          full_size_checkpoint)
    assert math.isclose(scale_factor, vae.config.scaling_factor) and scale_factor == 0.13025
    with torch.no_grad():
        theirs_decoded = vae.decode(latent / vae.config.scaling_factor).sample
        theirs_mean = vae.encode(image).latent_dist.mean
    assert relative_error(ours_decoded, theirs_decoded) < 1e-4
    assert relative_error(ours_mean, theirs_mean) < 1e-4
