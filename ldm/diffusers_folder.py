"""diffusers pipeline folders, and hub ids found in the local Hugging Face cache, read as our checkpoints.

A folder (model_index.json with unet/, vae/, text_encoder/, scheduler/) is turned into the CompVis-layout
state dict our configs build, by the exact inverse of diffusers' own conversion (convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint). Families: SD 1.x and
2.x (eps and v, from scheduler/scheduler_config.json), their inpainting models, SD 2 depth and the x4
upscaler; fp32 or fp16 variants, .safetensors or .bin (read with weights_only). Renaming keys and reshaping
the VAE attention's linear weights into 1×1 kernels are views: the tensors stay those of the memory-mapped
files, and placing the weights copies each once, as for a single-file checkpoint; only OpenCLIP's q, k, v
(separate in transformers, one in_proj in OpenCLIP) are joined into new tensors.

A depth folder's depth_estimator/ is transformers' DPT, not the MiDaS module our depth model builds: it is
not read, so depth2img needs --midas (the MiDaS weights) or --depth_map, and says so in one line.

A hub id (`org/name`) is looked up in the local cache only, never on the network.
"""
import json
import os
import re
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.checkpoint import CONFIG_DIR, CheckpointError, read_checkpoint
from ldm.placement import CheckpointFile

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
# The weight files of each component (diffusers' models, transformers' text encoder), in order of
# preference: no pickle where a .safetensors exists, full precision before the fp16 variant (what
# `variant="fp16"` loads).
WEIGHT_SUFFIXES = (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin")
MODEL_WEIGHTS = tuple("diffusion_pytorch_model" + suffix for suffix in WEIGHT_SUFFIXES)
WEIGHT_NAMES = {"unet": MODEL_WEIGHTS, "vae": MODEL_WEIGHTS,
                "text_encoder": ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin",
                                 "pytorch_model.fp16.bin")}
WEIGHT_NAMES["text_encoder_2"] = WEIGHT_NAMES["text_encoder"]  # SDXL's second (ldm.diffusers_sdxl)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_diffusers_folder(path) -> bool:
    return Path(path).is_dir() and (Path(path) / "model_index.json").is_file()


# --- the Hugging Face cache ----------------------------------------------------------------------------------
def hub_cache() -> Path:
    """Where huggingface_hub keeps downloads: HF_HUB_CACHE, else HF_HOME/hub, else the user cache's huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "huggingface" / "hub"


def looks_like_hub_id(name: str) -> bool:
    """`org/name` that names no file or folder here: a Hugging Face model id."""
    return bool(HUB_ID.match(str(name))) and not Path(name).exists()


def find_in_hub_cache(hub_id: str) -> Path:
    """The snapshot folder of `hub_id` that refs/main names (or the only one) in the local cache."""
    repo = hub_cache() / ("models--" + hub_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = snapshots / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    found = sorted(path for path in snapshots.iterdir() if path.is_dir()) if snapshots.is_dir() else []
    if len(found) == 1:
        return found[0]
    reason = f"{len(found)} snapshots and no refs/main" if found else "not there"
    raise CheckpointError(f"model {hub_id} is not in the local Hugging Face cache (looked in {repo}: {reason}); "
                          f"nothing is downloaded here: get it with `huggingface-cli download {hub_id}` (or `hf "
                          f"download {hub_id}`), set HF_HUB_CACHE or HF_HOME to the cache that holds it, or pass "
                          "--ckpt with a file or folder")


def model_name(path: Path) -> str:
    """A folder's name; for a snapshot in the hub cache, the model's (not its commit's)."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--")[-1]
    return path.name


# --- reading a folder ------------------------------------------------------------------------------------------
class FolderFiles:
    """The weight files of a folder as loaded, with the interface of placement.CheckpointFile."""

    def __init__(self, folder: Path, paths: list[Path]):
        self.path = folder
        self.files = [CheckpointFile(path) for path in paths]

    def change(self) -> str | None:
        return next(filter(None, (file.change() for file in self.files)), None)

    def change_at_path(self) -> str | None:
        return next(filter(None, (file.change_at_path() for file in self.files)), None)

    def ensure_unchanged(self, at_path: bool = False) -> None:
        for file in self.files:
            file.ensure_unchanged(at_path)

    def mapped_ranges(self) -> list[tuple[int, int]]:
        return [span for file in self.files for span in file.mapped_ranges()]


def weight_files(component: Path) -> list[Path]:
    """The files of one component's weights (one, or the shards an index names)."""
    for name in WEIGHT_NAMES[component.name]:
        if (component / name).is_file():
            return [component / name]
        index = component / (name + ".index.json")
        if index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            return [component / shard for shard in shards]
    names = ", ".join(WEIGHT_NAMES[component.name])
    raise CheckpointError(f"diffusers folder component {component} has no weights (looked for {names}): "
                          "download the folder again")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path} ({error}): download the diffusers folder again") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} does not hold a JSON object: download the diffusers folder again")
    return value


