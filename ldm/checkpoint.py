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
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldm.modules.ema import ema_name
from ldm.models.diffusion.ddpm import DDPM
from ldm.placement import (CheckpointFile, OneComponentAtATime, mapped_ranges, place_weights, release_file_pages,
                           resolve_dtype)
from ldm.safetensors_reader import SafetensorsError, read_safetensors
from ldm.util import (ConfigError, builds_subclass_of, check_config_targets, instantiate_from_config, read_config,
                      trusted_configs)

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs" / "stable-diffusion"
SDXL_CONFIG_DIR = REPO_ROOT / "configs" / "sdxl"
SDXL_CONFIGS = {1: "sd_xl_base.yaml", 0: "sd_xl_refiner.yaml"}  # by the index of the OpenCLIP embedder
CONTROLNET_CONFIG_DIR = REPO_ROOT / "configs" / "controlnet"
CONTROLNET_CONFIGS = {768: "cldm_v15.yaml", 1024: "cldm_v21.yaml"}  # a ControlNet 1.0 file, by its text width

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
    if head[8:9] == b"{" or (path.suffix.lower() == ".safetensors" and _header_length_fits(head, size)):
        try:
            return read_safetensors(path, size)
        except SafetensorsError as error:
            raise CheckpointError(str(error)) from None
    if head[:1] == b"\x80":  # the legacy (pre-zip) torch.save format: read as safely, but into memory
        return _read_pickle_checkpoint(path, mmap=False)
    raise CheckpointError(f"{path} is not a checkpoint (expected a .ckpt zip archive or a .safetensors file)")


def _header_length_fits(head: bytes, size: int) -> bool:
    """Whether the first 8 bytes could be a .safetensors header length for a file of `size` bytes."""
    return len(head) >= 8 and int.from_bytes(head[:8], "little") <= size - 8


def _read_pickle_checkpoint(path: Path, mmap: bool):
    with _lightning_placeholders():
        obj = load_pickle_weights(path, CheckpointError, str(path), "use a .safetensors file or a checkpoint from "
                                  "a trusted source", f"checkpoint {path}", "download or copy it again", mmap=mmap)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    state_dict = obj.get("state_dict", obj)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    metadata = {"format": "ckpt"}
    if isinstance(obj.get("global_step"), int):
        metadata["global_step"] = obj["global_step"]
    return state_dict, metadata


def load_pickle_weights(path, error: type, refused: str, instead: str, damaged: str, again: str, mmap=False,
                        also_corrupt: tuple = ()):
    """`torch.load(weights_only=True)`, its failures raised as `error` in one line: "refusing to load
    {refused}: ... ; {instead}" for a pickle that would run code, "{damaged} is truncated or corrupt (...):
    {again}" for a damaged file (`also_corrupt`: more exception types that mean one)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exception:
        reason = str(exception).strip().splitlines()[0][:160] if str(exception).strip() else "unsafe content"
        raise error(f"refusing to load {refused}: it holds objects that would run code when unpickled "
                    f"({reason}); {instead}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, *also_corrupt) as exception:
        raise error(f"{damaged} is truncated or corrupt ({str(exception).splitlines()[0][:120]}): {again}") from None


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
    for index, name in SDXL_CONFIGS.items():  # SDXL's OpenCLIP ViT-bigG: the base's second embedder, the refiner's first
        if f"conditioner.embedders.{index}.model.transformer.resblocks.0.attn.in_proj_weight" in state_dict:
            return name
    unclip = state_dict.get("embedder.model.visual.transformer.resblocks.0.attn.in_proj_weight")
    if unclip is not None:  # the image tower's width: OpenAI CLIP ViT-L/14's 1024, OpenCLIP ViT-H/14's 1280
        return f"v2-1-stable-unclip-{'h' if unclip.shape[1] == 1280 else 'l'}-inference.yaml"
    control_text = state_dict.get("control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if control_text is not None and unet_in is not None:  # ControlNet 1.0: the whole model and its control_model.*
        return CONTROLNET_CONFIGS.get(control_text.shape[1], "the ControlNet config the checkpoint was trained with")
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
    folder = CONTROLNET_CONFIG_DIR if name in CONTROLNET_CONFIGS.values() else CONFIG_DIR
    path = (SDXL_CONFIG_DIR if name in SDXL_CONFIGS.values() else folder) / name
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


def unused_checkpoint_keys(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes of checkpoint tensors for parts a module deliberately does not build (its
    `unused_checkpoint_keys()`, e.g. the OpenCLIP block after SD 2.x's penultimate layer)."""
    return tuple(f"{name}.{key}" if name else key for name, module in model.named_modules()
                 if hasattr(module, "unused_checkpoint_keys") for key in module.unused_checkpoint_keys())


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


