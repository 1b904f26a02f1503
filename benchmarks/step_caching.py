"""Step caching (--deepcache) and token merging (--token_merging_ratio): what each saves per step, and what
it costs the picture, side by side in one run.

    flock /tmp/bigmem.lock python benchmarks/step_caching.py [--size 512] [--repeats 2] [--prompts 24]

1. Speed, on a random-weight full-size SD 1.x UNet (the checkpoint benchmarks/load.py writes into
   --workdir), fp32 on the CPU with our scripts' process settings: one guided sampling step (a batch-2 UNet
   call at --size, the guidance and the DDIM update) plain, as a full DeepCache step (the deep outputs
   kept), as a cached DeepCache step (the shallow branch), and with token merging at each --ratios. The
   calls alternate, median of --repeats. A step of --deepcache N costs (full + (N - 1) x cached) / N on
   average. Every figure is a ratio to the plain step: the machine may be shared, the ratios hold.
2. Quality, on the embedded model (models/ldm/shapes-ldm): --prompts prompts of the shapes grammar (the seen
   split, drawn as scripts/evaluate_adherence.py draws them), one picture each, DDIM --steps, scale 5, seed
   k for prompt k: the PSNR of each option's picture against the plain one (mean over the prompts), and the
   rule-based checker's score (ldm.data.adherence; "all right" = all five attributes read back), with the
   wall time of the whole set as a ratio to plain.
"""
import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import common  # noqa: E402  (puts the repository on sys.path and sets HF_HUB_OFFLINE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm.checkpoint import REPO_ROOT, load_model  # noqa: E402
from ldm.data.adherence import check_image, parse_caption, score, summarise  # noqa: E402
from ldm.generate.speedups import Speedups, for_pass  # noqa: E402
from ldm.models.diffusion.sampling import GuidedDenoiser, sample_ddim  # noqa: E402
from ldm.models.diffusion.step_cache import StepCache  # noqa: E402
from ldm.pipeline import Pipeline  # noqa: E402

EMBEDDED = REPO_ROOT / "models" / "ldm" / "shapes-ldm" / "model.ckpt"
GUIDANCE_SCALE = 7.5
EMBEDDED_SCALE = 5.0  # evaluate_adherence's
STEP_TIMESTEP = 500  # mid-schedule; the UNet's cost does not depend on t
QUALITY_OPTIONS = {  # name -> the Pipeline keywords
    "plain": {},
    "DeepCache 2": dict(deepcache=2),
    "DeepCache 3": dict(deepcache=3),
    "DeepCache 5": dict(deepcache=5),
    "DeepCache 3 non-uniform": dict(deepcache=3, deepcache_schedule="non-uniform"),
    "ToMe 0.3": dict(token_merging_ratio=0.3),
    "ToMe 0.5": dict(token_merging_ratio=0.5),
    "DeepCache 3 + ToMe 0.5": dict(deepcache=3, token_merging_ratio=0.5),
}


# --- 1. speed on a full-size UNet -------------------------------------------------------------------------------
def one_step(model, x, cond, uncond):
    """A step function: one guided DDIM step from STEP_TIMESTEP, as the samplers run it."""
    denoiser = GuidedDenoiser(model, cond, uncond, GUIDANCE_SCALE, dtype=torch.float32, device="cpu")
    return lambda: sample_ddim(denoiser, x, [STEP_TIMESTEP])


def speed(args) -> dict:
    model = load_model(common.sd1_checkpoint(args.workdir, "fp32"), common.SD1_CONFIG, "cpu", torch.float32,
                       log=lambda line: None).model
    unet = model.model.diffusion_model
    generator = torch.Generator().manual_seed(0)
    latent = args.size // 8
    x = torch.randn(1, 4, latent, latent, generator=generator)
    cond, uncond = (torch.randn(1, 77, 768, generator=generator) for _ in range(2))
    step = one_step(model, x, cond, uncond)
    cache = StepCache(unet, full={0})

    def full():
        cache.steps, cache.kept_shape = 0, None
        step()

    def cached():
        cache.steps = 1
        step()

    def merged(ratio):
        def run():
            with for_pass(Speedups(token_merging_ratio=ratio), unet, 1, seed=0):
                step()
        return run

    with torch.inference_mode():
        functions = {"plain": step, **{f"ToMe {ratio}": merged(ratio) for ratio in args.ratios}}
        times = common.alternate(functions, args.repeats)
        with cache:  # alternate's warm-up full step fills the cache for the cached ones
            times.update(common.alternate({"DeepCache full step": full, "DeepCache cached step": cached},
                                          args.repeats))
        times["plain (again)"] = common.alternate({"plain": step}, args.repeats)["plain"]
    base = (times["plain"] + times["plain (again)"]) / 2
    for interval in args.intervals:
        times[f"DeepCache {interval} (mean step)"] = (
            times["DeepCache full step"] + (interval - 1) * times["DeepCache cached step"]) / interval
    return {"base seconds": base, "rows": {name: seconds / base for name, seconds in times.items()}}


# --- 2. quality on the embedded model ---------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def quality(args) -> dict:
    from evaluate_adherence import draw_prompts

    pipe = Pipeline.from_pretrained(EMBEDDED, device="cpu", log=lambda line: None)
    prompts = draw_prompts("train", args.prompts, seed=0)
    results, plain_pictures = {}, None
    for name, keywords in QUALITY_OPTIONS.items():
        start, pictures, scores = time.perf_counter(), [], []
        for seed, prompt in enumerate(prompts):
            image = pipe(prompt, num_inference_steps=args.steps, guidance_scale=EMBEDDED_SCALE, seed=seed,
                         watermark=False, **keywords).images[0]
            pictures.append(np.asarray(image.convert("RGB")))
            scores.append(score(check_image(pictures[-1]), parse_caption(prompt)))
        seconds = time.perf_counter() - start
        plain_pictures = plain_pictures or pictures
        results[name] = {"seconds": seconds,
                         "psnr": float(np.mean([psnr(a, b) for a, b in zip(pictures, plain_pictures)])),
                         "all right": summarise(scores)["all"]}
    base = results["plain"]["seconds"]
    for row in results.values():
        row["time ratio"] = row["seconds"] / base
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=common.DEFAULT_WORKDIR)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-speed", action="store_true", help="the embedded model's table only (no 4 GB UNet)")
    args = parser.parse_args()
    print(common.use_our_process_settings())
    if not args.skip_speed:
        measured = speed(args)
        print(f"\none guided step, SD 1.x UNet fp32 at {args.size}x{args.size}: plain {measured['base seconds']:.2f} s")
        print("| step | time / plain step |\n|---|---|")
        for name, ratio in measured["rows"].items():
            print(f"| {name} | {ratio:.3f} |")
    table = quality(args)
    print(f"\nembedded model, {args.prompts} prompts (seen split), DDIM {args.steps} steps, scale {EMBEDDED_SCALE}:")
    print("| option | PSNR vs plain (dB) | all right | time / plain |\n|---|---|---|---|")
    for name, row in table.items():
        value = "identical" if math.isinf(row["psnr"]) else f"{row['psnr']:.1f}"
        print(f"| {name} | {value} | {row['all right']:.1%} | {row['time ratio']:.2f} |")


if __name__ == "__main__":
    main()
