"""The one factory: every model, encoder and schedule is built from a `{target, params}` config."""
import importlib

import torch


def get_obj_from_str(path: str):
    module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ImportError(f"config target {path!r} cannot be imported: {error}") from error


def instantiate_from_config(config, **overrides):
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("expected a config with a 'target' key naming the class to build")
    params = dict(config.get("params", None) or {})
    params.update(overrides)
    return get_obj_from_str(config["target"])(**params)


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def batch_images_to_bchw(images: torch.Tensor) -> torch.Tensor:
    """Dataset images are HWC in [-1, 1] (the CompVis convention), batched; the networks want BCHW fp32."""
    if images.ndim == 3:
        images = images[..., None]
    return images.permute(0, 3, 1, 2).contiguous(memory_format=torch.contiguous_format).float()
