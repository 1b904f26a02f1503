"""The UNet's vector condition (unCLIP, SDXL), per-level transformer depths (SDXL) and ControlNet residuals."""
import pytest
import torch

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import UNetModel


def small_unet(**overrides):
    params = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1, attention_resolutions=[2, 4],
                  channel_mult=[1, 2, 2], num_head_channels=8, legacy=False, context_dim=16,
                  use_linear_in_transformer=True)
    params.update(overrides)
    torch.manual_seed(0)
    unet = UNetModel(**params).eval()
    with torch.no_grad():  # the zero-initialised output convolutions would hide every difference
        for parameter in unet.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return unet


def test_sequential_vector_condition_has_the_original_keys_and_changes_the_output():
    unet = small_unet(num_classes="sequential", adm_in_channels=12)
    keys = {key for key in unet.state_dict() if key.startswith("label_emb")}
    assert keys == {"label_emb.0.0.weight", "label_emb.0.0.bias", "label_emb.0.2.weight", "label_emb.0.2.bias"}
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 5, 16)
    y = torch.randn(2, 12)
    with torch.no_grad():
        first, second = unet(x, t, context, y=y), unet(x, t, context, y=y * 2)
    assert not torch.allclose(first, second)
    with pytest.raises(ValueError, match="pass y"):
        unet(x, t, context)


def test_per_level_depths_build_that_many_transformer_blocks_and_none_at_depth_zero():
    unet = small_unet(transformer_depth=[0, 2, 3], attention_resolutions=[1, 2, 4])
    depths = [len(layer.transformer_blocks) for block in unet.input_blocks for layer in block
              if isinstance(layer, SpatialTransformer)]
    assert depths == [2, 3]  # level 0 (depth 0) gets none although its resolution has attention
    middle = [layer for layer in unet.middle_block if isinstance(layer, SpatialTransformer)]
    assert len(middle[0].transformer_blocks) == 3  # the middle takes the last level's depth by default
    assert len(small_unet(transformer_depth=[1, 1, 1], transformer_depth_middle=4).middle_block[1].transformer_blocks) == 4
    with pytest.raises(ValueError, match="one depth per level"):
        small_unet(transformer_depth=[1, 2])


def test_control_residuals_add_to_the_middle_output_and_to_each_skip():
    unet = small_unet()
    x, t, context = torch.randn(1, 4, 16, 16), torch.tensor([300]), torch.randn(1, 5, 16)
    with torch.no_grad():
        skips = []
        hooks = [block.register_forward_hook(lambda module, args, out: skips.append(out)) for block in unet.input_blocks]
        plain = unet(x, t, context)
        for hook in hooks:
            hook.remove()
        control = [torch.randn_like(skip) for skip in skips]
        control.append(torch.randn(1, 64, 4, 4))
        # The same sums made another way: hooks that add each residual to the skip's channels at the end of
        # the output block's concatenated input (skips only: the input blocks' own path is left alone).
        def add_to_skip(residual):
            def hook(module, args):
                h, *rest = args
                return (torch.cat([h[:, :-residual.shape[1]], h[:, -residual.shape[1]:] + residual], dim=1), *rest)
            return hook

        hooks = [block.register_forward_pre_hook(add_to_skip(r))
                 for block, r in zip(unet.output_blocks, reversed(control[:-1]))]
        hooks.append(unet.middle_block.register_forward_hook(lambda module, args, out: out + control[-1]))
        hooked = unet(x, t, context)
        for hook in hooks:
            hook.remove()
        controlled = unet(x, t, context, control=list(control))
        zero = unet(x, t, context, control=[torch.zeros_like(r) for r in control])
    torch.testing.assert_close(controlled, hooked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)
    assert not torch.allclose(controlled, plain)
    with pytest.raises(ValueError, match="residuals"):
        unet(x, t, context, control=control[:-1])
