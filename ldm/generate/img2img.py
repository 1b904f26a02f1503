"""Image to image: the input picture's latent, noised part of the way, then denoised with the prompt.

The originals' img2img, kept where it defines the pictures:
- t_enc = int(strength × steps) denoising steps are run, the last t_enc of the sampler's schedule.
- The init latent is a posterior *sample* of the autoencoder (mean + std·noise), as the originals encode.
- Random draws, from the run's one CPU generator, in the originals' order: the init latent's posterior
  noise, then the noise that diffuses it (DDIM's stochastic encode), then any sampler noise.
- DDIM and PLMS noise the latent to DDIM timestep index t_enc but start denoising one index lower, as
  the originals do (see `noised_start_timestep`); so does UniPC, as A1111 runs it.
The k-diffusion samplers (Euler, DPM++ 2M, ...) start as A1111's img2img: at index steps - t_enc - 1 of their
sigma grid (t_enc + 1 steps), from init_latent + noise · sigma there.
Where ours goes further: strength 0 returns the init latent decoded (no steps; the originals noise it to
t = 1 first), strength 1 starts from pure noise, as txt2img does, without drawing or even encoding the
init latent (the originals crash there), and every sampler can be used.
"""
from dataclasses import dataclass

import torch

from ldm.generate.run import BatchInputs, Start, Task
from ldm.models.diffusion import samplers
from ldm.models.diffusion.k_sampling import ModelSigmas
from ldm.models.diffusion.sampling import Schedule, first_timestep, noise_to_step


def denoising_steps(strength: float, steps: int) -> int:
    """t_enc of the originals: how many of the `steps` are run."""
    return int(strength * steps)


def noised_start_timestep(sampler: str, schedule: Schedule, steps: int, t_enc: int):
    """The timestep the init latent is diffused to before its t_enc denoising steps; None for pure noise.

    DDIM and PLMS: the originals' ddim_timesteps[t_enc], one DDIM step above where denoising begins
    (ddim_timesteps[t_enc - 1], what `first_timestep` gives). That off-by-one is the originals' (noised
    to t = 701 for strength 0.75 and 10 steps, denoised from t = 601), kept so that the same seed gives
    their pictures. UniPC (ldm.models.diffusion.unipc) too: A1111 noises and starts it exactly so.
    DPM-Solver has no original img2img: it starts exactly at its first step's level.
    At t_enc = steps there is no step above the first: the start is pure noise (strength 1).
    """
    if t_enc >= steps:
        return None
    if sampler == "dpm":
        return first_timestep("dpm", schedule, steps, skip_steps=steps - t_enc)
    return int(schedule.ddim_timesteps(steps)[t_enc])


class InitImage:
    """An input picture's latent distribution, encoded once; each batch draws its own posterior sample."""

    def __init__(self, pixels: torch.Tensor):
        self.pixels = pixels  # [1, 3, H, W] in [-1, 1]
        self.mean = self.std = self.scale_factor = None  # set by encode

    def encode(self, loaded):
        model = loaded.model
        loaded.use("first_stage_model")
        posterior = model.encode_first_stage(self.pixels.to(loaded.device, loaded.dtype))
        self.mean, self.std = posterior.mean.float(), posterior.std.float()
        self.scale_factor = model.scale_factor

    def sample(self, noise, n: int) -> torch.Tensor:
        """n latents, scale_factor · (mean + std · noise), the noise drawn from the run's generator."""
        drawn = noise.randn([n, *self.mean.shape[1:]]).to(self.mean.device)
        return self.scale_factor * (self.mean + self.std * drawn)


@dataclass
class NoisedStart:
    latents: torch.Tensor  # where sampling starts
    skip_steps: int
    init_latent: torch.Tensor | None  # the init latent's posterior sample, when it was drawn
    noise: torch.Tensor | None  # the noise that diffused it (None when no steps run)


def start_from_image(batch: BatchInputs, init: InitImage, schedule: Schedule, strength: float,
                     keep_init_latent: bool = False) -> NoisedStart:
    """The init latent diffused for `strength`, with the draws in the originals' order.

    The init latent is drawn only when it is used: below strength 1, or when the caller needs it anyway
    (inpainting by blending). keep_init_latent=False at strength 1 thus gives txt2img's start noise.
    """
    job, device = batch.job, batch.loaded.device
    t_enc = denoising_steps(strength, job.steps)
    init_latent = init.sample(batch.noise, batch.size) if t_enc < job.steps or keep_init_latent else None
    if t_enc == 0:
        return NoisedStart(init_latent, job.steps, init_latent, None)
    start_noise = batch.noise.start_noise(batch.latent_shape).to(device)
    latents, skip_steps = noised_start(job.sampler, job.schedule, schedule, job.steps, t_enc, init_latent, start_noise)
    return NoisedStart(latents, skip_steps, init_latent, start_noise)


def noised_start(sampler: str, sigma_schedule: str, schedule: Schedule, steps: int, t_enc: int,
                 init_latent: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the sampler's x at its first step, skip_steps): init_latent diffused with `noise` to where t_enc
    denoising steps of `steps` begin (k-samplers: t_enc + 1 of them, as A1111), pure noise at t_enc = steps.
    Shared by img2img and txt2img's hires fix."""
    if samplers.REGISTRY[sampler].is_k_sampler and t_enc < steps:
        skip_steps = samplers.k_img2img_skip_steps(steps, t_enc)
        latents = samplers.k_noised_start(sampler, sigma_schedule, schedule.alphas_cumprod, steps, skip_steps,
                                          init_latent, noise)
        if skip_steps == 0:  # samplers.sample takes unit noise there and multiplies it by the first sigma itself
            latents = latents / float(samplers.sigma_grid(sampler, sigma_schedule, steps,
                                                          ModelSigmas(schedule.alphas_cumprod))[0])
        return latents, skip_steps
    level = noised_start_timestep(sampler, schedule, steps, t_enc)
    return (noise if level is None else noise_to_step(schedule, init_latent, level, noise)), steps - t_enc


def init_latent_needed(strength: float, steps: int) -> bool:
    return denoising_steps(strength, steps) < steps


class ImageToImage(Task):
    def __init__(self, pixels: torch.Tensor, strength: float):
        self.init = InitImage(pixels)
        self.strength = strength

    def prepare(self, job, loaded, log):
        loaded.require_kind("img2img.py", "text-to-image")
        self.schedule = Schedule(loaded.model.alphas_cumprod)
        if init_latent_needed(self.strength, job.steps):
            self.init.encode(loaded)

    def start(self, batch: BatchInputs) -> Start:
        noised = start_from_image(batch, self.init, self.schedule, self.strength)
        return Start(noised.latents, batch.cond, batch.uncond, skip_steps=noised.skip_steps)

    def fields(self, job) -> dict:
        return {"Denoising strength": self.strength}
