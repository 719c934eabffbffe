"""The whole GPU call with and without programmatic dependent launch (the convolution launched while
its input pass finishes; cuda/_driver.py PDL), in one process, alternating.

    PYTHONPATH=src python3 benchmarks/bench_pdl.py [--batches 1,32] [--rounds 3]

For each layer, batch and precision: two prepared calls of the same kernel, one with jobs built
under PDL = False and one under PDL = True; CUDA events around the Python call (bench_call_gpu's
whole_call) and around a CUDA Graph replay of it, medians of --reps, rounds alternating A and B.
Also a depthwise layer (its maxabs scan, then the depthwise kernel).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_call_gpu import whole_call  # noqa: E402
from layers import exam_layers  # noqa: E402

import qconv  # noqa: E402
from qconv.backends.cuda import _driver  # noqa: E402

VARIANTS = [("int8", {}), ("int8 S", {"scale": "fixed"}), ("int16", {})]


def prepared(prec: str, w: np.ndarray, x1: np.ndarray, opts: dict, xt, pdl: bool, **layer):
    opts = dict(opts)
    if opts.get("scale") == "fixed":
        r = qconv.conv2d_result(x1, w, prec, backend="reference", scale="maxabs", **layer)
        opts["scale"] = (r.scale_input, r.scale_kernel)
    _driver.PDL = pdl
    conv = qconv.prepare(w, prec, "cuda", **layer, **opts)
    conv(xt)  # builds the job (its launches) under this setting
    g = conv.capture(xt)
    _driver.PDL = True
    return conv, g


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    import torch
    rng = np.random.default_rng(0)
    cases = [(L.name, L.x, L.w, {}) for L in exam_layers()]
    c = 144
    cases.append(("dw3x3 C144 56x56", rng.standard_normal((1, 56, 56, c)).astype(np.float32),
                  (rng.standard_normal((3, 3, c, 1)) * 0.2).astype(np.float32), {"groups": c}))
    print("layer N path: whole call off / on (us, medians per round), graph replay off / on", flush=True)
    for name, x1, w, layer in cases:
        for n in (int(v) for v in args.batches.split(",")):
            xt = torch.from_numpy(np.ascontiguousarray(np.tile(x1, (n, 1, 1, 1)))).cuda()
            for label, opts in VARIANTS:
                if layer and label == "int16":
                    continue
                ab = {pdl: prepared(label.split()[0], w, x1, opts, xt, pdl, **layer) for pdl in (False, True)}
                same = [torch.as_tensor(conv(xt), device="cuda") for conv, _ in ab.values()]
                assert torch.equal(*same), f"{name} N={n} {label}: PDL changed the output"
                t = {(k, pdl): [] for k in ("call", "graph") for pdl in (False, True)}
                for _ in range(args.rounds):
                    for pdl, (conv, g) in ab.items():
                        t["call", pdl].append(whole_call(torch, lambda: conv(xt), args.reps))
                        t["graph", pdl].append(whole_call(torch, g, args.reps))
                med = {k: statistics.median(v) * 1e6 for k, v in t.items()}
                rounds = " | ".join(f"{t[k, False][i]*1e6:.1f}/{t[k, True][i]*1e6:.1f}" for k in ("call", "graph")
                                    for i in range(args.rounds))
                print(f"{name} N={n} {label:7s} call {med['call', False]:7.1f} / {med['call', True]:7.1f}  "
                      f"graph {med['graph', False]:7.1f} / {med['graph', True]:7.1f}   rounds {rounds}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
