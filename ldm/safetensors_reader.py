"""Reading .safetensors files: the header checked, the tensors memory-mapped (no copy).

The header is held to the rules of the reference implementation (the `safetensors` package, whose Rust
core refuses what is refused here), and to a few more that no real file breaks: no leading whitespace,
no duplicate names, entries with exactly `dtype`, `shape` and `data_offsets`. Independent of the rest of
ldm, so that it can be tested and fuzzed on its own; the loader turns a `SafetensorsError` into its
one-line message.
"""
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

HEADER_LENGTH_BYTES = 8
MAX_HEADER_SIZE = 100_000_000  # the reference's limit
U64_MAX = 2 ** 64 - 1  # shapes, offsets and sizes are u64 in the reference, overflow refused
TORCH_MAX_SIZE = 2 ** 63 - 1  # torch's sizes are int64 (only an empty tensor can have such a dimension)
ENTRY_KEYS = ("dtype", "shape", "data_offsets")
METADATA_KEY = "__metadata__"

# Every dtype the format defines, with its size in bits (F4 and F6 pack several values into a byte).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
_TORCH_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16", "U32": "uint32",
    "U64": "uint64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}
# The dtypes this torch can hold as tensors of their own (not the sub-byte F4 and F6).
SAFETENSORS_DTYPES = {name: getattr(torch, attribute) for name, attribute in _TORCH_DTYPE_NAMES.items()
                      if hasattr(torch, attribute)}


class SafetensorsError(ValueError):
    """A .safetensors file that must not be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple
    begin: int  # byte offsets into the data that follows the header
    end: int


@dataclass(frozen=True)
class Header:
    tensors: list  # of TensorEntry, in the file's order
    metadata: dict  # str -> str
    data_start: int  # where the data begins in the file


def read_safetensors(path, size: int | None = None) -> tuple[dict, dict]:
    """(state_dict, metadata) of a .safetensors file; the tensors are views of a private memory map."""
    path = Path(path)
    size = path.stat().st_size if size is None else size
    header = read_header(path, size)
    for entry in header.tensors:  # valid, but not what a torch tensor can be
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise SafetensorsError(f"{path}: tensor {_quoted(entry.name)} has dtype {entry.dtype}, which torch "
                                   f"{torch.__version__} cannot load: convert the checkpoint to F16 or F32")
        if any(size > TORCH_MAX_SIZE for size in entry.shape):
            raise SafetensorsError(f"{path}: tensor {_quoted(entry.name)} has shape {_shown(list(entry.shape))}, "
                                   "with a dimension more than torch can hold")
    # A private (copy-on-write) map: pages are read on demand and never written back.
    storage = torch.UntypedStorage.from_file(os.fspath(path), shared=False, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage)
    state_dict = {}
    for entry in header.tensors:
        dtype = SAFETENSORS_DTYPES[entry.dtype]
        begin = header.data_start + entry.begin
        chunk = raw[begin:header.data_start + entry.end]
        if begin % dtype.itemsize:
            chunk = chunk.clone()  # misaligned for a zero-copy view
        state_dict[entry.name] = chunk.view(dtype).reshape(entry.shape)
    return state_dict, {"format": "safetensors", **header.metadata}


def read_header(path, size: int | None = None) -> Header:
    """The header of the .safetensors file `path` (of `size` bytes), checked; SafetensorsError if it is malformed."""
    path = Path(path)
    size = path.stat().st_size if size is None else size
    with open(path, "rb") as f:
        length_field = f.read(HEADER_LENGTH_BYTES)
        if len(length_field) < HEADER_LENGTH_BYTES:
            raise SafetensorsError(f"checkpoint {path} is truncated ({size} bytes, too short for a .safetensors "
                                   "header): download or copy it again")
        header_size = struct.unpack("<Q", length_field)[0]
        if header_size > MAX_HEADER_SIZE:
            _malformed(path, f"its header length ({header_size} bytes) is over the format's limit of "
                             f"{MAX_HEADER_SIZE} bytes")
        if header_size > size - HEADER_LENGTH_BYTES:
            raise SafetensorsError(f"checkpoint {path} is truncated or corrupt (its header runs past the end): "
                                   "download or copy it again")
        if header_size < 2:
            _malformed(path, f"its header length is {header_size} bytes (at least 2, '{{}}', is needed)")
        header_bytes = f.read(header_size)
    data_start = HEADER_LENGTH_BYTES + header_size
    tensors, metadata = _parse_header(path, header_bytes)
    _check_coverage(path, tensors, data_start, size)
    return Header(tensors, metadata, data_start)


def _parse_header(path: Path, header_bytes: bytes) -> tuple[list, dict]:
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as error:
        _malformed(path, f"its header is not UTF-8 text (byte {error.start})")
    if not text.startswith("{"):
        _malformed(path, "its header does not start with '{'")
    try:
        parsed = json.loads(text, object_pairs_hook=_object_without_duplicates, parse_constant=_refuse_constant,
                            parse_int=_integer_or_float)
    except RecursionError:
        _malformed(path, "its header is nested too deeply")
    except json.JSONDecodeError as error:
        _malformed(path, f"its header is not valid JSON ({error.msg} at character {error.pos})")
    except ValueError as error:  # from the hooks
        _malformed(path, f"its header {error}")
    if not isinstance(parsed, dict):
        _malformed(path, "its header is not a JSON object")
    metadata = _metadata(path, parsed.pop(METADATA_KEY, None))
    return [_tensor_entry(path, name, entry) for name, entry in parsed.items()], metadata


def _object_without_duplicates(pairs: list) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"names {_quoted(key)} twice in one object")
        _check_encodable(key)
        seen.add(key)
    return dict(pairs)


def _integer_or_float(digits: str):
    """As the reference reads numbers (u64 or float): -0 and integers too long for a u64 are no indices."""
    return int(digits) if len(digits) <= 20 and digits != "-0" else float(digits)


def _refuse_constant(name: str):
    raise ValueError(f"holds {name}, which is not JSON")


def _check_encodable(text: str) -> None:
    """Python's json accepts lone surrogates (\\ud800) that cannot be UTF-8; the reference refuses them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"holds the string {_quoted(text)}, whose lone surrogate escape is not text") from None


