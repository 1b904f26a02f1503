"""Command-line options every generation script shares, with the CompVis names and defaults and the
Stability spellings as aliases, and the checks that turn bad input into one clear line."""
import argparse
import sys

from ldm.generate.errors import UserError
from ldm.generate.output import OutputFolder
from ldm.generate.prompts import prompt_batches
from ldm.generate.run import Job
from ldm.models.diffusion.sampling import SAMPLERS
from ldm.placement import PRECISIONS


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


def add_sampling_arguments(parser, steps=50, scale=7.5, n_samples=3, n_iter=2):
    group = parser.add_argument_group("sampling")
    group.add_argument("--prompt", default="a painting of a virus monster playing guitar", help="the prompt")
    group.add_argument("--negative_prompt", default="", help="what to steer away from (replaces the empty prompt)")
    group.add_argument("--from-file", dest="from_file", default=None,
                       help="a text file, one prompt a line (blank lines skipped), in batches of --n_samples")
    group.add_argument("--repeat", type=int, default=1, help="repeat each prompt of --from-file this many times")
    group.add_argument("--ddim_steps", "--steps", dest="ddim_steps", type=int, default=steps, help="sampling steps")
    group.add_argument("--sampler", choices=SAMPLERS, default=None, help="ddim (default), plms or dpm")
    group.add_argument("--plms", action="store_const", const="plms", dest="sampler_flag", help="PLMS sampler")
    group.add_argument("--dpm_solver", "--dpm", action="store_const", const="dpm", dest="sampler_flag",
                       help="DPM-Solver++ (2M) sampler")
    group.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    group.add_argument("--scale", type=float, default=scale, help="classifier-free guidance scale")
    group.add_argument("--n_samples", type=int, default=n_samples, help="batch size")
    group.add_argument("--n_iter", type=int, default=n_iter, help="batches per prompt")
    group.add_argument("--seed", type=int, default=42, help="seeds one CPU generator: the same images on every device")
    group.add_argument("--fixed_code", action="store_true", help="one start noise shared by every batch")


def add_output_arguments(parser, outdir):
    group = parser.add_argument_group("output")
    group.add_argument("--outdir", default=outdir, help="output folder")
    group.add_argument("--skip_grid", action="store_true", help="do not save the grid")
    group.add_argument("--skip_save", action="store_true", help="do not save the single images")
    group.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    group.add_argument("--no_watermark", action="store_true", help="do not embed the invisible watermark")


def chosen_sampler(args) -> str:
    if args.sampler and args.sampler_flag and args.sampler != args.sampler_flag:
        raise UserError(f"--sampler {args.sampler} contradicts --{args.sampler_flag}: give one of them")
    return args.sampler or args.sampler_flag or "ddim"


def check_sampling_arguments(args):
    for name in ("ddim_steps", "n_samples", "n_iter", "repeat"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if not 0.0 <= args.ddim_eta:
        raise UserError(f"--ddim_eta must be 0 or more (got {args.ddim_eta})")
    if args.ddim_eta and chosen_sampler(args) != "ddim":
        raise UserError(f"--ddim_eta applies to the DDIM sampler only; drop it or use --sampler ddim")


def check_dimension(flag: str, value: int, multiple: int = 8):
    if value <= 0 or value % multiple:
        lower, upper = max(multiple, value // multiple * multiple), (value // multiple + 1) * multiple
        raise UserError(f"{flag} {value} is not a positive multiple of {multiple}: use {lower} or {upper}")


def run_cli(main):
    """Run a script's main(); a UserError becomes one line on stderr and exit status 2."""
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def prepare_output(args):
    """The checks every script makes before loading anything: sampling options, prompts, output folder.

    Returns (sampler, prompt batches, output folder); the folder is created and known to be writable.
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
        sampler=sampler, scale=args.scale, eta=args.ddim_eta, height=height, width=width, seed=args.seed,
        fixed_code=args.fixed_code, n_rows=args.n_rows, save_grid=not args.skip_grid, watermark=not args.no_watermark,
    )


def check_strength(strength: float):
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"--strength {strength} is outside [0, 1]: 0 keeps the input image, 1 ignores it")


def add_image_arguments(parser, strength: float | None, help_image="the input picture (any format PIL reads)"):
    """--init-img, and --strength with its default unless strength is None (the upscaler has none)."""
    group = parser.add_argument_group("input picture")
    group.add_argument("--init-img", "--init_img", dest="init_img", required=True, metavar="PATH", help=help_image)
    if strength is not None:
        group.add_argument("--strength", type=float, default=strength,
                           help="how much of the input is redrawn, 0..1: int(strength x steps) steps are run "
                                "(0 = the input's reconstruction, 1 = the input ignored)")
    return group
