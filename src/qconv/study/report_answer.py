"""report.md's answer section ("## The answer"): one bullet per question, each a function of
results.json's content through _Data. Per-layer facts come from layers whose records are complete."""

from __future__ import annotations

import math
from typing import Any, Iterable

from ..metrics import output_bits_nrmse
from ..sweep import format_scale
from . import report_network
from .appendix import fmt_num, fmt_time, see
from .config import BASELINE_ROUNDS, INT_PRECISIONS, PAIR, PER_CHANNEL, SINGLE, SINGLE_TRUNC, ok

t_, g_ = fmt_time, fmt_num


def S_(s: float | None) -> str:
    return "n/a" if s is None else format_scale(s)


def pct(f: float | None) -> str:
    """A share as a percentage with two significant digits ('0.0055%', '27%'); exact 0 as '0%'."""
    return "n/a" if f is None else "0%" if f == 0 else f"{100 * f:.2g}%"


def rng(values: Iterable[float | None], fmt: str = ".3g", suffix: str = "") -> str:
    """'1.2x' or '1.2-3.4x' over the given values (None skipped)."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return "n/a"
    lo, hi = format(min(v), fmt), format(max(v), fmt)
    return f"{lo}{suffix}" if lo == hi else f"{lo}-{hi}{suffix}"


def trng(values: Iterable[float | None]) -> str:
    """A range of times in one unit: '0.35-0.44 ms'."""
    v = [x for x in values if x is not None]
    if not v:
        return "n/a"
    unit, f = (("us", 1e6) if max(v) < 1e-3 else ("ms", 1e3) if max(v) < 1 else ("s", 1.0))
    return rng([x * f for x in v], ".3g", f" {unit}")


def times(r: list[float]) -> str:
    """'1.3-2.6x less' / 'x more' for ratios above / below one."""
    if not r:
        return "n/a"
    if min(r) >= 1:
        return rng(r, ".2g", "x less")
    if max(r) <= 1:
        return rng([1 / x for x in r], ".2g", "x more")
    return rng(r, ".2g", "x") + " as much"


class _Data:
    """Lookups over results.json that the sections share."""

    def __init__(self, res: dict[str, Any]) -> None:
        self.res = res
        self.S = res.get("summary") or {}
        self.partial = res.get("status") == "partial"
        self.requested = list((res.get("config") or {}).get("precisions") or [])
        self.single = {(r["layer"], r["precision"]): r for r in res.get("single_s", [])}
        self.strat = {(s["layer"], s["precision"], s["strategy"]): s for s in res.get("strategies", [])}
        names = [L["name"] for L in res["layers"]]
        # an interrupted run leaves its last layer unfinished: its K, range and timings stay out of the answer
        self.layers = [L for L in names if not self.partial or self._swept(L)]
        self.timed = [L for L in self.layers if not self.partial or self._timed(L)]
        self.unfinished = [L for L in names if L not in self.timed]
        self.records = [L for L in res["layers"] if L["name"] in self.layers]
        self.precs = [p for p in INT_PRECISIONS if any((L, p) in self.single for L in self.layers)]
        self.acc = self.S.get("acceptable_nrmse", output_bits_nrmse(8))
        self.net = report_network.present(res) and self.S.get("acceptable_source") == "network"

    def _swept(self, L: str) -> bool:
        """The layer's scale sweep finished for every requested integer precision."""
        return all((L, p) in self.single for p in INT_PRECISIONS if p in self.requested)

    def _timed(self, L: str) -> bool:
        """Every option of the layer ran all its timing rounds (baseline-only ones at most BASELINE_ROUNDS)."""
        C = self.res.get("config") or {}
        ms = [m for m in self.res["measurements"] if m["layer"] == L]
        want = C.get("repeat", 1)
        return bool(ms) and all(m.get("error") is not None and "interrupted" not in m["error"] or
                                ok(m) and m.get("repeat", 0) >= (min(want, BASELINE_ROUNDS)
                                                                 if m["backend"] in (C.get("baseline_only") or [])
                                                                 else want) for m in ms)

    def per_layer(self, p: str, key: str, layers: Iterable[str] | None = None) -> list[Any]:
        return [self.single[(L, p)][key] for L in (self.layers if layers is None else layers)
                if (L, p) in self.single]

    def pairs(self, p: str, num: str, den: str) -> list[tuple[float, float]]:
        """(num, den) NRMSE of each layer where both strategies ran; NRMSE 0 is a value, None is missing."""
        out = []
        for L in self.layers:
            a, b = self.strat.get((L, p, num)), self.strat.get((L, p, den))
            if a and b and a["nrmse"] is not None and b["nrmse"] is not None:
                out.append((a["nrmse"], b["nrmse"]))
        return out

    def ratio(self, p: str, num: str, den: str) -> list[float]:
        """num/den NRMSE per layer: 1 where both are exact (0), inf where only den is."""
        return [a / b if b else 1.0 if a == 0 else math.inf for a, b in self.pairs(p, num, den)]

    def laid(self) -> dict[str, dict[str, Any]]:
        """Summary per layer, for the layers whose timing finished."""
        return {n: v for n, v in (self.S.get("layers") or {}).items() if v and n in self.timed}

    def lay(self) -> list[dict[str, Any]]:
        return list(self.laid().values())

    def which_limit(self, precs: list[str], kind: str, layers: list[str]) -> str:
        """'every layer' or '`a`, `b`': where one of these precisions is limited by `kind`."""
        hit = [L for L in layers if any((self.single.get((L, p)) or {}).get("limit") == kind for p in precs)]
        return "every layer" if len(hit) == len(self.layers) else ", ".join(f"`{L}`" for L in hit)


