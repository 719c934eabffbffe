"""The CUDA backend: hand-written kernels compiled at run time by NVRTC, driven through cuda-python.

Every precision runs on the GPU: quantize (and pack the kernel) on the device, convolve as a
tiled implicit GEMM (FP32, INT32, INT16 on the CUDA cores; INT8 with ``__dp4a`` or the tensor
cores' ``mma.sync`` s8 x s8 -> s32), dequantize on the device. Integer results are bit-identical
to the reference; CUDA events time each phase; host<->device copies are the "transfer" phase.

Options (``qconv.conv2d(..., backend="cuda", **options)``):
    int8_path: "mma" (tensor cores, the default: faster on every measured layer) or "dp4a".
    tile: "auto" (default) or "BMxBN" from TILES (MMA_TILES for int8_path="mma"), the block tile;
        for FP32 also "BMxBN/TMxTN" from OUTER_TILES, the outer-product kernel (conv_f32_outer.cu)
        with a TMxTN thread tile. FP32 "auto" takes the block tile and split-K of the "auto" rule
        and runs it on the kernel F32_AUTO names; an explicit "BMxBN" runs the older
        k-contiguous SIMT kernel (qconv_simt.cu).
    split_k: "auto" (default) or a positive int, the number of K slices (atomic int32/float adds).
    fuse_dequantize: True (default) dequantizes in the convolution's epilogue when split_k == 1
        (same bits; the dequantize phase then reads 0); False runs the separate dequantize kernel.

Inputs may be numpy arrays (copied to the device and back) or device arrays exposing
``__cuda_array_interface__`` or ``__dlpack__`` (CuPy, PyTorch...): those are read in place and the
output is a :class:`DeviceArray` on the same device, which frees its memory when collected.
"""

from __future__ import annotations

import dataclasses
import ctypes
import math
import threading
from typing import Any

import numpy as np

from ..contract import Plan, Precision
from ..errors import BackendError, InputError, QconvError
from .base import BackendRun, check_options

NAME = "cuda"
ACCEPTS_DEVICE_ARRAYS = True
OPTIONS = ("int8_path", "tile", "split_k", "fuse_dequantize")
INSTALL_HINT = "pip install qconv[cuda]"
INT8_PATHS = ("mma", "dp4a")
TILES = ("128x128", "128x64", "64x64", "64x32", "32x32")    # CUDA-core kernels
MMA_TILES = ("128x128", "96x128") + TILES[1:]                # tensor-core kernel
STAGES = 3
# FP32 outer-product kernels (conv_f32_outer.cu): "BMxBN/TMxTN" (threads = BM*BN/(TM*TN))
OUTER_TILES = ("128x128/8x8", "128x64/8x4", "128x64/8x8", "128x64/8x8/k8", "64x64/4x4", "64x64/8x4",
               "64x32/4x4")  # "/k8": 8-word K tiles
# FP32 "auto": block tile (from choose_tiling) -> outer-product tile; a block tile not listed runs
# the SIMT kernel (64x64 + split-K at N=1 measured 17-18 us SIMT vs 21-22 us outer, RESULTS.md)
F32_AUTO = {(128, 64): "128x64/8x8/k8"}
SIMT_BKW, MMA_BKW = 16, 32  # K words per pipeline stage (must match the .cu files)

# precision -> (bytes per element, kernel module, kernel name prefix, type suffix)
_CONV = {
    Precision.FP32: (4, "conv_f32.cu", "qconv_f32_conv_simt", "f32"),
    Precision.INT32: (4, "conv_s32.cu", "qconv_s32_conv_simt", "s32"),
    Precision.INT16: (2, "conv_s16.cu", "qconv_s16_conv_simt", "s16"),
}
_INT8 = {"mma": (1, "conv_s8_mma.cu", "qconv_s8_conv_mma", "s8"),
         "dp4a": (1, "conv_s8_dp4a.cu", "qconv_s8_conv_dp4a", "s8")}


def kernel_names() -> dict[str, list[str]]:
    """Every kernel entry point, by module file: what the NVRTC compile test looks for."""
    out: dict[str, list[str]] = {}
    for _, mod, prefix, _ in list(_CONV.values()) + list(_INT8.values()):
        out[mod] = [f"{prefix}_{t}" for t in (MMA_TILES if mod == "conv_s8_mma.cu" else TILES)]
    quant = ["qconv_gate_wait", "qconv_dequantize_s32", "qconv_dequantize_s32_tail", "qconv_pad_x_f32", "qconv_pack_w_f32"]
    for suf in ("s8", "s16", "s32"):
        quant += [f"qconv_quantize_x_{suf}", f"qconv_quantize_x4_{suf}", f"qconv_pack_w_{suf}"]
    out["conv_f32_outer.cu"] = [_outer_name(t) for t in OUTER_TILES]
    out["quant.cu"] = quant
    return out


