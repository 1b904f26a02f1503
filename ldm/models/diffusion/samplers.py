"""The sampler registry: every sampler by name, with what the CLI, the infotext and validation need to know.

Adding a sampler is one function (ldm.models.diffusion.k_sampling) plus one `REGISTRY` line. Names as A1111
writes them ("DPM++ 2M"), our keys ("dpmpp_2m") and A1111's aliases ("k_dpmpp_2m") are accepted in any case,
and so are A1111's older combined names ("DPM++ 2M Karras"), which set the schedule too.

Three families (SamplerInfo.family) share `sample`:
- "original": DDIM, PLMS, DPM-Solver over model timesteps, exactly as ldm.models.diffusion.sampling runs them;
- "model_time": samplers of their own over model time (UniPC), `function(denoiser, x, steps, *, skip_steps,
  callback, blend)`, x the VP latent as for the originals, img2img noised as the originals' DDIM img2img;
- "sigma": the k-diffusion family over a descending sigma grid ending at 0, built by a schedule from the model's own
  sigma_min / sigma_max. Their x is in k-diffusion's scale (x0 + sigma·noise): at skip_steps = 0 `sample`
  takes unit start noise and multiplies it by the first sigma, as A1111 does; with skip_steps (img2img) x must
  already be `k_noised_start(...)`.
"""
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ldm.models.diffusion import dpm_adaptive, k_sampling, sampling, sde_sampling, unipc
from ldm.models.diffusion.align_your_steps import align_your_steps_sigmas
from ldm.models.diffusion.brownian import brownian_noise_for
from ldm.models.diffusion.sampler_options import SamplerOptions, arguments_for, taken_by, unused_by
from ldm.models.diffusion.k_sampling import ModelSigmas, SigmaDenoiser, append_zero


@dataclass(frozen=True)
class SamplerInfo:
    display_name: str  # as A1111 writes it in the infotext
    function: Callable | None  # None for the originals, run by sampling.sample
    aliases: tuple = ()
    stochastic: bool = False  # draws fresh noise while sampling
    default_schedule: str = "uniform"  # what --schedule automatic means for it (A1111's per-sampler default)
    discard_next_to_last_sigma: bool = False  # A1111: a grid of steps + 1 sigmas without its next-to-last
    order: int = 1  # of its deterministic step rule: the error falls as steps^-order
    brownian_noise: bool = False  # its noise comes from Brownian trees seeded by the run (A1111's SDE samplers)
    adaptive: bool = False  # it picks its own steps: the step count does not set its number of model calls
    sigma_range_only: bool = False  # A1111 hands it the model's whole sigma range in txt2img, whatever the schedule
    noise_levels: type = ModelSigmas  # the model's sigmas its grid is built from
    denoiser: type = SigmaDenoiser  # what turns the model into its (x, sigma) -> denoised
    family: str = "sigma"  # "original", "model_time" or "sigma" (the k-diffusion family): see the module's docstring
    options: dict = field(default_factory=dict)

    @property
    def is_k_sampler(self) -> bool:
        return self.family == "sigma"


