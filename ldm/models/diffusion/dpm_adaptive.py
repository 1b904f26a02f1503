"""DPM-Solver-fast and DPM-Solver-12/23 with adaptive steps (Lu et al. 2022, arXiv:2206.00927), as k-diffusion's
`sample_dpm_fast` / `sample_dpm_adaptive` run them (its DPMSolver class; the tests compare them).

Both solve in t = -log sigma with the noise estimate eps = (x - denoised) / sigma. k-diffusion's functions take
a sigma range (sigma_min, sigma_max) and, for fast, a count of model calls n; A1111 hands them:
- img2img: the ends of the part of the grid that is run (its first sigma and its smallest positive one) and,
  for fast, its number of steps;
- txt2img: the model's whole sigma range, whatever the schedule (which only scales the start noise), and the
  step count.
Here each takes the grid as `samplers.sample` hands every k-sampler and reads those three numbers off it:
sigma_max = sigmas[0], sigma_min = sigmas[-2] (the smallest positive), n = len(sigmas) - 1; `samplers.sample`
gives them the model's uniform grid in txt2img (SamplerInfo.sigma_range_only). They end at sigma_min, not at 0:
what is left of the noise there stays, as in k-diffusion.

DPM adaptive ignores n: its error control picks the steps (rtol, atol on the difference between a second- and
a third-order solution), so the number of model calls depends on the picture, not on the step count. Its
callback's "total" is therefore None.

With eta > 0 (A1111 passes its "eta_ancestral", 1.0 by default) each step goes down to the ancestral step's
sigma_down and adds fresh noise back up to the step's target, drawn with `noise.randn(shape)` only when that
noise is not zero (never on the last step, where k-diffusion draws one and multiplies it by 0).
"""
import math

from ldm.models.diffusion.k_sampling import ancestral_step

MAX_ADAPTIVE_MODEL_CALLS = 100_000  # a bound for tolerances the solver cannot meet (or a NaN error), not a budget


def _noise_estimate(model, x, t):
    """(eps, denoised) at t = -log sigma."""
    sigma = math.exp(-t)
    denoised = model(x, sigma)
    return (x - denoised) / sigma, denoised


def _dpm_solver_step(model, x, t, t_next, eps, order):
    """DPM-Solver of `order` (1, 2 with its midpoint, 3 with points at 1/3 and 2/3) from t to t_next, eps at t
    given: (the solution, the lower-order one made from the same model calls, for error control). The lower one
    of order 3 is the second-order solution through the point at 1/3; of order 2, the first-order one."""
    h = t_next - t
    sigma_next = math.exp(-t_next)
    first = x - sigma_next * math.expm1(h) * eps
    if order == 1:
        return first, None
    r1 = 1 / 2 if order == 2 else 1 / 3
    s1 = t + r1 * h
    u1 = x - math.exp(-s1) * math.expm1(r1 * h) * eps
    eps_change_1 = _noise_estimate(model, u1, s1)[0] - eps
    second = first - sigma_next / (2 * r1) * math.expm1(h) * eps_change_1
    if order == 2:
        return second, first
    r2 = 2 / 3
    s2 = t + r2 * h
    sigma_2 = math.exp(-s2)
    u2 = (x - sigma_2 * math.expm1(r2 * h) * eps
          - sigma_2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * eps_change_1)
    eps_change_2 = _noise_estimate(model, u2, s2)[0] - eps
    third = first - sigma_next / r2 * (math.expm1(h) / h - 1) * eps_change_2
    return third, second


def _ancestral_target(t, t_next, t_end, eta):
    """(t the deterministic step goes to, sigma of the fresh noise added after it) for a step t -> t_next."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = ancestral_step(math.exp(-t), math.exp(-t_next), eta)
    t_down = t_end if sigma_down == 0 else min(t_end, -math.log(sigma_down))
    return t_down, math.sqrt(max(math.exp(-t_next) ** 2 - math.exp(-t_down) ** 2, 0.0))


def _add_noise(x, noise, sigma_up, s_noise):
    if sigma_up == 0:
        return x
    return x + noise.randn(x.shape).to(x.device, x.dtype) * (sigma_up * s_noise)


def _report(callback, model, i, total, t, x, denoised):
    if callback is not None:
        sigma = math.exp(-t)
        timestep = model.sigma_to_t(sigma) if hasattr(model, "sigma_to_t") else None
        callback({"i": i, "total": total, "t": timestep, "sigma": sigma, "x": x, "x0": denoised})


def _sigma_range(sigmas):
    """(sigma_min, sigma_max) as A1111 reads them off the grid: its smallest positive sigma and its first."""
    values = [float(sigma) for sigma in sigmas]
    if len(values) < 2 or values[-1] != 0 or min(values[:-1]) <= 0:
        raise ValueError("DPM fast and DPM adaptive need a grid of positive sigmas ending at 0")
    return values[-2], values[0]


def fast_orders(calls: int) -> list:
    """k-diffusion's split of `calls` model calls into DPM-Solver steps: third order, then what is left."""
    steps = calls // 3 + 1
    if calls % 3 == 0:
        return [3] * (steps - 2) + [2, 1]
    return [3] * (steps - 1) + [calls % 3]


