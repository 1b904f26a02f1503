"""Samplers for the reverse diffusion (DDIM, PLMS, DPM-Solver++) as short functions over a denoiser.

These are the originals' samplers; every sampler by name, the k-diffusion family included, is in the
registry of ldm.models.diffusion.samplers, whose `sample` the scripts call.

A *denoiser* is any callable `(x, t) -> (eps, x0)` with a `.schedule` (a `Schedule`): given the noisy
latent x at model timestep t it predicts the noise and the clean latent. `GuidedDenoiser` makes one from
a LatentDiffusion model and its conditioning, classifier-free guidance included, so the samplers never
see the model, its parameterisation (eps, v, x0) or its dtype, and every sampler is right for v-models.

The step rules are those of the original CompVis / Stability samplers, so the same start noise gives
the same image; where ours differ on purpose, the function says so. Two hooks, shared by all samplers:
- callback(info) after every step, info = {"i", "total", "t", "x", "x0"}. An exception raised in it
  propagates: that is how a caller interrupts a run.
- blend(x, t) -> x once per step, before the step's model evaluation, with that step's x and timestep:
  inpainting pastes the known region noised to t there (the originals' mask/x0 blend).
"""
import math

import numpy as np
import torch

SAMPLERS = ("ddim", "plms", "dpm")


