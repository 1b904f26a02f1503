"""One prompt across samplers: a grid with a row per sampler and step count, a column per seed (A1111's X/Y plot).

    python scripts/compare_samplers.py --prompt "a large red circle on the left on a blue background" \
        --run "DDIM:50" --run "DPM++ 2M Karras:10" --run "Euler a:20" --out outputs/samplers.png

Every row starts from the same start noise per column (seed, seed + 1, ...), so differences between rows
are the samplers'. The row labels, with model calls and seconds per image, go to <out>.txt and stdout.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ldm.generate.errors import exit_quietly_on_ctrl_c  # noqa: E402

if __name__ == "__main__":
    exit_quietly_on_ctrl_c()  # before the seconds of importing torch

import torch  # noqa: E402

from ldm.generate import loading, options as cli  # noqa: E402
from ldm.generate.errors import UserError  # noqa: E402
from ldm.models.diffusion import samplers  # noqa: E402
from ldm.training import sample_images, save_grid  # noqa: E402


def parse_run(text: str) -> tuple[str, str, int]:
    """"SAMPLER[ SCHEDULE]:STEPS" -> (registry key, schedule, steps); UserError naming the fix."""
    name, _, steps = text.rpartition(":")
    if not name or not steps.isdigit() or int(steps) < 1:
        raise UserError(f'--run {text!r}: write a sampler and a step count, e.g. --run "DPM++ 2M Karras:10"')
    try:
        key, schedule = samplers.resolve_sampler(name)
    except ValueError as error:
        raise UserError(f"--run {text!r}: {error}") from None
    return key, schedule or "automatic", int(steps)


def parse_args(argv=None):
    parser = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="a large red circle on the left on a blue background")
    parser.add_argument("--run", action="append", metavar="SAMPLER:STEPS",
                        help='a row: a sampler (any registered name, with a schedule such as "DPM++ 2M Karras") and '
                             "its steps; repeat for more rows")
    parser.add_argument("--seeds", type=int, default=4, help="columns: seeds from --seed up")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scale", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--out", default="outputs/samplers.png", help="the grid PNG (labels in <out>.txt)")
    parser.add_argument("--ckpt", default=str(loading.EMBEDDED_MODEL))
    parser.add_argument("--config", help="the model YAML (default: <ckpt>.yaml beside the checkpoint)")
    return parser.parse_args(argv)


def model_calls(model, run) -> tuple[object, int]:
    """run()'s result and how many times it called the UNet."""
    calls = [0]
    hook = model.model.diffusion_model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        return run(), calls[0]
    finally:
        hook.remove()


def main(argv=None):
    args = parse_args(argv)
    rows = [parse_run(text) for text in args.run or ["DDIM:50", "DPM++ 2M Karras:10", "Euler a:20"]]
    if not 1 <= args.seeds <= 16:
        raise UserError(f"--seeds must be 1..16 (got {args.seeds})")
    model = loading.load(args.ckpt, args.config, "cpu", "full").model
    images, labels = [], []
    with torch.inference_mode():
        for key, schedule, steps in rows:
            started = time.perf_counter()
            row = [model_calls(model, lambda seed=seed: sample_images(model, [args.prompt], steps, args.scale, seed,
                                                                        sampler=key, schedule=schedule))
                   for seed in range(args.seed, args.seed + args.seeds)]
            seconds = (time.perf_counter() - started) / args.seeds
            fields = samplers.infotext_fields(key, schedule)
            label = (f"{', '.join(fields.values())}, {steps} steps: {row[0][1]} model calls, "
                     f"{seconds:.2f} s per image")
            print(label, flush=True)
            labels.append(label)
            images.extend(image for image, _ in row)
    out = Path(args.out)
    save_grid(torch.cat(images), out, columns=args.seeds)
    out.with_suffix(".txt").write_text("".join(f"row {i + 1}: {label}\n" for i, label in enumerate(labels)))
    print(f"grid: {out} (rows: {out.with_suffix('.txt')})")
    return 0


if __name__ == "__main__":
    cli.run_cli(main)
