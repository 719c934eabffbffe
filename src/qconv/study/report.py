"""report.md: the answer first, then the evidence; every number comes from results.json.

The body (everything before "## Appendix") keeps its prose under config.BODY_WORD_LIMIT words
(tables and figures are not prose); the appendix (appendix.py) holds the rest. Per-layer facts
go into tables, never into one sentence repeated per layer.
"""

from __future__ import annotations

import re
from typing import Any

from . import appendix, report_network
from .appendix import figure, fmt_num, fmt_time, table
from .config import INT_PRECISIONS, MAXABS, PAIR, PER_CHANNEL, SINGLE, SINGLE_TRUNC, ok
from .report_answer import (S_, _answer_acceptable, _answer_best, _answer_factors, _answer_on_top,
                            _answer_scale, _Data, _partial_note, pct, rng, times)
from .summary import headline

t_, g_ = fmt_time, fmt_num

SOURCES = [
    "M. Horowitz, \"Computing's energy problem (and what we can do about it)\", ISSCC 2014, "
    "doi:10.1109/ISSCC.2014.6757323 — per-operation and DRAM energies (45 nm).",
    "B. Jacob et al., \"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only "
    "Inference\", CVPR 2018, arXiv:1712.05877 — per-tensor scales, int32 accumulation.",
    "R. Krishnamoorthi, \"Quantizing deep convolutional networks for efficient inference: A whitepaper\", "
    "arXiv:1806.08342, 2018 — per-channel weight scales, post-training INT8 accuracy.",
    "M. O'Connor et al., \"Fine-Grained DRAM: Energy-Efficient DRAM for Extreme Bandwidth Systems\", "
    "MICRO 2017, doi:10.1145/3123939.3124545 — HBM2 access energy (used for GPUs with HBM).",
]


def body_words(md: str) -> int:
    """Words of prose in the body: lines before '## Appendix' that are not tables, figures or headings."""
    body = md.split("\n## Appendix", 1)[0]
    words = 0
    for line in body.splitlines():
        s = line.strip()
        if not s or s.startswith(("|", "![", "#")):
            continue
        words += len(re.findall(r"\S+", s))
    return words


def _energy_line(d: _Data) -> list[str]:
    lay = d.lay()
    meters = d.res["machine"].get("energy_meters", {})
    loops = sum(v.get("energy_loops", 0) for v in lay)
    measured = [v["energy_best_measured"] for v in lay if v.get("energy_best_measured")]
    est = []
    for L in d.timed:
        e = {m["precision"]: m["energy_estimate_j"] for m in d.res["measurements"]
             if m["layer"] == L and ok(m) and headline(m)}
        if "fp32" in e and "int8" in e:
            est.append(e["fp32"]["total_j"] / e["int8"]["total_j"])
    txt = "- **Does energy change it?** "
    txt += f"By the per-operation estimate INT8 spends {times(est)} than FP32 per convolution. " if est else ""
    same = [v for v in lay if v.get("recommended") and v.get("energy_best_estimate_acceptable")]
    agree = [v for v in same if v["recommended"]["precision"] == v["energy_best_estimate_acceptable"]["precision"]]
    if same:
        within = "Among options within the acceptable NRMSE" if d.net else "Among options with at least 8 effective bits"
        txt += (f"{within}, the cheapest precision by the estimate is the one the "
                "fastest uses, so energy does not change the answer" if len(agree) == len(same) else
                f"{within}, the estimate favours a different precision than speed "
                f"on {len(same) - len(agree)} of {len(same)} layer(s), so energy can change the answer") + ". "
    if measured:
        txt += ("Measured (dynamic energy, idle subtracted, kernel at least half of a loop of at least 1 s): the "
                "least per call is " + ", ".join(f"{m['backend']} {m['precision'].upper()} "
                                               f"({m['dynamic_joules_per_call'] * 1e3:.3g} mJ)" for m in measured) + ".")
    elif loops:
        txt += ("Energy loops ran, but in none did the kernel fill half the loop, so no measured verdict is "
                "given (appendix F).")
    else:
        txt += "No energy meter is readable here (" + ", ".join(k.upper() for k in meters) + "), so nothing is measured."
    return [txt]


def _names(d: _Data) -> list[str]:
    """Every layer with a record, finished or not: the tables show all that was measured."""
    return [L["name"] for L in d.res["layers"]]


def _int_precs(d: _Data) -> list[str]:
    return [p for p in INT_PRECISIONS if any(k[1] == p for k in d.single)]


def _single_s_tables(d: _Data) -> list[str]:
    out = []
    for L in _names(d):
        rows = []
        for p in _int_precs(d):
            r = d.single.get((L, p))
            if r is None:
                continue
            bits = f"{r['accumulator_bits_worst_case']}" + (f" ({r['accumulator_bits_at_s']} at S)"
                                                             if r.get("accumulator_bits_at_s") else "")
            rows.append([p.upper(), S_(r["s_nearest"]), S_(r["s_truncate"]),
                         f"{g_(r['nrmse_nearest'])} / {g_(r['nrmse_truncate'])}",
                         f"{r['limit']}: {r['limit_detail']}", pct(r["input_clipped_fraction"]),
                         f"{r['kernel_levels_used']} (|q| <= {r['kernel_qmax']}, {pct(r['kernel_zero_fraction'])} zero)",
                         bits])
        if not rows:  # no empty table: say why there is none
            continue
        out.append(f"**`{L}`** — one S for both tensors")
        out.append("")
        out += table(["precision", "S (nearest)", "S (truncate)", "NRMSE nearest / truncate", "what limits S",
                      "inputs clipped", "kernel levels used", "accumulator bits (2n+log2 K)"], rows)
        out.append("")
    if not out:
        asked = [p.upper() for p in INT_PRECISIONS if p in d.requested]
        out = [("No layer finished an integer precision's scale sweep before the run was interrupted"
                if asked and d.partial else "FP32 only: no integer precision ran, so there is no S")
               + " (FP32's figures are under Speed).", ""]
    return out


