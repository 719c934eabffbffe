"""The report's tables: the speed table of the body and the appendix (setup, every measurement,
the one peak table, sweeps, strategies, energy constants and loops, layers). Tables, not prose."""

from __future__ import annotations

import re
from typing import Any

from ..sweep import format_scale
from .config import ok
from .summary import headline

PEAK_NOTE = ("\\* above 100% of the measured peak: the instruction microbenchmark's best run saw a lower clock "
             "or more contention than this convolution's median did; the peak table (appendix C) is the one "
             "reference for every share.")


def fmt_time(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 1e-3:
        return f"{s * 1e6:.3g} us"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def fmt_num(v: Any, fmt: str = ".3g") -> str:
    return "n/a" if v is None else format(v, fmt)


def figure(res: dict[str, Any], name: str) -> list[str]:
    """A drawn plot's image line, or nothing where it was not drawn (--no-plots, an interrupted run):
    the report links no file that is not there."""
    drawn = any(p.get("name") == name for p in res.get("plots") or [])
    return [f"![{name}]({name}.png)", ""] if drawn else []


def see(res: dict[str, Any], name: str) -> str:
    """', see NAME.png' as a link where the plot was drawn, else nothing."""
    return f", see [{name}.png]({name}.png)" if figure(res, name) else ""


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]


def share_cell(m: dict[str, Any]) -> str:
    s = m.get("peak_share")
    if s is None:
        return ""
    return f"{s:.0%}" + ("\\*" if s > 1.0 else "")


def speed_table(res: dict[str, Any], headline_only: bool) -> list[str]:
    rows, over = [], False
    for m in res["measurements"]:
        if not ok(m) or (headline_only and not headline(m)):
            continue
        over |= (m.get("peak_share") or 0) > 1.0
        strat = m.get("scale_strategy")
        rows.append([f"`{m['layer']}`", m["backend"], m["precision"].upper() + ("" if headline_only or not strat
                                                                                 else f" ({strat})"),
                     fmt_time(m["phases_s"]["convolve"]["median"]), fmt_time(m["call_s"]["median"]), fmt_num(m.get("gops")),
                     fmt_num(m.get("speedup_vs_baseline"), ".3g") + "x" if m.get("speedup_vs_baseline") else "n/a",
                     share_cell(m), fmt_num(m.get("nrmse"))])
    out = table(["layer", "option", "precision", "convolve", "whole call", "G ops/s", "x baseline",
                  "% of measured peak", "NRMSE"], rows)
    if over:
        out += ["", PEAK_NOTE]
    return out


def energy_body(res: dict[str, Any]) -> list[str]:
    em = res["energy_model"]
    mem = ("HBM2's 3.9 pJ/bit (O'Connor et al. 2017) for the GPU's memory" if em.get("gpu_memory") == "hbm"
           else "1.3-2.6 nJ per 64-bit DDR access (Horowitz 2014)")
    return [f"The estimate multiplies each precision's multiply-add energy (45 nm, Horowitz 2014) by the MACs and "
            f"adds compulsory memory traffic at {mem}; constants and any measured loops are in appendix F."]


