"""SDXL's refiner as AUTOMATIC1111 runs it: a second model takes over the same sampling part way through.

What A1111 does (its sd_samplers_common.apply_refiner, called by CFGDenoiser at every model call; processing.py):
- At each model call the noise level is turned into the model timestep nearest to it (the argmin over the
  model's 1000 sigmas; the timestep itself for DDIM-like samplers), and the sampling is
  ``(999 - timestep) / 1000`` complete. At the first call where that reaches "Refiner switch at" (0.8 by
  default), the refiner's weights are loaded in place of the base's, the conditioning is made again with
  the refiner (`setup_conds`), and the same sampler goes on with the same sigmas, latents, history and
  noise: the refiner only answers the remaining model calls. The step counter of prompt editing goes on.
- The refiner's conditioning: its own text encoder (OpenCLIP ViT-bigG only for SDXL's) and its vector
  condition: the output's size as original size, the crop, and an aesthetic score of 6 for prompts and 2.5
  for negative prompts (A1111's sdxl_refiner_high/low_aesthetic_score); an empty negative prompt gets zero
  text embeddings, as with the base.
- With the hires fix, the refiner takes over in the second pass only (A1111's default "Hires fix: which
  pass to enable refiner for": second pass).
- The infotext gains "Refiner: NAME [HASH]" (the file's name and A1111's 10-digit short hash) and "Refiner
  switch at: 0.8", once the refiner has taken over; each batch starts with the base model again.
- A refiner that never takes over (too few steps to reach a timestep at or below 999 - 1000 * switch) is
  not written.

Where ours differs: the pictures are decoded with the run's (the base's, or --vae's) autoencoder, where A1111
decodes with the model loaded last (the refiner's; both of SDXL 1.0's VAEs share one latent space); a
refiner whose latents or noise schedule differ from the base's is refused, as it could not go on with the
same sampling. Without --lowmem both models stay in memory; with it, each keeps its checkpoint mapped and
one component converted at a time, and the base's UNet is given back before the refiner's parts are read.
LoRAs apply to the base only.
"""
import math
from dataclasses import dataclass

import torch

from ldm.generate.conditioning import Conditioner, PromptConditioning, resolve
from ldm.generate.errors import UserError
from ldm.models.diffusion.k_sampling import ModelSigmas
from ldm.models.diffusion.sampling import GuidedDenoiser

DEFAULT_SWITCH = 0.8  # A1111's default "Refiner switch at"
PRECISIONS_OF_DTYPES = {torch.float32: "full", torch.bfloat16: "bf16", torch.float16: "autocast"}
REFINABLE_KINDS = ("text-to-image",)


@dataclass(frozen=True)
class RefinerSettings:
    """checkpoint: as --ckpt takes it (a file, a diffusers folder, a hub id in the local cache); switch_at:
    the fraction of the sampling after which the refiner takes over, in (0, 1)."""
    checkpoint: str
    switch_at: float = DEFAULT_SWITCH


def switch_problem(switch_at: float) -> str | None:
    if not (isinstance(switch_at, (int, float)) and 0.0 < switch_at < 1.0):  # NaN too
        return (f"--refiner_switch {switch_at} is outside (0, 1): it is the fraction of the sampling after which "
                f"the refiner takes over, e.g. {DEFAULT_SWITCH} (A1111's default)")
    return None


def completed_fraction(sigmas: ModelSigmas, t: float) -> float:
    """A1111's measure of how far the sampling is at a model call at (fractional) timestep t: the discrete
    timestep whose sigma is nearest, as ``(T - 1 - timestep) / T``."""
    sigma = sigmas.t_to_sigma(t)
    timestep = int((sigmas.sigmas - sigma).abs().argmin())
    steps = len(sigmas.sigmas)
    return (steps - 1 - timestep) / steps


