"""Input pictures for img2img, inpainting and upscaling: read any file PIL can, the same way every time.

- Any mode: transparency is composited on white (a cut-out photo keeps a white background, not black
  garbage from the hidden colour channels); greyscale, bilevel, palette, CMYK and 16-bit images become
  8-bit RGB; the EXIF orientation of camera photos is applied (ImageOps.exif_transpose).
- Sizes: the networks need a multiple of 8 (the autoencoder's downsampling); an image that is not is
  resized to the nearest multiple of 8 on each side, which keeps the aspect ratio within a pixel, and the
  run says so in one line.
- Limits: a file declaring more than Limits.max_pixels (--max_init_pixels) is refused before it is
  decoded, or with --downscale_init shrunk to fit (JPEGs decoded at a reduced size directly); a file
  declaring more than PIL's decompression-bomb limit is refused even then, since shrinking means decoding.
- Tensors: [1, 3, H, W] float32 in [-1, 1], as the originals compute 2·x/255 - 1.
- Masks (inpainting): white = repaint, black = keep; transparent pixels count as keep.
"""
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.generate.errors import UserError

ASPECT_TOLERANCE = 0.02  # a mask may differ from its image by this relative aspect ratio and still be resized
MAX_INIT_PIXELS = 4096 * 4096  # 16 times SD's native size: an input above it is a mistake or needs shrinking
BOMB_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb limit (about 9459x9459), as PIL ships it


@dataclass(frozen=True)
class Limits:
    """How large an input picture may be, and whether a larger one is shrunk to fit instead of refused."""
    max_pixels: int = MAX_INIT_PIXELS
    downscale: bool = False

    def decodable(self) -> int:
        """The most pixels decoded at all: shrinking needs the whole picture decoded first."""
        return max(self.max_pixels, BOMB_PIXELS) if self.downscale else self.max_pixels


@contextmanager
def _bomb_limit(pixels: int):
    """PIL's own decompression-bomb check set to `pixels`, its warning an error: our limit holds inside PIL too."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def open_image(path, flag: str, limits: Limits = Limits(), log=print) -> Image.Image:
    """The file as a fully decoded PIL image, upright, within `limits`; a missing, unreadable or too large
    file is a UserError naming `flag`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        with _bomb_limit(limits.decodable()), Image.open(path) as image:
            width, height = image.size  # from the header: nothing is decoded yet
            if width * height > limits.decodable():
                raise UserError(_too_large(flag, path, width, height, limits))
            if width * height > limits.max_pixels:  # and --downscale_init was given
                # A JPEG decodes at 1/2, 1/4 or 1/8 of its size directly (no larger than needed); others ignore it.
                image.draft(image.mode, _downscaled_size(width, height, limits.max_pixels))
            image.load()  # decode now: a truncated file fails here, not halfway through a run
            image = ImageOps.exif_transpose(image)
            target = _downscaled_size(*image.size, limits.max_pixels)
            if target != image.size:
                log(f"shrunk {flag} {path.name} from {width}x{height} to {target[0]}x{target[1]} "
                    f"(--downscale_init: at most {limits.max_pixels} pixels)")
                image = image.resize(target, resample=Image.LANCZOS)
            return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(_too_large(flag, path, *_declared_size(path), limits)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{flag} {path} cannot be read as an image ({str(error).splitlines()[0][:100]})") from None


def _declared_size(path) -> tuple[int, int]:
    """The size a file's header declares, read with PIL's bomb check off (nothing is decoded)."""
    with _bomb_limit(None), Image.open(path) as image:
        return image.size


def _too_large(flag, path, width, height, limits: Limits) -> str:
    pixels = width * height
    if pixels > limits.decodable() and limits.downscale:
        return (f"{flag} {Path(path).name} declares {width}x{height} pixels, more than {limits.decodable()} that "
                "are decoded even to shrink it (a decompression bomb?): use a smaller picture")
    return (f"{flag} {Path(path).name} is {width}x{height} = {pixels} pixels, over the limit of {limits.max_pixels}: "
            "pass --downscale_init to shrink it on loading, or raise --max_init_pixels")


def _downscaled_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The size, aspect ratio kept, of at most max_pixels pixels (the size itself when it is not over)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit single-channel images (PNG 'I;16', 'I', 'F') scaled down to 8-bit greyscale."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        full_scale = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    else:  # 'I;16*' always; 'I' when its values need more than 8 bits
        full_scale = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0.0) > 255 else 255.0
    return Image.fromarray(np.clip(values / full_scale * 255.0, 0, 255).astype(np.uint8), mode="L")


