"""The accuracy half of the study, which no machine changes: per layer and integer precision the
scale sweeps, the scale strategies, and the single-S table with what explains it.

Every number comes from the contract's one pipeline: ``qconv.sweep_scales`` (which evaluates
each S with contract.quantize, the exact int32-wrapped convolution and contract.dequantize),
``qconv.prepare(..., "reference", scale=...)`` for the maxabs strategies (scales.py resolves
them), and ``contract.conv2d_quantized`` for the accumulator at the chosen S.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .. import api, metrics
from ..contract import Precision, conv2d_quantized, count_saturated, maxabs_scale, quantize_kernel
from ..errors import InputError
from ..scales import maxabs_q
from ..sweep import SweepTable, format_scale, sweep_scales
from .config import MAXABS, PAIR, PER_CHANNEL, SINGLE, SINGLE_TRUNC, Layer

HIST_PER_OCTAVE = 4
HIST_MAX_OCTAVES = 40


def sweep_settings(quick: bool) -> dict[str, Any]:
    """The sweep grid (recorded in results.json, so anyone can re-run sweep_scales alike)."""
    return {"fine_per_octave": 2 if quick else 8, "pair_stride": 3 if quick else None,
            "pair_min_step": 0.5 if quick else 0.25}


def sweeps(x: np.ndarray, w: np.ndarray, p: Precision, ref: np.ndarray,
           settings: dict[str, Any]) -> tuple[SweepTable, SweepTable]:
    """The single-S sweep with rounding to nearest (and the pair search), and with truncation."""
    kw = dict(reference=ref, fine_per_octave=settings["fine_per_octave"])
    near = sweep_scales(x, w, p, rounding="nearest", pairs=True, pair_stride=settings["pair_stride"],
                        pair_min_step=settings["pair_min_step"], **kw)
    trunc = sweep_scales(x, w, p, rounding="truncate", pairs=False, **kw)
    return near, trunc


def histogram(t: np.ndarray) -> dict[str, Any]:
    """|t| on a log2 grid (HIST_PER_OCTAVE bins an octave, at most HIST_MAX_OCTAVES octaves below
    the maximum); exact zeros and values below the grid are counted apart."""
    a = np.abs(np.asarray(t, dtype=np.float64)).ravel()
    nz = a[a > 0]
    if nz.size == 0:
        return {"lo_log2": 0.0, "per_octave": HIST_PER_OCTAVE, "counts": [], "zeros": int(a.size),
                "below": 0, "total": int(a.size)}
    hi = math.ceil(math.log2(float(nz.max())) * HIST_PER_OCTAVE) / HIST_PER_OCTAVE
    lo = max(math.floor(math.log2(float(nz.min())) * HIST_PER_OCTAVE) / HIST_PER_OCTAVE, hi - HIST_MAX_OCTAVES)
    nb = max(1, int(round((hi - lo) * HIST_PER_OCTAVE)))
    counts, _ = np.histogram(np.log2(nz), bins=nb, range=(lo, hi))
    return {"lo_log2": lo, "per_octave": HIST_PER_OCTAVE, "counts": [int(c) for c in counts],
            "zeros": int(a.size - nz.size), "below": int(np.count_nonzero(np.log2(nz) < lo)),
            "total": int(a.size)}


def layer_record(layer: Layer, x: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Shapes, value ranges, the data's own INT8 storage error and histograms of one layer."""
    kh, kw, oc, ic = layer.w.shape
    n, h, wd, _ = x.shape
    k = kh * kw * ic
    return {
        "name": layer.name, "input_path": layer.input_path, "kernel_path": layer.kernel_path,
        "input_shape": list(x.shape), "kernel_shape": list(layer.w.shape),
        "output_shape": [n, h, wd, oc], "k": k, "flops": 2 * n * h * wd * oc * k,
        "input_absmax": float(np.max(np.abs(x))), "kernel_absmax": float(np.max(np.abs(layer.w))),
        "output_min": float(ref.min()), "output_max": float(ref.max()),
        "overflow_free_q": {p.value: maxabs_q(p, k) for p in (Precision.INT32, Precision.INT16, Precision.INT8)},
        "input_int8_nrmse": metrics.storage_nrmse(x), "kernel_int8_nrmse": metrics.storage_nrmse(layer.w),
        "histograms": {"input": histogram(layer.x), "kernel": histogram(layer.w)},
    }


