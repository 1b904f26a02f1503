"""depth2img: padding, depth images, where the estimator's weights come from, the run, and the CLI end to end."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO
from ldm.generate.depth2img import DepthToImage, depth_source, load_depth_map, pad_edges, padded_size, read_midas_weights
from ldm.generate.errors import UserError
from ldm.generate import loading
from ldm.generate.output import OutputFolder
from ldm.generate.run import Job, run
from ldm.util import trusted_configs
from helpers import loaded_tiny
from tiny_model import TINY_CONFIG, write_tiny_checkpoint

SCRIPT = REPO / "scripts" / "depth2img.py"
DEPTH_TINY = REPO / "configs" / "tiny" / "depth-tiny.yaml"
V2_MIDAS = OmegaConf.load(REPO / "configs" / "stable-diffusion" / "v2-midas-inference.yaml")


# --- padding and depth images -----------------------------------------------------------------------------
@pytest.mark.parametrize("size,expected", [((50, 70), (128, 128)), ((130, 200), (192, 256)),
                                           ((512, 768), (512, 768)), ((64, 64), (128, 128))])
def test_padded_to_a_multiple_of_64_at_least_128(size, expected):
    assert padded_size(*size) == expected


def test_padding_repeats_the_last_row_and_column():
    image = torch.arange(2 * 3 * 50 * 70, dtype=torch.float32).reshape(2, 3, 50, 70)
    padded = pad_edges(image)
    assert padded.shape == (2, 3, 128, 128)
    assert torch.equal(padded[..., :50, :70], image)
    assert torch.equal(padded[..., 100, :70], image[..., 49, :])
    assert torch.equal(padded[..., :50, 127], image[..., :, 69])


def write_gradient(path, width, height, mode="L", flip=False):
    ramp = np.linspace(0.0, 1.0, width)[None, :].repeat(height, axis=0)
    ramp = ramp[:, ::-1] if flip else ramp
    if mode == "I;16":
        Image.fromarray((ramp * 65535).astype(np.uint16)).save(path)
    else:
        Image.fromarray((ramp * 255).astype(np.uint8), mode="L").save(path)
    return path


def test_depth_map_16_bit_full_precision_and_resized(tmp_path):
    depth = load_depth_map(write_gradient(tmp_path / "d.png", 140, 100, mode="I;16"), height=50, width=70)
    assert depth.shape == (1, 1, 50, 70) and depth.dtype == torch.float32
    assert depth.max() > 60000  # 16-bit values kept, not cut to 8 bits
    assert (depth[0, 0, 0, 1:] > depth[0, 0, 0, :-1]).all()  # bright (near) on the right, as drawn


@pytest.mark.parametrize("case,message", [("other_shape", "must have the picture's shape"),
                                          ("flat", "one value everywhere")])
def test_unusable_depth_maps_are_refused(tmp_path, case, message):
    path = tmp_path / "d.png"
    if case == "flat":
        Image.new("L", (70, 50), 128).save(path)
    else:
        write_gradient(path, 50, 50)
    with pytest.raises(UserError, match=message):
        load_depth_map(path, height=50, width=70)


# --- where the estimator's weights come from ----------------------------------------------------------------
UNET_KEY = "model.diffusion_model.out.2.bias"
ESTIMATOR_KEY = "depth_model.model.scratch.output_conv.4.bias"


def test_depth_map_builds_without_estimator_and_leaves_its_weights_unread():
    state_dict, overrides = depth_source("d.ckpt", True)({UNET_KEY: 0, ESTIMATOR_KEY: 0}, V2_MIDAS)
    assert state_dict == {UNET_KEY: 0} and overrides == {"depth_stage_config": None}


def test_estimator_weights_from_the_checkpoint():
    state_dict = {UNET_KEY: 0, ESTIMATOR_KEY: 0}
    assert depth_source("d.ckpt", False)(state_dict, V2_MIDAS) == (state_dict, {})


@pytest.mark.parametrize("config,message", [(V2_MIDAS, "pass --depth_map PATH .* or --midas PATH"),
                                            (OmegaConf.load(DEPTH_TINY), "builds no depth estimator")])
def test_no_depth_source_says_what_to_pass(config, message):
    with pytest.raises(UserError, match=message):
        depth_source("d.ckpt", False)({UNET_KEY: 0}, config)


def test_other_families_are_left_to_be_refused_by_name():
    state_dict = {UNET_KEY: 0}
    assert depth_source("t.ckpt", False, "m.pt")(state_dict, OmegaConf.load(TINY_CONFIG)) == (state_dict, {})


def checkpoint_with_a_stand_in_estimator(tmp_path):
    """The tiny depth model with a small estimator that has weights (depth_model.weight/.bias)."""
    config = OmegaConf.load(DEPTH_TINY)
    config.model.params.depth_stage_config = {"target": "torch.nn.Conv2d",
                                              "params": {"in_channels": 3, "out_channels": 1, "kernel_size": 1}}
    OmegaConf.save(config, tmp_path / "with-estimator.yaml")
    with trusted_configs():  # torch.nn.Conv2d is not on the allow-list of what configs may build
        return write_tiny_checkpoint(tmp_path, "d.safetensors", config=tmp_path / "with-estimator.yaml")


def test_loader_builds_without_the_estimator_when_a_depth_map_is_given(tmp_path):
    ckpt = checkpoint_with_a_stand_in_estimator(tmp_path)

    def load(depth_map_given):
        return loading.load(str(ckpt), None, "cpu", "full", log=lambda _: None,
                            customize=depth_source(ckpt, depth_map_given), trust_config=True).model

    assert isinstance(load(False).depth_model, torch.nn.Conv2d)
    assert load(True).depth_model is None


def test_low_memory_mode_converts_the_estimator_only_to_estimate(tmp_path):
    ckpt = checkpoint_with_a_stand_in_estimator(tmp_path)
    pictures, used = [], []
    for low_memory in (False, True):
        loaded = loading.load(str(ckpt), None, "cpu", "full", log=lambda _: None,
                              customize=depth_source(ckpt, False), low_memory=low_memory, trust_config=True)
        if low_memory:
            real_use = loaded.use
            loaded.use = lambda name: used.append(name) or real_use(name)
        pictures.append(depth_run(loaded, tmp_path, None, f"low-{low_memory}"))
    assert np.array_equal(*pictures)
    assert used.index("depth_model") < used.index("model")  # estimated before sampling, then given back
    assert loaded.components.current == "first_stage_model"


def test_midas_file_of_another_model_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "dpt_large.safetensors"
    save_file({"pretrained.model.blocks.23.norm1.weight": torch.zeros(1024)}, str(path))
    with pytest.raises(UserError, match="is not MiDaS DPT-Hybrid weights"):
        read_midas_weights(path)
    with pytest.raises(UserError, match="no such file"):
        read_midas_weights(tmp_path / "nowhere.pt")


# --- the run ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loaded_tiny_depth():
    return loaded_tiny(DEPTH_TINY)


def depth_run(loaded, tmp_path, depth_map, name):
    pixels = torch.rand(1, 3, 50, 70, generator=torch.Generator().manual_seed(0)) * 2 - 1
    job = Job(batches=[["a room"]], steps=4, scale=3.0, height=128, width=128, seed=1, seed_mode="batch", save_grid=False, watermark=False)
    report = run(job, DepthToImage(pixels, 0.75, depth_map), loaded, OutputFolder(tmp_path / name), log=lambda _: None)
    (path,) = report.saved
    return np.asarray(Image.open(path))


def test_depth_conditions_the_picture(loaded_tiny_depth, tmp_path):
    left = torch.linspace(0, 1, 70).expand(1, 1, 50, 70)
    near_left = depth_run(loaded_tiny_depth, tmp_path, left, "a")
    assert near_left.shape == (50, 70, 3)  # cropped back from the padded 128×128
    # The same layout at another scale gives the same picture (to a rounding step); another layout another one.
    rescaled = depth_run(loaded_tiny_depth, tmp_path, left * 100 + 5, "b").astype(int)
    flipped = depth_run(loaded_tiny_depth, tmp_path, left.flip(-1), "c").astype(int)
    assert np.abs(rescaled - near_left).max() <= 1
    assert np.abs(flipped - near_left).mean() > 1


# --- the command line ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    return {"depth": write_tiny_checkpoint(folder, "tiny-depth.safetensors", config=DEPTH_TINY),
            "txt2img": write_tiny_checkpoint(folder, "tiny.safetensors")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(folder / "photo.png")
    return {"image": folder / "photo.png", "depth": write_gradient(folder / "depth.png", 70, 50)}


def depth2img(*args, timeout=180):
    env = {**os.environ, "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", "/tmp/ldm-test-cache")}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_depth_map_run_writes_numbered_pngs_with_metadata(checkpoints, inputs, tmp_path):
    out = tmp_path / "out"
    result = depth2img("--ckpt", checkpoints["depth"], "--init-img", inputs["image"], "--depth_map", inputs["depth"],
                       "--prompt", "a quiet room", "--negative_prompt", "blurry", "--n_samples", 2,
                       "--ddim_steps", 3, "--seed", 5, "--outdir", out)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert (out / "grid-0000.png").is_file()
    with Image.open(out / "samples" / "00001.png") as image:
        assert image.size == (70, 50)
        lines = image.text["parameters"].splitlines()
    assert lines[:2] == ["a quiet room", "Negative prompt: blurry"]
    fields = dict(item.split(": ", 1) for item in lines[2].split(", "))
    assert fields["Steps"] == "3" and fields["Sampler"] == "DDIM" and fields["CFG scale"] == "9.0"
    # the second image of the batch: seed + 1, its own seed (A1111's convention)
    assert fields["Seed"] == "6" and fields["Size"] == "70x50" and fields["Model"] == "tiny-depth"
    assert fields["Denoising strength"] == "0.9" and fields["Depth"] == "map"


@pytest.mark.parametrize("case", ["no_depth_source", "txt2img_checkpoint", "both_sources"])
def test_refusals_are_one_line_exit_2_and_write_nothing(checkpoints, inputs, tmp_path, case):
    out = tmp_path / "out"
    args = ["--init-img", inputs["image"], "--ddim_steps", 2, "--outdir", out]
    if case == "no_depth_source":
        args += ["--ckpt", checkpoints["depth"]]
        expected = ["--depth_map PATH"]
    elif case == "txt2img_checkpoint":
        args += ["--ckpt", checkpoints["txt2img"], "--depth_map", inputs["depth"]]
        expected = ["text-to-image model", "depth2img.py needs a depth-to-image model", "scripts/txt2img.py"]
    else:
        args += ["--ckpt", checkpoints["depth"], "--depth_map", inputs["depth"], "--midas", inputs["depth"]]
        expected = ["pass one of them"]
    result = depth2img(*args)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for text in expected:
        assert text in result.stderr
    assert not list(out.rglob("*.png"))


def test_low_memory_mode_makes_the_same_pictures(checkpoints, inputs, tmp_path):
    pictures = []
    for mode in ([], ["--lowmem"]):
        out = tmp_path / (mode[0] if mode else "normal")
        result = depth2img("--ckpt", checkpoints["depth"], "--init-img", inputs["image"], "--depth_map", inputs["depth"],
                           "--n_samples", 1, "--ddim_steps", 2, "--skip_grid", "--outdir", out, *mode)
        assert result.returncode == 0, result.stderr
        pictures.append(np.asarray(Image.open(out / "samples" / "00000.png")))
    assert np.array_equal(*pictures)
