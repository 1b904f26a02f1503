"""Command-line options every generation script shares, with the CompVis names and defaults and the
Stability spellings as aliases, and the checks that turn bad input into one clear line."""
import argparse
import math
import signal
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ldm.generate import images, loading, memory
from ldm.generate.errors import UserError
from ldm.generate.output import OutputFolder, SaveFailed
from ldm.generate.prompts import MAX_IMAGES, prompt_batches
from ldm.generate.rng import RNG_SOURCES
from ldm.generate.run import Job
from ldm.models.diffusion import samplers
from ldm.placement import PRECISIONS, resolve_dtype

MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes
MAX_TIMESTEPS = 1000  # every SD schedule's; the loaded model's own is checked again after loading
SAMPLER_FLAGS = {"plms": "--plms", "dpm": "--dpm_solver"}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the problem and where to look), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_model_arguments(parser, default_config=None):
    group = parser.add_argument_group("model")
    group.add_argument("--config", default=default_config,
                       help="model YAML; default: chosen from the checkpoint's keys (or <ckpt>.yaml beside it)")
    group.add_argument("--ckpt", default=None,
                       help="checkpoint (.ckpt or .safetensors); default models/ldm/stable-diffusion-v1/model.ckpt, "
                            "or the embedded model when that holds nothing")
    group.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    group.add_argument("--precision", default="autocast", choices=PRECISIONS,
                       help="full = fp32; autocast = fp16 on CUDA, fp32 on a CPU; bf16 on either")
    group.add_argument("--bf16", action="store_const", const="bf16", dest="precision", help="same as --precision bf16")
    group.add_argument("--use_ema", action="store_true", help="use the checkpoint's EMA weights (model_ema.*)")
    group.add_argument("--lowmem", "--medvram", dest="lowmem", action="store_true",
                       help="keep one of text encoder, UNet and VAE in memory at a time, converted from the "
                            "checkpoint when used: SD 1.x peaks near 4 instead of 6 GB (1-2 s more a batch)")
    group.add_argument("--trust_config", action="store_true",
                       help="let the model YAML build any class or call it names (your own research code); by "
                            "default only this project's classes (ldm.*) and a short allow-list are built")


def add_sampling_arguments(parser, steps=50, scale=7.5, n_samples=3, n_iter=2):
    group = parser.add_argument_group("sampling")
    group.add_argument("--prompt", default="a painting of a virus monster playing guitar", help="the prompt")
    group.add_argument("--negative_prompt", default="", help="what to steer away from (replaces the empty prompt)")
    group.add_argument("--from-file", dest="from_file", default=None,
                       help="a text file, one prompt a line (blank lines skipped), in batches of --n_samples")
    group.add_argument("--repeat", type=int, default=1, help="repeat each prompt of --from-file this many times")
    group.add_argument("--ddim_steps", "--steps", dest="ddim_steps", type=int, default=steps, help="sampling steps")
    group.add_argument("--sampler", default=None,
                       help=f"the sampler, any case: {samplers.sampler_choices()}; keys such as euler_a or dpmpp_2m, "
                            "and A1111's names with a schedule such as \"DPM++ 2M Karras\", too (default DDIM)")
    group.add_argument("--schedule", default="automatic",
                       help=f"the k-samplers' sigma schedule (A1111's Schedule type), any case: "
                            f"{', '.join(samplers.SCHEDULE_NAMES)}; automatic = the sampler's own default")
    group.add_argument("--plms", action="append_const", const="plms", dest="sampler_flags", help="PLMS sampler")
    group.add_argument("--dpm_solver", "--dpm", action="append_const", const="dpm", dest="sampler_flags",
                       help="DPM-Solver++ (2M) sampler")
    group.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    group.add_argument("--scale", type=float, default=scale, help="classifier-free guidance scale")
    group.add_argument("--n_samples", type=int, default=n_samples, help="batch size")
    group.add_argument("--n_iter", type=int, default=n_iter, help="batches per prompt")
    group.add_argument("--seed", type=int, default=42,
                       help="seeds one CPU generator, 0..2^64-1: the same images on every device")
    group.add_argument("--rng", type=str.lower, choices=RNG_SOURCES, default="cpu",
                       help="where the seed's random numbers come from (A1111's RNG setting, any case): cpu = "
                            "torch's CPU generator; nv = the numbers torch.randn gives on an NVIDIA GPU, computed "
                            "on the CPU: a seed shared from an NVIDIA card (A1111's GPU or NV) makes its noise")
    group.add_argument("--fixed_code", action="store_true", help="one start noise shared by every batch")


def add_output_arguments(parser, outdir):
    group = parser.add_argument_group("output")
    group.add_argument("--outdir", default=outdir, help="output folder")
    group.add_argument("--skip_grid", action="store_true", help="do not save the grid")
    group.add_argument("--skip_save", action="store_true", help="do not save the single images")
    group.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    group.add_argument("--no_watermark", action="store_true", help="do not embed the invisible watermark")


def chosen_sampler(args) -> str:
    """The registry key of the sampler asked for (--sampler, --plms, --dpm_solver); default DDIM."""
    return chosen_sampler_and_schedule(args)[0]


