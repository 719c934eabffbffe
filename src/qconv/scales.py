"""Scale strategies: which (s_x, s_w) to quantize with, and why.

A scale here is a multiplier, the assignment's S: q = round(x * S). PyTorch and ONNX Runtime
give a step size s instead (x ~ q * s, so S = 1/s): pass those as ``qconv.StepSize(s)``.

- a number S: the assignment's single constant for both tensors;
- a pair (s_input, s_kernel); s_kernel may be one value per output channel (an (OC,) array);
- "maxabs": per-tensor symmetric, s = Q / max|t|, with Q <= Qmax chosen so that
  K * Q_x * Q_w <= 2^31 - 1: no accumulator can overflow. The input's s is taken per call;
- "maxabs-per-channel": the same, with one kernel scale per output channel;
- "sweep-single": the single S minimizing NRMSE on this data (the assignment's question);
  "sweep-pair": the best (s_input, s_kernel) pair; "sweep" means "sweep-single".
  Sweeps need the input, so they resolve in the one-shot conv2d, not in prepare().
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from numbers import Real

import numpy as np

from .contract import INT32_MAX, ConvSpec, Precision, Rounding, dequant_factor, maxabs_scale
from .errors import InputError, QconvWarning

PER_CALL = ("maxabs", "maxabs-per-channel")          # resolvable from the kernel alone
NEEDS_INPUT = ("sweep", "sweep-single", "sweep-pair")  # need the input too
STRATEGIES = PER_CALL + NEEDS_INPUT
ALIASES = {"sweep": "sweep-single"}


@dataclass(frozen=True)
class StepSize:
    """A step size s (x ~ q * s), PyTorch's and ONNX Runtime's convention; qconv uses S = 1/s."""

    s: float

    def multiplier(self, what: str) -> float:
        step = _positive_finite(self.s, f"{what} step size")
        return 1.0 / step


@dataclass(frozen=True)
class ScaleChoice:
    s_x: np.float32 | None          # None: maxabs of each call's input, to input_q
    s_w: "np.float32 | np.ndarray"  # one value, or (OC,) per output channel
    strategy: str                   # "single", "pair", "maxabs", "maxabs-per-channel", "sweep-single", "sweep-pair"
    reason: str
    input_q: int | None = None


def _positive_finite(s: object, what: str) -> float:
    if isinstance(s, (bool, np.bool_)) or not isinstance(s, (Real, np.floating, np.integer)):
        raise InputError(f"{what} must be a number, got {s!r}")
    try:
        f = float(s)
    except OverflowError:  # an int past float64's range
        raise InputError(f"{what} is an int of {len(str(abs(int(s))))} digits, outside float32's range") from None
    if not math.isfinite(f) or f <= 0:
        raise InputError(f"{what} must be positive and finite, got {s!r}")
    return f


def check_scale(s: object, what: str) -> np.float32:
    """The one scale check: a positive finite number (or StepSize) that float32 represents."""
    f = s.multiplier(what) if isinstance(s, StepSize) else _positive_finite(s, what)
    with np.errstate(over="ignore", under="ignore"):  # reported just below, not as a warning
        s32 = np.float32(f)
    if not np.isfinite(s32) or s32 == 0:
        raise InputError(f"{what} = {f!r} is outside float32's range (scales are multipliers, q = round(x*S))")
    return s32


def _check_kernel_scale(s: object, oc: int) -> "np.float32 | np.ndarray":
    if isinstance(s, (np.ndarray, list, tuple)) and np.ndim(s) == 1:
        v = list(s)
        if len(v) != oc:
            raise InputError(f"per-channel kernel scales: got {len(v)} values for OC={oc}")
        return np.array([check_scale(e, f"kernel scale [{i}]") for i, e in enumerate(v)], dtype=np.float32)
    return check_scale(s, "kernel scale")


def strategies_help() -> str:
    """The strategy names for a --scale help, from STRATEGIES: 'maxabs (default), ..., sweep-pair'."""
    notes = {"maxabs": " (default)", **{a: f" (= {n})" for a, n in ALIASES.items()}}
    return ", ".join(s + notes.get(s, "") for s in STRATEGIES)


def parse_scale_text(text: str) -> "float | tuple[float, float] | str":
    """The CLI's --scale: a strategy name, '64' or '16,1024' (input, kernel)."""
    t = text.strip().lower()
    if t in STRATEGIES:
        return t
    parts = t.split(",")
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        raise InputError(f"--scale {text!r}: use a number S, a pair S_INPUT,S_KERNEL, "
                         f"or one of {', '.join(STRATEGIES)}") from None
    if len(nums) == 1:
        return nums[0]
    if len(nums) == 2:
        return nums[0], nums[1]
    raise InputError(f"--scale {text!r}: a pair has two numbers")


