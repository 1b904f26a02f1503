"""Text encoders: checkpoint layout, numeric parity with transformers/diffusers, trainability.

The parity tests build the full-size towers with random weights (seeded) and compare, in fp32, with
transformers' CLIPTextModel loaded through diffusers' own conversion of the original checkpoint keys;
diffusers' conversion is known to match the original CompVis / Stability code (as the project's notes on
diffusers as an offline reference record). No hub access.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from conftest import reference_path  # noqa: E402
from helpers import build_random, build_reference_clip, randomise_, relative_error  # noqa: E402
from ldm.modules.encoders.modules import (  # noqa: E402
    LEGACY_POSITION_IDS_KEY,
    BPETextTransformer,
    FrozenCLIPEmbedder,
    FrozenOpenCLIPEmbedder,
    ResidualAttentionBlock,
)
from ldm.modules.encoders.tokenizer import SD1_PAD_TOKEN, SD2_PAD_TOKEN, tokenize  # noqa: E402

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "(masterpiece, best quality), 1girl, a very long prompt " * 8,
]
MAX_RELATIVE_ERROR = 1e-4


def reference_keys(layout: str, prefix: str = "cond_stage_model.") -> dict[str, tuple[list[int], str]]:
    """{key without prefix: (shape, kind)} from tests/data/keys/<layout>.tsv."""
    path = reference_path("keys", f"{layout}.tsv")
    keys = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            key, shape, _dtype, kind = line.rstrip("\n").split("\t")
            if key.startswith(prefix):
                keys[key[len(prefix) :]] = (json.loads(shape), kind)
    return keys


# ----------------------------------------------------------------------------------------------
# Checkpoint layout
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder_class, layout", [(FrozenCLIPEmbedder, "v1"), (FrozenOpenCLIPEmbedder, "v2v")])
def test_state_dict_matches_the_original_checkpoint(encoder_class, layout):
    with torch.device("meta"):
        encoder = encoder_class()
    expected = {k: shape for k, (shape, kind) in reference_keys(layout).items() if kind != "extra(legacy,not-in-model)"}
    ours = {k: list(v.shape) for k, v in encoder.state_dict().items()}
    # SD 2.x's encoder leaves out OpenCLIP's image-text head (and with "penultimate" the last block): unused
    not_built = encoder.unused_checkpoint_keys() if hasattr(encoder, "unused_checkpoint_keys") else ()
    assert ours == {k: shape for k, shape in expected.items() if not k.startswith(not_built)}
    assert all(any(k.startswith(prefix) for k in expected) for prefix in not_built)
    assert not any(p.requires_grad for p in encoder.parameters())  # freeze=True by default


def test_sd1_checkpoint_with_legacy_position_ids_loads_strictly():
    with torch.device("meta"):
        encoder = FrozenCLIPEmbedder()
        checkpoint = dict(encoder.state_dict())
        checkpoint[LEGACY_POSITION_IDS_KEY] = torch.zeros(1, 77, dtype=torch.long)
    assert LEGACY_POSITION_IDS_KEY in reference_keys("v1")
    encoder.load_state_dict(checkpoint, strict=True, assign=True)


@pytest.mark.parametrize(
    "config_name, encoder_class",
    [
        ("compvis-v1-inference.yaml", FrozenCLIPEmbedder),
        ("stability-v2-inference-v.yaml", FrozenOpenCLIPEmbedder),
        ("stability-x4-upscaling.yaml", FrozenOpenCLIPEmbedder),
    ],
)
def test_original_yaml_cond_stage_config_instantiates_ours(config_name, encoder_class):
    import importlib

    from omegaconf import OmegaConf

    cond_stage = OmegaConf.load(reference_path("original-configs", config_name)).model.params.cond_stage_config
    module_name, class_name = cond_stage.target.rsplit(".", 1)
    with torch.device("meta"):
        encoder = getattr(importlib.import_module(module_name), class_name)(**cond_stage.get("params", {}))
    assert type(encoder) is encoder_class
    if encoder_class is FrozenOpenCLIPEmbedder:
        assert encoder.n_blocks == 23  # every SD 2.x config asks for the penultimate layer


def test_original_layer_options():
    with torch.device("meta"):
        assert FrozenOpenCLIPEmbedder(layer="penultimate").n_blocks == 23
        assert FrozenOpenCLIPEmbedder(arch="ViT-bigG-14").n_blocks == 32
        with pytest.raises(ValueError):
            FrozenCLIPEmbedder(layer="hidden")  # needs layer_idx
        with pytest.raises(ValueError):
            FrozenOpenCLIPEmbedder(layer="hidden")


# ----------------------------------------------------------------------------------------------
# Numeric parity, full size, random weights
# ----------------------------------------------------------------------------------------------


def test_sd1_clip_matches_transformers_via_diffusers_conversion():
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    torch.manual_seed(0)
    ours = build_random(FrozenCLIPEmbedder, seed=1).eval()
    checkpoint = {"cond_stage_model." + k: v for k, v in ours.state_dict().items()}
    reference = build_reference_clip(
        convert_ldm_clip_checkpoint(checkpoint),
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
        projection_dim=768,
    )
    tokens, lengths = tokenize(PROMPTS, SD1_PAD_TOKEN)
    with torch.no_grad():
        expected = reference(input_ids=tokens, output_hidden_states=True)

        assert relative_error(ours(PROMPTS), expected.last_hidden_state) < MAX_RELATIVE_ERROR
        assert ours.last_token_counts == lengths and lengths[2] > 77

        ours.layer, ours.layer_idx = "hidden", -2  # CLIP skip 2
        assert relative_error(ours(PROMPTS), expected.hidden_states[-2]) < MAX_RELATIVE_ERROR

        ours.layer = "pooled"
        assert relative_error(ours(PROMPTS), expected.pooler_output[:, None]) < MAX_RELATIVE_ERROR


def test_sd2_open_clip_penultimate_matches_23_layer_transformers_clip():
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    torch.manual_seed(0)
    ours = build_random(FrozenOpenCLIPEmbedder, seed=2, layer="penultimate").eval()
    checkpoint = {"cond_stage_model." + k: v for k, v in ours.state_dict().items()}

    class ConfigOnly:  # convert_open_clip_checkpoint reads only text_model.config.hidden_size
        class config:
            hidden_size = 1024

    converted = convert_open_clip_checkpoint(ConfigOnly, checkpoint)
    # diffusers leaves text_projection out for SD 2.x (the 23-layer text model has no projection).
    converted.pop("text_projection.weight", None)
    reference = build_reference_clip(
        converted,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        hidden_act="gelu",
    )
    tokens, lengths = tokenize(PROMPTS, SD2_PAD_TOKEN)
    with torch.no_grad():
        expected = reference(input_ids=tokens).last_hidden_state
        assert relative_error(ours(PROMPTS), expected) < MAX_RELATIVE_ERROR
    assert ours.last_token_counts == lengths


@pytest.mark.parametrize("causal", [True, False])
def test_residual_block_attention_is_nn_multihead_attention(causal):
    """Our packed-q/k/v attention reads OpenCLIP's nn.MultiheadAttention weights the same way."""
    torch.manual_seed(0)
    width, heads, length = 64, 4, 9
    block = ResidualAttentionBlock(width, heads)
    randomise_(block, seed=3)
    reference = nn.MultiheadAttention(width, heads, batch_first=True)
    reference.load_state_dict(block.attn.state_dict())
    x = torch.randn(2, length, width)
    mask = torch.triu(torch.full((length, length), float("-inf")), diagonal=1) if causal else None
    with torch.no_grad():
        expected = reference(x, x, x, attn_mask=mask, need_weights=False)[0]
        assert relative_error(block.attn(x, causal), expected) < 1e-5


