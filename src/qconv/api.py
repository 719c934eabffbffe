"""The public entry points: conv2d (the output) and conv2d_result (everything about the call)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import backends, scales
from .backends.base import PHASES
from .contract import (Plan, Precision, Rounding, conv2d_float64, conv2d_int_wrapped, count_saturated, nrmse,
                       overflow_possible, parse_precision, parse_rounding, quantize)
from .errors import QconvError

# Refuse requests whose working set is absurd before anything is allocated (bytes).
MAX_TENSOR_BYTES = 2**34


@dataclass(frozen=True)
class ConvResult:
    """One convolution: its output and what the user came for (time, accuracy, overflow, scales)."""

    output: Any                     # float32 (N, H, W, OC); numpy, or a device array for device inputs
    precision: Precision
    backend: str
    rounding: Rounding
    scale_input: float | None       # s_x (None for fp32)
    scale_kernel: float | None      # s_w
    scale_strategy: str | None      # "single", "pair", "maxabs", "sweep"
    scale_reason: str
    phases: dict[str, float]        # seconds: quantize, pack, transfer, convolve, dequantize
    overflow_possible: bool         # K * max|q_x| * max|q_w| > 2^31 - 1
    wrapped: int | None             # outputs whose int32 accumulator wrapped (None: not computed)
    saturated: tuple[int, int] | None  # (input, kernel) elements clamped at +-Qmax when quantized
    nrmse: float | None             # against the float64 reference (None: not asked)
    flops: int                      # 2 * N * H * W * OC * KH * KW * IC
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def convolve_seconds(self) -> float:
        return self.phases["convolve"]

    @property
    def gops(self) -> float:
        """Operations (2 per multiply-add) per second of the convolve phase, in G/s."""
        t = self.phases["convolve"]
        return self.flops / t / 1e9 if t > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "precision": self.precision.value,
            "rounding": self.rounding.value,
            "scale": {"input": self.scale_input, "kernel": self.scale_kernel,
                      "strategy": self.scale_strategy, "reason": self.scale_reason},
            "phases_s": dict(self.phases),
            "gops": self.gops,
            "flops": self.flops,
            "overflow_possible": self.overflow_possible,
            "wrapped_outputs": self.wrapped,
            "saturated_elements": None if self.saturated is None else
            {"input": self.saturated[0], "kernel": self.saturated[1]},
            "nrmse": self.nrmse,
            "output_shape": list(self.output.shape),
            "options": dict(self.options),
        }


def _is_device_array(a: object) -> bool:
    return not isinstance(a, np.ndarray) and (
        hasattr(a, "__cuda_array_interface__") or hasattr(a, "__dlpack__"))


def _as_host_float32(a: object, what: str) -> np.ndarray:
    if isinstance(a, np.ndarray):
        arr = a
    else:
        try:
            arr = np.asarray(a)
        except Exception as e:
            raise QconvError(f"{what}: cannot be read as an array ({e})") from None
    if arr.dtype != np.float32:
        if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
            raise QconvError(f"{what}: dtype {arr.dtype} is not a real number type (want float32)")
        with np.errstate(over="ignore"):  # reported just below, not as a warning
            converted = arr.astype(np.float32)
        if np.any(np.isfinite(arr) & ~np.isfinite(converted)):
            raise QconvError(f"{what}: values beyond float32's range")
        arr = converted
    return np.ascontiguousarray(arr)


def _shape_of(a: object) -> tuple[int, ...]:
    return tuple(int(d) for d in a.shape)  # type: ignore[attr-defined]


def validate(x: object, w: object) -> None:
    """Shapes: x (N,H,W,C), w (KH,KW,OC,IC) with IC == C, all dims positive, sizes sane."""
    xs, ws = _shape_of(x), _shape_of(w)
    if len(xs) != 4:
        raise QconvError(f"input must be 4-D (N, H, W, C), got shape {xs}")
    if len(ws) != 4:
        raise QconvError(f"kernel must be 4-D (KH, KW, OC, IC), got shape {ws}")
    if any(d <= 0 for d in xs) or any(d <= 0 for d in ws):
        raise QconvError(f"empty dimension: input {xs}, kernel {ws}")
    if ws[3] != xs[3]:
        raise QconvError(f"kernel IC={ws[3]} does not match the input's C={xs[3]} "
                         f"(input {xs}, kernel (KH, KW, OC, IC) = {ws})")
    n, h, wd, _ = xs
    for what, nbytes in (("input", 4 * math.prod(xs)), ("kernel", 4 * math.prod(ws)),
                         ("output", 4 * n * h * wd * ws[2])):
        if nbytes > MAX_TENSOR_BYTES:
            raise QconvError(f"{what} would take {nbytes / 2**30:.1f} GiB, above qconv's "
                             f"{MAX_TENSOR_BYTES / 2**30:.0f} GiB limit per tensor")


def _check_finite(a: np.ndarray, what: str) -> None:
    if not np.isfinite(a).all():
        bad = int(np.count_nonzero(~np.isfinite(a)))
        raise QconvError(f"{what} holds {bad} non-finite value(s) (NaN or inf): qconv convolves finite data only")


def make_plan(x: np.ndarray, w: np.ndarray, precision: Precision, rounding: Rounding,
              scale: object, options: dict[str, Any]) -> tuple[Plan, scales.ScaleChoice | None]:
    if not precision.is_integer:
        if scale is not None:
            raise QconvError("fp32 takes no scale: scales apply to the integer precisions")
        return Plan(precision, rounding, options=dict(options)), None
    choice = scales.choose(scale, precision, x, w)
    return Plan(precision, rounding, choice.s_x, choice.s_w, dict(options)), choice


def conv2d_result(input: Any, kernel: Any, precision: "Precision | str | int" = "fp32",
                  backend: str | None = None, *, scale: object = None,
                  rounding: "Rounding | str" = "nearest", accuracy: bool = False,
                  reference: np.ndarray | None = None, **options: Any) -> ConvResult:
    """Convolve (SAME, stride 1) and report everything: output, scales and why, phase times,
    overflow, and (with ``accuracy=True`` or a given float64 ``reference`` output) NRMSE and the
    exact count of wrapped outputs.

    input: float32 (N, H, W, C); kernel: float32 (KH, KW, OC, IC).
    precision: fp32, int32, int16, int8 (or 32, 16, 8, "FP32", "INT16"...).
    backend: a name from qconv.available_backends(), or None/"auto" for the fastest available.
    scale: integer precisions only — a number S for both tensors, a pair (s_input, s_kernel),
        "maxabs" (the default: no overflow possible) or "sweep" (the S minimizing NRMSE here).
    rounding: "nearest" (half to even, default) or "truncate" (the assignment's (int) cast).
    options: backend-specific, e.g. threads=2 for c-avx2, int8_path="dp4a" for cuda.
    """
    prec = parse_precision(precision)
    rnd = parse_rounding(rounding)
    mod = backends.get(backend)
    device = _is_device_array(input) or _is_device_array(kernel)
    if device:
        if not getattr(mod, "ACCEPTS_DEVICE_ARRAYS", False):
            raise QconvError(f"backend {mod.NAME!r} takes host (numpy) arrays; this input lives on a "
                             f"device: use backend='cuda' or copy it to the host first")
        validate(input, kernel)
        if accuracy or reference is not None or prec.is_integer and scale in (None, "maxabs", "sweep"):
            # Data-dependent work (scales, the float64 reference) runs on the host.
            raise QconvError("device arrays need an explicit numeric scale and accuracy=False; "
                             "pass numpy arrays for maxabs/sweep scales or NRMSE")
        x, w = input, kernel
    else:
        x = _as_host_float32(input, "input")
        w = _as_host_float32(kernel, "kernel")
        validate(x, w)
        _check_finite(x, "input")
        _check_finite(w, "kernel")
    plan, choice = make_plan(x, w, prec, rnd, scale, options)

    run = mod.run(plan, x, w)

    kh, kw, oc, ic = _shape_of(w)
    n, h, wd, _ = _shape_of(x)
    flops = 2 * n * h * wd * oc * kh * kw * ic
    k = kh * kw * ic
    possible = False
    wrapped = run.wrapped
    saturated = None
    err = None
    if prec.is_integer and not device:
        # Rounding and clamping are odd functions, so max|q(t)| = q(max|t|).
        qx_max = int(quantize(np.max(np.abs(x)), plan.s_x, prec, rnd))
        qw_max = int(quantize(np.max(np.abs(w)), plan.s_w, prec, rnd))
        possible = overflow_possible(qx_max, qw_max, k)
        saturated = (count_saturated(x, plan.s_x, prec, rnd), count_saturated(w, plan.s_w, prec, rnd))
        if wrapped is None and not possible:
            wrapped = 0
        if wrapped is None and (accuracy or reference is not None):
            wrapped = conv2d_int_wrapped(quantize(x, plan.s_x, prec, rnd),
                                         quantize(w, plan.s_w, prec, rnd))[1]
    if accuracy or reference is not None:
        ref = conv2d_float64(x, w) if reference is None else np.asarray(reference, dtype=np.float64)
        out = run.output if isinstance(run.output, np.ndarray) else np.asarray(run.output)
        err = nrmse(out, ref)
    return ConvResult(
        output=run.output, precision=prec, backend=mod.NAME, rounding=rnd,
        scale_input=None if choice is None else float(choice.s_x),
        scale_kernel=None if choice is None else float(choice.s_w),
        scale_strategy=None if choice is None else choice.strategy,
        scale_reason="fp32: no quantization" if choice is None else choice.reason,
        phases={p: float(run.phases.get(p, 0.0)) for p in PHASES},
        overflow_possible=possible, wrapped=wrapped, saturated=saturated, nrmse=err, flops=flops, options=dict(options),
    )


def conv2d(input: Any, kernel: Any, precision: "Precision | str | int" = "fp32",
           backend: str | None = None, *, scale: object = None,
           rounding: "Rounding | str" = "nearest", **options: Any) -> Any:
    """SAME, stride-1 convolution of NHWC float32 `input` with (KH, KW, OC, IC) `kernel`.

    Returns the float32 (N, H, W, OC) output. See conv2d_result for the arguments and for
    timings, scales, overflow and accuracy.
    """
    return conv2d_result(input, kernel, precision, backend, scale=scale, rounding=rounding,
                         **options).output


def reference_output(input: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The float64 convolution every NRMSE is measured against."""
    x = _as_host_float32(input, "input")
    w = _as_host_float32(kernel, "kernel")
    validate(x, w)
    return conv2d_float64(x, w)

