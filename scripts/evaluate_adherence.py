"""Prompt adherence of a text-to-image model on the shapes grammar, seen and held-out combinations.

    python scripts/evaluate_adherence.py --ckpt models/ldm/shapes-ldm/model.ckpt

Draws prompts from the caption grammar of ldm.data.shapes (seen: the training split's (shape, colour)
pairs; held-out: the pairs training never showed), generates one image per prompt with the shared
sampler and classifier-free guidance, reads the attributes back from the pixels with
ldm.data.adherence, and prints the rate of each attribute and of all five right, per group.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm.checkpoint import load_model  # noqa: E402
from ldm.data.adherence import ATTRIBUTES, check_image, parse_caption, score, summarise  # noqa: E402
from ldm.data.shapes import caption_for, sample_attrs  # noqa: E402
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="models/ldm/shapes-ldm/model.ckpt")
    parser.add_argument("--config", help="the model YAML (default: <ckpt>.yaml beside the checkpoint)")
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


def main(argv=None):
    options = parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    model, _ = load_model(options.ckpt, options.config, use_ema=options.use_ema)
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
            path = Path(options.grid)
            save_grid(images[:16], path.with_name(f"{path.stem}-{group}{path.suffix}"), columns=8, captions=prompts[:16])
    print_table(rates)
    return rates


if __name__ == "__main__":
    main()
