"""scripts/convert.py: a diffusers folder written by diffusers itself, converted back to one original-layout
.safetensors file, gives the original weights bit for bit and loads; a checkpoint written as a diffusers folder
loads in diffusers as diffusers' own conversion of it; bad input writes nothing."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_same_weights, run_script
from ldm.checkpoint import load_model
from ldm.converting import ConvertError, folder_to_checkpoint
from ldm.diffusers_export import checkpoint_to_folder
from tiny_model import write_tiny_checkpoint

ALL_PARTS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


def read(path):
    """The file as the reference reader (the safetensors package) reads it."""
    return load_file(str(path))


def test_the_script_writes_the_original_weights_and_the_config_beside(tmp_path, clip_tiny):
    folder, config_path, original = clip_tiny
    out = tmp_path / "model.safetensors"
    result = run_script("convert", folder, "--out", out, "--config", config_path)
    assert result.returncode == 0, result.stderr
    assert out.with_suffix(".yaml").read_bytes() == config_path.read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.safetensors", "model.yaml"]
    assert_same_weights(read(out), original, ALL_PARTS)
    model = load_model(out, log=lambda line: None).model  # with the config beside it
    assert_same_weights(model.state_dict(), original, ALL_PARTS)


def test_fp16_halves_every_float_tensor(tmp_path, clip_tiny):
    folder, config_path, original = clip_tiny
    out = tmp_path / "half.safetensors"
    folder_to_checkpoint(folder, out, fp16=True, config_path=config_path, log=lambda line: None)
    half = {k: v.half() if v.is_floating_point() else v for k, v in original.items()}
    assert_same_weights(read(out), half, ALL_PARTS)


def test_an_existing_output_is_kept_unless_overwrite(tmp_path, clip_tiny):
    folder, config_path, original = clip_tiny
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"mine")
    result = run_script("convert", folder, "--out", out, "--config", config_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert out.read_bytes() == b"mine" and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    folder_to_checkpoint(folder, out, overwrite=True, config_path=config_path, log=lambda line: None)
    assert_same_weights(read(out), original, ALL_PARTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "model.yaml"]


@pytest.mark.parametrize("make", ["missing", "not a pipeline", "no unet", "wrong suffix", "no output folder"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, clip_tiny, make):
    folder, config_path, _ = clip_tiny
    source, out = folder, tmp_path / "out" / "model.safetensors"
    (tmp_path / "out").mkdir()
    if make == "missing":
        source = tmp_path / "nowhere"
    elif make == "not a pipeline":
        source = tmp_path / "plain"
        source.mkdir()
    elif make == "no unet":
        source = tmp_path / "broken"
        source.mkdir()
        (source / "model_index.json").write_text((folder / "model_index.json").read_text())
    elif make == "wrong suffix":
        out = out.with_suffix(".ckpt")
    else:
        out = tmp_path / "absent" / "model.safetensors"
    with pytest.raises(ConvertError) as error:
        folder_to_checkpoint(source, out, config_path=config_path if make != "no unet" else None, log=lambda line: None)
    assert "\n" not in str(error.value)
    assert list((tmp_path / "out").iterdir()) == [] and not (tmp_path / "absent").exists()


def test_a_checkpoint_becomes_a_folder_diffusers_loads_as_its_own_conversion(tmp_path, clip_tiny):
    from diffusers import StableDiffusionPipeline

    folder, config_path, original = clip_tiny  # folder: diffusers' own conversion of `original`
    checkpoint, out = tmp_path / "model.safetensors", tmp_path / "model"
    save_file({**original, "model_ema.decay": torch.tensor(0.999)}, str(checkpoint))
    result = run_script("convert", checkpoint, "--out", out, "--config", config_path)
    assert result.returncode == 0, result.stderr
    pipeline = StableDiffusionPipeline.from_pretrained(str(out))
    for component, weights in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                               ("text_encoder", "model")):
        theirs = read(folder / component / f"{weights}.safetensors")
        ours = getattr(pipeline, component).state_dict()
        assert set(ours) == set(theirs) and all(torch.equal(ours[key], theirs[key]) for key in theirs)
    assert pipeline.scheduler.config.prediction_type == "epsilon" and pipeline.tokenizer.pad_token == "<|endoftext|>"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "model.safetensors"]


@pytest.mark.parametrize("make", ["missing", "folder exists", "no output folder", "no text encoder"])
def test_bad_export_input_is_one_line_and_writes_nothing(tmp_path, make):
    checkpoint = write_tiny_checkpoint(tmp_path / "in")  # its text encoder is no CLIP: no diffusers pipeline has it
    out = tmp_path / "out" / "model"
    (tmp_path / "out").mkdir()
    if make == "missing":
        checkpoint = tmp_path / "nowhere.safetensors"
    elif make == "folder exists":
        out.mkdir()
    elif make == "no output folder":
        out = tmp_path / "absent" / "model"
    with pytest.raises(ConvertError) as error:
        checkpoint_to_folder(checkpoint, out, log=lambda line: None)
    assert "\n" not in str(error.value)
    assert {"folder exists": ["model"]}.get(make, []) == [p.name for p in (tmp_path / "out").iterdir()]
    assert not (tmp_path / "absent").exists() and list(out.iterdir() if out.is_dir() else []) == []
