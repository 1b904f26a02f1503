"""Full-size UNet and VAE, random weights: our outputs match diffusers' to 1e-4 relative error in fp32.

diffusers, fed the original checkpoint keys through its own conversion functions, is known to match the
original CompVis / Stability code to about 2e-6 (shared/reference/diffusers-offline.md), so matching it
matches the originals. Its models are configured from the users' original YAML files, ours from our own
configs: a drift between the two (a head count, say, which changes no shape) shows up here.

Our model is built the way users get it: the random state dict is written to a checkpoint file and read
back with `ldm.checkpoint.load_model`. diffusers reads the same file with `torch.load`, so a loader bug
that reorders or swaps weights shows up as a mismatch too. No hub access.
"""
import math
import os
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from omegaconf import OmegaConf  # noqa: E402

from conftest import REPO, reference_path  # noqa: E402
from ldm.checkpoint import load_model, parameters_on_meta  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

MAX_RELATIVE_ERROR = 1e-4
TIMESTEPS = [1, 500, 999]  # one batch, one timestep per sample
IMAGE_SIZE = 64
POOL_SLACK = 1.5  # each pool of noise is this much longer than its largest tensor, so all offsets vary


@dataclass(frozen=True)
class Case:
    our_config: str
    original_config: str  # the users' YAML, which configures diffusers
    context_dim: int
    latent_sizes: tuple  # (height, width) of the UNet inputs


CASES = {
    # SD 1.x also at a latent that is not square and whose width is not a multiple of 8: the upsampling
    # must follow the skip connections' sizes (12 -> 6 -> 3 -> 2 -> 3 -> 6 -> 12), as diffusers' does.
    "sd1": Case("v1-inference.yaml", "compvis-v1-inference.yaml", 768, ((8, 8), (8, 12))),
    "sd2-v": Case("v2-inference-v.yaml", "stability-v2-inference-v.yaml", 1024, ((8, 8),)),
}


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
    original_config = OmegaConf.to_container(OmegaConf.load(original_config_path), resolve=True)
    unet_config = create_unet_diffusers_config_from_ldm(original_config, checkpoint)
    vae_config = create_vae_diffusers_config_from_ldm(original_config, checkpoint)
    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True, assign=True)
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True, assign=True)
    return unet.eval(), vae.eval()


@dataclass
class Models:
    ours: torch.nn.Module  # our LatentDiffusion, as load_model gives it
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    case: Case


@pytest.fixture(scope="module", params=list(CASES))
def models(request, tmp_path_factory):
    """Ours and diffusers' models, loaded from one random full-size checkpoint.

    Module-scoped and parametrised: pytest finishes every test of one model before building the next,
    so only one full-size model (a few GB once its weights are paged in) is held at a time.
    """
    case = CASES[request.param]
    our_config_path = REPO / "configs" / "stable-diffusion" / case.our_config
    original_config_path = reference_path("original-configs", case.original_config)
    checkpoint_path = tmp_path_factory.mktemp(request.param) / "random.ckpt"
    torch.save({"state_dict": random_state_dict(meta_state_dict(our_config_path), seed=0)}, checkpoint_path)

    # The config is given, as the SD 2.x v/eps probe says nothing about random weights.
    ours, _ = load_model(checkpoint_path, config_path=our_config_path, log=lambda message: None)
    # An independent read of the same file; memory-mapped, so both models share the page cache.
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    unet, vae = diffusers_models(original_config_path, checkpoint)
    yield Models(ours, unet, vae, case)
    checkpoint_path.unlink()


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).norm() / reference.double().norm()).item()


def assert_matches(ours: torch.Tensor, reference: torch.Tensor, what: str):
    assert ours.shape == reference.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    # A reference that is zero or tiny would make any implementation "match": the weights must reach it.
    assert 0.1 < reference.std().item() < 10, f"{what}: reference std {reference.std().item():.3g} is not O(1)"
    error = relative_error(ours, reference)
    assert error < MAX_RELATIVE_ERROR, f"{what}: relative error {error:.2e} >= {MAX_RELATIVE_ERROR}"


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_unet_output_matches_diffusers(models):
    batch = len(TIMESTEPS)
    context = torch.randn(batch, 77, models.case.context_dim, generator=seeded(2))
    t = torch.tensor(TIMESTEPS)
    for latent_size in models.case.latent_sizes:
        x = torch.randn(batch, 4, *latent_size, generator=seeded(1))
        with torch.no_grad():
            expected = models.unet(x, t, encoder_hidden_states=context).sample
            actual = models.ours.apply_model(x, t, context)
        for i, timestep in enumerate(TIMESTEPS):
            assert_matches(actual[i], expected[i], f"UNet output at t={timestep}, latent {latent_size}")


def test_vae_encoding_matches_diffusers(models):
    image = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=seeded(3)) * 2 - 1
    with torch.no_grad():
        expected = models.vae.encode(image).latent_dist
        actual = models.ours.first_stage_model.encode(image)
    assert_matches(actual.mean, expected.mean, "posterior mean")
    assert_matches(actual.logvar, expected.logvar, "posterior log-variance")


def test_vae_decoding_matches_diffusers(models):
    latent = torch.randn(2, 4, IMAGE_SIZE // 8, IMAGE_SIZE // 8, generator=seeded(4))
    with torch.no_grad():
        # decode_first_stage undoes the latent scale factor (0.18215), as diffusers users do by hand.
        expected = models.vae.decode(latent / models.vae.config.scaling_factor).sample
        actual = models.ours.decode_first_stage(latent)
    assert_matches(actual, expected, "decoded image")
