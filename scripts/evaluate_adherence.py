"""Prompt adherence of a text-to-image model on the shapes grammar, seen and held-out combinations.

    python scripts/evaluate_adherence.py [--ckpt models/ldm/shapes-ldm/model.ckpt]

Draws prompts from the caption grammar of ldm.data.shapes (seen: the training split's (shape, colour)
pairs; held-out: the pairs training never showed), generates one image per prompt with the shared
sampler and classifier-free guidance, reads the attributes back from the pixels with
ldm.data.adherence, and prints the rate of each attribute and of all five right, per group, with the
number of model calls each image cost (one call = one guided denoiser evaluation, the unconditional and
conditional halves batched together): adherence per model call compares samplers at equal cost.

A LoRA or an embedding that changes what a word means is measured with --lora PATH:WEIGHT and
--embeddings_dir, prompts restricted by --only (e.g. shape=circle), and --prompt_word (the model reads the
new word, the score is against the grammar's): with --only, the table is followed by what was drawn, e.g.

    python scripts/evaluate_adherence.py --only shape=circle --lora models/examples/Lora/circle-as-square.safetensors:1
    python scripts/evaluate_adherence.py --only color=purple --prompt_word purple=lilac --embeddings_dir models/examples/embeddings
"""
import argparse
import math
import os
import re
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
from ldm.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, caption_for, sample_attrs  # noqa: E402
from ldm.generate import loading, options as cli  # noqa: E402
from ldm.generate.conditioning import Conditioner  # noqa: E402
from ldm.generate.errors import UserError  # noqa: E402
from ldm.generate.extra_networks import cli_lora  # noqa: E402
from ldm.modules.embeddings import EmbeddingError, load_embeddings  # noqa: E402
from ldm.modules.lora import LoraError, LoraPatcher, read_lora  # noqa: E402
from ldm.generate.output import MadeFolders, SaveFailed, check_can_create  # noqa: E402
from ldm.models.diffusion import samplers  # noqa: E402
from ldm.training import sample_images, save_grid  # noqa: E402

GROUPS = {"seen": "train", "held-out": "heldout"}
VALUES = {"shape": SHAPES, "color": COLORS, "background": COLORS, "size": SIZES, "position": POSITIONS}
MAX_DRAWS = 1000  # per prompt, for --only


def draw_prompts(split, count, seed, only=None):
    """`count` captions of the grammar for the (shape, colour) pairs of `split`, reproducible from `seed`;
    only: {attribute: value} that every scene has (an empty list when the split has no such scene)."""
    rng = np.random.default_rng((seed, list(GROUPS.values()).index(split)))
    prompts = []
    for _ in range(count):
        attrs = next((attrs for attrs in (sample_attrs(rng, split) for _ in range(MAX_DRAWS))
                      if all(attrs[name] == value for name, value in (only or {}).items())), None)
        if attrs is None:
            return []
        prompts.append(caption_for(attrs, rng))
    return prompts


def as_read(prompt: str, replacements: dict) -> str:
    """The prompt as the model is given it: --prompt_word's whole-word replacements made."""
    for word, new_word in replacements.items():
        prompt = re.sub(rf"\b{re.escape(word)}\b", new_word, prompt)
    return prompt


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """BCHW in [-1, 1] -> BHWC uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class ModelCalls:
    """Counts the denoising network's forward passes while in a `with` block."""

    def __init__(self, network: torch.nn.Module):
        self.network, self.count = network, 0

    def _seen(self, *_):
        self.count += 1

    def __enter__(self):
        self.handle = self.network.register_forward_hook(self._seen)
        return self

    def __exit__(self, *_):
        self.handle.remove()


def evaluate(model, prompts, options, first_seed, encode=None):
    """Scores of one image per prompt, generated in batches (each batch's start noise from its own seed),
    the images, and the model calls per image (each call evaluates every image of its batch once)."""
    scores, images, calls_per_image = [], [], []
    for start in range(0, len(prompts), options.batch_size):
        batch = prompts[start:start + options.batch_size]
        with ModelCalls(model.model) as calls:
            generated = sample_images(model, [as_read(prompt, options.prompt_word) for prompt in batch],
                                      options.steps, options.scale, seed=first_seed + start,
                                      sampler=options.sampler, schedule=options.schedule, encode=encode)
        calls_per_image.extend([calls.count] * len(batch))
        for prompt, image in zip(batch, to_uint8_images(generated)):
            predicted = check_image(image)
            scores.append({**score(predicted, parse_caption(prompt)), "drawn": predicted})
        images.append(generated)
    return scores, torch.cat(images), sum(calls_per_image) / len(calls_per_image)


def sampler_label(options) -> str:
    """The sampler as A1111's infotext names it, e.g. "DPM++ 2M, Schedule type: Karras"."""
    return ", Schedule type: ".join(samplers.infotext_fields(options.sampler, options.schedule).values())