def _partial_note(d: _Data) -> list[str]:
    """What an interrupted run left out of the answer."""
    if not d.partial or not d.unfinished:
        return []
    why = ", ".join(f"`{L}` (before its {'timing' if L in d.layers else 'scale sweep'} finished)"
                    for L in d.unfinished)
    return [f"- **Interrupted** before {why}: the answers below use only finished layers"
            + (f" ({', '.join(f'`{L}`' for L in d.timed)})" if d.timed else " (none)") + "."]


def _per_layer_s(d: _Data, p: str) -> str:
    parts = [f"{S_(d.single[(L, p)]['s_nearest'])}" + (f" (`{L}`)" if len(d.layers) > 1 else "")
             for L in d.layers if (L, p) in d.single]
    return ", ".join(parts)


def _not_run(d: _Data, what: str, precs: list[str]) -> str:
    """Why `what` has no figures: the run stopped first, or it was not asked for."""
    return (f"the run was interrupted before {what} finished" if d.partial and any(p in d.requested for p in precs)
            else f"{what} was not requested")


def _answer_scale(d: _Data) -> list[str]:
    if not d.precs:
        asked = [p.upper() for p in INT_PRECISIONS if p in d.requested]
        if asked and d.partial:
            return [f"- **Which S?** The run was interrupted before {'/'.join(asked)} finished on any layer, "
                    f"so there is no S to choose yet."]
        return ["- **Which S?** Only FP32 ran (no integer precision was requested), so there is no S to choose."
                if not asked else "- **Which S?** No integer precision was swept in this run, so there is no S."]
    out = []
    chosen = "; ".join(f"{p.upper()} S = {_per_layer_s(d, p)} (NRMSE {rng(d.per_layer(p, 'nrmse_nearest'))})"
                       for p in d.precs)
    out.append(f"- **Which S?** With one S for both tensors, as the assignment asks, the S with the lowest "
               f"NRMSE is: {chosen}.")
    common = {c["precision"]: c for c in d.res.get("common_s", [])}
    if len(d.layers) > 1 and common:
        out.append("  One S per precision for every layer (the assignment's program takes none) would be "
                   + ", ".join(f"{p.upper()} {S_(common[p]['s'])}" for p in d.precs if p in common)
                   + f", at most {rng([common[p]['worst_ratio'] for p in d.precs if p in common], '.2g', 'x')} "
                     f"the error of each layer's own best S.")
    # a limit costs nothing where the chosen S is exact (NRMSE 0): those layers explain nothing
    lossy = {p: [L for L in d.layers if (d.single.get((L, p)) or {}).get("nrmse_nearest") != 0] for p in d.precs}
    exact = [L for L in d.layers if all(L not in lossy[p] for p in d.precs)]
    wrap_p = [p for p in d.precs if "wrap-around" in d.per_layer(p, "limit", lossy[p])]
    clip_p = [p for p in d.precs if "clipping" in d.per_layer(p, "limit", lossy[p])]
    if exact:
        out.append(f"  On {', '.join(f'`{L}`' for L in exact)} every precision's best S gives NRMSE 0 "
                   f"(the output is exact), so no limit costs anything there.")
    if wrap_p:
        wl = [L for L in d.layers if any(L in lossy[p] for p in wrap_p)]
        ratios = [r for p in wrap_p for r in d.per_layer(p, "wrap_over_bound", lossy[p])]
        out.append(f"  Why: for {' and '.join(p.upper() for p in wrap_p)} the int32 accumulator sets the limit "
                   f"on {d.which_limit(wrap_p, 'wrap-around', wl)}: above the chosen S, sums wrap around"
                   + (f", {rng(ratios, '.2g', 'x')} above the worst-case bound K·max|q_x|·max|q_w| <= 2^31-1, "
                      f"since products of both signs cancel" if ratios else "") + ".")
    if clip_p:
        parts, hit = [], set()
        for p in clip_p:
            rows = [r for L in lossy[p] for r in [d.single.get((L, p))] if r and r["limit"] == "clipping"]
            hit |= {r["layer"] for r in rows}
            parts.append(f"{p.upper()} clips {rng([r['input_clipped_fraction'] * 100 for r in rows], '.2g', '%')} "
                         f"of the inputs while its weights reach only ±{rng([r['kernel_qmax'] for r in rows], 'd')} "
                         f"({rng([r['kernel_zero_fraction'] * 100 for r in rows], '.2g', '%')} round to 0)")
        ratio = [L["input_absmax"] / L["kernel_absmax"] for L in d.records
                 if L["name"] in hit and L["kernel_absmax"] > 0 and L["input_absmax"] > 0]
        apart = ratio and max(max(ratio), 1 / min(ratio)) >= 4  # one S serves ranges within 4x of each other
        out.append(f"  {'Elsewhere' if wrap_p else 'Why'}, clipping stops S: at the best S " + "; ".join(parts)
                   + (f". The input's range is {rng(ratio, '.3g', 'x')} the kernel's"
                      + (", which one S cannot serve" if apart else "") if ratio else "")
                   + f"{see(d.res, 'histograms')}.")
    ks = [L["k"] for L in d.records]
    bits = "; ".join(f"{p.upper()} {rng(d.per_layer(p, 'accumulator_bits_worst_case'), 'd')}" for p in d.precs)
    out.append(f"  The worst case needs 2n + log2(C·KH·KW) accumulator bits (K = {rng(ks, 'd')}): {bits}; "
               f"int32 holds INT8 at any S, the wider operands only at small S.")
    return out


