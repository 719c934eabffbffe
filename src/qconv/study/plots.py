"""The six figures of the study, drawn from results.json's content (matplotlib, no pyplot state).

Every figure has a fixed pixel size given by ``expected_size(name, n_layers)``; results.json
records each file with its size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..sweep import format_scale

DPI = 100
PLOTS = ("speedup", "nrmse", "pareto", "sweep", "phases", "energy")
TITLES = {
    "speedup": "Speedup of the convolve phase over the scalar FP32 baseline",
    "nrmse": "NRMSE per precision and scale strategy",
    "pareto": "Convolution time against NRMSE, with the Pareto frontier",
    "sweep": "NRMSE and overflow against the scale S",
    "phases": "Where the time goes: phases per option",
    "energy": "Energy per convolution: estimate and measurement",
}
PREC_COLORS = {"fp32": "#4c72b0", "int32": "#dd8452", "int16": "#55a868", "int8": "#c44e52"}
PHASE_COLORS = {"quantize": "#8172b3", "pack": "#937860", "transfer": "#da8bc3",
                "convolve": "#4c72b0", "dequantize": "#ccb974"}
STRATS = ("maxabs", "sweep-S", "sweep-S-truncate", "sweep-pair", "per-channel")
STRAT_COLORS = {"maxabs": "#8172b3", "sweep-S": "#55a868", "sweep-S-truncate": "#ccb974",
                "sweep-pair": "#64b5cd", "per-channel": "#937860", "fp32": "#4c72b0"}


def expected_size(name: str, n_layers: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure."""
    if name == "sweep":
        return 1500, 340 * max(1, n_layers) + 160
    if name == "phases":
        return 1200, 200 + 320 * max(1, n_layers)
    if name == "energy":
        return 1200, 820
    return 1200, 560


def _figure(name: str, n_layers: int):  # -> (Figure, canvas)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    w, h = expected_size(name, n_layers)
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    return fig, FigureCanvasAgg(fig)


def _ok(m: dict[str, Any]) -> bool:
    return m.get("error") is None and "phases_s" in m


def _layers(res: dict[str, Any]) -> list[str]:
    return [L["name"] for L in res["layers"]] or ["(none)"]


def _axes_row(fig, n: int, **kw):
    axs = fig.subplots(1, n, squeeze=False, **kw)[0]
    return list(axs)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _label(m: dict[str, Any]) -> str:
    return f"{m['backend']}/{m['precision']}"


def plot_speedup(res: dict[str, Any], fig) -> None:
    layers = _layers(res)
    axs = _axes_row(fig, len(layers))
    precs = res["config"]["precisions"]
    for ax, name in zip(axs, layers):
        ms = [m for m in res["measurements"] if m["layer"] == name and _ok(m)
              and m.get("speedup_vs_baseline") is not None]
        if not ms:
            _empty(ax, "no measurement with a baseline")
            continue
        backends = list(dict.fromkeys(m["backend"] for m in ms))
        width = 0.8 / max(1, len(precs))
        for j, p in enumerate(precs):
            for i, b in enumerate(backends):
                m = next((m for m in ms if m["backend"] == b and m["precision"] == p), None)
                if m is None:
                    continue
                xpos = i + (j - (len(precs) - 1) / 2) * width
                ax.bar(xpos, m["speedup_vs_baseline"], width, color=PREC_COLORS.get(p, "gray"), label=p)
                v = m["speedup_vs_baseline"]
                ax.text(xpos, v, f"{v:.0f}" if v >= 10 else f"{v:.2g}",
                        ha="center", va="bottom", fontsize=7)
                if m.get("peak_speedup_vs_baseline"):
                    ax.plot([xpos - width / 2, xpos + width / 2], [m["peak_speedup_vs_baseline"]] * 2,
                            color="k", ls="--", lw=1.2, label="hardware peak (measured or datasheet)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(backends)), backends, rotation=15, ha="right", fontsize=8)
        ax.set_yscale("log")
        base = (res["summary"].get("layers", {}).get(name) or {}).get("baseline") or {}
        ax.set_title(f"{name}\n(baseline {base.get('backend', '?')}/{base.get('precision', '?')} = 1)", fontsize=9)
        ax.set_ylabel("speedup (x, log)")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))  # one entry per precision, one for the peaks
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    fig.subplots_adjust(bottom=0.14)
    fig.suptitle(TITLES["speedup"] + f" (median of {res['config']['repeat']} runs)")


