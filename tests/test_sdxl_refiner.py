"""The refiner as a second pass (ldm.generate.refiner): which model answers which model call (A1111's switch by
sigma), the sampling going on along the same sigmas, the refiner's own conditioning, low-memory mode, the
infotext, the options, the command line and the Python API. Tiny SDXL base and refiner (configs/tiny/)."""
import math

import numpy as np
import pytest
import torch

from conftest import REPO
from helpers import txt2img
from ldm.generate import refiner as refiner_module
from ldm.generate.errors import UserError
from ldm.generate.hires import HiresSettings
from ldm.generate.loading import load
from ldm.generate.output import OutputFolder
from ldm.generate.refiner import RefinerSettings, completed_fraction, settings_from_args
from ldm.generate.run import Job, run
from ldm.generate.txt2img import TextToImage
from ldm.models.diffusion.k_sampling import ModelSigmas
from tiny_model import write_tiny_checkpoint

TINY_SDXL = REPO / "configs" / "tiny" / "sdxl-tiny.yaml"
TINY_REFINER = REPO / "configs" / "tiny" / "sdxl-refiner-tiny.yaml"
POOLED, EMBED = 16, 128  # the tiny refiner's pooled width and size-embedding width


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refiner")
    return (write_tiny_checkpoint(folder, "base.safetensors", seed=1, config=TINY_SDXL),
            write_tiny_checkpoint(folder, "refiner.safetensors", seed=2, config=TINY_REFINER))


def quiet(line):
    pass


def loaded(path, low_memory=False):
    return load(str(path), None, "cpu", "full", log=quiet, low_memory=low_memory)


@pytest.fixture(autouse=True)
def fresh_refiner_cache():
    refiner_module._loaded_refiners.clear()
    yield
    refiner_module._loaded_refiners.clear()


def a1111_fraction(alphas_cumprod, t: float) -> float:
    """A1111's apply_refiner, written out: sigma at the (fractional) timestep, the nearest of the 1000 sigmas."""
    log_sigmas = np.log(np.sqrt((1 - alphas_cumprod) / alphas_cumprod))
    sigma = math.exp(np.interp(t, np.arange(len(log_sigmas)), log_sigmas))
    timestep = int(np.abs(np.exp(log_sigmas) - sigma).argmin())
    return (999 - timestep) / 1000


def recorded(monkeypatch, model, who, calls):
    real = model.apply_model

    def recording(x, t, cond):
        calls.append((who, float(t[0]), cond))
        return real(x, t, cond)

    monkeypatch.setattr(model, "apply_model", recording)


def job(**changes):
    settings = dict(batches=[["a red cat"]], steps=10, sampler="euler", height=64, width=64, save_grid=False,
                    watermark=False, scale=5.0, negative_prompt="blurry")
    return Job(**{**settings, **changes})


def refined_run(monkeypatch, files, tmp_path, task=None, low_memory=False, switch_at=0.8, **changes):
    """(calls [(model, t, cond)], the run's report, base, refiner) of a run of the tiny base with the refiner."""
    base = loaded(files[0], low_memory)
    refiner = loaded(files[1], low_memory)
    key = (str(files[1]), "cpu", torch.float32, low_memory)
    refiner_module._loaded_refiners[key] = refiner
    calls = []
    recorded(monkeypatch, base.model, "base", calls)
    recorded(monkeypatch, refiner.model, "refiner", calls)
    this_job = job(refiner=RefinerSettings(str(files[1]), switch_at), **changes)
    report = run(this_job, task or TextToImage(), base, OutputFolder(tmp_path), log=quiet)
    return calls, report, base, refiner


