"""Inpainting: repaint the white part of a mask, keep the rest. Works with two kinds of checkpoint.

- An inpainting model (9-channel UNet, LatentInpaintDiffusion): the conditioning is built as the original
  demo builds it: mask = mask >= 0.5, masked image = image · (mask < 0.5), the mask resized (nearest) to
  the latent's size, the masked image encoded to a posterior *sample* (as the original demo and diffusers'
  inpaint pipeline both do). Draws: [the init latent's posterior noise, below strength 1], the start
  noise, then the masked image's posterior noise (diffusers' order, so the same seed gives its picture).
- An ordinary text-to-image model (4 channels): masked sampling, so every checkpoint can inpaint. Before
  each model evaluation the kept region of x is replaced by the input's latent diffused to that step's
  level, with the start noise (as diffusers does; the originals draw fresh noise every step), and the
  final latent keeps the input's latent there. The latent mask repaints every latent cell that holds
  any white pixel, so that nothing white is kept. Draws as img2img: the init latent's posterior noise,
  then the start noise.

After decoding, the kept pixels are pasted back from the input (on by default): the autoencoder cannot
reproduce a picture exactly (fine text and faces drift visibly), and an inpainting run should leave what
the mask keeps untouched. The pasted region fades in over FEATHER_PIXELS around the mask so there is no
hard seam; pixels further than 2 × FEATHER_PIXELS from any white pixel are exactly the input's (until the
invisible watermark, which pictures of 256×256 and more get unless --no_watermark, nudges every pixel).
"""
import numpy as np
import torch
import torch.nn.functional as F

from ldm.generate.img2img import InitImage, init_latent_needed, start_from_image
from ldm.generate.run import BatchInputs, Start, Task
from ldm.models.diffusion.sampling import Schedule, noise_to_step

FEATHER_PIXELS = 4


def generated_weight(mask: torch.Tensor, feather: int = FEATHER_PIXELS) -> torch.Tensor:
    """How much of each output pixel is generated: 1 on the mask, fading to 0 over 2·feather pixels outside.

    The mask grown by `feather` pixels, then box-blurred over the same radius: every white pixel's box
    lies inside the grown mask (weight exactly 1), and pixels further than 2·feather away get exactly 0.
    """
    size = 2 * feather + 1
    grown = F.max_pool2d(mask, size, stride=1, padding=feather)
    return F.avg_pool2d(grown, size, stride=1, padding=feather, count_include_pad=False)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] in [-1, 1] -> HWC uint8, rounded: the input's own 8-bit values come back exactly."""
    return ((pixels[0].permute(1, 2, 0).float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


class Inpainting(Task):
    def __init__(self, pixels: torch.Tensor, mask: torch.Tensor, strength: float = 1.0, paste_back: bool = True):
        """pixels [1, 3, H, W] in [-1, 1]; mask [1, 1, H, W], 1 = repaint."""
        self.init = InitImage(pixels)
        self.mask = mask
        self.strength = strength
        self.paste_back = paste_back

    def prepare(self, job, loaded, log):
        loaded.require_kind("inpaint.py", "inpainting", "text-to-image")
        model = loaded.model
        self.with_model = loaded.kind == "inpainting"
        self.schedule = Schedule(model.alphas_cumprod)
        if not self.with_model:
            log(f"{loaded.ckpt_path.name} is not an inpainting model: inpainting by masked sampling "
                "(the kept region is re-imposed at every step)")
        if init_latent_needed(self.strength, job.steps) or not self.with_model:
            self.init.encode(loaded)
        latent_size = (job.height // loaded.downsampling_factor, job.width // loaded.downsampling_factor)
        if self.with_model:
            self.masked_image = InitImage(model.masked_image(self.init.pixels, self.mask))
            self.masked_image.encode(loaded)
        else:
            repaint = F.adaptive_max_pool2d(self.mask, latent_size)  # a cell with any white pixel is repainted
            self.keep_latent = (1.0 - repaint).to(loaded.device)
        self.weight = generated_weight(self.mask)[0].permute(1, 2, 0).numpy()  # HW1
        self.input_image = to_uint8(self.init.pixels)

    def start(self, batch: BatchInputs) -> Start:
        noised = start_from_image(batch, self.init, self.schedule, self.strength,
                                  keep_init_latent=not self.with_model)
        finish = self.paste_input_back if self.paste_back else None
        if self.with_model:
            concat = batch.loaded.model.inpainting_concat(self.mask.expand(batch.size, -1, -1, -1),
                                                          self.masked_image.sample(batch.noise, batch.size))
            cond = {"c_concat": concat, "c_crossattn": [batch.cond]}
            uncond = None if batch.uncond is None else {"c_concat": concat, "c_crossattn": [batch.uncond]}
            return Start(noised.latents, cond, uncond, skip_steps=noised.skip_steps, finish_images=finish)

        keep, known, noise = self.keep_latent, noised.init_latent, noised.noise

        def impose_known_region(x, t):
            return keep * noise_to_step(self.schedule, known, t, noise) + (1.0 - keep) * x

        def keep_known_latent(x):
            return keep * known + (1.0 - keep) * x

        return Start(noised.latents, batch.cond, batch.uncond, skip_steps=noised.skip_steps,
                     blend=impose_known_region, finish_latents=keep_known_latent, finish_images=finish)

    def paste_input_back(self, images: list[np.ndarray]) -> list[np.ndarray]:
        weight = self.weight
        return [np.round(weight * image + (1.0 - weight) * self.input_image).astype(np.uint8) for image in images]

    def fields(self, job) -> dict:
        return {"Denoising strength": self.strength}
