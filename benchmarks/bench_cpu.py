"""Benchmark the CPU backends (c-scalar, c-avx2) on the assignment's layers and the real layers.

    python3 benchmarks/bench_cpu.py [--repeat 15] [--write]

For each layer (exam cases 1 and 2 at N=1 and N=8, then every ../shared/data/real layer at N=1),
backend and precision: median convolve time (the C timer around the compute region), GOP/s
(2*N*H*W*OC*KH*KW*IC per second), the ratio to the peak of the path's instruction measured by
qconv_peak() in this same run (best of several runs, same thread count), the speedup over the
c-scalar FP32 baseline, 2-thread over 1-thread scaling, and quantize+dequantize time as a share
of the convolution. --write replaces the "CPU backends" section of benchmarks/RESULTS.md (from its
heading to the CUDA section marker) with the tables.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from qconv.backends import _cext, c_avx2, c_scalar  # noqa: E402
from qconv.contract import Precision  # noqa: E402
from layers import exam_layers, real_layers  # noqa: E402

QMAX = {"int32": 2**31 - 1, "int16": 2**15 - 1, "int8": 127}
PRECISIONS = ("fp32", "int32", "int16", "int8")
NOTES = "### Notes (hand-written"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def cpu_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over `interval` seconds (from /proc/stat), or 0.0 off Linux."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    try:
        t0, i0 = snap()
        import time
        time.sleep(interval)
        t1, i1 = snap()
    except OSError:
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_idle(limit_s: float, threshold: float = 0.15) -> float:
    """Wait (up to limit_s) until other processes leave the CPUs mostly idle; returns the last
    busy fraction seen, which the report records."""
    import time
    t_end = time.monotonic() + limit_s
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < t_end:
        busy = cpu_busy()
    return busy


def instruction(isa: str, precision: str) -> str:
    """The instruction the backend declares bounds this level's kernels ("-": none measured)."""
    bound = (c_scalar.bound_instruction({}, Precision(precision)) if isa == "scalar"
             else c_avx2.bound_instruction({"isa": isa}, Precision(precision)))
    return bound[0] if bound and bound[1] == 1 else "-"   # byte-decomposed paths (AMX INT16/32): not yet


def measure_peaks(threads: list[int], levels: list[str], tries: int = 5) -> dict[tuple[str, int], float]:
    """G MAC/s per (instruction, threads) of the instructions these levels declare: the best of
    `tries` runs of about 50 ms."""
    instrs = sorted({instruction(isa, p) for isa in levels for p in PRECISIONS} - {"-"})
    peaks = {}
    for ins in instrs:
        for t in threads:
            macs, secs = _cext.peak(ins, t, 1000)
            iters = max(1000, int(1000 * 0.05 / max(secs, 1e-6)))
            rates = []
            for _ in range(tries):
                macs, secs = _cext.peak(ins, t, iters)
                rates.append(macs / secs / 1e9)
            peaks[(ins, t)] = max(rates)
    return peaks


def layers() -> list[tuple[str, np.ndarray, np.ndarray]]:
    out = []
    for L in exam_layers():
        name = L.name.replace("exam", "exam ")
        out += [(name, L.x, L.w), (name, np.ascontiguousarray(np.repeat(L.x, 8, axis=0)), L.w)]
    return out + [(L.name, L.x, L.w) for L in real_layers()]


def _proc_busy_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(t) for t in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def foreign_load(fn):
    """Run fn(); return (its result, the share of all CPUs that *other* processes used meanwhile):
    busy CPU time from /proc/stat minus this process's own CPU time (all its threads)."""
    try:
        b0, t0 = _proc_busy_jiffies()
    except OSError:
        return fn(), float("nan")
    c0 = sum(os.times()[:2])
    out = fn()
    b1, t1 = _proc_busy_jiffies()
    c1 = sum(os.times()[:2])
    hz = os.sysconf("SC_CLK_TCK")
    other = (b1 - b0) / hz - (c1 - c0)
    return out, max(0.0, other / max(1e-9, (t1 - t0) / hz))