def test_completed_fraction_is_a1111s_nearest_timestep():
    from ldm.modules.diffusionmodules.util import make_beta_schedule

    betas = make_beta_schedule("linear", 1000, 0.00085, 0.0120)
    acp = np.cumprod(1 - betas)
    sigmas = ModelSigmas(torch.tensor(acp))
    for t in (999, 800, 200, 199, 0):  # DDIM-like samplers: the timestep itself
        assert completed_fraction(sigmas, t) == (999 - t) / 1000
    for t in np.linspace(0.0, 999.0, 157):  # the k-samplers' fractional timesteps
        assert completed_fraction(sigmas, float(t)) == a1111_fraction(acp, float(t))


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim"])
def test_the_refiner_answers_the_calls_from_the_switch_on_the_same_sigmas(monkeypatch, files, tmp_path, sampler):
    calls, report, base, _ = refined_run(monkeypatch, files, tmp_path, sampler=sampler)
    alone, base_alone = [], loaded(files[0])
    recorded(monkeypatch, base_alone.model, "alone", alone)
    run(job(sampler=sampler), TextToImage(), base_alone, OutputFolder(tmp_path / "alone"), log=quiet)
    # the sampling goes on along the base's own grid: the same timesteps, call for call
    assert [t for _, t, _ in calls] == [t for _, t, _ in alone]
    acp = base.model.alphas_cumprod.double().numpy()
    expected = ["refiner" if a1111_fraction(acp, t) >= 0.8 else "base" for _, t, _ in calls]
    assert [who for who, _, _ in calls] == expected
    assert expected.count("base") > 0 and expected.count("refiner") > 0
    assert len(report.saved) == 1


