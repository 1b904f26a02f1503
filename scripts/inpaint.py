"""Inpainting: repaint the white part of --mask in --init-img, guided by the prompt. Works with a 9-channel
inpainting checkpoint (e.g. SD 2 inpainting) and, by masked sampling, with any text-to-image checkpoint."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from ldm.generate.errors import exit_quietly_on_ctrl_c  # noqa: E402

if __name__ == "__main__":
    exit_quietly_on_ctrl_c()  # before the seconds of importing torch

from ldm.generate import control, images, infotext, loading, options  # noqa: E402
from ldm.generate.inpaint import Inpainting  # noqa: E402
from ldm.generate.run import run_and_report  # noqa: E402


def parse_args(argv=None):
    parser = options.OneLineParser(description=__doc__)
    options.add_sampling_arguments(parser, steps=50, scale=7.5, n_samples=3, n_iter=1)
    group = options.add_image_arguments(parser, strength=1.0)
    group.add_argument("--mask", required=True, metavar="PATH",
                       help="white = repaint, black = keep; any image mode, resized to the picture's size")
    group.add_argument("--no_paste_back", action="store_true",
                       help="keep the decoded pixels outside the mask instead of pasting the input's back")
    options.add_output_arguments(parser, "outputs/inpainting-samples")
    options.add_model_arguments(parser)
    control.add_arguments(parser)
    return infotext.parse_args_with_png(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    options.check_image_arguments(args)
    pixels, mask = images.load_image_and_mask(args.init_img, args.mask, limits=options.image_limits(args))
    sampler, batches, folder = options.prepare_output(args)
    options.check_run_before_loading(args, batches, pixels.shape[-2:])
    loaded = loading.load_from_args(args)
    job = options.job_for_model(args, sampler, batches, loaded, height=pixels.shape[-2], width=pixels.shape[-1])
    task = Inpainting(pixels, mask, args.strength, paste_back=not args.no_paste_back)
    return run_and_report(job, task, loaded, folder)


if __name__ == "__main__":
    options.run_cli(main)