REGISTRY = {
    "ddim": SamplerInfo("DDIM", None, stochastic=False, family="original"),  # stochastic only with eta > 0
    "plms": SamplerInfo("PLMS", None, order=4, family="original"),
    # the originals' time-uniform DPM-Solver++(2M)
    "dpm": SamplerInfo("DPM-Solver", None, ("dpm_solver",), order=2, family="original"),
    "euler": SamplerInfo("Euler", k_sampling.sample_euler, ("k_euler",)),
    "euler_a": SamplerInfo("Euler a", k_sampling.sample_euler_ancestral, ("k_euler_a", "k_euler_ancestral",
                                                                           "euler_ancestral"), stochastic=True),
    "heun": SamplerInfo("Heun", k_sampling.sample_heun, ("k_heun",), order=2),
    "lms": SamplerInfo("LMS", k_sampling.sample_lms, ("k_lms",), order=4),
    "dpm_2": SamplerInfo("DPM2", k_sampling.sample_dpm_2, ("k_dpm_2", "dpm2"), default_schedule="karras",
                         discard_next_to_last_sigma=True, order=2),
    "dpm_2_a": SamplerInfo("DPM2 a", k_sampling.sample_dpm_2_ancestral, ("k_dpm_2_a", "dpm2_a"), stochastic=True,
                           default_schedule="karras", discard_next_to_last_sigma=True, order=2),
    "dpmpp_2s_a": SamplerInfo("DPM++ 2S a", k_sampling.sample_dpmpp_2s_ancestral, ("k_dpmpp_2s_a",),
                              stochastic=True, default_schedule="karras", order=2),
    "dpmpp_2m": SamplerInfo("DPM++ 2M", k_sampling.sample_dpmpp_2m, ("k_dpmpp_2m",), default_schedule="karras",
                            order=2),
    "dpmpp_sde": SamplerInfo("DPM++ SDE", sde_sampling.sample_dpmpp_sde, ("k_dpmpp_sde",), stochastic=True,
                             default_schedule="karras", order=2, brownian_noise=True),
    "dpmpp_2m_sde": SamplerInfo("DPM++ 2M SDE", sde_sampling.sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde",),
                                stochastic=True, default_schedule="exponential", order=2, brownian_noise=True),
    "dpmpp_3m_sde": SamplerInfo("DPM++ 3M SDE", sde_sampling.sample_dpmpp_3m_sde, ("k_dpmpp_3m_sde",),
                                stochastic=True, default_schedule="exponential", discard_next_to_last_sigma=True,
                                order=2, brownian_noise=True),  # third-order steps after a first-order start
    "dpm_fast": SamplerInfo("DPM fast", dpm_adaptive.sample_dpm_fast, ("k_dpm_fast",), stochastic=True, order=3,
                            sigma_range_only=True),
    "dpm_adaptive": SamplerInfo("DPM adaptive", dpm_adaptive.sample_dpm_adaptive, ("k_dpm_ad",), stochastic=True,
                                order=3, sigma_range_only=True, adaptive=True),
    "lcm": SamplerInfo("LCM", k_sampling.sample_lcm, ("k_lcm",), stochastic=True, noise_levels=k_sampling.LCMSigmas,
                       denoiser=k_sampling.LCMDenoiser),
    "unipc": SamplerInfo("UniPC", unipc.sample_unipc_a1111, ("uni_pc",), order=3, family="model_time"),
}

# --- schedules: a descending sigma grid of `steps` sigmas, then 0 -------------------------------------------------
SCHEDULE_NAMES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
                  "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform",
                  "align_your_steps": "Align Your Steps"}  # A1111's labels


def karras_sigmas(steps, sigma_min, sigma_max, rho=7.0) -> torch.Tensor:
    """Karras et al. (2022): uniform in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    max_root, min_root = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return append_zero((max_root + ramp * (min_root - max_root)) ** rho)


def polyexponential_sigmas(steps, sigma_min, sigma_max, rho=1.0) -> torch.Tensor:
    """log sigma a polynomial of degree rho in the step (rho = 1: exponential)."""
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** rho
    return append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def exponential_sigmas(steps, sigma_min, sigma_max) -> torch.Tensor:
    """Uniform in log sigma."""
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp())


def sgm_uniform_sigmas(steps, model_sigmas: ModelSigmas) -> torch.Tensor:
    """Stability's SGM "uniform": `steps` timesteps uniform over [t(sigma_max), t(sigma_min)], the last left out."""
    start, end = model_sigmas.sigma_to_t(model_sigmas.sigma_max), model_sigmas.sigma_to_t(model_sigmas.sigma_min)
    return append_zero(model_sigmas.t_to_sigma(torch.linspace(start, end, steps + 1, dtype=torch.float64)[:-1]))