def _component(folder: Path, name: str) -> Path:
    component = folder / name
    if not component.is_dir():
        raise CheckpointError(f"diffusers folder {folder} has no {name}/ folder: this is not a Stable Diffusion "
                              "pipeline folder, or an incomplete download")
    return component


# (text encoder, UNet input channels) -> (family, {prediction type: our config}): the families diffusers
# converts from the original checkpoints (SD 1.x's OpenAI CLIP uses quick_gelu, SD 2.x's OpenCLIP gelu).
FAMILIES = {
    ("clip", 4): ("SD 1.x", {"epsilon": "v1-inference.yaml"}),
    ("clip", 9): ("SD 1.x inpainting", {"epsilon": "v1-inpainting-inference.yaml"}),
    ("openclip", 4): ("SD 2.x", {"epsilon": "v2-inference.yaml", "v_prediction": "v2-inference-v.yaml"}),
    ("openclip", 9): ("SD 2.x inpainting", {"epsilon": "v2-inpainting-inference.yaml"}),
    ("openclip", 5): ("SD 2.x depth", {"epsilon": "v2-midas-inference.yaml"}),
    ("openclip", 7): ("SD 2.x x4 upscaler", {"v_prediction": "x4-upscaling.yaml"}),
}
TEXT_WIDTHS = {"clip": 768, "openclip": 1024}


def text_encoder_kind(config: dict) -> str:
    """"clip" (OpenAI's CLIP ViT-L, SD 1.x) or "openclip" (OpenCLIP, SD 2.x), from the text encoder's config."""
    return "clip" if config.get("hidden_act", "quick_gelu") == "quick_gelu" else "openclip"


def choose_config(folder: Path) -> Path:
    """Our config for the folder: by its text encoder, UNet input channels and scheduler's prediction type."""
    from ldm.diffusers_sdxl import is_sdxl_folder, sdxl_config  # it builds on this module

    if is_sdxl_folder(folder):
        return sdxl_config(folder)
    index = _read_json(folder / "model_index.json")
    pipeline = index.get("_class_name", "a diffusers pipeline")
    text_config = _read_json(_component(folder, "text_encoder") / "config.json")
    kind = text_encoder_kind(text_config)
    in_channels = _read_json(_component(folder, "unet") / "config.json").get("in_channels", 4)
    family = FAMILIES.get((kind, in_channels))
    if family is None or "text_encoder_2" in index or text_config.get("hidden_size") != TEXT_WIDTHS[kind]:
        raise CheckpointError(f"{folder} is a {pipeline} folder of no family we load (SD 1.x and 2.x: txt2img, "
                              "inpainting, depth, x4 upscaler): use the model's original .ckpt/.safetensors file")
    name, configs = family
    scheduler = folder / "scheduler" / "scheduler_config.json"
    prediction = _read_json(scheduler).get("prediction_type", "epsilon") if scheduler.is_file() else "epsilon"
    if prediction not in configs:
        raise CheckpointError(f"{folder} is an {name} model with prediction_type {prediction!r} in {scheduler}, "
                              f"which no {name} config of ours has: pass --config with the model's own YAML")
    return CONFIG_DIR / configs[prediction]


def check_noise_schedules(folder: Path, config: dict, config_path: Path) -> None:
    """Refuse a folder whose schedulers (the diffusion's; the x4 upscaler's low_res_scheduler and
    max_noise_level) are not those of the config: it would sample with the wrong noise levels."""
    params = config.get("model", {}).get("params", {})
    checks = [("scheduler", params)]
    low_scale = params.get("low_scale_config", {}).get("params", {})
    if low_scale:
        checks.append(("low_res_scheduler", {**low_scale.get("noise_schedule_config", {}), "timesteps": 1000}))
        stored = _read_json(folder / "model_index.json").get("max_noise_level")
        if stored is not None and stored != low_scale.get("max_noise_level"):
            raise CheckpointError(f"{folder}'s max_noise_level {stored} differs from config {config_path.name}'s "
                                  f"{low_scale.get('max_noise_level')}: pass --config with the model's own YAML")
    for name, schedule in checks:
        path = folder / name / "scheduler_config.json"
        if not path.is_file() or "linear_start" not in schedule:
            continue
        stored = _read_json(path)
        ours = {"beta_start": schedule["linear_start"], "beta_end": schedule["linear_end"],
                "num_train_timesteps": schedule.get("timesteps", 1000), "beta_schedule": "scaled_linear"}
        differing = [key for key, value in ours.items() if key in stored and not _same(stored[key], value)]
        if differing:
            raise CheckpointError(f"{path} has another noise schedule than config {config_path.name} ("
                                  + ", ".join(f"{key} {stored[key]} for {ours[key]}" for key in differing)
                                  + "): pass --config with the model's own YAML")


