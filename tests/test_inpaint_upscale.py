"""Inpainting (both kinds of model), the x4 upscaler and tiled decoding, on tiny random-weight models."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO
from ldm.generate import run as run_module
from ldm.generate.errors import UserError
from ldm.generate.inpaint import FEATHER_PIXELS, Inpainting, generated_weight
from ldm.generate.output import OutputFolder, to_uint8_images
from ldm.generate.run import Job, run
from ldm.generate.upscale import Upscaling
from ldm.models.diffusion.sampling import Schedule
from ldm.models.tiling import decode_tiled, tile_starts
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from helpers import loaded_tiny
from tiny_model import TINY_CONFIG, tiny_model

INPAINT_CONFIG = REPO / "configs" / "tiny" / "inpaint-tiny.yaml"
UPSCALE_CONFIG = REPO / "configs" / "tiny" / "upscale-tiny.yaml"
SIZE = 64


@pytest.fixture(scope="module")
def text_model():
    return loaded_tiny(TINY_CONFIG)


@pytest.fixture(scope="module")
def inpaint_model():
    return loaded_tiny(INPAINT_CONFIG)


@pytest.fixture(scope="module")
def upscale_model():
    return loaded_tiny(UPSCALE_CONFIG, downsampling_factor=4)


def picture():
    ramp = torch.linspace(-1, 1, SIZE)
    return torch.stack([ramp.expand(SIZE, SIZE), ramp[:, None].expand(SIZE, SIZE), -ramp.expand(SIZE, SIZE)])[None]


def corner_mask():
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 4:20, 40:60] = 1.0  # white = repaint
    return mask


def generate(loaded, task, tmp_path, monkeypatch, height=SIZE, width=SIZE, **settings):
    """(latents decoded, saved pictures as arrays) of a one-picture run."""
    decoded = []
    real_decode = run_module.decode
    monkeypatch.setattr(run_module, "decode", lambda loaded_, latents, *rest: decoded.append(latents.clone())
                        or real_decode(loaded_, latents, *rest))
    job = Job(batches=[["a green square"]], steps=4, scale=3.0, height=height, width=width, seed=5, seed_mode="batch",
              save_grid=False, watermark=False, **settings)
    report = run(job, task, loaded, OutputFolder(tmp_path), log=lambda _: None)
    from PIL import Image
    return decoded, [np.asarray(Image.open(path)) for path in report.saved]


def input_uint8():
    return ((picture()[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()


def far_from_mask(mask, distance):
    return F.max_pool2d(mask, 2 * distance + 1, stride=1, padding=distance)[0, 0] == 0


class LocalAutoencoder(nn.Module):
    """A stand-in first stage whose pixels depend only on their own latent cell (8x8 means, nearest upsampling):
    unlike a random-weight decoder, whose attention spreads every latent over the whole picture, it shows
    whether the kept region comes out as the autoencoder's reconstruction, exactly."""

    downsampling_factor = 8

    def encode(self, x):
        mean = F.avg_pool2d(x, 8)
        mean = torch.cat([mean, mean[:, :1]], dim=1)  # 4 latent channels
        return DiagonalGaussianDistribution(torch.cat([mean, torch.full_like(mean, -20.0)], dim=1))

    def decode(self, z):
        return F.interpolate(z[:, :3], scale_factor=8, mode="nearest")


def test_ordinary_model_keeps_the_input_outside_the_mask(tmp_path, monkeypatch):
    """Masked sampling: the final latent is the input's posterior sample in every latent cell without a white
    pixel, so (without paste-back) those pixels are the autoencoder's reconstruction of the input."""
    loaded = loaded_tiny(TINY_CONFIG)
    model = loaded.model
    model.first_stage_model = LocalAutoencoder()
    mask = corner_mask()
    latents, images = generate(loaded, Inpainting(picture(), mask, paste_back=False), tmp_path, monkeypatch)
    posterior = model.encode_first_stage(picture())
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(5))  # the first draw
    known = model.scale_factor * (posterior.mean + posterior.std * noise)
    keep = 1 - F.adaptive_max_pool2d(mask, (8, 8))
    torch.testing.assert_close(latents[0] * keep, known * keep)
    assert not torch.allclose(latents[0] * (1 - keep), known * (1 - keep), atol=0.05)

    reconstruction = to_uint8_images(model.decode_first_stage(known))[0]
    kept_pixels = F.interpolate(keep, scale_factor=8)[0, 0].bool().numpy()
    assert np.array_equal(images[0][kept_pixels], reconstruction[kept_pixels])
    assert not np.array_equal(images[0][~kept_pixels], reconstruction[~kept_pixels])


@pytest.mark.parametrize("which", ["ordinary", "inpainting"])
def test_paste_back_leaves_pixels_away_from_the_mask_exactly_as_they_were(which, text_model, inpaint_model,
                                                                          tmp_path, monkeypatch):
    loaded = text_model if which == "ordinary" else inpaint_model
    mask = corner_mask()
    _, images = generate(loaded, Inpainting(picture(), mask), tmp_path, monkeypatch)
    far = far_from_mask(mask, 2 * FEATHER_PIXELS).numpy()
    assert np.array_equal(images[0][far], input_uint8()[far])
    inside = mask[0, 0].bool().numpy()
    assert np.abs(images[0][inside].astype(int) - input_uint8()[inside]).mean() > 5  # the white part was repainted


