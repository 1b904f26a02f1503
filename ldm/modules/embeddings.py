"""Textual-inversion embeddings, as AUTOMATIC1111 users keep them: files in a folder, used by name.

Every ``.pt``, ``.bin`` and ``.safetensors`` file in the embeddings folder (and its subfolders) is an
embedding named after its file (``EasyNegative.safetensors`` -> ``EasyNegative``). Where the name's
tokens appear in a prompt, the embedding's k vectors take k places in the chunk instead of them
(``EmbeddingDatabase.find_embedding``, the ``prompt_encoding.FindEmbedding`` protocol).

Formats (what A1111's ``create_embedding_from_data`` reads):
- A1111's ``.pt``: ``{"string_to_param": {"*": [k, dim]}, ...}``;
- a single tensor under any name: ``.safetensors`` and older ``.pt`` files with ``emb_params`` [k, dim],
  diffusers' ``learned_embeds.bin`` ``{token: [dim] or [k, dim]}``;
- SDXL's ``{"clip_l": [k, 768], "clip_g": [k, 1280]}``: each of SDXL's text encoders takes its own
  vectors (CLIP ViT-L ``clip_l``, OpenCLIP ViT-bigG ``clip_g``; the refiner has only the latter), as A1111's
  ``textual_inversion_key``; an SD embedding is skipped for SDXL and an SDXL embedding for SD.

Nothing in a file runs: pickles go through ``torch.load(weights_only=True)``, ``.safetensors`` through
our own reader. An embedding whose vector size is not this text encoder's (an SD 2.x embedding with an
SD 1.x model, say) is skipped with one line, as A1111 skips it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ldm.checkpoint import load_pickle_weights
from ldm.generate.output import file_sha256
from ldm.modules.encoders.tokenizer import VOCAB_SIZE, get_tokenizer
from ldm.safetensors_reader import SafetensorsError, read_safetensors

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
DEFAULT_EMBEDDINGS_DIR = "embeddings"
SHORT_HASH_LENGTH = 12  # A1111's Embedding.shorthash: the file's sha256, first 12 hex digits
SDXL_KEYS = ("clip_l", "clip_g")  # an SDXL embedding's vectors for each text encoder


class EmbeddingError(Exception):
    """An embedding file that cannot be used; the message is one line naming the file and the fix."""


class EmbeddingSkipped(EmbeddingError):
    """A valid embedding that does not fit this model (another family, another vector size)."""


@dataclass(frozen=True, eq=False)
class Embedding:
    name: str
    vectors: torch.Tensor  # [k, dim] float32: what replaces the name's tokens (SDXL: each encoder's side by side)
    path: Path
    sha256: str  # of the whole file, as A1111 hashes it
    per_encoder: dict | None = None  # SDXL: {"clip_l": [k, 768], "clip_g": [k, 1280]}; None for SD

    def for_encoder(self, key: str) -> "Embedding":
        """The embedding as the text encoder `key` of SDXL_KEYS takes it: its own vectors."""
        return Embedding(self.name, self.per_encoder[key], self.path, self.sha256)

    @property
    def hash(self) -> str:
        """A1111's short hash, written in the infotext's "TI hashes"."""
        return self.sha256[:SHORT_HASH_LENGTH]

    @property
    def n_vectors(self) -> int:
        return self.vectors.shape[0]


def _load_pickle(path: Path):
    if path.stat().st_size == 0:
        raise EmbeddingError(f"embedding {path} is empty (0 bytes): download or copy it again, or remove it")
    return load_pickle_weights(path, EmbeddingError, f"embedding {path}", "use a .safetensors embedding or remove "
                               "the file", f"embedding {path}", "download or copy it again, or remove it",
                               also_corrupt=(ValueError,))


def read_embedding_data(path) -> object:
    """What the file holds (a dict for every known format), read without running anything in it."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        try:
            state_dict, _metadata = read_safetensors(path)
        except SafetensorsError as error:
            raise EmbeddingError(f"{error} (an embedding: download it again, or remove it)") from None
        return state_dict
    return _load_pickle(path)


def vectors_of(data, path) -> torch.Tensor:
    """The embedding's vectors [k, dim] in float32, from what ``read_embedding_data`` returned."""
    if not isinstance(data, dict) or not data:
        raise EmbeddingError(f"{path} is not a textual-inversion embedding (it holds {_described(data)})")
    if "string_to_param" in data:
        tensors = data["string_to_param"]
        if not isinstance(tensors, dict):
            raise EmbeddingError(f"{path}: its string_to_param is {_described(tensors)}, not a dict of tensors")
    elif is_sdxl_data(data):
        raise EmbeddingSkipped(f"embedding {path} is for SDXL (clip_l and clip_g vectors), not this model family: skipped")
    else:
        tensors = data
    if len(tensors) != 1 or not isinstance(next(iter(tensors.values())), torch.Tensor):
        names = ", ".join(sorted(map(str, tensors))[:4])
        raise EmbeddingError(f"{path} is not a textual-inversion embedding: an embedding holds one tensor, this "
                             f"holds {len(tensors)} entries ({names})")
    return checked_vectors(next(iter(tensors.values())), path)


