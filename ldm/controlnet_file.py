"""ControlNet files, found by name or path and loaded as checkpoints are: safely, memory-mapped, strictly.

Formats, told apart by their keys:
- ControlNet 1.0 (`control_sd15_canny.pth`): a whole LDM plus `control_model.*`; only the control part is taken.
- ControlNet 1.1 (`control_v11p_sd15_canny.pth`) and the fp16 `.safetensors` files: the control model alone,
  with or without the `control_model.` prefix.
- diffusers: a folder with config.json (`ControlNetModel`) and diffusion_pytorch_model[.fp16].safetensors
  (or .bin), or that weights file alone; its keys are mapped back to the original names (the UNet's through
  ldm.diffusers_folder, the exact inverse of diffusers' conversion).
Pickles are read with weights_only (nothing in them runs) and the tensors stay views of the memory-mapped file
until placed. The network is shaped after the base model's UNet (a ControlNet is a copy of its encoder), so
its keys must match one for one: a ControlNet made for another base model is refused in one line naming both.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.checkpoint import REPO_ROOT, CheckpointError, all_finite, parameters_on_meta, read_checkpoint
from ldm.diffusers_folder import UNET_PREFIX, WEIGHT_SUFFIXES, unet_to_original
from ldm.models.controlnet import ControlNet
from ldm.modules.lora import FAMILIES
from ldm.placement import CheckpointFile, place_weights, resolve_dtype
from ldm.util import ConfigError, read_config

CONTROL_PREFIX = "control_model."
CONFIG_DIR = REPO_ROOT / "configs" / "controlnet"
FAMILY_CONFIGS = {768: "cldm_v15.yaml", 1024: "cldm_v21.yaml"}  # by the width of cross-attention's text
# A1111's extension keeps ControlNets in models/ControlNet; ours ship in the repository's models/controlnet.
DEFAULT_SEARCH_DIRS = (Path("models/ControlNet"), REPO_ROOT / "models" / "ControlNet", REPO_ROOT / "models" / "controlnet")
FILE_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")  # in order of preference: no pickle first
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{6,}\]$")  # "control_v11p_sd15_canny [d14c016b]", as A1111 lists them
# The ControlNet's own parts in diffusers' names; everything else is named as in diffusers' UNet.
DIFFUSERS_CONTROL_PARTS = re.compile(r"^(controlnet_cond_embedding\.(conv_in|blocks\.(\d+)|conv_out)|"
                                     r"controlnet_down_blocks\.(\d+)|controlnet_mid_block)\.(weight|bias)$")
# Where the original keeps the width of the text that cross-attention reads (to_k: [inner, context_dim]).
TEXT_WIDTH_KEY = re.compile(r"^(input_blocks|middle_block)\.\d+\.\d+\.transformer_blocks\.0\.attn2\.to_k\.weight$")
# Parameters of a UNet config that a ControlNet does not take (it has no decoder half and no output).
UNET_ONLY_PARAMS = ("out_channels", "num_classes", "adm_in_channels")


class ControlNetError(CheckpointError):
    """A ControlNet that cannot be used; the message is one line naming the file and the fix."""


@dataclass
class LoadedControlNet:
    path: Path  # the file, or the diffusers folder
    model: ControlNet  # in eval mode, on the device and in the dtype asked for, no weight a view of the file
    family: str  # what base model it is for: "SD 1.x", "SD 2.x", or its text width in words

    @property
    def name(self) -> str:
        """The file's (or folder's) name without suffix, as A1111's extension names the model."""
        return self.path.name if self.path.is_dir() else self.path.stem

    @property
    def hashed_file(self) -> Path:
        """The file whose sha256 identifies the model: the file itself, or a diffusers folder's weights."""
        return diffusers_weights(self.path) if self.path.is_dir() else self.path


# --- finding the file -------------------------------------------------------------------------------------------
def search_dirs_with_defaults(search_dirs=()) -> list[Path]:
    """The folders searched by name: the user's (--controlnet_dir) first, then the defaults, each once."""
    folders = []
    for folder in [*map(Path, search_dirs or ()), *DEFAULT_SEARCH_DIRS]:
        if folder.is_dir() and all(not folder.samefile(seen) for seen in folders):
            folders.append(folder)
    return folders


