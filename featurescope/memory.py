"""Memory sizes as users write them, and how much memory a device has free. Torch is imported only by
`free_memory_bytes`, so configs and the command line parse `--memory-budget 8GB` without it.

    parse_bytes("8GB") -> 8589934592          # K, M, G, T are powers of 1024, with or without "B" or "iB"
    format_bytes(8589934592) -> "8.0 GiB"
    free_memory_bytes("cuda")                 # what the GPU has free now; MemAvailable for the CPU
    sae_weight_bytes(2304, 16384) -> 302130176    # an SAE's float32 weights (precompute plans and the server count it)
    return_free_memory()                      # hand freed heap pages back to the OS (glibc), between a job's phases
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """'8GB', '8g', '1.5 GiB', '512MB', '1000000' -> bytes. Raises ValueError naming the text otherwise."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a memory size: write e.g. 8GB, 512MB or a number of bytes.")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_bytes(n: int) -> str:
    """Bytes in the largest unit that keeps the number >= 1: 1536 -> '1.5 KiB'."""
    unit = next(u for u in ("T", "G", "M", "K", "") if abs(n) >= _UNITS[u] or u == "")
    return f"{n} B" if unit == "" else f"{n / _UNITS[unit]:.1f} {unit}iB"


def sae_weight_bytes(d_in: int, d_sae: int) -> int:
    """The float32 weights of a JumpReLU SAE: W_enc, W_dec, b_enc, threshold, b_dec."""
    return 4 * (2 * d_in * d_sae + 2 * d_sae + d_in)


def free_memory_bytes(device: str | torch.device = "auto") -> int:
    """Memory free on `device` now: the GPU's free memory for cuda, else the system's available memory
    (MPS shares it with the CPU)."""
    import torch

    from featurescope.models import resolve_device

    device = resolve_device(device) if isinstance(device, str) else device
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return system_available_bytes()


def system_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping); elsewhere the free pages,
    or the physical memory where the system does not say."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file counts kB
    pages = "SC_AVPHYS_PAGES" if "SC_AVPHYS_PAGES" in os.sysconf_names else "SC_PHYS_PAGES"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf(pages)


def return_free_memory() -> bool:
    """Give the memory the process has freed back to the OS (glibc's malloc_trim); False where the C library has
    no such call. Torch's CPU tensors below glibc's mmap threshold (which grows to 32 MB as big tensors are freed)
    live in the malloc heap, whose freed holes stay resident: calling this between the precompute job's phases took
    a 16-SAE job's peak RSS from 3.55 to 3.23 GiB (bench/scale.py's phases)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
