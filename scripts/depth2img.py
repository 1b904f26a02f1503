"""Depth to image with an SD 2 depth checkpoint: redraw --init-img after the prompt, keeping its depth layout.

The picture is padded (edge pixels repeated) to a multiple of 64, as the original demo, and the results are
cropped back to its size. The depth comes from the checkpoint's MiDaS weights, from --midas, or from
--depth_map; see the README.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from ldm.generate.errors import exit_quietly_on_ctrl_c  # noqa: E402

if __name__ == "__main__":
    exit_quietly_on_ctrl_c()  # before the seconds of importing torch

from ldm.generate import images, infotext, loading, options  # noqa: E402
from ldm.generate.depth2img import DepthToImage, depth_source, load_depth_map, padded_size  # noqa: E402
from ldm.generate.run import run_and_report  # noqa: E402


def parse_args(argv=None):
    parser = options.OneLineParser(description=__doc__)
    options.add_sampling_arguments(parser, steps=50, scale=9.0, n_samples=1, n_iter=1)
    group = options.add_image_arguments(parser, strength=0.9)
    group.add_argument("--depth_map", metavar="PATH", default=None,
                       help="a depth image to use instead of estimating one (greyscale, bright = near, 8 or 16 bit); "
                            "then no depth estimator is loaded")
    group.add_argument("--midas", metavar="PATH", default=None,
                       help="MiDaS DPT-Hybrid weights (dpt_hybrid-midas-501f0c75.pt or .safetensors), for a "
                            "checkpoint saved without its depth_model.* tensors")
    options.add_output_arguments(parser, "outputs/depth2img-samples")
    options.add_model_arguments(parser)
    return infotext.parse_args_with_png(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    options.check_image_arguments(args)
    if args.depth_map and args.midas:
        raise options.UserError("--depth_map and --midas both give the depth: pass one of them")
    if not args.ckpt:
        raise options.UserError("pass --ckpt with an SD 2 depth checkpoint (e.g. 512-depth-ema.ckpt)")
    # padded to a multiple of 64 by the task, not resized
    pixels = images.load_image(args.init_img, multiple=1, limits=options.image_limits(args))
    depth_map = load_depth_map(args.depth_map, *pixels.shape[-2:]) if args.depth_map else None
    sampler, batches, folder = options.prepare_output(args)
    height, width = padded_size(*pixels.shape[-2:])
    options.check_run_before_loading(args, batches, (height, width))
    loaded = loading.load_from_args(args, customize=depth_source(args.ckpt, depth_map is not None, args.midas))
    job = options.job_for_model(args, sampler, batches, loaded, height=height, width=width)
    return run_and_report(job, DepthToImage(pixels, args.strength, depth_map), loaded, folder)


if __name__ == "__main__":
    options.run_cli(main)