def print_drawn(group, scores, attributes):
    """What was drawn for each --only attribute: e.g. "seen: shape drawn: square 91%, circle 6%, none 3%"."""
    for name in attributes:
        values = [str(entry["drawn"][name]).replace("None", "none") for entry in scores]
        counts = sorted(((values.count(value), value) for value in set(values)), reverse=True)
        print(f"{group}: {name} drawn: " + ", ".join(f"{value} {100 * count / len(values):.0f}%"
                                                     for count, value in counts))


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
    parser.add_argument("--sampler", default="ddim",
                        help=f"any registered sampler, any case: {samplers.sampler_choices()}; keys such as "
                             "dpmpp_2m and A1111's names with a schedule such as \"DPM++ 2M Karras\" too (default DDIM)")
    parser.add_argument("--schedule", default="automatic",
                        help=f"the k-samplers' sigma schedule, any case: {', '.join(samplers.SCHEDULE_NAMES)}; "
                             "automatic = the sampler's own default")
    parser.set_defaults(sampler_flags=None)  # the generation scripts' --plms/--dpm_solver, which this one lacks
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scale", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1000, help="prompts and start noise (differs from training's)")
    parser.add_argument("--use_ema", action="store_true", help="load the checkpoint's EMA weights (a training checkpoint)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--grid", metavar="PNG", help="also save the first images of each group as a grid")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                        help="merge a LoRA file into the model at this weight (default 1), UNet and text encoder alike")
    parser.add_argument("--embeddings_dir", help="textual-inversion embeddings used by name in the prompts")
    parser.add_argument("--only", action="append", default=[], metavar="ATTRIBUTE=VALUE",
                        help="only prompts with this attribute value, e.g. shape=circle (repeatable)")
    parser.add_argument("--prompt_word", action="append", default=[], metavar="WORD=NEW",
                        help="the model reads NEW where the prompt says WORD (scored against WORD), e.g. purple=lilac")
    return parser.parse_args(argv)


def pairs(values: list, flag: str) -> dict:
    """KEY=VALUE items of a repeatable option as a dict; a malformed item is a UserError naming it."""
    found = {}
    for item in values:
        key, equals, value = item.partition("=")
        if not equals or not key.strip() or not value.strip():
            raise UserError(f"{flag} {item!r} is not KEY=VALUE (e.g. {flag} shape=circle)")
        found[key.strip()] = value.strip()
    return found


def grid_path(grid: str, group: str) -> Path:
    path = Path(grid)
    return path.with_name(f"{path.stem}-{group}{path.suffix}")


def check_options(options):
    """Refuse bad numbers, an unknown sampler and an unwritable --grid in one line each, before the model is
    loaded; --sampler and --schedule become a registry key and a schedule name."""
    options.sampler, options.schedule = cli.chosen_sampler_and_schedule(options)
    options.only = pairs(options.only, "--only")
    for name, value in options.only.items():
        if value not in VALUES.get(name, ()):
            raise UserError(f"--only {name}={value}: not an attribute value; attributes and values: "
                            + "; ".join(f"{key} {'|'.join(values)}" for key, values in VALUES.items()))
    options.prompt_word = pairs(options.prompt_word, "--prompt_word")
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


def adapted(loaded, options):
    """Merge --lora's files into the model; returns the prompt encoder that reads --embeddings_dir's
    embeddings (None without it: the model's own)."""
    try:
        loras = [(read_lora(path), weight, weight) for path, weight in map(cli_lora, options.lora)]
        if loras:
            LoraPatcher(loaded.model).apply(loras)
        if options.embeddings_dir is None:
            return None
        database = load_embeddings(options.embeddings_dir, loaded.model.cond_stage_model)
    except (LoraError, EmbeddingError) as error:
        raise UserError(str(error)) from None
    conditioner = Conditioner(loaded, print, embeddings=database)
    return lambda prompts: conditioner.encode_group(tuple(prompts))


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
    encode = adapted(loaded, options)
    rates = {}
    for group, count in (("seen", options.seen), ("held-out", options.heldout)):
        if count <= 0:
            continue
        prompts = draw_prompts(GROUPS[group], count, options.seed, options.only)
        if not prompts:
            print(f"{group}: no scene of this group has {options.only}: skipped")
            continue
        started = time.perf_counter()
        scores, images, calls = evaluate(model, prompts, options, first_seed=options.seed, encode=encode)
        seconds = time.perf_counter() - started
        print(f"{group}: {count} images in {seconds:.0f} s ({seconds / count:.2f} s per image, "
              f"{sampler_label(options)}, {options.steps} steps, {calls:g} model calls per image, "
              f"scale {options.scale})", flush=True)
        rates[group] = summarise(scores)
        print_drawn(group, scores, options.only)
        if options.grid:
            save_group_grid(images[:16], grid_path(options.grid, group), captions=prompts[:16])
    print_table(rates)
    return 0


if __name__ == "__main__":
    cli.run_cli(main, interrupted="interrupted by Ctrl-C: no table was printed")
