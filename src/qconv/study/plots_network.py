"""The network section's figure: per-layer NRMSE against depth.

    network_layers   top: the error each convolution adds (isolated: quantized alone, fed the FP32
                     network's input); bottom: the error accumulated up to it (propagated). INT8 at
                     every scale strategy, INT16 beside it; the measured thresholds as lines;
                     depthwise layers shaded; layers that break per-tensor INT8 on their own ringed.
"""

from __future__ import annotations

from typing import Any

from .figures import Panels, empty
from .plots_scale import log_floor

TITLE = "Per-layer NRMSE against depth in the network, with the NRMSE it tolerates"
NET_COLORS = {"single": "#55a868", "maxabs": "#8172b3", "maxabs-per-channel": "#937860",
              "calibrated": "#c44e52"}
NET_NAMES = {"single": "one S (the assignment's)", "maxabs": "per-tensor maxabs (naive)",
             "maxabs-per-channel": "per-channel kernel", "calibrated": "per-channel + calibrated input"}


def _series(net: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, option, line style) of what is drawn: INT8 at every strategy, INT16 calibrated."""
    out = []
    for o in net.get("options", []):
        if o["precision"] == "int8":
            out.append((f"INT8 {NET_NAMES.get(o['strategy'], o['strategy'])}", o,
                        {"color": NET_COLORS.get(o["strategy"], "gray"), "lw": 1.3}))
    i16 = next((o for o in net.get("options", []) if o["precision"] == "int16" and o["strategy"] == "calibrated"),
               None)
    if i16 is not None:
        out.append(("INT16 per-channel + calibrated input", i16, {"color": "#4c72b0", "lw": 1.1, "ls": "--"}))
    if not out:  # no INT8/INT16 asked for: whatever integer options ran
        for o in net.get("options", []):
            if o["precision"] != "fp32":
                out.append((o["label"], o, {"lw": 1.1}))
    return out


def network_layers(res: dict[str, Any]) -> Panels:
    net = res.get("network") or {}
    layers = net.get("layers") or []
    n = len(layers)
    longest = max((len(L["name"]) for L in layers), default=4)
    label_in = 0.075 * longest + 0.3                  # room under each panel for the rotated names
    P = Panels(2, max(7.5, 0.17 * n + 1.5), 3.2, cols=1, legend_h=label_in + 0.35, hspace_in=label_in + 0.5,
               title_h=1.0, right=0.55)
    series = _series(net)
    if not layers or not series:
        for ax in P.axes:
            empty(ax, "no per-layer NRMSE measured")
        P.title(TITLE)
        return P
    th = (net.get("threshold") or {}).get("agreement") or {}
    breaks = set((net.get("naive_int8") or {}).get("breaks") or [])
    xs = list(range(n))
    # exact values (NRMSE 0) and a threshold of 0 sit at the log axis' floor, labelled "0"
    floor = log_floor([v for _, o, _ in series for key in ("isolated", "propagated") for v in o.get(key) or []
                       if v is not None] + [v for v in th.values() if v is not None])
    for k, (ax, key, what) in enumerate(zip(P.axes, ("isolated", "propagated"),
                                            ("error this layer adds (quantized alone, FP32 input)",
                                             "error accumulated up to this layer (whole network quantized)"))):
        for L in layers:
            if L["depthwise"]:
                ax.axvspan(L["index"] - 0.5, L["index"] + 0.5, color="#e8e8e8", lw=0,
                           label="depthwise layer" if k == 0 else None)
        for label, o, style in series:
            ys = [float("nan") if v is None else v if v > 0 else floor for v in o.get(key) or []]
            if len(ys) != n:
                continue
            ax.plot(xs, ys, label=label, **style)
            dw = [i for i in xs if layers[i]["depthwise"]]
            ax.plot(dw, [ys[i] for i in dw], ls="none", marker="^", ms=3.5, color=style.get("color", "gray"))
            if key == "isolated" and o["precision"] == "int8" and o["strategy"] == "maxabs" and breaks:
                hit = [i for i in xs if layers[i]["name"] in breaks]
                ax.plot(hit, [ys[i] for i in hit], ls="none", marker="o", ms=9, mfc="none", mec="k", mew=1.2,
                        label="alone at per-tensor INT8, drops top-1 agreement below 99%")
        if key == "isolated":
            for t, ls in (("0.99", "-"), ("0.95", ":")):
                if th.get(t) is not None:
                    ax.axhline(th[t] or floor, color="k", ls=ls, lw=0.9,
                               label=f"noise in every layer: {float(t):.0%} agreement up to NRMSE {th[t]:.2g}"
                               + (" (drawn at the axis floor)" if th[t] == 0 else ""))
                    ax.annotate(f"{float(t):.0%}" + (" at 0" if th[t] == 0 else ""), (1.0, th[t] or floor), xycoords=("axes fraction", "data"),
                                xytext=(3, 0), textcoords="offset points", fontsize=7, va="center")
        ax.set_yscale("log")
        ax.set_xlim(-0.7, n - 0.3)
        ax.set_xticks(xs, [L["name"] for L in layers], rotation=90, fontsize=6.5 if n > 20 else 8)
        for tick, L in zip(ax.get_xticklabels(), layers):
            if L["name"] in breaks:
                tick.set_color("#b00000")
        ax.set_ylabel("NRMSE vs FP32 layer output")
        ax.set_title(what, fontsize=9)
        ax.grid(True, axis="y", which="major", alpha=0.25)
    seen: dict[str, Any] = {}
    for ax in P.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab and not lab.startswith("_"):
                seen.setdefault(lab, h)
    P.legend(list(seen.values()), list(seen.keys()), ncol=2 if P.size_in[0] < 11 else 3)
    P.title(f"{TITLE}\n{net.get('name')}, {net.get('evaluation_images')} images; ▲ and shading: depthwise; "
            f"ring and red name: breaks naive INT8 on its own")
    return P