def _check_values(state_dict: dict, expected: dict, ckpt_path, release_pages: bool) -> None:
    """Refuse integer or boolean tensors where the model has floating-point ones, and NaN or infinite weights."""
    taken = [key for key in expected if key in state_dict]
    for key in taken:
        if expected[key].is_floating_point() and not state_dict[key].is_floating_point():
            raise CheckpointError(f"checkpoint {ckpt_path} holds {str(state_dict[key].dtype).replace('torch.', '')} "
                                  f"values in tensor {key}, where the model has floating-point weights: the file is "
                                  "damaged or not a checkpoint of this model; use another checkpoint")
    ranges = mapped_ranges(ckpt_path) if release_pages else []
    for key in taken:
        tensor = state_dict[key]
        if tensor.is_floating_point() and not all_finite(tensor):
            raise CheckpointError(f"checkpoint {ckpt_path} holds NaN or infinite values in tensor {key}: the "
                                  "weights are damaged (a diverged training run or a broken conversion); "
                                  "use another checkpoint")
        release_file_pages(tensor, ranges)
    for key in taken if ranges else []:  # reading a page maps its neighbours too (the kernel's fault-around)
        release_file_pages(state_dict[key], ranges)


SUMMABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FINITE_CHECK_ELEMENTS = 1 << 22  # per piece in the exact check, which makes a byte per element


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no value of the floating-point `tensor` is NaN or infinite, in one pass and no full-size copy.

    Any NaN or infinity makes the sum non-finite, and a sum is many times faster than isfinite(): so the
    sum decides, and only a non-finite sum (those values, or an overflow of finite ones) is checked exactly,
    piece by piece. The 8-bit float types have no sum on a CPU: they are converted piece by piece.
    """
    if tensor.dtype in SUMMABLE_DTYPES and torch.isfinite(tensor.sum()):
        return True
    return all(bool(torch.isfinite(piece if piece.dtype in SUMMABLE_DTYPES else piece.float()).all())
               for piece in _pieces(tensor))


def _pieces(tensor: torch.Tensor):
    """Views of about FINITE_CHECK_ELEMENTS elements that cover the tensor (whole rows if it is not contiguous)."""
    if tensor.dim() == 0:
        return [tensor]
    if tensor.is_contiguous():
        return tensor.view(-1).split(FINITE_CHECK_ELEMENTS)
    return tensor.split(max(1, FINITE_CHECK_ELEMENTS // max(1, tensor[0].numel())))


def load_state_dict_strictly(model: nn.Module, state_dict: dict, ckpt_path, config_path, use_ema=False,
                             release_pages=True) -> str:
    """Assign the checkpoint's tensors to the (meta) model; returns the one-line report.

    Every tensor the model takes is read once, to refuse NaN and infinite values. release_pages: give the
    memory-mapped file's pages under each back once it is checked, so that the check does not leave the
    whole file resident (what low-memory mode needs); without it, placing the weights gives them back.
    """
    expected = model.state_dict()
    schedules = _schedule_buffers(model, expected)
    state_dict = dict(state_dict)
    if use_ema:
        state_dict.update(_ema_state_dict(model, state_dict))
    missing = [key for key in expected if key not in state_dict and key not in schedules]
    not_built = unused_checkpoint_keys(model)
    unexpected = [key for key in state_dict if key not in expected and not _is_harmless(key)
                  and not key.startswith(not_built)]
    wrong_shape = [key for key in expected if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or wrong_shape:
        fitting = guess_config(state_dict)
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                problems.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise CheckpointError(f"checkpoint {ckpt_path} does not fit config {Path(config_path).name}: "
                              f"{'; '.join(problems)}; it fits {fitting}: pass --config with that file")
    _check_values(state_dict, expected, ckpt_path, release_pages)
    _check_schedules(state_dict, schedules, ckpt_path, config_path)
    model.load_state_dict({key: schedules[key] if key in schedules else state_dict[key] for key in expected},
                          strict=True, assign=True)
    leftover = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"checkpoint {ckpt_path} left parameters uninitialised: {', '.join(leftover[:3])}")
    ignored = len([key for key in state_dict if key not in expected])
    return f"loaded {len(expected)} tensors from {Path(ckpt_path).name}" + (f" ({ignored} extra ignored)" if ignored else "")


def load_model(ckpt_path, config_path=None, device="cpu", dtype=None, use_ema=False, log=print, customize=None,
               low_memory=False, trust_config=False, vae=None):
    """Build the model from its YAML (found from the keys when not given) and load the checkpoint into it.

    customize: None, or a callable (state_dict, config) -> (state_dict, constructor overrides), called once
    the checkpoint is read and the config chosen, before building. It lets a script add tensors kept in
    another file (depth2img's --midas) or build the model without a part it will not use.
    low_memory: convert the text encoder, UNet, autoencoder and depth estimator only when used, one at a
    time (the result's `components`; otherwise every weight is converted now, none left a view of the file).
    trust_config: let the config's targets name any class or callable (ldm.util.trusted_configs); by default
    only this project's classes are built, from the config given, the one beside the checkpoint or a shipped one.
    vae: None, or an ldm.vae_file.VaeFile whose weights replace the checkpoint's autoencoder (--vae).
    Returns a LoadResult: the model in eval mode, the OmegaConf config actually used, the file as loaded.
    """
    config_was_guessed = not config_path
    if Path(ckpt_path).is_dir():
        from ldm.diffusers_folder import read_diffusers_folder  # it reads each file with read_checkpoint
        state_dict, config_path, checkpoint = read_diffusers_folder(ckpt_path, config_path)
        config_was_guessed = False  # its scheduler's prediction_type chose it: no probe
    else:
        state_dict, _ = read_checkpoint(ckpt_path)  # the metadata is not used: no config is read from a checkpoint
        checkpoint = CheckpointFile(ckpt_path)  # its size and date as loaded, checked again once all is placed
        config_path = Path(config_path) if config_path else find_config(ckpt_path, state_dict)
    if not config_path.is_file():
        raise CheckpointError(f"config not found: {config_path} (pass --config with the path of a model YAML)")
    try:
        with trusted_configs(trust_config):
            config = read_config(config_path)
            if not isinstance(config.get("model"), DictConfig) or "target" not in config.model:
                raise CheckpointError(f"{config_path} is not a model config (it has no 'model' section with a target)")
            check_config_targets(config.model, "model", config_path)  # every target, before anything is built
            # EMA copies are a training-time structure; asked-for EMA weights are copied into the model instead.
            overrides = {"use_ema": False} if builds_subclass_of(config.model, DDPM) else {}
            if customize is not None:
                state_dict, extra_overrides = customize(state_dict, config)
                overrides.update(extra_overrides)
            with parameters_on_meta():
                model = instantiate_from_config(config.model, **overrides)
    except ConfigError as error:
        raise CheckpointError(str(error)) from None
    if vae is not None:
        model.first_stage_model = vae.first_stage_for(model)  # TAESD's replaces the autoencoder
        state_dict = vae.replace_in(state_dict, model.first_stage_model)
    report = load_state_dict_strictly(model, state_dict, ckpt_path, config_path, use_ema=use_ema,
                                      release_pages=low_memory)  # else placing them reads them again now
    dtype = dtype or resolve_dtype("autocast", device)
    on_demand = OneComponentAtATime.names(model) if low_memory else []
    place_weights(model, device, dtype, channels_last=True, checkpoint=checkpoint,  # channels-last on CPUs only
                  children=[name for name, _ in model.named_children() if name not in on_demand])
    model.eval().requires_grad_(False)
    checkpoint.ensure_unchanged()  # else what was read may mix two files
    components = OneComponentAtATime(model, device, dtype, checkpoint) if low_memory else None
    loaded = LoadResult(model, config, checkpoint, components)

    if config_was_guessed and config_path.name == "v2-inference.yaml" and \
            is_v_prediction(loaded.use("model").diffusion_model, config.model.params.unet_config.params.context_dim):
        # eps and v checkpoints of SD 2.x have the same keys: only the probe tells them apart.
        config_path = CONFIG_DIR / "v2-inference-v.yaml"
        loaded.config = OmegaConf.load(config_path)
        model.parameterization = "v"
        model.image_size = loaded.config.model.params.image_size
    log(f"{report}; config {config_path.name}, {str(dtype).replace('torch.', '')} on {device}"
        + (" (low memory: one component at a time)" if low_memory else ""))
    return loaded


@dataclass
class LoadResult:
    """What load_model gives: the model, its config, the checkpoint file as loaded, and in low-memory mode
    the OneComponentAtATime that converts the components (None otherwise: every weight is placed)."""
    model: nn.Module
    config: DictConfig
    checkpoint: CheckpointFile
    components: OneComponentAtATime | None = None

    def use(self, name: str) -> nn.Module:
        """The model's child `name`, ready to run (converted first in low-memory mode)."""
        if self.components is not None:
            self.components.use(name)
        return getattr(self.model, name)

