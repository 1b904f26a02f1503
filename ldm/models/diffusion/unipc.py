"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models") as AUTOMATIC1111 runs it: multistep, data prediction, the B(h) variants, over model time.

Each step from timestep s to t predicts x_t with UniP (an exponential integrator on the data prediction x0,
using up to `order` - 1 earlier predictions), evaluates the model once at that x_t, and corrects x_t with UniC
(the same update with the fresh x0 included). The fresh evaluation is kept for the next step, so a step costs
one model call; the last step is not corrected (its evaluation would be wasted). The first `order` - 1 steps
warm up at orders 1, 2, ...; with lower_order_final the last steps fall back to the order the steps left allow.
A1111's defaults (its settings uni_pc_variant, uni_pc_skip_type, uni_pc_order, uni_pc_lower_order_final):
bh1, time-uniform steps, order 3, lower order final.

How A1111 maps a run's steps onto UniPC (modules/sd_samplers_timesteps.py and _impl.py):
- txt2img: as many UniPC steps as its DDIM-style timestep list range(0, N, N // steps) holds, which is `steps`
  when N // steps fits evenly and one more otherwise (15 steps run 16, 30 run 31), time-uniform from
  continuous time 1 to 1/N (model timestep N - 1 to 0), from unit noise;
- img2img, t_enc = int(strength · steps): the init latent noised to that list's index t_enc (the originals'
  off-by-one, ldm.generate.img2img.noised_start_timestep, as DDIM), then t_enc UniPC steps, time-uniform from
  the list's index t_enc - 1 down to model timestep 0.