def _fp32_nrmse(res: dict[str, Any], name: str) -> float | None:
    v = [m["nrmse"] for m in res["measurements"] if m["layer"] == name and _ok(m)
         and m["precision"] == "fp32" and m.get("nrmse")]
    return min(v) if v else None


def plot_nrmse(res: dict[str, Any], fig) -> None:
    layers = _layers(res)
    axs = _axes_row(fig, len(layers))
    acc = res["summary"].get("acceptable_nrmse")
    for ax, name in zip(axs, layers):
        st = [s for s in res["strategies"] if s["layer"] == name and s.get("nrmse") is not None]
        precs = [p for p in ("int32", "int16", "int8") if any(s["precision"] == p for s in st)]
        fp = _fp32_nrmse(res, name)
        if not st and fp is None:
            _empty(ax, "no accuracy data")
            continue
        width = 0.8 / len(STRATS)
        for i, p in enumerate(precs):
            for j, sname in enumerate(STRATS):
                s = next((s for s in st if s["precision"] == p and s["strategy"] == sname), None)
                if s is None or not s["nrmse"]:
                    continue
                ax.bar(i + (j - (len(STRATS) - 1) / 2) * width, s["nrmse"], width, color=STRAT_COLORS[sname],
                       label=sname if i == 0 else None)
        xt = list(precs)
        if fp:
            ax.bar(len(precs), fp, 0.4, color=STRAT_COLORS["fp32"], label="fp32 (own rounding)")
            xt.append("fp32")
        ax.set_xticks(range(len(xt)), xt)
        ax.set_yscale("log")
        if acc:
            ax.axhline(acc, color="k", ls="--", lw=1, label="8-bit output (acceptable)")
        ax.set_ylabel("NRMSE vs float64 (log)")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(TITLES["nrmse"])


