"""The numerical contract, in numpy: precisions, quantize, exact integer convolution, dequantize.

Every backend computes these functions; this module is their definition and the oracle the
tests compare against. See docs/SEMANTICS.md for the prose version.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError
from .geometry import ConvSpec, Geometry, check_layer, conv_spec, default_geometry, same_padding  # noqa: F401

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
            raise InputError("fp32 has no integer range")
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
        raise InputError(
            f"unknown precision {p!r}: use fp32, int32, int16 or int8 (or the assignment's 32, 16, 8)"
        )
    return _PRECISION_ALIASES[key]


class Rounding(enum.Enum):
    NEAREST = "nearest"    # round half to even: rint, _mm256_cvtps_epi32, __float2int_rn
    TRUNCATE = "truncate"  # toward zero: the assignment's (int) cast


# Every spelling parse_rounding accepts (any case), the canonical name first: the one list the
# library, the CLI's -r and docs/SEMANTICS.md share.
ROUNDING_SPELLINGS = {Rounding.NEAREST: ("nearest", "rint", "even"),
                      Rounding.TRUNCATE: ("truncate", "trunc", "toward-zero")}


def rounding_help() -> str:
    """'nearest (half to even; also rint, even) or truncate (toward zero; also trunc, toward-zero)'."""
    what = {Rounding.NEAREST: "half to even", Rounding.TRUNCATE: "toward zero"}
    return " or ".join(f"{names[0]} ({what[r]}; also {', '.join(names[1:])})"
                       for r, names in ROUNDING_SPELLINGS.items())


def parse_rounding(r: "Rounding | str") -> Rounding:
    if isinstance(r, Rounding):
        return r
    key = str(r).strip().lower()
    for rounding, names in ROUNDING_SPELLINGS.items():
        if key in names:
            return rounding
    raise InputError(f"unknown rounding {r!r}: use {rounding_help()}")


@dataclass(frozen=True)
class Plan:
    """A resolved call: everything a backend needs besides the tensors, exactly.

    Scales are float32 values (the quantize multiply is one float32 multiply). ``s_w`` is one
    value or one per output channel (an (OC,) float32 array). ``s_x`` is fixed, or None with
    ``input_q`` set: then each call takes s_x = maxabs_scale(x, input_q) from its own input
    (backends may compute it in a fused reduction; the value is the same bits).
    ``options`` holds backend-specific knobs (threads, int8 path...); each backend validates its own.
    """

    precision: Precision
    rounding: Rounding = Rounding.NEAREST
    s_x: np.float32 | None = None
    s_w: "np.float32 | np.ndarray | None" = None
    options: dict[str, Any] = field(default_factory=dict)
    spec: "ConvSpec | None" = None
    bias: np.ndarray | None = None          # float32 (OC,), added after dequantization
    input_q: int | None = None              # per-call maxabs input scale to this Q

    @property
    def inv(self) -> "np.float32 | np.ndarray":
        if self.s_x is None or self.s_w is None:
            raise InputError("this plan has no fixed dequantize factor (fp32, or a per-call input scale)")
        return dequant_factor(self.s_x, self.s_w)

    @property
    def truncate(self) -> bool:
        return self.rounding is Rounding.TRUNCATE

    @property
    def per_channel(self) -> bool:
        return isinstance(self.s_w, np.ndarray)

    def input_scale(self, x: np.ndarray) -> np.float32:
        """s_x for this input: the fixed one, or maxabs to input_q (numpy; backends may fuse it)."""
        if self.s_x is not None:
            return self.s_x
        if self.input_q is None:
            raise InputError("fp32 has no input scale")
        return maxabs_scale(x, self.input_q)


def absmax(t: np.ndarray) -> float:
    """max|t| (0 for an empty tensor; NaN where t holds one) from max and min: no |t| copy."""
    t = np.asarray(t)
    return max(float(t.max(initial=0.0)), -float(t.min(initial=0.0)))


def maxabs_scale(t: np.ndarray, q: int) -> np.float32:
    """The largest float32 s with R(float32(max|t|) * s) <= q: s = float32(q / max|t|), stepped
    down while float32 rounding of max|t| * s would pass q. An all-zero tensor gets s = 1."""
    m = absmax(t)
    if not math.isfinite(m):  # NaN or inf: the library's own message, not a scale one
        check_finite(np.asarray(t), "the tensor")
    if m == 0.0:
        return np.float32(1.0)
    with np.errstate(over="ignore"):  # tiny data: q / m past float32's range
        s = np.float32(q / m)
    if not np.isfinite(s):
        tiny = float(np.finfo(np.float32).tiny)
        what = ("the tensor is all denormal" if m < tiny else
                f"the data are normal float32 but too small for this precision's range (max|value| must be "
                f"at least {q / float(np.finfo(np.float32).max):.3g} to scale to {q})")
        raise InputError(f"max|value| = {m:.3g} is too small to scale to {q} within float32 "
                         f"(the scale would be {q / m:.3g}, past float32's largest, 3.4e38): {what}")
    while float(np.float32(np.float32(m) * s)) > q:
        s = np.nextafter(s, np.float32(0))
    return s


def dequant_factor(s_x: float, s_w: "float | np.ndarray") -> "np.float32 | np.ndarray":
    """inv = float32(1 / (float64(float32(s_x)) * float64(float32(s_w)))), one per channel for a
    vector s_w. Refuses scales whose factor leaves float32 (every backend refuses alike)."""
    sw64 = np.asarray(s_w, dtype=np.float32).astype(np.float64)
    with np.errstate(over="ignore", divide="ignore"):
        inv64 = 1.0 / (float(np.float32(s_x)) * sw64)
        inv = inv64.astype(np.float32)
    if not (np.all(np.isfinite(inv)) and np.all(inv > 0)):
        raise InputError(f"scales s_input={float(np.float32(s_x)):g}, s_kernel={_fmt_scales(s_w)}: "
                         f"1/(s_input*s_kernel) must be a positive finite float32 (between about 1e-38 "
                         f"and 3e38), so the product of the scales must lie in about [3e-39, 8e37]")
    return np.float32(inv) if inv.ndim == 0 else inv


def _fmt_scales(s: "float | np.ndarray") -> str:
    a = np.asarray(s)
    return f"{float(a):g}" if a.ndim == 0 else f"[{float(a.min()):g} .. {float(a.max()):g}] per channel"


def quantize(t: np.ndarray, s: float, precision: Precision,
             rounding: Rounding = Rounding.NEAREST) -> np.ndarray:
    """q = clamp(R(float32(t) * float32(s)), -Qmax, Qmax), returned in the precision's int dtype."""
    qmax = precision.qmax
    with np.errstate(over="ignore"):  # a product past float32's range is inf: it saturates
        v = np.asarray(t, dtype=np.float32) * (np.float32(s) if np.ndim(s) == 0 else np.asarray(s, np.float32))
    r = np.trunc(v) if rounding is Rounding.TRUNCATE else np.rint(v)
    # Clamp in float64 so that +-Qmax (2^31-1 is not a float32) is exact; r is already an integer.
    r = np.clip(r.astype(np.float64), -qmax, qmax)
    return r.astype(precision.int_dtype)


