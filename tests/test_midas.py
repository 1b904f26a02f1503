"""MiDaS DPT-Hybrid (ldm/modules/midas): parity with transformers' DPT-Hybrid, input preparation, loading."""
import re

import numpy as np
import pytest
import torch

from ldm.modules.midas.api import MiDaSInference, midas_input_size, midas_state_dict, prepare_midas_input
from ldm.modules.midas.backbone import resize_position_embedding, same_padding


@pytest.fixture(scope="module")
def midas():
    """The full-size network with seeded random weights scaled so that every layer passes signal on."""
    torch.manual_seed(0)
    model = MiDaSInference()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif p.ndim == 1:  # norm scales
                p.normal_(1, 0.1)
            elif name.endswith(("pos_embed", "cls_token")):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, p[0].numel() ** -0.5)
        model.model.scratch.output_conv[4].bias.fill_(1.0)  # keep the final ReLU's output off zero
    return model


# --- parity with transformers' DPTForDepthEstimation (is_hybrid=True, BiT backbone) ---------------------------
def to_transformers_name(name: str) -> str | None:
    """Our (the original's) DPTDepthModel parameter name → transformers' DPTForDepthEstimation name."""
    rules = [
        (r"pretrained\.model\.patch_embed\.backbone\.stem\.conv\.", "dpt.embeddings.backbone.bit.embedder.convolution."),
        (r"pretrained\.model\.patch_embed\.backbone\.stem\.norm\.", "dpt.embeddings.backbone.bit.embedder.norm."),
        (r"pretrained\.model\.patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.",
         r"dpt.embeddings.backbone.bit.encoder.stages.\1.layers.\2."),
        (r"pretrained\.model\.patch_embed\.proj\.", "dpt.embeddings.projection."),
        (r"pretrained\.model\.cls_token", "dpt.embeddings.cls_token"),
        (r"pretrained\.model\.pos_embed", "dpt.embeddings.position_embeddings"),
        (r"pretrained\.model\.blocks\.(\d+)\.norm1\.", r"dpt.encoder.layer.\1.layernorm_before."),
        (r"pretrained\.model\.blocks\.(\d+)\.norm2\.", r"dpt.encoder.layer.\1.layernorm_after."),
        (r"pretrained\.model\.blocks\.(\d+)\.attn\.proj\.", r"dpt.encoder.layer.\1.attention.output.dense."),
        (r"pretrained\.model\.blocks\.(\d+)\.mlp\.fc1\.", r"dpt.encoder.layer.\1.intermediate.dense."),
        (r"pretrained\.model\.blocks\.(\d+)\.mlp\.fc2\.", r"dpt.encoder.layer.\1.output.dense."),
        (r"pretrained\.model\.norm\.", "dpt.layernorm."),
        (r"pretrained\.act_postprocess(\d)\.0\.project\.0\.", lambda m: f"neck.reassemble_stage.readout_projects.{int(m[1]) - 1}.0."),
        (r"pretrained\.act_postprocess(\d)\.3\.", lambda m: f"neck.reassemble_stage.layers.{int(m[1]) - 1}.projection."),
        (r"pretrained\.act_postprocess(\d)\.4\.", lambda m: f"neck.reassemble_stage.layers.{int(m[1]) - 1}.resize."),
        (r"scratch\.layer(\d)_rn\.", lambda m: f"neck.convs.{int(m[1]) - 1}."),
        # transformers fuses from the coarsest: its fusion layer 0 is our refinenet4.
        (r"scratch\.refinenet(\d)\.", lambda m: f"neck.fusion_stage.layers.{4 - int(m[1])}."),
        (r"scratch\.output_conv\.", "head.head."),
    ]
    if name.startswith("pretrained.model.head."):
        return None  # the ImageNet classifier: no counterpart, unused by DPT
    for pattern, replacement in rules:
        name, count = re.subn("^" + pattern, replacement, name)
        if count:
            return (name.replace(".resConfUnit1.", ".residual_layer1.").replace(".resConfUnit2.", ".residual_layer2.")
                    .replace(".conv1.", ".convolution1.").replace(".conv2.", ".convolution2.")
                    .replace(".out_conv.", ".projection.")
                    if name.startswith("neck.fusion_stage") else name)
    raise AssertionError(f"no transformers name for {name}")


def transformers_state_dict(ours: dict) -> dict:
    converted = {}
    for name, tensor in ours.items():
        qkv = re.match(r"pretrained\.model\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", name)
        if qkv:
            for part, chunk in zip(("query", "key", "value"), tensor.chunk(3)):
                converted[f"dpt.encoder.layer.{qkv[1]}.attention.attention.{part}.{qkv[2]}"] = chunk
            continue
        target = to_transformers_name(name)
        if target is not None:
            converted[target] = tensor
    return converted