def _on_top_table(d: _Data) -> list[str]:
    rows = []
    for L in _names(d):
        for p in _int_precs(d):
            if not any(k[:2] == (L, p) for k in d.strat):
                continue
            cells = [d.strat.get((L, p, k)) for k in (SINGLE, SINGLE_TRUNC, PAIR, MAXABS, PER_CHANNEL)]
            rows.append([f"`{L}`", p.upper()] + [g_(c["nrmse"]) if c else "n/a" for c in cells])
    if not rows:
        return ["No scale strategy was evaluated (no integer precision ran)."]
    return table(["layer", "precision", "one S (nearest)", "one S (truncate)", "best pair", "maxabs",
                  "maxabs per channel"], rows)


def _speed(d: _Data) -> list[str]:
    out = []
    sc = {}
    for m in d.res["measurements"]:
        if ok(m) and m["backend"] == "c-scalar" and headline(m):
            sc.setdefault(m["layer"], {})[m["precision"]] = m["phases_s"]["convolve"]["median"]
    r = [v["fp32"] / v[p] for v in sc.values() if "fp32" in v for p in INT_PRECISIONS if p in v]
    if r and min(r) > 1:
        out.append(f"Even without SIMD, scalar C integer runs {rng(r, '.2g', 'x')} faster than scalar C FP32. "
                   f"The scalar loop sums into one accumulator: FP32 addition is not associative, so the compiler "
                   f"keeps the order and each multiply-add waits for the previous result (3-4 cycles of FP "
                   f"latency on current x86 cores), while the integer chain adds in one cycle. Integer arithmetic can pay off without a wider datapath; a wider "
                   f"one (VNNI, dp4a, tensor cores) multiplies the gain.")
    call = [v["fastest"]["call_s"] / v["fastest"]["convolve_s"] for v in d.lay() if v["fastest"]["convolve_s"] > 0]
    if call:
        out.append(f"The whole call, prepared once and timed from outside, takes {rng(call, '.2g', 'x')} the "
                   f"fastest option's convolve phase.")
    shares = [m["peak_share"] for m in d.res["measurements"] if ok(m) and m.get("peak_share")]
    if shares:
        over = d.S.get("peak_shares_over_100") or []
        out.append(f"Kernels reach {rng([s * 100 for s in shares], '.0f', '%')} of their instruction's measured "
                   f"peak (one table, appendix C)" + (f"; {len(over)} share(s) above 100% are explained there"
                                                      if over else "") + ".")
    refs = d.res.get("reference_points", [])
    if refs:
        out.append("Reference points from the same run (libraries, not qconv): "
                   + "; ".join(f"{p['name']} on `{p['layer']}` {t_(p['call_s']['median'])}, NRMSE {g_(p['nrmse'])}"
                               for p in refs) + ".")
    else:
        out.append(f"No library reference point: {d.res.get('reference_points_note') or 'none measured'}.")
    return out


def render(res: dict[str, Any]) -> str:
    d = _Data(res)
    M = res["machine"]
    L: list[str] = ["# qconv study: what naive quantization buys and costs", ""]
    if res["status"] != "complete":
        L += [f"> **Partial results** — {res.get('partial_reason')}. Numbers below cover only what was measured.", ""]
    L += [f"{M.get('cpu_model')}, {M.get('cpu_logical_cores')} logical cores; GPU: {M.get('gpu') or 'none'}; "
          f"batch {res['config']['batch']}; {len(_names(d))} layer(s); generated {M['date']} from results.json "
          f"(schema v{res['schema_version']}). Setup and every table in the appendix.", ""]
    L += ["## The answer", ""]
    L += _partial_note(d) + _answer_scale(d) + _answer_on_top(d) + _answer_best(d) + _answer_factors(d) + _energy_line(d)
    L += _answer_acceptable(d)
    L += ["", "## One S per precision", ""] + figure(res, "vcurve") + figure(res, "histograms")
    L += _single_s_tables(d)
    L += ["## What scales and rounding buy", ""] + figure(res, "nrmse") + _on_top_table(d) + [""]
    L += report_network.body(res)
    L += ["## Speed", ""] + figure(res, "speedup") + appendix.speed_table(res, headline_only=True) + [""]
    L += _speed(d) + [""] + figure(res, "pareto") + figure(res, "phases")
    L += ["## Energy", ""] + figure(res, "energy") + appendix.energy_body(res) + [""]
    L += ["## Sources", ""] + [f"- {s}" for s in SOURCES] + [""]
    L += appendix.render(res) + report_network.appendix(res)
    return "\n".join(L) + "\n"
