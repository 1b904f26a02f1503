"""Distilled models (SD-Turbo, LCM, LCM-LoRA): CFG 1 runs the conditional half only and gives the guided formula's
picture; --turbo / --lcm and detection pick steps, CFG, sampler and schedule for the options not given."""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import record_calls, txt2img
from tiny_model import write_tiny_checkpoint
from ldm.generate import distilled, options
from ldm.generate.rng import noise_source
from ldm.models.diffusion import samplers
from ldm.models.diffusion.sampling import GuidedDenoiser


@pytest.fixture
def calls(tiny, monkeypatch):
    """The batch size of every UNet call of the tiny model."""
    return record_calls(monkeypatch, tiny)


def text(seed, n=2):
    """A text conditioning of the tiny model's width (32)."""
    return torch.randn(n, 77, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler, steps", [("euler_a", 1), ("euler_a", 4), ("lcm", 4), ("ddim", 3)])
def test_cfg_1_calls_the_model_on_half_the_batch_and_gives_the_guided_formula(tiny, calls, sampler, steps):
    cond, uncond = text(1), text(2)
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def sampled(denoiser):
        return samplers.sample(sampler, denoiser, start.clone(), steps, schedule="automatic",
                               noise_source=noise_source("cpu", 7) if samplers.REGISTRY[sampler].stochastic else None)

    skipping = GuidedDenoiser(tiny, cond, uncond, 1.0, dtype=torch.float32, device="cpu")
    ours = sampled(skipping)
    assert calls and set(calls) == {2}  # the conditional half only, at every step
    calls.clear()
    full = GuidedDenoiser(tiny, cond, uncond, 2.0, dtype=torch.float32, device="cpu")  # built guided: [uncond, cond]
    full.scale = 1.0  # uncond + 1 * (cond - uncond), computed on the whole batch
    reference = sampled(full)
    assert set(calls) == {4} and len(calls) == steps
    assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5) and not torch.equal(ours, start)


def test_cfg_1_one_step_output_is_the_conditional_half_of_the_full_call(tiny):
    cond, uncond = text(4), text(5)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    output, _ = GuidedDenoiser(tiny, cond, uncond, 1.0, dtype=torch.float32, device="cpu").model_output(x, 999)
    with torch.no_grad():
        both = tiny.apply_model(torch.cat([x, x]), torch.full((4,), 999), torch.cat([uncond, cond]))
    uncond_output, cond_output = both.chunk(2)
    assert torch.allclose(output, cond_output, atol=1e-6)
    assert torch.allclose(output, uncond_output + 1.0 * (cond_output - uncond_output), atol=1e-6)


def parsed(*argv):
    parser = options.OneLineParser(prog="test")
    options.add_sampling_arguments(parser)
    options.add_model_arguments(parser)
    if "--init-img" in argv:
        options.add_image_arguments(parser, strength=0.75)
    return parser.parse_args(list(map(str, argv)))


def defaults_of(args, log=lambda line: None):
    kind = distilled.apply_to_args(args, None, log)
    return kind, args.ddim_steps, args.scale, args.sampler, args.schedule


def test_turbo_defaults_fill_only_the_options_not_given(tmp_path):
    turbo = tmp_path / "sd_turbo.safetensors"
    lines = []
    assert defaults_of(parsed("--ckpt", turbo), lines.append) == ("turbo", 1, 1.0, "euler_a", "sgm_uniform")
    assert "the name sd_turbo.safetensors says SD-Turbo" in lines[0] and "--steps 1" in lines[0]
    assert defaults_of(parsed("--ckpt", turbo, "--steps", 50, "--scale", 7.5)) == \
        ("turbo", 50, 7.5, "euler_a", "sgm_uniform")  # given, even at the parser's default values
    assert defaults_of(parsed("--ckpt", turbo, "--sampler", "ddim")) == ("turbo", 1, 1.0, "ddim", "automatic")
    assert defaults_of(parsed("--ckpt", turbo, "--distilled", "none")) == (None, 50, 7.5, None, "automatic")
    assert defaults_of(parsed("--ckpt", tmp_path / "turbocharged.ckpt"))[0] is None  # a word, not the name
    assert defaults_of(parsed("--ckpt", turbo, "--init-img", "x.png", "--strength", 0.5))[1] == 2  # img2img: a step


def test_lcm_from_the_flag_a_lora_or_a_diffusers_scheduler(tmp_path):
    plain = tmp_path / "v1-5.safetensors"
    assert defaults_of(parsed("--ckpt", plain, "--lcm")) == ("lcm", 4, 1.0, "lcm", "automatic")
    assert defaults_of(parsed("--ckpt", plain, "--turbo"))[0] == "turbo"
    assert defaults_of(parsed("--ckpt", plain, "--prompt", "a cat <lora:lcm-lora-sdv1-5:1>"))[0] == "lcm"
    assert defaults_of(parsed("--ckpt", plain, "--lora", tmp_path / "LCM_LoRA_Weights_SD15.safetensors:0.8"))[0] == "lcm"
    assert defaults_of(parsed("--ckpt", plain, "--prompt", "a cat <lora:detail:1>"))[0] is None
    folder = tmp_path / "dreamshaper-v7"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "LCMScheduler"}))
    assert defaults_of(parsed("--ckpt", folder))[0] == "lcm"


def test_turbo_from_safetensors_metadata(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"modelspec.title": "SDXL Turbo 1.0"})
    lines = []
    assert defaults_of(parsed("--ckpt", path), lines.append)[0] == "turbo"
    assert "metadata (modelspec.title: 'SDXL Turbo 1.0')" in lines[0]


def test_txt2img_of_a_turbo_checkpoint_writes_its_defaults(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "model", "tiny_turbo.safetensors")
    result = txt2img("--ckpt", ckpt, "--outdir", tmp_path / "out", "--n_samples", 2, "--n_iter", 1, "--H", 64,
                     "--W", 64, "--device", "cpu", "--skip_grid")
    assert result.returncode == 0, result.stderr
    assert "SD-Turbo defaults --steps 1, --scale 1, --sampler euler_a, --schedule sgm_uniform" in result.stdout
    (first, _) = sorted((tmp_path / "out" / "samples").glob("*.png"))
    parameters = Image.open(first).info["parameters"]
    assert "Steps: 1, Sampler: Euler a, Schedule type: SGM Uniform, CFG scale: 1.0" in parameters
