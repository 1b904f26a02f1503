"""Full-size UNet and VAE, random weights: our outputs match diffusers' to 1e-4 relative error in fp32.

diffusers, fed the original checkpoint keys through its own conversion functions, is known to match the
original CompVis / Stability code to about 2e-6 (as the project's notes on diffusers as an offline reference record), so matching it
matches the originals. Its models are configured from the users' original YAML files, ours from our own
configs: a drift between the two (a head count, say, which changes no shape) shows up here.

Our model is built the way users get it: the random state dict is written to a checkpoint file and read
back with `ldm.checkpoint.load_model`. diffusers reads the same file with `torch.load`, so a loader bug
that reorders or swaps weights shows up as a mismatch too. No hub access.
"""
import os
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

from conftest import REPO, reference_path  # noqa: E402
from helpers import diffusers_models, meta_state_dict, random_state_dict, relative_error, seeded  # noqa: E402
from ldm.checkpoint import load_model  # noqa: E402

MAX_RELATIVE_ERROR = 1e-4
TIMESTEPS = [1, 500, 999]  # one batch, one timestep per sample
IMAGE_SIZE = 64


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
    ours = load_model(checkpoint_path, config_path=our_config_path, log=lambda message: None).model
    # An independent read of the same file; memory-mapped, so both models share the page cache.
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    unet, vae = diffusers_models(original_config_path, checkpoint)
    yield Models(ours, unet, vae, case)
    checkpoint_path.unlink()


def assert_matches(ours: torch.Tensor, reference: torch.Tensor, what: str):
    assert ours.shape == reference.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    # A reference that is zero or tiny would make any implementation "match": the weights must reach it.
    assert 0.1 < reference.std().item() < 10, f"{what}: reference std {reference.std().item():.3g} is not O(1)"
    error = relative_error(ours, reference)
    assert error < MAX_RELATIVE_ERROR, f"{what}: relative error {error:.2e} >= {MAX_RELATIVE_ERROR}"


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
