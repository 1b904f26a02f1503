"""Checkpoint loading, ours against diffusers': time and peak memory for an SD 1.x-size checkpoint.

    python benchmarks/load.py [--workdir /tmp/ldm-bench] [--repeats 2]

Writes once, into --workdir, an SD 1.x checkpoint (v1-inference.yaml, 1.07 B parameters) with random
weights in four files: .safetensors and .ckpt, each fp32 and fp16 (about 13 GB in all). Then loads each
file with both implementations, alternating ours and theirs, each load in a fresh Python process so that
its peak resident memory (VmHWM from /proc/self/status) is its own. Prints the medians over --repeats (the first load of a file is sometimes 2-3x slower than the next).

- Ours: `ldm.checkpoint.load_model(path, config_path=v1-inference.yaml)` (what `--ckpt ... --config ...`
  runs). On a CPU it copies the convolution kernels into the channels-last layout (paid once here, it
  speeds up every later convolution) and gives back the file's pages under every copy it makes.
- Theirs: `StableDiffusionPipeline.from_single_file(path, config=<local diffusers configs>,
  local_files_only=True, torch_dtype=torch.float32)`, diffusers' own single-file path, which is what a
  diffusers user runs on an original checkpoint. It needs the diffusers-format component configs of
  SD 1.5; with no hub access they are written locally from the same YAML by diffusers' own functions
  (`create_unet_diffusers_config_from_ldm`, ...), with a tokenizer made from our BPE vocabulary. The
  safety checker is left out (`safety_checker=None`), as ours has none.
- Theirs + channels-last: the same, then `.to(memory_format=torch.channels_last)` on the UNet and VAE, the
  layout diffusers' CPU advice asks for and the one our loader gives: the like-for-like comparison, since
  a model in the plain layout pays the kernels' reorder inside every convolution instead.
- Floor: no model at all, only the file's tensors made what ours makes of them (fp32, convolution kernels
  channels-last): what no loader with our result can beat on this machine (mostly page faults: the kernels'
  2.7 GB are written into fresh memory).

All give fp32 models on a CPU, whatever the file's dtype. A memory-mapped loader can return before it has
read the weights, paying later at the first denoising step; so the time and peak memory measured here run
until every weight has been read once (one value per memory page), which is when each model is ready to
sample. The page cache is warm: each file is read once before its loads are measured. Python imports are
not timed, but they are in the peak memory (both sides import torch and transformers).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
V1_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
IMPLEMENTATIONS = ("ours", "theirs", "theirs-channels-last", "floor")
FILES = [("safetensors", "fp32"), ("safetensors", "fp16"), ("ckpt", "fp32"), ("ckpt", "fp16")]
PAGE_SIZE = 4096


def checkpoint_path(workdir: Path, file_format: str, dtype: str) -> Path:
    return workdir / f"sd1-random-{dtype}.{file_format}"


def diffusers_config_dir(workdir: Path) -> Path:
    return workdir / "diffusers-sd1-config"


# --- preparing the files (once) ---------------------------------------------------------------------------
def random_sd1_state_dict():
    """Every parameter of the SD 1.x layout, uniformly random with standard deviation 1/sqrt(fan_in)."""
    from omegaconf import OmegaConf

    from ldm.checkpoint import parameters_on_meta
    from ldm.util import instantiate_from_config

    with parameters_on_meta():
        model = instantiate_from_config(OmegaConf.load(V1_CONFIG).model, use_ema=False)
    generator = torch.Generator().manual_seed(0)
    state_dict = {}
    for key, template in model.state_dict().items():
        if template.device.type != "meta":  # the noise schedule
            state_dict[key] = template.clone()
            continue
        half_width = math.sqrt(3 / template[0].numel()) if template.ndim >= 2 else 0.1
        state_dict[key] = torch.empty(template.shape).uniform_(-half_width, half_width, generator=generator)
    return state_dict


def write_checkpoints(workdir: Path):
    import safetensors.torch

    missing = [(f, d) for f, d in FILES if not checkpoint_path(workdir, f, d).exists()]
    if not missing:
        return
    print(f"writing random SD 1.x checkpoints to {workdir} (once)", flush=True)
    state_dicts = {"fp32": random_sd1_state_dict()}
    state_dicts["fp16"] = {key: tensor.half() for key, tensor in state_dicts["fp32"].items()}
    for file_format, dtype in missing:
        path = checkpoint_path(workdir, file_format, dtype)
        partial = path.with_name(path.name + ".partial")  # an interrupted write is never taken for a file
        if file_format == "safetensors":
            safetensors.torch.save_file(state_dicts[dtype], partial)
        else:
            torch.save({"state_dict": state_dicts[dtype], "global_step": 0}, partial)
        partial.rename(path)


def write_diffusers_configs(workdir: Path):
    """The diffusers-format configs of SD 1.x, made offline from the original YAML by diffusers' own functions."""
    target = diffusers_config_dir(workdir)
    if (target / "model_index.json").exists():
        return
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from omegaconf import OmegaConf
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ldm.checkpoint import read_checkpoint
    from ldm.modules.encoders.modules import VIT_L_14_TEXT_CONFIG
    from ldm.modules.encoders.tokenizer import get_tokenizer

    original_config = OmegaConf.to_container(OmegaConf.load(V1_CONFIG), resolve=True)
    # diffusers' config functions look at a few of the checkpoint's keys; memory-mapped, nothing is read.
    checkpoint_keys, _ = read_checkpoint(checkpoint_path(workdir, "safetensors", "fp16"))
    with init_empty_weights():
        unet = UNet2DConditionModel(**create_unet_diffusers_config_from_ldm(original_config, checkpoint_keys))
        vae = AutoencoderKL(**create_vae_diffusers_config_from_ldm(original_config, checkpoint_keys))
        text_encoder = CLIPTextModel(CLIPTextConfig(**VIT_L_14_TEXT_CONFIG))
    ours = get_tokenizer()
    merges = sorted(ours.merge_rank, key=ours.merge_rank.get)  # best first, as in a merges.txt
    tokenizer = CLIPTokenizer(vocab=dict(ours.symbol_to_id), merges=merges, pad_token="<|endoftext|>")
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_config(target)
    for name, component in (("unet", unet), ("vae", vae), ("scheduler", scheduler)):
        component.save_config(target / name)
    text_encoder.config.save_pretrained(target / "text_encoder")
    tokenizer.save_pretrained(target / "tokenizer")


