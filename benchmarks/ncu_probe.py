"""Launch each convolution kernel once (no stream gate) on exam case 2 at N=32, for Nsight Compute.

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats \
        -k regex:'^qconv_(s8_conv|f32_conv)' python3 benchmarks/ncu_probe.py   (PYTHONPATH=src)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

import qconv
from qconv.backends import cuda as cb
from qconv.tensorfile import load as load_tensor

shared = Path(os.environ.get("QCONV_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
case = sys.argv[1] if len(sys.argv) > 1 else "2"
d = shared / "data" / "exam" / case
x = np.ascontiguousarray(np.tile(load_tensor(d / "input_tensor.bin"), (32, 1, 1, 1)))
w = load_tensor(d / "kernel_tensor.bin")
xd = cb.to_device(x)
for prec, opts in (("int8", {"int8_path": "mma"}), ("int8", {"int8_path": "mma", "tile": "128x64"}),
                   ("int8", {"int8_path": "dp4a"}), ("fp32", {})):
    conv = qconv.prepare(w, prec, "cuda", timing=False, **opts)
    conv(xd).synchronize()
    print(prec, opts, conv._packed.job(conv.geometry(x.shape), True).conv_name)
