"""Autoencoder losses that train offline.

The original KL autoencoders use LPIPS (VGG weights) and a patch discriminator; neither can be had
without a download, and for flat-coloured scenes a pixel loss with an edge term keeps outlines sharp.
"""
import torch
import torch.nn.functional as F
from torch import nn


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical finite differences of BCHW images."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


class ReconstructionKLLoss(nn.Module):
    """l1 * |x - x'| + l2 * (x - x')^2 + edge * |grad x - grad x'| + kl_weight * KL(posterior || N(0, I)).

    Every term is a mean per pixel. kl_weight keeps the scale of the originals' (1e-6 against a
    reconstruction loss summed over the image): the KL, summed over the latent, is divided by the
    number of pixel values as well. It keeps the latents near unit scale without blurring.
    """

    def __init__(self, l1_weight=1.0, l2_weight=0.0, edge_weight=0.0, kl_weight=1e-6):
        super().__init__()
        self.l1_weight, self.l2_weight = l1_weight, l2_weight
        self.edge_weight, self.kl_weight = edge_weight, kl_weight

    def forward(self, inputs, reconstructions, posterior):
        inputs, reconstructions = inputs.float(), reconstructions.float()
        l1 = F.l1_loss(reconstructions, inputs)
        l2 = F.mse_loss(reconstructions, inputs)
        loss = self.l1_weight * l1 + self.l2_weight * l2
        logs = {"l1": l1.detach(), "l2": l2.detach()}
        if self.edge_weight:
            edge = sum(F.l1_loss(a, b) for a, b in zip(image_gradients(reconstructions), image_gradients(inputs)))
            loss = loss + self.edge_weight * edge
            logs["edge"] = edge.detach()
        kl = posterior.kl().float().mean() / inputs[0].numel()
        loss = loss + self.kl_weight * kl
        logs["kl"] = kl.detach()
        logs["loss"] = loss.detach()
        return loss, logs
