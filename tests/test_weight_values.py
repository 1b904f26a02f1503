"""Weights the model cannot use are refused at load with one line naming the tensor: integer or boolean values
where the model has floating-point ones, and NaN or infinite values, in any file format and float dtype. The
check reads every weight: in low-memory mode it gives the file's pages back."""
import gc
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from conftest import REPO
from ldm.checkpoint import CheckpointError, all_finite, load_model, load_state_dict_strictly, parameters_on_meta
from ldm.checkpoint import read_checkpoint
from ldm.modules.ema import ema_name
from ldm.util import instantiate_from_config
from tiny_model import TINY_CONFIG, tiny_model

UNET_KERNEL = "model.diffusion_model.input_blocks.0.0.weight"
TEXT_EMBEDDING = "cond_stage_model.token_embedding.weight"
VAE_NORM = "first_stage_model.decoder.norm_out.weight"
SCHEDULE = "alphas_cumprod"


@pytest.fixture(scope="module")
def tiny_weights() -> dict:
    return {key: value.detach().contiguous() for key, value in tiny_model().state_dict().items()}


def write(path, state_dict: dict):
    """The checkpoint in the format its suffix names, with the tiny config beside it."""
    if path.suffix == ".safetensors":
        save_file({key: value.contiguous() for key, value in state_dict.items()}, path)
    else:
        torch.save({"state_dict": state_dict}, path)
    shutil.copy(TINY_CONFIG, path.with_suffix(".yaml"))
    return path


def load(path, **options):
    return load_model(path, log=lambda message: None, **options)


def with_values(weights: dict, key: str, fill, dtype=None) -> dict:
    """The weights with `key` holding `fill` at a few places (in `dtype`, if given)."""
    tensor = weights[key].clone()
    tensor.view(-1)[:: max(1, tensor.numel() // 3)] = fill
    return {**weights, key: tensor.to(dtype) if dtype is not None else tensor}


def assert_one_line_naming(error: pytest.ExceptionInfo, *fragments: str):
    message = str(error.value)
    assert "\n" not in message, f"not one line: {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# --- integer or boolean tensors where floats belong -------------------------------------------------------------
@pytest.mark.parametrize("suffix, key, dtype", [
    (".safetensors", UNET_KERNEL, torch.int64), (".ckpt", TEXT_EMBEDDING, torch.int32),
    (".safetensors", VAE_NORM, torch.bool), (".safetensors", UNET_KERNEL, torch.uint8),
    (".ckpt", SCHEDULE, torch.int64),  # a buffer
])
def test_an_integer_tensor_where_a_float_weight_belongs_is_named(tmp_path, tiny_weights, suffix, key, dtype):
    weights = {**tiny_weights, key: tiny_weights[key].round().to(dtype)}
    with pytest.raises(CheckpointError) as error:
        load(write(tmp_path / f"model{suffix}", weights))
    assert_one_line_naming(error, f"tensor {key}", str(dtype).replace("torch.", ""), "floating-point")


# --- NaN and infinite values -------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix, key, fill, dtype", [
    (".safetensors", UNET_KERNEL, float("nan"), torch.float32),
    (".safetensors", TEXT_EMBEDDING, float("inf"), torch.float16),
    (".safetensors", VAE_NORM, float("-inf"), torch.bfloat16),
    (".ckpt", UNET_KERNEL, float("nan"), torch.float32),
    (".ckpt", VAE_NORM, float("inf"), torch.float16),
    (".safetensors", SCHEDULE, float("nan"), torch.float32),  # before the schedule is compared with the config's
])
def test_a_nan_or_infinite_weight_is_named(tmp_path, tiny_weights, suffix, key, fill, dtype):
    weights = {name: value.to(dtype) for name, value in with_values(tiny_weights, key, fill).items()}
    with pytest.raises(CheckpointError) as error:
        load(write(tmp_path / f"model{suffix}", weights))
    assert_one_line_naming(error, f"tensor {key}", "NaN or infinite", "use another checkpoint")


def test_a_nan_in_a_strided_ckpt_tensor_is_found(tmp_path, tiny_weights):
    """A .ckpt may hold a view with other strides (here a transposed one): the check reads it as it is."""
    kernel = tiny_weights[TEXT_EMBEDDING]
    stored = kernel.t().contiguous().t()
    stored[-1, -1] = float("nan")
    assert not stored.is_contiguous()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {**tiny_weights, TEXT_EMBEDDING: stored}}, path)
    shutil.copy(TINY_CONFIG, path.with_suffix(".yaml"))
    with pytest.raises(CheckpointError) as error:
        load(path)
    assert_one_line_naming(error, f"tensor {TEXT_EMBEDDING}", "NaN")