def test_matches_transformers_dpt_hybrid(midas):
    transformers = pytest.importorskip("transformers")
    config = transformers.DPTConfig(
        is_hybrid=True, layer_norm_eps=1e-6, neck_hidden_sizes=[256, 512, 768, 768],
        reassemble_factors=[1, 1, 1, 0.5], backbone_out_indices=[2, 5, 8, 11], readout_type="project",
    )
    reference = transformers.DPTForDepthEstimation(config).eval()
    converted = transformers_state_dict(midas.model.state_dict())
    reference.load_state_dict(converted, strict=True)
    # Position embeddings are learnt for 384×384; both models resize them, transformers only when told
    # its image size is the input's.
    reference.dpt.embeddings.image_size = (64, 64)

    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = reference(pixel_values=image).predicted_depth
    ours = midas(image)
    assert ours.shape == (2, 1, 64, 64)
    assert expected.std() > 0.01 * expected.abs().mean()  # a real depth map, not a constant
    torch.testing.assert_close(ours[:, 0], expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_any_multiple_of_32_and_not_others(midas):
    image = torch.rand(1, 3, 64, 96) * 2 - 1
    depth = midas(image)
    assert depth.shape == (1, 1, 64, 96)
    assert (depth >= 0).all()  # inverse depth: non-negative by construction
    with pytest.raises(ValueError, match="multiples of 32"):
        midas(torch.zeros(1, 3, 64, 80))


def test_stays_frozen(midas):
    midas.train()
    assert not midas.training and not midas.model.training
    assert not any(p.requires_grad for p in midas.parameters())


# --- pieces ---------------------------------------------------------------------------------------------------
def test_same_padding_puts_the_odd_pixel_last():
    assert same_padding(384, 7, 2) == (2, 3)  # the stem
    assert same_padding(96, 3, 2) == (0, 1)  # strided 3×3 convs and the max pool
    assert same_padding(96, 3, 1) == (1, 1)
    assert same_padding(96, 1, 2) == (0, 0)


def test_position_embedding_resize():
    pos = torch.randn(1, 1 + 24 * 24, 8)
    torch.testing.assert_close(resize_position_embedding(pos, 24, 24), pos, rtol=0, atol=0)
    # A grid whose channels hold the row and the column number: bilinear resizing with half-pixel
    # centres (align_corners=False, as the original) puts new cell i at old coordinate (i + 0.5)·scale - 0.5.
    rows, cols = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    pos[0, 1:, 0], pos[0, 1:, 1] = rows.flatten(), cols.flatten()
    resized = resize_position_embedding(pos, 12, 6)
    assert resized.shape == (1, 1 + 12 * 6, 8)
    torch.testing.assert_close(resized[:, 0], pos[:, 0], rtol=0, atol=0)  # the class token is left alone
    grid = resized[0, 1:].reshape(12, 6, 8)
    torch.testing.assert_close(grid[:, 0, 0], torch.arange(12.0) * 2 + 0.5)
    torch.testing.assert_close(grid[0, :, 1], torch.arange(6.0) * 4 + 1.5)


@pytest.mark.parametrize("size,expected", [
    ((512, 512), (384, 384)),
    ((512, 768), (384, 576)),  # scales 0.75 and 0.5: the one nearer 1 (0.75) is used for both sides
    ((480, 640), (384, 512)),
    ((64, 64), (384, 384)),
    ((100, 1000), (32, 384)),  # scales 3.84 and 0.384: 0.384 is nearer 1; 38.4 rounds to 32
])
def test_midas_input_size(size, expected):
    assert midas_input_size(*size) == expected


def test_prepare_matches_opencv_bicubic():
    cv2 = pytest.importorskip("cv2")
    image = np.random.default_rng(0).uniform(0, 1, (200, 300, 3))
    height, width = midas_input_size(200, 300)
    expected = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC) * 2 - 1
    ours = prepare_midas_input(torch.from_numpy(image * 2 - 1).permute(2, 0, 1)[None])
    assert ours.shape == (1, 3, height, width)
    np.testing.assert_allclose(ours[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_midas_state_dict_accepts_release_files_and_depth_checkpoints():
    tensor = torch.zeros(1)
    release = {"pretrained.model.cls_token": tensor, "scratch.output_conv.0.bias": tensor}
    assert set(midas_state_dict(release)) == set(release)
    assert set(midas_state_dict({"model": release, "optimizer": {}})) == set(release)
    depth_ckpt = {"depth_model.model." + k: v for k, v in release.items()}
    depth_ckpt["model.diffusion_model.out.0.bias"] = tensor
    assert set(midas_state_dict(depth_ckpt)) == set(release)
