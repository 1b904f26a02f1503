"""Our .safetensors reader against the reference (the `safetensors` package): malformed headers of every
class refused by both, with one line naming the file; valid files accepted by both, with the same tensors;
and a fuzz run of mutated headers in which ours never accepts what the reference refuses."""
import json
import random
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load as reference_load_bytes

from ldm.checkpoint import CheckpointError, read_checkpoint
from ldm.safetensors_reader import DTYPE_BITS, MAX_HEADER_SIZE, SafetensorsError, read_safetensors

U64_MAX = 2 ** 64 - 1


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# A valid file: three tensors (48 bytes of data) and metadata.
VALID = {"__metadata__": {"format": "pt"}, "a": entry("F32", [2, 3], 0, 24), "b": entry("F16", [4], 24, 32),
         "c": entry("I64", [2], 32, 48)}
VALID_DATA_SIZE = 48


def file_bytes(header, data_size: int = VALID_DATA_SIZE, length: int | None = None) -> bytes:
    """A .safetensors file: the header (a dict, serialised, or raw bytes), then `data_size` bytes of data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    data = bytes((7 * i) % 251 for i in range(data_size))  # no NaN pattern, nothing special
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def with_tensor(name, value, header=VALID) -> dict:
    return {**header, name: value}


def reference_tensors(path):
    """The reference's reading of the file (safe_open: every tensor, as torch tensors), or None if it refuses it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except Exception:  # noqa: BLE001 - the reference's refusals come as several exception types
        return None


def reference_refuses_the_bytes(content: bytes) -> bool:
    """Whether the reference's in-memory reader (safetensors.torch.load) refuses these bytes too."""
    try:
        reference_load_bytes(content)
    except Exception:  # noqa: BLE001
        return True
    return False


def our_tensors(path):
    """Ours, or None where it refuses the file; any other exception fails the test."""
    try:
        state_dict, metadata = read_safetensors(path)
    except SafetensorsError as error:
        message = str(error)
        assert "\n" not in message and str(path) in message, f"not one line naming the file: {message!r}"
        return None
    return state_dict, metadata


def as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def assert_same_tensors(ours, reference):
    (state_dict, metadata), (reference_state_dict, reference_metadata) = ours, reference
    assert set(state_dict) == set(reference_state_dict)
    for key, tensor in state_dict.items():
        expected = reference_state_dict[key]
        assert (tensor.dtype, tensor.shape) == (expected.dtype, expected.shape), key
        assert as_bytes(tensor) == as_bytes(expected), key
    assert metadata == {"format": "safetensors", **reference_metadata}


# --- malformed headers: every class refused by both --------------------------------------------------------------
def nested(depth: int) -> bytes:
    return b'{"a":' + b"[" * depth + b"]" * depth + b"}"


