"""diffusers pipeline folders and hub ids in the local Hugging Face cache, loaded as our checkpoints.

The folders are written by diffusers and transformers themselves (save_pretrained of the models diffusers'
own conversion builds from an original-layout checkpoint), so reading them back must give the original
weights, key for key and bit for bit.
"""

import pytest
import torch

from conftest import REPO
from helpers import (assert_same_weights, meta_state_dict, random_state_dict, run_script, save_diffusers_pipeline,
                     write_folder, write_json, write_pipeline_files)
from ldm.checkpoint import CheckpointError, load_model
from ldm.diffusers_folder import choose_config, read_diffusers_folder
from ldm.generate.errors import UserError
from ldm.generate.loading import resolve_checkpoint
from tiny_model import TINY_CONFIG, tiny_model

V1_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"
V2V_CONFIG = REPO / "configs" / "stable-diffusion" / "v2-inference-v.yaml"
UNET_AND_VAE = ("model.diffusion_model.", "first_stage_model.")


@pytest.fixture(scope="module")
def tiny_original():
    return {k: v.contiguous() for k, v in tiny_model(seed=3).state_dict().items()}


@pytest.mark.parametrize("variant, vae_pickled", [(None, True), ("fp16", False)])
def test_a_folder_written_by_diffusers_reads_as_the_original_weights(tmp_path, tiny_original, variant, vae_pickled):
    folder = write_folder(tmp_path / "pipe", TINY_CONFIG, tiny_original, text_encoder=False, variant=variant,
                          vae_pickled=vae_pickled)
    state_dict, files = read_unet_and_vae(folder)
    original = {k: v.half() if variant == "fp16" else v for k, v in tiny_original.items()}
    assert_same_weights(state_dict, original, UNET_AND_VAE)
    assert {path.name for path in files} == {"diffusion_pytorch_model" + (".fp16" if variant else "")
                                             + (".bin" if vae_pickled else ".safetensors"),
                                             "diffusion_pytorch_model" + (".fp16" if variant else "") + ".safetensors"}


def read_unet_and_vae(folder):
    """The UNet and VAE of a tiny folder (the tiny config's text encoder is no CLIP, so none is written)."""
    from ldm import diffusers_folder
    state_dict, paths = {}, []
    for name, convert in (("unet", diffusers_folder.unet_to_original), ("vae", diffusers_folder.vae_to_original)):
        weights, files = diffusers_folder.read_component(folder / name)
        state_dict.update(convert(weights))
        paths += files
    return state_dict, paths


def test_a_pipeline_folder_loads_to_the_original_weights(clip_tiny):
    folder, config_path, original = clip_tiny
    model = load_model(folder, config_path, log=lambda line: None).model
    assert_same_weights(model.state_dict(), original, ("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))


def test_a_hub_id_is_found_in_the_local_cache_only(tmp_path, monkeypatch, clip_tiny):
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    (repo / "snapshots").mkdir(parents=True)
    (repo / "snapshots" / "0123abc").symlink_to(clip_tiny[0], target_is_directory=True)
    (repo / "snapshots" / "fedc987").mkdir()  # an older revision, not the one refs/main names
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_checkpoint("someone/tiny-sd", log=lambda line: None) == repo / "snapshots" / "0123abc"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve_checkpoint("someone/tiny-sd", log=lambda line: None) == repo / "snapshots" / "0123abc"


def test_a_hub_id_not_in_the_cache_is_one_line_saying_where_and_how(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UserError) as error:
        resolve_checkpoint("someone/missing-model")
    message = str(error.value)
    assert "\n" not in message
    assert str(tmp_path / "hub" / "models--someone--missing-model") in message
    assert "huggingface-cli download someone/missing-model" in message


def clip_config(hidden_size):
    return {"architectures": ["CLIPTextModel"], "hidden_size": hidden_size}


@pytest.mark.parametrize("in_channels, expected", [(4, "v1-inference.yaml"), (9, "v1-inpainting-inference.yaml")])
def test_the_config_follows_the_unet_of_an_sd1_folder(tmp_path, in_channels, expected):
    write_pipeline_files(tmp_path)
    write_json(tmp_path / "text_encoder" / "config.json", clip_config(768))
    write_json(tmp_path / "unet" / "config.json", {"in_channels": in_channels})
    assert choose_config(tmp_path).name == expected


@pytest.mark.parametrize("hidden_size, prediction_type, named", [(1024, "epsilon", "of no family we load"),
                                                                 (768, "v_prediction", "'v_prediction'")])
def test_folders_of_other_families_are_refused_in_one_line(tmp_path, hidden_size, prediction_type, named):
    write_pipeline_files(tmp_path, prediction_type=prediction_type)
    write_json(tmp_path / "text_encoder" / "config.json", clip_config(hidden_size))
    write_json(tmp_path / "unet" / "config.json", {"in_channels": 4})
    with pytest.raises(CheckpointError) as error:
        read_diffusers_folder(tmp_path)
    assert named in str(error.value) and "\n" not in str(error.value)


class WritesMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_bin_that_runs_code_is_refused_in_one_line(tmp_path):
    folder, marker, outdir = tmp_path / "pipe", tmp_path / "marker", tmp_path / "out"
    write_pipeline_files(folder)
    write_json(folder / "text_encoder" / "config.json", clip_config(768))
    write_json(folder / "unet" / "config.json", {"in_channels": 4})
    torch.save({"conv_in.weight": torch.zeros(1), "payload": WritesMarker(marker)}, folder / "unet" / "diffusion_pytorch_model.bin")
    result = run_script("txt2img", "--ckpt", folder, "--outdir", outdir, "--prompt", "a cat", "--ddim_steps", 1)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "refusing to load" in lines[0] and "diffusion_pytorch_model.bin" in lines[0]
    assert not marker.exists()
    assert not outdir.exists() or not any(outdir.rglob("*.png"))


@pytest.mark.slow
def test_a_full_size_sd1_folder_loads_to_the_original_weights(tmp_path):
    original = {k: v.contiguous() for k, v in random_state_dict(meta_state_dict(V1_CONFIG), seed=11).items()}
    folder = write_folder(tmp_path / "pipe", V1_CONFIG, original, variant="fp16")
    model = load_model(folder, log=lambda line: None).model  # the config chosen from the folder
    half = {k: v.half().float() if v.is_floating_point() else v for k, v in original.items()}
    assert_same_weights(model.state_dict(), half, ("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))


@pytest.mark.slow
def test_a_full_size_sd2_v_folder_saved_by_diffusers_loads_to_the_original_weights(tmp_path):
    """diffusers' SD 2.x text encoder has 23 of OpenCLIP ViT-H's 24 blocks: ours builds those the penultimate
    layer runs, so the folder loads with nothing missing; the config is chosen from the folder (v-prediction)."""
    from ldm.diffusers_export import tokenizer_files

    for name, text in tokenizer_files(pad_token=0).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    original = {k: v.contiguous() for k, v in random_state_dict(meta_state_dict(V2V_CONFIG), seed=12).items()}
    folder = save_diffusers_pipeline(tmp_path / "pipe", V2V_CONFIG, original, tmp_path, (1024, 16), variant="fp16")
    assert choose_config(folder) == V2V_CONFIG
    model = load_model(folder, log=lambda line: None).model
    half = {k: v.half().float() if v.is_floating_point() else v for k, v in original.items()}
    del original
    assert_same_weights(model.state_dict(), half, ("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))
    assert model.parameterization == "v" and len(model.cond_stage_model.model.transformer.resblocks) == 23
