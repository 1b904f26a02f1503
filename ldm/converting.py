"""Converting between the two worlds: a diffusers pipeline folder written as one original-layout .safetensors.

The folder is read as loading it reads it (ldm.diffusers_folder: the exact inverse of diffusers' own
conversion, memory-mapped views), and its tensors are streamed one at a time into the output, so that memory
stays far below the model's size. The output is written under a temporary name in its folder and renamed when
complete (a failure leaves no partial file), never over an existing file unless `overwrite`; the config our
loader chose for the folder is copied beside it as <out>.yaml, so that the file loads with it.
"""
from pathlib import Path

import torch

from ldm.checkpoint import CheckpointError
from ldm.generate.output import _write_partial
from ldm.merging import _copy_partial, _place
from ldm.placement import file_backed_ranges, release_file_pages
from ldm.safetensors_writer import PlannedTensor, StreamingWriter


class ConvertError(Exception):
    """Bad input or an output that cannot be written: one line naming the problem and the fix."""


def check_output(out: Path, overwrite: bool, suffix: str = ".safetensors") -> Path:
    """The .yaml beside `out`; refuses (one line) an output of another kind, in a missing folder, or existing."""
    if out.suffix.lower() != suffix:
        raise ConvertError(f"the output {out} must be a {suffix} file")
    config_out = out.with_suffix(".yaml")
    for target in (out, config_out):
        if target.exists() and not overwrite:
            raise ConvertError(f"{target} exists: pass --overwrite to replace it, or choose another --out")
    if not out.parent.is_dir():
        raise ConvertError(f"the output folder {out.parent} does not exist: create it or choose another --out")
    return config_out


def output_dtype(tensor: torch.Tensor, fp16: bool) -> torch.dtype:
    return torch.float16 if fp16 and tensor.is_floating_point() else tensor.dtype


def write_safetensors(f, state_dict: dict, fp16: bool = False, metadata: dict | None = None) -> None:
    """`state_dict` streamed into the open binary file `f`, one tensor converted at a time."""
    planned = [PlannedTensor(key, output_dtype(tensor, fp16), tuple(tensor.shape)) for key, tensor in state_dict.items()]
    writer = StreamingWriter(f, planned, metadata or {"format": "pt"})
    # The memory-mapped sources' pages are given back once written (read again from their files if ever
    # needed), so that converting does not leave the whole model resident.
    mapped = file_backed_ranges()
    for entry in writer.order:
        writer.write(entry.name, state_dict[entry.name].to(entry.dtype))
        release_file_pages(state_dict[entry.name], mapped)
    writer.finish()


def publish_checkpoint(state_dict: dict, config_path: Path, out, fp16=False, overwrite=False) -> Path:
    """`state_dict` as the .safetensors file `out` with `config_path` copied beside it; returns <out>.yaml."""
    out = Path(out)
    config_out = check_output(out, overwrite)
    try:
        temp = _write_partial(out.parent, out.suffix, lambda f: write_safetensors(f, state_dict, fp16))
    except OSError as error:
        raise ConvertError(f"cannot write {out}: {error.strerror or error}") from None
    config_temp = None
    try:
        config_temp = _copy_partial(config_path, config_out)
        _place(temp, out, overwrite)
        _place(config_temp, config_out, overwrite)
    except FileExistsError:
        for path in (temp, config_temp):
            if path is not None:
                path.unlink(missing_ok=True)
        raise ConvertError(f"{out} or {config_out.name} appeared while converting: pass --overwrite to replace it, "
                           "or choose another --out") from None
    except OSError as error:
        for path in (temp, config_temp):
            if path is not None:
                path.unlink(missing_ok=True)
        raise ConvertError(f"cannot write {out}: {error.strerror or error}") from None
    return config_out


def folder_to_checkpoint(folder, out, fp16=False, overwrite=False, config_path=None, log=print) -> Path:
    """The diffusers folder `folder` as the original-layout .safetensors file `out`, its config beside it."""
    from ldm.diffusers_folder import is_diffusers_folder, read_diffusers_folder

    folder, out = Path(folder), Path(out)
    if not folder.exists():
        raise ConvertError(f"{folder} does not exist: pass the path of a diffusers pipeline folder")
    if not is_diffusers_folder(folder):
        raise ConvertError(f"{folder} is not a diffusers pipeline folder (no model_index.json in it)")
    check_output(out, overwrite)  # before reading anything
    try:
        state_dict, config_path, _ = read_diffusers_folder(folder, config_path)
    except CheckpointError as error:
        raise ConvertError(str(error)) from None
    if not Path(config_path).is_file():
        raise ConvertError(f"config not found: {config_path} (pass --config with the path of a model YAML)")
    publish_checkpoint(state_dict, Path(config_path), out, fp16=fp16, overwrite=overwrite)
    log(f"wrote {out} ({len(state_dict)} tensors{', fp16' if fp16 else ''}) and {out.with_suffix('.yaml').name} "
        f"(config {Path(config_path).name})")
    return out
