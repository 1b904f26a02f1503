"""Output files: numbering that never overwrites, atomic PNG writes, A1111 metadata, watermark, grids."""
import errno
import hashlib
import json
import os
import re
import secrets
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


def file_sha256(path, start: int = 0) -> str:
    """The sha256 (hex) of the file's bytes from offset `start` to its end."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


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
        cache[key] = file_sha256(path)
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write_bytes(cache_file, json.dumps(cache).encode())
        except OSError:
            pass  # a read-only home only costs the cache
    return cache[key][:10]


# --- files ------------------------------------------------------------------------------------------------
MAX_NAME_TRIES = 100  # numbers tried before giving up: each failure means another writer took the number
_LINK_UNSUPPORTED = {errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK,
                     errno.ENOSYS}
_FIXES = {  # what to do about a failed write, by errno; {flag} is the option that names the place
    errno.ENOSPC: "the disk is full: free some space or pass {flag} on another disk",
    errno.EDQUOT: "the disk quota is used up: free some space or pass {flag} on another disk",
    errno.EFBIG: "the file-size limit, ulimit -f, is below the file's size: raise it",
    errno.EEXIST: "rename files whose names differ only in case, such as 00000.PNG beside 00000.png",
}


class SaveFailed(Exception):
    """A file could not be written (disk full, file-size limit, ...); what was saved before is kept."""

    def __init__(self, what: str, folder: Path, error: OSError, flag: str = "--outdir"):
        fix = _FIXES.get(error.errno, "pass {flag} with a writable folder").format(flag=flag)
        super().__init__(f"cannot save {what} to {folder}: {error.strerror or error} ({fix})")


def check_can_create(folder: Path, fix: str = "pass --outdir with a writable folder"):
    """Refuse, as a UserError, a folder that cannot be created or written, without creating anything:
    the nearest existing ancestor must be a folder we can write to."""
    existing = folder
    try:
        while not existing.is_dir():
            if existing.exists() or existing.is_symlink() or existing.parent == existing:
                # a file, a link to nowhere or a removed working folder where a folder must be
                raise UserError(f"cannot write to output folder {folder}: {existing} is not a folder; {fix}")
            existing = existing.parent
        with tempfile.TemporaryFile(dir=existing):  # unnamed on Linux: leaves nothing behind
            pass
    except OSError as error:
        raise UserError(f"cannot write to output folder {folder}: {error.strerror or error}; {fix}") from None


def _write_partial(folder: Path, suffix: str, write) -> Path:
    """A new `.partial-*` file in `folder` filled by write(file), with the usual 0666 & ~umask permissions
    (a NamedTemporaryFile's would be 0600); nothing is left behind if writing fails or is interrupted."""
    for _ in range(MAX_NAME_TRIES):
        path = folder / f".partial-{secrets.token_hex(6)}{suffix}"
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(errno.EEXIST, f"no free temporary name in {folder}")
    try:
        with os.fdopen(descriptor, "wb") as f:
            write(f)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _atomic_write_bytes(path: Path, data: bytes):
    temp = _write_partial(path.parent, path.suffix, lambda f: f.write(data))
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _publish(temp: Path, target: Path):
    """Give the finished temporary file its final name, never replacing an existing file."""
    try:
        os.link(temp, target)  # atomic, and fails if the name exists
    except FileExistsError:
        raise
    except OSError as error:
        if error.errno not in _LINK_UNSUPPORTED:  # a full disk or the like: nothing to fall back to
            raise
        # A filesystem without hard links: reserve the name, then rename over the reservation.
        with open(target, "x"):
            pass
        try:
            os.replace(temp, target)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return
    os.unlink(temp)


def _highest_number(folder: Path, pattern: re.Pattern) -> int:
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))] if folder.is_dir() else []
    return max(numbers, default=-1)