def _metadata(path: Path, metadata) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        _malformed(path, f"its {METADATA_KEY} is {_kind(metadata)}, not an object of strings")
    for key, value in metadata.items():
        if not isinstance(value, str):
            _malformed(path, f"its {METADATA_KEY} entry {_quoted(key)} is {_kind(value)}, not a string")
        try:
            _check_encodable(value)
        except ValueError as error:
            _malformed(path, f"its {METADATA_KEY} entry {_quoted(key)} {error}")
    return metadata


def _tensor_entry(path: Path, name: str, entry) -> TensorEntry:
    label = f"tensor {_quoted(name)}"
    if not isinstance(entry, dict):
        _malformed(path, f"{label} is described by {_kind(entry)}, not an object")
    missing = [key for key in ENTRY_KEYS if key not in entry]
    extra = [key for key in entry if key not in ENTRY_KEYS]
    if missing:
        _malformed(path, f"{label} lacks {' and '.join(missing)}")
    if extra:
        _malformed(path, f"{label} has keys beyond {', '.join(ENTRY_KEYS)}: {', '.join(map(_quoted, extra))}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        _malformed(path, f"{label} has unknown dtype {_quoted(dtype) if isinstance(dtype, str) else _kind(dtype)}")
    if not isinstance(shape, list) or not all(_is_u64(size) for size in shape):
        _malformed(path, f"{label} has shape {_shown(shape)}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(offset) for offset in offsets):
        _malformed(path, f"{label} has data_offsets {_shown(offsets)}, not two non-negative integers")
    begin, end = offsets
    if begin > end:
        _malformed(path, f"{label} ends (byte {end}) before it begins (byte {begin})")
    elements = 1
    for size in shape:  # in order, as the reference multiplies: an overflow before a 0 is refused too
        elements *= size
        if elements > U64_MAX:
            _malformed(path, f"{label} has shape {_shown(shape)}, too many elements to count in 64 bits")
    bits = elements * DTYPE_BITS[dtype]
    if bits > U64_MAX:
        _malformed(path, f"{label} has shape {_shown(shape)}, too many bytes to count in 64 bits")
    if bits % 8:
        _malformed(path, f"{label}'s {elements} {dtype} values do not fill a whole number of bytes")
    if end - begin != bits // 8:
        _malformed(path, f"{label} spans {end - begin} bytes but its shape and dtype need {bits // 8}")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _check_coverage(path: Path, tensors: list, data_start: int, size: int) -> None:
    """The tensors, in offset order, must tile the data exactly: from 0, no overlap, no gap, to the file's end."""
    position = 0
    for entry in sorted(tensors, key=lambda entry: (entry.begin, entry.end)):
        if entry.begin < position:
            _malformed(path, f"tensor {_quoted(entry.name)} overlaps the one before it (it begins at byte "
                             f"{entry.begin}, before byte {position})")
        if entry.begin > position:
            _malformed(path, f"bytes {position} to {entry.begin} of its data belong to no tensor")
        position = entry.end
    if data_start + position > size:
        raise SafetensorsError(f"checkpoint {path} is truncated ({size} of {data_start + position} bytes): "
                               "download or copy it again")
    if data_start + position < size:
        _malformed(path, f"{size - data_start - position} bytes after its last tensor belong to no tensor")


def _is_u64(value) -> bool:
    return type(value) is int and 0 <= value <= U64_MAX  # not bool, which is an int in Python


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"the number {_shown(value)}")


def _shown(value, limit: int = 60) -> str:
    try:
        text = json.dumps(value) if not isinstance(value, float) else repr(value)
    except (RecursionError, ValueError):
        text = type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _quoted(name: str) -> str:
    """A name as one line of ASCII (json escapes newlines and other controls), shortened."""
    return _shown(name)


def _malformed(path: Path, what: str):
    raise SafetensorsError(f"{path} is not a valid .safetensors file: {what}")