# ----------------------------------------------------------------------------------------------
# Our own trainable encoder
# ----------------------------------------------------------------------------------------------


def test_bpe_text_transformer_shape_and_gradients():
    torch.manual_seed(0)
    encoder = BPETextTransformer(n_embed=64, n_layer=2, n_head=4, token_dim=16)
    prompts = ["a red cube", "two blue spheres on a table"]
    context = encoder.encode(prompts)
    assert context.shape == (2, 77, 64)
    assert encoder.last_token_counts == tokenize(prompts, SD1_PAD_TOKEN)[1]

    context.pow(2).mean().backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_bpe_text_transformer_default_size_stays_small():
    encoder = BPETextTransformer()
    assert encoder(["a cat"]).shape == (1, 77, 256)
    assert sum(p.numel() for p in encoder.parameters()) < 8_000_000


def test_bpe_text_transformer_reads_each_word_in_its_context():
    """With causal=True, as CLIP: a word's output depends on the words before it and on none after it, so that
    "red circle ... blue background" and "blue circle ... red background" give the colour words
    different outputs (the bag-of-words failure that swapped object and background colours)."""
    torch.manual_seed(0)
    encoder = BPETextTransformer(n_embed=64, n_layer=2, n_head=4, token_dim=16, max_length=16, causal=True)
    with torch.no_grad():
        red_first, blue_first, red_first_other_end = encoder.encode([
            "a red circle on a blue background",
            "a blue circle on a red background",
            "a red circle on a green background",
        ])
    # Tokens: <start> a red circle on a blue background <end> ...; the colours sit at 2 and 6.
    assert tokenize(["a red circle on a blue background"], SD1_PAD_TOKEN, 16)[1] == [9]
    # Up to the first differing word, the outputs agree exactly; after it, they differ.
    assert torch.equal(red_first[:6], red_first_other_end[:6])
    assert not torch.allclose(red_first[6:], red_first_other_end[6:])
    # The same colour word reads differently as the object's colour and as the background's.
    cosine = torch.nn.functional.cosine_similarity(red_first[2], blue_first[6], dim=0)
    assert cosine < 0.95
