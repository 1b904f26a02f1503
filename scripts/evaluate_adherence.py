"""Prompt adherence of a text-to-image model on the shapes grammar, seen and held-out combinations.

    python scripts/evaluate_adherence.py [--ckpt models/ldm/shapes-ldm/model.ckpt]

Draws prompts from the caption grammar of ldm.data.shapes (seen: the training split's (shape, colour)
pairs; held-out: the pairs training never showed), generates one image per prompt with the shared
sampler and classifier-free guidance, reads the attributes back from the pixels with
ldm.data.adherence, and prints the rate of each attribute and of all five right, per group.
"""
import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ldm.generate.errors import exit_quietly_on_ctrl_c  # noqa: E402

if __name__ == "__main__":
    exit_quietly_on_ctrl_c()  # before the seconds of importing torch

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.data.adherence import ATTRIBUTES, check_image, parse_caption, score, summarise  # noqa: E402
from ldm.data.shapes import caption_for, sample_attrs  # noqa: E402
from ldm.generate import loading, options as cli  # noqa: E402
from ldm.generate.errors import UserError  # noqa: E402
from ldm.generate.output import MadeFolders, SaveFailed, check_can_create  # noqa: E402
from ldm.training import sample_images, save_grid  # noqa: E402

GROUPS = {"seen": "train", "held-out": "heldout"}


def draw_prompts(split, count, seed):
    """`count` captions of the grammar for the (shape, colour) pairs of `split`, reproducible from `seed`."""
    rng = np.random.default_rng((seed, list(GROUPS.values()).index(split)))
    return [caption_for(sample_attrs(rng, split), rng) for _ in range(count)]


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """BCHW in [-1, 1] -> BHWC uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def evaluate(model, prompts, options, first_seed):
    """Scores of one image per prompt, generated in batches (each batch's start noise from its own seed)."""
    scores, images = [], []
    for start in range(0, len(prompts), options.batch_size):
        batch = prompts[start:start + options.batch_size]
        generated = sample_images(model, batch, options.steps, options.scale, seed=first_seed + start,
                                  sampler=options.sampler)
        for prompt, image in zip(batch, to_uint8_images(generated)):
            scores.append(score(check_image(image), parse_caption(prompt)))
        images.append(generated)
    return scores, torch.cat(images)


def print_table(rates):
    columns = [*ATTRIBUTES, "all"]
    print(f"{'':10}" + "".join(f"{name:>12}" for name in columns) + f"{'images':>9}")
    for group, group_rates in rates.items():
        print(f"{group:10}" + "".join(f"{100 * group_rates[name]:>11.1f}%" for name in columns)
              + f"{group_rates['count']:>9}")


def parse_args(argv=None):
    parser = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=str(loading.EMBEDDED_MODEL),
                        help="the checkpoint (default: the shipped shapes model, from any working folder)")
    parser.add_argument("--config", help="the model YAML (default: <ckpt>.yaml beside the checkpoint)")
    parser.add_argument("--trust_config", action="store_true",
                        help="let the model YAML build any class it names (default: this project's only)")
    parser.add_argument("--seen", type=int, default=200, help="prompts with seen (shape, colour) pairs")
    parser.add_argument("--heldout", type=int, default=200, help="prompts with held-out (shape, colour) pairs")
    parser.add_argument("--sampler", default="ddim", choices=["ddim", "plms", "dpm"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scale", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1000, help="prompts and start noise (differs from training's)")
    parser.add_argument("--use_ema", action="store_true", help="load the checkpoint's EMA weights (a training checkpoint)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--grid", metavar="PNG", help="also save the first images of each group as a grid")
    return parser.parse_args(argv)


def grid_path(grid: str, group: str) -> Path:
    path = Path(grid)
    return path.with_name(f"{path.stem}-{group}{path.suffix}")


def check_options(options):
    """Refuse bad numbers and an unwritable --grid in one line each, before the model is loaded."""
    for name in ("steps", "batch_size"):
        if getattr(options, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(options, name)})")
    for name in ("seen", "heldout"):
        if getattr(options, name) < 0:
            raise UserError(f"--{name} must be 0 or more (got {getattr(options, name)})")
    if options.seen == options.heldout == 0:
        raise UserError("--seen and --heldout are both 0: nothing to evaluate; give either a positive count")
    if options.threads is not None and options.threads < 1:
        raise UserError(f"--threads must be at least 1 (got {options.threads})")
    if not math.isfinite(options.scale):
        raise UserError(f"--scale must be a finite number (got {options.scale})")
    highest_seed = cli.MAX_SEED - max(options.seen, options.heldout) + 1  # batches are seeded from --seed upwards
    if not 0 <= options.seed <= highest_seed:
        raise UserError(f"--seed {options.seed} is outside 0..{highest_seed}: the generator takes a 64-bit seed, "
                        "and each batch's is --seed plus its first prompt's index")
    if options.grid:
        suffix = Path(options.grid).suffix.lower()
        if Image.registered_extensions().get(suffix) not in Image.SAVE:
            raise UserError(f"--grid {options.grid}: no picture format is known by the ending {suffix!r}; "
                            "use a name ending in .png")
        check_can_create(Path(options.grid).parent, fix="pass --grid with a path in a writable folder")
        for group in GROUPS:
            if grid_path(options.grid, group).is_dir():
                raise UserError(f"--grid {options.grid}: {grid_path(options.grid, group)} is a folder; "
                                "pass --grid with a file name")


def save_group_grid(images, path: Path, captions):
    """The grid and its captions, written beside their places and then renamed over them: a full disk
    or a file-size limit leaves the previous files or none, never half a picture."""
    made_folders = MadeFolders()
    try:
        made_folders.make(path.parent)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".partial-") as staging:
            staged = Path(staging) / path.name
            save_grid(images, staged, columns=8, captions=captions)
            os.replace(staged.with_suffix(".txt"), path.with_suffix(".txt"))
            os.replace(staged, path)
    except OSError as error:
        made_folders.remove()
        raise SaveFailed("the grid", path.parent, error, flag="--grid") from None


def main(argv=None):
    options = parse_args(argv)
    check_options(options)
    loaded = loading.load(options.ckpt, options.config, "cpu", "full", use_ema=options.use_ema,
                          trust_config=options.trust_config)
    loaded.require_kind("evaluate_adherence.py", "text-to-image")
    model = loaded.model
    if options.steps > model.num_timesteps:
        raise UserError(f"--steps {options.steps} is more than the model's {model.num_timesteps} timesteps: "
                        f"use at most {model.num_timesteps}")
    if options.threads:
        torch.set_num_threads(options.threads)
    rates = {}
    for group, count in (("seen", options.seen), ("held-out", options.heldout)):
        if count <= 0:
            continue
        prompts = draw_prompts(GROUPS[group], count, options.seed)
        started = time.perf_counter()
        scores, images = evaluate(model, prompts, options, first_seed=options.seed)
        seconds = time.perf_counter() - started
        print(f"{group}: {count} images in {seconds:.0f} s ({seconds / count:.2f} s per image, "
              f"{options.sampler} {options.steps} steps, scale {options.scale})", flush=True)
        rates[group] = summarise(scores)
        if options.grid:
            save_group_grid(images[:16], grid_path(options.grid, group), captions=prompts[:16])
    print_table(rates)
    return 0


if __name__ == "__main__":
    cli.run_cli(main, interrupted="interrupted by Ctrl-C: no table was printed")
