"""What c-scalar and c-avx2 share: a prepared convolution over qconv_conv2d calls."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..contract import Geometry, Plan, check_finite
from ..errors import InputError
from . import _cext
from .base import BackendRun


class Prepared:
    """Interim: re-packs the kernel on every call (the C prepared ABI replaces this)."""

    def __init__(self, plan: Plan, w: np.ndarray, isa: str, threads: int, fuse_dequantize: bool = True) -> None:
        s = plan.spec
        if s is not None and not s.is_default or plan.bias is not None or plan.per_channel:
            raise InputError("the C backends run the assignment's layer only ('same', stride 1, one group, "
                             "no bias, one kernel scale) for now; use backend='reference'")
        self.plan, self.w, self.isa, self.threads, self.fuse = plan, w, isa, threads, fuse_dequantize

    def run(self, x: np.ndarray, geom: Geometry, out: np.ndarray | None = None) -> BackendRun:
        plan = self.plan
        check_finite(x, "input")
        s_x = plan.input_scale(x) if plan.precision.is_integer else None
        p = dataclasses.replace(plan, s_x=s_x)
        y, t = run_c(p, x, self.w, self.isa, self.threads, self.fuse)
        if out is not None:
            out[...] = y.output
            y.output = out
        y.s_x = s_x
        return y


def run_c(plan: Plan, x: np.ndarray, w: np.ndarray, isa: str, threads: int,
          fuse_dequantize: bool = True) -> tuple[BackendRun, dict]:
    if plan.precision.is_integer:
        s_x, s_w, inv = plan.s_x, plan.s_w, plan.inv
    else:
        s_x = s_w = inv = None
    y, t = _cext.conv2d(plan.precision.value, isa, threads, plan.truncate, s_x, s_w, inv, x, w,
                        fuse_dequantize)
    phases = {p: t[p] for p in ("quantize", "pack", "convolve", "dequantize")}
    return BackendRun(y, phases), t
