"""The one factory: every model, encoder and schedule is built from a `{target, params}` config."""
import importlib


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
