"""Image to image with the CompVis command line: --init-img, --strength and the txt2img options; see the README."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from ldm.generate.errors import exit_quietly_on_ctrl_c  # noqa: E402

if __name__ == "__main__":
    exit_quietly_on_ctrl_c()  # before the seconds of importing torch

from ldm.generate import control, images, infotext, loading, options  # noqa: E402
from ldm.generate.img2img import ImageToImage  # noqa: E402
from ldm.generate.run import run_and_report  # noqa: E402


def parse_args(argv=None):
    parser = options.OneLineParser(description=__doc__)
    options.add_sampling_arguments(parser, steps=50, scale=5.0, n_samples=2, n_iter=1)
    options.add_image_arguments(parser, strength=0.75)
    options.add_output_arguments(parser, "outputs/img2img-samples")
    options.add_model_arguments(parser)
    control.add_arguments(parser)
    return infotext.parse_args_with_png(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    options.check_image_arguments(args)
    pixels = images.load_image(args.init_img, limits=options.image_limits(args))
    sampler, batches, folder = options.prepare_output(args)
    options.check_run_before_loading(args, batches, pixels.shape[-2:])
    loaded = loading.load_from_args(args)
    job = options.job_for_model(args, sampler, batches, loaded, height=pixels.shape[-2], width=pixels.shape[-1])
    return run_and_report(job, ImageToImage(pixels, args.strength), loaded, folder)


if __name__ == "__main__":
    options.run_cli(main)
