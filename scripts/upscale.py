"""x4 upscaling with the SD 2.x x4 upscaler: the output is four times the input's width and height."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from ldm.generate.errors import exit_quietly_on_ctrl_c  # noqa: E402

if __name__ == "__main__":
    exit_quietly_on_ctrl_c()  # before the seconds of importing torch

from ldm.generate import images, infotext, loading, options  # noqa: E402
from ldm.generate.run import run_and_report  # noqa: E402
from ldm.generate.upscale import DEFAULT_NOISE_LEVEL, Upscaling, check_noise_level  # noqa: E402


def parse_args(argv=None):
    parser = options.OneLineParser(description=__doc__)
    options.add_sampling_arguments(parser, steps=50, scale=9.0, n_samples=1, n_iter=1)
    group = options.add_image_arguments(parser, strength=None, help_image="the low-resolution picture, any size")
    group.add_argument("--noise_level", type=int, default=DEFAULT_NOISE_LEVEL,
                       help="noise added to the input, 0..350: higher invents more detail and follows the input less")
    options.add_output_arguments(parser, "outputs/upscaling-samples")
    options.add_model_arguments(parser)
    return infotext.parse_args_with_png(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    check_noise_level(args.noise_level)
    options.check_image_arguments(args)
    low_res = images.load_image(args.init_img, multiple=1, limits=options.image_limits(args))  # any size
    sampler, batches, folder = options.prepare_output(args)
    options.check_run_before_loading(args, batches, low_res.shape[-2:], upscaled=True)
    loaded = loading.load_from_args(args)
    factor = loaded.downsampling_factor
    job = options.job_for_model(args, sampler, batches, loaded, height=low_res.shape[-2] * factor,
                                width=low_res.shape[-1] * factor, upscaled=True)
    return run_and_report(job, Upscaling(low_res, args.noise_level), loaded, folder)


if __name__ == "__main__":
    options.run_cli(main)
