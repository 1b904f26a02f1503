"""Image variations with SD 2.1 unCLIP: new pictures from the CLIP image embedding of an input picture (and a
prompt, empty by default), as Stability's unCLIP demo makes them.

The input picture is encoded once by the model's CLIP image encoder (any size: it is resized to the encoder's
224x224). Each batch starts from pure noise at the job's size, as txt2img; its vector condition is the
embedding noise-augmented to `noise_level` (0 = the embedding as it is, up to 999 = almost pure noise: the
variations drift further from the input) with the level's embedding appended. The unconditional half of
classifier-free guidance gets the negative prompt and an all-zero vector condition (the demo's and diffusers').
Draws per batch: the start noise [n, C, h, w], then the augmentation noise [n, dim] (each picture its own).
"""
import torch

from ldm.generate.errors import UserError
from ldm.generate.run import BatchInputs, Start, Task

DEFAULT_NOISE_LEVEL = 0


def check_noise_level(level: int, levels: int = 1000):
    """`levels`: the model's max_noise_level, the number of levels it was trained on."""
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < levels:
        raise UserError(f"--noise_level {level} is outside 0..{levels - 1}, the levels of the image embedding's "
                        "noise augmentation (0 = the input's embedding as it is; higher = variations further from it)")


class ImageVariations(Task):
    def __init__(self, pixels: torch.Tensor, noise_level: int = DEFAULT_NOISE_LEVEL):
        """pixels [1, 3, H, W] in [-1, 1], any size."""
        self.pixels = pixels
        self.noise_level = noise_level

    def prepare(self, job, loaded, log):
        loaded.require_kind("variations.py", "image variations")
        model = loaded.model
        if model.noise_augmentor is not None:
            if model.noise_augmentor.stats_problem:
                raise UserError(f"{loaded.ckpt_path.name}: {model.noise_augmentor.stats_problem}")
            check_noise_level(self.noise_level, model.max_noise_level)
        elif self.noise_level != 0:
            raise UserError(f"{loaded.ckpt_path.name}'s config has no noise augmentation (noise_aug_config): "
                            "drop --noise_level")
        self.embedding = model.image_embedding(self.pixels.to(loaded.device, loaded.dtype)).float()

    def start(self, batch: BatchInputs) -> Start:
        n, model = batch.size, batch.loaded.model
        latents = batch.noise.start_noise(batch.latent_shape)
        embedding = self.embedding.expand(n, -1)
        noise = batch.noise.randn(list(embedding.shape)).to(embedding.device)
        levels = torch.full((n,), self.noise_level, dtype=torch.long, device=embedding.device)
        c_adm = model.adm_conditioning(embedding, levels, noise)
        cond = {"c_crossattn": [batch.cond], "c_adm": c_adm}
        uncond = None if batch.uncond is None else {"c_crossattn": [batch.uncond], "c_adm": torch.zeros_like(c_adm)}
        return Start(latents, cond, uncond)

    def fields(self, job) -> dict:
        return {"Noise level": self.noise_level}