# --- one measured load, in a child process ----------------------------------------------------------------
def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def read_every_page(parameters) -> None:
    """Touch one value per memory page of every weight: what the first denoising step would page in.

    Through a flat view of the tensor's memory, not reshape(-1), which would copy a channels-last kernel.
    """
    for parameter in parameters:
        assert parameter.is_contiguous() or parameter.is_contiguous(memory_format=torch.channels_last)
        flat = torch.as_strided(parameter.detach(), (parameter.numel(),), (1,))  # dense: every element once
        float(flat[:: max(1, PAGE_SIZE // flat.element_size())].sum())


def load_ours(path: Path):
    from ldm.checkpoint import load_model
    from ldm.modules.encoders import modules  # noqa: F401  (transformers) imported untimed, like diffusers

    def run():
        model = load_model(path, config_path=V1_CONFIG, log=lambda message: None).model
        return list(model.parameters())

    return run


def load_theirs(path: Path, config_dir: Path, channels_last: bool):
    from diffusers import StableDiffusionPipeline

    def run():
        pipeline = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        if channels_last:  # what diffusers' CPU advice adds, and what our loader does for its kernels
            pipeline.unet.to(memory_format=torch.channels_last)
            pipeline.vae.to(memory_format=torch.channels_last)
        return [p for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder) for p in module.parameters()]

    return run


def load_tensors_only(path: Path):
    """The floor for any loader that gives what ours gives: the file's tensors as fp32 in the process's own
    memory (none left a view of the file, which a truncation of the file would turn into SIGBUS),
    convolution kernels channels-last, and no model built around them (no modules, no key or value checks,
    no pages given back)."""
    from ldm.checkpoint import read_checkpoint
    from ldm.placement import channels_last_kernel

    def run():
        state_dict, _metadata = read_checkpoint(path)
        tensors = [t for t in state_dict.values() if t.is_floating_point()]
        placed = [channels_last_kernel(t, torch.float32) if t.dim() == 4 else t.float() for t in tensors]
        return [new.clone() if new.data_ptr() == old.data_ptr() else new for new, old in zip(placed, tensors)]

    return run


def measure_in_this_process(implementation: str, path: Path, config_dir: Path) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if implementation == "ours":
        run = load_ours(path)
    elif implementation == "floor":
        run = load_tensors_only(path)
    else:
        run = load_theirs(path, config_dir, channels_last=implementation == "theirs-channels-last")
    start = time.perf_counter()
    parameters = run()
    read_every_page(parameters)
    seconds = time.perf_counter() - start
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in parameters})
    return {"seconds": seconds, "peak_rss": peak_rss_bytes(), "dtypes": dtypes,
            "parameters": sum(p.numel() for p in parameters), "threads": torch.get_num_threads()}


