"""--precision int8: the loaded model's UNet on int8 kernels (ldm.quantization).

Each layer's input range is measured on every call (dynamic): on the embedded model that kept the picture
far closer to fp32's than static ranges calibrated over whole sampling runs (one range for all timesteps
is too wide for most of them), at the same speed, as the kernels here cannot fuse a static quantization
into the layers around them. Static ranges remain for the Python API and the benchmark (`calibrated=True`):
calibrated once per checkpoint by a few short guided sampling runs and kept in a JSON file keyed by the
model hash (numbers only: reading it runs nothing), so that later loads of the same file skip calibration.
"""
import json
import math
import os
from pathlib import Path

import torch

from ldm.generate.conditioning import Conditioner
from ldm.generate.errors import UserError
from ldm.models.diffusion.sampling import GuidedDenoiser, sample_ddim
from ldm.quantization import InputRanges, activation_levels, int8_kernels_available, quantizable_layers, \
    quantize_unet

# Varied subjects and styles, and one caption of the embedded model's shapes grammar: calibration only needs
# activations in the ranges real prompts reach.
CALIBRATION_PROMPTS = ("a photograph of an astronaut riding a horse on a beach at sunset",
                       "a red circle above a small blue square")
CALIBRATION_STEPS = 6
CALIBRATION_SCALE = 7.5
CALIBRATION_SEED = 0
CACHE_FORMAT = "ldm int8 input ranges 1"  # changes whenever calibration does, so stale files are not read


def cache_file(model_hash: str, levels: int) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldm" / "int8"
    return cache / f"{model_hash}-{levels}-levels.json"


def read_cached_ranges(path: Path, layer_names) -> InputRanges | None:
    """The ranges kept in `path` when it holds one finite (low, high) pair for each of `layer_names`; None
    for a missing, unreadable, stale or foreign file (calibration runs again and replaces it)."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    layers = stored.get("layers") if isinstance(stored, dict) and stored.get("format") == CACHE_FORMAT else None
    if not isinstance(layers, dict):
        return None
    if set(layers) != set(layer_names):
        return None
    ranges = {}
    for name, pair in layers.items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair)
                and all(map(math.isfinite, pair)) and pair[0] <= pair[1]):
            return None
        ranges[name] = (float(pair[0]), float(pair[1]))
    return InputRanges(ranges)


def write_cached_ranges(path: Path, ranges: InputRanges):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".{os.getpid()}.partial")
        partial.write_text(json.dumps({"format": CACHE_FORMAT, "layers": ranges.ranges}))
        os.replace(partial, path)
    except OSError:
        pass  # a read-only home only costs calibrating again next time


def calibrate(loaded, prompts=CALIBRATION_PROMPTS, steps: int = CALIBRATION_STEPS, log=print) -> InputRanges:
    """Each quantizable UNet layer's input range over a short guided DDIM run of each prompt, at half the
    model's native size (the ranges hardly depend on the size; the cost does)."""
    unet = loaded.model.model.diffusion_model
    ranges = InputRanges()
    conditioner = Conditioner(loaded, log)
    cond = conditioner(list(prompts)).scheduled(steps)
    uncond = conditioner([""] * len(prompts)).scheduled(steps)
    latent_side = max(8, loaded.native_size // 2 // loaded.downsampling_factor)
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    x = torch.randn(len(prompts), loaded.latent_channels, latent_side, latent_side, generator=generator)
    loaded.use("model")
    denoiser = GuidedDenoiser(loaded.model, cond, uncond, CALIBRATION_SCALE, dtype=loaded.dtype, device=loaded.device)
    total = loaded.model.num_timesteps
    timesteps = list(range(1, total, total // steps))
    with ranges.recording(quantizable_layers(unet)), torch.inference_mode():
        sample_ddim(denoiser, x.to(loaded.device), timesteps)
    return ranges


def check_settings(device: torch.device, low_memory: bool):
    """One line for a device, torch or memory mode int8 cannot serve."""
    if device.type != "cpu":
        raise UserError(f"--precision int8 runs on the CPU (oneDNN's int8 kernels), not on {device.type}: "
                        "use --device cpu, or --precision autocast on a GPU")
    if not int8_kernels_available():
        raise UserError(f"this torch ({torch.__version__}) has no oneDNN int8 kernels: use --precision full")
    if low_memory:
        raise UserError("--precision int8 keeps the whole UNet quantized in memory, which --lowmem's one component "
                        "at a time would undo: drop --lowmem (the int8 UNet needs a quarter of fp32's weights)")


def check_supported(loaded, low_memory: bool):
    """check_settings, and one line for a model family int8 is not made for."""
    check_settings(loaded.device, low_memory)
    if loaded.kind != "text-to-image":
        raise UserError(f"--precision int8 is made for text-to-image models, and {loaded.ckpt_path.name} is "
                        f"a{'n' if loaded.kind[0] in 'aeiox' else ''} {loaded.kind} model: use --precision full")


def calibrated_ranges(loaded, log=print) -> InputRanges:
    """The static input ranges of the loaded model's UNet: from the cache, or calibrated now and kept."""
    path = cache_file(loaded.hash, activation_levels())
    ranges = read_cached_ranges(path, quantizable_layers(loaded.model.model.diffusion_model))
    if ranges is None:
        log(f"int8: calibrating the UNet's input ranges on {len(CALIBRATION_PROMPTS)} prompts x "
            f"{CALIBRATION_STEPS} steps (once for this checkpoint; kept in {path})")
        ranges = calibrate(loaded, log=log)
        write_cached_ranges(path, ranges)
    return ranges


def quantize_loaded(loaded, log=print, low_memory=False, calibrated=False) -> int:
    """Turn the loaded model's UNet to int8 in place, with input ranges measured on each call, or static
    ones (`calibrated_ranges`) when `calibrated`; returns how many layers were turned."""
    check_supported(loaded, low_memory)
    levels = activation_levels()
    ranges = calibrated_ranges(loaded, log) if calibrated else None
    count = quantize_unet(loaded.model.model.diffusion_model, ranges, levels)
    bits = "8-bit" if levels == 255 else "7-bit (this CPU has no VNNI)"
    log(f"int8: {count} UNet layers on int8 kernels, {bits} inputs; the picture differs slightly from fp32's")
    loaded.quantized = "int8"
    return count
