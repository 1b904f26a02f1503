"""SDXL's conditioner: two text encoders and the size, crop and aesthetic-score embeddings.

The layout is that of Stability's generative-models (``sgm.modules.GeneralConditioner``), so that the
single-file SDXL checkpoints load strictly: ``conditioner.embedders.N.*``, one embedder per entry of
``emb_models`` in the config, each reading one input by its ``input_key``:

- ``txt`` through CLIP ViT-L (our ``FrozenCLIPEmbedder`` with ``layer: hidden``, ``layer_idx: 11``: the
  penultimate layer's hidden states, no final layer norm) and OpenCLIP ViT-bigG (``FrozenOpenCLIPEmbedder2``
  below: its penultimate hidden states, and the pooled output, the end token's final features through
  ``text_projection``). Their hidden states are concatenated along the width (768 + 1280 = 2048) for
  cross-attention; the pooled output opens the UNet's vector condition ``y``.
- ``original_size_as_tuple``, ``crop_coords_top_left``, ``target_size_as_tuple`` (base) or
  ``aesthetic_score`` (refiner): numbers, each turned into a 256-wide sinusoidal embedding
  (``ConcatTimestepEmbedderND``) and concatenated after the pooled output: 1280 + 3 * 2 * 256 = 2816 for the
  base, 1280 + 5 * 256 = 2560 for the refiner.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.modules import OPEN_CLIP_TEXT_ARCHS, OpenCLIPTextTower, TextEncoder
from ldm.modules.encoders.tokenizer import CONTEXT_LENGTH, SD2_PAD_TOKEN
from ldm.util import instantiate_from_config

TEXT_KEY = "txt"


class FrozenOpenCLIPEmbedder2(TextEncoder):
    """SDXL's OpenCLIP text encoder (sgm's ``FrozenOpenCLIPEmbedder2`` with ``legacy: false``).

    ``encode_token_ids`` gives the hidden states after the penultimate block ("penultimate") or the last one
    ("last"), with no final layer norm; after each call ``last_pooled`` [B, width] holds the pooled output:
    the last block's output, final layer norm, at each row's end token (the highest id, as OpenCLIP picks it),
    through ``text_projection``. It comes from the same pass, so A1111's habit of pooling the first chunk of
    a long prompt costs nothing extra. ``size``: (width, layers, heads) in place of ``arch``'s, for small
    test models. The pooled output needs every block, so all of them are built; ``logit_scale`` (image-text
    matching) is not, and the checkpoints' copy, which merged files often lack, is left unread.
    """

    LAYERS = ("penultimate", "last")
    pad_token = SD2_PAD_TOKEN

    def __init__(
        self,
        arch: str = "ViT-bigG-14",
        version: str = "laion2b_s39b_b160k",  # pretrained-weights tag; ignored, weights come from the checkpoint
        device: str = "cuda",  # ignored: the loader places the model
        max_length: int = CONTEXT_LENGTH,
        freeze: bool = True,
        layer: str = "penultimate",
        always_return_pooled: bool = True,
        legacy: bool = False,
        size: tuple[int, int, int] | None = None,
    ):
        super().__init__(max_length)
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        if legacy or not always_return_pooled:
            raise ValueError("FrozenOpenCLIPEmbedder2 is SDXL's encoder: legacy must be false and "
                             "always_return_pooled true (use FrozenOpenCLIPEmbedder for SD 2.x)")
        if size is None and arch not in OPEN_CLIP_TEXT_ARCHS:
            raise ValueError(f"unknown OpenCLIP arch {arch!r}; known: {sorted(OPEN_CLIP_TEXT_ARCHS)}")
        width, n_layers, n_heads = size or OPEN_CLIP_TEXT_ARCHS[arch]
        self.layer = layer
        self.model = OpenCLIPTextTower(width, n_layers, n_heads)
        del self.model.logit_scale
        self.last_pooled: torch.Tensor | None = None
        if freeze:
            self.freeze()

    def token_embedding_module(self) -> nn.Embedding:
        return self.model.token_embedding

    def n_layers(self) -> int:
        return len(self.model.transformer.resblocks)

    def encode_token_ids(self, tokens: torch.LongTensor) -> torch.Tensor:
        # The clip skip is not applied, as A1111 leaves SDXL's encoders at their configured layers.
        tower = self.model
        x = tower.token_embedding(tokens) + tower.positional_embedding[: tokens.shape[1]]
        penultimate = tower.transformer(x, self.n_layers() - 1)
        last = tower.transformer.resblocks[-1](penultimate, tower.transformer.causal)
        end_tokens = tower.ln_final(last[torch.arange(tokens.shape[0], device=tokens.device), tokens.argmax(dim=-1)])
        self.last_pooled = end_tokens @ tower.text_projection
        return penultimate if self.layer == "penultimate" else last


class ConcatTimestepEmbedderND(nn.Module):
    """[B, n] numbers -> [B, n * outdim]: each number's sinusoidal embedding (cos half first), concatenated."""

    def __init__(self, outdim: int):
        super().__init__()
        self.outdim = outdim

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        values = values if values.ndim == 2 else values[:, None]
        embedded = timestep_embedding(values.reshape(-1), self.outdim)
        return embedded.reshape(values.shape[0], values.shape[1] * self.outdim)


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning, in pixels: (height, width) of the picture the model is told it was made
    from, the crop's (top, left) in it, the size it is asked for; the refiner's aesthetic scores (A1111's
    defaults: 6 for prompts, 2.5 for negative prompts)."""
    original_size: tuple[int, int]
    target_size: tuple[int, int]
    crop_coords: tuple[int, int] = (0, 0)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    def values(self, negative: bool) -> dict[str, list[float]]:
        """The numbers each input key of the conditioner reads, for a prompt or a negative prompt."""
        return {
            "original_size_as_tuple": list(self.original_size),
            "crop_coords_top_left": list(self.crop_coords),
            "target_size_as_tuple": list(self.target_size),
            "aesthetic_score": [self.negative_aesthetic_score if negative else self.aesthetic_score],
        }


class SDXLConditioner(nn.Module):
    """sgm's GeneralConditioner for inference: ``embedders`` built from ``emb_models`` (each a config with an
    ``input_key``), none trainable, no conditioning dropout."""

    def __init__(self, emb_models: list):
        super().__init__()
        embedders, self.input_keys = [], []
        for index, config in enumerate(emb_models):
            if config.get("is_trainable", False) or config.get("ucg_rate", 0.0):
                raise ValueError(f"embedder {index}: trainable embedders and conditioning dropout are for "
                                 "training, which SDXL does not support here; set is_trainable: false")
            if "input_key" not in config:
                raise ValueError(f"embedder {index} needs an input_key (txt, original_size_as_tuple, ...)")
            embedders.append(instantiate_from_config(config))
            self.input_keys.append(config["input_key"])
        self.embedders = nn.ModuleList(embedders)
        if not self.text_encoders:
            raise ValueError("an SDXL conditioner needs at least one text encoder (input_key: txt)")
        self.clip_skip = 1

    @property
    def text_encoders(self) -> list[TextEncoder]:
        """The encoders of the prompt, in order: their hidden states are concatenated along the width."""
        return [embedder for embedder, key in zip(self.embedders, self.input_keys) if key == TEXT_KEY]

    def set_clip_skip(self, clip_skip: int) -> None:
        """Accepted and left without effect, as A1111 does for SDXL (its encoders' layers are fixed)."""
        self.clip_skip = clip_skip

    def vector(self, pooled: torch.Tensor, values: dict[str, list[float]]) -> torch.Tensor:
        """The UNet's vector condition y [B, adm_in_channels]: the pooled text output [B, width], then each
        numeric input's embedding (``values``: the numbers per input key, the same for every row)."""
        parts = []
        for embedder, key in zip(self.embedders, self.input_keys):
            if key == TEXT_KEY:
                if isinstance(embedder, FrozenOpenCLIPEmbedder2):
                    parts.append(pooled)
                continue
            if key not in values:
                raise ValueError(f"the SDXL conditioner needs a value for {key!r}")
            numbers = torch.tensor(values[key], dtype=torch.float32, device=pooled.device)
            parts.append(embedder(numbers.expand(pooled.shape[0], -1)).to(pooled.dtype))
        return torch.cat(parts, dim=1)

    def textual_inversion_keys(self) -> list[str]:
        """Which vectors of an SDXL embedding each text encoder takes (A1111's textual_inversion_key):
        "clip_g" for OpenCLIP ViT-bigG, "clip_l" for the other (CLIP ViT-L)."""
        return ["clip_g" if isinstance(encoder, FrozenOpenCLIPEmbedder2) else "clip_l" for encoder in self.text_encoders]

    def pooled_encoder(self) -> FrozenOpenCLIPEmbedder2:
        return next(encoder for encoder in self.text_encoders if isinstance(encoder, FrozenOpenCLIPEmbedder2))

    def forward(self, texts: list[str], values: dict[str, list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-attention context [B, 77, width sum], vector y) of prompts of at most 75 tokens, as sgm encodes
        them (each encoder tokenizes with its own padding)."""
        hidden = [encoder(texts) for encoder in self.text_encoders]
        return torch.cat(hidden, dim=-1), self.vector(self.pooled_encoder().last_pooled, values)
