"""What c-scalar and c-avx2 share: turning a Plan into one qconv_conv2d call."""

from __future__ import annotations

import numpy as np

from ..contract import Plan
from . import _cext
from .base import BackendRun


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
