"""ControlNet units in a run: each unit's control image, preprocessed and fitted to the output, steers the UNet
through its ControlNet's residuals (ldm.models.controlnet), as A1111's ControlNet extension applies them.

At every model call of a step whose fraction of the pass's steps (step index / steps run, the extension's
sampling_step / total_sampling_steps) lies in [start, end], each active unit's ControlNet runs on the noisy
latent, the timestep, the text of the same rows and its hint (the detected map at hint_downsample x the
latent's size, [B, 3, H, W] in 0..1); its residuals are scaled and the units' sums go to the UNet's `control=`.
The scaling follows the extension's hook.py (scripts/hook.py, `UnetHook`; controlnet.py sets soft_injection =
mode != Balanced, cfg_injection = mode == "ControlNet is more important"):
- balanced: residual i x weight, on the conditional and the unconditional rows alike;
- prompt ("My prompt is more important", soft injection): residual i x weight x 0.825 ** (n - 1 - i), n the
  number of residuals (13 for SD: 0.825 ** (12 - i)), on both halves;
- control ("ControlNet is more important", soft and cfg injection): the same scales, and the unconditional
  rows get none (the extension multiplies them by its cond mark, 0). That is diffusers' guess mode, whose
  scales are logspace(-1, 0, n) = 0.1 ** ((n - 1 - i) / (n - 1)), i.e. 0.8254 ** (12 - i) for SD: within
  0.6 % of the extension's. Here the ControlNet runs on the conditional rows only.
A unit at weight 0 is left out (its residuals would be zeros), so the picture is the one without it.
"""
import argparse
import base64
import hashlib
import io
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.controlnet_file import (ControlNetError, LoadedControlNet, diffusers_weights, find_controlnet, list_controlnets,
                                 load_controlnet, read_controlnet)
from ldm.generate import preprocessors
from ldm.generate.errors import UserError
from ldm.generate.images import open_image, to_rgb

# Our name -> A1111's ("Control Mode", "Resize Mode" in its infotext and its API's strings)
CONTROL_MODES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                 "control": "ControlNet is more important"}
RESIZE_MODES = {"just_resize": "Just Resize", "crop_and_resize": "Crop and Resize", "resize_and_fill": "Resize and Fill"}
# The extension's API also takes the enums' positions (0, 1, 2) and these older spellings.
RESIZE_ALIASES = {"just resize": "just_resize", "resize": "just_resize", "crop and resize": "crop_and_resize",
                  "inner fit (scale to fit)": "crop_and_resize", "crop": "crop_and_resize", "fill": "resize_and_fill",
                  "resize and fill": "resize_and_fill", "outer fit (shrink to fit)": "resize_and_fill",
                  "envelope (outer fit)": "resize_and_fill", "scale to fit (inner fit)": "crop_and_resize"}
SOFT_INJECTION_BASE = 0.825  # the extension's per-level factor of "soft injection"
MAX_WEIGHT = 2.0  # the extension's slider and API limit


