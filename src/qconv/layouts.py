"""Named tensor layouts, as PyTorch and TensorFlow users know them, and the memory a call needs.

qconv computes in NHWC with (KH, KW, OC, C/groups) kernels ("HWOI", the assignment's layout).
Other layouts are converted once: the kernel when it is prepared, the input and output per call.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import InputError

INPUT_LAYOUTS = ("NHWC", "NCHW")
# kernel layout name -> axes of that layout which give (KH, KW, OC, IC) when transposed
KERNEL_LAYOUTS = {"HWOI": (0, 1, 2, 3), "OIHW": (2, 3, 0, 1), "HWIO": (0, 1, 3, 2)}


def check_layouts(layout: str, kernel_layout: str) -> tuple[str, str]:
    lay, klay = str(layout).upper(), str(kernel_layout).upper()
    if lay not in INPUT_LAYOUTS:
        raise InputError(f"layout {layout!r}: use 'NHWC' (default) or 'NCHW' (PyTorch)")
    if klay not in KERNEL_LAYOUTS:
        raise InputError(f"kernel_layout {kernel_layout!r}: use 'HWOI' (default, (KH, KW, OC, IC)), "
                         f"'OIHW' (PyTorch) or 'HWIO' (TensorFlow)")
    return lay, klay


def kernel_to_hwoi(w: np.ndarray, kernel_layout: str) -> np.ndarray:
    axes = KERNEL_LAYOUTS[kernel_layout]
    return w if axes == (0, 1, 2, 3) else np.ascontiguousarray(w.transpose(axes))


def layout_hint(x_shape: tuple[int, ...], w_shape: tuple[int, ...], c: int, layout: str, kernel_layout: str) -> str:
    """A hint for a channel mismatch that looks like a layout mix-up ('' when none fits)."""
    hints = []
    if layout == "NHWC" and len(x_shape) == 4 and x_shape[1] == c and x_shape[3] != c:
        hints.append("did you pass NCHW? use layout='NCHW'")
    if kernel_layout == "HWOI" and len(w_shape) == 4 and len(x_shape) == 4:
        xc = x_shape[3] if layout == "NHWC" else x_shape[1]
        if w_shape[2] == xc and w_shape[3] != xc:
            hints.append("is the kernel (KH, KW, IC, OC)? use kernel_layout='HWIO'")
        elif w_shape[1] == xc and w_shape[0] != w_shape[1]:
            hints.append("is the kernel (OC, IC, KH, KW)? use kernel_layout='OIHW'")
    return f" ({'; '.join(hints)})" if hints else ""


def available_memory() -> int | None:
    """Bytes this machine can still give (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_working_set(nbytes: int, what: str) -> None:
    """Refuse, with the numbers, a call whose estimated peak memory exceeds what the machine has."""
    have = available_memory()
    if have is not None and nbytes > have:
        raise InputError(f"{what} needs about {_size(nbytes)} of memory; this machine has {_size(have)} available")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
