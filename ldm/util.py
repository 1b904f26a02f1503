"""The one factory: every model, encoder and schedule is built from a `{target, params}` config.

A config names what to build, so a config from a model site could name any callable (`os.system`) or a
module whose import runs code. Targets are therefore limited, unless the caller trusts the config
(`trusted_configs`, the scripts' --trust_config), to classes defined in this package (`ldm.*`) and the
short allow-list below; a name is checked before anything is imported, so a refused module never runs.
"""
import importlib
import inspect
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# What the original configs' model sections name outside this package. (Their training sections also name
# torchvision transforms and main.ImageLogger, for data pipelines and a main.py this project does not have.)
ALLOWED_OUTSIDE_LDM = {"torch.nn.Identity": torch.nn.Identity}

# The original configs name the model-family variants as classes of ddpm.py, where the originals define them.
CONFIG_ALIASES = {
    f"ldm.models.diffusion.ddpm.{name}": f"ldm.models.diffusion.{module}.{name}"
    for name, module in (("LatentInpaintDiffusion", "ddpm_variants"), ("LatentUpscaleDiffusion", "ddpm_variants"),
                         ("LatentDepth2ImageDiffusion", "ddpm_depth"))
}
# The ControlNet repository's configs name its own module, cldm.cldm; its controlled UNet is ours, which takes control=.
CONFIG_ALIASES.update({
    "cldm.cldm.ControlLDM": "ldm.models.controlnet.ControlLDM",
    "cldm.cldm.ControlNet": "ldm.models.controlnet.ControlNet",
    "cldm.cldm.ControlledUnetModel": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
})
# SD 2.1 unCLIP's classes, which the originals define in ddpm.py and encoders/modules.py.
CONFIG_ALIASES.update({
    "ldm.models.diffusion.ddpm.ImageEmbeddingConditionedLatentDiffusion":
        "ldm.models.diffusion.ddpm_unclip.ImageEmbeddingConditionedLatentDiffusion",
    **{f"ldm.modules.encoders.modules.{name}": f"ldm.modules.encoders.image_encoders.{name}"
       for name in ("ClipImageEmbedder", "FrozenOpenCLIPImageEmbedder")},
    "ldm.modules.encoders.modules.CLIPEmbeddingNoiseAugmentation":
        "ldm.modules.encoders.noise_augmentation.CLIPEmbeddingNoiseAugmentation",
})

