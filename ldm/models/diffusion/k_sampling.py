"""The k-diffusion family of samplers (Karras et al. 2022, DPM-Solver++) over a descending sigma grid ending at 0.

x here is in k-diffusion's variance-exploding scale, x = x0 + sigma·noise, which is the VP latent divided by
alpha. `SigmaDenoiser` turns our (x, t) -> (eps, x0) denoisers into k-diffusion's (x, sigma) -> denoised, as
its CompVisDenoiser / CompVisVDenoiser do: sigma -> fractional model timestep by interpolation in log sigma
of the model's alphas_cumprod, x scaled by 1/sqrt(sigma² + 1) into the model. Each sampler is one function
`sample_x(denoiser, x, sigmas, *, noise, callback, ...)` with the step rule of k-diffusion's function of the
same name (the tests compare them); where the rules use fresh noise it is drawn with `noise.randn(shape)`,
in k-diffusion's order, and only where it is used.
"""
import math

import numpy as np
import torch


class ModelSigmas:
    """A discrete-time model's noise levels sigma_t = sqrt((1 - acp_t) / acp_t), as k-diffusion's DiscreteSchedule.

    quantize=True rounds sigma to the nearest discrete timestep (A1111's "quantization" setting); by
    default timesteps are fractional, interpolated linearly in log sigma (A1111's default).
    """

    def __init__(self, alphas_cumprod, quantize=False):
        acp = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        self.sigmas = ((1 - acp) / acp).sqrt()  # ascending in t
        self.log_sigmas = self.sigmas.log()
        self.quantize = quantize

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma) -> float:
        log_sigma = math.log(float(sigma))
        if self.quantize:
            return int((self.log_sigmas - log_sigma).abs().argmin())
        above = int((log_sigma >= self.log_sigmas).sum()) - 1  # the last timestep with log sigma <= ours
        low = min(max(above, 0), len(self.log_sigmas) - 2)
        low_log, high_log = float(self.log_sigmas[low]), float(self.log_sigmas[low + 1])
        weight = min(max((low_log - log_sigma) / (low_log - high_log), 0.0), 1.0)
        return low + weight

    def t_to_sigma(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        low, high = t.floor().long(), t.ceil().long()
        return torch.lerp(self.log_sigmas[low], self.log_sigmas[high], t - low).exp()

    def uniform_sigmas(self, steps: int) -> torch.Tensor:
        """k-diffusion's get_sigmas(n): timesteps uniform from the last to 0, then 0."""
        return append_zero(self.t_to_sigma(torch.linspace(len(self.sigmas) - 1, 0, steps, dtype=torch.float64)))


class SigmaDenoiser(ModelSigmas):
    """A denoiser (x, t) -> (eps, x0) as k-diffusion's model (x, sigma) -> denoised.

    With `blend`, the VP latent going into the model is passed through blend(x, t) first (masked sampling).
    """

    def __init__(self, denoiser, blend=None, quantize=False):
        super().__init__(denoiser.schedule.alphas_cumprod, quantize)
        self.denoiser, self.blend = denoiser, blend

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = float(sigma)
        scale_in = 1.0 / math.sqrt(sigma**2 + 1.0)
        t = self.sigma_to_t(sigma)
        model_input = x * scale_in
        if self.blend is not None:
            model_input = self.blend(model_input, t)
            x = model_input / scale_in
        raw = getattr(self.denoiser, "model_output", None)
        if raw is None:  # an analytic denoiser: its eps defines the result
            eps, _ = self.denoiser(model_input, t)
            return x - sigma * eps
        output, parameterization = raw(model_input, t)
        if parameterization == "eps":
            return x - sigma * output
        if parameterization == "v":
            return x / (sigma**2 + 1.0) - output * sigma * scale_in
        return output


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _report(callback, i, sigmas, x, denoised, model):
    if callback is not None:
        t = model.sigma_to_t(sigmas[i]) if hasattr(model, "sigma_to_t") else None  # None for a bare (x, sigma) model
        callback({"i": i, "total": len(sigmas) - 1, "t": t, "sigma": float(sigmas[i]), "x": x, "x0": denoised})


def _derivative(x, sigma, denoised):
    return (x - denoised) / float(sigma)


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): the deterministic step's target, and the fresh noise added after it."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def _fresh_noise(noise, x):
    return noise.randn(x.shape).to(x.device, x.dtype)


def _churn(x, sigma, steps, noise, s_churn, s_tmin, s_tmax, s_noise):
    """Karras' stochastic "churn": raise the noise level to sigma_hat = sigma·(1 + gamma) with fresh noise."""
    gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + _fresh_noise(noise, x) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


