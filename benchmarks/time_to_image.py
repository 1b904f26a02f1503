"""Time to a picture on a CPU: whole recipes end to end, ours beside diffusers', on one random full-size SD 1.x checkpoint.

    flock /tmp/bigmem.lock python benchmarks/time_to_image.py [--recipes a b c1 c4 d] [--size 512] [--repeats 1]
    flock /tmp/bigmem.lock python benchmarks/time_to_image.py --quick    # 256x256 and fewer steps: a smaller run

Recipes (fp32, or both sides in bf16 with --precision bf16, one picture, prompt -> pixels):
  a   20 steps DPM++ 2M Karras, CFG 7.5, full VAE
  b   the same, decoded by TAESD (random TAESD weights; diffusers' AutoencoderTiny with the same file)
  c1  turbo-style: 1 step Euler a on trailing timesteps (our SGM Uniform), CFG 1 (no unconditional half), TAESD
  c4  the same with 4 steps
  d   50 steps PLMS, CFG 7.5, full VAE: the CompVis baseline (diffusers: PNDM with skip_prk_steps)
Ours: `Pipeline.from_pretrained` and one call (what scripts/txt2img.py runs). Theirs: StableDiffusionPipeline
built from the same file by diffusers' own single-file conversion functions and locally made configs (no
network), with the matching scheduler, fed the same start noise. Each (recipe, side) runs in a fresh process
with our scripts' process settings (they help diffusers as much as us): load, then one generate call, and
the process's peak RSS (VmHWM, loading included). The two sides alternate, recipe by recipe, --repeats
times; medians. The ratios are what holds on a shared machine; the seconds are this run's.

Also in the same run, each in its own process:
- the fp32 matmul peak (a 4096x4096 sgemm, best of 3, before and after) and one guided sampling step of ours
  (a batch-2 UNet call, guidance, DDIM update) at --size: its FLOP/s as a share of that peak;
- the VAE decode of a --vae-size picture, our AutoencoderKL against diffusers', alternating, with the
  relative difference of the two outputs;
- with `openvino` importable, OpenVINO's guided UNet call at --size, converted from the same diffusers UNet
  (an optional column: the benchmark runs without it).
"""
import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository on sys.path and sets HF_HUB_OFFLINE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sampling_speed import StepInputs, best_flops, markdown, our_step_only, psnr, relative_error, unet_flops  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
SEED = 42
MATMUL_SIDE = 4096
TAESD_SEED = 3
BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             prediction_type="epsilon")


@dataclass(frozen=True)
class Recipe:
    title: str
    steps: int
    quick_steps: int
    scale: float
    sampler: str  # ours, as --sampler takes it
    schedule: str
    tiny_vae: bool

    def their_scheduler(self):
        import diffusers

        if self.sampler == "dpmpp_2m":
            return diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                                         use_karras_sigmas=True)
        if self.sampler == "euler_a":
            return diffusers.EulerAncestralDiscreteScheduler(**BETAS, timestep_spacing="trailing")
        return diffusers.PNDMScheduler(**BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)


RECIPES = {
    "a": Recipe("DPM++ 2M Karras, full VAE", 20, 4, 7.5, "dpmpp_2m", "karras", False),
    "b": Recipe("DPM++ 2M Karras, TAESD", 20, 4, 7.5, "dpmpp_2m", "karras", True),
    "c1": Recipe("turbo-style Euler a, CFG 1, TAESD", 1, 1, 1.0, "euler_a", "sgm_uniform", True),
    "c4": Recipe("turbo-style Euler a, CFG 1, TAESD", 4, 4, 1.0, "euler_a", "sgm_uniform", True),
    "d": Recipe("PLMS (CompVis baseline), full VAE", 50, 8, 7.5, "plms", "automatic", False),
}


