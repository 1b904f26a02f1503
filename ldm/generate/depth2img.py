"""Depth to image (SD 2 depth): img2img whose every step also sees the input picture's depth map.

As the original demo (Stability-AI/stablediffusion scripts/gradio/depth2img.py):
- The picture is padded to a multiple of 64 on each side (at least 128), repeating its edge pixels to the
  right and below; the depth is estimated on the padded picture. Unlike the demo, the outputs are cropped
  back to the input's size, so the padding never shows.
- Depth: MiDaS DPT-Hybrid on the picture (weights from the checkpoint's depth_model.* or from --midas),
  or a depth image from the user (--depth_map: greyscale, bright = near, as MiDaS's inverse depth and the
  demo's depth display). Either way it is resized to the latent's size and stretched to [-1, 1].
- The same depth map conditions the guided and the unguided half (only the text differs).
- Noising, steps and random draws are img2img's (ldm.generate.img2img): strength 0.9 runs int(0.9 × steps)
  steps. At strength 1 the start is pure noise and all steps run (the demo runs steps - 1).
"""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldm.checkpoint import CheckpointError, parameters_on_meta, read_checkpoint
from ldm.generate.errors import UserError
from ldm.generate.images import ASPECT_TOLERANCE, open_image, to_rgb
from ldm.generate.img2img import InitImage, init_latent_needed, start_from_image
from ldm.generate.run import BatchInputs, Start, Task
from ldm.models.diffusion.ddpm_depth import LatentDepth2ImageDiffusion, normalized_depth
from ldm.models.diffusion.sampling import Schedule
from ldm.modules.midas.api import midas_state_dict
from ldm.modules.midas.dpt import DPTDepthModel
from ldm.util import builds_subclass_of

PAD_MULTIPLE = 64
MIN_PADDED_SIDE = 128
ESTIMATOR_PREFIX = "depth_model."
MIDAS_FILE = "dpt_hybrid-midas-501f0c75.pt"


