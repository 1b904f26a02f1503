"""Text encoders: prompt strings -> the context tensors the UNet cross-attends to.

The class names and constructor arguments are those of the original ``ldm.modules.encoders.modules``,
so that the original YAML configs instantiate these classes unchanged, and the parameter names are
those of the original checkpoints, so that their weights load strictly:

- ``FrozenCLIPEmbedder``: SD 1.x, OpenAI CLIP ViT-L/14 text tower (transformers' ``CLIPTextModel``).
- ``FrozenOpenCLIPEmbedder``: SD 2.x, OpenCLIP ViT-H/14 text tower, implemented here.
- ``BPETextTransformer``: a small trainable encoder for this project's own small model.

Nothing here downloads: the ``version`` arguments naming hub weights are accepted and ignored, since
the weights always come from the Stable Diffusion checkpoint that the loader reads. Nor does anything
here move to the ``device`` argument: the loader places the whole model.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.modules.encoders.tokenizer import (
    CONTEXT_LENGTH,
    END_TOKEN,
    SD1_PAD_TOKEN,
    SD2_PAD_TOKEN,
    START_TOKEN,
    VOCAB_SIZE,
    get_tokenizer,
)


class TextEncoder(nn.Module):
    """What the text encoders share: prompts -> padded CLIP token ids on the encoder's device.

    Subclasses set ``pad_token`` and implement ``forward(text: list[str]) -> [B, max_length, width]``.
    After each call, ``last_token_counts`` holds each prompt's untruncated token count (start and end
    tokens included), so that callers can warn when a prompt was longer than ``max_length``.
    """

    pad_token: int

    def __init__(self, max_length: int):
        super().__init__()
        if not 2 <= max_length <= CONTEXT_LENGTH:
            raise ValueError(f"max_length must be in [2, {CONTEXT_LENGTH}], got {max_length}")
        self.max_length = max_length
        self.last_token_counts: list[int] = []
        self.clip_skip = 1

    def tokenize(self, text: list[str] | str) -> torch.LongTensor:
        tokens, self.last_token_counts = get_tokenizer().tokenize(text, self.pad_token, self.max_length)
        # The token embedding is the first parameter of every encoder here: the ids go where it is.
        return tokens.to(next(self.parameters()).device)

    def encode(self, text: list[str] | str) -> torch.Tensor:
        return self(text)

    def forward(self, text: list[str] | str) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(text))

    def encode_tokens(self, tokens: torch.LongTensor, fixes: list | None = None) -> torch.Tensor:
        """Conditioning [n, length, width] of token ids [n, length] (``length`` at most ``max_length``).

        ``fixes``: per row, a list of ``prompt_encoding.EmbeddingFix``: the embedding's ``vectors``
        [k, width] replace the token embeddings at ``offset .. offset + k - 1`` before the transformer
        (textual inversion, as A1111's EmbeddingsWithFixes).
        """
        tokens = tokens.to(self.token_embedding_module().weight.device)
        if not fixes or not any(fixes):
            return self.encode_token_ids(tokens)
        handle = self.token_embedding_module().register_forward_hook(_embedding_fixes_hook(fixes))
        try:
            return self.encode_token_ids(tokens)
        finally:
            handle.remove()

    def encode_token_ids(self, tokens: torch.LongTensor) -> torch.Tensor:
        raise NotImplementedError

    def token_embedding_module(self) -> nn.Embedding:
        raise NotImplementedError

    def set_clip_skip(self, clip_skip: int) -> None:
        """A1111's clip skip: 1 = the last layer's output, N = the output N - 1 layers before it."""
        if not 1 <= clip_skip <= self.n_layers():
            raise ValueError(f"clip skip must be in 1..{self.n_layers()} for this text encoder, got {clip_skip}")
        self.clip_skip = clip_skip

    def n_layers(self) -> int:
        raise NotImplementedError

    def freeze(self) -> None:
        self.eval()
        for param in self.parameters():
            param.requires_grad = False


def _embedding_fixes_hook(fixes: list):
    """A forward hook for a token embedding: each row's textual-inversion vectors put in place."""

    def hook(_module, _inputs, embedded: torch.Tensor) -> torch.Tensor:
        rows = []
        for row, row_fixes in zip(embedded, fixes):
            for fix in row_fixes:
                vectors = fix.embedding.vectors.to(row)
                length = min(vectors.shape[0], row.shape[0] - fix.offset)  # A1111's cut at the chunk's end
                row = torch.cat([row[: fix.offset], vectors[:length], row[fix.offset + length :]])
            rows.append(row)
        return torch.stack(rows)

    return hook


# ----------------------------------------------------------------------------------------------
# SD 1.x: OpenAI CLIP ViT-L/14 text tower, through transformers
# ----------------------------------------------------------------------------------------------

VIT_L_14_TEXT_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=CONTEXT_LENGTH,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=START_TOKEN,
    eos_token_id=END_TOKEN,  # the pooled output is taken at the first end token
    pad_token_id=1,  # as in OpenAI's config; unused by the model
)

