"""The SDE samplers of the k-diffusion family: DPM++ SDE, DPM++ 2M SDE, DPM++ 3M SDE.

Same conventions as ldm.models.diffusion.k_sampling (x in k-diffusion's scale over a descending sigma grid
ending at 0, one function per sampler with the step rule of k-diffusion's function of the same name). Their
fresh noise for a step from sigma to sigma_next comes from `noise`:
- a Brownian noise sampler (ldm.models.diffusion.brownian.BrownianNoise), called as noise(sigma, sigma_next),
  which is what `samplers.sample` passes, as A1111 and ComfyUI do, so the image changes smoothly with the step
  count; or
- a plain noise source with randn(shape), one draw per use (k-diffusion's order), as for the ancestral samplers.
Noise is drawn only where it is used (not at eta = 0).
"""
import math

import torch

from ldm.models.diffusion.k_sampling import _derivative, _euler_step, _lambda, _report, ancestral_step


def _step_noise(noise, x):
    """noise(sigma, sigma_next) -> unit noise of x's shape, from a Brownian sampler or a randn source."""
    if hasattr(noise, "randn"):
        return lambda sigma, sigma_next: noise.randn(x.shape).to(x.device, x.dtype)
    return lambda sigma, sigma_next: noise(sigma, sigma_next).to(x.device, x.dtype)


def _float32_times(sigma, sigma_next, r):
    """The points k-diffusion's DPM++ SDE queries its noise at, sigma, sigma_fn(t + r·h), sigma_next, computed
    through log sigma in float32 as it does on A1111's float32 sigmas: a Brownian tree is queried at exactly
    those points, so the same seed gives the same noise."""
    t, t_next = torch.tensor(sigma).float().log().neg(), torch.tensor(sigma_next).float().log().neg()
    return float(t.neg().exp()), float((t + (t_next - t) * r).neg().exp()), float(t_next.neg().exp())


def sample_dpmpp_sde(model, x, sigmas, *, noise, callback=None, eta=1.0, s_noise=1.0, r=1 / 2):
    """DPM-Solver++ (stochastic): a two-stage step with its intermediate point at log-fraction r, each stage an
    ancestral step of the given eta."""
    sigmas = sigmas.tolist()
    draw = _step_noise(noise, x)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        _report(callback, i, sigmas, x, denoised, model)
        if sigma_next == 0:
            x = _euler_step(x, _derivative(x, sigma, denoised), sigma, sigma_next)
            continue
        h = _lambda(sigma_next) - _lambda(sigma)
        sigma_mid = math.exp(-(_lambda(sigma) + h * r))
        query_sigma, query_mid, query_next = _float32_times(sigma, sigma_next, r)

        down, up = ancestral_step(sigma, sigma_mid, eta)
        x_2 = (down / sigma) * x - math.expm1(_lambda(sigma) - _lambda(down)) * denoised
        if up:
            x_2 = x_2 + draw(query_sigma, query_mid) * s_noise * up
        denoised_2 = model(x_2, sigma_mid)

        down, up = ancestral_step(sigma, sigma_next, eta)
        weight = 1 / (2 * r)
        combined = (1 - weight) * denoised + weight * denoised_2
        x = (down / sigma) * x - math.expm1(_lambda(sigma) - _lambda(down)) * combined
        if up:
            x = x + draw(query_sigma, query_next) * s_noise * up
    return x


def sample_dpmpp_2m_sde(model, x, sigmas, *, noise, callback=None, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE: the multistep rule on the SDE with noise fraction eta (eta 0: DPM++ 2M's ODE)."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', not {solver_type!r}")
    sigmas = sigmas.tolist()
    draw = _step_noise(noise, x)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        _report(callback, i, sigmas, x, denoised, model)
        if sigma_next == 0:  # the last step: x becomes the denoised estimate
            x = denoised
        else:
            h = _lambda(sigma_next) - _lambda(sigma)
            eta_h = eta * h
            decay = -math.expm1(-h - eta_h)
            x = sigma_next / sigma * math.exp(-eta_h) * x + decay * denoised
            if old_denoised is not None:
                r = h_last / h
                factor = (decay / (-h - eta_h) + 1) if solver_type == "heun" else 0.5 * decay
                x = x + factor * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + draw(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
            h_last = h
        old_denoised = denoised
    return x


def sample_dpmpp_3m_sde(model, x, sigmas, *, noise, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: the third-order multistep rule (second order on its second step, first on its
    first) on the SDE with noise fraction eta."""
    sigmas = sigmas.tolist()
    draw = _step_noise(noise, x)
    denoised_1, denoised_2, h_1, h_2 = None, None, None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        _report(callback, i, sigmas, x, denoised, model)
        if sigma_next == 0:
            x = denoised
            break
        h = _lambda(sigma_next) - _lambda(sigma)
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
        elif h_1 is not None:
            x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
        if eta:
            x = x + draw(sigma, sigma_next) * sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
    return x