def is_sdxl_data(data) -> bool:
    return isinstance(data, dict) and all(key in data for key in SDXL_KEYS)


def checked_vectors(vectors, path) -> torch.Tensor:
    """A file's tensor as an embedding's vectors [k, dim] float32 (a copy), or EmbeddingError."""
    if not isinstance(vectors, torch.Tensor):
        raise EmbeddingError(f"{path} is not a textual-inversion embedding (it holds {_described(vectors)})")
    vectors = vectors.detach()
    if vectors.ndim == 1:  # diffusers' learned_embeds.bin of one vector
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2 or 0 in vectors.shape or not vectors.dtype.is_floating_point:
        raise EmbeddingError(f"{path}: its vectors are a {vectors.dtype} tensor of shape {list(vectors.shape)}; "
                             "an embedding is a float [vectors, size] tensor")
    vectors = vectors.to(torch.float32, copy=True)  # a copy: the file's memory map is let go
    if not torch.isfinite(vectors).all():
        raise EmbeddingError(f"embedding {path} holds NaN or infinite values: download it again, or remove it")
    return vectors


def read_embedding(path, vector_size: int | dict | None = None) -> Embedding:
    """The embedding in ``path``, named after the file; ``EmbeddingSkipped`` when its vector size is not
    ``vector_size`` (None: any size; SDXL: {key of SDXL_KEYS: size} of the model's text encoders)."""
    path = Path(path)
    data = read_embedding_data(path)
    if isinstance(vector_size, dict) or (vector_size is None and is_sdxl_data(data)):
        return read_sdxl_embedding(path, data, vector_size)
    vectors = vectors_of(data, path)
    if vector_size is not None and vectors.shape[1] != vector_size:
        raise EmbeddingSkipped(f"embedding {path} has vectors of size {vectors.shape[1]}, this model's text encoder "
                               f"takes {vector_size} (an embedding for another model family): skipped")
    return Embedding(path.stem, vectors, path, file_sha256(path))


def read_sdxl_embedding(path: Path, data, vector_sizes: dict | None) -> Embedding:
    """An SDXL embedding: the vectors of each text encoder of `vector_sizes` (None: both), one count of vectors."""
    if not is_sdxl_data(data):
        raise EmbeddingSkipped(f"embedding {path} is for SD 1.x/2.x (one set of vectors), and this SDXL model takes "
                               "clip_l and clip_g vectors: skipped")
    per_encoder = {key: checked_vectors(data[key], path) for key in SDXL_KEYS}
    if per_encoder["clip_l"].shape[0] != per_encoder["clip_g"].shape[0]:
        raise EmbeddingError(f"embedding {path} has {per_encoder['clip_l'].shape[0]} clip_l vectors and "
                             f"{per_encoder['clip_g'].shape[0]} clip_g vectors; an SDXL embedding has as many of each")
    for key, size in (vector_sizes or {}).items():
        if per_encoder[key].shape[1] != size:
            raise EmbeddingSkipped(f"embedding {path} has {key} vectors of size {per_encoder[key].shape[1]}, this "
                                   f"model's text encoder takes {size}: skipped")
    vectors = torch.cat([per_encoder[key] for key in SDXL_KEYS], dim=1)
    return Embedding(path.stem, vectors, path, file_sha256(path), per_encoder)


def vector_sizes(text_encoder: nn.Module) -> int | dict:
    """token_vector_size, or for SDXL's conditioner {key of SDXL_KEYS: size} of each of its text encoders."""
    keys = getattr(text_encoder, "textual_inversion_keys", None)
    if keys is None:
        return token_vector_size(text_encoder)
    return {key: token_vector_size(encoder) for key, encoder in zip(keys(), text_encoder.text_encoders)}


def token_vector_size(text_encoder: nn.Module) -> int:
    """The size of a token's vector in the text encoder: that of its vocabulary's embedding table."""
    for module in text_encoder.modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings == VOCAB_SIZE:
            return module.embedding_dim
    raise ValueError(f"{type(text_encoder).__name__} has no token embedding of {VOCAB_SIZE} tokens")


def embedding_files(folder: Path) -> list[Path]:
    """The embedding files under ``folder``, subfolders included (as A1111), in a stable order."""
    found = []
    for root, _dirs, names in os.walk(folder, followlinks=True):
        found += [Path(root) / name for name in names if Path(name).suffix.lower() in EMBEDDING_SUFFIXES]
    return sorted(found)


