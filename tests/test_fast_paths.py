"""The CPU fast paths give the same numbers as the plain ones: bf16, channels-last, in-place inference ops,
the loader's page release, the thread count, the reuse of freed memory. Correctness only; speed is measured by
benchmarks/sampling_speed.py, never here.

Tolerances: fp32 paths that only change the summation order (channels-last kernels) agree to 1e-5
relative. bf16 keeps 8 significant bits (a relative rounding of 2^-9 = 0.2 % per stored value); over the
tiny UNet's ~20 layers those roundings add up like a random walk to about 1 %, so bf16 is held to 3 %
relative error on the model output. An error that large would be a bug (a wrong cast, stats in bf16).
"""
import math
import mmap
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import relative_error, seeded
from ldm import cpu
from ldm.checkpoint import load_model, read_checkpoint
from ldm.placement import channels_last_kernel, mapped_ranges, place_weights, release_file_pages
from ldm.generate import loading
from ldm.models.diffusion.sampling import GuidedDenoiser, sample
from ldm.modules import attention as attention_module
from ldm.modules.diffusionmodules import util as diffusion_util
from ldm.modules.diffusionmodules.util import PHASES_MIN_PIXELS, GroupNorm32, Linear, nearest_upsample_conv
from tiny_model import TINY_CONFIG, tiny_model, write_tiny_checkpoint

FP32_REORDERING = 1e-5
BF16_MODEL_OUTPUT = 3e-2


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def unet_inputs(batch=2, size=8):
    x = torch.randn(batch, 4, size, size, generator=seeded(1))
    context = torch.randn(batch, 77, 32, generator=seeded(2))
    return x, torch.tensor([10, 900][:batch]), context


# --- GroupNorm in fp32 statistics -----------------------------------------------------------------------------
def test_group_norm_of_bf16_equals_the_fp32_computation_rounded_once():
    norm = GroupNorm32(32, 64)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1, generator=seeded(0))
        norm.bias.normal_(0, 0.1, generator=seeded(1))
    # A large mean over a small spread: variance in bf16 arithmetic would lose it completely.
    x = (torch.randn(2, 64, 16, 16, generator=seeded(2)) * 0.5 + 20).bfloat16()
    reference = F.group_norm(x.float(), 32, norm.weight.bfloat16().float(), norm.bias.bfloat16().float(), norm.eps)
    actual = norm.bfloat16()(x)
    assert actual.dtype == torch.bfloat16
    # Only the final rounding to bf16 differs: at most half a unit in the last place (2^-9 relative).
    assert torch.allclose(actual.float(), reference, rtol=2**-8, atol=2**-8)


def test_group_norm_of_fp32_input_with_bf16_weights_runs_in_fp32():
    norm = GroupNorm32(32, 64).bfloat16()
    x = torch.randn(2, 64, 4, 4, generator=seeded(3))
    actual = norm(x)
    assert actual.dtype == torch.float32
    expected = F.group_norm(x, 32, norm.weight.float(), norm.bias.float(), norm.eps)
    assert torch.allclose(actual, expected, rtol=1e-6, atol=1e-6)


# --- in-place ops at inference --------------------------------------------------------------------------------
def test_inference_output_equals_the_autograd_output_and_training_still_backpropagates(monkeypatch):
    # The four-phase upsampling convolutions and the prepacked kernels reorder fp32 sums at inference (their
    # own tests hold them to FP32_REORDERING); off here, so that this comparison stays exact for the in-place
    # ops it is about.
    monkeypatch.setattr(diffusion_util, "PHASES_MIN_PIXELS", math.inf)
    monkeypatch.setattr(diffusion_util, "PACKED_MAX_ROWS", 0)
    model = tiny_model()
    unet = model.model.diffusion_model
    x, t, context = unet_inputs()
    with torch.inference_mode():
        in_place = unet(x, t, context)
        decoded_in_place = model.first_stage_model.decode(x)
    with torch.enable_grad():
        x_grad = x.clone().requires_grad_(True)
        recorded = unet(x_grad, t, context)
        decoded_recorded = model.first_stage_model.decode(x_grad)
        (recorded.square().mean() + decoded_recorded.square().mean()).backward()
    assert torch.equal(in_place, recorded.detach())
    assert torch.equal(decoded_in_place, decoded_recorded.detach())
    assert x_grad.grad is not None and torch.isfinite(x_grad.grad).all() and x_grad.grad.abs().sum() > 0