# Released SD 1.x checkpoints were saved by a transformers that stored this buffer; it is computed
# now (and its stored values are corrupted in some files), so it is dropped on load.
LEGACY_POSITION_IDS_KEY = "transformer.text_model.embeddings.position_ids"


class CLIPTextModelHolder(nn.Module):
    """Holds a flat ``CLIPTextModel`` as ``text_model``, so that state-dict keys read
    ``text_model.<...>`` as in the SD 1.x checkpoints (transformers >= 5.6 dropped that level)."""

    def __init__(self, text_model: CLIPTextModel):
        super().__init__()
        self.text_model = text_model

    def forward(self, **kwargs):
        return self.text_model(**kwargs)


def build_clip_text_model(config: CLIPTextConfig) -> nn.Module:
    """A ``CLIPTextModel`` whose state-dict keys are ``text_model.<...>`` on every transformers version."""
    model = CLIPTextModel(config)
    if hasattr(model, "text_model"):  # transformers < 5.6 nests the tower itself
        return model
    return CLIPTextModelHolder(model)


class FrozenCLIPEmbedder(TextEncoder):
    """SD 1.x text encoder. ``layer``: "last" (final hidden states after the final layer norm),
    "pooled" (the end token's state, [B, 1, 768]) or "hidden" (``hidden_states[layer_idx]``, no final
    layer norm, as the original does; ``hidden_states[0]`` is the embedding output)."""

    LAYERS = ("last", "pooled", "hidden")
    pad_token = SD1_PAD_TOKEN

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",  # hub name; ignored, weights come from the checkpoint
        device: str = "cuda",  # ignored: the loader places the model
        max_length: int = CONTEXT_LENGTH,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
    ):
        super().__init__(max_length)
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        n_layers = VIT_L_14_TEXT_CONFIG["num_hidden_layers"]
        if layer == "hidden" and (layer_idx is None or not 0 <= abs(layer_idx) <= n_layers):
            raise ValueError(f'layer="hidden" needs a layer_idx with |layer_idx| <= {n_layers}, got {layer_idx}')
        self.layer = layer
        self.layer_idx = layer_idx
        self.transformer = build_clip_text_model(CLIPTextConfig(**VIT_L_14_TEXT_CONFIG))
        if freeze:
            self.freeze()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + LEGACY_POSITION_IDS_KEY, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def token_embedding_module(self) -> nn.Embedding:
        return self.transformer.get_submodule("text_model.embeddings.token_embedding")

    def n_layers(self) -> int:
        return len(self.transformer.get_submodule("text_model.encoder.layers"))

    def encode_token_ids(self, tokens: torch.LongTensor) -> torch.Tensor:
        """With a clip skip N > 1 (and layer "last"), A1111's: ``hidden_states[-N]`` then the final
        layer norm."""
        # Explicit positions rather than the model's non-persistent position_ids buffer, which is not
        # in the checkpoint and so stays uninitialised when the model is built on the meta device.
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        skipping = self.layer == "last" and self.clip_skip > 1
        outputs = self.transformer(
            input_ids=tokens, position_ids=positions, output_hidden_states=self.layer == "hidden" or skipping
        )
        if skipping:
            final_layer_norm = self.transformer.get_submodule("text_model.final_layer_norm")
            return final_layer_norm(outputs.hidden_states[-self.clip_skip])
        if self.layer == "last":
            return outputs.last_hidden_state
        if self.layer == "pooled":
            return outputs.pooler_output[:, None, :]
        return outputs.hidden_states[self.layer_idx]


