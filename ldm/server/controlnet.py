"""A1111's ControlNet extension over HTTP: `alwayson_scripts.controlnet.args` on /sdapi/v1/txt2img and img2img
(the units `webuiapi.ControlNetUnit.to_dict()` sends), GET /controlnet/model_list, /controlnet/module_list and
/controlnet/version, POST /controlnet/detect.

The units are checked, their pictures decoded, their models found and their detected maps made before the job
waits in the queue; the run itself is the generation layer's (ldm.generate.control, through the Python API's
`control=`). A model is named as the model list names it ("name [hash]", or the name alone) and looked up among
the files of the ControlNet folders only: a name is never used as a path, so it cannot leave those folders.
As the extension does, each unit's detected map (fitted to the output's size) follows the generated pictures
in the answer's images, unless the unit says `save_detected_map: false`.
"""
import asyncio
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from ldm.controlnet_file import HASH_SUFFIX, list_controlnets
from ldm.generate import preprocessors
from ldm.generate.control import ControlUnit, detect_for, fit, listed_name, picture_array, units_from_a1111
from ldm.generate.errors import UserError
from ldm.generate.infotext import parse_parameters
from ldm.server import pictures
from ldm.server.errors import RequestProblem

API_VERSION = 2  # what the extension's /controlnet/version answers (external_code.get_api_version)
SCRIPT_NAME = "controlnet"  # A1111 finds an always-on script by its title in any case; webuiapi sends "ControlNet"
# unit fields the extension takes that we honour (input_image, lowvram and guidance are its older names)
HONOURED = {"enabled", "module", "model", "weight", "image", "input_image", "resize_mode", "processor_res",
            "threshold_a", "threshold_b", "guidance_start", "guidance_end", "guidance", "control_mode",
            "pixel_perfect", "save_detected_map", "low_vram", "lowvram", "hr_option"}
# unit fields the extension takes, at the values that ask for nothing more (the UI's own state among them)
OFF_VALUES = {"mask": (None, ""), "mask_image": (None, ""), "effective_region_mask": (None, ""),
              "input_mode": (None, "simple", "Simple"), "batch_images": (None, "", []), "output_dir": (None, ""),
              "loopback": (None, False), "advanced_weighting": (None, []), "ipadapter_input": (None, []),
              "guessmode": (None, False, 0), "guess_mode": (None, False, 0), "is_ui": (None, False, True),
              "use_preview_as_input": (None, False), "generated_image": (None, ""),
              "union_control_type": (None, "Unknown", ""), "inpaint_crop_input_image": (None, False, True),
              "batch_mask_dir": (None, ""), "batch_input_gallery": (None, []), "batch_mask_gallery": (None, []),
              "animatediff_batch": (None, False), "batch_modifiers": (None, []), "batch_image_files": (None, []),
              "batch_keyframe_idx": (None, "", [])}
MAX_UNITS = 10  # the extension's most units (its unit-count slider): each may load a ControlNet
MAX_NUMBER = 1e6  # far past every slider; bigger numbers are mistakes (and would overflow float())
NUMBERS = ("weight", "guidance_start", "guidance_end", "threshold_a", "threshold_b", "processor_res")
UNIT_LABEL = re.compile(r"^controlnet unit (\d+)")  # how units_from_a1111 names a unit
HIRES_OPTIONS = ("Both", "Low res only", "High res only")
# the extension's own module names where its UI shows another (its preprocessor_aliases; alias_names=true)
MODULE_KEYS = {"invert": "invert"}
NOT_SERVED = ("depth_midas",)  # needs MiDaS weights, which the server does not load
# the sliders of each of our modules as the extension's /controlnet/module_list describes them (module_detail)
RESOLUTION_SLIDER = {"name": "Preprocessor Resolution", "value": preprocessors.DEFAULT_PROCESSOR_RES, "min": 64,
                     "max": 2048}
SLIDERS = {"canny": [RESOLUTION_SLIDER, {"name": "Canny Low Threshold", "value": 100, "min": 1, "max": 255},
                     {"name": "Canny High Threshold", "value": 200, "min": 1, "max": 255}],
           "binary": [RESOLUTION_SLIDER, {"name": "Binary threshold", "value": 0, "min": 0, "max": 255}]}