def test_inference_leaves_its_inputs_untouched():
    unet = tiny_model().model.diffusion_model
    x, t, context = unet_inputs()
    x_before, context_before = x.clone(), context.clone()
    with torch.inference_mode():
        unet(x, t, context)
    assert torch.equal(x, x_before) and torch.equal(context, context_before)


# --- channels-last --------------------------------------------------------------------------------------------
def test_the_cpu_loader_stores_convolutions_channels_last_and_gives_the_contiguous_numbers(tiny_checkpoint):
    loaded = load_model(tiny_checkpoint, device="cpu", dtype=torch.float32, log=lambda message: None).model
    plain = tiny_model()
    convolutions = [m for m in loaded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convolutions)
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, torch.nn.Conv2d))
    x, t, context = unet_inputs()
    latent = torch.randn(1, 4, 16, 16, generator=seeded(4))
    with torch.inference_mode():
        unet_error = relative_error(loaded.apply_model(x, t, context), plain.apply_model(x, t, context))
        decode_error = relative_error(loaded.decode_first_stage(latent), plain.decode_first_stage(latent))
    assert unet_error < FP32_REORDERING and decode_error < FP32_REORDERING


@pytest.mark.parametrize("shape", [(8, 6, 3, 3), (8, 6, 1, 1), (5, 4, 3, 1)])
@pytest.mark.parametrize("file_dtype,dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                              (torch.float32, torch.bfloat16)])
def test_channels_last_kernel_is_the_channels_last_copy(shape, file_dtype, dtype):
    kernel = torch.randn(shape, generator=seeded(5)).to(file_dtype)
    expected = kernel.to(dtype=dtype, memory_format=torch.channels_last)
    fast = channels_last_kernel(kernel, dtype)
    assert fast.dtype == dtype and torch.equal(fast, expected) and fast.stride() == expected.stride()
    assert fast.is_contiguous(memory_format=torch.channels_last)
    # A 1×1 kernel already in its final dtype is NHWC as it is: no copy, the file's memory is used in place.
    shares_memory = fast.data_ptr() == kernel.data_ptr()
    assert shares_memory == (shape[2:] == (1, 1) and file_dtype == dtype)


def test_linear_runs_cpu_inference_as_a_1x1_convolution_with_the_same_numbers(monkeypatch):
    convolutions = []
    real_conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *args: convolutions.append(args[0].shape) or real_conv2d(*args))
    monkeypatch.setattr(diffusion_util, "PACKED_MAX_ROWS", 0)  # the plain kernel (prepacked: tested below)
    layer = Linear(48, 40)
    tokens = torch.randn(2, 40, 64, generator=seeded(6))[..., :48]  # a non-contiguous [B, tokens, C] view
    expected = F.linear(tokens, layer.weight, layer.bias)
    with torch.inference_mode():
        out = layer(tokens)
        few_rows = layer(tokens[:, :1])
    assert convolutions == [(1, 48, 80, 1)]  # 80 rows: the convolution; 2 rows: the matmul
    assert out.shape == expected.shape and out.is_contiguous() and relative_error(out, expected) < FP32_REORDERING
    assert torch.equal(few_rows, F.linear(tokens[:, :1], layer.weight, layer.bias))
    assert torch.equal(layer(tokens), expected)  # training (gradients on) keeps the matmul
    assert set(layer.state_dict()) == {"weight", "bias"}