def test_a_nan_in_an_8_bit_float_file_is_found(tmp_path, tiny_weights):
    weights = with_values(tiny_weights, VAE_NORM, float("nan"))
    weights[VAE_NORM] = weights[VAE_NORM].to(torch.float8_e4m3fn)
    with pytest.raises(CheckpointError) as error:
        load(write(tmp_path / "model.safetensors", weights))
    assert_one_line_naming(error, f"tensor {VAE_NORM}", "NaN")


def test_an_ema_weight_is_checked_when_it_is_used(tmp_path, tiny_weights):
    ema = {"model_ema." + ema_name(key.removeprefix("model.")): value.clone()
           for key, value in tiny_weights.items() if key.startswith("model.")}
    ema_key = "model_ema." + ema_name(UNET_KERNEL.removeprefix("model."))
    weights = with_values({**tiny_weights, **ema}, ema_key, float("nan"))
    path = write(tmp_path / "model.safetensors", weights)
    load(path)  # the EMA weights are extras, not loaded
    with pytest.raises(CheckpointError) as error:
        load(path, use_ema=True)
    assert_one_line_naming(error, f"tensor {UNET_KERNEL}", "NaN")


def test_large_finite_fp16_weights_are_not_mistaken_for_infinite(tmp_path, tiny_weights):
    """Their sum overflows fp16; the values themselves are finite and load."""
    weights = {key: value.half() for key, value in tiny_weights.items()}
    weights[TEXT_EMBEDDING] = torch.full_like(weights[TEXT_EMBEDDING], 60000.0)
    assert not torch.isfinite(weights[TEXT_EMBEDDING].sum())
    loaded = load(write(tmp_path / "model.safetensors", weights))
    assert torch.all(loaded.model.state_dict()[TEXT_EMBEDDING] == 60000.0)


@pytest.mark.parametrize("tensor, finite", [
    (torch.randn(1000), True), (torch.tensor(float("nan")), False), (torch.tensor(2.0), True),
    (torch.empty(0), True), (torch.full((5,), 3e38), True), (torch.tensor([1.0, float("-inf")]), False),
    (torch.randn(64, 65).t(), True), (torch.tensor([[1.0, 2.0], [float("nan"), 3.0]]).t(), False),
    (torch.tensor([0.5, float("nan")], dtype=torch.float64), False),
    (torch.tensor([1.0, float("nan")]).to(torch.float8_e5m2), False), (torch.randn(9).to(torch.float8_e4m3fn), True),
], ids=lambda value: None if isinstance(value, torch.Tensor) else str(value))
def test_all_finite(tensor, finite):
    assert all_finite(tensor) == finite


def test_all_finite_finds_one_nan_in_a_large_tensor_checked_in_pieces():
    tensor = torch.zeros(3 << 22)
    tensor[(3 << 22) - 1] = float("nan")
    assert not all_finite(tensor)
    assert all_finite(tensor[:-1])


# --- through a script -------------------------------------------------------------------------------------------
def test_txt2img_names_the_nan_tensor_in_one_line_and_exits_2(tmp_path, tiny_weights):
    path = write(tmp_path / "bad.safetensors", with_values(tiny_weights, UNET_KERNEL, float("nan")))
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "00000.png").write_bytes(b"an image from before")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "txt2img.py"), "--ckpt", str(path), "--outdir",
                             str(out), "--prompt", "a cat", "--ddim_steps", "2", "--H", "64", "--W", "64"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"tensor {UNET_KERNEL}" in lines[0] and "NaN" in lines[0], lines[0]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "samples" / "00000.png").read_bytes() == b"an image from before"


# --- memory: the check gives the file's pages back in low-memory mode ---------------------------------------------
def resident_bytes_of_file(path) -> int:
    """How much of the file `path` this process holds in memory through its mappings (/proc/self/smaps)."""
    target, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip("\n").endswith(" " + target)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_low_memory_loading_leaves_the_file_pages_it_checked_unresident(tmp_path, tiny_weights):
    path = write(tmp_path / "model.safetensors", tiny_weights)
    size = path.stat().st_size
    # The measure itself: checked without giving pages back, the whole file is resident.
    state_dict, _ = read_checkpoint(path)
    with parameters_on_meta():
        model = instantiate_from_config(OmegaConf.load(TINY_CONFIG).model)
    load_state_dict_strictly(model, state_dict, path, TINY_CONFIG, release_pages=False)
    assert resident_bytes_of_file(path) > 0.9 * size
    del model, state_dict
    gc.collect()
    assert resident_bytes_of_file(path) == 0, "the first mapping is still there"

    loaded = load(path, low_memory=True)
    assert resident_bytes_of_file(path) < 0.1 * size, "the check left the file's pages resident"
    assert loaded.components is not None
