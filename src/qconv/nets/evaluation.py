"""What a precision and scale strategy cost a whole network, measured against its FP32 self.

- evaluate(): top-1/top-5 on the labelled images, top-1 agreement with FP32 on every evaluation
  image, the logits' NRMSE against FP32, images/s, and per convolution two NRMSEs against the
  FP32 network's output of that layer: "isolated" (the layer quantized alone, fed the FP32
  network's own input of that layer: the error this layer adds) and "propagated" (the whole
  quantized network up to and including it: the error accumulated by that depth).
- noise_threshold(): the derived threshold. Gaussian noise of a given NRMSE (std = level x the
  range of that layer's FP32 output, on each batch) is added to the output of one layer, or of
  every layer, of the FP32 network; the largest level whose top-1 agreement with the clean
  network stays at or above 99% (95%) is the threshold.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..contract import nrmse
from ..errors import QconvError, QconvWarning
from .calibration import Calibration, calibrate, sweep_single_scale
from .data import Split
from .runner import (
    ConvLayer,
    Network,
    Prepare,
    Runner,
    batches,
    progress_bar,
    qconv_prepare,
)


@dataclass
class _Err:
    """NRMSE accumulated over batches: sum of squared errors, count, and the reference's range."""

    sq: float = 0.0
    n: int = 0
    lo: float = math.inf
    hi: float = -math.inf

    def add(self, approx: np.ndarray, ref: np.ndarray) -> None:
        d = np.subtract(approx, ref, dtype=np.float64).ravel()  # one float64 temporary, same values
        self.sq += float(np.dot(d, d))
        self.n += d.size
        self.lo, self.hi = min(self.lo, float(np.min(ref))), max(self.hi, float(np.max(ref)))

    @property
    def nrmse(self) -> float:
        if self.n == 0:
            return math.nan
        rmse = math.sqrt(self.sq / self.n)
        return rmse / (self.hi - self.lo) if self.hi > self.lo else (0.0 if rmse == 0 else math.inf)


@dataclass(frozen=True)
class LayerError:
    index: int
    name: str
    kind: str
    isolated: float
    propagated: float


class _LayerErrors:
    """Per-layer hooks for one batch at a time: the FP32 pass keeps each layer's output and runs
    the tested layer alone on that layer's FP32 input (isolated); the tested pass compares its
    own outputs with the kept ones (propagated) and counts the time that takes."""

    def __init__(self, tested: Runner, layers: Sequence[ConvLayer]):
        self.tested = tested
        self.iso = {layer.name: _Err() for layer in layers}
        self.prop = {layer.name: _Err() for layer in layers}
        self.ref_out: dict[str, np.ndarray] = {}
        self.seconds = 0.0

    def keep_fp32(self, layer: ConvLayer, x: np.ndarray, y: np.ndarray) -> None:
        self.ref_out[layer.name] = y
        self.iso[layer.name].add(self.tested.convs[layer.name](x), y)

    def compare_tested(self, layer: ConvLayer, _x: np.ndarray, y: np.ndarray) -> None:
        t0 = time.perf_counter()
        self.prop[layer.name].add(y, self.ref_out[layer.name])
        self.seconds += time.perf_counter() - t0


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return int(np.sum(np.any(top == labels[:, None], axis=1)))


