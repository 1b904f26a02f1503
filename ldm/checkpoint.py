"""Loading original-format checkpoints: safe, memory-mapped, strict, with one-line errors that name the fix.

- `.ckpt` (a zip pickle, `{"state_dict": ...}` or flat) is read with `torch.load(weights_only=True, mmap=True)`:
  nothing in the file can run. `.safetensors` is memory-mapped by our own reader (no copy).
- The model is built with its parameters on the `meta` device (no random initialisation, no memory),
  then the checkpoint's tensors are assigned in place, so an fp32 load peaks at about the weights' size.
- Keys are checked strictly; a checkpoint that fits another config is refused with that config's name.
"""
import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.modules.ema import ema_name
from ldm.models.diffusion.ddpm import DDPM
from ldm.placement import OneComponentAtATime, place_weights, resolve_dtype
from ldm.safetensors_reader import SafetensorsError, read_safetensors
from ldm.util import get_obj_from_str, instantiate_from_config

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs" / "stable-diffusion"

# Extras that released checkpoints carry and that the model does not need.
HARMLESS_SUFFIXES = ("position_ids",)
HARMLESS_PREFIXES = ("model_ema.", "first_stage_model.loss.", "lvlb_weights", "logvar")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line that names the fix."""


# --- reading files -------------------------------------------------------------------------------------------
def read_checkpoint(path) -> tuple[dict, dict]:
    """(state_dict, metadata) from a .ckpt or .safetensors file, memory-mapped where the format allows."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (pass --ckpt with the path of a .ckpt or .safetensors file)")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): download or copy it again")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt (its zip directory is missing): "
                                  "download or copy it again")
        return _read_pickle_checkpoint(path, mmap=True)
    if len(head) >= 9 and head[8:9] == b"{":
        try:
            return read_safetensors(path, size)
        except SafetensorsError as error:
            raise CheckpointError(str(error)) from None
    if head[:1] == b"\x80":  # the legacy (pre-zip) torch.save format: read as safely, but into memory
        return _read_pickle_checkpoint(path, mmap=False)
    raise CheckpointError(f"{path} is not a checkpoint (expected a .ckpt zip archive or a .safetensors file)")


def _read_pickle_checkpoint(path: Path, mmap: bool):
    try:
        with _lightning_placeholders():
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "unsafe content"
        raise CheckpointError(f"refusing to load {path}: it holds objects that would run code when unpickled "
                              f"({reason[:160]}); use a .safetensors file or a checkpoint from a trusted source") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({str(error).splitlines()[0][:120]}): "
                              "download or copy it again") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    state_dict = obj.get("state_dict", obj)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    metadata = {"format": "ckpt"}
    if isinstance(obj.get("global_step"), int):
        metadata["global_step"] = obj["global_step"]
    return state_dict, metadata


