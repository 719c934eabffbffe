"""Small-layer calls with other processes busy beside them: the thread pool's behaviour under load.

    python3 benchmarks/bench_pool_load.py [--busy 0,1,2] [--rounds 3] [--calls 200] [--threads 2]

A 12x12x8 INT8 layer (kernel 3x3x8x8, fixed scales) on c-avx2, `calls` prepared calls per round;
with `busy` spinning processes started beside it for the round. Prints the median, the 90th
percentile and how many calls took over 0.9 ms. (To compare two builds, run it with PYTHONPATH set to
each tree in turn, alternating rounds.)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import numpy as np

import qconv


def _spin() -> None:
    while True:
        pass


def one_round(conv, x, calls: int) -> np.ndarray:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        conv(x)
        times.append(time.perf_counter() - t)
    return np.array(times) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--busy", default="0,1,2", help="busy processes beside the calls, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 12, 12, 8)).astype(np.float32)
    w = (rng.standard_normal((3, 3, 8, 8)) * 0.1).astype(np.float32)
    conv = qconv.prepare(w, "int8", "c-avx2", scale=(16.0, 64.0), threads=args.threads)
    conv(x)
    for busy in (int(b) for b in args.busy.split(",")):
        procs = [mp.Process(target=_spin, daemon=True) for _ in range(busy)]
        for p in procs:
            p.start()
        try:
            time.sleep(0.5)
            for r in range(args.rounds):
                t = one_round(conv, x, args.calls)
                print(f"busy {busy} round {r + 1}: median {np.median(t):.1f} us  p90 {np.percentile(t, 90):.1f} us  "
                      f"over 0.9 ms {(t > 900).sum()} of {len(t)}", flush=True)
        finally:
            for p in procs:
                p.terminate()
                p.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
