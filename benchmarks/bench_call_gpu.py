"""The whole prepared call on the GPU, as a user makes it, beside PyTorch's cuDNN calls (issue 8).

    PYTHONPATH=src python3 benchmarks/bench_call_gpu.py [--shared ../shared] [--reps 100] [--json out.json]

For the exam layers and the real layers (../shared/data/real; N = 1 and N = 32, the batch tiled
from the one input), with device-resident inputs (PyTorch CUDA tensors):

- whole call: CUDA events on PyTorch's stream around the Python call ``conv(x)`` (qconv's stream
  is ordered with it), the GPU idle before each call; median of --reps;
- kernel: the same call's kernels alone (Prepared.profile: enqueued back to back behind a stream
  gate), median; host overhead = whole - kernel;
- cuDNN through PyTorch, timed the same way in the same process: FP32 (NCHW and channels-last,
  TF32 off) and FP16 channels-last, given half tensors and, as qconv is, float32 ones (converted
  to half in the call and the output back to float32);
- numpy in, numpy out: the whole call (wall clock, median) against copy-in + kernel + copy-out, the
  copies timed alone from/to pinned memory with events.

Then depthwise layers (issue 10's memory-bound kernels): kernel time, bytes moved (input + output)
per second against a device-to-device copy of the same bytes, and cuDNN's FP32/FP16 depthwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import qconv
from qconv.backends import cuda as cb
from qconv.contract import check_layer

from layers import SHARED, exam_layers, load_layers

VARIANTS = [  # label, precision, prepare options
    ("fp32", "fp32", {}),
    ("fp32 tf32x3", "fp32", {"fp32_path": "tf32x3"}),  # tensor cores, three TF32 products per term
    ("int8", "int8", {}),                          # maxabs (the default): s_x per call on the device
    ("int8 S", "int8", {"scale": "fixed"}),        # a fixed scale pair: no scan pass
    ("int16", "int16", {}),                        # int16_path "auto"
    ("int16 simt", "int16", {"int16_path": "simt"}),
    ("int16 mma", "int16", {"int16_path": "mma"}),  # tensor cores by byte-plane decomposition
    ("int32 simt", "int32", {"int32_path": "simt"}),
    ("int32 mma", "int32", {"int32_path": "mma"}),
]


def whole_call(torch, fn, reps: int) -> float:
    """Median of events around one call on an idle GPU (host launch latency included)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        s.record()
        r = fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
        del r
    return statistics.median(times)


