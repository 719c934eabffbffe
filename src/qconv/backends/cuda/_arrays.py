"""Interop: qconv's DeviceArray, reading other libraries' device arrays (PyTorch fast path,
__cuda_array_interface__, DLPack), and pinned host output arrays."""

from __future__ import annotations

import ctypes
import math
import sys
from typing import Any

import numpy as np

from ...errors import BackendError, InputError
from . import _driver


class DeviceArray:
    """A float32 array in GPU memory. Outputs of the cuda backend come from a pool: the memory goes
    back to it when the array is collected (or free() is called), never while it is referenced.

    Exposes ``__cuda_array_interface__`` (v3, with the stream that produced it), so
    ``torch.as_tensor(a, device="cuda")`` or ``cupy.asarray(a)`` view it without a copy;
    ``copy_to_host()`` / ``np.asarray(a)`` copy it back. An output carries its call's record: reading
    it back through qconv (copy_to_host, np.asarray, synchronize) waits for the call and raises
    InputError if the input held NaN or inf.
    """

    __slots__ = ("ptr", "shape", "_ctx", "_pool", "_record", "__weakref__")
    dtype = np.dtype(np.float32)

    def __init__(self, ptr: int, shape: tuple[int, ...], ctx: Any = None, pool: bool = False,
                 record: Any = None) -> None:
        self.ptr = int(ptr)
        self.shape = tuple(int(d) for d in shape)
        self._ctx = ctx          # the stream context that wrote it (and owns the pool)
        self._pool = pool        # True: return the memory to ctx's pool, False: cuMemFree
        self._record = record

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return 4 * self.size

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        if not self.ptr:
            raise InputError("DeviceArray was freed")
        stream = self._ctx.handle if self._ctx is not None and self._ctx.handle not in (0,) else None
        return {"shape": self.shape, "typestr": "<f4", "data": (self.ptr, False), "version": 3,
                "strides": None, "stream": stream}

    def synchronize(self) -> "DeviceArray":
        """Wait for the call that wrote this array; raises InputError for non-finite input."""
        if self._record is not None:
            self._record.resolve()
        elif self._ctx is not None:
            _driver.ck(self._ctx.rt.drv.cuStreamSynchronize(self._ctx.stream), "cuStreamSynchronize")
        return self

    def copy_to_host(self, out: np.ndarray | None = None) -> np.ndarray:
        if not self.ptr:
            raise InputError("DeviceArray was freed")
        rt = _driver.runtime()
        y = np.empty(self.shape, dtype=np.float32) if out is None else out
        ctx = self._ctx or rt.default
        _driver.ck(rt.drv.cuMemcpyDtoHAsync(y.ctypes.data, self.ptr, self.nbytes, ctx.stream), "cuMemcpyDtoHAsync")
        _driver.ck(rt.drv.cuStreamSynchronize(ctx.stream), "cuStreamSynchronize")
        self.synchronize()
        return y

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.copy_to_host()
        return a if dtype is None else a.astype(dtype)

    def free(self) -> None:
        ptr, self.ptr = self.ptr, 0
        if not ptr:
            return
        if self._pool:
            self._ctx.give_output(ptr, 4 * math.prod(self.shape))
        elif _driver.current() is not None:
            _driver.runtime()
            _driver.ck(_driver.current().drv.cuMemFree(ptr), "cuMemFree")

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:
            pass  # interpreter shutdown: the driver may already be gone

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype=float32, ptr=0x{self.ptr:x})"


def to_device(x: Any) -> DeviceArray:
    """A float32 C-contiguous copy of a host array in GPU memory (freed when collected)."""
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    rt = _driver.runtime()
    ptr = int(_driver.ck(rt.drv.cuMemAlloc(max(a.nbytes, 4)), "cuMemAlloc"))
    try:
        _driver.ck(rt.drv.cuMemcpyHtoD(ptr, a.ctypes.data, a.nbytes), "cuMemcpyHtoD")
    except BaseException:
        rt.drv.cuMemFree(ptr)
        raise
    return DeviceArray(ptr, a.shape, None, False)