def _publish_numbered(temp: Path, folder: Path, pattern: re.Pattern, name_format: str,
                       wanted: int | None = None) -> Path:
    """Publish under `wanted` (a number reserved for this file), or when that is None or taken under the
    number after the highest in the folder, or after the last one tried when that name was taken (by
    another run, or by a name the pattern does not see)."""
    number = -1
    for attempt in range(MAX_NAME_TRIES):
        number = wanted if attempt == 0 and wanted is not None else max(_highest_number(folder, pattern), number) + 1
        target = folder / name_format.format(number)
        try:
            _publish(temp, target)
            return target
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free file name after {MAX_NAME_TRIES} tries (the last {target.name})")


class MadeFolders:
    """The folders made for a run's files, so that a run that saved nothing removes exactly those."""

    def __init__(self):
        self.made: list[Path] = []  # in the order made

    def make(self, folder: Path):
        missing = []
        while not folder.is_dir() and folder.parent != folder:
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
                self.made.append(folder)
            except FileExistsError:
                if not folder.is_dir():
                    raise NotADirectoryError(errno.ENOTDIR, f"{folder} is a file, not a folder") from None
                # another run made it at the same moment: theirs, not ours to remove

    def remove(self):
        for folder in reversed(self.made):
            try:
                folder.rmdir()  # only ever empty: a folder someone wrote into stays
            except OSError:
                pass
        self.made.clear()


class OutputFolder:
    """`outdir/samples/NNNNN.png` and `outdir/grid-NNNN.png`, numbered after the highest existing number
    (the originals count files, so a gap makes them overwrite), each written to a temporary file and
    renamed, so an interrupted run never leaves a broken PNG and nothing is ever overwritten.

    Folders are created by the first save, so a run that fails before saving anything leaves none behind;
    when even that first save fails, the folders it created are removed again.
    """

    # Case-insensitive: on such filesystems 00000.PNG takes the name 00000.png.
    SAMPLE = re.compile(r"(\d+)\.png", re.IGNORECASE)
    GRID = re.compile(r"grid-(\d+)\.png", re.IGNORECASE)
    SAMPLE_NAME = "{:05}.png"

    def __init__(self, outdir, save_samples: bool = True, resume: bool = False):
        """resume: --resume, a run that notes its files in a manifest and makes only what is missing
        (ldm.generate.sharding)."""
        self.outdir = Path(outdir)
        self.samples = self.outdir / "samples"
        self.save_samples = save_samples
        self.resume = resume
        self.made_folders = MadeFolders()
        self.files_saved = 0

    def check_writable(self):
        """Fail before any work if the folders cannot be created or written; creates nothing."""
        for folder in (self.outdir, self.samples) if self.save_samples else (self.outdir,):
            check_can_create(folder)

    def _save(self, what: str, folder: Path, pattern: re.Pattern, name_format: str, image: np.ndarray,
              text: str | None, number: int | None = None) -> Path:
        png = PngImagePlugin.PngInfo()
        if text:
            png.add_text("parameters", text)
        temp = None
        try:
            self.made_folders.make(folder)
            temp = _write_partial(folder, ".png", lambda f: Image.fromarray(image).save(f, format="PNG", pnginfo=png))
            target = _publish_numbered(temp, folder, pattern, name_format, number)
        except BaseException as error:  # a failed write or Ctrl-C
            if temp is not None:
                temp.unlink(missing_ok=True)
            if not self.files_saved:
                self.made_folders.remove()
            if isinstance(error, OSError):
                raise SaveFailed(what, folder, error) from None
            raise
        self.files_saved += 1
        return target

    def save_sample(self, image: np.ndarray, text: str | None, number: int | None = None) -> Path:
        """number: the file's reserved number; another is taken if a file already has it (never overwritten)."""
        return self._save("a picture", self.samples, self.SAMPLE, self.SAMPLE_NAME, image, text, number)

    def next_sample_number(self) -> int:
        """The number the next picture would get."""
        return _highest_number(self.samples, self.SAMPLE) + 1

    def sample_path(self, number: int) -> Path:
        return self.samples / self.SAMPLE_NAME.format(number)

    def save_grid(self, image: np.ndarray, text: str | None) -> Path:
        return self._save("the grid", self.outdir, self.GRID, "grid-{:04}.png", image, text)
