"""Whether a run fits in memory: its peak estimated from the model's architecture, checked before allocating.

The estimate (`estimate_peak`) counts, at the run's dtype:
- the weights: before loading, from the checkpoint file (a .safetensors header's shapes, exact; a pickle
  checkpoint's size, assumed fp32, which overcounts files that also hold EMA weights or optimizer state);
  after loading they are already in use, so only what --lowmem converts on demand (its largest part) counts;
  the ControlNets, loaded after the model (with --lowmem beside the UNet), count in both;
- the sampler's latents: a few copies of [batch, C, H/f, W/f] in fp32;
- the UNet's activations for batch x 2 (guidance: the conditional and unconditional halves in one call) at
  H/f x W/f: 16 x model_channels values per latent pixel (the top-level transformer's feed-forward: its
  input, norm and 8x-wide GEGLU projection), plus oneDNN/cuDNN scratch of a tenth of the UNet's weights.
  Attention scores are not counted: the fused kernels never hold them whole, bf16 attention by rows (ldm.modules.
  attention) one 8 MB block at a time;
- the VAE decoder's activations at H x W for the batch (or one TILE_PIXELS tile of it when the decode is
  tiled, see ldm.models.tiling): 2 x the upsampled channels + 4 x the top level's channels per output pixel
  (the first full-size residual block's input, norm, convolutions and shortcut), plus scratch of a tenth of
  its weights, and the decoded fp32 output.
The UNet's and the decoder's activations are not held at once: the peak takes the larger.
Not counted: the text encoder's activations (77 tokens), and an init image's encode and depth2img's depth
estimate, which run once on one picture and hold less than the decoder's full-size working set.

Checked against the peak resident memory of one UNet call or one decode (over what the weights hold) of
the SD 1.x architecture at 256^2 and 512^2, where it erred by about 10 % either way; the tiny test model's
decoder is measured again by tests/test_argument_checks.py. The tiny UNet's few MiB are below a fixed
overhead of the framework that is not counted. A run is refused only when the estimate exceeds what is
available by REFUSE_ABOVE.

Available memory: CUDA's free memory (torch.cuda.mem_get_info), a CPU's MemAvailable (/proc/meminfo), or
free pages (os.sysconf) where there is no /proc. Set LDM_SKIP_MEMORY_CHECK=1 to run anyway.
"""
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ldm.cpu import available_cpu_memory
from ldm.generate.errors import UserError
from ldm.models.tiling import TILE_PIXELS, needs_tiling

SKIP_CHECK_ENV = "LDM_SKIP_MEMORY_CHECK"
REFUSE_ABOVE = 1.2  # the estimate must exceed what is available by this factor to refuse (its error is ~10 %)
SCRATCH_FRACTION = 0.1  # of a network's weights: convolution workspaces and reordered weights
LATENT_COPIES = 8  # x, the noise, the denoised estimate and PLMS's / DPM's history of model outputs
UNET_VALUES_PER_CHANNEL = 16  # per latent pixel and model channel, see the module docstring
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # a .safetensors header's names; other tensors are not weights
SD_UNET_SHARE, SD_AUTOENCODER_SHARE = 0.81, 0.08  # of SD 1.x's parameters (the text encoder has the rest)
GIB = 1024 ** 3


