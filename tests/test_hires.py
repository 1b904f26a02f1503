"""txt2img's hires fix (ldm.generate.hires) on the tiny model: sizes, upscalers, steps, infotext, bad options."""
import argparse

import pytest
import torch
from PIL import Image

from helpers import loaded_tiny, txt2img
from ldm.generate import hires
from ldm.generate import run as run_module
from ldm.generate.errors import UserError
from ldm.generate.hires import HiresSettings, Target
from ldm.generate.output import OutputFolder
from ldm.generate.run import Job, run
from ldm.generate.txt2img import TextToImage
from tiny_model import write_tiny_checkpoint

SIZE, STEPS = 32, 4
REAL_DECODE, REAL_SAMPLE = run_module.decode, run_module.sample  # before any test's spies


@pytest.fixture(scope="module")
def loaded():
    return loaded_tiny()


def hires_run(loaded, folder, settings, monkeypatch, **job_settings):
    """(decoded latents, sampler calls [(steps, skip_steps, x shape)], apply_model calls, saved paths)."""
    decoded, sampled, model_calls = [], [], []
    real_decode, real_sample = REAL_DECODE, REAL_SAMPLE
    real_apply = type(loaded.model).apply_model.__get__(loaded.model)

    def decode_spy(loaded_, latents, *rest):
        decoded.append(latents.clone())
        return real_decode(loaded_, latents, *rest)

    def sample_spy(name, denoiser, x, steps, **kwargs):
        sampled.append((steps, kwargs["skip_steps"], list(x.shape)))
        return real_sample(name, denoiser, x, steps, **kwargs)

    def apply_spy(*args, **kwargs):
        model_calls.append(1)
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(run_module, "decode", decode_spy)
    monkeypatch.setattr(run_module, "sample", sample_spy)
    monkeypatch.setattr(loaded.model, "apply_model", apply_spy)
    job = Job(**{"batches": [["a blue circle"]], "steps": STEPS, "scale": 5.0, "height": SIZE, "width": SIZE,
                 "seed": 3, "save_grid": False, "watermark": False, **job_settings})
    report = run(job, TextToImage(settings), loaded, OutputFolder(folder), log=lambda _: None)
    return decoded, sampled, len(model_calls), report.saved


def test_output_is_the_scaled_size_with_a1111s_fields(loaded, tmp_path, monkeypatch):
    settings = HiresSettings(scale=2.0, steps=3, prompt="a red square", negative_prompt="blurry")
    decoded, sampled, _, saved = hires_run(loaded, tmp_path, settings, monkeypatch, sampler="euler")
    assert [shape for _, _, shape in sampled] == [[1, 4, 4, 4], [1, 4, 8, 8]]
    assert list(decoded[0].shape) == [1, 4, 8, 8]
    with Image.open(saved[0]) as image:
        assert image.size == (2 * SIZE, 2 * SIZE)
        text = image.text["parameters"]
    assert (f"Size: {SIZE}x{SIZE}, " in text  # the first pass's, as A1111 writes it
            and "Denoising strength: 0.7, Hires prompt: a red square, Hires negative prompt: blurry, "
                "Hires upscale: 2, Hires steps: 3, Hires upscaler: Latent, " in text)


def test_resize_fields_and_no_hires_no_fields(loaded, tmp_path, monkeypatch):
    settings = HiresSettings(resize_x=48, resize_y=64, upscaler="Nearest", strength=0.5)
    assert hires.infotext_fields(settings) == {"Denoising strength": 0.5, "Hires resize": "48x64",
                                               "Hires upscaler": "Nearest"}
    assert TextToImage().fields(Job(batches=[["a"]])) == {}


def test_strength_zero_decodes_the_upscaled_first_pass(loaded, tmp_path, monkeypatch):
    settings = HiresSettings(scale=2.0, strength=0.0, upscaler="Latent (bicubic)")
    first_pass, _, _, _ = hires_run(loaded, tmp_path / "first", None, monkeypatch, sampler="euler")
    decoded, sampled, _, _ = hires_run(loaded, tmp_path / "hires", settings, monkeypatch, sampler="euler")
    assert len(sampled) == 1  # no second pass of sampling
    expected = torch.nn.functional.interpolate(first_pass[0], size=(8, 8), mode="bicubic")
    torch.testing.assert_close(decoded[0], expected)


@pytest.mark.parametrize("upscaler", [*hires.LATENT_UPSCALERS, *hires.PIXEL_UPSCALERS])
def test_every_upscaler_runs(loaded, tmp_path, monkeypatch, upscaler):
    settings = HiresSettings(scale=1.5, upscaler=upscaler, strength=0.0)
    decoded, _, _, _ = hires_run(loaded, tmp_path, settings, monkeypatch, steps=2)
    assert list(decoded[0].shape) == [1, 4, 6, 6]
    assert torch.isfinite(decoded[0]).all()


@pytest.mark.parametrize("sampler, strength", [("euler", 0.3), ("ddim", 0.7), ("dpmpp_2m", 1.0)])
def test_second_pass_runs_the_requested_steps(loaded, tmp_path, monkeypatch, sampler, strength):
    """A1111's img2img with a step count: the schedule made for int(steps / strength) steps, its last run."""
    settings = HiresSettings(scale=2.0, steps=3, strength=strength)
    _, sampled, model_calls, _ = hires_run(loaded, tmp_path, settings, monkeypatch, sampler=sampler)
    (steps, skip, _), = sampled[1:]
    assert (steps, steps - skip) == (int(3 / min(strength, 0.999)), 3)
    assert model_calls == STEPS + 3  # one batched (uncond, cond) call per step for these samplers