def time_conv(precision, isa, threads, x, w, repeat):
    if precision == "fp32":
        s_x = s_w = inv = 1.0
    else:
        s_x = np.float32(QMAX[precision] / 2 / float(np.max(np.abs(x))))
        s_w = np.float32(QMAX[precision] / 2 / float(np.max(np.abs(w))))
        inv = np.float32(1.0 / (float(s_x) * float(s_w)))
    _cext.conv2d(precision, isa, threads, False, s_x, s_w, inv, x, w)  # warm-up
    runs, other = foreign_load(
        lambda: [_cext.conv2d(precision, isa, threads, False, s_x, s_w, inv, x, w)[1] for _ in range(repeat)])
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    return {"convolve": med("convolve"), "qdq": statistics.median(r["quantize"] + r["dequantize"] for r in runs),
            "pack": med("pack"), "isa": runs[0]["isa"], "other": other}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15, help="timed calls per configuration (median)")
    ap.add_argument("--scalar-repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5,
                    help="sweeps over all c-avx2 configurations; per configuration the lowest median is kept")
    ap.add_argument("--threads", type=int, default=2, help="the multi-thread count (compared with 1)")
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    ap.add_argument("--wait-idle", type=float, default=20.0,
                    help="before each layer, wait up to this many seconds for other load to go")
    args = ap.parse_args()
    if _cext.load_error():
        sys.exit(_cext.load_error())
    nt = args.threads
    best = _cext.best_isa("auto")
    busy_seen = [wait_idle(args.wait_idle)]
    configs = [("c-scalar", "scalar", [1])] + [("c-avx2", best, [1, nt])]
    if best != "avx2":
        configs.append(("c-avx2", "avx2", [1, nt]))
    levels = [isa for _, isa, _ in configs]
    peaks = measure_peaks([1, nt], levels)
    # Sweeps: every sweep measures every (layer, config, precision, threads) once (a median of
    # --repeat calls); the kept value is the lowest median over the sweeps. Sweeps spread each
    # configuration's samples over the whole run, so a burst of load from other tenants of this
    # shared machine spoils one sample of many configurations rather than all samples of one.
    data = layers()
    best_res: dict = {}
    for sweep in range(args.rounds):
        for li, (name, x, w) in enumerate(data):
            busy_seen.append(wait_idle(args.wait_idle))
            more = measure_peaks([1, nt], levels, tries=2)  # peaks sampled throughout too: keep the best
            peaks = {k: max(v, more[k]) for k, v in peaks.items()}
            for backend, isa, tlist in configs:
                if backend == "c-scalar" and sweep > 0:
                    continue  # the scalar baseline is measured once
                for prec in PRECISIONS:
                    if backend == "c-avx2" and isa == "avx2" and best != "avx2" and prec in ("fp32", "int32"):
                        continue  # the same kernels as the best family
                    for t in tlist:
                        r = time_conv(prec, isa, t, x, w, args.scalar_repeat if isa == "scalar" else args.repeat)
                        key = (li, backend, isa, prec, t)
                        if key not in best_res or r["convolve"] < best_res[key]["convolve"]:
                            best_res[key] = r
            print(f"sweep {sweep + 1}/{args.rounds}: {name} N={x.shape[0]} done", flush=True)
    rows = []
    for li, (name, x, w) in enumerate(data):
        n = x.shape[0]
        flops = 2 * n * x.shape[1] * x.shape[2] * w.shape[2] * w.shape[0] * w.shape[1] * w.shape[3]
        base = None
        for backend, isa, tlist in configs:
            for prec in PRECISIONS:
                if (li, backend, isa, prec, tlist[0]) not in best_res:
                    continue
                res = {t: best_res[(li, backend, isa, prec, t)] for t in tlist}
                t_hi = max(tlist)
                r = res[t_hi]
                gops = flops / r["convolve"] / 1e9
                if backend == "c-scalar" and prec == "fp32":
                    base = r["convolve"]
                ins = instruction(isa, prec)
                rows.append({
                    "layer": name, "shape": f"{tuple(x.shape)} * {tuple(w.shape)}", "n": n,
                    "backend": backend, "isa": r["isa"], "precision": prec, "threads": t_hi,
                    "ms": r["convolve"] * 1e3, "gops": gops, "instr": ins, "peak_pct": None,
                    "speedup": base / r["convolve"] if base else None,
                    "scaling": res[1]["convolve"] / r["convolve"] if len(tlist) > 1 else None,
                    "qdq_pct": None if prec == "fp32" else 100 * r["qdq"] / r["convolve"],
                    "other_pct": 100 * max(v["other"] for v in res.values()),
                    "gops1": flops / res[1]["convolve"] / 1e9,
                    "peak1_pct": None,
                })
    late = measure_peaks([1, nt], levels)  # peaks again at the end: the best of both is the peak
    peaks = {k: max(v, late[k]) for k, v in peaks.items()}
    for row in rows:
        peak = peaks.get((row["instr"], row["threads"]))
        if peak is not None:
            row["peak_pct"] = 100 * row["gops"] / (2 * peak)
        peak1 = peaks.get((row["instr"], 1))
        if peak1 is not None:
            row["peak1_pct"] = 100 * row["gops1"] / (2 * peak1)
    args.busy = max(busy_seen)
    args.load = os.getloadavg()
    text = render(rows, peaks, nt, best, args)
    print(text)
    if args.write:
        path = REPO / "benchmarks" / "RESULTS.md"
        doc = path.read_text()
        head = "## CPU backends (c-scalar, c-avx2)"
        marker = "<!-- CUDA section"
        a, b = doc.index(head), doc.index(marker)
        # A hand-written "### Notes" subsection, if present, survives the rewrite.
        old = doc[a:b]
        notes = old[old.index(NOTES):].rstrip() + "\n\n" if NOTES in old else ""
        path.write_text(doc[:a] + text.rstrip() + "\n\n" + notes + doc[b:])
        print(f"wrote {path}")


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def render(rows, peaks, nt, best, args) -> str:
    lines = ["## CPU backends (c-scalar, c-avx2)", ""]
    lines.append(f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {cpu_name()}, "
                 f"{os.cpu_count()} logical CPUs; best kernel family here: `{best}`; Python {platform.python_version()}, "
                 f"gcc -O3 via `pip install -e .`.")
    lines.append("")
    lines.append(f"Command: `python3 benchmarks/bench_cpu.py --repeat {args.repeat} --rounds {args.rounds} "
                 f"--threads {nt} --write`")
    lines.append("")
    lines.append(f"Other load: the CPUs were at most {100 * args.busy:.0f}% busy just before each layer "
                 f"(sampled over 0.5 s); load average at the end {args.load[0]:.2f} / {args.load[1]:.2f} / "
                 f"{args.load[2]:.2f} (1 / 5 / 15 min), this run included.")
    lines.append("")
    lines.append("Instruction peaks (qconv_peak: 12 independent ymm FMA/VNNI chains, or 8 independent vpmulld+vpaddd / vpmaddwd+vpaddd pairs per iteration; the best of 5 runs of ~50 ms at the start, 2 before each layer and 5 at the end):")
    lines.append("")
    lines.append("| instruction | MAC per instr | 1 thread G MAC/s | %d threads G MAC/s |" % nt)
    lines.append("|---|---|---|---|")
    lanes = {"scalar-fma": 1, "fma": 8, "mullo": 8, "madd": 16, "dpwssd": 16, "dpbusd": 32,   # csrc/qconv.h
             "fma512": 16, "dpwssd512": 32, "dpbusd512": 64, "amx-dpbssd": 16384}
    for ins in lanes:
        if (ins, 1) in peaks:
            lines.append(f"| {ins} | {lanes[ins]} | {peaks[(ins, 1)]:.1f} | {peaks[(ins, nt)]:.1f} |")
    lines.append("")
    lines.append("Convolutions: median of the C-timed convolve phase (c-avx2: the lowest of "
                 f"{args.rounds} medians of {args.repeat} calls, one per sweep over all configurations; "
                 f"c-scalar: one median of {args.scalar_repeat}); GOP/s = 2*N*H*W*OC*KH*KW*IC / time; "
                 "% peak = GOP/s / (2 x the instruction's G MAC/s at the same thread count); "
                 "x scalar = c-scalar FP32 time / this time; 2T/1T = 1-thread time / 2-thread time; "
                 "q+dq = (quantize + dequantize) / convolve (c-avx2 dequantizes inside the convolve store); "
                 "other = CPU share used by other processes during the kept sample (max over the thread counts; "
                 "50% = one of the two CPUs taken by someone else, which halves a 2-thread run); "
                 "1T columns: the same kernels on one thread against the 1-thread peak.")
    lines.append("")
    lines.append("| layer | N | backend | kernels | precision | threads | ms | GOP/s | instr | % peak | x scalar | 2T/1T | q+dq % | other % | 1T GOP/s | 1T % peak |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(f"| {r['layer']} | {r['n']} | {r['backend']} | {r['isa']} | {r['precision']} | {r['threads']} | "
                     f"{r['ms']:.3f} | {r['gops']:.1f} | {r['instr']} | {fmt(r['peak_pct'], '.0f')} | "
                     f"{fmt(r['speedup'], '.1f')} | {fmt(r['scaling'], '.2f')} | {fmt(r['qdq_pct'], '.1f')} | "
                     f"{r['other_pct']:.0f} | {r['gops1']:.1f} | {fmt(r['peak1_pct'], '.0f')} |")
    lines.append("")
    # Targets of issue 3: 2 threads, exam cases 1 and 2 (N=1), best kernels.
    lines.append(f"Targets (issue 3; {nt} threads, exam cases 1 and 2 at N=1, best kernels `{best}`):")
    lines.append("")
    lines.append("| target | case 1 | case 2 | met |")
    lines.append("|---|---|---|---|")
    sel = {(r["layer"], r["precision"]): r for r in rows
           if r["backend"] == "c-avx2" and r["isa"] == best and r["n"] == 1 and r["layer"].startswith("exam")}

    def target(label, key, prec, goal, fmt_):
        vals = [sel.get((f"exam {c}", prec), {}).get(key) for c in ("1", "2")]
        met = all(v is not None and v >= goal for v in vals) if goal > 0 else all(v is not None and v <= -goal for v in vals)
        lines.append(f"| {label} | {' | '.join(fmt(v, fmt_) for v in vals)} | {'yes' if met else 'no'} |")

    target("FP32 >= 80% of FMA peak", "peak_pct", "fp32", 80, ".0f")
    target("(1 thread) FP32 >= 80% of 1-thread FMA peak", "peak1_pct", "fp32", 80, ".0f")
    target("(1 thread) INT32 >= 75% of 1-thread mullo peak", "peak1_pct", "int32", 75, ".0f")
    target("(1 thread) INT16 >= 75% of 1-thread peak", "peak1_pct", "int16", 75, ".0f")
    target("(1 thread) INT8 >= 75% of 1-thread peak", "peak1_pct", "int8", 75, ".0f")
    target("INT32 >= 75% of mullo peak", "peak_pct", "int32", 75, ".0f")
    target("INT16 >= 75% of its instruction's peak", "peak_pct", "int16", 75, ".0f")
    target("INT8 >= 75% of its instruction's peak", "peak_pct", "int8", 75, ".0f")
    target("INT8 quantize+dequantize <= 5% of convolve", "qdq_pct", "int8", -5, ".1f")
    for prec in PRECISIONS:
        target(f"{prec}: {nt} threads >= 1.8x one thread", "scaling", prec, 1.8, ".2f")
    target("FP32 GOP/s (issue: >= 200)", "gops", "fp32", 200, ".0f")
    target("INT16 GOP/s (issue: >= 370 with VNNI)", "gops", "int16", 370, ".0f")
    target("INT8 GOP/s (issue: >= 700 with VNNI)", "gops", "int8", 700, ".0f")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
