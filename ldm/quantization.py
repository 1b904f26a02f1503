"""int8 UNet layers on oneDNN's x86 int8 kernels (the ones PyTorch's Inductor lowers PT2E-quantized models to).

Every Conv2d and Linear of a UNet, except those touching the latent (the first and the last convolution) and
the timestep and class embedding MLPs (a few rows each, nothing to gain), is replaced by a layer that holds
its weight as int8 (symmetric, one scale per output channel, prepacked once for oneDNN), quantizes its input
to unsigned 8-bit (asymmetric, one scale per tensor) and accumulates in int32, writing fp32 as before.
Attention has no weights to quantize: on a CPU with bf16 arithmetic it runs in bf16 over many tokens.

The input's range is either calibrated (static: a few sampling runs record each layer's input range once,
kept in `InputRanges`) or measured on every call (dynamic). Without VNNI (AVX2 only) the CPU multiplies
u8 x s8 pairs into int16 sums that saturate, so inputs get 7 bits there (127 levels), as fbgemm's
reduce_range does; with VNNI or AMX the full 8 bits (255 levels).
"""
import math
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from ldm.cpu import cpu_has_vnni
from ldm.modules.attention import CrossAttention

# torch.quantize_per_tensor is the one fused float -> uint8 pass torch has; it warns of its quantized tensor
# type, which is only an intermediate here (the kernels take its int_repr), and is not used where it is gone.
warnings.filterwarnings("ignore", message="torch.quantize_per_tensor", category=UserWarning)
EMBEDDING_MLPS = ("time_embed", "label_emb", "emb_layers")  # inputs of one row per image: fp32 is as fast
NO_POST_OP = "none"  # oneDNN's name for "no fused post-op"


def int8_kernels_available() -> bool:
    """Whether this torch has oneDNN's int8 convolution and linear kernels for the CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv_pointwise") \
        and hasattr(torch.ops.onednn, "qlinear_pointwise")


def activation_levels() -> int:
    return 255 if cpu_has_vnni() else 127


def quantizable_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """{qualified name: layer} of the UNet's Conv2d and Linear layers that int8 serves (see the module text)."""
    latent_layers = {id(unet.input_blocks[0][0]), id(unet.out[-1])}
    layers = {}
    for name, module in unet.named_modules():
        if id(module) in latent_layers or any(part in name.split(".") for part in EMBEDDING_MLPS):
            continue
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.padding_mode == "zeros"
                                             and isinstance(module.padding, tuple)):
            layers[name] = module
    return layers


