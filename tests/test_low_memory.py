"""Low-memory mode (--lowmem): one component converted at a time, the same pictures as the normal mode."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm.generate.img2img import ImageToImage
from ldm.generate.loading import load
from ldm.generate.output import OutputFolder
from ldm.generate.run import Job, run
from ldm.generate.txt2img import run_txt2img
from ldm.modules.diffusionmodules import util as diffusion_util
from ldm.modules.diffusionmodules.util import packed_kernels
from helpers import txt2img
from tiny_model import write_tiny_checkpoint

COMPONENTS = ("cond_stage_model", "model", "first_stage_model")


@pytest.fixture(scope="module")
def fp16_ckpt(tmp_path_factory):
    """The tiny checkpoint stored in fp16, as most SD files are: every tensor is converted when used."""
    folder = tmp_path_factory.mktemp("tiny16")
    fp32 = write_tiny_checkpoint(folder, "tiny32.safetensors")
    path = folder / "tiny.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(fp32).items()}, str(path))
    path.with_suffix(".yaml").write_bytes(fp32.with_suffix(".yaml").read_bytes())
    return path


def dtypes_of(module: torch.nn.Module) -> set:
    return {p.dtype for p in module.parameters()}


def kernels_channels_last(module: torch.nn.Module) -> bool:
    kernels = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    return bool(kernels) and all(k.is_contiguous(memory_format=torch.channels_last) for k in kernels)


def test_only_the_component_in_use_is_converted_and_the_others_go_back_to_the_file(fp16_ckpt):
    loaded = load(str(fp16_ckpt), None, "cpu", "full", log=lambda _: None, low_memory=True)
    model = loaded.model
    assert all(dtypes_of(getattr(model, name)) == {torch.float16} for name in COMPONENTS)  # as read, unconverted
    as_read = {name: [p.data_ptr() for p in getattr(model, name).parameters()] for name in COMPONENTS}

    unet = loaded.use("model")
    assert unet is model.model and dtypes_of(unet) == {torch.float32} and kernels_channels_last(unet)
    assert dtypes_of(model.cond_stage_model) == dtypes_of(model.first_stage_model) == {torch.float16}

    loaded.use("first_stage_model")
    assert dtypes_of(model.first_stage_model) == {torch.float32} and kernels_channels_last(model.first_stage_model)
    assert dtypes_of(model.model) == {torch.float16}
    assert [p.data_ptr() for p in model.model.parameters()] == as_read["model"]  # the file's own tensors again
    assert not any(p.requires_grad for p in model.parameters())
    assert model.betas.dtype == torch.float32  # the model's own schedules were never touched


def test_normal_mode_converts_everything_at_load(fp16_ckpt):
    loaded = load(str(fp16_ckpt), None, "cpu", "full", log=lambda _: None)
    assert loaded.components is None
    assert dtypes_of(loaded.model) == {torch.float32} and kernels_channels_last(loaded.model.model)
    assert loaded.use("model") is loaded.model.model


def pictures(report) -> list:
    return [np.asarray(Image.open(path)) for path in report.saved]


def test_txt2img_makes_the_same_pictures_in_low_memory(fp16_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(diffusion_util, "PACK_FROM_CALL", 2)  # the normal run's kernels packed within 3 steps
    job = Job(batches=[["a red circle", "a blue square"], ["a green line"]], n_iter=2, steps=3, height=64, width=64,
              seed=5, save_grid=False)
    outputs = []
    for low_memory in (False, True):
        loaded = load(str(fp16_ckpt), None, "cpu", "full", log=lambda _: None, low_memory=low_memory)
        report = run_txt2img(job, loaded, OutputFolder(tmp_path / str(low_memory)), log=lambda _: None)
        outputs.append(pictures(report))
        # prepacked kernels are a copy beside the weights: none in low memory (so these pictures compare both ways)
        assert bool(packed_kernels(loaded.model)) is not low_memory
    assert len(outputs[1]) == 6
    assert all(np.array_equal(a, b) for a, b in zip(*outputs))
    assert len({a.tobytes() for a in outputs[0]}) > 1  # real, distinct pictures


def test_img2img_encodes_its_input_in_low_memory(fp16_ckpt, tmp_path):
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    job = Job(batches=[["a picture"]], steps=4, height=64, width=64, seed=3, save_grid=False)
    outputs = []
    for low_memory in (False, True):
        loaded = load(str(fp16_ckpt), None, "cpu", "full", log=lambda _: None, low_memory=low_memory)
        report = run(job, ImageToImage(pixels, 0.5), loaded, OutputFolder(tmp_path / str(low_memory)),
                     log=lambda _: None)
        outputs.append(pictures(report))
    assert np.array_equal(outputs[0][0], outputs[1][0])


@pytest.mark.parametrize("flag", ["--lowmem", "--medvram"])
def test_command_line_flag(fp16_ckpt, tmp_path, flag):
    common = ("--ckpt", fp16_ckpt, "--ddim_steps", 2, "--H", 64, "--W", 64, "--n_samples", 1, "--n_iter", 1,
              "--skip_grid")
    normal = txt2img(*common, "--outdir", tmp_path / "normal")
    low = txt2img(*common, "--outdir", tmp_path / "low", flag)
    assert normal.returncode == 0 and low.returncode == 0, low.stderr
    assert "low memory" in low.stdout + low.stderr
    first = [np.asarray(Image.open(d / "samples" / "00000.png")) for d in (tmp_path / "normal", tmp_path / "low")]
    assert np.array_equal(*first)
