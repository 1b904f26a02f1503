"""The depth estimator of SD 2 depth2img, under the name its config gives: `ldm.modules.midas.api.MiDaSInference`.

The original (Stability-AI/stablediffusion, after isl-org/MiDaS) loads its weights from a file in its
constructor; ours is built empty and gets them from the depth checkpoint's `depth_model.*` tensors, or
from a MiDaS release file through `load_midas_weights`.

Input preparation is MiDaS's dpt_hybrid transform: the image scaled, keeping its aspect ratio, so that
its sides move as little as possible towards 384 and are multiples of 32, bicubic; values in [-1, 1]
(MiDaS normalises with mean 0.5 and std 0.5, which is what a [-1, 1] image already is).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.midas.dpt import DPTDepthModel

MIDAS_SIZE = 384
MIDAS_MULTIPLE = 32
MODEL_TYPES = ("dpt_hybrid",)  # the originals also list dpt_large and midas_v21*, which no SD config uses


def midas_input_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) for the network, as MiDaS's Resize(384, 384, keep_aspect_ratio, multiple_of=32,
    resize_method="minimal"): one scale for both sides, the one closer to 1, then each side rounded to a
    multiple of 32 (never below 32)."""
    scale_h, scale_w = MIDAS_SIZE / height, MIDAS_SIZE / width
    scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h

    def to_multiple(x: float) -> int:
        # Python's round() rounds halves to even, as numpy.round in the original does.
        return max(MIDAS_MULTIPLE, int(round(x / MIDAS_MULTIPLE)) * MIDAS_MULTIPLE)

    return to_multiple(scale * height), to_multiple(scale * width)


def prepare_midas_input(image: torch.Tensor) -> torch.Tensor:
    """An image batch [B, 3, H, W] in [-1, 1] → the network's input (the original's `midas_in`).

    The original resizes with OpenCV's INTER_CUBIC; torch's bicubic uses the same kernel (a = -0.75) and
    pixel centres, so the two agree to rounding.
    """
    size = midas_input_size(*image.shape[-2:])
    if tuple(image.shape[-2:]) == size:
        return image
    return F.interpolate(image.float(), size=size, mode="bicubic", align_corners=False).to(image.dtype)


class MiDaSInference(nn.Module):
    """Frozen MiDaS: `forward(midas_in)` → inverse depth [B, 1, H, W] at the input's size, as the original.

    It stays in eval mode and never takes gradients, whatever the surrounding model does.
    """

    def __init__(self, model_type="dpt_hybrid"):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise ValueError(f"MiDaS model_type {model_type!r} is not supported; SD 2 depth uses 'dpt_hybrid'")
        self.model_type = model_type
        self.model = DPTDepthModel()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, x):
        prediction = self.model(x).unsqueeze(1)
        # The network's output already has the input's size; the original resizes anyway (a no-op).
        if prediction.shape[-2:] != x.shape[-2:]:
            prediction = F.interpolate(prediction, size=x.shape[-2:], mode="bicubic", align_corners=False)
        return prediction


def midas_state_dict(state_dict: dict) -> dict:
    """The DPTDepthModel tensors of a MiDaS release file (`dpt_hybrid-midas-501f0c75.pt`: a bare state
    dict, or one under "model" / "state_dict"), or of a depth2img checkpoint (under `depth_model.model.`).

    Returns names relative to DPTDepthModel. Training-time extras of MiDaS files are dropped.
    """
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    prefix = "depth_model.model."
    if any(key.startswith(prefix) for key in state_dict):
        state_dict = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    return {key: value for key, value in state_dict.items() if key.startswith(("pretrained.", "scratch."))}