def check_scripts(scripts: dict | None) -> dict:
    """alwayson_scripts as the request model keeps it: only ControlNet's, as {"args": [...]}; ValueError naming
    any other script."""
    others = [name for name in scripts or {} if str(name).lower() != SCRIPT_NAME]
    if others:
        raise ValueError(f"alwayson_scripts {others[0]!r} cannot be honoured: of A1111's extensions only ControlNet "
                         "runs here; leave the others out")
    for name, value in (scripts or {}).items():
        if not isinstance(value, dict) or not isinstance(value.get("args", []), list) or set(value) - {"args"}:
            raise ValueError(f"alwayson_scripts.{name} must be {{\"args\": [unit, ...]}}, the ControlNet units")
    return scripts or {}


def script_args(scripts: dict | None) -> list:
    for name, value in (scripts or {}).items():
        if str(name).lower() == SCRIPT_NAME:
            return list(value.get("args") or [])
    return []


@dataclass
class RequestControl:
    """A request's ControlNet units, ready for the Python API, and the detected maps its answer shows."""
    units: list = field(default_factory=list)  # ControlUnit, each model a file of the ControlNet folders
    maps: list = field(default_factory=list)  # PIL images at the output's size


class ControlNets:
    """The ControlNet folders the server finds models in: --controlnet_dir, then <models_dir>/ControlNet, then
    the generation layer's defaults (./models/ControlNet, the repository's models/ControlNet and models/controlnet)."""

    def __init__(self, models_dir, extra_dirs=()):
        self.search_dirs = (*map(Path, extra_dirs), Path(models_dir) / "ControlNet")

    def files(self) -> list[Path]:
        """Each model once, the first of a name winning (the folders' order)."""
        found = {}
        for path in list_controlnets(self.search_dirs):
            found.setdefault(path.name if path.is_dir() else path.stem, path)
        return list(found.values())

    def model_list(self) -> list[str]:
        return [listed_name(path) for path in self.files()]

    def find(self, name: str, label: str) -> Path:
        """The file the model list names `name` ("name [hash]" or "name", or the file's name with its suffix)."""
        text = str(name).strip()
        bare = HASH_SUFFIX.sub("", text)
        wanted_hash = text[len(bare):].strip(" []").lower()
        files = self.files()
        matches = [path for path in files if bare in (path.name, path.stem)] or \
                  [path for path in files if bare.lower() in (path.name.lower(), path.stem.lower())]
        if not matches:
            listing = ", ".join(self.model_list()[:8]) or "none: put ControlNets in models/ControlNet"
            raise RequestProblem(f"{label}.model {text!r} is not a ControlNet of this server: pick one of "
                                 f"/controlnet/model_list ({listing})")
        path = matches[0]
        if wanted_hash and not listed_name(path).lower().endswith(f"[{wanted_hash}]"):
            raise RequestProblem(f"{label}.model {text!r}: this server's {path.name} is {listed_name(path)!r}, another "
                                 "file: pick a name from /controlnet/model_list")
        return path

    # --- the units of a request ---------------------------------------------------------------------------------
    def request_control(self, request, enable_hr: bool = False) -> RequestControl:
        """The request's enabled units, checked (RequestProblem naming the unit and field), and their maps."""
        given_units = script_args(request.alwayson_scripts)
        if len(given_units) > MAX_UNITS:
            raise RequestProblem(f"alwayson_scripts.controlnet.args holds {len(given_units)} units: send at most "
                                 f"{MAX_UNITS}")
        cleaned, labels = [], []
        for index, given in enumerate(given_units):
            label = f"alwayson_scripts.controlnet.args[{index}]"
            cleaned.append(self._cleaned(given, label, enable_hr))
            labels.append(label)
        try:
            units = units_from_a1111(cleaned, decode=pictures.decode_image)
        except UserError as error:  # "controlnet unit N ...", N the unit's place in args
            raise RequestProblem(UNIT_LABEL.sub(r"alwayson_scripts.controlnet.args[\1]", str(error))) from None
        enabled = [(given, label) for given, label in zip(cleaned, labels) if given.get("enabled", True)]
        control = RequestControl()
        for unit, (given, label) in zip(units, enabled):
            control.units.append(unit)
            if given.get("save_detected_map", True):  # fitted as the run fits it (the extension's detectmap_proc)
                output_size = (request.height, request.width)
                control.maps.append(Image.fromarray(fit(detected(unit, label, output_size), *output_size,
                                                        unit.resize)))
        return control

    def _cleaned(self, given, label: str, enable_hr: bool) -> dict:
        """The unit's fields under the names units_from_a1111 reads, its model the file's path; RequestProblem for
        a field we do not know or cannot honour, or a value of the wrong type."""
        if given is None:  # the extension skips empty slots
            return {"enabled": False}
        if not isinstance(given, dict):
            raise RequestProblem(f"{label} must be an object of the ControlNet unit's fields (module, model, image, "
                                 "weight, ...)")
        unknown = sorted(set(given) - HONOURED - set(OFF_VALUES))
        if unknown:
            raise RequestProblem(f"{label}.{unknown[0]} is not a field of a ControlNet unit: leave it out")
        for name, allowed in OFF_VALUES.items():
            if name in given and given[name] not in allowed:
                raise RequestProblem(f"{label}.{name}={given[name]!r} cannot be honoured here: leave it at "
                                     f"{allowed[0]!r}")
        unit = {{"lowvram": "low_vram", "guidance": "guidance_end"}.get(key, key): value for key, value in given.items()
                if key in HONOURED}
        _check_types(unit, label)
        picture = unit.get("input_image") or unit.get("image")
        if isinstance(picture, dict) and picture.get("mask"):
            raise RequestProblem(f"{label}.image.mask cannot be honoured: ControlNet masks are not supported; send "
                                 "the picture alone")
        hires_option = unit.get("hr_option", "Both")
        if hires_option not in HIRES_OPTIONS:
            raise RequestProblem(f"{label}.hr_option={hires_option!r}: use one of {', '.join(HIRES_OPTIONS)}")
        if enable_hr and hires_option != "Both":
            raise RequestProblem(f"{label}.hr_option={hires_option!r} cannot be honoured: a unit steers both passes "
                                 "of the hires fix here; leave it at 'Both'")
        module = str(unit.get("module") or "none").strip().lower()
        if preprocessors.ALIASES.get(module, module) in NOT_SERVED:
            raise RequestProblem(f"{label}.module {unit['module']!r} needs MiDaS weights, which this server does not "
                                 "load: send a depth map as the image with module 'none'")
        model = unit.get("model")
        if unit.get("enabled", True) and model is not None and str(model).strip().lower() not in ("", "none"):
            unit["model"] = str(self.find(str(model), label).resolve())  # never a name a request gave
        return unit


