"""The C extension qconv._qconv_c, one Python wrapper per C entry point (see csrc/qconv.h).

Each wrapper checks its arguments, allocates the outputs, calls, and raises InputError/BackendError through
`_check` when the status is not QCONV_OK. The C side never sees a Python object, and cffi releases
the GIL for the duration of each call, so several Python threads may call at once.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import numpy as np

from ..errors import BackendError, BackendUnavailable, InputError

# Names the Python side uses -> the C constants (csrc/qconv.h); the values live in C only.
PRECISION_CODES = {"fp32": "QCONV_FP32", "int32": "QCONV_INT32", "int16": "QCONV_INT16", "int8": "QCONV_INT8"}
ISA_CODES = {"auto": "QCONV_ISA_AUTO", "scalar": "QCONV_ISA_SCALAR", "avx2": "QCONV_ISA_AVX2",
             "avx512vnni": "QCONV_ISA_AVX512VNNI", "avxvnni": "QCONV_ISA_AVXVNNI",
             "avx512": "QCONV_ISA_AVX512", "amx": "QCONV_ISA_AMX",
             "vnni-emulated": "QCONV_ISA_VNNI_EMULATED",  # tests only: VNNI kernels, dp* emulated
             "amx-emulated": "QCONV_ISA_AMX_EMULATED"}    # tests only: AMX kernels, tiles emulated in C
# The test-only levels (never chosen by `auto`, usable wherever AVX2 is): run them beside ISA_ORDER's.
EMULATED_ISAS = ("vnni-emulated", "amx-emulated")
# The levels `auto` chooses from, best first (qconv_best_isa's order).
ISA_ORDER = ("amx", "avx512", "avx512vnni", "avxvnni", "avx2", "scalar")
PEAK_CODES = {"fma": "QCONV_PEAK_FMA", "mullo": "QCONV_PEAK_MULLO", "madd": "QCONV_PEAK_MADD",
              "dpwssd": "QCONV_PEAK_DPWSSD", "dpbusd": "QCONV_PEAK_DPBUSD",
              "scalar-fma": "QCONV_PEAK_SCALAR_FMA", "fma512": "QCONV_PEAK_FMA512",
              "dpwssd512": "QCONV_PEAK_DPWSSD512", "dpbusd512": "QCONV_PEAK_DPBUSD512",
              "amx-dpbssd": "QCONV_PEAK_AMX_DPBSSD"}
FEATURE_BITS = {"avx2": "QCONV_CPU_AVX2", "fma": "QCONV_CPU_FMA", "avx512vnni_vl": "QCONV_CPU_AVX512VNNI_VL",
                "avxvnni": "QCONV_CPU_AVXVNNI", "avx512": "QCONV_CPU_AVX512", "amx": "QCONV_CPU_AMX"}


_F32 = np.dtype(np.float32)


def _c(name: str) -> int:
    """The value of a constant of csrc/qconv.h."""
    return int(getattr(_lib()[1], name))


def max_threads() -> int:
    return _c("QCONV_MAX_THREADS")


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Any, Any, str]:
    try:
        from .. import _qconv_c  # type: ignore[attr-defined]
    except ImportError as e:
        return None, None, (f"the C extension qconv._qconv_c is not built ({e}); "
                            f"run `pip install -e .` (or `python setup.py build_ext --inplace`) in the qconv checkout")
    return _qconv_c.ffi, _qconv_c.lib, ""


def load_error() -> str:
    """Why the extension cannot be used ('' when it can)."""
    return _load()[2]


def _lib() -> tuple[Any, Any]:
    ffi, lib, why = _load()
    if lib is None:
        raise BackendUnavailable(why)
    return ffi, lib


def strerror(status: int) -> str:
    ffi, lib = _lib()
    return ffi.string(lib.qconv_strerror(int(status))).decode()


def _check(status: int, what: str) -> None:
    """The one place a C status becomes an exception."""
    if status != 0:
        err = InputError if status == _c("QCONV_EINVAL") else BackendError
        raise err(f"{what} failed: {strerror(status)} (qconv status {status})")


@functools.lru_cache(maxsize=None)
def _isa_name(code: int) -> str:
    return next(name for name, const in ISA_CODES.items() if _c(const) == code)


@functools.lru_cache(maxsize=None)  # CPUID traps to the hypervisor in a VM: ask once
def cpu_features() -> frozenset[str]:
    """The features qconv looks for that this CPU has: avx2, fma, avx512vnni_vl, avxvnni, avx512
    (F+BW+VL+VNNI), amx (AMX-TILE+INT8 with the OS's tile state; Linux's permission aside)."""
    ffi, lib = _lib()
    out = ffi.new("uint32_t *")
    _check(lib.qconv_cpu_features(out), "qconv_cpu_features")
    return frozenset(name for name, bit in FEATURE_BITS.items() if out[0] & _c(bit))


@functools.lru_cache(maxsize=None)
def isa_reason(isa: str) -> str:
    """Why the kernel level `isa` cannot run here ('' when it can): the CPU, the OS, or (AMX) Linux
    refusing the tile data state, or QCONV_NO_AMX set."""
    if isa not in ISA_CODES:
        raise InputError(f"unknown isa {isa!r}: choose one of {', '.join(ISA_CODES)}")
    ffi, lib = _lib()
    buf = ffi.new("char[256]")
    _check(lib.qconv_isa_reason(_c(ISA_CODES[isa]), buf, 256), f"qconv_isa_reason({isa})")
    return ffi.string(buf).decode()


def usable_isas() -> list[str]:
    """The levels `auto` may choose that run here, best first."""
    return [isa for isa in ISA_ORDER if not isa_reason(isa)]


def best_isa(cap: str = "auto") -> str:
    """The best kernel family usable here, no higher than `cap` (a name from ISA_CODES)."""
    if cap not in ISA_CODES:
        raise InputError(f"unknown isa {cap!r}: choose one of {', '.join(ISA_CODES)}")
    ffi, lib = _lib()
    out = ffi.new("int *")
    _check(lib.qconv_best_isa(_c(ISA_CODES[cap]), out), f"qconv_best_isa(cap={cap})")
    return _isa_name(out[0])


class InputStatus(InputError):
    """A C status about the input's values (non-finite data, a maxabs or dequantize scale out of
    float32's range): the caller re-derives the contract's exact message (contract.check_finite,
    maxabs_scale, dequant_factor)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@functools.lru_cache(maxsize=1)
