"""ControlNet (Zhang et al. 2023): a trainable copy of the UNet's encoder that reads a control image.

Time embedding -> the hint's conv stack (the control image at 8x the latent's size, or `hint_downsample`x
for a model whose autoencoder downsamples otherwise, down to the latent's size and model_channels wide) added to the first input block's output -> the UNet's input blocks and
middle block, copied -> a zero-initialised 1x1 convolution on each input block's output and on the middle
block's output. The 13 (for SD) results are the residuals the UNet's `control=` adds to its skip
connections and to its middle block (ldm.modules.diffusionmodules.openaimodel.UNetModel.forward).

Module and parameter names are those of the original `cldm.cldm.ControlNet` (input_hint_block.N,
zero_convs.N.0, middle_block_out.0, then the UNet's names), so the original files load unchanged; the
original configs' targets resolve here through ldm.util.CONFIG_ALIASES. `ControlLDM` is the original's
LatentDiffusion with a control model, used to load the whole-model ControlNet 1.0 files and to train.
"""
import torch
from torch import nn

from ldm.models.diffusion.ddpm_variants import _ImageConditionedDiffusion
from ldm.modules.attention import same_context_as_before
from ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding, zero_module
from ldm.util import instantiate_from_config

# The hint's conv stack (the original's input_hint_block): widths after each 3x3 convolution, and which
# of them halve the size; a SiLU follows each but the last, a zero-initialised convolution to model_channels.
HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)
HINT_DOWNSAMPLING = 8  # the original's: SD's autoencoder has f=8


def zero_convolution(channels: int) -> nn.Sequential:
    """A 1x1 convolution that starts at zero, so that a fresh ControlNet leaves the UNet unchanged."""
    return nn.Sequential(zero_module(nn.Conv2d(channels, channels, 1)))


def hint_strides(downsampling: int) -> tuple:
    """The stride of each convolution of the hint block for a control image `downsampling` x the latent's size:
    the original's for 8; for 4 (an f=4 autoencoder) its last halving convolution keeps the size (keys unchanged)."""
    halvings = [index for index, stride in enumerate(HINT_STRIDES) if stride == 2]
    kept = {8: 0, 4: 1, 2: 2, 1: 3}.get(downsampling)
    if kept is None:
        raise ValueError(f"hint_downsample must be 1, 2, 4 or 8, not {downsampling}")
    strides = list(HINT_STRIDES)
    for index in halvings[len(halvings) - kept:]:
        strides[index] = 1
    return tuple(strides)


def hint_block(hint_channels: int, model_channels: int, downsampling: int = HINT_DOWNSAMPLING) -> nn.Sequential:
    layers, channels = [], hint_channels
    for width, stride in zip(HINT_WIDTHS, hint_strides(downsampling)):
        layers += [nn.Conv2d(channels, width, 3, padding=1, stride=stride), nn.SiLU()]
        channels = width
    layers.append(zero_module(nn.Conv2d(channels, model_channels, 3, padding=1)))
    return nn.Sequential(*layers)


def output_channels(block: nn.Module) -> int:
    """The width of what an input or middle block gives (its first layer's; a transformer keeps the width)."""
    first = block[0]
    conv = first if isinstance(first, nn.Conv2d) else first.op if isinstance(first, Downsample) else first.out_layers[-1]
    return conv.out_channels


class ControlNet(UNetModel):
    """The UNet's encoder and middle block, built by UNetModel from the original's parameters (its decoder
    half and output layer are dropped), with the hint's conv stack and a zero convolution per residual."""

    def __init__(self, in_channels, model_channels, hint_channels, num_res_blocks, attention_resolutions,
                 global_average_pooling=False, hint_downsample=HINT_DOWNSAMPLING, **unet_params):
        if unet_params.get("num_classes") is not None:
            raise ValueError("ControlNets with class or vector conditioning (SDXL's) are not supported here")
        unet_params.pop("out_channels", None)
        super().__init__(in_channels=in_channels, model_channels=model_channels, out_channels=in_channels,
                         num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions, **unet_params)
        del self.output_blocks, self.out
        self.hint_channels = hint_channels
        # The 1.1 shuffle model: each residual is averaged over the picture (its config says so).
        self.global_average_pooling = global_average_pooling
        # How much larger than the latent the control image is: the base model's autoencoder factor.
        self.hint_downsample = hint_downsample
        self.input_hint_block = hint_block(hint_channels, model_channels, hint_downsample)
        self.zero_convs = nn.ModuleList([zero_convolution(output_channels(block)) for block in self.input_blocks])
        self.middle_block_out = zero_convolution(output_channels(self.middle_block))

    @property
    def residual_count(self) -> int:
        """How many residuals forward returns: one per input block, one for the middle block."""
        return len(self.input_blocks) + 1

    def forward(self, x, hint, timesteps, context):
        """x [B, in_channels, h, w] the noisy latent, hint [B, hint_channels, 8h, 8w] (hint_downsample x) the
        control image in [0, 1], timesteps [B], context [B, tokens, context_dim] -> the residuals, in the UNet's order."""
        factor = self.hint_downsample
        expected = (x.shape[-2] * factor, x.shape[-1] * factor)
        if tuple(hint.shape[-2:]) != expected or hint.shape[1] != self.hint_channels:
            raise ValueError(f"the control image must be [B, {self.hint_channels}, {expected[0]}, {expected[1]}] "
                             f"({factor}x the latent's size), not {list(hint.shape)}")
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        context = same_context_as_before(self, context.to(dtype))
        h = x.to(dtype)
        residuals = []
        for index, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = self._run(block, h, emb, context)
            if index == 0:
                h = h + self._run(self.input_hint_block, hint.to(dtype))
            residuals.append(zero_conv(h))
        h = self._run(self.middle_block, h, emb, context)
        residuals.append(self.middle_block_out(h))
        if self.global_average_pooling:
            residuals = [residual.mean(dim=(2, 3), keepdim=True) for residual in residuals]
        return residuals


