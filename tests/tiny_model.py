"""Tiny random-weight models and checkpoints (configs/tiny/*.yaml) for fast tests above the networks."""
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import REPO
from ldm.util import instantiate_from_config

TINY_CONFIG = REPO / "configs" / "tiny" / "txt2img-tiny.yaml"


def tiny_model(seed: int = 0, config: Path = TINY_CONFIG):
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.load(config).model)
    with torch.no_grad():  # the zero-initialised output layers would make the UNet blind to its input
        for name, p in model.model.named_parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.02)
    return model.eval()


def write_tiny_checkpoint(folder: Path, name: str = "tiny.safetensors", seed: int = 0, config: Path = TINY_CONFIG) -> Path:
    """The checkpoint with its config beside it (<name>.yaml), as users keep custom models."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    state_dict = {k: v.contiguous() for k, v in tiny_model(seed, config).state_dict().items()}
    save_file(state_dict, str(path))
    shutil.copy(config, path.with_suffix(".yaml"))
    return path