def schedule_sigmas(schedule: str, steps: int, model_sigmas: ModelSigmas) -> torch.Tensor:
    """`steps` + 1 descending sigmas ending at 0 from the model's own sigma range, by schedule name."""
    low, high = model_sigmas.sigma_min, model_sigmas.sigma_max
    if schedule == "uniform":
        return model_sigmas.uniform_sigmas(steps)
    if schedule == "karras":
        return karras_sigmas(steps, low, high)
    if schedule == "exponential":
        return exponential_sigmas(steps, low, high)
    if schedule == "polyexponential":
        return polyexponential_sigmas(steps, low, high)
    if schedule == "sgm_uniform":
        return sgm_uniform_sigmas(steps, model_sigmas)
    if schedule == "align_your_steps":  # NVIDIA's SD 1.5 table: A1111's choice for every model but SDXL
        return align_your_steps_sigmas(steps)
    raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULE_NAMES)}")


def effective_schedule(sampler: str, schedule: str = "automatic") -> str:
    """The schedule that runs: the sampler's default for "automatic"."""
    return REGISTRY[sampler].default_schedule if schedule == "automatic" else schedule


def sigma_grid(sampler: str, schedule: str, steps: int, model_sigmas: ModelSigmas) -> torch.Tensor:
    """The whole grid `steps` steps of `sampler` walk (steps + 1 sigmas, the last 0), as A1111 builds it."""
    info = REGISTRY[sampler]
    chosen = effective_schedule(sampler, schedule)
    if info.discard_next_to_last_sigma:
        sigmas = schedule_sigmas(chosen, steps + 1, model_sigmas)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return schedule_sigmas(chosen, steps, model_sigmas)


