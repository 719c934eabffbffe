"""Launch each convolution kernel once (no stream gate) on exam case 2 at N=32, for Nsight Compute.

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats \
        -k regex:'^qconv_(s8_conv|f32_conv)' python3 benchmarks/ncu_probe.py   (PYTHONPATH=src)
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
rt = cb._runtime()
with rt.lock:
    rt.make_current()
    xp, wp = rt.buf("x_in", x.nbytes), rt.buf("w_in", w.nbytes)
    cb._ck(rt.drv.cuMemcpyHtoD(xp, x, x.nbytes), "HtoD")
    cb._ck(rt.drv.cuMemcpyHtoD(wp, w, w.nbytes), "HtoD")
    out = rt.buf("out", 4 * x.shape[0] * x.shape[1] * x.shape[2] * w.shape[2])
    for prec, opts in ((Precision.INT8, {"int8_path": "mma"}), (Precision.INT8, {"int8_path": "mma", "tile": "128x64"}),
                       (Precision.INT8, {"int8_path": "dp4a"}), (Precision.FP32, {})):
        ch = scales.choose("maxabs", prec, x, w) if prec.is_integer else None
        plan = Plan(prec, s_x=ch and ch.s_x, s_w=ch and ch.s_w, options=opts)
        job = cb._Job(rt, plan, xp, x.shape, wp, w.shape, out)
        job.enqueue(0)
        cb._ck(rt.drv.cuStreamSynchronize(rt.stream), "sync")
        print(prec.value, opts, job.conv_name, f"{job.phases(0)['convolve'] * 1e6:.1f} us (under the profiler)")
