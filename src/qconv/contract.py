"""The numerical contract, in numpy: precisions, quantize, exact integer convolution, dequantize.

Every backend computes these functions; this module is their definition and the oracle the
tests compare against. See docs/SEMANTICS.md for the prose version.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import QconvError

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


class Precision(enum.Enum):
    FP32 = "fp32"
    INT32 = "int32"
    INT16 = "int16"
    INT8 = "int8"

    @property
    def bits(self) -> int:
        return {"fp32": 32, "int32": 32, "int16": 16, "int8": 8}[self.value]

    @property
    def is_integer(self) -> bool:
        return self is not Precision.FP32

    @property
    def qmax(self) -> int:
        """Largest quantized magnitude: 2^(b-1) - 1 (symmetric; -2^(b-1) is never produced)."""
        if not self.is_integer:
            raise QconvError("fp32 has no integer range")
        return 2 ** (self.bits - 1) - 1

    @property
    def int_dtype(self) -> np.dtype:
        return np.dtype({"int32": np.int32, "int16": np.int16, "int8": np.int8}[self.value])


_PRECISION_ALIASES = {
    "fp32": Precision.FP32, "float32": Precision.FP32, "f32": Precision.FP32,
    "int32": Precision.INT32, "32": Precision.INT32, "i32": Precision.INT32,
    "int16": Precision.INT16, "16": Precision.INT16, "i16": Precision.INT16,
    "int8": Precision.INT8, "8": Precision.INT8, "i8": Precision.INT8,
}


def parse_precision(p: "Precision | str | int") -> Precision:
    """Accept Precision, 'fp32'/'int8'..., the assignment's 32/16/8 and 'FP32'/'INT16' spellings."""
    if isinstance(p, Precision):
        return p
    key = str(p).strip().lower()
    if isinstance(p, bool) or key not in _PRECISION_ALIASES:
        raise QconvError(
            f"unknown precision {p!r}: use fp32, int32, int16 or int8 (or the assignment's 32, 16, 8)"
        )
    return _PRECISION_ALIASES[key]


class Rounding(enum.Enum):
    NEAREST = "nearest"    # round half to even: rint, _mm256_cvtps_epi32, __float2int_rn
    TRUNCATE = "truncate"  # toward zero: the assignment's (int) cast


def parse_rounding(r: "Rounding | str") -> Rounding:
    if isinstance(r, Rounding):
        return r
    key = str(r).strip().lower()
    aliases = {"nearest": Rounding.NEAREST, "rint": Rounding.NEAREST, "even": Rounding.NEAREST,
               "truncate": Rounding.TRUNCATE, "trunc": Rounding.TRUNCATE, "toward-zero": Rounding.TRUNCATE}
    if key not in aliases:
        raise QconvError(f"unknown rounding {r!r}: use 'nearest' (half to even) or 'truncate'")
    return aliases[key]


@dataclass(frozen=True)
class Plan:
    """Everything a backend needs besides the tensors: what to compute, exactly.

    Scales are float32 values (the quantize multiply is one float32 multiply); ``inv`` is
    float32(1 / (float64(s_x) * float64(s_w))), the single dequantize factor.
    ``options`` holds backend-specific knobs (threads, int8 path...); each backend validates its own.
    """

    precision: Precision
    rounding: Rounding = Rounding.NEAREST
    s_x: np.float32 | None = None
    s_w: np.float32 | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def inv(self) -> np.float32:
        if self.s_x is None or self.s_w is None:
            raise QconvError("fp32 plan has no dequantize factor")
        return dequant_factor(self.s_x, self.s_w)

    @property
    def truncate(self) -> bool:
        return self.rounding is Rounding.TRUNCATE


def dequant_factor(s_x: float, s_w: float) -> np.float32:
    return np.float32(1.0 / (float(np.float32(s_x)) * float(np.float32(s_w))))


def quantize(t: np.ndarray, s: float, precision: Precision,
             rounding: Rounding = Rounding.NEAREST) -> np.ndarray:
    """q = clamp(R(float32(t) * float32(s)), -Qmax, Qmax), returned in the precision's int dtype."""
    qmax = precision.qmax
    with np.errstate(over="ignore"):  # a product past float32's range is inf: it saturates
        v = np.asarray(t, dtype=np.float32) * np.float32(s)  # one float32 multiply per element
    r = np.trunc(v) if rounding is Rounding.TRUNCATE else np.rint(v)
    # Clamp in float64 so that +-Qmax (2^31-1 is not a float32) is exact; r is already an integer.
    r = np.clip(r.astype(np.float64), -qmax, qmax)
    return r.astype(precision.int_dtype)


def count_saturated(t: np.ndarray, s: float, precision: Precision,
                    rounding: Rounding = Rounding.NEAREST) -> int:
    """How many elements quantize() clamps: |R(float32(t) * float32(s))| > Qmax."""
    with np.errstate(over="ignore"):  # a product past float32's range is inf: it saturates
        v = np.abs(np.asarray(t, dtype=np.float32) * np.float32(s))
    r = np.trunc(v) if rounding is Rounding.TRUNCATE else np.rint(v)
    # Compare in float64: Qmax = 2^31-1 would round to 2^31 as a float32 and miss r == 2^31.
    return int(np.count_nonzero(r.astype(np.float64) > precision.qmax))