def render(res: dict[str, Any]) -> list[str]:
    M, C = res["machine"], res["config"]
    L = ["## Appendix", "", "### A. Setup", ""]
    bk = M.get("backends", {})
    L += table(["what", "value"], [
        ["machine", f"{M.get('cpu_model')}, {M.get('cpu_logical_cores')} logical cores, SIMD "
                    f"{'/'.join(M.get('cpu_simd') or []) or 'none'}; GPU {M.get('gpu') or 'none'}; {M.get('platform')}"],
        ["versions", ", ".join(f"{k} {v}" for k, v in (M.get("versions") or {}).items())],
        ["load average at start", ", ".join(f"{v:.2f}" for v in (M.get("load_average") or []))],
        ["command", f"`{res.get('command')}`" if res.get("command") else "(called from Python)"],
        ["options timed", ", ".join(f"`{b}`" for b in C["backends"])
         + (f" (baseline only: {', '.join(C.get('baseline_only') or [])})" if C.get("baseline_only") else "")],
        ["not available", "; ".join(f"`{k}`: {v['reason']}" for k, v in bk.items() if not v["available"]) or "none"],
        ["baseline", C.get("baseline_note") or "c-scalar FP32 (the assignment's Problem 1) for every batch"],
        ["precisions, batch, repeat", f"{', '.join(C['precisions'])}; batch {C['batch']}; {C['repeat']} timed runs "
                                      f"after {C['warmup']} warm-up, in rounds over the options, each timed run after "
                                      f"{C.get('warm_s', 0) * 1e3:.0f} ms of untimed calls"],
        ["integer scales timed", C["scale_for_integer_runs"]],
        ["sweep grid", ", ".join(f"{k} {v}" for k, v in (C.get("sweep") or {}).items())],
        ["reference points", res.get("reference_points_note") or f"{len(res.get('reference_points', []))} measured"],
        ["elapsed", fmt_time(res.get("elapsed_s"))],
    ])
    L += ["", "### B. Every measurement", ""] + speed_table(res, headline_only=False)
    errs: dict[str, list[str]] = {}
    for m in res["measurements"]:
        if m.get("error"):
            errs.setdefault(m["error"], []).append(f"{m['backend']} {m['precision']} {m.get('scale_strategy') or ''}".strip())
    if errs:
        L += ["", "Refused or failed:", ""]
        L += table(["options", "why"], [[", ".join(sorted(set(v))), k] for k, v in errs.items()])
    L += ["", "### C. Measured instruction peaks (the one peak table)", ""]
    pk = M.get("measured_peaks") or []
    L += table(["instruction", "threads", "G ops/s"], [[p["instruction"], p["threads"], fmt_num(p["gops"], ".4g")]
                                                        for p in pk]) if pk else ["No CPU peak measured here."]
    L.append("")
    L.append("The best of 5 runs of each microbenchmark at the start, 2 before each layer and 5 at the end "
             "(benchmarks/bench_cpu.py's method); GPU options use datasheet peaks named in results.json.")
    over = (res.get("summary") or {}).get("peak_shares_over_100") or []
    if over:
        L += ["", PEAK_NOTE, ""]
        L += table(["layer", "option", "precision", "share"], [[o["layer"], o["backend"], o["precision"],
                                                                  f"{o['share']:.0%}\\*"] for o in over])
    L += ["", "### D. Scale sweeps", ""]
    L += table(["layer", "precision", "rounding", "single-S candidates", "(s_x, s_w) pairs", "best S", "NRMSE",
                "best pair (s_x, s_w)", "wraps from", "saturates from", "all zero up to"],
                [[f"`{s['layer']}`", s["precision"], s["rounding"], len(s["rows"]), len(s["pair_rows"]) or "",
                  format_scale(s["best"]["s_x"]), fmt_num(s["best"]["nrmse"]),
                  f"{format_scale(s['best_pair']['s_x'])}, {format_scale(s['best_pair']['s_w'])}" if s.get("best_pair") else "",
                  format_scale(s["wrap_threshold"]) if s.get("wrap_threshold") else "never",
                  format_scale(s["saturation_threshold"]) if s.get("saturation_threshold") else "never",
                  format_scale(s["underflow_threshold"]) if s.get("underflow_threshold") else "never"]
                 for s in res["sweeps"]])
    L += ["", "### E. Scale strategies", ""]
    L += table(["layer", "precision", "strategy", "s_x", "s_w", "NRMSE", "effective bits", "wrapped", "how chosen"],
                [[f"`{s['layer']}`", s["precision"], s["strategy"], f"{s['s_x']:.4g}",
                  f"{s['s_w']:.4g}" + (f" ({s['s_w_range'][0]:.3g}..{s['s_w_range'][1]:.3g})" if s.get("s_w_range") else ""),
                  fmt_num(s["nrmse"]), fmt_num(s["effective_bits"], ".1f"), fmt_num(s["wrapped_fraction"], ".2g"),
                  _single_s_count(s["reason"].split(";")[0])] for s in res["strategies"]])
    L += ["", "### F. Energy", ""] + _energy_appendix(res)
    L += ["", "### G. Layers", ""]
    L += table(["layer", "input", "kernel (KH, KW, OC, IC)", "K", "GFLOP", "max abs x", "max abs w", "output range",
                 "overflow-free Q (int32/16/8)", "INT8 storage NRMSE x / w"],
                [[f"`{Ly['name']}`", tuple(Ly["input_shape"]), tuple(Ly["kernel_shape"]), Ly["k"],
                  f"{Ly['flops'] / 1e9:.3g}", f"{Ly['input_absmax']:.3g}", f"{Ly['kernel_absmax']:.3g}",
                  f"[{Ly['output_min']:.3g}, {Ly['output_max']:.3g}]",
                  "/".join(str(Ly["overflow_free_q"][p]) for p in ("int32", "int16", "int8")),
                  f"{Ly['input_int8_nrmse']:.3g} / {Ly['kernel_int8_nrmse']:.3g}"] for Ly in res["layers"]])
    return L


def _single_s_count(reason: str) -> str:
    """The sweep's 'among N candidates' counts single-S candidates (appendix D's column of that name)."""
    return re.sub(r"among (\d+) candidates", r"among \1 single-S candidates", reason)


def _energy_appendix(res: dict[str, Any]) -> list[str]:
    em = res["energy_model"]
    L = table(["constant", "value", "source"], [
        ["multiply-add per precision (pJ)", ", ".join(f"{k} {v:.3g}" for k, v in em["mac_pj"].items()),
         "Horowitz 2014 (int16 multiply " + em["int16_mult_note"] + ")"],
        ["DDR access", f"{em['dram_64bit_nj'][0]}-{em['dram_64bit_nj'][1]} nJ per 64 bits", "Horowitz 2014"],
        ["HBM access", f"{em['hbm_pj_per_bit']} pJ/bit", em["hbm_source"]],
        ["method", em["method"], ""],
    ])
    meters = res["machine"].get("energy_meters", {})
    L += ["", "Meters: " + "; ".join(f"{k.upper()} " + (f"available ({v['detail']})" if v["available"] else
                                                        f"not available ({v['detail']})") for k, v in meters.items())
          + ". Idle power measured in this run: "
          + (", ".join(f"{k.upper()} {v:.3g} W" for k, v in res.get("idle_power_w", {}).items()) or "none") + "."]
    loops = [m for m in res["measurements"] if ok(m) and m.get("energy_measured")]
    if loops:
        L += [""] + table(["layer", "option", "precision", "loop", "kernel share", "dynamic J per call",
                            "GOP/s per W", "verdict"],
                           [[f"`{m['layer']}`", m["backend"], m["precision"],
                             f"{m['energy_measured']['calls']} calls, {m['energy_measured']['seconds']:.2f} s",
                             f"{m['energy_measured']['kernel_share']:.0%}",
                             fmt_num(m["energy_measured"].get("dynamic_joules_per_call")),
                             fmt_num(m["energy_measured"].get("gops_per_watt")),
                             "measured" if m["energy_measured"].get("measured") else "no verdict (kernel < 50%)"]
                            for m in loops])
    return L