def _codes() -> dict[str, int]:
    """The C constants the hot path needs, read once."""
    names = ("QCONV_OK", "QCONV_EINVAL", "QCONV_ENONFINITE", "QCONV_EMAXABS", "QCONV_ESCALE", "QCONV_EOVERFLOW",
             "QCONV_ECANCELED", "QCONV_KIND_DEPTHWISE", "QCONV_FLAG_SEPARATE_DEQUANTIZE")
    return {n: _c(n) for n in names}


def _threads_ok(threads: object) -> bool:
    return not isinstance(threads, bool) and isinstance(threads, (int, np.integer)) and 1 <= threads <= max_threads()


def tile(isa: str, precision: str) -> dict[str, int]:
    """qconv_tile: the tile isa's kernels declare for precision: mr (pixels per full tile), mrh
    (pixels per half-width tile, 0: none), nr (OC per block), grp (input channels packed
    together), dw_block (depthwise channel block), cpad (each group's input channels are padded
    to a multiple of it: grp, or AMX's 64)."""
    if precision not in PRECISION_CODES:
        raise InputError(f"unknown precision {precision!r}")
    if isa not in ISA_CODES:
        raise InputError(f"unknown isa {isa!r}: choose one of {', '.join(ISA_CODES)}")
    ffi, lib = _lib()
    info = ffi.new("qconv_tile_info *")
    _check(lib.qconv_tile(_c(ISA_CODES[isa]), _c(PRECISION_CODES[precision]), info), f"qconv_tile({isa}, {precision})")
    return {"mr": info.mr, "mrh": info.mrh, "nr": info.nr, "grp": info.grp, "dw_block": info.dw_block,
            "cpad": info.cpad}


def timings(t: Any) -> dict[str, Any]:
    """A qconv_timings struct as a dict (phases in seconds, isa and kind by name)."""
    return {"quantize": t.quantize, "pack": t.pack, "convolve": t.convolve, "dequantize": t.dequantize,
            "isa": _isa_name(t.isa), "threads": t.threads, "fused_dequantize": bool(t.fused_dequantize),
            "kind": "depthwise" if t.kind == _codes()["QCONV_KIND_DEPTHWISE"] else "gemm",
            "s_x": t.s_x, "temporary_buffers": bool(t.temporary_buffers)}


def _float_array(a: np.ndarray, what: str, writable: bool = False) -> np.ndarray:
    """An array C reads or writes: float32 and C-contiguous (api.py converts any other), and
    aligned: a view at an odd byte offset is copied, since C reads it through float pointers
    (undefined behaviour, which UBSan reports). Output: the caller copies the result back."""
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.flags.c_contiguous:
        raise InputError(f"{what} must be a C-contiguous float32 numpy array")
    if writable and not a.flags.writeable:
        raise InputError(f"{what} must be writeable")
    return a if a.flags.aligned else a.copy()