def quantize_kernel(w: np.ndarray, s_w: "float | np.ndarray", precision: Precision,
                    rounding: Rounding = Rounding.NEAREST) -> np.ndarray:
    """quantize() of a (KH, KW, OC, IC) kernel with one scale, or one per output channel."""
    return quantize(w, kernel_scale_view(s_w), precision, rounding)


def kernel_scale_view(s_w: "float | np.ndarray") -> "np.float32 | np.ndarray":
    a = np.asarray(s_w, dtype=np.float32)
    return np.float32(a) if a.ndim == 0 else a[:, None]  # (OC, 1): broadcasts over (KH, KW, OC, IC)


def conv2d_quantized(x: np.ndarray, w: np.ndarray, precision: Precision, s_x: float,
                     s_w: "float | np.ndarray", rounding: Rounding = Rounding.NEAREST,
                     geom: "Geometry | None" = None, bias: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, int]:
    """The contract's integer pipeline, defined once: quantize both tensors, convolve exactly with
    int32 wrap-around, dequantize (+ bias). Returns (y float32, acc int32, wrapped outputs)."""
    inv = dequant_factor(s_x, s_w)
    acc, wrapped = conv2d_int_wrapped(quantize(x, s_x, precision, rounding),
                                      quantize_kernel(w, s_w, precision, rounding), geom)
    return dequantize(acc, inv, bias), acc, wrapped