# --------------------------------------------------------------------------- reading device arrays

class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


_capsule_ptr = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_ptr.restype, _capsule_ptr.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]


def device_view(a: Any, what: str, ctx: Any, keep: list[Any]) -> tuple[int, tuple[int, ...]]:
    """(device pointer, shape) of a float32 C-contiguous array on GPU 0, ordered before work that
    ctx's stream enqueues next; InputError for anything else. ``keep`` holds what must stay alive
    for the call (a DLPack capsule)."""
    if type(a) is DeviceArray:
        if not a.ptr:
            raise InputError(f"{what}: DeviceArray was freed")
        if a._ctx is not None and a._ctx is not ctx:
            _wait_for(ctx, a._ctx.stream)
        return a.ptr, a.shape
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(a, torch.Tensor):
        return _torch_view(torch, a, what, ctx)
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is not None:
        shape = tuple(int(d) for d in cai["shape"])
        try:
            dt = np.dtype(cai["typestr"])
        except TypeError:
            dt = None
        if dt != np.float32:
            raise InputError(f"{what}: device array of type {cai['typestr']} (want float32, '<f4')")
        strides = cai.get("strides")
        want = tuple(int(4 * math.prod(shape[i + 1:])) for i in range(len(shape)))
        if strides is not None and tuple(strides) != want and math.prod(shape) > 1:
            raise InputError(f"{what}: device array is not C-contiguous (strides {tuple(strides)}, want {want})")
        ptr = int(cai["data"][0])
        _check_ordinal(ctx, ptr, what)
        producer = cai.get("stream")
        if producer is not None and int(producer) not in (0, 1, ctx.handle):
            _wait_for(ctx, ctx.rt.drv.CUstream(int(producer)))  # 2: per-thread default stream
        return ptr, shape
    if hasattr(a, "__dlpack__"):
        try:
            cap = a.__dlpack__(stream=ctx.handle)  # the producer orders its work before our stream
        except TypeError:
            cap = a.__dlpack__()
        keep.append(cap)  # the capsule (and through it the tensor) stays alive for the call
        t = _DLTensor.from_address(_capsule_ptr(cap, b"dltensor"))  # DLManagedTensor starts with a DLTensor
        if t.device.device_type not in (2, 13):  # kDLCUDA, kDLCUDAManaged
            raise InputError(f"{what}: DLPack device type {t.device.device_type} is not CUDA")
        if (t.dtype.code, t.dtype.bits, t.dtype.lanes) != (2, 32, 1):
            raise InputError(f"{what}: DLPack dtype (code {t.dtype.code}, {t.dtype.bits} bits) is not float32")
        if t.device.device_id != 0:
            raise InputError(f"{what} lives on GPU {t.device.device_id}; the cuda backend runs on GPU 0")
        shape = tuple(int(t.shape[i]) for i in range(t.ndim))
        if t.strides:
            st = tuple(int(t.strides[i]) for i in range(t.ndim))
            want = tuple(int(math.prod(shape[i + 1:])) for i in range(len(shape)))
            if st != want and math.prod(shape) > 1:
                raise InputError(f"{what}: DLPack tensor is not C-contiguous (strides {st})")
        return int(t.data or 0) + int(t.byte_offset), shape
    raise InputError(f"{what}: not a numpy array and no __cuda_array_interface__ or __dlpack__")


def _torch_view(torch: Any, a: Any, what: str, ctx: Any) -> tuple[int, tuple[int, ...]]:
    """PyTorch tensors without building their __cuda_array_interface__ dict (the hot path)."""
    if not a.is_cuda:
        raise InputError(f"{what}: a PyTorch tensor on {a.device} (want a CUDA tensor or a numpy array)")
    if a.dtype is not torch.float32:
        raise InputError(f"{what}: device array of type {a.dtype} (want float32)")
    if not a.is_contiguous():
        raise InputError(f"{what}: device array is not C-contiguous (strides {tuple(a.stride())})")
    if a.get_device() != 0:
        raise InputError(f"{what} lives on GPU {a.get_device()}; the cuda backend runs on GPU 0")
    return a.data_ptr(), tuple(a.shape)