@dataclass
class ControlUnit:
    """One ControlNet unit, as a user asks for it.

    model: a ControlNet file or folder, or a name found in the ControlNet folders (A1111's "name [hash]" too);
    image: the control picture (a path, a PIL image or an HxWx3 uint8 array); weight 0..2; start, end: the
    fractions of the steps it acts in; mode: balanced, prompt or control; resize: just_resize,
    crop_and_resize (A1111's default) or resize_and_fill; preprocessor: none, canny, invert, binary,
    depth_midas; threshold_a / threshold_b: the preprocessor's (canny: low / high; binary: the threshold),
    None for its defaults; processor_res: the shorter side it runs at; pixel_perfect: instead, the shorter side
    the picture has once fitted to the output (A1111's "Pixel Perfect"); midas: MiDaS weights for depth_midas."""
    model: str | Path
    image: object
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    resize: str = "crop_and_resize"
    preprocessor: str = "none"
    threshold_a: float | None = None
    threshold_b: float | None = None
    processor_res: int = preprocessors.DEFAULT_PROCESSOR_RES
    pixel_perfect: bool = False
    midas: str | Path | None = None

    def checked(self, label: str) -> "ControlUnit":
        """This unit with its names resolved; UserError naming `label` (e.g. "--control 1") for a bad value."""
        for name, value, low, high in (("weight", self.weight, 0.0, MAX_WEIGHT), ("start", self.start, 0.0, 1.0),
                                       ("end", self.end, 0.0, 1.0)):
            if not (isinstance(value, (int, float)) and low <= value <= high):  # NaN fails too
                raise UserError(f"{label}: its {name} {value} is outside {low:g}..{high:g}")
        if self.start > self.end:
            raise UserError(f"{label}: its start {self.start} is after its end {self.end} (fractions of the steps)")
        if self.image is None:
            raise UserError(f"{label} has no control image: give --control_image for each --control")
        if not (isinstance(self.processor_res, int) and 64 <= self.processor_res <= 4096):
            raise UserError(f"{label}: its processor resolution {self.processor_res} is outside 64..4096")
        if not isinstance(self.pixel_perfect, bool):
            raise UserError(f"{label}: pixel_perfect={self.pixel_perfect!r} must be true or false")
        return ControlUnit(**{**self.__dict__, "mode": resolve_choice(self.mode, CONTROL_MODES, {}, label, "mode"),
                              "resize": resolve_choice(self.resize, RESIZE_MODES, RESIZE_ALIASES, label, "resize mode"),
                              "preprocessor": preprocessors.resolve_preprocessor(self.preprocessor)})


