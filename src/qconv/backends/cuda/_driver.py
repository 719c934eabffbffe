"""The driver side of the cuda backend: availability probe, kernel launches and the process's
runtime (context, modules, streams, events, the benchmark gate); the per-stream state lives in
_streams.py. Every driver failure raises BackendError with the driver's own words."""

from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ...errors import BackendError

if TYPE_CHECKING:
    from ._streams import StreamCtx

INSTALL_HINT = "pip install qconv[cuda]"

# --------------------------------------------------------------------------- errors


def err_text(err: Any) -> str:
    from cuda.bindings import driver
    try:
        _, name = driver.cuGetErrorName(err)
        _, desc = driver.cuGetErrorString(err)
        return f"{name.decode()} ({desc.decode()})"
    except Exception:
        return str(err)


def _raise(err: Any, call: str) -> None:
    raise BackendError(f"CUDA driver call {call} failed: {err_text(err)}")


def ck(result: Any, call: str) -> Any:
    """Check a cuda-python (status, ...) tuple; return the value(s) after the status."""
    err = result[0]
    if err != _ok():
        _raise(err, call)
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


_OK: Any = None


def _ok() -> Any:
    global _OK
    if _OK is None:
        from cuda.bindings import driver
        _OK = driver.CUresult.CUDA_SUCCESS
    return _OK


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


def _attr(dev: Any, name: str) -> int:
    from cuda.bindings import driver
    return int(ck(driver.cuDeviceGetAttribute(getattr(driver.CUdevice_attribute, name), dev),
                  f"cuDeviceGetAttribute({name})"))


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
        return False, (f"no NVIDIA driver found ({e}); qconv's cuda backend needs an NVIDIA GPU and driver "
                       f"({INSTALL_HINT} for the Python side)")
    if err != driver.CUresult.CUDA_SUCCESS:
        return False, f"cuInit failed: {err_text(err)} (no usable NVIDIA GPU/driver)"
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


# --------------------------------------------------------------------------- kernel launches

class Launch:
    """One kernel with its launch configuration and its parameter struct, ready to enqueue many
    times: callers change the struct's fields (pointers) and call launch(stream). cooperative:
    launched with cuLaunchCooperativeKernel (every block resident: grid barriers are safe).
    after_pass: a convolution enqueued right after its input pass; on sm_90 and later it is launched
    with programmatic stream serialization, so its blocks start while the pass finishes (the kernel
    waits for the pass in wait_prior_grid, qconv_common.cuh)."""

    __slots__ = ("f", "name", "grid", "block", "smem", "params", "_arr", "argp", "drv", "coop", "cfg", "_stream")

    def __init__(self, rt: "Runtime", module: str, name: str, grid: tuple[int, int, int], block: int,
                 smem: int, params: ctypes.Structure, cooperative: bool = False, after_pass: bool = False) -> None:
        self.f = rt.func(module, name, smem)
        self.name, self.grid, self.block, self.smem, self.params = name, grid, block, smem, params
        self._arr = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        self.argp = ctypes.addressof(self._arr)
        self.drv = rt.drv
        self.coop = cooperative
        self.cfg = self._stream = None
        if after_pass and not cooperative and rt.cc >= (9, 0) and PDL:
            self.cfg = _pdl_config(rt.drv, grid, block, smem)

    def launch(self, stream: Any) -> None:
        """Enqueue on `stream` (a CUstream)."""
        g = self.grid
        if self.cfg is not None and not getattr(_plain, "on", False):
            if stream is not self._stream:
                self.cfg.hStream, self._stream = stream, stream
            (err,) = self.drv.cuLaunchKernelEx(self.cfg, self.f, self.argp, 0)
            if err == _OK:
                return
            self.cfg = None  # a driver that refuses the attribute: plain stream order from now on
        if self.coop:
            (err,) = self.drv.cuLaunchCooperativeKernel(self.f, g[0], g[1], g[2], self.block, 1, 1, self.smem, stream, self.argp)
        else:
            (err,) = self.drv.cuLaunchKernel(self.f, g[0], g[1], g[2], self.block, 1, 1, self.smem, stream, self.argp, 0)
        if err != _OK:
            _raise(err, f"cuLaunchKernel({self.name}, grid={g}, block={self.block}, smem={self.smem})")