# --- names ---------------------------------------------------------------------------------------------------------
def _fold(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


def _names() -> dict:
    """Every accepted spelling (folded) -> (sampler key, schedule or None)."""
    names = {}
    for key, info in REGISTRY.items():
        spellings = (key, info.display_name, *info.aliases)
        names.update((_fold(spelling), (key, None)) for spelling in spellings)
        if info.is_k_sampler:  # A1111's old combined names, e.g. "DPM++ 2M Karras"
            for schedule, label in SCHEDULE_NAMES.items():
                if schedule != "automatic":
                    names.update((_fold(f"{spelling} {label}"), (key, schedule)) for spelling in spellings)
    return names


def sampler_choices() -> str:
    return ", ".join(f'"{info.display_name}"' for info in REGISTRY.values())


def resolve_sampler(name: str) -> tuple[str, str | None]:
    """(registry key, the schedule a combined name sets, else None); ValueError naming the choices."""
    found = _names().get(_fold(name))
    if found is None:
        raise ValueError(f"invalid choice {name!r}: choose one of {sampler_choices()} (any case; "
                         f'or a key such as dpmpp_2m, or an A1111 name with its schedule such as "DPM++ 2M Karras")')
    return found


def resolve_schedule(name: str) -> str:
    folded = _fold(name).replace(" ", "_")
    if folded not in SCHEDULE_NAMES:
        raise ValueError(f"invalid choice {name!r}: choose one of {', '.join(SCHEDULE_NAMES)} (any case)")
    return folded


def infotext_fields(sampler: str, schedule: str = "automatic") -> dict:
    """A1111's "Sampler" and, for the k-samplers, its "Schedule type", in that order."""
    info = REGISTRY[sampler]
    fields = {"Sampler": info.display_name}
    if info.is_k_sampler:
        fields["Schedule type"] = SCHEDULE_NAMES[effective_schedule(sampler, schedule)]
    return fields


# --- running -------------------------------------------------------------------------------------------------------
def k_img2img_skip_steps(steps: int, denoising_steps: int) -> int:
    """A1111's img2img start index into the grid: steps - t_enc - 1, so t_enc + 1 steps are run."""
    return max(steps - denoising_steps - 1, 0)


def k_noised_start(sampler, schedule, alphas_cumprod, steps, skip_steps, init_latent, noise) -> torch.Tensor:
    """img2img's start for a k-sampler, as A1111: init_latent + noise · sigmas[skip_steps]."""
    sigmas = sigma_grid(sampler, schedule, steps, REGISTRY[sampler].noise_levels(alphas_cumprod))
    return init_latent + noise * float(sigmas[skip_steps])


def unused_options_problem(sampler, options=None, quantize=False, prefix="") -> str | None:
    """What is wrong when `sampler` is asked for options it does not use (changed from their defaults),
    else None; option names are written with `prefix` ("--" for the command line)."""
    info = REGISTRY[sampler]
    unused = unused_by(info.function, options or SamplerOptions())
    if unused:
        name = unused[0]
        takers = [other.display_name for other in REGISTRY.values() if name in taken_by(other.function)]
        ddim = f"; DDIM's eta is {prefix}ddim_eta" if name == "eta" else ""
        return (f"{info.display_name} does not use {prefix}{name} (only {', '.join(takers)} do{ddim}): "
                f"leave it at its default {getattr(SamplerOptions(), name)} or pick one of those")
    if quantize and not info.is_k_sampler:
        return (f"{prefix}sigma_quantization applies to the k-diffusion samplers, which walk sigmas; "
                f"{info.display_name} does not: drop it")
    return None


def sample(sampler, denoiser, x, steps, *, skip_steps=0, schedule="automatic", eta=0.0, noise_source=None,
           callback=None, blend=None, quantize=False, sampler_options=None, **original_options):
    """Run the registered `sampler` for `steps` steps, the first `skip_steps` of them skipped.

    The originals go to sampling.sample unchanged (their images stay exactly the originals'). For a
    k-sampler, ancestral noise is drawn with `noise_source.randn(shape)`; blend(x, t) sees the VP latent
    going into the model at its model timestep, as the originals' blend does. `sampler_options`
    (sampler_options.SamplerOptions: eta, s_churn, ...; A1111's defaults when None) go to the sampler's
    function where its signature takes them; one changed that it does not take is a ValueError.
    """
    info = REGISTRY.get(sampler)
    if info is None:
        raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(REGISTRY)}")
    problem = unused_options_problem(sampler, sampler_options, quantize)
    if problem:
        raise ValueError(problem)
    if info.family == "original":
        if noise_source is not None:
            original_options["noise_source"] = noise_source
        return sampling.sample(sampler, denoiser, x, steps, skip_steps=skip_steps, eta=eta, callback=callback,
                               blend=blend, **original_options)
    if not (isinstance(steps, (int, np.integer)) and steps >= 1):
        raise ValueError(f"the number of sampling steps must be a positive integer, not {steps!r}")
    if not 0 <= skip_steps < steps:
        raise ValueError(f"skip_steps must be in 0..{steps - 1} for {steps} steps, not {skip_steps}")
    if eta != 0:
        raise ValueError(f"eta applies to DDIM only; pass eta=0 for {info.display_name}")
    if info.stochastic and noise_source is None:
        raise ValueError(f"{info.display_name} draws noise while sampling: pass a noise_source")
    passed = arguments_for(info.function, sampler_options or SamplerOptions())
    if info.family == "model_time":
        return info.function(denoiser, x, steps, skip_steps=skip_steps, callback=callback, blend=blend,
                             **{**info.options, **passed})
    model = info.denoiser(denoiser, blend=blend, quantize=quantize)
    grid = sigma_grid(sampler, schedule, steps, model)
    sigmas = grid[skip_steps:]
    if skip_steps == 0:
        x = x * float(sigmas[0])
        if info.sigma_range_only:  # A1111's txt2img: the model's own range and `steps`, the schedule's grid unused
            sigmas = model.uniform_sigmas(steps)
    if info.brownian_noise:
        noise_source = brownian_noise_for(noise_source, x.shape, grid)
    return info.function(model, x, sigmas, noise=noise_source, callback=callback, **{**info.options, **passed})
