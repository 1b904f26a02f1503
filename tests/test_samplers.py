"""Samplers: DDIM parity with diffusers (= the originals), convergence on an exactly solvable denoiser,
guidance batching and parameterisations, img2img timesteps, and the original-API adapters."""
import math

import numpy as np
import pytest
import torch

from helpers import build_full_size_random, record_calls, relative_error
from ldm.models.diffusion import sampling
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling import GuidedDenoiser, Schedule
from ldm.modules.diffusionmodules.util import make_beta_schedule
from tiny_model import tiny_model as build_tiny_model

SD_ALPHAS_CUMPROD = np.cumprod(1.0 - make_beta_schedule("linear", 1000, 0.00085, 0.012))
SD_SCHEDULE = Schedule(SD_ALPHAS_CUMPROD)
ON_CPU = {"dtype": torch.float32, "device": "cpu"}  # where the tiny model lies, as a run tells GuidedDenoiser


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_model().requires_grad_(False)


def tiny_inputs(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    cond, uncond = torch.randn(2, batch, 77, 32, generator=generator)
    return x, cond, uncond


# --- (1) DDIM against diffusers' DDIMScheduler configured as the originals -----------------------------------
def diffusers_ddim(model, x, cond, uncond, scale, steps, eta, noise_seed):
    """diffusers' scheduler.step driving our model in a plain guided loop; the same per-step noise as ours."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing="leading",
                              prediction_type={"eps": "epsilon", "v": "v_prediction"}[model.parameterization])
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for t in scheduler.timesteps:
            timestep = torch.full((2 * x.shape[0],), int(t))
            uncond_out, cond_out = model.apply_model(torch.cat([x, x]), timestep, torch.cat([uncond, cond])).chunk(2)
            guided = uncond_out + scale * (cond_out - uncond_out)
            noise = torch.randn(x.shape, generator=generator) if eta > 0 else None
            x = scheduler.step(guided, t, x, eta=eta, variance_noise=noise).prev_sample
    return x, scheduler.timesteps.tolist()


def assert_ddim_matches_diffusers(model, x, cond, uncond, steps, eta, scale=5.0):
    walked = []
    generator = torch.Generator().manual_seed(7)
    ours = sampling.sample("ddim", GuidedDenoiser(model, cond, uncond, scale, **ON_CPU), x, steps, eta=eta,
                           generator=generator, callback=lambda info: walked.append(info["t"]))
    reference, reference_timesteps = diffusers_ddim(model, x, cond, uncond, scale, steps, eta, noise_seed=7)
    assert walked == reference_timesteps
    assert relative_error(ours, reference) < 1e-4
    assert relative_error(ours, x) > 0.1  # the model did something
    # One draw of x's shape per step when eta > 0, none at all at eta 0.
    expected = torch.Generator().manual_seed(7)
    for _ in range(steps if eta > 0 else 0):
        torch.randn(x.shape, generator=expected)
    assert torch.equal(generator.get_state(), expected.get_state())


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers_on_the_tiny_model(tiny_model, monkeypatch, parameterization, eta):
    monkeypatch.setattr(tiny_model, "parameterization", parameterization)
    assert_ddim_matches_diffusers(tiny_model, *tiny_inputs(), steps=5, eta=eta)


@pytest.mark.parametrize("steps", [1, 3, 9, 10, 20, 25, 50, 100, 250, 500])
def test_ddim_timesteps_are_the_originals_and_diffusers(steps):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    ours = SD_SCHEDULE.ddim_timesteps(steps)
    assert list(ours[::-1]) == scheduler.timesteps.tolist()
    originals = np.asarray(list(range(0, 1000, 1000 // steps))) + 1
    assert list(ours) == [t for t in originals if t < 1000]  # the originals crash on t = 1000


def test_ddim_timesteps_keep_the_originals_extra_step_and_refuse_bad_counts():
    assert list(SD_SCHEDULE.ddim_timesteps(30)) == list(range(1, 1000, 33))  # 31 timesteps, as the originals walk
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="sampling steps"):
            SD_SCHEDULE.ddim_timesteps(bad)


@pytest.mark.slow
@pytest.mark.parametrize("config_name,parameterization,context_dim,eta",
                         [("v1-inference.yaml", "eps", 768, 0.0), ("v2-inference-v.yaml", "v", 1024, 0.5)])
def test_ddim_matches_diffusers_on_full_size_unets(config_name, parameterization, context_dim, eta):
    model = build_full_size_random(config_name, seed=0)
    assert model.parameterization == parameterization
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    cond, uncond = torch.randn(2, 1, 77, context_dim, generator=generator)
    assert_ddim_matches_diffusers(model, x, cond, uncond, steps=3, eta=eta)


# --- (2) PLMS and DPM-Solver on an exactly solvable problem -------------------------------------------------
class GaussianDataDenoiser:
    """The exact denoiser when the data is N(mu, diag(s²)): x_t = alpha·x0 + sigma·eps is Gaussian too, so
    E[eps | x_t] = sigma (x_t - alpha mu) / (alpha² s² + sigma²). The probability-flow ODE keeps
    z = (x_t - alpha mu) / sqrt(alpha² s² + sigma²) constant, which gives its exact solution."""

    def __init__(self, schedule, seed=0):
        self.schedule = schedule
        generator = torch.Generator().manual_seed(seed)
        shape = (1, 4, 8, 8)
        self.mu = 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)
        self.s = 0.3 + 1.2 * torch.rand(shape, generator=generator, dtype=torch.float64)
        self.z = torch.randn(shape, generator=generator, dtype=torch.float64)

    def _coefficients(self, t):
        alpha, sigma = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        return alpha, sigma, (alpha**2 * self.s**2 + sigma**2).sqrt()

    def __call__(self, x, t):
        alpha, sigma, std = self._coefficients(t)
        eps = sigma * (x - alpha * self.mu) / std**2
        return eps, (x - sigma * eps) / alpha

    def at(self, t):
        """The point of the ODE trajectory (fixed by z) at timestep t."""
        alpha, _, std = self._coefficients(t)
        return alpha * self.mu + std * self.z


def sampling_error(sampler, denoiser, steps):
    """Relative distance of the sampler's result from the exact ODE solution over the same interval."""
    start = sampling.first_timestep(sampler, denoiser.schedule, steps)
    result = sampling.sample(sampler, denoiser, denoiser.at(start), steps)
    exact = denoiser.at(0)  # every sampler here ends at timestep 0 (DDIM's last step goes to acp[0])
    return relative_error(result, exact)


def empirical_order(sampler, denoiser, step_counts):
    errors = [sampling_error(sampler, denoiser, steps) for steps in step_counts]
    slope = np.polyfit(np.log(step_counts), np.log(errors), 1)[0]
    return -slope, errors


# A schedule whose log-SNR is linear in t: there the samplers' uniform grids are uniform in log-SNR, the
# variable DPM-Solver works in, and the asymptotic orders show at moderate step counts. (On SD's schedule
# the last DPM step stays long in log-SNR until thousands of steps, so its order shows only slowly.)
LINEAR_LOG_SNR_SCHEDULE = Schedule(1.0 / (1.0 + np.exp(-2.0 * np.linspace(4.0, -4.0, 1000))))


@pytest.mark.parametrize("sampler,low,high", [("ddim", 0.85, 1.15), ("dpm", 1.8, 2.2), ("plms", 1.7, 4.5)])
def test_samplers_converge_to_the_exact_solution_at_their_order(sampler, low, high):
    order, errors = empirical_order(sampler, GaussianDataDenoiser(LINEAR_LOG_SNR_SCHEDULE), [50, 100, 200])
    assert errors[0] > errors[1] > errors[2]
    assert low < order < high, (order, errors)


def test_plms_and_dpm_are_more_accurate_than_ddim_for_the_same_steps_on_sd_schedule():
    denoiser = GaussianDataDenoiser(SD_SCHEDULE)
    for steps in (10, 20, 25, 50):
        errors = {sampler: sampling_error(sampler, denoiser, steps) for sampler in sampling.SAMPLERS}
        assert errors["plms"] < 0.5 * errors["ddim"], (steps, errors)
        assert errors["dpm"] < errors["ddim"], (steps, errors)
    # and all of them converge there too
    for sampler in sampling.SAMPLERS:
        assert sampling_error(sampler, denoiser, 200) < 0.3 * sampling_error(sampler, denoiser, 25)


def steps_of(sampler, denoiser, x, steps):
    """Each step's (x before, callback info)."""
    infos = []
    sampling.sample(sampler, denoiser, x, steps, callback=infos.append)
    return list(zip([x] + [info["x"] for info in infos[:-1]], infos))


class QuadraticEpsDenoiser:
    """eps a quadratic polynomial in t, whatever x: Adams-Bashforth of order k is exact for degree k - 1."""

    schedule = SD_SCHEDULE
    coefficients = (0.3, 0.5e-3, -0.8e-6)

    def q(self, t):
        return sum(c * t**power for power, c in enumerate(self.coefficients))

    def average(self, low, high):
        """The exact mean of q over [low, high]."""
        antiderivative = lambda t: sum(c * t ** (power + 1) / (power + 1) for power, c in enumerate(self.coefficients))
        return (antiderivative(high) - antiderivative(low)) / (high - low)

    def __call__(self, x, t):
        alpha, sigma = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        eps = torch.full_like(x, self.q(t))
        return eps, (x - sigma * eps) / alpha


def test_plms_steps_are_improved_euler_then_adams_bashforth():
    denoiser, dt = QuadraticEpsDenoiser(), 100  # 10 steps: DDIM timesteps 100 apart
    for i, (x, info) in enumerate(steps_of("plms", denoiser, torch.zeros(1, 4, 2, 2, dtype=torch.float64), 10)):
        t = info["t"]
        alpha, sigma = float(SD_SCHEDULE.alpha(t)), float(SD_SCHEDULE.sigma(t))
        eps_used = ((x - alpha * info["x0"]) / sigma).mean().item()  # the eps the step combined
        if i == 0:  # improved Euler: the mean of the two ends
            expected = (denoiser.q(t) + denoiser.q(t - dt)) / 2
        elif i == 1:  # second-order Adams-Bashforth from the raw eps of the step before
            expected = (3 * denoiser.q(t) - denoiser.q(t + dt)) / 2
        else:  # third and fourth order: exact for a quadratic
            expected = denoiser.average(t - dt, t)
        assert eps_used == pytest.approx(expected, rel=1e-10), i


def test_dpm_first_step_and_last_of_a_short_run_are_first_order():
    denoiser = GaussianDataDenoiser(SD_SCHEDULE)

    def is_first_order(x, info, t_next):
        s = info["t"]
        h = float(SD_SCHEDULE.lambda_(t_next) - SD_SCHEDULE.lambda_(s))
        first_order = (float(SD_SCHEDULE.sigma(t_next) / SD_SCHEDULE.sigma(s)) * x
                       - float(SD_SCHEDULE.alpha(t_next)) * math.expm1(-h) * info["x0"])
        return torch.allclose(info["x"], first_order, rtol=1e-10, atol=1e-12)

    for steps in (10, 20):
        taken = steps_of("dpm", denoiser, denoiser.at(999), steps)
        ends = [info["t"] for _, info in taken[1:]] + [0.0]
        orders = [1 if is_first_order(x, info, end) else 2 for (x, info), end in zip(taken, ends)]
        assert orders == [1] + [2] * (steps - 2) + [1 if steps < 15 else 2]


# --- (3) guidance and parameterisations ---------------------------------------------------------------------
@pytest.mark.parametrize("scale,with_uncond,expected_batch", [(1.0, True, 2), (7.5, False, 2), (7.5, True, 4)])
def test_one_model_call_per_step_with_the_unconditional_half_only_when_guiding(
        tiny_model, monkeypatch, scale, with_uncond, expected_batch):
    x, cond, uncond = tiny_inputs(batch=2)
    calls = record_calls(monkeypatch, tiny_model)
    sampling.sample("ddim", GuidedDenoiser(tiny_model, cond, uncond if with_uncond else None, scale, **ON_CPU), x, 5)
    assert calls == [expected_batch] * 5


def test_guidance_combines_the_two_halves_and_accepts_dict_conditioning(tiny_model):
    x, cond, uncond = tiny_inputs(batch=1)
    t = 500
    guided_eps, _ = GuidedDenoiser(tiny_model, cond, uncond, 4.0, **ON_CPU)(x, t)
    cond_eps, _ = GuidedDenoiser(tiny_model, cond, **ON_CPU)(x, t)
    uncond_eps, _ = GuidedDenoiser(tiny_model, uncond, **ON_CPU)(x, t)
    assert relative_error(cond_eps, uncond_eps) > 1e-2  # the conditioning matters in this model
    torch.testing.assert_close(guided_eps, uncond_eps + 4.0 * (cond_eps - uncond_eps), rtol=1e-4, atol=1e-5)
    as_dicts = GuidedDenoiser(tiny_model, {"c_crossattn": [cond]}, {"c_crossattn": [uncond]}, 4.0, **ON_CPU)(x, t)[0]
    torch.testing.assert_close(as_dicts, guided_eps, rtol=1e-5, atol=1e-6)


class OracleModel(torch.nn.Module):
    """A stand-in for LatentDiffusion whose network output is exact for a known clean latent."""

    def __init__(self, clean, parameterization):
        super().__init__()
        self.register_buffer("alphas_cumprod", torch.tensor(SD_ALPHAS_CUMPROD, dtype=torch.float32))
        self.parameterization = parameterization
        self.clean = clean
        self.inputs = []

    def apply_model(self, x, t, cond):
        self.inputs.append((x.dtype, t.dtype))
        schedule = Schedule(self.alphas_cumprod)
        alpha, sigma = float(schedule.alpha(t[0])), float(schedule.sigma(t[0]))
        eps = (x.double() - alpha * self.clean) / sigma
        output = {"eps": eps, "x0": self.clean, "v": alpha * eps - sigma * self.clean}[self.parameterization]
        return output.to(x.dtype)


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
@pytest.mark.parametrize("t", [0, 500.5, 999])
def test_every_parameterisation_recovers_the_true_eps_and_x0(parameterization, t):
    generator = torch.Generator().manual_seed(3)
    clean, noise = torch.randn(2, 2, 4, 8, 8, generator=generator, dtype=torch.float64)
    model = OracleModel(clean, parameterization)
    x = sampling.noise_to_step(SD_SCHEDULE, clean, t, noise).float()
    eps, x0 = GuidedDenoiser(model, torch.zeros(2, 77, 8), **ON_CPU)(x, t)
    torch.testing.assert_close(x0.double(), clean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps.double(), noise, rtol=1e-4, atol=1e-4)
    assert model.inputs[0][1] == (torch.long if float(t).is_integer() else torch.float32)


def test_the_network_runs_in_its_dtype_while_samplers_see_float32():
    clean = torch.zeros(1, 4, 8, 8, dtype=torch.float64)
    model = OracleModel(clean, "v")
    denoiser = GuidedDenoiser(model, torch.zeros(1, 77, 8), dtype=torch.bfloat16, device="cpu")
    eps, x0 = denoiser(torch.randn(1, 4, 8, 8), 250)
    assert model.inputs[0][0] == torch.bfloat16
    assert eps.dtype == x0.dtype == torch.float32


def test_schedule_interpolates_log_alpha_and_noise_to_step_matches_the_model(tiny_model):
    schedule = Schedule(tiny_model.alphas_cumprod)
    steps = torch.tensor([0, 1, 500, 998, 999])
    torch.testing.assert_close(schedule.alpha(steps) ** 2, schedule.alphas_cumprod[steps], rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.log_alpha(10.5), (schedule.log_alpha(10) + schedule.log_alpha(11)) / 2)
    one = torch.tensor(1.0, dtype=torch.float64)
    torch.testing.assert_close(schedule.alpha(300.25) ** 2 + schedule.sigma(300.25) ** 2, one)
    torch.testing.assert_close(schedule.lambda_(300.25), torch.log(schedule.alpha(300.25) / schedule.sigma(300.25)))
    x0, noise = torch.randn(2, 3, 4, 8, 8)
    t = torch.tensor([10, 700, 999])
    torch.testing.assert_close(sampling.noise_to_step(schedule, x0, t, noise), tiny_model.q_sample(x0, t, noise))


# --- (4) img2img: skipped steps -----------------------------------------------------------------------------
class RecordingDenoiser:
    def __init__(self, denoiser):
        self.denoiser, self.schedule, self.timesteps = denoiser, denoiser.schedule, []

    def __call__(self, x, t):
        self.timesteps.append(t)
        return self.denoiser(x, t)


def test_ddim_with_skipped_steps_walks_the_originals_img2img_timesteps():
    # The anchors: strength 0.75 of 10 steps, t_enc = 7; noised to t = 701, denoised from t = 601.
    denoiser = RecordingDenoiser(GaussianDataDenoiser(SD_SCHEDULE))
    sampling.sample("ddim", denoiser, denoiser.denoiser.at(701), 10, skip_steps=10 - 7)
    assert denoiser.timesteps == [601, 501, 401, 301, 201, 101, 1]
    assert sampling.first_timestep("ddim", SD_SCHEDULE, 10, skip_steps=3) == 601


def test_dpm_with_skipped_steps_continues_the_full_schedule():
    full, skipped = (RecordingDenoiser(GaussianDataDenoiser(SD_SCHEDULE)) for _ in range(2))
    sampling.sample("dpm", full, full.denoiser.at(999), 20)
    start = sampling.first_timestep("dpm", SD_SCHEDULE, 20, skip_steps=6)
    sampling.sample("dpm", skipped, skipped.denoiser.at(start), 20, skip_steps=6)
    assert start == pytest.approx(full.timesteps[6])
    assert skipped.timesteps == pytest.approx(full.timesteps[6:])


def test_ddim_sampler_img2img_api_matches_the_functions(tiny_model):
    x0, cond, uncond = tiny_inputs(batch=2)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    sampler = DDIMSampler(tiny_model)
    sampler.make_schedule(ddim_num_steps=10, ddim_eta=0.0, verbose=False)
    encoded = sampler.stochastic_encode(x0, torch.tensor([7, 7]), noise=noise)
    torch.testing.assert_close(encoded, tiny_model.q_sample(x0, torch.tensor([701, 701]), noise))
    decoded = sampler.decode(encoded, cond, 7, unconditional_guidance_scale=3.0, unconditional_conditioning=uncond)
    expected = sampling.sample("ddim", GuidedDenoiser(tiny_model, cond, uncond, 3.0, **ON_CPU), encoded, 10, skip_steps=3)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=0)


