"""What the measurements say: speedups over the one baseline, shares of the measured peaks, the
Pareto frontier, the per-layer answers and the energy verdicts. Pure functions of results.json's
content; imports nothing from the study but its config.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..metrics import output_bits_nrmse
from .config import BASELINE, BASELINE_FALLBACK, SINGLE, ok


def overlaps(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two options' convolve-time interquartile ranges overlap (not distinguishable)."""
    pa, pb = a["phases_s"]["convolve"], b["phases_s"]["convolve"]
    return pa["q1"] <= pb["q3"] and pb["q1"] <= pa["q3"]


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """'faster' / 'slower' when a's convolve-time interquartile range lies wholly below / above
    b's, else 'tied'."""
    if overlaps(a, b):
        return "tied"
    return "faster" if a["phases_s"]["convolve"]["median"] < b["phases_s"]["convolve"]["median"] else "slower"


def pareto(points: Sequence[tuple[float, float, Any]]) -> list[Any]:
    """Items not dominated in (time, nrmse), both minimized; sorted by time."""
    front, best = [], math.inf
    for t, e, item in sorted(points, key=lambda p: (p[0], p[1])):
        if e < best:
            front.append(item)
            best = e
    return front


def headline(m: dict[str, Any]) -> bool:
    """The measurements the answer is about: FP32, and integers at the assignment's single S."""
    return m.get("scale_strategy") in (None, SINGLE)


def label(m: dict[str, Any]) -> str:
    """'c-avx2 int8' for the single-S/FP32 options, 'c-avx2 int8 (pair)' for the others."""
    s = m.get("scale_strategy")
    return f"{m['backend']} {m['precision']}" + ("" if s in (None, SINGLE) else f" ({s})")


def _conv(m: dict[str, Any]) -> float:
    return m["phases_s"]["convolve"]["median"]


def _call(m: dict[str, Any]) -> float:
    return (m.get("call_s") or m["total_s"])["median"]


def _opt(m: dict[str, Any]) -> dict[str, Any]:
    em = m.get("energy_measured") or {}
    return {"backend": m["backend"], "precision": m["precision"], "scale_strategy": m.get("scale_strategy"),
            "convolve_s": _conv(m), "call_s": _call(m), "nrmse": m["nrmse"],
            "effective_bits": m["effective_bits"], "speedup_vs_baseline": m.get("speedup_vs_baseline"),
            "speedup_call_vs_baseline": m.get("speedup_call_vs_baseline"),
            "energy_estimate_j": m["energy_estimate_j"]["total_j"],
            "dynamic_joules_per_call": em.get("dynamic_joules_per_call") if em.get("measured") else None}


def _baseline(lm: list[dict[str, Any]]) -> dict[str, Any] | None:
    for b, p in (BASELINE, BASELINE_FALLBACK):
        m = next((m for m in lm if m["backend"] == b and m["precision"] == p), None)
        if m is not None:
            return m
    return None


def peak_share(m: dict[str, Any]) -> float | None:
    pk, g = m.get("peak_gops"), m.get("gops")
    return g / pk if pk and g else None


def acceptable(res: dict[str, Any]) -> tuple[float, str, str]:
    """The per-layer NRMSE bar and where it comes from: the network's measured threshold (noise of
    that NRMSE in every layer keeps top-1 agreement with FP32 at >= 99%) when a network section
    measured one, else the single-layer rule (8 effective output bits)."""
    net = res.get("network") or {}
    th = ((net.get("threshold") or {}).get("agreement") or {}).get("0.99")
    if th is not None:
        what = (f"Gaussian noise of this NRMSE added to every convolution's output keeps top-1 agreement with "
                f"FP32 at >= 99% on {net['evaluation_images']} images" if th > 0 else
                f"even the lowest noise level tried ({net['noise']['lowest_level']:.2g}) drops top-1 agreement "
                f"below 99%, so no per-layer NRMSE was measured to be acceptable")
        return th, f"measured on {net['name']}: {what}", "network"
    return output_bits_nrmse(8), ("NRMSE at most that of storing the output in 8 bits (1/(255*sqrt(12)) = "
                                  "1.13e-3), i.e. >= 8 effective bits; the fallback when no network was "
                                  "run"), "single-layer rule"


