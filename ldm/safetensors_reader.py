"""Reading .safetensors files: the header checked, the tensors memory-mapped (no copy).

Independent of the rest of ldm, so that it can be tested and fuzzed on its own; the loader turns a
`SafetensorsError` into its one-line message.
"""
import json
import os
import struct
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsError(ValueError):
    """A .safetensors file that must not be loaded; the message names the file and the problem."""


def read_safetensors(path, size: int | None = None) -> tuple[dict, dict]:
    """(state_dict, metadata) of a .safetensors file; the tensors are views of a private memory map."""
    path = Path(path)
    size = path.stat().st_size if size is None else size
    with open(path, "rb") as f:
        header_size = struct.unpack("<Q", f.read(8))[0]
        if header_size > size - 8:
            raise SafetensorsError(f"checkpoint {path} is truncated or corrupt (its header runs past the end): "
                                  "download or copy it again")
        try:
            header = json.loads(f.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SafetensorsError(f"{path} is not a valid .safetensors file (unreadable header)") from None
    metadata = {"format": "safetensors", **(header.pop("__metadata__", None) or {})}
    data_start = 8 + header_size
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if data_start + data_end > size:
        raise SafetensorsError(f"checkpoint {path} is truncated ({size} of {data_start + data_end} bytes): "
                              "download or copy it again")
    # A private (copy-on-write) map: pages are read on demand and never written back.
    storage = torch.UntypedStorage.from_file(os.fspath(path), shared=False, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage)
    state_dict = {}
    for key, entry in header.items():
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise SafetensorsError(f"{path}: tensor {key} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        chunk = raw[data_start + begin:data_start + end]
        if (data_start + begin) % dtype.itemsize:
            chunk = chunk.clone()  # misaligned for a zero-copy view
        state_dict[key] = chunk.view(dtype).reshape(entry["shape"])
    return state_dict, metadata
