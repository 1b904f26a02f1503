"""Schedules and small building blocks shared by the UNet and the diffusion models."""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.cpu import available_cpu_memory, cpu_has_bf16_arithmetic, total_cpu_memory


def make_beta_schedule(schedule, n_timestep, linear_start=1e-4, linear_end=2e-2, cosine_s=8e-3):
    """Float64 numpy betas, computed exactly as the original LDM code does (its checkpoints store them)."""
    if schedule == "linear":
        # "linear" is linear in sqrt(beta), not in beta.
        return (torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64) ** 2).numpy()
    if schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * np.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        return np.clip((1 - alphas[1:] / alphas[:-1]).numpy(), a_min=0, a_max=0.999)
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64).numpy()
    if schedule == "sqrt":
        return (torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5).numpy()
    raise ValueError(f"unknown beta schedule {schedule!r}: use linear, cosine, sqrt_linear or sqrt")


def schedule_tensors(betas: np.ndarray) -> dict:
    """The per-timestep buffers every DDPM-style model registers, as float32 CPU tensors.

    Built on the CPU explicitly so that a model constructed on the meta device still has real schedules.
    """
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": np.append(1.0, alphas_cumprod[:-1]),
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
    }
    return {name: torch.tensor(value, dtype=torch.float32, device="cpu") for name, value in values.items()}


def extract_into_tensor(values: torch.Tensor, t: torch.Tensor, x_shape) -> torch.Tensor:
    """values[t] reshaped to broadcast over a batch of shape x_shape."""
    out = values.to(t.device).gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [N, dim], cos half first, as the original UNet orders it."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in fp32 whatever the activation dtype.

    PyTorch's group-norm kernels (CPU and CUDA) already accumulate bf16/fp16 inputs in fp32, so when the
    input has the weights' dtype it is normalised as it is: an explicit fp32 round trip would add two
    full passes over the activations and give the same numbers. Only a dtype mismatch (fp32 activations
    with 16-bit weights, which the CPU kernel refuses) goes through fp32.
    """

    def forward(self, x):
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).type(x.dtype)


def norm_groups(channels: int) -> int:
    """32 groups, as the originals, for every layer of 128 channels or more (all of SD's); narrower layers
    (our small models) keep 4 channels a group: with one channel a group the norm is an instance norm,
    which erases the absolute colour of flat image regions (measured: the small autoencoder's L1 after
    60 steps 0.62 with 32 groups, 0.26 with 8)."""
    return 32 if channels >= 128 else max(1, channels // 4)


def silu_of_fresh(x: torch.Tensor) -> torch.Tensor:
    """SiLU of a tensor that nothing else holds (a norm's output): in place unless autograd needs its input."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def add_to_fresh(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """fresh + other, written into `fresh` (a layer's output that nothing else holds) when no gradient is
    recorded: one pass over memory and no new activation. `other` must broadcast to fresh's shape."""
    return fresh.add_(other) if not torch.is_grad_enabled() else fresh + other


PACKED_MAX_ROWS = 2 * 16 * 16
# Packing a whole UNet's kernels costs seconds (mostly the first write of fresh memory), which the calls after it
# win back a few tenths at a time: a layer is packed at this call with the same kernel and shape, so that runs of
# a few steps (turbo, LCM) never pay for it and longer runs, further batches and a server do.
PACK_FROM_CALL = 5
# Packed copies use spare memory only: what stays available after one is made must hold the rest of a run (a
# 512² decode, the text encoder, a second model) and whatever else the machine runs. Under it, the plain way.
PACKING_RESERVE_BYTES = 4 * 1024 ** 3
PACKING_RESERVE_FRACTION = 0.25  # of the machine's memory, where that is more


def kernel_packing_pays(module: nn.Module, x: torch.Tensor, rows: int) -> bool:
    """Whether `module` convolves x (rows = pictures x pixels, or tokens) with its kernel prepacked: CPU
    inference over few rows, where oneDNN's reorder of the plain kernel into its blocked layout, otherwise
    repeated on every call, costs as much as the convolution (the UNet's deepest levels: most of its weights,
    little arithmetic). In fp32, and in bf16 on CPUs with bf16 arithmetic, where the convolutions take a third
    of fp32's time and the reorder does not shrink with them. Over more rows the plain kernel is as fast, and no
    packed copy is kept."""
    if (getattr(module, "packs_kernel", False) and rows <= PACKED_MAX_ROWS and x.device.type == "cpu"
            and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and cpu_has_bf16_arithmetic()))
            and module.weight.dtype == x.dtype
            and not torch.is_grad_enabled() and torch.backends.mkldnn.is_available()
            and x.is_contiguous(memory_format=torch.channels_last) and plain_call_runs_onednn(x, module)):
        return True
    module.__dict__.pop("_packed_kernel", None)
    return False


