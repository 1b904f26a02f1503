"""ControlNet adherence on the shapes model: does the generated shape fill the shape of the control map?

    python scripts/evaluate_control.py [--controlnet models/controlnet/shapes-canny.safetensors] [--count 200]

Draws `--count` scenes that training never drew (ldm.data.shapes_control with another seed: one shape anywhere
in the frame at any size, its caption with the grammar's nearest size and position words). Each caption is
generated twice with the same start noise: from the prompt alone, and with the ControlNet given the canny map
of the scene's picture (the canny preprocessor of ldm.generate.preprocessors at the picture's own 64 px, where
it gives the training maps exactly). Both go through the samplers' guided denoiser and its ControlNet hook (the
one runs use), in batches whose rows each have their own map (a run's ControlNet unit has one map for all).
Scores per image:
- IoU: the pixels the scene's shape covers (at least half) against the generated object, segmented by colour as
  the adherence checker does (ldm.data.adherence.object_mask);
- colour, background, shape: what ldm.data.adherence reads from the pixels against the caption's words.
Prints one table row per variant (means over the images) and, with --grid, saves a picture of the first
scenes: their canny maps, the prompt-only images and the controlled ones, one row each.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ldm.generate.errors import exit_quietly_on_ctrl_c  # noqa: E402

if __name__ == "__main__":
    exit_quietly_on_ctrl_c()  # before the seconds of importing torch

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from ldm.controlnet_file import ControlNetError, load_controlnet  # noqa: E402
from ldm.data.adherence import check_image, object_mask  # noqa: E402
from ldm.data.shapes import CANVAS, SPLITS, geometry_of, shape_coverage  # noqa: E402
from ldm.data.shapes_control import CANNY_HIGH, CANNY_LOW, ShapesControlDataset  # noqa: E402
from ldm.generate import loading, options as cli, preprocessors  # noqa: E402
from ldm.generate.control import text_context, with_control  # noqa: E402
from ldm.generate.errors import UserError  # noqa: E402
from ldm.generate.output import check_can_create, to_uint8_images  # noqa: E402
from ldm.models.diffusion import samplers  # noqa: E402
from ldm.training import sample_images  # noqa: E402

DEFAULT_CONTROLNET = loading.REPO_ROOT / "models" / "controlnet" / "shapes-canny.safetensors"
SCORED = ("color", "background", "shape")
VARIANTS = ("prompt only", "with ControlNet")
GRID_ZOOM = 2  # the 64 px pictures are drawn at twice their size


def shape_mask(attrs, resolution: int) -> np.ndarray:
    """The pixels the scene's shape covers at least half of (HxW bool)."""
    center_x, center_y, diameter = geometry_of(attrs)
    scale, half = resolution / CANVAS, diameter / 2
    box = tuple(scale * c for c in (center_x - half, center_y - half, center_x + half, center_y + half))
    return shape_coverage(attrs["shape"], box, resolution, resolution) >= 0.5


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def scores_of(image: np.ndarray, attrs) -> dict:
    """IoU with the scene's shape, and whether colour, background and shape are the scene's."""
    predicted = check_image(image)
    generated, _ = object_mask(image)
    return {"iou": iou(generated, shape_mask(attrs, image.shape[0])),
            **{name: float(predicted[name] == attrs[name]) for name in SCORED}}


