"""The checkpoints and VAEs the server offers, and the one model it keeps loaded.

Models come from A1111's folder `<models_dir>/Stable-diffusion/` and ours `<models_dir>/ldm/` (subfolders
too), plus the server's --ckpt; the embedded model when there is none. A request names a model only by an
entry of that list (its title, relative name or stem), never by a path, so no name can reach outside the
folders or load a file nobody put there; loading itself is ldm.generate.loading's (weights only, allowed
config targets).
"""
import gc
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.generate import loading
from ldm.pipeline import Pipeline
from ldm.server.errors import RequestProblem

CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors")
VAE_SUFFIXES = (".pt", ".ckpt", ".safetensors")
CHECKPOINT_FOLDERS = ("Stable-diffusion", "ldm")
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]$")  # A1111's titles end in " [shorthash]"


class UnknownName(RequestProblem):
    """A checkpoint or VAE name that is not in the list."""


@dataclass(frozen=True)
class Entry:
    name: str  # the file's path below its folder, with "/" (A1111's model_name is its stem)
    path: Path

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    def title(self, short_hash: str | None = None) -> str:
        return f"{self.name} [{short_hash}]" if short_hash else self.name

    def answers_to(self, asked: str) -> bool:
        asked = _HASH_SUFFIX.sub("", asked.strip()).replace("\\", "/")
        return asked in (self.name, self.stem, self.path.name)


def _files_below(folder: Path, suffixes: tuple) -> list[Entry]:
    if not folder.is_dir():
        return []
    found = sorted(path for path in folder.rglob("*") if path.suffix.lower() in suffixes and path.is_file())
    return [Entry(path.relative_to(folder).as_posix(), path) for path in found]


class ModelFolders:
    """What /sd-models and /sd-vae list; refresh() looks at the folders again."""

    def __init__(self, models_dir, ckpt=None):
        self.models_dir = Path(models_dir)
        self.ckpt = Path(ckpt) if ckpt else None
        self.refresh()

    def refresh(self):
        checkpoints = [entry for folder in CHECKPOINT_FOLDERS
                       for entry in _files_below(self.models_dir / folder, CHECKPOINT_SUFFIXES)]
        known = {entry.path.resolve() for entry in checkpoints}
        if self.ckpt is not None and self.ckpt.resolve() not in known:
            checkpoints.insert(0, Entry(self.ckpt.name, self.ckpt))
        if not checkpoints:
            checkpoints = [Entry("shapes-ldm/model.ckpt", loading.EMBEDDED_MODEL)]
        self.checkpoints = checkpoints
        self.vaes = _files_below(self.models_dir / "VAE", VAE_SUFFIXES)

    @property
    def default(self) -> Entry:
        """The server's --ckpt, else the first checkpoint found."""
        if self.ckpt is not None:
            return next(entry for entry in self.checkpoints if entry.path.resolve() == self.ckpt.resolve())
        return self.checkpoints[0]

    def checkpoint(self, asked: str) -> Entry:
        for entry in self.checkpoints:
            if entry.answers_to(asked):
                return entry
        raise UnknownName(f"no checkpoint named {asked!r}: GET /sdapi/v1/sd-models lists them "
                          f"({', '.join(entry.name for entry in self.checkpoints[:10])})")

    def vae(self, asked: str) -> Entry | None:
        """None for "Automatic" (a VAE beside the checkpoint, as A1111) and "None" (the checkpoint's own)."""
        if asked in ("Automatic", "None"):
            return None
        for entry in self.vaes:
            if entry.answers_to(asked):
                return entry
        names = ", ".join(["Automatic", "None", *(entry.name for entry in self.vaes[:10])])
        raise UnknownName(f"no VAE named {asked!r}: GET /sdapi/v1/sd-vae lists them ({names})")


class ResidentModel:
    """The one loaded model. Used from the job worker only, so that no two loads overlap and a switch never
    happens under a running job; the old model is freed before the next one loads (one model in memory)."""

    def __init__(self, device: str = "auto", precision: str = "autocast", low_memory: bool = False,
                 embeddings_dir=None, log=print):
        self.device, self.precision, self.low_memory = device, precision, low_memory
        self.embeddings_dir, self.log = embeddings_dir, log
        self.pipeline: Pipeline | None = None
        self.key: tuple | None = None  # (checkpoint path, VAE choice) of what is loaded

    def get(self, checkpoint: Entry, vae_choice: str, vae: Entry | None) -> Pipeline:
        key = (checkpoint.path, vae_choice)
        if self.pipeline is not None and self.key == key:
            return self.pipeline
        self.free()
        vae_argument = "none" if vae_choice == "None" else (str(vae.path) if vae is not None else None)
        self.log(f"loading {checkpoint.name}" + (f" with VAE {vae_choice}" if vae_choice != "Automatic" else ""))
        self.pipeline = Pipeline.from_pretrained(checkpoint.path, device=self.device, precision=self.precision,
                                                 low_memory=self.low_memory, vae=vae_argument,
                                                 embeddings_dir=self.embeddings_dir, log=self.log)
        self.key = key
        return self.pipeline

    def free(self):
        if self.pipeline is None:
            return
        device = self.pipeline.loaded.device
        self.pipeline, self.key = None, None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def short_hash(self) -> str | None:
        pipeline = self.pipeline  # read once: the worker may be switching models meanwhile
        return pipeline.loaded.hash if pipeline is not None else None
