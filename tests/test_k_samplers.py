"""The sampler registry and the k-diffusion family: parity with the k-diffusion package, schedules, names.

k-diffusion's sampling.py and external.py are loaded by path (helpers.load_kdiffusion, the kdiffusion fixture),
without its package __init__, which imports torchvision and friends.
"""
import numpy as np
import pytest
import torch

from helpers import (
    K_DIFFUSION_SAMPLERS,
    K_SAMPLERS,
    SD_ALPHAS_CUMPROD,
    GaussianVEDenoiser,
    NoiseFrom,
    karras_grid,
    relative_error,
    run_ours,
    run_theirs,
)
from ldm.models.diffusion import samplers
from ldm.models.diffusion.k_sampling import ModelSigmas, SigmaDenoiser
from ldm.models.diffusion.sampling import GuidedDenoiser, Schedule


# --- parity with k-diffusion -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", K_DIFFUSION_SAMPLERS)
def test_each_k_sampler_equals_k_diffusion_on_an_analytic_denoiser(kdiffusion, name):
    denoiser = GaussianVEDenoiser()
    sigmas = karras_grid(12)
    x = denoiser.at(float(sigmas[0])).float()
    ours = run_ours(name, denoiser, x, sigmas)
    theirs = run_theirs(kdiffusion[0], name, denoiser, x, sigmas.float())
    assert relative_error(ours, theirs) < 1e-5


@pytest.mark.parametrize("name", K_DIFFUSION_SAMPLERS)
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_each_k_sampler_equals_k_diffusion_on_the_tiny_model(kdiffusion, tiny, monkeypatch, name, parameterization):
    monkeypatch.setattr(tiny, "parameterization", parameterization)
    external = kdiffusion[1]
    theirs_model = (external.CompVisVDenoiser if parameterization == "v" else external.CompVisDenoiser)(tiny)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    cond = torch.randn(2, 77, 32, generator=generator)
    ours_model = SigmaDenoiser(GuidedDenoiser(tiny, cond, dtype=torch.float32, device="cpu"))
    for schedule in ("uniform", "karras"):
        sigmas = samplers.sigma_grid(name, schedule, 6, ours_model)
        ours = run_ours(name, ours_model, x * float(sigmas[0]), sigmas)
        with torch.no_grad():
            theirs = run_theirs(kdiffusion[0], name, theirs_model, x * float(sigmas[0]), sigmas.float(),
                                extra_args={"cond": cond})
        # an adaptive sampler's step sizes come from the small difference of two solutions, which magnifies the
        # float32 rounding of the model's output (1e-6 here) about a hundredfold into where its steps land
        tolerance = 1e-3 if samplers.REGISTRY[name].adaptive else 1e-5
        assert relative_error(ours, theirs) < tolerance, schedule


def test_uniform_schedule_and_timesteps_equal_compvis_denoisers(kdiffusion, tiny):
    theirs = kdiffusion[1].CompVisDenoiser(tiny)
    ours = ModelSigmas(tiny.alphas_cumprod)
    for steps in (1, 7, 20):
        assert relative_error(ours.uniform_sigmas(steps), theirs.get_sigmas(steps)) < 1e-6
    for sigma in (0.03, 0.5, 1.0, 7.3, 14.0):
        assert ours.sigma_to_t(sigma) == pytest.approx(float(theirs.sigma_to_t(torch.tensor(sigma))), abs=2e-4)
        assert ours.sigma_to_t(sigma) != int(ours.sigma_to_t(sigma))
        quantized = ModelSigmas(tiny.alphas_cumprod, quantize=True).sigma_to_t(sigma)
        assert quantized == int(theirs.sigma_to_t(torch.tensor(sigma), quantize=True))


@pytest.mark.parametrize("schedule,function", [("karras", "get_sigmas_karras"), ("exponential", "get_sigmas_exponential"),
                                               ("polyexponential", "get_sigmas_polyexponential")])