def _same(stored, ours) -> bool:
    if isinstance(ours, float) and isinstance(stored, (int, float)):
        return abs(stored - ours) <= 1e-9 * abs(ours)
    return stored == ours


def read_component(component: Path) -> tuple[dict, list[Path]]:
    """One component's state dict (memory-mapped views where the format allows) and its files."""
    paths = weight_files(component)
    state_dict = {}
    for path in paths:
        state_dict.update(read_checkpoint(path)[0])
    return state_dict, paths


def read_diffusers_folder(folder, config_path=None) -> tuple[dict, Path, FolderFiles]:
    """(CompVis-layout state dict, config path, the files as loaded) of a diffusers pipeline folder."""
    folder = Path(folder)
    if not is_diffusers_folder(folder):
        raise CheckpointError(f"{folder} is a folder but not a diffusers pipeline folder (it has no "
                              "model_index.json): pass --ckpt with a .ckpt or .safetensors file, or a diffusers folder")
    config_path = Path(config_path) if config_path else choose_config(folder)
    if config_path.is_file():
        check_noise_schedules(folder, OmegaConf.to_container(OmegaConf.load(config_path)), config_path)
    from ldm.diffusers_sdxl import is_sdxl_folder, read_sdxl_components

    if is_sdxl_folder(folder):
        state_dict, paths = read_sdxl_components(folder)
        return state_dict, config_path, FolderFiles(folder, paths)
    text_kind = text_encoder_kind(_read_json(_component(folder, "text_encoder") / "config.json"))
    text_to_original = clip_to_original if text_kind == "clip" else openclip_to_original
    state_dict, paths = {}, []
    for name, convert in (("unet", unet_to_original), ("vae", vae_to_original), ("text_encoder", text_to_original)):
        weights, files = read_component(_component(folder, name))
        paths += files
        state_dict.update(convert(weights))
    return state_dict, config_path, FolderFiles(folder, paths)


# --- the inverse of diffusers' conversion -------------------------------------------------------------------------
UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
    "class_embedding.linear_1.": "label_emb.0.0.", "class_embedding.linear_2.": "label_emb.0.2.",
    "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
    "class_embedding.weight": "label_emb.weight",
    "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# Current names first, then those of diffusers folders saved before diffusers 0.14.
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                 "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
UNET_BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
MID_BLOCK = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _rename_first(rest: str, names: dict) -> str:
    """`rest` with its leading module name (one or two dotted parts) replaced through `names`."""
    for old, new in names.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _unet_key(key: str, layers_per_block: int, up_blocks_with_attention: set) -> str:
    per_level = layers_per_block + 1
    for old, new in UNET_TOP_LEVEL.items():
        if key.startswith(old) and (old.endswith(".") or key == old):
            return new + key[len(old):]
    if match := MID_BLOCK.match(key):
        kind, index, rest = match[1], int(match[2]), match[3]
        if kind == "resnets":
            return f"middle_block.{2 * index}.{_rename_first(rest, UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    match = UNET_BLOCK.match(key)
    if match is None:
        raise CheckpointError(f"the diffusers UNet holds tensor {key}, which no Stable Diffusion UNet has: "
                              "this folder is another kind of model")
    side, level, kind, index, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
    if side == "down":
        if kind == "downsamplers":
            return f"input_blocks.{per_level * (level + 1)}.0.op.{rest.removeprefix('conv.')}"
        block = f"input_blocks.{per_level * level + index + 1}"
    else:
        if kind == "upsamplers":
            return f"output_blocks.{per_level * level + layers_per_block}." \
                   f"{2 if level in up_blocks_with_attention else 1}.{rest}"
        block = f"output_blocks.{per_level * level + index}"
    return f"{block}.0.{_rename_first(rest, UNET_RESNET)}" if kind == "resnets" else f"{block}.1.{rest}"


def unet_to_original(weights: dict) -> dict:
    """diffusers' UNet2DConditionModel state dict in the original layout (under model.diffusion_model.)."""
    down_resnets = {int(key.split(".")[3]) for key in weights if key.startswith("down_blocks.0.resnets.")}
    up_blocks_with_attention = {int(key.split(".")[1]) for key in weights if UNET_BLOCK.match(key)
                                and key.startswith("up_blocks.") and ".attentions." in key}
    layers_per_block = len(down_resnets)
    return {UNET_PREFIX + _unet_key(key, layers_per_block, up_blocks_with_attention): tensor
            for key, tensor in weights.items()}


