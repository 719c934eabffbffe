"""Run one convolution per variant on exam case 2 at N=32, for Nsight Compute to profile.

    ncu --section SpeedOfLight --section Occupancy --section MemoryWorkloadAnalysis \
        --section WarpStateStats -k regex:conv_ PYTHONPATH=src python3 benchmarks/ncu_probe.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from qconv import scales
from qconv.backends import cuda as cb
from qconv.contract import Plan, Precision
from qconv.tensorfile import load as load_tensor

shared = Path(os.environ.get("QCONV_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
case = sys.argv[1] if len(sys.argv) > 1 else "2"
d = shared / "data" / "exam" / case
x = np.ascontiguousarray(np.tile(load_tensor(d / "input_tensor.bin"), (32, 1, 1, 1)))
w = load_tensor(d / "kernel_tensor.bin")
for prec, opts in ((Precision.INT8, {"int8_path": "mma"}), (Precision.INT8, {"int8_path": "mma", "tile": "128x64"}),
                   (Precision.FP32, {})):
    ch = scales.choose("maxabs", prec, x, w) if prec.is_integer else None
    plan = Plan(prec, s_x=ch and ch.s_x, s_w=ch and ch.s_w, options=opts)
    r = cb.profile(plan, x, w, reps=1)
    print(prec.value, opts, r["kernel"], r["median"]["convolve"] * 1e6, "us")
