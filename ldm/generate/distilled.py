"""Distilled models: their sampling defaults, picked for the options the user left alone.

- SD-Turbo / SDXL-Turbo (adversarial diffusion distillation) make a picture in 1-4 steps without guidance,
  from timesteps spaced from the top ("trailing"): here Euler a over the SGM Uniform schedule, whose grid
  starts at the model's last timestep as trailing spacing does (1 step: t = 999; 4 steps: 999, 749.25, ...).
- LCM checkpoints and LCM-LoRA: the LCM sampler, 4 steps, no guidance.
At CFG scale 1 the unconditional half of the batch is never computed (the run asks for no negative
conditioning and GuidedDenoiser calls the model on the conditional half only), so these run at the cost of
one UNet call per step.

The kind comes from --turbo / --lcm (--distilled), else from the checkpoint's name (a diffusers folder's or
its hub id's too), a safetensors checkpoint's metadata title, a diffusers folder's LCMScheduler, or an LCM
LoRA among --lora and the prompts' <lora:...> tags. An option counts as left alone when it still holds its
parser default (`DefaultInt`/`DefaultFloat`): --steps 50 given on the command line stays 50.
"""
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ldm.generate.errors import UserError
from ldm.generate.extra_networks import cli_lora, parse_prompt
from ldm.generate.loading import resolve_checkpoint
from ldm.generate.prompts import read_prompt_file
from ldm.safetensors_reader import SafetensorsError, read_header

KINDS = ("auto", "turbo", "lcm", "none")
METADATA_NAME_KEYS = ("modelspec.title", "modelspec.architecture", "ss_output_name", "name", "title")
NAME_PATTERNS = {"turbo": re.compile(r"(?<![a-z])turbo(?![a-z])", re.I), "lcm": re.compile(r"(?<![a-z])lcm(?![a-z])", re.I)}
MAX_IMG2IMG_STEPS = 4  # a distilled img2img takes enough steps that strength x steps makes at least one


@dataclass(frozen=True)
class Defaults:
    label: str
    steps: int
    scale: float
    sampler: str
    schedule: str | None  # None: the sampler's own


DEFAULTS = {"turbo": Defaults("SD-Turbo", 1, 1.0, "euler_a", "sgm_uniform"),
            "lcm": Defaults("LCM", 4, 1.0, "lcm", None)}


class DefaultInt(int):
    """An option's parser default, told apart from the same number given by the user."""


class DefaultFloat(float):
    """An option's parser default, told apart from the same number given by the user."""


def parser_default(value):
    return DefaultInt(value) if isinstance(value, int) else DefaultFloat(value)


def is_parser_default(value) -> bool:
    return isinstance(value, (DefaultInt, DefaultFloat))


def add_arguments(group):
    group.add_argument("--distilled", type=str.lower, choices=KINDS, default="auto",
                       help="a distilled model's defaults for the options not given: turbo (SD-Turbo, SDXL-Turbo: 1 "
                            "step, CFG 1, Euler a, SGM Uniform), lcm (LCM and LCM-LoRA: 4 steps, CFG 1, LCM); auto "
                            "(default): by the checkpoint's or a LoRA's name and metadata; none: never")
    group.add_argument("--turbo", action="store_const", const="turbo", dest="distilled", help="same as --distilled turbo")
    group.add_argument("--lcm", action="store_const", const="lcm", dest="distilled", help="same as --distilled lcm")


def _named(kind_text: str) -> str | None:
    return next((kind for kind, pattern in NAME_PATTERNS.items() if pattern.search(kind_text)), None)


def checkpoint_kind(ckpt: Path) -> tuple[str, str] | None:
    """(kind, why) for a distilled checkpoint (a file, or a diffusers folder), None for any other."""
    ckpt = Path(ckpt)
    names = [ckpt.name]
    if ckpt.is_dir():
        if ckpt.parent.name == "snapshots":  # the Hugging Face cache: models--org--name/snapshots/<hash>
            names.append(ckpt.parent.parent.name)
        try:
            scheduler = json.loads((ckpt / "scheduler" / "scheduler_config.json").read_text())
        except (OSError, ValueError):
            scheduler = {}
        if isinstance(scheduler, dict) and scheduler.get("_class_name") == "LCMScheduler":
            return "lcm", f"{ckpt.name}'s scheduler is an LCMScheduler"
    for name in names:
        if kind := _named(name):
            return kind, f"the name {name} says {DEFAULTS[kind].label}"
    if ckpt.is_file() and ckpt.suffix.lower() == ".safetensors":
        try:
            metadata = read_header(ckpt).metadata
        except (OSError, SafetensorsError):
            return None  # the loader names what is wrong with it
        for key in METADATA_NAME_KEYS:
            if isinstance(metadata.get(key), str) and (kind := _named(metadata[key])):
                return kind, f"{ckpt.name}'s metadata ({key}: {metadata[key][:60]!r}) says {DEFAULTS[kind].label}"
    return None


