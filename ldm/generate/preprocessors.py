"""ControlNet preprocessors that need no downloaded weights, as A1111's ControlNet extension names them.

Each takes an RGB picture (HxWx3 uint8) and returns the detected map the ControlNet sees (HxWx3 uint8):
- none: the picture is the map;
- invert ("invert (from white bg & black line)"): 255 - picture, for black lines drawn on white;
- canny: OpenCV's Canny edges of the picture (thresholds low / high, the extension's 100 / 200);
- binary: the greyscale picture thresholded, dark parts white (THRESH_BINARY_INV, as the extension); a
  threshold of 0 picks Otsu's;
- depth_midas: MiDaS DPT-Hybrid's inverse depth scaled to 0..255 (bright = near), with the weights of a
  MiDaS release file or a depth checkpoint's depth_model.* (--midas).
Like the extension, canny, binary and depth first scale the picture so that its shorter side is the
processor resolution (default 512).
"""
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from ldm.generate.errors import UserError

DEFAULT_PROCESSOR_RES = 512


@dataclass(frozen=True)
class Preprocessor:
    name: str  # A1111's module name, written to the infotext
    threshold_a: str | None = None  # what the extension's first slider means here (None: no slider)
    threshold_b: str | None = None
    defaults: tuple = ()  # (threshold_a, threshold_b) defaults
    uses_resolution: bool = False


PREPROCESSORS = {
    "none": Preprocessor("none"),
    "invert": Preprocessor("invert (from white bg & black line)"),
    "canny": Preprocessor("canny", "low threshold", "high threshold", (100.0, 200.0), uses_resolution=True),
    "binary": Preprocessor("binary", "threshold (0: Otsu's)", None, (0.0,), uses_resolution=True),
    "depth_midas": Preprocessor("depth_midas", uses_resolution=True),
}
ALIASES = {"depth": "depth_midas", "threshold": "binary", "invert (from white bg & black line)": "invert"}


def resolve_preprocessor(name: str) -> str:
    """Our key of a preprocessor named by key, alias or A1111's module name (any case)."""
    key = (name or "none").strip().lower()
    key = ALIASES.get(key, key)
    if key not in PREPROCESSORS:
        raise UserError(f"unknown ControlNet preprocessor {name!r}: choose one of {', '.join(PREPROCESSORS)} "
                        "(others need weights this project does not download: pass their map with 'none')")
    return key


def at_resolution(picture: np.ndarray, resolution: int) -> np.ndarray:
    """The picture scaled so that its shorter side is `resolution` (area averaging down, cubic up)."""
    height, width = picture.shape[:2]
    scale = resolution / min(height, width)
    if scale == 1:
        return picture
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(picture, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def as_rgb(single: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(single[:, :, None], 3, axis=2))


def canny(picture: np.ndarray, low: float, high: float) -> np.ndarray:
    if not 0 <= low <= high:
        raise UserError(f"--canny_low {low} and --canny_high {high}: need 0 <= low <= high (defaults 100 and 200)")
    return as_rgb(cv2.Canny(picture, low, high))


def binary(picture: np.ndarray, threshold: float) -> np.ndarray:
    if not 0 <= threshold <= 255:
        raise UserError(f"the binary threshold {threshold} is outside 0..255 (0 picks Otsu's)")
    grey = cv2.cvtColor(picture, cv2.COLOR_RGB2GRAY)
    otsu = cv2.THRESH_OTSU if threshold in (0, 255) else 0
    _, thresholded = cv2.threshold(grey, threshold, 255, cv2.THRESH_BINARY_INV | otsu)
    return as_rgb(thresholded)


class DepthEstimator:
    """MiDaS DPT-Hybrid from a weights file (a MiDaS release or a depth checkpoint), built on first use."""

    def __init__(self, weights_path, device="cpu", dtype=torch.float32):
        self.weights_path, self.device, self.dtype = weights_path, device, dtype
        self.model = None

    def load(self):
        from ldm.checkpoint import parameters_on_meta
        from ldm.generate.depth2img import ESTIMATOR_PREFIX, read_midas_weights
        from ldm.modules.midas.api import MiDaSInference

        weights = read_midas_weights(self.weights_path)
        with parameters_on_meta():
            model = MiDaSInference()
        model.load_state_dict({key[len(ESTIMATOR_PREFIX):]: value for key, value in weights.items()},
                              strict=True, assign=True)
        self.model = model.to(self.device, self.dtype).eval()

    @torch.no_grad()
    def __call__(self, picture: np.ndarray) -> np.ndarray:
        if self.model is None:
            self.load()
        from ldm.modules.midas.api import prepare_midas_input

        height, width = picture.shape[:2]
        pixels = torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        depth = self.model(prepare_midas_input(pixels).to(self.device, self.dtype)).float()
        depth = torch.nn.functional.interpolate(depth, size=(height, width), mode="bicubic", align_corners=False)[0, 0]
        depth = depth - depth.min()
        depth = depth / depth.max().clamp_min(torch.finfo(torch.float32).tiny)
        return as_rgb((depth * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy())


def detect(key: str, picture: np.ndarray, threshold_a=None, threshold_b=None, resolution=DEFAULT_PROCESSOR_RES,
           depth: DepthEstimator | None = None) -> np.ndarray:
    """The detected map (HxWx3 uint8) of `picture` (HxWx3 uint8 RGB) by preprocessor `key`."""
    spec = PREPROCESSORS[key]
    a, b = (spec.defaults + (None, None))[:2]
    a = a if threshold_a is None else float(threshold_a)
    b = b if threshold_b is None else float(threshold_b)
    if spec.uses_resolution:
        picture = at_resolution(picture, int(resolution))
    if key == "none":
        return picture
    if key == "invert":
        return 255 - picture
    if key == "canny":
        return canny(picture, a, b)
    if key == "binary":
        return binary(picture, a)
    if depth is None:
        raise UserError("the depth_midas preprocessor needs MiDaS weights: pass --midas PATH (dpt_hybrid-midas-"
                        "501f0c75.pt, or a depth checkpoint holding depth_model.*), or pass a depth map with 'none'")
    return depth(picture)


def thresholds_used(key: str, threshold_a=None, threshold_b=None) -> tuple:
    """(threshold_a, threshold_b) as the run uses them, None where the preprocessor has no such slider."""
    spec = PREPROCESSORS[key]
    a, b = (spec.defaults + (None, None))[:2]
    return (None if spec.threshold_a is None else float(a if threshold_a is None else threshold_a),
            None if spec.threshold_b is None else float(b if threshold_b is None else threshold_b))
