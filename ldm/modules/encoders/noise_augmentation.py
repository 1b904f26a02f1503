"""unCLIP's noise augmentation of the CLIP image embedding: the embedding diffused to a chosen level, plus that
level as a sinusoidal embedding, make the UNet's vector condition [embedding', level embedding].

Trained at random levels, the model is told the level, so that at inference a higher level (0..999) lets the
variations drift further from the input picture. The diffusion runs on the embedding standardised with the
CLIP statistics of the training data (unCLIP-L's config names Karlo's `ViT-L-14_stats.th`; without statistics,
mean 0 and standard deviation 1, as unCLIP-H's config has it), and is undone after.
The schedule is Karlo's `squaredcos_cap_v2` (the Improved-DDPM cosine schedule, betas capped at 0.999).
"""
import math
from pathlib import Path

import numpy as np
import torch

from ldm.modules.diffusionmodules.upscaling import ImageConcatWithNoiseAugmentation
from ldm.modules.diffusionmodules.util import schedule_tensors, timestep_embedding
from ldm.util import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[3]
KARLO_STATS = "ViT-L-14_stats.th (kakaobrain/karlo-v1-alpha on Hugging Face)"


def squaredcos_cap_v2_betas(timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Float64 betas of alpha_bar(t) = cos²((t + 0.008) / 1.008 · π/2), as the originals' betas_for_alpha_bar."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), max_beta)
                     for i in range(timesteps)], dtype=np.float64)


def find_clip_stats(path) -> Path | None:
    """A relative path is looked up in the current folder, then in the repository's."""
    path = Path(path)
    return next((candidate for candidate in (path, REPO_ROOT / path) if candidate.is_file()), None)


def missing_stats_problem(path) -> str:
    return (f"noise_aug_config clip_stats_path {path}: no such file (looked in the current folder and in {REPO_ROOT}); "
            f"it holds the CLIP embedding statistics the model was trained with: get {KARLO_STATS} and put it there")


def read_clip_stats(found: Path, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of a CLIP statistics file (a torch.save'd pair of [dim] tensors), read with weights_only."""
    from ldm.checkpoint import load_pickle_weights  # here: ldm.checkpoint imports the model classes

    stats = load_pickle_weights(found, ConfigError, f"clip_stats_path {found}", f"use the original {KARLO_STATS}",
                                f"clip_stats_path {found}", f"get {KARLO_STATS} again")
    if (not isinstance(stats, (tuple, list)) or len(stats) != 2
            or any(not isinstance(t, torch.Tensor) or t.numel() != dim for t in stats)):
        raise ConfigError(f"clip_stats_path {found} is not a pair (mean, std) of {dim} values: "
                          f"use {KARLO_STATS}, or the statistics of the model's own image encoder")
    return stats[0].reshape(dim).float(), stats[1].reshape(dim).float()


class CLIPEmbeddingNoiseAugmentation(ImageConcatWithNoiseAugmentation):
    """forward(embedding [B, dim], levels [B], noise [B, dim]) -> (noised embedding, level embedding [B, dim])."""

    def __init__(self, *args, clip_stats_path=None, timestep_dim=256, **kwargs):
        super().__init__(*args, **kwargs)
        # A missing statistics file is reported when the augmentation is used, not here: the model (and a
        # shipped config) still builds, and a run refuses it in one line before sampling.
        self.stats_problem = None
        found = find_clip_stats(clip_stats_path) if clip_stats_path is not None else None
        if found is not None:
            mean, std = read_clip_stats(found, timestep_dim)
        else:
            mean, std = torch.zeros(timestep_dim), torch.ones(timestep_dim)
            if clip_stats_path is not None:
                self.stats_problem = missing_stats_problem(clip_stats_path)
        # Not in the checkpoints (the originals' buffers are not persistent): they come from clip_stats_path.
        self.register_buffer("data_mean", mean[None, :], persistent=False)
        self.register_buffer("data_std", std[None, :], persistent=False)
        self.timestep_dim = timestep_dim

    def register_schedule(self, beta_schedule="linear", timesteps=1000, linear_start=1e-4, linear_end=2e-2,
                          cosine_s=8e-3):
        if beta_schedule != "squaredcos_cap_v2":
            return super().register_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        betas = squaredcos_cap_v2_betas(timesteps)
        self.num_timesteps = len(betas)
        for name, value in schedule_tensors(betas).items():
            self.register_buffer(name, value)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.data_mean.float()) / self.data_std.float()

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.data_std.float() + self.data_mean.float()

    def level_embedding(self, noise_level: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(noise_level, self.timestep_dim)

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        """noise_level: one integer level per embedding (random below max_noise_level when None, as in
        training); noise: the Gaussian noise to use (torch's default generator when None). Float32 results."""
        if self.stats_problem:
            raise ConfigError(self.stats_problem)
        if noise_level is None:
            noise_level = torch.randint(0, self.max_noise_level, (x.shape[0],), device=x.device)
        noise_level = torch.as_tensor(noise_level, device=x.device).long()
        if noise is None:
            noise = torch.randn(x.shape, device=x.device)
        noised = self.unscale(self.q_sample(self.scale(x.float()), noise_level, noise.to(x.device)))
        return noised, self.level_embedding(noise_level)
