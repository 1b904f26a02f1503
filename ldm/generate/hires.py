"""txt2img's "Hires. fix", as AUTOMATIC1111's: a first pass at the asked size, upscaled, then an img2img-style
second pass at the final size with the same sampler and schedule.

As A1111 (its processing.py, StableDiffusionProcessingTxt2Img):
- The final size: --hr_scale times the first pass's, or --hr_resize_x/--hr_resize_y (one of them: the other
  follows the aspect ratio; both with another aspect ratio: upscaled to cover, then the latent cropped at its
  centre, A1111's truncate_x/y).
- Upscalers: the latent ones, torch's interpolate of the first pass's latents ("Latent": bilinear, "Latent
  (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)", "Latent
  (nearest-exact)"); or the picture's: decoded, resized with PIL ("Lanczos", "Nearest"; "None" is no upscaler,
  which leaves A1111's final resize, Lanczos) and encoded again.
- The second pass runs --hr_second_pass_steps (0: as many as the first) steps: the schedule is made for
  int(steps / min(strength, 0.999)) steps and its last ones are run, as A1111's img2img with a step count
  given (setup_img2img_steps). Its noise is new: in A1111's seed mode a new source per image with the
  batch's seeds at the final size (A1111 makes a new ImageRNG), in batch mode the run's one source goes on.
- The infotext: "Size" is the first pass's, as A1111 writes it (its "send to txt2img" sets the first pass's
  size from it and the final size from "Hires upscale"/"Hires resize"); then "Denoising strength", "Hires
  prompt", "Hires negative prompt" (when given), "Hires upscale" or "Hires resize", "Hires steps" (when not
  0) and "Hires upscaler".
Where ours differs: the picture upscalers encode to the posterior's mean (A1111 samples it from the device's
global generator, which no seed sets); at strength 0 the second pass runs no step and the upscaled first pass
is decoded; DDIM, PLMS and DPM-Solver run the requested steps too (A1111's DDIM runs one fewer); the x4
upscaler model is not an --hr_upscaler here (use scripts/upscale.py on the result).
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ldm.generate.errors import UserError
from ldm.generate.extra_networks import parse_prompt
from ldm.generate.img2img import noised_start
from ldm.generate.rng import ImageNoise
from ldm.generate.run import BatchInputs, Start, decode
from ldm.generate import speedups
from ldm.models.diffusion import samplers
from ldm.models.diffusion.sampling import Schedule

# A1111's names -> torch.nn.functional.interpolate's (mode, antialias), its shared.latent_upscale_modes
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS = {"None": Image.LANCZOS, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
DEFAULT_UPSCALER = "Latent"
DEFAULT_STRENGTH = 0.7  # A1111's txt2img default
MAX_STRENGTH_DIVISOR = 0.999  # A1111's: strength 1 still keeps a trace of the first pass


def upscaler_choices() -> str:
    return ", ".join(f'"{name}"' for name in (*LATENT_UPSCALERS, *PIXEL_UPSCALERS))


def resolve_upscaler(name: str) -> str:
    """A1111's spelling of an upscaler name given in any case; ValueError naming the choices."""
    folded = " ".join(name.split()).casefold()
    for known in (*LATENT_UPSCALERS, *PIXEL_UPSCALERS):
        if known.casefold() == folded:
            return known
    raise ValueError(f"unknown upscaler {name!r}: choose one of {upscaler_choices()} (any case)")


@dataclass(frozen=True)
class HiresSettings:
    scale: float = 2.0
    resize_x: int = 0  # the final width in pixels, 0: from scale (or from resize_y's aspect ratio)
    resize_y: int = 0
    upscaler: str = DEFAULT_UPSCALER  # a key of LATENT_UPSCALERS or PIXEL_UPSCALERS
    steps: int = 0  # 0: the first pass's
    strength: float = DEFAULT_STRENGTH
    prompt: str = ""  # "": the first pass's prompts
    negative_prompt: str = ""  # "": the first pass's

    @property
    def resized(self) -> bool:
        return bool(self.resize_x or self.resize_y)