def checked_unit(unit: ControlUnit, label: str) -> ControlUnit:
    try:
        return unit.checked(label)
    except UserError as error:
        raise RequestProblem(str(error)) from None


def detected(unit: ControlUnit, label: str, output_size=None) -> np.ndarray:
    """The unit's detected map (HxWx3 uint8), before fitting to the output of output_size (height, width)."""
    try:
        return detect_for(unit, picture_array(unit.image, label), output_size)
    except UserError as error:
        raise RequestProblem(str(error)) from None


def _check_types(unit: dict, label: str):
    """RequestProblem for a value of the wrong type (their ranges are the generation layer's to check)."""
    for name in NUMBERS:
        value = unit.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (isinstance(value, float) and not math.isfinite(value)):
            raise RequestProblem(f"{label}.{name}={value!r} is not a number")
        if abs(value) > MAX_NUMBER:
            raise RequestProblem(f"{label}.{name}={value!r} is out of range")
    if isinstance(unit.get("processor_res"), float):
        if not unit["processor_res"].is_integer():
            raise RequestProblem(f"{label}.processor_res={unit['processor_res']!r} is not a whole number of pixels")
        unit["processor_res"] = int(unit["processor_res"])
    for name in ("enabled", "pixel_perfect", "save_detected_map", "low_vram"):
        if name in unit and not isinstance(unit[name], bool):
            raise RequestProblem(f"{label}.{name}={unit[name]!r} must be true or false")
    for name, kinds in (("module", str), ("model", str), ("hr_option", str), ("control_mode", (str, int)),
                        ("resize_mode", (str, int))):
        if unit.get(name) is not None and (isinstance(unit[name], bool) or not isinstance(unit[name], kinds)):
            raise RequestProblem(f"{label}.{name}={unit[name]!r} must be a name" + ("" if kinds is str else
                                                                                  " or its position"))