def tiny_vae_folder(workdir: Path) -> Path:
    """diffusers' AutoencoderTiny with seeded random weights, saved once as a diffusers folder (ours reads it too)."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    folder = Path(workdir) / "taesd-random"
    if not (folder / "diffusion_pytorch_model.safetensors").is_file():
        torch.manual_seed(TAESD_SEED)
        model = AutoencoderTiny()
        folder.mkdir(parents=True, exist_ok=True)
        model.save_config(folder)
        save_file({key: value.contiguous() for key, value in model.state_dict().items()},
                  str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


# --- one recipe, in a child process ------------------------------------------------------------------------
def our_picture(recipe: Recipe, steps: int, size: int, checkpoint_path: Path, workdir: Path, precision: str):
    from ldm.pipeline import Pipeline

    quiet = lambda line: None  # noqa: E731
    vae = str(tiny_vae_folder(workdir)) if recipe.tiny_vae else None
    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(checkpoint_path, config=common.SD1_CONFIG, device="cpu",
                                    precision="full" if precision == "fp32" else precision,
                                    vae=vae, log=quiet)
    loaded_at = time.perf_counter()
    image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=recipe.scale, height=size, width=size, seed=SEED,
                 sampler=recipe.sampler, schedule=recipe.schedule, watermark=False).images[0]
    return loaded_at - start, time.perf_counter() - loaded_at, np.asarray(image.convert("RGB"))


def their_pipeline(recipe: Recipe, checkpoint_path: Path, workdir: Path):
    from diffusers import AutoencoderTiny, StableDiffusionPipeline
    from safetensors.torch import load_file

    checkpoint = common.read_original_checkpoint(checkpoint_path)
    if recipe.tiny_vae:
        vae = AutoencoderTiny().eval().requires_grad_(False)  # its default config: SD's TAESD
        vae.load_state_dict(load_file(tiny_vae_folder(workdir) / "diffusion_pytorch_model.safetensors"))
    else:
        vae = common.diffusers_vae(checkpoint)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=common.diffusers_text_encoder(checkpoint), tokenizer=common.clip_tokenizer(workdir),
        unet=common.diffusers_unet(checkpoint), scheduler=recipe.their_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.unet.to(memory_format=torch.channels_last)  # faster for them on a CPU
    pipeline.vae.to(memory_format=torch.channels_last)
    return pipeline


def their_picture(recipe: Recipe, steps: int, size: int, checkpoint_path: Path, workdir: Path, precision: str):
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    start = time.perf_counter()
    pipeline = their_pipeline(recipe, checkpoint_path, workdir).to(dtype=dtype)
    loaded_at = time.perf_counter()
    latents = torch.randn([1, 4, size // 8, size // 8], generator=torch.Generator().manual_seed(SEED)).to(dtype)
    with torch.inference_mode():
        result = pipeline(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=recipe.scale,
                          latents=latents, output_type="np")
    image = (np.clip(result.images[0], 0, 1) * 255).round().astype(np.uint8)
    return loaded_at - start, time.perf_counter() - loaded_at, image


def run_recipe(name: str, side: str, args) -> dict:
    recipe, steps = RECIPES[name], recipe_steps(name, args)
    picture = our_picture if side == "ours" else their_picture
    load_s, generate_s, image = picture(recipe, steps, args.size, common.sd1_checkpoint(args.workdir), args.workdir,
                                        args.precision)
    image_path = args.workdir / f"time-to-image-{name}-{side}-{args.size}-{args.precision}.npy"
    np.save(image_path, image)
    return {"load_s": load_s, "generate_s": generate_s, "peak_rss": common.peak_rss_bytes(), "image": str(image_path)}


def recipe_steps(name: str, args) -> int:
    return RECIPES[name].quick_steps if args.quick else RECIPES[name].steps


# --- the peak and our UNet's share of it, the VAE decode, OpenVINO: each in a child process ----------------
def matmul_peak() -> float:
    a, b = torch.randn(MATMUL_SIDE, MATMUL_SIDE), torch.randn(MATMUL_SIDE, MATMUL_SIDE)
    with torch.inference_mode():
        return best_flops(lambda: a @ b, 2 * MATMUL_SIDE**3)


def unet_share(args) -> dict:
    from ldm.checkpoint import load_model

    peak_before = matmul_peak()
    model = load_model(common.sd1_checkpoint(args.workdir), common.SD1_CONFIG, "cpu", torch.float32,
                       log=lambda line: None).model
    inputs = StepInputs(args.size, common.ddim_scheduler())
    with torch.inference_mode():
        flops = unet_flops(model, inputs)
        step_s = common.alternate({"ours": our_step_only(model, inputs, torch.float32)}, args.repeats)["ours"]
    return {"flops": flops, "step_s": step_s, "peak": max(peak_before, matmul_peak())}


def our_autoencoder(checkpoint: dict):
    from omegaconf import OmegaConf

    from ldm.placement import place_weights
    from ldm.util import instantiate_from_config

    prefix = "first_stage_model."
    with torch.device("meta"):
        autoencoder = instantiate_from_config(OmegaConf.load(common.SD1_CONFIG).model.params.first_stage_config)
    weights = {key[len(prefix):]: value for key, value in checkpoint.items() if key.startswith(prefix)}
    autoencoder.load_state_dict(weights, strict=True, assign=True)
    # As our loader places it: channels-last kernels, copied out of the mapped file.
    return place_weights(autoencoder.eval().requires_grad_(False), "cpu", torch.float32, channels_last=True)


def vae_decode(args) -> dict:
    """Our AutoencoderKL decode beside diffusers' (as their pipeline holds it, channels-last), alternating."""
    checkpoint = common.read_original_checkpoint(common.sd1_checkpoint(args.workdir))
    ours, theirs = our_autoencoder(checkpoint), common.diffusers_vae(checkpoint).to(memory_format=torch.channels_last)
    del checkpoint
    latent = args.vae_size // 8
    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(SEED)) / common.LATENT_SCALE
    with torch.inference_mode():
        error = relative_error(ours.decode(z), theirs.decode(z).sample)
        times = common.alternate({"ours": lambda: ours.decode(z), "theirs": lambda: theirs.decode(z)}, args.repeats)
    return {**times, "error": error}