def plot_pareto(res: dict[str, Any], fig) -> None:
    """Colour = precision, marker = backend; only the frontier's points are labelled (integer
    options of different backends share one NRMSE, so labels on every point would collide)."""
    from matplotlib.lines import Line2D

    from .runner import pareto
    layers = _layers(res)
    axs = _axes_row(fig, len(layers))
    backends = list(dict.fromkeys(m["backend"] for m in res["measurements"]))
    markers = dict(zip(backends, "osD^vPXh*<>"))
    for ax, name in zip(axs, layers):
        ms = [m for m in res["measurements"] if m["layer"] == name and _ok(m) and m.get("nrmse")]
        if not ms:
            _empty(ax, "no measurement")
            continue
        for m in ms:
            ax.scatter([m["phases_s"]["convolve"]["median"]], [m["nrmse"]], s=36, zorder=3,
                       color=PREC_COLORS.get(m["precision"], "gray"), marker=markers.get(m["backend"], "o"))
        front = pareto([(m["phases_s"]["convolve"]["median"], m["nrmse"], m) for m in ms])
        fx = [m["phases_s"]["convolve"]["median"] for m in front]
        fy = [m["nrmse"] for m in front]
        ax.step(fx, fy, where="post", color="k", lw=1.2, zorder=2)
        for m in front:
            ax.annotate(_label(m), (m["phases_s"]["convolve"]["median"], m["nrmse"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        handles = [Line2D([], [], color="k", lw=1.2, label="Pareto frontier (labelled)")]
        handles += [Line2D([], [], ls="", marker="o", color=c, label=p) for p, c in PREC_COLORS.items()
                    if any(m["precision"] == p for m in ms)]
        handles += [Line2D([], [], ls="", marker=markers[b], color="gray", label=b) for b in backends
                    if any(m["backend"] == b for m in ms)]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("convolve time, median (s, log)")
        ax.set_ylabel("NRMSE (log)")
        ax.set_title(name, fontsize=9)
        ax.legend(handles=handles, fontsize=7, loc="center right")  # between integer and FP32 errors
    fig.suptitle(TITLES["pareto"])


def plot_sweep(res: dict[str, Any], fig) -> None:
    layers = _layers(res)
    precs = [p for p in ("int32", "int16", "int8") if p in res["config"]["precisions"]] or ["int8"]
    axs = fig.subplots(len(layers), len(precs), squeeze=False)
    legend: dict[str, Any] = {}
    for r, name in enumerate(layers):
        for c, p in enumerate(precs):
            ax = axs[r][c]
            near = next((s for s in res["sweeps"] if s["layer"] == name and s["precision"] == p
                         and s["rounding"] == "nearest"), None)
            trunc = next((s for s in res["sweeps"] if s["layer"] == name and s["precision"] == p
                          and s["rounding"] == "truncate"), None)
            if near is None:
                _empty(ax, f"{name} {p}: no sweep")
                continue
            S = [row["s_x"] for row in near["rows"]]
            ax.plot(S, [row["nrmse"] for row in near["rows"]], color="#4c72b0", lw=1.3, label="NRMSE (nearest)")
            if trunc is not None:
                ax.plot([row["s_x"] for row in trunc["rows"]], [row["nrmse"] for row in trunc["rows"]],
                        color="#4c72b0", lw=1, ls="--", label="NRMSE (truncate)")
            best = near["best"]
            ax.axvline(best["s_x"], color="#c44e52", lw=1.2, label=f"chosen S={best['s_x']:.4g}")
            st = {s["strategy"]: s for s in res["strategies"] if s["layer"] == name and s["precision"] == p}
            for key, mk in (("maxabs", "s"), ("sweep-pair", "^")):
                s = st.get(key)
                if s and s.get("nrmse"):
                    ax.scatter([math.sqrt(s["s_x"] * s["s_w"])], [s["nrmse"]], marker=mk, color="k", zorder=4,
                               label=f"{key} at sqrt(s_x*s_w)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("S (log2)")
            ax.set_ylabel("NRMSE (log)")
            ax2 = ax.twinx()
            ax2.plot(S, [row["wrapped_fraction"] for row in near["rows"]], color="#dd8452", lw=1,
                     label="wrapped outputs (fraction)")
            ax2.plot(S, [row["clamped_fraction"] for row in near["rows"]], color="#55a868", lw=1, ls=":",
                     label="saturated operands (fraction)")
            ax2.set_ylim(-0.02, 1.02)
            ax2.set_ylabel("fraction", fontsize=8)
            ax.set_title(f"{name} — {p}: chosen S={format_scale(best['s_x'])}", fontsize=9)
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            for h, l in zip(h1 + h2, l1 + l2):
                if l.startswith("chosen S"):
                    l = "chosen S (the sweep's best)"
                legend.setdefault(l, h)
    fig.suptitle(TITLES["sweep"] + " (chosen S: red line)")
    n = len(layers)
    bottom = 90 / expected_size("sweep", n)[1]
    fig.subplots_adjust(hspace=0.45, wspace=0.45, bottom=bottom + 0.05, top=1 - 60 / expected_size("sweep", n)[1])
    if legend:
        fig.legend(list(legend.values()), list(legend.keys()), loc="lower center", ncol=4, fontsize=8)


def plot_phases(res: dict[str, Any], fig) -> None:
    from matplotlib.patches import Patch

    from ..backends.base import PHASES
    layers = _layers(res)
    axs = fig.subplots(len(layers), 1, squeeze=False)
    for ax, name in zip((a[0] for a in axs), layers):
        ms = [m for m in res["measurements"] if m["layer"] == name and _ok(m)]
        if not ms:
            _empty(ax, "no measurement")
            continue
        labels = [_label(m) for m in ms]
        totals = [sum(m["phases_s"][ph]["median"] for ph in PHASES) for m in ms]
        left = [0.0] * len(ms)
        for ph in PHASES:
            v = [100 * m["phases_s"][ph]["median"] / t if t > 0 else 0.0 for m, t in zip(ms, totals)]
            ax.barh(range(len(ms)), v, left=left, color=PHASE_COLORS[ph], label=ph)
            left = [a + b for a, b in zip(left, v)]
        for i, t in enumerate(totals):
            ax.text(101, i, f"{t * 1e3:.3g} ms", va="center", fontsize=7)
        ax.set_xlim(0, 112)
        ax.set_yticks(range(len(ms)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("share of the call (%, medians of each phase); total per call at the right")
        ax.set_title(name, fontsize=9)
    fig.suptitle(TITLES["phases"])
    fig.subplots_adjust(left=0.16, hspace=0.5, top=1 - 90 / expected_size("phases", len(layers))[1])
    handles = [Patch(color=PHASE_COLORS[ph], label=ph) for ph in PHASES]
    fig.legend(handles=handles, loc="upper center", ncol=len(PHASES), fontsize=8,
               bbox_to_anchor=(0.5, 1 - 30 / expected_size("phases", len(layers))[1]))


def plot_energy(res: dict[str, Any], fig) -> None:
    """Top row: the per-operation estimate per precision, stacked (linear scale, so the parts add
    up visually). Bottom row: measured joules per call per option, where a meter exists."""
    layers = _layers(res)
    axs = fig.subplots(2, len(layers), squeeze=False)
    meters = res["machine"].get("energy_meters", {})
    for c, name in enumerate(layers):
        ax, axm = axs[0][c], axs[1][c]
        ms = [m for m in res["measurements"] if m["layer"] == name and _ok(m)]
        if not ms:
            _empty(ax, "no measurement")
            _empty(axm, "no measurement")
            continue
        precs = list(dict.fromkeys(m["precision"] for m in ms))
        est = {p: next(m["energy_estimate_j"] for m in ms if m["precision"] == p) for p in precs}
        x = list(range(len(precs)))
        uj = 1e6
        comp = [est[p]["compute_j"] * uj for p in precs]
        qd = [est[p]["quantize_dequantize_j"] * uj for p in precs]
        dlo = [est[p]["dram_low_j"] * uj for p in precs]
        dhi = [est[p]["dram_high_j"] * uj for p in precs]
        dmid = [(a + b) / 2 for a, b in zip(dlo, dhi)]
        ax.bar(x, comp, 0.5, color="#4c72b0", label="multiply-add")
        ax.bar(x, qd, 0.5, bottom=comp, color="#8172b3", label="(de)quantize")
        b2 = [a + b for a, b in zip(comp, qd)]
        ax.bar(x, dmid, 0.5, bottom=b2, color="#ccb974", label="DRAM, compulsory (1.3-2.6 nJ / 64 bit)",
               yerr=[[m - l for m, l in zip(dmid, dlo)], [h - m for h, m in zip(dhi, dmid)]], capsize=3)
        ax.set_xticks(x, precs)
        ax.set_ylim(0, 1.45 * max(a + b for a, b in zip(b2, dhi)))
        ax.set_ylabel("estimate, uJ per convolution")
        ax.set_title(f"{name}: estimate", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        measured = [m for m in ms if m.get("energy_measured")]
        if measured:
            labels = [_label(m) for m in measured]
            vals = [m["energy_measured"]["joules_per_call"] * 1e3 for m in measured]
            axm.bar(range(len(measured)), vals, 0.6,
                    color=[PREC_COLORS.get(m["precision"], "gray") for m in measured])
            axm.set_xticks(range(len(measured)), labels, rotation=30, ha="right", fontsize=7)
            axm.set_ylabel("measured, mJ per call (log)")
            axm.set_yscale("log")
            meter = measured[0]["energy_measured"]
            axm.set_title(f"{name}: measured ({meter['meter']}: {meter['device']}; whole device, idle included)",
                          fontsize=8)
        else:
            why = "; ".join(f"{k.upper()}: {v.get('detail')}" for k, v in meters.items() if not v.get("available"))
            _empty(axm, "No measured energy on this machine.\n" + _wrap(why, 55))
    fig.suptitle(TITLES["energy"] + " (per-operation energies: Horowitz, ISSCC 2014, 45 nm)")
    fig.subplots_adjust(hspace=0.55, bottom=0.14)


def _wrap(text: str, n: int) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, n)[:8])


_DRAW = {"speedup": plot_speedup, "nrmse": plot_nrmse, "pareto": plot_pareto, "sweep": plot_sweep,
         "phases": plot_phases, "energy": plot_energy}


def draw_all(res: dict[str, Any], out_dir: "str | Path") -> list[dict[str, Any]]:
    """Draw every figure into out_dir; returns [{name, file, title, width, height}]."""
    out = Path(out_dir)
    n = max(1, len(res["layers"]))
    done = []
    for name in PLOTS:
        fig, canvas = _figure(name, n)
        _DRAW[name](res, fig)
        path = out / f"{name}.png"
        canvas.print_png(str(path))
        w, h = expected_size(name, n)
        done.append({"name": name, "file": path.name, "title": TITLES[name], "width": w, "height": h})
    return done