def attention_inputs(batch=2, heads=3, tokens=100, keys=100, depth=8, dtype=torch.float32):
    generator = seeded(12)
    q = torch.randn(batch, tokens, heads, depth, generator=generator).transpose(1, 2)  # views, as the layer makes
    k, v = (torch.randn(batch, keys, heads, depth, generator=generator).transpose(1, 2) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype, in_bf16", [(torch.bfloat16, False), (torch.float32, True)])
def test_bf16_attention_by_rows_is_attention_within_bf16_rounding(monkeypatch, dtype, in_bf16):
    monkeypatch.setattr(attention_module, "cpu_has_bf16_arithmetic", lambda: True)
    monkeypatch.setattr(attention_module, "BF16_BY_ROWS_MIN_KEYS", 64)
    monkeypatch.setattr(attention_module, "BF16_BY_ROWS_SCORES", 64 * 100)  # blocks of 64 rows: 100 = 64 + 36
    mm_calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *args: mm_calls.append(args[0].dtype) or real_mm(*args))
    q, k, v = attention_inputs(dtype=dtype)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    with torch.inference_mode():
        out = attention_module.attention(q, k, v, in_bf16)
        few_keys = attention_module.attention(q, k[:, :, :63], v[:, :, :63], in_bf16)
    assert mm_calls == [torch.bfloat16] * (2 * 2 * 3 * 2)  # two matmuls a block, two blocks a head
    assert out.dtype == dtype and out.shape == exact.shape
    assert relative_error(out, exact) < 2e-2  # bf16 inputs and scores: a few parts in a thousand
    assert relative_error(out, F.scaled_dot_product_attention(q, k, v)) < 2e-2
    assert torch.equal(few_keys, F.scaled_dot_product_attention(q, k[:, :, :63], v[:, :, :63]))
    assert torch.equal(attention_module.attention(q, k, v, in_bf16), F.scaled_dot_product_attention(q, k, v))


def test_fp32_attention_and_cpus_without_bf16_arithmetic_keep_the_fused_kernel(monkeypatch):
    monkeypatch.setattr(attention_module, "BF16_BY_ROWS_MIN_KEYS", 64)
    q, k, v = attention_inputs()
    with torch.inference_mode():
        assert torch.equal(attention_module.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
        monkeypatch.setattr(attention_module, "cpu_has_bf16_arithmetic", lambda: False)
        q16, k16, v16 = attention_inputs(dtype=torch.bfloat16)
        assert torch.equal(attention_module.attention(q, k, v, in_bf16=True), F.scaled_dot_product_attention(q, k, v))
        assert torch.equal(attention_module.attention(q16, k16, v16), F.scaled_dot_product_attention(q16, k16, v16))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("height, width", [(16, 16), (17, 23), (32, 8)])
def test_upsample_then_convolve_runs_as_four_phase_convolutions_with_the_same_numbers(monkeypatch, bias, height,
                                                                                      width):
    conv = torch.nn.Conv2d(24, 40, 3, padding=1, bias=bias)
    x = torch.randn(2, 24, height, width, generator=seeded(7)).contiguous(memory_format=torch.channels_last)
    plain = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    kernels = []
    real_conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *args, **kwargs: kernels.append(args[1].shape)
                        or real_conv2d(*args, **kwargs))
    with torch.inference_mode():
        out = nearest_upsample_conv(x, conv)
        sized = nearest_upsample_conv(x, conv, output_size=(2 * height, 2 * width))
        odd = nearest_upsample_conv(x, conv, output_size=(2 * height - 1, 2 * width))  # the UNet's odd sizes
    assert kernels[:2] == [(160, 24, 2, 2)] * 2 and kernels[2] == (40, 24, 3, 3)
    assert out.shape == plain.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, plain) < FP32_REORDERING and torch.equal(out, sized)
    assert torch.equal(odd, conv(F.interpolate(x, size=(2 * height - 1, 2 * width), mode="nearest")))
    small = x[:, :, :4, :4]
    assert height * width >= PHASES_MIN_PIXELS > 16
    with torch.inference_mode():
        assert torch.equal(nearest_upsample_conv(small, conv),
                           conv(F.interpolate(small, scale_factor=2.0, mode="nearest")))  # too small: the plain way
    assert torch.equal(nearest_upsample_conv(x, conv), plain)  # gradients on: the plain way
    conv.weight.data.mul_(2)  # weights changed in place (a LoRA merged) are used at once
    with torch.inference_mode():
        doubled = nearest_upsample_conv(x, conv)
    assert relative_error(doubled, conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))) < FP32_REORDERING


# --- prepacked kernels ----------------------------------------------------------------------------------------
def packed_modules(model) -> list:
    return list(diffusion_util.packed_kernels(model))


def channels_last_unet():
    """The tiny UNet as the loader leaves a model: kernels channels-last, so are the activations they make."""
    return tiny_model().model.diffusion_model.to(memory_format=torch.channels_last)


