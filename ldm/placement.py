"""Where a loaded model's tensors live: device, dtype and layout, file-backed pages given back, and the
low-memory mode that keeps one component converted at a time. OS-level work (madvise, glibc) is here.
"""
import ctypes
import functools
import mmap
import os

import torch
from torch import nn

PRECISIONS = ("full", "autocast", "bf16")


def resolve_dtype(precision: str, device) -> torch.dtype:
    """The one dtype policy. full: fp32. autocast: fp16 weights under autocast on CUDA; on a CPU, fp32 (CPU
    autocast gains nothing in fp16, and the configs' use_fp16 breaks CPU runs). bf16: bf16 weights and
    activations on either device."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "autocast" and torch.device(device).type == "cuda":
        return torch.float16
    return torch.float32


MADV_DONTNEED = 4  # Linux madvise advice: drop these pages from the process (file pages come back on access)


def mapped_ranges(path) -> list[tuple[int, int]]:
    """The address ranges where this process maps the file `path` (from /proc/self/maps; none elsewhere)."""
    target = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == target:
                    start, end = (int(address, 16) for address in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        pass
    return ranges


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


def place_weights(model: nn.Module, device, dtype, channels_last: bool, checkpoint_file=None,
                  children=None) -> nn.Module:
    """Every child module's floating-point tensors to device and dtype, one tensor at a time.

    channels_last stores convolution kernels NHWC, the fast layout on a CPU: oneDNN's convolutions work
    in NHWC, and with NCHW tensors every convolution reorders its input and output. A channels-last kernel
    makes the convolution's output channels-last, and that layout then flows through the norms,
    activations, skip concatenations and the transformers' token reshapes ([B, C, H, W] -> [B, H·W, C]
    becomes a free view); inputs may stay contiguous; results equal NCHW's up to fp32 summation order.

    With checkpoint_file, the file's pages under each tensor that was copied (to another dtype or layout)
    are given back at once, so that loading peaks at about the final weights' size, not that plus the
    file's. The model's own buffers (the noise schedules) stay fp32, on `device`. children: the names
    of the child modules to place (default: all); the others are left as they are.
    """
    ranges = mapped_ranges(checkpoint_file) if checkpoint_file is not None else []
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
                        if new.data_ptr() != tensor.data_ptr():
                            release_file_pages(tensor, ranges)
                        converted[id(tensor)] = nn.Parameter(new, requires_grad=False) if slots is module._parameters else new
                    slots[name] = converted[id(tensor)]
    for slots in (model._parameters, model._buffers):  # the model's own tensors (schedules), dtype kept
        for name, tensor in slots.items():
            if tensor is not None:
                moved = tensor.detach().to(device)
                slots[name] = nn.Parameter(moved, tensor.requires_grad) if slots is model._parameters else moved
    return model


class OneComponentAtATime:
    """Low-memory mode: only the component in use is in the run's device, dtype and layout.

    The big components (text encoder, UNet, autoencoder, depth estimator) stay as the checkpoint holds
    them, memory-mapped and unread; `use(name)` converts that one (as place_weights would) and gives the
    one before back to the file, its pages included. Memory then peaks at the UNet with its activations
    (3.4 of SD 1.x's 4.3 GB of fp32 weights) instead of the whole model plus the VAE decoder's
    activations, for 0.1-1.2 s of conversion per component switch. On CUDA it is A1111's --medvram.
    """

    COMPONENTS = ("cond_stage_model", "model", "first_stage_model", "depth_model")

    def __init__(self, model: nn.Module, device, dtype, checkpoint_file):
        self.model, self.device, self.dtype, self.checkpoint_file = model, device, dtype, checkpoint_file
        self.as_read = {name: self.tensors_of(getattr(model, name)) for name in self.names(model)}
        self.current = None

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
        self.release()
        place_weights(self.model, self.device, self.dtype, channels_last=True, checkpoint_file=self.checkpoint_file,
                      children=[name])
        self.current = name

    def release(self):
        """The component in use back to the file's tensors; its converted copies are freed."""
        if self.current is None:
            return
        ranges = mapped_ranges(self.checkpoint_file)
        for (module, slots_name, name), tensor in self.as_read[self.current].items():
            getattr(module, slots_name)[name] = tensor
            release_file_pages(tensor, ranges)  # also the pages read in place (fp32 file, fp32 run)
        self.current = None
        give_freed_memory_back()


def give_freed_memory_back() -> None:
    """Return the heap's free pages to the kernel (glibc's malloc_trim): the next component's copies and
    activations may not fit the holes the last one left, and would otherwise grow the process."""
    trim = getattr(libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
