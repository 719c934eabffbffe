"""INT16/INT32/INT8 convolve time at each kernel level that runs here (issue 14: INT16 on AMX by byte
decomposition against the VNNI kernels), same layers, same threads.

    python3 benchmarks/bench_amx.py [--threads 16] [--batch 1] [--reps 30] [--levels amx,avx512,avx512vnni]
                                    [--precisions int16,int32,int8]

Per layer and precision: the median convolve phase (timed in C) at each level, its GOP/s, and each
level's speed-up over the last level listed (by default avx512vnni: c-avx2's ymm vpdpwssd INT16).
A level this machine cannot run is reported with its reason and skipped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

LAYERS = [  # x, kernel (KH, KW, OC, C), stride: ResNet-50 shapes
    ((1, 56, 56, 64), (3, 3, 64, 64), 1),
    ((1, 28, 28, 128), (3, 3, 128, 128), 1),
    ((1, 14, 14, 256), (3, 3, 256, 256), 1),
    ((1, 28, 28, 256), (1, 1, 512, 256), 1),
    ((1, 56, 56, 256), (1, 1, 512, 256), 2),
]


def main() -> None:
    import qconv
    from qconv.backends import _cext
    from qconv.contract import check_layer
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1, help="N of every layer (ResNet-50's shapes at N=1)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--levels", default="amx,avx512,avx512vnni")
    ap.add_argument("--precisions", default="int16,int32,int8")
    args = ap.parse_args()
    levels = []
    for isa in args.levels.split(","):
        why = _cext.isa_reason(isa)
        if why:
            print(f"skipping {isa}: {why}")
        else:
            levels.append(isa)
    rng = np.random.default_rng(0)
    print(f"threads {args.threads}, N={args.batch}, median of {args.reps}; speed-up over {levels[-1]}")
    for xs1, ws, s in LAYERS:
        xs = (args.batch,) + xs1[1:]
        x = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
        flops = check_layer(xs, ws, stride=s).flops
        for prec in args.precisions.split(","):
            times = {}
            for isa in levels:
                conv = qconv.prepare(w, prec, "c-avx2", stride=s, threads=args.threads, isa=isa)
                y = conv(x)
                for _ in range(3):
                    conv(x, out=y)
                times[isa] = statistics.median(conv.result(x, out=y).phases["convolve"] for _ in range(args.reps))
            base = times[levels[-1]]
            cells = [f"{isa} {t * 1e3:8.3f} ms {flops / t / 1e9:6.0f} GOP/s x{base / t:4.2f}" for isa, t in times.items()]
            print(f"{str(xs):18} {str(ws):18} s{s} {prec:5} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