@dataclass(frozen=True)
class Target:
    """Sizes in pixels: the first pass is upscaled to upscale_*, then cropped at its centre to final_*."""
    upscale_height: int
    upscale_width: int
    final_height: int
    final_width: int


def target(settings: HiresSettings, height: int, width: int, factor: int = 8) -> Target:
    """A1111's calculate_target_resolution for a first pass of height x width (factor: the latent's)."""
    if not settings.resized:
        up_w, up_h = int(width * settings.scale), int(height * settings.scale)
        return Target(up_h, up_w, up_h, up_w)
    if not settings.resize_y:
        up_w, up_h = settings.resize_x, settings.resize_x * height // width
        return Target(up_h, up_w, up_h, up_w)
    if not settings.resize_x:
        up_w, up_h = settings.resize_y * width // height, settings.resize_y
        return Target(up_h, up_w, up_h, up_w)
    if width / height < settings.resize_x / settings.resize_y:
        up_w, up_h = settings.resize_x, settings.resize_x * height // width
    else:
        up_w, up_h = settings.resize_y * width // height, settings.resize_y
    crop_x, crop_y = (up_w - settings.resize_x) // factor, (up_h - settings.resize_y) // factor
    return Target(up_h, up_w, (up_h // factor - crop_y) * factor, (up_w // factor - crop_x) * factor)


def final_size(sizes: Target) -> tuple[int, int]:
    return sizes.final_height, sizes.final_width


def settings_problem(settings: HiresSettings) -> str | None:
    """What is wrong with the options themselves (sizes aside), in one line; None when nothing is."""
    if settings.resize_x < 0 or settings.resize_y < 0:
        return f"--hr_resize_x/--hr_resize_y must be 0 (unset) or a size in pixels (got {settings.resize_x}x{settings.resize_y})"
    if not settings.resized and not (math.isfinite(settings.scale) and settings.scale > 1):
        return (f"--hr_scale {settings.scale} does not enlarge the picture: use a number above 1 (A1111's default 2), "
                "or give the final size with --hr_resize_x/--hr_resize_y")
    if not 0.0 <= settings.strength <= 1.0:  # NaN too
        return (f"--denoising_strength {settings.strength} is outside [0, 1]: 0 keeps the upscaled first pass, "
                "1 redraws it almost entirely")
    if settings.steps < 0:
        return f"--hr_second_pass_steps must be 0 (as many as the first pass) or more (got {settings.steps})"
    return None


def checked_target(settings: HiresSettings, height: int, width: int, factor: int = 8) -> Target:
    """target(), refused (UserError) where a final side is not a positive multiple of 8 (and of the latent's
    factor), with the options that would give the nearest size that is."""
    problem = settings_problem(settings)
    if problem:
        raise UserError(problem)
    multiple = max(8, factor)
    for flag, side in (("--hr_resize_x", settings.resize_x), ("--hr_resize_y", settings.resize_y)):
        if side and side % multiple:
            lower = max(multiple, side // multiple * multiple)
            raise UserError(f"{flag} {side} is not a multiple of {multiple}: use {lower} or {lower + multiple}")
    sizes = target(settings, height, width, factor)
    final_h, final_w = sizes.final_height, sizes.final_width
    if min(final_h, final_w) >= multiple and final_h % multiple == 0 and final_w % multiple == 0:
        return sizes
    how = f"--hr_resize_x {settings.resize_x} --hr_resize_y {settings.resize_y}" if settings.resized \
        else f"--hr_scale {settings.scale:g}"
    down = lambda side: max(multiple, side // multiple * multiple)
    raise UserError(f"{how} makes {final_w}x{final_h} of the first pass's {width}x{height}, not a multiple of "
                    f"{multiple} on each side: give the final size instead, e.g. --hr_resize_x {down(final_w)} "
                    f"--hr_resize_y {down(final_h)}")


def infotext_fields(settings: HiresSettings) -> dict:
    """A1111's hires fields, in its order."""
    fields = {"Denoising strength": settings.strength}
    if settings.prompt:
        fields["Hires prompt"] = settings.prompt
    if settings.negative_prompt:
        fields["Hires negative prompt"] = settings.negative_prompt
    if settings.resized:
        fields["Hires resize"] = f"{settings.resize_x}x{settings.resize_y}"
    else:
        fields["Hires upscale"] = f"{settings.scale:g}"  # "2", as A1111's texts have it
    if settings.steps:
        fields["Hires steps"] = settings.steps
    fields["Hires upscaler"] = settings.upscaler
    return fields


# --- the second pass ---------------------------------------------------------------------------------------------
def upscale_latents(latents: torch.Tensor, sizes: Target, upscaler: str, loaded) -> torch.Tensor:
    """The first pass's latents at the final size: interpolated, or decoded, resized and encoded again."""
    factor = loaded.downsampling_factor
    latent_size = (sizes.upscale_height // factor, sizes.upscale_width // factor)
    if upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[upscaler]
        upscaled = torch.nn.functional.interpolate(latents.float(), size=latent_size, mode=mode, antialias=antialias)
    else:
        upscaled = encode(loaded, resize_pictures(decode(loaded, latents), latent_size, factor, upscaler))
    crop_y = latent_size[0] - sizes.final_height // factor
    crop_x = latent_size[1] - sizes.final_width // factor
    return upscaled[:, :, crop_y // 2:latent_size[0] - (crop_y + 1) // 2, crop_x // 2:latent_size[1] - (crop_x + 1) // 2]


def resize_pictures(decoded: torch.Tensor, latent_size, factor: int, upscaler: str) -> torch.Tensor:
    """Decoded pictures [-1, 1] -> 8-bit pictures (as A1111 makes them) resized by PIL -> [-1, 1] again."""
    size = (latent_size[1] * factor, latent_size[0] * factor)
    pixels = (255.0 * torch.clamp((decoded.float() + 1.0) / 2.0, 0.0, 1.0)).permute(0, 2, 3, 1).cpu().numpy()
    resized = [np.asarray(Image.fromarray(picture.astype(np.uint8)).resize(size, resample=PIXEL_UPSCALERS[upscaler]))
               for picture in pixels]
    return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def encode(loaded, pixels: torch.Tensor) -> torch.Tensor:
    model = loaded.model
    loaded.use("first_stage_model")
    posterior = model.encode_first_stage(pixels.to(loaded.device, loaded.dtype))
    return model.scale_factor * posterior.mean.float()


def fresh_noise(noise, shape) -> torch.Tensor:
    """The second pass's noise. A1111's seeds: a new source per image with the batch's seeds (and variation
    seeds) at the new size, whose later draws are the second pass's sampler noise. Batch mode: the next draw."""
    images = noise.images
    if images is None:
        return noise.randn(shape)
    noise.new_batch(ImageNoise(images.rng, images.seeds, images.subseeds, images.subseed_strength,
                               images.resize_from, images.ensd), shape)
    return noise.start_noise(shape)


def second_pass_steps(settings: HiresSettings, first_pass_steps: int, sampler: str) -> tuple[int, int]:
    """(the schedule's steps, t_enc) so that the requested steps are run (k-samplers run t_enc + 1)."""
    requested = settings.steps or first_pass_steps
    total = int(requested / min(settings.strength, MAX_STRENGTH_DIVISOR))
    return total, requested - 1 if samplers.REGISTRY[sampler].is_k_sampler else requested


class SecondPass:
    """One batch's hires pass, given to the run as Start.second_pass."""

    def __init__(self, settings: HiresSettings, sizes: Target, batch: BatchInputs):
        self.settings, self.sizes, self.batch = settings, sizes, batch

    def conditioning(self):
        """The hires prompts' conditioning (AND parts read, as the first pass's); their <lora:...> tags are taken
        out of the text, and the first pass's LoRAs stay applied (A1111 switches to the hires prompt's set)."""
        batch, settings = self.batch, self.settings
        cond, uncond = batch.cond, batch.uncond
        if settings.prompt:
            cond = batch.condition([parse_prompt(settings.prompt).text] * batch.size, composable=True)
        if uncond is not None and settings.negative_prompt:
            uncond = batch.condition([parse_prompt(settings.negative_prompt).text] * batch.size)
        # SDXL is told the upscaled size, as A1111 conditions its hires pass
        size = batch.job.size_conditioning(self.sizes.upscale_height, self.sizes.upscale_width)
        return cond.resized(size), None if uncond is None else uncond.resized(size)

    def __call__(self, latents: torch.Tensor, sampled) -> torch.Tensor:
        batch, settings, job = self.batch, self.settings, self.batch.job
        upscaled = upscale_latents(latents, self.sizes, settings.upscaler, batch.loaded).to(batch.loaded.device)
        if settings.strength == 0:
            return upscaled
        steps, t_enc = second_pass_steps(settings, job.steps, job.sampler)
        noise = fresh_noise(batch.noise, list(upscaled.shape)).to(upscaled.device)
        schedule = Schedule(batch.loaded.model.alphas_cumprod)
        start, skip_steps = noised_start(job.sampler, job.schedule, schedule, steps, t_enc, upscaled, noise)
        cond, uncond = self.conditioning()
        return sampled(Start(start, cond, uncond, skip_steps=skip_steps, steps=steps))


# --- options -------------------------------------------------------------------------------------------------------
def add_arguments(parser):
    group = parser.add_argument_group("hires fix (A1111's: a second pass at a larger size)")
    group.add_argument("--hr_scale", type=float, default=None,
                       help="turns the hires fix on: the final size is the first pass's (--H/--W) times this, e.g. 2")
    group.add_argument("--hr_resize_x", type=int, default=0, metavar="PIXELS",
                       help="turns the hires fix on: the final width (with --hr_resize_y alone: from the aspect ratio)")
    group.add_argument("--hr_resize_y", type=int, default=0, metavar="PIXELS", help="the final height, see --hr_resize_x")
    group.add_argument("--hr_upscaler", default=DEFAULT_UPSCALER,
                       help=f"how the first pass is enlarged, any case: {upscaler_choices()} (default Latent: its "
                            "latents, bilinear)")
    group.add_argument("--hr_second_pass_steps", type=int, default=0,
                       help="steps of the second pass (default 0: as many as --ddim_steps)")
    group.add_argument("--denoising_strength", type=float, default=DEFAULT_STRENGTH,
                       help=f"how much the second pass redraws, 0..1 (default {DEFAULT_STRENGTH}, A1111's)")
    group.add_argument("--hr_prompt", default="", help="the second pass's prompt (default: the first pass's)")
    group.add_argument("--hr_negative_prompt", default="",
                       help="the second pass's negative prompt (default: the first pass's)")
    speedups.add_hires_argument(group)


# the options that mean something only with the hires fix on, and their defaults
HIRES_ONLY = {"hr_upscaler": DEFAULT_UPSCALER, "hr_second_pass_steps": 0, "denoising_strength": DEFAULT_STRENGTH,
              "hr_prompt": "", "hr_negative_prompt": "", "token_merging_ratio_hr": 0.0}


def settings_from_args(args) -> HiresSettings | None:
    """The hires fix asked for, None when it is off; UserError for a bad option (nothing is loaded yet)."""
    if args.hr_scale is None and not (args.hr_resize_x or args.hr_resize_y):
        changed = [name for name, default in HIRES_ONLY.items() if getattr(args, name) != default]
        if changed:
            raise UserError(f"--{changed[0]} applies to the hires fix, which is off: turn it on with --hr_scale or "
                            "--hr_resize_x/--hr_resize_y, or drop it")
        return None
    try:
        upscaler = resolve_upscaler(args.hr_upscaler)
    except ValueError as error:
        raise UserError(f"--hr_upscaler: {error}") from None
    settings = HiresSettings(scale=2.0 if args.hr_scale is None else args.hr_scale, resize_x=args.hr_resize_x,
                             resize_y=args.hr_resize_y, upscaler=upscaler, steps=args.hr_second_pass_steps,
                             strength=args.denoising_strength, prompt=args.hr_prompt,
                             negative_prompt=args.hr_negative_prompt)
    problem = settings_problem(settings)
    if problem:
        raise UserError(problem)
    return settings