def _outer_name(tile: str) -> str:
    return "qconv_f32_conv_outer_" + tile.replace("/", "_")


def _outer_threads(tile: str) -> int:
    (bm, bn), (tm, tn) = (tuple(int(v) for v in part.split("x")) for part in tile.split("/")[:2])
    return bm * bn // (tm * tn)


# --------------------------------------------------------------------------- availability

_avail: tuple[bool, str] | None = None


def is_available() -> tuple[bool, str]:
    """(True, what was found) or (False, why not and how to fix it); never raises."""
    global _avail
    if _avail is None:
        try:
            _avail = _probe()
        except Exception as e:  # any surprise in the probe means "not available", not a crash
            _avail = (False, f"CUDA probe failed ({type(e).__name__}: {e}); {INSTALL_HINT}")
    return _avail


def _probe() -> tuple[bool, str]:
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError as e:
        return False, f"cuda-python is not installed ({e}): {INSTALL_HINT}"
    try:
        err, major, minor = nvrtc.nvrtcVersion()
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return False, f"NVRTC does not answer ({err}): {INSTALL_HINT}"
    except Exception as e:
        return False, f"NVRTC is not loadable ({e}): {INSTALL_HINT}"
    try:
        (err,) = driver.cuInit(0)
    except Exception as e:
        return False, f"no NVIDIA driver found ({e}); qconv's cuda backend needs an NVIDIA GPU and driver ({INSTALL_HINT} for the Python side)"
    if err != driver.CUresult.CUDA_SUCCESS:
        return False, f"cuInit failed: {_err_text(err)} (no usable NVIDIA GPU/driver)"
    err, count = driver.cuDeviceGetCount()
    if err != driver.CUresult.CUDA_SUCCESS or count == 0:
        return False, "no CUDA GPU is visible (cuDeviceGetCount found none)"
    _, dev = driver.cuDeviceGet(0)
    cc = _attr(dev, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR"), _attr(dev, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR")
    if cc < (8, 0):
        return False, f"GPU 0 has compute capability {cc[0]}.{cc[1]}; the cuda backend needs 8.0+ (cp.async, int8 mma)"
    _, name = driver.cuDeviceGetName(64, dev)
    _, drv = driver.cuDriverGetVersion()
    gpu = name.split(b"\0")[0].decode(errors="replace")
    return True, f"{gpu} (sm_{cc[0]}{cc[1]}), CUDA driver {drv // 1000}.{drv % 1000 // 10}, NVRTC {major}.{minor}"


def _attr(dev: Any, name: str) -> int:
    from cuda.bindings import driver
    err, v = driver.cuDeviceGetAttribute(getattr(driver.CUdevice_attribute, name), dev)
    _ck_err(err, f"cuDeviceGetAttribute({name})")
    return int(v)


def _err_text(err: Any) -> str:
    from cuda.bindings import driver
    try:
        _, name = driver.cuGetErrorName(err)
        _, desc = driver.cuGetErrorString(err)
        return f"{name.decode()} ({desc.decode()})"
    except Exception:
        return str(err)


def _ck_err(err: Any, call: str) -> None:
    from cuda.bindings import driver
    if err != driver.CUresult.CUDA_SUCCESS:
        raise QconvError(f"CUDA driver call {call} failed: {_err_text(err)}")


def _ck(result: Any, call: str) -> Any:
    """Check a cuda-python (status, ...) tuple; return the value(s) after the status."""
    err = result[0]
    _ck_err(err, call)
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


# --------------------------------------------------------------------------- runtime state

class ConvParams(ctypes.Structure):
    """Mirror of `struct ConvParams` in cuda_kernels/qconv_common.cu."""
    _fields_ = [("x", ctypes.c_uint64), ("w", ctypes.c_uint64), ("out", ctypes.c_uint64)] + [
        (n, ctypes.c_int) for n in ("N", "H", "W", "Cw", "KH", "KW", "pt", "pl", "OC", "Kpw", "M", "T",
                                    "ktiles", "ktiles_per_split", "mode")] + [("inv", ctypes.c_float)]


