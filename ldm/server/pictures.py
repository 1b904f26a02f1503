"""Pictures in and out of the API: base64 PNGs, A1111's resize modes and "only masked" inpainting region,
and the cheap live preview of a latent."""
import base64
import binascii
import io
import re

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, PngImagePlugin, UnidentifiedImageError

from ldm.generate.images import MAX_INIT_PIXELS
from ldm.server.errors import RequestProblem

_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
# SD 1.x/2.x latent channels -> RGB, a least-squares fit (the idea of A1111's "Approx cheap" preview)
LATENT_RGB = torch.tensor([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264],
                           [-0.184, -0.271, -0.473]])


def decode_image(text: str, field: str) -> Image.Image:
    """A base64 picture (with or without a data: URL prefix), checked and loaded upright; RequestProblem if not."""
    if not isinstance(text, str) or not text:
        raise RequestProblem(f"{field} is empty: send a base64-encoded picture")
    try:
        data = base64.b64decode(_DATA_URL.sub("", text.strip()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestProblem(f"{field} is not valid base64: send the picture's bytes base64-encoded") from None
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_INIT_PIXELS:
            raise RequestProblem(f"{field} is {image.width}x{image.height}, over the {MAX_INIT_PIXELS} pixels this "
                                 "server takes: send a smaller picture")
        image.load()
    except RequestProblem:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise RequestProblem(f"{field} is not a picture PIL can read ({type(error).__name__}): send a PNG or "
                             "JPEG, base64-encoded") from None
    return ImageOps.exif_transpose(image)


def encode_png(image: Image.Image, text: str | None = None) -> str:
    """Base64 of a PNG carrying the infotext in its `parameters` chunk, as A1111 answers."""
    info = PngImagePlugin.PngInfo()
    if text:
        info.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def resized(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """A1111's resize_mode: 0 just resize, 1 crop and resize (keep the aspect, cut the overflow), 2 resize and
    fill (keep the aspect, fill the bands with the picture's stretched edges)."""
    if image.size == (width, height):
        return image
    if mode == 0:
        return image.resize((width, height), Image.LANCZOS)
    if mode == 1:
        return ImageOps.fit(image, (width, height), Image.LANCZOS)
    inner = ImageOps.contain(image, (width, height), Image.LANCZOS)
    filled = image.resize((width, height), Image.LANCZOS).filter(ImageFilter.GaussianBlur(max(width, height) / 32))
    filled.paste(inner, ((width - inner.width) // 2, (height - inner.height) // 2))
    return filled


def prepared_mask(mask: Image.Image, size, invert: bool, blur_x: int, blur_y: int) -> Image.Image:
    """The mask as A1111 prepares it: greyscale at the picture's size, inverted when asked, blurred."""
    grey = mask.convert("L") if mask.mode != "RGBA" else Image.composite(mask.convert("L"), Image.new("L", mask.size),
                                                                           mask.getchannel("A"))
    if grey.size != size:
        grey = grey.resize(size, Image.BILINEAR)
    if invert:
        grey = ImageOps.invert(grey)
    if blur_x or blur_y:
        grey = grey.filter(ImageFilter.GaussianBlur((blur_x, blur_y)))
    if not (np.asarray(grey) >= 128).any():
        raise RequestProblem("mask has nothing to repaint: white marks what to repaint (inpainting_mask_invert "
                             "swaps that)")
    return grey


def filled_with_surroundings(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's inpainting_fill 0 ("fill"): the masked area starts as the mean colour of what the mask keeps."""
    pixels, repaint = np.asarray(image.convert("RGB")).copy(), np.asarray(mask) >= 128
    kept = pixels[~repaint]
    if len(kept):
        pixels[repaint] = kept.mean(axis=0).astype(np.uint8)
    return Image.fromarray(pixels)


def masked_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int]:
    """A1111's "only masked" crop: the mask's bounding box, padded, grown to width:height, inside the picture."""
    left, top, right, bottom = mask.point(lambda value: 255 if value >= 128 else 0).getbbox()
    left, top = max(0, left - padding), max(0, top - padding)
    right, bottom = min(mask.width, right + padding), min(mask.height, bottom + padding)
    box_w, box_h = right - left, bottom - top
    if box_w / box_h < width / height:  # too narrow: widen
        box_w = min(mask.width, round(box_h * width / height))
    else:
        box_h = min(mask.height, round(box_w * height / width))
    centre_x, centre_y = (left + right) / 2, (top + bottom) / 2
    left = int(min(max(0, centre_x - box_w / 2), mask.width - box_w))
    top = int(min(max(0, centre_y - box_h / 2), mask.height - box_h))
    return left, top, left + box_w, top + box_h


def paste_region(original: Image.Image, repainted: Image.Image, mask: Image.Image, box) -> Image.Image:
    """The repainted crop scaled back into its box, blended in through the (blurred) mask."""
    size = (box[2] - box[0], box[3] - box[1])
    result = original.convert("RGB").copy()
    result.paste(repainted.convert("RGB").resize(size, Image.LANCZOS), box[:2], mask.crop(box))
    return result


def latent_preview(latent: torch.Tensor | None) -> Image.Image | None:
    """A picture of a [1, 4, h, w] latent by a fixed linear map, without the decoder: cheap enough for every poll."""
    if latent is None or latent.ndim != 4 or latent.shape[1] != LATENT_RGB.shape[0]:
        return None
    rgb = torch.einsum("chw,cr->hwr", latent[0].float(), LATENT_RGB)
    return Image.fromarray(((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy())
