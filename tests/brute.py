"""Independent oracles for the tests, written from the contract's text and nothing in qconv.

im2col spells the 'SAME', stride-1 convolution out as index arithmetic; the integer helpers sum
in Python ints (or int64 where that is provably exact) and wrap to int32 by explicit modular
arithmetic; quantize_oracle derives the single float32 multiply from an exact float64 product.
"""

from __future__ import annotations

import math

import numpy as np

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def im2col(x: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """(N*H*W, KH*KW*C): row (n, oh, ow) holds x[n, oh+i-pt, ow+j-pl, c] for (i, j, c), 0 outside.

    pt = (KH-1)//2, pl = (KW-1)//2: an even kernel's extra row/column reads below/right.
    """
    n, h, w, c = x.shape
    pt, pl = (kh - 1) // 2, (kw - 1) // 2
    cols = np.zeros((n, h, w, kh, kw, c), dtype=x.dtype)
    ow = np.arange(w)
    for i in range(kh):
        for j in range(kw):
            iw = ow + j - pl
            ok = (iw >= 0) & (iw < w)
            for oh in range(h):
                ih = oh + i - pt
                if 0 <= ih < h:
                    cols[:, oh, ow[ok], i, j, :] = x[:, ih, iw[ok], :]
    return cols.reshape(n * h * w, kh * kw * c)


def kernel_matrix(w: np.ndarray) -> np.ndarray:
    """(KH, KW, OC, IC) -> (KH*KW*IC, OC), rows in im2col's (i, j, c) order."""
    kh, kw, oc, ic = w.shape
    return w.transpose(0, 1, 3, 2).reshape(kh * kw * ic, oc)


def conv_f64(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """im2col + one float64 matmul."""
    n, h, wd, _ = x.shape
    kh, kw, oc, _ = w.shape
    cols = im2col(np.asarray(x, dtype=np.float64), kh, kw)
    return (cols @ kernel_matrix(np.asarray(w, dtype=np.float64))).reshape(n, h, wd, oc)


def conv_int_object(qx: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """Exact sums as Python ints (object dtype): slow, obviously right. Small shapes only."""
    n, h, wd, _ = qx.shape
    kh, kw, oc, _ = qw.shape
    cols = im2col(qx.astype(np.int64), kh, kw).astype(object)
    wm = kernel_matrix(qw.astype(np.int64)).astype(object)
    return np.dot(cols, wm).reshape(n, h, wd, oc)


def conv_int_exact(qx: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """Exact sums as Python ints, fast: int64 matmul when |sum| < 2^63 is guaranteed, else
    16-bit halves (every partial int64 matmul is then far below 2^63) recombined in Python ints."""
    n, h, wd, _ = qx.shape
    kh, kw, oc, _ = qw.shape
    cols = im2col(qx.astype(np.int64), kh, kw)
    wm = kernel_matrix(qw.astype(np.int64))
    k = cols.shape[1]
    bound = k * int(np.max(np.abs(cols), initial=0)) * int(np.max(np.abs(wm), initial=0))
    if bound < 2**63:
        out = (cols @ wm).astype(object)
    else:
        ch, cl = cols >> 16, cols & 0xFFFF
        wh, wl = wm >> 16, wm & 0xFFFF
        a = (ch @ wh).astype(object)
        b = (ch @ wl).astype(object) + (cl @ wh).astype(object)
        d = (cl @ wl).astype(object)
        out = a * 2**32 + b * 2**16 + d
    return out.reshape(n, h, wd, oc)


def wrap_int32(exact: np.ndarray) -> tuple[np.ndarray, int]:
    """Two's-complement wrap of exact Python-int sums to int32, and how many were outside int32."""
    flat = [int(v) for v in np.asarray(exact, dtype=object).ravel()]
    wrapped = [((v - INT32_MIN) % 2**32) + INT32_MIN for v in flat]
    outside = sum(1 for v in flat if v < INT32_MIN or v > INT32_MAX)
    return np.array(wrapped, dtype=np.int64).astype(np.int32).reshape(np.shape(exact)), outside


def quantize_oracle(t, s, qmax: int, truncate: bool = False) -> np.ndarray:
    """clamp(R(float32(t) * float32(s)), -Qmax, Qmax) as int64, element by element.

    The product of two float32 values is exact in float64 (24 + 24 significant bits <= 53), so
    rounding that exact product once to float32 *is* the single float32 multiply.
    """
    t32 = np.asarray(t, dtype=np.float32)
    s64 = float(np.float32(s))
    out = []
    for v in t32.ravel():
        exact = float(v) * s64
        with np.errstate(over="ignore"):
            p = float(np.float32(exact))
        if math.isinf(p):
            q = qmax if p > 0 else -qmax
        else:
            r = math.trunc(p) if truncate else round(p)  # Python's round() is half to even
            q = max(-qmax, min(qmax, r))
        out.append(q)
    dtype = np.int64 if qmax < 2**62 else object  # an unclamped oracle (huge qmax) needs Python ints
    return np.array(out, dtype=dtype).reshape(t32.shape)


def dequantize_oracle(acc: np.ndarray, s_x: float, s_w: float) -> np.ndarray:
    """float32(acc) (int -> float64 is exact, so one rounding to float32) times
    inv = float32(1 / (s_x * s_w)) computed in float64."""
    inv = np.float32(1.0 / (float(np.float32(s_x)) * float(np.float32(s_w))))
    a32 = np.array([np.float32(float(int(v))) for v in np.asarray(acc).ravel()], dtype=np.float32)
    return (a32 * inv).reshape(np.shape(acc))


def out_size_and_pads(size: int, k: int, s: int, padding) -> tuple[int, int, int]:
    """(output size, pad before, pad after) for one axis, straight from the contract's text:
    'same' -> ceil(size/s) outputs, total pad max((out-1)*s + k - size, 0), the odd one after;
    'valid' -> no pad; (before, after) explicit."""
    if padding == "same":
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        return out, total // 2, total - total // 2
    before, after = (0, 0) if padding == "valid" else padding
    return (size + before + after - k) // s + 1, before, after


def conv_general_f64(x: np.ndarray, w: np.ndarray, stride=(1, 1), padding=("same", "same"),
                     groups: int = 1) -> np.ndarray:
    """y[n,i,j,o] = sum x[n, i*sh+kh-top, j*sw+kw-left, g*C/G + c] * w[kh, kw, o, c] with
    g = o // (OC/G), zeros outside: a loop over output pixels with a gather and a dot per group.
    padding: per axis 'same', 'valid' or (before, after)."""
    n, h, wd, c = x.shape
    kh, kw, oc, icg = w.shape
    ho, pt, _ = out_size_and_pads(h, kh, stride[0], padding[0])
    wo, pl, _ = out_size_and_pads(wd, kw, stride[1], padding[1])
    ocg = oc // groups
    x64, w64 = np.asarray(x, dtype=np.float64), np.asarray(w, dtype=np.float64)
    y = np.zeros((n, ho, wo, oc))
    for i in range(ho):
        for j in range(wo):
            patch = np.zeros((n, kh, kw, c))
            for a in range(kh):
                for b in range(kw):
                    r, q = i * stride[0] + a - pt, j * stride[1] + b - pl
                    if 0 <= r < h and 0 <= q < wd:
                        patch[:, a, b, :] = x64[:, r, q, :]
            for o in range(oc):
                g = o // ocg
                y[:, i, j, o] = np.tensordot(patch[..., g * icg:(g + 1) * icg], w64[:, :, o, :], axes=3)
    return y
