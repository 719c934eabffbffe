"""The scale figures: the overlaid V-curve (NRMSE against S for every integer precision), the
value histograms with each precision's range at its chosen S, and NRMSE per scale strategy."""

from __future__ import annotations

from typing import Any

from ..contract import Precision
from ..sweep import format_scale
from .config import INT_PRECISIONS, STRATEGIES, ok
from .figures import PREC_COLORS, STRAT_COLORS, Panels, collect_legend, empty, layer_names


def share_text(f: float) -> str:
    """A share as the report's tables write it (two significant digits): never a nonzero share as '0%'."""
    return "0%" if f == 0 else "<0.01%" if f < 1e-4 else f"{100 * f:.2g}%"


def log_floor(values: list[float]) -> float:
    """Where an exact 0 sits on a log axis: a decade under the smallest positive value (labelled '0')."""
    pos = [v for v in values if v is not None and v > 0]
    return min(pos) / 10 if pos else 1e-12


def mark_zero(ax: Any, x: float, floor: float, **kw: Any) -> None:
    """Label a point drawn at the log-axis floor as an exact 0."""
    ax.annotate("0", (x, floor), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                fontsize=7, **kw)

TITLES = {
    "vcurve": "The V-curve: NRMSE against the single scale S, every integer precision in one panel",
    "histograms": "Why one S fails: |values| of input and kernel, and each precision's range at its chosen S",
    "nrmse": "What separate scales, per-channel scales and rounding buy: NRMSE per scale strategy",
}


def _sweep(res: dict[str, Any], layer: str, p: str, rounding: str) -> dict[str, Any] | None:
    return next((s for s in res["sweeps"] if s["layer"] == layer and s["precision"] == p
                 and s["rounding"] == rounding), None)


