"""Sampling speed and memory on a CPU, ours against diffusers', on one random full-size SD 1.x checkpoint.

    python benchmarks/sampling_speed.py [--sizes 256 512] [--repeats 3] [--end-to-end-size 512]

1. Peak: the fastest dense kernel, best of a few, before and after the steps in this run (the machine is
   shared: every figure below is relative to what the CPU gives at the time): MKL's 4096x4096 matmul and
   oneDNN's 320-channel 3x3 convolution at 64x64, in each precision asked for.
2. One sampling step with classifier-free guidance (a batch-2 UNet call, the guidance and the DDIM update)
   at each size, fp32 and bf16. Ours: `load_model` with dtype fp32 / bf16 (what `--precision full|bf16`
   loads). Theirs: UNet2DConditionModel from diffusers' single-file conversion functions, in channels-last
   memory format (faster for them on a CPU), and the same model `.to(torch.bfloat16)`. Ours and theirs are
   timed alternately, median of --repeats; achieved FLOP/s (counted by torch's FlopCounterMode on our UNet,
   attention included) as a fraction of both same-dtype peaks. Our fp32 guided output must equal theirs
   (rel. err. < 1e-4).
   Both run in this process with our scripts' process settings (threads = physical cores, glibc keeping
   freed memory for reuse), which help diffusers as much as us: the ratio is the models' own.
3. End to end, each in a fresh process (peak RSS = VmHWM of that process, loading included): 20 DDIM steps
   with text encoding and VAE decode. Ours: `ldm.generate` txt2img (what scripts/txt2img.py runs, with its
   process settings; with --low-memory also as `--lowmem` runs it); theirs:
   StableDiffusionPipeline built from the same converted components and a DDIM scheduler set up like the
   originals, fed the same start noise.
4. The PSNR of our bf16 image against our fp32 image (same seed, same start noise), and of our fp32 image
   against diffusers' fp32 image.
The checkpoint is written once by benchmarks/load.py into --workdir and reused.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository on sys.path and sets HF_HUB_OFFLINE)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils import flop_counter  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from ldm.checkpoint import load_model  # noqa: E402
from ldm.generate.loading import use_physical_cores  # noqa: E402
from ldm.models.diffusion.sampling import GuidedDenoiser, sample_ddim  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GUIDANCE_SCALE = 7.5
STEP_TIMESTEP_INDEX = 10  # a mid-schedule step of 20: the UNet's cost does not depend on t
PROMPT = "a photograph of an astronaut riding a horse"
SEED = 42
MAX_RELATIVE_ERROR = 1e-4


# --- 1. the machine's peak ------------------------------------------------------------------------------------
def best_flops(function, flops: int, repeats: int = 3) -> float:
    """FLOP/s of the fastest of `repeats` calls, after one warm-up."""
    function()
    return flops / min(common.seconds(function) for _ in range(repeats))


def dense_peaks(dtype) -> dict:
    """The fastest dense kernels the CPU gives now: MKL's 4096² matmul, and oneDNN's 3×3 convolution at the
    UNet's first level (320 channels, 64², batch 2, channels-last), which here outruns the matmul."""
    n, channels, side = 4096, 320, 64
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    image = torch.randn(2, channels, side, side).to(dtype).contiguous(memory_format=torch.channels_last)
    kernel = torch.randn(channels, channels, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return {"matmul": best_flops(lambda: a @ b, 2 * n**3),
                "conv": best_flops(lambda: F.conv2d(image, kernel, padding=1), 2 * 2 * channels**2 * 9 * side**2)}


def describe_peaks(peaks: dict) -> str:
    return ", ".join(f"{precision} " + ", ".join(f"{kernel} {flops / 1e9:.0f}" for kernel, flops in kernels.items())
                     + " GFLOP/s" for precision, kernels in peaks.items())


# --- 2. one sampling step -------------------------------------------------------------------------------------
class StepInputs:
    """One latent, a text context for [uncond, cond], and the DDIM timestep of a 20-step schedule."""

    def __init__(self, size: int, scheduler):
        generator = torch.Generator().manual_seed(SEED)
        self.latent = torch.randn(1, 4, size // 8, size // 8, generator=generator)
        self.context = torch.randn(2, 77, 768, generator=generator)
        scheduler.set_timesteps(20)
        self.timestep = int(scheduler.timesteps[STEP_TIMESTEP_INDEX])


def our_guided_output(model, inputs: StepInputs, dtype):
    """The guided model output (eps) that our DDIM step uses."""
    denoiser = GuidedDenoiser(model, inputs.context[1:].to(dtype), inputs.context[:1].to(dtype), GUIDANCE_SCALE,
                              dtype=dtype, device="cpu")
    return denoiser(inputs.latent, inputs.timestep)[0]


def our_step_only(model, inputs: StepInputs, dtype):
    denoiser = GuidedDenoiser(model, inputs.context[1:].to(dtype), inputs.context[:1].to(dtype), GUIDANCE_SCALE,
                              dtype=dtype, device="cpu")
    return lambda: sample_ddim(denoiser, inputs.latent, np.array([inputs.timestep]))


def their_step_only(unet, scheduler, inputs: StepInputs, dtype):
    """The loop body of StableDiffusionPipeline: batch-2 UNet call, guidance, scheduler.step."""
    context = inputs.context.to(dtype)

    def step():
        latent_input = torch.cat([inputs.latent] * 2).to(dtype)
        output = unet(latent_input, inputs.timestep, encoder_hidden_states=context).sample.float()
        uncond, cond = output.chunk(2)
        guided = uncond + GUIDANCE_SCALE * (cond - uncond)
        return scheduler.step(guided, inputs.timestep, inputs.latent).prev_sample, guided

    return step


def unet_flops(model, inputs: StepInputs) -> int:
    """Multiply-adds x 2 of one batch-2 UNet call, as torch counts them (convolutions, matmuls, attention)."""
    unet = model.model.diffusion_model
    latent = torch.cat([inputs.latent] * 2)
    # torch counts no FLOPs for the CPU's own flash-attention op (16 % of a 512² call): count it as the
    # CUDA flash op is counted, two matmuls over every query-key pair.
    def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops}
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention)
    with counter:
        unet(latent, torch.full((2,), inputs.timestep), inputs.context)
    return counter.get_total_flops()