def derive(res: dict[str, Any]) -> None:
    """Fill speedups and peak shares into each measurement and res['summary']."""
    ms = [m for m in res["measurements"] if ok(m)]
    acc, rule, source = acceptable(res)
    summary: dict[str, Any] = {"layers": {}, "acceptable_nrmse": acc, "acceptable_rule": rule,
                               "acceptable_source": source, "peak_shares_over_100": []}
    for L in res["layers"]:
        name = L["name"]
        lm = [m for m in ms if m["layer"] == name]
        base = _baseline(lm)
        fp32 = [m for m in lm if m["precision"] == "fp32"]
        best_fp32 = min(fp32, key=_conv) if fp32 else None
        for m in lm:
            m["speedup_vs_baseline"] = _conv(base) / _conv(m) if base and _conv(m) > 0 else None
            m["speedup_call_vs_baseline"] = _call(base) / _call(m) if base and _call(m) > 0 else None
            m["speedup_vs_best_fp32"] = _conv(best_fp32) / _conv(m) if best_fp32 and _conv(m) > 0 else None
            share = peak_share(m)
            m["peak_share"] = share
            m["peak_speedup_vs_baseline"] = (m["peak_gops"] / base["gops"]
                                             if m.get("peak_gops") and base and base.get("gops") else None)
            if share is not None and share > 1.0:
                summary["peak_shares_over_100"].append({
                    "layer": name, "backend": m["backend"], "precision": m["precision"], "share": share,
                    "note": ("above the measured peak of its instruction: the microbenchmark's best run saw a "
                             "lower clock or more contention than this convolution's median did")})
        head = [m for m in lm if headline(m)]
        if not head:
            summary["layers"][name] = None
            continue
        fastest = min(head, key=_conv)
        with_err = [m for m in head if m["nrmse"] is not None]
        accurate = min(with_err, key=lambda m: m["nrmse"]) if with_err else None
        quant = [m for m in with_err if m["precision"] != "fp32"]
        accurate_q = min(quant, key=lambda m: m["nrmse"]) if quant else None
        good = [m for m in with_err if m["nrmse"] <= acc]
        recommended = min(good, key=_conv) if good else None
        every = [m for m in lm if m["nrmse"] is not None]
        good_any = [m for m in every if m["nrmse"] <= acc]
        measured = [m for m in lm if (m.get("energy_measured") or {}).get("measured")]
        summary["layers"][name] = {
            "baseline": None if base is None else {"backend": base["backend"], "precision": base["precision"],
                                                   "convolve_s": _conv(base), "call_s": _call(base)},
            "best_fp32": None if best_fp32 is None else _opt(best_fp32),
            "fastest": _opt(fastest),
            "fastest_tied_with": [_opt(m) for m in head if m is not fastest and overlaps(m, fastest)],
            "fastest_call": _opt(min(head, key=_call)),
            "most_accurate": None if accurate is None else _opt(accurate),
            "most_accurate_quantized": None if accurate_q is None else _opt(accurate_q),
            "recommended": None if recommended is None else _opt(recommended),
            "recommended_any_scale": _opt(min(good_any, key=_conv)) if good_any else None,
            "frontier": [_opt(m) for m in pareto([(_call(m), m["nrmse"], m) for m in every])],
            "energy_best_estimate": _opt(min(head, key=lambda m: m["energy_estimate_j"]["total_j"])),
            "energy_best_estimate_acceptable": (_opt(min(good, key=lambda m: m["energy_estimate_j"]["total_j"]))
                                                if good else None),
            "energy_best_measured": (_opt(min(measured, key=lambda m: m["energy_measured"]["dynamic_joules_per_call"]))
                                     if measured else None),
            "energy_loops": sum(1 for m in lm if m.get("energy_measured")),
            "energy_loops_measured": len(measured),
            "reference_faster": [p for p in res.get("reference_points", []) if p["layer"] == name
                                 and p["call_s"]["median"] < _call(min(head, key=_call))],
        }
    res["summary"] = summary
