"""The arrays a call takes and gives: device or host, float32 views or checked copies, and the
size limits that refuse an absurd request before anything is allocated."""

from __future__ import annotations

import contextlib
import math
import sys
from typing import Any, Iterator

import numpy as np

from . import layouts
from .errors import InputError

# Refuse requests whose working set is absurd before anything is allocated (bytes).
MAX_TENSOR_BYTES = 2**34
# Calls and copies from this size on are checked against the memory available (reading it costs ~40 us).
CHECK_MEMORY_BYTES = 2**30


def is_device_array(a: object) -> bool:
    """A GPU array: DLPack on a non-CPU device, or the CUDA array interface. Asks the type, or the
    cheap __dlpack_device__, never builds a tensor's __cuda_array_interface__ (microseconds)."""
    if isinstance(a, np.ndarray):
        return False
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        return not a.is_cpu  # a C property; __dlpack_device__ is a Python method of ~2 us
    dev = getattr(a, "__dlpack_device__", None)
    if dev is not None:
        try:
            return int(dev()[0]) not in (1, 3)  # kDLCPU, kDLCUDAHost (pinned host memory)
        except Exception:
            return False
    return hasattr(type(a), "__cuda_array_interface__")


def as_host_float32(a: object, what: str) -> np.ndarray:
    """A C-contiguous float32 numpy view or copy of `a` (numpy, DLPack CPU tensors, sequences)."""
    if isinstance(a, np.ndarray):
        arr = a
    else:
        try:
            arr = np.from_dlpack(a) if hasattr(a, "__dlpack__") else np.asarray(a)
        except Exception as e:
            raise InputError(f"{what}: cannot be read as an array ({e})") from None
    if arr.dtype != np.float32:
        if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
            raise InputError(f"{what}: dtype {arr.dtype} is not a real number type (want float32)")
        with copying(arr.shape, what), np.errstate(over="ignore"):  # reported just below, not as a warning
            converted = arr.astype(np.float32)
        if np.any(np.isfinite(arr) & ~np.isfinite(converted)):
            raise InputError(f"{what}: values beyond float32's range")
        arr = converted
    if not arr.flags.c_contiguous or not arr.flags.aligned:
        with copying(arr.shape, what):  # a broadcast view may be far larger than its memory
            arr = np.ascontiguousarray(arr)
            if not arr.flags.aligned:
                arr = arr.copy()
    return arr


def check_bytes(shape: tuple[int, ...], what: str) -> None:
    nbytes = 4 * math.prod(int(d) for d in shape)
    if nbytes > MAX_TENSOR_BYTES:
        raise InputError(f"{what} would take {nbytes / 2**30:.1f} GiB, above qconv's "
                         f"{MAX_TENSOR_BYTES / 2**30:.0f} GiB limit per tensor")


@contextlib.contextmanager
def copying(shape: tuple[int, ...], what: str) -> Iterator[None]:
    """Around a float32 copy of `what`: refused up front when it cannot fit, and an allocation that
    fails anyway is an InputError with the size, not a bare MemoryError."""
    check_bytes(shape, what)
    nbytes = 4 * math.prod(int(d) for d in shape)
    if nbytes >= CHECK_MEMORY_BYTES:
        layouts.check_working_set(nbytes, f"{what}'s float32 copy")
    try:
        yield
    except MemoryError:
        raise InputError(f"{what}'s float32 copy needs {nbytes / 2**20:.1f} MiB of memory, which could not "
                         f"be allocated") from None


def owned(a: np.ndarray) -> np.ndarray:
    """A read-only copy: what prepare keeps must not change when the caller's array does."""
    a = a.copy()
    a.flags.writeable = False
    return a


def shape_of(a: object) -> tuple[int, ...]:
    if isinstance(a, np.ndarray):
        return a.shape  # already a tuple of ints
    return tuple(int(d) for d in a.shape)  # type: ignore[attr-defined]


def to_host(a: Any) -> np.ndarray:
    """A device array's values on the host (the diagnostics and a device kernel need them)."""
    if hasattr(a, "copy_to_host"):
        return np.asarray(a.copy_to_host(), dtype=np.float32)
    from .backends import cuda
    return cuda.to_host(a)
