"""Live previews: each sampling step's predicted clean latents (the samplers' x0) decoded by TAESD.

A `LivePreview` is the preview hook of `run(..., preview=)` and of the Python API's `callback=`: it keeps the
latest pictures (`latest`, HWC uint8 arrays, one per image of the batch) and the step they show, for a
progress page or a window to show. TAESD decodes a 512x512 preview in a small fraction of a full VAE decode,
so previews every step cost little next to the UNet.
"""
from pathlib import Path

import numpy as np
import torch

from ldm.checkpoint import CheckpointError
from ldm.generate.errors import UserError
from ldm.models.taesd import TinyAutoencoder
from ldm.vae_file import read_vae


class LivePreview:
    def __init__(self, autoencoder: TinyAutoencoder, every: int = 1, on_preview=None):
        """every: decode after every `every`-th step (and after the last); on_preview(step, total, pictures)."""
        if every < 1:
            raise ValueError(f"previews every {every} steps: give 1 or more")
        self.autoencoder, self.every, self.on_preview = autoencoder, every, on_preview
        self.latest: list[np.ndarray] = []
        self.step = self.total = 0

    @classmethod
    def from_file(cls, path, device="cpu", dtype=torch.float32, **kwargs) -> "LivePreview":
        """From a TAESD decoder file (taesd_decoder.pth, .safetensors, an AutoencoderTiny's weights)."""
        try:
            weights = read_vae(Path(path))
        except CheckpointError as error:
            raise UserError(str(error)) from None
        if not hasattr(weights, "latent_channels"):
            raise UserError(f"{path} is a full VAE, not TAESD's decoder: previews need taesd_decoder.pth")
        autoencoder = TinyAutoencoder(1.0, weights.latent_channels, with_encoder=False)
        decoder = {key[len("decoder."):]: value for key, value in weights.tensors.items() if key.startswith("decoder.")}
        autoencoder.decoder.load_state_dict(decoder)
        return cls(autoencoder.to(device, dtype).eval().requires_grad_(False), **kwargs)

    @classmethod
    def for_model(cls, loaded, path=None, **kwargs) -> "LivePreview":
        """The loaded model's own TAESD (--vae taesd), else the decoder file at `path`."""
        first_stage = loaded.model.first_stage_model
        if isinstance(first_stage, TinyAutoencoder):
            return cls(first_stage, **kwargs)
        if path is None:
            raise UserError("live previews need TAESD's decoder: pass its file (taesd_decoder.pth), or load the "
                            "model with --vae taesd")
        return cls.from_file(path, loaded.device, loaded.dtype, **kwargs)

    @torch.no_grad()
    def __call__(self, info: dict):
        step, total = info["i"] + 1, info["total"]
        if step % self.every and step != total:
            return
        pictures = self.autoencoder.preview(info["x0"])
        self.latest = list((255.0 * pictures.permute(0, 2, 3, 1).cpu().numpy()).round().astype(np.uint8))
        self.step, self.total = step, total
        if self.on_preview is not None:
            self.on_preview(step, total, self.latest)