# ----------------------------------------------------------------------------------------------
# A pre-LayerNorm transformer with OpenCLIP's parameter names (SD 2.x and our own small encoder)
# ----------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention whose parameters are named as ``nn.MultiheadAttention``'s (packed
    q/k/v ``in_proj_*``, then ``out_proj``), which is what OpenCLIP checkpoints store."""

    def __init__(self, width: int, n_heads: int):
        super().__init__()
        if width % n_heads:
            raise ValueError(f"width {width} is not a multiple of n_heads {n_heads}")
        self.n_heads = n_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, self.n_heads, width // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, n_heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width))
        )

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual blocks, batch-first: [B, L, width] -> [B, L, width]."""

    def __init__(self, width: int, n_layers: int, n_heads: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, n_heads) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, n_blocks: int | None = None) -> torch.Tensor:
        """Runs the first ``n_blocks`` blocks (all by default)."""
        for block in self.resblocks[:n_blocks]:
            x = block(x, self.causal)
        return x


# ----------------------------------------------------------------------------------------------
# SD 2.x: OpenCLIP ViT-H/14 text tower
# ----------------------------------------------------------------------------------------------

# OpenCLIP text towers by architecture name: (width, layers, heads). The joint embedding dimension
# (text_projection's output) equals the width for these three.
OPEN_CLIP_TEXT_ARCHS = {
    "ViT-L-14": (768, 12, 12),
    "ViT-H-14": (1024, 24, 16),
    "ViT-bigG-14": (1280, 32, 20),
}


