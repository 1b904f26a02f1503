"""SD 2 depth-to-image: a LatentDiffusion whose UNet also reads the picture's depth map.

UNet input = [noisy latent (4 channels), depth (1 channel)]: the depth map is MiDaS's inverse depth
(near = large), resized to the latent's size (bicubic) and stretched to [-1, 1] per image, so that only
the scene's relative layout conditions the picture, never the estimator's scale. Text still comes in by
cross-attention (`conditioning_key: hybrid`).

The depth estimator (`depth_stage_config`, MiDaS DPT-Hybrid, 123M parameters) is optional: a model built
without it samples from depth maps given to it (`depth_conditioning`), e.g. a depth image from the user.
"""
import torch
import torch.nn.functional as F

from ldm.models.diffusion.ddpm_variants import _ImageConditionedDiffusion
from ldm.modules.midas.api import prepare_midas_input
from ldm.util import instantiate_from_config


def normalized_depth(depth: torch.Tensor, latent_size) -> torch.Tensor:
    """Depth maps [B, 1, h, w] (any scale; larger = nearer) → [B, 1, *latent_size] in [-1, 1], per image.

    Bicubic resizing, then 2·(d − min)/(max − min) − 1 per image, as the original depth2img demo. (The
    original's training code adds 0.001 to max − min; for MiDaS's output, which spans hundreds, the
    difference is far below the UNet's precision.) A flat map, where the original divides by zero,
    comes out as -1 everywhere: "no depth information". Computed in float32 whatever the input's dtype.
    """
    if depth.ndim != 4 or depth.shape[1] != 1:
        raise ValueError(f"expected depth maps of shape [B, 1, H, W], not {tuple(depth.shape)}")
    depth = F.interpolate(depth.float(), size=tuple(latent_size), mode="bicubic", align_corners=False)
    low = torch.amin(depth, dim=(1, 2, 3), keepdim=True)
    high = torch.amax(depth, dim=(1, 2, 3), keepdim=True)
    return 2.0 * (depth - low) / (high - low).clamp_min(torch.finfo(torch.float32).tiny) - 1.0


class LatentDepth2ImageDiffusion(_ImageConditionedDiffusion):
    """The 5-channel depth model (v2-midas-inference.yaml). Its constructor takes the original's parameters;
    finetune_keys, keep_finetune_dims and c_concat_log_* only act when finetuning from a checkpoint named
    in the config, which this implementation leaves to the loader, so they change nothing here."""

    def __init__(self, depth_stage_config=None, concat_keys=("midas_in",), finetune_keys=None, keep_finetune_dims=4,
                 c_concat_log_start=None, c_concat_log_end=None, **kwargs):
        super().__init__(**kwargs)
        concat_keys = tuple(concat_keys)
        if len(concat_keys) != 1:
            raise ValueError(f"depth-to-image takes exactly one concat key (the MiDaS input), not {concat_keys}")
        if self.model.conditioning_key not in ("hybrid", "concat"):
            raise ValueError("a depth-to-image model needs conditioning_key: hybrid (or concat)")
        if self.cond_stage_trainable:
            raise ValueError("depth-to-image needs a frozen text encoder (cond_stage_trainable: false), as the original")
        self.concat_keys = concat_keys
        self.depth_stage_key = concat_keys[0]
        self.finetune_keys = finetune_keys
        self.keep_dims = keep_finetune_dims
        self.c_concat_log_start, self.c_concat_log_end = c_concat_log_start, c_concat_log_end
        self.depth_model = instantiate_from_config(depth_stage_config) if depth_stage_config is not None else None

    @property
    def has_depth_estimator(self) -> bool:
        return self.depth_model is not None

    @torch.no_grad()
    def estimate_depth(self, image: torch.Tensor, midas_input: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse depth [B, 1, h, w] at MiDaS's working size, from pictures [B, 3, H, W] in [-1, 1] (or from
        an already prepared `midas_input`, the original datasets' "midas_in")."""
        if self.depth_model is None:
            raise RuntimeError("this model was built without its depth estimator (no depth_stage_config): "
                               "give it depth maps through depth_conditioning")
        if midas_input is None:
            midas_input = prepare_midas_input(image)
        weight = next(self.depth_model.parameters(), None)
        if weight is not None:  # run the estimator in its own device and dtype (fp16 on CUDA)
            midas_input = midas_input.to(weight.device, weight.dtype)
        return self.depth_model(midas_input)

    def depth_conditioning(self, depth: torch.Tensor, latent: torch.Tensor) -> dict:
        """{"c_concat": [depth normalised at the latent's size]}, in the latent's dtype."""
        return {"c_concat": [normalized_depth(depth, latent.shape[-2:]).to(latent.dtype)]}

    def image_conditioning(self, batch, latent):
        """Training: the depth of the batch's pictures; batch[depth_stage_key] may hold the prepared MiDaS
        input (as the original datasets provide it), else it is made from the pictures."""
        midas_input = batch.get(self.depth_stage_key)
        image = None if midas_input is not None else self.get_input(batch, self.first_stage_key)
        return self.depth_conditioning(self.estimate_depth(image, midas_input), latent)