def list_controlnets(search_dirs=()) -> list[Path]:
    """Every ControlNet file (by suffix) and diffusers ControlNet folder in the search folders, by name."""
    found = []
    for folder in search_dirs_with_defaults(search_dirs):
        for path in sorted(folder.iterdir()):
            if (path.is_file() and path.suffix.lower() in FILE_SUFFIXES) or is_diffusers_controlnet(path):
                found.append(path)
    return found


def find_controlnet(path_or_name, search_dirs=()) -> Path:
    """A path as given, else the file or folder of that name (with or without suffix, or with A1111's
    " [hash]" after it) in the search folders; a .safetensors file before a pickle of the same name."""
    given = Path(path_or_name)
    if given.exists():
        return given
    name = HASH_SUFFIX.sub("", str(path_or_name))
    folders = search_dirs_with_defaults(search_dirs)
    for folder in folders:
        candidates = [folder / name] + [folder / (name + suffix) for suffix in FILE_SUFFIXES]
        for candidate in candidates:
            if candidate.is_file() or is_diffusers_controlnet(candidate):
                return candidate
    available = [path.name for path in list_controlnets(search_dirs)]
    where = ", ".join(map(str, folders)) or "none of " + ", ".join(map(str, DEFAULT_SEARCH_DIRS)) + " exists"
    listing = f"; available: {', '.join(available[:8])}{', ...' if len(available) > 8 else ''}" if available else ""
    raise ControlNetError(f"ControlNet {path_or_name!r} not found (no such file, and not in the ControlNet folders: "
                          f"{where}){listing}: pass a path, or put the file in models/ControlNet or a --controlnet_dir")