def test_default_second_pass_steps_are_the_first_pass_steps(loaded, tmp_path, monkeypatch):
    _, sampled, _, _ = hires_run(loaded, tmp_path, HiresSettings(scale=2.0, strength=0.5), monkeypatch,
                                 sampler="euler_a")
    assert [(steps - skip) for steps, skip, _ in sampled] == [STEPS, STEPS]


def test_second_pass_noise_uses_the_images_seeds_again(loaded, tmp_path, monkeypatch):
    """A1111 mode: image k of a batch gets the hires pass it gets alone with its seed."""
    settings = HiresSettings(scale=2.0, strength=0.6)
    batch, _, _, _ = hires_run(loaded, tmp_path / "b", settings, monkeypatch, batches=[["a", "a"]], seed=5)
    alone, _, _, _ = hires_run(loaded, tmp_path / "a", settings, monkeypatch, batches=[["a"]], seed=6)
    torch.testing.assert_close(batch[0][1:], alone[0], rtol=1e-4, atol=1e-5)


def test_target_sizes_as_a1111():
    assert hires.target(HiresSettings(scale=1.5), 64, 96) == Target(96, 144, 96, 144)
    assert hires.target(HiresSettings(resize_x=192), 64, 96) == Target(128, 192, 128, 192)
    assert hires.target(HiresSettings(resize_y=192), 64, 96) == Target(192, 288, 192, 288)
    # both: upscaled to cover 128x128, then the latent cropped at its centre to it
    assert hires.target(HiresSettings(resize_x=128, resize_y=128), 64, 96) == Target(128, 192, 128, 128)


def args_for(**given):
    defaults = {"hr_scale": None, "hr_resize_x": 0, "hr_resize_y": 0, **hires.HIRES_ONLY}
    return argparse.Namespace(**{**defaults, **given})


@pytest.mark.parametrize("given, words", [
    ({"hr_scale": 1.0}, "--hr_scale 1.0 does not enlarge"),
    ({"hr_scale": float("nan")}, "--hr_scale nan"),
    ({"hr_scale": 2.0, "denoising_strength": 1.5}, "--denoising_strength 1.5 is outside"),
    ({"hr_scale": 2.0, "hr_second_pass_steps": -1}, "--hr_second_pass_steps must be"),
    ({"hr_scale": 2.0, "hr_upscaler": "ESRGAN"}, "--hr_upscaler: unknown upscaler 'ESRGAN'"),
    ({"denoising_strength": 0.5}, "--denoising_strength applies to the hires fix, which is off"),
])
def test_bad_options_are_refused(given, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace("+", r"\+")):
        hires.settings_from_args(args_for(**given))


def test_upscaler_names_in_any_case():
    settings = hires.settings_from_args(args_for(hr_scale=2.0, hr_upscaler="latent (NEAREST-exact)"))
    assert settings.upscaler == "Latent (nearest-exact)"
    assert hires.settings_from_args(args_for()) is None


def test_final_sizes_off_the_grid_are_refused():
    with pytest.raises(UserError, match=r"--hr_scale 1.3 makes 83x83 .* --hr_resize_x 80 --hr_resize_y 80"):
        hires.checked_target(HiresSettings(scale=1.3), 64, 64)
    with pytest.raises(UserError, match="--hr_resize_x 100 is not a multiple of 8: use 96 or 104"):
        hires.checked_target(HiresSettings(resize_x=100), 64, 64)


def test_cli_makes_the_final_size_and_refuses_before_loading(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    common = ("--ckpt", ckpt, "--ddim_steps", 2, "--H", SIZE, "--W", SIZE, "--n_samples", 1, "--n_iter", 1,
              "--skip_grid", "--sampler", "Euler")
    refused = txt2img(*common, "--outdir", tmp_path / "refused", "--hr_scale", 1.1, "--ckpt", tmp_path / "missing.ckpt")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.splitlines() == [
        "error: --hr_scale 1.1 makes 35x35 of the first pass's 32x32, not a multiple of 8 on each side: give the "
        "final size instead, e.g. --hr_resize_x 32 --hr_resize_y 32"]
    assert not (tmp_path / "refused").exists()
    result = txt2img(*common, "--outdir", tmp_path / "out", "--hr_scale", 2, "--hr_upscaler", "lanczos")
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "out" / "samples" / "00000.png") as image:
        assert image.size == (2 * SIZE, 2 * SIZE)
        assert "Hires upscale: 2, Hires upscaler: Lanczos" in image.text["parameters"]


def test_hires_prompt_tags_are_taken_out_and_its_and_parts_read(loaded, tmp_path, monkeypatch):
    """The second pass's text never holds a <lora:...> tag; "a AND b" there is two parts, as in the first pass."""
    from ldm.generate import conditioning

    encoded = []
    real_encode = conditioning.Conditioner.encode_group

    def spy(conditioner, texts):
        encoded.extend(texts)
        return real_encode(conditioner, texts)

    monkeypatch.setattr(conditioning.Conditioner, "encode_group", spy)
    settings = HiresSettings(scale=2.0, steps=2, prompt="a red square <lora:style:0.5> AND a blue circle")
    hires_run(loaded, tmp_path, settings, monkeypatch)
    assert "a red square" in encoded and "a blue circle" in encoded
    assert not any("<lora" in text or "AND" in text for text in encoded)