# Programmatic dependent launch of the convolutions that follow a pass (sm_90+); a switch for the
# benchmark that times it against plain stream order
PDL = True
_plain = threading.local()


@contextlib.contextmanager
def plain_launches() -> Iterator[None]:
    """Launches on this thread in plain stream order (no PDL): for CUDA Graph capture, where a
    programmatic edge after the maxabs pass made the replay 8 us slower on the H100."""
    _plain.on = True
    try:
        yield
    finally:
        _plain.on = False


def _pdl_config(drv: Any, grid: tuple[int, int, int], block: int, smem: int) -> Any:
    attr = drv.CUlaunchAttribute()
    attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    cfg = drv.CUlaunchConfig()
    cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid
    cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = block, 1, 1
    cfg.sharedMemBytes = smem
    cfg.attrs, cfg.numAttrs = [attr], 1
    return cfg


def resident_blocks(rt: "Runtime", module: str, name: str, block: int, smem: int = 0) -> int:
    """How many blocks of a kernel the whole GPU holds at once (the cooperative launch limit)."""
    f = rt.func(module, name, smem)
    per_sm = int(ck(rt.drv.cuOccupancyMaxActiveBlocksPerMultiprocessor(f, block, smem),
                    f"cuOccupancyMaxActiveBlocksPerMultiprocessor({name})"))
    return max(1, per_sm) * rt.num_sms


# --------------------------------------------------------------------------- the runtime

