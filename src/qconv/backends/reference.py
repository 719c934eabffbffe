"""The reference backend: numpy, readable, exact. The oracle every other backend is tested against.

FP32 accumulates in float32 (contract.conv2d_direct). Integer precisions run the contract's
pipeline (contract.conv2d_quantized): quantize, convolve exactly with int32 wrap-around, count the
outputs that wrapped, dequantize (+ bias).
"""

from __future__ import annotations

import time

import numpy as np

from ..contract import Geometry, check_finite, Plan, Precision, conv2d_direct, conv2d_int_wrapped, \
    dequant_factor, dequantize, fp32_overflow_error, quantize, quantize_kernel
from .base import BackendRun, check_options, run_once

NAME = "reference"
ACCEPTS_DEVICE_ARRAYS = False


def is_available() -> tuple[bool, str]:
    return True, "numpy"


class Prepared:
    def __init__(self, plan: Plan, w: np.ndarray) -> None:
        check_options(NAME, plan.options, ())
        self.plan = plan
        self.w = w
        self.qw = None if not plan.precision.is_integer else quantize_kernel(w, plan.s_w, plan.precision,
                                                                             plan.rounding)

    def run(self, x: np.ndarray, geom: Geometry, out: np.ndarray | None = None, timed: bool = True) -> BackendRun:
        check_finite(x, "input")
        plan, clock = self.plan, time.perf_counter
        if plan.precision is Precision.FP32:
            t0 = clock()
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below
                y = conv2d_direct(x, self.w, geom, np.float32)
                if plan.bias is not None:
                    y += plan.bias
            t1 = clock()
            if not np.isfinite(y).all():
                raise fp32_overflow_error(int(np.count_nonzero(~np.isfinite(y))))
            return BackendRun(_into(out, y), {"convolve": t1 - t0})
        t0 = clock()
        s_x = plan.input_scale(x)
        inv = dequant_factor(s_x, plan.s_w)
        qx = quantize(x, s_x, plan.precision, plan.rounding)
        t1 = clock()
        acc, wrapped = conv2d_int_wrapped(qx, self.qw, geom)
        t2 = clock()
        y = dequantize(acc, inv, plan.bias)
        t3 = clock()
        return BackendRun(_into(out, y), {"quantize": t1 - t0, "convolve": t2 - t1, "dequantize": t3 - t2},
                          wrapped, s_x)


def _into(out: np.ndarray | None, y: np.ndarray) -> np.ndarray:
    if out is None:
        return y
    out[...] = y
    return out


def prepare(plan: Plan, w: np.ndarray) -> Prepared:
    return Prepared(plan, w)


def run(plan: Plan, x: np.ndarray, w: np.ndarray) -> BackendRun:
    return run_once(prepare, plan, x, w)