def count_saturated(t: np.ndarray, s: float, precision: Precision,
                    rounding: Rounding = Rounding.NEAREST) -> int:
    """How many elements quantize() clamps: |R(float32(t) * float32(s))| > Qmax, counted as
    |float32(t) * float32(s)| >= the least float32 that R takes past Qmax (one product and no
    rounded float64 copy: every result() counts this over the whole input)."""
    with np.errstate(over="ignore"):  # a product past float32's range is inf: it saturates
        v = np.multiply(np.asarray(t, dtype=np.float32), np.float32(s) if np.ndim(s) == 0 else s, dtype=np.float32)
    return int(np.count_nonzero(np.abs(v, out=v) >= saturation_edge(precision.qmax, rounding)))


@functools.lru_cache(maxsize=None)
def saturation_edge(qmax: int, rounding: Rounding = Rounding.NEAREST) -> np.float32:
    """The least float32 v with R(v) > Qmax. Truncating, Qmax + 1; to nearest, Qmax + 1/2, since
    Qmax is odd and the tie goes to the even Qmax + 1. Rounded up to a float32 (2^31 - 1/2 is not
    one: the edge is then 2^31)."""
    assert qmax % 2 == 1
    edge = qmax + (1.0 if rounding is Rounding.TRUNCATE else 0.5)
    v = np.float32(edge)
    return v if float(v) >= edge else np.nextafter(v, np.float32(np.inf))


def dequantize(acc: np.ndarray, inv: "np.float32 | np.ndarray", bias: np.ndarray | None = None) -> np.ndarray:
    """y = float32(acc) * inv[o] (+ bias[o]): int32 -> float32 rounds to nearest even, then one
    float32 multiply and one float32 add, never fused. inv is one factor or one per output channel."""
    y = np.asarray(acc, dtype=np.int32).astype(np.float32) * np.asarray(inv, dtype=np.float32)
    return y if bias is None else y + np.asarray(bias, dtype=np.float32)


def conv2d_direct(x: np.ndarray, w: np.ndarray, geom: Geometry | None = None,
                  dtype: "type[np.floating]" = np.float64) -> np.ndarray:
    """The convolution written plainly: one matmul (or broadcast product) per kernel tap and group.

    Accumulates in ``dtype``: float64 for the reference every NRMSE is measured against (and,
    on integer-valued inputs, the exact integer sum), float32 for the reference backend's FP32.
    x: (N, H, W, C); w: (KH, KW, OC, C/g). Returns (N, Ho, Wo, OC) in ``dtype``.
    """
    g = geom if geom is not None else default_geometry(x.shape, w.shape)
    s = g.spec
    sh, sw = s.stride
    xp = np.zeros((g.n, g.h + g.pt + g.pb, g.w + g.pl + g.pr, s.c), dtype=dtype)
    xp[:, g.pt:g.pt + g.h, g.pl:g.pl + g.w, :] = x
    wt = np.asarray(w, dtype=dtype)
    ocg = s.oc // s.groups
    y = np.zeros((g.n, g.ho, g.wo, s.groups, ocg), dtype=dtype)
    # (G, ocg, icg) per tap; x taps viewed as (..., G, icg).
    wg = wt.reshape(s.kh, s.kw, s.groups, ocg, s.icg)
    for i in range(s.kh):
        for j in range(s.kw):
            xs = xp[:, i:i + sh * (g.ho - 1) + 1:sh, j:j + sw * (g.wo - 1) + 1:sw, :]
            if s.groups == 1:
                y[..., 0, :] += xs @ wg[i, j, 0].T
            elif s.icg == 1:  # depthwise (and channel multipliers): a broadcast product
                y += xs[..., :, None] * wg[i, j, :, :, 0]
            else:
                y += np.einsum("nhwgi,goi->nhwgo", xs.reshape(*xs.shape[:3], s.groups, s.icg), wg[i, j])
    return y.reshape(g.out_shape)


def conv2d_float64(x: np.ndarray, w: np.ndarray, geom: Geometry | None = None) -> np.ndarray:
    """The float64 convolution every NRMSE is measured against (N, Ho, Wo, OC)."""
    return conv2d_direct(x, w, geom, np.float64)


