"""The C extension qconv._qconv_c, one Python wrapper per C entry point (see csrc/qconv.h).

Each wrapper checks its arguments, allocates the outputs, calls, and raises InputError/BackendError through
`_check` when the status is not QCONV_OK. The C side never sees a Python object, and cffi releases
the GIL for the duration of each call, so several Python threads may call at once.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ..errors import BackendError, BackendUnavailable, InputError

# Names the Python side uses -> the C constants (csrc/qconv.h); the values live in C only.
PRECISION_CODES = {"fp32": "QCONV_FP32", "int32": "QCONV_INT32", "int16": "QCONV_INT16", "int8": "QCONV_INT8"}
ISA_CODES = {"auto": "QCONV_ISA_AUTO", "scalar": "QCONV_ISA_SCALAR", "avx2": "QCONV_ISA_AVX2",
             "avx512vnni": "QCONV_ISA_AVX512VNNI", "avxvnni": "QCONV_ISA_AVXVNNI"}
PEAK_CODES = {"fma": "QCONV_PEAK_FMA", "mullo": "QCONV_PEAK_MULLO", "madd": "QCONV_PEAK_MADD",
              "dpwssd": "QCONV_PEAK_DPWSSD", "dpbusd": "QCONV_PEAK_DPBUSD",
              "scalar-fma": "QCONV_PEAK_SCALAR_FMA"}
FEATURE_BITS = {"avx2": "QCONV_CPU_AVX2", "fma": "QCONV_CPU_FMA", "avx512vnni_vl": "QCONV_CPU_AVX512VNNI_VL",
                "avxvnni": "QCONV_CPU_AVXVNNI"}


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


def _isa_name(code: int) -> str:
    return next(name for name, const in ISA_CODES.items() if _c(const) == code)


def cpu_features() -> set[str]:
    """The features qconv looks for that this CPU has: avx2, fma, avx512vnni_vl, avxvnni."""
    ffi, lib = _lib()
    out = ffi.new("uint32_t *")
    _check(lib.qconv_cpu_features(out), "qconv_cpu_features")
    return {name for name, bit in FEATURE_BITS.items() if out[0] & _c(bit)}


def best_isa(cap: str = "auto") -> str:
    """The best kernel family usable here, no higher than `cap` (a name from ISA_CODES)."""
    if cap not in ISA_CODES:
        raise InputError(f"unknown isa {cap!r}: choose one of {', '.join(ISA_CODES)}")
    ffi, lib = _lib()
    out = ffi.new("int *")
    _check(lib.qconv_best_isa(_c(ISA_CODES[cap]), out), f"qconv_best_isa(cap={cap})")
    return _isa_name(out[0])


def conv2d(precision: str, isa: str, threads: int, truncate: bool, s_x: float, s_w: float, inv: float,
           x: np.ndarray, w: np.ndarray, fuse_dequantize: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """qconv_conv2d: returns (y float32 (N, H, W, OC), {quantize, pack, convolve, dequantize: s,
    isa: name, threads: n, fused_dequantize: bool}). fuse_dequantize=False asks the SIMD families
    for a separate dequantize pass (the scalar family always has one)."""
    if precision not in PRECISION_CODES:
        raise InputError(f"unknown precision {precision!r}")
    if isa not in ISA_CODES:
        raise InputError(f"unknown isa {isa!r}: choose one of {', '.join(ISA_CODES)}")
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= max_threads():
        raise InputError(f"threads must be an integer in 1..{max_threads()}, got {threads!r}")
    for name, a in (("input", x), ("kernel", w)):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 4 or not a.flags.c_contiguous:
            raise InputError(f"{name} must be a C-contiguous 4-D float32 numpy array")
        if a.size == 0:
            raise InputError(f"{name} is empty")
    n, h, wd, c = x.shape
    kh, kw, oc, ic = w.shape
    if ic != c:
        raise InputError(f"kernel IC={ic} does not match the input's C={c}")
    is_int = precision != "fp32"
    if is_int:
        for name, v in (("s_x", s_x), ("s_w", s_w), ("inv", inv)):
            v32 = np.float32(v)
            if not (np.isfinite(v32) and v32 > 0):
                raise InputError(f"{name} must be a positive finite float32, got {v!r}")
    ffi, lib = _lib()
    y = np.empty((n, h, wd, oc), dtype=np.float32)
    t = ffi.new("qconv_timings *")
    st = lib.qconv_conv2d(
        _c(PRECISION_CODES[precision]), _c(ISA_CODES[isa]), int(threads), int(bool(truncate)),
        0 if fuse_dequantize else _c("QCONV_FLAG_SEPARATE_DEQUANTIZE"),
        float(np.float32(s_x or 1.0)), float(np.float32(s_w or 1.0)), float(np.float32(inv or 1.0)),
        ffi.cast("const float *", ffi.from_buffer(x)), n, h, wd, c,
        ffi.cast("const float *", ffi.from_buffer(w)), kh, kw, oc,
        ffi.cast("float *", ffi.from_buffer(y)), t)
    _check(st, f"qconv_conv2d({precision}, isa={isa}, threads={threads})")
    return y, {"quantize": t.quantize, "pack": t.pack, "convolve": t.convolve,
               "dequantize": t.dequantize, "isa": _isa_name(t.isa), "threads": t.threads,
               "fused_dequantize": bool(t.fused_dequantize)}


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
