"""A1111's "Extras" upscaling (/sdapi/v1/extra-single-image and /extra-batch-images): pixel resampling
(Lanczos, Nearest) at once, or the SD 2.x x4 upscaler when an x4 checkpoint is in the model folders.

An x4 checkpoint is one of the listed checkpoints (ModelFolders) that is an x4 upscaler: its config beside it
names LatentUpscaleDiffusion, or its .safetensors header shows the 7-channel UNet input (guess_config's rule);
both read without loading anything. It is offered under its file's stem. Upscaling with it is a job of the
shared queue through ldm.pipeline's `upscale` (ldm.generate.upscale's task): one model resident, so it takes
the place of the generation model until the next generation loads that back.

As A1111's model upscalers: the model runs until the picture covers the requested size (at most
MAX_MODEL_PASSES times), then Lanczos makes it exactly that size. The noise comes from a fixed seed, so that
the same picture gives the same result, as A1111's upscalers do; the option upscaler_x4_steps sets its steps.
"""
from dataclasses import dataclass
from pathlib import Path

import yaml
from PIL import Image, ImageOps
from safetensors import safe_open

from ldm.server.checkpoints import Entry, ModelFolders, ResidentModel
from ldm.server.errors import RequestProblem
from ldm.server.schemas import ExtrasRequest

PIXEL_UPSCALERS = {"None": Image.LANCZOS, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
MAX_EXTRA_PIXELS = 8192 * 8192
MAX_MODEL_PASSES = 3
X4_SEED = 0
X4_TARGET = "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion"
X4_UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"
X4_UNET_CHANNELS = 7  # 4 latent + 3 low-resolution picture channels


def _config_target(path: Path) -> str | None:
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        return config["model"]["target"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        return None


def _header_says_x4(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as file:
            return X4_UNET_INPUT in file.keys() and file.get_slice(X4_UNET_INPUT).get_shape()[1] == X4_UNET_CHANNELS
    except Exception:  # noqa: BLE001 - a malformed file is not an upscaler; the loader names its fault if chosen
        return False


def is_x4_checkpoint(path: Path) -> bool:
    beside = path.with_suffix(".yaml")
    if beside.is_file():
        return _config_target(beside) == X4_TARGET
    return path.suffix.lower() == ".safetensors" and _header_says_x4(path)


class Upscalers:
    """What /sdapi/v1/upscalers lists: the pixel resamplers, then the x4 checkpoints by stem."""

    def __init__(self, folders: ModelFolders):
        self.folders = folders
        self._seen: dict[tuple, bool] = {}  # (path, size, mtime) -> is an x4 checkpoint

    def x4_checkpoints(self) -> list[Entry]:
        found = []
        for entry in self.folders.checkpoints:
            try:
                stat = entry.path.stat()
            except OSError:
                continue
            key = (entry.path, stat.st_size, stat.st_mtime_ns)
            if key not in self._seen:
                self._seen[key] = is_x4_checkpoint(entry.path)
            if self._seen[key]:
                found.append(entry)
        return found

    def listing(self) -> list[dict]:
        pixel = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": None}
                 for name in PIXEL_UPSCALERS]
        return pixel + [{"name": entry.stem, "model_name": "SD x4 upscaler", "model_path": str(entry.path),
                         "model_url": None, "scale": 4} for entry in self.x4_checkpoints()]

    def find(self, name: str, field: str) -> Entry | None:
        """None for a pixel resampler; the checkpoint for an x4 upscaler; RequestProblem for anything else."""
        if name in PIXEL_UPSCALERS:
            return None
        models = self.x4_checkpoints()
        for entry in models:
            if entry.answers_to(name):
                return entry
        names = ", ".join([*PIXEL_UPSCALERS, *(entry.stem for entry in models)])
        raise RequestProblem(f"{field} {name!r} is not available: use one of {names} (GET /sdapi/v1/upscalers)")


def target_size(image: Image.Image, request: ExtrasRequest) -> tuple[int, int]:
    if request.resize_mode == 0:
        size = (round(image.width * request.upscaling_resize), round(image.height * request.upscaling_resize))
    else:
        size = (request.upscaling_resize_w, request.upscaling_resize_h)
    if size[0] < 1 or size[1] < 1 or size[0] * size[1] > MAX_EXTRA_PIXELS:
        raise RequestProblem(f"the result would be {size[0]}x{size[1]}: keep it between 1x1 and {MAX_EXTRA_PIXELS} "
                             "pixels")
    return size


def fitted(image: Image.Image, size: tuple[int, int], request: ExtrasRequest, method=Image.LANCZOS) -> Image.Image:
    """The picture at exactly `size`: cropped to its aspect first with resize_mode 1 and upscaling_crop."""
    if image.size == size:
        return image
    if request.resize_mode == 1 and request.upscaling_crop:
        return ImageOps.fit(image, size, method)
    return image.resize(size, method)


@dataclass
class Extras:
    """The checked request: its pictures, each one's target size, and the x4 checkpoint (None: resampling)."""
    images: list
    sizes: list
    request: ExtrasRequest
    model: Entry | None

    @classmethod
    def checked(cls, upscalers: Upscalers, request: ExtrasRequest, images: list) -> "Extras":
        model = upscalers.find(request.upscaler_1, "upscaler_1")
        upscalers.find(request.upscaler_2, "upscaler_2")  # at visibility 0 (the only one taken) it changes nothing
        images = [image.convert("RGB") for image in images]
        return cls(images, [target_size(image, request) for image in images], request, model)

    def resampled(self) -> list[Image.Image]:
        method = PIXEL_UPSCALERS[self.request.upscaler_1]
        return [fitted(image, size, self.request, method) for image, size in zip(self.images, self.sizes)]

    def x4_work(self, resident: ResidentModel, steps: int):
        """The queue job that runs the x4 upscaler over every picture."""
        def work(ticket):
            pipe = resident.get(self.model, "Automatic", None)
            return [self._upscaled(pipe, image, size, steps, ticket) for image, size in zip(self.images, self.sizes)]

        return work

    def _upscaled(self, pipe, image: Image.Image, size: tuple[int, int], steps: int, ticket) -> Image.Image:
        for _ in range(MAX_MODEL_PASSES):
            if image.width >= size[0] and image.height >= size[1]:
                break
            try:
                result = pipe.upscale("", image=image, num_inference_steps=steps, seed=X4_SEED, callback=ticket.step)
            except ValueError as error:
                raise RequestProblem(str(error)) from None
            if not result.images:  # interrupted before the pass made its picture
                break
            image = result.images[0].convert("RGB")
        return fitted(image, size, self.request)