Where ours goes further: fewer steps than `order` lower the order to the steps (A1111 stops with an error).
"""
import math

import numpy as np
import torch

from ldm.models.diffusion.sampling import time_uniform_timesteps

VARIANTS = ("bh1", "bh2")  # B(h) = h or e^h - 1 (of the step in -lambda, data prediction)


def _weights(h: float, rks: list, variant: str) -> tuple:
    """(h·phi_1, B(h), predictor weights, corrector weights) for a step of length h in lambda whose earlier
    points lie at rks (in units of h, before the step: negative) followed by 1, the step's end.

    The weights solve R·rho = b, R[k][j] = rks[j]^k and b_k = k!·hh·phi_(k+1)(hh) / B(h) with hh = -h (data
    prediction), phi the exponential integrators' functions. Order 2's predictor and order 1's corrector use
    the paper's fixed 1/2 (the limit of b_1 for bh1 as h -> 0), as the reference code does.
    """
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_of_h = hh if variant == "bh1" else h_phi_1
    term, factorial, b = h_phi_1 / hh - 1.0, 1, []  # term = hh·phi_(k+1)(hh), k = 1, 2, ...
    for k in range(1, len(rks) + 1):
        b.append(term * factorial / b_of_h)
        factorial *= k + 1
        term = term / hh - 1.0 / factorial
    powers = np.vander(np.array(rks, dtype=np.float64), increasing=True).T  # powers[k][j] = rks[j]^k
    order = len(rks)
    if order == 1:
        predictor, corrector = [], [0.5]
    else:
        predictor = [0.5] if order == 2 else np.linalg.solve(powers[:-1, :-1], b[:-1]).tolist()
        corrector = np.linalg.solve(powers, b).tolist()
    return h_phi_1, b_of_h, predictor, corrector


def _step(x, history, target, order, grid, variant, evaluate):
    """x at grid index `target` from x at the newest history point, by UniP of `order` and, when `evaluate`
    is given, UniC with the model evaluated at the prediction. Returns (x, the fresh x0 or None).

    history: [(grid index, x0 predicted there)], newest last; grid: (lambdas, alphas, sigmas) lists.
    """
    lambdas, alphas, sigmas = grid
    start, x0_start = history[-1]
    h = lambdas[target] - lambdas[start]
    earlier = history[-order:-1][::-1]  # the order - 1 points before the newest, newest first
    rks = [(lambdas[index] - lambdas[start]) / h for index, _ in earlier] + [1.0]
    h_phi_1, b_of_h, predictor, corrector = _weights(h, rks, variant)
    slopes = [(x0 - x0_start) / rk for (_, x0), rk in zip(earlier, rks)]
    alpha = alphas[target]
    x_linear = (sigmas[target] / sigmas[start]) * x - (alpha * h_phi_1) * x0_start
    x_predicted = x_linear - (alpha * b_of_h) * sum(w * d for w, d in zip(predictor, slopes))
    if evaluate is None:
        return x_predicted, None
    x0_fresh = evaluate(x_predicted, target)[1]
    correction = sum(w * d for w, d in zip(corrector[:-1], slopes)) + corrector[-1] * (x0_fresh - x0_start)
    return x_linear - (alpha * b_of_h) * correction, x0_fresh


def sample_unipc(denoiser, x, steps, *, t_start=None, timesteps=None, callback=None, blend=None, order=3,
                 variant="bh1", lower_order_final=True):
    """UniPC over `steps` time-uniform steps from continuous time t_start (default 1) to 1/N, or over the
    explicit descending model `timesteps` (steps + 1 of them) when given; x is the VP latent at the first.

    The model is called once per step (steps calls): at the start, then at each corrected step's prediction.
    blend(x, t) sees every model input at its model timestep; the first one, the start, is carried on
    blended (as the originals' blend), a prediction only feeds the model (the corrector replaces it).
    callback(info) after every step: info = {"i", "total", "t", "x", "x0"} with t and x0 of the newest model
    evaluation.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown UniPC variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    if not (isinstance(order, int) and order >= 1):
        raise ValueError(f"the UniPC order must be a positive integer, not {order!r}")
    schedule = denoiser.schedule
    times = time_uniform_timesteps(schedule, steps, t_start) if timesteps is None else \
        torch.as_tensor(timesteps, dtype=torch.float64)
    if times.shape != (steps + 1,):
        raise ValueError(f"{steps} UniPC steps walk {steps + 1} timesteps, not {tuple(times.shape)}")
    grid = tuple(f(times).tolist() for f in (schedule.lambda_, schedule.alpha, schedule.sigma))
    order = min(order, steps)

    def evaluate(latent, index):
        t = float(times[index])
        latent = blend(latent, t) if blend is not None else latent
        return latent, denoiser(latent, t)[1]

    x, x0 = evaluate(x, 0)
    history, newest = [(0, x0)], (float(times[0]), x0)
    for target in range(1, steps + 1):
        if target < order:
            step_order = target
        else:
            step_order = min(order, steps + 1 - target) if lower_order_final else order
        last = target == steps
        x, x0 = _step(x, history, target, step_order, grid, variant, None if last else evaluate)
        if not last:
            history = (history + [(target, x0)])[-order:]
            newest = (float(times[target]), x0)
        if callback is not None:
            callback({"i": target - 1, "total": steps, "t": newest[0], "x": x, "x0": newest[1]})
    return x


def a1111_steps_and_start(schedule, steps: int, skip_steps: int = 0) -> tuple:
    """(UniPC steps, continuous start time or None for 1) of a run of `steps` steps, `skip_steps` of them
    skipped by img2img, as A1111 maps them (see the module's docstring)."""
    n = schedule.num_timesteps
    if not 1 <= steps <= n:
        raise ValueError(f"the number of sampling steps must be in 1..{n}, not {steps!r}")
    if skip_steps == 0:
        return len(range(0, n, n // steps)), None
    denoising_steps = steps - skip_steps
    return denoising_steps, (first_timestep(schedule, steps, skip_steps) + 1) / n


def first_timestep(schedule, steps: int, skip_steps: int = 0) -> float:
    """The model timestep UniPC's first step starts at in a run of `steps` steps, `skip_steps` skipped."""
    if skip_steps == 0:
        return float(schedule.num_timesteps - 1)
    return float(schedule.ddim_timesteps(steps)[steps - skip_steps - 1])


def sample_unipc_a1111(denoiser, x, steps, *, skip_steps=0, callback=None, blend=None, order=3, variant="bh1",
                       lower_order_final=True):
    """UniPC for a run of `steps` steps, the first `skip_steps` skipped (img2img: x noised as the originals'
    DDIM img2img noises it), as A1111 runs it; the registry's function."""
    unipc_steps, t_start = a1111_steps_and_start(denoiser.schedule, steps, skip_steps)
    return sample_unipc(denoiser, x, unipc_steps, t_start=t_start, callback=callback, blend=blend, order=order,
                        variant=variant, lower_order_final=lower_order_final)
