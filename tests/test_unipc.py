"""UniPC as A1111 runs it: parity with diffusers' UniPCMultistepScheduler, convergence order on an exactly
solvable problem, A1111's step counts and img2img start, and its place in the registry."""
import argparse

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from helpers import relative_error
from ldm.generate import options
from ldm.generate.errors import UserError
from ldm.generate.img2img import denoising_steps, noised_start_timestep
from ldm.models.diffusion import samplers, unipc
from ldm.models.diffusion.sampler_options import SamplerOptions
from ldm.models.diffusion.sampling import GuidedDenoiser, Schedule
from ldm.modules.diffusionmodules.util import make_beta_schedule

SD_SCHEDULE = Schedule(torch.tensor(np.cumprod(1.0 - make_beta_schedule("linear", 1000, 0.00085, 0.012))))


def tiny_denoiser(model, monkeypatch, parameterization="eps"):
    monkeypatch.setattr(model, "parameterization", parameterization)
    generator = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    return GuidedDenoiser(model, cond, dtype=torch.float32, device="cpu"), x


def diffusers_unipc(denoiser, x, steps, variant, parameterization):
    """diffusers' scheduler configured as A1111's UniPC (order 3, data prediction, lower order final, ending at
    model timestep 0 rather than jumping to sigma 0), stepping on the same model outputs."""
    acp = denoiser.schedule.alphas_cumprod
    betas = (1 - acp / torch.cat([acp.new_ones(1), acp[:-1]])).numpy()
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=len(acp), trained_betas=betas, solver_order=3, solver_type=variant, predict_x0=True,
        lower_order_final=True, timestep_spacing="linspace", final_sigmas_type="sigma_min",
        prediction_type="epsilon" if parameterization == "eps" else "v_prediction")
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        output, _ = denoiser.model_output(x, int(t))
        x = scheduler.step(output, t, x).prev_sample
    return x, scheduler.timesteps.tolist()


# --- parity with diffusers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", unipc.VARIANTS)
@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_equals_diffusers_where_its_grid_is_time_uniform(tiny, monkeypatch, variant, parameterization):
    """linspace(0, 999, steps + 1) is whole timesteps when steps divides 999: the same grid as ours."""
    steps = 9
    denoiser, x = tiny_denoiser(tiny, monkeypatch, parameterization)
    theirs, grid = diffusers_unipc(denoiser, x, steps, variant, parameterization)
    assert grid == pytest.approx(unipc.time_uniform_timesteps(denoiser.schedule, steps)[:-1].tolist(), abs=1e-9)
    assert relative_error(unipc.sample_unipc(denoiser, x, steps, variant=variant), theirs) < 1e-5


@pytest.mark.parametrize("steps", [2, 10])
def test_equals_diffusers_step_by_step_on_its_rounded_grid(tiny, monkeypatch, steps):
    """Elsewhere diffusers rounds its timesteps to whole ones; given that grid, ours takes the same steps (2: fewer
    steps than the order, which lowers it)."""
    denoiser, x = tiny_denoiser(tiny, monkeypatch)
    theirs, grid = diffusers_unipc(denoiser, x, steps, "bh1", "eps")
    assert relative_error(unipc.sample_unipc(denoiser, x, steps, timesteps=[*grid, 0]), theirs) < 1e-5
    assert relative_error(unipc.sample_unipc(denoiser, x, steps), theirs) > 1e-5  # the grids do differ


# --- convergence on an exactly solvable problem ---------------------------------------------------------------------
class GaussianVPDenoiser:
    """Exact for data N(mu, diag(s²)) under x_t = alpha·x0 + sigma·eps: x0's posterior mean is linear in x_t, and
    the probability-flow ODE moves x_t = alpha·mu + sqrt(alpha² s² + sigma²)·z for a fixed z."""

    def __init__(self, schedule):
        generator = torch.Generator().manual_seed(3)
        self.schedule = schedule
        self.mu, self.z = torch.randn(2, 1, 4, 8, 8, generator=generator, dtype=torch.float64)
        self.s = 0.3 + torch.rand(1, 4, 8, 8, generator=generator, dtype=torch.float64)

    def __call__(self, x, t):
        alpha, sigma = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        x0 = self.mu + alpha * self.s**2 / (alpha**2 * self.s**2 + sigma**2) * (x - alpha * self.mu)
        return (x - alpha * x0) / sigma, x0

    def at(self, t):
        alpha, sigma = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        return alpha * self.mu + (alpha**2 * self.s**2 + sigma**2).sqrt() * self.z