class SwitchingDenoiser:
    """A denoiser (x, t) that is `base` until the first model call at switch_at or beyond, then the one
    take_over(calls) returns (calls: the base's model calls so far, where prompt editing goes on)."""

    def __init__(self, base: GuidedDenoiser, take_over, switch_at: float):
        self.current, self.take_over, self.switch_at = base, take_over, switch_at
        self.schedule, self.device = base.schedule, base.device
        self.sigmas = ModelSigmas(base.schedule.alphas_cumprod)
        self.switched = False

    @property
    def parameterization(self):
        return self.current.parameterization

    def _now(self, t) -> GuidedDenoiser:
        if not self.switched and completed_fraction(self.sigmas, float(t)) >= self.switch_at:
            self.current = self.take_over(self.current.calls)
            self.switched = True
        return self.current

    def __call__(self, x, t):
        return self._now(t)(x, t)

    def model_output(self, x, t):
        return self._now(t).model_output(x, t)

    def eps_and_x0(self, x, output, t):
        return self.current.eps_and_x0(x, output, t)


def text_conditioning(conditioning) -> PromptConditioning | None:
    """The PromptConditioning in a Start's cond or uncond (itself, or inside a dict or list), None if none."""
    if isinstance(conditioning, PromptConditioning):
        return conditioning
    values = conditioning.values() if isinstance(conditioning, dict) else \
        conditioning if isinstance(conditioning, (list, tuple)) else ()
    return next((found for found in map(text_conditioning, values) if found is not None), None)


# One refiner kept loaded between runs of the same process (the Python API's and the server's calls), as
# A1111 keeps its checkpoints: (checkpoint, device, dtype, low memory) -> LoadedModel.
_loaded_refiners: dict = {}


def load_refiner(settings: RefinerSettings, base, log):
    """The refiner on the base's device, in its dtype and memory mode; the last one is reused."""
    from ldm.generate import loading  # it imports the generation layer's modules

    key = (settings.checkpoint, str(base.device), base.dtype, base.components is not None)
    if key not in _loaded_refiners:
        _loaded_refiners.clear()
        log(f"loading the refiner {settings.checkpoint}")
        _loaded_refiners[key] = loading.load(settings.checkpoint, None, str(base.device),
                                             PRECISIONS_OF_DTYPES[base.dtype], log=log,
                                             low_memory=base.components is not None, vae="none")
    return _loaded_refiners[key]


def compatibility_problem(base, refiner) -> str | None:
    """Why `refiner` cannot go on with the base's sampling, in one line; None when it can."""
    name = refiner.ckpt_path.name
    if refiner.kind not in REFINABLE_KINDS:
        return f"the refiner {name} is a model for {refiner.kind}: a refiner must be a text-to-image model"
    if base.kind not in REFINABLE_KINDS:
        return f"{base.ckpt_path.name} is a model for {base.kind}: a refiner takes over from text-to-image models only; drop --refiner"
    if (refiner.latent_channels, refiner.downsampling_factor) != (base.latent_channels, base.downsampling_factor):
        return (f"the refiner {name} has latents of {refiner.latent_channels} channels at 1/{refiner.downsampling_factor}"
                f" size, {base.ckpt_path.name} of {base.latent_channels} at 1/{base.downsampling_factor}: use a "
                "refiner of the same family (for SDXL, sd_xl_refiner_1.0)")
    ours, theirs = base.model.alphas_cumprod.float().cpu(), refiner.model.alphas_cumprod.float().cpu()
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-5, atol=0):
        return f"the refiner {name} has another noise schedule than {base.ckpt_path.name}, so it cannot go on with its sampling"
    return None