def prepare(precision: str, isa: str, threads: int, truncate: bool, w: np.ndarray, *, groups: int = 1,
            stride: tuple[int, int] = (1, 1), s_w: "float | np.ndarray | None" = None,
            bias: np.ndarray | None = None, fuse_dequantize: bool = True) -> tuple[Any, dict[str, Any]]:
    """qconv_prepare: quantize and pack the kernel w (KH, KW, OC, C/groups) once. s_w: one float32
    scale or one per output channel (integer precisions); bias: None or (OC,) float32.
    Returns (handle, {quantize, pack: seconds, isa, threads, fused_dequantize, kind}); the handle
    is released when garbage-collected (or by release())."""
    if precision not in PRECISION_CODES:
        raise InputError(f"unknown precision {precision!r}")
    if isa not in ISA_CODES:
        raise InputError(f"unknown isa {isa!r}: choose one of {', '.join(ISA_CODES)}")
    if not _threads_ok(threads):
        raise InputError(f"threads must be an integer in 1..{max_threads()}, got {threads!r}")
    w = _float_array(w, "kernel")
    if w.ndim != 4 or w.size == 0:
        raise InputError(f"kernel must be a non-empty 4-D (KH, KW, OC, C/groups) array, got shape {w.shape}")
    kh, kw, oc, icg = (int(d) for d in w.shape)
    sh, sw = (int(v) for v in stride)
    if groups < 1 or oc % groups or sh < 1 or sw < 1:
        raise InputError(f"groups={groups} must divide OC={oc}; strides must be positive, got {stride}")
    ffi, lib = _lib()
    is_int = precision != "fp32"
    if is_int:
        sw_arr = np.array(s_w, dtype=np.float32, ndmin=1)   # a copy: contiguous and aligned
        if sw_arr.ndim != 1 or sw_arr.size not in (1, oc) or not (np.all(np.isfinite(sw_arr)) and np.all(sw_arr > 0)):
            raise InputError(f"s_w must be one positive finite float32 or {oc} of them")
    else:
        sw_arr = np.ones(1, np.float32)
    if bias is not None:
        bias = _float_array(bias, "bias")
        if bias.shape != (oc,):
            raise InputError(f"bias must have shape ({oc},), got {bias.shape}")
    out = ffi.new("qconv_conv **")
    t = ffi.new("qconv_timings *")
    flags = 0 if fuse_dequantize else _codes()["QCONV_FLAG_SEPARATE_DEQUANTIZE"]
    st = lib.qconv_prepare(
        _c(PRECISION_CODES[precision]), _c(ISA_CODES[isa]), int(threads), int(bool(truncate)), flags,
        kh, kw, oc, icg, int(groups), sh, sw,
        ffi.cast("const float *", ffi.from_buffer(sw_arr)), int(sw_arr.size),
        ffi.cast("const float *", ffi.from_buffer(w)),
        ffi.NULL if bias is None else ffi.cast("const float *", ffi.from_buffer(bias)), out, t)
    _check(st, f"qconv_prepare({precision}, isa={isa}, threads={threads})")
    return ffi.gc(out[0], lib.qconv_release), timings(t)


def release(handle: Any) -> None:
    """Free a prepared convolution now (it must not be used afterwards)."""
    ffi, lib = _lib()
    ffi.release(handle)


def run(handle: Any, x: np.ndarray, geom: Any, s_x: float, input_q: int, y: np.ndarray,
        interruptible: bool = False) -> Any:
    """qconv_run into y. geom: a contract.Geometry (pads and output size). s_x: the input scale,
    or 0 with input_q for maxabs computed in C. interruptible: run the C call in a helper thread
    so that Ctrl-C stops it (for long calls; see _interruptible). Raises InputStatus for non-finite
    input values and scales out of float32's range (the caller words those),
    contract.fp32_overflow_error when FP32 overflowed, InputError/BackendError otherwise.
    Returns the qconv_timings struct (timings() makes it a dict; .s_x is the scale used)."""
    if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype == _F32 and y.dtype == _F32
            and x.flags.c_contiguous and x.flags.aligned
            and y.flags.c_contiguous and y.flags.aligned and y.flags.writeable):
        x = _float_array(x, "input")
        y_aligned = _float_array(y, "output", writable=True)
        if y_aligned is not y:
            t = run(handle, x, geom, s_x, input_q, y_aligned, interruptible)
            y[...] = y_aligned
            return t
    n, h, w = geom.n, geom.h, geom.w
    if x.shape != (n, h, w, geom.spec.c) or y.shape != geom.out_shape:
        raise InputError(f"input {x.shape} / output {y.shape} do not match the geometry "
                         f"({(n, h, w, geom.spec.c)} -> {geom.out_shape})")
    ffi, lib = _lib()
    t = ffi.new("qconv_timings *")
    xp, yp = ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y, require_writable=True)

    args = (handle, xp, n, h, w, geom.pt, geom.pb, geom.pl, geom.pr, geom.ho, geom.wo, s_x, input_q, yp, t)
    st = _interruptible(lambda cancel: lib.qconv_run(*args, cancel)) if interruptible else \
        lib.qconv_run(*args, ffi.NULL)
    if st:
        codes = _codes()
        if st in (codes["QCONV_ENONFINITE"], codes["QCONV_EMAXABS"], codes["QCONV_ESCALE"]):
            raise InputStatus(st, f"{strerror(st)} (qconv status {st})")
        if st == codes["QCONV_EOVERFLOW"]:
            from ..contract import fp32_overflow_error
            raise fp32_overflow_error(int(t.overflowed))
        _check(st, "qconv_run")
    return t