def test_schedules_equal_k_diffusion(kdiffusion, schedule, function):
    model_sigmas = ModelSigmas(torch.tensor(SD_ALPHAS_CUMPROD))
    for steps in (2, 10, 25):
        ours = samplers.schedule_sigmas(schedule, steps, model_sigmas)
        theirs = getattr(kdiffusion[0], function)(steps, model_sigmas.sigma_min, model_sigmas.sigma_max)
        assert ours.shape == (steps + 1,) and ours[-1] == 0
        assert relative_error(ours, theirs) < 1e-6


def test_sgm_uniform_walks_uniform_timesteps_from_the_top_leaving_the_last_out():
    model_sigmas = ModelSigmas(torch.tensor(SD_ALPHAS_CUMPROD))
    sigmas = samplers.schedule_sigmas("sgm_uniform", 4, model_sigmas)
    timesteps = [model_sigmas.sigma_to_t(sigma) for sigma in sigmas[:-1]]
    assert timesteps == pytest.approx([999, 999 * 3 / 4, 999 / 2, 999 / 4], abs=1e-6)
    assert sigmas[-1] == 0


def test_dpm2_discards_the_next_to_last_sigma_as_a1111():
    model_sigmas = ModelSigmas(torch.tensor(SD_ALPHAS_CUMPROD))
    full = samplers.schedule_sigmas("karras", 11, model_sigmas)
    grid = samplers.sigma_grid("dpm_2", "automatic", 10, model_sigmas)
    assert torch.equal(grid, torch.cat([full[:-2], full[-1:]]))


# --- convergence: the deterministic step rules at their order -----------------------------------------------------
@pytest.mark.parametrize("name", [key for key in K_SAMPLERS if not samplers.REGISTRY[key].stochastic])
def test_deterministic_k_samplers_converge_at_their_order(name):
    """On the exact Gaussian denoiser, to the ODE's solution at sigma_min (the step to 0 is a jump for all)."""
    denoiser, model_sigmas = GaussianVEDenoiser(), ModelSigmas(torch.tensor(SD_ALPHAS_CUMPROD))
    step_counts, errors = [25, 50, 100], []
    for steps in step_counts:
        sigmas = samplers.schedule_sigmas("exponential", steps, model_sigmas)[:-1]
        result = run_ours(name, denoiser, denoiser.at(float(sigmas[0])), sigmas)
        errors.append(relative_error(result, denoiser.at(float(sigmas[-1]))))
    order = -np.polyfit(np.log(step_counts), np.log(errors), 1)[0]
    expected = samplers.REGISTRY[name].order
    assert errors[0] > errors[1] > errors[2]
    assert 0.8 * expected < order < expected + 0.5, (order, errors)


# --- every registered sampler through the same run -----------------------------------------------------------------
def sample_with(name, model, x, cond, steps=5, seed=11, **options):
    denoiser = GuidedDenoiser(model, cond, dtype=torch.float32, device="cpu")
    return samplers.sample(name, denoiser, x, steps, noise_source=NoiseFrom(seed), **options)


@pytest.mark.parametrize("name", list(samplers.REGISTRY))
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_every_sampler_keeps_the_shape_and_is_determined_by_its_seed(tiny, monkeypatch, name, parameterization):
    monkeypatch.setattr(tiny, "parameterization", parameterization)
    generator = torch.Generator().manual_seed(2)
    x, cond = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    first = sample_with(name, tiny, x, cond)
    assert first.shape == x.shape and torch.isfinite(first).all()
    assert torch.equal(first, sample_with(name, tiny, x, cond))
    other_seed = sample_with(name, tiny, x, cond, seed=12)
    assert torch.equal(first, other_seed) != samplers.REGISTRY[name].stochastic
    other_steps = sample_with(name, tiny, x, cond, steps=6)
    if samplers.REGISTRY[name].adaptive:  # it picks its own steps over the model's range: the count changes nothing
        assert torch.equal(first, other_steps)
    else:
        assert relative_error(first, other_steps) > 1e-4