class RefinerPass:
    """A run's refiner: loaded once, its conditioning cached for the run, switched to in each batch's
    (last) sampling pass by `switching`, given back after it by `finish`."""

    def __init__(self, settings: RefinerSettings, base, job, log):
        self.settings, self.base, self.job, self.log = settings, base, job, log
        self.loaded = load_refiner(settings, base, log)
        problem = compatibility_problem(base, self.loaded)
        if problem:
            raise UserError(problem)
        self.condition = Conditioner(self.loaded, log, job.emphasis, job.clip_skip, size=job.size_conditioning())
        self.took_over = False  # in this run, at least once: the infotext then names the refiner
        self.last_switch: SwitchingDenoiser | None = None
        self.warned = False

    def switching(self, denoiser: GuidedDenoiser, cond, uncond, text_steps: int) -> SwitchingDenoiser:
        """`denoiser` (the base's for a Start with cond and uncond), to be replaced by the refiner's at the switch."""
        def take_over(calls: int) -> GuidedDenoiser:
            if self.base.components is not None:  # --lowmem: the base's UNet goes before the refiner's parts come
                self.base.components.release()
            refined_cond = resolve(self.rewritten(cond), text_steps)
            refined_uncond = resolve(self.rewritten(uncond), text_steps)
            self.loaded.use("model")
            refiner = GuidedDenoiser(self.loaded.model, refined_cond, refined_uncond, self.job.scale,
                                     dtype=self.loaded.dtype, device=self.loaded.device)
            refiner.calls = calls
            self.took_over = True
            return refiner

        self.last_switch = SwitchingDenoiser(denoiser, take_over, self.settings.switch_at)
        return self.last_switch

    def rewritten(self, conditioning) -> PromptConditioning | None:
        """The same prompts (and SDXL size) for the refiner's text encoder."""
        text = text_conditioning(conditioning)
        if text is None:
            return None
        rewritten = self.condition(text.prompts, composable=not text.negative)
        return rewritten if text.size is None else rewritten.resized(text.size)

    def finish(self, steps: int):
        """After a sampling pass: with --lowmem the refiner's UNet is given back (the base's VAE decodes next);
        a refiner that did not take over is said once."""
        if self.loaded.components is not None:
            self.loaded.components.release()
        switch, self.last_switch = self.last_switch, None
        if switch is not None and not switch.switched and not self.warned:
            self.warned = True
            last = math.floor((1 - self.settings.switch_at) * len(switch.sigmas.sigmas) - 1e-9)
            self.log(f"warning: the refiner took no step: no model call of the {steps} steps came down to timestep "
                     f"{last} (--refiner_switch {self.settings.switch_at:g}); use more steps or a lower --refiner_switch")

    def fields(self) -> dict:
        """A1111's infotext fields, once the refiner has taken over."""
        if not self.took_over:
            return {}
        return {"Refiner": f"{self.loaded.name} [{self.loaded.hash}]", "Refiner switch at": self.settings.switch_at}


# --- options -------------------------------------------------------------------------------------------------------
def add_arguments(parser):
    group = parser.add_argument_group("refiner (A1111's: a second model takes over the sampling, e.g. SDXL's)")
    group.add_argument("--refiner", default=None, metavar="CKPT",
                       help="the model that takes over the sampling at --refiner_switch (a checkpoint, a diffusers "
                            "folder or a hub id in the local cache), e.g. sd_xl_refiner_1.0.safetensors")
    group.add_argument("--refiner_switch", type=float, default=None, metavar="FRACTION",
                       help=f"the fraction of the sampling after which the refiner takes over (default {DEFAULT_SWITCH}, "
                            "A1111's)")


def settings_from_args(args) -> RefinerSettings | None:
    """The refiner asked for, None for none; UserError for a bad option (nothing is loaded yet)."""
    refiner, switch_at = getattr(args, "refiner", None), getattr(args, "refiner_switch", None)
    if refiner is None:
        if switch_at is not None:
            raise UserError("--refiner_switch applies to a refiner, and none is given: add --refiner CKPT, or drop it")
        return None
    switch_at = DEFAULT_SWITCH if switch_at is None else switch_at
    problem = switch_problem(switch_at)
    if problem:
        raise UserError(problem)
    from ldm.generate import loading

    path = loading.resolve_checkpoint(str(refiner), log=lambda line: None)
    if not path.exists():
        raise UserError(f"--refiner {refiner}: no such file or folder; give the refiner's checkpoint, e.g. "
                        "sd_xl_refiner_1.0.safetensors")
    return RefinerSettings(str(path), float(switch_at))
