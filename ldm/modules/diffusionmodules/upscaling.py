"""The x4 upscaler's low-resolution input: the image itself, noised to a chosen level ("noise augmentation").

The upscaler was trained on low-resolution images diffused to a random level of their own DDPM schedule,
and is told that level as a class id; at inference a small level (20 by default) lets it invent detail
that the low-resolution image lacks. The schedule's buffers are part of the original checkpoints
(`low_scale_model.*`), so their names and values are the original's.
"""
import torch
from torch import nn

from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule, schedule_tensors


class ImageConcatWithNoiseAugmentation(nn.Module):
    """forward(x, noise_level, noise) -> (x diffused to noise_level, noise_level); the UNet concatenates the first."""

    def __init__(self, noise_schedule_config, max_noise_level=1000, to_cuda=False):
        super().__init__()
        # to_cuda is accepted as the original's configs carry it; the loader puts buffers on the model's device.
        self.max_noise_level = max_noise_level
        self.register_schedule(**noise_schedule_config)

    def register_schedule(self, beta_schedule="linear", timesteps=1000, linear_start=1e-4, linear_end=2e-2,
                          cosine_s=8e-3):
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.num_timesteps = len(betas)
        for name, value in schedule_tensors(betas).items():
            self.register_buffer(name, value)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        # In float32 whatever dtype the loader gave the buffers: at fp16 the small levels would round away.
        x = x_start.float()
        return (extract_into_tensor(self.sqrt_alphas_cumprod.float(), t, x.shape) * x
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod.float(), t, x.shape) * noise.to(x))

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        """noise_level: one integer level per sample (random below max_noise_level when None, as in training);
        noise: the Gaussian noise to use (drawn with torch's default generator when None)."""
        if noise_level is None:
            noise_level = torch.randint(0, self.max_noise_level, (x.shape[0],), device=x.device)
        noise_level = torch.as_tensor(noise_level, device=x.device).long()
        if noise is None:
            noise = torch.randn_like(x, dtype=torch.float32)
        return self.q_sample(x, noise_level, noise.to(x.device)).to(x.dtype), noise_level
