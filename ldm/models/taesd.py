"""TAESD, the tiny autoencoder (madebyollin/taesd): SD's latents <-> pictures with a few 64-channel convolutions.

It decodes in a small fraction of the full VAE's time with a slightly softer picture, and works directly in
the UNet's latent space (the full VAE's latents times the model's scale factor): no scale factor of its own.
Pictures are [0, 1] on its side; `TinyAutoencoder` speaks the LatentDiffusion first stage's language
([-1, 1] pictures, latents divided by the scale factor) so that it can stand in for `first_stage_model`.

Its weights come in three layouts, all read here (`split_tiny_state_dict`):
- madebyollin's `taesd_encoder.pth` / `taesd_decoder.pth` (and their `.safetensors`): one nn.Sequential each,
  keys `0.weight`, `1.conv.0.weight`...; the decoder's index 0 is its Clamp, so its first conv is `1.`;
- one file holding both with `encoder.` / `decoder.` prefixes in that layout;
- diffusers' `AutoencoderTiny` (`encoder.layers.N...`, `decoder.layers.N...`): the decoder's clamp is not a
  layer there, so its indices are one lower.
The SD 1.x/2.x (`taesd`) and SDXL (`taesdxl`) weights have one architecture; only the files differ.
"""
import re

import torch
from torch import nn

LATENT_MAGNITUDE = 3  # TAESD's scale_latents: latents / (2 * 3) + 0.5 fit [0, 1] for 8-bit storage
LATENT_SHIFT = 0.5
DOWNSAMPLING_FACTOR = 8
CHANNELS = 64


def _conv(n_in, n_out, **kwargs):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """A soft clamp of the latents to (-3, 3), where TAESD's decoder was trained."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def tiny_encoder(latent_channels: int = 4) -> nn.Sequential:
    """[0, 1] pictures -> latents at 1/8 of the size."""
    downsample = lambda: _conv(CHANNELS, CHANNELS, stride=2, bias=False)  # noqa: E731
    blocks = lambda: [Block(CHANNELS, CHANNELS) for _ in range(3)]  # noqa: E731
    return nn.Sequential(_conv(3, CHANNELS), Block(CHANNELS, CHANNELS),
                         downsample(), *blocks(), downsample(), *blocks(), downsample(), *blocks(),
                         _conv(CHANNELS, latent_channels))


def tiny_decoder(latent_channels: int = 4) -> nn.Sequential:
    """Latents -> [0, 1] pictures (not clipped) at 8 times the size."""
    upsample = lambda: [nn.Upsample(scale_factor=2), _conv(CHANNELS, CHANNELS, bias=False)]  # noqa: E731
    blocks = lambda: [Block(CHANNELS, CHANNELS) for _ in range(3)]  # noqa: E731
    return nn.Sequential(Clamp(), _conv(latent_channels, CHANNELS), nn.ReLU(),
                         *blocks(), *upsample(), *blocks(), *upsample(), *blocks(), *upsample(),
                         Block(CHANNELS, CHANNELS), _conv(CHANNELS, 3))


def scale_latents(latents: torch.Tensor) -> torch.Tensor:
    """TAESD's latents -> [0, 1] (as its authors store them in 8-bit pictures)."""
    return latents.div(2 * LATENT_MAGNITUDE).add(LATENT_SHIFT).clamp(0, 1)


def unscale_latents(scaled: torch.Tensor) -> torch.Tensor:
    return scaled.sub(LATENT_SHIFT).mul(2 * LATENT_MAGNITUDE)


# --- weights files --------------------------------------------------------------------------------------------
_DIFFUSERS_KEY = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.*)$")
_PREFIXED_KEY = re.compile(r"^(encoder|decoder)\.(\d+)\.(.*)$")
_BARE_KEY = re.compile(r"^(\d+)\.(.*)$")


def looks_tiny(state_dict: dict) -> bool:
    """Whether a weights file holds a TAESD encoder or decoder, in any of the layouts above."""
    return bool(state_dict) and all(_DIFFUSERS_KEY.match(key) or _PREFIXED_KEY.match(key) or _BARE_KEY.match(key)
                                    for key in state_dict)