def _answer_on_top(d: _Data) -> list[str]:
    if not d.precs:
        return ["- **What comes on top?** Nothing to compare: "
                + ("the run was interrupted before any integer precision finished"
                   if d.partial and any(p in d.requested for p in INT_PRECISIONS) else
                   "no integer precision was requested") + ", so there are no scales."]
    parts = []
    exact = sum(all(s["nrmse"] == 0 for k, s in d.strat.items() if k[:2] == (L, p))
                for L in d.layers for p in d.precs if (L, p, SINGLE) in d.strat)
    for key, what in ((PAIR, "separate input and kernel scales"), (PER_CHANNEL, "a kernel scale per output channel")):
        pr = [x for p in d.precs for x in d.pairs(p, SINGLE, key)]
        r = [a / b for a, b in pr if a > 0 and b > 0]     # single S over this strategy, neither exact
        zero = sum(a > 0 and b == 0 for a, b in pr)       # this strategy exact where one S is not
        worse = sum(a == 0 and b > 0 for a, b in pr)      # one S exact, this strategy not
        txt = ""
        if r:  # a ratio below 1 is an error that grew (a wider precision already at its float32 floor)
            txt = (f"{what} cut the error {rng(r, '.2g', 'x')}" if min(r) >= 1 else
                   f"{what} changed the error by {rng(r, '.2g', 'x')} (below 1x: it grew)")
        elif zero or worse:
            txt = f"{what}"
        txt += f"{',' if r else ''} reaching NRMSE 0 in {zero} case(s)" if zero else ""
        txt += f"{',' if r or zero else ''} adding error in {worse} case(s) where one S is exact" if worse else ""
        if txt:
            parts.append(txt)
    pr = [x for p in d.precs for x in d.pairs(p, SINGLE_TRUNC, SINGLE)]
    tr = [a / b for a, b in pr if b > 0]
    if parts:
        txt = "- **What comes on top?** Against one rounded S, " + "; ".join(parts)
    elif exact:
        txt = "- **What comes on top?** Nothing: one S is already exact (NRMSE 0), as is every other strategy"
    else:
        txt = "- **What comes on top?** Only the single S was evaluated"
    if tr:
        txt += (f"; truncation, the assignment's (int) cast, costs {rng(tr, '.2g', 'x')} the error of rounding "
                f"at its own best S, since it biases every value toward zero")
    if exact and parts:
        txt += f" ({exact} layer-precision case(s) are exact, NRMSE 0, with every scale)"
    i8 = [d.strat.get((L, "int8", PER_CHANNEL)) for L in d.layers]
    i8 = [s["nrmse"] for s in i8 if s and s["nrmse"] is not None]
    if i8:
        txt += f". INT8 with per-channel scales reaches NRMSE {rng(i8)}"
    return [txt + f" (table below{see(d.res, 'nrmse')})."]


