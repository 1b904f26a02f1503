"""AutoencoderKL: images <-> latents through a diagonal Gaussian posterior.

A plain nn.Module so that inference never imports Lightning; `ldm.training` wraps it for training.
"""
import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import batch_images_to_bchw, instantiate_from_config


class AutoencoderKL(nn.Module):
    def __init__(self, ddconfig, lossconfig, embed_dim, image_key="image", monitor=None, ckpt_path=None,
                 base_learning_rate=None, **ignored):
        super().__init__()
        if ckpt_path is not None:
            raise ValueError("ckpt_path inside a config is not supported: pass the checkpoint to the loader")
        self.image_key = image_key
        self.embed_dim = embed_dim
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs double_z: true (mean and log-variance)")
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.downsampling_factor = 2 ** (len(ddconfig["ch_mult"]) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, sample_posterior=True, generator=None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_input(self, batch):
        return batch_images_to_bchw(batch[self.image_key])

    def training_loss(self, batch):
        """(loss, logs) for one batch, with the configured loss (e.g. ldm.modules.losses)."""
        inputs = self.get_input(batch)
        reconstructions, posterior = self(inputs)
        return self.loss(inputs, reconstructions, posterior)
