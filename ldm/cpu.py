"""What this CPU's arithmetic can do, for the paths that run faster on some CPUs than on others."""
import functools
import os
import platform
from pathlib import Path

import torch


def cpu_has_vnni() -> bool:
    try:
        return bool(torch.cpu._is_vnni_supported())
    except (AttributeError, RuntimeError):  # a torch without the probe: 7 bits are safe everywhere
        return False


def cpu_bf16_support() -> str:
    """"native" (x86 with AVX512_BF16 or AMX, or another CPU oneDNN has bf16 kernels for), "emulated" (x86
    AVX-512 without them: oneDNN converts to fp32 and back, slower than fp32) or "none" (no oneDNN bf16
    kernels at all: far slower). docs/speed-and-memory.md has the measurements."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return "none"
    except (AttributeError, RuntimeError):  # a torch without the probe: assume the best, say nothing
        return "native"
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return "native"
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except (AttributeError, RuntimeError):
        return "native"
    return "native" if native else "emulated"


@functools.cache
def cpu_has_bf16_arithmetic() -> bool:
    """cpu_bf16_support() == "native", probed once: asked on every attention call."""
    return cpu_bf16_support() == "native"


def available_cpu_memory() -> int:
    """Bytes the process can still allocate: MemAvailable (/proc/meminfo), or free pages where there is no /proc."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@functools.cache
def total_cpu_memory() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