# Log-SNR linear in t, so that time-uniform steps are uniform in log-SNR, where UniPC works, and the asymptotic
# orders show at moderate step counts.
LINEAR_LOG_SNR_SCHEDULE = Schedule(1.0 / (1.0 + np.exp(-2.0 * np.linspace(4.0, -4.0, 1000))))


@pytest.mark.parametrize("order,lower_order_final,low,high", [
    (1, False, 1.8, 2.3),  # UniC raises UniP's order by one
    (2, False, 2.7, 3.3),
    (3, False, 2.8, 3.6),  # the first, warm-up step (order 1 corrected: 2) bounds it to 3
    (3, True, 2.3, 3.5),  # A1111's: the last step uncorrected at order 1
])
@pytest.mark.parametrize("variant", unipc.VARIANTS)
def test_converges_to_the_exact_solution_at_its_order(order, lower_order_final, low, high, variant):
    denoiser, step_counts = GaussianVPDenoiser(LINEAR_LOG_SNR_SCHEDULE), [25, 50, 100]
    exact = denoiser.at(0)
    errors = [relative_error(unipc.sample_unipc(denoiser, denoiser.at(999), steps, order=order, variant=variant,
                                                lower_order_final=lower_order_final), exact)
              for steps in step_counts]
    measured = -np.polyfit(np.log(step_counts), np.log(errors), 1)[0]
    assert errors[0] > errors[1] > errors[2]
    assert low < measured < high, (measured, errors)


def test_third_order_is_more_accurate_than_dpm_solver_at_few_steps_on_the_sd_schedule():
    from ldm.models.diffusion.sampling import sample_dpm_solver
    denoiser = GaussianVPDenoiser(SD_SCHEDULE)
    exact = denoiser.at(0)
    for steps in (8, 10, 15):
        ours = relative_error(unipc.sample_unipc(denoiser, denoiser.at(999), steps), exact)
        assert ours < relative_error(sample_dpm_solver(denoiser, denoiser.at(999), steps), exact), steps


# --- as A1111 runs it -----------------------------------------------------------------------------------------------
class RecordingDenoiser(GaussianVPDenoiser):
    def __init__(self, schedule):
        super().__init__(schedule)
        self.times = []

    def __call__(self, x, t):
        self.times.append(t)
        return super().__call__(x, t)


@pytest.mark.parametrize("steps,unipc_steps", [(20, 20), (8, 8), (15, 16), (30, 31), (3, 4)])
def test_txt2img_runs_as_many_steps_as_a1111s_timestep_list(steps, unipc_steps):
    """A1111 runs len(range(0, 1000, 1000 // steps)) UniPC steps, one model call each, from timestep 999."""
    denoiser = RecordingDenoiser(SD_SCHEDULE)
    samplers.sample("unipc", denoiser, denoiser.at(999), steps)
    assert unipc.a1111_steps_and_start(SD_SCHEDULE, steps) == (unipc_steps, None)
    assert denoiser.times == pytest.approx(np.linspace(999, 0, unipc_steps + 1)[:-1].tolist(), abs=1e-9)


def test_img2img_noises_as_ddim_and_walks_t_enc_steps_from_the_index_below():
    """Strength 0.75 of 10 steps: t_enc 7, noised to timestep 701 and 7 time-uniform steps from 601 to 0."""
    steps, t_enc = 10, denoising_steps(0.75, 10)
    denoiser = RecordingDenoiser(SD_SCHEDULE)
    assert noised_start_timestep("unipc", SD_SCHEDULE, steps, t_enc) == 701
    assert unipc.first_timestep(SD_SCHEDULE, steps, steps - t_enc) == 601
    samplers.sample("unipc", denoiser, denoiser.at(701), steps, skip_steps=steps - t_enc)
    assert denoiser.times == pytest.approx(np.linspace(601, 0, 8)[:-1].tolist(), abs=1e-9)


