"""The public entry points.

    conv = qconv.prepare(w, "int8", "c-avx2")   # kernel checked, quantized and packed once
    y = conv(x)                                 # the hot path: only the answer
    r = conv.result(x, accuracy=True)           # the answer and everything about it
    y = qconv.conv2d(x, w, "int8")              # one shot: prepare, then call
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import backends, layouts, scales
from .arrays import CHECK_MEMORY_BYTES, as_host_float32, check_bytes, is_device_array, owned, shape_of, to_host
from .backends.base import PHASES
from .contract import (ConvSpec, Geometry, Plan, Precision, Rounding, absmax, check_finite, conv2d_float64,
                       conv2d_int_wrapped, conv_spec, count_saturated, kernel_scale_view, nrmse, overflow_possible,
                       parse_precision, parse_rounding, quantize, quantize_kernel)
from .errors import InputError


@dataclass(frozen=True)
class ConvResult:
    """One convolution: its output and what the user came for (time, accuracy, overflow, scales)."""

    output: Any                     # float32 (N, Ho, Wo, OC); numpy, or a device array for device inputs
    precision: Precision
    backend: str
    rounding: Rounding
    scale_input: float | None       # s_x (None for fp32)
    scale_kernel: "float | list[float] | None"  # s_w, or one per output channel
    scale_strategy: str | None      # "single", "pair", "maxabs", "maxabs-per-channel", "sweep-single", "sweep-pair"
    scale_reason: str
    phases: dict[str, float]        # seconds: quantize, pack, transfer, convolve, dequantize
    overflow_possible: bool         # K * max|q_x| * max|q_w| > 2^31 - 1
    wrapped: int | None             # outputs whose int32 accumulator wrapped (None: not computed)
    saturated: tuple[int, int] | None  # (input, kernel) elements clamped at +-Qmax when quantized
    nrmse: float | None             # against the float64 reference (None: not asked)
    flops: int                      # 2 * N * Ho * Wo * OC * KH * KW * C/groups
    options: dict[str, Any] = field(default_factory=dict)
    layer: dict[str, Any] = field(default_factory=dict)  # stride, padding, groups, bias

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
            "layer": dict(self.layer),
        }


class Conv:
    """A prepared convolution: the kernel checked, its scale resolved, quantized and packed once,
    where the backend computes. Calling it convolves one input; it is safe to call from several
    threads at once. See qconv.prepare."""

    def __init__(self, kernel: Any, precision: "Precision | str | int" = "fp32", backend: str | None = None, *,
                 stride: object = 1, padding: object = "same", groups: object = 1, bias: Any = None,
                 scale: object = None, rounding: "Rounding | str" = "nearest", layout: str = "NHWC",
                 kernel_layout: str = "HWOI", _choice: "scales.ScaleChoice | None" = None, **options: Any) -> None:
        self.precision = parse_precision(precision)
        self.rounding = parse_rounding(rounding)
        if backend is not None:
            backend, variant_opts = backends.parse_variant(backend)
            options = {**variant_opts, **options}
        self._backend = backends.get(backend)
        self.backend = self._backend.NAME
        self.layout, self.kernel_layout = layouts.check_layouts(layout, kernel_layout)
        w = to_host(kernel) if is_device_array(kernel) else as_host_float32(kernel, "kernel")  # once
        if w.ndim != 4:
            names = {"HWOI": "KH, KW, OC, IC", "OIHW": "OC, IC, KH, KW", "HWIO": "KH, KW, IC, OC"}
            raise InputError(f"kernel must be 4-D ({names[self.kernel_layout]}), got shape {w.shape}")
        self.kernel = owned(layouts.kernel_to_hwoi(w, self.kernel_layout))
        self.spec: ConvSpec = conv_spec(self.kernel.shape, stride=stride, padding=padding, groups=groups,
                                        bias_shape=None if bias is None else shape_of(np.asarray(bias)))
        check_bytes(self.kernel.shape, "kernel")
        check_finite(self.kernel, "kernel")
        self.bias = None if bias is None else owned(as_host_float32(bias, "bias"))
        if self.bias is not None:
            check_finite(self.bias, "bias")
        if not self.precision.is_integer:
            if scale is not None:
                raise InputError("fp32 takes no scale: scales apply to the integer precisions")
            self.choice = None
            self.plan = Plan(self.precision, self.rounding, options=dict(options), spec=self.spec, bias=self.bias)
        else:
            self.choice = _choice or scales.for_kernel(scale, self.precision, self.kernel, self.spec)
            self.plan = Plan(self.precision, self.rounding, self.choice.s_x, self.choice.s_w, dict(options),
                             self.spec, self.bias, self.choice.input_q)
            if self.plan.s_x is not None:
                self.plan.inv  # refuse scales whose dequantize factor leaves float32, now
        self.options = dict(options)
        self._packed = self._backend.prepare(self.plan, self.kernel)
        self._geoms: dict[tuple[int, ...], Geometry] = {}
        self._lock = threading.Lock()

    @functools.cached_property
    def _kernel_diagnostics(self) -> tuple[np.ndarray, int, int]:
        """The quantized kernel, its max |q|, and how many of its values saturate (asked once)."""
        plan = self.plan
        qw = quantize_kernel(self.kernel, plan.s_w, self.precision, self.rounding)
        return (qw, int(np.max(np.abs(qw.astype(np.int64)))),
                count_saturated(self.kernel, kernel_scale_view(plan.s_w), self.precision, self.rounding))

    def __repr__(self) -> str:
        s = self.spec
        return (f"qconv.Conv({s.kh}x{s.kw}, {s.c}->{s.oc}, stride={s.stride}, padding={s.padding!r}, "
                f"groups={s.groups}, {self.precision.value}, backend={self.backend!r})")

    def geometry(self, x_shape: tuple[int, ...]) -> Geometry:
        """The layer for an NHWC input shape (checked once per shape, then cached)."""
        g = self._geoms.get(x_shape)
        if g is None:
            try:
                g = self.spec.geometry(x_shape)
            except InputError as e:
                shown = x_shape if self.layout == "NHWC" else (x_shape[0], x_shape[3], x_shape[1], x_shape[2])
                raise InputError(str(e) + layouts.layout_hint(shown, self.kernel.shape, self.spec.c, self.layout,
                                                              self.kernel_layout)) from None
            check_bytes(g.out_shape, "output")
            if 4 * (math.prod(x_shape) + math.prod(g.out_shape)) >= CHECK_MEMORY_BYTES:
                layouts.check_working_set(3 * 4 * (math.prod(x_shape) + math.prod(g.out_shape)), "this call")
            with self._lock:
                self._geoms[x_shape] = g
        return g

    def _input(self, x: Any) -> Any:
        if is_device_array(x):
            if not getattr(self._backend, "ACCEPTS_DEVICE_ARRAYS", False):
                raise InputError(f"backend {self.backend!r} takes host arrays; this input lives on a GPU: "
                                 f"use backend='cuda' or copy it to the host first")
            if self.layout != "NHWC":
                raise InputError("device inputs must be NHWC (layout='NHWC')")
            return x
        if self.layout == "NCHW":
            a = as_host_float32(x, "input")
            if a.ndim != 4:
                raise InputError(f"input must be 4-D (N, C, H, W), got shape {a.shape}")
            return np.ascontiguousarray(a.transpose(0, 2, 3, 1))
        if isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous and x.flags.aligned:
            return x  # the hot path: nothing to convert
        return as_host_float32(x, "input")

    def _output(self, y: Any) -> Any:
        return y if self.layout == "NHWC" else np.ascontiguousarray(y.transpose(0, 3, 1, 2))

    def _out(self, out: Any, g: Geometry) -> Any:
        if out is None:
            return None
        if self.layout != "NHWC":
            raise InputError("out= takes NHWC outputs only (layout='NHWC')")
        if isinstance(out, np.ndarray):
            if out.shape == g.out_shape and out.dtype == np.float32 and out.flags.c_contiguous and \
                    out.flags.writeable:
                return out
        elif tuple(getattr(out, "shape", ())) == g.out_shape and str(getattr(out, "dtype", "")) in (
                "float32", "torch.float32"):
            return out
        raise InputError(f"out= must be a writeable C-contiguous float32 array of shape {g.out_shape} "
                         f"(N, Ho, Wo, OC), got {getattr(out, 'dtype', type(out).__name__)} "
                         f"{tuple(getattr(out, 'shape', ()))}")

    def __call__(self, x: Any, *, out: Any = None) -> Any:
        """The output, float32 (N, Ho, Wo, OC): numpy for host inputs, a device array for device inputs."""
        x = self._input(x)
        g = self.geometry(shape_of(x))
        return self._output(self._packed.run(x, g, self._out(out, g), timed=False).output)

    def capture(self, x: Any, *, out: Any = None) -> Any:
        """This call recorded once as a CUDA Graph on x's device buffer (backend 'cuda'): ``g =
        conv.capture(x)``, then ``g()`` convolves whatever x holds at that moment into ``g.output``
        with one graph launch, leaving out the per-call host work (PyTorch's CUDAGraph convention)."""
        cap = getattr(self._packed, "capture", None)
        if cap is None or not is_device_array(x):
            raise InputError("capture() records a CUDA Graph: it takes backend='cuda' and a device-array input")
        x = self._input(x)
        g = self.geometry(shape_of(x))
        return cap(x, g, self._out(out, g))

    def result(self, x: Any, *, accuracy: bool = False, reference: np.ndarray | None = None,
               out: Any = None) -> ConvResult:
        """Convolve and report everything: output, scales and why, phase times, overflow, and (with
        ``accuracy=True`` or a given float64 ``reference``) NRMSE and the exact count of wrapped outputs."""
        x = self._input(x)
        g = self.geometry(shape_of(x))
        run = self._packed.run(x, g, self._out(out, g))
        prec, plan = self.precision, self.plan
        wrapped, saturated, possible, err = run.wrapped, None, False, None
        want_acc = accuracy or reference is not None
        s_x, m = run.s_x, run.x_absmax
        xh = None   # the input on the host, where a diagnostic needs it (a device input: a copy)
        if want_acc or prec.is_integer and (s_x is None or m is None or plan.s_x is not None):
            xh = as_host_float32(x, "input") if not is_device_array(x) else to_host(x)
        if prec.is_integer:
            s_x = s_x if s_x is not None else plan.input_scale(xh)
            m = m if m is not None else absmax(xh)
            qw, qw_max, w_saturated = self._kernel_diagnostics
            qx_max = int(quantize(m, s_x, prec, self.rounding))
            possible = overflow_possible(qx_max, qw_max, self.spec.k)
            # A maxabs scale of this very input saturates nothing: |x| <= max|x|, and the float32
            # product and R are monotonic, so every R(|x| * s_x) <= R(max|x| * s_x) <= Qmax.
            x_saturated = 0 if plan.s_x is None else count_saturated(xh, s_x, prec, self.rounding)
            saturated = (x_saturated, w_saturated)
            if wrapped is None and not possible:
                wrapped = 0
            if wrapped is None and want_acc:
                wrapped = conv2d_int_wrapped(quantize(xh, s_x, prec, self.rounding), qw, g)[1]
        if want_acc:
            layouts.check_working_set(8 * (3 * math.prod(g.out_shape) + 2 * (g.n * (g.h + g.pt + g.pb) *
                                      (g.w + g.pl + g.pr) * self.spec.c)), "the float64 reference for NRMSE")
            if reference is None:
                ref = reference_output(xh, self.kernel, _geom=g, bias=self.bias)
            else:
                ref = np.asarray(reference, dtype=np.float64)
                ref = ref if self.layout == "NHWC" or ref.ndim != 4 else ref.transpose(0, 2, 3, 1)
            out_h = run.output if isinstance(run.output, np.ndarray) else to_host(run.output)
            err = nrmse(out_h, ref)
        ch = self.choice
        s = self.spec
        return ConvResult(
            output=self._output(run.output), precision=prec, backend=self.backend, rounding=self.rounding,
            scale_input=None if s_x is None else float(s_x),
            scale_kernel=None if ch is None else (float(ch.s_w) if np.ndim(ch.s_w) == 0 else
                                                  [float(v) for v in ch.s_w]),
            scale_strategy=None if ch is None else ch.strategy,
            scale_reason="fp32: no quantization" if ch is None else ch.reason,
            phases={p: float(run.phases.get(p, 0.0)) for p in PHASES},
            overflow_possible=possible, wrapped=wrapped, saturated=saturated, nrmse=err, flops=g.flops,
            options=dict(self.options),
            layer={"stride": list(s.stride), "padding": [[g.pt, g.pb], [g.pl, g.pr]], "groups": s.groups,
                   "bias": self.bias is not None},
        )


def prepare(kernel: Any, precision: "Precision | str | int" = "fp32", backend: str | None = None, *,
            stride: object = 1, padding: object = "same", groups: object = 1, bias: Any = None,
            scale: object = None, rounding: "Rounding | str" = "nearest", layout: str = "NHWC",
            kernel_layout: str = "HWOI", **options: Any) -> Conv:
    """Prepare a convolution with this kernel for repeated calls: ``conv(x)``, ``conv.result(x)``.

    kernel: float32 (KH, KW, OC, C // groups).
    precision: fp32, int32, int16, int8 (or 32, 16, 8, "FP32", "INT16"...).
    backend: a name from qconv.available_backends(), or None/"auto" for the fastest available; a
        variant "name[key=value,...]" (as the study names them) adds those options.
    stride: int or (sh, sw). padding: "same" (default; TensorFlow's rule at stride > 1), "valid",
        an int, (ph, pw) or ((top, bottom), (left, right)). groups: C and OC divisible by it.
    bias: float32 (OC,), added after dequantization.
    scale: integer precisions only, a multiplier (q = round(x*S)): a number S for both tensors, a
        pair (s_input, s_kernel) with s_kernel one value or one per output channel,
        qconv.StepSize(s) for a step size, "maxabs" (default) or "maxabs-per-channel".
    rounding: "nearest" (half to even, default) or "truncate" (the assignment's (int) cast).
    layout: "NHWC" (default) or "NCHW" for inputs and outputs; kernel_layout: "HWOI" (default,
        (KH, KW, OC, IC)), "OIHW" (PyTorch) or "HWIO" (TensorFlow). Others are converted by copy.
    options: backend-specific, e.g. threads=2 for c-avx2, int8_path="dp4a" for cuda.
    """
    return Conv(kernel, precision, backend, stride=stride, padding=padding, groups=groups, bias=bias,
                scale=scale, rounding=rounding, layout=layout, kernel_layout=kernel_layout, **options)


def conv2d_result(input: Any, kernel: Any, precision: "Precision | str | int" = "fp32",
                  backend: str | None = None, *, stride: object = 1, padding: object = "same",
                  groups: object = 1, bias: Any = None, scale: object = None,
                  rounding: "Rounding | str" = "nearest", accuracy: bool = False,
                  reference: np.ndarray | None = None, layout: str = "NHWC", kernel_layout: str = "HWOI",
                  **options: Any) -> ConvResult:
    """One convolution with everything about it (see Conv.result). Takes prepare()'s arguments;
    scale may also be "sweep-single" ("sweep") or "sweep-pair", searched on this input."""
    prec = parse_precision(precision)
    choice = None
    if prec.is_integer and scales.strategy_name(scale) in scales.NEEDS_INPUT:
        lay, klay = layouts.check_layouts(layout, kernel_layout)
        x = as_host_float32(input, "input") if not is_device_array(input) else to_host(input)
        x = x if lay == "NHWC" or x.ndim != 4 else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        w = layouts.kernel_to_hwoi(as_host_float32(kernel, "kernel"), klay)
        spec = conv_spec(w.shape, stride=stride, padding=padding, groups=groups)
        spec.geometry(x.shape)
        check_finite(x, "input")
        check_finite(w, "kernel")
        choice = scales.for_call(scale, prec, x, w, spec, parse_rounding(rounding))
        scale = None
    conv = Conv(kernel, prec, backend, stride=stride, padding=padding, groups=groups, bias=bias, scale=scale,
                rounding=rounding, layout=layout, kernel_layout=kernel_layout, _choice=choice, **options)
    return conv.result(input, accuracy=accuracy, reference=reference)


def conv2d(input: Any, kernel: Any, precision: "Precision | str | int" = "fp32",
           backend: str | None = None, *, stride: object = 1, padding: object = "same",
           groups: object = 1, bias: Any = None, scale: object = None,
           rounding: "Rounding | str" = "nearest", layout: str = "NHWC", kernel_layout: str = "HWOI",
           **options: Any) -> Any:
    """Convolve NHWC float32 `input` with a (KH, KW, OC, C/groups) `kernel`: prepare, then call.

    Returns the float32 (N, Ho, Wo, OC) output. See prepare for the arguments and conv2d_result
    for timings, scales, overflow and accuracy.
    """
    prec = parse_precision(precision)
    if prec.is_integer and scales.strategy_name(scale) in scales.NEEDS_INPUT:
        return conv2d_result(input, kernel, prec, backend, stride=stride, padding=padding, groups=groups,
                             bias=bias, scale=scale, rounding=rounding, layout=layout, kernel_layout=kernel_layout,
                             **options).output
    return Conv(kernel, prec, backend, stride=stride, padding=padding, groups=groups, bias=bias, scale=scale,
                rounding=rounding, layout=layout, kernel_layout=kernel_layout, **options)(input)


def reference_output(input: np.ndarray, kernel: np.ndarray, *, stride: object = 1, padding: object = "same",
                     groups: object = 1, bias: np.ndarray | None = None, _geom: Geometry | None = None) -> np.ndarray:
    """The float64 convolution (+ bias) every NRMSE is measured against."""
    x = as_host_float32(input, "input")
    w = as_host_float32(kernel, "kernel")
    g = _geom or conv_spec(w.shape, stride=stride, padding=padding, groups=groups).geometry(x.shape)
    y = conv2d_float64(x, w, g)
    return y if bias is None else y + np.asarray(bias, dtype=np.float64)
