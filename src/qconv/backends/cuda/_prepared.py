"""The prepared convolution on the GPU: the kernel quantized (contract.quantize_kernel, on the host,
so the bits are the contract's) and packed once into device memory; each call enqueues a few
kernels on one stream with no allocation, module load or synchronization for device arrays.

Per call, by path (every kernel reads and writes device memory only):
  implicit GEMM, integers: [scan x: max|x| -> s_x, inv[o] (maxabs only)] -> quantize x into the
      packed layout -> convolve (+ dequantize and bias fused in the epilogue) [-> epilogue pass
      when split-K or fuse_dequantize=False]
  implicit GEMM, FP32: scan x (finiteness) or pad x (channels not a multiple of 4, unaligned
      input) -> convolve (+ bias) [-> bias pass after split-K]
  depthwise (groups == C): scan x (finiteness; maxabs too) -> depthwise kernel (quantize on load)

The scan and quantize passes set the call's non-finite flag on the device, and the kernels that
write FP32 outputs (convolution epilogues, the bias pass after split-K, the depthwise kernel) count
the non-finite outputs (float32 overflow); the call's last kernel copies flag, count and s_x to the
call's record in mapped host memory (_record.py). Host arrays: the call waits, reads the record and raises at
its end. Device arrays: nothing waits; the record is read when the result is asked for
(Conv.result(), BackendRun.phases / .s_x), or when the output is read back through qconv
(DeviceArray.copy_to_host, np.asarray, DeviceArray.synchronize).
"""

from __future__ import annotations

import ctypes
import math
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...contract import ConvSpec, Geometry, Plan, Precision, conv_spec, dequant_factor, quantize_kernel
from ...errors import InputError
from ..base import BackendRun, check_options
from . import _arrays, _driver, _layout, _tiling
from ._jobs import DwJob, GemmJob
from ._record import LazyRun, Record

NAME = "cuda"
OPTIONS = ("int8_path", "int16_path", "int32_path", "fp32_path", "tile", "split_k", "fuse_dequantize", "stream", "timing")
CHUNK = 2 << 20        # host input -> pinned staging, in chunks: each chunk's DMA starts when it is copied
PARALLEL_MIN = 4 << 20  # from this size the chunks are copied by a thread pool (numpy releases the GIL)
_pool: Any = None


def _stage_in(x: np.ndarray, pin: int, xd: int, stream: Any, drv: Any) -> None:
    """Copy a host input into the pinned staging buffer and on to the device: chunk k's DMA is
    enqueued as soon as chunk k is copied, so host copies overlap the transfers; big inputs are
    copied by several threads at once (one thread's memcpy is far below PCIe bandwidth)."""
    global _pool
    n = x.nbytes
    src = x.reshape(-1).view(np.uint8)
    dst = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(pin))
    chunks = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]

    def copy(ab: tuple[int, int]) -> None:
        dst[ab[0]:ab[1]] = src[ab[0]:ab[1]]

    if n >= PARALLEL_MIN:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor
            _pool = ThreadPoolExecutor(8, thread_name_prefix="qconv-stage")
        done = _pool.map(copy, chunks)
    else:
        done = map(copy, chunks)
    for (a, b), _ in zip(chunks, done):  # in order, each as soon as its copy is done
        _driver.ck(drv.cuMemcpyHtoDAsync(xd + a, pin + a, b - a, stream), "cuMemcpyHtoDAsync(input)")


@dataclass(frozen=True)
class Options:
    int8_path: str = "auto"
    int16_path: str = "auto"
    int32_path: str = "auto"
    fp32_path: str = "auto"
    tile: str = "auto"
    split_k: Any = "auto"
    fuse_dequantize: bool = True
    stream: int | None = None
    timing: bool = True


def parse_options(options: dict[str, Any]) -> Options:
    check_options(NAME, options, OPTIONS)
    o = Options(**{k: v for k, v in options.items() if k != "stream"},
                stream=_driver.stream_handle(options.get("stream")))
    if o.int8_path not in _tiling.INT8_PATHS:
        raise InputError(f"int8_path {o.int8_path!r}: use one of {', '.join(_tiling.INT8_PATHS)}")
    for prec, paths in _tiling.PATHS.items():
        k = f"{prec.value}_path"
        if getattr(o, k) not in paths:
            raise InputError(f"{k} {getattr(o, k)!r}: use one of {', '.join(paths)}")
    if o.tile != "auto" and o.tile not in _tiling.MMA_TILES + _tiling.SLIM_TILES + _tiling.WGMMA_TILES + \
            _tiling.OUTER_TILES:
        _tiling.parse_tile(str(o.tile))  # raises with the list
    if o.split_k != "auto" and (isinstance(o.split_k, bool) or not isinstance(o.split_k, int) or o.split_k < 1):
        raise InputError(f"split_k must be 'auto' or a positive int, got {o.split_k!r}")
    for k in ("fuse_dequantize", "timing"):
        if not isinstance(getattr(o, k), bool):
            raise InputError(f"{k} must be True or False, got {getattr(o, k)!r}")
    return o


