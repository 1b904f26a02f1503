"""SDXL (base and refiner) as a LatentDiffusion: eps prediction on SD's discrete schedule, so every sampler
of ours applies; conditioned on a cross-attention context and a vector ``y`` (the UNet's ``label_emb``).

The networks are ours (UNetModel with ``num_classes: sequential``, AutoencoderKL, the text encoders of
``ldm.modules.encoders.sdxl_conditioner``), under the key layout of Stability's single-file checkpoints:
``model.diffusion_model.*``, ``first_stage_model.*`` and ``conditioner.embedders.N.*``. The conditioner is
this model's ``cond_stage_model`` (the name the generation layer and low-memory mode use for a text
encoder); only its state-dict keys read ``conditioner.``, on the way out and in.
"""
import torch

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.encoders.sdxl_conditioner import FrozenOpenCLIPEmbedder2, SDXLConditioner, SizeConditioning

CHECKPOINT_PREFIX = "conditioner."
# sgm's denoiser keeps its sigmas as a buffer, which some files carry: the schedule here comes from the config.
UNUSED_DENOISER_KEYS = ("denoiser.sigmas",)
MODULE_PREFIX = "cond_stage_model."


def _renamed(state_dict: dict, prefix: str, old: str, new: str) -> None:
    for key in [key for key in state_dict if key.startswith(prefix + old)]:
        state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)


class StableDiffusionXL(LatentDiffusion):
    """``conditioner_config`` builds the SDXLConditioner; the other parameters are LatentDiffusion's."""

    def __init__(self, conditioner_config, **kwargs):
        if kwargs.setdefault("conditioning_key", "crossattn") != "crossattn":
            raise ValueError("SDXL conditions on cross-attention and a vector: conditioning_key must be crossattn")
        super().__init__(cond_stage_config=conditioner_config, **kwargs)
        if not isinstance(self.cond_stage_model, SDXLConditioner):
            raise ValueError("conditioner_config must build an ldm.modules.encoders.sdxl_conditioner.SDXLConditioner")
        self._register_state_dict_hook(self._checkpoint_names)
        self._register_load_state_dict_pre_hook(self._module_names)

    @staticmethod
    def _checkpoint_names(module, state_dict, prefix, local_metadata):
        _renamed(state_dict, prefix, MODULE_PREFIX, CHECKPOINT_PREFIX)
        return state_dict

    @staticmethod
    def _module_names(state_dict, prefix, *args):
        _renamed(state_dict, prefix, CHECKPOINT_PREFIX, MODULE_PREFIX)

    def unused_checkpoint_keys(self) -> tuple[str, ...]:
        """Checkpoint keys of parts not built (ldm.checkpoint): the denoiser's sigmas, OpenCLIP's logit_scale."""
        return UNUSED_DENOISER_KEYS + tuple(
            f"{CHECKPOINT_PREFIX}embedders.{index}.model.logit_scale"
            for index, embedder in enumerate(self.cond_stage_model.embedders)
            if isinstance(embedder, FrozenOpenCLIPEmbedder2))

    def native_size_conditioning(self) -> SizeConditioning:
        size = self.image_size * self.first_stage_model.downsampling_factor
        return SizeConditioning(original_size=(size, size), target_size=(size, size))

    def get_learned_conditioning(self, c, size: SizeConditioning | None = None, negative: bool = False):
        """{"c_crossattn": [context], "c_adm": y} for prompts of at most 75 tokens, at the native size by default."""
        size = size or self.native_size_conditioning()
        context, vector = self.cond_stage_model(list(c), size.values(negative))
        return {"c_crossattn": [context], "c_adm": vector}

    def apply_model(self, x_noisy, t, cond):
        """cond: {"c_crossattn": [context, ...], "c_adm": y [B, adm_in_channels]}."""
        if not isinstance(cond, dict) or "c_adm" not in cond:
            raise ValueError("SDXL needs its conditioning as a dict with c_crossattn and c_adm (the vector y)")
        context = torch.cat(list(cond["c_crossattn"]), dim=1)
        return self.model.diffusion_model(x_noisy, t, context=context, y=cond["c_adm"])
