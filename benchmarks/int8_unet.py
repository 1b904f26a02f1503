"""--precision int8: what it saves per UNet call and what it costs the picture, side by side in one run.

    flock /tmp/bigmem.lock python benchmarks/int8_unet.py [--sizes 256 512] [--repeats 2] [--prompts 16]

1. Speed, on a random-weight full-size SD 1.x UNet (the checkpoint benchmarks/load.py writes into --workdir)
   on the CPU with our scripts' process settings: one guided UNet call (batch 2) at each size, fp32 beside
   int8 with input ranges measured on every call (dynamic, what --precision int8 runs) and int8 with
   calibrated ranges (static; calibrated here on one call at that size, as speed does not depend on them).
   The variants swap the same UNet's layers and alternate, median of --repeats; figures are ratios to fp32,
   which hold on a shared machine.
2. Quality, on the embedded model (models/ldm/shapes-ldm): --prompts prompts of the shapes grammar (seen
   split, drawn as scripts/evaluate_adherence.py draws them), DDIM --steps, scale 5, seed k for prompt k:
   the PSNR of each variant's picture against fp32's (mean over the prompts) and the rule-based checker's
   score (ldm.data.adherence; "all right" = all five attributes read back), with the whole set's wall time
   as a ratio to fp32's. --bf16 adds --precision bf16 to that table, the other reduced precision.
Both reduced precisions run attention over many keys in bf16 on a CPU with bf16 arithmetic
(ldm.modules.attention); --attention-min-keys 1 makes the embedded model's small attention layers do so too,
to measure what that costs a picture.
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import common  # noqa: E402  (puts the repository on sys.path and sets HF_HUB_OFFLINE)

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm.checkpoint import load_model  # noqa: E402
from ldm.data.adherence import check_image, parse_caption, score, summarise  # noqa: E402
from ldm.generate.int8 import quantize_loaded  # noqa: E402
from ldm.generate.loading import EMBEDDED_MODEL  # noqa: E402
from ldm.pipeline import Pipeline  # noqa: E402
from ldm.modules import attention  # noqa: E402
from ldm.quantization import InputRanges, activation_levels, int8_replacements, quantizable_layers, \
    replace_layers, set_attention_in_bf16  # noqa: E402
from step_caching import psnr  # noqa: E402

EMBEDDED_SCALE = 5.0  # evaluate_adherence's
TIMESTEP = 500  # the UNet's cost does not depend on t


# --- 1. speed on a full-size UNet -------------------------------------------------------------------------------
def speed(args):
    """Yields (size, {variant: (seconds, ratio to fp32)}) as each size is measured."""
    model = load_model(common.sd1_checkpoint(args.workdir, "fp32"), common.SD1_CONFIG, "cpu", torch.float32,
                       log=lambda line: None).model
    unet = model.model.diffusion_model
    del model.first_stage_model, model.cond_stage_model
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(2, 77, 768, generator=generator)
    timesteps = torch.full((2,), TIMESTEP)
    for size in args.sizes:
        x = torch.randn(2, 4, size // 8, size // 8, generator=generator)
        ranges = InputRanges()
        with torch.inference_mode():
            with ranges.recording(quantizable_layers(unet)):
                unet(x, timesteps, context=context)
            variants = {"fp32": None, "int8 dynamic": int8_replacements(unet, None),
                        "int8 static": int8_replacements(unet, ranges)}
            originals = quantizable_layers(unet)

            def call(layers):
                def run():
                    replace_layers(unet, layers or originals)
                    set_attention_in_bf16(unet, layers is not None)  # as quantize_unet does
                    unet(x, timesteps, context=context)
                return run

            times = common.alternate({name: call(layers) for name, layers in variants.items()}, args.repeats)
            replace_layers(unet, originals)
            set_attention_in_bf16(unet, False)
        del variants
        yield size, {name: (seconds, seconds / times["fp32"]) for name, seconds in times.items()}


# --- 2. quality on the embedded model ---------------------------------------------------------------------------
def quality(args) -> dict:
    from evaluate_adherence import draw_prompts

    if args.attention_min_keys is not None:
        attention.BF16_BY_ROWS_MIN_KEYS = args.attention_min_keys
    quiet = dict(device="cpu", log=lambda line: None)
    static = Pipeline.from_pretrained(EMBEDDED_MODEL, **quiet)
    quantize_loaded(static.loaded, quiet["log"], calibrated=True)
    pipes = {"fp32": Pipeline.from_pretrained(EMBEDDED_MODEL, **quiet),
             "int8 (--precision int8: dynamic)": Pipeline.from_pretrained(EMBEDDED_MODEL, precision="int8", **quiet),
             "int8 static (calibrated)": static}
    if args.bf16:
        pipes["bf16 (--precision bf16)"] = Pipeline.from_pretrained(EMBEDDED_MODEL, precision="bf16", **quiet)
    prompts = draw_prompts("train", args.prompts, seed=0)
    results, reference = {}, None
    for name, pipe in pipes.items():
        start, pictures, scores = time.perf_counter(), [], []
        for seed, prompt in enumerate(prompts):
            image = pipe(prompt, num_inference_steps=args.steps, guidance_scale=EMBEDDED_SCALE, seed=seed,
                         watermark=False).images[0]
            pictures.append(np.asarray(image.convert("RGB")))
            scores.append(score(check_image(pictures[-1]), parse_caption(prompt)))
        seconds = time.perf_counter() - start
        reference = reference or pictures
        results[name] = {"seconds": seconds, "psnr": [psnr(a, b) for a, b in zip(pictures, reference)],
                         "all right": summarise(scores)["all"]}
    for row in results.values():
        row["time ratio"] = row["seconds"] / results["fp32"]["seconds"]
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=common.DEFAULT_WORKDIR)
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bf16", action="store_true",
                        help="also --precision bf16 in the quality table (for a CPU with AVX512_BF16 or AMX)")
    parser.add_argument("--attention-min-keys", type=int,
                        help="in the quality table, run attention in bf16 by rows from this many keys (1: every "
                             "attention of the embedded model, whose native size never reaches the shipped "
                             f"{attention.BF16_BY_ROWS_MIN_KEYS}; needs a CPU with bf16 arithmetic)")
    parser.add_argument("--skip-quality", action="store_true", help="the full-size speed table only")
    args = parser.parse_args()
    print(common.use_our_process_settings())
    print(f"int8 inputs: {activation_levels()} levels ({'VNNI' if activation_levels() == 255 else 'no VNNI: 7 bits'})")
    if args.sizes:
        print("\none guided UNet call (batch 2), SD 1.x UNet, random weights:")
        print("| size | variant | seconds | time / fp32 |\n|---|---|---|---|")
        for size, table in speed(args):
            for name, (seconds, ratio) in table.items():
                print(f"| {size}x{size} | {name} | {seconds:.2f} | {ratio:.3f} |", flush=True)
    if not args.skip_quality:
        print_quality(quality(args), args)


def print_quality(table: dict, args):
    print(f"\nembedded model, {args.prompts} prompts (seen split), DDIM {args.steps} steps, scale {EMBEDDED_SCALE}:")
    print("| variant | PSNR vs fp32, mean (min) dB | all right | time / fp32 |\n|---|---|---|---|")
    for name, row in table.items():
        finite = [value for value in row["psnr"] if math.isfinite(value)]
        shown = f"{np.mean(finite):.1f} ({min(finite):.1f})" if finite else "identical"
        print(f"| {name} | {shown} | {row['all right']:.1%} | {row['time ratio']:.2f} |")


if __name__ == "__main__":
    main()