def _check_ordinal(ctx: Any, ptr: int, what: str) -> None:
    drv = ctx.rt.drv
    err, ordinal = drv.cuPointerGetAttribute(drv.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr)
    if err != _driver._ok():
        raise InputError(f"{what}: {ptr:#x} is not CUDA device memory ({_driver.err_text(err)})")
    if int(ordinal) != 0:
        raise InputError(f"{what} lives on GPU {int(ordinal)}; the cuda backend runs on GPU 0")


def _wait_for(ctx: Any, producer: Any) -> None:
    """Order ctx's stream after everything enqueued so far on `producer`."""
    drv = ctx.rt.drv
    (ev,) = ctx.take_events(1)
    try:
        _driver.ck(drv.cuEventRecord(ev, producer), "cuEventRecord(producer stream)")
        _driver.ck(drv.cuStreamWaitEvent(ctx.stream, ev, 0), "cuStreamWaitEvent")
    finally:
        ctx.give_events([ev])


# --------------------------------------------------------------------------- pinned host outputs

class PinnedBlock:
    """Owner of a pinned host block that a numpy output array views; the block goes back to the
    stream's pool when the array (and so this owner) is collected."""

    __slots__ = ("ptr", "nbytes", "ctx", "__array_interface__")

    def __init__(self, ptr: int, shape: tuple[int, ...], ctx: Any) -> None:
        self.ptr, self.nbytes, self.ctx = ptr, 4 * math.prod(shape), ctx
        self.__array_interface__ = {"data": (ptr, False), "shape": tuple(shape), "typestr": "<f4", "version": 3}

    def __del__(self) -> None:
        try:
            self.ctx.give_host(self.ptr, self.nbytes)
        except Exception:
            pass


def is_pinned(a: np.ndarray) -> bool:
    """Whether a host array views one of qconv's pinned blocks (a host call's output, or
    pinned_empty): the cuda backend then copies it to the device with no staging copy."""
    b: Any = a
    while isinstance(b, np.ndarray):
        b = b.base
    return isinstance(b, PinnedBlock)


def pinned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 numpy array in pinned (page-locked) host memory, from the cuda backend's pool:
    write inputs into it and host calls skip the staging copy (RESULTS.md: numpy in/out)."""
    rt = _driver.runtime()
    rt.make_current()
    a = host_output(rt.stream_ctx(None), tuple(int(d) for d in shape))
    if not is_pinned(a):
        raise BackendError("pinned_empty: the pinned-memory pool is full (2 GiB)")
    return a


def host_output(ctx: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 numpy array for a host call's output: pinned (DMA-able) from the pool, or a plain
    pageable array past the pool's cap."""
    nbytes = 4 * math.prod(shape)
    ptr = ctx.take_host(nbytes)
    if not ptr:
        return np.empty(shape, dtype=np.float32)
    a = np.asarray(PinnedBlock(ptr, shape, ctx))
    if a.ctypes.data != ptr:  # never expected: numpy copied instead of viewing
        raise BackendError("pinned output view failed")
    return a


def to_host(a: Any) -> np.ndarray:
    """A numpy copy of any float32 C-contiguous device array qconv reads (DeviceArray, CUDA array
    interface, DLPack), after the work that produced it."""
    if type(a) is DeviceArray:
        return a.copy_to_host()
    rt = _driver.runtime()
    rt.make_current()
    ctx = rt.stream_ctx(None)
    keep: list[Any] = []
    ptr, shape = device_view(a, "array", ctx, keep)
    out = np.empty(shape, dtype=np.float32)
    _driver.ck(rt.drv.cuStreamSynchronize(ctx.stream), "cuStreamSynchronize")
    _driver.ck(rt.drv.cuMemcpyDtoH(out.ctypes.data, ptr, out.nbytes), "cuMemcpyDtoH")
    return out
