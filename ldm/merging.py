"""Merging two or three checkpoints (A1111's checkpoint merger), streamed tensor by tensor into a .safetensors file.

As A1111's modules/extras.py run_modelmerger:
- weighted sum: A·(1 − M) + B·M; add difference: A + (B − C)·M;
- only keys with "model" in their name are merged, and not the text encoder's position ids; keys only in
  A are kept as they are, keys only in B (or C) are left out; a key of B missing from C adds nothing;
- an inpainting (9 input channels) or instruct-pix2pix (8) model A merged with a normal B: the first 4
  channels are merged, the rest kept; the other way round is refused (A must be the special model);
- fp16 on request; a VAE file can be baked in (its weights replace A's autoencoder);
- LoRA files can be baked in (not A1111's merger: as its LoRA extension merges them, after the merge).
Results are computed in fp32 (fp64 when an input is) and stored in the inputs' promoted dtype (fp16 with
`fp16`). Nothing is held whole: every input is memory-mapped (.safetensors, zip .ckpt) and each tensor is
read, merged, written and its file pages given back before the next; only a legacy (pre-zip) pickle,
which torch cannot map, is read whole into memory. The output is written under a temporary name in its
folder and renamed when complete, so that a failure leaves no partial file.
"""
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.checkpoint import CheckpointError, all_finite, find_config, parameters_on_meta, read_checkpoint
from ldm.generate.output import _publish, _write_partial
from ldm.modules.lora import LoraError, LoraPatcher, read_lora
from ldm.placement import mapped_ranges, release_file_pages
from ldm.safetensors_writer import PlannedTensor, StreamingWriter
from ldm.util import ConfigError, check_config_targets, instantiate_from_config, read_config
from ldm.vae_file import IGNORED_PREFIXES, PREFIX as VAE_PREFIX, read_vae

METHODS = ("weighted_sum", "add_difference")
SKIPPED_KEYS = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)  # A1111's skip list
LATENT_CHANNELS = 4
CHUNK_ELEMENTS = 1 << 22  # values merged at a time within one tensor
SPECIAL_INPUT_CHANNELS = {9: "inpainting", 8: "instruct-pix2pix"}


class MergeError(Exception):
    """A merge that cannot be made; the message is one line naming the file or tensor and the fix."""


@dataclass
class Input:
    """One checkpoint to merge: its tensors as views of the memory-mapped file, and where it is mapped."""
    label: str  # A, B or C
    path: Path
    tensors: dict
    ranges: list = field(default_factory=list)

    @classmethod
    def open(cls, label: str, path) -> "Input":
        path = Path(path)
        try:
            tensors, _ = read_checkpoint(path)
        except CheckpointError as error:
            raise MergeError(f"model {label}: {error}") from None
        return cls(label, path, tensors, mapped_ranges(path))

    def release(self, key: str) -> None:
        """Give back the pages of this file under tensor `key`, read once and no longer needed."""
        if key in self.tensors:
            release_file_pages(self.tensors[key], self.ranges)


@dataclass
class MergeReport:
    merged: int = 0
    kept_from_a: int = 0  # A's tensors taken as they are (not merged, or missing from B)
    left_out: int = 0  # tensors only in B (or C)
    special: str | None = None  # "inpainting" or "instruct-pix2pix" when A's extra channels were kept
    vae: str | None = None
    lora_weights: int = 0  # weights a LoRA changed

    def line(self, out: Path) -> str:
        size = out.stat().st_size / 2**30
        notes = [f"{self.kept_from_a} kept from A as they are"]
        if self.left_out:
            notes.append(f"{self.left_out} only in B or C left out")
        if self.special:
            notes.append(f"A's {self.special} input channels kept")
        if self.vae:
            notes.append(f"VAE {self.vae} baked in")
        if self.lora_weights:
            notes.append(f"LoRAs baked into {self.lora_weights} weights")
        return f"merged {self.merged} tensors into {out} ({size:.2f} GiB; {', '.join(notes)})"