def test_feathered_weight_is_one_on_the_mask_and_zero_beyond_twice_the_feather():
    mask = corner_mask()
    weight = generated_weight(mask)
    assert torch.all(weight[mask.bool()] == 1.0)
    assert torch.all(weight[0, 0][far_from_mask(mask, 2 * FEATHER_PIXELS)] == 0.0)
    assert 0 < weight[0, 0, 12, 40 - FEATHER_PIXELS - 1] < 1  # a ramp in between


def test_inpainting_model_gets_mask_and_masked_image_latent(inpaint_model):
    """c_concat = [mask at latent size (nearest), latent of image · (mask < 0.5)], in concat_keys order."""
    model = inpaint_model.model
    mask, image = corner_mask(), picture()
    masked = model.masked_image(image, mask)
    assert torch.all(masked[mask.expand_as(masked).bool()] == 0) and torch.equal(masked[..., 30:, :30], image[..., 30:, :30])
    latent = torch.randn(1, 4, 8, 8)
    (concat,) = model.inpainting_concat(mask, latent)
    assert concat.shape == (1, 5, 8, 8)
    torch.testing.assert_close(concat[:, :1], F.interpolate(mask, size=(8, 8)))
    torch.testing.assert_close(concat[:, 1:], latent)


def test_upscaler_output_is_four_times_the_input(upscale_model, tmp_path, monkeypatch):
    low_res = F.avg_pool2d(picture(), 4)[..., :12, :]  # 16 wide, 12 high
    _, images = generate(upscale_model, Upscaling(low_res, 20), tmp_path, monkeypatch, height=48, width=64)
    assert images[0].shape == (48, 64, 3)


def test_noise_augmentation_is_the_low_res_schedules_q_sample(upscale_model):
    model = upscale_model.model
    betas = torch.linspace(1e-4 ** 0.5, 0.02 ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(model.low_scale_model.alphas_cumprod, torch.cumprod(1 - betas, 0).float())
    low_res, noise = torch.rand(2, 3, 4, 4) * 2 - 1, torch.randn(2, 3, 4, 4)
    levels = torch.tensor([0, 300])
    conditioning = model.low_scale_conditioning(low_res, levels, noise)
    alpha = Schedule(model.low_scale_model.alphas_cumprod).alpha(levels).float()[:, None, None, None]
    torch.testing.assert_close(conditioning["c_concat"][0], alpha * low_res + (1 - alpha**2).sqrt() * noise)
    assert torch.equal(conditioning["c_adm"], levels)


@pytest.mark.parametrize("level", [-1, 351])
def test_noise_level_outside_the_trained_range_is_refused(upscale_model, tmp_path, level):
    job = Job(batches=[["x"]], steps=2, height=16, width=16)
    with pytest.raises(UserError, match="outside 0..350"):
        run(job, Upscaling(torch.zeros(1, 3, 4, 4), level), upscale_model, OutputFolder(tmp_path), log=lambda _: None)


@pytest.mark.parametrize("config", [INPAINT_CONFIG, UPSCALE_CONFIG], ids=["inpaint", "upscale"])
def test_variants_train(config):
    """The training step builds the same conditioning as inference and gives a finite loss with gradients."""
    model = tiny_model(config=config).train()
    batch = {"image": torch.rand(2, 32, 32, 3) * 2 - 1, "caption": ["a", "b"],
             "mask": (torch.rand(2, 32, 32, 1) > 0.5).float(), "masked_image": torch.rand(2, 32, 32, 3) * 2 - 1,
             "lr": torch.rand(2, 8, 8, 3) * 2 - 1}
    loss, _ = model.training_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and next(model.model.parameters()).grad is not None


# --- tiled decoding -----------------------------------------------------------------------------------------
def nearest_decoder(factor):
    """A stand-in decoder whose output at a pixel depends only on its latent cell: tiling must be invisible."""
    return lambda z: F.interpolate(z[:, :3] * 2.0 + 0.5, scale_factor=factor, mode="nearest")


@pytest.mark.parametrize("height,width", [(40, 40), (113, 70), (64, 200)])
def test_tiled_decode_equals_the_whole_decode_for_a_local_decoder(height, width):
    z = torch.randn(2, 4, height, width)
    decode = nearest_decoder(4)
    tiled = decode_tiled(decode, z, factor=4, tile_pixels=128)
    torch.testing.assert_close(tiled, decode(z))


def test_tiles_cover_everything_and_overlap():
    for size in (70, 113, 200, 1000):
        starts = tile_starts(size, 32, 8)
        assert starts[0] == 0 and starts[-1] + 32 == size
        assert all(b - a <= 32 - 8 for a, b in zip(starts, starts[1:]))


def test_large_outputs_are_decoded_in_tiles_and_the_run_says_so(text_model, tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "needs_tiling", lambda shape, factor: True)
    calls, lines = [], []
    real = run_module.decode_tiled
    monkeypatch.setattr(run_module, "decode_tiled", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    job = Job(batches=[["a"]], steps=2, height=32, width=32, save_grid=False, n_iter=2)
    from ldm.generate.txt2img import TextToImage
    report = run(job, TextToImage(), text_model, OutputFolder(tmp_path), log=lines.append)
    assert len(report.saved) == 2 and len(calls) == 2
    assert sum("overlapping" in line for line in lines) == 1