def plain_call_runs_onednn(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether F.conv2d would convolve x with oneDNN (PyTorch's rule for fp32 CPU tensors) rather than its own
    kernel for tiny or single-threaded cases: only there does the prepacked call give the plain call's numbers
    (given a channels-last x, whose output is channels-last either way, as the loader's models run)."""
    one_by_one = module.weight.dim() != 4 or module.weight.shape[-2:] == (1, 1)  # a Linear's [out, in] is 1×1
    strided = any(step != 1 for step in getattr(module, "stride", (1,)))
    return ((strided or not one_by_one or x.shape[0] >= 16 or torch.get_num_threads() > 1)
            and (x.shape[0] > 1 or x.numel() > 20480 or getattr(module, "groups", 1) > 1))


def conv2d_prepacked(module: nn.Module, x: torch.Tensor, kernel, bias, padding, stride=(1, 1), dilation=(1, 1),
                     groups: int = 1, variant: str = "kernel") -> torch.Tensor:
    """F.conv2d(x, kernel(), bias, ...) with kernel() reordered into oneDNN's blocked layout once and kept on
    `module` (one packed kernel a module) until its weight, x's shape or the variant changes, where spare memory
    allows (room_for_packed_copy): the same oneDNN convolution as the plain call, which reorders every time.
    The weight is watched by address and version counter; code that changes weights behind them (LoRA's
    merges) calls forget_weight_copies; --lowmem keeps none (keep_kernels_plain)."""
    weight = module.weight
    version = None if weight.is_inference() else weight._version  # inference tensors keep no counter
    key = (variant, weight.data_ptr(), version, tuple(x.shape))
    packed = module.__dict__.get("_packed_kernel")
    if packed is None or packed[0] != key or packed[1] is None:
        calls = 1 + (packed[2] if packed is not None and packed[0] == key else 0)
        module.__dict__["_packed_kernel"] = (key, None, calls)  # a stale copy goes before a new one is made
        plain = kernel()
        if calls < PACK_FROM_CALL or not room_for_packed_copy(plain.numel() * plain.element_size()):
            return F.conv2d(x, plain, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)
        packed = (key, torch.ops.mkldnn._reorder_convolution_weight(plain, list(padding), list(stride),
                                                                     list(dilation), groups, list(x.shape)), calls)
        module.__dict__["_packed_kernel"] = packed
    return torch.ops.mkldnn._convolution_pointwise(x, packed[1], bias, list(padding), list(stride), list(dilation),
                                                   groups, "none", [], "")


def room_for_packed_copy(size: int) -> bool:
    reserve = max(PACKING_RESERVE_BYTES, PACKING_RESERVE_FRACTION * total_cpu_memory())
    return available_cpu_memory() - size >= reserve


def packed_kernels(model: nn.Module) -> dict[nn.Module, torch.Tensor]:
    """{layer: its packed kernel} for the layers of `model` that hold one now."""
    return {module: packed[1] for module in model.modules()
            if (packed := module.__dict__.get("_packed_kernel")) is not None and packed[1] is not None}


# What layers keep between calls that was made from their weights (packed kernels, the text's keys and values:
# ldm.modules.attention): code that changes weights behind their version counters drops it all.
WEIGHT_COPIES = ("_packed_kernel", "_text_keys_and_values")


def forget_weight_copies(model: nn.Module) -> None:
    for module in model.modules():
        for name in WEIGHT_COPIES:
            module.__dict__.pop(name, None)


def keep_kernels_plain(model: nn.Module) -> None:
    """No packed copies in `model` (--lowmem: its peak is the weights it converts, nothing beside them)."""
    for module in model.modules():
        if getattr(module, "packs_kernel", False):
            module.packs_kernel = False
    forget_weight_copies(model)


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state-dict keys) whose kernel is prepacked where that pays (above)."""

    packs_kernel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() != 4 or self.padding_mode != "zeros"
                or not kernel_packing_pays(self, x, x.shape[0] * x.shape[2] * x.shape[3])):
            return super().forward(x)
        return conv2d_prepacked(self, x, lambda: self.weight, self.bias, self.padding, self.stride, self.dilation,
                                self.groups)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) that runs fp32 CPU inference as a 1×1 convolution.

    On most of the UNet's shapes oneDNN's convolution is 10-40 % faster than the MKL matmul behind F.linear
    here (benchmarks/linear_as_convolution.py), and it reads the same memory with no copy: the [out, in]
    weight viewed as an [out, in, 1, 1] kernel, the rows of the [..., in] activation as the pixels of a
    one-column channels-last image, whose channels-last output is the [..., out] result. Equal to F.linear
    up to fp32 summation order. The matmul stays where it is as fast or faster: under 64 rows (the
    timestep embedding) and over 4096 inputs (oneDNN's 1×1 kernel is 2x slower on the feed-forward's
    5120 -> 1280 output layer). Over few rows the kernel is kept prepacked (conv2d_prepacked).
    """

    MIN_ROWS, MAX_IN_FEATURES = 64, 4096
    packs_kernel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows < self.MIN_ROWS or self.in_features > self.MAX_IN_FEATURES:
            return super().forward(x)
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled():
            return super().forward(x)  # bf16 stays oneDNN's matmul: as a convolution its numbers would change
        image = x.reshape(1, rows, 1, self.in_features).permute(0, 3, 1, 2)
        packed = kernel_packing_pays(self, image, rows)

        def kernel():
            return self.weight.reshape(self.out_features, self.in_features, 1, 1)
        if packed:
            out = conv2d_prepacked(self, image, kernel, self.bias, (0, 0))
        else:
            out = F.conv2d(image, kernel(), self.bias)
        return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], self.out_features)