class InputRanges:
    """Each layer's calibrated input range (lowest, highest), recorded by forward pre-hooks while the
    model runs inside `with ranges.recording(layers):`."""

    def __init__(self, ranges: dict[str, tuple[float, float]] | None = None):
        self.ranges = dict(ranges or {})

    @contextmanager
    def recording(self, layers: dict[str, nn.Module]):
        handles = [layer.register_forward_pre_hook(self._observer(name)) for name, layer in layers.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _observer(self, name):
        def observe(module, inputs):
            low, high = (float(value) for value in torch.aminmax(inputs[0].detach()))
            old = self.ranges.get(name)
            self.ranges[name] = (low, high) if old is None else (min(old[0], low), max(old[1], high))
        return observe


def _flat(x: torch.Tensor) -> torch.Tensor:
    """x as one row, a view where its memory is dense: reductions over a channels-last picture's own strides
    run many times slower than over its memory in order."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)
    return x.reshape(-1)


def _quantization_of(low: float, high: float, levels: int) -> tuple[float, int]:
    """(scale, zero point) mapping [low, high] (widened to hold 0, so that zero padding is exact) onto 0..levels."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / levels if high > low else 1.0
    return scale, int(min(levels, max(0, round(-low / scale))))


class Int8Layer(nn.Module):
    """The parts int8 convolutions and linear layers share: the packed weight, its scales, the bias, and the
    input's quantization (static when `input_range` is given, otherwise measured on each call)."""

    def __init__(self, weight: torch.Tensor, bias, input_range, levels: int):
        super().__init__()
        weight = weight.detach().float()
        per_channel_max = weight.abs().flatten(1).amax(1).clamp_min(torch.finfo(torch.float32).tiny)
        self.register_buffer("weight_scales", per_channel_max / 127)
        self.register_buffer("weight_zero_points", torch.zeros(weight.shape[0], dtype=torch.long))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.levels = levels
        self.input_range = None if input_range is None else (float(input_range[0]), float(input_range[1]))
        self.static = None if input_range is None else _quantization_of(*input_range, levels)

    def quantized_input(self, x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        x = x.float()
        scale, zero_point = self.static or _quantization_of(*(float(v) for v in torch.aminmax(_flat(x))),
                                                            self.levels)
        if hasattr(torch, "quantize_per_tensor"):  # one pass over x instead of four
            quantized = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8).int_repr()
            if self.levels < 255:  # a static range clips what lies beyond it to the 7 bits
                quantized.clamp_(max=self.levels)
            return quantized, scale, zero_point
        quantized = x.mul(1.0 / scale).round_().add_(zero_point).clamp_(0, self.levels).to(torch.uint8)
        return quantized, scale, zero_point

    def extra_repr(self) -> str:
        mode = "dynamic" if self.static is None else f"static {self.input_range}"
        return f"{mode}, {self.levels} levels"


    def int8_weight(self, weight: torch.Tensor) -> torch.Tensor:
        scales = self.weight_scales.view(-1, *[1] * (weight.dim() - 1))
        return torch.round(weight.detach().float() / scales).clamp_(-127, 127).to(torch.int8)


class Int8Conv2d(Int8Layer):
    def __init__(self, conv: nn.Conv2d, input_range=None, levels: int = 127):
        super().__init__(conv.weight, conv.bias, input_range, levels)
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        # the scale and zero point given to prepack only pick a kernel layout; each call passes its own
        self.packed = torch.ops.onednn.qconv_prepack(self.int8_weight(conv.weight), self.weight_scales, 1.0, 0,
                                                     self.stride, self.padding, self.dilation, self.groups, None)

    def forward(self, x):
        dtype = x.dtype
        quantized, scale, zero_point = self.quantized_input(x)
        out = torch.ops.onednn.qconv_pointwise(quantized, scale, zero_point, self.packed, self.weight_scales,
                                               self.weight_zero_points, self.bias, self.stride, self.padding,
                                               self.dilation, self.groups, 1.0, 0, torch.float32, NO_POST_OP, [],
                                               "")
        return out.to(dtype)


class Int8Linear(Int8Layer):
    def __init__(self, linear: nn.Linear, input_range=None, levels: int = 127):
        super().__init__(linear.weight, linear.bias, input_range, levels)
        self.packed = torch.ops.onednn.qlinear_prepack(self.int8_weight(linear.weight), None)

    def forward(self, x):
        dtype = x.dtype
        quantized, scale, zero_point = self.quantized_input(x)
        out = torch.ops.onednn.qlinear_pointwise(quantized, scale, zero_point, self.packed, self.weight_scales,
                                                 self.weight_zero_points, self.bias, 1.0, 0, torch.float32,
                                                 NO_POST_OP, [], "")
        return out.to(dtype)


def int8_replacements(unet: nn.Module, ranges: InputRanges | None = None, levels: int | None = None) -> dict:
    """{name: int8 layer} for the UNet's quantizable layers: static with `ranges` (a layer it has no finite
    range for is left out, staying fp32), dynamic without."""
    levels = levels or activation_levels()
    replacements = {}
    for name, layer in quantizable_layers(unet).items():
        input_range = None if ranges is None else ranges.ranges.get(name)
        if ranges is not None and (input_range is None or not all(map(math.isfinite, input_range))):
            continue
        make = Int8Conv2d if isinstance(layer, nn.Conv2d) else Int8Linear
        replacements[name] = make(layer, input_range, levels)
    return replacements


def replace_layers(unet: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put `layers` ({qualified name: module}) in place; returns the modules they replaced, to swap back."""
    replaced = {}
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        replaced[name] = getattr(parent, child)
        setattr(parent, child, layer)
    return replaced


def quantize_unet(unet: nn.Module, ranges: InputRanges | None = None, levels: int | None = None) -> int:
    """Replace the UNet's quantizable layers in place by int8 ones (as `int8_replacements`) and let its
    attention run in bf16 where that pays; returns how many layers."""
    set_attention_in_bf16(unet, True)
    return len(replace_layers(unet, int8_replacements(unet, ranges, levels)))


def set_attention_in_bf16(unet: nn.Module, on: bool):
    """Whether the UNet's fp32 attention runs in bf16 where that pays (`ldm.modules.attention.attention`):
    int8 UNets do, as attention has no int8 kernel and would otherwise stay fp32."""
    for module in unet.modules():
        if isinstance(module, CrossAttention):
            module.attention_in_bf16 = on


def int8_layers(module: nn.Module) -> list[Int8Layer]:
    return [layer for layer in module.modules() if isinstance(layer, Int8Layer)]