def _churned_steps(model, x, sigmas, noise, callback, churn, step):
    """The loop of Euler, Heun and DPM2: Karras' churn, one model call, then x = step(x, d, sigma_hat, sigma_next)."""
    sigmas = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, noise, **churn)
        denoised = model(x, sigma_hat)
        _report(callback, i, sigmas, x, denoised, model)
        x = step(x, _derivative(x, sigma_hat, denoised), sigma_hat, sigmas[i + 1])
    return x


def _ancestral_steps(model, x, sigmas, noise, callback, eta, s_noise, step):
    """The loop of the ancestral samplers: one model call, a deterministic x = step(x, denoised, sigma,
    sigma_down), then fresh noise of sigma_up, except on the last step to 0."""
    sigmas = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, i, sigmas, x, denoised, model)
        x = step(x, denoised, sigmas[i], sigma_down)
        if sigmas[i + 1] > 0:
            x = x + _fresh_noise(noise, x) * s_noise * sigma_up
    return x


def _euler_step(x, d, sigma, sigma_next):
    return x + d * (sigma_next - sigma)


def sample_euler(model, x, sigmas, *, noise=None, callback=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf,
                 s_noise=1.0):
    churn = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
    return _churned_steps(model, x, sigmas, noise, callback, churn, _euler_step)


def sample_euler_ancestral(model, x, sigmas, *, noise, callback=None, eta=1.0, s_noise=1.0):
    def step(x, denoised, sigma, sigma_down):
        return _euler_step(x, _derivative(x, sigma, denoised), sigma, sigma_down)

    return _ancestral_steps(model, x, sigmas, noise, callback, eta, s_noise, step)


def sample_heun(model, x, sigmas, *, noise=None, callback=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf,
                s_noise=1.0):
    def step(x, d, sigma_hat, sigma_next):
        if sigma_next == 0:  # the last step is Euler's: the model is not called at sigma 0
            return _euler_step(x, d, sigma_hat, sigma_next)
        x_2 = _euler_step(x, d, sigma_hat, sigma_next)
        d_2 = _derivative(x_2, sigma_next, model(x_2, sigma_next))
        return _euler_step(x, (d + d_2) / 2, sigma_hat, sigma_next)

    churn = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
    return _churned_steps(model, x, sigmas, noise, callback, churn, step)


def _dpm_2_step(model, x, d, sigma_from, sigma_to):
    """DPM-Solver-2's step from sigma_from to sigma_to with the derivative at their log-midpoint; Euler's to 0."""
    if sigma_to == 0:
        return _euler_step(x, d, sigma_from, sigma_to)
    sigma_mid = math.exp((math.log(sigma_from) + math.log(sigma_to)) / 2)
    x_mid = _euler_step(x, d, sigma_from, sigma_mid)
    return _euler_step(x, _derivative(x_mid, sigma_mid, model(x_mid, sigma_mid)), sigma_from, sigma_to)


def sample_dpm_2(model, x, sigmas, *, noise=None, callback=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf,
                 s_noise=1.0):
    def step(x, d, sigma_hat, sigma_next):
        return _dpm_2_step(model, x, d, sigma_hat, sigma_next)

    churn = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
    return _churned_steps(model, x, sigmas, noise, callback, churn, step)


def sample_dpm_2_ancestral(model, x, sigmas, *, noise, callback=None, eta=1.0, s_noise=1.0):
    def step(x, denoised, sigma, sigma_down):
        return _dpm_2_step(model, x, _derivative(x, sigma, denoised), sigma, sigma_down)

    return _ancestral_steps(model, x, sigmas, noise, callback, eta, s_noise, step)