def test_prepacked_kernels_give_the_plain_numbers_and_follow_the_weights(monkeypatch):
    unet = channels_last_unet()
    x, t, context = unet_inputs()

    def call(max_rows=diffusion_util.PACKED_MAX_ROWS):
        monkeypatch.setattr(diffusion_util, "PACKED_MAX_ROWS", max_rows)
        with torch.inference_mode():
            return unet(x, t, context)

    plain = call(0)
    for _ in range(diffusion_util.PACK_FROM_CALL - 1):  # the first calls with a shape: no copy yet
        assert torch.equal(call(), plain) and not packed_modules(unet)
    packed = call()
    assert {type(module) for module in packed_modules(unet)} == {diffusion_util.Conv2d}  # Linear: below
    assert torch.equal(packed, plain) and torch.equal(call(), packed)  # the same oneDNN convolutions
    layer = unet.input_blocks[1][0].in_layers[2]
    assert layer in packed_modules(unet)
    monkeypatch.setattr(diffusion_util, "PACK_FROM_CALL", 2)
    with torch.no_grad():
        layer.weight.mul_(2)  # through the parameter: its version counter moves
    doubled = call()
    assert relative_error(doubled, plain) > 1e-3 and torch.equal(doubled, call(0))
    call(), call()
    assert layer in packed_modules(unet)
    layer.weight.data.mul_(0.5)  # behind the counter, as LoRA merges: seen once the copies are forgotten
    diffusion_util.forget_weight_copies(unet)
    assert torch.equal(call(), packed) and torch.equal(call(), packed) and layer in packed_modules(unet)
    with torch.enable_grad():
        unet(x, t, context)
    assert not packed_modules(unet)  # training convolves the plain kernels and keeps no copy


def test_bf16_kernels_are_prepacked_on_cpus_with_bf16_arithmetic_only(monkeypatch):
    monkeypatch.setattr(diffusion_util, "PACK_FROM_CALL", 2)
    unet = channels_last_unet().bfloat16()
    x, t, context = unet_inputs()

    def call(max_rows):
        monkeypatch.setattr(diffusion_util, "PACKED_MAX_ROWS", max_rows)
        with torch.inference_mode():
            return unet(x.bfloat16(), t, context.bfloat16())

    plain = call(0)
    call(512)
    packed = call(512)
    assert torch.equal(packed, plain)
    kinds = {type(module) for module in packed_modules(unet)}
    assert kinds == ({diffusion_util.Conv2d} if cpu.cpu_has_bf16_arithmetic() else set())  # Linear: a matmul


def test_kernels_are_packed_only_into_spare_memory(monkeypatch):
    unet = channels_last_unet()
    x, t, context = unet_inputs()
    reserve = 2 * diffusion_util.PACKING_RESERVE_BYTES
    monkeypatch.setattr(diffusion_util, "total_cpu_memory", lambda: 4 * reserve)  # a quarter of it is the reserve
    monkeypatch.setattr(diffusion_util, "available_cpu_memory", lambda: reserve)
    monkeypatch.setattr(diffusion_util, "PACK_FROM_CALL", 2)
    with torch.inference_mode():
        plain = unet(x, t, context)
        unet(x, t, context)
        assert not packed_modules(unet)
        monkeypatch.setattr(diffusion_util, "available_cpu_memory", lambda: reserve + 1024 ** 2)
        packed = unet(x, t, context)
    assert packed_modules(unet) and torch.equal(packed, plain)


def test_a_linear_layer_over_few_rows_keeps_its_kernel_prepacked(monkeypatch):
    layer = Linear(320, 640)
    tokens = torch.randn(2, 256, 320, generator=seeded(9))  # 512 rows: the most that are packed
    with torch.inference_mode():
        monkeypatch.setattr(diffusion_util, "PACKED_MAX_ROWS", 0)
        plain = layer(tokens)
        monkeypatch.undo()
        monkeypatch.setattr(diffusion_util, "PACK_FROM_CALL", 2)
        assert torch.equal(layer(tokens), plain) and not packed_modules(layer)  # packed from the second call
        packed = layer(tokens)
        assert packed_modules(layer) and torch.equal(packed, plain)
        assert torch.equal(layer(torch.cat([tokens, tokens])), torch.cat([plain, plain]))  # 1024 rows: plain
    assert not packed_modules(layer)


