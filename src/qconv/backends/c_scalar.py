"""c-scalar: the C baseline (csrc/conv_scalar.c): one thread, scalar operations, not vectorized.

The assignment's Problem 1/2 baseline, and the scalar twin every SIMD kernel is checked against
(csrc/conv_scalar.c, csrc/dwconv_scalar.c). Implements the whole contract: stride, zero padding,
groups, depthwise, bias and per-channel kernel scales. Takes no options.
"""

from __future__ import annotations

import numpy as np

from ..contract import Plan, Precision
from . import _cext
from ._cpu_common import Prepared, c_tiles
from .base import BackendRun, Tile, check_options, run_once

NAME = "c-scalar"
ACCEPTS_DEVICE_ARRAYS = False


def is_available() -> tuple[bool, str]:
    why = _cext.load_error()
    if why:
        return False, why
    return True, "C extension qconv._qconv_c (scalar kernels)"


def tiles(options: dict, precision: Precision) -> list[Tile]:
    """The scalar kernels' tile as C declares it (qconv_tile: 1 on every axis)."""
    return [c_tiles("scalar", Precision(precision))]


def bound_instruction(options: dict, precision: Precision) -> tuple[str, int] | None:
    """FP32: a scalar multiply and add (qconv_peak's "scalar-fma"); integers: none measured."""
    return ("scalar-fma", 1) if Precision(precision) is Precision.FP32 else None


def threads(options: dict) -> int:
    """One thread, always."""
    return 1


def prepare(plan: Plan, w: np.ndarray) -> Prepared:
    check_options(NAME, plan.options, ())
    return Prepared(plan, w, "scalar", 1)


def run(plan: Plan, x: np.ndarray, w: np.ndarray) -> BackendRun:
    return run_once(prepare, plan, x, w)