@contextmanager
def _lightning_placeholders():
    """Old Lightning checkpoints pickle a reference to the ModelCheckpoint class (as a dict key).

    Allowing a stand-in with the same name lets such files load with weights_only=True; the stand-in is an
    empty class, so nothing of Lightning is imported or run.
    """
    placeholders = []
    for module, name in (("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
                         ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint")):
        placeholders.append(type(name, (), {"__module__": module}))
    with torch.serialization.safe_globals(placeholders):
        yield


# --- choosing a config ----------------------------------------------------------------------------------------
def guess_config(state_dict) -> str:
    """The config file name that fits these keys (anchors: the AUTOMATIC1111 rules); v-prediction needs a probe."""
    unet_in = state_dict.get("model.diffusion_model.input_blocks.0.0.weight")
    channels = unet_in.shape[1] if unet_in is not None else None
    openclip = state_dict.get("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
    if any(key.startswith("depth_model.") for key in state_dict) or (openclip is not None and channels == 5):
        return "v2-midas-inference.yaml"
    if channels == 7:
        return "x4-upscaling.yaml"
    if openclip is not None and openclip.shape[1] == 1024:
        return "v2-inpainting-inference.yaml" if channels == 9 else "v2-inference.yaml"
    if "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in state_dict:
        return "v1-inpainting-inference.yaml" if channels == 9 else "v1-inference.yaml"
    return "the config the checkpoint was trained with"


def is_v_prediction(unet: nn.Module, context_dim: int) -> bool:
    """The probe users know from AUTOMATIC1111: at t=999 a v-model's output pulls far below its input."""
    param = next(unet.parameters())
    x = torch.full((1, unet.in_channels, 8, 8), 0.5, dtype=param.dtype, device=param.device)
    context = torch.full((1, 77, context_dim), 0.5, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        out = unet(x, torch.tensor([999], device=param.device), context=context)
    return (out.float() - x.float()).mean().item() < -1


def find_config(ckpt_path, state_dict) -> Path:
    beside = Path(ckpt_path).with_suffix(".yaml")
    if beside.is_file():
        return beside
    name = guess_config(state_dict)
    path = CONFIG_DIR / name
    if not path.is_file():
        raise CheckpointError(f"no config fits {ckpt_path} ({name} is not shipped): pass --config PATH")
    return path


# --- building the model ---------------------------------------------------------------------------------------
@contextmanager
def parameters_on_meta():
    """Create every nn.Parameter on the meta device: no random initialisation, no memory.

    Buffers stay real: they are small, and the non-persistent ones (schedules, position ids) are not in
    the checkpoint and must be computed.
    """
    original = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            # transformers (>= 5) skips initialising a tensor so flagged: random init of a meta placeholder
            # is pure cost (0.16 s for CLIP-L's text tower).
            param._is_hf_initialized = True
        original(module, name, param)

    # torch's layers initialise their parameters at construction; on meta placeholders that is pure cost
    # (0.07 s of an SD 1.x load, in meta-device decompositions of uniform_).
    initialisers = {layer: layer.reset_parameters for layer in RANDOMLY_INITIALISED_LAYERS}
    nn.Module.register_parameter = register_on_meta
    for layer in initialisers:
        layer.reset_parameters = _leave_uninitialised
    try:
        yield
    finally:
        nn.Module.register_parameter = original
        for layer, reset_parameters in initialisers.items():
            layer.reset_parameters = reset_parameters


RANDOMLY_INITIALISED_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.GroupNorm, nn.LayerNorm)


def _leave_uninitialised(layer: nn.Module) -> None:
    pass


def _is_harmless(key: str) -> bool:
    return key.endswith(HARMLESS_SUFFIXES) or key.startswith(HARMLESS_PREFIXES)


def _ema_state_dict(model: nn.Module, state_dict: dict) -> dict:
    """The checkpoint's EMA weights renamed to the model's parameter names."""
    renamed = {}
    for name, _ in model.model.named_parameters():
        ema_key = "model_ema." + ema_name(name)
        if ema_key not in state_dict:
            raise CheckpointError(f"EMA weights were asked for but {ema_key} is missing: load without --use_ema")
        renamed["model." + name] = state_dict[ema_key]
    return renamed


def _schedule_buffers(model: nn.Module, expected: dict) -> dict:
    """The noise schedules' buffers by state-dict key: the config defines them, a checkpoint only repeats them.

    Every module with a `register_schedule` (the diffusion model; the x4 upscaler's noise augmentation)
    computes its schedule when built, in fp32 from float64 formulas. A 16-bit file holds a rounded copy and
    files converted from the diffusers layout hold none, so the computed values are the ones kept.
    """
    schedules = {}
    for prefix, module in model.named_modules():
        if hasattr(module, "register_schedule"):
            for name, buffer in module.named_buffers(recurse=False):
                key = f"{prefix}.{name}" if prefix else name
                if key in expected:
                    schedules[key] = buffer
    return schedules


def _check_schedules(state_dict: dict, schedules: dict, ckpt_path, config_path):
    """A checkpoint trained with another noise schedule needs its own config: refuse it rather than sample badly."""
    for key, computed in schedules.items():
        stored = state_dict.get(key)
        if stored is None:
            continue
        # A 16-bit file's copy is rounded (by up to half its dtype's eps, relative); an fp32 file written by
        # another tool may have computed the schedule in float32 rather than float64 (about 1e-5).
        tolerance = max(2 * torch.finfo(stored.dtype).eps, 1e-4)
        if not torch.allclose(stored.float(), computed, rtol=tolerance, atol=1e-12):
            deviation = ((stored.float() - computed).abs() / computed.abs().clamp_min(1e-12)).max().item()
            raise CheckpointError(f"checkpoint {ckpt_path} was trained with another noise schedule than config "
                                  f"{Path(config_path).name} ({key} differs by up to {deviation:.1%}): "
                                  "pass --config with the checkpoint's own config")


def load_state_dict_strictly(model: nn.Module, state_dict: dict, ckpt_path, config_path, use_ema=False) -> str:
    """Assign the checkpoint's tensors to the (meta) model; returns the one-line report."""
    expected = model.state_dict()
    schedules = _schedule_buffers(model, expected)
    state_dict = dict(state_dict)
    if use_ema:
        state_dict.update(_ema_state_dict(model, state_dict))
    missing = [key for key in expected if key not in state_dict and key not in schedules]
    unexpected = [key for key in state_dict if key not in expected and not _is_harmless(key)]
    wrong_shape = [key for key in expected if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or wrong_shape:
        fitting = guess_config(state_dict)
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                problems.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise CheckpointError(f"checkpoint {ckpt_path} does not fit config {Path(config_path).name}: "
                              f"{'; '.join(problems)}; it fits {fitting}: pass --config with that file")
    _check_schedules(state_dict, schedules, ckpt_path, config_path)
    model.load_state_dict({key: schedules[key] if key in schedules else state_dict[key] for key in expected},
                          strict=True, assign=True)
    leftover = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"checkpoint {ckpt_path} left parameters uninitialised: {', '.join(leftover[:3])}")
    ignored = len([key for key in state_dict if key not in expected])
    return f"loaded {len(expected)} tensors from {Path(ckpt_path).name}" + (f" ({ignored} extra ignored)" if ignored else "")


def load_model(ckpt_path, config_path=None, device="cpu", dtype=None, use_ema=False, log=print, customize=None,
               low_memory=False):
    """Build the model from its YAML (found from the keys when not given) and load the checkpoint into it.

    customize: None, or a callable (state_dict, config) -> (state_dict, constructor overrides), called once
    the checkpoint is read and the config chosen, before building. It lets a script add tensors kept in
    another file (depth2img's --midas) or build the model without a part it will not use.
    low_memory: convert the text encoder, UNet, autoencoder and depth estimator only when used, one at a
    time, through the OneComponentAtATime kept as `model.components_on_demand` (None otherwise).
    Returns (model in eval mode, OmegaConf config actually used).
    """
    state_dict, _ = read_checkpoint(ckpt_path)
    config_was_guessed = not config_path
    config_path = Path(config_path) if config_path else find_config(ckpt_path, state_dict)
    if not config_path.is_file():
        raise CheckpointError(f"config not found: {config_path} (pass --config with the path of a model YAML)")
    config = OmegaConf.load(config_path)
    if "model" not in config:
        raise CheckpointError(f"{config_path} is not a model config (it has no 'model' section)")
    # EMA copies are a training-time structure; asked-for EMA weights are copied into the model instead.
    overrides = {"use_ema": False} if issubclass(get_obj_from_str(config.model.target), DDPM) else {}
    if customize is not None:
        state_dict, extra_overrides = customize(state_dict, config)
        overrides.update(extra_overrides)
    with parameters_on_meta():
        model = instantiate_from_config(config.model, **overrides)
    report = load_state_dict_strictly(model, state_dict, ckpt_path, config_path, use_ema=use_ema)
    dtype = dtype or resolve_dtype("autocast", device)
    on_demand = OneComponentAtATime.names(model) if low_memory else []
    place_weights(model, device, dtype, channels_last=True, checkpoint_file=ckpt_path,  # on CPUs only
                  children=[name for name, _ in model.named_children() if name not in on_demand])
    model.eval().requires_grad_(False)
    model.components_on_demand = OneComponentAtATime(model, device, dtype, ckpt_path) if low_memory else None

    if config_was_guessed and config_path.name == "v2-inference.yaml" and \
            is_v_prediction(use_component(model, "model").diffusion_model,
                            config.model.params.unet_config.params.context_dim):
        # eps and v checkpoints of SD 2.x have the same keys: only the probe tells them apart.
        config_path = CONFIG_DIR / "v2-inference-v.yaml"
        config = OmegaConf.load(config_path)
        model.parameterization = "v"
        model.image_size = config.model.params.image_size
    log(f"{report}; config {config_path.name}, {str(dtype).replace('torch.', '')} on {device}"
        + (" (low memory: one component at a time)" if low_memory else ""))
    return model, config


def use_component(model: nn.Module, name: str) -> nn.Module:
    """The model's child `name`, ready to run (converted first in low-memory mode)."""
    on_demand = getattr(model, "components_on_demand", None)
    if on_demand is not None:
        on_demand.use(name)
    return getattr(model, name)

