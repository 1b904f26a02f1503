"""The denoising UNet of Stable Diffusion 1.x, 2.x and XL, readable top to bottom.

Timestep embedding -> input blocks (ResBlock [+ SpatialTransformer], downsample between levels) ->
middle block -> output blocks (skip concatenation, ResBlock [+ SpatialTransformer], upsample) -> out.
Module and parameter names match the original checkpoints (input_blocks.N.M, in_layers, emb_layers...).
A vector condition (the x4 upscaler's noise level as a class id; unCLIP's image embedding and SDXL's pooled
text and size embeddings through `label_emb`) is added to the time embedding; a ControlNet's residuals are
added to the middle block's output and to each skip connection.
"""
import torch
import torch.utils.checkpoint
from torch import nn

from ldm.modules.attention import SpatialTransformer, same_context_as_before
from ldm.modules.diffusionmodules.util import (
    Conv2d,
    add_to_fresh,
    nearest_upsample_conv,
    normalization,
    silu_of_fresh,
    timestep_embedding,
    zero_module,
)


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, dropout, out_channels=None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        # The Sequentials are unrolled (same layers, same parameter names) so that the SiLUs and the
        # additions can reuse their input's memory at inference.
        norm, _, conv = self.in_layers
        h = conv(silu_of_fresh(norm(x)))
        h = add_to_fresh(h, self.emb_layers(emb).type(h.dtype)[:, :, None, None])
        norm, _, dropout, conv = self.out_layers
        h = conv(dropout(silu_of_fresh(norm(h))))
        return add_to_fresh(h, self.skip_connection(x))


class Downsample(nn.Module):
    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.op = Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels, out_channels=None):
        super().__init__()
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x, output_size=None):
        # Upsampling to the skip connection's size (not blindly x2) lets odd latent sizes through:
        # a 9-wide latent goes down to 5 and must come back to 9, not 10.
        return nearest_upsample_conv(x, self.conv, output_size)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers, each given what it needs: the time embedding, the text, or the output size."""

    def forward(self, x, emb, context=None, output_size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, output_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(
        self,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        channel_mult=(1, 2, 4, 8),
        dropout=0.0,
        num_heads=-1,
        num_head_channels=-1,
        transformer_depth=1,
        transformer_depth_middle=None,
        context_dim=None,
        use_linear_in_transformer=False,
        disable_self_attentions=None,
        disable_middle_self_attn=False,
        num_classes=None,
        adm_in_channels=None,
        legacy=True,
        use_checkpoint=False,
        use_spatial_transformer=True,
        image_size=None,  # unused: the originals' configs carry it
        use_fp16=False,  # ignored: the loader picks the dtype from the device and the user's choice
        spatial_transformer_attn_type=None,  # ignored: the originals' kernel choice (xformers), the same computation
        dims=2,
        **unsupported,
    ):
        super().__init__()
        if unsupported:
            raise ValueError(f"UNetModel options not supported by this implementation: {sorted(unsupported)}")
        if not use_spatial_transformer or context_dim is None or dims != 2:
            raise ValueError("UNetModel here is the text-conditioned 2-D UNet of Stable Diffusion: "
                             "use_spatial_transformer must be true and context_dim set")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set either num_heads or num_head_channels")
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * len(channel_mult)
        if isinstance(transformer_depth, int):
            transformer_depth = [transformer_depth] * len(channel_mult)
        if len(transformer_depth) != len(channel_mult):
            raise ValueError("transformer_depth needs one depth per level of channel_mult")
        if transformer_depth_middle is None:
            transformer_depth_middle = transformer_depth[-1]
        if num_classes == "sequential" and adm_in_channels is None:
            raise ValueError('num_classes "sequential" needs adm_in_channels, the size of the vector condition')
        if num_classes is not None and num_classes != "sequential" and not isinstance(num_classes, int):
            raise ValueError(f'num_classes is a number of classes or "sequential", not {num_classes!r}')
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        time_embed_dim = model_channels * 4

        def attention_heads(channels):
            if num_head_channels == -1:
                heads = num_heads
                head_dim = channels // num_heads
            else:
                heads = channels // num_head_channels
                head_dim = num_head_channels
            if legacy:  # the original "legacy" layout always splits into num_heads
                head_dim = channels // num_heads
            return heads, head_dim

        def transformer(channels, disable_self_attn, depth):
            heads, head_dim = attention_heads(channels)
            return SpatialTransformer(channels, heads, head_dim, depth=depth, dropout=dropout,
                                      context_dim=context_dim, disable_self_attn=disable_self_attn,
                                      use_linear=use_linear_in_transformer)

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes == "sequential":
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)))
        elif num_classes is not None:
            # The x4 upscaler feeds its noise level here as a class id.
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels = [model_channels]
        channels, downsample_factor = model_channels, 1
        for level, mult in enumerate(channel_mult):
            no_self_attn = bool(disable_self_attentions[level]) if disable_self_attentions else False
            for _ in range(num_res_blocks[level]):
                layers = [ResBlock(channels, time_embed_dim, dropout, out_channels=mult * model_channels)]
                channels = mult * model_channels
                if downsample_factor in attention_resolutions and transformer_depth[level]:
                    layers.append(transformer(channels, no_self_attn, transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(channels)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(channels)))
                skip_channels.append(channels)
                downsample_factor *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(channels, time_embed_dim, dropout),
            transformer(channels, disable_middle_self_attn, transformer_depth_middle),
            ResBlock(channels, time_embed_dim, dropout),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            no_self_attn = bool(disable_self_attentions[level]) if disable_self_attentions else False
            for i in range(num_res_blocks[level] + 1):
                layers = [ResBlock(channels + skip_channels.pop(), time_embed_dim, dropout, out_channels=model_channels * mult)]
                channels = model_channels * mult
                if downsample_factor in attention_resolutions and transformer_depth[level]:
                    layers.append(transformer(channels, no_self_attn, transformer_depth[level]))
                if level and i == num_res_blocks[level]:
                    layers.append(Upsample(channels))
                    downsample_factor //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(channels), nn.SiLU(), zero_module(Conv2d(model_channels, out_channels, 3, padding=1))
        )
        # block_runner(block, *args) -> output, when set, runs (or stands in for) every block of forward: the
        # hook through which step caching (ldm.models.diffusion.step_cache) reuses the deep blocks' outputs.
        self.block_runner = None

    def _run(self, block, *args):
        if self.block_runner is not None:
            return self.block_runner(block, *args)
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x, timesteps, context=None, y=None, control=None):
        """x [B, in_channels, H, W], timesteps [B], context [B, tokens, context_dim], y [B] class ids or
        [B, adm_in_channels] vectors, control: a ControlNet's residuals, one per input block then the middle's."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y exactly when the model takes a class or vector condition (num_classes set)")
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise ValueError(f"control needs {len(self.input_blocks) + 1} residuals (one per input block and "
                             f"the middle block's), got {len(control)}")
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if y is not None:
            emb = emb + self.label_emb(y if self.num_classes != "sequential" else y.to(dtype))
        h = x.to(dtype)
        context = same_context_as_before(self, None if context is None else context.to(dtype))

        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        if control is not None:
            h = h + control[-1].to(h.dtype)
            skips = [skip + residual.to(skip.dtype) for skip, residual in zip(skips, control[:-1])]
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            next_skip_size = skips[-1].shape[-2:] if skips else None
            h = self._run(block, h, emb, context, next_skip_size)
        return self.out(h).type(x.dtype)