# float64 holds every integer below 2^53 exactly.
_EXACT_F64 = 2.0**53


def conv2d_int_wrapped(qx: np.ndarray, qw: np.ndarray, geom: Geometry | None = None) -> tuple[np.ndarray, int]:
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
        exact = conv2d_float64(qx, qw, geom).astype(np.int64)
        wrapped = int(np.count_nonzero((exact < INT32_MIN) | (exact > INT32_MAX)))
        return exact.astype(np.int32), wrapped  # int64 -> int32 keeps the low 32 bits
    # q = hi * 2^16 + lo with lo in [0, 2^16): every partial sum is below K * 2^32 < 2^53.
    if k * 2.0**33 >= _EXACT_F64:
        raise InputError(f"reduction length K={k} is too long for an exact reference (max 2^20)")
    qx64, qw64 = qx.astype(np.int64), qw.astype(np.int64)
    xh, xl = qx64 >> 16, qx64 & 0xFFFF
    wh, wl = qw64 >> 16, qw64 & 0xFFFF
    a = conv2d_float64(xh, wh, geom).astype(np.int64)                                  # * 2^32
    b = (conv2d_float64(xh, wl, geom) + conv2d_float64(xl, wh, geom)).astype(np.int64)       # * 2^16
    d = conv2d_float64(xl, wl, geom).astype(np.int64)                                  # * 1
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


def check_finite(a: np.ndarray, what: str) -> None:
    """Refuse NaN and inf: qconv convolves finite data at every precision (docs/SEMANTICS.md)."""
    if not np.isfinite(a).all():
        bad = int(np.count_nonzero(~np.isfinite(a)))
        raise InputError(f"{what} holds {bad} non-finite value(s) (NaN or inf): qconv convolves finite data only")


def fp32_overflow_error(count: int | None = None) -> InputError:
    """The error every backend raises when a FP32 convolution of finite data produces a NaN or an
    infinity (float32 overflowed; docs/SEMANTICS.md). count: the non-finite outputs, None when
    the backend does not count them."""
    where = "" if count is None else f" in {count} output(s)"
    return InputError(f"the FP32 convolution overflowed float32{where}: the inputs' magnitudes are too large "
                      f"for float32 (scale them down)")


def nrmse(approx: np.ndarray, reference: np.ndarray) -> float:
    """sqrt(mean((x - y)^2)) / (max(Y) - min(Y)), Y the float64 reference (contract's metric)."""
    x = np.asarray(approx, dtype=np.float64)
    y = np.asarray(reference, dtype=np.float64)
    if x.shape != y.shape:
        raise InputError(f"nrmse: shapes differ, {x.shape} vs {y.shape}")
    if y.size == 0:
        raise InputError("nrmse: empty tensors")
    rng = float(y.max() - y.min())
    rmse = math.sqrt(float(np.mean((x - y) ** 2)))
    if rng == 0.0:
        return 0.0 if rmse == 0.0 else math.inf
    return rmse / rng


def fp32_error_bound(x: np.ndarray, w: np.ndarray, c: float = 2.0, geom: Geometry | None = None,
                     bias: np.ndarray | None = None, per_term: float = 0.0) -> np.ndarray:
    """Per-output bound on |y32 - y64|: (c * K + per_term) * eps32 * sum |x * w| over the receptive
    field (K = KH*KW*C/groups, the terms one output sums), plus (K + 1) * 2^-149 for roundings in
    float32's subnormal range (there the error of a product is absolute, up to 2^-150, not
    relative), plus one rounding of the bias add. per_term: an error each product carries before
    the sum (a path that splits its operands, such as the cuda backend's fp32_path="tf32x3"); c
    and per_term of a backend: backends.fp32_bound."""
    k = w.shape[0] * w.shape[1] * w.shape[3]
    eps32 = float(np.finfo(np.float32).eps)
    bound = (c * k + per_term) * eps32 * conv2d_float64(np.abs(x), np.abs(w), geom) + (k + 1) * 2.0**-149
    if bias is not None:
        bound = bound * (1 + eps32) + eps32 * np.abs(conv2d_float64(x, w, geom) + np.asarray(bias, np.float64))
    return bound