def _with_alpha(image: Image.Image) -> Image.Image | None:
    """The image as RGBA when it carries transparency (an alpha channel or a transparent palette entry)."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        return image.convert("RGBA")
    return None


def to_rgb(image: Image.Image, background=(255, 255, 255)) -> Image.Image:
    """8-bit RGB from any PIL mode; transparent pixels are composited on `background`."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _eight_bit(image)
    try:
        rgba = _with_alpha(image)
        if rgba is not None:
            canvas = Image.new("RGBA", rgba.size, (*background, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError:  # a mode PIL cannot convert (e.g. LAB in some versions)
        raise UserError(f"pictures in PIL mode {image.mode} cannot be converted to RGB: save it as an RGB PNG") from None


def size_multiple_of(width: int, height: int, multiple: int) -> tuple[int, int]:
    """The nearest size whose sides are multiples of `multiple` (at least one multiple each)."""
    def nearest(side):
        return max(multiple, int(round(side / multiple)) * multiple)

    return nearest(width), nearest(height)


def fit_to_multiple(image: Image.Image, multiple: int, name: str, log=print) -> Image.Image:
    """Resize (Lanczos) to the nearest multiple of `multiple` on each side, saying so in one line."""
    width, height = size_multiple_of(*image.size, multiple)
    if (width, height) == image.size:
        return image
    log(f"resized {name} from {image.width}x{image.height} to {width}x{height} (sides must be multiples of {multiple})")
    return image.resize((width, height), resample=Image.LANCZOS)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> [1, 3, H, W] float32 in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def image_tensor(image: Image.Image, multiple: int = 8, name: str = "the picture", log=print) -> torch.Tensor:
    """A decoded picture as a [1, 3, H, W] tensor in [-1, 1], H and W multiples of `multiple`."""
    return to_tensor(fit_to_multiple(to_rgb(image), multiple, name, log))


def load_image(path, multiple: int = 8, flag: str = "--init-img", log=print, limits: Limits = Limits()) -> torch.Tensor:
    """An input picture file as image_tensor makes it."""
    return image_tensor(open_image(path, flag, limits, log), multiple, Path(path).name, log)


def load_image_and_mask(image_path, mask_path, multiple: int = 8, log=print,
                        limits: Limits = Limits()) -> tuple[torch.Tensor, torch.Tensor]:
    """The picture as load_image gives it, and its inpainting mask as [1, 1, H, W] float32 (1 = repaint).

    The mask is white = repaint, black = keep, in any mode: read as luminance (transparent pixels
    composited on black first), resized to the picture's final size (bilinear) and thresholded at half
    brightness, as the originals binarise. A mask whose aspect ratio differs from the picture's cannot
    be meant for it and is refused; an all-black mask (nothing to repaint) too.
    """
    image, mask = open_image(image_path, "--init-img", limits, log), open_image(mask_path, "--mask", limits, log)
    return image_and_mask_tensors(image, mask, Path(image_path).name, Path(mask_path).name, multiple, log)


def image_and_mask_tensors(image: Image.Image, mask: Image.Image, image_name: str, mask_name: str, multiple: int = 8,
                           log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """load_image_and_mask of decoded pictures."""
    image_aspect, mask_aspect = image.width / image.height, mask.width / mask.height
    if abs(mask_aspect / image_aspect - 1.0) > ASPECT_TOLERANCE:
        raise UserError(f"--mask {mask_name} is {mask.width}x{mask.height} but --init-img is "
                        f"{image.width}x{image.height}: the mask must have the picture's shape (it is resized, not cropped)")
    image = fit_to_multiple(to_rgb(image), multiple, image_name, log)
    grey = to_rgb(mask, background=(0, 0, 0)).convert("L")
    if grey.size != image.size:
        grey = grey.resize(image.size, resample=Image.BILINEAR)
    binary = (np.asarray(grey, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)
    if not binary.any():
        raise UserError(f"--mask {mask_name} is black everywhere: nothing to repaint "
                        "(white marks what to repaint)")
    return to_tensor(image), torch.from_numpy(binary)[None, None]