def resolve_choice(value, choices: dict, aliases: dict, label: str, what: str) -> str:
    """Our key for `value`: a key, A1111's display name, an alias, or the position in A1111's enum."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return list(choices)[value]
    text = str(value).strip().lower().replace("-", "_")
    by_name = {name.lower(): key for key, name in choices.items()}
    spaced = text.replace("_", " ")
    key = text if text in choices else by_name.get(spaced) or aliases.get(spaced)
    if key is None:
        raise UserError(f"{label}: unknown {what} {value!r}: use one of {', '.join(choices)}")
    return key


# --- pictures -----------------------------------------------------------------------------------------------
def picture_array(image, label: str) -> np.ndarray:
    """The control picture as HxWx3 uint8 RGB."""
    if isinstance(image, (str, Path)):
        image = open_image(image, label)
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    array = np.asarray(image)
    if array.ndim == 2:
        array = preprocessors.as_rgb(array)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise UserError(f"{label}: a control picture must be a file, a PIL image or an HxWx3 uint8 array, not "
                        f"{array.dtype} {list(array.shape)}")
    return np.ascontiguousarray(array[:, :, :3])


def _resized(picture: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area averaging down, cubic up; a black-and-white map (canny's, binary's) stays black and white: re-
    thresholded by Otsu's method after resizing, as the extension's high_quality_resize does (without its
    thinning of one-pixel edges)."""
    shrinking = width * height < picture.shape[0] * picture.shape[1]
    resized = cv2.resize(picture, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
    values = np.unique(picture)
    if len(values) != 2 or values[0] >= 16 or values[1] <= 240 or not (picture == picture[:, :, :1]).all():
        return resized
    _, thresholded = cv2.threshold(resized[:, :, 0], 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return preprocessors.as_rgb(thresholded)


def fit(picture: np.ndarray, height: int, width: int, resize: str) -> np.ndarray:
    """The detected map at height x width by A1111's resize modes: just_resize stretches; crop_and_resize
    scales to cover and crops the centre; resize_and_fill scales to fit inside and fills the rest with the
    median of the map's border pixels (as the extension's detectmap_proc)."""
    old_height, old_width = picture.shape[:2]
    if resize == "just_resize" or (old_height, old_width) == (height, width):
        return _resized(picture, width, height)
    cover = resize == "crop_and_resize"
    scale = (max if cover else min)(height / old_height, width / old_width)
    new_height, new_width = (max(1, math.ceil(side * scale) if cover else round(side * scale))
                             for side in (old_height, old_width))
    scaled = _resized(picture, new_width, new_height)
    if cover:
        top, left = (new_height - height) // 2, (new_width - width) // 2
        return np.ascontiguousarray(scaled[top:top + height, left:left + width])
    borders = np.concatenate([picture[0], picture[-1], picture[:, 0], picture[:, -1]], axis=0)
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = np.median(borders, axis=0).astype(np.uint8)
    top, left = (height - new_height) // 2, (width - new_width) // 2
    canvas[top:top + new_height, left:left + new_width] = scaled
    return canvas


def pixel_perfect_resolution(picture_height: int, picture_width: int, height: int, width: int, resize: str) -> int:
    """The extension's "pixel perfect" processor resolution: the picture's shorter side scaled as the resize
    mode scales it to the output (by the smaller factor for resize_and_fill, the larger otherwise)."""
    scales = (height / picture_height, width / picture_width)
    scale = min(scales) if resize == "resize_and_fill" else max(scales)
    return int(np.round(scale * min(picture_height, picture_width)))


def with_pixel_perfect(unit: ControlUnit, picture: np.ndarray, output_size=None) -> ControlUnit:
    """The unit with its processor resolution pixel perfect's for an output of output_size (height, width), kept
    within the 64..4096 a unit allows (so that the infotext says, and --from_png restores, what ran)."""
    if not unit.pixel_perfect or output_size is None:
        return unit
    resolution = pixel_perfect_resolution(*picture.shape[:2], *output_size, unit.resize)
    return replace(unit, processor_res=min(4096, max(64, resolution)))


def detect_for(unit: ControlUnit, picture: np.ndarray, output_size=None, depth=None) -> np.ndarray:
    """The unit's detected map of its picture (HxWx3 uint8, before fitting to an output of output_size)."""
    unit = with_pixel_perfect(unit, picture, output_size)
    return preprocessors.detect(unit.preprocessor, picture, unit.threshold_a, unit.threshold_b, unit.processor_res,
                                depth)


# --- the residuals ------------------------------------------------------------------------------------------
def residual_scales(count: int, weight: float, mode: str) -> list[float]:
    """Each residual's factor: the weight, times 0.825 ** (count - 1 - i) for the soft modes."""
    if mode == "balanced":
        return [weight] * count
    return [weight * SOFT_INJECTION_BASE ** float(count - 1 - i) for i in range(count)]


def text_context(cond) -> torch.Tensor:
    """The cross-attention text of a model call's conditioning (a tensor, or a dict holding c_crossattn)."""
    if isinstance(cond, dict):
        return torch.cat(list(cond["c_crossattn"]), dim=1)
    return torch.cat(list(cond), dim=1) if isinstance(cond, (list, tuple)) else cond


def with_control(cond, residuals: list):
    """The conditioning with the residuals the UNet adds (LatentDiffusion.apply_model routes the dict's keys)."""
    if isinstance(cond, dict):
        return {**cond, "control": residuals}
    return {"c_crossattn": list(cond) if isinstance(cond, (list, tuple)) else [cond], "control": residuals}


@dataclass
class ActiveUnit:
    """A unit ready to run: its ControlNet (None while --lowmem has it released) and its detected map."""
    unit: ControlUnit
    label: str
    path: Path
    detected: np.ndarray  # HxWx3 uint8, before fitting to the output
    network: LoadedControlNet | None
    hints: dict = field(default_factory=dict)  # (height, width) in pixels -> [1, 3, H, W] on the run's device

    def hint(self, latent_height: int, latent_width: int, device, dtype) -> torch.Tensor:
        factor = getattr(self.network.model, "hint_downsample", 8)
        size = (latent_height * factor, latent_width * factor)
        if size not in self.hints:
            fitted = fit(self.detected, *size, self.unit.resize)
            self.hints[size] = torch.from_numpy(fitted).permute(2, 0, 1)[None].float().div(255.0)
        return self.hints[size].to(device, dtype)

    def residuals(self, x, t, context, uncond_rows: int) -> list:
        """The unit's scaled residuals for every row of x (uncond rows first, then the conditional ones)."""
        unit, model = self.unit, self.network.model
        rows = slice(uncond_rows, None) if unit.mode == "control" else slice(None)
        x_run, t_run, context_run = x[rows], t[rows], context[rows]
        hint = self.hint(*x.shape[-2:], x.device, x.dtype).expand(x_run.shape[0], -1, -1, -1)
        raw = model(x_run, hint, t_run, context_run)
        scaled = [r * s for r, s in zip(raw, residual_scales(len(raw), unit.weight, unit.mode))]
        if unit.mode == "control" and uncond_rows:
            scaled = [torch.cat([r.new_zeros((uncond_rows, *r.shape[1:])), r]) for r in scaled]
        return scaled


class ControlPass:
    """The control of one sampling pass: GuidedDenoiser calls it with each model call's input; the sampler's
    callback (wrapped by `counting`) tells it which step comes next."""

    def __init__(self, units: list[ActiveUnit], steps: int):
        self.units, self.steps, self.step = units, max(1, steps), 0

    def active(self) -> list[ActiveUnit]:
        fraction = self.step / self.steps
        return [active for active in self.units if active.unit.start <= fraction <= active.unit.end]

    def __call__(self, x, t, cond, uncond_rows: int = 0):
        """cond with the summed residuals of the units active at this step (cond itself when none is)."""
        units = self.active()
        if not units:
            return cond
        context = text_context(cond)
        total = None
        for active in units:
            residuals = active.residuals(x, t, context, uncond_rows)
            total = residuals if total is None else [a + b for a, b in zip(total, residuals)]
        return with_control(cond, total)

    def counting(self, callback):
        def counted(info):
            self.step = int(info["i"]) + 1
            if callback is not None:
                callback(info)
        return counted


class RunControl:
    """The units of a run, loaded for its model: files found and checked, pictures read and preprocessed
    before any sampling, so that a bad unit stops the run before it starts. With --lowmem the ControlNets
    are given back after each pass and read again for the next (they are one more component)."""

    def __init__(self, units: list[ControlUnit], loaded, log=print, search_dirs=(), low_memory: bool = False,
                 output_size: tuple[int, int] | None = None):
        self.loaded, self.log, self.search_dirs = loaded, log, tuple(search_dirs)
        self.output_size = output_size  # (height, width) of the first pass: pixel perfect's target
        self.low_memory = low_memory
        model = loaded.model
        if getattr(model.model, "conditioning_key", None) not in ("crossattn", "hybrid"):
            raise UserError(f"{loaded.ckpt_path.name} is a model for {loaded.kind}, which takes no ControlNet: use a "
                            "text-to-image or inpainting model (SD 1.x, SD 2.x) with --control")
        if hasattr(model, "control_model"):  # its apply_model feeds its own control model, not these residuals
            raise UserError(f"{loaded.ckpt_path.name} is a whole ControlNet 1.0 model: pass it as --control "
                            f"{loaded.ckpt_path.name} and its base model as --ckpt")
        self.units = [self._prepare(unit.checked(f"--control {i}"), f"--control {i}") for i, unit in enumerate(units)]
        if low_memory:
            self.release()

    def _load(self, unit: ControlUnit, label: str) -> LoadedControlNet:
        unet_config = OmegaConf.select(self.loaded.config, "model.params.unet_config") if self.loaded.config else None
        try:
            return load_controlnet(unit.model, unet_config, self.search_dirs, self.loaded.device, self.loaded.dtype)
        except ControlNetError as error:
            raise UserError(f"{label}: {error}") from None

    def _prepare(self, unit: ControlUnit, label: str) -> ActiveUnit:
        network = self._load(unit, label)
        depth = (preprocessors.DepthEstimator(unit.midas, self.loaded.device, self.loaded.dtype)
                 if unit.midas is not None else None)
        picture = picture_array(unit.image, f"{label}'s --control_image")
        unit = with_pixel_perfect(unit, picture, self.output_size)
        detected = detect_for(unit, picture, depth=depth)
        return ActiveUnit(unit, label, network.path, detected, network)

    def release(self):
        for active in self.units:
            active.network = None

    def for_pass(self, steps: int) -> ControlPass:
        acting = [active for active in self.units if active.unit.weight > 0]
        for active in acting:
            if active.network is None:
                active.network = self._load(active.unit, active.label)
        return ControlPass(acting, steps)

    def after_pass(self):
        if self.low_memory:
            self.release()

    def maps(self, height: int, width: int) -> list[np.ndarray]:
        """Each unit's detected map as fitted to a height x width output."""
        return [fit(active.detected, height, width, active.unit.resize) for active in self.units]

    def infotext_fields(self) -> dict:
        return {f"ControlNet {index}": unit_infotext(active, self.low_memory) for index, active in enumerate(self.units)}


def short_hash(path) -> str:
    """A1111's hash of a ControlNet in its model list ("name [d14c016b]"): its legacy model hash, the sha256 of
    the 64 KiB at 1 MiB into the file, 8 hex digits."""
    with open(path, "rb") as file:
        file.seek(0x100000)
        return hashlib.sha256(file.read(0x10000)).hexdigest()[:8]


def listed_name(path: Path) -> str:
    """A ControlNet file or diffusers folder as A1111 lists and writes it: "name [hash]"."""
    return f"{path.name if path.is_dir() else path.stem} [{short_hash(diffusers_weights(path) if path.is_dir() else path)}]"


def unit_infotext(active: ActiveUnit, low_memory: bool = False) -> str:
    """The unit as A1111's extension writes it (its infotext.py serialize_unit: the ControlNetUnit's fields
    in order, display names capitalised, sliders a module lacks left out)."""
    unit = active.unit
    spec = preprocessors.PREPROCESSORS[unit.preprocessor]
    threshold_a, threshold_b = preprocessors.thresholds_used(unit.preprocessor, unit.threshold_a, unit.threshold_b)
    values = {"Module": spec.name, "Model": listed_name(active.path),
              "Weight": float(unit.weight), "Resize Mode": RESIZE_MODES[unit.resize], "Low Vram": bool(low_memory),
              "Processor Res": unit.processor_res if spec.uses_resolution else None,
              "Threshold A": threshold_a, "Threshold B": threshold_b,
              "Guidance Start": float(unit.start), "Guidance End": float(unit.end), "Pixel Perfect": bool(unit.pixel_perfect),
              "Control Mode": CONTROL_MODES[unit.mode], "Hr Option": "Both", "Save Detected Map": True}
    return ", ".join(f"{key}: {value}" for key, value in values.items() if value is not None)


def start_control(job, loaded, folder, log=print) -> RunControl | None:
    """The run's control (None without units), its detected maps saved when the job asks (control-NNNN.png
    beside the outputs, numbered after the highest there: never overwriting)."""
    if not job.control:
        return None
    control = RunControl(job.control, loaded, log, job.controlnet_dirs, low_memory=loaded.components is not None,
                         output_size=(job.height, job.width))
    save = getattr(folder, "_save", None)  # an OutputFolder; the Python API's pictures in memory have no files
    if job.save_control_maps and save is not None:
        for detected in control.maps(job.height, job.width):
            path = save("a control map", folder.outdir, CONTROL_MAP, CONTROL_MAP_NAME, detected, None)
            log(f"control map: {path}")
    return control


CONTROL_MAP, CONTROL_MAP_NAME = re.compile(r"control-(\d+)\.png", re.IGNORECASE), "control-{:04}.png"


# --- the command line ---------------------------------------------------------------------------------------
# option -> (ControlUnit field, type); each is given never (the unit's default) or once per --control, in order
UNIT_OPTIONS = {"control_image": ("image", str), "control_weight": ("weight", float), "control_start": ("start", float),
                "control_end": ("end", float), "control_mode": ("mode", str), "control_resize": ("resize", str),
                "control_preprocessor": ("preprocessor", str), "canny_low": ("threshold_a", float),
                "canny_high": ("threshold_b", float), "binary_threshold": ("threshold_a", float),
                "control_processor_res": ("processor_res", int), "control_pixel_perfect": ("pixel_perfect", bool)}


def add_arguments(parser):
    group = parser.add_argument_group(
        "ControlNet", "repeatable for several units at once: give --control once per unit; every other option of "
        "this group except --controlnet_dir, --save_control_maps and --midas is given either never (its default "
        "for every unit) or once per --control, the i-th value belonging to the i-th --control")
    group.add_argument("--control", action="append", metavar="PATH_OR_NAME",
                       help="a ControlNet file or folder (1.0, 1.1, fp16 .safetensors, diffusers), or its name in "
                            "--controlnet_dir or models/ControlNet (A1111's 'name [hash]' too)")
    group.add_argument("--control_image", action="append", metavar="IMG", help="the unit's control picture")
    group.add_argument("--control_weight", action="append", type=float, metavar="W", help="0..2 (default 1)")
    group.add_argument("--control_start", action="append", type=float, metavar="F",
                       help="the fraction of the steps where the unit starts acting (default 0)")
    group.add_argument("--control_end", action="append", type=float, metavar="F",
                       help="the fraction of the steps after which it stops (default 1)")
    group.add_argument("--control_mode", action="append", metavar="MODE",
                       help="balanced (default), prompt (A1111's 'My prompt is more important') or control "
                            "('ControlNet is more important': the unguided half gets no control)")
    group.add_argument("--control_resize", action="append", metavar="MODE",
                       help="how the map fits the output: just_resize, crop_and_resize (default) or resize_and_fill")
    group.add_argument("--control_preprocessor", action="append", metavar="NAME",
                       help=f"{', '.join(preprocessors.PREPROCESSORS)} (default none: the picture is the map)")
    group.add_argument("--canny_low", action="append", type=float, metavar="T", help="canny's low threshold (100)")
    group.add_argument("--canny_high", action="append", type=float, metavar="T", help="canny's high threshold (200)")
    group.add_argument("--binary_threshold", action="append", type=float, metavar="T",
                       help="binary's threshold, 0..255 (default 0: Otsu's)")
    group.add_argument("--control_processor_res", action="append", type=int, metavar="PIXELS",
                       help="the shorter side canny, binary and depth_midas run at (default 512, A1111's)")
    group.add_argument("--control_pixel_perfect", action="append", type=yes_or_no, metavar="yes|no",
                       help="A1111's Pixel Perfect: the preprocessor runs at the picture's size once fitted to the "
                            "output, not at --control_processor_res (default no)")
    group.add_argument("--controlnet_dir", action="append", metavar="DIR", default=[],
                       help="where --control finds a ControlNet by name, before models/ControlNet; repeatable")
    group.add_argument("--save_control_maps", action="store_true",
                       help="save each unit's detected map beside the outputs (control-NNNN.png), as the model saw it")
    if not any("--midas" in action.option_strings for action in parser._actions):
        group.add_argument("--midas", default=None, metavar="PATH",
                           help="MiDaS weights for depth_midas (dpt_hybrid-midas-501f0c75.pt, or a depth checkpoint)")
    group.add_argument("--control_from_png", default=None, help=argparse.SUPPRESS)  # units set by --from_png


def yes_or_no(text: str) -> bool:
    answer = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}.get(text.strip().lower())
    if answer is None:
        raise argparse.ArgumentTypeError(f"{text!r} is neither yes nor no")
    return answer


def units_from_args(args) -> list[ControlUnit]:
    """The units --control and its options ask for (or --from_png's, when no --control is given)."""
    models = getattr(args, "control", None) or []
    given = {option: getattr(args, option, None) for option in UNIT_OPTIONS}
    if not models:
        stray = [f"--{option}" for option, values in given.items() if values]
        if stray and not getattr(args, "control_from_png", None):
            raise UserError(f"{stray[0]} is given without --control: add --control PATH_OR_NAME for each unit")
        return units_from_png(args, given["control_image"] or [])
    for option, values in given.items():
        if values and len(values) != len(models):
            raise UserError(f"--{option} is given {len(values)} times for {len(models)} --control: give it once per "
                            "--control (the i-th for the i-th), or never for the defaults")
    if not given["control_image"]:
        raise UserError("--control needs a control picture: give --control_image IMG after each --control")
    units = []
    for index, model in enumerate(models):
        fields = {UNIT_OPTIONS[option][0]: values[index] for option, values in given.items() if values}
        units.append(ControlUnit(model=model, midas=getattr(args, "midas", None), **fields).checked(f"--control {index}"))
    return units


def units_from_png(args, pictures: list) -> list[ControlUnit]:
    """The units of a PNG's "ControlNet N" fields (--from_png); their pictures are not in the PNG, so they come
    from --control_image, one per unit."""
    restored = getattr(args, "control_from_png", None) or []
    if not restored:
        return []
    if len(pictures) != len(restored):
        raise UserError(f"the PNG of --from_png used {len(restored)} ControlNet unit(s), whose pictures it does not "
                        f"hold: give --control_image once per unit ({len(pictures)} given), or --control to replace them")
    return [ControlUnit(**{**fields, "image": picture, "midas": getattr(args, "midas", None)}).checked(f"--control {i}")
            for i, (fields, picture) in enumerate(zip(restored, pictures))]


def prepare_args(args):
    """args.control_units: the Python API's own units, else those of the command line (checked before loading)."""
    if getattr(args, "control_units", None) is None:
        args.control_units = units_from_args(args)


def weights_bytes(units: list[ControlUnit], search_dirs=(), itemsize: int = 4) -> int:
    """What the units' ControlNets weigh at the run's dtype (for the memory check; the files are read as headers
    or memory maps, not loaded). One that cannot be found or read counts nothing: loading it names the problem."""
    total = 0
    for unit in units:
        try:
            weights, _ = read_controlnet(find_controlnet(unit.model, search_dirs))
        except Exception:  # noqa: BLE001 - any unusable file: refused with its reason when the run loads it
            continue
        total += sum(tensor.numel() for tensor in weights.values() if tensor.is_floating_point()) * itemsize
    return total


def job_fields(args) -> dict:
    """The Job's control fields from the options (prepare_args first)."""
    return {"control": list(getattr(args, "control_units", None) or []), "controlnet_dirs": tuple(getattr(args, "controlnet_dir", None) or ()),
            "save_control_maps": bool(getattr(args, "save_control_maps", False))}


def parse_infotext_unit(text: str) -> dict:
    """A unit's ControlUnit fields from A1111's "Module: canny, Model: name [hash], Weight: 1.0, ..." text."""
    values = {}
    for item in text.split(","):
        key, _, value = item.partition(":")
        values[key.strip()] = value.strip()
    fields = {"model": values.get("Model"), "preprocessor": values.get("Module", "none")}
    for key, name, kind in (("Weight", "weight", float), ("Guidance Start", "start", float),
                            ("Guidance End", "end", float), ("Threshold A", "threshold_a", float),
                            ("Threshold B", "threshold_b", float), ("Processor Res", "processor_res", int)):
        if key in values:
            fields[name] = kind(float(values[key])) if kind is int else kind(values[key])
    for key, name in (("Resize Mode", "resize"), ("Control Mode", "mode")):
        if key in values:
            fields[name] = values[key]
    if "Pixel Perfect" in values:
        fields["pixel_perfect"] = values["Pixel Perfect"].lower() == "true"
    if not fields["model"]:
        raise ValueError("no Model")
    return fields


def png_units(fields: dict, log=print) -> list[dict]:
    """--from_png: the "ControlNet 0", "ControlNet 1" ... fields as units' fields, in order (one that cannot be
    read is named and left out)."""
    units = []
    for key in sorted((key for key in fields if re.fullmatch(r"ControlNet \d+", key)), key=lambda k: int(k.split()[1])):
        try:
            units.append(parse_infotext_unit(fields[key]))
        except ValueError as error:
            log(f"note: the PNG's {key} cannot be read as a ControlNet unit ({error}): left out")
    return units


# --- A1111's API (alwayson_scripts.controlnet.args, /controlnet/model_list, /controlnet/module_list) ----------------
def decode_base64_picture(text: str, label: str) -> Image.Image:
    """A picture sent as base64 (with or without a data: URL prefix)."""
    try:
        data = base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=False)
        with Image.open(io.BytesIO(data)) as picture:
            picture.load()
            return picture.copy()
    except (ValueError, OSError, Image.DecompressionBombError) as error:
        raise UserError(f"{label}: not a base64-encoded picture ({str(error).splitlines()[0][:80]})") from None