def _interruptible(call: Callable[[Any], int]) -> int:
    """call(cancel_flag) in a helper thread while this thread waits in join(), which Ctrl-C
    interrupts (cffi releases the GIL during the C call). On KeyboardInterrupt: qconv_cancel, wait
    for C to stop between blocks of work, re-raise. Off the main thread there is no Ctrl-C to
    take, so the call is made directly."""
    ffi, lib = _lib()
    flag = ffi.new("int *")
    if threading.current_thread() is not threading.main_thread():
        return call(flag)
    status: list[int] = []
    helper = threading.Thread(target=lambda: status.append(call(flag)), name="qconv-call", daemon=True)
    helper.start()
    try:
        helper.join()
    except KeyboardInterrupt:
        lib.qconv_cancel(flag)
        helper.join()
        raise
    return status[0]


def conv2d(precision: str, isa: str, threads: int, truncate: bool, s_x: float, s_w: float, inv: float,
           x: np.ndarray, w: np.ndarray, fuse_dequantize: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """The assignment's layer ('same', stride 1, one group) in one call: qconv_prepare, then
    qconv_run. Returns (y float32 (N, H, W, OC), {quantize, pack, convolve, dequantize: s, isa,
    threads, fused_dequantize}); quantize and pack include the kernel's (what one call costs).
    `inv` is checked but C forms it from s_x and s_w (contract.dequant_factor's formula)."""
    from ..contract import check_layer
    for name, a in (("input", x), ("kernel", w)):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 4 or not a.flags.c_contiguous:
            raise InputError(f"{name} must be a C-contiguous 4-D float32 numpy array")
        if a.size == 0:
            raise InputError(f"{name} is empty")
    if w.shape[3] != x.shape[3]:
        raise InputError(f"kernel IC={w.shape[3]} does not match the input's C={x.shape[3]}")
    is_int = precision != "fp32"
    if is_int:
        for name, v in (("s_x", s_x), ("s_w", s_w), ("inv", inv)):
            v32 = np.float32(v)
            if not (np.isfinite(v32) and v32 > 0):
                raise InputError(f"{name} must be a positive finite float32, got {v!r}")
    handle, tp = prepare(precision, isa, threads, truncate, w, s_w=np.float32(s_w) if is_int else None,
                         fuse_dequantize=fuse_dequantize)
    geom = check_layer(x.shape, w.shape)
    y = np.empty(geom.out_shape, np.float32)
    try:
        t = timings(run(handle, x, geom, float(np.float32(s_x)) if is_int else 0.0, 0, y))
    finally:
        release(handle)
    t["quantize"] += tp["quantize"]
    t["pack"] += tp["pack"]
    return y, t


def peak(instr: str, threads: int, iters: int) -> tuple[float, float]:
    """qconv_peak: run an instruction microbenchmark; returns (multiply-accumulates, seconds)."""
    if instr not in PEAK_CODES:
        raise InputError(f"unknown instruction {instr!r}: choose one of {', '.join(PEAK_CODES)}")
    if not 1 <= int(threads) <= max_threads() or int(iters) < 1:
        raise InputError(f"threads must be in 1..{max_threads()} and iters >= 1")
    ffi, lib = _lib()
    macs, secs = ffi.new("double *"), ffi.new("double *")
    _check(lib.qconv_peak(_c(PEAK_CODES[instr]), int(threads), int(iters), macs, secs), f"qconv_peak({instr})")
    return macs[0], secs[0]