# --- reading the weights ----------------------------------------------------------------------------------------
def is_diffusers_controlnet(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def diffusers_weights(folder: Path) -> Path:
    for suffix in WEIGHT_SUFFIXES:
        if (folder / (DIFFUSERS_WEIGHTS + suffix)).is_file():
            return folder / (DIFFUSERS_WEIGHTS + suffix)
    raise ControlNetError(f"diffusers ControlNet folder {folder} has no weights (looked for "
                          f"{', '.join(DIFFUSERS_WEIGHTS + suffix for suffix in WEIGHT_SUFFIXES)}): download it again")


def diffusers_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ControlNetError(f"cannot read {folder / 'config.json'} ({error}): download the ControlNet again") from None
    if not isinstance(config, dict) or config.get("_class_name") != "ControlNetModel":
        kind = config.get("_class_name", "no _class_name") if isinstance(config, dict) else "not a JSON object"
        raise ControlNetError(f"{folder} is not a diffusers ControlNet folder (its config.json says {kind}, not "
                              "ControlNetModel): pass a ControlNet file or folder")
    return config


def diffusers_to_original(weights: dict) -> dict:
    """A diffusers ControlNetModel state dict in the original layout (views: no tensor is copied)."""
    hint_blocks = {int(match[3]) for key in weights if (match := DIFFUSERS_CONTROL_PARTS.match(key)) and match[3]}
    hint_out = 2 * (len(hint_blocks) + 1)
    control, unet = {}, {}
    for key, tensor in weights.items():
        match = DIFFUSERS_CONTROL_PARTS.match(key)
        if match is None:
            unet[key] = tensor
        elif match[2] is not None:  # the hint's conv stack: a SiLU between convolutions in the original's Sequential
            index = {"conv_in": 0, "conv_out": hint_out}.get(match[2], 2 * (int(match[3] or 0) + 1))
            control[f"input_hint_block.{index}.{match[5]}"] = tensor
        elif match[4] is not None:
            control[f"zero_convs.{match[4]}.0.{match[5]}"] = tensor
        else:
            control[f"middle_block_out.0.{match[5]}"] = tensor
    try:
        renamed = unet_to_original(unet)
    except CheckpointError as error:
        raise ControlNetError(str(error).replace("the diffusers UNet", "the diffusers ControlNet")) from None
    control.update({key.removeprefix(UNET_PREFIX): tensor for key, tensor in renamed.items()})
    return control


def read_controlnet(path: Path) -> tuple[dict, dict]:
    """(the control model's weights by original name, options its format carries: global_average_pooling)."""
    try:
        return _read_controlnet(path)
    except ControlNetError:
        raise
    except CheckpointError as error:  # the file's own refusals (damaged, code-carrying): said of a ControlNet
        raise ControlNetError(str(error).replace("checkpoint ", "ControlNet file ", 1)) from None


def _read_controlnet(path: Path) -> tuple[dict, dict]:
    if path.is_dir():
        config = diffusers_config(path)
        state_dict, _ = read_checkpoint(diffusers_weights(path))
        return diffusers_to_original(state_dict), {"global_average_pooling": bool(config.get("global_pool_conditions"))}
    state_dict, _ = read_checkpoint(path)
    if any(key.startswith(CONTROL_PREFIX) for key in state_dict):  # 1.0 (whole model) or a prefixed 1.1 file
        weights = {key[len(CONTROL_PREFIX):]: value for key, value in state_dict.items() if key.startswith(CONTROL_PREFIX)}
    elif "controlnet_cond_embedding.conv_in.weight" in state_dict:  # a diffusers weights file on its own
        weights = diffusers_to_original(state_dict)
    else:
        weights = state_dict
    if "input_hint_block.0.weight" not in weights:
        raise ControlNetError(f"{path} is not a ControlNet (it has no input_hint_block or control_model weights): "
                              "pass a ControlNet 1.0/1.1 file or a diffusers ControlNet")
    return weights, _options_in_yaml_beside(path)


def _options_in_yaml_beside(path: Path) -> dict:
    """The 1.1 files come with a YAML of the same name; the shuffle model's asks for global average pooling, and
    ours for the shapes model (save_controlnet) for a control image 4x the latent's size. Only these are read
    from it: nothing it names is built."""
    beside = path.with_suffix(".yaml")
    params = None
    if beside.is_file():
        try:
            params = OmegaConf.select(read_config(beside), "model.params.control_stage_config.params", default=None)
        except ConfigError as error:
            raise ControlNetError(f"the ControlNet's config beside it cannot be used: {error}") from None
    options = {"global_average_pooling": bool(params.get("global_average_pooling", False)) if params else False}
    if params and "hint_downsample" in params:
        options["hint_downsample"] = int(params.hint_downsample)
    return options


def save_controlnet(control_model: ControlNet, model_config, path) -> None:
    """A trained ControlNet as the 1.1 files are kept: its weights alone (no prefix) in fp16 in a .safetensors
    file, and beside it (<path>.yaml) the ControlLDM config it was trained in, which tells its hint_downsample."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {key: value.detach().half().cpu().contiguous() for key, value in control_model.state_dict().items()}
    save_file(weights, str(path), metadata={"format": "pt"})
    config = OmegaConf.to_container(model_config, resolve=True) if OmegaConf.is_config(model_config) else model_config
    OmegaConf.save(OmegaConf.create({"model": config}), path.with_suffix(".yaml"))


# --- the base model and the network's shape ---------------------------------------------------------------------
def text_width(weights: dict) -> int | None:
    key = next((key for key in weights if TEXT_WIDTH_KEY.match(key)), None)
    return int(weights[key].shape[1]) if key is not None else None


def family_name(width) -> str:
    return FAMILIES.get(width, f"a model with {width}-wide text conditioning" if width else "an unknown model")


def controlnet_params(path: Path, weights: dict, base_unet_config) -> dict:
    """The ControlNet's constructor parameters: the base UNet's (or, with no base, the shipped config of the
    file's family), with the input and hint channels of the file. Refuses a file for another base model."""
    width = text_width(weights)
    if base_unet_config is None:
        if width not in FAMILY_CONFIGS:
            raise ControlNetError(f"ControlNet {path} is for {family_name(width)}, for which no ControlNet config is "
                                  "shipped: load it with its base model")
        config = read_config(CONFIG_DIR / FAMILY_CONFIGS[width])
        params = OmegaConf.to_container(config.model.params.control_stage_config.params, resolve=True)
    else:
        base = base_unet_config.get("params", base_unet_config)
        params = OmegaConf.to_container(base, resolve=True) if OmegaConf.is_config(base) else dict(base)
        if params.get("num_classes") is not None:
            raise ControlNetError(f"ControlNet {path} cannot be used with this model: ControlNets here are for text-"
                                  "to-image models without class or vector conditioning (SD 1.x, SD 2.x)")
        if width != params.get("context_dim"):
            raise ControlNetError(f"ControlNet {path} is for {family_name(width)} (text width {width}), but the model "
                                  f"is {family_name(params.get('context_dim'))} (text width {params.get('context_dim')}):"
                                  " use a ControlNet made for this model's family")
        for name in UNET_ONLY_PARAMS:
            params.pop(name, None)
    params["in_channels"] = int(weights["input_blocks.0.0.weight"].shape[1]) if "input_blocks.0.0.weight" in weights \
        else params["in_channels"]
    params["hint_channels"] = int(weights["input_hint_block.0.weight"].shape[1])
    return params


def check_fits(path: Path, weights: dict, expected: dict, family: str) -> None:
    """Refuse, in one line, weights whose keys, shapes or values do not fit the ControlNet built for the model."""
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    wrong_shape = [key for key in expected if key in weights and tuple(weights[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or wrong_shape:
        problems = [f"{len(keys)} {label} ({', '.join(keys[:2])}{', ...' if len(keys) > 2 else ''})"
                    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
                    if keys]
        raise ControlNetError(f"ControlNet {path} does not fit a ControlNet for this {family} model: {'; '.join(problems)}"
                              ": it was made for another base model, or is another kind of control model "
                              "(T2I-Adapter, Control-LoRA)")
    for key, tensor in weights.items():
        if not tensor.is_floating_point():
            raise ControlNetError(f"ControlNet {path} holds {str(tensor.dtype).replace('torch.', '')} values in tensor "
                                  f"{key}, where the model has floating-point weights: the file is damaged")
        if not all_finite(tensor):
            raise ControlNetError(f"ControlNet {path} holds NaN or infinite values in tensor {key}: the weights are "
                                  "damaged; use another file")


# --- loading ----------------------------------------------------------------------------------------------------
def load_controlnet(path_or_name, base_unet_config=None, search_dirs=(), device="cpu", dtype=None) -> LoadedControlNet:
    """The ControlNet `path_or_name` names (find_controlnet), built to fit the base model whose UNet config
    (`{target, params}` or its params; the run's `config.model.params.unet_config`) is given, or, with None,
    from the shipped config of the file's family (SD 1.x, SD 2.x); in eval mode on `device` in `dtype`
    (default: as load_model picks it). Raises ControlNetError (a CheckpointError) with one line."""
    path = find_controlnet(path_or_name, search_dirs)
    weights, options = read_controlnet(path)
    width = text_width(weights)
    params = controlnet_params(path, weights, base_unet_config)
    params.update(options)
    with parameters_on_meta():
        try:
            model = ControlNet(**params)
        except (TypeError, ValueError) as error:
            raise ControlNetError(f"ControlNet {path}: the base model's UNet config gives no ControlNet: {error}") from None
    family = family_name(width)
    check_fits(path, weights, model.state_dict(), family)
    checkpoint = CheckpointFile(diffusers_weights(path) if path.is_dir() else path)
    model.load_state_dict(weights, strict=True, assign=True)
    place_weights(model, device, dtype or resolve_dtype("autocast", device), channels_last=True, checkpoint=checkpoint)
    checkpoint.ensure_unchanged()  # else what was read may mix two files
    return LoadedControlNet(path, model.eval().requires_grad_(False), family)
