"""TAESD (--vae taesd): its architecture against diffusers' AutoencoderTiny, its three file layouts, loading it as a
model's first stage (with and without its encoder), refusals, and live previews. Random weights throughout: no
TAESD weights can be downloaded here."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import relative_error, txt2img
from tiny_model import write_tiny_checkpoint
from ldm.checkpoint import CheckpointError
from ldm.generate import loading
from ldm.generate.errors import UserError
from ldm.generate.previews import LivePreview
from ldm.generate.run import Job, job_fields
from ldm.generate.txt2img import TextToImage
from ldm.generate.output import OutputFolder
from ldm.generate import run as run_module
from ldm import taesd_file
from ldm.models.taesd import TinyAutoencoder, split_tiny_state_dict
from ldm.vae_file import read_vae

diffusers = pytest.importorskip("diffusers")
SCALE_FACTOR = 0.18215  # the tiny model's, as SD 1.x's


@pytest.fixture(scope="module")
def reference():
    """diffusers' AutoencoderTiny with seeded random weights, and its state dict."""
    torch.manual_seed(3)
    model = diffusers.AutoencoderTiny().eval()
    return model, {key: value.contiguous() for key, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    """The reference's weights as users have them: madebyollin's two .pth files, a diffusers folder."""
    folder = tmp_path_factory.mktemp("taesd")
    parts = split_tiny_state_dict(reference[1])
    torch.save(parts["encoder"], folder / "taesd_encoder.pth")
    torch.save(parts["decoder"], folder / "taesd_decoder.pth")
    only_decoder = folder / "alone"
    only_decoder.mkdir()
    save_file(parts["decoder"], str(only_decoder / "taesd_decoder.safetensors"))
    diffusers_folder = folder / "taesd-diffusers"
    diffusers_folder.mkdir()
    save_file(reference[1], str(diffusers_folder / "diffusion_pytorch_model.safetensors"))
    (diffusers_folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    ckpt = write_tiny_checkpoint(folder / "model", "tiny.safetensors")
    return dict(folder=folder, decoder=folder / "taesd_decoder.pth", alone=only_decoder / "taesd_decoder.safetensors",
                diffusers=diffusers_folder, ckpt=ckpt)


def load(ckpt, vae, low_memory=False):
    return loading.load(str(ckpt), None, "cpu", "full", vae=str(vae), low_memory=low_memory, log=lambda line: None)


def test_matches_diffusers_autoencoder_tiny(reference, files):
    model, _ = reference
    weights = read_vae(files["diffusers"] / "diffusion_pytorch_model.safetensors")
    ours = TinyAutoencoder(SCALE_FACTOR)
    ours.load_state_dict(weights.tensors)
    pixels = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = model.encode(pixels).latents  # diffusers' scaling_factor is 1: the UNet's latents themselves
        assert torch.allclose(ours.encode(pixels) * SCALE_FACTOR, latents, atol=1e-4, rtol=0)
        reference_pixels = model.decode(latents * 20).sample  # latents of SD's size, through the clamp's curve
        ours_pixels = ours.decode(latents * 20 / SCALE_FACTOR)
    assert latents.shape == (2, 4, 8, 6) and reference_pixels.shape == ours_pixels.shape == (2, 3, 64, 48)
    assert (ours_pixels - reference_pixels).abs().max() < 1e-4 and reference_pixels.std() > 0.01


def test_the_three_layouts_read_the_same(files):
    pth, folder = read_vae(files["decoder"]), read_vae(files["diffusers"] / "diffusion_pytorch_model.safetensors")
    assert pth.tensors.keys() == folder.tensors.keys() and pth.latent_channels == 4 and pth.has_encoder
    assert all(torch.equal(pth.tensors[key], folder.tensors[key]) for key in pth.tensors)
    assert any(key.startswith("decoder.1.") for key in pth.tensors)  # after the Clamp, as in madebyollin's files


def test_loaded_as_first_stage_decodes_and_encodes_with_taesd(files):
    loaded = load(files["ckpt"], files["decoder"])
    first_stage = loaded.model.first_stage_model
    assert isinstance(first_stage, TinyAutoencoder) and first_stage.encoder is not None
    assert loaded.downsampling_factor == 8 and loaded.vae_path == files["decoder"]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        decoded = run_module.decode(loaded, latents)
        assert torch.allclose(decoded, first_stage.decoder(latents) * 2 - 1, atol=1e-6)
        pixels = decoded.clamp(-1, 1)
        encoded = loaded.model.get_first_stage_encoding(loaded.model.encode_first_stage(pixels))
        assert torch.allclose(encoded, first_stage.encoder((pixels + 1) / 2), atol=1e-5)
    fields = job_fields(Job(batches=[["a"]]), loaded, 1, 0)
    assert fields["VAE"] == "taesd_decoder.pth" and len(fields["VAE hash"]) == 10


def test_without_its_encoder_img2img_encodes_with_the_checkpoints_own(files):
    plain = loading.load(str(files["ckpt"]), None, "cpu", "full", vae="none", log=lambda line: None)
    loaded = load(files["ckpt"], files["alone"], low_memory=True)
    first_stage = loaded.use("first_stage_model")
    assert first_stage.encoder is None and first_stage.checkpoint_encoder.decoder is None
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ours = loaded.model.encode_first_stage(pixels).mode()
        theirs = plain.model.encode_first_stage(pixels).mode()
    assert torch.equal(ours, theirs)


def test_taesd_by_name_is_found_in_the_taesd_folders(files, monkeypatch, tmp_path):
    monkeypatch.setattr(taesd_file, "TINY_FOLDERS", (tmp_path / "VAE-taesd", files["folder"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert taesd_file.resolve_tiny("TAESD", files["ckpt"]) == files["decoder"]
    assert taesd_file.resolve_tiny(str(files["diffusers"]), files["ckpt"]) == \
        files["diffusers"] / "diffusion_pytorch_model.safetensors"
    assert taesd_file.resolve_tiny("some/file.pt", files["ckpt"]) is None  # a VAE file: not TAESD's business
    with pytest.raises(UserError, match="--vae taesdxl: no taesdxl_decoder.pth .*madebyollin/taesd"):
        loading.load(str(files["ckpt"]), None, "cpu", "full", vae="taesdxl", log=lambda line: None)


def test_bad_taesd_files_are_refused_in_one_line(files, tmp_path):
    with pytest.raises(CheckpointError, match="is a TAESD encoder: pass its decoder"):
        read_vae(files["folder"] / "taesd_encoder.pth")
    damaged = {key: value.clone() for key, value in torch.load(files["decoder"], weights_only=True).items()}
    damaged["1.weight"][0, 0, 0, 0] = float("nan")
    save_file(damaged, str(tmp_path / "damaged_decoder.safetensors"))
    with pytest.raises(CheckpointError, match="NaN or infinite values in decoder tensor 1.weight"):
        read_vae(tmp_path / "damaged_decoder.safetensors")
    wide = TinyAutoencoder(1.0, latent_channels=16, with_encoder=False)  # SD3's and FLUX's latents
    save_file({key: value.contiguous() for key, value in wide.decoder.state_dict().items()},
              str(tmp_path / "taesd3_decoder.safetensors"))
    with pytest.raises(UserError, match="decodes 16-channel latents .* this model's are 4 channels"):
        load(files["ckpt"], tmp_path / "taesd3_decoder.safetensors")
    with pytest.raises(CheckpointError, match="cannot be baked into a checkpoint"):
        read_vae(files["decoder"]).check_fits({"decoder.conv_in.weight": (32, 4, 3, 3)})


def test_live_preview_shows_each_steps_x0(files, tmp_path):
    loaded = load(files["ckpt"], files["decoder"])
    seen = []
    preview = LivePreview.for_model(loaded, every=2, on_preview=lambda step, total, pictures: seen.append(step))
    job = Job(batches=[["a", "b"]], steps=3, sampler="euler", scale=1.0, height=64, width=64, save_grid=False,
              watermark=False)
    run_module.run(job, TextToImage(), loaded, OutputFolder(tmp_path, save_samples=False), log=lambda line: None,
                   preview=preview)
    assert seen == [2, 3] and len(preview.latest) == 2 and preview.latest[0].shape == (64, 64, 3)
    assert preview.latest[0].dtype == np.uint8
    from_file = LivePreview.from_file(files["alone"])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    from_file({"i": 0, "total": 1, "x0": latents})
    expected = (loaded.model.first_stage_model.decoder(latents).clamp(0, 1) * 255).round().to(torch.uint8)
    assert np.array_equal(from_file.latest[0], expected[0].permute(1, 2, 0).numpy())


def test_txt2img_with_vae_taesd_file(files, tmp_path):
    result = txt2img("--ckpt", files["ckpt"], "--vae", files["decoder"], "--outdir", tmp_path, "--n_samples", 1,
                     "--n_iter", 1, "--steps", 2, "--H", 64, "--W", 64, "--device", "cpu", "--skip_grid")
    assert result.returncode == 0, result.stderr
    from PIL import Image
    (picture,) = (tmp_path / "samples").glob("*.png")
    assert "VAE: taesd_decoder.pth" in Image.open(picture).info["parameters"]
