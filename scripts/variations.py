"""Image variations with an SD 2.1 unCLIP checkpoint (sd21-unclip-l.ckpt or sd21-unclip-h.ckpt): new pictures
after the CLIP image embedding of --init-img, steered by --prompt (empty by default); --noise_level (0..999)
lets them drift further from it. Every sampler and seed option of txt2img.py applies; see the README.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from ldm.generate.errors import exit_quietly_on_ctrl_c  # noqa: E402

if __name__ == "__main__":
    exit_quietly_on_ctrl_c()  # before the seconds of importing torch

from ldm.generate import images, infotext, loading, options  # noqa: E402
from ldm.generate.run import run_and_report  # noqa: E402
from ldm.generate.variations import DEFAULT_NOISE_LEVEL, ImageVariations, check_noise_level  # noqa: E402


def parse_args(argv=None):
    parser = options.OneLineParser(description=__doc__)
    options.add_sampling_arguments(parser, steps=50, scale=10.0, n_samples=2, n_iter=1)
    parser.set_defaults(prompt="")
    for side, name in (("H", "height"), ("W", "width")):
        parser.add_argument(f"--{side}", type=int, default=None, help=f"output {name} in pixels (default: the model's "
                                                                       "native size)")
    group = options.add_image_arguments(parser, strength=None, help_image="the picture to make variations of "
                                        "(any format PIL reads, any size: the image encoder sees it at 224x224)")
    group.add_argument("--noise_level", type=int, default=DEFAULT_NOISE_LEVEL,
                       help="noise augmentation of the picture's CLIP embedding, 0..999 (default 0: the embedding "
                            "as it is; higher: variations further from the picture)")
    options.add_output_arguments(parser, "outputs/variations-samples")
    options.add_model_arguments(parser)
    return infotext.parse_args_with_png(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    options.check_image_arguments(args)
    check_noise_level(args.noise_level)
    if not args.ckpt:
        raise options.UserError("pass --ckpt with an SD 2.1 unCLIP checkpoint (sd21-unclip-h.ckpt or "
                                "sd21-unclip-l.ckpt)")
    for flag, value in (("--H", args.H), ("--W", args.W)):
        if value is not None:
            options.check_dimension(flag, value)
    pixels = images.load_image(args.init_img, multiple=1, limits=options.image_limits(args))
    sampler, batches, folder = options.prepare_output(args)
    options.check_run_before_loading(args, batches, (args.H, args.W))
    loaded = loading.load_from_args(args)
    height, width = args.H or loaded.native_size, args.W or loaded.native_size
    options.check_dimension("--H", height, max(8, loaded.downsampling_factor))
    options.check_dimension("--W", width, max(8, loaded.downsampling_factor))
    job = options.job_for_model(args, sampler, batches, loaded, height, width)
    return run_and_report(job, ImageVariations(pixels, args.noise_level), loaded, folder)


if __name__ == "__main__":
    options.run_cli(main)