def lora_kind(lora_names) -> tuple[str, str] | None:
    """("lcm", why) when one of the LoRAs is named as an LCM-LoRA."""
    for name in lora_names:
        if NAME_PATTERNS["lcm"].search(name):
            return "lcm", f"the LoRA name {name} says LCM"
    return None


def lora_names(args, prompts) -> list[str]:
    """The names of --lora's files and of the prompts' and negative prompt's <lora:NAME> tags."""
    names = []
    for value in getattr(args, "lora", None) or ():
        path = value[0] if isinstance(value, tuple) else cli_lora(value)[0] if isinstance(value, str) else value
        names.append(Path(path).stem)
    for prompt in [*prompts, getattr(args, "negative_prompt", "")]:
        try:
            names += [tag.name for tag in parse_prompt(prompt).loras]
        except UserError:
            pass  # the run's own check of the tags says what is wrong
    return names


def detected_kind(args, ckpt: Path | None, prompts) -> tuple[str, str] | None:
    """(kind, why) from --distilled, or detected when it is auto; None for a model that is not distilled."""
    asked = getattr(args, "distilled", "auto") or "auto"
    if asked == "none":
        return None
    if asked != "auto":
        return asked, f"--distilled {asked}"
    return (checkpoint_kind(ckpt) if ckpt is not None else None) or lora_kind(lora_names(args, prompts))


def apply_defaults(args, ckpt: Path | None, prompts, log=print) -> str | None:
    """Set the distilled model's steps, CFG scale, sampler and schedule on the options left at their defaults;
    returns the kind (None: nothing set), and says in one line what it set."""
    found = detected_kind(args, ckpt, prompts)
    if found is None:
        return None
    kind, why = found
    defaults, applied = DEFAULTS[kind], []
    if is_parser_default(args.ddim_steps):
        steps = defaults.steps
        strength = getattr(args, "strength", None)
        if strength:  # img2img runs int(strength x steps) steps: at least one
            steps = max(steps, min(math.ceil(1 / strength), MAX_IMG2IMG_STEPS))
        args.ddim_steps = steps
        applied.append(f"--steps {steps}")
    if is_parser_default(args.scale):
        args.scale = defaults.scale
        applied.append(f"--scale {defaults.scale:g}")
    if args.sampler is None and not getattr(args, "sampler_flags", None):
        args.sampler = defaults.sampler
        applied.append(f"--sampler {defaults.sampler}")
        if defaults.schedule and getattr(args, "schedule", "automatic") in (None, "automatic"):
            args.schedule = defaults.schedule
            applied.append(f"--schedule {defaults.schedule}")
    what = ", ".join(applied) if applied else "nothing: every one of its options was given"
    log(f"{why}: {defaults.label} defaults {what} (options given win; --distilled none turns this off)")
    return kind


def apply_to_args(args, batches: list | None, log=print) -> str | None:
    """apply_defaults for a run's options: the checkpoint of --ckpt (none in the Python API, whose model is
    loaded already), the prompts of `batches`, --prompt or --from-file."""
    ckpt = getattr(args, "ckpt", None)
    ckpt = resolve_checkpoint(ckpt, log=lambda line: None) if hasattr(args, "ckpt") else None
    if batches is not None:
        prompts = [prompt for batch in batches for prompt in batch]
    else:
        prompts = [args.prompt]
        if getattr(args, "from_file", None):
            try:
                prompts = read_prompt_file(args.from_file)
            except UserError:
                pass  # prompt_batches says what is wrong with it
    return apply_defaults(args, ckpt, prompts, log)
