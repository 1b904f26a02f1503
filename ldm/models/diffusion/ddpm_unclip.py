"""SD 2.1 unCLIP: a LatentDiffusion conditioned on text (cross-attention) and on a CLIP image embedding.

`conditioning_key: crossattn-adm`: the UNet's vector condition (`num_classes: sequential`, `adm_in_channels`
= 2 x the embedding's size) is [the image embedding noise-augmented to a level, that level's sinusoidal
embedding] (`noise_augmentor`), added to the time embedding. The image embedding comes from the model's own
CLIP image encoder (`embedder`, ldm.modules.encoders.image_encoders). For classifier-free guidance the
unconditional vector is all zeros (the original demo's and diffusers'), which is also what training's
embedding dropout shows the model.

The constructor takes the original's parameters, so Stability's v2-1-stable-unclip-{l,h}-inference.yaml
build this class unchanged (through the alias `ldm.models.diffusion.ddpm.ImageEmbeddingConditionedLatentDiffusion`).
"""
import torch

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import instantiate_from_config


class ImageEmbeddingConditionedLatentDiffusion(LatentDiffusion):
    def __init__(self, embedder_config, embedding_key="jpg", embedding_dropout=0.5, freeze_embedder=True,
                 noise_aug_config=None, unet_config=None, **kwargs):
        super().__init__(unet_config=unet_config, **kwargs)
        if self.model.conditioning_key != "crossattn-adm":
            raise ValueError("an unCLIP model needs conditioning_key: crossattn-adm (text by cross-attention, the "
                             "image embedding as the UNet's vector condition)")
        self.embed_key = embedding_key
        self.embedding_dropout = embedding_dropout
        self.freeze_embedder = freeze_embedder
        self.embedder = instantiate_from_config(embedder_config)
        if freeze_embedder:
            self.embedder.eval().requires_grad_(False)
        self.noise_augmentor = instantiate_from_config(noise_aug_config).eval() if noise_aug_config else None

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_embedder:
            self.embedder.eval()
        if self.noise_augmentor is not None:
            self.noise_augmentor.eval()
        return self

    @property
    def max_noise_level(self) -> int:
        """The highest noise level plus one (0 without noise augmentation: the embedding is used as it is)."""
        return self.noise_augmentor.max_noise_level if self.noise_augmentor is not None else 0

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings [B, dim] (float32) of pictures [B, 3, H, W] in [-1, 1], any size."""
        weight = next(self.embedder.parameters())
        return self.embedder(images.to(weight.device))

    def adm_conditioning(self, embedding: torch.Tensor, noise_level=None, noise=None) -> torch.Tensor:
        """The UNet's vector condition `c_adm` for image embeddings [B, dim]: noise-augmented to `noise_level`
        (one integer per embedding; random, as in training, when None) with `noise` [B, dim], and the level's
        embedding appended. Without a noise augmentor, the embedding itself."""
        if self.noise_augmentor is None:
            return embedding
        noised, level_embedding = self.noise_augmentor(embedding, noise_level, noise)
        return torch.cat((noised, level_embedding), dim=1)

    def training_loss(self, batch):
        batch = self.drop_conditioning(batch)
        with torch.no_grad():
            z = self.get_first_stage_encoding(self.encode_first_stage(self.get_input(batch, self.first_stage_key)))
            c_adm = self.adm_conditioning(self.image_embedding(self.get_input(batch, self.embed_key)))
            keep = torch.bernoulli(torch.full((c_adm.shape[0], 1), 1.0 - self.embedding_dropout, device=c_adm.device))
            cond = {"c_crossattn": [self.get_learned_conditioning(batch[self.cond_stage_key])], "c_adm": keep * c_adm}
        t = torch.randint(0, self.num_timesteps, (z.shape[0],), device=z.device)
        return self.p_losses(z, cond, t)
