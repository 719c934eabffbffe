"""Thread scaling of the C backend on the exam layers at a batch (default N=8): the convolve phase
(timed in C) and the whole prepared call, for each thread count, beside PyTorch's FP32 call and
quantized INT8 op at the same threads (each thread count's PyTorch rows in a child process).

    python3 benchmarks/bench_scaling.py --batch 8 --threads 1,2,4,8,16 --reps 30 [--no-torch]

Speed-up is the 1-thread convolve median over the T-thread one, the thread counts timed in turn
rep by rep; "its speed-up" is the same ratio for the peak of the instruction that bounds the kernel
(qconv_peak), measured beside it, which is what this machine's cores allow. GOP/s counts 2
operations per multiply-accumulate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_call  # noqa: E402  (PyTorch's rows)
from layers import Layer, exam_layers  # noqa: E402

PRECISIONS = ("fp32", "int16", "int8")


def layers(batch: int) -> list[Layer]:
    return [dataclasses.replace(L, x=np.ascontiguousarray(np.concatenate([L.x] * batch, axis=0)))
            for L in exam_layers()]


def qconv_rows(ls: list[Layer], threads: list[int], reps: int, isa: str | None) -> list[dict]:
    """The convolve phases of the thread counts are timed in turn, rep by rep (this VM's per-core
    speed drifts by up to 3x over minutes: series taken one after the other compare two machines),
    each after an untimed call that brings its own data back into cache;
    beside them the peak of the instruction that bounds the kernel, at each thread count, the same way."""
    import qconv
    from qconv.backends import c_avx2
    from qconv.contract import Precision, check_layer
    rows = []
    for L in ls:
        x, w = L.x, L.w
        flops = check_layer(x.shape, w.shape).flops
        for prec in PRECISIONS:
            opts = [{"threads": t} if isa is None else {"threads": t, "isa": isa} for t in threads]
            convs = [qconv.prepare(w, prec, "c-avx2", **o) for o in opts]
            outs = [conv(x) for conv in convs]
            calls: list[list[float]] = [[] for _ in threads]
            for conv, out, cl in zip(convs, outs, calls):
                for _ in range(5):
                    conv(x, out=out)
                for _ in range(reps):
                    t0 = time.perf_counter()
                    conv(x, out=out)
                    cl.append(time.perf_counter() - t0)
            phases: list[list[float]] = [[] for _ in threads]
            for _ in range(reps):
                for conv, out, ph in zip(convs, outs, phases):
                    conv(x, out=out)   # its data back in cache after the other thread counts' turns
                    ph.append(conv.result(x, out=out).phases["convolve"])
            bound = c_avx2.bound_instruction(opts[0], Precision(prec))
            peaks = [0.0] * len(threads)
            for _ in range(3) if bound else ():
                peaks = [max(p, bench_call.peak_gmacs(bound[0], t)) for p, t in zip(peaks, threads)]
            for i, t in enumerate(threads):
                rows.append({"layer": L.name, "n": x.shape[0], "precision": prec, "threads": t,
                             "convolve_s": statistics.median(phases[i]), "call_s": statistics.median(calls[i]),
                             "flops": flops, "instr": bound[0] if bound else None,
                             "peak_gmacs": peaks[i] if bound else None})
                print(f"  {L.name} N={x.shape[0]} {prec} T={t}: convolve {rows[-1]['convolve_s'] * 1e3:.3f} ms, "
                      f"call {rows[-1]['call_s'] * 1e3:.3f} ms", file=sys.stderr, flush=True)
    return rows


def torch_rows(batch: int, threads: list[int], reps: int) -> dict[int, list[dict]]:
    out = {}
    for t in threads:
        p = subprocess.run([sys.executable, __file__, "--torch-child", "--batch", str(batch), "--threads", str(t),
                            "--reps", str(reps)], capture_output=True, text=True)
        sys.stderr.write(p.stderr)
        if p.returncode == 0:
            out[t] = json.loads(p.stdout)
        else:
            print(f"(PyTorch rows at {t} threads skipped: the child exited {p.returncode})", file=sys.stderr)
    return out


def render(rows: list[dict], torch: dict[int, list[dict]]) -> str:
    one = {(r["layer"], r["precision"]): r for r in rows if r["threads"] == 1}
    head = ("| layer | N | precision | threads | convolve ms | call ms | GOP/s | speed-up vs 1 thread | "
            "instruction | its speed-up | PyTorch FP32 call ms | PyTorch INT8 op ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        tr = {x["layer"]: x for x in torch.get(r["threads"], [])}.get(r["layer"])
        base = one.get((r["layer"], r["precision"]))
        up = "-" if base is None else f"{base['convolve_s'] / r['convolve_s']:.2f}x"
        pup = ("-" if base is None or not r["peak_gmacs"] or not base["peak_gmacs"]
               else f"{r['peak_gmacs'] / base['peak_gmacs']:.2f}x")
        tf = "-" if tr is None or r["precision"] != "fp32" else f"{tr['torch_fp32_s'] * 1e3:.3f}"
        ti = "-" if tr is None or r["precision"] != "int8" else f"{tr['torch_int8_op_s'] * 1e3:.3f}"
        lines.append(f"| {r['layer']} | {r['n']} | {r['precision']} | {r['threads']} | {r['convolve_s'] * 1e3:.3f} | "
                     f"{r['call_s'] * 1e3:.3f} | {r['flops'] / r['convolve_s'] / 1e9:.0f} | "
                     f"{up} | {r['instr'] or '-'} | {pup} | {tf} | {ti} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", default="1,2,4,8,16")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--isa", help="cap the C backend's level (c-avx2's isa= option)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    threads = [int(v) for v in args.threads.split(",")]
    ls = layers(args.batch)
    if args.torch_child:
        print(json.dumps(bench_call.torch_rows(ls, threads[0], args.reps)))
        return 0
    from qconv.pools import quiet_blas
    with quiet_blas():
        rows = qconv_rows(ls, threads, args.reps, args.isa)
    torch = {} if args.no_torch else torch_rows(args.batch, threads, args.reps)
    print(f"python3 benchmarks/bench_scaling.py {' '.join(sys.argv[1:])}")
    print(render(rows, torch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
