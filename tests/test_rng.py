"""The NV noise source (ldm/generate/rng.py): CUDA's torch.randn numbers, computed on the CPU."""
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import loaded_tiny, txt2img
from ldm.generate import options, run
from ldm.generate.output import OutputFolder
from ldm.generate.rng import NvRandom, noise_source
from ldm.generate.txt2img import Txt2ImgJob, run_txt2img
from ldm.models.diffusion import sampling
from tiny_model import write_tiny_checkpoint

# torch.manual_seed(0); torch.randn(3, 4, device="cuda"): the expected output printed in the docstring of
# AUTOMATIC1111's modules/rng_philox.py (its "NV" source, checked there against a CUDA GPU).
SEED_0_CUDA = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
               [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
               [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]

# torch.manual_seed(42); torch.randn(2, 5, device="cuda"): printed in the docstring of flashinfer's
# logits_processor `Sample` processor (device='cuda:0').
SEED_42_CUDA = [[0.1940, 2.1614, -0.1721, 0.8491, -1.9244],
                [0.6530, -0.6494, -0.8175, 0.5280, -1.2753]]

# Six successive torch.randn(4, device="cuda") draws after torch.manual_seed(42): the arguments printed in a
# public PyTorch inductor bug repro for torch._foreach_sub (tensors on device='cuda:0').
SEED_42_SIX_DRAWS_OF_4 = [[0.1940, 2.1614, -0.1721, 0.8491], [0.1391, -0.1082, -0.7174, 0.7566],
                          [-0.5187, 1.2268, 0.6255, -0.9117], [-0.6974, -1.8688, -0.8832, -1.6627],
                          [-1.2682, -0.0383, -0.1029, 1.4400], [1.4640, -0.3238, 0.7740, 1.5892]]


# Values of torch.randn on CUDA devices printed in PyTorch issue threads (four decimals), picked at element
# indices far into a draw, all below the number of threads the cards run at once:
# #79496: torch.manual_seed(10); torch.randn(3, device="cuda").
# #62467: a cuda Generator seeded 43, torch.empty(1, 3, 128, 128).normal_() on an RTX A6000, [..., 0, 0]
#         (elements 0, 16384 and 32768).
# #143086: a cuda Generator seeded 1, torch.randn(1, 49 * 12 * 112 * 144): the first three (A100 and H100 alike).
# #158398: a cuda Generator seeded 42, torch.randn([1, 64, 2048]): first and last three of rows 0 and 1.
QUOTED_IN_PYTORCH_ISSUES = [
    (10, (3,), [0, 1, 2], [-0.1029, 1.6810, -0.2708]),
    (43, (1, 3, 128, 128), [0, 16384, 32768], [1.9983, 0.8704, 2.1127]),
    (1, (1, 64, 2048), [0, 1, 2], [-0.2963, 2.6764, -0.1408]),  # the first numbers do not depend on the size
    (42, (1, 64, 2048), [0, 1, 2, 2045, 2046, 2047, 2048, 2049, 2050, 4093, 4094, 4095],
     [0.1940, 2.1614, -0.1721, 1.4540, -2.7733, -0.8932, -0.4574, 0.8063, 0.1580, 0.1124, 0.2769, -1.2535]),
]


@pytest.mark.parametrize("seed, shape, indices, expected", QUOTED_IN_PYTORCH_ISSUES)
def test_cuda_values_quoted_in_pytorch_issues(seed, shape, indices, expected):
    noise = NvRandom(seed).randn(shape).flatten()
    np.testing.assert_allclose(noise[indices].numpy(), expected, rtol=0, atol=5e-5)

def test_seed_0_gives_the_documented_cuda_numbers():
    noise = NvRandom(0).randn((3, 4))
    assert noise.dtype == torch.float32 and noise.shape == (3, 4)
    # The reference prints eight decimals of float32 values; CUDA's float32 logf/sinf may differ by an ulp.
    np.testing.assert_allclose(noise.numpy(), SEED_0_CUDA, rtol=0, atol=2e-7)


def test_seed_42_gives_the_cuda_numbers_printed_by_torch():
    np.testing.assert_allclose(NvRandom(42).randn([2, 5]).numpy(), SEED_42_CUDA, rtol=0, atol=5e-5)


def test_each_draw_advances_the_offset_as_cuda_does():
    source = NvRandom(42)
    draws = [source.randn((4,)).numpy() for _ in SEED_42_SIX_DRAWS_OF_4]
    np.testing.assert_allclose(draws, SEED_42_SIX_DRAWS_OF_4, rtol=0, atol=5e-5)


def test_a_larger_draw_starts_with_a_smaller_ones_numbers_but_two_draws_are_not_one():
    """CUDA's element i comes from Philox subsequence i at the draw's offset, so one draw of 2N begins with a
    draw of N, while a second draw of N moves to the next offset (see the six draws above)."""
    one_draw = NvRandom(7).randn((2, 8))
    source = NvRandom(7)
    first, second = source.randn((8,)), source.randn((8,))
    assert torch.equal(one_draw[0], first)
    assert not torch.equal(one_draw[1], second)
    assert torch.equal(NvRandom(7).randn((1, 2, 4, 2)).flatten(), one_draw.flatten())  # only the count matters


def test_the_same_seed_gives_the_same_numbers_and_another_seed_others():
    first, again = NvRandom(1234), NvRandom(1234)
    for shape in ((1, 4, 8, 8), (3,), (2, 4, 8, 8)):
        assert torch.equal(first.randn(shape), again.randn(shape))
    assert not torch.equal(NvRandom(1234).randn((16,)), NvRandom(1235).randn((16,)))


def test_a_seed_above_32_bits_uses_the_high_key_word_and_one_past_64_bits_is_refused():
    low_only = NvRandom(5).randn((16,))
    assert not torch.equal(NvRandom(5 + 2**32).randn((16,)), low_only)
    assert torch.isfinite(NvRandom(2**64 - 1).randn((16,))).all()
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match="0..2"):
            NvRandom(seed).randn((4,))


