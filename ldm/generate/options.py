"""Command-line options every generation script shares, with the CompVis names and defaults and the
Stability spellings as aliases, and the checks that turn bad input into one clear line."""
import argparse
import math
import signal
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ldm.generate import control, distilled, images, infotext, loading, memory, refiner, sharding, speedups
from ldm.generate.errors import UserError
from ldm.modules.prompt_encoding import EMPHASIS_MODES
from ldm.generate.extra_networks import DEFAULT_LORA_DIR, PromptNetworks
from ldm.generate.output import OutputFolder, SaveFailed
from ldm.generate.prompts import MAX_IMAGES, prompt_batches
from ldm.generate.rng import RANDOM_SEED, RNG_SOURCES, SEED_MODES
from ldm.generate.run import Job
from ldm.models.diffusion import samplers
from ldm.models.diffusion.sampler_options import SamplerOptions
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
                       help="full = fp32; autocast = fp16 on CUDA, fp32 on a CPU; bf16 on either; int8 = the "
                            "UNet's layers on int8 kernels on a CPU (slightly changes the picture)")
    group.add_argument("--bf16", action="store_const", const="bf16", dest="precision", help="same as --precision bf16")
    group.add_argument("--use_ema", action="store_true", help="use the checkpoint's EMA weights (model_ema.*)")
    group.add_argument("--vae", default=None, metavar="PATH",
                       help="replace the checkpoint's autoencoder by this VAE file (.pt, .ckpt or .safetensors, e.g. "
                            "vae-ft-mse-840000-ema-pruned); default: <ckpt>.vae.pt/.vae.ckpt/.vae.safetensors beside "
                            "the checkpoint when there is one (as A1111); none = the checkpoint's own; taesd (taesdxl "
                            "for SDXL), a TAESD file or AutoencoderTiny folder: the tiny autoencoder, decoding in a "
                            "fraction of the time with a softer picture (files from models/VAE-taesd)")
    group.add_argument("--embeddings_dir", default=None, metavar="DIR",
                       help="textual-inversion embeddings (.pt, .bin, .safetensors; subfolders too), each used where "
                            "its file name appears in a prompt, as A1111's; default embeddings/ when it exists")
    group.add_argument("--skip_bad_embeddings", action="store_true",
                       help="run without the embedding files that cannot be read (corrupt, pickled code) instead "
                            "of stopping; files for another model family are always skipped")
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
    group.add_argument("--ddim_steps", "--steps", dest="ddim_steps", type=int, default=distilled.parser_default(steps),
                       help="sampling steps")
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
    add_sampler_option_arguments(group)
    distilled.add_arguments(group)
    speedups.add_arguments(group)
    group.add_argument("--scale", type=float, default=distilled.parser_default(float(scale)),
                       help="classifier-free guidance scale (1: no guidance, one UNet call per step)")
    group.add_argument("--clip_skip", type=int, default=1,
                       help="A1111's clip skip: 1 = the text encoder's last layer, 2 = the one before it (SD 1.x; "
                            "SD 2.x keeps its configured layer, as in A1111)")
    group.add_argument("--emphasis", type=str.lower, default="original", choices=EMPHASIS_MODES,
                       help="A1111's Emphasis, any case: how (word:1.2) weights apply; original = weighted then "
                            "rescaled to the original mean, 'no norm' = weighted only")
    group.add_argument("--n_samples", type=int, default=n_samples, help="batch size")
    group.add_argument("--n_iter", type=int, default=n_iter, help="batches per prompt")
    group.add_argument("--seed", type=int, default=42,
                       help="0..2^64-1, or -1 for a random one (written to the infotexts); image k of the run gets "
                            "seed + k (see --seed_mode): the same images on every device")
    group.add_argument("--rng", type=str.lower, choices=RNG_SOURCES, default="cpu",
                       help="where the seed's random numbers come from (A1111's RNG setting, any case): cpu = "
                            "torch's CPU generator; nv = the numbers torch.randn gives on an NVIDIA GPU, computed "
                            "on the CPU: a seed shared from an NVIDIA card (A1111's GPU or NV) makes its noise")
    group.add_argument("--fixed_code", action="store_true", help="one start noise shared by every batch")
    infotext.add_from_png_argument(group)
    add_seed_arguments(group)
    add_size_conditioning_arguments(parser)
    add_lora_arguments(parser)
    refiner.add_arguments(parser)


