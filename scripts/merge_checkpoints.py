"""Merge two or three checkpoints into one .safetensors file (AUTOMATIC1111's checkpoint merger).

weighted_sum: A·(1 − M) + B·M.  add_difference: A + (B − C)·M (e.g. A = an inpainting model, B = a
fine-tune, C = the base B was tuned from: B's training moved onto the inpainting model). Any mix of .ckpt
and .safetensors files and dtypes; merged tensor by tensor, so that memory stays far below the inputs'
size. A VAE file (--vae) and LoRA files (--lora) can be baked in.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from ldm.generate.errors import exit_quietly_on_ctrl_c  # noqa: E402

if __name__ == "__main__":
    exit_quietly_on_ctrl_c()  # before the seconds of importing torch

from ldm.generate import options  # noqa: E402
from ldm.generate.errors import UserError  # noqa: E402
from ldm.generate.extra_networks import cli_lora  # noqa: E402
from ldm.merging import METHODS, MergeError, merge_checkpoints  # noqa: E402


def parse_args(argv=None):
    parser = options.OneLineParser(description=__doc__)
    parser.add_argument("--a", required=True, metavar="CKPT", help="model A, the primary (.ckpt or .safetensors); "
                        "its keys, dtypes (unless --fp16) and config make the result's")
    parser.add_argument("--b", required=True, metavar="CKPT", help="model B, the secondary")
    parser.add_argument("--c", default=None, metavar="CKPT", help="model C, the tertiary: what add_difference subtracts from B")
    parser.add_argument("--method", default="weighted_sum", choices=METHODS,
                        help="weighted_sum: A·(1-M) + B·M; add_difference: A + (B-C)·M (default weighted_sum)")
    parser.add_argument("--multiplier", "-M", type=float, default=0.5, help="M (default 0.5)")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors", help="the merged checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace --out (and its .yaml) if it exists")
    parser.add_argument("--fp16", action="store_true", help="store every floating-point tensor as fp16 (half the size)")
    parser.add_argument("--vae", default=None, metavar="PATH",
                        help="bake this VAE file (.pt, .ckpt or .safetensors) into the result's autoencoder")
    parser.add_argument("--lora", action="append", metavar="PATH[:WEIGHT]",
                        help="bake this LoRA file into the result's UNet and text encoder at WEIGHT (default 1.0), "
                             "after merging; repeatable")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    loras = [cli_lora(value) for value in args.lora or []]
    try:
        merge_checkpoints(args.a, args.b, args.out, method=args.method, multiplier=args.multiplier, c=args.c,
                          fp16=args.fp16, vae=args.vae, loras=loras, overwrite=args.overwrite)
    except MergeError as error:
        raise UserError(str(error)) from None
    return 0


if __name__ == "__main__":
    options.run_cli(main, interrupted="interrupted: nothing was written")
