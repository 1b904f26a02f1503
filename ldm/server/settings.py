"""The server's options (A1111's /sdapi/v1/options), each checked before any is changed.

Only options that change what we do are offered; an unknown name or a bad value answers 422, never silence.
Output folders are relative paths kept inside the server's output root: a request cannot write elsewhere.
"""
import threading
from pathlib import Path, PurePosixPath

from ldm.server.errors import RequestProblem

RNG_SOURCES = {"CPU": "cpu", "NV": "nv", "GPU": "nv"}  # A1111's GPU noise is NVIDIA's on the cards it runs on
OUTDIR_OPTIONS = ("outdir_txt2img_samples", "outdir_img2img_samples", "outdir_extras_samples")
DEFAULTS = {
    "sd_model_checkpoint": "",
    "sd_vae": "Automatic",
    "CLIP_stop_at_last_layers": 1,
    "eta_noise_seed_delta": 0,
    "randn_source": "CPU",
    "samples_save": True,
    "samples_format": "png",
    "outdir_txt2img_samples": "outputs/txt2img-images",
    "outdir_img2img_samples": "outputs/img2img-images",
    "outdir_extras_samples": "outputs/extras-images",
    "upscaler_x4_steps": 50,  # the x4 upscaler's sampling steps in /extra-single-image (A1111's ldsr_steps)
}


def _whole(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestProblem(f"option {name} must be a whole number from {low} to {high}, not {value!r}")
    return value


def _relative_folder(name, value):
    if not isinstance(value, str) or not value.strip():
        raise RequestProblem(f"option {name} must be a folder name, not {value!r}")
    path = PurePosixPath(value.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or ":" in value:
        raise RequestProblem(f"option {name} {value!r} must be a relative folder inside the server's output "
                             "folder, without '..'")
    return path.as_posix()


def _model_name(name: str, value, find):
    if not isinstance(value, str):
        raise RequestProblem(f"option {name} must be a name from /sdapi/v1/sd-models or /sdapi/v1/sd-vae")
    try:
        return find(value)
    except RequestProblem as error:
        raise RequestProblem(f"option {name}: {error}") from None


def _checked(name: str, value, folders):
    if name == "sd_model_checkpoint":
        return _model_name(name, value, folders.checkpoint).name
    if name == "sd_vae":
        entry = _model_name(name, value, folders.vae)
        return value if entry is None else entry.name
    if name == "CLIP_stop_at_last_layers":
        return _whole(name, value, 1, 12)
    if name == "upscaler_x4_steps":
        return _whole(name, value, 1, 1000)
    if name == "eta_noise_seed_delta":
        return _whole(name, value, 0, 2**63 - 1)
    if name == "randn_source":
        if value not in RNG_SOURCES:
            raise RequestProblem(f"option {name} must be one of {', '.join(RNG_SOURCES)}, not {value!r}")
        return value
    if name == "samples_save":
        if not isinstance(value, bool):
            raise RequestProblem(f"option {name} must be true or false, not {value!r}")
        return value
    if name == "samples_format":
        if value != "png":
            raise RequestProblem(f"option {name} {value!r} is not supported: pictures are saved as png (with "
                                 "their infotext)")
        return value
    if name in OUTDIR_OPTIONS:
        return _relative_folder(name, value)
    raise RequestProblem(f"unknown option {name!r}: this server has {', '.join(DEFAULTS)}")


class Settings:
    """The options, shared by every request; `effective(overrides)` is one request's view."""

    def __init__(self, folders, output_root):
        self.folders = folders
        self.output_root = Path(output_root)
        self._values = {**DEFAULTS, "sd_model_checkpoint": folders.default.name}
        self._lock = threading.Lock()

    def checked(self, changes: dict) -> dict:
        """The changes with their values normalised; RequestProblem for the first bad one."""
        if not isinstance(changes, dict):
            raise RequestProblem("options must be a JSON object of option names and values")
        return {name: _checked(name, value, self.folders) for name, value in changes.items()}

    def update(self, changes: dict) -> dict:
        checked = self.checked(changes)
        with self._lock:
            self._values.update(checked)
        return checked

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._values)

    def effective(self, overrides: dict | None) -> dict:
        return {**self.snapshot(), **self.checked(overrides or {})}

    def outdir(self, values: dict, option: str) -> Path:
        return self.output_root / values[option]