def _name(o: dict[str, Any]) -> str:
    s = o.get("scale_strategy")
    return f"{o['backend']} {o['precision'].upper()}" + ("" if s in (None, SINGLE) else f" {s}")


def _call(m: dict[str, Any]) -> float:
    return (m.get("call_s") or m["total_s"])["median"]


def _answer_best(d: _Data) -> list[str]:
    laid = d.laid()
    if not laid:
        return ["- **Best option?** " + ("The run was interrupted before any layer's timing finished."
                                          if d.partial else "Nothing was timed.")]
    lay = list(laid.values())

    def who(key: str, t: str | None = None) -> str:
        opts = {n: _name(v[key]) if key != "recommended" else f"{v[key]['backend']} {v[key]['precision'].upper()}"
                for n, v in laid.items() if v.get(key)}
        if not opts:
            return "none"
        when = f" ({trng([v[key][t] for v in lay if v.get(key)])})" if t else ""
        if len(set(opts.values())) == 1:
            return f"**{next(iter(opts.values()))}**{when}"
        return ", ".join(f"**{o}** (`{n}`)" for n, o in opts.items()) + when
    rec = [v["recommended"] for v in lay if v.get("recommended")]
    base = sorted({v["baseline"]["backend"] for v in lay if v.get("baseline")})
    speed = [v["fastest"]["speedup_vs_baseline"] for v in lay if v["fastest"].get("speedup_vs_baseline")]
    bar = (f"within the NRMSE the network tolerates (<= {d.acc:.3g}, measured below)" if d.net else
           f"with at least 8 effective output bits (NRMSE <= {d.acc:.3g})")
    ties = {n: [_name(o) for o in v.get("fastest_tied_with") or []] for n, v in laid.items()}
    tied = sorted({t for ts in ties.values() for t in ts})
    tie_txt = ""
    if tied:  # the summary's own test: interquartile ranges of the convolve phase overlap
        tie_txt = ("; statistically tied with " + (", ".join(tied) if len(d.timed) == 1 else "; ".join(
            f"{', '.join(ts)} on `{n}`" for n, ts in ties.items() if ts)) + " (their convolve-phase interquartile "
            "ranges overlap)")
    same = all(_name(v["fastest_call"]) == _name(v["fastest"]) for v in lay)
    call = ("the same option is fastest over the whole call, as a caller times it "
            f"({trng([v['fastest_call']['call_s'] for v in lay])})" if same else
            f"over the whole call, as a caller times it, the fastest is {who('fastest_call', 'call_s')}")
    out = [f"- **Best option?** By the convolve phase, the fastest is {who('fastest', 'convolve_s')} at NRMSE "
           f"{rng([v['fastest']['nrmse'] for v in lay])}"
           + (f", {rng(speed, '.3g', 'x')} the {'/'.join(base)} FP32 baseline's convolve phase" if speed and base
              else " (no FP32 baseline was measured)")
           + f"{tie_txt}; {call}. "
           + f"Fastest convolve phase {bar}: {who('recommended')}"
           + (f" ({trng([r['convolve_s'] for r in rec])})" if rec else "")]
    better = [(n, v["recommended_any_scale"]) for n, v in laid.items() if v.get("recommended_any_scale")
              and v["recommended_any_scale"]["convolve_s"] < (v.get("recommended") or {}).get("convolve_s", math.inf)]
    if better:  # the single-S bar above is the assignment's; other scale strategies may clear it faster
        out[0] += ("; with any scale strategy: " + ", ".join(
            f"**{o['backend']} {o['precision'].upper()} {o['scale_strategy']}** ({t_(o['convolve_s'])}"
            + (f", `{n}`" if len(d.timed) > 1 else "") + ")" for n, o in better))
    out[0] += "."
    refs = [p for v in lay for p in v.get("reference_faster", [])]
    if refs:
        out.append("  A reference point beats qconv's fastest whole call: "
                   + ", ".join(f"{p['name']} on `{p['layer']}` ({t_(p['call_s']['median'])}, NRMSE {g_(p['nrmse'])})"
                               for p in refs) + ".")
    return out