def chosen_sampler_and_schedule(args) -> tuple[str, str]:
    """(registry key, schedule) from --sampler, the old flags and --schedule, checked against each other."""
    flags = list(dict.fromkeys(args.sampler_flags or []))  # each flag once, in the order given
    if len(flags) > 1:
        raise UserError(f"{SAMPLER_FLAGS[flags[0]]} and {SAMPLER_FLAGS[flags[1]]} ask for two samplers: give one of them")
    flag = flags[0] if flags else None
    sampler, named_schedule = flag or "ddim", None
    if args.sampler:
        try:
            sampler, named_schedule = samplers.resolve_sampler(args.sampler)
        except ValueError as error:
            raise UserError(f"--sampler: {error}") from None
        if flag and sampler != flag:
            raise UserError(f"--sampler {args.sampler} contradicts {SAMPLER_FLAGS[flag]}: give one of them")
    schedule = getattr(args, "schedule", "automatic") or "automatic"
    try:
        schedule = samplers.resolve_schedule(schedule)
    except ValueError as error:
        raise UserError(f"--schedule: {error}") from None
    if named_schedule and schedule not in ("automatic", named_schedule):
        raise UserError(f"--sampler {args.sampler!r} names the {named_schedule} schedule, --schedule {schedule} "
                        "another: give one of them")
    if schedule != "automatic" and not samplers.REGISTRY[sampler].is_k_sampler:
        raise UserError(f"--schedule applies to the k-diffusion samplers; {samplers.REGISTRY[sampler].display_name} "
                        "walks its own timesteps: drop --schedule or pick a sampler such as \"DPM++ 2M\"")
    return sampler, named_schedule or schedule


def check_sampling_arguments(args):
    """Every sampling option in range, before anything is loaded."""
    for name in ("ddim_steps", "n_samples", "n_iter", "repeat"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    check_steps(args.ddim_steps, MAX_TIMESTEPS, "the Stable Diffusion schedules")
    for name in ("n_samples", "n_iter"):
        if getattr(args, name) > MAX_IMAGES:
            raise UserError(f"--{name} {getattr(args, name)} asks for more than the {MAX_IMAGES} images one run "
                            "makes: use fewer, or several runs")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed {args.seed} is outside 0..{MAX_SEED}: the generator takes a 64-bit seed")
    for flag, value in (("--scale", args.scale), ("--ddim_eta", args.ddim_eta)):
        if not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number (got {value})")
    if args.ddim_eta < 0:
        raise UserError(f"--ddim_eta must be 0 or more (got {args.ddim_eta})")
    sampler, _ = chosen_sampler_and_schedule(args)
    if args.ddim_eta and sampler != "ddim":
        raise UserError(f"--ddim_eta applies to the DDIM sampler only; drop it or use --sampler ddim")
    if args.n_rows < 0:
        raise UserError(f"--n_rows must be 0 (one row per batch) or more (got {args.n_rows})")


def check_steps(steps: int, timesteps: int, schedule: str):
    if steps > timesteps:
        raise UserError(f"--ddim_steps {steps} is more than the {timesteps} timesteps of {schedule}: "
                        f"use 1..{timesteps}")


def check_dimension(flag: str, value: int, multiple: int = 8):
    """A size in pixels: positive and a multiple of `multiple`; the message suggests the nearest that are."""
    if value > 0 and value % multiple == 0:
        return
    if value < multiple:
        suggestion = f"use {multiple} or more"
    else:
        lower = value // multiple * multiple
        suggestion = f"use {lower} or {lower + multiple}"
    raise UserError(f"{flag} {value} is not a positive multiple of {multiple}: {suggestion}")


def run_cli(main, interrupted="interrupted by Ctrl-C before sampling started: nothing was saved"):
    """Run a script's main() so that what goes wrong is one line on stderr: a UserError exits with status
    2, a file that could not be written (SaveFailed) with 1, Ctrl-C outside the sampling loop (which
    handles its own) with 130 and the line `interrupted`."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, KeyboardInterrupt as below
    if hasattr(signal, "SIGXFSZ"):  # past a file-size limit a write then fails with EFBIG instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except SaveFailed as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)


def prepare_output(args):
    """The checks every script makes before loading anything: sampling options, prompts, output folder.

    Returns (sampler, prompt batches, output folder); the folder can be written and is created only by the
    first file saved, so a run that fails before leaves no empty folders.
    """
    check_sampling_arguments(args)
    sampler = chosen_sampler(args)
    batches = prompt_batches(args.prompt, args.from_file, args.n_samples, args.repeat)
    folder = OutputFolder(args.outdir, save_samples=not args.skip_save)
    folder.check_writable()
    return sampler, batches, folder


def job_from_args(args, sampler: str, batches: list, height: int, width: int) -> Job:
    """The shared run settings from the shared options; height and width are the output's size."""
    return Job(
        batches=batches, negative_prompt=args.negative_prompt, n_iter=args.n_iter, steps=args.ddim_steps,
        sampler=sampler, schedule=chosen_sampler_and_schedule(args)[1], scale=args.scale, eta=args.ddim_eta, height=height, width=width, seed=args.seed,
        rng=args.rng, fixed_code=args.fixed_code, n_rows=args.n_rows, save_grid=not args.skip_grid,
        watermark=not args.no_watermark,
    )


def check_run_before_loading(args, batches: list, size: tuple[int, int] | None = None, upscaled=False):
    """What can be checked of the run before its model is loaded: the number of images, and its memory.

    size: the output's (height, width), None (or a None side) for the model's native size; with `upscaled`, the input's
    size, which the model multiplies by its downsampling factor. The architecture is the model YAML's
    (--config, or the one beside the checkpoint), SD 1.x's when neither is there: job_for_model checks
    again with the model's own once it is loaded.
    """
    images = args.n_iter * sum(len(batch) for batch in batches)
    if images > MAX_IMAGES:
        raise UserError(f"--n_iter {args.n_iter} x {images // args.n_iter} prompts is {images} images, more than "
                        f"the {MAX_IMAGES} one run makes: use fewer, or several runs")
    device = loading.resolve_device(args.device)
    ckpt = loading.resolve_checkpoint(args.ckpt, log=lambda line: None)  # load_from_args says it
    config = config_before_loading(args.config, ckpt)
    architecture = memory.Architecture.from_config(config)
    if config:
        check_steps(args.ddim_steps, architecture.timesteps, f"{ckpt.name}'s schedule")
    height, width = (side or architecture.native_size for side in (size or (None, None)))
    if upscaled:
        height, width = height * architecture.factor, width * architecture.factor
    itemsize = resolve_dtype(args.precision, device).itemsize
    run = memory.Run(architecture, memory.Weights.of_file(ckpt, itemsize), max(len(batch) for batch in batches),
                     height, width, itemsize, guidance=args.scale != 1.0, lowmem=args.lowmem)
    memory.check_fits(run, device, _size_advice(args, architecture.factor if upscaled else 1))


def config_before_loading(config, ckpt) -> dict:
    """The model YAML as plain data (nothing built from it), or {} where there is none or it cannot be read:
    the loader then names the problem."""
    path = Path(config) if config else Path(ckpt).with_suffix(".yaml")
    try:
        return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}
    except Exception:  # noqa: BLE001 - any unreadable YAML: the loader refuses it with the reason
        return {}