class EmbeddingDatabase:
    """The embeddings of a folder that fit this model, looked up by their names' tokens.

    ``folder`` None is the default folder (``embeddings/``), which need not exist; a folder named by
    the user must. A file that cannot be read (corrupt, pickled code, not an embedding) raises
    ``EmbeddingError`` unless ``skip_bad``, when it is logged and left out; a file for another model
    (vector size, SDXL) is always logged and left out.
    """

    def __init__(self, folder=None, tokenizer=None, vector_size: int | None = None,
                 log: Callable[[str], None] = print, skip_bad: bool = False):
        self.folder = Path(DEFAULT_EMBEDDINGS_DIR if folder is None else folder)
        self.tokenizer = tokenizer or get_tokenizer()
        self.vector_size = vector_size
        self.embeddings: dict[str, Embedding] = {}
        self.skipped: list[str] = []  # one line per file left out
        self.used: dict[str, Embedding] = {}  # what find_embedding placed since forget_used, in order
        # first token id -> [(the name's token ids, embedding)], longest name first (A1111's ids_lookup)
        self.ids_lookup: dict[int, list[tuple[list[int], Embedding]]] = {}
        if not self.folder.is_dir():
            if folder is not None:
                raise EmbeddingError(f"--embeddings_dir {folder}: no such folder (give a folder of .pt, .bin or "
                                     ".safetensors embeddings)")
            return
        for path in embedding_files(self.folder):
            try:
                self.add(read_embedding(path, vector_size))
            except EmbeddingSkipped as skipped:
                self._skip(str(skipped), log)
            except EmbeddingError as error:
                if not skip_bad:
                    raise EmbeddingError(f"{error} (--skip_bad_embeddings runs without it)") from None
                self._skip(f"{error}: skipped", log)

    def _skip(self, line: str, log) -> None:
        self.skipped.append(line)
        log(line)

    def add(self, embedding: Embedding) -> None:
        if embedding.name in self.embeddings:
            raise EmbeddingSkipped(f"embedding {embedding.path}: the name {embedding.name!r} is taken by "
                                   f"{self.embeddings[embedding.name].path}: skipped")
        ids = self.tokenizer.encode(embedding.name)
        if not ids:
            raise EmbeddingSkipped(f"embedding {embedding.path}: its name has no tokens to write in a prompt: skipped")
        self.embeddings[embedding.name] = embedding
        matches = self.ids_lookup.setdefault(ids[0], [])
        matches.append((ids, embedding))
        matches.sort(key=lambda match: len(match[0]), reverse=True)

    def __len__(self) -> int:
        return len(self.embeddings)

    def find_embedding(self, token_ids: list[int], position: int) -> tuple[Embedding, int, int] | None:
        """The embedding whose name's tokens start at ``position``: (embedding, its vector count, its
        name's token count); the longest name wins, as in A1111."""
        for ids, embedding in self.ids_lookup.get(token_ids[position], ()):
            if token_ids[position:position + len(ids)] == ids:
                self.used.setdefault(embedding.name, embedding)
                return embedding, embedding.n_vectors, len(ids)
        return None

    def lookup_for(self, key: str):
        """find_embedding for SDXL's text encoder `key` (of SDXL_KEYS): the embeddings with its own vectors."""
        def find(token_ids: list[int], position: int):
            found = self.find_embedding(token_ids, position)
            return None if found is None else (found[0].for_encoder(key), *found[1:])
        return find

    def forget_used(self) -> None:
        """Start a new record of the embeddings used (a run's "TI hashes")."""
        self.used.clear()

    def used_in(self, chunk_lists: Iterable) -> list[Embedding]:
        """The embeddings placed in chunks (``prompt_encoding.PromptChunk`` lists), each once, in order."""
        used = {}
        for chunks in chunk_lists:
            for chunk in chunks:
                for fix in chunk.fixes:
                    used.setdefault(fix.embedding.name, fix.embedding)
        return list(used.values())


def load_embeddings(folder, text_encoder: nn.Module, log: Callable[[str], None] = print,
                    skip_bad: bool = False) -> EmbeddingDatabase:
    """The embeddings of ``folder`` (None: ``embeddings/``) that fit ``text_encoder``, with one line
    saying which were loaded."""
    database = EmbeddingDatabase(folder, vector_size=vector_sizes(text_encoder), log=log, skip_bad=skip_bad)
    if database.embeddings:
        log(f"{len(database)} textual-inversion embeddings from {database.folder}: {', '.join(database.embeddings)}")
    return database


def ti_hashes(embeddings: Iterable[Embedding]) -> str | None:
    """A1111's "TI hashes" infotext value, ``name: hash, name: hash`` (None when there are none); names
    lose their ``:`` and ``,`` so that the value reads back."""
    pairs = [f"{embedding.name.replace(':', '').replace(',', '')}: {embedding.hash}" for embedding in embeddings]
    return ", ".join(dict.fromkeys(pairs)) or None


def _described(value) -> str:
    if isinstance(value, dict):
        return "an empty dict" if not value else f"a dict of {len(value)} entries"
    return f"a {type(value).__name__}"