def sample_dpm_fast(model, x, sigmas, *, noise=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver-fast: len(sigmas) - 1 model calls in steps uniform in log sigma from sigmas[0] to sigmas[-2]."""
    sigma_min, sigma_max = _sigma_range(sigmas)
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    orders = fast_orders(len(sigmas) - 1)
    times = [t_start + (t_end - t_start) * k / len(orders) for k in range(len(orders) + 1)]
    times[-1] = t_end
    for i, order in enumerate(orders):
        t, t_next = times[i], times[i + 1]
        t_down, sigma_up = _ancestral_target(t, t_next, t_end, eta)
        eps, denoised = _noise_estimate(model, x, t)
        _report(callback, model, i, len(orders), t, x, denoised)
        x, _ = _dpm_solver_step(model, x, t, t_down, eps, order)
        x = _add_noise(x, noise, sigma_up, s_noise)
    return x


class _StepSizeController:
    """k-diffusion's PID step-size controller on the inverse error (1/(error + eps)); with its defaults
    (pcoeff 0, icoeff 1, dcoeff 0) plain integral control: h *= limiter((1/error)^(1/order))."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8):
        self.h = h
        self.exponents = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order)
        self.accept_safety, self.eps = accept_safety, eps
        self.inverse_errors = []  # the current one, then the last two accepted

    def accept(self, error: float) -> bool:
        """Whether the step with this error is taken; the next step size either way."""
        inverse = 1 / (error + self.eps)
        if not self.inverse_errors:
            self.inverse_errors = [inverse] * 3
        self.inverse_errors[0] = inverse
        factor = math.prod(e**power for e, power in zip(self.inverse_errors, self.exponents))
        factor = 1 + math.atan(factor - 1)  # a soft limit on how fast h changes
        accepted = factor >= self.accept_safety
        if accepted:
            self.inverse_errors[1:] = self.inverse_errors[:2]
        self.h *= factor
        return accepted


def _scaled_error(x_low, x_high, x_previous, rtol, atol) -> float:
    """The RMS of the two solutions' difference, each element in units of max(atol, rtol·|x|)."""
    tolerance = (rtol * x_low.abs().maximum(x_previous.abs())).clamp(min=atol)
    return float((x_low - x_high).div(tolerance).norm()) / math.sqrt(x_low.numel())


def sample_dpm_adaptive(model, x, sigmas, *, noise=None, callback=None, order=3, rtol=0.05, atol=0.0078,
                        h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=1.0, s_noise=1.0):
    """DPM-Solver-12 (order 2) or -23 (order 3) from sigmas[0] to sigmas[-2], step sizes by error control."""
    if order not in (2, 3):
        raise ValueError(f"DPM adaptive's order must be 2 or 3, not {order}")
    sigma_min, sigma_max = _sigma_range(sigmas)
    t, t_end = -math.log(sigma_max), -math.log(sigma_min)
    controller = _StepSizeController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    x_previous, attempts = x, 0
    while t < t_end - 1e-5:
        if attempts * order > MAX_ADAPTIVE_MODEL_CALLS:
            raise RuntimeError(f"DPM adaptive did not reach sigma {sigma_min:g} in {MAX_ADAPTIVE_MODEL_CALLS} model "
                               f"calls (rtol {rtol}, atol {atol}): loosen the tolerances")
        t_next = min(t_end, t + controller.h)
        t_down, sigma_up = _ancestral_target(t, t_next, t_end, eta)
        eps, denoised = _noise_estimate(model, x, t)
        x_high, x_low = _dpm_solver_step(model, x, t, t_down, eps, order)
        if controller.accept(_scaled_error(x_low, x_high, x_previous, rtol, atol)):
            x_previous = x_low
            x = _add_noise(x_high, noise, sigma_up, s_noise)
            t = t_next
        _report(callback, model, attempts, None, t, x, denoised)
        attempts += 1
    return x
