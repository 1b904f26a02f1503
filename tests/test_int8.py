"""--precision int8 (ldm.quantization, ldm.generate.int8) on the tiny model: the int8 layers compute what
their quantized inputs and weights give, the UNet stays close to fp32, calibration is cached as numbers,
nothing changes unless int8 is asked for, and the settings it cannot serve are refused in one line."""
import copy
import json

import pytest
import torch
from PIL import Image

from helpers import loaded_tiny, relative_error, seeded, txt2img
from ldm.generate import int8
from ldm.generate.errors import UserError
from ldm.modules import attention as attention_module
from ldm.quantization import (Int8Conv2d, Int8Layer, Int8Linear, InputRanges, int8_kernels_available,
                              int8_layers, quantizable_layers, quantize_unet)
from tiny_model import write_tiny_checkpoint

pytestmark = pytest.mark.skipif(not int8_kernels_available(), reason="this torch has no oneDNN int8 kernels")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def unet_inputs(seed=0, size=8):
    generator = seeded(seed)
    return (torch.randn(2, 4, size, size, generator=generator), torch.tensor([10, 700]),
            torch.randn(2, 7, 32, generator=generator))


def fake_quantized(x, layer: Int8Layer):
    """The input as the int8 layer sees it, back in fp32: the reference the integer kernel must match."""
    quantized, scale, zero_point = layer.quantized_input(x)
    return (quantized.double() - zero_point) * scale


@pytest.mark.parametrize("levels", [127, 255])
def test_int8_convolution_equals_its_quantized_arithmetic(levels):
    conv = torch.nn.Conv2d(16, 24, 3, stride=2, padding=1)
    x = torch.randn(2, 16, 9, 9, generator=seeded(1)) * 2 + 0.5
    layer = Int8Conv2d(conv, None, levels)
    weight = torch.round(conv.weight.double() / layer.weight_scales.double().view(-1, 1, 1, 1)).clamp(-127, 127)
    weight = weight * layer.weight_scales.double().view(-1, 1, 1, 1)
    expected = torch.nn.functional.conv2d(fake_quantized(x, layer), weight, conv.bias.double(), stride=2, padding=1)
    if levels == 255 and not int8.activation_levels() == 255:
        pytest.skip("8-bit inputs saturate the int16 sums of a CPU without VNNI (why 7 bits are used there)")
    with torch.no_grad():
        assert relative_error(layer(x), expected) < 1e-5
        assert 1e-4 < relative_error(layer(x), conv(x)) < 0.05  # quantized, yet close


def test_int8_linear_equals_its_quantized_arithmetic_with_a_static_range():
    linear = torch.nn.Linear(32, 20)
    x = torch.randn(3, 11, 32, generator=seeded(2))
    layer = Int8Linear(linear, (-2.0, 2.5), 127)
    weight = torch.round(linear.weight.double() / layer.weight_scales.double()[:, None]).clamp(-127, 127)
    expected = fake_quantized(x, layer) @ (weight * layer.weight_scales.double()[:, None]).T + linear.bias.double()
    with torch.no_grad():
        assert layer(x).shape == (3, 11, 20)
        assert relative_error(layer(x), expected) < 1e-5
    outside = torch.full((1, 32), 100.0)  # a static range clips what lies beyond it
    assert torch.allclose(fake_quantized(outside, layer), torch.full((1, 32), 2.5, dtype=torch.float64), atol=0.02)


# 32: the upsampling convolution's input is 16x16, where fp32 would take the four-phase path
@pytest.mark.parametrize("size", [8, 32])
@pytest.mark.parametrize("bf16_arithmetic", [False, True])  # with it, every attention runs in bf16 (any keys)
def test_quantized_unet_is_close_to_fp32_and_keeps_the_latent_and_embedding_layers(tiny, size, bf16_arithmetic,
                                                                                   monkeypatch):
    monkeypatch.setattr(attention_module, "cpu_has_bf16_arithmetic", lambda: bf16_arithmetic)
    monkeypatch.setattr(attention_module, "BF16_BY_ROWS_MIN_KEYS", 1)
    unet = copy.deepcopy(tiny.model.diffusion_model)
    x, t, context = unet_inputs(size=size)
    layers = quantizable_layers(unet)
    assert not any(part in name for name in layers for part in ("time_embed", "emb_layers"))
    with torch.no_grad():
        reference = unet(x, t, context=context)
        ranges = InputRanges()
        with ranges.recording(layers):
            unet(x, t, context=context)
        assert quantize_unet(unet, ranges) == len(layers) > 50
        out = unet(x, t, context=context)
    assert len(int8_layers(unet)) == len(layers)
    attentions = [module for module in unet.modules() if isinstance(module, attention_module.CrossAttention)]
    assert attentions and all(module.attention_in_bf16 for module in attentions)
    assert isinstance(unet.input_blocks[0][0], torch.nn.Conv2d) and isinstance(unet.out[-1], torch.nn.Conv2d)
    assert 1e-4 < relative_error(out, reference) < 0.1