SIZE_CONDITIONING_FLAGS = {"original_size": "--original_size", "crop_coords": "--crop_coords",
                           "target_size": "--target_size"}


def add_size_conditioning_arguments(parser):
    group = parser.add_argument_group("SDXL size conditioning (what the model is told of the picture, in pixels)")
    group.add_argument("--original_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                       help="the size of the picture the output is to look cut from (default: the output's size)")
    group.add_argument("--crop_coords", type=int, nargs=2, metavar=("TOP", "LEFT"), default=None,
                       help="where the output's crop starts in that picture (default: 0 0, uncropped)")
    group.add_argument("--target_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                       help="the size asked for (default: the output's size)")


def check_size_conditioning(args, loaded):
    """SDXL's size options: refused for other models, which have no such input, and out of range."""
    given = [flag for name, flag in SIZE_CONDITIONING_FLAGS.items() if getattr(args, name, None) is not None]
    if given and not hasattr(loaded.model, "native_size_conditioning"):
        raise UserError(f"{given[0]} applies to SDXL models only, and {loaded.ckpt_path.name} is not one: drop it")
    for name in ("original_size", "target_size"):
        if getattr(args, name, None) is not None and min(getattr(args, name)) < 1:
            raise UserError(f"{SIZE_CONDITIONING_FLAGS[name]} takes a height and a width of at least 1 pixel "
                            f"(got {' '.join(map(str, getattr(args, name)))})")
    if getattr(args, "crop_coords", None) is not None and min(args.crop_coords) < 0:
        raise UserError(f"--crop_coords takes a top and a left of 0 or more (got {args.crop_coords[0]} "
                        f"{args.crop_coords[1]})")


def add_lora_arguments(parser):
    """LoRAs: A1111's <lora:name:weight> tags in the prompts (ldm.generate.extra_networks), and --lora."""
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora_dir", default=str(DEFAULT_LORA_DIR), metavar="FOLDER",
                       help="where <lora:NAME:WEIGHT> in a prompt finds NAME.safetensors (.pt, .ckpt; subfolders too); "
                            "<lora:NAME:TE:UNET> weighs the text encoder and the UNet apart, as A1111")
    group.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]",
                       help="apply this LoRA file to every prompt, at WEIGHT (default 1.0); repeatable")
    group.add_argument("--skip_bad_lora", action="store_true",
                       help="a LoRA that is missing, unreadable or for another model: one line, and the run goes on "
                            "without it (default: exit 2 before sampling)")


def add_seed_arguments(group):
    """A1111's seed convention and its variation seeds (ldm.generate.rng.RunSeeds, ImageNoise)."""
    group.add_argument("--seed_mode", type=str.lower, choices=SEED_MODES, default="a1111",
                       help="a1111 (default): image k of the run has seed + k and its own generator, so that the seed "
                            "in its infotext alone makes it again; batch: the originals' one generator for the run")
    group.add_argument("--subseed", type=int, default=RANDOM_SEED,
                       help="A1111's variation seed (default -1: a random one), mixed in at --subseed_strength; "
                            "image k gets subseed + k")
    group.add_argument("--subseed_strength", type=float, default=0.0,
                       help="0..1: the start noise slerped from the seed's (0) to the variation seed's (1)")
    group.add_argument("--seed_resize_from_h", type=int, default=0, metavar="PIXELS",
                       help="with --seed_resize_from_w: make the seed's noise at this size and paste it at the "
                            "centre, so that a seed keeps its picture at a new size (A1111's; 0 = off)")
    group.add_argument("--seed_resize_from_w", type=int, default=0, metavar="PIXELS", help="see --seed_resize_from_h")
    group.add_argument("--ensd", type=int, default=0,
                       help="A1111's eta noise seed delta: the sampler's noise after the start noise comes from "
                            "seed + ensd (31337 in many shared A1111 settings; default 0)")


def add_sampler_option_arguments(group):
    """A1111's sampler parameters; each is passed to the samplers whose function takes it (see --help)."""
    group.add_argument("--eta", type=float, default=1.0,
                       help="the ancestral and SDE samplers' share of fresh noise at each step, 0 = none (A1111's Eta; "
                            "default 1.0, A1111's); DDIM's eta is the separate --ddim_eta, as in A1111")
    group.add_argument("--s_churn", type=float, default=0.0,
                       help="Karras' churn for Euler, Heun and DPM2: noise added back before each step (A1111's "
                            "Sigma churn; default 0 = none)")
    group.add_argument("--s_tmin", type=float, default=0.0,
                       help="churn applies at sigmas from --s_tmin to --s_tmax only (A1111's Sigma tmin; default 0)")
    group.add_argument("--s_tmax", type=float, default=math.inf,
                       help="see --s_tmin (A1111's Sigma tmax; default, and 0 as in A1111: infinity)")
    group.add_argument("--s_noise", type=float, default=1.0,
                       help="the scale of the fresh noise of churn and of the ancestral and SDE samplers (A1111's "
                            "Sigma noise; default 1.0)")
    group.add_argument("--sigma_quantization", action="store_true",
                       help="k-samplers: round each sigma to the nearest model timestep (A1111's quantization "
                            "setting); by default timesteps are fractional, interpolated between them")


def sampler_options_from_args(args) -> SamplerOptions:
    return SamplerOptions(eta=args.eta, s_churn=args.s_churn, s_tmin=args.s_tmin, s_tmax=args.s_tmax or math.inf,
                          s_noise=args.s_noise)


def check_sampler_options(args, sampler: str):
    """--eta, --s_* and --sigma_quantization in range, and used by the chosen sampler when not at their defaults."""
    for name in ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise"):
        value = getattr(args, name)
        if math.isnan(value) or (math.isinf(value) and name != "s_tmax") or value < 0:
            raise UserError(f"--{name} must be a finite number, 0 or more (got {value})")
    options = sampler_options_from_args(args)
    if options.s_tmax < options.s_tmin:
        raise UserError(f"--s_tmax {args.s_tmax} is below --s_tmin {args.s_tmin}: churn would never apply")
    problem = samplers.unused_options_problem(sampler, options, args.sigma_quantization, prefix="--")
    if problem:
        raise UserError(problem)


def add_output_arguments(parser, outdir):
    group = parser.add_argument_group("output")
    group.add_argument("--outdir", default=outdir, help="output folder")
    group.add_argument("--skip_grid", action="store_true", help="do not save the grid")
    group.add_argument("--skip_save", action="store_true", help="do not save the single images")
    group.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    group.add_argument("--no_watermark", action="store_true", help="do not embed the invisible watermark")
    group.add_argument("--resume", action="store_true",
                       help="note every file in <outdir>/manifest.jsonl and, when the manifest is there, make only "
                            "the batches it does not list as complete (after a crash, a pre-emption or Ctrl-C): the "
                            "files are those of an uninterrupted run. Under torchrun the manifest is always written; "
                            "pass --resume there too to continue one (and for torchrun's --max_restarts)")


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
    check_seed_arguments(args)
    for flag, value in (("--scale", args.scale), ("--ddim_eta", args.ddim_eta)):
        if not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number (got {value})")
    if args.ddim_eta < 0:
        raise UserError(f"--ddim_eta must be 0 or more (got {args.ddim_eta})")
    sampler, _ = chosen_sampler_and_schedule(args)
    if args.ddim_eta and sampler != "ddim":
        raise UserError(f"--ddim_eta applies to the DDIM sampler only; drop it or use --sampler ddim")
    check_sampler_options(args, sampler)
    if args.n_rows < 0:
        raise UserError(f"--n_rows must be 0 (one row per batch) or more (got {args.n_rows})")
    if args.clip_skip < 1:
        raise UserError(f"--clip_skip must be at least 1 (1 = the last layer; got {args.clip_skip})")


def check_seed_arguments(args):
    for flag, value in (("--seed", args.seed), ("--subseed", args.subseed)):
        if value != RANDOM_SEED and not 0 <= value <= MAX_SEED:
            raise UserError(f"{flag} {value} is outside 0..{MAX_SEED} (or -1 for a random one): the generator "
                            "takes a 64-bit seed")
    if not 0.0 <= args.subseed_strength <= 1.0:  # NaN too
        raise UserError(f"--subseed_strength {args.subseed_strength} is outside [0, 1]: 0 is the seed's noise, "
                        "1 the variation seed's")
    if args.subseed != RANDOM_SEED and not args.subseed_strength:
        raise UserError(f"--subseed {args.subseed} has no effect at --subseed_strength 0: give a strength above 0, "
                        "or drop --subseed")
    resize = (args.seed_resize_from_h, args.seed_resize_from_w)
    if any(resize) and not all(side > 0 for side in resize):
        raise UserError("--seed_resize_from_h and --seed_resize_from_w go together: give both (the size in pixels "
                        "the seed was first used at), or neither")
    if all(resize):
        for flag, side in zip(("--seed_resize_from_h", "--seed_resize_from_w"), resize):
            check_dimension(flag, side)
    if args.ensd < 0:
        raise UserError(f"--ensd must be 0 or more (got {args.ensd})")
    if args.seed_mode == "batch":
        asked = [flag for flag, used in (("--subseed_strength", args.subseed_strength), ("--seed_resize_from_h/w",
                 any(resize)), ("--ensd", args.ensd)) if used]
        if asked:
            raise UserError(f"{' and '.join(asked)} work on each image's own generator: drop "
                            f"{'them' if len(asked) > 1 else 'it'}, or drop --seed_mode batch")


def check_seed_range(args, images: int):
    """The seeds the run's images will have (seed + k, subseed + k, and + ensd) fit a 64-bit generator."""
    if args.seed_mode != "a1111":
        return
    for flag, seed, extra in (("--seed", args.seed, args.ensd), ("--subseed", args.subseed, 0)):
        if seed != RANDOM_SEED and seed + images - 1 + extra > MAX_SEED:
            raise UserError(f"{flag} {seed} is too large for {images} images: image k gets {flag.lstrip('-')} + k"
                            f"{' + --ensd' if extra else ''}, which must stay at most {MAX_SEED}")


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


def prepare_run(args, batches: list | None = None, log=print):
    """The checks every run makes before loading anything: sampling options, prompts, LoRAs, seeds.

    Returns (sampler, prompt batches); batches: the caller's own (the Python API's), None for --prompt's or
    --from-file's.
    """
    distilled.apply_to_args(args, batches, log)  # a turbo or LCM model's defaults for the options not given
    check_sampling_arguments(args)
    control.prepare_args(args)  # the ControlNet units: bad counts or values before anything is loaded
    sampler = chosen_sampler(args)
    if batches is None:
        batches = prompt_batches(args.prompt, args.from_file, args.n_samples, args.repeat)
    args.lora_networks = PromptNetworks.from_args(args, log)
    args.lora_networks.check(batches, args.negative_prompt)  # a missing or bad LoRA: before loading the model
    args.refiner_settings = refiner.settings_from_args(args)
    args.speedups = speedups.from_args(args)
    check_seed_range(args, args.n_iter * sum(len(batch) for batch in batches))
    return sampler, batches


def prepare_output(args):
    """prepare_run, and the output folder: returns (sampler, prompt batches, output folder); the folder can
    be written and is created only by the first file saved, so a run that fails before leaves no empty folders.
    """
    sampler, batches = prepare_run(args)
    folder = OutputFolder(args.outdir, save_samples=not args.skip_save, resume=args.resume)
    folder.check_writable()
    sharding.start(args, folder)  # under torchrun: this process's share, device and threads
    return sampler, batches, folder


def job_from_args(args, sampler: str, batches: list, height: int, width: int) -> Job:
    """The shared run settings from the shared options; height and width are the output's size."""
    return Job(
        batches=batches, negative_prompt=args.negative_prompt, n_iter=args.n_iter, steps=args.ddim_steps,
        sampler=sampler, schedule=chosen_sampler_and_schedule(args)[1], scale=args.scale, eta=args.ddim_eta,
        sampler_options=sampler_options_from_args(args), quantize=args.sigma_quantization, height=height, width=width, seed=args.seed,
        rng=args.rng, **seed_fields(args), fixed_code=args.fixed_code, n_rows=args.n_rows, save_grid=not args.skip_grid,
        watermark=not args.no_watermark, networks=getattr(args, "lora_networks", None), clip_skip=args.clip_skip,
        emphasis=args.emphasis, **size_conditioning_fields(args), **control.job_fields(args),
        refiner=getattr(args, "refiner_settings", None), speedups=getattr(args, "speedups", None) or speedups.Speedups(),
    )


def size_conditioning_fields(args) -> dict:
    """The Job's SDXL size fields from --original_size, --crop_coords and --target_size (as tuples)."""
    return {name: tuple(getattr(args, name)) for name in SIZE_CONDITIONING_FLAGS if getattr(args, name, None)}


def seed_fields(args) -> dict:
    """The Job's seed fields from the seed options."""
    resize = (args.seed_resize_from_h, args.seed_resize_from_w)
    return dict(seed_mode=args.seed_mode, subseed=args.subseed, subseed_strength=args.subseed_strength,
                seed_resize_from=resize if all(resize) else None, ensd=args.ensd)


def check_run_before_loading(args, batches: list, size: tuple[int, int] | None = None, upscaled=False,
                             final_size=None):
    """What can be checked of the run before its model is loaded: the number of images, and its memory.

    size: the output's (height, width), None (or a None side) for the model's native size; with `upscaled`, the input's
    size, which the model multiplies by its downsampling factor. final_size(height, width, factor): the size of
    txt2img's hires pass (its peak) for that first pass, or a UserError. The architecture is the model YAML's
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
    if final_size is not None:
        height, width = final_size(height, width, architecture.factor)
    itemsize = resolve_dtype(args.precision, device).itemsize
    run = memory.Run(architecture, memory.Weights.of_file(ckpt, itemsize), max(len(batch) for batch in batches),
                     height, width, itemsize, guidance=args.scale != 1.0, lowmem=args.lowmem,
                     control=control_bytes(args, itemsize))
    memory.check_fits(run, device, _size_advice(args, architecture.factor if upscaled else 1, final_size is not None))


def control_bytes(args, itemsize: int) -> int:
    units = getattr(args, "control_units", None) or []
    return control.weights_bytes(units, getattr(args, "controlnet_dir", None) or (), itemsize) if units else 0


def config_before_loading(config, ckpt) -> dict:
    """The model YAML as plain data (nothing built from it), or {} where there is none or it cannot be read:
    the loader then names the problem."""
    path = Path(config) if config else Path(ckpt).with_suffix(".yaml")
    try:
        return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}
    except Exception:  # noqa: BLE001 - any unreadable YAML: the loader refuses it with the reason
        return {}


def _size_advice(args, scale: int, hires=False):
    """A function (height, width) -> the options that ask for that output size."""
    if hires:
        return lambda height, width: f"--hr_resize_x {width} --hr_resize_y {height}"
    if getattr(args, "init_img", None) is None:
        return lambda height, width: f"--H {height} --W {width}"
    return lambda height, width: f"--downscale_init --max_init_pixels {height * width // scale ** 2}"


def job_for_model(args, sampler: str, batches: list, loaded, height: int, width: int, upscaled=False,
                  final_size: tuple[int, int] | None = None) -> Job:
    """job_from_args, checked against the loaded model: its number of timesteps and the run's memory
    (`upscaled`: the output is the input times the model's downsampling factor; final_size: the (height,
    width) of txt2img's hires pass, where the run peaks)."""
    check_steps(args.ddim_steps, loaded.model.num_timesteps, f"{loaded.ckpt_path.name}'s schedule")
    check_size_conditioning(args, loaded)
    architecture = memory.Architecture.from_config(loaded.config)
    itemsize = loaded.dtype.itemsize
    peak_height, peak_width = final_size or (height, width)
    run = memory.Run(architecture, memory.Weights.of_model(loaded.model, itemsize), max(len(b) for b in batches),
                     peak_height, peak_width, itemsize, guidance=args.scale != 1.0, lowmem=args.lowmem,
                     weights_loaded=True, control=control_bytes(args, itemsize))
    memory.check_fits(run, loaded.device, _size_advice(args, architecture.factor if upscaled else 1,
                                                       final_size is not None))
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
