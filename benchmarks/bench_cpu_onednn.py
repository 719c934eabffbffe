"""qconv's c-avx2 beside PyTorch's CPU convolution (oneDNN / x86 quantized engine), same process.

    python3 benchmarks/bench_cpu_onednn.py [--threads 2] [--repeat 30]

PyTorch is only a reference point here (pip install torch); qconv never uses it. FP32: torch
conv2d on channels-last tensors. INT8: torch.ao's quantized Conv2d (quint8 activations, qint8
per-tensor weights, prepacked once), with the quantized engine named in the table; its time
includes requantizing the output to 8 bits, qconv's includes dequantizing to float32. Times are
medians of --repeat calls after warm-up; qconv's convolve phase is timed in C, its whole call
(validation, quantize, pack, convolve) and torch's call by the wall clock. The two alternate in
blocks (five rounds), never call by call: each library's pool spins after a call and would
starve the other's next call on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
import qconv  # noqa: E402
from layers import exam_layers, real_layers  # noqa: E402

# Both libraries keep worker threads spinning for a while after a call; on 2 cores one pool's
# spinning starves the other. So: blocks of calls, a pause between blocks, a few rounds.
ROUNDS = 5
POOL_SETTLE_S = 0.5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    try:
        import warnings
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated")
        import torch
        import torch.ao.nn.quantized as nnq
    except ImportError:
        print("PyTorch is not installed: pip install torch", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    engines = [e for e in ("onednn", "x86", "fbgemm") if e in torch.backends.quantized.supported_engines]
    engine = engines[0]
    torch.backends.quantized.engine = engine
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}; "
          f"{os.cpu_count()} CPUs; torch {torch.__version__} ({engine} quantized engine), "
          f"{args.threads} threads each; qconv c-avx2 {qconv.available_backends()['c-avx2'][1]}")
    print()
    print("| layer | precision | qconv convolve ms | qconv whole call ms | torch call ms | torch / qconv convolve "
          "| qconv GOP/s | torch GOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    named = [(L.name.replace("exam", "exam "), L) for L in exam_layers()] + [(L.name, L) for L in real_layers()]
    for name, L in named:
        x, w = L.x, L.w
        kh, kw, oc, ic = w.shape
        flops = 2 * x.shape[0] * x.shape[1] * x.shape[2] * oc * kh * kw * ic
        pad = ((kh - 1) // 2, (kw - 1) // 2)
        if kh % 2 == 0 or kw % 2 == 0:
            continue  # torch's symmetric padding differs from SAME for even kernels
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        wt = torch.from_numpy(np.ascontiguousarray(w.transpose(2, 3, 0, 1))).contiguous(
            memory_format=torch.channels_last)
        # INT8 torch module: per-tensor symmetric weights, activations quint8 around 128.
        sx = float(np.abs(x).max()) / 127.0
        sw = float(np.abs(w).max()) / 127.0
        xq = torch.quantize_per_tensor(xt, sx, 128, torch.quint8)
        conv = nnq.Conv2d(ic, oc, (kh, kw), padding=pad)
        conv.set_weight_bias(torch.quantize_per_tensor(wt, sw, 0, torch.qint8), None)
        yref = torch.nn.functional.conv2d(xt, wt, padding=pad)
        conv.scale, conv.zero_point = float(yref.abs().max()) / 127.0, 128

        cases = {
            "fp32": (lambda: qconv.conv2d_result(x, w, "fp32", "c-avx2", threads=args.threads),
                     lambda: torch.nn.functional.conv2d(xt, wt, padding=pad)),
            "int8": (lambda: qconv.conv2d_result(x, w, "int8", "c-avx2", threads=args.threads),
                     lambda: conv(xq)),
        }
        with torch.inference_mode():
            for prec, (ours, theirs) in cases.items():
                for _ in range(3):
                    ours(), theirs()
                t_ours, t_call, t_theirs = [], [], []
                for _ in range(ROUNDS):
                    for _ in range(args.repeat // ROUNDS):
                        t0 = time.perf_counter()
                        t_ours.append(ours().phases["convolve"])
                        t_call.append(time.perf_counter() - t0)
                    time.sleep(POOL_SETTLE_S)
                    for _ in range(args.repeat // ROUNDS):
                        t0 = time.perf_counter()
                        theirs()
                        t_theirs.append(time.perf_counter() - t0)
                    time.sleep(POOL_SETTLE_S)
                a, c, b = (statistics.median(t) for t in (t_ours, t_call, t_theirs))
                print(f"| {name} | {prec} | {a * 1e3:.3f} | {c * 1e3:.3f} | {b * 1e3:.3f} | {b / a:.2f} | "
                      f"{flops / a / 1e9:.0f} | {flops / b / 1e9:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