def test_a_latent_batch_is_a_standard_normal_sample():
    noise = NvRandom(3).randn((4, 4, 64, 64))
    assert noise.shape == (4, 4, 64, 64) and torch.isfinite(noise).all()
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02


def test_the_cpu_source_keeps_torchs_cpu_generator_bit_for_bit():
    source, generator = noise_source("cpu", 42), torch.Generator().manual_seed(42)
    for shape in ((1, 4, 8, 8), (2, 4, 8, 8)):
        assert torch.equal(source.randn(shape), torch.randn(list(shape), generator=generator))
    assert torch.equal(noise_source("nv", 42).randn((2, 5)), NvRandom(42).randn((2, 5)))


def test_an_unknown_source_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="choose one of cpu, nv"):
        noise_source("gpu", 1)


# --- the run's noise source, and --rng through txt2img ------------------------------------------------------------
def sampled_batches(job, monkeypatch, folder):
    """Run txt2img on the tiny model in this process; per batch (start latents, sample kwargs, denoiser, result)."""
    seen, real_sample = [], run.sample

    def spy(name, denoiser, x, steps, **kwargs):
        start = x.clone()
        result = real_sample(name, denoiser, x, steps, **kwargs)
        seen.append((start, kwargs, denoiser, result))
        return result

    monkeypatch.setattr("ldm.generate.run.sample", spy)
    run_txt2img(job, loaded_tiny(), OutputFolder(folder, save_samples=False), log=lambda _: None)
    return seen


def tiny_job(**settings):
    return Txt2ImgJob(**{"batches": [["a"], ["b"]], "n_iter": 1, "steps": 2, "height": 64, "width": 48,
                         "seed": 42, "seed_mode": "batch", "save_grid": False, **settings})