def relative_error(ours, theirs) -> float:
    return ((ours.double() - theirs.double()).norm() / theirs.double().norm()).item()


def step_benchmark(args) -> list[dict]:
    checkpoint_path = common.sd1_checkpoint(args.workdir, "fp32")
    ours = {precision: load_model(checkpoint_path, common.SD1_CONFIG, "cpu", DTYPES[precision], log=lambda m: None).model
            for precision in args.precisions}
    checkpoint = common.read_original_checkpoint(checkpoint_path)
    their_fp32 = common.diffusers_unet(checkpoint).to(memory_format=torch.channels_last)
    theirs = {"fp32": their_fp32}
    if "bf16" in args.precisions:
        theirs["bf16"] = common.diffusers_unet(checkpoint).to(torch.bfloat16, memory_format=torch.channels_last)
    scheduler = common.ddim_scheduler()
    rows = []
    for size in args.sizes:
        inputs = StepInputs(size, scheduler)
        with torch.inference_mode():
            flops = unet_flops(ours["fp32"], inputs) if "fp32" in ours else None
            if "fp32" in ours:
                our_output = our_guided_output(ours["fp32"], inputs, torch.float32)
                _, their_output = their_step_only(theirs["fp32"], scheduler, inputs, torch.float32)()
                error = relative_error(our_output, their_output)
                print(f"{size}x{size}: our fp32 guided output vs diffusers': relative error {error:.1e}", flush=True)
            for precision in args.precisions:
                dtype = DTYPES[precision]
                steps = {"ours": our_step_only(ours[precision], inputs, dtype),
                         "theirs": their_step_only(theirs[precision], scheduler, inputs, dtype)}
                times = {"ours": [], "theirs": []}
                for side in steps:  # warm-up: oneDNN picks and caches its kernels on the first call
                    steps[side]()
                for _ in range(args.repeats):
                    for side in steps:
                        times[side].append(common.seconds(steps[side]))
                row = {"size": size, "precision": precision, "flops": flops,
                       "ours": statistics.median(times["ours"]), "theirs": statistics.median(times["theirs"]),
                       "all": times, "error": error if precision == "fp32" else None}
                print(f"  {precision}: ours {row['ours']:.2f} s, theirs {row['theirs']:.2f} s "
                      f"(all: {json.dumps({k: [round(t, 2) for t in v] for k, v in times.items()})})", flush=True)
                rows.append(row)
    return rows