def _lms_coefficient(order: int, sigmas: list, i: int, j: int) -> float:
    """The integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial of sigmas[i-j] through
    sigmas[i], ..., sigmas[i-order+1]: a polynomial of degree < 4, so 4-point Gauss-Legendre is exact."""
    nodes, weights = np.polynomial.legendre.leggauss(4)
    a, b = sigmas[i], sigmas[i + 1]
    taus = (b - a) / 2 * nodes + (a + b) / 2
    basis = np.ones_like(taus)
    for k in range(order):
        if k != j:
            basis *= (taus - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return float((b - a) / 2 * np.dot(weights, basis))


def sample_lms(model, x, sigmas, *, noise=None, callback=None, order=4):
    sigmas = sigmas.tolist()
    derivatives = []  # the last `order`, newest last
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        derivatives = (derivatives + [_derivative(x, sigmas[i], denoised)])[-order:]
        _report(callback, i, sigmas, x, denoised, model)
        current_order = min(i + 1, order)
        coefficients = [_lms_coefficient(current_order, sigmas, i, j) for j in range(current_order)]
        x = x + sum(c * d for c, d in zip(coefficients, reversed(derivatives)))
    return x


def _lambda(sigma: float) -> float:
    """DPM-Solver++'s time variable t = -log sigma (half the log SNR in this scale)."""
    return -math.log(sigma)


def sample_dpmpp_2s_ancestral(model, x, sigmas, *, noise, callback=None, eta=1.0, s_noise=1.0):
    def step(x, denoised, sigma, sigma_down):
        if sigma_down == 0:
            return _euler_step(x, _derivative(x, sigma, denoised), sigma, sigma_down)
        h = _lambda(sigma_down) - _lambda(sigma)
        sigma_mid = math.exp(-(_lambda(sigma) + h / 2))
        x_2 = (sigma_mid / sigma) * x - math.expm1(-h / 2) * denoised
        return (sigma_down / sigma) * x - math.expm1(-h) * model(x_2, sigma_mid)

    return _ancestral_steps(model, x, sigmas, noise, callback, eta, s_noise, step)


def sample_dpmpp_2m(model, x, sigmas, *, noise=None, callback=None):
    sigmas = sigmas.tolist()
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        _report(callback, i, sigmas, x, denoised, model)
        if sigmas[i + 1] == 0:  # the last step to 0 is first order: x becomes the denoised estimate
            x = denoised
        else:
            h = _lambda(sigmas[i + 1]) - _lambda(sigmas[i])
            corrected = denoised
            if old_denoised is not None:
                r = (_lambda(sigmas[i]) - _lambda(sigmas[i - 1])) / h
                corrected = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * corrected
        old_denoised = denoised
    return x


# --- LCM (Latent Consistency Models), as A1111's sd_samplers_lcm -------------------------------------------------
LCM_ORIGINAL_STEPS = 50  # the timesteps an LCM was distilled on: every 20th of 1000, the last 999


class LCMSigmas(ModelSigmas):
    """An LCM's noise levels, as A1111's LCMCompVisDenoiser: only its 50 timesteps 19, 39, ..., 999 exist.

    sigma_to_t rounds to the nearest of them (always: an LCM was trained on no others) and returns the model
    timestep; t_to_sigma takes a model timestep and interpolates between them; the uniform grid walks
    timesteps 999 -> 19, so --schedule and img2img see an LCM's own range. `quantize` is taken for the
    signature ModelSigmas has and ignored: an LCM always rounds.
    """

    def __init__(self, alphas_cumprod, quantize=True):
        acp = torch.as_tensor(alphas_cumprod)
        self.spacing = len(acp) // LCM_ORIGINAL_STEPS
        self.first_timestep = self.spacing - 1
        ModelSigmas.__init__(self, acp[self.first_timestep::self.spacing], quantize=True)  # not the denoiser's

    def sigma_to_t(self, sigma) -> int:
        return super().sigma_to_t(sigma) * self.spacing + self.first_timestep

    def t_to_sigma(self, t) -> torch.Tensor:
        index = ((torch.as_tensor(t, dtype=torch.float64) - self.first_timestep) / self.spacing)
        return super().t_to_sigma(index.clamp(0, len(self.sigmas) - 1))

    def uniform_sigmas(self, steps: int) -> torch.Tensor:
        start, end = self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min)
        return append_zero(self.t_to_sigma(torch.linspace(start, end, steps, dtype=torch.float64)))


class LCMDenoiser(LCMSigmas, SigmaDenoiser):
    """SigmaDenoiser at an LCM's timesteps, its estimate put through the consistency model's boundary condition
    c_skip·x + c_out·denoised (sigma_data 0.5, timestep scaled by 10), as A1111 does."""

    def __init__(self, denoiser, blend=None, quantize=True):
        LCMSigmas.__init__(self, denoiser.schedule.alphas_cumprod)
        self.denoiser, self.blend = denoiser, blend

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        denoised = SigmaDenoiser.__call__(self, x, sigma)
        scaled_t, sigma_data = 10.0 * self.sigma_to_t(sigma), 0.5
        c_skip = sigma_data**2 / (scaled_t**2 + sigma_data**2)
        c_out = scaled_t / math.sqrt(scaled_t**2 + sigma_data**2)
        return c_out * denoised + c_skip * x


def sample_lcm(model, x, sigmas, *, noise, callback=None):
    """Each step jumps to the consistency model's estimate, then noises it afresh to the next sigma."""
    sigmas = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        _report(callback, i, sigmas, x, denoised, model)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + _fresh_noise(noise, x) * sigmas[i + 1]
    return x