def test_nv_start_noise_is_one_cuda_draw_per_batch(monkeypatch, tmp_path):
    seen = sampled_batches(tiny_job(rng="nv"), monkeypatch, tmp_path)
    expected = NvRandom(42)
    for start, _, _, _ in seen:
        assert torch.equal(start, expected.randn([1, 4, 8, 6]))


def test_ddim_eta_noise_comes_from_the_runs_source_after_the_start_noise(monkeypatch, tmp_path):
    """cpu: the same numbers as the torch.Generator the sampler drew from before; nv: the next CUDA draws."""
    finals = {}
    for rng in ("cpu", "nv"):
        seen = sampled_batches(tiny_job(rng=rng, eta=0.5, batches=[["a"]], steps=3), monkeypatch, tmp_path)
        (start, kwargs, denoiser, result), = seen
        if rng == "cpu":
            generator = torch.Generator().manual_seed(42)
            assert torch.equal(start, torch.randn([1, 4, 8, 6], generator=generator))
            again = sampling.sample("ddim", denoiser, start.clone(), 3, eta=0.5, generator=generator)
        else:
            source = NvRandom(42)
            assert torch.equal(start, source.randn([1, 4, 8, 6]))
            again = sampling.sample("ddim", denoiser, start.clone(), 3, eta=0.5, noise_source=source)
            assert source.offset == 1 + 3  # the start noise, then one draw per step
        assert torch.equal(result, again)
        finals[rng] = result
    assert not torch.allclose(finals["cpu"], finals["nv"])


def parameters_of(path):
    with Image.open(path) as image:
        return image.text["parameters"]


def test_rng_nv_through_txt2img_writes_rng_nv_and_changes_the_image(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    pixels, texts = {}, {}
    for name, extra in (("default", ()), ("nv", ("--rng", "NV"))):
        out = tmp_path / name
        result = txt2img("--ckpt", ckpt, "--outdir", out, "--ddim_steps", 2, "--H", 64, "--W", 64, "--n_samples", 1,
                         "--n_iter", 1, "--seed", 7, "--skip_grid", *extra)
        assert result.returncode == 0, result.stderr
        sample, = (out / "samples").iterdir()
        with Image.open(sample) as image:
            pixels[name] = np.asarray(image.convert("RGB"))
        texts[name] = parameters_of(sample)
    assert not np.array_equal(pixels["nv"], pixels["default"])
    # written for the default too: A1111 reads a text without the field as its own default, the GPU's numbers
    assert texts["default"].splitlines()[-1].endswith(f"RNG: CPU, Version: {run.VERSION}")
    fields = dict(item.split(": ", 1) for item in texts["nv"].splitlines()[-1].split(", "))
    assert fields["RNG"] == "NV" and fields["Seed"] == "7" and list(fields)[-2:] == ["RNG", "Version"]


def sampling_parser():
    parser = options.OneLineParser(prog="txt2img.py")
    options.add_sampling_arguments(parser)
    options.add_output_arguments(parser, "out")
    return parser


def test_rng_cpu_in_any_case_is_the_default_job():
    """The job is everything a run depends on, so `--rng cpu` makes the images that no flag makes."""
    parser = sampling_parser()
    default = parser.parse_args([])
    assert default.rng == "cpu"
    for spelling in ("cpu", "CPU", "Cpu"):
        args = parser.parse_args(["--rng", spelling])
        assert options.job_from_args(args, "ddim", [["a"]], 64, 64) == options.job_from_args(default, "ddim", [["a"]],
                                                                                            64, 64)
    assert options.job_from_args(parser.parse_args(["--rng", "Nv"]), "ddim", [["a"]], 64, 64).rng == "nv"


def test_an_unknown_rng_is_one_usage_line_with_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sampling_parser().parse_args(["--rng", "gpu"])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in stderr
    assert stderr.strip().splitlines() == [stderr.strip()]
    assert "--rng" in stderr and "'gpu'" in stderr and "'cpu', 'nv'" in stderr