VAE_BLOCK = re.compile(r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)$")
VAE_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def _vae_key(key: str, up_levels: int) -> str:
    if match := VAE_MID.match(key):
        part, kind, index, rest = match[1], match[2], int(match[3]), match[4]
        if kind == "resnets":
            return f"{part}.mid.block_{index + 1}.{_rename_first(rest, VAE_RESNET)}"
        return f"{part}.mid.attn_1.{_rename_first(rest, VAE_ATTENTION)}"
    if match := VAE_BLOCK.match(key):
        part, side, level, kind, index, rest = match[1], match[2], int(match[3]), match[4], match[5], match[6]
        if side == "up":
            level = up_levels - 1 - level  # diffusers counts the decoder's levels from the bottom
        if kind == "resnets":
            return f"{part}.{side}.{level}.block.{index}.{_rename_first(rest, VAE_RESNET)}"
        return f"{part}.{side}.{level}.{side}sample.{rest}"
    return key.replace("conv_norm_out.", "norm_out.")


def vae_to_original(weights: dict) -> dict:
    """diffusers' AutoencoderKL state dict in the original layout (under first_stage_model.); the mid-block
    attention's linear weights become the 1×1 convolution kernels the original has (views, no copy)."""
    up_levels = len({key.split(".")[2] for key in weights if key.startswith("decoder.up_blocks.")})
    converted = {}
    for key, tensor in weights.items():
        original = _vae_key(key, up_levels)
        if ".mid.attn_1." in original and original.endswith(".weight") and tensor.dim() == 2:
            tensor = tensor.view(*tensor.shape, 1, 1)
        converted[VAE_PREFIX + original] = tensor
    return converted


def clip_to_original(weights: dict, prefix: str = CLIP_PREFIX) -> dict:
    """transformers' CLIPTextModel state dict under cond_stage_model.transformer.text_model. (files saved by
    transformers >= 5 drop the text_model. level); prefix: SDXL's conditioner.embedders.0.transformer."""
    return {prefix + (key if key.startswith("text_model.") else "text_model." + key): tensor
            for key, tensor in weights.items()}


OPENCLIP_PREFIX = "cond_stage_model.model."
OPENCLIP_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
# transformers' CLIPEncoderLayer names -> OpenCLIP's ResidualAttentionBlock's (q, k, v are joined apart)
OPENCLIP_BLOCK = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
OPENCLIP_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")
OPENCLIP_TOP_LEVEL = {"embeddings.token_embedding.weight": "token_embedding.weight",
                      "embeddings.position_embedding.weight": "positional_embedding",
                      "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def openclip_to_original(weights: dict, prefix: str = OPENCLIP_PREFIX) -> dict:
    """transformers' CLIPTextModel of an OpenCLIP tower (SD 2.x) in OpenCLIP's layout (under
    cond_stage_model.model.): the inverse of diffusers' convert_open_clip_checkpoint. The separate q, k, v
    projections are joined into in_proj_* (the one copy made); a projection (CLIPTextModelWithProjection)
    is transposed back (a view). prefix: SDXL's conditioner.embedders.N.model."""
    converted, qkv = {}, {}
    for key, tensor in weights.items():
        key = key.removeprefix("text_model.")
        layer = OPENCLIP_LAYER.match(key)
        rest = layer[2] if layer else ""
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            converted[prefix + "text_projection"] = tensor.t()
        elif key in OPENCLIP_TOP_LEVEL:
            converted[prefix + OPENCLIP_TOP_LEVEL[key]] = tensor
        elif layer and (part := OPENCLIP_QKV.match(rest)):
            qkv.setdefault((int(layer[1]), part[2]), {})[part[1]] = tensor
        elif layer and _rename_first(rest, OPENCLIP_BLOCK) != rest:
            converted[f"{prefix}transformer.resblocks.{layer[1]}.{_rename_first(rest, OPENCLIP_BLOCK)}"] = tensor
        else:
            raise CheckpointError(f"the diffusers text encoder holds tensor {key}, which no OpenCLIP text tower has: "
                                  "this folder is another kind of model")
    for (index, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise CheckpointError(f"the diffusers text encoder's layer {index} lacks some of its q/k/v {kind} "
                                  "tensors: download the folder again")
        converted[f"{prefix}transformer.resblocks.{index}.attn.in_proj_{kind}"] = \
            torch.cat([parts["q"], parts["k"], parts["v"]])
    return converted


def hashed_file(path: Path) -> Path:
    """The file whose sha256 is the model's hash: the checkpoint, or a diffusers folder's UNet weights."""
    return weight_files(path / "unet")[0] if is_diffusers_folder(path) else path