def test_the_four_phase_kernels_are_kept_prepacked_for_few_rows(monkeypatch):
    monkeypatch.setattr(diffusion_util, "PACK_FROM_CALL", 2)
    conv = diffusion_util.Conv2d(24, 40, 3, padding=1)
    x = torch.randn(2, 24, 16, 16, generator=seeded(8)).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    with torch.inference_mode():
        out = nearest_upsample_conv(x, conv)
        assert torch.equal(nearest_upsample_conv(x, conv), out) and packed_modules(conv)
        assert conv._packed_kernel[0][0] == "phases" and torch.equal(nearest_upsample_conv(x, conv), out)
    assert relative_error(out, plain) < FP32_REORDERING and out.is_contiguous(memory_format=torch.channels_last)


def test_the_text_keys_and_values_are_made_once_for_the_same_text_and_follow_text_and_weights():
    unet = channels_last_unet()
    x, t, context = unet_inputs()
    cross_attention = [block.attn2 for block in unet.modules() if isinstance(block, attention_module.BasicTransformerBlock)]
    made = []

    def counted(forward):
        return lambda *args: made.append(1) or forward(*args)
    for layer in cross_attention:
        layer.to_k.forward = counted(layer.to_k.forward)  # not a hook: hooked layers run every call

    def call(text, fresh=False):
        if fresh:  # a model that has kept nothing: what every call computed before
            diffusion_util.forget_weight_copies(unet)
            unet.__dict__.pop("_context_before", None)
        with torch.no_grad():
            return unet(x, t, text)

    first = call(context, fresh=True)
    made.clear()
    assert torch.equal(call(context.clone()), first) and torch.equal(call(context), first) and not made
    other = torch.randn(context.shape, generator=seeded(3))
    assert torch.equal(call(other), call(other, fresh=True)) and relative_error(call(other), first) > 1e-3
    assert torch.equal(call(context), first)
    context.mul_(2)  # the caller's tensor changed in place: the model compares against a copy of its own
    assert torch.equal(call(context), call(context, fresh=True))
    layer = cross_attention[0].to_v
    with torch.no_grad():
        layer.weight.mul_(2)  # through the parameter: its version counter moves
    assert torch.equal(call(context), call(context, fresh=True))
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 2, requires_grad=False)  # a new parameter
    assert torch.equal(call(context), call(context, fresh=True))
    doubled = call(context)
    layer.weight.data.mul_(0.5)  # behind the counter, as LoRA merges: seen once the copies are forgotten
    diffusion_util.forget_weight_copies(unet)
    assert relative_error(call(context), doubled) > 1e-4
    made.clear()
    with torch.enable_grad():
        unet(x, t, context), unet(x, t, context)
    assert len(made) == 2 * len(cross_attention)  # training makes them on every call
    made.clear()
    with torch.no_grad():
        cross_attention[0].to_k.register_forward_pre_hook(lambda *_: None)
        unet(x, t, context), unet(x, t, context)
    assert len(made) == 2  # the hooked layer runs every call, the others keep theirs


def test_place_weights_keeps_tied_weights_tied():
    model = tiny_model()
    shared = model.model.diffusion_model.out[2].weight
    model.first_stage_model.decoder.conv_out.weight = shared
    place_weights(model, "cpu", torch.bfloat16, channels_last=True)
    assert model.first_stage_model.decoder.conv_out.weight is model.model.diffusion_model.out[2].weight
    assert model.alphas_cumprod.dtype == torch.float32  # the schedules stay fp32 for the samplers