def measure_in_a_fresh_process(implementation: str, path: Path, config_dir: Path) -> dict:
    command = [sys.executable, __file__, "--child", implementation, str(path), "--config-dir", str(config_dir)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{implementation} failed to load {path.name}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the comparison ------------------------------------------------------------------------------------------
def warm_page_cache(path: Path):
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def compare(workdir: Path, repeats: int):
    rows = []
    for file_format, dtype in FILES:
        path = checkpoint_path(workdir, file_format, dtype)
        warm_page_cache(path)
        runs = {implementation: [] for implementation in IMPLEMENTATIONS}
        for _ in range(repeats):
            for implementation in IMPLEMENTATIONS:
                result = measure_in_a_fresh_process(implementation, path, diffusers_config_dir(workdir))
                runs[implementation].append(result)
                print(f"  {path.name:28s} {implementation:20s} {result['seconds']:6.1f} s  "
                      f"peak {gigabytes(result['peak_rss'])}  {result['dtypes']}", flush=True)
        rows.append((file_format, dtype, path.stat().st_size, runs))
    print_table(rows, repeats)


def print_table(rows, repeats: int):
    header = ["file", "ours", "diffusers", "ours ÷ diffusers", "diffusers + channels-last", "ours ÷ that",
              "floor", "floor ÷ diffusers", "peak RSS ours / diffusers / + c-l", "file size"]
    lines = [header]
    for file_format, dtype, size, runs in rows:
        seconds = {side: statistics.median(r["seconds"] for r in runs[side]) for side in IMPLEMENTATIONS}
        peaks = " / ".join(gigabytes(statistics.median(r["peak_rss"] for r in runs[side])) for side in IMPLEMENTATIONS[:3])
        lines.append([
            f"{dtype} .{file_format}", f"{seconds['ours']:.2f} s", f"{seconds['theirs']:.2f} s",
            f"{seconds['ours'] / seconds['theirs']:.2f}", f"{seconds['theirs-channels-last']:.2f} s",
            f"{seconds['ours'] / seconds['theirs-channels-last']:.2f}", f"{seconds['floor']:.2f} s",
            f"{seconds['floor'] / seconds['theirs']:.2f}", peaks, gigabytes(size),
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(f"\nMedians of {repeats} loads each; time and peak RSS until every weight has been read once; "
          "all give fp32 models; ours stores convolution kernels channels-last, as the third column does.")
    for i, line in enumerate(lines):
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (width + 2) for width in widths) + "|")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ldm-bench"),
                        help="where the random checkpoints are written once and kept (about 13 GB)")
    parser.add_argument("--repeats", type=int, default=3, help="loads per implementation and file")
    parser.add_argument("--child", nargs=2, metavar=("IMPLEMENTATION", "CHECKPOINT"), help=argparse.SUPPRESS)
    parser.add_argument("--config-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        implementation, path = args.child
        print(json.dumps(measure_in_this_process(implementation, Path(path), args.config_dir)))
        return
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.workdir.mkdir(parents=True, exist_ok=True)
    write_checkpoints(args.workdir)
    write_diffusers_configs(args.workdir)
    compare(args.workdir, args.repeats)


if __name__ == "__main__":
    main()