class ControlLDM(_ImageConditionedDiffusion):
    """LatentDiffusion whose UNet takes a ControlNet's residuals: the original's `cldm.cldm.ControlLDM`.

    apply_model takes {"c_crossattn": [text], "c_concat": [control images in [0, 1]] or None}; with no
    control image the UNet runs alone. control_scales: one weight per residual (the original's list, kept
    as a list so that callers may set it). Training (train.py with this config) updates the control model
    only, as the original with sd_locked; sd_locked=False also trains the UNet's decoder half and output.
    """

    def __init__(self, control_stage_config, control_key="hint", only_mid_control=False, sd_locked=True, **kwargs):
        super().__init__(**kwargs)
        if self.model.conditioning_key != "crossattn":
            raise ValueError("a ControlLDM needs conditioning_key: crossattn (the control image goes to the "
                             "control model, not into the UNet's input)")
        self.control_model = instantiate_from_config(control_stage_config)
        self.control_key = control_key
        self.only_mid_control = only_mid_control
        self.sd_locked = sd_locked
        self.control_scales = [1.0] * self.control_model.residual_count
        trained = {id(p) for p in self.trainable_parameters()}
        for p in self.model.diffusion_model.parameters():
            p.requires_grad_(id(p) in trained)

    def control_residuals(self, x_noisy, t, hint, context) -> list:
        """The control model's residuals, each times its control scale (the mid-only variant keeps only the last)."""
        residuals = self.control_model(x_noisy, hint, t, context)
        residuals = [residual * scale for residual, scale in zip(residuals, self.control_scales)]
        if self.only_mid_control:
            residuals = [torch.zeros_like(residual) for residual in residuals[:-1]] + residuals[-1:]
        return residuals

    def apply_model(self, x_noisy, t, cond):
        if not isinstance(cond, dict):
            cond = {"c_crossattn": cond if isinstance(cond, list) else [cond]}
        context = torch.cat(list(cond["c_crossattn"]), dim=1)
        hint = cond.get("c_concat")
        control = None if hint is None else self.control_residuals(x_noisy, t, torch.cat(list(hint), dim=1), context)
        return self.model.diffusion_model(x_noisy, t, context=context, control=control)

    def image_conditioning(self, batch, latent):
        """The batch's control images (HWC in [0, 1], as the original's datasets give them)."""
        return {"c_concat": [self.get_input(batch, self.control_key).to(latent.device)]}

    def load_base_model(self, state_dict: dict) -> None:
        """Start from a trained latent-diffusion model (its checkpoint's weights, no control_model.* in them):
        the base loaded strictly, then the control model's encoder copied from the UNet's, as the paper's
        trainable copy (the hint block and the zero convolutions keep their fresh weights, so that the
        controlled model starts out as the base model). ValueError naming the keys that do not fit."""
        control_prefix = "control_model."
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        missing = [key for key in missing if not key.startswith(control_prefix)]
        if missing or unexpected:
            raise ValueError(f"the base model's weights do not fit this ControlLDM's base: {len(missing)} missing "
                             f"({', '.join(missing[:2])}), {len(unexpected)} unexpected ({', '.join(unexpected[:2])})")
        unet = self.model.diffusion_model.state_dict()
        copied = {key: value for key, value in unet.items() if key in self.control_model.state_dict()}
        self.control_model.load_state_dict(copied, strict=False)

    def trainable_parameters(self):
        params = list(self.control_model.parameters())
        if not self.sd_locked:
            unet = self.model.diffusion_model
            params += list(unet.output_blocks.parameters()) + list(unet.out.parameters())
        return params