# --- bf16 -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("by_rows", [False, True])  # with it, every attention of the UNet and the decoder by rows
def test_bf16_unet_and_decoder_stay_close_to_fp32(tiny_checkpoint, monkeypatch, by_rows):
    monkeypatch.setattr(attention_module, "cpu_has_bf16_arithmetic", lambda: by_rows)
    monkeypatch.setattr(attention_module, "BF16_BY_ROWS_MIN_KEYS", 1)
    by_rows_calls = []
    real_by_rows = attention_module._bf16_attention_by_rows
    monkeypatch.setattr(attention_module, "_bf16_attention_by_rows",
                        lambda *qkv: by_rows_calls.append(qkv[0].shape[-1]) or real_by_rows(*qkv))
    fp32 = load_model(tiny_checkpoint, device="cpu", dtype=torch.float32, log=lambda message: None).model
    bf16 = load_model(tiny_checkpoint, device="cpu", dtype=torch.bfloat16, log=lambda message: None).model
    x, t, context = unet_inputs()
    latent = torch.randn(1, 4, 16, 16, generator=seeded(4))
    with torch.inference_mode():
        unet_error = relative_error(bf16.apply_model(x.bfloat16(), t, context.bfloat16()).float(),
                                    fp32.apply_model(x, t, context))
        decode_error = relative_error(bf16.decode_first_stage(latent.bfloat16()).float(), fp32.decode_first_stage(latent))
    assert unet_error < BF16_MODEL_OUTPUT, f"bf16 UNet output off by {unet_error:.1e}"
    assert decode_error < BF16_MODEL_OUTPUT, f"bf16 decode off by {decode_error:.1e}"
    decoder_channels = fp32.first_stage_model.decoder.mid.attn_1.q.in_channels
    assert (decoder_channels in by_rows_calls and len(set(by_rows_calls)) > 1) == by_rows  # decoder and UNet


def test_bf16_sampling_stays_close_to_fp32_and_the_sampler_sees_fp32(tiny_checkpoint):
    """A whole guided DDIM run: the bf16 model's rounding must not be amplified by the sampler's arithmetic."""
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(tiny_checkpoint, device="cpu", dtype=dtype, log=lambda message: None).model
        with torch.inference_mode():
            cond = model.get_learned_conditioning(["a red circle"])
            uncond = model.get_learned_conditioning([""])
            denoiser = GuidedDenoiser(model, cond, uncond, scale=5.0, dtype=dtype, device="cpu")
            start = torch.randn(1, 4, 8, 8, generator=seeded(5))
            eps, x0 = denoiser(start, 500)
            assert eps.dtype == x0.dtype == torch.float32
            results[dtype] = sample("ddim", denoiser, start, 10)
    assert results[torch.bfloat16].dtype == torch.float32
    assert relative_error(results[torch.bfloat16], results[torch.float32]) < BF16_MODEL_OUTPUT


# --- the loader gives back the checkpoint's pages -------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny.safetensors", "tiny.ckpt"])
def test_released_checkpoint_pages_read_back_unchanged(tmp_path, name):
    path = tmp_path / name
    weights = {"big": torch.randn(300_000, generator=seeded(6)), "small": torch.randn(7, generator=seeded(7))}
    if name.endswith(".ckpt"):
        torch.save({"state_dict": weights}, path)
    else:
        from safetensors.torch import save_file
        save_file(weights, str(path))
    state_dict, _ = read_checkpoint(path)
    ranges = mapped_ranges(path)
    assert ranges, "the checkpoint should be memory-mapped"
    for tensor in state_dict.values():
        release_file_pages(tensor, ranges)
    for key, tensor in state_dict.items():
        assert torch.equal(tensor, weights[key])  # paged in again from the file


def test_release_never_touches_memory_outside_the_checkpoint(tmp_path):
    path = write_tiny_checkpoint(tmp_path)
    read_checkpoint(path)
    anonymous = torch.randn(100_000, generator=seeded(8))
    before = anonymous.clone()
    release_file_pages(anonymous, mapped_ranges(path))
    assert torch.equal(anonymous, before)


def test_a_converted_load_holds_the_checkpoint_values(tiny_checkpoint):
    state_dict, _ = read_checkpoint(tiny_checkpoint)
    expected = {key: value.clone() for key, value in state_dict.items()}
    model = load_model(tiny_checkpoint, device="cpu", dtype=torch.bfloat16, log=lambda message: None).model
    for key, value in model.state_dict().items():
        if key in expected and value.is_floating_point() and not key.startswith(("betas", "alphas", "sqrt", "log", "posterior")):
            assert torch.equal(value, expected[key].to(value.dtype)), key


