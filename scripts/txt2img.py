"""Text to image, with the CompVis command line (and the Stability spellings): see --help and the README."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from ldm.generate.errors import exit_quietly_on_ctrl_c  # noqa: E402

if __name__ == "__main__":
    exit_quietly_on_ctrl_c()  # before the seconds of importing torch

from ldm.generate import control, hires, infotext, loading, options  # noqa: E402
from ldm.generate.run import run_and_report  # noqa: E402
from ldm.generate.txt2img import TextToImage  # noqa: E402


def parse_args(argv=None):
    parser = options.OneLineParser(description=__doc__)
    options.add_sampling_arguments(parser, steps=50, scale=7.5, n_samples=3, n_iter=2)
    parser.add_argument("--H", type=int, default=None, help="image height in pixels (default: the model's native size)")
    parser.add_argument("--W", type=int, default=None, help="image width in pixels (default: the model's native size)")
    parser.add_argument("--C", type=int, default=None, help="latent channels (default: the model's, 4 for SD)")
    parser.add_argument("--f", type=int, default=None, help="downsampling factor (default: the model's, 8 for SD)")
    parser.add_argument("--laion400m", action="store_true", help=argparse.SUPPRESS)
    control.add_arguments(parser)
    hires.add_arguments(parser)
    options.add_output_arguments(parser, "outputs/txt2img-samples")
    options.add_model_arguments(parser)
    return infotext.parse_args_with_png(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    if args.laion400m:
        raise options.UserError("--laion400m (the old LDM text-to-image model) is not supported: pass --ckpt and --config")
    for flag, value in (("--H", args.H), ("--W", args.W)):
        if value is not None:
            options.check_dimension(flag, value)
    hires_settings = hires.settings_from_args(args)
    sampler, batches, folder = options.prepare_output(args)
    final_size = None if hires_settings is None else lambda height, width, factor: hires.final_size(
        hires.checked_target(hires_settings, height, width, factor))
    options.check_run_before_loading(args, batches, (args.H, args.W), final_size=final_size)

    loaded = loading.load_from_args(args)
    for flag, given, actual in (("--C", args.C, loaded.latent_channels), ("--f", args.f, loaded.downsampling_factor)):
        if given is not None and given != actual:
            raise options.UserError(f"{flag} {given} does not match the model ({actual}): drop {flag}")
    height, width = args.H or loaded.native_size, args.W or loaded.native_size
    options.check_dimension("--H", height, max(8, loaded.downsampling_factor))
    options.check_dimension("--W", width, max(8, loaded.downsampling_factor))
    final = None if final_size is None else final_size(height, width, loaded.downsampling_factor)
    job = options.job_for_model(args, sampler, batches, loaded, height, width, final_size=final)
    return run_and_report(job, TextToImage(hires_settings), loaded, folder)


if __name__ == "__main__":
    options.run_cli(main)
