"""DPM fast, DPM adaptive, LCM and the Align Your Steps schedule (their parity with k-diffusion's functions is
in the registry-driven tests of test_k_samplers)."""
import math

import numpy as np
import pytest
import torch

from helpers import relative_error
from ldm.models.diffusion import dpm_adaptive, k_sampling, samplers
from ldm.models.diffusion.align_your_steps import AYS_SIGMAS, align_your_steps_sigmas
from ldm.models.diffusion.k_sampling import LCMSigmas, ModelSigmas
from ldm.models.diffusion.sampler_options import SamplerOptions
from ldm.modules.diffusionmodules.util import make_beta_schedule

SD_ALPHAS_CUMPROD = torch.tensor(np.cumprod(1.0 - make_beta_schedule("linear", 1000, 0.00085, 0.012)))
SD_SIGMAS = ModelSigmas(SD_ALPHAS_CUMPROD)


class CountingNoise:
    def __init__(self, seed=0):
        self.generator, self.draws = torch.Generator().manual_seed(seed), 0

    def randn(self, shape):
        self.draws += 1
        return torch.randn(list(shape), generator=self.generator)


def gaussian_data(seed=1):
    """(denoiser, exact ODE solution at sigma) for data N(mu, s²) per element, x = x0 + sigma·noise: the
    probability-flow ODE keeps (x - mu) / sqrt(s² + sigma²) fixed."""
    generator = torch.Generator().manual_seed(seed)
    mu, s, z = (torch.randn(1, 4, 6, 6, generator=generator, dtype=torch.float64) for _ in range(3))
    s = 0.4 + s.abs()
    denoiser = lambda x, sigma: mu + s**2 / (s**2 + float(sigma) ** 2) * (x - mu)  # noqa: E731
    return denoiser, lambda sigma: mu + (s**2 + sigma**2).sqrt() * z


# --- DPM fast ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("calls,orders", [(1, [1]), (2, [2]), (3, [2, 1]), (4, [3, 1]), (9, [3, 3, 2, 1]),
                                          (10, [3, 3, 3, 1]), (11, [3, 3, 3, 2])])
def test_dpm_fast_splits_its_model_calls_into_third_order_steps_as_k_diffusion(calls, orders):
    assert dpm_adaptive.fast_orders(calls) == orders and sum(orders) == calls


def test_dpm_fast_calls_the_model_once_per_step_and_converges_at_third_order_without_eta():
    denoiser, exact = gaussian_data()
    errors, counts = [], [20, 41, 83]  # 3k + 2 calls: third-order steps, then one second-order (a first-order
    # last step, as 3k calls end, would bring the order down to 2)
    for calls in counts:
        sigmas = samplers.schedule_sigmas("exponential", calls, SD_SIGMAS)
        seen = []
        result = dpm_adaptive.sample_dpm_fast(lambda x, sigma: seen.append(sigma) or denoiser(x, sigma),
                                              exact(float(sigmas[0])), sigmas, eta=0.0)
        assert len(seen) == calls
        errors.append(relative_error(result, exact(float(sigmas[-2]))))  # it ends at sigma_min, not at 0
    order = -np.polyfit(np.log(counts), np.log(errors), 1)[0]
    assert errors[0] > errors[1] > errors[2] and 2.7 < order < 3.6, (order, errors)


def test_dpm_fast_draws_noise_once_per_step_but_the_last_with_eta_and_never_without():
    denoiser, exact = gaussian_data()
    sigmas = samplers.schedule_sigmas("uniform", 10, SD_SIGMAS)
    noise = CountingNoise()
    dpm_adaptive.sample_dpm_fast(denoiser, exact(float(sigmas[0])).float(), sigmas, noise=noise)
    assert noise.draws == len(dpm_adaptive.fast_orders(10)) - 1
    dpm_adaptive.sample_dpm_fast(denoiser, exact(float(sigmas[0])).float(), sigmas, noise=None, eta=0.0)