# --- 3. end to end, each in a fresh process --------------------------------------------------------------------
def end_to_end_in_this_process(side: str, precision: str, size: int, steps: int, workdir: Path,
                               checkpoint_path: Path, image_path: Path) -> dict:
    """Load, then time text encoding + `steps` DDIM steps + VAE decode; write the image; peak RSS."""
    threads = use_physical_cores()
    start = time.perf_counter()
    if side.startswith("ours"):
        from ldm.generate.loading import load
        from ldm.generate.output import OutputFolder
        from ldm.generate.run import Job
        from ldm.generate.txt2img import run_txt2img

        loaded = load(str(checkpoint_path), str(common.SD1_CONFIG), "cpu", precision, log=lambda m: None,
                      low_memory=side == "ours-lowmem")
        loaded_at = time.perf_counter()
        folder = OutputFolder(workdir / f"images-{side}-{precision}-{os.getpid()}")
        job = Job(batches=[[PROMPT]], steps=steps, scale=GUIDANCE_SCALE, height=size, width=size, seed=SEED,
                  save_grid=False, watermark=False)
        report = run_txt2img(job, loaded, folder, log=lambda m: None)
        generated_at = time.perf_counter()
        image = np.asarray(__import__("PIL.Image").Image.open(report.saved[0]).convert("RGB"))
    else:
        pipeline = their_pipeline(checkpoint_path, workdir, DTYPES[precision])
        loaded_at = time.perf_counter()
        latents = torch.randn([1, 4, size // 8, size // 8], generator=torch.Generator().manual_seed(SEED))
        with torch.inference_mode():
            result = pipeline(PROMPT, height=size, width=size, num_inference_steps=steps,
                              guidance_scale=GUIDANCE_SCALE, latents=latents.to(DTYPES[precision]), output_type="np")
        generated_at = time.perf_counter()
        image = (np.clip(result.images[0], 0, 1) * 255).round().astype(np.uint8)
    np.save(image_path, image)
    return {"load_s": loaded_at - start, "generate_s": generated_at - loaded_at, "peak_rss": common.peak_rss_bytes(),
            "threads": threads}


def their_pipeline(checkpoint_path: Path, workdir: Path, dtype):
    from diffusers import StableDiffusionPipeline

    checkpoint = common.read_original_checkpoint(checkpoint_path)
    pipeline = StableDiffusionPipeline(
        vae=common.diffusers_vae(checkpoint), text_encoder=common.diffusers_text_encoder(checkpoint),
        tokenizer=common.clip_tokenizer(workdir), unet=common.diffusers_unet(checkpoint),
        scheduler=common.ddim_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.unet.to(dtype, memory_format=torch.channels_last)
    pipeline.vae.to(dtype, memory_format=torch.channels_last)
    pipeline.text_encoder.to(dtype)
    return pipeline


def end_to_end_in_a_fresh_process(side, precision, args, checkpoint_path) -> dict:
    label = f"{side}-{precision}" + ("-from-fp16-file" if "fp16" in checkpoint_path.name else "")
    image_path = args.workdir / f"image-{label}-{args.end_to_end_size}.npy"
    command = [sys.executable, __file__, "--child", side, precision, str(checkpoint_path), str(image_path),
               "--end-to-end-size", str(args.end_to_end_size), "--steps", str(args.steps),
               "--workdir", str(args.workdir)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    file_bytes_per_weight = 2 if "fp16" in checkpoint_path.name else 4
    result.update(label=label, image=image_path, checkpoint=checkpoint_path.stat().st_size,
                  weights=checkpoint_path.stat().st_size * DTYPES[precision].itemsize // file_bytes_per_weight)
    print(f"  {label}: load {result['load_s']:.1f} s, generate {result['generate_s']:.1f} s, "
          f"peak RSS {result['peak_rss'] / 1e9:.2f} GB", flush=True)
    return result


def psnr(image, reference) -> float:
    mse = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# --- tables -------------------------------------------------------------------------------------------------
def markdown(header, rows) -> str:
    widths = [max(len(str(line[i])) for line in [header] + rows) for i in range(len(header))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in [header] + rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def fractions_of_peaks(row, seconds: float) -> str:
    if not row["flops"]:
        return "-"
    return " / ".join(f"{row['flops'] / seconds / row['peaks'][kernel]:.0%}" for kernel in ("matmul", "best"))


def step_table(rows) -> str:
    fp32_theirs = {row["size"]: row["theirs"] for row in rows if row["precision"] == "fp32"}
    table = []
    for row in rows:
        versus_fp32 = f"{row['ours'] / fp32_theirs[row['size']]:.2f}" if row["size"] in fp32_theirs else "-"
        table.append([f"{row['size']}²", row["precision"], f"{row['ours']:.2f} s", f"{row['theirs']:.2f} s",
                      f"{row['ours'] / row['theirs']:.2f}", versus_fp32,
                      fractions_of_peaks(row, row["ours"]), fractions_of_peaks(row, row["theirs"]),
                      f"{row['error']:.1e}" if row["error"] is not None else "-"])
    return markdown(["size", "dtype", "ours / step", "diffusers / step", "ours ÷ diffusers", "ours ÷ diffusers fp32",
                     "ours % of peak (matmul / best)", "diffusers % of peak (matmul / best)", "fp32 rel. err."], table)


def end_to_end_table(results) -> str:
    reference = next((r for r in results if r["label"] == "theirs-fp32"), None)
    rows = []
    for r in results:
        ratio = f"{r['generate_s'] / reference['generate_s']:.2f}" if reference else "-"
        rows.append([r["label"], f"{r['load_s']:.1f} s", f"{r['generate_s']:.1f} s", ratio,
                     f"{r['peak_rss'] / 1e9:.2f} GB", f"{r['checkpoint'] / 1e9:.2f} GB", f"{r['weights'] / 1e9:.2f} GB",
                     f"{r['peak_rss'] / r['weights']:.2f}"])
    return markdown(["run", "load", "generate (text + steps + decode)", "÷ diffusers fp32", "peak RSS",
                     "checkpoint file", "weights in the run's dtype", "peak RSS ÷ weights"], rows)


# --- the whole comparison -------------------------------------------------------------------------------------
def steps_with_peaks(args) -> tuple[list[dict], dict]:
    """The step timings, and per precision the matmul peak and the fastest dense kernel before or after them."""
    before = {precision: dense_peaks(DTYPES[precision]) for precision in args.precisions}
    print("peak before the steps: " + describe_peaks(before), flush=True)
    rows = step_benchmark(args)
    after = {precision: dense_peaks(DTYPES[precision]) for precision in args.precisions}
    print("peak after the steps: " + describe_peaks(after), flush=True)
    peaks = {precision: {"matmul": max(before[precision]["matmul"], after[precision]["matmul"]),
                         "best": max(*before[precision].values(), *after[precision].values())} for precision in before}
    for row in rows:
        row["peaks"] = peaks[row["precision"]]
    return rows, peaks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=common.DEFAULT_WORKDIR, help="where the checkpoint is kept")
    parser.add_argument("--sizes", type=int, nargs="*", default=[256], help="image sizes for the step timing (256 512)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per side, alternating (median)")
    parser.add_argument("--end-to-end-size", type=int, default=512, help="image size end to end; 0 skips it")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps end to end")
    parser.add_argument("--fp16-checkpoint", action="store_true",
                        help="also run ours end to end from the fp16 checkpoint (peak RSS for small machines)")
    parser.add_argument("--low-memory", action="store_true",
                        help="also run ours end to end with --lowmem, from each checkpoint above")
    parser.add_argument("--child", nargs=4, metavar=("SIDE", "PRECISION", "CHECKPOINT", "IMAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, precision, checkpoint_path, image_path = args.child
        result = end_to_end_in_this_process(side, precision, args.end_to_end_size, args.steps, args.workdir,
                                            Path(checkpoint_path), Path(image_path))
        print(json.dumps(result))
        return

    # As our scripts do; in this process it speeds diffusers' steps as much as ours.
    print(common.use_our_process_settings(), flush=True)
    rows, peaks = steps_with_peaks(args) if args.sizes else ([], {})

    results = []
    if args.end_to_end_size:
        print(f"end to end, {args.end_to_end_size}x{args.end_to_end_size}, {args.steps} steps:", flush=True)
        checkpoint_path = common.sd1_checkpoint(args.workdir, "fp32")
        runs = [("theirs", "fp32")] + [("ours", precision) for precision in args.precisions]
        results = [end_to_end_in_a_fresh_process(side, precision, args, checkpoint_path) for side, precision in runs]
        if args.fp16_checkpoint:
            fp16_checkpoint = common.sd1_checkpoint(args.workdir, "fp16")
            results += [end_to_end_in_a_fresh_process("ours", precision, args, fp16_checkpoint) for precision in args.precisions]
        if args.low_memory:
            files = [checkpoint_path] + ([common.sd1_checkpoint(args.workdir, "fp16")] if args.fp16_checkpoint else [])
            results += [end_to_end_in_a_fresh_process("ours-lowmem", precision, args, path)
                        for path in files for precision in args.precisions]

    if rows:
        print(f"\nOne sampling step with guidance (batch-2 UNet call + DDIM update), median of {args.repeats}, "
              f"alternating; peaks of this run, before or after: the 4096² matmul and the fastest dense kernel "
              f"({describe_peaks(peaks)}):")
        print(step_table(rows))
    if results:
        images = {r["label"]: np.load(r["image"]) for r in results}
        print(f"\nEnd to end, {args.end_to_end_size}x{args.end_to_end_size}, {args.steps} DDIM steps, scale "
              f"{GUIDANCE_SCALE}, one image, each run in a fresh process:")
        print(end_to_end_table(results))
        comparisons = [("ours-bf16", "ours-fp32"), ("ours-fp32", "theirs-fp32"), ("ours-bf16-from-fp16-file", "ours-bf16")]
        comparisons += [(label, label.replace("ours-lowmem", "ours")) for label in images if label.startswith("ours-lowmem")]
        for label, reference in comparisons:
            if label in images and reference in images:
                print(f"PSNR {label} vs {reference}: {psnr(images[label], images[reference]):.1f} dB")


if __name__ == "__main__":
    main()