def _answer_factors(d: _Data) -> list[str]:
    # every scale strategy, as Best option?'s "with any scale strategy" (single-S alone contradicted it)
    hw, calls, compared = [], [], 0
    for name, v in d.laid().items():
        mine = [m for m in d.res["measurements"] if ok(m) and m["layer"] == name]
        ints = [m["phases_s"]["convolve"]["median"] for m in mine if m["precision"] != "fp32"]
        if v.get("best_fp32") and ints:
            compared += 1
            if min(ints) < v["best_fp32"]["convolve_s"]:
                hw.append(v["best_fp32"]["convolve_s"] / min(ints))
            calls.append(min(_call(m) for m in mine if m["precision"] == "fp32")
                         / min(_call(m) for m in mine if m["precision"] != "fp32"))
    fp32_timed = any(v.get("best_fp32") for v in d.lay())
    where = f" on {len(hw)} of {compared} layers" if 0 < len(hw) < compared else ""
    whole = "."
    if calls:  # the whole call adds quantizing the input and dequantizing the output around the kernel
        whole = ("; over the whole call the fastest integer option is "
                 + (f"{rng(calls, '.3g', 'x')} faster than" if min(calls) >= 1 else
                    f"{rng([1 / c for c in calls], '.3g', 'x')} slower than" if max(calls) < 1 else
                    f"{rng(calls, '.3g', 'x')} as fast as") + " FP32's fastest.")
    txt = ("- **What decides it?** The datapath first: " +
           (f"in the convolve phase the fastest integer option, with any scale strategy, runs {rng(hw, '.2g', 'x')} "
            f"faster than the fastest FP32 one{where} (Speed says why)" + whole if hw else
            "no integer option, with any scale strategy, beats FP32's convolve phase here" + whole
            if fp32_timed else
            f"{_not_run(d, 'FP32', ['fp32'])}, so how much the integer datapath buys is not measured.")
           + " Then the accuracy target, the layer's K (it sets where int32 wraps) and what the whole call "
             f"adds around the kernel (quantizing the input{see(d.res, 'phases')}).")
    return [txt]


def _clears(d: _Data, vals: list[float]) -> str:
    """One rule for every precision: 'clears it' only where every layer does."""
    k = sum(v <= d.acc for v in vals)
    return ("clears it" if k == len(vals) else "misses it" if k == 0 else
            f"clears it on {k} of {len(vals)} layers only") + f" ({rng(vals)})"


def _answer_acceptable(d: _Data) -> list[str]:
    if d.net:
        return report_network.answer_acceptable(d.res, {p: d.per_layer(p, "nrmse_nearest") for p in ("int8", "int16")
                                                         if p in d.precs})
    fp = [m["nrmse"] for m in d.res["measurements"]
          if ok(m) and m["precision"] == "fp32" and m.get("nrmse") is not None and m["layer"] in d.timed]
    one = d.per_layer("int8", "nrmse_nearest") if "int8" in d.precs else []
    pair = [s["nrmse"] for L in d.layers for s in [d.strat.get((L, "int8", PAIR))] if s and s["nrmse"] is not None]
    txt = ("- **Is naive quantization justified?** "
           + (f"FP32 itself sits at NRMSE {rng(fp)} against float64. " if fp else "")
           + f"Take the output's own 8-bit step, NRMSE {d.acc:.3g}, as the bar: an 8-bit next layer cannot see less. ")
    sixteen = d.per_layer("int16", "nrmse_nearest") if "int16" in d.precs else []
    if sixteen:
        txt += f"INT16 with one S {_clears(d, sixteen)}. "
    if one:
        good = all(v <= d.acc for v in one)
        txt += (f"INT8 with one S {_clears(d, one)}"
                + (f"; with separate scales it reaches {rng(pair)}" if pair else "") + ". "
                + ("Naive INT8 holds up on these layers; Jacob et al. (2018) and Krishnamoorthi (2018) add "
                   "per-tensor and per-channel scales for the layers where it does not. " if good else
                   "Naive single-S INT8 is therefore not justified; per-tensor (Jacob et al. 2018) and "
                   "per-channel scales (Krishnamoorthi 2018) are the cheap fix. "))
    elif "int8" in d.requested and d.partial:
        txt += f"INT8 has no verdict: {_not_run(d, 'INT8', ['int8'])}. "
    txt += report_network.fallback_note(d.res)
    return [txt]