def split_tiny_state_dict(state_dict: dict) -> dict:
    """{"encoder": ..., "decoder": ...} (those the file holds) in madebyollin's Sequential layout.

    A bare file (keys `0.weight`...) is an encoder when it has the 3-channel input conv `0.weight`, a
    decoder when its first conv is `1.weight` (after the Clamp). ValueError for anything else.
    """
    parts = {}
    for key, tensor in state_dict.items():
        if match := _DIFFUSERS_KEY.match(key):
            part, index, rest = match.group(1), int(match.group(2)), match.group(3)
            index += part == "decoder"  # diffusers' decoder has no Clamp layer
        elif match := _PREFIXED_KEY.match(key):
            part, index, rest = match.group(1), int(match.group(2)), match.group(3)
        elif match := _BARE_KEY.match(key):
            part, index, rest = None, int(match.group(1)), match.group(2)
        else:
            raise ValueError(f"{key!r} is not a TAESD key")
        parts.setdefault(part, {})[f"{index}.{rest}"] = tensor
    bare = parts.pop(None, None)
    if bare is not None:
        if parts:
            raise ValueError("the file mixes bare TAESD keys with encoder./decoder. ones")
        if "0.weight" in bare:
            parts["encoder"] = bare
        elif "1.weight" in bare:
            parts["decoder"] = bare
        else:
            raise ValueError("a bare TAESD file needs its first convolution (0.weight or 1.weight)")
    return parts


def latent_channels_of(part: str, state_dict: dict) -> int:
    """The latent channels a TAESD encoder or decoder state dict (madebyollin's layout) works with."""
    if part == "decoder":
        return state_dict["1.weight"].shape[1]
    last = max(int(key.split(".")[0]) for key in state_dict)
    return state_dict[f"{last}.weight"].shape[0]


# --- as a LatentDiffusion's first stage -------------------------------------------------------------------------
class TinyAutoencoder(nn.Module):
    """TAESD in the place of a LatentDiffusion's `first_stage_model`.

    LatentDiffusion divides latents by its scale factor before `decode` and multiplies what `encode` gives by
    it; TAESD works on the scaled latents themselves, so both are undone here. Without a TAESD encoder,
    `checkpoint_encoder` (the checkpoint's own autoencoder, its decoder left out) encodes for img2img.
    """

    downsampling_factor = DOWNSAMPLING_FACTOR

    def __init__(self, scale_factor: float, latent_channels: int = 4, with_encoder: bool = True,
                 checkpoint_encoder: nn.Module | None = None):
        super().__init__()
        self.scale_factor = float(scale_factor)
        self.latent_channels = latent_channels
        self.decoder = tiny_decoder(latent_channels)
        self.encoder = tiny_encoder(latent_channels) if with_encoder else None
        self.checkpoint_encoder = None if with_encoder else checkpoint_encoder

    def encode(self, pixels: torch.Tensor):
        """[-1, 1] pictures -> latents / scale factor (or the checkpoint encoder's posterior)."""
        if self.encoder is None:
            return self.checkpoint_encoder.encode(pixels)
        return self.encoder(pixels.add(1).div(2)) / self.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents / scale factor -> [-1, 1] pictures (not clipped)."""
        return self.decoder(latents * self.scale_factor).mul(2).sub(1)

    def preview(self, latents: torch.Tensor) -> torch.Tensor:
        """The UNet's latents (as the samplers' x0) -> [0, 1] pictures, clipped: for live previews."""
        parameter = next(self.decoder.parameters())
        return self.decoder(latents.to(parameter.device, parameter.dtype)).float().clamp(0, 1)


def encoder_only(autoencoder: nn.Module) -> nn.Module:
    """A full autoencoder (AutoencoderKL) without its decoder half, to encode next to a TAESD decoder."""
    autoencoder.decoder = autoencoder.post_quant_conv = None
    autoencoder.loss = nn.Identity()  # a training loss's weights are not needed to encode
    return autoencoder
