"""The report's network parts: the acceptable-loss answer from the network's measured threshold,
the body section (accuracy table, figure, threshold, naive INT8 by layer, speed) and appendix H.
Every number comes from results.json's "network" section."""

from __future__ import annotations

from typing import Any

from ..metrics import output_bits_nrmse
from .appendix import figure, table

STRATEGY_NAMES = {"single": "one S", "maxabs": "per-tensor maxabs", "maxabs-per-channel": "per-channel kernel",
                  "calibrated": "per-channel + calibrated input"}


def present(res: dict[str, Any]) -> bool:
    """Whether a network section measured the threshold (then it answers the acceptable loss)."""
    net = res.get("network") or {}
    return bool(net.get("threshold"))


def _pct(a: float | None) -> str:
    return "n/a" if a is None else f"{100 * a:.3g}%"


def _g(v: float | None) -> str:
    """Two significant digits; small values as 1.8e-4."""
    if v is None:
        return "n/a"
    if v == 0:
        return "0"
    return f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e+") if abs(v) < 1e-3 else f"{v:.2g}"


def _span(v: list[float]) -> str:
    lo, hi = _g(min(v)), _g(max(v))
    return lo if lo == hi else f"{lo}-{hi}"


def _ips(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def option_name(o: dict[str, Any]) -> str:
    if o["precision"] == "fp32":
        return "FP32"
    s = STRATEGY_NAMES.get(o["strategy"], o["strategy"])
    if o["strategy"] == "single" and o.get("single_s"):
        s += f" (S={o['single_s']:g})"
    return f"{o['precision'].upper()} {s}"


def _opt(net: dict[str, Any], p: str, s: str | None) -> dict[str, Any] | None:
    return next((o for o in net.get("options", []) if o["precision"] == p and o["strategy"] == s), None)


def _threshold_text(net: dict[str, Any]) -> tuple[str, float, float]:
    th = net["threshold"]["agreement"]
    t99, t95 = th.get("0.99") or 0.0, th.get("0.95") or 0.0
    bits = (net["threshold"].get("effective_bits") or {}).get("0.99")
    low = net["noise"]["lowest_level"]

    def up_to(t: float, b: float | None = None) -> str:
        if t <= 0:
            return f"at none of the levels tried (lowest {_g(low)})"
        return f"up to a per-layer NRMSE of {_g(t)}" + (f" ({b:.1f} effective bits)" if b else "")
    return (f"noise added to every convolution's output keeps top-1 agreement with FP32 at >= 99% "
            f"{up_to(t99, bits)} and at >= 95% {up_to(t95).replace('a per-layer NRMSE of ', '')}"), t99, t95


def answer_acceptable(res: dict[str, Any], sample: dict[str, list[float]]) -> list[str]:
    """'Is naive quantization justified?' from the network's measurements. ``sample``: the sample
    layers' single-S NRMSE per precision (int8, int16) for the comparison with the bar."""
    net = res["network"]
    n = net["evaluation_images"]
    noise, t99, t95 = _threshold_text(net)
    txt = (f"- **Is naive quantization justified?** Measured on `{net['name']}` ({n} images; one is "
           f"{100 / max(n, 1):.2g}% of agreement): {noise}. That bar replaces the single-layer 8-bit rule "
           f"(NRMSE 1.13e-3)")
    rule = output_bits_nrmse(8)
    near = [r for r in net["noise"]["table"] if 0.8 * rule <= r["nrmse"] <= 1.2 * rule]
    if rule > max(t99, t95):
        txt += (f"; noise of {_g(near[0]['nrmse'])} leaves {_pct(near[0]['agreement'])} agreement" if near else
                ", which lies above both")
    txt += ". "
    labelled = net["labelled_images"] > 0 and net.get("fp32")
    parts = []
    for p, s in (("int16", "calibrated"), ("int8", "calibrated"), ("int8", "maxabs"), ("int8", "single")):
        o = _opt(net, p, s)
        if o is not None:
            parts.append(f"{option_name(o)} {_pct(o['agreement'])} ({_g(o['layer_nrmse_median'])}"
                         + (f", {o['lost']} of {net['fp32']['top1']} lost" if labelled else "") + ")")
    if parts:
        txt += "Agreement (median per-layer NRMSE): " + "; ".join(parts) + ". "
    naive = [o for o in (_opt(net, "int8", "single"), _opt(net, "int8", "maxabs")) if o is not None]
    good = _opt(net, "int8", "calibrated") or _opt(net, "int8", "maxabs-per-channel")
    bad = [o for o in naive if o["agreement"] < 0.99]
    if bad:
        txt += f"So naive INT8 ({', '.join(STRATEGY_NAMES[o['strategy']] for o in bad)}) is not justified here"
        if good is not None:
            txt += (f"; per-channel kernel scales (Krishnamoorthi 2018) bring INT8 to {_pct(good['agreement'])}"
                    + (", above 95%" if good["agreement"] >= 0.95 else ", still under 95%"))
        txt += ". "
    elif naive:
        txt += "Naive INT8 keeps 99% agreement on this network. "
    if good is not None and good["layer_nrmse_median"] and t99 > 0 and good["layer_nrmse_median"] > t99 \
            and good["agreement"] >= 0.95:
        txt += (f"Per-channel INT8's per-layer error exceeds the 99% bar yet keeps {_pct(good['agreement'])}: "
                f"full-range Gaussian noise is a conservative stand-in for rounding error. ")
    verdict = [f"{p} {_span(v)} {'clears' if max(v) <= t99 else 'misses'} it"
               for p, v in (("INT16", sample.get("int16") or []), ("INT8", sample.get("int8") or [])) if v]
    if verdict and t99 > 0:
        txt += "On the sample layers, one-S NRMSE of " + "; ".join(verdict) + "."
    return [txt.rstrip()]


def fallback_note(res: dict[str, Any]) -> str:
    why = ("the network section stopped before its threshold" if res.get("network") else "no network was run")
    return (f"This bar is the single-layer rule, a fallback: {why} (`qconv study --network "
            "efficientnet-lite0` measures what a network tolerates).")


def body(res: dict[str, Any]) -> list[str]:
    net = res.get("network")
    if not net:
        return []
    L = [f"## The network: {net['name']}", ""]
    fp = net.get("fp32") or {}
    lab = net["labelled_images"]
    L.append(f"All {net['convolutions']} convolutions ({net['depthwise']} depthwise) through qconv on "
             f"`{net.get('backend') or 'n/a'}`, the rest numpy FP32; {net['evaluation_images']} evaluation images "
             + (f"({lab} labelled, FP32 top-1 {fp.get('top1', 'n/a')}/{lab})" if lab else "(none labelled)")
             + f", {net['calibration_images']} disjoint calibration images; agreement: top-1 equal to FP32's.")
    L.append("")
    rows = []
    for o in net.get("options", []):
        lo = o.get("layers_over") or {}
        rows.append([option_name(o)] + ([f"{o['top1']}/{lab}", f"{o['top5']}/{lab}", o["lost"]] if lab else
                                         ["-", "-", "-"]) + [_pct(o["agreement"]),
                     _g(o["logits_nrmse"]),
                     f"{_g(o['layer_nrmse_median'])} / {_g(o['layer_nrmse_max'])}" if o["precision"] != "fp32" else "-",
                     f"{lo.get('0.99', '-')} / {lo.get('0.95', '-')}" if lo else "-"])
    L += table(["option", "top-1", "top-5", "lost", "agreement", "logits NRMSE",
                "per-layer NRMSE median / max", "layers above the 99% / 95% bar"], rows)
    L += [""] + figure(res, "network_layers")
    nv = net.get("naive_int8")
    if nv:
        dw = {x["name"] for x in net["layers"] if x["depthwise"]}
        worst = sorted(nv["alone"], key=lambda a: (a["agreement"], -(a["logits_nrmse"] or 0)))
        br = [a["layer"] for a in worst if a["breaks"]]  # the worst first
        L.append(f"Quantized alone with per-tensor INT8 scales, {len(br)} of {net['convolutions']} layers drop "
                 f"agreement below 99%, {sum(b in dw for b in br)} of them depthwise"
                 + ("; worst first: " + ", ".join(f"`{b}`" for b in br[:6])
                    + (f" and {len(br) - 6} more (appendix H)" if len(br) > 6 else "") if br else "") + ".")
    L.append("")
    L += speed_table(net)
    if net.get("gpu_note"):
        L += ["", f"{net['gpu_note']}."]
    return L + [""]


def speed_table(net: dict[str, Any]) -> list[str]:
    sp = net.get("speed") or []
    if not sp:
        return []
    precs = list(dict.fromkeys(r["precision"] for r in sp))
    batches = sorted({r["batch"] for r in sp})
    rows = []
    for b in dict.fromkeys(r["backend"] for r in sp):
        cells = []
        for p in precs:
            by = {r["batch"]: r for r in sp if r["backend"] == b and r["precision"] == p}
            err = next((r["error"] for r in by.values() if r.get("error")), None)
            cells.append("error" if err else " / ".join(_ips(by[n].get("images_per_s")) if n in by else "-"
                                                         for n in batches))
        rows.append([f"`{b}`"] + cells)
    head = ["images/s (batch " + " / ".join(map(str, batches)) + ")"] + [p.upper() for p in precs]
    return table(head, rows)


def appendix(res: dict[str, Any]) -> list[str]:
    net = res.get("network")
    if not net:
        return []
    L = ["", "### H. Network", ""]
    L += table(["what", "value"], [
        ["network", f"`{net['name']}`: {net['convolutions']} convolutions, {net['depthwise']} depthwise, input "
                    f"{'x'.join(map(str, net['input_shape']))}"],
        ["images", f"{net['evaluation_images']} evaluated ({net['labelled_images']} labelled)"
                   + (f", limited by --network-limit {net['limit']}" if net.get("limit") else "")
                   + f"; {net['calibration_images']} calibration images, disjoint"],
        ["accuracy backend", f"`{net.get('backend')}`: {net.get('backend_reason')}; batch {net['accuracy_batch']}"],
        ["scales", "one S: the power of two whose network agrees with FP32 most often on 8 calibration images; "
                   "maxabs: per tensor, input max per batch; per-channel kernel: one kernel scale per output "
                   "channel; calibrated: that, with the input scale from the 99.99th percentile of |x| over the "
                   "calibration images (docs/NETS.md)"],
        ["threshold", "Gaussian noise, std = level x (max - min of the layer's FP32 output on the batch), in every "
                      "convolution at once, levels 1e-4 ... 1 in quarter decades, seed 0"],
        ["naive INT8 by layer", "each layer alone at INT8 with per-tensor maxabs scales, the rest FP32"],
        ["time", f"{net['elapsed_s']:.3g} s" if net.get("elapsed_s") else "n/a"],
    ])
    if net.get("noise"):
        L += ["", "Noise in every layer:", ""]
        L += table(["injected NRMSE per layer"] + [_g(r["nrmse"]) for r in net["noise"]["table"]],
                   [["top-1 agreement"] + [_pct(r["agreement"]) for r in net["noise"]["table"]]])
    opts = [o for o in net.get("options", []) if o["precision"] == "int8"]
    i16 = _opt(net, "int16", "calibrated")
    alone = {a["layer"]: a for a in (net.get("naive_int8") or {}).get("alone", [])}
    if opts or alone:
        L += ["", "Per layer: isolated NRMSE (this layer quantized alone, FP32 inputs), and the network with only "
                  "this layer at per-tensor INT8:", ""]
        head = ["#", "layer", "kind"] + [f"INT8 {STRATEGY_NAMES[o['strategy']]}" for o in opts]
        head += ["INT16 calibrated"] if i16 else []
        head += ["alone: agreement / logits NRMSE"] if alone else []
        rows = []
        for Ly in net["layers"]:
            i = Ly["index"]
            r = [i, f"`{Ly['name']}`", Ly["kind"]] + [_g(o["isolated"][i]) for o in opts]
            r += [_g(i16["isolated"][i])] if i16 else []
            a = alone.get(Ly["name"])
            r += ([f"{_pct(a['agreement'])} / {_g(a['logits_nrmse'])}" + (" **breaks**" if a["breaks"] else "")]
                  if a else ["n/a"]) if alone else []
            rows.append(r)
        L += table(head, rows)
    sing = [o for o in net.get("options", []) if o["strategy"] == "single" and o.get("scale_reason")]
    if sing:
        L += ["", "One S per precision: " + "; ".join(f"{o['precision'].upper()} S={o['single_s']:g}" for o in sing)
              + " (" + sing[0]["scale_reason"].split(": ", 1)[-1] + ")."]
    return L
