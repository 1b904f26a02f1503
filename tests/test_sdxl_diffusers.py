"""SDXL diffusers folders (ldm.diffusers_sdxl): written by diffusers itself (its StableDiffusionXLPipeline and the
refiner's StableDiffusionXLImg2ImgPipeline, built from a random-weight original checkpoint by diffusers' own
conversion functions, then save_pretrained) and read here to the original weights bit for bit; loaded, the same
model as the single file. Small SDXLs: the tiny UNet and VAE, SDXL's CLIP ViT-L (full size: our class has one
size) and a small OpenCLIP tower in bigG's place."""
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import REPO
from helpers import assert_same_weights, random_weights, save_diffusers_sdxl, write_json
from ldm.checkpoint import CheckpointError, load_model
from ldm.diffusers_folder import choose_config, read_diffusers_folder
from ldm.diffusers_sdxl import BASE_CONFIG, REFINER_CONFIG

TINY = REPO / "configs" / "tiny"
TOWER = (16, 2, 2)  # the OpenCLIP stand-in's width, layers, heads (the tiny configs')
ALL_PARTS = ("model.diffusion_model.", "first_stage_model.", "conditioner.")


def quiet(line):
    pass


def base_config(folder):
    """configs/tiny/sdxl-tiny.yaml with SDXL's CLIP ViT-L (penultimate layer) as its first text encoder."""
    config = OmegaConf.load(TINY / "sdxl-tiny.yaml")
    config.model.params.conditioner_config.params.emb_models[0] = {
        "is_trainable": False, "input_key": "txt", "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
        "params": {"layer": "hidden", "layer_idx": 11}}
    config.model.params.unet_config.params.context_dim = 768 + TOWER[0]
    path = folder / "sdxl-clip.yaml"
    OmegaConf.save(config, path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(config path, original weights, the folder diffusers saved)."""
    folder = tmp_path_factory.mktemp("sdxl-base")
    config_path = base_config(folder)
    original = random_weights(config_path, seed=7)
    return config_path, original, save_diffusers_sdxl(folder / "pipe", config_path, original, TOWER)


def test_diffusers_sdxl_folder_reads_to_the_original_weights(base):
    config_path, original, folder = base
    assert choose_config(folder) == BASE_CONFIG
    state_dict, chosen, files = read_diffusers_folder(folder, config_path)
    assert chosen == config_path
    assert_same_weights(state_dict, original, ALL_PARTS)
    assert {file.path.parent.name for file in files.files} == {"unet", "vae", "text_encoder", "text_encoder_2"}


def test_the_folder_loads_as_the_single_file_does(base, tmp_path):
    config_path, original, folder = base
    single = tmp_path / "sdxl.safetensors"
    save_file({key: value.contiguous() for key, value in original.items()}, single)
    from_file = load_model(single, config_path, log=quiet).model.state_dict()
    from_folder = load_model(folder, config_path, log=quiet).model.state_dict()
    assert from_file.keys() == from_folder.keys()
    assert all(torch.equal(from_file[key], from_folder[key]) for key in from_file)


def test_the_refiners_folder_has_bigg_alone(tmp_path):
    config_path = TINY / "sdxl-refiner-tiny.yaml"
    original = random_weights(config_path, seed=8)
    folder = save_diffusers_sdxl(tmp_path / "pipe", config_path, original, TOWER, refiner=True, variant="fp16")
    assert not (folder / "text_encoder").exists()
    assert choose_config(folder) == REFINER_CONFIG
    state_dict, _, _ = read_diffusers_folder(folder, config_path)
    half = {key: value.half() if value.is_floating_point() else value for key, value in original.items()}
    assert_same_weights(state_dict, half, ALL_PARTS)
    assert "conditioner.embedders.0.model.text_projection" in state_dict


def test_a_v_prediction_sdxl_folder_is_refused_in_one_line(tmp_path):
    write_json(tmp_path / "model_index.json", {"_class_name": "StableDiffusionXLPipeline",
                                               "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]})
    write_json(tmp_path / "scheduler" / "scheduler_config.json", {"prediction_type": "v_prediction"})
    with pytest.raises(CheckpointError, match="prediction_type 'v_prediction'.*pass --config") as refused:
        choose_config(tmp_path)
    assert "\n" not in str(refused.value)
