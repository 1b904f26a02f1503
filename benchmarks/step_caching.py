"""Step caching (--deepcache) and token merging (--token_merging_ratio): what each saves per step, and what
it costs the picture, side by side in one run.

    flock /tmp/bigmem.lock python benchmarks/step_caching.py [--size 512] [--repeats 2] [--prompts 16]

1. Speed, on a random-weight full-size SD 1.x UNet (the checkpoint benchmarks/load.py writes into
   --workdir), fp32 on the CPU with our scripts' process settings: one guided sampling step (a batch-2 UNet
   call at --size, the guidance and the DDIM update) plain, as a full DeepCache step (the deep outputs
   kept), as a cached DeepCache step (the shallow branch), and with token merging at each --ratios. The
   calls alternate, median of --repeats. A step of --deepcache N costs (full + (N - 1) x cached) / N on
   average. Every figure is a ratio to the plain step: the machine may be shared, the ratios hold.
2. Quality, on the embedded model (models/ldm/shapes-ldm): --prompts prompts of the shapes grammar (the seen
   split, drawn as scripts/evaluate_adherence.py draws them) in one batch, DDIM --steps, scale 5, seed k
   for prompt k: the PSNR of each option's picture against the plain one (mean over the prompts), and the
   rule-based checker's score (ldm.data.adherence; "all right" = all five attributes read back), with the
   wall time of the whole set as a ratio to plain.
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars (read when tqdm is imported)
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
from ldm.generate.run import Job, run  # noqa: E402
from ldm.generate.txt2img import TextToImage  # noqa: E402
from ldm.pipeline import Pipeline, PicturesInMemory  # noqa: E402

EMBEDDED = REPO_ROOT / "models" / "ldm" / "shapes-ldm" / "model.ckpt"
GUIDANCE_SCALE = 7.5
EMBEDDED_SCALE = 5.0  # evaluate_adherence's
STEP_TIMESTEP = 500  # mid-schedule; the UNet's cost does not depend on t
QUALITY_OPTIONS = {
    "plain": Speedups(),
    "DeepCache 2": Speedups(deepcache=2),
    "DeepCache 3": Speedups(deepcache=3),
    "DeepCache 5": Speedups(deepcache=5),
    "DeepCache 3 non-uniform": Speedups(deepcache=3, deepcache_schedule="non-uniform"),
    "ToMe 0.3": Speedups(token_merging_ratio=0.3),
    "ToMe 0.5": Speedups(token_merging_ratio=0.5),
    "DeepCache 3 + ToMe 0.5": Speedups(deepcache=3, token_merging_ratio=0.5),
}


# --- 1. speed on a full-size UNet -------------------------------------------------------------------------------
def one_step(model, x, cond, uncond):
    """A step function: one guided DDIM step from STEP_TIMESTEP, as the samplers run it."""
    denoiser = GuidedDenoiser(model, cond, uncond, GUIDANCE_SCALE, dtype=torch.float32, device="cpu")
    return lambda: sample_ddim(denoiser, x, [STEP_TIMESTEP])


def speed(args) -> dict:
    model = load_model(common.sd1_checkpoint(args.workdir, "fp32"), common.SD1_CONFIG, "cpu", torch.float32,
                       log=lambda line: None).model
    return step_ratios(model, args.size, args.ratios, args.intervals, args.repeats)


def step_ratios(model, size: int, ratios, intervals, repeats: int) -> dict:
    """Seconds of one plain guided step, and every variant's time as a ratio to it, all timed in one
    alternation (so that a machine whose load changes during the run changes them alike)."""
    unet = model.model.diffusion_model
    context_dim = unet.input_blocks[1][-1].transformer_blocks[0].attn2.to_k.in_features
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, size // 8, size // 8, generator=generator)
    cond, uncond = (torch.randn(1, 77, context_dim, generator=generator) for _ in range(2))
    step = one_step(model, x, cond, uncond)
    cache = StepCache(unet, full={0})

    def full():
        cache.steps, cache.kept_shape = 0, None
        step()

    def cached():
        cache.steps = 1
        step()

    def uncached(function):  # the cache stays entered for the run: its kept outputs are the cached steps'
        def run():
            runner, unet.block_runner = unet.block_runner, None
            try:
                function()
            finally:
                unet.block_runner = runner
        return run

    def merged(ratio):
        def run():
            with for_pass(Speedups(token_merging_ratio=ratio), unet, 1, seed=0):
                step()
        return run

    with torch.inference_mode(), cache:  # alternate's warm-up runs the full step before the cached one
        times = common.alternate({"plain": uncached(step), **{f"ToMe {ratio}": uncached(merged(ratio)) for ratio in ratios},
                                  "DeepCache full step": full, "DeepCache cached step": cached}, repeats)
    base = times["plain"]
    rows = {name: seconds / base for name, seconds in times.items()}
    for interval in intervals:
        rows[f"DeepCache {interval} (mean step)"] = (rows["DeepCache full step"]
                                                     + (interval - 1) * rows["DeepCache cached step"]) / interval
    return {"base seconds": base, "rows": rows}


def step_flops(size: int) -> dict:
    """FLOPs of a cached DeepCache step as a share of a plain one (a batch-2 SD 1.x UNet call at `size`,
    counted by torch's FlopCounterMode on a meta-device UNet: no weights, no machine in the figure)."""
    from omegaconf import OmegaConf
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    params = OmegaConf.to_container(OmegaConf.load(common.SD1_CONFIG).model.params.unet_config.params)
    with torch.device("meta"):
        unet = UNetModel(**params).eval()
        x, t, context = torch.randn(2, 4, size // 8, size // 8), torch.tensor([500, 500]), torch.randn(2, 77, 768)

    def counted() -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(x, t, context=context)
        return counter.get_total_flops()

    plain = counted()
    with StepCache(unet, full={0}) as cache:
        counted()  # the full step: keeps the deep outputs
        cache.steps = 1
        cached = counted()
    return {"plain TFLOP": plain / 1e12, "cached share": cached / plain}


# --- 2. quality on the embedded model ---------------------------------------------------------------------------
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def quality(args) -> dict:
    from evaluate_adherence import draw_prompts

    pipe = Pipeline.from_pretrained(EMBEDDED, device="cpu", log=lambda line: None)
    prompts = draw_prompts("train", args.prompts, seed=0)
    targets = [parse_caption(prompt) for prompt in prompts]
    results, plain_pictures = {}, None
    for name, speedups in QUALITY_OPTIONS.items():
        # one batch of all the prompts: image k has seed k (A1111's seed + k), as alone with --seed k
        job = Job(batches=[prompts], steps=args.steps, scale=EMBEDDED_SCALE, height=64, width=64, seed=0,
                  watermark=False, save_grid=False, speedups=speedups)
        pictures = PicturesInMemory()
        start = time.perf_counter()
        run(job, TextToImage(), pipe.loaded, pictures, log=lambda line: None)
        seconds = time.perf_counter() - start
        arrays = [np.asarray(image.convert("RGB")) for image in pictures.images]
        plain_pictures = plain_pictures or arrays
        scores = [score(check_image(array), target) for array, target in zip(arrays, targets)]
        results[name] = {"seconds": seconds,
                         "psnr": float(np.mean([psnr(a, b) for a, b in zip(arrays, plain_pictures)])),
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
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-speed", action="store_true", help="the embedded model's table only (no 4 GB UNet)")
    parser.add_argument("--skip-quality", action="store_true", help="the full-size UNet's table only")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default 0: our scripts' setting, one per physical core); 1 keeps the "
                             "small embedded model from waiting on a busy machine's other core")
    args = parser.parse_args()
    print(common.use_our_process_settings())
    if args.threads:
        torch.set_num_threads(args.threads)
        print(f"torch threads set to {args.threads}")
    flops = step_flops(args.size)
    print(f"\nFLOPs, SD 1.x UNet at {args.size}x{args.size}, batch 2: plain {flops['plain TFLOP']:.3f} TFLOP; a cached "
          f"step {flops['cached share']:.3f} of it; mean step of --deepcache N: " + ", ".join(
              f"N={n} {(1 + (n - 1) * flops['cached share']) / n:.3f}" for n in args.intervals))
    if not args.skip_speed:
        measured = speed(args)
        print(f"\none guided step, SD 1.x UNet fp32 at {args.size}x{args.size}: plain {measured['base seconds']:.2f} s")
        print("| step | time / plain step |\n|---|---|")
        for name, ratio in measured["rows"].items():
            print(f"| {name} | {ratio:.3f} |")
    if args.skip_quality:
        return
    table = quality(args)
    print(f"\nembedded model, {args.prompts} prompts (seen split), DDIM {args.steps} steps, scale {EMBEDDED_SCALE}:")
    print("| option | PSNR vs plain (dB) | all right | time / plain |\n|---|---|---|---|")
    for name, row in table.items():
        value = "identical" if math.isinf(row["psnr"]) else f"{row['psnr']:.1f}"
        print(f"| {name} | {value} | {row['all right']:.1%} | {row['time ratio']:.2f} |")


if __name__ == "__main__":
    main()