class Schedule:
    """x_t = alpha(t)·x0 + sigma(t)·eps for a discrete-time model, computed in float64.

    Model timesteps t are floats in [0, N-1]; between the discrete steps log alpha is interpolated
    linearly. That is DPM-Solver's discrete NoiseScheduleVP, whose continuous time s in [1/N, 1] is model
    time t = (s - 1/N)·N. Methods take a number or a tensor of timesteps and return float64 tensors.
    """

    def __init__(self, alphas_cumprod):
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        self.num_timesteps = len(self.alphas_cumprod)
        self._log_alphas = 0.5 * torch.log(self.alphas_cumprod)

    def log_alpha(self, t):
        t = torch.as_tensor(t, dtype=torch.float64).cpu()
        lower = t.floor().clamp(0, self.num_timesteps - 2)
        index = lower.long()
        return torch.lerp(self._log_alphas[index], self._log_alphas[index + 1], t - lower)

    def alpha(self, t):
        return self.log_alpha(t).exp()

    def sigma(self, t):
        return (-torch.expm1(2 * self.log_alpha(t))).sqrt()

    def lambda_(self, t):
        """Half the log signal-to-noise ratio, log(alpha / sigma): DPM-Solver's time variable."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2 * log_alpha))

    def ddim_timesteps(self, steps) -> np.ndarray:
        """The originals' DDIM timesteps, ascending: range(0, N, N // steps) + 1.

        As in the originals, the list is longer than `steps` when N // steps does not divide N (30 steps
        walk 31 timesteps, from 991); their images were made that way. Where the list would reach t = N
        (3, 9, 27 ... or more than N/2 steps), the originals crash with an index error; that one
        out-of-range entry is left out here, which gives diffusers' "leading" spacing.
        """
        n = self.num_timesteps
        if not (isinstance(steps, (int, np.integer)) and 1 <= steps <= n):
            raise ValueError(f"the number of sampling steps must be an integer in 1..{n}, not {steps!r}")
        timesteps = np.arange(0, n, n // steps) + 1
        return timesteps[timesteps < n]


def noise_to_step(schedule, x0, t, noise):
    """x0 diffused to timestep t (a number, or one per sample): alpha(t)·x0 + sigma(t)·noise.

    `schedule` is a Schedule or an alphas_cumprod tensor; img2img's stochastic encode and the inpainting
    blend use it.
    """
    schedule = schedule if isinstance(schedule, Schedule) else Schedule(schedule)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    per_sample = (-1,) + (1,) * (x0.ndim - 1) if alpha.ndim else ()
    return alpha.reshape(per_sample).to(x0) * x0 + sigma.reshape(per_sample).to(x0) * noise


# --- the one guidance wrapper ---------------------------------------------------------------------------------
def _concat_conditioning(first, second):
    """Concatenate two conditionings along the batch: tensors, lists of tensors, or dicts of those."""
    if isinstance(first, dict):
        return {key: _concat_conditioning(first[key], second[key]) for key in first}
    if isinstance(first, (list, tuple)):
        return [_concat_conditioning(a, b) for a, b in zip(first, second)]
    return torch.cat([first, second])


def _cast_conditioning(cond, dtype):
    if isinstance(cond, dict):
        return {key: _cast_conditioning(value, dtype) for key, value in cond.items()}
    if isinstance(cond, (list, tuple)):
        return [_cast_conditioning(value, dtype) for value in cond]
    return cond.to(dtype) if torch.is_tensor(cond) and cond.is_floating_point() else cond


def _is_stepwise(cond) -> bool:
    return hasattr(cond, "at") and hasattr(cond, "parts")


def _stepwise_text(cond):
    """The stepwise text conditioning in `cond` (itself, or in its dict or list), or None."""
    if _is_stepwise(cond):
        return cond
    values = cond.values() if isinstance(cond, dict) else cond if isinstance(cond, (list, tuple)) else ()
    return next((found for found in map(_stepwise_text, values) if found is not None), None)


def _at_call(cond, call, length, image_of_row):
    """`cond` with its stepwise text at model call `call`, padded to `length` tokens, and every other tensor's
    rows taken as `image_of_row` says (None: as they are)."""
    if _is_stepwise(cond):
        return cond.at(call, length)
    if isinstance(cond, dict):
        return {key: _at_call(value, call, length, image_of_row) for key, value in cond.items()}
    if isinstance(cond, (list, tuple)):
        return [_at_call(value, call, length, image_of_row) for value in cond]
    if torch.is_tensor(cond) and image_of_row is not None:
        return cond.index_select(0, image_of_row.to(cond.device))
    return cond


def placement_of(model) -> dict:
    """{"dtype", "device"} of a bare LatentDiffusion's UNet, for GuidedDenoiser's callers that hold nothing
    but the model (the original-API adapters, training's sample grids); a run knows them from its LoadedModel."""
    parameter = next(model.model.parameters())
    return {"dtype": parameter.dtype, "device": parameter.device}


class GuidedDenoiser:
    """A LatentDiffusion model with classifier-free guidance, as a denoiser (x, t) -> (eps, x0) in float32.

    One batched apply_model call per evaluation, over [uncond, cond] (the originals' order); the
    unconditional half is skipped entirely when scale == 1 or uncond is None. Guidance is applied to the
    raw model output (eps or v) as the originals do; the network runs in `dtype` on `device`, where its
    caller placed it (fp16/bf16 too), while everything the samplers see stays float32.
    """

    def __init__(self, model, cond, uncond=None, scale=1.0, *, dtype: torch.dtype, device, control=None):
        """control(x, t, cond, uncond_rows) -> cond: adds ControlNet residuals to each model call's
        conditioning (ldm.generate.control.ControlPass); uncond_rows: how many rows of x come first unguided."""
        self.model = model
        self.control = control
        self.schedule = Schedule(model.alphas_cumprod)
        self.parameterization = model.parameterization
        self.device, self.dtype = torch.device(device), dtype
        self.scale = float(scale)
        # Text that changes during sampling (ldm.generate.conditioning.StepConditioning): picked per model call.
        self.text, self.calls = _stepwise_text(cond), 0
        composed = self.text is not None and not self.text.simple
        if composed and uncond is None:
            raise ValueError("composable (AND) prompts need an unconditional conditioning")
        self.guided = uncond is not None and (self.scale != 1.0 or composed)
        self.cond_parts, self.uncond_parts = cond, uncond
        if self.text is None:
            both = _concat_conditioning(uncond, cond) if self.guided else cond
            self.cond = _cast_conditioning(both, self.dtype)
        else:
            self.image_of_row = torch.tensor([image for image, parts in enumerate(self.text.parts) for _ in parts])

    def __call__(self, x, t):
        x = x.float()
        output, _ = self.model_output(x, t)
        return self.eps_and_x0(x, output, float(t))

    @torch.no_grad()
    def model_output(self, x, t):
        """(the guided raw output, eps or v or x0; the parameterisation), for wrappers with their own scalings."""
        t = float(t)
        x = x.float()
        composed = self.text is not None and not self.text.simple
        cond_x = x.index_select(0, self.image_of_row.to(x.device)) if composed else x
        model_input = torch.cat([x, cond_x]) if self.guided else cond_x
        # Integer timesteps go in as integers, exactly as the originals pass them.
        t_dtype = torch.long if t.is_integer() else torch.float32
        t_input = torch.full((model_input.shape[0],), t, device=x.device, dtype=t_dtype)
        model_input, cond = model_input.to(self.dtype), self.conditioning_now()
        if self.control is not None:
            cond = self.control(model_input, t_input, cond, x.shape[0] if self.guided else 0)
        output = self.model.apply_model(model_input, t_input, cond).float()
        self.calls += 1
        if composed:  # A1111's combine_denoised: uncond + sum of weight * scale * (cond_part - uncond)
            uncond_output, cond_output = output[:x.shape[0]], output[x.shape[0]:]
            output = uncond_output.clone()
            for image, parts in enumerate(self.text.parts):
                for row, weight in parts:
                    output[image] += (cond_output[row] - uncond_output[image]) * (weight * self.scale)
        elif self.guided:
            uncond_output, cond_output = output.chunk(2)
            output = uncond_output + self.scale * (cond_output - uncond_output)
        return output, self.parameterization

    def conditioning_now(self):
        """The model's conditioning for this call: the fixed one, or the stepwise text's at this model call
        (cond and uncond padded with empty chunks to one length; other tensors' rows repeated per AND part)."""
        if self.text is None:
            return self.cond
        texts = [self.text] + ([_stepwise_text(self.uncond_parts)] if self.guided else [])
        length = max(text.length_at(self.calls) for text in texts if text is not None)
        rows = None if self.text.simple else self.image_of_row
        cond = _at_call(self.cond_parts, self.calls, length, rows)
        both = _concat_conditioning(_at_call(self.uncond_parts, self.calls, length, None), cond) if self.guided else cond
        return _cast_conditioning(both, self.dtype)

    def eps_and_x0(self, x, output, t):
        """(eps, x0) from the model's raw output at timestep t, for its parameterisation."""
        alpha, sigma = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        if self.parameterization == "eps":
            return output, (x - sigma * output) / alpha
        if self.parameterization == "v":
            return sigma * x + alpha * output, alpha * x - sigma * output
        return (x - alpha * output) / sigma, output


# --- DDIM and PLMS --------------------------------------------------------------------------------------------
def _report(callback, i, total, t, x, x0):
    if callback is not None:
        callback({"i": i, "total": total, "t": t, "x": x, "x0": x0})


def _descending(timesteps):
    """(i, t, t_prev) walking ascending DDIM timesteps from the top; t_prev is None for the last step."""
    timesteps = [int(t) for t in timesteps]
    for i, index in enumerate(range(len(timesteps) - 1, -1, -1)):
        yield i, timesteps[index], (timesteps[index - 1] if index > 0 else None)


def _ddim_step(x0, eps, alpha_prev, sigma=0.0, noise=None):
    """DDIM's update to alphas_cumprod a_prev: sqrt(a_prev)·x0 + sqrt(1 - a_prev - σ²)·eps + σ·noise."""
    x_prev = math.sqrt(alpha_prev) * x0 + math.sqrt(1.0 - alpha_prev - sigma**2) * eps
    return x_prev if noise is None else x_prev + sigma * noise


def sample_ddim(denoiser, x, timesteps, eta=0.0, generator=None, callback=None, blend=None, noise_source=None):
    """The original p_sample_ddim over ascending `timesteps`, walked from the last; the last step goes to acp[0].

    With eta > 0 each step draws `torch.randn(x.shape, generator=generator)` (on the generator's device,
    then moved to x's), or `noise_source.randn(x.shape)` when a noise source (ldm.generate.rng) is given.
    Unlike the originals, nothing is drawn at eta = 0, where they draw per step and multiply by zero: the
    image is the same, only the generator's later state differs.
    """
    acp = denoiser.schedule.alphas_cumprod
    total = len(timesteps)
    for i, t, t_prev in _descending(timesteps):
        a_t, a_prev = float(acp[t]), float(acp[t_prev if t_prev is not None else 0])
        if blend is not None:
            x = blend(x, t)
        eps, x0 = denoiser(x, t)
        noise = None
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        if eta > 0 and noise_source is not None:
            noise = noise_source.randn(x.shape).to(x.device, x.dtype)
        elif eta > 0:
            noise_device = generator.device if generator is not None else "cpu"
            noise = torch.randn(x.shape, generator=generator, device=noise_device).to(x.device, x.dtype)
        x = _ddim_step(x0, eps, a_prev, sigma, noise)
        _report(callback, i, total, t, x, x0)
    return x


def sample_plms(denoiser, x, timesteps, callback=None, blend=None):
    """The original p_sample_plms (pseudo linear multistep on eps), over the same timesteps as DDIM.

    The first step is a pseudo improved Euler step (a second model call at the next timestep); later
    steps are Adams-Bashforth with up to three earlier eps. Deterministic (eta 0). Unlike Stability's
    PLMS, a v-model's output is converted to eps first, so SD 2.x-v samples correctly.
    """
    schedule, acp = denoiser.schedule, denoiser.schedule.alphas_cumprod
    total = len(timesteps)
    previous_eps = []  # the raw eps of the last (up to) three steps, newest last
    for i, t, t_prev in _descending(timesteps):
        a_prev = float(acp[t_prev if t_prev is not None else 0])
        alpha, sigma = float(schedule.alpha(t)), float(schedule.sigma(t))
        if blend is not None:
            x = blend(x, t)
        eps, _ = denoiser(x, t)
        if not previous_eps:
            x_euler = _ddim_step((x - sigma * eps) / alpha, eps, a_prev)
            # The originals evaluate at the same timestep again when a single step is asked for.
            eps_next, _ = denoiser(x_euler, t_prev if t_prev is not None else t)
            eps_prime = (eps + eps_next) / 2
        elif len(previous_eps) == 1:
            eps_prime = (3 * eps - previous_eps[-1]) / 2
        elif len(previous_eps) == 2:
            eps_prime = (23 * eps - 16 * previous_eps[-1] + 5 * previous_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * previous_eps[-1] + 37 * previous_eps[-2] - 9 * previous_eps[-3]) / 24
        x0 = (x - sigma * eps_prime) / alpha
        x = _ddim_step(x0, eps_prime, a_prev)
        previous_eps = (previous_eps + [eps])[-3:]
        _report(callback, i, total, t, x, x0)
    return x


# --- DPM-Solver++(2M) -----------------------------------------------------------------------------------------
def time_uniform_timesteps(schedule, steps, t_start=None) -> torch.Tensor:
    """steps + 1 model timesteps, float64, for continuous times linspace(t_start, 1/N, steps + 1) (DPM-Solver's
    and UniPC's "time_uniform"; t_start defaults to 1, pure noise): model time is (s - 1/N)·N."""
    n = schedule.num_timesteps
    t_start = 1.0 if t_start is None else float(t_start)
    return (torch.linspace(t_start, 1.0 / n, steps + 1, dtype=torch.float64) - 1.0 / n) * n


def sample_dpm_solver(denoiser, x, steps, t_start=None, callback=None, blend=None):
    """The originals' DPM-Solver: DPM-Solver++ (data prediction), multistep, order 2.

    Continuous times linspace(t_start, 1/N, steps + 1) ("time_uniform"; t_start defaults to 1, pure
    noise), the model called at model time (s - 1/N)·N. The first step is first order, and so is the
    last when steps < 15 ("lower_order_final"). Works for eps and v models alike (via the denoiser).
    """
    schedule = denoiser.schedule
    times = time_uniform_timesteps(schedule, steps, t_start)
    lambdas, alphas, sigmas = (f(times).tolist() for f in (schedule.lambda_, schedule.alpha, schedule.sigma))
    x0_before = None
    for i in range(steps):
        s = float(times[i])
        if blend is not None:
            x = blend(x, s)
        _, x0 = denoiser(x, s)
        h = lambdas[i + 1] - lambdas[i]
        phi = math.expm1(-h)  # e^{-h} - 1, negative
        x_next = (sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * phi * x0
        if i > 0 and not (steps < 15 and i == steps - 1):
            r0 = (lambdas[i] - lambdas[i - 1]) / h
            x_next = x_next - 0.5 * alphas[i + 1] * phi * (x0 - x0_before) / r0
        x, x0_before = x_next, x0
        _report(callback, i, steps, s, x, x0)
    return x


def dpm_start_time(steps, skip_steps, num_timesteps=1000):
    """The continuous time where the `steps`-step DPM schedule stands after `skip_steps` steps."""
    return 1.0 - skip_steps / steps * (1.0 - 1.0 / num_timesteps)


# --- one entry point -----------------------------------------------------------------------------------------
def _remaining_ddim_timesteps(schedule, steps, skip_steps):
    timesteps = schedule.ddim_timesteps(steps)
    return timesteps[:steps - skip_steps] if skip_steps else timesteps


def first_timestep(sampler, schedule, steps, skip_steps=0):
    """The model timestep of the first step that `sample` runs: x must be noised to this level.

    The originals' img2img noises one DDIM step higher (to ddim_timesteps(steps)[steps - skip_steps])
    than it then denoises from; to reproduce their images, noise there instead.
    """
    n = schedule.num_timesteps
    if sampler == "dpm":
        return (dpm_start_time(steps, skip_steps, n) - 1.0 / n) * n
    return int(_remaining_ddim_timesteps(schedule, steps, skip_steps)[-1])


def sample(sampler, denoiser, x, steps, *, skip_steps=0, eta=0.0, generator=None, callback=None, blend=None,
           noise_source=None):
    """Run `sampler` ("ddim", "plms" or "dpm") for `steps` steps, the first `skip_steps` of them skipped.

    With skip_steps (img2img), x must already be noised to `first_timestep(...)`. DDIM and PLMS then walk
    ddim_timesteps(steps)[:steps - skip_steps] downwards, exactly the originals' img2img decode; DPM
    starts at the continuous time the full schedule reaches after skip_steps steps.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if not (isinstance(steps, (int, np.integer)) and steps >= 1):
        raise ValueError(f"the number of sampling steps must be a positive integer, not {steps!r}")
    if not 0 <= skip_steps < steps:
        raise ValueError(f"skip_steps must be in 0..{steps - 1} for {steps} steps, not {skip_steps}")
    if eta != 0 and sampler != "ddim":
        raise ValueError(f"eta applies to DDIM only; {sampler} is deterministic (pass eta=0)")
    hooks = {"callback": callback, "blend": blend}
    if sampler == "dpm":
        t_start = dpm_start_time(steps, skip_steps, denoiser.schedule.num_timesteps)
        return sample_dpm_solver(denoiser, x, steps - skip_steps, t_start=t_start, **hooks)
    timesteps = _remaining_ddim_timesteps(denoiser.schedule, steps, skip_steps)
    if sampler == "ddim":
        return sample_ddim(denoiser, x, timesteps, eta=eta, generator=generator, noise_source=noise_source, **hooks)
    return sample_plms(denoiser, x, timesteps, **hooks)