class OpenCLIPTextTower(nn.Module):
    """The text half of an OpenCLIP model, with OpenCLIP's parameter names (and no visual tower).

    ``text_projection`` and ``logit_scale`` serve CLIP's image-text matching (``with_projection``);
    ``n_layers`` may be fewer than the architecture's, for a user that never runs the last blocks.
    """

    def __init__(self, width: int, n_layers: int, n_heads: int, with_projection: bool = True):
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB_SIZE, width)
        self.positional_embedding = nn.Parameter(torch.empty(CONTEXT_LENGTH, width))
        self.transformer = Transformer(width, n_layers, n_heads, causal=True)
        self.ln_final = nn.LayerNorm(width)
        # OpenCLIP's initialisation, for a model that is not loaded from a checkpoint.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if with_projection:
            self.text_projection = nn.Parameter(torch.empty(width, width))
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward(self, tokens: torch.LongTensor, n_blocks: int | None = None) -> torch.Tensor:
        """Per-token features after the first ``n_blocks`` blocks and the final layer norm."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        return self.ln_final(self.transformer(x, n_blocks))


class FrozenOpenCLIPEmbedder(TextEncoder):
    """SD 2.x text encoder. ``layer``: "last" (all blocks) or "penultimate" (all but the last block,
    what every SD 2.x config uses); the final layer norm is applied in both cases.

    Only what Stable Diffusion runs is built: with "penultimate" the last block is not, nor ever the
    image-text matching head (``text_projection``, ``logit_scale``). diffusers' SD 2.x text encoder
    holds exactly these weights (23 layers, no projection), so its folders load with nothing missing;
    an original checkpoint's tensors for the parts not built are left unread
    (``unused_checkpoint_keys``), never loaded into a part that would not run.
    """

    LAYERS = ("last", "penultimate")
    pad_token = SD2_PAD_TOKEN

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",  # pretrained-weights tag; ignored, weights come from the checkpoint
        device: str = "cuda",  # ignored: the loader places the model
        max_length: int = CONTEXT_LENGTH,
        freeze: bool = True,
        layer: str = "last",
    ):
        super().__init__(max_length)
        if arch not in OPEN_CLIP_TEXT_ARCHS:
            raise ValueError(f"unknown OpenCLIP arch {arch!r}; known: {sorted(OPEN_CLIP_TEXT_ARCHS)}")
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        width, n_layers, n_heads = OPEN_CLIP_TEXT_ARCHS[arch]
        self.layer = layer
        self.n_blocks = n_layers if layer == "last" else n_layers - 1
        self.arch_layers = n_layers
        self.model = OpenCLIPTextTower(width, self.n_blocks, n_heads, with_projection=False)
        if freeze:
            self.freeze()

    def unused_checkpoint_keys(self) -> tuple[str, ...]:
        """Key prefixes (relative to this module) of the OpenCLIP checkpoint tensors that are not built."""
        unused_blocks = range(self.n_blocks, self.arch_layers)
        return tuple(f"model.transformer.resblocks.{index}." for index in unused_blocks) + (
            "model.text_projection", "model.logit_scale")

    def token_embedding_module(self) -> nn.Embedding:
        return self.model.token_embedding

    def n_layers(self) -> int:
        return self.arch_layers

    def encode_token_ids(self, tokens: torch.LongTensor) -> torch.Tensor:
        # The clip skip is not applied: A1111 leaves SD 2.x at its configured layer whatever the setting
        # (its FrozenOpenCLIPEmbedderWithCustomWords), so an SD 2.x image made there at "Clip skip: 2"
        # is made here the same way.
        return self.model(tokens, self.n_blocks)


# ----------------------------------------------------------------------------------------------
# Our own small, trainable text encoder
# ----------------------------------------------------------------------------------------------


class BPETextTransformer(TextEncoder):
    """A small text encoder trained with our own small model (the role BERTEmbedder had in the
    original LDM), on the CLIP tokenizer so that it reads any prompt.

    The token embedding covers the whole 49408-token vocabulary, so it is kept narrow (``token_dim``)
    and projected up to ``n_embed``: most of the parameters would otherwise be in that one table.
    With ``causal`` (CLIP's mask) a word's output sees only the words before it, so that "red circle"
    binds red to the circle by content alone. Bidirectional attention over the weak positional signal of
    the first shipped model left each colour word's output the same whether it named the object or the
    background (cosine 0.998), and its pictures swapped the two colours 45 % of the time. The positional
    embedding starts at std 0.1 (CLIP: 0.01) so that attention can tell neighbours apart early on; the
    token embedding keeps a unit init: at CLIP's 0.02 the position words stayed indistinguishable (left
    and right gave the same outputs) while the colours were learnt, and position adherence fell to chance.
    Prompts are padded with the end token (as SD 1.x does), so that padding reads as "no more text".
    """

    pad_token = SD1_PAD_TOKEN

    def __init__(
        self,
        n_embed: int = 256,
        n_layer: int = 4,
        n_head: int = 4,
        token_dim: int = 64,
        max_length: int = CONTEXT_LENGTH,
        causal: bool = False,
    ):
        super().__init__(max_length)
        self.token_embedding = nn.Embedding(VOCAB_SIZE, token_dim)
        self.token_projection = nn.Linear(token_dim, n_embed)
        self.positional_embedding = nn.Parameter(torch.randn(max_length, n_embed) * 0.1)
        self.transformer = Transformer(n_embed, n_layer, n_head, causal=causal)
        self.ln_final = nn.LayerNorm(n_embed)

    def token_embedding_module(self) -> nn.Embedding:
        return self.token_embedding

    def n_layers(self) -> int:
        return len(self.transformer.resblocks)

    def encode_token_ids(self, tokens: torch.LongTensor) -> torch.Tensor:
        """A clip skip N leaves out the last N - 1 blocks; the final layer norm is applied in every case."""
        embedded = self.token_projection(self.token_embedding(tokens))
        x = embedded + self.positional_embedding[: tokens.shape[1]]
        return self.ln_final(self.transformer(x, self.n_layers() - (self.clip_skip - 1)))