# --- DPM adaptive ------------------------------------------------------------------------------------------------
def test_dpm_adaptive_meets_its_tolerance_and_takes_more_calls_for_a_tighter_one():
    denoiser, exact = gaussian_data()
    sigmas = samplers.schedule_sigmas("uniform", 10, SD_SIGMAS)
    results = {}
    for rtol in (0.05, 0.005):
        calls = []
        result = dpm_adaptive.sample_dpm_adaptive(lambda x, sigma: calls.append(sigma) or denoiser(x, sigma),
                                                  exact(float(sigmas[0])), sigmas, eta=0.0, rtol=rtol, atol=rtol / 6)
        results[rtol] = (relative_error(result, exact(float(sigmas[-2]))), len(calls))
        assert calls[0] == pytest.approx(float(sigmas[0])) and len(calls) % 3 == 0
    (loose_error, loose_calls), (tight_error, tight_calls) = results[0.05], results[0.005]
    assert tight_error < loose_error < 0.05 and tight_calls > loose_calls


def test_dpm_adaptive_refuses_an_order_it_has_no_error_estimate_for():
    denoiser, exact = gaussian_data()
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        dpm_adaptive.sample_dpm_adaptive(denoiser, exact(14.0), SD_SIGMAS.uniform_sigmas(4), order=1)


class ZeroEps:
    """A denoiser whose eps is 0: every sampler's x stays as it is, so the grid it walks shows in the calls."""

    def __init__(self):
        self.schedule, self.timesteps = type("Schedule", (), {"alphas_cumprod": SD_ALPHAS_CUMPROD})(), []

    def __call__(self, x, t):
        self.timesteps.append(t)
        return torch.zeros_like(x), x


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
def test_txt2img_runs_dpm_fast_and_adaptive_over_the_models_range_whatever_the_schedule(name):
    """A1111 hands them the model's sigma_min and sigma_max in txt2img; the schedule only scales the start."""
    runs = {}
    for schedule in ("uniform", "sgm_uniform"):
        model = ZeroEps()
        x = torch.ones(1, 4, 2, 2)
        result = samplers.sample(name, model, x, 6, schedule=schedule, noise_source=CountingNoise(),
                                 sampler_options=SamplerOptions(eta=0.0))
        start = float(samplers.sigma_grid(name, schedule, 6, SD_SIGMAS)[0])
        assert torch.allclose(result, x * start, rtol=1e-6)
        runs[schedule] = model.timesteps
    assert runs["uniform"] == runs["sgm_uniform"]
    assert runs["uniform"][0] == pytest.approx(999) and min(runs["uniform"]) > 0


# --- LCM -----------------------------------------------------------------------------------------------------------
def test_lcm_steps_are_the_estimate_then_fresh_noise_at_the_next_sigma():
    sigmas = torch.tensor([10.0, 2.0, 0.5, 0.0], dtype=torch.float64)
    estimates = [torch.full((1, 4, 2, 2), value) for value in (0.3, -0.2, 0.7)]
    seen = []

    def model(x, sigma):
        seen.append((x.clone(), sigma))
        return estimates[len(seen) - 1]

    noise, reference = CountingNoise(4), torch.Generator().manual_seed(4)
    result = k_sampling.sample_lcm(model, torch.ones(1, 4, 2, 2), sigmas, noise=noise)
    expected_inputs = [torch.ones(1, 4, 2, 2)]
    for estimate, sigma_next in zip(estimates[:2], (2.0, 0.5)):
        expected_inputs.append(estimate + sigma_next * torch.randn([1, 4, 2, 2], generator=reference))
    assert [sigma for _, sigma in seen] == [10.0, 2.0, 0.5]
    assert all(torch.allclose(x, expected) for (x, _), expected in zip(seen, expected_inputs))
    assert torch.equal(result, estimates[2]) and noise.draws == 2


def test_lcm_sigmas_are_its_50_timesteps_as_a1111s_lcm_denoiser():
    lcm = LCMSigmas(SD_ALPHAS_CUMPROD)
    assert lcm.sigma_max == pytest.approx(SD_SIGMAS.sigma_max) and lcm.sigma_min == pytest.approx(
        float(SD_SIGMAS.t_to_sigma(19)))
    assert lcm.sigma_to_t(SD_SIGMAS.t_to_sigma(500)) == 499  # the nearest of 19, 39, ..., 999
    assert lcm.sigma_to_t(SD_SIGMAS.t_to_sigma(5)) == 19
    grid = lcm.uniform_sigmas(4)  # timesteps 999, 672.33, 345.67, 19, interpolated between the 50
    expected_index = torch.tensor([49.0, 49 - 49 / 3, 49 - 2 * 49 / 3, 0.0], dtype=torch.float64)
    expected = ModelSigmas(SD_ALPHAS_CUMPROD[19::20]).t_to_sigma(expected_index)
    assert torch.allclose(grid[:-1], expected) and grid[-1] == 0


