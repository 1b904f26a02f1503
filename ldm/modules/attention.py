"""The UNet's spatial transformer: self-attention, cross-attention to the text, and a gated feed-forward.

Parameter names follow the original checkpoints (to_q/to_k/to_v/to_out, ff.net, norm1..3, proj_in/out).
"""
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ldm.cpu import cpu_has_bf16_arithmetic
from ldm.modules.diffusionmodules.util import Conv2d, Linear, add_to_fresh

BF16_BY_ROWS_MIN_KEYS = 1024
BF16_BY_ROWS_SCORES = 1 << 22  # scores one block of query rows holds: 8 MB in bf16


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, in_bf16: bool = False) -> torch.Tensor:
    """softmax(q kᵀ / √d) v over [batch, heads, tokens, d] queries, keys and values (views allowed).

    scaled_dot_product_attention everywhere but in bf16 over many keys (self-attention at the UNet's upper
    levels) on a CPU with bf16 arithmetic, where PyTorch's flash kernel is no faster in bf16 than in fp32 but
    oneDNN's bf16 matmuls run at twice the fp32 rate: there each head's scores are made a block of query rows
    at a time by two bf16 matmuls around a softmax that accumulates in fp32 (benchmarks/attention.py). The
    scores are rounded to bf16 before the softmax, which the flash kernel keeps in fp32: a little more error,
    of the same order as bf16 activations already carry. `in_bf16` runs fp32 activations so where it pays (int8
    UNets, whose attention has no int8 kernel and would otherwise stay fp32), and is ignored where it does not.
    """
    if takes_bf16_by_rows(q, k, in_bf16):
        return _bf16_attention_by_rows(q, k, v).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


def takes_bf16_by_rows(q: torch.Tensor, k: torch.Tensor, in_bf16: bool = False) -> bool:
    """Whether `attention` runs these queries and keys in bf16 by rows (see there)."""
    bf16 = q.dtype == torch.bfloat16 or (in_bf16 and q.dtype == torch.float32)
    return (bf16 and q.device.type == "cpu" and k.shape[2] >= BF16_BY_ROWS_MIN_KEYS and not torch.is_grad_enabled()
            and cpu_has_bf16_arithmetic())


def _bf16_attention_by_rows(q, k, v) -> torch.Tensor:
    batch, heads, tokens, depth = q.shape
    rows = max(64, BF16_BY_ROWS_SCORES // k.shape[2])
    # [batch, tokens, heads, d] memory, as the layer's output projection reads it: no copy on the way out.
    out = torch.empty(batch, tokens, heads, depth, dtype=torch.bfloat16)
    for image in range(batch):
        for head in range(heads):
            query = (q[image, head] * depth ** -0.5).to(torch.bfloat16)  # scaled before rounding
            keys_t, values = k[image, head].to(torch.bfloat16).t(), v[image, head].to(torch.bfloat16)
            for start in range(0, tokens, rows):
                scores = torch.mm(query[start:start + rows], keys_t)
                out[image, start:start + rows, head] = torch.mm(scores.softmax(-1), values)
    return out.transpose(1, 2)


class CrossAttention(nn.Module):
    attention_in_bf16 = False  # int8 UNets set it (see `attention`)

    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = Linear(query_dim, inner_dim, bias=False)
        self.to_k = Linear(context_dim, inner_dim, bias=False)
        self.to_v = Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None):
        q = self.to_q(x)
        k, v = (self.to_k(x), self.to_v(x)) if context is None else self.keys_and_values(context)
        batch, heads = x.shape[0], self.heads
        q, k, v = (t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        out = attention(q, k, v, self.attention_in_bf16)
        out = out.transpose(1, 2).reshape(batch, x.shape[1], -1)
        return self.to_out(out)

    def keys_and_values(self, context):
        """to_k(context), to_v(context), kept while the context is the same tensor (`same_context_as_before`)
        and to_k and to_v hold the same weights: a run sends the same text on every step, so they are made
        once instead of on every call (exactly the same numbers). Layers with hooks run every call: what
        hooks them (int8 calibration's observers) wants to see every input."""
        hooked = any(layer._forward_pre_hooks or layer._forward_hooks for layer in (self.to_k, self.to_v))
        if torch.is_grad_enabled() or hooked:
            return self.to_k(context), self.to_v(context)
        weights = [t for layer in (self.to_k, self.to_v) for t in (*layer.parameters(), *layer.buffers())]
        kept = self.__dict__.get("_text_keys_and_values")
        if kept is not None and kept[0] is context and _still_the_same(kept[1], weights):
            return kept[2]
        self.__dict__.pop("_text_keys_and_values", None)
        keys_and_values = self.to_k(context), self.to_v(context)
        self.__dict__["_text_keys_and_values"] = (context, [_identity(t) for t in weights], keys_and_values)
        return keys_and_values


def same_context_as_before(owner: nn.Module, context):
    """The context tensor `owner` (a UNet or ControlNet) runs this call on: the one it kept from its last call
    when equal to it (the same text, as on every step of a run), else a copy of its own of this one, which no
    caller can change behind it. The cross-attention layers then keep their text's keys and values while the
    context stays the same tensor (CrossAttention.keys_and_values)."""
    if context is None or torch.is_grad_enabled():
        return context
    before = owner.__dict__.get("_context_before")
    if (before is not None and before.shape == context.shape and before.dtype == context.dtype
            and before.device == context.device and torch.equal(before, context)):
        return before
    owner.__dict__["_context_before"] = context = context.clone()
    return context


def _identity(tensor: torch.Tensor) -> tuple:
    """What tells a tensor apart from any later one: the object (weakly: a new parameter is a new object even
    at a freed one's address), its memory and its version counter (inference tensors have none)."""
    return weakref.ref(tensor), tensor.data_ptr(), None if tensor.is_inference() else tensor._version


def _still_the_same(identities: list, tensors: list) -> bool:
    return len(identities) == len(tensors) and all(
        ref() is tensor and (address, version) == _identity(tensor)[1:]
        for (ref, address, version), tensor in zip(identities, tensors))


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        gate = F.gelu(gate)
        return gate.mul_(x) if not torch.is_grad_enabled() else gate * x  # in place: one activation less


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), Linear(inner_dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, dropout=0.0, context_dim=None, disable_self_attn=False):
        super().__init__()
        # With self-attention disabled (x4 upscaler), attn1 attends to the text as well.
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = add_to_fresh(self.attn1(self.norm1(x), context=context if self.disable_self_attn else None), x)
        x = add_to_fresh(self.attn2(self.norm2(x), context=context), x)
        return add_to_fresh(self.ff(self.norm3(x)), x)


class SpatialTransformer(nn.Module):
    """Image features [B, C, H, W] -> tokens -> transformer blocks -> back, added to the input.

    SD 1.x projects in and out with 1x1 convolutions, SD 2.x with linear layers (use_linear).
    """

    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0.0, context_dim=None,
                 disable_self_attn=False, use_linear=False):
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        project = Linear if use_linear else (lambda i, o: Conv2d(i, o, kernel_size=1))
        self.proj_in = project(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim, disable_self_attn)
            for _ in range(depth)
        )
        self.proj_out = project(inner_dim, in_channels)
        for p in self.proj_out.parameters():
            p.detach().zero_()

    def forward(self, x, context=None):
        batch, channels, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context=context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(batch, -1, height, width)
        if not self.use_linear:
            h = self.proj_out(h)
        return add_to_fresh(h, x)