def test_the_registry_runs_it_with_a1111s_defaults_and_hooks(tiny, monkeypatch):
    denoiser, x = tiny_denoiser(tiny, monkeypatch)
    infos, blended = [], []

    def blend(latent, t):
        blended.append(t)
        return latent

    result = samplers.sample("unipc", denoiser, x, 8, callback=infos.append, blend=blend)
    direct = unipc.sample_unipc(denoiser, x, 8, order=3, variant="bh1", lower_order_final=True)
    assert torch.equal(result, direct)
    assert [info["i"] for info in infos] == list(range(8)) and infos[-1]["total"] == 8
    assert torch.equal(infos[-1]["x"], result)
    assert blended == pytest.approx(np.linspace(999, 0, 9)[:-1].tolist(), abs=1e-9)
    assert [info["t"] for info in infos] == pytest.approx(blended[1:] + blended[-1:], abs=1e-9)


def test_blend_carries_the_start_on_and_feeds_every_prediction_to_the_model():
    denoiser = GaussianVPDenoiser(SD_SCHEDULE)
    zeroed = unipc.sample_unipc(denoiser, denoiser.at(999), 6, blend=lambda latent, t: torch.zeros_like(latent))
    from_zero = unipc.sample_unipc(denoiser, torch.zeros_like(denoiser.mu), 6)
    assert relative_error(zeroed, from_zero) > 1e-3  # the predictions were zeroed for the model too
    assert relative_error(unipc.sample_unipc(denoiser, denoiser.at(999), 6, blend=lambda latent, t: latent),
                          unipc.sample_unipc(denoiser, denoiser.at(999), 6)) == 0


@pytest.mark.parametrize("spelling", ["UniPC", "unipc", "uni_pc", "UNI PC"])
def test_names_resolve_and_the_infotext_has_no_schedule_type(spelling):
    assert samplers.resolve_sampler(spelling) == ("unipc", None)
    assert samplers.infotext_fields("unipc") == {"Sampler": "UniPC"}
    assert samplers.REGISTRY["unipc"].family == "model_time" and not samplers.REGISTRY["unipc"].is_k_sampler


def test_options_refuse_a_schedule_and_sampler_options_for_it():
    parser = argparse.ArgumentParser()
    options.add_sampling_arguments(parser)
    args = parser.parse_args(["--sampler", "UniPC", "--schedule", "karras"])
    with pytest.raises(UserError, match="--schedule applies to the k-diffusion samplers; UniPC walks its own"):
        options.chosen_sampler_and_schedule(args)
    with pytest.raises(ValueError, match="UniPC does not use s_churn"):
        samplers.sample("unipc", GaussianVPDenoiser(SD_SCHEDULE), torch.zeros(1, 4, 8, 8), 5,
                        sampler_options=SamplerOptions(s_churn=1.0))


@pytest.mark.parametrize("arguments,message", [
    ({"variant": "vary_coeff"}, "unknown UniPC variant 'vary_coeff'"), ({"order": 0}, "order must be a positive"),
    ({"timesteps": [999, 500, 0]}, "5 UniPC steps walk 6 timesteps, not \\(3,\\)"),
])
def test_refuses_what_it_cannot_run(arguments, message):
    denoiser = GaussianVPDenoiser(SD_SCHEDULE)
    with pytest.raises(ValueError, match=message):
        unipc.sample_unipc(denoiser, denoiser.at(999), 5, **arguments)


def test_txt2img_with_unipc_end_to_end(tmp_path):
    from PIL import Image

    from helpers import txt2img
    from tiny_model import write_tiny_checkpoint
    out = tmp_path / "out"
    result = txt2img("--ckpt", write_tiny_checkpoint(tmp_path / "tiny"), "--outdir", out, "--ddim_steps", 4, "--H", 64,
                     "--W", 64, "--n_samples", 1, "--n_iter", 1, "--sampler", "uni_pc", "--seed", 4)
    assert result.returncode == 0, result.stderr
    with Image.open(out / "samples" / "00000.png") as image:
        text = image.text["parameters"]
    assert "Steps: 4, Sampler: UniPC, CFG scale: 7.5, Seed: 4," in text and "Schedule type" not in text