def openvino_step(args) -> dict:
    """OpenVINO's guided UNet call (batch 2) at --size, converted from the same diffusers UNet."""
    from step_vs_openvino import openvino_call

    args.profile = False
    return {"step_s": common.alternate({"openvino": openvino_call(args)}, args.repeats)["openvino"]}


CHILDREN = {"unet-share": unet_share, "vae-decode": vae_decode, "openvino": openvino_step}


def in_a_fresh_process(task: list[str], args) -> dict:
    command = [sys.executable, __file__, "--child", *task, "--workdir", str(args.workdir), "--size", str(args.size),
               "--vae-size", str(args.vae_size), "--repeats", str(args.repeats),
               "--precision", args.precision] + (["--quick"] if args.quick else [])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(task)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {' '.join(task)}: " + ", ".join(f"{key} {value:.4g}" for key, value in result.items()
                                               if isinstance(value, (int, float))), flush=True)
    return result


# --- tables -------------------------------------------------------------------------------------------------
def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def recipe_table(results: dict, args) -> str:
    rows = []
    for name, sides in results.items():
        ours, theirs = sides["ours"], sides["theirs"]
        o_gen, t_gen = median_of(ours, "generate_s"), median_of(theirs, "generate_s")
        o_all, t_all = o_gen + median_of(ours, "load_s"), t_gen + median_of(theirs, "load_s")
        o_rss, t_rss = median_of(ours, "peak_rss"), median_of(theirs, "peak_rss")
        similarity = psnr(np.load(ours[0]["image"]), np.load(theirs[0]["image"]))
        rows.append([f"({name}) {RECIPES[name].title}", recipe_steps(name, args), f"{o_gen:.1f} s", f"{t_gen:.1f} s",
                     f"{o_gen / t_gen:.2f}", f"{o_all:.1f} s", f"{t_all:.1f} s", f"{o_all / t_all:.2f}",
                     f"{o_rss / 1e9:.2f} GB", f"{t_rss / 1e9:.2f} GB", f"{o_rss / t_rss:.2f}", f"{similarity:.1f} dB"])
    return markdown(["recipe", "steps", "ours: generate", "diffusers: generate", "ours ÷ diffusers",
                     "ours: load + generate", "diffusers: load + generate", "ours ÷ diffusers", "ours: peak RSS",
                     "diffusers: peak RSS", "ours ÷ diffusers", "PSNR ours vs diffusers"], rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=common.DEFAULT_WORKDIR, help="where the checkpoint is kept")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--size", type=int, default=None, help="picture side (default 512; --quick: 256)")
    parser.add_argument("--vae-size", type=int, default=512, help="picture side of the VAE decode comparison; 0 skips it")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each recipe and side, alternating (median)")
    parser.add_argument("--quick", action="store_true", help="256x256 and fewer steps (a, b: 4; d: 8)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="the recipes' dtype, both sides (bf16 pays only on a CPU with AVX512_BF16 or AMX); the "
                             "peak, UNet share, OpenVINO and VAE lines stay fp32")
    parser.add_argument("--skip-peak", action="store_true", help="no matmul peak and UNet share")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or (256 if args.quick else 512)
    settings = common.use_our_process_settings()
    if args.child:
        name = args.child[0]
        result = CHILDREN[name](args) if name in CHILDREN else run_recipe(name, args.child[1], args)
        print(json.dumps(result))
        return

    print(settings, flush=True)
    common.sd1_checkpoint(args.workdir)
    tiny_vae_folder(args.workdir)
    results = {name: {"ours": [], "theirs": []} for name in args.recipes}
    for _ in range(args.repeats):
        for name in args.recipes:
            for side in ("ours", "theirs"):
                results[name][side].append(in_a_fresh_process([name, side], args))
    share = None if args.skip_peak else in_a_fresh_process(["unet-share"], args)
    with_openvino = importlib.util.find_spec("openvino") is not None
    openvino = in_a_fresh_process(["openvino"], args) if with_openvino and not args.skip_peak else None
    decode = in_a_fresh_process(["vae-decode"], args) if args.vae_size else None

    print(f"\nWhole recipes at {args.size}x{args.size}, {args.precision}, one picture, each run in a fresh process, "
          f"median of {args.repeats}, ours and diffusers alternating (PSNR: how alike the two pictures are, informative only):")
    print(recipe_table(results, args))
    if share:
        achieved = share["flops"] / share["step_s"]
        print(f"\nfp32 matmul peak ({MATMUL_SIDE}² sgemm, best before or after): {share['peak'] / 1e9:.0f} GFLOP/s; our "
              f"guided step at {args.size}x{args.size} (batch-2 UNet call + DDIM update): {share['step_s']:.2f} s, "
              f"{share['flops'] / 1e12:.2f} TFLOP, {achieved / 1e9:.0f} GFLOP/s = {achieved / share['peak']:.0%} of the peak")
    if openvino:
        print(f"OpenVINO guided UNet call at {args.size}x{args.size}: {openvino['step_s']:.2f} s "
              f"(ours ÷ OpenVINO {share['step_s'] / openvino['step_s']:.2f})")
    elif not args.skip_peak:
        print("OpenVINO: not installed (pip install openvino for its column)")
    if decode:
        print(f"\nVAE decode at {args.vae_size}x{args.vae_size}, median of {args.repeats}, alternating: ours "
              f"{decode['ours']:.2f} s, diffusers {decode['theirs']:.2f} s, ours ÷ diffusers "
              f"{decode['ours'] / decode['theirs']:.2f} (outputs' relative difference {decode['error']:.1e})")


if __name__ == "__main__":
    main()