def padded_size(height: int, width: int) -> tuple[int, int]:
    """Each side rounded up to a multiple of 64, at least 128 (the demo's pad_image)."""
    def pad(side):
        return max(MIN_PADDED_SIDE // PAD_MULTIPLE, math.ceil(side / PAD_MULTIPLE)) * PAD_MULTIPLE

    return pad(height), pad(width)


def pad_edges(image: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] padded to `padded_size` by repeating the last row and column (the demo's mode="edge")."""
    height, width = image.shape[-2:]
    padded_height, padded_width = padded_size(height, width)
    if (padded_height, padded_width) == (height, width):
        return image
    return F.pad(image, (0, padded_width - width, 0, padded_height - height), mode="replicate")


def load_depth_map(path, height: int, width: int, flag: str = "--depth_map") -> torch.Tensor:
    """A depth image as [1, 1, height, width] float32, bright = near; its own scale is kept (it is
    normalised later). 8-bit and 16-bit greyscale are read at full precision, colour as luminance; a map
    of another size is resized (bilinear) if it has the picture's shape."""
    image = open_image(path, flag)
    if abs((image.width / image.height) / (width / height) - 1.0) > ASPECT_TOLERANCE:
        raise UserError(f"{flag} {Path(path).name} is {image.width}x{image.height} but the picture is {width}x{height}: "
                        "the depth map must have the picture's shape (it is resized to fit, not cropped)")
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float32)
    else:
        values = np.asarray(to_rgb(image).convert("L"), dtype=np.float32)
    if values.max() == values.min():
        raise UserError(f"{flag} {Path(path).name} has one value everywhere: a depth map needs near and far parts")
    depth = torch.from_numpy(values.copy())[None, None]
    if depth.shape[-2:] != (height, width):
        depth = F.interpolate(depth, size=(height, width), mode="bilinear", align_corners=False)
    return depth


def read_midas_weights(path) -> dict:
    """MiDaS dpt_hybrid weights (a MiDaS release file, or a depth checkpoint) under the model's depth_model.* names."""
    if not Path(path).is_file():
        raise UserError(f"--midas {path}: no such file (pass the MiDaS weights, {MIDAS_FILE})")
    try:
        state_dict, _ = read_checkpoint(path)
    except CheckpointError as error:
        raise UserError(f"--midas: {error}") from None
    weights = midas_state_dict(state_dict)
    with parameters_on_meta():
        expected = {key: tuple(t.shape) for key, t in DPTDepthModel().state_dict().items()}
    missing = [key for key in expected if key not in weights]
    wrong = [key for key in expected if key in weights and tuple(weights[key].shape) != expected[key]]
    if missing or wrong:
        example = (missing or wrong)[0]
        raise UserError(f"--midas {Path(path).name} is not MiDaS DPT-Hybrid weights ({len(missing)} missing, "
                        f"{len(wrong)} of another shape, e.g. {example}): pass {MIDAS_FILE}")
    return {ESTIMATOR_PREFIX + "model." + key: weights[key] for key in expected}


def no_depth_source(ckpt_name: str, can_estimate: bool) -> str:
    if can_estimate:
        return (f"{ckpt_name} holds no depth estimator weights (depth_model.*): pass --depth_map PATH (a depth image, "
                f"bright = near) or --midas PATH (the MiDaS weights, {MIDAS_FILE})")
    return (f"{ckpt_name}'s config builds no depth estimator (no depth_stage_config): "
            "pass --depth_map PATH (a depth image, bright = near)")


def depth_source(ckpt_path, depth_map_given: bool, midas_path=None):
    """The loader's `customize` hook: where the depth estimator's weights come from, decided once the
    checkpoint's keys and the config are known and before anything is built.

    - a depth map given: the estimator is not needed; the model is built without it and the checkpoint's
      depth_model.* tensors (about 500 MB) are left unread;
    - --midas: its weights are added under depth_model.*, replacing any the checkpoint holds;
    - neither: the checkpoint must hold them, else a one-line error says what to pass.
    Other model families are left alone, to be refused by name when the run starts.
    """
    name = Path(ckpt_path).name

    def customize(state_dict: dict, config) -> tuple[dict, dict]:
        if not builds_subclass_of(config.model, LatentDepth2ImageDiffusion):
            return state_dict, {}
        builds_estimator = config.model.params.get("depth_stage_config") is not None
        if depth_map_given:
            kept = {key: value for key, value in state_dict.items() if not key.startswith(ESTIMATOR_PREFIX)}
            return kept, {"depth_stage_config": None}
        if not builds_estimator:
            raise UserError(no_depth_source(name, can_estimate=False))
        if midas_path is not None:
            return {**state_dict, **read_midas_weights(midas_path)}, {}
        if not any(key.startswith(ESTIMATOR_PREFIX) for key in state_dict):
            raise UserError(no_depth_source(name, can_estimate=True))
        return state_dict, {}

    return customize


class DepthToImage(Task):
    def __init__(self, pixels: torch.Tensor, strength: float, depth_map: torch.Tensor | None = None):
        """pixels [1, 3, H, W] in [-1, 1], any size; depth_map [1, 1, H, W] (bright = near) or None to
        estimate it. Sampling runs at the padded size (Job.height/width = `padded_size`)."""
        self.height, self.width = pixels.shape[-2:]
        self.init = InitImage(pad_edges(pixels))
        self.depth_map = pad_edges(depth_map) if depth_map is not None else None
        self.strength = strength

    def prepare(self, job, loaded, log):
        loaded.require_kind("depth2img.py", "depth-to-image")
        model = loaded.model
        if self.depth_map is None and not model.has_depth_estimator:
            raise UserError(no_depth_source(loaded.ckpt_path.name, can_estimate=False))
        self.schedule = Schedule(model.alphas_cumprod)
        if init_latent_needed(self.strength, job.steps):
            self.init.encode(loaded)
        depth = self.depth_map
        if depth is None:
            loaded.use("depth_model")
            depth = model.estimate_depth(self.init.pixels.to(loaded.device, loaded.dtype))
        latent_size = (job.height // loaded.downsampling_factor, job.width // loaded.downsampling_factor)
        self.depth = normalized_depth(depth, latent_size).to(loaded.device)

    def start(self, batch: BatchInputs) -> Start:
        noised = start_from_image(batch, self.init, self.schedule, self.strength)
        concat = [self.depth.expand(batch.size, -1, -1, -1)]
        cond = {"c_concat": concat, "c_crossattn": [batch.cond]}
        uncond = None if batch.uncond is None else {"c_concat": concat, "c_crossattn": [batch.uncond]}
        return Start(noised.latents, cond, uncond, skip_steps=noised.skip_steps, finish_images=self.crop)

    def crop(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return [np.ascontiguousarray(image[:self.height, :self.width]) for image in images]

    def fields(self, job) -> dict:
        # "Size" replaces the job's (the padded sampling size) with the saved pictures' own.
        return {"Size": f"{self.width}x{self.height}", "Denoising strength": self.strength,
                "Depth": "map" if self.depth_map is not None else "MiDaS"}
