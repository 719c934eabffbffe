"""Which INT8 kernel should `auto` run: the window kernel against mma.sync's tiles over the batch.

    PYTHONPATH=src python3 benchmarks/bench_int8_auto.py [--shared ../shared] [--batches 1,2,4,8,16,32]
                                                       [--reps 30] [--json out.json]

For the exam layers and the real layers (../shared/data/real, 'SAME' stride 1) at each N (the
batch tiled from the one image): the convolve phase's median for `auto`, the window kernel
(`tile="window"`), mma.sync 128x64/w4 and 64x64/w4, and mma.sync's own `auto`, with the kernel
each ran. _tiling.window_pays and _tiling.int8_mma_tile were fitted to its output (RESULTS.md,
2026-12-05, evening).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cuda import time_ours  # noqa: E402
from layers import SHARED, exam_layers, real_layers  # noqa: E402

VARIANTS = (("auto", {}), ("window", {"tile": "window"}), ("w4", {"int8_path": "mma", "tile": "128x64/w4"}),
            ("w4s", {"int8_path": "mma", "tile": "64x64/w4"}), ("mma", {"int8_path": "mma"}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch
    import qconv
    named = [(L.name.replace("exam", "exam/"), L) for L in exam_layers()] + \
        [("real/" + L.name, L) for L in real_layers(args.shared)]
    res = {}
    for name, L in named:
        if L.stride != 1 or L.groups != 1 or L.padding != "same":
            continue
        x1, w = L.x, L.w
        r = qconv.conv2d_result(x1, w, "int8", backend="reference", scale="maxabs")
        for n in (int(v) for v in args.batches.split(",")):
            xt = torch.from_numpy(np.ascontiguousarray(np.tile(x1, (n, 1, 1, 1)))).cuda()
            row = {}
            for label, opts in VARIANTS:
                t = time_ours(xt, w, "int8", (r.scale_input, r.scale_kernel), opts, args.reps)
                row[label] = [round(t["convolve"] * 1e6, 1), t["kernel"]]
            res[f"{name} N={n}"] = row
            print(f"{name} {tuple(x1.shape[1:])} {tuple(w.shape)} N={n:3d}  " + "  ".join(
                f"{k} {v[0]:7.1f} ({v[1].replace('qconv_s8_conv_', '')})" for k, v in row.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