class Runtime:
    """One per process: the primary context of GPU 0, compiled modules, the default stream."""

    def __init__(self) -> None:
        from cuda.bindings import driver
        self.drv = driver
        _ok()
        ck(driver.cuInit(0), "cuInit")
        self.dev = ck(driver.cuDeviceGet(0), "cuDeviceGet")
        self.ctx = ck(driver.cuDevicePrimaryCtxRetain(self.dev), "cuDevicePrimaryCtxRetain")
        self._tls = threading.local()
        self.make_current()
        cc = (_attr(self.dev, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR"),
              _attr(self.dev, "CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR"))
        self.cc, self.arch = cc, f"sm_{cc[0]}{cc[1]}"
        self.num_sms = _attr(self.dev, "CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT")
        self.smem_optin = _attr(self.dev, "CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN")
        self.modules: dict[str, Any] = {}
        self.funcs: dict[str, Any] = {}
        self.func_smem: dict[str, int] = {}  # the dynamic shared memory each function is allowed
        self.lock = threading.RLock()   # modules, functions, stream contexts
        # Blocking stream: ordered after work on the legacy default stream (PyTorch's default) and
        # before later work there, so device arrays from PyTorch need no synchronization.
        from ._streams import StreamCtx
        self.default = StreamCtx(self, ck(driver.cuStreamCreate(driver.CUstream_flags.CU_STREAM_DEFAULT),
                                          "cuStreamCreate"), owned=True)
        self._streams: dict[int, "StreamCtx"] = {}
        self.gate_host = int(ck(driver.cuMemHostAlloc(64, driver.CU_MEMHOSTALLOC_DEVICEMAP), "cuMemHostAlloc(gate)"))
        self.gate_dev = int(ck(driver.cuMemHostGetDevicePointer(self.gate_host, 0), "cuMemHostGetDevicePointer(gate)"))

    def make_current(self) -> None:
        """Make the context current on this thread (once per thread)."""
        if not getattr(self._tls, "current", False):
            ck(self.drv.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
            self._tls.current = True

    def stream_ctx(self, handle: int | None) -> "StreamCtx":
        """qconv's own stream (None) or the caller's stream with this handle."""
        if handle is None:
            return self.default
        from ._streams import StreamCtx
        with self.lock:
            ctx = self._streams.get(handle)
            if ctx is None:
                ctx = StreamCtx(self, self.drv.CUstream(handle), owned=False)
                self._streams[handle] = ctx
            return ctx

    def func(self, module: str, name: str, smem: int = 0) -> Any:
        key = f"{module}:{name}"
        with self.lock:
            f = self.funcs.get(key)
            if f is None:
                mod = self.modules.get(module)
                if mod is None:
                    from .. import _nvrtc
                    cubin = _nvrtc.compile_module(module, self.arch)
                    mod = ck(self.drv.cuModuleLoadData(cubin), f"cuModuleLoadData({module})")
                    self.modules[module] = mod
                f = ck(self.drv.cuModuleGetFunction(mod, name.encode()), f"cuModuleGetFunction({name})")
                self.funcs[key] = f
            # Dynamic shared memory past 48 KiB (with the kernel's static) must be allowed per function,
            # and the allowance only grows: a job of a larger layer built earlier still launches.
            if smem > self.func_smem.get(key, 0):
                static = ck(self.drv.cuFuncGetAttribute(
                    self.drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, f), f"static smem({name})")
                if smem + static > self.smem_optin:
                    raise BackendError(f"kernel {name} needs {smem + static} bytes of shared memory; "
                                       f"this GPU allows {self.smem_optin}")
                if smem + static > 48 * 1024:
                    ck(self.drv.cuFuncSetAttribute(
                        f, self.drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
                        f"cuFuncSetAttribute({name}, max dynamic shared memory = {smem})")
                    self.func_smem[key] = smem
            return f

    def record(self, event: Any, stream: int) -> None:
        """cuEventRecord(event, stream): the stream as its handle (StreamCtx.handle)."""
        (err,) = self.drv.cuEventRecord(event, stream)
        if err != _OK:
            _raise(err, "cuEventRecord")

    def elapsed(self, a: Any, b: Any) -> float:
        return float(ck(self.drv.cuEventElapsedTime(a, b), "cuEventElapsedTime")) / 1e3

    # the benchmark gate: holds a stream (qconv_gate_wait) until gate_open()
    def gate_close(self, stream: Any) -> None:
        from ._launch import launch_gate
        ctypes.c_int.from_address(self.gate_host).value = 0
        launch_gate(self, stream, self.gate_dev)

    def gate_open(self) -> None:
        ctypes.c_int.from_address(self.gate_host).value = 1

    def release_pools(self) -> None:
        """Free every pooled output and scratch buffer not in use (after a synchronize)."""
        drv = self.drv
        with self.lock:
            ctxs = [self.default, *self._streams.values()]
        for c in ctxs:
            with c.lock:
                ck(drv.cuStreamSynchronize(c.stream), "cuStreamSynchronize")
                for lst in c.out_pool.values():
                    while lst:
                        ck(drv.cuMemFree(lst.pop()), "cuMemFree")
                for ptr, _ in c.scratch_bufs.values():
                    ck(drv.cuMemFree(ptr), "cuMemFree")
                c.scratch_bufs.clear()


_rt: Runtime | None = None
_rt_lock = threading.Lock()


def runtime() -> Runtime:
    global _rt
    if _rt is not None:
        _rt.make_current()
        return _rt
    with _rt_lock:
        if _rt is None:
            ok, why = is_available()
            if not ok:
                from ...errors import BackendUnavailable
                raise BackendUnavailable(f"the cuda backend is unavailable: {why}")
            _rt = Runtime()
    _rt.make_current()
    return _rt


def current() -> Runtime | None:
    """The runtime if one was started (for finalizers: never starts one)."""
    return _rt


def stream_handle(s: Any) -> int | None:
    """A stream option as a driver handle: None (qconv's own), an int, or an object with
    ``cuda_stream`` (PyTorch), ``ptr`` (CuPy) or ``__cuda_stream__`` (the CUDA stream protocol)."""
    if s is None:
        return None
    if hasattr(s, "__cuda_stream__"):
        return int(s.__cuda_stream__()[1])
    for attr in ("cuda_stream", "ptr", "handle"):
        if hasattr(s, attr) and not isinstance(s, (int, np.integer)):
            return int(getattr(s, attr))
    if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
        from ...errors import InputError
        raise InputError(f"stream={s!r}: pass a stream handle (int), a torch.cuda.Stream or a cupy Stream")
    return int(s)
