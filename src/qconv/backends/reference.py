"""The reference backend: numpy, readable, exact. The oracle every other backend is tested against.

FP32 accumulates in float32 (per-tap matmuls). Integer precisions quantize as the contract says,
convolve exactly and wrap to int32, and count the outputs that wrapped.
"""

from __future__ import annotations

import time

import numpy as np

from ..contract import Plan, Precision, conv2d_int_wrapped, dequantize, quantize, same_padding
from .base import BackendRun, check_options

NAME = "reference"
ACCEPTS_DEVICE_ARRAYS = False


def is_available() -> tuple[bool, str]:
    return True, "numpy"


def _conv2d_float32(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    n, h, wd, c = x.shape
    kh, kw, oc, _ = w.shape
    pt, pl = same_padding(kh, kw)
    xp = np.zeros((n, h + kh - 1, wd + kw - 1, c), dtype=np.float32)
    xp[:, pt:pt + h, pl:pl + wd, :] = x
    y = np.zeros((n, h, wd, oc), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            y += xp[:, i:i + h, j:j + wd, :] @ w[i, j].T
    return y


def run(plan: Plan, x: np.ndarray, w: np.ndarray) -> BackendRun:
    check_options(NAME, plan.options, ())
    clock = time.perf_counter
    if plan.precision is Precision.FP32:
        t0 = clock()
        y = _conv2d_float32(x, w)
        return BackendRun(y, {"convolve": clock() - t0})
    t0 = clock()
    qx = quantize(x, plan.s_x, plan.precision, plan.rounding)
    qw = quantize(w, plan.s_w, plan.precision, plan.rounding)
    t1 = clock()
    acc, wrapped = conv2d_int_wrapped(qx, qw)
    t2 = clock()
    y = dequantize(acc, plan.inv)
    t3 = clock()
    return BackendRun(y, {"quantize": t1 - t0, "convolve": t2 - t1, "dequantize": t3 - t2}, wrapped)