@pytest.mark.parametrize("name", list(samplers.REGISTRY))
def test_every_sampler_does_img2img_with_strength(name, tmp_path, monkeypatch):
    """A run keeps more of the picture at strength 0.3 than at 1; the k-samplers start as A1111's img2img."""
    from helpers import loaded_tiny
    from ldm.generate import run as run_module
    from ldm.generate.img2img import ImageToImage
    from ldm.generate.output import OutputFolder

    loaded, steps = loaded_tiny(), 10
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    calls, results = [], []
    real_sample = run_module.sample

    def sample_spy(sampler, denoiser, x, steps_, **kwargs):
        calls.append({"x": x.clone(), **kwargs})
        results.append(real_sample(sampler, denoiser, x, steps_, **kwargs))
        return results[-1]

    monkeypatch.setattr(run_module, "sample", sample_spy)
    for strength in (0.3, 1.0):
        job = run_module.Job(batches=[["a blue circle"]], steps=steps, sampler=name, scale=5.0, height=32, width=32,
                             seed=3, save_grid=False, watermark=False)
        run_module.run(job, ImageToImage(image, strength), loaded, OutputFolder(tmp_path / str(strength)),
                       log=lambda _: None)
    target = loaded.model.scale_factor * loaded.model.encode_first_stage(image).mean
    assert (results[0] - target).norm() < 0.5 * (results[1] - target).norm()
    assert calls[1]["skip_steps"] == 0
    if samplers.REGISTRY[name].is_k_sampler:
        assert calls[0]["skip_steps"] == steps - 3 - 1  # A1111: t_enc + 1 steps from index steps - t_enc - 1
        assert calls[0]["schedule"] == "automatic"


# --- names, options and the infotext ----------------------------------------------------------------------------
@pytest.mark.parametrize("spelling,expected", [
    ("DPM++ 2M", ("dpmpp_2m", None)), ("dpmpp_2m", ("dpmpp_2m", None)), ("K_DPMPP_2M", ("dpmpp_2m", None)),
    ("dpm++ 2m karras", ("dpmpp_2m", "karras")), ("Euler A", ("euler_a", None)), ("k_euler_ancestral", ("euler_a", None)),
    ("DPM2 a Karras", ("dpm_2_a", "karras")), ("LMS Exponential", ("lms", "exponential")),
    ("ddim", ("ddim", None)), ("PLMS", ("plms", None)), ("dpm", ("dpm", None)),
])
def test_sampler_names_resolve_in_any_case_with_aliases_and_combined_schedules(spelling, expected):
    assert samplers.resolve_sampler(spelling) == expected


def test_every_registered_name_resolves_to_its_own_sampler():
    for key, info in samplers.REGISTRY.items():
        for spelling in (key, info.display_name, *info.aliases):
            assert samplers.resolve_sampler(spelling) == (key, None)
    with pytest.raises(ValueError, match="invalid choice 'euler_magic'"):
        samplers.resolve_sampler("euler_magic")


def parsed(*argv):
    import argparse

    from ldm.generate import options
    parser = argparse.ArgumentParser()
    options.add_sampling_arguments(parser)
    return options, parser.parse_args(list(argv))


@pytest.mark.parametrize("argv,expected", [
    ((), ("ddim", "automatic")), (("--plms",), ("plms", "automatic")), (("--dpm_solver",), ("dpm", "automatic")),
    (("--sampler", "plms", "--plms"), ("plms", "automatic")),
    (("--sampler", "DPM++ 2M Karras"), ("dpmpp_2m", "karras")),
    (("--sampler", "Euler a", "--schedule", "SGM_Uniform"), ("euler_a", "sgm_uniform")),
    (("--sampler", "dpmpp_2m karras", "--schedule", "karras"), ("dpmpp_2m", "karras")),
])
def test_options_choose_the_sampler_and_schedule(argv, expected):
    options, args = parsed(*argv)
    assert options.chosen_sampler_and_schedule(args) == expected