def _strategy(layer: str, p: Precision, name: str, rounding: str, s_x: float, s_w: "float | list[float]",
              err: float, wrapped_fraction: float, reason: str) -> dict[str, Any]:
    sw = [float(v) for v in s_w] if isinstance(s_w, (list, np.ndarray)) else float(s_w)
    return {"layer": layer, "precision": p.value, "strategy": name, "rounding": rounding, "s_x": float(s_x),
            "s_w": float(np.exp(np.mean(np.log(sw)))) if isinstance(sw, list) else sw,
            "s_w_range": [min(sw), max(sw)] if isinstance(sw, list) else None,
            "nrmse": err, "effective_bits": metrics.effective_bits(err), "wrapped_fraction": wrapped_fraction,
            "reason": reason}


def strategies(layer: Layer, p: Precision, ref: np.ndarray, near: SweepTable,
               trunc: SweepTable) -> list[dict[str, Any]]:
    """The assignment's single S (rounded and truncated), the best pair, maxabs and (beyond the
    assignment) maxabs with one kernel scale per output channel, each with its NRMSE."""
    b, bt, bp = near.best_single, trunc.best_single, near.best_pair
    out = [_strategy(layer.name, p, SINGLE, "nearest", b.s_x, b.s_w, b.nrmse, b.wrapped_fraction, near.reason),
           _strategy(layer.name, p, SINGLE_TRUNC, "truncate", bt.s_x, bt.s_w, bt.nrmse, bt.wrapped_fraction,
                     trunc.reason)]
    if bp is not None:
        out.append(_strategy(layer.name, p, PAIR, "nearest", bp.s_x, bp.s_w, bp.nrmse, bp.wrapped_fraction,
                             f"best of {len(near.pair_rows)} (s_x, s_w) pairs by NRMSE"))
    for name, scale in ((MAXABS, "maxabs"), (PER_CHANNEL, "maxabs-per-channel")):
        r = api.prepare(layer.w, p, "reference", scale=scale).result(layer.x, reference=ref)
        out.append(_strategy(layer.name, p, name, "nearest", r.scale_input, r.scale_kernel, r.nrmse,
                             (r.wrapped or 0) / ref.size, r.scale_reason))
    return out


def _onset(rows: list[Any], s: float, key: str) -> float | None:
    """The smallest swept S >= s at which rows[key] is positive (wrapped outputs, clamped values)."""
    hit = [r.s_x for r in rows if r.s_x >= s and getattr(r, key) > 0]
    return min(hit) if hit else None


def _limit(near: SweepTable, s: float, clipped_in: float, kernel_zero: float) -> tuple[str, str]:
    """What stops S from growing past the best: whichever of wrap-around and clipping starts first
    at or above it (underflow: neither does within the grid, and values rounding to 0 set the error)."""
    wrap, clip = _onset(near.rows, s, "wrapped"), _onset(near.rows, s, "clamped_fraction")
    if wrap is not None and (clip is None or wrap <= clip):
        kind = "wrap-around"
        detail = (f"accumulators wrap from S={format_scale(wrap).split(' (')[0]}"
                  + (" (some already at S)" if wrap <= s else ""))
    elif clip is not None:
        kind = "clipping"
        detail = (f"{100 * clipped_in:.2g}% of inputs clip at S" if clipped_in > 0 else
                  f"values clip from S={format_scale(clip).split(' (')[0]}")
    else:
        kind = "underflow"
        detail = "no wrap or clip within the grid; values rounding to 0 set the error"
    if kernel_zero >= 0.1:
        detail += f"; {100 * kernel_zero:.2g}% of weights round to 0"
    return kind, detail


