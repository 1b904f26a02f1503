"""Output files: numbering that never overwrites, atomic PNG writes, A1111 metadata, watermark, grids."""
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from ldm.generate.errors import UserError

WATERMARK_MIN_SIZE = 256  # the dwtDct watermark needs at least 256x256 pixels


# --- tensors to pictures ----------------------------------------------------------------------------------
def to_uint8_images(decoded: torch.Tensor) -> list[np.ndarray]:
    """Decoder output in [-1, 1], [B, 3, H, W] -> HWC uint8 arrays.

    Truncation, not rounding, as the originals convert: the same latents give the same files.
    """
    x = torch.clamp((torch.nan_to_num(decoded.float()) + 1.0) / 2.0, min=0.0, max=1.0)
    return list((255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8))


def make_grid(images: list[np.ndarray], n_rows: int, padding: int = 2) -> np.ndarray:
    """Images side by side, `n_rows` per row, with black 2-pixel gaps (torchvision's make_grid layout)."""
    per_row = max(1, min(n_rows, len(images)))
    rows = (len(images) + per_row - 1) // per_row
    height, width = images[0].shape[:2]
    cell_h, cell_w = height + padding, width + padding
    grid = np.zeros((rows * cell_h + padding, per_row * cell_w + padding, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        top, left = (index // per_row) * cell_h + padding, (index % per_row) * cell_w + padding
        grid[top:top + height, left:left + width] = image
    return grid


class Watermarker:
    """The invisible watermark the originals embed (invisible-watermark, dwtDct), or none."""

    def __init__(self, text: str | None):
        self.encoder = None
        if text:
            from imwatermark import WatermarkEncoder  # imported only when used: it pulls in OpenCV

            self.encoder = WatermarkEncoder()
            self.encoder.set_watermark("bytes", text.encode("utf-8"))

    def apply(self, image: np.ndarray) -> np.ndarray:
        if self.encoder is None or min(image.shape[:2]) < WATERMARK_MIN_SIZE:
            return image
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        return np.ascontiguousarray(self.encoder.encode(bgr, "dwtDct")[:, :, ::-1])


# --- metadata ---------------------------------------------------------------------------------------------
def _infotext_value(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def infotext(prompt: str, negative_prompt: str, fields: dict) -> str:
    """The AUTOMATIC1111 `parameters` text: prompt, optional negative prompt, then `key: value` pairs."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_infotext_value(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def model_hash(path) -> str:
    """First 10 hex digits of the file's sha256 (A1111's "Model hash"), cached by path, size and mtime."""
    path = Path(path).resolve()
    stat = path.stat()
    cache_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldm" / "model-hashes.json"
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        cache[key] = digest.hexdigest()
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write_bytes(cache_file, json.dumps(cache).encode())
        except OSError:
            pass  # a read-only home only costs the cache
    return cache[key][:10]


# --- files ------------------------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, data: bytes):
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        f.write(data)
        temp = Path(f.name)
    os.replace(temp, path)


def _publish(temp: str, target: Path):
    """Give the finished temporary file its final name, never replacing an existing file."""
    try:
        os.link(temp, target)  # atomic, and fails if the name exists
        os.unlink(temp)
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: reserve the name, then rename over the reservation
        with open(target, "x"):
            pass
        os.replace(temp, target)


def _highest_number(folder: Path, pattern: re.Pattern) -> int:
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))] if folder.is_dir() else []
    return max(numbers, default=-1)


class OutputFolder:
    """`outdir/samples/NNNNN.png` and `outdir/grid-NNNN.png`, numbered after the highest existing number
    (the originals count files, so a gap makes them overwrite), each written to a temporary file and
    renamed, so an interrupted run never leaves a broken PNG and nothing is ever overwritten."""

    SAMPLE = re.compile(r"(\d+)\.png")
    GRID = re.compile(r"grid-(\d+)\.png")

    def __init__(self, outdir, save_samples: bool = True):
        self.outdir = Path(outdir)
        self.samples = self.outdir / "samples"
        self.save_samples = save_samples

    def check_writable(self):
        """Fail before any work if the folder cannot be written (creates it, as the originals do)."""
        for folder in (self.outdir, self.samples) if self.save_samples else (self.outdir,):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=folder):
                    pass
            except OSError as error:
                raise UserError(f"cannot write to output folder {folder}: {error.strerror or error}; "
                                "pass --outdir with a writable folder") from None

    def _save(self, folder: Path, pattern: re.Pattern, name_format: str, image: np.ndarray, text: str | None) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        png = PngImagePlugin.PngInfo()
        if text:
            png.add_text("parameters", text)
        temp = tempfile.NamedTemporaryFile(dir=folder, prefix=".partial-", suffix=".png", delete=False)
        with temp:
            Image.fromarray(image).save(temp, format="PNG", pnginfo=png)
        while True:
            target = folder / name_format.format(_highest_number(folder, pattern) + 1)
            try:
                _publish(temp.name, target)
                return target
            except FileExistsError:
                continue  # another run took the number

    def save_sample(self, image: np.ndarray, text: str | None) -> Path:
        return self._save(self.samples, self.SAMPLE, "{:05}.png", image, text)

    def save_grid(self, image: np.ndarray, text: str | None) -> Path:
        return self._save(self.outdir, self.GRID, "grid-{:04}.png", image, text)