@pytest.mark.parametrize("argv,message", [
    (("--sampler", "DPM++ 2M Karras", "--schedule", "exponential"), "names the karras schedule"),
    (("--sampler", "ddim", "--schedule", "karras"), "--schedule applies to the k-diffusion samplers"),
    (("--sampler", "euler", "--schedule", "cosine"), "--schedule: invalid choice 'cosine'"),
    (("--sampler", "euler", "--dpm"), "contradicts --dpm_solver"),
])
def test_options_refuse_contradictions_in_one_line(argv, message):
    from ldm.generate.errors import UserError
    options, args = parsed(*argv)
    with pytest.raises(UserError, match=message):
        options.chosen_sampler_and_schedule(args)


def test_infotext_writes_the_schedule_type_after_the_sampler_for_k_samplers():
    assert samplers.infotext_fields("dpmpp_2m") == {"Sampler": "DPM++ 2M", "Schedule type": "Karras"}
    assert samplers.infotext_fields("euler_a", "exponential") == {"Sampler": "Euler a", "Schedule type": "Exponential"}
    assert samplers.infotext_fields("euler") == {"Sampler": "Euler", "Schedule type": "Uniform"}
    assert samplers.infotext_fields("ddim") == {"Sampler": "DDIM"}


def test_txt2img_with_euler_a_and_karras_end_to_end(tmp_path):
    from PIL import Image

    from helpers import txt2img
    from tiny_model import write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "out"
    result = txt2img("--ckpt", ckpt, "--outdir", out, "--ddim_steps", 3, "--H", 64, "--W", 64, "--n_samples", 1,
                     "--n_iter", 1, "--sampler", "euler a", "--schedule", "Karras", "--seed", 4)
    assert result.returncode == 0, result.stderr
    with Image.open(out / "samples" / "00000.png") as image:
        text = image.text["parameters"]
    assert "Steps: 3, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Seed: 4," in text


def test_blend_sees_each_model_calls_vp_latent_at_its_timestep():
    """Masked sampling's hook, for the k-samplers as for the originals: blend(x, t) on the VP latent x_k / sqrt(1 + sigma²)."""
    schedule = Schedule(torch.tensor(SD_ALPHAS_CUMPROD))
    seen = []

    class ZeroEps:
        def __init__(self):
            self.schedule = schedule

        def __call__(self, x, t):
            return torch.zeros_like(x), x

    def blend(x, t):
        seen.append((x.clone(), t))
        return torch.zeros_like(x)

    x = torch.ones(1, 4, 2, 2)
    result = samplers.sample("euler", ZeroEps(), x, 4, blend=blend)
    sigmas = samplers.sigma_grid("euler", "automatic", 4, ModelSigmas(schedule.alphas_cumprod))
    assert [t for _, t in seen] == pytest.approx([999, 666, 333, 0], abs=1e-6)
    first_x, _ = seen[0]
    assert torch.allclose(first_x, x * float(sigmas[0]) / (1 + float(sigmas[0]) ** 2) ** 0.5)
    assert torch.equal(result, torch.zeros_like(x))  # every model call saw the blended (zero) latent


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m"])
def test_inpainting_by_masked_sampling_runs_the_k_samplers(name, tmp_path):
    from helpers import loaded_tiny
    from ldm.generate import run as run_module
    from ldm.generate.inpaint import Inpainting
    from ldm.generate.output import OutputFolder

    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, 16:] = 1.0
    job = run_module.Job(batches=[["a red square"]], steps=4, sampler=name, scale=5.0, height=32, width=32, seed=2,
                         save_grid=False, watermark=False)
    report = run_module.run(job, Inpainting(image, mask, strength=0.5), loaded_tiny(), OutputFolder(tmp_path / "out"),
                            log=lambda _: None)
    assert len(report.saved) == 1 and not report.failed and report.interrupted is None