def leave_out_pictures(scripts: dict):
    """The answer's copy of the request's units without their pictures (as init_images), in place."""
    for unit in script_args(scripts):
        if isinstance(unit, dict):
            unit.update({name: None for name in ("image", "input_image") if name in unit})


def extra_generation_params(infotexts: list[str]) -> dict:
    """The "ControlNet N" fields of the first picture's infotext, as A1111's info.extra_generation_params holds them."""
    if not infotexts:
        return {}
    fields = parse_parameters(infotexts[0])[2]
    return {key: value for key, value in fields.items() if key.startswith("ControlNet ")}


class DetectRequest(BaseModel):
    """POST /controlnet/detect's body, the extension's field names and defaults (-1: the module's default)."""
    model_config = ConfigDict(extra="forbid")
    controlnet_module: str = Field("none", max_length=200)
    controlnet_input_images: list[str] = Field(default_factory=list, max_length=MAX_UNITS)
    controlnet_images: list[str] = Field(default_factory=list, max_length=MAX_UNITS)  # older name (webuiapi's)
    controlnet_processor_res: int = Field(-1, ge=-1, le=RESOLUTION_SLIDER["max"])
    controlnet_threshold_a: float = Field(-1, ge=-1, le=MAX_NUMBER)
    controlnet_threshold_b: float = Field(-1, ge=-1, le=MAX_NUMBER)
    controlnet_masks: list[str] = Field(default_factory=list, max_length=0)  # no module of ours takes a mask
    low_vram: bool = False


def detected_maps(body: DetectRequest) -> list[str]:
    """Each picture's detected map by the module, base64 PNG (what the run's unit would see before fitting)."""
    given_pictures = [*body.controlnet_input_images, *body.controlnet_images]
    if not given_pictures:
        raise RequestProblem("controlnet_input_images is empty: send the pictures to detect, base64-encoded")
    try:
        key = preprocessors.resolve_preprocessor(body.controlnet_module)
    except UserError as error:
        raise RequestProblem(f"controlnet_module: {error}") from None
    if key in NOT_SERVED:
        raise RequestProblem(f"controlnet_module {body.controlnet_module!r} needs MiDaS weights, which this server "
                             "does not load")
    given = {name: value for name, value in (("threshold_a", body.controlnet_threshold_a),
                                             ("threshold_b", body.controlnet_threshold_b),
                                             ("processor_res", body.controlnet_processor_res)) if value != -1}
    maps = []
    for index, text in enumerate(given_pictures[:MAX_UNITS]):
        label = f"controlnet_input_images[{index}]"
        unit = checked_unit(ControlUnit(model="", image=pictures.decode_image(text, label), preprocessor=key,
                                        **given), label)
        maps.append(pictures.encode_png(Image.fromarray(detected(unit, label))))
    return maps


def add_routes(app, controlnets: ControlNets):
    """The extension's endpoints."""

    @app.post("/controlnet/detect")
    async def controlnet_detect(body: DetectRequest):
        return {"images": await asyncio.to_thread(detected_maps, body), "info": "Success"}

    @app.get("/controlnet/version")
    def controlnet_version():
        return {"version": API_VERSION}

    @app.get("/controlnet/model_list")
    def controlnet_model_list(update: bool = True):
        return {"model_list": controlnets.model_list()}  # the folders are read at every call: always up to date

    @app.get("/controlnet/module_list")
    def controlnet_module_list(alias_names: bool = False):
        # model_free is the extension's "needs no ControlNet model" (its reference_* modules): none of ours
        names = {key: spec.name if alias_names else MODULE_KEYS.get(key, spec.name)
                 for key, spec in preprocessors.PREPROCESSORS.items() if key not in NOT_SERVED}
        return {"module_list": list(names.values()),
                "module_detail": {name: {"model_free": False, "sliders": SLIDERS.get(key, [])}
                                  for key, name in names.items()}}
