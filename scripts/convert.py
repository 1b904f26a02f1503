"""Convert between the two layouts people keep Stable Diffusion models in:

- a diffusers pipeline folder (model_index.json with unet/, vae/, text_encoder/, ...) into one original-layout
  .safetensors file, with the config it loads with copied beside it as <out>.yaml;
- an original-layout checkpoint (.ckpt or .safetensors, with its config: --config, the .yaml beside it, or
  the one its tensors fit) into a diffusers pipeline folder that diffusers' from_pretrained loads.

Either way the tensors are renamed as diffusers' own conversion renames them (and checked to convert back
exactly), read memory-mapped and written one at a time, so that memory stays far below the model's size;
the output appears only complete, and never replaces an existing file or folder unless --overwrite.
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
    parser.add_argument("source", metavar="FOLDER_OR_CHECKPOINT",
                        help="a diffusers pipeline folder, or a .ckpt/.safetensors checkpoint")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors_OR_FOLDER",
                        help="the original-layout checkpoint (from a folder), or the diffusers folder (from a checkpoint)")
    parser.add_argument("--config", default=None, metavar="YAML",
                        help="the model's config (from a folder: copied beside --out); default: chosen from the source")
    parser.add_argument("--fp16", action="store_true", help="store every floating-point tensor as fp16 (half the size)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out (and its .yaml) if it exists")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if Path(args.source).is_file():
            from ldm.diffusers_export import checkpoint_to_folder
            checkpoint_to_folder(args.source, args.out, config_path=args.config, fp16=args.fp16,
                                 overwrite=args.overwrite)
        else:
            folder_to_checkpoint(args.source, args.out, fp16=args.fp16, overwrite=args.overwrite,
                                 config_path=args.config)
    except ConvertError as error:
        raise UserError(str(error)) from None
    return 0


if __name__ == "__main__":
    options.run_cli(main, interrupted="interrupted: nothing was written")