# --- (5) the original-API adapters ---------------------------------------------------------------------------
@pytest.mark.parametrize("adapter,name", [(DDIMSampler, "ddim"), (PLMSSampler, "plms"), (DPMSolverSampler, "dpm")])
def test_adapters_return_samples_and_intermediates_like_the_originals(tiny_model, adapter, name):
    x, cond, uncond = tiny_inputs(batch=2)
    steps_seen, previews = [], []
    samples, intermediates = adapter(tiny_model).sample(
        S=5, batch_size=2, shape=(4, 8, 8), conditioning=cond, unconditional_guidance_scale=3.0,
        unconditional_conditioning=uncond, x_T=x, verbose=False, log_every_t=2,
        callback=steps_seen.append, img_callback=lambda x0, i: previews.append(x0.shape))
    expected = sampling.sample(name, GuidedDenoiser(tiny_model, cond, uncond, 3.0, **ON_CPU), x, 5)
    torch.testing.assert_close(samples, expected, rtol=0, atol=0)
    assert steps_seen == list(range(5)) and previews == [x.shape] * 5
    # the start, then step indices 4 (the first step), 2 and 0 (the last) counted down, as the originals log
    assert len(intermediates["x_inter"]) == len(intermediates["pred_x0"]) == 4
    assert intermediates["x_inter"][0] is x and torch.equal(intermediates["x_inter"][-1], samples)