def units_from_a1111(args: list, decode=decode_base64_picture) -> list[ControlUnit]:
    """ControlUnits from A1111's `alwayson_scripts.controlnet.args`: dicts as webuiapi.ControlNetUnit.to_dict()
    sends them (input_image or image in base64, module, model, weight, resize_mode, guidance_start / end,
    control_mode, processor_res, pixel_perfect, threshold_a / b; -1 means the module's default; enabled: false
    units are skipped). Modes by name or by their enums' positions."""
    units = []
    for index, given in enumerate(args or []):
        label = f"controlnet unit {index}"
        if not isinstance(given, dict):
            raise UserError(f"{label}: each ControlNet unit must be an object of the extension's fields")
        if not given.get("enabled", True):
            continue
        picture = given.get("input_image") or given.get("image")
        if isinstance(picture, dict):  # {"image": ..., "mask": ...}
            picture = picture.get("image")
        if not isinstance(picture, str) or not picture:
            raise UserError(f"{label} has no input_image: send the control picture in base64")
        model = given.get("model")
        if not model or str(model).lower() == "none":
            raise UserError(f"{label} names no model: pick one of /controlnet/model_list")

        def number(key, default, kind=float):
            value = given.get(key)
            return default if value is None or value == -1 else kind(value)

        units.append(ControlUnit(
            model=str(model), image=decode(picture, label), weight=number("weight", 1.0),
            start=number("guidance_start", 0.0), end=number("guidance_end", 1.0),
            mode=given.get("control_mode", "balanced"), resize=given.get("resize_mode", "crop_and_resize"),
            preprocessor=given.get("module") or "none", threshold_a=number("threshold_a", None),
            threshold_b=number("threshold_b", None),
            processor_res=number("processor_res", preprocessors.DEFAULT_PROCESSOR_RES, int),
            pixel_perfect=given.get("pixel_perfect", False)).checked(label))
    return units


def module_list() -> list[str]:
    """The preprocessors by A1111's module names (/controlnet/module_list)."""
    return [spec.name for spec in preprocessors.PREPROCESSORS.values()]


def model_list(search_dirs=()) -> list[str]:
    """The ControlNets of the ControlNet folders as A1111 lists them, "name [hash]" (/controlnet/model_list)."""
    return [listed_name(path) for path in list_controlnets(search_dirs)]