def single_s_row(layer: Layer, p: Precision, near: SweepTable, trunc: SweepTable) -> dict[str, Any]:
    """One row of the report's single-S table: the assignment's scheme at its best S."""
    b, bt = near.best_single, trunc.best_single
    s = b.s_x
    k = near.k
    qw = quantize_kernel(layer.w, s, p).astype(np.int64)
    levels = np.unique(qw)
    kernel_zero = float(np.count_nonzero(qw == 0) / qw.size)
    clipped_in = count_saturated(layer.x, s, p) / layer.x.size
    _, acc, wrapped = conv2d_quantized(layer.x, layer.w, p, s, s)
    acc_max = int(np.max(np.abs(acc.astype(np.int64)))) if wrapped == 0 else None
    mx, mw = float(np.max(np.abs(layer.x))), float(np.max(np.abs(layer.w)))
    s_bound = math.sqrt((2**31 - 1) / (k * mx * mw)) if mx > 0 and mw > 0 else None  # worst case fits int32
    kind, detail = _limit(near, s, clipped_in, kernel_zero)
    return {
        "layer": layer.name, "precision": p.value,
        "s_nearest": b.s_x, "nrmse_nearest": b.nrmse, "effective_bits": metrics.effective_bits(b.nrmse),
        "s_truncate": bt.s_x, "nrmse_truncate": bt.nrmse,
        "limit": kind, "limit_detail": detail,
        "input_clipped_fraction": clipped_in,
        "kernel_levels_used": int(levels.size), "kernel_qmax": int(np.max(np.abs(qw))),
        "kernel_zero_fraction": kernel_zero,
        "accumulator_bits_worst_case": metrics.accumulator_bits(p.bits, k),
        "accumulator_bits_at_s": None if acc_max is None else metrics.signed_bits(acc_max),
        "wrapped_fraction": b.wrapped_fraction,
        "wrap_threshold": near.wrap_threshold,
        "s_worst_case_bound": s_bound,
        "wrap_over_bound": (near.wrap_threshold / s_bound) if near.wrap_threshold and s_bound else None,
        "reason": near.reason,
    }


def common_s(tables: dict[str, SweepTable]) -> dict[str, Any] | None:
    """One S for every layer at a precision (the assignment's program takes no S): the S swept on
    every layer that keeps the worst ratio of NRMSE to the layer's own best lowest."""
    if not tables:
        return None
    common = set.intersection(*({r.s_x for r in t.rows} for t in tables.values()))
    if not common:
        return None
    by = {name: {r.s_x: r for r in t.rows} for name, t in tables.items()}
    best = {name: t.best_single.nrmse for name, t in tables.items()}

    def worst(s: float) -> float:
        return max(by[n][s].nrmse / best[n] if best[n] > 0 else 1.0 for n in tables)
    s = min(sorted(common), key=worst)
    return {"s": s, "worst_ratio": worst(s), "nrmse": {n: by[n][s].nrmse for n in tables}}


def accuracy_for_layer(layer: Layer, precisions: Sequence[Precision], ref: np.ndarray,
                       settings: dict[str, Any], tick: Any = None,
                       into: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the accuracy half records for one layer (at batch 1: every accuracy figure of a
    batch made of copies of the layer is the same).

    Each precision's rows are added to ``into`` (default: a new dict, returned) as soon as that
    precision is done, so that an interruption keeps the precisions already swept. A precision
    whose scale cannot be represented for this layer (data too small or too large for its maxabs
    scale to be a float32) is skipped with the reason (also added to ``into["skipped"]``), and the
    others still run. Returns "tables" (precision -> the nearest-rounding sweep), "done" (the
    precisions recorded) and "skipped" ([{"layer", "precision", "reason"}]); with ``into`` None,
    together with the rows."""
    out = into if into is not None else {"sweeps": [], "strategies": [], "single_s": []}
    got: dict[str, Any] = {"tables": {}, "done": [], "skipped": []}
    for p in precisions:
        if not p.is_integer:
            continue
        try:
            for what, t in (("input", layer.x), ("kernel", layer.w)):
                try:
                    maxabs_scale(t, p.qmax)
                except InputError as e:
                    raise InputError(f"the {what}'s maxabs scale: {e}") from None
            near, trunc = sweeps(layer.x, layer.w, p, ref, settings)
            rows = []
            for t in (near, trunc):
                d = t.to_dict()
                d["layer"] = layer.name
                rows.append(d)
            strat = strategies(layer, p, ref, near, trunc)
            single = single_s_row(layer, p, near, trunc)
        except InputError as e:  # this precision only: the layer's data do not fit its scales
            got["skipped"].append({"layer": layer.name, "precision": p.value,
                                   "reason": f"{p.value} skipped for layer {layer.name}: {e}"})
            out.setdefault("skipped", []).append(got["skipped"][-1])
        else:
            out["sweeps"] += rows
            out["strategies"] += strat
            out["single_s"].append(single)
            got["tables"][p] = near
            got["done"].append(p.value)
        if tick:
            tick(f"{layer.name} sweeps {p.value}")
    if into is None:
        out.update(got)
        return out
    return got
