"""The study's figures, drawn from results.json's content; each figure's size grows with the
number of layers (and options), and results.json records each file with its pixel size.

    speedup     convolve-phase speedup over the one baseline, with the measured instruction peaks
    vcurve      NRMSE against S, every integer precision overlaid (plots_scale)
    histograms  value histograms with each precision's range at its chosen S (plots_scale)
    nrmse       NRMSE per scale strategy (plots_scale)
    pareto      whole-call time against NRMSE: single-S, pair and per-channel points, reference points
    phases      where the time of a call goes
    energy      the per-operation estimate, and dynamic energy from measured loops where a meter exists
    network_layers  per-layer NRMSE against depth in the network (plots_network; with --network only)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..backends.base import PHASES
from . import plots_network, plots_scale
from .appendix import fmt_time
from .config import ok
from .figures import (PHASE_COLORS, PREC_COLORS, STRAT_MARKERS, Panels, collect_legend, empty, layer_names,
                      wrap)
from .summary import headline, label, pareto

PLOTS = ("speedup", "vcurve", "histograms", "nrmse", "pareto", "phases", "energy")
TITLES = {
    "speedup": "Speedup of the convolve phase over scalar C FP32 (the assignment's Problem 1)",
    "pareto": "Whole-call time against NRMSE: every scale strategy, the frontier, and reference points",
    "phases": "Where the time of a call goes (medians of each phase)",
    "energy": "Energy per convolution",
    "network_layers": plots_network.TITLE,
    **plots_scale.TITLES,
}


def _head(res: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [m for m in res["measurements"] if m["layer"] == name and ok(m) and headline(m)]


def speedup(res: dict[str, Any]) -> Panels:
    names = layer_names(res)
    n_opts = max([len({m["backend"] for m in _head(res, n)}) for n in names] + [1])
    P = Panels(len(names), max(4.5, 1.1 * n_opts + 1.5), 3.6, cols=2, legend_h=0.7)
    precs = res["config"]["precisions"]
    for ax, name in zip(P.axes, names):
        ms = [m for m in _head(res, name) if m.get("speedup_vs_baseline")]
        if not ms:
            empty(ax, "no measurement with a baseline")
            continue
        backends = list(dict.fromkeys(m["backend"] for m in ms))
        width = 0.8 / max(1, len(precs))
        few = len(ms) <= 16
        for m in ms:
            i, j = backends.index(m["backend"]), precs.index(m["precision"])
            xpos = i + (j - (len(precs) - 1) / 2) * width
            v = m["speedup_vs_baseline"]
            ax.bar(xpos, v, width, color=PREC_COLORS.get(m["precision"], "gray"), label=m["precision"].upper())
            if few:
                ax.text(xpos, v * 1.08, f"{v:.0f}" if v >= 10 else f"{v:.2g}", ha="center", va="bottom",
                        fontsize=6.5, rotation=90 if v >= 1000 else 0)
            if m.get("peak_speedup_vs_baseline"):
                ax.plot([xpos - width / 2, xpos + width / 2], [m["peak_speedup_vs_baseline"]] * 2,
                        color="k", ls="--", lw=1.1, label="measured peak of the kernel's instruction")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(backends)), [wrap(b) for b in backends], fontsize=7.5)
        ax.set_yscale("log")
        top = max(max(m["speedup_vs_baseline"] for m in ms),
                  max((m.get("peak_speedup_vs_baseline") or 0) for m in ms))
        ax.set_ylim(top=top * 4)
        base = ((res.get("summary") or {}).get("layers", {}).get(name) or {}).get("baseline") or {}
        ax.set_title(f"{name} (baseline {base.get('backend', '?')} {base.get('precision', '?')} = 1)", fontsize=9)
        ax.set_ylabel("speedup (x, log)")
    P.legend(*collect_legend(P.axes))
    P.title(TITLES["speedup"] + f", median of {res['config']['repeat']} runs")
    return P


def pareto_plot(res: dict[str, Any]) -> Panels:
    from matplotlib.lines import Line2D
    names = layer_names(res)
    P = Panels(len(names), 6.0, 4.0, cols=2, legend_h=1.0)
    for ax, name in zip(P.axes, names):
        ms = [m for m in res["measurements"] if m["layer"] == name and ok(m) and m.get("nrmse") is not None]
        refs = [r for r in res.get("reference_points", []) if r["layer"] == name and r.get("nrmse") is not None]
        if not ms and not refs:
            empty(ax, "no measurement")
            continue
        floor = plots_scale.log_floor([m["nrmse"] for m in ms] + [r["nrmse"] for r in refs])

        def y(v: float) -> float:  # an exact 0 sits at the floor of the log axis, labelled "0"
            return v or floor
        for m in ms:
            s = m.get("scale_strategy")
            if m["nrmse"] == 0:
                plots_scale.mark_zero(ax, m["call_s"]["median"], floor)
            ax.scatter([m["call_s"]["median"]], [y(m["nrmse"])], s=34, zorder=3, marker=STRAT_MARKERS.get(s, "o"),
                       color=PREC_COLORS.get(m["precision"], "gray"), alpha=0.85 if s in (None, "single-S") else 0.6)
        front = pareto([(m["call_s"]["median"], m["nrmse"], m) for m in ms])
        if front:
            ax.step([m["call_s"]["median"] for m in front], [y(m["nrmse"]) for m in front], where="post",
                    color="k", lw=1.0, zorder=2)
        for k, m in enumerate(front):
            ax.annotate(wrap(label(m), 22), (m["call_s"]["median"], y(m["nrmse"])), fontsize=6.5,
                        xytext=(5, 4 if k % 2 else -10), textcoords="offset points")
        for r in refs:
            ax.scatter([r["call_s"]["median"]], [y(r["nrmse"])], s=90, marker="*", color="k", zorder=4)
            ax.annotate(wrap(r["name"], 18), (r["call_s"]["median"], y(r["nrmse"])), fontsize=6.5, style="italic",
                        xytext=(5, 5), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("whole call conv(x), median (s, log)")
        ax.set_ylabel("NRMSE vs float64 (log)")
        ax.set_title(name, fontsize=9)
    precs = list(dict.fromkeys(m["precision"] for m in res["measurements"] if ok(m)))
    handles = [Line2D([], [], color="k", lw=1, label="Pareto frontier of qconv's options (labelled)")]
    handles += [Line2D([], [], ls="", marker="o", color=PREC_COLORS.get(p, "gray"), label=p.upper()) for p in precs]
    handles += [Line2D([], [], ls="", marker=STRAT_MARKERS[s], color="gray", label=t) for s, t in
                ((None, "no scale (FP32)"), ("single-S", "one S for both tensors"), ("pair", "best (s_x, s_w) pair"),
                 ("per-channel", "maxabs per output channel"))]
    if res.get("reference_points"):
        handles.append(Line2D([], [], ls="", marker="*", color="k", markersize=10, label="reference point (library)"))
    P.legend(handles, [h.get_label() for h in handles], ncol=5)
    P.title(TITLES["pareto"])
    return P


def phases(res: dict[str, Any]) -> Panels:
    names = layer_names(res)
    n_opts = max([len(_head(res, n)) for n in names] + [1])
    P = Panels(len(names), 6.2, 0.26 * n_opts + 0.8, cols=2, legend_h=0.6, left=2.2, wspace_in=2.4)
    for ax, name in zip(P.axes, names):
        ms = _head(res, name)
        if not ms:
            empty(ax, "no measurement")
            continue
        totals = [sum(m["phases_s"][ph]["median"] for ph in PHASES) for m in ms]
        left = [0.0] * len(ms)
        for ph in PHASES:
            v = [100 * m["phases_s"][ph]["median"] / t if t > 0 else 0.0 for m, t in zip(ms, totals)]
            ax.barh(range(len(ms)), v, left=left, color=PHASE_COLORS[ph], label=ph)
            left = [a + b for a, b in zip(left, v)]
        for i, t in enumerate(totals):
            ax.text(101, i, fmt_time(t), va="center", fontsize=6.5)
        ax.set_xlim(0, 118)
        ax.set_yticks(range(len(ms)), [label(m) for m in ms], fontsize=6.5)
        ax.invert_yaxis()
        ax.set_xlabel("share of the phases' sum (%); the sum at the right")
        ax.set_title(name, fontsize=9)
    P.legend(*collect_legend(P.axes))
    P.title(TITLES["phases"])
    return P


def energy_plot(res: dict[str, Any]) -> Panels:
    names = layer_names(res)
    loops = [m for m in res["measurements"] if ok(m) and m.get("energy_measured")]
    n = len(names) * (2 if loops else 1)
    P = Panels(n, 5.0, 3.2, cols=2, legend_h=0.7)
    for i, name in enumerate(names):
        ax = P.axes[i * (2 if loops else 1)]
        ms = _head(res, name)
        if not ms:
            empty(ax, "no measurement")
            continue
        precs = list(dict.fromkeys(m["precision"] for m in ms))
        est = {p: next(m["energy_estimate_j"] for m in ms if m["precision"] == p) for p in precs}
        uj = 1e6
        comp = [est[p]["compute_j"] * uj for p in precs]
        qd = [est[p]["quantize_dequantize_j"] * uj for p in precs]
        mem = [(est[p]["dram_low_j"] + est[p]["dram_high_j"]) / 2 * uj for p in precs]
        ax.bar(precs, comp, 0.5, color="#4c72b0", label="multiply-add (Horowitz 2014)")
        ax.bar(precs, qd, 0.5, bottom=comp, color="#8172b3", label="(de)quantize")
        ax.bar(precs, mem, 0.5, bottom=[a + b for a, b in zip(comp, qd)], color="#ccb974",
               label="memory, compulsory traffic (cited pJ/bit)")
        ax.set_ylabel("estimate, uJ per convolution")
        ax.set_title(f"{name}: estimate", fontsize=9)
        if loops:
            axm = P.axes[i * 2 + 1]
            lm = [m for m in loops if m["layer"] == name]
            if not lm:
                empty(axm, "no measured loop for this layer")
                continue
            vals = [(m["energy_measured"].get("dynamic_joules_per_call") or 0) * 1e3 for m in lm]
            for k, (m, v) in enumerate(zip(lm, vals)):
                good = m["energy_measured"].get("measured")
                axm.bar(k, v, 0.6, color=PREC_COLORS.get(m["precision"], "gray") if good else "white",
                        edgecolor=PREC_COLORS.get(m["precision"], "gray"), hatch=None if good else "//",
                        label="measured (kernel >= 50% of a >= 1 s loop)" if good else "no verdict (kernel < 50% of the loop)")
            axm.set_xticks(range(len(lm)), [wrap(label(m), 14) for m in lm], fontsize=6.5)
            axm.set_ylabel("dynamic mJ per call")
            axm.set_title(f"{name}: loops, idle power subtracted", fontsize=9)
    P.legend(*collect_legend(P.axes))
    P.title(TITLES["energy"] + ("" if loops else " (no energy meter here: the estimate only)"))
    return P


_DRAW = {"speedup": speedup, "vcurve": plots_scale.vcurve, "histograms": plots_scale.histograms,
         "nrmse": plots_scale.nrmse_bars, "pareto": pareto_plot, "phases": phases, "energy": energy_plot,
         "network_layers": plots_network.network_layers}


def draw_all(res: dict[str, Any], out_dir: "str | Path") -> list[dict[str, Any]]:
    """Draw every figure into out_dir; returns [{name, file, title, width, height}]."""
    out = Path(out_dir)
    done = []
    extra = ("network_layers",) if (res.get("network") or {}).get("options") else ()
    for name in PLOTS + extra:
        panels = _DRAW[name](res)
        path = out / f"{name}.png"
        panels.canvas.print_png(str(path))
        w, h = panels.pixels
        done.append({"name": name, "file": path.name, "title": TITLES[name], "width": w, "height": h})
    return done
