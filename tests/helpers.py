"""What several test modules share, so that no test module imports another: numeric comparison, seeded
generators, a LoadedModel around an in-memory model, the scripts run as users run them, and the random
full-size weights and diffusers models that the parity tests compare with.

Tiny models and checkpoints themselves stay in tiny_model.py (one job per module).
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from conftest import REPO
from ldm.checkpoint import parameters_on_meta
from ldm.generate.loading import LoadedModel
from ldm.util import instantiate_from_config
from tiny_model import TINY_CONFIG, tiny_model


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """|ours - reference| / |reference| (Frobenius norms), computed in float64."""
    return ((ours.double() - reference.double()).norm() / reference.double().norm()).item()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def loaded_in_memory(model: torch.nn.Module, config: Path = TINY_CONFIG, downsampling_factor: int = 8,
                     dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A LoadedModel around an in-memory model (no checkpoint file: the config stands in for its path)."""
    return LoadedModel(model, None, config, torch.device("cpu"), dtype, latent_channels=model.channels,
                       downsampling_factor=downsampling_factor, native_size=model.image_size * downsampling_factor)


def loaded_tiny(config: Path = TINY_CONFIG, downsampling_factor: int = 8) -> LoadedModel:
    return loaded_in_memory(tiny_model(config=config), config, downsampling_factor)


# --- scripts ---------------------------------------------------------------------------------------------------
def script_environment(**extra) -> dict:
    """The environment scripts run in under test: a model-hash cache of their own, plus `extra`."""
    return {**os.environ, "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", "/tmp/ldm-test-cache"), **extra}


def run_script(name: str, *args, timeout=120) -> subprocess.CompletedProcess:
    """scripts/<name>.py with these arguments, its output captured as text."""
    return subprocess.run([sys.executable, str(REPO / "scripts" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=script_environment())


def txt2img(*args, timeout=120) -> subprocess.CompletedProcess:
    return run_script("txt2img", *args, timeout=timeout)


# --- full-size random weights, and diffusers' models on them ------------------------------------------------------
POOL_SLACK = 1.5  # each pool of noise is this much longer than its largest tensor, so all offsets vary


def random_state_dict(template: dict, seed: int) -> dict:
    """Seeded random weights for every parameter of `template` (a meta-built model's state dict).

    Scaled so that activations stay O(1) through the whole network: matrices and kernels with standard
    deviation 1/sqrt(fan_in), norm scales near 1, small biases. Every tensor is random, including the
    output convolutions that the networks initialise to zero: with those at zero, whole branches (and the
    UNet's output) would be zero on both sides and the comparison would check nothing.
    Buffers (the noise schedule) are real already and are kept.

    To keep the checkpoint small, the tensors of one scale are windows, at seeded random offsets, into one
    shared pool of noise of that scale: torch.save writes a shared storage once, so the file holds about
    1 GB instead of 4 to 5, and drawing, writing and paging it in cost a quarter as much. Windows overlap
    only at shifted positions, which no comparison of two implementations could take for agreement.
    """
    generator = torch.Generator().manual_seed(seed)
    scales = {key: scale_of(key, tensor) for key, tensor in template.items() if tensor.device.type == "meta"}
    largest = {}
    for key, scale in scales.items():
        largest[scale] = max(largest.get(scale, 0), template[key].numel())
    pools = {}
    for (std, mean), count in largest.items():
        pool = torch.empty(int(count * POOL_SLACK)).uniform_(-math.sqrt(3), math.sqrt(3), generator=generator)
        pools[std, mean] = pool.mul_(std).add_(mean)  # a uniform variable on [-a, a] has variance a^2 / 3

    weights = {}
    for key, template_tensor in template.items():
        if key not in scales:
            weights[key] = template_tensor.clone()
            continue
        pool, count = pools[scales[key]], template_tensor.numel()
        offset = int(torch.randint(0, pool.numel() - count + 1, (1,), generator=generator))
        weights[key] = pool[offset:offset + count].view(template_tensor.shape)
    return weights


def scale_of(key: str, tensor: torch.Tensor) -> tuple:
    """(standard deviation, mean) of a parameter's random values."""
    if tensor.ndim >= 2:
        return 1 / math.sqrt(tensor[0].numel()), 0.0  # 1 / sqrt(fan_in)
    if key.endswith("weight"):  # the 1-D weights are the norm layers' scales
        return 0.1, 1.0
    return 0.1, 0.0


def meta_state_dict(config_path) -> dict:
    config = OmegaConf.load(config_path)
    with parameters_on_meta():
        return instantiate_from_config(config.model, use_ema=False).state_dict()


def diffusers_models(original_config_path, checkpoint: dict):
    """diffusers' UNet and VAE, configured from the original YAML and loaded strictly from `checkpoint`."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    original_config = OmegaConf.to_container(OmegaConf.load(original_config_path), resolve=True)
    unet_config = create_unet_diffusers_config_from_ldm(original_config, checkpoint)
    vae_config = create_vae_diffusers_config_from_ldm(original_config, checkpoint)
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True, assign=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True, assign=True)
    return unet.eval(), vae.eval()
