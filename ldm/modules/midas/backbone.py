"""The encoder of MiDaS DPT-Hybrid: ViT-B/16 whose patch embedding is the start of a BiT ResNet-50.

This is the "R50+ViT-B/16" hybrid of the ViT paper as timm builds it (`vit_base_resnet50_384`), written
out here so that inference needs no timm. Its parameter names are timm's, because the depth checkpoints
store them: `patch_embed.backbone.stem.conv`, `patch_embed.backbone.stages.N.blocks.M.conv1`, `blocks.N.attn.qkv`.

- The ResNet runs its stem and its first three stages (3, 4 and 9 bottleneck blocks): an image of H×W
  becomes 1024 channels at H/16 × W/16, and a 1×1 convolution turns each of those cells into one token.
- Its convolutions are BiT's: weights standardised per output channel, GroupNorm(32) instead of BatchNorm,
  and TensorFlow "SAME" padding, which is asymmetric for strided layers (one more pixel right and below).
- The 24×24 grid of learnt position embeddings (for 384×384 inputs) is resized bilinearly to the input's grid.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

RESNET_STAGE_DEPTHS = (3, 4, 9)
VIT_WIDTH, VIT_DEPTH, VIT_HEADS = 768, 12, 12
PATCH_SIZE = 16  # the ResNet part's total stride: one token per 16×16 pixels
PRETRAINED_GRID = 24  # position embeddings were learnt for 384×384 inputs


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME": output ceil(size / stride), the padding split with the extra pixel at the end."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


class StdConv2dSame(nn.Conv2d):
    """A bias-free convolution whose weights are standardised (zero mean, unit variance per output channel)
    on every call, with "SAME" padding: BiT's replacement for conv + BatchNorm."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, eps=1e-8):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=False)
        self.eps = eps

    def forward(self, x):
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        # (w - mean) / sqrt(var + eps) per output channel, in one op: batch norm over each channel's weights.
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, None, self.stride)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm over 32 groups, followed by a ReLU unless `activation` is False."""

    def __init__(self, channels, activation=True):
        super().__init__(32, channels, eps=1e-5)
        self.activation = activation

    def forward(self, x):
        x = super().forward(x)
        return F.relu(x) if self.activation else x


class Stem(nn.Module):
    """7×7 stride-2 convolution, GroupNorm + ReLU, 3×3 stride-2 max pool: H×W → 64 channels at H/4 × W/4."""

    def __init__(self, out_channels=64):
        super().__init__()
        self.conv = StdConv2dSame(3, out_channels, 7, stride=2)
        self.norm = GroupNormAct(out_channels)

    def forward(self, x):
        x = self.norm(self.conv(x))
        # The pool pads with -inf so that padding never wins the max ("SAME" as in TensorFlow).
        return F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), kernel_size=3, stride=2)


class Downsample(nn.Module):
    """The shortcut of a stage's first block: a strided 1×1 convolution to the new width, GroupNorm."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv = StdConv2dSame(in_channels, out_channels, 1, stride=stride)
        self.norm = GroupNormAct(out_channels, activation=False)

    def forward(self, x):
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3×3 convolution), normalised after each convolution."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        mid_channels = out_channels // 4
        needs_projection = stride != 1 or in_channels != out_channels
        self.downsample = Downsample(in_channels, out_channels, stride) if needs_projection else None
        self.conv1 = StdConv2dSame(in_channels, mid_channels, 1)
        self.norm1 = GroupNormAct(mid_channels)
        self.conv2 = StdConv2dSame(mid_channels, mid_channels, 3, stride=stride)
        self.norm2 = GroupNormAct(mid_channels)
        self.conv3 = StdConv2dSame(mid_channels, out_channels, 1)
        self.norm3 = GroupNormAct(out_channels, activation=False)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class ResNetStage(nn.Module):
    def __init__(self, in_channels, out_channels, depth, stride):
        super().__init__()
        self.blocks = nn.Sequential(*(
            Bottleneck(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1)
            for i in range(depth)
        ))

    def forward(self, x):
        return self.blocks(x)


class ResNetFeatures(nn.Module):
    """Stem and the first three ResNet-50 stages; returns every stage's output (strides 4, 8 and 16).

    DPT uses the first two as its fine-scale features and the last as the ViT's input.
    """

    def __init__(self, stage_depths=RESNET_STAGE_DEPTHS):
        super().__init__()
        self.stem = Stem(64)
        widths = [256 * 2**i for i in range(len(stage_depths))]  # 256, 512, 1024
        self.stages = nn.ModuleList(
            ResNetStage(64 if i == 0 else widths[i - 1], widths[i], depth, stride=1 if i == 0 else 2)
            for i, depth in enumerate(stage_depths)
        )
        self.out_channels = widths

    def forward(self, x) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class HybridPatchEmbed(nn.Module):
    """Image → ResNet features → one token per 16×16 pixels (a 1×1 convolution of the stride-16 map)."""

    def __init__(self, width=VIT_WIDTH):
        super().__init__()
        self.backbone = ResNetFeatures()
        self.proj = nn.Conv2d(self.backbone.out_channels[-1], width, kernel_size=1)

    def forward(self, image):
        """(tokens [B, h·w, width], ResNet stage outputs)."""
        features = self.backbone(image)
        tokens = self.proj(features[-1]).flatten(2).transpose(1, 2)
        return tokens, features


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class Mlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm's ViT Block, LayerNorm eps 1e-6)."""

    def __init__(self, width, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, 4 * width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def resize_position_embedding(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """The class token's embedding unchanged, the square grid's resized bilinearly to grid_h × grid_w."""
    class_token, grid = pos_embed[:, :1], pos_embed[0, 1:]
    side = math.isqrt(grid.shape[0])
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
    return torch.cat([class_token, grid], dim=1)


class VisionTransformerHybrid(nn.Module):
    """ViT-B/16 on ResNet tokens. `forward` returns what DPT reads: the outputs of some blocks, and the
    ResNet stage outputs. The final `norm` and the ImageNet `head` are kept only because the checkpoints
    hold them; DPT never uses either."""

    def __init__(self, width=VIT_WIDTH, depth=VIT_DEPTH, heads=VIT_HEADS, grid=PRETRAINED_GRID, classes=1000):
        super().__init__()
        self.patch_embed = HybridPatchEmbed(width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, classes)

    def forward(self, image, block_outputs=(8, 11)):
        """(tokens after each block in `block_outputs` [B, 1 + h·w, width], ResNet stage outputs)."""
        grid_h, grid_w = image.shape[-2] // PATCH_SIZE, image.shape[-1] // PATCH_SIZE
        tokens, resnet_features = self.patch_embed(image)
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        x = x + resize_position_embedding(self.pos_embed, grid_h, grid_w).to(x.dtype)
        wanted, collected = set(block_outputs), {}
        for index, block in enumerate(self.blocks[:max(block_outputs) + 1]):
            x = block(x)
            if index in wanted:
                collected[index] = x
        return [collected[i] for i in block_outputs], resnet_features
