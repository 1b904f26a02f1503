"""Writing a .safetensors file one tensor at a time, so that a file far larger than memory can be made.

The format puts every tensor's dtype, shape and byte range in the header, before the data: so the
writer is given the list of tensors first (names, dtypes, shapes), writes the header, then takes the
tensors one by one in that order. Tensors are laid out as the reference (the `safetensors` package) does,
wider dtypes first and then by name, with the header padded with spaces to a multiple of 8 bytes: every
tensor starts at an offset aligned for its dtype, so that readers can map it without a copy.
"""
import json
import struct
from dataclasses import dataclass

import torch

from ldm.safetensors_reader import SAFETENSORS_DTYPES

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
HEADER_ALIGNMENT = 8


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def file_order(planned: list) -> list:
    """The order of the tensors in the file: by dtype width, widest first, then by name (as the reference)."""
    return sorted(planned, key=lambda entry: (-entry.dtype.itemsize, entry.name))


def header_bytes(planned: list, metadata: dict | None = None) -> bytes:
    """The length field and the JSON header for `planned` (in file order), padded to 8 bytes."""
    header = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for entry in planned:
        if entry.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {entry.name} has dtype {entry.dtype}, which .safetensors cannot hold")
        header[entry.name] = {"dtype": DTYPE_NAMES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(len(text) + 8) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text


class StreamingWriter:
    """Writes the tensors of `planned` to the open binary file `f`: the header now, then one `write` per
    tensor, in `order` (file order); `finish` checks that every tensor was written."""

    def __init__(self, f, planned: list, metadata: dict | None = None):
        self.f = f
        self.order = file_order(planned)
        if len({entry.name for entry in self.order}) != len(self.order):
            raise ValueError("two tensors with one name")
        f.write(header_bytes(self.order, metadata))
        self.written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.written >= len(self.order):
            raise ValueError(f"tensor {name} is one more than planned")
        entry = self.order[self.written]
        if name != entry.name or tensor.dtype != entry.dtype or tuple(tensor.shape) != tuple(entry.shape):
            raise ValueError(f"tensor {name} ({tensor.dtype}, {tuple(tensor.shape)}) is written where {entry.name} "
                             f"({entry.dtype}, {entry.shape}) was planned")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self.f.write(memoryview(data.numpy()))
        self.written += 1

    def finish(self) -> None:
        if self.written != len(self.order):
            raise ValueError(f"{len(self.order) - self.written} planned tensors were not written")
