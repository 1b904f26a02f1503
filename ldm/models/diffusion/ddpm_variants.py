"""The SD 2.x model families that condition on an image as well as on text: inpainting and x4 upscaling.

Both are LatentDiffusion with `conditioning_key: hybrid` (image channels concatenated to the UNet's input,
text by cross-attention; the upscaler adds its noise level as a class label, `hybrid-adm`). apply_model
takes the dict {"c_concat": [...], "c_crossattn": [...], "c_adm": ...} that the original samplers pass.
The constructors accept the originals' parameters, so their YAML files build these classes unchanged.
Depth-to-image lives in `ddpm_depth`.
"""
import torch
import torch.nn.functional as F

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import instantiate_from_config


class _ImageConditionedDiffusion(LatentDiffusion):
    """The training step both families share: the text and image conditioning of a batch, then the loss."""

    def image_conditioning(self, batch, latent):
        """{"c_concat": [...], ...} for a training batch whose first-stage latent is `latent`."""
        raise NotImplementedError

    def training_loss(self, batch):
        batch = self.drop_conditioning(batch)
        with torch.no_grad():
            z = self.get_first_stage_encoding(self.encode_first_stage(self.get_input(batch, self.first_stage_key)))
            cond = {"c_crossattn": [self.get_learned_conditioning(batch[self.cond_stage_key])],
                    **self.image_conditioning(batch, z)}
        t = torch.randint(0, self.num_timesteps, (z.shape[0],), device=z.device)
        return self.p_losses(z, cond, t)


class LatentInpaintDiffusion(_ImageConditionedDiffusion):
    """The 9-channel inpainting model: UNet input = [noisy latent (4), mask at latent size (1), masked-image latent (4)].

    The mask is 1 where the picture is to be repainted; the masked image is the picture with that region
    set to 0 (mid-grey in [-1, 1]). concat_keys gives their order in the input, as in the original.
    finetune_keys, keep_finetune_dims and c_concat_log_* are accepted as the original's configs carry
    them; they only act when finetuning from a checkpoint named in the config (ckpt_path), which this
    implementation leaves to the loader, so they change nothing here.
    """

    def __init__(self, concat_keys=("mask", "masked_image"), masked_image_key="masked_image",
                 finetune_keys=None, keep_finetune_dims=4, c_concat_log_start=None, c_concat_log_end=None, **kwargs):
        super().__init__(**kwargs)
        concat_keys = tuple(concat_keys)
        if len(concat_keys) != 2 or masked_image_key not in concat_keys:
            raise ValueError(f"concat_keys must name the mask and the masked image ({masked_image_key!r}), "
                             f"not {concat_keys}")
        if self.model.conditioning_key not in ("hybrid", "concat"):
            raise ValueError("an inpainting model needs conditioning_key: hybrid (or concat)")
        self.concat_keys = concat_keys
        self.masked_image_key = masked_image_key
        self.mask_key = next(key for key in concat_keys if key != masked_image_key)
        self.finetune_keys = finetune_keys
        self.keep_dims = keep_finetune_dims
        self.c_concat_log_start, self.c_concat_log_end = c_concat_log_start, c_concat_log_end

    @staticmethod
    def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The picture with the region to repaint (mask >= 0.5) set to 0, as the original demo builds it."""
        return image * (mask < 0.5)

    def inpainting_concat(self, mask: torch.Tensor, masked_image_latent: torch.Tensor) -> list:
        """c_concat: the mask resized (nearest) to the latent's size and the masked image's latent, in concat_keys order."""
        parts = {
            self.mask_key: F.interpolate(mask.to(masked_image_latent), size=masked_image_latent.shape[-2:]),
            self.masked_image_key: masked_image_latent,
        }
        return [torch.cat([parts[key] for key in self.concat_keys], dim=1)]

    def image_conditioning(self, batch, latent):
        mask = self.get_input(batch, self.mask_key)
        masked = self.get_input(batch, self.masked_image_key)
        masked_latent = self.get_first_stage_encoding(self.encode_first_stage(masked))
        return {"c_concat": self.inpainting_concat(mask, masked_latent)}


class LatentUpscaleDiffusion(_ImageConditionedDiffusion):
    """The x4 upscaler: UNet input = [noisy latent (4), low-resolution image noised to a level (3)], plus the
    level as a class label (c_adm). Its autoencoder downsamples by 4, so the latent has the low-resolution
    image's size and the decoded picture is four times as large.
    """

    def __init__(self, low_scale_config, low_scale_key="LR", noise_level_key=None, **kwargs):
        super().__init__(**kwargs)
        if self.cond_stage_trainable:
            raise ValueError("the x4 upscaler needs a frozen text encoder (cond_stage_trainable: false)")
        if noise_level_key is not None:
            raise ValueError("noise_level_key (noise levels from the dataset) is not supported, as in the original")
        self.low_scale_model = instantiate_from_config(low_scale_config).eval()
        for p in self.low_scale_model.parameters():
            p.requires_grad_(False)
        self.low_scale_key = low_scale_key
        self.noise_level_key = noise_level_key

    def train(self, mode=True):
        super().train(mode)
        self.low_scale_model.eval()
        return self

    def low_scale_conditioning(self, low_res: torch.Tensor, noise_level=None, noise=None) -> dict:
        """c_concat and c_adm for low-resolution images in [-1, 1] at the latent's size.

        noise_level: an integer tensor, one level per image (random, as in training, when None);
        noise: the Gaussian noise for the augmentation (torch's default generator when None).
        """
        augmented, noise_level = self.low_scale_model(low_res, noise_level, noise)
        return {"c_concat": [augmented], "c_adm": noise_level}

    def image_conditioning(self, batch, latent):
        return self.low_scale_conditioning(self.get_input(batch, self.low_scale_key))