class _Runtime:
    """One per process: the primary context of GPU 0, a stream, events, modules, a buffer pool."""

    def __init__(self) -> None:
        from cuda.bindings import driver
        self.drv = driver
        _ck(driver.cuInit(0), "cuInit")
        self.dev = _ck(driver.cuDeviceGet(0), "cuDeviceGet")
        self.ctx = _ck(driver.cuDevicePrimaryCtxRetain(self.dev), "cuDevicePrimaryCtxRetain")
        self.make_current()
        cc = (_attr(self.dev, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR"),
              _attr(self.dev, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR"))
        self.arch = f"sm_{cc[0]}{cc[1]}"
        self.num_sms = _attr(self.dev, "CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT")
        self.smem_optin = _attr(self.dev, "CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN")
        # Blocking stream: orders itself after work on the legacy default stream (PyTorch's default).
        self.stream = _ck(driver.cuStreamCreate(driver.CUstream_flags.CU_STREAM_DEFAULT), "cuStreamCreate")
        self.events = [_ck(driver.cuEventCreate(driver.CUevent_flags.CU_EVENT_DEFAULT), "cuEventCreate")
                       for _ in range(8)]
        self.gate_host = int(_ck(driver.cuMemHostAlloc(64, driver.CU_MEMHOSTALLOC_DEVICEMAP), "cuMemHostAlloc(gate)"))
        self.gate_dev = int(_ck(driver.cuMemHostGetDevicePointer(self.gate_host, 0), "cuMemHostGetDevicePointer(gate)"))
        self.modules: dict[str, Any] = {}
        self.funcs: dict[str, Any] = {}
        self.pool: dict[str, tuple[int, int]] = {}  # role -> (pointer, bytes); grow-only
        self.lock = threading.RLock()

    def make_current(self) -> None:
        _ck(self.drv.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def func(self, module: str, name: str, smem: int = 0) -> Any:
        key = f"{module}:{name}"
        f = self.funcs.get(key)
        if f is None:
            mod = self.modules.get(module)
            if mod is None:
                from . import _nvrtc
                cubin = _nvrtc.compile_module(module, self.arch)
                mod = _ck(self.drv.cuModuleLoadData(cubin), f"cuModuleLoadData({module})")
                self.modules[module] = mod
            f = _ck(self.drv.cuModuleGetFunction(mod, name.encode()), f"cuModuleGetFunction({name})")
            self.funcs[key] = f
        if smem > 48 * 1024:
            if smem > self.smem_optin:
                raise QconvError(f"kernel {name} needs {smem} bytes of shared memory; this GPU allows {self.smem_optin}")
            _ck(self.drv.cuFuncSetAttribute(
                f, self.drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
                f"cuFuncSetAttribute({name}, max dynamic shared memory = {smem})")
        return f

    def buf(self, role: str, nbytes: int) -> int:
        """A pooled device buffer of at least nbytes (contents undefined), reused across calls."""
        nbytes = max(256, (nbytes + 255) // 256 * 256)
        ptr, size = self.pool.get(role, (0, 0))
        if size < nbytes:
            if ptr:
                _ck(self.drv.cuMemFree(ptr), "cuMemFree")
                self.pool.pop(role)
            ptr = int(_ck(self.drv.cuMemAlloc(nbytes), f"cuMemAlloc({nbytes} bytes for {role})"))
            self.pool[role] = (ptr, nbytes)
        return ptr

    def release_pool(self) -> None:
        for ptr, _ in self.pool.values():
            _ck(self.drv.cuMemFree(ptr), "cuMemFree")
        self.pool.clear()

    def launch(self, f: Any, name: str, grid: tuple[int, int, int], block: int, smem: int,
               args: list[ctypes._SimpleCData | ctypes.Structure]) -> None:
        ptrs = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        _ck(self.drv.cuLaunchKernel(f, grid[0], grid[1], grid[2], block, 1, 1, smem, self.stream,
                                    ctypes.addressof(ptrs), 0),
            f"cuLaunchKernel({name}, grid={grid}, block={block}, smem={smem})")

    def event(self, i: int) -> Any:
        while len(self.events) <= i:
            self.events.append(_ck(self.drv.cuEventCreate(self.drv.CUevent_flags.CU_EVENT_DEFAULT), "cuEventCreate"))
        return self.events[i]

    def gate_close(self) -> None:
        """Hold the stream (see qconv_gate_wait) until gate_open()."""
        ctypes.c_int.from_address(self.gate_host).value = 0
        self.launch(self.func("quant.cu", "qconv_gate_wait"), "gate_wait", (1, 1, 1), 1, 0, [_p(self.gate_dev)])

    def gate_open(self) -> None:
        ctypes.c_int.from_address(self.gate_host).value = 1

    def record(self, i: int) -> None:
        _ck(self.drv.cuEventRecord(self.event(i), self.stream), "cuEventRecord")

    def elapsed(self, a: int, b: int) -> float:
        return float(_ck(self.drv.cuEventElapsedTime(self.events[a], self.events[b]), "cuEventElapsedTime")) / 1e3


_rt: _Runtime | None = None
_rt_lock = threading.Lock()


def _runtime() -> _Runtime:
    global _rt
    with _rt_lock:
        if _rt is None:
            ok, why = is_available()
            if not ok:
                raise QconvError(f"the cuda backend is unavailable: {why}")
            _rt = _Runtime()
        return _rt


# --------------------------------------------------------------------------- device arrays

class DeviceArray:
    """A float32 array in GPU memory that owns its allocation (freed when collected or by free()).

    Exposes ``__cuda_array_interface__`` (v3), so ``torch.as_tensor(a, device="cuda")`` or
    ``cupy.asarray(a)`` view it without a copy; ``copy_to_host()`` / ``np.asarray(a)`` copy it back.
    """

    def __init__(self, ptr: int, shape: tuple[int, ...]) -> None:
        self.ptr = int(ptr)
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(np.float32)

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
            raise QconvError("DeviceArray was freed")
        return {"shape": self.shape, "typestr": "<f4", "data": (self.ptr, False), "version": 3,
                "strides": None, "stream": None}

    def copy_to_host(self) -> np.ndarray:
        rt = _runtime()
        out = np.empty(self.shape, dtype=np.float32)
        with rt.lock:
            rt.make_current()
            _ck(rt.drv.cuMemcpyDtoH(out, self.ptr, self.nbytes), "cuMemcpyDtoH")
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.copy_to_host()
        return a if dtype is None else a.astype(dtype)

    def free(self) -> None:
        if self.ptr and _rt is not None:
            ptr, self.ptr = self.ptr, 0
            _rt.make_current()
            _ck(_rt.drv.cuMemFree(ptr), "cuMemFree")

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:
            pass  # interpreter shutdown: the driver may already be gone

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype=float32, ptr=0x{self.ptr:x})"


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


def _device_view(a: Any, what: str, keep: list[Any]) -> tuple[int, tuple[int, ...], bool]:
    """(device pointer, shape, needs_sync) of a float32 C-contiguous device array, else QconvError."""
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is not None:
        shape = tuple(int(d) for d in cai["shape"])
        try:
            dt = np.dtype(cai["typestr"])
        except TypeError:
            dt = None
        if dt != np.float32:
            raise QconvError(f"{what}: device array of type {cai['typestr']} (want float32, '<f4')")
        strides = cai.get("strides")
        want = tuple(int(4 * math.prod(shape[i + 1:])) for i in range(len(shape)))
        if strides is not None and tuple(strides) != want and math.prod(shape) > 1:
            raise QconvError(f"{what}: device array is not C-contiguous (strides {tuple(strides)}, want {want})")
        ptr = int(cai["data"][0])
        return ptr, shape, cai.get("stream") is not None
    if hasattr(a, "__dlpack__"):
        try:
            cap = a.__dlpack__(stream=None)
        except TypeError:
            cap = a.__dlpack__()
        keep.append(cap)  # the capsule (and through it the tensor) stays alive for the call
        get = ctypes.pythonapi.PyCapsule_GetPointer
        get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        t = _DLTensor.from_address(get(cap, b"dltensor"))  # DLManagedTensor starts with a DLTensor
        if t.device.device_type not in (2, 13):  # kDLCUDA, kDLCUDAManaged
            raise QconvError(f"{what}: DLPack device type {t.device.device_type} is not CUDA")
        if (t.dtype.code, t.dtype.bits, t.dtype.lanes) != (2, 32, 1):
            raise QconvError(f"{what}: DLPack dtype (code {t.dtype.code}, {t.dtype.bits} bits) is not float32")
        shape = tuple(int(t.shape[i]) for i in range(t.ndim))
        if t.strides:
            st = tuple(int(t.strides[i]) for i in range(t.ndim))
            want = tuple(int(math.prod(shape[i + 1:])) for i in range(len(shape)))
            if st != want and math.prod(shape) > 1:
                raise QconvError(f"{what}: DLPack tensor is not C-contiguous (strides {st})")
        return int(t.data or 0) + int(t.byte_offset), shape, True
    raise QconvError(f"{what}: not a numpy array and no __cuda_array_interface__ or __dlpack__")


# --------------------------------------------------------------------------- planning

def _roundup(a: int, b: int) -> int:
    return (a + b - 1) // b * b


def _parse_tile(t: str, mma: bool = False) -> tuple[int, int]:
    tiles = MMA_TILES if mma else TILES
    if t not in tiles:
        extra = "" if mma else f"; FP32 also {', '.join(OUTER_TILES)}"
        raise QconvError(f"tile {t!r} is not one of {', '.join(tiles)} (or 'auto'{extra})")
    bm, bn = t.split("x")
    return int(bm), int(bn)


def choose_tiling(m: int, oc: int, ktiles: int, num_sms: int, tile: Any = "auto",
                  split_k: Any = "auto", mma: bool = False) -> tuple[tuple[int, int], int]:
    """Block tile and K split (rules fitted to the H100 sweep in benchmarks/RESULTS.md).

    The largest tile (for the CUDA-core kernels only 128x64 and 64x64, or 64x32 when OC <= 32:
    128x128 and the small tiles lost on every measured layer) that gives every SM a block.
    (96x128, which fills the last wave on exam case 2 at N=32 where 128x128 leaves it 74% full,
    measured no faster: 32.3 vs 31.2 us; it stays selectable with tile="96x128".)
    Otherwise: the tensor-core kernel takes the smallest tile and no split (its short K loops
    lose more to the atomic adds than they gain); the CUDA-core kernels take 64x64 (64x32 for
    OC <= 32) and split K into up to 8 slices, aiming at three blocks per SM, at least 2 K tiles each.
    """
    if tile != "auto":
        bm, bn = _parse_tile(str(tile), mma)
    else:
        widest = max(32, 1 << max(0, (oc - 1).bit_length()))
        tiles = MMA_TILES if mma else TILES[1:]
        cands = [c for c in (_parse_tile(t, mma) for t in tiles) if c[1] <= widest]
        if not mma:  # small CUDA-core tiles lost to 64x64 + split-K on every measured layer
            cands = [c for c in cands if c[0] >= 64 and (c[1] >= 64 or oc <= 32)]
        fits = [c for c in cands if math.ceil(m / c[0]) * math.ceil(oc / c[1]) >= num_sms]
        if fits:
            bm, bn = fits[0]
        elif mma:
            bm, bn = cands[-1]
        else:
            bm, bn = (64, 64) if oc > 32 else (64, 32)
    blocks = math.ceil(m / bm) * math.ceil(oc / bn)
    if split_k == "auto":
        split = 1
        if blocks < num_sms and not mma:
            split = max(1, min(math.ceil(3 * num_sms / blocks), 8, ktiles // 2))
    else:
        if isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1:
            raise QconvError(f"split_k must be 'auto' or a positive int, got {split_k!r}")
        split = min(split_k, ktiles)
    return (bm, bn), split


def _int8_path(plan: Plan) -> str:
    p = plan.options.get("int8_path", "mma")
    if p not in INT8_PATHS:
        raise QconvError(f"int8_path {p!r}: use one of {', '.join(INT8_PATHS)}")
    return p


# --------------------------------------------------------------------------- run

def _i(v: int) -> ctypes.c_int:
    return ctypes.c_int(int(v))


def _ll(v: int) -> ctypes.c_longlong:
    return ctypes.c_longlong(int(v))


def _p(v: int) -> ctypes.c_uint64:
    return ctypes.c_uint64(int(v))


def _grid1(rt: _Runtime, total: int, block: int = 256) -> tuple[int, int, int]:
    return (max(1, min(math.ceil(total / block), rt.num_sms * 16)), 1, 1)


class _Job:
    """One convolution's geometry, buffers and kernels, ready to enqueue (possibly many times)."""

    def __init__(self, rt: _Runtime, plan: Plan, x_ptr: int, xs: tuple[int, ...], w_ptr: int,
                 ws: tuple[int, ...], out_ptr: int) -> None:
        check_options(NAME, plan.options, OPTIONS)
        fuse = plan.options.get("fuse_dequantize", True)
        if not isinstance(fuse, bool):
            raise QconvError(f"fuse_dequantize must be True or False, got {fuse!r}")
        prec = plan.precision
        if prec is Precision.INT8:
            elem, module, prefix, suf = _INT8[_int8_path(plan)]
        else:
            elem, module, prefix, suf = _CONV[prec]
        mma = module == "conv_s8_mma.cu"
        self.rt, self.plan, self.prec, self.suf, self.elem = rt, plan, prec, suf, elem
        self.x_ptr, self.w_ptr, self.out_ptr = x_ptr, w_ptr, out_ptr
        n, h, wd, c = (int(d) for d in xs)
        kh, kw, oc, ic = (int(d) for d in ws)
        self.shape = (n, h, wd, oc)
        self.m = m = n * h * wd
        self.c, self.oc, self.ic, self.taps = c, oc, ic, kh * kw
        self.cp = cp = _roundup(c, 16 // elem)     # channels padded so a pixel is whole 16-byte chunks
        cw = cp * elem // 4                         # words per pixel
        kpw = _roundup(self.taps * cw, 32)          # packed K in words (a multiple of both BKWs)
        self.kp = kpw * 4 // elem                   # packed K in elements
        self.ocp = _roundup(oc, 128)
        bkw = MMA_BKW if mma else SIMT_BKW
        ktiles = kpw // bkw
        tile = plan.options.get("tile", "auto")
        outer = None
        if prec is Precision.FP32 and tile in OUTER_TILES:
            outer = tile
            tile = tile.split("/")[0]
        (bm, bn), split = choose_tiling(m, oc, ktiles, rt.num_sms, tile, plan.options.get("split_k", "auto"), mma)
        if prec is Precision.FP32 and tile == "auto":
            outer = F32_AUTO.get((bm, bn))
        kps = math.ceil(ktiles / split)
        self.split = math.ceil(ktiles / kps)
        if outer is not None:  # static shared memory, its own block size
            module, self.conv_name, self.smem, self.threads = "conv_f32_outer.cu", _outer_name(outer), 0, _outer_threads(outer)
        else:
            self.smem = STAGES * (bm + bn) * (bkw + 4) * 4
            self.conv_name, self.threads = f"{prefix}_{bm}x{bn}", 256
        self.conv_f = rt.func(module, self.conv_name, self.smem)
        self.grid = (math.ceil(m / bm), math.ceil(oc / bn), self.split)
        self.mode = 2 if self.split > 1 else (1 if prec.is_integer and fuse else 0)
        self.flag = rt.buf("flag", 8)
        if prec.is_integer or cp != c:
            self.xq = rt.buf("xq", m * cp * elem)
        else:
            self.xq = x_ptr
        self.wq = rt.buf("wq", self.ocp * self.kp * elem)
        self.params = ConvParams(self.xq, self.wq, out_ptr, n, h, wd, cw, kh, kw, (kh - 1) // 2, (kw - 1) // 2,
                                 oc, kpw, m, self.taps, ktiles, kps, self.mode,
                                 float(plan.inv) if prec.is_integer else 1.0)

    def enqueue(self, ev: int) -> None:
        """Enqueue quantize/pack, convolve and dequantize, recording events ev .. ev+3 between them."""
        rt, drv, plan, m = self.rt, self.rt.drv, self.plan, self.m
        if self.prec.is_integer:
            _ck(drv.cuMemsetD32Async(self.flag, 0, 2, rt.stream), "cuMemsetD32Async(flag)")
        rt.record(ev)
        if self.prec.is_integer:
            qmax, trunc = self.prec.qmax, int(plan.truncate)
            if self.cp == self.c and (m * self.c) % 4 == 0:
                n4 = m * self.c // 4
                rt.launch(rt.func("quant.cu", f"qconv_quantize_x4_{self.suf}"), "quantize_x4", _grid1(rt, n4), 256, 0,
                          [_p(self.x_ptr), _p(self.xq), _ll(n4), ctypes.c_float(float(plan.s_x)), _i(qmax),
                           _i(trunc), _p(self.flag)])
            else:
                rt.launch(rt.func("quant.cu", f"qconv_quantize_x_{self.suf}"), "quantize_x", _grid1(rt, m * self.cp),
                          256, 0, [_p(self.x_ptr), _p(self.xq), _ll(m), _i(self.c), _i(self.cp),
                                   ctypes.c_float(float(plan.s_x)), _i(qmax), _i(trunc), _p(self.flag)])
            rt.launch(rt.func("quant.cu", f"qconv_pack_w_{self.suf}"), "pack_w", _grid1(rt, self.ocp * self.kp), 256, 0,
                      [_p(self.w_ptr), _p(self.wq), _i(self.taps), _i(self.oc), _i(self.ic), _i(self.cp),
                       _i(self.ocp), _i(self.kp), ctypes.c_float(float(plan.s_w)), _i(qmax), _i(trunc), _i(1),
                       _p(self.flag)])
        else:
            if self.xq != self.x_ptr:
                rt.launch(rt.func("quant.cu", "qconv_pad_x_f32"), "pad_x_f32", _grid1(rt, m * self.cp), 256, 0,
                          [_p(self.x_ptr), _p(self.xq), _ll(m), _i(self.c), _i(self.cp)])
            rt.launch(rt.func("quant.cu", "qconv_pack_w_f32"), "pack_w_f32", _grid1(rt, self.ocp * self.kp), 256, 0,
                      [_p(self.w_ptr), _p(self.wq), _i(self.taps), _i(self.oc), _i(self.ic), _i(self.cp),
                       _i(self.ocp), _i(self.kp)])
        rt.record(ev + 1)
        if self.split > 1:
            _ck(drv.cuMemsetD32Async(self.out_ptr, 0, m * self.oc, rt.stream), "cuMemsetD32Async(output)")
        rt.launch(self.conv_f, self.conv_name, self.grid, self.threads, self.smem, [self.params])
        rt.record(ev + 2)
        if self.prec.is_integer and self.mode != 1:  # in place: int32 accumulators become float32
            total = m * self.oc
            n4 = total // 4
            inv = ctypes.c_float(float(plan.inv))
            if n4:
                rt.launch(rt.func("quant.cu", "qconv_dequantize_s32"), "dequantize", _grid1(rt, n4), 256, 0,
                          [_p(self.out_ptr), _ll(n4), inv])
            if n4 * 4 < total:
                rt.launch(rt.func("quant.cu", "qconv_dequantize_s32_tail"), "dequantize_tail", (1, 1, 1), 256, 0,
                          [_p(self.out_ptr), _ll(n4 * 4), _ll(total), inv])
        rt.record(ev + 3)

    def phases(self, ev: int) -> dict[str, float]:
        rt = self.rt
        return {"quantize" if self.prec.is_integer else "pack": rt.elapsed(ev, ev + 1),
                "convolve": rt.elapsed(ev + 1, ev + 2), "dequantize": rt.elapsed(ev + 2, ev + 3)}

    def check_flag(self) -> None:
        if not self.prec.is_integer:
            return
        bad = np.zeros(1, dtype=np.int32)
        _ck(self.rt.drv.cuMemcpyDtoH(bad, self.flag, 4), "cuMemcpyDtoH(flag)")
        if bad[0] & 1:  # bit 0: the input's quantize kernel saw a NaN/inf; bit 1: the kernel's
            raise QconvError("input holds non-finite value(s) (NaN or inf): qconv convolves finite data only")
        if bad[0] & 2:
            raise QconvError("kernel holds non-finite value(s) (NaN or inf): qconv convolves finite data only")


def _device_inputs(rt: _Runtime, x: Any, w: Any, keep: list[Any]) -> tuple[int, tuple[int, ...], int, tuple[int, ...]]:
    drv = rt.drv
    if isinstance(x, np.ndarray) or isinstance(w, np.ndarray):
        raise QconvError("pass both tensors on the device or both as numpy arrays")
    x_ptr, xs, _ = _device_view(x, "input", keep)
    w_ptr, ws, _ = _device_view(w, "kernel", keep)
    for ptr, what in ((x_ptr, "input"), (w_ptr, "kernel")):
        ordinal = _ck(drv.cuPointerGetAttribute(
            drv.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr),
            f"cuPointerGetAttribute({what} device ordinal)")
        if int(ordinal) != 0:
            raise QconvError(f"{what} lives on GPU {int(ordinal)}; the cuda backend runs on GPU 0")
    # The producer's stream may still be writing the inputs: wait for the device.
    _ck(drv.cuCtxSynchronize(), "cuCtxSynchronize")
    return x_ptr, xs, w_ptr, ws


def run(plan: Plan, x: Any, w: Any) -> BackendRun:
    check_options(NAME, plan.options, OPTIONS)
    _int8_path(plan)
    rt = _runtime()
    with rt.lock:
        rt.make_current()
        return _run(rt, plan, x, w)


def _run(rt: _Runtime, plan: Plan, x: Any, w: Any) -> BackendRun:
    drv = rt.drv
    device = not isinstance(x, np.ndarray) or not isinstance(w, np.ndarray)
    keep: list[Any] = []
    if device:
        x_ptr, xs, w_ptr, ws = _device_inputs(rt, x, w, keep)
    else:
        xs, ws = x.shape, w.shape
        x_ptr, w_ptr = rt.buf("x_in", x.nbytes), rt.buf("w_in", w.nbytes)
    n, h, wd, _ = xs
    oc = ws[2]
    out_bytes = 4 * n * h * wd * oc
    out_ptr = int(_ck(drv.cuMemAlloc(max(out_bytes, 4)), "cuMemAlloc(output)")) if device else rt.buf("out", out_bytes)
    try:
        job = _Job(rt, plan, x_ptr, xs, w_ptr, ws, out_ptr)
        if not device:
            rt.record(0)
            _ck(drv.cuMemcpyHtoDAsync(x_ptr, x, x.nbytes, rt.stream), "cuMemcpyHtoDAsync(input)")
            _ck(drv.cuMemcpyHtoDAsync(w_ptr, w, w.nbytes, rt.stream), "cuMemcpyHtoDAsync(kernel)")
            rt.record(1)
        # Hold the stream while the kernels are enqueued so that the events time GPU work only.
        rt.gate_close()
        try:
            job.enqueue(2)
        finally:
            rt.gate_open()
        if not device:
            y = np.empty(job.shape, dtype=np.float32)
            _ck(drv.cuMemcpyDtoHAsync(y, out_ptr, out_bytes, rt.stream), "cuMemcpyDtoHAsync(output)")
        rt.record(6)
        _ck(drv.cuEventSynchronize(rt.event(6)), "cuEventSynchronize")
        job.check_flag()
        phases = job.phases(2)
        phases["transfer"] = rt.elapsed(0, 1) + rt.elapsed(5, 6) if not device else 0.0
    except BaseException:
        if device:
            drv.cuMemFree(out_ptr)
        raise
    output = DeviceArray(out_ptr, job.shape) if device else y
    return BackendRun(output, phases)


def profile(plan: Plan, x: Any, w: Any, reps: int = 50) -> dict[str, Any]:
    """Kernel times for benchmarks: `reps` back-to-back runs of quantize/pack, convolve and
    dequantize enqueued behind the stream gate, each bracketed by CUDA events; returns the median
    seconds per phase, all samples, and the launch configuration. Inputs: numpy (copied once) or
    device arrays."""
    check_options(NAME, plan.options, OPTIONS)
    _int8_path(plan)
    rt = _runtime()
    with rt.lock:
        rt.make_current()
        drv = rt.drv
        keep: list[Any] = []
        if isinstance(x, np.ndarray):
            x_ptr, w_ptr = rt.buf("x_in", x.nbytes), rt.buf("w_in", w.nbytes)
            _ck(drv.cuMemcpyHtoD(x_ptr, x, x.nbytes), "cuMemcpyHtoD(input)")
            _ck(drv.cuMemcpyHtoD(w_ptr, w, w.nbytes), "cuMemcpyHtoD(kernel)")
            xs, ws = x.shape, w.shape
        else:
            x_ptr, xs, w_ptr, ws = _device_inputs(rt, x, w, keep)
        n, h, wd, _ = xs
        out_ptr = rt.buf("prof_out", 4 * n * h * wd * ws[2])
        job = _Job(rt, plan, x_ptr, xs, w_ptr, ws, out_ptr)
        job.enqueue(0)  # warm-up (and module loads) outside the gate
        _ck(drv.cuStreamSynchronize(rt.stream), "cuStreamSynchronize")
        samples: dict[str, list[float]] = {}
        done = 0
        while done < reps:
            batch = min(64, reps - done)  # bounded: the launch queue must never fill behind the gate
            rt.gate_close()
            try:
                for r in range(batch):
                    job.enqueue(4 * r)
            finally:
                rt.gate_open()
            _ck(drv.cuStreamSynchronize(rt.stream), "cuStreamSynchronize")
            for r in range(batch):
                for k, v in job.phases(4 * r).items():
                    samples.setdefault(k, []).append(v)
            done += batch
        job.check_flag()
        med = {k: float(np.median(v)) for k, v in samples.items()}
        return {"median": med, "samples": samples, "kernel": job.conv_name, "split_k": job.split,
                "grid": job.grid, "smem": job.smem}


class Prepared:
    """Interim: the kernel is uploaded once; each call re-quantizes and re-packs it on the device
    (the device-resident packed kernel replaces this)."""

    def __init__(self, plan: Plan, w: np.ndarray) -> None:
        check_options(NAME, plan.options, OPTIONS)
        _int8_path(plan)
        s = plan.spec
        if s is not None and not s.is_default or plan.bias is not None or plan.per_channel:
            raise InputError("the cuda backend runs the assignment's layer only ('same', stride 1, one group, "
                             "no bias, one kernel scale) for now; use backend='reference'")
        self.plan, self.w = plan, w
        self._dw: DeviceArray | None = None
        self._lock = threading.Lock()

    def _device_kernel(self) -> "DeviceArray":
        with self._lock:
            if self._dw is None:
                rt = _runtime()
                with rt.lock:
                    rt.make_current()
                    ptr = int(_ck(rt.drv.cuMemAlloc(self.w.nbytes), "cuMemAlloc(kernel)"))
                    _ck(rt.drv.cuMemcpyHtoD(ptr, self.w, self.w.nbytes), "cuMemcpyHtoD(kernel)")
                self._dw = DeviceArray(ptr, self.w.shape)
            return self._dw

    def run(self, x: Any, geom: Any, out: Any = None) -> BackendRun:
        plan = self.plan
        if isinstance(x, np.ndarray):
            s_x = plan.input_scale(x) if plan.precision.is_integer else None
            r = run(dataclasses.replace(plan, s_x=s_x), x, self.w)
        else:
            if plan.precision.is_integer and plan.s_x is None:
                raise InputError("device inputs need a fixed input scale for now (a number or a pair)")
            s_x = plan.s_x
            r = run(plan, x, self._device_kernel())
        if out is not None:
            if isinstance(out, np.ndarray) and isinstance(r.output, np.ndarray):
                out[...] = r.output
                r.output = out
            else:
                raise InputError("out= for device inputs is not supported yet")
        r.s_x = s_x
        return r


def prepare(plan: Plan, w: np.ndarray) -> Prepared:
    return Prepared(plan, w)