# --- threads --------------------------------------------------------------------------------------------------
def test_threads_default_to_physical_cores_unless_omp_num_threads_is_set(monkeypatch):
    before = torch.get_num_threads()
    try:
        cores = loading.physical_cores()
        assert 1 <= cores <= os.cpu_count()
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert loading.use_physical_cores() == cores
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert loading.use_physical_cores() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("support, slower", [("native", None), ("emulated", "2-3x"), ("none", "10-100x")])
def test_bf16_on_a_cpu_without_bf16_arithmetic_says_so_in_one_line(tiny_checkpoint, monkeypatch, support, slower):
    monkeypatch.setattr(loading, "cpu_bf16_support", lambda: support)
    lines = []
    loaded = loading.load(str(tiny_checkpoint), str(TINY_CONFIG), "cpu", "bf16", log=lines.append)
    warnings = [line for line in lines if "bf16" in line and "--precision full" in line]
    assert loaded.dtype == torch.bfloat16 and len(warnings) == (0 if slower is None else 1)
    assert slower is None or f"{slower} slower" in warnings[0]
    fp32_lines = []
    loading.load(str(tiny_checkpoint), str(TINY_CONFIG), "cpu", "full", log=fp32_lines.append)
    assert not any("--precision full" in line for line in fp32_lines)


@pytest.mark.parametrize("oneDNN_bf16, avx512_bf16, amx, machine, expected", [
    (False, False, False, "x86_64", "none"), (True, False, False, "x86_64", "emulated"),
    (True, True, False, "x86_64", "native"), (True, False, True, "x86_64", "native"),
    (True, False, False, "aarch64", "native")])
def test_bf16_support_tells_native_from_emulated(monkeypatch, oneDNN_bf16, avx512_bf16, amx, machine, expected):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: oneDNN_bf16)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(cpu.platform, "machine", lambda: machine)
    assert cpu.cpu_bf16_support() == expected


PAGE_FAULTS_PER_STEP = """
import resource, sys, torch
from ldm.generate import loading
applied = loading.keep_freed_memory_for_reuse() if sys.argv[1] == "keep" else False
def step():  # each layer's output feeds the next, as in a UNet step: sizes vary, two alive at a time
    x = torch.ones(40 << 20, dtype=torch.uint8)
    for megabytes in (64, 24, 48, 40):
        x = x[:1].expand(megabytes << 20).clone()
def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, *[faults_of_one_step() for _ in range(8)])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_freed_activations_are_reused_without_page_faults():
    def run(mode):
        done = subprocess.run([sys.executable, "-c", PAGE_FAULTS_PER_STEP, mode], capture_output=True,
                              text=True, check=True)
        applied, *faults = done.stdout.split()
        return applied == "True", [int(count) for count in faults[4:]]  # after four steps' warm-up

    pages_per_step = ((40 + 64 + 24 + 48 + 40) << 20) // mmap.PAGESIZE
    applied, faults = run("default")
    assert not applied and all(count > pages_per_step // 10 for count in faults)  # mapped afresh every step
    applied, faults = run("keep")
    assert applied and all(count < pages_per_step // 100 for count in faults), faults  # the last step's memory


# --- one full-size SD 1.x UNet at a tiny latent ---------------------------------------------------------------
@pytest.mark.slow
def test_full_size_unet_bf16_and_channels_last_match_fp32():
    from omegaconf import OmegaConf

    from ldm.checkpoint import REPO_ROOT, parameters_on_meta
    from ldm.util import instantiate_from_config

    config = OmegaConf.load(REPO_ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml")
    with parameters_on_meta():
        unet = instantiate_from_config(config.model.params.unet_config)
    generator = seeded(9)
    weights = {}
    for key, template in unet.state_dict().items():
        value = torch.randn(template.shape, generator=generator)
        weights[key] = value / math.sqrt(template[0].numel()) if template.ndim >= 2 else 1 + 0.1 * value
    unet.load_state_dict(weights, assign=True)
    unet.eval()
    x = torch.randn(2, 4, 8, 8, generator=seeded(10))
    t, context = torch.tensor([20, 800]), torch.randn(2, 77, 768, generator=seeded(11))
    with torch.inference_mode():
        expected = unet(x, t, context)
        place_weights(torch.nn.ModuleList([unet]), "cpu", torch.float32, channels_last=True)
        channels_last_error = relative_error(unet(x, t, context), expected)
        place_weights(torch.nn.ModuleList([unet]), "cpu", torch.bfloat16, channels_last=True)
        bf16_error = relative_error(unet(x, t, context).float(), expected)
    assert channels_last_error < FP32_REORDERING
    assert bf16_error < BF16_MODEL_OUTPUT