def dequantize(acc: np.ndarray, inv: np.float32) -> np.ndarray:
    """y = float32(acc) * inv: int32 -> float32 rounds to nearest even, then one float32 multiply."""
    return np.asarray(acc, dtype=np.int32).astype(np.float32) * np.float32(inv)


def same_padding(kh: int, kw: int) -> tuple[int, int]:
    """Top and left zero padding for 'SAME', stride 1; the extra row/column of an even kernel goes
    at the bottom/right."""
    return (kh - 1) // 2, (kw - 1) // 2


def conv2d_float64(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """SAME, stride-1 convolution in float64, one matmul per kernel tap (readable and BLAS-fast).

    x: (N, H, W, C); w: (KH, KW, OC, IC). Returns (N, H, W, OC) float64.
    """
    n, h, wd, c = x.shape
    kh, kw, oc, ic = w.shape
    pt, pl = same_padding(kh, kw)
    xp = np.zeros((n, h + kh - 1, wd + kw - 1, c), dtype=np.float64)
    xp[:, pt:pt + h, pl:pl + wd, :] = x
    wt = np.asarray(w, dtype=np.float64)
    y = np.zeros((n, h, wd, oc), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            y += xp[:, i:i + h, j:j + wd, :] @ wt[i, j].T
    return y


# float64 holds every integer below 2^53 exactly.
_EXACT_F64 = 2.0**53


def conv2d_int_wrapped(qx: np.ndarray, qw: np.ndarray) -> tuple[np.ndarray, int]:
    """Exact integer convolution of quantized tensors, wrapped to int32 as the contract says.

    Returns (acc as int32 with two's-complement wrap-around, number of outputs whose exact sum
    lies outside int32). Works through float64 matmuls that are exact by construction: when the
    sum of |products| may reach 2^53, operands are split into 16-bit halves first.
    """
    k = qw.shape[0] * qw.shape[1] * qw.shape[3]
    # |.| in int64: np.abs of an int32 -2^31 (or int16 -32768) wraps to a negative magnitude.
    mx = float(np.max(np.abs(np.asarray(qx, dtype=np.int64)), initial=0))
    mw = float(np.max(np.abs(np.asarray(qw, dtype=np.int64)), initial=0))
    if k * mx * mw < _EXACT_F64:
        exact = conv2d_float64(qx, qw).astype(np.int64)
        wrapped = int(np.count_nonzero((exact < INT32_MIN) | (exact > INT32_MAX)))
        return exact.astype(np.int32), wrapped  # int64 -> int32 keeps the low 32 bits
    # q = hi * 2^16 + lo with lo in [0, 2^16): every partial sum is below K * 2^32 < 2^53.
    if k * 2.0**33 >= _EXACT_F64:
        raise QconvError(f"reduction length K={k} is too long for an exact reference (max 2^20)")
    qx64, qw64 = qx.astype(np.int64), qw.astype(np.int64)
    xh, xl = qx64 >> 16, qx64 & 0xFFFF
    wh, wl = qw64 >> 16, qw64 & 0xFFFF
    a = conv2d_float64(xh, wh).astype(np.int64)                                  # * 2^32
    b = (conv2d_float64(xh, wl) + conv2d_float64(xl, wh)).astype(np.int64)       # * 2^16
    d = conv2d_float64(xl, wl).astype(np.int64)                                  # * 1
    low = ((b & 0xFFFF) << 16) + d  # the exact sum modulo 2^32, up to a multiple of 2^32
    acc = (low & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
    # Outside int32 unless the approximate value is close to the range; decide those exactly.
    approx = a * 2.0**32 + b * 2.0**16 + d
    near = np.abs(approx) < 2.0**32
    exact_near = (a[near].astype(object) << 32) + (b[near].astype(object) << 16) + d[near].astype(object)
    inside = sum(1 for v in exact_near if INT32_MIN <= v <= INT32_MAX)
    return acc.reshape(a.shape), int(approx.size - inside)


def overflow_possible(qx_absmax: float, qw_absmax: float, k: int) -> bool:
    """Whether any accumulator can leave int32: K * max|q_x| * max|q_w| > 2^31 - 1."""
    return k * qx_absmax * qw_absmax > INT32_MAX


def nrmse(approx: np.ndarray, reference: np.ndarray) -> float:
    """sqrt(mean((x - y)^2)) / (max(Y) - min(Y)), Y the float64 reference (contract's metric)."""
    x = np.asarray(approx, dtype=np.float64)
    y = np.asarray(reference, dtype=np.float64)
    if x.shape != y.shape:
        raise QconvError(f"nrmse: shapes differ, {x.shape} vs {y.shape}")
    if y.size == 0:
        raise QconvError("nrmse: empty tensors")
    rng = float(y.max() - y.min())
    rmse = math.sqrt(float(np.mean((x - y) ** 2)))
    if rng == 0.0:
        return 0.0 if rmse == 0.0 else math.inf
    return rmse / rng


def fp32_error_bound(x: np.ndarray, w: np.ndarray, c: float = 2.0) -> np.ndarray:
    """Per-output bound on |y32 - y64|: c * K * eps32 * sum |x * w| over the receptive field."""
    k = w.shape[0] * w.shape[1] * w.shape[3]
    eps32 = float(np.finfo(np.float32).eps)
    return c * k * eps32 * conv2d_float64(np.abs(x), np.abs(w))
