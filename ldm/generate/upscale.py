"""x4 upscaling: a text-guided diffusion in the latent space of a 4x autoencoder, conditioned on the
low-resolution picture noised to `noise_level` (its class label), as Stability's upscaling demo runs it.

The latent has the low-resolution picture's size; the output is four times as large in each direction.
Draws per batch: the start noise [n, 4, h, w], then the noise of the low-resolution augmentation
[n, 3, h, w] (each picture its own, as the original demo draws them).
"""
import torch

from ldm.generate.errors import UserError
from ldm.generate.run import BatchInputs, Start, Task

DEFAULT_NOISE_LEVEL = 20
MAX_NOISE_LEVEL = 350  # the released model's max_noise_level


def check_noise_level(level: int, highest: int = MAX_NOISE_LEVEL):
    if not 0 <= level <= highest:
        raise UserError(f"--noise_level {level} is outside 0..{highest}, the levels the upscaler was trained on")


class Upscaling(Task):
    def __init__(self, low_res: torch.Tensor, noise_level: int = DEFAULT_NOISE_LEVEL):
        """low_res [1, 3, h, w] in [-1, 1]."""
        self.low_res = low_res
        self.noise_level = noise_level

    def prepare(self, job, loaded, log):
        loaded.require_kind("upscale.py", "x4 upscaling")
        check_noise_level(self.noise_level, loaded.model.low_scale_model.max_noise_level)
        factor = loaded.downsampling_factor
        if (job.height, job.width) != (self.low_res.shape[-2] * factor, self.low_res.shape[-1] * factor):
            raise ValueError(f"the job's size must be {factor}x the low-resolution picture's")
        self.low_res = self.low_res.to(loaded.device)

    def start(self, batch: BatchInputs) -> Start:
        n, model = batch.size, batch.loaded.model
        latents = batch.noise.start_noise(batch.latent_shape)
        augmentation = batch.noise.randn([n, *self.low_res.shape[1:]])
        levels = torch.full((n,), self.noise_level, dtype=torch.long, device=self.low_res.device)
        image = model.low_scale_conditioning(self.low_res.expand(n, -1, -1, -1), levels, augmentation)
        cond = {**image, "c_crossattn": [batch.cond]}
        uncond = None if batch.uncond is None else {**image, "c_crossattn": [batch.uncond]}
        return Start(latents, cond, uncond)

    def fields(self, job) -> dict:
        return {"Noise level": self.noise_level}