def maxabs_q(precision: Precision, k: int) -> int:
    """Largest Q <= Qmax with K * Q^2 <= 2^31 - 1."""
    return max(1, min(precision.qmax, math.isqrt(INT32_MAX // k)))


def maxabs_per_channel(w: np.ndarray, q: int) -> np.ndarray:
    """One maxabs scale per output channel of a (KH, KW, OC, IC) kernel."""
    return np.array([maxabs_scale(w[:, :, o, :], q) for o in range(w.shape[2])], dtype=np.float32)


def strategy_name(scale: object) -> str | None:
    """The normalized strategy name of a string scale ('sweep' -> 'sweep-single'), else None."""
    if not isinstance(scale, str):
        return None
    key = scale.strip().lower()
    if key not in STRATEGIES:
        raise InputError(f"unknown scale strategy {scale!r}: use a number S, a pair (s_input, s_kernel), "
                         f"qconv.StepSize(s), or one of {', '.join(STRATEGIES)}")
    return ALIASES.get(key, key)


def for_kernel(scale: object, precision: Precision, w: np.ndarray, spec: ConvSpec) -> ScaleChoice:
    """Resolve a scale argument with the kernel alone (what prepare() knows)."""
    name = strategy_name(scale) if scale is not None else "maxabs"
    if name in NEEDS_INPUT:
        raise InputError(f"scale={scale!r} searches on the input, which prepare() does not have: "
                         f"call qconv.conv2d(x, w, ..., scale={scale!r}), or take the scales from "
                         f"qconv.sweep_scales(x, w, ...) and pass them as a pair")
    if name in PER_CALL:
        q = maxabs_q(precision, spec.k)
        limit = "Qmax" if q == precision.qmax else f"sqrt((2^31-1)/K) for K={spec.k}, below Qmax={precision.qmax}"
        if name == "maxabs":
            s_w = maxabs_scale(w, q)
            what = "largest |value| of each tensor"
        else:
            s_w = maxabs_per_channel(w, q)
            what = "largest |value| of the input and of each output channel's kernel"
        return ScaleChoice(None, s_w, name, f"{name}: {what} maps to Q={q} ({limit}), "
                           f"so no accumulator can overflow", input_q=q)
    if isinstance(scale, (tuple, list)) or (isinstance(scale, np.ndarray) and scale.ndim == 1 and scale.size == 2):
        pair = list(scale)
        if len(pair) != 2:
            raise InputError(f"a scale pair is (s_input, s_kernel), got {len(pair)} values")
        s_x = check_scale(pair[0], "input scale")
        s_w = _check_kernel_scale(pair[1], spec.oc)
        shown = f"{float(s_w):g}" if np.ndim(s_w) == 0 else "one per output channel"
        choice = ScaleChoice(s_x, s_w, "pair", f"given: s_input={float(s_x):g}, s_kernel={shown}")
    else:
        s = check_scale(scale, "scale S")
        given = (f"step size s={float(scale.s):g} for both tensors, so S = 1/s = {float(s):g}"
                 if isinstance(scale, StepSize) else f"S={float(s):g} for both tensors (the assignment's scheme)")
        choice = ScaleChoice(s, s, "single", f"given: {given}")
    dequant_factor(choice.s_x, choice.s_w)  # a refused pair is not worth a warning first
    warn_if_degenerate(w, choice.s_w, precision, "kernel")
    return choice


def for_call(scale: object, precision: Precision, x: np.ndarray, w: np.ndarray, spec: ConvSpec,
             rounding: Rounding = Rounding.NEAREST, **sweep_args) -> ScaleChoice:
    """Resolve any scale argument with both tensors (the one-shot call): sweeps run here."""
    name = strategy_name(scale)
    if name not in NEEDS_INPUT:
        return for_kernel(scale, precision, w, spec)
    if not spec.is_default:
        raise InputError(f"scale={scale!r} sweeps the assignment's layer ('same', stride 1, one group) "
                         f"only; pass a numeric scale or 'maxabs' for this layer")
    from .sweep import sweep_scales  # the sweep runs convolutions: import it only when asked
    table = sweep_scales(x, w, precision, rounding=rounding, pairs=name == "sweep-pair", **sweep_args)
    best = table.best
    return ScaleChoice(np.float32(best.s_x), np.float32(best.s_w), name, table.reason)


def warn_if_degenerate(t: np.ndarray, s: "float | np.ndarray", precision: Precision, what: str) -> None:
    """QconvWarning when a given scale zeroes or saturates most of a tensor (a step size passed as
    a multiplier, typically). Counted on |t*s| against the rounding thresholds (0.5, and
    contract.saturation_edge to nearest), not by quantizing: this runs on every one-shot call
    with a given scale."""
    from .contract import kernel_scale_view, saturation_edge
    sv = kernel_scale_view(s) if what == "kernel" else np.float32(s)
    nz = np.count_nonzero(t != 0)  # a bool count: numpy's count of a float array is 4x slower
    if nz == 0:
        return
    with np.errstate(over="ignore"):  # past float32's range: inf, which saturates
        v = np.multiply(t, sv, dtype=np.float32)
    np.abs(v, out=v)
    zeroed = (np.count_nonzero(v <= 0.5) - (t.size - nz)) / nz
    saturated = np.count_nonzero(v >= saturation_edge(precision.qmax)) / t.size
    if zeroed > 0.5 or saturated > 0.5:
        hint = ("zeroes" if zeroed > 0.5 else "saturates") + f" {max(zeroed, saturated):.0%} of the {what}"
        warnings.warn(f"this scale {hint}: qconv's scale is a multiplier (q = round(x*S)); for a "
                      f"step size (x ~ q*s, PyTorch's convention) pass qconv.StepSize(s)",
                      QconvWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The stacklevel of the first frame outside the qconv package: the user's call."""
    import os
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here):
        frame, level = frame.f_back, level + 1
    return level