def test_lcm_denoiser_applies_the_consistency_boundary_condition_at_its_timestep():
    model = ZeroEps()
    lcm = k_sampling.LCMDenoiser(model)
    x, sigma = torch.full((1, 4, 2, 2), 3.0), float(SD_SIGMAS.t_to_sigma(42))
    scaled_t = 10.0 * 39  # the nearest LCM timestep to 42 is 39
    c_skip, c_out = 0.25 / (scaled_t**2 + 0.25), scaled_t / math.sqrt(scaled_t**2 + 0.25)
    assert torch.allclose(lcm(x, sigma), c_out * x + c_skip * x)  # eps 0: the plain estimate is x itself
    assert model.timesteps == [39]


# --- Align Your Steps -------------------------------------------------------------------------------------------------
def a1111_loglinear_interp(table, count):
    """A1111's loglinear_interp (modules/sd_schedulers.py), written again here with numpy."""
    ascending_logs = np.log(np.array(table)[::-1])
    values = np.interp(np.linspace(0, 1, count), np.linspace(0, 1, len(table)), ascending_logs)
    return np.exp(values)[::-1]


def test_align_your_steps_walks_nvidias_table_at_its_own_length():
    published = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
    assert AYS_SIGMAS["sd1"] == published
    sigmas = samplers.schedule_sigmas("align_your_steps", 11, SD_SIGMAS)
    assert sigmas.tolist() == published + [0.0]


@pytest.mark.parametrize("steps", [20, 10, 7, 2])
def test_align_your_steps_interpolates_log_linearly_as_a1111(steps):
    sigmas = samplers.schedule_sigmas("align_your_steps", steps, SD_SIGMAS)
    expected = np.append(a1111_loglinear_interp(AYS_SIGMAS["sd1"], steps), 0.0)
    assert sigmas.shape == (steps + 1,) and np.allclose(sigmas.numpy(), expected, rtol=1e-12)
    assert sigmas[0] == pytest.approx(14.615) and sigmas[-2] == pytest.approx(0.029) and sigmas[-1] == 0
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_align_your_steps_sdxl_table_and_the_schedule_name():
    assert align_your_steps_sigmas(11, "sdxl")[:-1].tolist() == AYS_SIGMAS["sdxl"]
    assert samplers.resolve_schedule("Align_Your_Steps") == "align_your_steps"
    assert samplers.infotext_fields("euler", "align_your_steps")["Schedule type"] == "Align Your Steps"
    assert samplers.resolve_sampler("DPM++ 2M Align Your Steps") == ("dpmpp_2m", "align_your_steps")


@pytest.mark.parametrize("spelling,key", [("DPM fast", "dpm_fast"), ("k_dpm_fast", "dpm_fast"),
                                          ("DPM adaptive", "dpm_adaptive"), ("k_dpm_ad", "dpm_adaptive"),
                                          ("LCM", "lcm"), ("k_lcm", "lcm")])
def test_the_new_samplers_resolve_by_a1111s_names(spelling, key):
    assert samplers.resolve_sampler(spelling) == (key, None)


def test_dpm_adaptive_stops_with_a_clear_error_when_no_step_is_ever_accepted(monkeypatch):
    monkeypatch.setattr(dpm_adaptive, "MAX_ADAPTIVE_MODEL_CALLS", 300)
    nan_denoiser = lambda x, sigma: torch.full_like(x, math.nan)  # noqa: E731
    with pytest.raises(RuntimeError, match="did not reach sigma .* in 300 model calls"):
        dpm_adaptive.sample_dpm_adaptive(nan_denoiser, torch.ones(1, 4, 2, 2), SD_SIGMAS.uniform_sigmas(4), eta=0.0)
