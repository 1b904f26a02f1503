"""Where a loaded model's tensors live: device, dtype and layout, file-backed pages given back, and the
low-memory mode that keeps one component converted at a time. OS-level work (madvise, glibc) is here.

No weight in use is a view of a memory-mapped file: a file truncated or rewritten in place under its map
(`cp new.ckpt model.ckpt`) turns every later read of a vanished page into SIGBUS, which kills the process
without a message. Only the low-memory mode keeps the checkpoint mapped, for the components not in use,
and checks the file (`CheckpointFile`) before it reads from the map again.
"""
import ctypes
import functools
import mmap
import os
from pathlib import Path

import torch
from torch import nn

from ldm.modules.diffusionmodules.util import keep_kernels_plain

PRECISIONS = ("full", "autocast", "bf16", "int8")


def resolve_dtype(precision: str, device) -> torch.dtype:
    """The one dtype policy. full: fp32. autocast: fp16 weights under autocast on CUDA; on a CPU, fp32 (CPU
    autocast gains nothing in fp16, and the configs' use_fp16 breaks CPU runs). bf16: bf16 weights and
    activations on either device. int8: fp32, with the UNet's layers then put on int8 kernels
    (ldm.generate.int8)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "autocast" and torch.device(device).type == "cuda":
        return torch.float16
    return torch.float32


MADV_DONTNEED = 4  # Linux madvise advice: drop these pages from the process (file pages come back on access)


def mapped_ranges(path) -> list[tuple[int, int]]:
    """The address ranges where this process maps the file `path` (none where /proc/self/maps is absent)."""
    try:
        inode = os.stat(path).st_ino
    except OSError:
        return []
    return file_backed_ranges(os.path.realpath(path), inode)


def file_backed_ranges(path=None, inode=None) -> list[tuple[int, int]]:
    """The address ranges where this process maps a file: any file, or the one named `path` or numbered `inode`.

    The inode finds a mapped file since renamed over or deleted; the name, one on an overlay file system,
    where /proc shows the inode number of the layer below. (Another file with the same number elsewhere
    cannot matter: callers only look for the mapping under a tensor's own pages.)
    """
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)  # address perms offset device inode [path]
                if len(fields) < 5 or fields[4] == "0":
                    continue
                name = fields[5].rstrip("\n") if len(fields) == 6 else ""
                if path is not None and int(fields[4]) != inode and name != path:
                    continue
                start, end = (int(address, 16) for address in fields[0].split("-"))
                ranges.append((start, end))
    except OSError:
        pass
    return ranges


def lies_in(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    return tensor.device.type == "cpu" and any(start <= tensor.data_ptr() < end for start, end in ranges)


def release_file_pages(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
    """Give back this process's pages under `tensor` where they belong to a mapping in `ranges`.

    For a read-only private file mapping (the memory-mapped checkpoint) that only drops pages that would
    be read again from the file if ever touched; memory outside `ranges` (anything anonymous) is never
    advised, so no data can be lost.
    """
    if not ranges or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    page = mmap.PAGESIZE
    begin = tensor.data_ptr() // page * page
    end = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page) * page
    for start, stop in ranges:
        low, high = max(begin, start), min(end, stop)
        if low < high:
            libc().madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), MADV_DONTNEED)


@functools.lru_cache(maxsize=None)
def libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def channels_last_kernel(kernel: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A CPU copy of a [O, I, kH, kW] kernel in the channels-last layout and `dtype`, in one pass.

    Written as a dense copy out of the permuted [O, kH, kW, I] view: 2-4x faster than
    `.to(memory_format=torch.channels_last)` (2.7 GB of SD 1.x kernels: ~0.5 s against 1.1-2.4 s here),
    and 1×1 kernels of the right dtype, already in that layout, are not copied at all.
    """
    out_channels, in_channels, height, width = kernel.shape
    nhwc = kernel.permute(0, 2, 3, 1)
    if kernel.device.type != "cpu" or kernel.dtype != dtype or not nhwc.is_contiguous():
        nhwc = torch.empty(nhwc.shape, dtype=dtype).copy_(nhwc)
    # The strides .to(memory_format=torch.channels_last) gives, also for 1×1 kernels, whose layout is ambiguous.
    return nhwc.as_strided(kernel.shape, (height * width * in_channels, 1, width * in_channels, in_channels))


def place_weights(model: nn.Module, device, dtype, channels_last: bool, checkpoint=None, children=None) -> nn.Module:
    """Every child module's floating-point tensors to device and dtype, one tensor at a time.

    channels_last stores convolution kernels NHWC, the fast layout on a CPU: oneDNN's convolutions work
    in NHWC, and with NCHW tensors every convolution reorders its input and output. A channels-last kernel
    makes the convolution's output channels-last, and that layout then flows through the norms,
    activations, skip concatenations and the transformers' token reshapes ([B, C, H, W] -> [B, H·W, C]
    becomes a free view); inputs may stay contiguous; results equal NCHW's up to fp32 summation order.

    A tensor that needs no conversion (an fp32 weight of an fp32 file in an fp32 run) is still copied
    when it lies in a memory-mapped file, so that no placed weight depends on the file any more. With
    `checkpoint` (a CheckpointFile), the file's pages under each tensor are given back right after its
    copy is made, so that loading peaks at about the final weights' size, not that plus the file's. The
    model's own tensors (the noise schedules, the latent scale factor) keep their dtype, on `device`.
    children: the names of the child modules to place (default: all); the others are left as they are.
    """
    ranges = checkpoint.mapped_ranges() if checkpoint is not None else []
    in_files = file_backed_ranges()
    channels_last = channels_last and torch.device(device).type == "cpu"
    converted = {}  # id(old tensor) -> new one, so that tied weights stay tied
    for child_name, child in model.named_children():
        if children is not None and child_name not in children:
            continue
        for module in child.modules():
            for slots in (module._parameters, module._buffers):
                for name, tensor in slots.items():
                    if tensor is None:
                        continue
                    if id(tensor) not in converted:
                        new_dtype = dtype if tensor.is_floating_point() else tensor.dtype
                        if channels_last and isinstance(module, nn.Conv2d) and name == "weight":
                            new = channels_last_kernel(tensor.detach(), new_dtype)
                        else:
                            new = tensor.detach().to(device=device, dtype=new_dtype)
                        new = _out_of_files(new, tensor, in_files, ranges)
                        converted[id(tensor)] = nn.Parameter(new, requires_grad=False) if slots is module._parameters else new
                    slots[name] = converted[id(tensor)]
    for slots in (model._parameters, model._buffers):  # the model's own tensors, dtype kept
        for name, tensor in slots.items():
            if tensor is not None:
                moved = _out_of_files(tensor.detach().to(device), tensor, in_files, ranges)
                slots[name] = nn.Parameter(moved, tensor.requires_grad) if slots is model._parameters else moved
    return model


def _out_of_files(new: torch.Tensor, source: torch.Tensor, in_files, checkpoint_ranges) -> torch.Tensor:
    """`new`, copied if it is still `source` in a mapped file; the checkpoint's pages under `source` given back."""
    if new.data_ptr() == source.data_ptr():
        if not lies_in(new, in_files):
            return new
        new = new.clone()  # the same strides (a channels-last 1×1 kernel stays one)
    release_file_pages(source, checkpoint_ranges)
    return new


class CheckpointChanged(Exception):
    """The checkpoint file was truncated or rewritten in place while it was in use; the message is one line."""


class CheckpointFile:
    """The checkpoint as loaded: kept open from before it is read, with its size and modification time then.

    A file replaced by renaming another over it stays open and mapped here, unchanged: harmless. One
    truncated or rewritten in place (`cp new.ckpt model.ckpt`, an export to the same path) changes under
    its memory map, where reading a page past its new end would kill the process with SIGBUS: that is
    what `ensure_unchanged` looks for (fstat of the descriptor kept open) before the map is read again.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.file = open(self.path, "rb", buffering=0)
        self.as_loaded = os.fstat(self.file.fileno())

    def change(self) -> str | None:
        """How the loaded file changed since it was opened, in words; None if it did not."""
        now = os.fstat(self.file.fileno())
        if now.st_size != self.as_loaded.st_size:
            return f"{self.path} went from {self.as_loaded.st_size} to {now.st_size} bytes"
        if now.st_mtime_ns != self.as_loaded.st_mtime_ns:
            return f"{self.path} was rewritten"
        return None

    def change_at_path(self) -> str | None:
        """As `change`, and also whether the path now names another file (one renamed over it, or none)."""
        try:
            at_path = os.stat(self.path)
        except OSError:
            return f"{self.path} was removed"
        if (at_path.st_dev, at_path.st_ino) != (self.as_loaded.st_dev, self.as_loaded.st_ino):
            return f"{self.path} was replaced by another file"
        return self.change()

    def ensure_unchanged(self, at_path: bool = False) -> None:
        """Raise CheckpointChanged if the file changed (at_path: or the path names another file now)."""
        change = self.change_at_path() if at_path else self.change()
        if change:
            raise CheckpointChanged(f"the checkpoint file changed on disk while it was in use: {change}; run again "
                                    "once it is complete (to replace a checkpoint in use, rename a finished copy "
                                    "over it)")

    def mapped_ranges(self) -> list[tuple[int, int]]:
        """Where this process maps the file as loaded, even if it was since renamed over or deleted."""
        return file_backed_ranges(os.path.realpath(self.path), self.as_loaded.st_ino)


class OneComponentAtATime:
    """Low-memory mode: only the component in use is in the run's device, dtype and layout.

    The big components (text encoder, UNet, autoencoder, depth estimator) stay as the checkpoint holds
    them, memory-mapped and unread; `use(name)` converts that one (as place_weights would: a copy, never a
    view of the file) and gives the one before back to the file, its pages included. Memory then peaks
    at the UNet with its activations (3.4 of SD 1.x's 4.3 GB of fp32 weights) instead of the whole model
    plus the VAE decoder's activations, for 0.1-1.2 s of conversion per component switch. On CUDA it is
    A1111's --medvram. Before each switch the file is checked (CheckpointFile.ensure_unchanged): a file
    changed in place stops the run with one line rather than a SIGBUS while the next component is read.
    """

    COMPONENTS = ("cond_stage_model", "model", "first_stage_model", "depth_model")

    def __init__(self, model: nn.Module, device, dtype, checkpoint: CheckpointFile):
        self.model, self.device, self.dtype, self.checkpoint = model, device, dtype, checkpoint
        self.as_read = {name: self.tensors_of(getattr(model, name)) for name in self.names(model)}
        self.current = None
        keep_kernels_plain(model)

    @classmethod
    def names(cls, model: nn.Module) -> list[str]:
        return [name for name in cls.COMPONENTS if isinstance(getattr(model, name, None), nn.Module)]

    @staticmethod
    def tensors_of(component: nn.Module) -> dict:
        """{(module, slots, name): tensor} for every parameter and buffer, to put back on release."""
        return {(module, slots_name, name): tensor
                for module in component.modules() for slots_name in ("_parameters", "_buffers")
                for name, tensor in getattr(module, slots_name).items() if tensor is not None}

    def use(self, name: str):
        if name == self.current or name not in self.as_read:
            return
        self.checkpoint.ensure_unchanged()
        self.release()
        place_weights(self.model, self.device, self.dtype, channels_last=True, checkpoint=self.checkpoint,
                      children=[name])
        self.current = name

    def release(self):
        """The component in use back to the file's tensors; its converted copies are freed."""
        if self.current is None:
            return
        ranges = self.checkpoint.mapped_ranges()
        for (module, slots_name, name), tensor in self.as_read[self.current].items():
            getattr(module, slots_name)[name] = tensor
            release_file_pages(tensor, ranges)
        self.current = None
        give_freed_memory_back()


def give_freed_memory_back() -> None:
    """Return the heap's free pages to the kernel (glibc's malloc_trim): the next component's copies and
    activations may not fit the holes the last one left, and would otherwise grow the process."""
    trim = getattr(libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