def _size_advice(args, scale: int):
    """A function (height, width) -> the options that ask for that output size."""
    if getattr(args, "init_img", None) is None:
        return lambda height, width: f"--H {height} --W {width}"
    return lambda height, width: f"--downscale_init --max_init_pixels {height * width // scale ** 2}"


def job_for_model(args, sampler: str, batches: list, loaded, height: int, width: int, upscaled=False) -> Job:
    """job_from_args, checked against the loaded model: its number of timesteps and the run's memory
    (`upscaled`: the output is the input times the model's downsampling factor)."""
    check_steps(args.ddim_steps, loaded.model.num_timesteps, f"{loaded.ckpt_path.name}'s schedule")
    architecture = memory.Architecture.from_config(loaded.config)
    itemsize = loaded.dtype.itemsize
    run = memory.Run(architecture, memory.Weights.of_model(loaded.model, itemsize), max(len(b) for b in batches),
                     height, width, itemsize, guidance=args.scale != 1.0, lowmem=args.lowmem, weights_loaded=True)
    memory.check_fits(run, loaded.device, _size_advice(args, architecture.factor if upscaled else 1))
    return job_from_args(args, sampler, batches, height, width)


def check_strength(strength: float):
    if not 0.0 <= strength <= 1.0:  # NaN too
        raise UserError(f"--strength {strength} is outside [0, 1]: 0 keeps the input image, 1 ignores it")


def add_image_arguments(parser, strength: float | None, help_image="the input picture (any format PIL reads)"):
    """--init-img, and --strength with its default unless strength is None (the upscaler has none)."""
    group = parser.add_argument_group("input picture")
    group.add_argument("--init-img", "--init_img", dest="init_img", required=True, metavar="PATH", help=help_image)
    if strength is not None:
        group.add_argument("--strength", type=float, default=strength,
                           help="how much of the input is redrawn, 0..1: int(strength x steps) steps are run "
                                "(0 = the input's reconstruction, 1 = the input ignored)")
    group.add_argument("--max_init_pixels", type=int, default=images.MAX_INIT_PIXELS, metavar="PIXELS",
                       help=f"refuse input pictures (and masks, depth maps) of more pixels than this (default "
                            f"{images.MAX_INIT_PIXELS}, 4096x4096), or shrink them with --downscale_init")
    group.add_argument("--downscale_init", action="store_true",
                       help="shrink an input picture over --max_init_pixels to fit, keeping its aspect ratio")
    return group


def check_image_arguments(args):
    if args.max_init_pixels < 64:
        raise UserError(f"--max_init_pixels must be at least 64 (8x8), got {args.max_init_pixels}")
    if getattr(args, "strength", None) is not None:
        check_strength(args.strength)


def image_limits(args) -> "images.Limits":
    return images.Limits(args.max_init_pixels, args.downscale_init)
