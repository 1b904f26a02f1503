"""Convert a diffusers pipeline folder (SD 1.x: model_index.json with unet/, vae/, text_encoder/) into one
original-layout .safetensors file, with the config it loads with copied beside it as <out>.yaml.

The folder is read as --ckpt reads it (the exact inverse of diffusers' own conversion) and written tensor
by tensor, so that memory stays far below the model's size; the output appears only complete, and never
replaces an existing file unless --overwrite.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
from ldm.generate.errors import exit_quietly_on_ctrl_c  # noqa: E402

if __name__ == "__main__":
    exit_quietly_on_ctrl_c()  # before the seconds of importing torch

from ldm.converting import ConvertError, folder_to_checkpoint  # noqa: E402
from ldm.generate import options  # noqa: E402
from ldm.generate.errors import UserError  # noqa: E402


def parse_args(argv=None):
    parser = options.OneLineParser(description=__doc__)
    parser.add_argument("source", metavar="FOLDER", help="the diffusers pipeline folder to convert")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors", help="the original-layout checkpoint")
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="the model's config (copied beside --out); default: chosen from the folder")
    parser.add_argument("--fp16", action="store_true", help="store every floating-point tensor as fp16 (half the size)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out (and its .yaml) if it exists")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        folder_to_checkpoint(args.source, args.out, fp16=args.fp16, overwrite=args.overwrite, config_path=args.config)
    except ConvertError as error:
        raise UserError(str(error)) from None
    return 0


if __name__ == "__main__":
    options.run_cli(main, interrupted="interrupted: nothing was written")