MALFORMED = {
    # name: (file bytes, a fragment of our message)
    "negative offset": (file_bytes(with_tensor("a", entry("F32", [2, 3], -24, 0))), "data_offsets"),
    "reversed offsets": (file_bytes(with_tensor("c", entry("I64", [2], 48, 32))), "before it begins"),
    "float offsets": (file_bytes(with_tensor("c", entry("I64", [2], 32.0, 48))), "data_offsets"),
    "string offsets": (file_bytes(with_tensor("c", entry("I64", [2], "32", "48"))), "data_offsets"),
    "negative zero offset": (file_bytes(json.dumps(VALID).encode().replace(b"[0, 24]", b"[-0, 24]")),
                             "data_offsets"),
    "three offsets": (file_bytes(with_tensor("c", {**entry("I64", [2], 32, 48), "data_offsets": [32, 40, 48]})),
                      "data_offsets"),
    "shape and size disagree": (file_bytes(with_tensor("a", entry("F32", [2, 2], 0, 24))), "need 16"),
    "shape of floats": (file_bytes(with_tensor("a", entry("F32", [2.0, 3], 0, 24))), "shape"),
    "shape of booleans": (file_bytes(with_tensor("a", entry("F32", [True, 6], 0, 24))), "shape"),
    "negative shape": (file_bytes(with_tensor("a", entry("F32", [-2, -3], 0, 24))), "shape"),
    "shape not a list": (file_bytes(with_tensor("a", entry("F32", 6, 0, 24))), "shape"),
    "shape past 64 bits": (file_bytes(with_tensor("a", entry("F32", [2 ** 64, 0], 0, 0))), "shape"),
    "element count overflows": (file_bytes(with_tensor("a", entry("F32", [2 ** 40, 2 ** 40, 0], 0, 0))),
                                "64 bits"),
    "byte count overflows": (file_bytes(with_tensor("a", entry("F32", [2 ** 62], 0, 24))), "64 bits"),
    "short data": (file_bytes(VALID, data_size=40), "truncated"),
    "data cut to nothing": (file_bytes(VALID, data_size=0), "truncated"),
    "odd byte count": (file_bytes(with_tensor("a", entry("F32", [2, 3], 0, 22)), data_size=46), "need 24"),
    "sub-byte values that do not fill a byte": (
        file_bytes({"x": entry("F4", [3], 0, 2)}, data_size=2), "whole number of bytes"),
    "missing dtype": (file_bytes(with_tensor("a", {"shape": [2, 3], "data_offsets": [0, 24]})), "lacks dtype"),
    "missing shape": (file_bytes(with_tensor("a", {"dtype": "F32", "data_offsets": [0, 24]})), "lacks shape"),
    "missing offsets": (file_bytes(with_tensor("a", {"dtype": "F32", "shape": [2, 3]})), "lacks data_offsets"),
    "unknown dtype": (file_bytes(with_tensor("a", entry("F33", [2, 3], 0, 24))), "unknown dtype"),
    "lower-case dtype": (file_bytes(with_tensor("a", entry("f32", [2, 3], 0, 24))), "unknown dtype"),
    "entry is a number": (file_bytes(with_tensor("a", 24)), "not an object"),
    "entry is null": (file_bytes(with_tensor("a", None)), "not an object"),
    "entry is a string": (file_bytes(with_tensor("a", "F32")), "not an object"),
    "metadata is a list": (file_bytes({**VALID, "__metadata__": ["format", "pt"]}), "__metadata__"),
    "metadata is a string": (file_bytes({**VALID, "__metadata__": "pt"}), "__metadata__"),
    "metadata value is a number": (file_bytes({**VALID, "__metadata__": {"step": 1}}), "not a string"),
    "metadata value is nested": (file_bytes({**VALID, "__metadata__": {"a": {"b": "c"}}}), "not a string"),
    "metadata named twice": (file_bytes(b'{"__metadata__":{},"__metadata__":{}}', data_size=0), "twice"),
    "deeply nested": (file_bytes(nested(200), data_size=0), "not an object"),
    "nested past Python's recursion limit": (file_bytes(nested(100_000), data_size=0), "nested too deeply"),
    "overlap": (file_bytes(with_tensor("b", entry("F16", [4], 16, 24))), "overlaps"),
    "gap": (file_bytes(with_tensor("c", entry("I64", [2], 40, 56)), data_size=56), "belong to no tensor"),
    "first tensor not at 0": (file_bytes({"a": entry("F32", [2], 8, 16)}, data_size=16), "belong to no tensor"),
    "bytes after the last tensor": (file_bytes(VALID, data_size=52), "belong to no tensor"),
    "header length 0": (file_bytes(b"", data_size=0), "header length is 0"),
    "header length 1": (file_bytes(b"{", data_size=0), "header length is 1"),
    "header length over the limit": (file_bytes(b"{}", data_size=0, length=MAX_HEADER_SIZE + 1), "limit"),
    "header length 2**64 - 1": (file_bytes(b"{}", data_size=0, length=U64_MAX), "limit"),
    "header past the end": (file_bytes(b"{}", data_size=0, length=64), "truncated"),
    "file shorter than a length": (b"\x02\x00\x00", "truncated"),
    "not UTF-8": (file_bytes(b'{"\xff\xfe":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}', data_size=0),
                  "UTF-8"),
    "UTF-8 with a byte-order mark": (file_bytes(b"\xef\xbb\xbf{}", data_size=0), "start with"),
    "lone surrogate escape": (file_bytes(b'{"\\ud800":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}',
                                         data_size=0), "surrogate"),
    "not an object": (file_bytes(b"[1, 2]", data_size=0), "start with"),
    "not JSON": (file_bytes(b"{dtype: F32}", data_size=0), "not valid JSON"),
    "NaN in the header": (file_bytes(b'{"__metadata__":{"a":NaN}}', data_size=0), "NaN"),
    "control character after the object": (file_bytes(b"{}\x00\x00", data_size=0), "not valid JSON"),
    # valid for the format, but no torch tensor: refused by both as well
    "empty tensor with a dimension past int64": (file_bytes({"a": entry("F32", [0, 2 ** 63], 0, 0)}, data_size=0),
                                                 "more than torch can hold"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_header_is_refused_by_ours_and_by_the_reference(tmp_path, case):
    content, fragment = MALFORMED[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    assert reference_tensors(path) is None, "the reference accepts it: not a malformed case"
    assert reference_refuses_the_bytes(content)
    with pytest.raises(SafetensorsError) as error:
        read_safetensors(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and fragment in message, message
    with pytest.raises(CheckpointError) as error:  # what the scripts print (and exit 2 on)
        read_checkpoint(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


# --- valid files: accepted by both, with the same tensors ---------------------------------------------------------
VALID_FILES = {
    "three tensors and metadata": file_bytes(VALID),
    "no tensors": file_bytes(b"{}", data_size=0),
    "no tensors, padded header": file_bytes(b"{}      ", data_size=0),
    "metadata null": file_bytes({**VALID, "__metadata__": None}),
    "no metadata": file_bytes({key: value for key, value in VALID.items() if key != "__metadata__"}),
    "entries out of offset order": file_bytes(dict(reversed(list(VALID.items())))),
    "trailing whitespace": file_bytes(json.dumps(VALID).encode() + b" \t\r\n"),
    "zero-size tensors": file_bytes({"e": entry("F32", [0, 5], 0, 0), "s": entry("F32", [], 0, 4),
                                     "z": entry("BF16", [0], 4, 4)}, data_size=4),
    "misaligned data": file_bytes(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', data_size=8),
    "escaped names": file_bytes(b'{"\\u0061\\n":{"dtype":"F\\u0033\\u0032","shape":[1],"data_offsets":[0,4]}}',
                                data_size=4),
    "every dtype torch holds": file_bytes({
        "f64": entry("F64", [1], 0, 8), "c64": entry("C64", [1], 8, 16), "u64": entry("U64", [1], 16, 24),
        "u32": entry("U32", [1], 24, 28), "u16": entry("U16", [1], 28, 30), "bool": entry("BOOL", [1], 30, 31),
        "e4m3": entry("F8_E4M3", [1], 31, 32), "e5m2": entry("F8_E5M2", [1], 32, 33),
        "e8m0": entry("F8_E8M0", [1], 33, 34), "i8": entry("I8", [2], 34, 36)}, data_size=36),
}


@pytest.mark.parametrize("case", list(VALID_FILES))
def test_a_valid_file_is_read_as_the_reference_reads_it(tmp_path, case):
    path = tmp_path / "model.safetensors"
    path.write_bytes(VALID_FILES[case])
    reference = reference_tensors(path)
    assert reference is not None, "the reference refuses it: not a valid case"
    assert_same_tensors(our_tensors(path), reference)


# Where ours is stricter than the reference, on purpose (no real file is written so).
STRICTER = {
    "leading whitespace": (file_bytes(b" " + json.dumps(VALID).encode()), "start with '{'"),
    "a name twice, same entry": (file_bytes(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                            b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', data_size=8),
                                 "twice"),
    "a key beyond the three": (file_bytes(with_tensor("a", {**entry("F32", [2, 3], 0, 24), "note": 1})), "beyond"),
    # serde builds a struct from a list of its fields in order
    "an entry as a list of its fields": (file_bytes(with_tensor("a", ["F32", [2, 3], [0, 24]])), "described by a list"),
}


STRICTER_REASONS = [fragment for _, fragment in STRICTER.values()] + ["cannot load"]  # dtypes torch lacks


@pytest.mark.parametrize("case", list(STRICTER))
def test_what_ours_refuses_beyond_the_reference(tmp_path, case):
    content, fragment = STRICTER[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    assert reference_tensors(path) is not None
    with pytest.raises(SafetensorsError, match=fragment.replace("{", r"\{")):
        read_safetensors(path)


@pytest.mark.parametrize("dtype, size", [("F4", 1), ("F6_E2M3", 3)])
def test_a_valid_file_with_a_dtype_torch_cannot_hold_is_refused_as_such(tmp_path, dtype, size):
    path = tmp_path / "model.safetensors"
    path.write_bytes(file_bytes({"packed": entry(dtype, [4 if dtype.startswith("F6") else 2], 0, size)}, size))
    with pytest.raises(SafetensorsError) as error:
        read_safetensors(path)
    message = str(error.value)
    assert f"dtype {dtype}" in message and "cannot load" in message and "not a valid" not in message, message


# --- fuzz: mutated headers ---------------------------------------------------------------------------------------
NAMES = ["a", "b", "c", "__metadata__", "new"]
FIELDS = ["dtype", "shape", "data_offsets", "format", "extra"]
SIZES = [0, 1, 2, 3, 4, 6, 8, 24, 48, -1, 2 ** 32, 2 ** 63, U64_MAX, 2 ** 64]
JSON_VALUES = [None, True, False, *SIZES, -0.0, 1.5, 24.0, 1e300, float("nan"), float("inf"), "", "F32", "f32", "U16",
               "24", [], [0], [0, 24], [24, 0], [0, 24, 48], [2, 3], [[2, 3]], [True], {}, {"a": "b"}, {"a": 1},
               {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, ["F32", [2], [0, 8]]]


def json_value(rng: random.Random):
    return rng.randrange(-2 ** 69, 2 ** 69) if rng.random() < 0.2 else rng.choice(JSON_VALUES)


def mutate(header: dict, rng: random.Random) -> int:
    """Changes a value, key, offset, shape or dtype of the header in place; returns the change of the data size."""
    kind = rng.choice(["set", "delete", "offset", "offset", "shape", "shape", "dtype", "entry", "data size", "empty"])
    target = header.get(name := rng.choice(NAMES))
    if kind == "data size":
        return rng.randint(-16, 16)
    if kind == "empty" and isinstance(header.get("c"), dict):  # the last tensor made empty, with any other sizes
        shape = [rng.choice(SIZES) for _ in range(rng.randrange(3))]
        shape.insert(rng.randrange(len(shape) + 1), 0)
        header["c"].update(shape=shape, data_offsets=[32, 32])
        return -16
    if kind == "entry":
        header[name] = json_value(rng)
    elif not isinstance(target, dict):
        pass
    elif kind == "set":
        target[rng.choice(FIELDS)] = json_value(rng)
    elif kind == "delete":
        target.pop(rng.choice(FIELDS), None)
    elif kind == "offset" and isinstance(target.get("data_offsets"), list) and target["data_offsets"]:
        index = rng.randrange(len(target["data_offsets"]))
        if isinstance(target["data_offsets"][index], int):
            target["data_offsets"][index] += rng.randint(-16, 16)
    elif kind == "shape":
        target["shape"] = [rng.choice(SIZES) for _ in range(rng.randrange(4))]
    elif kind == "dtype":
        target["dtype"] = rng.choice(list(DTYPE_BITS))
    return 0


def mutated_file(rng: random.Random) -> bytes:
    """The valid file with one to three changes to its header, then maybe a byte of the serialised header
    replaced and a wrong header length."""
    header = json.loads(json.dumps(VALID))
    data_size = VALID_DATA_SIZE
    for _ in range(rng.randint(1, 3)):
        data_size = max(0, data_size + mutate(header, rng))
    raw = json.dumps(header).encode()
    if rng.random() < 0.15:
        position = rng.randrange(len(raw))
        raw = raw[:position] + bytes([rng.randrange(256)]) + raw[position + 1:]
    length_error = rng.choice([-1, 1, -8, 8, 2 ** 40, MAX_HEADER_SIZE]) if rng.random() < 0.2 else 0
    return file_bytes(raw, data_size, length=max(0, len(raw) + length_error))


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "mutated.safetensors"


def replace_file(path, content: bytes):
    """A new file each time: overwriting one still mapped by the last example's tensors is several times slower."""
    path.unlink(missing_ok=True)
    path.write_bytes(content)


HEADERS_PER_EXAMPLE = 10  # hypothesis' own cost per example is about that of ten headers checked


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2 ** 64 - 1))
def test_fuzz_ours_never_accepts_what_the_reference_refuses(fuzz_file, seed):
    """3000 mutated headers; a failure names the file's bytes."""
    rng = random.Random(seed)
    for _ in range(HEADERS_PER_EXAMPLE):
        check_against_the_reference(fuzz_file, mutated_file(rng))


def check_against_the_reference(fuzz_file, content: bytes):
    replace_file(fuzz_file, content)
    ours, reference = our_tensors(fuzz_file), reference_tensors(fuzz_file)
    if ours is not None:
        assert reference is not None, f"ours accepts a file the reference refuses: {content[:300]!r}"
        assert_same_tensors(ours, reference)
    elif reference is not None:  # ours refuses what the reference accepts: only where it is stricter on purpose
        try:
            read_safetensors(fuzz_file)
        except SafetensorsError as error:
            assert any(reason in str(error) for reason in STRICTER_REASONS), \
                f"ours refuses a file the reference accepts: {error} ({content[:300]!r})"