def test_adapters_draw_the_start_noise_and_refuse_what_they_cannot_do(tiny_model):
    _, cond, _ = tiny_inputs(batch=1)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(PLMSSampler(tiny_model).sample(3, 1, (4, 8, 8), conditioning=cond, verbose=False)[0])
    assert runs[0].shape == (1, 4, 8, 8) and torch.equal(runs[0], runs[1])
    with pytest.raises(ValueError, match="eta"):
        PLMSSampler(tiny_model).sample(3, 1, (4, 8, 8), conditioning=cond, eta=0.5, verbose=False)
    with pytest.raises(ValueError, match="temperature"):
        DDIMSampler(tiny_model).sample(3, 1, (4, 8, 8), conditioning=cond, temperature=0.5, verbose=False)
    with pytest.raises(RuntimeError, match="make_schedule"):
        DDIMSampler(tiny_model).stochastic_encode(torch.zeros(1, 4, 8, 8), 2)


def test_mask_keeps_the_known_region_out_of_the_start_noise(tiny_model):
    x_a, cond, _ = tiny_inputs(batch=1, seed=1)
    x_b, known = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1  # keep the left half of `known`
    results = []
    for start in (x_a, x_b):
        torch.manual_seed(2)  # the blend's fresh noise per step
        results.append(DDIMSampler(tiny_model).sample(5, 1, (4, 8, 8), conditioning=cond, x_T=start,
                                                      mask=torch.ones_like(mask), x0=known, verbose=False)[0])
    # Everything replaced before every model call: the start noise cannot matter.
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    partial = DDIMSampler(tiny_model).sample(5, 1, (4, 8, 8), conditioning=cond, x_T=x_a, mask=mask, x0=known,
                                             verbose=False)[0]
    unmasked = DDIMSampler(tiny_model).sample(5, 1, (4, 8, 8), conditioning=cond, x_T=x_a, verbose=False)[0]
    assert relative_error(partial, unmasked) > 1e-3


