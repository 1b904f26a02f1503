"""SDXL diffusers folders (StableDiffusionXLPipeline, and the refiner's StableDiffusionXLImg2ImgPipeline) read as
Stability's single-file layout, by the inverse of diffusers' single-file conversion (ldm.diffusers_folder).

What the folders hold: unet/ (UNet2DConditionModel with ``addition_embed_type: text_time``: the vector condition
is ``add_embedding``, our ``label_emb``), vae/, text_encoder/ (CLIP ViT-L, transformers' CLIPTextModel; the base
only) and text_encoder_2/ (OpenCLIP ViT-bigG as transformers' CLIPTextModelWithProjection, its projection the
pooled output's), tokenizer/ and tokenizer_2/ (not read: ours are built in), scheduler/. The refiner's
model_index.json names no text_encoder (``[null, null]``). They become ``conditioner.embedders.N.*`` as in
sd_xl_base_1.0.safetensors (CLIP ViT-L at 0, bigG at 1) and sd_xl_refiner_1.0.safetensors (bigG at 0), with
configs/sdxl/sd_xl_base.yaml or sd_xl_refiner.yaml.
"""
import json
from pathlib import Path

from ldm.checkpoint import CONFIG_DIR, CheckpointError

BASE_CONFIG, REFINER_CONFIG = CONFIG_DIR / "sdxl" / "sd_xl_base.yaml", CONFIG_DIR / "sdxl" / "sd_xl_refiner.yaml"
TEXT_TIME = "text_time"  # diffusers' addition_embed_type of SDXL's UNets


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _named(index: dict, component: str) -> bool:
    """Whether model_index.json names `component` with a class (the refiner's text_encoder is [null, null])."""
    entry = index.get(component)
    return isinstance(entry, list) and any(part is not None for part in entry)


def is_sdxl_folder(folder) -> bool:
    folder = Path(folder)
    index = _json(folder / "model_index.json")
    return _named(index, "text_encoder_2") or \
        _json(folder / "unet" / "config.json").get("addition_embed_type") == TEXT_TIME


def has_first_text_encoder(folder: Path) -> bool:
    return _named(_json(folder / "model_index.json"), "text_encoder") and (folder / "text_encoder").is_dir()


def sdxl_config(folder) -> Path:
    """Our config for an SDXL folder: the base's with both text encoders, the refiner's with bigG alone."""
    folder = Path(folder)
    scheduler = _json(folder / "scheduler" / "scheduler_config.json")
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise CheckpointError(f"{folder} is an SDXL model with prediction_type {prediction!r} in its scheduler, and "
                              "our SDXL configs predict epsilon: pass --config with the model's own YAML")
    return BASE_CONFIG if has_first_text_encoder(folder) else REFINER_CONFIG


def read_sdxl_components(folder) -> tuple[dict, list[Path]]:
    """(the single-file layout state dict, the files read) of an SDXL folder."""
    from ldm.diffusers_folder import (clip_to_original, openclip_to_original, read_component, unet_to_original,
                                      vae_to_original)

    folder = Path(folder)
    first = has_first_text_encoder(folder)
    parts = [("unet", unet_to_original), ("vae", vae_to_original)]
    if first:
        parts.append(("text_encoder", lambda weights: clip_to_original(weights, "conditioner.embedders.0.transformer.")))
    parts.append(("text_encoder_2", lambda weights: openclip_to_original(
        weights, f"conditioner.embedders.{1 if first else 0}.model.")))
    state_dict, paths = {}, []
    for name, convert in parts:
        component = folder / name
        if not component.is_dir():
            raise CheckpointError(f"SDXL diffusers folder {folder} has no {name}/ folder: an incomplete download")
        weights, files = read_component(component)
        paths += files
        state_dict.update(convert(weights))
    return state_dict, paths
