"""Accuracy metrics: the contract's NRMSE and what it means in bits.

    nrmse(y, y64)                 the contract's metric (defined once, in qconv.contract)
    output_bits_nrmse(b)          the NRMSE of storing the output itself in b bits
    effective_bits(e)             the output width an NRMSE corresponds to (its inverse)
    storage_nrmse(t, precision)   the NRMSE of storing a tensor itself at a precision (maxabs scale)
    accumulator_bits(b, k)        the worst-case accumulator width: 2b + log2(K), rounded up
    signed_bits(m)                the width a signed integer of magnitude m needs
"""

from __future__ import annotations

import math

import numpy as np

from .contract import Precision, fp32_error_bound, maxabs_scale, nrmse, quantize

__all__ = ["nrmse", "fp32_error_bound", "output_bits_nrmse", "effective_bits", "storage_nrmse",
           "accumulator_bits", "signed_bits"]


def output_bits_nrmse(bits: int) -> float:
    """NRMSE of rounding the output to a uniform b-bit grid over its range: step / sqrt(12)."""
    return 1.0 / ((2**bits - 1) * math.sqrt(12.0))


def effective_bits(err: float | None) -> float | None:
    """The output width whose uniform rounding has this NRMSE: log2(1 + 1/(NRMSE*sqrt(12)))."""
    if err is None or not math.isfinite(err):
        return None
    if err <= 0:
        return 64.0
    return math.log2(1.0 + 1.0 / (err * math.sqrt(12.0)))


def storage_nrmse(t: np.ndarray, precision: "Precision | str" = Precision.INT8) -> float:
    """NRMSE of storing `t` itself at an integer precision with its maxabs scale (Q = Qmax):
    the data's own quantization step, before any convolution."""
    p = Precision(precision) if isinstance(precision, str) else precision
    if float(np.max(np.abs(t), initial=0.0)) == 0.0:
        return 0.0
    s = maxabs_scale(t, p.qmax)
    back = quantize(t, s, p).astype(np.float64) / float(s)
    return nrmse(back, np.asarray(t, dtype=np.float64))


def accumulator_bits(operand_bits: int, k: int) -> int:
    """Bits an accumulator needs so that no sum of K products of two b-bit operands can overflow:
    2b + log2(K), rounded up (each product needs 2b - 1 bits with its sign; K of them add log2 K)."""
    return 2 * operand_bits + math.ceil(math.log2(k)) if k > 1 else 2 * operand_bits


def signed_bits(magnitude: float) -> int:
    """Two's-complement width that holds every integer in [-m, m]."""
    m = int(magnitude)
    return 1 if m == 0 else m.bit_length() + 1
