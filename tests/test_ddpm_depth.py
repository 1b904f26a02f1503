"""LatentDepth2ImageDiffusion: depth normalisation and resizing, the 5-channel UNet input, the estimator's wiring."""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from conftest import REPO
from ldm.models.diffusion.ddpm_depth import LatentDepth2ImageDiffusion, normalized_depth
from ldm.util import instantiate_from_config, trusted_configs
from tiny_model import tiny_model

DEPTH_TINY = REPO / "configs" / "tiny" / "depth-tiny.yaml"


class BrightnessAsDepth(nn.Module):
    """A stand-in depth estimator (MiDaS's interface, none of its weight): brightness, seen as nearness."""

    def __init__(self):
        super().__init__()
        self.seen_sizes = []

    def forward(self, midas_input):
        self.seen_sizes.append(tuple(midas_input.shape[-2:]))
        return midas_input.mean(dim=1, keepdim=True) + 1.0


def with_stand_in_estimator():
    config = OmegaConf.load(DEPTH_TINY)
    config.model.params.depth_stage_config = {"target": "test_ddpm_depth.BrightnessAsDepth"}
    torch.manual_seed(0)
    with trusted_configs():  # the stand-in is defined here, outside ldm
        return instantiate_from_config(config.model).eval()


# --- normalisation and resizing ---------------------------------------------------------------------------
def test_normalised_per_image_to_minus_one_one():
    depth = torch.rand(3, 1, 40, 56) * torch.tensor([1.0, 500.0, 0.01]).view(3, 1, 1, 1)
    out = normalized_depth(depth, (5, 7))
    assert out.shape == (3, 1, 5, 7) and out.dtype == torch.float32
    for image in out:
        assert image.min().item() == pytest.approx(-1.0, abs=1e-6)
        assert image.max().item() == pytest.approx(1.0, abs=1e-6)


def test_resizes_bicubic_then_stretches():
    depth = torch.rand(2, 1, 32, 48, generator=torch.Generator().manual_seed(0)) * 300
    resized = F.interpolate(depth, size=(4, 6), mode="bicubic", align_corners=False)
    low, high = resized.amin(dim=(1, 2, 3), keepdim=True), resized.amax(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(normalized_depth(depth, (4, 6)), 2 * (resized - low) / (high - low) - 1)


def test_only_the_layout_matters_not_the_scale():
    depth = torch.rand(1, 1, 16, 16) + 0.1
    torch.testing.assert_close(normalized_depth(depth, (8, 8)), normalized_depth(1000 * depth + 7, (8, 8)),
                               rtol=1e-5, atol=1e-5)


def test_flat_depth_is_finite():
    out = normalized_depth(torch.full((1, 1, 16, 16), 3.0, dtype=torch.float16), (8, 8))
    assert torch.isfinite(out).all() and torch.equal(out, torch.full_like(out, -1.0))


def test_refuses_maps_that_are_not_one_channel():
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        normalized_depth(torch.rand(1, 3, 8, 8), (8, 8))


# --- the model ----------------------------------------------------------------------------------------------
def test_original_target_name_resolves_to_our_class():
    model = tiny_model(config=DEPTH_TINY)
    assert isinstance(model, LatentDepth2ImageDiffusion)
    assert model.model.diffusion_model.in_channels == 5 and not model.has_depth_estimator


def test_depth_conditioning_changes_the_prediction():
    model = tiny_model(config=DEPTH_TINY)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    text = model.get_learned_conditioning(["a room"])
    near_left = torch.linspace(1, 0, 64).expand(1, 1, 64, 64)
    near_right = near_left.flip(-1)
    t = torch.tensor([500])

    def predict(depth):
        with torch.no_grad():
            return model.apply_model(latent, t, {"c_crossattn": [text], **model.depth_conditioning(depth, latent)})

    left = predict(near_left)
    # Same layout at another scale: the same prediction, to float rounding; another layout: another one.
    torch.testing.assert_close(left, predict(near_left * 40 + 3), rtol=1e-4, atol=1e-5)
    assert (left - predict(near_right)).abs().max() > 1e-2


def test_estimator_sees_the_midas_sized_picture_and_conditions_the_latent():
    model = with_stand_in_estimator()
    image = torch.rand(2, 3, 64, 96) * 2 - 1
    depth = model.estimate_depth(image)
    assert model.depth_model.seen_sizes == [(256, 384)]  # MiDaS scales 64×96 by 4 (nearer 1 than 6)
    latent = torch.zeros(2, 4, 8, 12)
    (concat,) = model.depth_conditioning(depth, latent)["c_concat"]
    assert concat.shape == (2, 1, 8, 12) and concat.amin() == -1 and concat.amax() == 1


def test_training_step_uses_the_depth_of_the_batch():
    model = with_stand_in_estimator()
    batch = {"image": torch.rand(2, 64, 64, 3) * 2 - 1, "caption": ["a", "b"]}
    loss, logs = model.training_loss(batch)
    assert torch.isfinite(loss) and model.depth_model.seen_sizes == [(384, 384)]
    batch["midas_in"] = torch.rand(2, 3, 128, 128) * 2 - 1  # a prepared MiDaS input, as the original datasets give
    model.training_loss(batch)
    assert model.depth_model.seen_sizes[-1] == (128, 128)


def test_without_estimator_asks_for_depth_maps():
    model = tiny_model(config=DEPTH_TINY)
    with pytest.raises(RuntimeError, match="without its depth estimator"):
        model.estimate_depth(torch.zeros(1, 3, 64, 64))
