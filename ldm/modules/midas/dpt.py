"""DPT (Ranftl et al., "Vision Transformers for Dense Prediction") with the hybrid ViT encoder: MiDaS DPT-Hybrid.

Four feature maps, fine to coarse, each brought to 256 channels, are fused from the coarsest up; each
fusion block adds its map to the path coming from below, refines, and doubles the resolution:

    map                                           size    fused in     leaves at
    ResNet stage 1 (256 ch)                       H/4     refinenet1   H/2
    ResNet stage 2 (512 ch)                       H/8     refinenet2   H/4
    ViT block 9 tokens, reassembled (768 ch)      H/16    refinenet3   H/8
    ViT block 12 tokens, reassembled, stride 2    H/32    refinenet4   H/16
    then the head: ×2 upsampling to H, one channel of inverse depth.

The module tree and names are the original's (`pretrained.act_postprocess3`, `scratch.refinenet1`, ...) so
that the depth checkpoints load unchanged; H and W must be multiples of 32.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.midas.backbone import PATCH_SIZE, VIT_WIDTH, VisionTransformerHybrid

FEATURE_CHANNELS = (256, 512, VIT_WIDTH, VIT_WIDTH)  # the four maps above, before the decoder's 3×3 convs
DECODER_CHANNELS = 256
VIT_BLOCK_OUTPUTS = (8, 11)  # zero-based: the 9th and the 12th (last) block


class ProjectReadout(nn.Module):
    """Hands every patch token the class token's information: concatenate it, then project back (+ GELU)."""

    def __init__(self, width):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * width, width), nn.GELU())

    def forward(self, tokens):
        patches = tokens[:, 1:]
        readout = tokens[:, :1].expand_as(patches)
        return self.project(torch.cat([patches, readout], dim=-1))


class ReassembleTokens(nn.Sequential):
    """The tokens of one ViT block → a feature map: readout projection, reshape onto the patch grid, 1×1
    convolution, and for the deepest map a stride-2 3×3 convolution as well.

    Laid out as the original's nn.Sequential (readout, transpose, unflatten, conv[, conv]) so that the
    checkpoint's indices name the same layers (`.0.project.0`, `.3`, `.4`). Positions 1 and 2 held the
    reshape for a fixed 384×384 grid; the reshape is done in `forward` instead, for any input size.
    """

    def __init__(self, width, out_channels, downsample=False):
        layers = [ProjectReadout(width), nn.Identity(), nn.Identity(), nn.Conv2d(width, out_channels, 1)]
        if downsample:
            layers.append(nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1))
        super().__init__(*layers)

    def forward(self, tokens, grid_size):
        x = self[0](tokens).transpose(1, 2).unflatten(2, grid_size)
        for layer in list(self)[3:]:
            x = layer(x)
        return x


class HybridEncoder(nn.Module):
    """Image → the four feature maps DPT fuses: two from the ResNet, two reassembled from ViT tokens.

    The original builds this as a bare module (`pretrained`) with forward hooks on the ResNet stages and
    the ViT blocks; here the ViT returns those activations itself. The original's act_postprocess1/2 are
    identities (the ResNet maps are used as they are) and hold no weights, so they are left out.
    """

    def __init__(self):
        super().__init__()
        self.model = VisionTransformerHybrid()
        self.act_postprocess3 = ReassembleTokens(VIT_WIDTH, FEATURE_CHANNELS[2])
        self.act_postprocess4 = ReassembleTokens(VIT_WIDTH, FEATURE_CHANNELS[3], downsample=True)

    def forward(self, image) -> list[torch.Tensor]:
        grid = (image.shape[-2] // PATCH_SIZE, image.shape[-1] // PATCH_SIZE)
        (tokens_9, tokens_12), resnet_features = self.model(image, block_outputs=VIT_BLOCK_OUTPUTS)
        return [resnet_features[0], resnet_features[1],
                self.act_postprocess3(tokens_9, grid), self.act_postprocess4(tokens_12, grid)]


class ResidualConvUnit(nn.Module):
    """x + conv(relu(conv(relu(x)))), 3×3 convolutions at constant width."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """Adds a refined skip feature map to the coarser path, refines, upsamples ×2 (bilinear, corners
    aligned as in the original), then a 1×1 convolution. The original's FeatureFusionBlock_custom
    with deconv, bn and expand all off."""

    def __init__(self, channels):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(channels)
        self.resConfUnit2 = ResidualConvUnit(channels)
        self.out_conv = nn.Conv2d(channels, channels, 1)

    def forward(self, path, skip=None):
        if skip is not None:
            path = path + self.resConfUnit1(skip)
        path = self.resConfUnit2(path)
        path = F.interpolate(path, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(path)


class DepthHead(nn.Sequential):
    """256 ch at H/2 → inverse depth at H: 3×3 conv to 128, upsample ×2, 3×3 conv to 32, ReLU, 1×1 conv
    to 1, ReLU (MiDaS predicts non-negative inverse depth). Indices as the original's output_conv."""

    def __init__(self, channels=DECODER_CHANNELS):
        super().__init__(
            nn.Conv2d(channels, channels // 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(channels // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
            nn.ReLU(),
        )


class FusionDecoder(nn.Module):
    """The original's `scratch`: a 3×3 convolution bringing each feature map to 256 channels (layerN_rn),
    the fusion blocks from coarse to fine (refinenet4 … refinenet1), and the depth head (output_conv)."""

    def __init__(self, channels=DECODER_CHANNELS):
        super().__init__()
        for level, in_channels in enumerate(FEATURE_CHANNELS, start=1):
            self.add_module(f"layer{level}_rn", nn.Conv2d(in_channels, channels, 3, padding=1, bias=False))
        for level in range(1, len(FEATURE_CHANNELS) + 1):
            self.add_module(f"refinenet{level}", FeatureFusionBlock(channels))
        self.output_conv = DepthHead(channels)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        layer1, layer2, layer3, layer4 = (self.get_submodule(f"layer{level}_rn")(feature)
                                          for level, feature in enumerate(features, start=1))
        path = self.refinenet4(layer4)
        path = self.refinenet3(path, layer3)
        path = self.refinenet2(path, layer2)
        path = self.refinenet1(path, layer1)
        return self.output_conv(path)


class DPTDepthModel(nn.Module):
    """MiDaS DPT-Hybrid: an image [B, 3, H, W], normalised to [-1, 1], → inverse depth [B, H, W] (≥ 0,
    larger is nearer, in no particular unit). H and W must be multiples of 32."""

    def __init__(self):
        super().__init__()
        self.pretrained = HybridEncoder()
        self.scratch = FusionDecoder()

    def forward(self, image):
        if image.shape[-2] % 32 or image.shape[-1] % 32:
            raise ValueError(f"DPT needs height and width that are multiples of 32, not {tuple(image.shape[-2:])}")
        return self.scratch(self.pretrained(image)).squeeze(1)