class RowMaps:
    """GuidedDenoiser's control for a batch whose rows each have their own control map: the ControlNet's
    residuals at `weight` on the unconditional and the conditional rows alike (a unit's balanced mode)."""

    def __init__(self, network, hints: torch.Tensor, weight: float):
        self.network, self.hints, self.weight = network, hints, weight

    def __call__(self, x, t, cond, uncond_rows: int = 0):
        hints = self.hints.to(x.device, x.dtype).repeat(x.shape[0] // self.hints.shape[0], 1, 1, 1)
        residuals = self.network(x, hints, t, text_context(cond))
        return with_control(cond, [residual * self.weight for residual in residuals])


def canny_hint(picture: np.ndarray) -> torch.Tensor:
    """The control image [3, H, W] in 0..1: the canny preprocessor's map of the picture at its own size."""
    detected = preprocessors.detect("canny", picture, CANNY_LOW, CANNY_HIGH, resolution=picture.shape[0])
    return torch.from_numpy(detected).permute(2, 0, 1).float() / 255


def evaluate(model, network, dataset: ShapesControlDataset, options):
    """{variant: [scores per scene]} and, for the grid, the first scenes' (caption, map, prompt only, with control)."""
    scores = {variant: [] for variant in VARIANTS}
    examples = []
    for start in range(0, len(dataset), options.batch_size):
        items = [dataset[index] for index in range(start, min(start + options.batch_size, len(dataset)))]
        pictures = [np.rint((item["image"] + 1) * 127.5).astype(np.uint8) for item in items]
        hints = torch.stack([canny_hint(picture) for picture in pictures])
        captions = [item["caption"] for item in items]
        generated = {}
        for variant, control in zip(VARIANTS, (None, RowMaps(network, hints, options.weight))):
            images = sample_images(model, captions, options.steps, options.scale, seed=options.seed + start,
                                   sampler=options.sampler, schedule=options.schedule, control=control)
            generated[variant] = to_uint8_images(images)
            scores[variant] += [scores_of(image, item["attrs"]) for image, item in zip(generated[variant], items)]
        print(f"{start + len(items)}/{len(dataset)} scenes: mean IoU " + ", ".join(
            f"{variant} {np.mean([row['iou'] for row in scores[variant]]):.3f}" for variant in VARIANTS), flush=True)
        for row, item in enumerate(items[:max(0, options.grid_examples - len(examples))]):
            map_picture = (hints[row].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            examples.append((item["caption"], map_picture, *(generated[variant][row] for variant in VARIANTS)))
    return scores, examples


def print_table(scores: dict):
    print(f"{'':16}{'mean IoU':>10}{'median':>8}{'IoU>=0.8':>10}" + "".join(f"{name:>12}" for name in SCORED))
    for variant, rows in scores.items():
        ious = np.array([row["iou"] for row in rows])
        print(f"{variant:16}{ious.mean():>10.3f}{np.median(ious):>8.3f}{100 * (ious >= 0.8).mean():>9.1f}%"
              + "".join(f"{100 * np.mean([row[name] for row in rows]):>11.1f}%" for name in SCORED))


def save_examples(examples: list, path: Path):
    """Rows: the canny maps, the prompt-only images, the controlled ones; a column per scene; captions in
    <path>.txt, one a line."""
    size = examples[0][1].shape[0] * GRID_ZOOM
    label_width, gap = 110, 4
    grid = Image.new("RGB", (label_width + len(examples) * (size + gap), 3 * (size + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for row, label in enumerate(("control map", *VARIANTS)):
        draw.text((4, row * (size + gap) + size // 2 - 6), label, fill="black")
        for column, example in enumerate(examples):
            tile = Image.fromarray(example[row + 1]).resize((size, size), Image.NEAREST)
            grid.paste(tile, (label_width + column * (size + gap), row * (size + gap)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    path.with_suffix(".txt").write_text("".join(f"{i}: {example[0]}\n" for i, example in enumerate(examples)))


def parse_args(argv=None):
    parser = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=str(loading.EMBEDDED_MODEL), help="the base model (default: the shapes model)")
    parser.add_argument("--controlnet", default=str(DEFAULT_CONTROLNET), help="the ControlNet file (its .yaml beside)")
    parser.add_argument("--count", type=int, default=200, help="scenes (each generated without and with control)")
    parser.add_argument("--split", default="all", choices=SPLITS,
                        help="their (shape, colour) pairs: train (seen in training), heldout (never seen), all")
    parser.add_argument("--seed", type=int, default=1000,
                        help="the scenes' seed (training's is 2) and the start noise's (batch i: seed + its first scene)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scale", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--sampler", default="ddim", help=f"any registered sampler, any case: {samplers.sampler_choices()}")
    parser.set_defaults(schedule="automatic", sampler_flags=None)  # the samplers' own schedule; no --plms flags
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--weight", type=float, default=1.0, help="the ControlNet's weight")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--grid", metavar="PNG", help="save the first scenes' maps and images side by side")
    parser.add_argument("--grid_examples", type=int, default=6, help="how many scenes the grid shows")
    options = parser.parse_args(argv)
    for name in ("count", "steps", "batch_size", "grid_examples"):
        if getattr(options, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(options, name)})")
    if options.threads is not None and options.threads < 1:
        raise UserError(f"--threads must be at least 1 (got {options.threads})")
    options.sampler, options.schedule = cli.chosen_sampler_and_schedule(options)
    if options.grid:
        if Path(options.grid).suffix.lower() != ".png":
            raise UserError(f"--grid {options.grid}: give a file name ending in .png")
        check_can_create(Path(options.grid).parent, fix="pass --grid with a path in a writable folder")
    return options


def main(argv=None):
    options = parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    loaded = loading.load(options.ckpt, None, "cpu", "full")
    loaded.require_kind("evaluate_control.py", "text-to-image")
    try:
        network = load_controlnet(options.controlnet, loaded.config.model.params.unet_config, dtype=torch.float32).model
    except ControlNetError as error:
        raise UserError(f"--controlnet: {error}") from None
    dataset = ShapesControlDataset(size=options.count, split=options.split, seed=options.seed,
                                   resolution=loaded.native_size)
    started = time.perf_counter()
    scores, examples = evaluate(loaded.model, network, dataset, options)
    seconds = time.perf_counter() - started
    print(f"{options.count} scenes ({options.split} pairs), each without and with {Path(options.controlnet).name} at "
          f"weight {options.weight:g}: {seconds:.0f} s ({options.sampler}, {options.steps} steps, scale {options.scale:g})")
    print_table(scores)
    if options.grid:
        save_examples(examples, Path(options.grid))
        print(f"grid: {options.grid}")
    return 0


if __name__ == "__main__":
    cli.run_cli(main, interrupted="interrupted by Ctrl-C: no table was printed")