def test_the_refiner_has_its_own_conditioning_with_aesthetic_scores(monkeypatch, files, tmp_path):
    from diffusers.models.embeddings import get_timestep_embedding

    def sinusoid(values):
        embedded = get_timestep_embedding(torch.tensor(values, dtype=torch.float32), EMBED, flip_sin_to_cos=True,
                                          downscale_freq_shift=0)
        return embedded.reshape(1, -1)

    calls, _, _, refiner = refined_run(monkeypatch, files, tmp_path, width=48)
    cond = next(cond for who, _, cond in calls if who == "refiner")
    context, vector = cond["c_crossattn"][0], cond["c_adm"]
    assert context.shape == (2, 77, POOLED) and vector.shape == (2, POOLED + 5 * EMBED)  # [uncond, cond]
    for row, score in ((0, 2.5), (1, 6.0)):
        expected = torch.cat([sinusoid([64, 48]), sinusoid([0, 0]), sinusoid([score])], dim=1)
        torch.testing.assert_close(vector[row:row + 1, POOLED:], expected, rtol=0, atol=1e-5)
    reference = refiner.model.get_learned_conditioning(["a red cat"], refiner.model.native_size_conditioning())
    torch.testing.assert_close(context[1:], reference["c_crossattn"][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(vector[1:, :POOLED], reference["c_adm"][:, :POOLED], rtol=0, atol=1e-6)


def test_the_infotext_names_the_refiner_as_a1111(monkeypatch, files, tmp_path):
    _, report, _, refiner = refined_run(monkeypatch, files, tmp_path)
    from PIL import Image

    with Image.open(report.saved[0]) as image:
        text = image.text["parameters"]
    assert f"Refiner: refiner [{refiner.hash}], Refiner switch at: 0.8, Version:" in text
    assert len(refiner.hash) == 10


def test_a_refiner_that_never_takes_over_is_said_and_not_written(monkeypatch, files, tmp_path):
    lines = []
    base = loaded(files[0])
    this_job = job(steps=1, refiner=RefinerSettings(str(files[1]), 0.8))  # one call, at timestep 999
    report = run(this_job, TextToImage(), base, OutputFolder(tmp_path), log=lines.append)
    from PIL import Image

    with Image.open(report.saved[0]) as image:
        assert "Refiner" not in image.text["parameters"]
    assert any(line.startswith("warning: the refiner took no step") and "timestep 199" in line for line in lines)


def test_low_memory_gives_the_base_back_before_the_refiner_is_read(monkeypatch, files, tmp_path):
    base = loaded(files[0], low_memory=True)
    refiner = loaded(files[1], low_memory=True)
    refiner_module._loaded_refiners[(str(files[1]), "cpu", torch.float32, True)] = refiner
    converted = []
    for who, model in (("base", base), ("refiner", refiner)):
        real = model.components.use

        def use(name, who=who, real=real):
            converted.append((who, name, base.components.current, refiner.components.current))
            return real(name)

        monkeypatch.setattr(model.components, "use", use)
    run(job(refiner=RefinerSettings(str(files[1]), 0.5), n_iter=2), TextToImage(), base, OutputFolder(tmp_path),
        log=quiet)
    refiner_uses = [entry for entry in converted if entry[0] == "refiner"]
    names = [name for _, name, _, _ in refiner_uses]  # its text encoder once: the run caches the conditioning
    assert names[0] == "cond_stage_model" and names.count("model") == 2 and names[-1] == "model"
    assert all(base_current is None for _, _, base_current, _ in refiner_uses)  # nothing of the base converted
    base_uses = [entry for entry in converted if entry[0] == "base"]
    assert all(refiner_current is None for _, _, _, refiner_current in base_uses)  # nor of the refiner, back
    assert refiner.components.current is None


def test_with_the_hires_fix_the_refiner_takes_over_its_second_pass(monkeypatch, files, tmp_path):
    calls, _, _, _ = refined_run(monkeypatch, files, tmp_path, task=TextToImage(HiresSettings(scale=2.0, steps=4)),
                                 height=32, width=32)
    first_pass = calls[:10]
    assert all(who == "base" for who, _, _ in first_pass)
    second = [who for who, _, _ in calls[10:]]
    assert second[0] == "base" and second[-1] == "refiner"


def test_an_incompatible_refiner_is_refused_in_one_line(files, tmp_path):
    from dataclasses import replace

    base, refiner = loaded(files[0]), loaded(files[1])
    assert refiner_module.compatibility_problem(base, refiner) is None
    wide = replace(refiner, latent_channels=16)
    assert "use a refiner of the same family" in refiner_module.compatibility_problem(base, wide)
    base_alphas = base.model.alphas_cumprod.clone()
    base.model.alphas_cumprod.mul_(0.99)
    assert "another noise schedule" in refiner_module.compatibility_problem(base, refiner)
    base.model.alphas_cumprod.copy_(base_alphas)
    refiner_module._loaded_refiners[(str(files[1]), "cpu", torch.float32, False)] = wide
    with pytest.raises(UserError, match="^the refiner refiner.safetensors has latents of 16 channels") as refused:
        run(job(refiner=RefinerSettings(str(files[1]))), TextToImage(), base, OutputFolder(tmp_path), log=quiet)
    assert "\n" not in str(refused.value) and not (tmp_path / "samples").exists()


def test_the_options_are_checked_before_anything_is_loaded(files, tmp_path):
    from types import SimpleNamespace

    assert settings_from_args(SimpleNamespace(refiner=None, refiner_switch=None)) is None
    settings = settings_from_args(SimpleNamespace(refiner=str(files[1]), refiner_switch=None))
    assert settings == RefinerSettings(str(files[1]), 0.8)
    for switch in (0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(UserError, match="--refiner_switch .* is outside \\(0, 1\\)"):
            settings_from_args(SimpleNamespace(refiner=str(files[1]), refiner_switch=switch))
    with pytest.raises(UserError, match="--refiner_switch applies to a refiner"):
        settings_from_args(SimpleNamespace(refiner=None, refiner_switch=0.5))
    with pytest.raises(UserError, match="--refiner .*missing.safetensors: no such file"):
        settings_from_args(SimpleNamespace(refiner=str(tmp_path / "missing.safetensors"), refiner_switch=None))


def test_txt2img_with_a_refiner(files, tmp_path):
    out = tmp_path / "out"
    result = txt2img("--ckpt", files[0], "--refiner", files[1], "--refiner_switch", 0.6, "--prompt", "a cat",
                     "--n_samples", 1, "--n_iter", 1, "--ddim_steps", 6, "--sampler", "dpmpp_2m", "--outdir", out)
    assert result.returncode == 0, result.stderr
    from PIL import Image

    with Image.open(out / "samples" / "00000.png") as image:
        assert "Refiner: refiner [" in image.text["parameters"] and "Refiner switch at: 0.6" in image.text["parameters"]


def test_the_python_api_takes_refiner_keywords(files):
    from ldm.pipeline import Pipeline

    pipe = Pipeline(loaded(files[0]), log=quiet)
    result = pipe("a red cat", num_inference_steps=5, sampler="euler", height=64, width=64, seed=3,
                  refiner=files[1], refiner_switch=0.5, watermark=False)
    assert "Refiner: refiner [" in result.infotexts[0] and "Refiner switch at: 0.5" in result.infotexts[0]
    with pytest.raises(ValueError, match="refiner_switch 2.0 is outside"):
        pipe("a red cat", num_inference_steps=5, refiner=files[1], refiner_switch=2)
