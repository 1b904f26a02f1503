"""CLIP image encoders for SD 2.1 unCLIP: a picture -> its CLIP image embedding, which conditions the UNet.

The class names and constructor arguments are those of the original ``ldm.modules.encoders.modules``, so
that Stability's unCLIP configs build these classes unchanged, and the parameter names are those of the
original checkpoints (``embedder.model.visual.*``):

- ``ClipImageEmbedder``: unCLIP-L, OpenAI CLIP ViT-L/14 (QuickGELU), 768-d embedding.
- ``FrozenOpenCLIPImageEmbedder``: unCLIP-H, OpenCLIP ViT-H/14 (GELU), 1024-d embedding.

Nothing is downloaded: the architecture is built from its name and the weights come from the checkpoint.
The originals keep a whole CLIP model (the H one without its text transformer) of which only the image tower
runs; the checkpoint's text-tower tensors are left unread (``unused_checkpoint_keys``).

Preprocessing is the originals' (kornia): the picture, any size, in [-1, 1], resized to 224x224 (bicubic,
align_corners, blurred first when shrinking, as kornia's antialias), then normalised with CLIP's statistics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.encoders.modules import Transformer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionArch:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    output_dim: int  # the embedding's size
    quick_gelu: bool  # OpenAI's models: x * sigmoid(1.702 x); OpenCLIP's: exact GELU


VISION_ARCHS = {
    "ViT-L/14": VisionArch(224, 14, 1024, 24, 16, 768, quick_gelu=True),  # OpenAI's name (ClipImageEmbedder)
    "ViT-H-14": VisionArch(224, 14, 1280, 32, 16, 1024, quick_gelu=False),  # OpenCLIP's (FrozenOpenCLIPImageEmbedder)
}
# The text tower of each model, whose tensors the original checkpoints carry beside the image tower.
TEXT_TOWER_PREFIXES = ("model.transformer.", "model.token_embedding.", "model.positional_embedding",
                       "model.ln_final.", "model.text_projection", "model.logit_scale")


def vision_arch(name_or_params) -> VisionArch:
    """A known architecture by name, or one given as a mapping of VisionArch's fields (small test models)."""
    if isinstance(name_or_params, str):
        if name_or_params not in VISION_ARCHS:
            raise ValueError(f"unknown CLIP image encoder {name_or_params!r}: use one of {', '.join(VISION_ARCHS)}")
        return VISION_ARCHS[name_or_params]
    return VisionArch(**dict(name_or_params))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class VisionTransformer(nn.Module):
    """CLIP's image tower with the original parameter names (OpenAI's and OpenCLIP's are the same):
    pixels [B, 3, S, S] (normalised) -> embedding [B, output_dim], the class token's output projected."""

    def __init__(self, arch: VisionArch):
        super().__init__()
        if arch.image_size % arch.patch_size:
            raise ValueError(f"image_size {arch.image_size} is not a multiple of patch_size {arch.patch_size}")
        self.arch = arch
        grid = arch.image_size // arch.patch_size
        scale = arch.width ** -0.5
        self.conv1 = nn.Conv2d(3, arch.width, kernel_size=arch.patch_size, stride=arch.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(arch.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, arch.width))
        self.ln_pre = nn.LayerNorm(arch.width)
        self.transformer = Transformer(arch.width, arch.layers, arch.heads, causal=False)
        if arch.quick_gelu:
            for block in self.transformer.resblocks:
                block.mlp.gelu = QuickGELU()
        self.ln_post = nn.LayerNorm(arch.width)
        self.proj = nn.Parameter(scale * torch.randn(arch.width, arch.output_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [B, grid², width]
        class_token = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([class_token, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class CLIPImageTower(nn.Module):
    """Holds the image tower as `visual`, so that its keys read `model.visual.*` as in the checkpoints."""

    def __init__(self, arch: VisionArch):
        super().__init__()
        self.visual = VisionTransformer(arch)


def resize_antialiased(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """kornia.geometry.resize(images, size, interpolation="bicubic", align_corners=True, antialias=True), which
    the originals use: when shrinking, a Gaussian blur first (sigma (factor - 1) / 2 per axis, a kernel of
    about 4 sigma made odd, reflected borders), then bicubic interpolation with aligned corners."""
    height, width = images.shape[-2:]
    if (height, width) == tuple(size):
        return images
    factors = (height / size[0], width / size[1])
    if max(factors) > 1:
        sigmas = [max((factor - 1.0) / 2.0, 0.001) for factor in factors]
        sizes = [int(max(4.0 * sigma, 3)) | 1 for sigma in sigmas]  # odd
        images = _gaussian_blur(images, sizes, sigmas)
    return F.interpolate(images, size=tuple(size), mode="bicubic", align_corners=True)


def _gaussian_blur(images: torch.Tensor, sizes: list[int], sigmas: list[float]) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders, rows then columns (kornia's gaussian_blur2d)."""
    channels = images.shape[1]
    for axis, (size, sigma) in enumerate(zip(sizes, sigmas)):  # axis 0: along the height
        offsets = torch.arange(size, dtype=images.dtype, device=images.device) - size // 2
        kernel = torch.exp(-offsets.pow(2) / (2 * sigma ** 2))
        kernel = (kernel / kernel.sum()).expand(channels, 1, size)
        before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
        if axis == 0:
            padded = F.pad(images, (0, 0, before, after), mode="reflect")
            images = F.conv2d(padded, kernel[..., None], groups=channels)
        else:
            padded = F.pad(images, (before, after, 0, 0), mode="reflect")
            images = F.conv2d(padded, kernel[:, :, None, :], groups=channels)
    return images


class CLIPImageEmbedder(nn.Module):
    """Pictures [B, 3, H, W] in [-1, 1], any size -> CLIP image embeddings [B, output_dim] in float32."""

    def __init__(self, arch: VisionArch, antialias: bool = True, ucg_rate: float = 0.0):
        super().__init__()
        self.model = CLIPImageTower(arch)
        self.antialias = antialias
        self.ucg_rate = ucg_rate  # training: the share of embeddings dropped to zero
        self.register_buffer("mean", torch.tensor(CLIP_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD), persistent=False)

    @property
    def embedding_dim(self) -> int:
        return self.model.visual.arch.output_dim

    def unused_checkpoint_keys(self) -> tuple[str, ...]:
        return TEXT_TOWER_PREFIXES

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.model.visual.arch.image_size,) * 2
        images = images.float()
        if self.antialias:
            images = resize_antialiased(images, size)
        else:
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=True)
        images = (images + 1.0) / 2.0
        return (images - self.mean.float()[:, None, None]) / self.std.float()[:, None, None]

    def forward(self, images: torch.Tensor, no_dropout: bool = False) -> torch.Tensor:
        embedding = self.model.visual(self.preprocess(images)).float()
        if self.training and self.ucg_rate > 0.0 and not no_dropout:
            keep = torch.bernoulli(torch.full((embedding.shape[0], 1), 1.0 - self.ucg_rate, device=embedding.device))
            embedding = keep * embedding
        return embedding

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)


class ClipImageEmbedder(CLIPImageEmbedder):
    """unCLIP-L's image encoder: OpenAI CLIP ViT-L/14 (`model`: "ViT-L/14", or an architecture mapping)."""

    def __init__(self, model="ViT-L/14", jit: bool = False, device=None, antialias: bool = True,
                 ucg_rate: float = 0.0):
        # jit and device are accepted as the original's configs may carry them: nothing is loaded or moved here.
        super().__init__(vision_arch(model), antialias, ucg_rate)


class FrozenOpenCLIPImageEmbedder(CLIPImageEmbedder):
    """unCLIP-H's image encoder: OpenCLIP ViT-H/14 (`arch`: "ViT-H-14", or an architecture mapping); the
    pooled output (the projected class token), the only layer the original offers."""

    def __init__(self, arch="ViT-H-14", version: str = "laion2b_s32b_b79k", device=None, max_length: int = 77,
                 freeze: bool = True, layer: str = "pooled", antialias: bool = True, ucg_rate: float = 0.0):
        # version (pretrained weights' tag), device, max_length: accepted as the original's; the weights come
        # from the checkpoint.
        if layer != "pooled":
            raise ValueError(f"layer {layer!r} is not supported: the OpenCLIP image embedder gives the pooled output")
        super().__init__(vision_arch(arch), antialias, ucg_rate)
        if freeze:
            self.eval().requires_grad_(False)
