"""A small graph runner: every convolution through qconv, everything else numpy float32.

A network (efficientnet.py, mnist.py) is a list of ConvLayer plus a forward function that calls
``conv(layer, x)`` for each convolution and does the rest (ReLU6, adds, pooling, FC) in numpy.
The Runner supplies that ``conv``: each layer prepared once with ``qconv.prepare`` for one
precision, backend and scale strategy, then called per batch. A hook sees every convolution's
input and output (per-layer error, calibration, noise injection).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..contract import Precision, parse_precision
from ..errors import QconvError
from ..scales import maxabs_q
from .data import Split

if TYPE_CHECKING:
    from .calibration import Calibration


@dataclass(frozen=True, eq=False)
class ConvLayer:
    """One convolution of a network, batch norm already folded in."""

    name: str
    weight: np.ndarray            # float32 (KH, KW, OC, C // groups)
    bias: np.ndarray | None       # float32 (OC,)
    stride: int = 1
    padding: Any = "same"         # as qconv.prepare takes it
    groups: int = 1

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.weight.shape[3] == 1

    @property
    def k(self) -> int:
        """Reduction length of one output: KH * KW * C / groups."""
        kh, kw, _, icg = self.weight.shape
        return kh * kw * icg

    @property
    def kind(self) -> str:
        kh, kw = self.weight.shape[:2]
        if self.depthwise:
            return f"depthwise {kh}x{kw}"
        return "pointwise" if (kh, kw) == (1, 1) else f"{kh}x{kw}"


Conv = Callable[[ConvLayer, np.ndarray], np.ndarray]
# hook(layer, input, output) -> replacement output, or None to keep it
Hook = Callable[[ConvLayer, np.ndarray, np.ndarray], "np.ndarray | None"]
# prepare(layer, precision, backend, scale, rounding, options) -> callable x -> y
Prepare = Callable[[ConvLayer, Precision, "str | None", Any, str, dict], Callable[[np.ndarray], np.ndarray]]


class Network(Protocol):
    name: str
    layers: tuple[ConvLayer, ...]

    def forward(self, x: np.ndarray, conv: Conv) -> np.ndarray:
        """Logits (N, classes) of a preprocessed float32 NHWC batch."""

    def split(self, calibration: int) -> Split:
        """Its calibration images and the disjoint evaluation images."""


def qconv_prepare(layer: ConvLayer, precision: Precision, backend: str | None, scale: Any,
                  rounding: str, options: dict) -> Callable[[np.ndarray], np.ndarray]:
    """The default: qconv.prepare, once per layer."""
    import qconv
    return qconv.prepare(layer.weight, precision, backend, stride=layer.stride,
                         padding=layer.padding, groups=layer.groups, bias=layer.bias,
                         scale=scale, rounding=rounding, **options)


# Network-level scale strategies (docs/NETS.md says how each scale is chosen).
STRATEGIES = ("single", "maxabs", "maxabs-per-channel", "calibrated")


def channel_maxabs(w: np.ndarray) -> np.ndarray:
    """max |w| of each output channel of a (KH, KW, OC, IC/g) kernel (1 where a channel is all zero)."""
    m = np.max(np.abs(w), axis=(0, 1, 3)).astype(np.float64)
    return np.where(m > 0, m, 1.0)


def layer_scale(layer: ConvLayer, precision: Precision, strategy: str, *,
                single_s: float | None = None, calibration: Calibration | None = None) -> Any:
    """The ``scale`` argument qconv.prepare gets for one layer under a network-level strategy."""
    if not precision.is_integer:
        return None
    if strategy in ("maxabs", "maxabs-per-channel"):
        return strategy  # qconv resolves these per call: the input's max is taken on each batch
    if strategy == "single":
        if single_s is None:
            raise QconvError("scale strategy 'single' needs its S (choose one with "
                             "qconv.nets.sweep_single_scale, or give a number)")
        return float(single_s)
    if strategy == "calibrated":
        if calibration is None:
            raise QconvError("scale strategy 'calibrated' needs a calibration (qconv.nets.calibrate)")
        q = maxabs_q(precision, layer.k)
        s_x = q / calibration.clip(layer.name)
        s_w = (q / channel_maxabs(layer.weight)).astype(np.float32)
        return (float(s_x), s_w)
    raise QconvError(f"unknown network scale strategy {strategy!r}: one of {', '.join(STRATEGIES)}, or a number S")


def batches(n: int, size: int) -> Iterator[slice]:
    if size < 1:
        raise QconvError(f"batch size must be at least 1, got {size}")
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """tqdm where it is installed and wanted; otherwise a stand-in that does nothing."""
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, desc=desc, unit="img", leave=False)
        except ImportError:
            pass

    class _Quiet:
        def update(self, n: int) -> None:
            pass

        def close(self) -> None:
            pass
    return _Quiet()


class Runner:
    """One network at one precision, backend and scale strategy; each convolution prepared once.

    scale: one of STRATEGIES, or a number (the single S, for every tensor of every layer).
    prepare: how a layer becomes a callable (qconv.prepare by default; tests plug in others).
    """

    def __init__(self, net: Network, precision: Precision | str | int = "fp32",
                 backend: str | None = None, scale: str | float = "maxabs", *,
                 calibration: Calibration | None = None, rounding: str = "nearest",
                 prepare: Prepare = qconv_prepare, options: dict | None = None):
        self.net = net
        self.precision = parse_precision(precision)
        self.backend = backend
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            self.strategy, single = "single", float(scale)
        else:
            self.strategy, single = str(scale), None
        self.scales = {layer.name: layer_scale(layer, self.precision, self.strategy, single_s=single,
                                               calibration=calibration) for layer in net.layers}
        self.convs = {layer.name: prepare(layer, self.precision, backend, self.scales[layer.name],
                                          rounding, dict(options or {})) for layer in net.layers}
        self.conv_seconds = 0.0  # time spent inside the convolutions, summed over calls

    @property
    def label(self) -> str:
        if not self.precision.is_integer:
            return self.precision.value
        what = self.strategy if self.strategy != "single" else f"single S={next(iter(self.scales.values())):g}"
        return f"{self.precision.value} {what}"

    def forward(self, x: np.ndarray, hook: Hook | None = None) -> np.ndarray:
        """Logits of one preprocessed float32 NHWC batch."""
        def conv(layer: ConvLayer, t: np.ndarray) -> np.ndarray:
            t0 = time.perf_counter()
            y = np.asarray(self.convs[layer.name](np.ascontiguousarray(t, dtype=np.float32)))
            self.conv_seconds += time.perf_counter() - t0
            if hook is not None:
                replaced = hook(layer, t, y)
                if replaced is not None:
                    y = replaced
            return y
        return np.asarray(self.net.forward(np.asarray(x, dtype=np.float32), conv), dtype=np.float32)

    def run(self, images: np.ndarray, batch: int = 8, hook: Hook | None = None,
            progress: bool = False, desc: str = "") -> np.ndarray:
        """Logits of every image, ``batch`` images at a time."""
        out = []
        bar = progress_bar(len(images), desc or self.label, progress)
        try:
            for sl in batches(len(images), batch):
                out.append(self.forward(images[sl], hook))
                bar.update(sl.stop - sl.start)
        finally:
            bar.close()
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