TRUST_FLAG = "--trust_config"
_configs_trusted = ContextVar("configs_trusted", default=False)


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the file, the place and the fix."""


@contextmanager
def trusted_configs(trust: bool = True):
    """Within this block (and the model constructors it runs), config targets may name any importable object."""
    token = _configs_trusted.set(bool(trust))
    try:
        yield
    finally:
        _configs_trusted.reset(token)


def _is_ours(module_name: str) -> bool:
    return module_name == "ldm" or module_name.startswith("ldm.")


def _label(path, where: str, source) -> str:
    """How an error names a target: "config FILE: model.params.unet_config.target 'x.Y'"."""
    return (f"config {source}: " if source else "config ") + f"{where or 'target'} {path!r}"


def _refusal(path, where: str, source, imported: bool) -> ConfigError:
    return ConfigError(f"{_label(path, where, source)} is refused: a config may build only classes of this project "
                       f"(ldm.*) and {', '.join(ALLOWED_OUTSIDE_LDM)}{'' if imported else ', so it was not imported'}"
                       f"; pass {TRUST_FLAG} if you trust this config and the code it names")


def get_obj_from_str(path, where: str = "", source=None):
    """The object a config target names. Untrusted: only ldm classes and the allow-list, checked by name
    before importing (only modules of ldm are ever imported) and by what the name turns out to be after."""
    trusted = _configs_trusted.get()
    if not isinstance(path, str) or not all(part.isidentifier() for part in path.split(".")) or "." not in path:
        raise ConfigError(f"{_label(path, where, source)} is not a dotted name such as "
                          "ldm.models.diffusion.ddpm.LatentDiffusion")
    if path in ALLOWED_OUTSIDE_LDM:
        return ALLOWED_OUTSIDE_LDM[path]
    module_name, _, attribute = CONFIG_ALIASES.get(path, path).rpartition(".")
    if not trusted and not _is_ours(module_name):
        raise _refusal(path, where, source, imported=False)
    try:
        obj = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{_label(path, where, source)} cannot be imported: {str(error).splitlines()[0]}") from None
    # A function merely imported into an ldm module, or a module itself, names code from elsewhere.
    if not trusted and not (isinstance(obj, type) and _is_ours(obj.__module__)):
        raise _refusal(path, where, source, imported=True)
    return obj


def builds_subclass_of(config, base: type) -> bool:
    """Whether `config` (with a target) builds a `base`; resolved under the same rules as building it."""
    obj = get_obj_from_str(config.get("target"))
    return isinstance(obj, type) and issubclass(obj, base)


def check_config_targets(config, where: str = "", source=None, resolve: bool = True):
    """Refuse, before anything is built or imported from outside ldm, a config with any target (nested at
    any depth, in mappings or lists) that building it would refuse. `where` names the config's place in its
    file (e.g. "model"), `source` the file, for the one-line error. resolve=False checks one of several files
    to be merged, whose interpolations may point into the others: targets made by interpolation are then
    left to the check of the merged config."""
    try:
        tree = OmegaConf.to_container(config, resolve=resolve) if OmegaConf.is_config(config) else config
    except OmegaConfBaseException as error:
        raise ConfigError(f"config {source}: {where or 'it'} cannot be read: {str(error).splitlines()[0]}") from None
    _check_tree(tree, where, source, resolve)


def _check_tree(node, where: str, source, resolved: bool):
    if isinstance(node, dict):
        target = node.get("target")
        if "target" in node and (resolved or not (isinstance(target, str) and "${" in target)):
            get_obj_from_str(target, f"{where}.target" if where else "target", source)
        for key, value in node.items():
            _check_tree(value, f"{where}.{key}" if where else str(key), source, resolved)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _check_tree(value, f"{where}[{index}]", source, resolved)


def read_config(path) -> DictConfig:
    """A YAML config file as a mapping, or a ConfigError naming the file and what is wrong with it."""
    path = Path(path)
    try:
        config = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config not found: {path} (give the path of a YAML config)") from None
    except IsADirectoryError:
        raise ConfigError(f"config {path} is a folder, not a YAML file") from None
    except OSError as error:
        raise ConfigError(f"config {path} cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not a text (UTF-8) YAML file") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {_yaml_problem(error)}") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"config {path} cannot be read: {str(error).splitlines()[0]}") from None
    if not isinstance(config, DictConfig):
        raise ConfigError(f"config {path} is not a mapping of sections (model:, ...) but a list")
    return config


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def instantiate_from_config(config, **overrides):
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError("expected a config with a 'target' key naming the class to build")
    params = dict(config.get("params", None) or {})
    params.update(overrides)
    target = config["target"]
    cls = get_obj_from_str(target)
    try:  # a misspelt or missing parameter is the config's fault: say which target, not where it failed
        inspect.signature(cls).bind(**params)
    except TypeError as error:
        raise ConfigError(f"config target {target}: {error}") from None
    except ValueError:  # no signature to check (some builtins): let the call tell
        pass
    return cls(**params)


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def batch_images_to_bchw(images: torch.Tensor) -> torch.Tensor:
    """Dataset images are HWC in [-1, 1] (the CompVis convention), batched; the networks want BCHW fp32."""
    if images.ndim == 3:
        images = images[..., None]
    return images.permute(0, 3, 1, 2).contiguous(memory_format=torch.contiguous_format).float()