# --------------------------------------------------------------------------- the prepared kernel

class Prepared:
    """The kernel quantized, packed and resident in device memory, with its dequantize factors,
    kernel scales and bias; calls are enqueued on one stream (qconv's, or stream=)."""

    def __init__(self, plan: Plan, w: np.ndarray) -> None:
        self.opts = parse_options(plan.options)
        self.spec: ConvSpec = plan.spec or conv_spec(w.shape)
        self.depthwise = _layout.is_depthwise(self.spec)
        kh, kw = _tiling.MAX_KERNEL
        if not self.depthwise and (self.spec.kh > kh or self.spec.kw > kw):
            raise InputError(f"the cuda backend convolves kernels of up to {kh} x {kw} taps (KH x KW), this one "
                             f"is {self.spec.kh} x {self.spec.kw}: use a CPU backend (depthwise layers take any size)")
        self.rt = rt = _driver.runtime()
        self.ctx = rt.stream_ctx(self.opts.stream)
        self.plan = plan
        prec = self.prec = plan.precision
        spec = self.spec
        # FP32 / INT32 / INT16: "simt", "tf32x3" or "mma" (byte planes on the tensor cores); "auto" per PATH_AUTO
        self.path = _tiling.resolve_path(prec, getattr(self.opts, f"{prec.value}_path", "auto"))
        self.int8_path = _tiling.resolve_int8_path(self.opts.int8_path, rt.arch)
        self.maxabs = prec.is_integer and plan.s_x is None
        wq = quantize_kernel(w, plan.s_w, prec, plan.rounding) if prec.is_integer else np.asarray(w, np.float32)
        if self.depthwise:
            self.layout = None
            packed = _layout.pack_dw_weights(wq)
        else:
            planes = self.path == "mma"
            wgmma = prec is Precision.INT8 and self.int8_path in ("wgmma", "window")
            self.layout = _layout.gemm_layout(prec, spec, planes, 32 if wgmma else 16)
            if self.layout.planes * self.layout.groups * self.layout.wgs() > _tiling.INT_LIMIT:
                raise InputError(f"the packed kernel {w.shape} would exceed 2^31 words, the cuda kernels' "
                                 f"32-bit offsets")
            packed = (_layout.pack_plane_weights(wq, self.layout) if planes
                      else _layout.pack_gemm_weights(wq, self.layout))
            if self.path == "tf32x3":  # [2][G][ocgp][kp]: the weights' big and small TF32 parts
                packed = _layout.tf32_split(packed)
        oc = spec.oc
        self._owned: list[int] = []
        self._jobs: dict[tuple[Geometry, bool], Any] = {}
        self._by_id: dict[tuple[int, bool], Any] = {}
        self._dirty = False
        with self.ctx.lock:
            self.w_dev = self._upload(packed)
            self.bias_dev = self._upload(np.asarray(plan.bias, np.float32)) if plan.bias is not None else 0
            self.stats = self._upload(np.zeros(8, np.int32))
            self.inv_dev = self.s_w_dev = 0
            if prec.is_integer:
                if self.maxabs:
                    self.s_w_dev = self._upload(np.broadcast_to(np.asarray(plan.s_w, np.float32), (oc,)))
                    self.inv_dev = self._upload(np.zeros(oc, np.float32))  # written by each call's scan
                else:
                    self.inv_dev = self._upload(np.broadcast_to(dequant_factor(plan.s_x, plan.s_w), (oc,)))
        weakref.finalize(self, _free, self._owned, self.ctx.stream)

    def _upload(self, a: np.ndarray) -> int:
        a = np.ascontiguousarray(a)
        drv = self.rt.drv
        ptr = int(_driver.ck(drv.cuMemAlloc(max(a.nbytes, 16)), f"cuMemAlloc({a.nbytes} bytes)"))
        self._owned.append(ptr)
        _driver.ck(drv.cuMemcpyHtoD(ptr, a.ctypes.data, a.nbytes), "cuMemcpyHtoD")
        return ptr

    # ---------------------------------------------------------------- jobs: one per input shape

    def job(self, geom: Geometry, aligned: bool) -> "GemmJob | DwJob":
        # Conv hands the same Geometry object for the same input shape: look it up by identity
        # first (a job keeps its geometry alive, so the id cannot be reused), then by value.
        j = self._by_id.get((id(geom), aligned))
        if j is not None:
            return j
        with self.ctx.lock:
            j = self._jobs.get((geom, aligned))
            if j is None:
                j = (DwJob if self.depthwise else GemmJob)(self, geom, aligned)
                j.geom, j.out_shape = geom, geom.out_shape
                j.out_bytes = 4 * math.prod(geom.out_shape)
                self._jobs[(geom, aligned)] = j
            if j.geom is geom:
                self._by_id[(id(geom), aligned)] = j
        return j

    def _events_needed(self, job: Any, host: bool, timing: bool) -> int:
        if not timing:
            return 1 if host else 0
        return job.n_events + (2 if host else 0)

    # ---------------------------------------------------------------- calls

    def run(self, x: Any, geom: Geometry, out: Any = None, timed: bool = True) -> BackendRun:
        # events only where someone may read the phases: not for conv(x) (timed=False), whose
        # record is kept for its flag alone
        timing = self.opts.timing and timed
        if isinstance(x, np.ndarray):
            return self._run_host(x, geom, out, timing)
        return self._run_device(x, geom, out, timing)

    def _run_device(self, x: Any, geom: Geometry, out: Any, timing: bool) -> BackendRun:
        ctx = self.ctx
        self.rt.make_current()
        keep: list[Any] = []
        with ctx.lock:
            x_ptr, _ = _arrays.device_view(x, "input", ctx, keep)
            job = self.job(geom, x_ptr % 16 == 0)
            if out is None:
                out_ptr = ctx.take_output(job.out_bytes)
                y = _arrays.DeviceArray(out_ptr, job.out_shape, ctx, pool=True)
            else:
                if isinstance(out, np.ndarray):
                    raise InputError("out= must be a device array for device inputs (the output stays on the GPU)")
                out_ptr, _ = _arrays.device_view(out, "out", ctx, keep)
                if out_ptr % 16:
                    raise InputError("out= must start on a 16-byte boundary")
                y = out
            rec = Record(ctx, self._events_needed(job, False, timing), self.maxabs, self.plan, x)
            self._enqueue(job, x_ptr, out_ptr, rec, 0 if rec.events else None)
        if isinstance(y, _arrays.DeviceArray):
            y._record = rec
        return LazyRun(y, rec, None if self.maxabs else self.plan.s_x)

    def _run_host(self, x: np.ndarray, geom: Geometry, out: np.ndarray | None, timing: bool) -> BackendRun:
        ctx, rt, drv = self.ctx, self.rt, self.rt.drv
        rt.make_current()
        shape = geom.out_shape
        ybytes = 4 * math.prod(shape)
        job = self.job(geom, True)
        ck = _driver.ck
        with ctx.lock:
            xd = ctx.scratch("x_in", x.nbytes)
            yd = ctx.scratch("y_out", ybytes)
            rec = Record(ctx, self._events_needed(job, True, timing), self.maxabs, self.plan, x)
            ev, s = rec.events, ctx.stream
            if timing:
                rt.record(ev[0], ctx.handle)
            if _arrays.is_pinned(x):  # a host call's output, or pinned_empty: DMA straight from it
                ck(drv.cuMemcpyHtoDAsync(xd, x.ctypes.data, x.nbytes, s), "cuMemcpyHtoDAsync(input)")
            else:
                _stage_in(x, ctx.pinned("x_pin", x.nbytes), xd, s, drv)
            self._enqueue(job, xd, yd, rec, 1 if timing else None)
            y = out if out is not None else _arrays.host_output(ctx, shape)
            ck(drv.cuMemcpyDtoHAsync(y.ctypes.data, yd, ybytes, s), "cuMemcpyDtoHAsync(output)")
            rt.record(ev[-1], ctx.handle)
            if timing:
                last = len(ev) - 2
                rec.marks += [("transfer", 0, 1), ("transfer", last, last + 1)]
            rec.resolve()
        return BackendRun(y, rec.phases(), None, rec.s_x() if self.maxabs else self.plan.s_x, rec.x_absmax())

    def capture(self, x: Any, geom: Geometry, out: Any = None) -> Any:
        """This call as a CUDA Graph on x's buffer (api.Conv.capture)."""
        from ._graph import Captured
        return Captured(self, x, geom, out)

    def _enqueue(self, job: Any, x_ptr: int, out_ptr: int, rec: Any, ev0: int | None, ctx: Any = None) -> None:
        """Enqueue one call on ctx's stream (ctx.lock held): events ev0.. around the phases (None:
        untimed). ctx: this conv's stream context, or a view of it with its own scratch (a graph's)."""
        ctx = self.ctx if ctx is None else ctx
        try:
            if self._dirty:  # a call failed halfway: its flag may still be set
                _driver.ck(self.rt.drv.cuMemsetD32Async(self.stats, 0, 8, ctx.stream), "cuMemsetD32Async(stats)")
                self._dirty = False
            job.enqueue(ctx, x_ptr, out_ptr, rec, ev0)
        except BaseException:
            self._dirty = True
            raise

    def profile(self, x: Any, reps: int = 50) -> dict[str, Any]:
        """Kernel times for benchmarks (_profile.profile)."""
        from ._profile import profile
        return profile(self, x, reps)


def _free(ptrs: list[int], stream: Any) -> None:
    rt = _driver.current()
    if rt is None:
        return
    try:
        rt.make_current()
        rt.drv.cuStreamSynchronize(stream)  # calls in flight may still read the weights
        for p in ptrs:
            rt.drv.cuMemFree(p)
    except Exception:
        pass