@dataclass(frozen=True)
class Evaluation:
    network: str
    precision: str
    backend: str | None
    scale: str                # the option's label, e.g. "int8 single S=32"
    strategy: str | None      # how S was chosen: calibrated, single (swept), maxabs, maxabs-per-channel,
                              # given (a number from the caller); None for FP32
    s: float | None           # the one S of "single" and "given"
    n_images: int
    n_labelled: int
    top1: int
    top5: int
    fp32_top1: int
    fp32_top5: int
    lost: int                 # labelled images FP32 gets right at top-1 and this option does not
    agreement: float          # top-1 equal to FP32's, over every evaluation image
    logits_nrmse: float
    images_per_s: float       # the tested network's forward passes alone
    conv_share: float         # of that time, the share spent inside the convolutions
    calibration: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerError] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scale_for(net: Network, split: Split, precision: str, scale: str | float, backend: str | None,
               batch: int, percentile: float, prepare: Prepare,
               calibration: Calibration | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """(scale argument for the Runner, calibration, what was chosen and on which images)."""
    from ..contract import parse_precision
    prec = parse_precision(precision)
    if not prec.is_integer or scale in ("maxabs", "maxabs-per-channel") or not isinstance(scale, str):
        return (scale if prec.is_integer else "maxabs"), None, {}
    if scale not in ("calibrated", "single"):
        raise QconvError(f"unknown network scale strategy {scale!r}: single, maxabs, maxabs-per-channel, "
                         f"calibrated, or a number S")
    cal = calibration if calibration is not None else calibrate(
        net, split.calibration.images, percentile=percentile, batch=batch, backend=backend, prepare=prepare)
    info: dict[str, Any] = {"images": cal.n_images, "set": split.calibration.name,
                            "percentile": cal.percentile}
    if scale == "single":
        sweep = sweep_single_scale(net, split.calibration.images[:8], prec, cal, backend=backend,
                                   batch=batch, prepare=prepare)
        info.update(single_s=sweep.best, sweep=sweep.table, reason=sweep.reason)
        return sweep.best, cal, info
    return "calibrated", cal, info


def evaluate(net: Network, split: Split, precision: str = "int8", backend: str | None = None,
             scale: str | float = "calibrated", *, batch: int = 8, per_layer: bool = True,
             percentile: float = 99.99, baseline_backend: str | None = "reference",
             prepare: Prepare = qconv_prepare, progress: bool = False, options: dict | None = None,
             calibration: Calibration | None = None) -> Evaluation:
    """One option (precision x scale strategy x backend) of ``net`` on ``split.evaluation``,
    against the FP32 network on ``baseline_backend``; scales calibrated on ``split.calibration``
    (or taken from ``calibration``, a calibrate() of those images, when several options share it)."""
    run_scale, cal, info = _scale_for(net, split, precision, scale, backend, batch, percentile, prepare,
                                      calibration)
    with warnings.catch_warnings():  # a single S saturates some kernels: that is what is measured
        warnings.simplefilter("ignore", QconvWarning)
        tested = Runner(net, precision, backend, run_scale, calibration=cal, prepare=prepare, options=options)
    fp32 = Runner(net, "fp32", baseline_backend, prepare=prepare)
    data = split.evaluation
    errs = _LayerErrors(tested, net.layers)
    ref_logits, logits = [], []
    forward_s = 0.0
    tested.conv_seconds = 0.0
    bar = progress_bar(len(data), f"{net.name} {tested.label}", progress)
    for sl in batches(len(data), batch):
        x = data.images[sl]
        errs.ref_out = {}
        ref_logits.append(fp32.forward(x, errs.keep_fp32 if per_layer else None))
        t0 = time.perf_counter()
        logits.append(tested.forward(x, errs.compare_tested if per_layer else None))
        forward_s += time.perf_counter() - t0
        bar.update(len(x))
    bar.close()
    ref, out = np.concatenate(ref_logits), np.concatenate(logits)
    lab = data.labelled
    labels = data.labels[lab]
    run_s = max(forward_s - errs.seconds, 1e-12)
    layers = [LayerError(i, l.name, l.kind, errs.iso[l.name].nrmse, errs.prop[l.name].nrmse)
              for i, l in enumerate(net.layers)] if per_layer else []
    strategy = None if not tested.precision.is_integer else scale if isinstance(scale, str) else "given"
    s = info.get("single_s") if strategy == "single" else float(scale) if strategy == "given" else None
    return Evaluation(
        network=net.name, precision=tested.precision.value, backend=backend, scale=tested.label,
        strategy=strategy, s=s,
        n_images=len(data), n_labelled=int(lab.sum()),
        top1=topk_hits(out[lab], labels, 1), top5=topk_hits(out[lab], labels, 5),
        fp32_top1=topk_hits(ref[lab], labels, 1), fp32_top5=topk_hits(ref[lab], labels, 5),
        lost=int(np.sum((ref[lab].argmax(1) == labels) & (out[lab].argmax(1) != labels))),
        agreement=float(np.mean(out.argmax(1) == ref.argmax(1))), logits_nrmse=nrmse(out, ref),
        images_per_s=len(data) / run_s, conv_share=min(tested.conv_seconds / run_s, 1.0),
        calibration=info, layers=layers)


@dataclass(frozen=True)
class NoiseSweep:
    layer: str                         # a layer name, or "all"
    table: list[dict[str, float]]      # per level: NRMSE injected, top-1 agreement with FP32
    thresholds: dict[float, float]     # agreement target -> largest level that still meets it

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "table": self.table,
                "thresholds": {str(k): v for k, v in self.thresholds.items()}}


class _Noise:
    """A hook adding Gaussian noise of NRMSE ``level`` (std = level x the output's range on this
    batch) to one layer's output (``layer``) or to every layer's (None)."""

    def __init__(self, level: float, layer: str | None, seed: int):
        self.level, self.layer = level, layer
        self.rng = np.random.default_rng(seed)

    def __call__(self, layer: ConvLayer, _x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
        if self.layer is not None and layer.name != self.layer:
            return None
        std = np.float32(self.level * float(y.max() - y.min()))
        noise = self.rng.standard_normal(size=y.shape, dtype=np.float32)  # float32 draws: 4-5x faster
        noise *= std
        return (y + noise).astype(np.float32, copy=False)


def default_levels() -> list[float]:
    """1e-4 ... 1 in quarter decades."""
    return [float(10 ** (e / 4)) for e in range(-16, 1)]


def check_noise_layer(net: Network, layer: str | None) -> None:
    """Refuse a layer name the network does not have (None: every convolution)."""
    if layer is not None and layer not in {l.name for l in net.layers}:
        raise QconvError(f"{net.name} has no convolution {layer!r}")


def noise_threshold(net: Network, images: np.ndarray, *, layer: str | None = None,
                    levels: Sequence[float] | None = None, targets: Sequence[float] = (0.99, 0.95),
                    batch: int = 8, backend: str | None = "reference", seed: int = 0,
                    prepare: Prepare = qconv_prepare, clean_logits: np.ndarray | None = None) -> NoiseSweep:
    """Top-1 agreement of the FP32 network with noise of each NRMSE level injected into ``layer``
    (None: every convolution) against the clean FP32 network, levels in increasing order; stops
    once agreement falls below every target."""
    check_noise_layer(net, layer)
    fp32 = Runner(net, "fp32", backend, prepare=prepare)
    clean = clean_logits if clean_logits is not None else fp32.run(images, batch)
    clean_top1 = clean.argmax(1)
    table: list[dict[str, float]] = []
    thresholds: dict[float, float] = {}
    for level in sorted(levels or default_levels()):
        top1 = fp32.run(images, batch, hook=_Noise(level, layer, seed)).argmax(1)
        agree = float(np.mean(top1 == clean_top1))
        table.append({"nrmse": level, "agreement": agree})
        for t in targets:
            if t not in thresholds and agree < t:
                thresholds[t] = table[-2]["nrmse"] if len(table) > 1 else 0.0
        if len(thresholds) == len(targets):
            break
    for t in targets:
        thresholds.setdefault(t, table[-1]["nrmse"])  # never fell below it in the levels tried
    return NoiseSweep(layer or "all", table, thresholds)
