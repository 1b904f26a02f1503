"""diffusers folders of the SD 2.x families (v-prediction, inpainting, depth, x4 upscaler) and the way back.

The folders are written by diffusers itself: its pipelines built from a random-weight original checkpoint by
its own conversion functions and schedulers, then save_pretrained (fp32, an fp16 variant, pickled .bin).
Reading them here must give the original weights bit for bit. Our checkpoints written as diffusers folders
(scripts/convert.py) must load in diffusers' from_pretrained to exactly what diffusers' own conversion of
the same checkpoint gives, and here back to the checkpoint. The text encoder is SD 2.x's OpenCLIP class
(penultimate layer) on a small tower added for these tests (3 blocks, 2 built), so that each family takes
seconds; test_diffusers_folder has a full-size SD 2.x check.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO
from helpers import (assert_same_weights, diffusers_models, diffusers_openclip, openclip_config, random_weights,
                     save_diffusers_pipeline, write_json, write_pipeline_files)
from ldm.checkpoint import CheckpointError, load_model
from ldm.converting import ConvertError
from ldm.diffusers_export import checkpoint_to_folder, tokenizer_files
from ldm.diffusers_folder import choose_config, read_diffusers_folder
from ldm.modules.encoders.modules import OPEN_CLIP_TEXT_ARCHS

TINY = REPO / "configs" / "tiny"
ALL_PARTS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
# family: (tiny config, model params changed, how diffusers saves it)
FAMILIES = {
    "v-prediction": ("txt2img-tiny.yaml", {"parameterization": "v"}, {}),
    "inpainting": ("inpaint-tiny.yaml", {}, {"variant": "fp16"}),
    "depth": ("depth-tiny.yaml", {}, {"safe_serialization": False}),
    "x4-upscaler": ("upscale-tiny.yaml", {}, {}),
}
SMALL_TOWER, WIDTH, LAYERS, HEADS = "ViT-small-test", 64, 3, 2
# What an original OpenCLIP checkpoint holds besides the blocks SD 2.x runs (left unread here).
NOT_RUN = (f"cond_stage_model.model.transformer.resblocks.{LAYERS - 1}.", "cond_stage_model.model.text_projection",
           "cond_stage_model.model.logit_scale")


@pytest.fixture(scope="module")
def small_tower():
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(OPEN_CLIP_TEXT_ARCHS, SMALL_TOWER, (WIDTH, LAYERS, HEADS))
        yield


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    for name, text in tokenizer_files(pad_token=0).items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, tokenizer_folder, small_tower):
    """(name, config path, original weights, the folder diffusers saved, how it saved it)."""
    base, params, saving = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    config_path = openclip_config(folder, TINY / base, arch=SMALL_TOWER, width=WIDTH, **params)
    original = random_weights(config_path, seed=5)
    pipeline = save_diffusers_pipeline(folder / "pipe", config_path, original, tokenizer_folder, (WIDTH, HEADS),
                                       **saving)
    return request.param, config_path, original, pipeline, saving


def with_unused_parts(original: dict) -> dict:
    """`original` as an OpenCLIP checkpoint holds it: also the last block and the image-text head."""
    generator = torch.Generator().manual_seed(9)
    block = {key.replace("resblocks.0.", f"resblocks.{LAYERS - 1}."): torch.randn(value.shape, generator=generator)
             for key, value in original.items() if ".resblocks.0." in key}
    return {**original, **block, NOT_RUN[1]: torch.randn(WIDTH, WIDTH, generator=generator),
            NOT_RUN[2]: torch.tensor(4.6)}


def test_a_folder_saved_by_diffusers_loads_to_the_original_weights(family):
    name, config_path, original, pipeline, saving = family
    expected = {k: v.half() if saving.get("variant") == "fp16" else v for k, v in original.items()}
    state_dict, _, files = read_diffusers_folder(pipeline, config_path)
    assert_same_weights(state_dict, expected, ALL_PARTS)
    assert all(file.path.suffix == (".bin" if "safe_serialization" in saving else ".safetensors") for file in files.files)
    model = load_model(pipeline, config_path, log=lambda line: None).model
    loaded = {k: v.float() for k, v in expected.items()}  # a CPU run loads in fp32
    assert_same_weights(model.state_dict(), loaded, ALL_PARTS)


def test_our_checkpoint_written_as_a_folder_loads_in_diffusers_as_its_own_conversion(family, tmp_path):
    import diffusers

    name, config_path, original, _, _ = family
    checkpoint = tmp_path / "model.safetensors"
    save_file(with_unused_parts(original), str(checkpoint))
    (tmp_path / "model.yaml").write_bytes(config_path.read_bytes())  # found beside the checkpoint
    out = checkpoint_to_folder(checkpoint, tmp_path / "model", log=lambda line: None)

    # A depth folder has no depth estimator (ours is MiDaS, diffusers' a transformers DPT): diffusers wants
    # that said, or a DPT passed (depth_estimator=DPTForDepthEstimation.from_pretrained("Intel/dpt-hybrid-midas")).
    no_estimator = {"depth_estimator": None, "feature_extractor": None} if name == "depth" else {}
    pipeline = diffusers.DiffusionPipeline.from_pretrained(str(out), **no_estimator)
    unet, vae = diffusers_models(config_path, original)
    for ours, theirs in ((pipeline.unet, unet), (pipeline.vae, vae), (pipeline.text_encoder,
                                                                       diffusers_openclip(original, WIDTH, HEADS))):
        theirs = theirs.state_dict()
        assert ours.state_dict().keys() == theirs.keys()
        assert all(torch.equal(tensor, theirs[key]) for key, tensor in ours.state_dict().items())
    prediction = "v_prediction" if name in ("v-prediction", "x4-upscaler") else "epsilon"
    assert pipeline.scheduler.config.prediction_type == prediction
    if name == "x4-upscaler":
        assert pipeline.config.max_noise_level == 350 and pipeline.low_res_scheduler.config.beta_end == 0.02
    assert pipeline.tokenizer("a red circle").input_ids[1:-1] == [320, 736, 7117]
    assert_same_weights(read_diffusers_folder(out, config_path)[0], original, ALL_PARTS)  # and back, bit for bit


@pytest.mark.parametrize("hidden_act, in_channels, prediction, expected", [
    ("quick_gelu", 4, "epsilon", "v1-inference.yaml"),
    ("gelu", 4, "epsilon", "v2-inference.yaml"),
    ("gelu", 4, "v_prediction", "v2-inference-v.yaml"),
    ("gelu", 9, "epsilon", "v2-inpainting-inference.yaml"),
    ("gelu", 5, "epsilon", "v2-midas-inference.yaml"),
    ("gelu", 7, "v_prediction", "x4-upscaling.yaml"),
])
def test_the_config_follows_the_text_encoder_unet_and_scheduler(tmp_path, hidden_act, in_channels, prediction,
                                                                 expected):
    write_folder_configs(tmp_path, hidden_act, in_channels, prediction)
    assert choose_config(tmp_path).name == expected


def write_folder_configs(folder, hidden_act, in_channels, prediction, width=None):
    write_pipeline_files(folder, prediction_type=prediction)
    width = width or (768 if hidden_act == "quick_gelu" else 1024)
    write_json(folder / "text_encoder" / "config.json", {"hidden_size": width, "hidden_act": hidden_act})
    write_json(folder / "unet" / "config.json", {"in_channels": in_channels})


@pytest.mark.parametrize("in_channels, prediction, width, named", [
    (9, "v_prediction", 1024, "SD 2.x inpainting model with prediction_type 'v_prediction'"),
    (7, "epsilon", 1024, "SD 2.x x4 upscaler model with prediction_type 'epsilon'"),
    (4, "epsilon", 1280, "of no family we load"),
])
def test_a_folder_no_config_of_ours_fits_is_refused_in_one_line(tmp_path, in_channels, prediction, width, named):
    write_folder_configs(tmp_path, "gelu", in_channels, prediction, width)
    with pytest.raises(CheckpointError) as error:
        read_diffusers_folder(tmp_path)
    message = str(error.value)
    assert named in message and ("--config" in message or "original .ckpt" in message) and "\n" not in message


@pytest.mark.parametrize("change, named", [
    (("scheduler", "beta_end", 0.02), "beta_end 0.02 for 0.012"),
    (("low_res_scheduler", "beta_end", 0.03), "beta_end 0.03 for 0.02"),
    (("model_index.json", "max_noise_level", 250), "max_noise_level 250"),
])
def test_a_folder_with_other_noise_schedules_is_refused_in_one_line(tmp_path, change, named):
    write_folder_configs(tmp_path, "gelu", 7, "v_prediction")
    upscaler = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                "prediction_type": "v_prediction"}
    write_json(tmp_path / "scheduler" / "scheduler_config.json", upscaler)
    write_json(tmp_path / "low_res_scheduler" / "scheduler_config.json", {**upscaler, "prediction_type": "epsilon"})
    index = json.loads((tmp_path / "model_index.json").read_text())
    write_json(tmp_path / "model_index.json", {**index, "max_noise_level": 350})
    where, key, value = change
    path = tmp_path / where if where.endswith(".json") else tmp_path / where / "scheduler_config.json"
    config = REPO / "configs" / "stable-diffusion" / ("v1-inference.yaml" if where == "scheduler" else "x4-upscaling.yaml")
    write_json(path, {**json.loads(path.read_text()), key: value})
    with pytest.raises(CheckpointError) as error:
        read_diffusers_folder(tmp_path, config)
    assert named in str(error.value) and "--config" in str(error.value) and "\n" not in str(error.value)


def test_an_sd2_checkpoint_without_config_is_refused_since_eps_and_v_look_alike(tmp_path):
    checkpoint = tmp_path / "sd2.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3, dtype=torch.float16),
               "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight":
                   torch.zeros(3072, 1024, dtype=torch.float16)}, str(checkpoint))
    with pytest.raises(ConvertError) as error:
        checkpoint_to_folder(checkpoint, tmp_path / "out", log=lambda line: None)
    assert "v2-inference-v.yaml" in str(error.value) and "\n" not in str(error.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sd2.safetensors"]


def test_an_existing_folder_is_kept_unless_overwrite(family, tmp_path):
    _, config_path, original, _, _ = family
    checkpoint, out = tmp_path / "model.safetensors", tmp_path / "model"
    save_file(original, str(checkpoint))
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    with pytest.raises(ConvertError) as error:
        checkpoint_to_folder(checkpoint, out, config_path=config_path, log=lambda line: None)
    assert "--overwrite" in str(error.value) and [p.name for p in out.iterdir()] == ["mine.txt"]
    checkpoint_to_folder(checkpoint, out, config_path=config_path, overwrite=True, fp16=True, log=lambda line: None)
    half = {k: v.half() for k, v in original.items()}
    assert_same_weights(read_diffusers_folder(out, config_path)[0], half, ALL_PARTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.safetensors"]  # no temporary left