@dataclass
class Merge:
    a: Input
    b: Input
    c: Input | None
    method: str
    multiplier: float
    fp16: bool = False
    vae: object = None  # an ldm.vae_file.VaeFile to bake in
    lora_deltas: dict = field(default_factory=dict)  # parameter name -> {rows or None: fp32 delta} to add
    lora_names: list = field(default_factory=list)

    def merges(self, key: str) -> bool:
        tensor = self.a.tensors[key]
        return ("model" in key and key not in SKIPPED_KEYS and key in self.b.tensors and tensor.is_floating_point()
                and self.b.tensors[key].is_floating_point())

    def vae_key(self, key: str) -> str | None:
        if self.vae is not None and key.startswith(VAE_PREFIX) and key[len(VAE_PREFIX):] in self.vae.tensors:
            return key[len(VAE_PREFIX):]
        return None  # not the autoencoder's, or a training leftover (loss.*) that A keeps

    def output_dtype(self, key: str) -> torch.dtype:
        tensor = self.a.tensors[key]
        if (vae_key := self.vae_key(key)) is not None:
            dtype = self.vae.tensors[vae_key].dtype
        elif self.merges(key):
            dtype = torch.promote_types(tensor.dtype, self.b.tensors[key].dtype)
            if self.c is not None and key in self.c.tensors and self.c.tensors[key].is_floating_point():
                dtype = torch.promote_types(dtype, self.c.tensors[key].dtype)
        else:
            dtype = tensor.dtype
        return torch.float16 if self.fp16 and dtype.is_floating_point else dtype

    def plan(self) -> list:
        return [PlannedTensor(key, self.output_dtype(key), tuple(tensor.shape)) for key, tensor in self.a.tensors.items()]

    def check(self) -> None:
        """Refuse, before anything is written, inputs that cannot be merged: no shared tensors, shapes that
        differ (other than A's extra input channels), a VAE that does not fit A."""
        if not any(self.merges(key) for key in self.a.tensors):
            raise MergeError(f"models A ({self.a.path.name}) and B ({self.b.path.name}) share no tensor to merge: "
                             "merge checkpoints of one model family")
        for key in self.a.tensors:
            if self.merges(key):
                self._channels_to_merge(key)
        if self.vae is not None:
            autoencoder = {key[len(VAE_PREFIX):]: tuple(tensor.shape) for key, tensor in self.a.tensors.items()
                           if key.startswith(VAE_PREFIX) and not key[len(VAE_PREFIX):].startswith(IGNORED_PREFIXES)}
            try:
                self.vae.check_fits(autoencoder)
            except CheckpointError as error:
                raise MergeError(str(error).replace("--vae none", "leave out --vae")) from None

    def _channels_to_merge(self, key: str) -> int | None:
        """None: the whole tensor; 4: only the first input channels of A (an inpainting or instruct-pix2pix A)."""
        a, others = self.a.tensors[key], [self.b] + ([self.c] if self.c is not None and key in self.c.tensors else [])
        special = None
        for other in others:
            b = other.tensors[key]
            if a.shape == b.shape:
                continue
            same_but_channels = a.dim() == b.dim() == 4 and a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:]
            if same_but_channels and a.shape[1] in SPECIAL_INPUT_CHANNELS and b.shape[1] == LATENT_CHANNELS:
                special = LATENT_CHANNELS
                continue
            if same_but_channels and b.shape[1] in SPECIAL_INPUT_CHANNELS and a.shape[1] == LATENT_CHANNELS:
                raise MergeError(f"model {other.label} ({other.path.name}) is an {SPECIAL_INPUT_CHANNELS[b.shape[1]]} "
                                 f"model and A ({self.a.path.name}) is not: to merge them, A must be the "
                                 f"{SPECIAL_INPUT_CHANNELS[b.shape[1]]} model")
            raise MergeError(f"tensor {key} has shape {tuple(a.shape)} in A ({self.a.path.name}) but "
                             f"{tuple(b.shape)} in {other.label} ({other.path.name}): merge checkpoints of one model family")
        return special

    def tensor(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The output tensor `key`, computed now: in pieces of rows, so that the fp32 working copies of a
        big tensor (the token embedding: 38 M values) take a few MB rather than several times its size."""
        a = self.a.tensors[key]
        if (vae_key := self.vae_key(key)) is not None:
            return self.vae.tensors[vae_key].to(dtype)
        if not self.merges(key) and key not in self.lora_deltas:
            return a.to(dtype)
        if key in self.lora_deltas or a.dim() == 0:  # a LoRA's delta covers the whole weight (or its rows)
            return self._computed(key, ..., dtype)
        rows = max(1, CHUNK_ELEMENTS // max(1, a[0].numel()))
        result = torch.empty(a.shape, dtype=dtype)
        for start in range(0, a.shape[0], rows):
            result[start:start + rows] = self._computed(key, slice(start, start + rows), dtype)
        return result

    def _computed(self, key: str, rows, dtype: torch.dtype) -> torch.Tensor:
        """Rows `rows` (a slice, or ... for all) of the output tensor `key`: the merge, then the LoRAs' deltas, in fp32 (or fp64)."""
        a = self.a.tensors[key][rows]
        work = torch.float64 if torch.float64 in (a.dtype, dtype) else torch.float32
        result = a.to(work, copy=True)
        if self.merges(key):
            self._merge_into(result, key, rows, work)
        if key in self.lora_deltas:
            LoraPatcher._merged(result, self.lora_deltas[key])  # in place, as LoraPatcher merges
        result = result.to(dtype)
        if not all_finite(result) and all_finite(a):
            raise MergeError(f"tensor {key} of the merge holds infinite values (out of {dtype}'s range): "
                             "leave out --fp16, or use a smaller --multiplier")
        return result

    def _merge_into(self, result: torch.Tensor, key: str, rows, work: torch.dtype) -> None:
        """B (weighted sum) or B − C (add difference) merged into `result`, a copy of rows `rows` of A's `key`."""
        b = self.b.tensors[key][rows].to(work)
        if self.method == "add_difference":
            c = self.c.tensors.get(key)
            b = b - c[rows].to(work) if c is not None and c.is_floating_point() else torch.zeros_like(b)
        channels = self._channels_to_merge(key)
        part = result[:, :channels] if channels is not None else result
        if self.method == "weighted_sum":
            part.mul_(1 - self.multiplier).add_(b, alpha=self.multiplier)
        else:
            part.add_(b, alpha=self.multiplier)

    def write(self, f, metadata: dict) -> MergeReport:
        report = MergeReport(vae=self.vae.name if self.vae is not None else None,
                             lora_weights=len(self.lora_deltas))
        planned = self.plan()
        dtypes = {entry.name: entry.dtype for entry in planned}
        writer = StreamingWriter(f, planned, metadata)
        for entry in writer.order:
            key = entry.name
            writer.write(key, self.tensor(key, dtypes[key]))
            if self.vae_key(key) is None:
                report.merged += self.merges(key)
                report.kept_from_a += not self.merges(key)
            if self.merges(key) and self._channels_to_merge(key) is not None:
                report.special = SPECIAL_INPUT_CHANNELS[self.a.tensors[key].shape[1]]
            for source in (self.a, self.b, self.c):
                if source is not None:
                    source.release(key)
        writer.finish()
        others = [source for source in (self.b, self.c) if source is not None]
        report.left_out = len({key for source in others for key in source.tensors} - set(self.a.tensors))
        return report

    def recipe(self) -> dict:
        """The file's metadata: A1111's "format" and a merge recipe in the spirit of its sd_merge_recipe."""
        recipe = {"type": "ldm merge_checkpoints", "interp_method": self.method, "multiplier": self.multiplier,
                  "primary_model": self.a.path.name, "secondary_model": self.b.path.name,
                  "tertiary_model": self.c.path.name if self.c is not None else None, "save_as_half": self.fp16,
                  "bake_in_vae": self.vae.name if self.vae is not None else None, "bake_in_loras": self.lora_names}
        return {"format": "pt", "sd_merge_recipe": json.dumps(recipe)}


def merge_checkpoints(a, b, out, method: str = "weighted_sum", multiplier: float = 0.5, c=None, fp16=False,
                      vae=None, loras=(), overwrite=False, log=print) -> MergeReport:
    """Merge checkpoints `a` and `b` (and `c` for add_difference) into the .safetensors file `out`; bake in
    the VAE file `vae` and the LoRA files of `loras` ([(path, weight)], on the UNet and the text encoder).

    Raises MergeError (one line) on bad input; `out` is written only complete, and never over an existing
    file unless `overwrite`. A config beside A (<a>.yaml) is copied beside the output, as A1111 does.
    """
    out = Path(out)
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}: use {' or '.join(METHODS)}")
    if (method == "add_difference") != (c is not None):
        raise MergeError("add_difference needs a third model C (--c), weighted_sum takes none")
    if out.suffix.lower() != ".safetensors":
        raise MergeError(f"the output {out} must be a .safetensors file")
    config_out = out.with_suffix(".yaml")
    config_in = Path(a).with_suffix(".yaml")
    for target in (out, config_out if config_in.is_file() else None):
        if target is not None and target.exists() and not overwrite:
            raise MergeError(f"{target} exists: pass --overwrite to replace it, or choose another --out")
    if not out.parent.is_dir():
        raise MergeError(f"the output folder {out.parent} does not exist: create it or choose another --out")
    inputs = [Input.open(label, path) for label, path in (("A", a), ("B", b), ("C", c)) if path is not None]
    try:
        vae_file = read_vae(vae) if vae is not None else None
    except CheckpointError as error:
        raise MergeError(str(error).replace("--vae none", "leave out --vae")) from None
    merge = Merge(inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None, method, multiplier, fp16, vae_file)
    merge.check()
    if loras:
        merge.lora_deltas = lora_deltas(merge.a, loras, log)
        merge.lora_names = [f"{Path(path).name}:{weight}" for path, weight in loras]
    report_box = []
    try:
        temp = _write_partial(out.parent, out.suffix, lambda f: report_box.append(merge.write(f, merge.recipe())))
    except OSError as error:
        raise MergeError(f"cannot write {out}: {error.strerror or error}") from None
    try:
        _place(temp, out, overwrite)
        if config_in.is_file():
            _place(_copy_partial(config_in, config_out), config_out, overwrite)
    except FileExistsError:
        temp.unlink(missing_ok=True)
        raise MergeError(f"{out} appeared while merging: pass --overwrite to replace it, or choose another --out") from None
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise MergeError(f"cannot write {out}: {error.strerror or error}") from None
    log(report_box[0].line(out))
    return report_box[0]


def lora_deltas(a: Input, loras, log) -> dict:
    """{parameter name: {rows or None: fp32 delta}} of `loras` for the model of A, built on the meta device
    (no weights) from A's config; every delta is held at once, in fp32, until the merge is written."""
    try:
        config_path = find_config(a.path, a.tensors)
        config = read_config(config_path)
        check_config_targets(config.model, "model", config_path)
        with parameters_on_meta():
            model = instantiate_from_config(config.model)
        patcher = LoraPatcher(model, log=log)
        patcher.select([(read_lora(path), weight, weight) for path, weight in loras])
    except (CheckpointError, ConfigError, LoraError) as error:
        raise MergeError(str(error)) from None
    return patcher.deltas


def _place(temp: Path, target: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(temp, target)
    else:
        _publish(temp, target)


def _copy_partial(source: Path, target: Path) -> Path:
    with open(source, "rb") as f:
        return _write_partial(target.parent, target.suffix, lambda out: shutil.copyfileobj(f, out))