def gated(torch, fn, reps: int) -> float:
    """Median GPU time of fn() with launches queued behind torch.cuda._sleep (kernel time alone)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    while len(times) < reps:
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(50)]
        torch.cuda._sleep(int(40e6))
        for s, e in ev:
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times += [s.elapsed_time(e) / 1e3 for s, e in ev]
    return statistics.median(times)


def wall(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def cudnn(torch, x: np.ndarray, w: np.ndarray, b: np.ndarray | None, reps: int, stride=1, groups=1,
          padding="same") -> dict[str, float]:
    import torch.nn.functional as F
    xt = torch.from_numpy(x).cuda().permute(0, 3, 1, 2).contiguous()
    wt = torch.from_numpy(w).cuda().permute(2, 3, 0, 1).contiguous()
    bt = None if b is None else torch.from_numpy(b).cuda()
    pad = padding if stride == 1 else (w.shape[0] // 2)
    res = {}
    with torch.no_grad():
        f = lambda xx, ww, bb: F.conv2d(xx, ww, bb, stride=stride, padding=pad, groups=groups)  # noqa: E731
        res["cudnn_fp32_nchw"] = whole_call(torch, lambda: f(xt, wt, bt), reps)
        xc, wc = xt.to(memory_format=torch.channels_last), wt.to(memory_format=torch.channels_last)
        res["cudnn_fp32_cl"] = whole_call(torch, lambda: f(xc, wc, bt), reps)
        xh, wh, bh = xc.half(), wc.half(), None if bt is None else bt.half()
        res["cudnn_fp16_cl"] = whole_call(torch, lambda: f(xh, wh, bh), reps)
        # what a user with float32 data runs, as qconv's calls take and give float32: x converted
        # to half in the call, the output back to float32 (the weights converted once, as prepared)
        res["cudnn_fp16_cl_f32io"] = whole_call(torch, lambda: f(xc.half(), wh, bh).float(), reps)
        res["cudnn_fp16_cl_kernel"] = gated(torch, lambda: f(xh, wh, bh), reps)
        res["cudnn_fp32_kernel"] = gated(torch, lambda: f(xt, wt, bt), reps)
    res["cudnn_fp32_best"] = min(res["cudnn_fp32_nchw"], res["cudnn_fp32_cl"])
    return res


def copies(torch, x: np.ndarray, yshape: tuple[int, ...], reps: int) -> dict[str, float]:
    xp = torch.from_numpy(x).pin_memory()
    xd = torch.empty(x.shape, device="cuda")
    yd = torch.zeros(yshape, device="cuda")
    yp = torch.empty(yshape).pin_memory()
    return {"h2d": gated(torch, lambda: xd.copy_(xp, non_blocking=True), reps),
            "d2h": gated(torch, lambda: yp.copy_(yd, non_blocking=True), reps)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = Path(__file__).resolve().parent.parent
    ap.add_argument("--shared", default=str(SHARED))
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--json")
    ap.add_argument("--no-depthwise", action="store_true")
    ap.add_argument("--host-only", action="store_true", help="only the host-time attribution")
    ap.add_argument("--dw-only", action="store_true", help="only the depthwise layers")
    ap.add_argument("--variants", default="", help="comma-separated labels to run (default: all of VARIANTS)")
    ap.add_argument("--layers", default="", help="comma-separated layer names to run (default: all)")
    args = ap.parse_args()
    want = set(filter(None, args.variants.split(",")))
    want_layers = set(filter(None, args.layers.split(",")))
    import torch
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    ok, why = cb.is_available()
    if not ok:
        print(f"cuda backend unavailable: {why}")
        return 1
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True,
                                cwd=here).stdout.strip()
    except OSError:
        commit = "?"
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "card": why,
            "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "commit": commit,
            "command": " ".join(sys.argv)}
    print(json.dumps(meta), flush=True)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    t_end = time.perf_counter() + 0.5
    while time.perf_counter() < t_end:  # the GPU busy for a moment first, as in an application
        a @ a
    torch.cuda.synchronize()
    meta["host_us"] = {} if args.dw_only else host_profile(torch)
    if args.host_only:
        return 0
    rows = []
    for L in ([] if args.dw_only else load_layers(args.shared)):
        name, x1, w = L.name, L.x, L.w
        if want_layers and name not in want_layers:
            continue
        for n in (int(v) for v in args.batches.split(",")):
            x = np.ascontiguousarray(np.tile(x1, (n, 1, 1, 1)))
            xt = torch.from_numpy(x).cuda()
            base = cudnn(torch, x, w, L.bias, args.reps, stride=L.stride, groups=L.groups, padding=L.padding)
            out = check_layer(x.shape, w.shape, stride=L.stride, padding=L.padding, groups=L.groups).out_shape
            row = {"layer": name, "n": n, "flops": 2 * math.prod(out) * w.shape[0] * w.shape[1] * w.shape[3],
                   "baselines": base, "ours": {}}
            for label, prec, opts in VARIANTS:
                if want and label not in want:
                    continue
                opts = dict(opts)
                if opts.get("scale") == "fixed":
                    r = qconv.conv2d_result(x1, w, prec, backend="reference", scale="maxabs")
                    opts["scale"] = (r.scale_input, r.scale_kernel)
                conv = qconv.prepare(w, prec, "cuda", **L.kwargs(), **opts)
                t_whole = whole_call(torch, lambda: conv(xt), args.reps)
                prof = conv._packed.profile(xt, args.reps)
                med = prof["median"]
                t_kernel = med["quantize"] + med["pack"] + med["convolve"] + med["dequantize"]
                rec = {"whole": t_whole, "kernel": t_kernel, "overhead": t_whole - t_kernel,
                       "phases": med, "conv_kernel": prof["kernel"], "split_k": prof["split_k"]}
                if label in ("fp32", "int8", "int16"):   # the same call replayed as a CUDA Graph
                    g = conv.capture(xt)
                    rec["graph_whole"] = whole_call(torch, g, args.reps)
                if label in ("fp32", "int8"):
                    rec["numpy_call"] = wall(lambda: conv(x), max(20, args.reps // 5))
                    xp = cb.pinned_empty(x.shape)
                    xp[...] = x
                    rec["pinned_call"] = wall(lambda: conv(xp), max(20, args.reps // 5))  # no staging copy
                    rec["copies"] = copies(torch, x, x.shape[:3] + (w.shape[2],), 30)
                    rec["ideal_numpy"] = rec["copies"]["h2d"] + t_kernel + rec["copies"]["d2h"]
                row["ours"][label] = rec
                print(f"{name} N={n} {label:13s} whole {t_whole*1e6:8.1f} us  kernels {t_kernel*1e6:8.1f} us  "
                      f"overhead {(t_whole - t_kernel)*1e6:6.1f} us  [{prof['kernel']}/{prof['split_k']}]"
                      + (f"  graph {rec['graph_whole']*1e6:8.1f} us" if "graph_whole" in rec else "")
                      + (f"  numpy {rec['numpy_call']*1e6:8.1f} us (pinned in {rec['pinned_call']*1e6:8.1f} us) vs "
                         f"copies+kernel {rec['ideal_numpy']*1e6:8.1f} us"
                         if "numpy_call" in rec else ""), flush=True)
            print(f"{name} N={n} cuDNN: " + ", ".join(f"{k} {v*1e6:.1f} us" for k, v in base.items()), flush=True)
            rows.append(row)
    dw = [] if args.no_depthwise else depthwise(torch, args.reps)
    out = {"meta": meta, "rows": rows, "depthwise": dw}
    print(table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def host_profile(torch, reps: int = 400) -> dict[str, float]:
    """Host microseconds of one call (median of perf_counter around single calls, the stream
    drained every 8 calls so no launch ever waits for a full queue): where the whole call's host
    overhead goes, on exam 1 at N = 1 with a device-resident input."""
    import torch.nn.functional as F
    from qconv import api
    from qconv.backends.cuda import _arrays, _driver
    from qconv.backends.cuda._launch import PassParams
    exam1 = exam_layers()[0]
    x, w = exam1.x, exam1.w
    xt = torch.from_numpy(x).cuda()

    def host(fn, n=reps):
        fn()
        torch.cuda.synchronize()
        ts = []
        for i in range(n):
            if i % 8 == 0:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        return statistics.median(ts) * 1e6

    res = {}
    for prec, opts in (("int8", {}), ("int8", {"timing": False}), ("int8", {"timing": False, "scale": 0.0}),
                       ("fp32", {}), ("fp32", {"timing": False})):
        opts = dict(opts)
        tag = prec + ("" if opts.get("timing", True) else " untimed") + (" fixed S" if "scale" in opts else "")
        if "scale" in opts:
            r = qconv.conv2d_result(x, w, prec, backend="reference", scale="maxabs")
            opts["scale"] = (r.scale_input, r.scale_kernel)
        conv = qconv.prepare(w, prec, "cuda", **opts)
        g = conv.geometry(tuple(xt.shape))
        res[f"conv(x) {tag}"] = host(lambda: conv(xt))
        res[f"backend run {tag}"] = host(lambda: conv._packed.run(xt, g))
    res["api.is_device_array(torch)"] = host(lambda: api.is_device_array(xt))
    rt = _driver.runtime()
    ctx = rt.default
    res["device_view(torch)"] = host(lambda: _arrays.device_view(xt, "x", ctx, []))
    ev = ctx.take_events(1)[0]
    res["cuEventRecord"] = host(lambda: rt.record(ev, ctx.handle))
    nop = _driver.Launch(rt, "quant.cu", "qconv_epilogue", (1, 1, 1), 256, 0, PassParams(n=0, OC=1))
    res["cuLaunchKernel"] = host(lambda: nop.launch(ctx.stream))
    xh = torch.from_numpy(x).cuda().permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).half()
    wh = torch.from_numpy(w).cuda().permute(2, 3, 0, 1).contiguous(memory_format=torch.channels_last).half()
    with torch.no_grad():
        res["torch F.conv2d FP16 CL"] = host(lambda: F.conv2d(xh, wh, padding="same"))
    print("host us per call: "
          + ", ".join(f"{k} {v:.2f}" for k, v in res.items()), flush=True)
    return res


DW_LAYERS = [  # name, (N, H, W, C), KH, stride
    ("dw3x3 C144 56x56", (1, 56, 56, 144), 3, 1),
    ("dw3x3 C144 112x112 s2", (1, 112, 112, 144), 3, 2),
    ("dw5x5 C576 14x14", (1, 14, 14, 576), 5, 1),
    ("dw3x3 C1152 7x7", (1, 7, 7, 1152), 3, 1),
    ("dw3x3 C144 56x56", (32, 56, 56, 144), 3, 1),
    ("dw5x5 C576 14x14", (32, 14, 14, 576), 5, 1),
    ("dw3x3 C1152 7x7", (32, 7, 7, 1152), 3, 1),
]


def depthwise(torch, reps: int) -> list[dict]:
    rng = np.random.default_rng(0)
    res = []
    for name, xs, k, s in DW_LAYERS:
        x = rng.standard_normal(xs).astype(np.float32)
        c = xs[3]
        w = (rng.standard_normal((k, k, c, 1)) * 0.2).astype(np.float32)
        xt = torch.from_numpy(x).cuda()
        row = {"layer": name, "n": xs[0], "x_shape": xs, "stride": s, "ours": {}}
        for prec in ("fp32", "int8"):
            conv = qconv.prepare(w, prec, "cuda", stride=s, groups=c)
            prof = conv._packed.profile(xt, reps)
            med = prof["median"]
            g = conv.geometry(xs)
            moved = x.nbytes + 4 * int(np.prod(g.out_shape))
            row["ours"][prec] = {"whole": whole_call(torch, lambda: conv(xt), reps), "kernel": med["convolve"],
                                 "scan": med["quantize"] + med["pack"], "bytes": moved,
                                 "gbps": moved / med["convolve"] / 1e9, "conv_kernel": prof["kernel"]}
        nb = row["ours"]["fp32"]["bytes"] // 2
        a, b2 = torch.empty(nb // 4, device="cuda"), torch.empty(nb // 4, device="cuda")
        t_copy = gated(torch, lambda: b2.copy_(a), reps)
        row["copy_gbps"] = 2 * nb / t_copy / 1e9
        row["cudnn"] = cudnn(torch, x, np.ascontiguousarray(w), None, reps, stride=s, groups=c,
                             padding=k // 2 if s > 1 else "same")
        for prec, r in row["ours"].items():
            print(f"{name} N={xs[0]} {prec}: depthwise kernel {r['kernel']*1e6:.1f} us ({r['gbps']:.0f} GB/s of "
                  f"{row['copy_gbps']:.0f} GB/s copy = {r['gbps'] / row['copy_gbps']:.0%}), scan {r['scan']*1e6:.1f} us, "
                  f"whole {r['whole']*1e6:.1f} us [{r['conv_kernel']}]", flush=True)
        print(f"{name} N={xs[0]} cuDNN: " + ", ".join(f"{k2} {v*1e6:.1f} us" for k2, v in row["cudnn"].items()), flush=True)
        res.append(row)
    return res


def table(out: dict) -> str:
    us = lambda s: f"{s * 1e6:.1f}"  # noqa: E731
    lines = ["| layer | N | path | whole call us | kernels us | host overhead us | cuDNN FP32 call us | cuDNN FP16 CL call us | "
             "cuDNN FP16 CL call, float32 in and out, us | whole / cuDNN (FP32 for the fp32 rows, FP16 CL for int) | CUDA Graph replay us | replay / cuDNN | numpy call us | "
             "numpy call, pinned input us | copies + kernels us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        b = r["baselines"]
        for label, t in r["ours"].items():
            peer = b["cudnn_fp32_best"] if label.split()[0] == "fp32" else b["cudnn_fp16_cl"]
            graph = (f"{us(t['graph_whole'])} | {t['graph_whole'] / peer:.2f}" if "graph_whole" in t else "- | -")
            lines.append(f"| {r['layer']} | {r['n']} | {label} | {us(t['whole'])} | {us(t['kernel'])} | {us(t['overhead'])} | "
                         f"{us(b['cudnn_fp32_best'])} | {us(b['cudnn_fp16_cl'])} | {us(b['cudnn_fp16_cl_f32io'])} | "
                         f"{t['whole'] / peer:.2f} | {graph} | "
                         f"{us(t['numpy_call']) if 'numpy_call' in t else '-'} | "
                         f"{us(t['pinned_call']) if 'pinned_call' in t else '-'} | "
                         f"{us(t['ideal_numpy']) if 'ideal_numpy' in t else '-'} |")
    if out["depthwise"]:
        lines += ["", "| depthwise layer | N | stride | path | kernel us | GB/s (in + out) | copy GB/s | share | scan us | whole us | cuDNN FP32 / FP16 CL call us |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in out["depthwise"]:
            for p, t in r["ours"].items():
                lines.append(f"| {r['layer']} | {r['n']} | {r['stride']} | {p} | {us(t['kernel'])} | {t['gbps']:.0f} | "
                             f"{r['copy_gbps']:.0f} | {t['gbps'] / r['copy_gbps']:.0%} | {us(t['scan'])} | {us(t['whole'])} | "
                             f"{us(r['cudnn']['cudnn_fp32_best'])} / {us(r['cudnn']['cudnn_fp16_cl'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
