"""Kernel times of the implicit-GEMM paths a kernel change touches, for A/B runs of two trees.

    PYTHONPATH=src python3 benchmarks/bench_kernel_ab.py [--shared ../shared] [--reps 40] [--json out.json]

One line per configuration: the convolve phase's median (cuda.profile: CUDA events, launches
queued behind a stream gate) for INT8 mma.sync tiles, wgmma 128x128 and `auto`, INT16 and INT32 on
the tensor cores, exam layers at N=32 (and INT8 exam 2 at N=256). To compare two trees, run it
alternately under each (PYTHONPATH=treeA/src, then treeB/src, twice): a process holds one tree's
kernels. RESULTS.md's loader and epilogue A/Bs (2026-12-05, evening) ran this script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cuda import time_ours  # noqa: E402

CONFIGS = [("int8", {"int8_path": "mma", "tile": "128x64/w4"}), ("int8", {"int8_path": "mma", "tile": "64x64/w4"}),
           ("int8", {"int8_path": "mma", "tile": "128x128"}), ("int8", {"int8_path": "mma", "tile": "128x64"}),
           ("int8", {"int8_path": "wgmma", "tile": "128x128"}), ("int8", {}),
           ("int16", {"int16_path": "mma"}), ("int32", {"int32_path": "mma"})]


def main() -> int:
    here = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("QCONV_SHARED", str(here.parent / "shared")))
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch
    import qconv
    from qconv.tensorfile import load as load_tensor
    res = {}
    for case, n in (("1", 32), ("2", 32), ("2", 256)):
        d = Path(args.shared) / "data" / "exam" / case
        x1, w = load_tensor(d / "input_tensor.bin"), load_tensor(d / "kernel_tensor.bin")
        xt = torch.from_numpy(np.ascontiguousarray(np.tile(x1, (n, 1, 1, 1)))).cuda()
        for prec, opts in CONFIGS:
            if n == 256 and prec != "int8":
                continue
            r = qconv.conv2d_result(x1, w, prec, backend="reference", scale="maxabs")
            t = time_ours(xt, w, prec, (r.scale_input, r.scale_kernel), opts, args.reps)
            key = f"exam{case} N={n} {prec} {opts.get('tile', 'auto')} {opts.get(prec + '_path', 'auto')}"
            res[key] = t["convolve"] * 1e6
            print(f"{key:45s} {res[key]:8.1f} us  {t['kernel']} split {t['split_k']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
