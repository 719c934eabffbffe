"""Activation scales chosen on a calibration set, and the network-wide single S.

- calibrate(): runs the FP32 network on calibration images (disjoint from the evaluation images)
  and records, for every convolution's input, max |x| and a high percentile of |x| (default the
  99.99th, nearest rank, over every element of every calibration image). The "calibrated"
  strategy maps that percentile to Q: s_x = Q / p99.99(|x|), fixed for all later batches;
  larger inputs saturate at +-Qmax.
- sweep_single_scale(): the assignment's one S for every tensor of every layer: of 11 powers of
  two, the one whose network agrees with FP32's top-1 most often on calibration images (the
  lowest logits NRMSE breaks ties).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..contract import Precision, nrmse, parse_precision
from ..errors import QconvError, QconvWarning
from ..scales import maxabs_q
from .runner import ConvLayer, Network, Prepare, Runner, qconv_prepare


@dataclass(frozen=True)
class Calibration:
    """Per convolution (by layer name): the calibration set's percentile and max of |input|."""

    percentile: float
    clips: dict[str, float]
    absmax: dict[str, float]
    n_images: int

    def clip(self, layer: str) -> float:
        try:
            c = self.clips[layer]
        except KeyError:
            raise QconvError(f"the calibration has no layer {layer!r} (calibrated on another network?)") from None
        return c if c > 0 else 1.0


@dataclass
class _Tail:
    """The largest values of |x| seen for one layer: enough of them for an exact nearest-rank
    percentile over all calibration images, without keeping every activation."""

    keep: int
    values: list[np.ndarray] = field(default_factory=list)
    count: int = 0

    def add(self, a: np.ndarray) -> None:
        flat = np.abs(a, dtype=np.float32).ravel()
        self.count += flat.size
        if flat.size > self.keep:
            flat = np.partition(flat, flat.size - self.keep)[flat.size - self.keep:]
        self.values.append(flat)

    def percentile(self, p: float) -> float:
        top = np.sort(np.concatenate(self.values))[::-1]
        rank = math.ceil(p / 100.0 * self.count)  # 1-based, ascending
        return float(top[min(self.count - rank, top.size - 1)])


def calibrate(net: Network, images: np.ndarray, *, percentile: float = 99.99, batch: int = 8,
              backend: str | None = None, prepare: Prepare = qconv_prepare) -> Calibration:
    """Percentile and max of |input| of every convolution, over the FP32 network on ``images``."""
    if not 50.0 <= percentile <= 100.0:
        raise QconvError(f"calibration percentile must lie in [50, 100], got {percentile}")
    if len(images) == 0:
        raise QconvError("calibration needs at least one image")
    tail = 1.0 - percentile / 100.0
    tails: dict[str, _Tail] = {}

    def record(layer: ConvLayer, x: np.ndarray, _y: np.ndarray) -> None:
        if layer.name not in tails:
            total = x[0].size * len(images)
            tails[layer.name] = _Tail(keep=math.ceil(tail * total) + 1)
        tails[layer.name].add(x)

    Runner(net, "fp32", backend, prepare=prepare).run(images, batch, hook=record)
    return Calibration(percentile,
                       {k: t.percentile(percentile) for k, t in tails.items()},
                       {k: float(max(v.max() for v in t.values)) for k, t in tails.items()},
                       len(images))


@dataclass(frozen=True)
class SingleScaleSweep:
    best: float
    table: list[dict[str, Any]]   # per S: logits NRMSE and top-1 agreement with FP32
    n_images: int                 # the calibration images the sweep ran on

    @property
    def reason(self) -> str:
        return (f"single S={self.best:g}: of the powers of two tried, the one whose top-1 agrees with "
                f"FP32 most often on {self.n_images} calibration images, then the lowest logits NRMSE")


def sweep_single_scale(net: Network, images: np.ndarray, precision: Precision | str | int,
                       calibration: Calibration, *, backend: str | None = None, batch: int = 8,
                       prepare: Prepare = qconv_prepare, span: int = 10) -> SingleScaleSweep:
    """Try S = 2^k for ``span`` + 1 powers upward from the one that maps the largest |value| of
    any tensor (calibration inputs and kernels) to at most Q (no saturation, no overflow); keep
    the best by top-1 agreement with FP32, then logits NRMSE."""
    prec = parse_precision(precision)
    if not prec.is_integer:
        raise QconvError("a single scale applies to the integer precisions only")
    largest = max(max(calibration.absmax.values()), max(float(np.max(np.abs(l.weight))) for l in net.layers))
    q = maxabs_q(prec, max(l.k for l in net.layers))
    k0 = math.floor(math.log2(q / largest))
    ref = Runner(net, "fp32", backend, prepare=prepare).run(images, batch)
    table = []
    for k in range(k0, k0 + span + 1):
        s = 2.0 ** k
        with warnings.catch_warnings():  # the sweep tries scales that saturate a kernel on purpose
            warnings.simplefilter("ignore", QconvWarning)
            logits = Runner(net, prec, backend, s, prepare=prepare).run(images, batch)
        table.append({"S": s, "logits_nrmse": nrmse(logits, ref),
                      "top1_agreement": float(np.mean(logits.argmax(1) == ref.argmax(1)))})
    best = min(table, key=lambda r: (-r["top1_agreement"], r["logits_nrmse"]))
    return SingleScaleSweep(best["S"], table, len(images))