@dataclass(frozen=True)
class Architecture:
    """What the estimate needs of a model config (SD 1.x's values by default)."""
    latent_channels: int = 4
    factor: int = 8  # the autoencoder's downsampling
    native_size: int = 512
    unet_channels: int = 320
    vae_channels: int = 128
    vae_channel_mult: tuple = (1, 2, 4, 4)
    timesteps: int = 1000

    @classmethod
    def from_config(cls, config) -> "Architecture":
        """From a model YAML (the whole file or its `model` section, a dict or OmegaConf); missing values keep
        SD 1.x's."""
        config = config.get("model", config) if hasattr(config, "get") else {}
        params = config.get("params") or {}
        unet = (params.get("unet_config") or {}).get("params") or {}
        vae = ((params.get("first_stage_config") or {}).get("params") or {}).get("ddconfig") or {}
        default = cls()
        mult = tuple(vae.get("ch_mult") or default.vae_channel_mult)
        factor = 2 ** (len(mult) - 1)
        return cls(latent_channels=int(params.get("channels") or default.latent_channels), factor=factor,
                   native_size=int(params.get("image_size") or default.native_size // factor) * factor,
                   unet_channels=int(unet.get("model_channels") or default.unet_channels),
                   vae_channels=int(vae.get("ch") or default.vae_channels), vae_channel_mult=mult,
                   timesteps=int(params.get("timesteps") or default.timesteps))

    def unet_activations(self, batch: int, height: int, width: int, itemsize: int) -> int:
        latent_pixels = (height // self.factor) * (width // self.factor)
        return UNET_VALUES_PER_CHANNEL * self.unet_channels * latent_pixels * batch * itemsize

    def decoder_activations(self, batch: int, height: int, width: int, itemsize: int) -> int:
        upsampled = self.vae_channels * self.vae_channel_mult[min(1, len(self.vae_channel_mult) - 1)]
        top = self.vae_channels * self.vae_channel_mult[0]
        return (2 * upsampled + 4 * top) * height * width * batch * itemsize


@dataclass
class Weights:
    """Bytes of the UNet, the autoencoder and everything else, at the run's dtype."""
    unet: int
    autoencoder: int
    other: int

    @property
    def total(self) -> int:
        return self.unet + self.autoencoder + self.other

    @classmethod
    def of_model(cls, model: torch.nn.Module, itemsize: int) -> "Weights":
        def size(module):
            return sum(p.numel() for p in module.parameters()) * itemsize if module is not None else 0
        unet, autoencoder = size(getattr(model, "model", None)), size(getattr(model, "first_stage_model", None))
        return cls(unet, autoencoder, size(model) - unet - autoencoder)

    @classmethod
    def of_file(cls, path, itemsize: int) -> "Weights":
        """From a .safetensors header (EMA copies left out), or a pickle checkpoint's size taken as fp32 and
        split in SD 1.x's shares."""
        path = Path(path)
        if path.suffix != ".safetensors":
            try:
                total = path.stat().st_size * itemsize // 4
            except OSError:
                return cls(0, 0, 0)  # the loader says what is wrong
            unet, autoencoder = int(total * SD_UNET_SHARE), int(total * SD_AUTOENCODER_SHARE)
            return cls(unet, autoencoder, total - unet - autoencoder)
        parts = {"model.diffusion_model.": 0, "first_stage_model.": 0, "": 0}
        try:
            with safe_open(str(path), "pt") as file:
                for name in file.keys():
                    tensor = file.get_slice(name)
                    if not name.startswith("model_ema.") and tensor.get_dtype() in FLOAT_DTYPES:
                        prefix = next(p for p in parts if name.startswith(p))
                        parts[prefix] += math.prod(tensor.get_shape()) * itemsize
        except Exception:  # noqa: BLE001 - any malformed file: the loader refuses it with the reason
            return cls(0, 0, 0)
        return cls(*parts.values())


@dataclass
class Run:
    """What one run allocates; height and width are the output's size."""
    architecture: Architecture
    weights: Weights
    batch: int
    height: int
    width: int
    itemsize: int
    guidance: bool = True
    lowmem: bool = False
    weights_loaded: bool = False  # then they are already in use, except what --lowmem converts on demand
    control: int = 0  # bytes of the ControlNets (loaded with the UNet, after the model; --lowmem too)

    def with_(self, **changes) -> "Run":
        return Run(**{**self.__dict__, **changes})


def estimate_peak(run: Run) -> dict:
    """The run's peak in bytes, by part: {"weights", "latents", "unet", "decoder", "peak"}."""
    arch, weights = run.architecture, run.weights
    if run.lowmem:
        resident = max(weights.unet + run.control, weights.autoencoder, weights.other)
    else:
        resident = (0 if run.weights_loaded else weights.total) + run.control
    latent_pixels = (run.height // arch.factor) * (run.width // arch.factor)
    latents = LATENT_COPIES * run.batch * arch.latent_channels * latent_pixels * 4
    unet_batch = run.batch * (2 if run.guidance else 1)
    unet = arch.unet_activations(unet_batch, run.height, run.width, run.itemsize)
    unet += int(SCRATCH_FRACTION * weights.unet)
    tiled = needs_tiling((run.height // arch.factor, run.width // arch.factor), arch.factor)
    decode_height, decode_width = (min(run.height, TILE_PIXELS), min(run.width, TILE_PIXELS)) if tiled else \
        (run.height, run.width)
    decoder = arch.decoder_activations(run.batch, decode_height, decode_width, run.itemsize)
    decoder += int(SCRATCH_FRACTION * weights.autoencoder)
    decoder += (2 if tiled else 1) * run.batch * 3 * run.height * run.width * 4  # fp32 output (and its weights' sum)
    parts = {"weights": resident, "latents": latents, "unet": unet, "decoder": decoder}
    parts["peak"] = resident + latents + max(unet, decoder)
    return parts


def available_memory(device: torch.device) -> int:
    """Bytes this run can still allocate on `device`."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_cpu_memory()


def largest_fitting(fits, low: int, high: int) -> int | None:
    """The largest n in low..high with fits(n), fits being monotone (true up to some n); None if not even low."""
    if not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def check_fits(run: Run, device: torch.device, size_advice, available: int | None = None):
    """Refuse, in one line, a run whose estimated peak clearly exceeds the memory available on `device`.

    size_advice(height, width) names the options that give that output size (e.g. "--H 512 --W 512").
    """
    if os.environ.get(SKIP_CHECK_ENV, "") not in ("", "0"):
        return
    available = available_memory(device) if available is None else available
    parts = estimate_peak(run)
    if parts["peak"] <= REFUSE_ABOVE * available:
        return

    def fits(candidate: Run) -> bool:
        return estimate_peak(candidate)["peak"] <= available

    advice = []
    batch = largest_fitting(lambda b: fits(run.with_(batch=b)), 1, run.batch - 1) if run.batch > 1 else None
    if batch:
        advice.append(f"--n_samples {batch}")
    if not run.lowmem and fits(run.with_(lowmem=True)):
        advice.append("--lowmem")
    step = 8 * run.architecture.factor
    scale = largest_fitting(lambda s: fits(run.with_(batch=1, height=_scaled(run.height, s, step),
                                                     width=_scaled(run.width, s, step))), 1, 99)
    if scale:
        size = size_advice(_scaled(run.height, scale, step), _scaled(run.width, scale, step))
        advice.append(f"--n_samples 1 {size}" if run.batch > 1 else size)
    what_fits = "use " + " or ".join(advice) if advice else "nothing at this model's size fits: free memory first"
    raise UserError(
        f"this run needs about {parts['peak'] / GIB:.1f} GiB at its peak (weights {parts['weights'] / GIB:.1f}, "
        f"UNet {parts['unet'] / GIB:.1f}, decode {parts['decoder'] / GIB:.1f} for {run.batch} x "
        f"{run.width}x{run.height}) but {device.type} has {available / GIB:.1f} GiB available: {what_fits} "
        f"(or set {SKIP_CHECK_ENV}=1 to try anyway)")


def _scaled(side: int, percent: int, step: int) -> int:
    """`side` scaled to `percent` %, a multiple of `step` (at least one)."""
    return max(step, side * percent // 100 // step * step)