PHASES_MIN_PIXELS = 16 * 16


def nearest_upsample_conv(x: torch.Tensor, conv: nn.Conv2d, output_size=None) -> torch.Tensor:
    """conv(nearest-neighbour upsampling of x to output_size, by default twice its size): SD's Upsample.

    A 3×3 convolution of a twice-upsampled picture is, for each of the four output phases (even/odd row,
    even/odd column), a 2×2 convolution of the picture itself whose taps are sums of the 3×3 kernel's: 16
    multiply-adds an input pixel where the upsampled picture takes 36, and no 4x larger upsampled copy. On a
    CPU in fp32 inference all four phases run as one convolution with 4x the output channels (bias included)
    and are interleaved into the channels-last result; equal to the plain way up to fp32 summation order.
    Pictures under PHASES_MIN_PIXELS keep the plain way: there the four phase kernels (16/9 of the weights, made
    anew each call unless they are kept prepacked, as the kernels of few rows are) cost more than the saved
    arithmetic.
    Layers other than a plain nn.Conv2d (the int8 layers of --precision int8), and convolutions with hooks that
    must see them called (int8 calibration records inputs so), keep the plain way too.
    """
    batch, _, height, width = x.shape
    doubled = (2 * height, 2 * width)
    if (x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled()
            or height * width < PHASES_MIN_PIXELS
            or (output_size is not None and tuple(output_size) != doubled) or type(conv) not in (nn.Conv2d, Conv2d)
            or conv._forward_pre_hooks or conv._forward_hooks or conv.kernel_size != (3, 3)
            or conv.padding != (1, 1) or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1
            or conv.padding_mode != "zeros"):
        return conv(F.interpolate(x, size=output_size or doubled, mode="nearest"))
    out_channels = conv.out_channels
    # Output position p of the padded 2×2 convolution reads input rows p-1 and p: even output rows 2i
    # read rows (i-1, i) with taps (k0, k1+k2), odd rows 2i+1 read (i, i+1) with (k0+k1, k2): p = i + phase.
    bias = None if conv.bias is None else conv.bias.repeat(4)
    if kernel_packing_pays(conv, x, batch * height * width):
        phases = conv2d_prepacked(conv, x, lambda: _phase_kernels(conv.weight), bias, (1, 1), variant="phases")
    else:
        phases = F.conv2d(x, _phase_kernels(conv.weight), bias, padding=1)  # [N, 4 x out, H+1, W+1]
    phases = phases.permute(0, 2, 3, 1).reshape(batch, height + 1, width + 1, 2, 2, out_channels)
    out = torch.empty(batch, out_channels, *doubled, dtype=x.dtype, memory_format=torch.channels_last)
    interleaved = out.permute(0, 2, 3, 1).view(batch, height, 2, width, 2, out_channels)
    for row in (0, 1):
        for column in (0, 1):
            interleaved[:, :, row, :, column] = phases[:, row:row + height, column:column + width, row, column]
    return out


def _phase_kernels(kernel: torch.Tensor) -> torch.Tensor:
    """[out, in, 3, 3] -> [4 x out, in, 2, 2]: the (even, even), (even, odd), (odd, even), (odd, odd) phases."""
    def two_taps(k, dim):
        first, middle, last = (k.narrow(dim, tap, 1) for tap in range(3))
        return torch.cat([first, middle + last], dim), torch.cat([first + middle, last], dim)

    return torch.cat([both for rows in two_taps(kernel, 2) for both in two_taps(rows, 3)]).contiguous(
        memory_format=torch.channels_last)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(norm_groups(channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: residual branches start as the identity, as in the original training."""
    for p in module.parameters():
        p.detach().zero_()
    return module