def vcurve(res: dict[str, Any]) -> Panels:
    names = layer_names(res)
    P = Panels(len(names), 6.0, 3.8, cols=2, legend_h=0.9)
    acc = res.get("summary", {}).get("acceptable_nrmse")
    for ax, name in zip(P.axes, names):
        drawn = False
        for p in INT_PRECISIONS:
            near, trunc = _sweep(res, name, p, "nearest"), _sweep(res, name, p, "truncate")
            if near is None:
                continue
            c = PREC_COLORS[p]
            # an exact 0 (NRMSE 0.0) sits at the axis floor, labelled, rather than dropping out
            sweeps = [near["rows"]] + ([trunc["rows"]] if trunc is not None else [])
            floor = log_floor([r["nrmse"] for rows in sweeps for r in rows])
            y = lambda v: floor if v == 0 else v  # noqa: E731
            rows = [r for r in near["rows"] if r["nrmse"] is not None]
            ax.plot([r["s_x"] for r in rows], [y(r["nrmse"]) for r in rows], color=c, lw=1.5,
                    label=f"{p.upper()}, rounding to nearest")
            if trunc is not None:
                tr = [r for r in trunc["rows"] if r["nrmse"] is not None]
                ax.plot([r["s_x"] for r in tr], [y(r["nrmse"]) for r in tr], color=c, lw=0.9, ls="--", alpha=0.8,
                        label=f"{p.upper()}, truncation")
            b = near["best"]
            ax.scatter([b["s_x"]], [y(b["nrmse"])], marker="*", s=140, color=c, edgecolor="k", zorder=5,
                       label="chosen S (lowest NRMSE)")
            ax.annotate(f"{p.upper()} S={format_scale(b['s_x'])}", (b["s_x"], y(b["nrmse"])),
                        xytext=(4, -12), textcoords="offset points", fontsize=7, color=c)
            if any(r["nrmse"] == 0 for r in rows):
                mark_zero(ax, next(r["s_x"] for r in rows if r["nrmse"] == 0), floor, color=c)
            if near.get("wrap_threshold"):
                hi = max(r["s_x"] for r in near["rows"])
                ax.axvspan(near["wrap_threshold"], hi, color=c, alpha=0.13, lw=0,
                           label=f"{p.upper()} accumulators wrap (overflow cliff)")
                ax.axvline(near["wrap_threshold"], color=c, lw=0.8, ls="-.")
            drawn = True
        if not drawn:
            empty(ax, "no integer sweep")
            continue
        if acc is not None:
            net = res.get("summary", {}).get("acceptable_source") == "network"
            ax.axhline(acc or floor, color="k", ls=":", lw=1,
                       label=f"network tolerates ({acc:.2g}: 99% top-1 agreement)" if net else "8-bit output (1.13e-3)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("S (q = round(x*S), both tensors)")
        ax.set_ylabel("NRMSE vs float64")
        ax.set_title(name, fontsize=9)
        ax.grid(True, which="major", alpha=0.25)
    P.legend(*collect_legend(P.axes), ncol=4)
    P.title(TITLES["vcurve"])
    return P


def _edges(h: dict[str, Any]) -> list[float]:
    n = len(h["counts"])
    return [2.0 ** (h["lo_log2"] + i / h["per_octave"]) for i in range(n + 1)]


def histograms(res: dict[str, Any]) -> Panels:
    names = layer_names(res)
    P = Panels(2 * len(names), 5.2, 2.9, cols=2, legend_h=0.8)
    single = {(r["layer"], r["precision"]): r for r in res.get("single_s", [])}
    for i, name in enumerate(names):
        L = next((L for L in res["layers"] if L["name"] == name), None)
        for j, which in enumerate(("input", "kernel")):
            ax = P.axes[2 * i + j]
            h = (L or {}).get("histograms", {}).get(which)
            if not h or not h["counts"]:
                empty(ax, f"{name}: no {which} histogram")
                continue
            frac = [c / h["total"] for c in h["counts"]]
            edges = _edges(h)
            ax.stairs(frac, edges, fill=True, color="#9aa7b8", label="share of values per 1/4 octave")
            top = max(frac)
            x0, x1 = edges[0] / 2**4, edges[-1] * 2**4  # the data and 4 octaves either side

            def inside(v: float) -> float:
                return min(max(v, x0 * 1.05), x1 / 1.05)
            for k, p in enumerate(INT_PRECISIONS):
                r = single.get((name, p))
                if r is None:
                    continue
                s, qmax, c = r["s_nearest"], Precision(p).qmax, PREC_COLORS[p]
                y = top * (1.12 + 0.16 * k)
                ax.plot([0.5 / s, qmax / s], [y, y], color=c, lw=2.2, solid_capstyle="butt",
                        label=f"{p.upper()} at its S: from 0.5/S (rounds to 0) to Qmax/S (clips)")
                ax.plot([0.5 / s] * 2, [y - top * 0.05, y + top * 0.05], color=c, lw=1.2)
                ax.plot([qmax / s] * 2, [y - top * 0.05, y + top * 0.05], color=c, lw=1.2)
                share = r["input_clipped_fraction"] if which == "input" else r["kernel_zero_fraction"]
                what = "clip" if which == "input" else "round to 0"
                ax.text(inside(qmax / s if which == "input" else 0.5 / s), y + top * 0.04,
                        f" {p.upper()}: {share_text(share)} {what} ", fontsize=6.5, color=c,
                        ha="right" if which == "input" else "left", va="bottom")
            ax.set_xscale("log", base=2)
            ax.set_xlim(x0, x1)
            ax.set_ylim(0, top * 1.75)
            ax.set_xlabel(f"|{which} value| (log2)")
            ax.set_ylabel("share")
            ax.set_title(f"{name}: {which} ({share_text(h['zeros'] / h['total'])} exact zeros)", fontsize=9)
    P.legend(*collect_legend(P.axes), ncol=2)
    P.title(TITLES["histograms"])
    return P


def nrmse_bars(res: dict[str, Any]) -> Panels:
    names = layer_names(res)
    P = Panels(len(names), 5.6, 3.4, cols=2, legend_h=0.8)
    acc = res.get("summary", {}).get("acceptable_nrmse")
    for ax, name in zip(P.axes, names):
        st = [s for s in res["strategies"] if s["layer"] == name and s.get("nrmse") is not None]
        precs = [p for p in INT_PRECISIONS if any(s["precision"] == p for s in st)]
        fp = [m["nrmse"] for m in res["measurements"] if m["layer"] == name and ok(m)
              and m["precision"] == "fp32" and m.get("nrmse") is not None]
        if not st and not fp:
            empty(ax, "no accuracy data")
            continue
        width = 0.8 / len(STRATEGIES)
        floor = log_floor([s["nrmse"] for s in st] + fp + [acc or 0])   # exact (NRMSE 0) bars stand on it
        for i, p in enumerate(precs):
            for j, sname in enumerate(STRATEGIES):
                s = next((s for s in st if s["precision"] == p and s["strategy"] == sname), None)
                if s is not None:
                    x = i + (j - (len(STRATEGIES) - 1) / 2) * width
                    ax.bar(x, s["nrmse"] or floor, width, color=STRAT_COLORS[sname], label=sname)
                    if s["nrmse"] == 0:
                        mark_zero(ax, x, floor)
        ticks = [p.upper() for p in precs]
        if fp:
            ax.bar(len(precs), min(fp) or floor, 0.3, color=STRAT_COLORS["fp32"], label="fp32 (its own rounding)")
            if min(fp) == 0:
                mark_zero(ax, len(precs), floor)
            ticks.append("FP32")
        ax.set_xticks(range(len(ticks)), ticks)
        ax.set_yscale("log")
        if acc is not None:
            net = res.get("summary", {}).get("acceptable_source") == "network"
            ax.axhline(acc or floor, color="k", ls=":", lw=1,
                       label=f"network tolerates ({acc:.2g}: 99% top-1 agreement)" if net else "8-bit output (1.13e-3)")
        ax.set_ylabel("NRMSE vs float64")
        ax.set_title(name, fontsize=9)
    P.legend(*collect_legend(P.axes), ncol=4)
    P.title(TITLES["nrmse"])
    return P
