"""Scale strategies: which (s_x, s_w) to quantize with, and why.

- a number S: the assignment's single constant for both tensors;
- a pair (s_input, s_kernel);
- "maxabs": per-tensor symmetric, s = Q / max|t|, with Q <= Qmax chosen so that
  K * Q_x * Q_w <= 2^31 - 1: no accumulator can overflow;
- "sweep": the S (single constant) that minimizes NRMSE on this data (qconv.sweep).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import numpy as np

from .contract import INT32_MAX, Precision
from .errors import QconvError

STRATEGIES = ("maxabs", "sweep")


@dataclass(frozen=True)
class ScaleChoice:
    s_x: np.float32
    s_w: np.float32
    strategy: str  # "single", "pair", "maxabs", "sweep"
    reason: str


def _check_scale(s: object, what: str) -> np.float32:
    if isinstance(s, bool) or not isinstance(s, Real):
        raise QconvError(f"{what} must be a number, got {s!r}")
    f = float(s)
    if not math.isfinite(f) or f <= 0:
        raise QconvError(f"{what} must be positive and finite, got {s!r}")
    with np.errstate(over="ignore", under="ignore"):  # reported just below, not as a warning
        s32 = np.float32(f)
    if not np.isfinite(s32) or s32 == 0:
        raise QconvError(f"{what} = {f!r} is outside float32's range")
    return s32


def parse_scale_text(text: str) -> "float | tuple[float, float] | str":
    """The CLI's --scale: 'maxabs', 'sweep', '64' or '16,1024' (input, kernel)."""
    t = text.strip().lower()
    if t in STRATEGIES:
        return t
    parts = t.split(",")
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise QconvError(f"--scale {text!r}: use a number S, a pair S_INPUT,S_KERNEL, "
                         f"or one of {', '.join(STRATEGIES)}") from None
    if len(nums) == 1:
        return nums[0]
    if len(nums) == 2:
        return nums[0], nums[1]
    raise QconvError(f"--scale {text!r}: a pair has two numbers")


def maxabs_q(precision: Precision, k: int) -> int:
    """Largest Q <= Qmax with K * Q^2 <= 2^31 - 1."""
    return max(1, min(precision.qmax, math.isqrt(INT32_MAX // k)))


def _maxabs_scale(t: np.ndarray, q: int) -> np.float32:
    m = float(np.max(np.abs(t), initial=0.0))
    if m == 0.0:
        return np.float32(1.0)
    s = np.float32(q / m)
    # float32 rounding of s (or of m * s) must never push the largest value past Q.
    while float(np.float32(np.float32(m) * s)) > q:
        s = np.nextafter(s, np.float32(0))
    return s


def choose(scale: object, precision: Precision, x: np.ndarray, w: np.ndarray, **sweep_args) -> ScaleChoice:
    """Resolve the user's scale argument into (s_x, s_w) and the reason, for an integer precision."""
    k = w.shape[0] * w.shape[1] * w.shape[3]
    if scale is None or (isinstance(scale, str) and scale.lower() == "maxabs"):
        q = maxabs_q(precision, k)
        s_x, s_w = _maxabs_scale(x, q), _maxabs_scale(w, q)
        limit = "Qmax" if q == precision.qmax else f"sqrt((2^31-1)/K) for K={k}, below Qmax={precision.qmax}"
        return ScaleChoice(s_x, s_w, "maxabs",
                           f"maxabs: largest |value| of each tensor maps to Q={q} ({limit}), "
                           f"so no accumulator can overflow")
    if isinstance(scale, str):
        if scale.lower() == "sweep":
            from .sweep import sweep_scales  # the sweep runs convolutions: import it only when asked
            table = sweep_scales(x, w, precision, **sweep_args)
            best = table.best
            return ScaleChoice(np.float32(best.s_x), np.float32(best.s_w), "sweep", table.reason)
        raise QconvError(f"unknown scale strategy {scale!r}: use a number S, a pair (s_input, s_kernel), "
                         f"or one of {', '.join(STRATEGIES)}")
    if isinstance(scale, (tuple, list, np.ndarray)):
        scale = list(np.ravel(scale)) if isinstance(scale, np.ndarray) else scale
        if len(scale) != 2:
            raise QconvError(f"a scale pair is (s_input, s_kernel), got {len(scale)} values")
        s_x = _check_scale(scale[0], "input scale")
        s_w = _check_scale(scale[1], "kernel scale")
        return ScaleChoice(s_x, s_w, "pair", f"given: s_input={float(s_x):g}, s_kernel={float(s_w):g}")
    s = _check_scale(scale, "scale S")
    return ScaleChoice(s, s, "single", f"given: S={float(s):g} for both tensors (the assignment's scheme)")
