"""The KL autoencoder's encoder and decoder (the "first stage" of latent diffusion).

Names match the original checkpoints: conv_in, down.N.block.M, down.N.downsample, mid.block_1/attn_1/block_2,
up.N.block.M, up.N.upsample, norm_out, conv_out.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import attention
from ldm.modules.diffusionmodules.util import add_to_fresh, nearest_upsample_conv, norm_groups, silu_of_fresh


def Normalize(in_channels):
    return nn.GroupNorm(num_groups=norm_groups(in_channels), num_channels=in_channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels=None, dropout=0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(silu_of_fresh(self.norm1(x)))
        h = self.conv2(self.dropout(silu_of_fresh(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return add_to_fresh(h, shortcut)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convolutions as projections."""

    def __init__(self, in_channels):
        super().__init__()
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, 1)
        self.k = nn.Conv2d(in_channels, in_channels, 1)
        self.v = nn.Conv2d(in_channels, in_channels, 1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x):
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(batch, 1, channels, height * width).transpose(2, 3) for conv in (self.q, self.k, self.v))
        h = attention(q, k, v)
        h = h.transpose(2, 3).reshape(batch, channels, height, width)
        return add_to_fresh(self.proj_out(h), x)


class Downsample(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=0)

    def forward(self, x):
        # Asymmetric padding (right and bottom only), as the original was trained with.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)

    def forward(self, x):
        return nearest_upsample_conv(x, self.conv)


def _level(blocks, attentions):
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attentions)
    return level


def _middle(channels, dropout):
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


def _run_middle(mid, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, *, ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions, dropout=0.0,
                 in_channels, resolution, z_channels, double_z=True, **ignored):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels, current_resolution = ch, resolution
        for level, mult in enumerate(ch_mult):
            blocks, attentions = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(channels, ch * mult, dropout))
                channels = ch * mult
                if current_resolution in attn_resolutions:
                    attentions.append(AttnBlock(channels))
            down = _level(blocks, attentions)
            if level != len(ch_mult) - 1:
                down.downsample = Downsample(channels)
                current_resolution //= 2
            self.down.append(down)
        self.mid = _middle(channels, dropout)
        self.norm_out = Normalize(channels)
        self.conv_out = nn.Conv2d(channels, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for down in self.down:
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i](h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = _run_middle(self.mid, h)
        return self.conv_out(silu_of_fresh(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions, dropout=0.0,
                 resolution, z_channels, **ignored):
        super().__init__()
        channels = ch * ch_mult[-1]
        current_resolution = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, channels, 3, padding=1)
        self.mid = _middle(channels, dropout)
        levels = []
        for level in reversed(range(len(ch_mult))):
            blocks, attentions = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(channels, ch * ch_mult[level], dropout))
                channels = ch * ch_mult[level]
                if current_resolution in attn_resolutions:
                    attentions.append(AttnBlock(channels))
            up = _level(blocks, attentions)
            if level != 0:
                up.upsample = Upsample(channels)
                current_resolution *= 2
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(channels)
        self.conv_out = nn.Conv2d(channels, out_ch, 3, padding=1)

    def forward(self, z):
        h = _run_middle(self.mid, self.conv_in(z))
        for up in reversed(self.up):
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(silu_of_fresh(self.norm_out(h)))