def test_int8_is_calibrated_once_then_read_from_a_numbers_only_cache(monkeypatch):
    loaded, lines = loaded_tiny(), []
    reference_unet = copy.deepcopy(loaded.model.model.diffusion_model)
    count = int8.quantize_loaded(loaded, log=lines.append, calibrated=True)
    assert loaded.quantized == "int8" and count == len(int8_layers(loaded.model))
    assert all(layer.static is not None for layer in int8_layers(loaded.model))
    assert any("calibrating" in line for line in lines)
    cache = int8.cache_file(loaded.hash, int8.activation_levels())
    stored = json.loads(cache.read_text())
    assert set(stored["layers"]) == set(quantizable_layers(reference_unet))
    x, t, context = unet_inputs(3)
    with torch.no_grad():
        first = loaded.model.model.diffusion_model(x, t, context=context)

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again despite the cache")

    monkeypatch.setattr(int8, "calibrate", no_calibration)
    again = loaded_tiny()
    int8.quantize_loaded(again, log=lines.append, calibrated=True)
    with torch.no_grad():
        assert torch.equal(again.model.model.diffusion_model(x, t, context=context), first)

    cache.write_text('{"format": "something else"}')  # a foreign or stale file is calibrated over
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache.parents[2]))
    int8.quantize_loaded(loaded_tiny(), log=lines.append, calibrated=True)
    assert json.loads(cache.read_text())["format"] == int8.CACHE_FORMAT


def test_the_default_int8_measures_each_input_and_needs_no_calibration(monkeypatch):
    monkeypatch.setattr(int8, "calibrate", None)  # calling it would fail
    loaded = loaded_tiny()
    int8.quantize_loaded(loaded, log=lambda line: None)
    assert int8_layers(loaded.model) and all(layer.static is None for layer in int8_layers(loaded.model))
    assert not int8.cache_file(loaded.hash, int8.activation_levels()).exists()


def test_refusals_are_one_line_and_come_before_loading(tmp_path):
    from ldm.generate.loading import load

    with pytest.raises(UserError) as refused:  # the checkpoint is not even looked for
        load(str(tmp_path / "missing.safetensors"), None, "cpu", "int8", low_memory=True)
    assert "drop --lowmem" in str(refused.value) and "\n" not in str(refused.value)
    loaded = loaded_tiny()
    on_gpu = copy.copy(loaded)
    on_gpu.device = torch.device("cuda")
    with pytest.raises(UserError) as refused:
        int8.check_supported(on_gpu, low_memory=False)
    assert "--device cpu" in str(refused.value) and "\n" not in str(refused.value)
    assert not int8_layers(loaded.model)


def test_txt2img_int8_says_so_in_the_infotext(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    result = txt2img("--ckpt", ckpt, "--outdir", out, "--ddim_steps", 2, "--H", 64, "--W", 64, "--n_samples", 1,
                     "--n_iter", 1, "--skip_grid", "--precision", "int8", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "UNet layers on int8 kernels" in result.stdout
    with Image.open(out / "samples" / "00000.png") as image:
        assert "Precision: int8" in image.text["parameters"]


def test_exact_precisions_leave_the_model_and_its_infotext_alone():
    from ldm.generate.run import Job, job_fields

    loaded = loaded_tiny()
    assert loaded.quantized is None and not int8_layers(loaded.model)
    job = Job(batches=[["a red circle"]])
    assert "Precision" not in job_fields(job, loaded, 1, 0)
    loaded.quantized = "int8"
    assert job_fields(job, loaded, 1, 0)["Precision"] == "int8"