def test_callbacks_see_every_step_and_can_interrupt():
    denoiser = RecordingDenoiser(GaussianDataDenoiser(SD_SCHEDULE))

    class Interrupted(Exception):
        pass

    def stop_at_third_step(info):
        assert set(info) == {"i", "total", "t", "x", "x0"} and info["total"] == 10
        if info["i"] == 2:
            raise Interrupted

    for sampler in sampling.SAMPLERS:
        denoiser.timesteps.clear()
        with pytest.raises(Interrupted):
            sampling.sample(sampler, denoiser, denoiser.denoiser.at(999), 10, callback=stop_at_third_step)
        assert len(denoiser.timesteps) == (4 if sampler == "plms" else 3)  # PLMS's first step calls twice


def test_blend_runs_before_each_step_with_that_steps_timestep():
    denoiser = RecordingDenoiser(GaussianDataDenoiser(SD_SCHEDULE))
    blended = []

    def blend(x, t):
        blended.append(t)
        return x

    for sampler in ("ddim", "dpm"):
        denoiser.timesteps.clear()
        blended.clear()
        sampling.sample(sampler, denoiser, denoiser.denoiser.at(999), 8, blend=blend)
        assert blended == denoiser.timesteps


def test_sample_refuses_bad_arguments():
    denoiser = GaussianDataDenoiser(SD_SCHEDULE)
    x = denoiser.at(999)
    for kwargs, message in [({"sampler": "euler"}, "unknown sampler"), ({"skip_steps": 10}, "skip_steps"),
                            ({"sampler": "dpm", "eta": 0.5}, "eta"), ({"steps": 0}, "steps")]:
        arguments = {"sampler": "ddim", "steps": 10, **kwargs}
        with pytest.raises(ValueError, match=message):
            sampling.sample(arguments.pop("sampler"), denoiser, x, arguments.pop("steps"), **arguments)
    assert not math.isnan(sampling.sample("ddim", denoiser, x, 1).sum().item())
