"""Benchmark the cuda backend on the assignment's layers against cuDNN and cuBLASLt, same process.

    PYTHONPATH=src python3 benchmarks/bench_cuda.py [--shared ../shared] [--reps 100] [--sweep]
        [--json out.json] [--md out.md]

For exam cases 1 and 2 at N=1 and N=32 (the batch tiled from the one image), every precision
(INT8 through the tensor cores' mma and through dp4a) runs on device-resident inputs (PyTorch CUDA
tensors, so no host copies); the convolution kernel's time is the median of --reps CUDA-event-timed
calls. Baselines, timed the same way: cuDNN FP32 (torch conv2d, TF32 off, NCHW and channels-last,
best of), cuDNN FP16 channels-last, and cuBLASLt INT8 GEMM of the implicit-GEMM shape
(torch._int_mm, M = N*H*W, K = KH*KW*C, N = OC, B column-major). Peaks for dp4a, int8 and tf32 mma.sync and
(sm_90 only) int8 wgmma are measured by microbenchmarks in the same process. --sweep also times every
tile and split-K.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np


import qconv
from qconv.backends import _nvrtc, cuda as cb
from qconv.backends.cuda._driver import ck
from qconv.contract import Plan, parse_precision
from qconv.tensorfile import load as load_tensor

VARIANTS = [("fp32", {"fp32_path": "simt"}), ("fp32", {"fp32_path": "tf32x3"}), ("int32", {"int32_path": "simt"}), ("int32", {"int32_path": "mma"}),
            ("int16", {"int16_path": "simt"}), ("int16", {"int16_path": "mma"}), ("int8", {"int8_path": "mma"}),
            ("int8", {"int8_path": "wgmma"}), ("int8", {"int8_path": "wgmma", "tile": "window-ws"}),
            ("int8", {"int8_path": "dp4a"})]


def label_of(prec: str, opts: dict) -> str:
    """fp32-simt, fp32-tf32x3, int32-simt, int32-mma, int16-simt, int16-mma, int8-mma, int8-wgmma,
    int8-wgmma-window-ws (a tile named in the options follows the path), int8-dp4a."""
    path = opts.get(f"{prec}_path")
    return prec + ("-" + path if path else "") + ("-" + opts["tile"] if "tile" in opts else "")

PEAK_SRC = r"""
extern "C" __global__ void dp4a_peak(int* out, int iters, int a0, int b0) {
  int acc[8], a[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) { acc[j] = threadIdx.x + j; a[j] = a0 ^ (j * 0x01010101); }
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = __dp4a(a[j], b0, acc[j]);
  }
  int s = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) s += acc[j];
  if (s == 0x7fffffff) out[0] = s;
}
extern "C" __global__ void mma_peak(int* out, int iters, int a0, int b0) {
  int d[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j) for (int r = 0; r < 4; ++r) d[j][r] = threadIdx.x + r;
  unsigned a = a0 ^ threadIdx.x, b = b0;
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                   : "+r"(d[j][0]), "+r"(d[j][1]), "+r"(d[j][2]), "+r"(d[j][3])
                   : "r"(a), "r"(a + 1), "r"(a + 2), "r"(a + 3), "r"(b), "r"(b + 1));
  }
  int s = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) s += d[j][0] + d[j][1] + d[j][2] + d[j][3];
  if (s == 0x7fffffff) out[0] = s;
}
extern "C" __global__ void tf32_peak(int* out, int iters, int a0, int b0) {
  float d[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j) for (int r = 0; r < 4; ++r) d[j][r] = threadIdx.x + r;
  unsigned a = (a0 ^ threadIdx.x) & 0x3fffe000u, b = b0 & 0x3fffe000u;
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                   : "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
                   : "r"(a), "r"(a + 1), "r"(a + 2), "r"(a + 3), "r"(b), "r"(b + 1));
  }
  float s = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) s += d[j][0] + d[j][1] + d[j][2] + d[j][3];
  if (s == 1234.5f) out[0] = 1;
}
"""


# One warpgroup (128 threads) per block issuing m64nNk32 with A (64x32) and B (Nx32) from shared
# memory, K-major without swizzle: 8-row x 16-byte core matrices stored contiguously, so the two core
# matrices along K are 128 bytes apart (leading byte offset) and successive 8-row groups 256 bytes
# (stride byte offset). CHAINS sets of accumulators, each chained through its wgmmas (ordered by the
# hardware for one shape), issued alternately, with up to two commit groups of four in flight.
# N = 256, one chain: 154 registers, three blocks fit an SM. Smaller N, one block per SM, one or two
# chains: what one warpgroup of the window kernels (m64n128 / m64n64) can issue on its own.
WGMMA_PEAK_SRC = r"""
__device__ unsigned long long smem_desc(const void* p, unsigned lbo, unsigned sbo) {
  unsigned addr = (unsigned)__cvta_generic_to_shared(p);
  return (unsigned long long)((addr >> 4) & 0x3fff) | (unsigned long long)(lbo >> 4) << 16
         | (unsigned long long)(sbo >> 4) << 32;  // base offset 0, swizzle 0 (none)
}
#define WGMMA(D) asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                             \
    "wgmma.mma_async.sync.aligned.m64nNNk32.s32.s8.s8 {ACC}, %ADESC, %BDESC, p;\n}\n" : OUTS : "l"(da), "l"(db))
extern "C" __global__ void __launch_bounds__(128, 1) wgmma_peak(int* out, int iters, int a0, int b0) {
  __shared__ __align__(1024) int sm[(64 * 32 + NN * 32) / 4];
  for (int i = threadIdx.x; i < (64 * 32 + NN * 32) / 4; i += 128) sm[i] = a0 ^ b0;
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // generic writes -> wgmma reads
  __syncthreads();
  const unsigned long long da = smem_desc(sm, 128, 256), db = smem_desc(sm + 64 * 32 / 4, 128, 256);
  int d0[NN / 2], d1[NN / 2];
#pragma unroll
  for (int r = 0; r < NN / 2; ++r) {
    d0[r] = threadIdx.x + r;
    d1[r] = threadIdx.x - r;
    asm volatile("" : "+r"(d0[r]), "+r"(d1[r]));  // keeps the compiler from moving these past the fence
  }
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll 1
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < 4; j += 2) {
      WGMMA(d0);
      if (CHAINS == 2) WGMMA(d1); else WGMMA(d0);
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  int s = 0;
#pragma unroll
  for (int r = 0; r < NN / 2; ++r) s += d0[r] + (CHAINS == 2 ? d1[r] : 0);
  if (s == 0x7fffffff) out[0] = s;
}
"""


def wgmma_peak_src(n: int, chains: int = 1) -> str:
    """WGMMA_PEAK_SRC for m64n{n}k32 and 1 or 2 accumulator chains (the accumulator and operand
    lists written out: PTX needs them literal)."""
    r = n // 2
    return (WGMMA_PEAK_SRC.replace("ACC", ", ".join(f"%{i}" for i in range(r)))
            .replace("OUTS", ", ".join(f'"+r"(D[{i}])' for i in range(r)))
            .replace("ADESC", str(r)).replace("BDESC", str(r + 1)).replace("NN", str(n))
            .replace("CHAINS", str(chains)))


def _time_kernel(rt, f, name: str, blocks: int, threads: int, iters: int) -> float:
    """Median of five event-timed launches after one warm-up, in seconds."""
    import ctypes
    drv = rt.drv
    ev = rt.default.take_events(2)
    args = [ctypes.c_uint64(rt.default.scratch("peak_out", 16)), ctypes.c_int(iters),
            ctypes.c_int(0x01020304), ctypes.c_int(0x05060708)]
    ptrs = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    times = []
    try:
        for _ in range(6):
            rt.record(ev[0], rt.default.handle)
            ck(drv.cuLaunchKernel(f, blocks, 1, 1, threads, 1, 1, 0, rt.default.stream, ctypes.addressof(ptrs), 0), name)
            rt.record(ev[1], rt.default.handle)
            ck(drv.cuEventSynchronize(ev[1]), "sync")
            times.append(rt.elapsed(ev[0], ev[1]))
    finally:
        rt.default.give_events(ev)
    return statistics.median(times[1:])


def measure_wgmma_peak(rt, n: int = 256, chains: int = 1, per_sm: int = 0) -> float | None:
    """INT8 wgmma m64n{n}k32 ops/s on the whole GPU with `chains` accumulator chains per warpgroup and
    per_sm one-warpgroup blocks per SM (0: as many as fit), or None off sm_90 (wgmma needs sm_90a)."""
    if rt.arch != "sm_90":
        return None
    drv = rt.drv
    cubin = _nvrtc.compile_source(wgmma_peak_src(n, chains), {}, f"wgmma_peak_n{n}_c{chains}.cu", "sm_90a")
    mod = ck(drv.cuModuleLoadData(cubin), "cuModuleLoadData(wgmma_peak)")
    f = ck(drv.cuModuleGetFunction(mod, b"wgmma_peak"), "wgmma_peak")
    fit = int(ck(drv.cuOccupancyMaxActiveBlocksPerMultiprocessor(f, 128, 0), "occupancy(wgmma_peak)"))
    blocks, iters = rt.num_sms * max(1, min(fit, per_sm) if per_sm else fit), 2048
    return 4 * (2 * 64 * n * 32) * iters * blocks / _time_kernel(rt, f, "wgmma_peak", blocks, 128, iters)


def measure_peaks(rt) -> dict:
    drv = rt.drv
    cubin = _nvrtc.compile_source(PEAK_SRC, {}, "peaks.cu", rt.arch)
    mod = ck(drv.cuModuleLoadData(cubin), "cuModuleLoadData(peaks)")
    res = {}
    blocks, threads, iters = rt.num_sms * 8, 256, 4096
    for name, ops_per_iter in (("dp4a_peak", 8 * 8 * threads), ("mma_peak", 4 * 16 * 8 * 32 * 2 * (threads // 32)),
                               ("tf32_peak", 4 * 16 * 8 * 8 * 2 * (threads // 32))):
        f = ck(drv.cuModuleGetFunction(mod, name.encode()), name)
        res[name] = ops_per_iter * iters * blocks / _time_kernel(rt, f, name, blocks, threads, iters)
    res["wgmma_peak"] = measure_wgmma_peak(rt)
    for n in (128, 64):  # the window kernels' shapes: the whole SM, and one warpgroup's chains alone
        res[f"wgmma_peak_n{n}"] = measure_wgmma_peak(rt, n)
        for chains in (1, 2):
            res[f"wgmma_n{n}_1wg_{chains}chain"] = measure_wgmma_peak(rt, n, chains, per_sm=1)
    res["arch"] = rt.arch
    from qconv.backends.cuda._driver import _attr
    clock_khz = _attr(rt.dev, "CU_DEVICE_ATTRIBUTE_CLOCK_RATE")
    res["sm_clock_ghz_max"] = clock_khz / 1e6
    res["num_sms"] = rt.num_sms
    return res


def event_median(fn, reps: int) -> float:
    """Median event-timed GPU time of fn(), launches queued behind a GPU sleep so that the host's
    launch latency is not timed (the same treatment cuda.profile gives our kernels)."""
    import torch
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    done = 0
    while done < reps:
        batch = min(50, reps - done)
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(batch)]
        torch.cuda._sleep(int(40e6))  # ~20 ms at 2 GHz: longer than enqueueing the batch
        for s, e in ev:
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times += [s.elapsed_time(e) / 1e3 for s, e in ev]
        done += batch
    return statistics.median(times)


def baselines(x: np.ndarray, w: np.ndarray, reps: int) -> dict:
    import torch
    import torch.nn.functional as F
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    n, h, wd, c = x.shape
    kh, kw, oc, ic = w.shape
    xt = torch.from_numpy(x).cuda().permute(0, 3, 1, 2).contiguous()           # NCHW
    wt = torch.from_numpy(w).cuda().permute(2, 3, 0, 1).contiguous()           # OC, IC, KH, KW
    res = {}
    with torch.no_grad():
        res["cudnn_fp32_nchw"] = event_median(lambda: F.conv2d(xt, wt, padding="same"), reps)
        xc, wc = xt.to(memory_format=torch.channels_last), wt.to(memory_format=torch.channels_last)
        res["cudnn_fp32_cl"] = event_median(lambda: F.conv2d(xc, wc, padding="same"), reps)
        xh, wh = xc.half(), wc.half()
        res["cudnn_fp16_cl"] = event_median(lambda: F.conv2d(xh, wh, padding="same"), reps)
        m, k = n * h * wd, kh * kw * ic
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
        b = torch.randint(-127, 128, (oc, k), dtype=torch.int8, device="cuda").t()  # K x N column-major
        res["cublaslt_int8_gemm"] = event_median(lambda: torch._int_mm(a, b), reps)
    res["cudnn_fp32_best"] = min(res["cudnn_fp32_nchw"], res["cudnn_fp32_cl"])
    return res


def time_ours(xt, w, precision: str, scale, opts: dict, reps: int) -> dict:
    """Kernel times of the prepared call (fixed scales: the quantize phase is the x pass alone)."""
    prec = parse_precision(precision)
    plan = Plan(prec, s_x=None if scale is None else np.float32(scale[0]),
                s_w=None if scale is None else np.float32(scale[1]), options=dict(opts))
    r = cb.profile(plan, xt, w, reps)
    t = {"convolve": 0.0, "quantize": 0.0, "pack": 0.0, "dequantize": 0.0}
    t.update(r["median"])
    t.update({"kernel": r["kernel"], "split_k": r["split_k"]})
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = Path(__file__).resolve().parent.parent
    ap.add_argument("--shared", default=os.environ.get("QCONV_SHARED", str(here.parent / "shared")))
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--md")
    ap.add_argument("--paths", default="", help="comma-separated labels to run (fp32-simt,fp32-tf32x3,int32-simt,int32-mma,int16-simt,int16-mma,int8-mma,int8-wgmma,int8-dp4a); default all")
    ap.add_argument("--cases", default="1,2", help="exam cases, comma-separated")
    ap.add_argument("--batches", default="1,32", help="N values, comma-separated")
    args = ap.parse_args()
    import torch

    ok, why = cb.is_available()
    if not ok:
        print(f"cuda backend unavailable: {why}")
        return 1
    rt = cb._runtime()
    peaks = measure_peaks(rt)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        smi = "?"
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "card": why, "nvidia_smi": smi, "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(), "command": " ".join(sys.argv), "peaks": peaks}
    print(json.dumps(meta, indent=1))
    rows = []
    want = set(filter(None, args.paths.split(",")))
    for case in args.cases.split(","):
        d = Path(args.shared) / "data" / "exam" / case
        x1 = load_tensor(d / "input_tensor.bin")
        w = load_tensor(d / "kernel_tensor.bin")
        for n in (int(v) for v in args.batches.split(",")):
            x = np.ascontiguousarray(np.tile(x1, (n, 1, 1, 1)))
            kh, kw, oc, ic = w.shape
            flops = 2 * x.shape[0] * x.shape[1] * x.shape[2] * oc * kh * kw * ic
            base = baselines(x, w, args.reps)
            xt = torch.from_numpy(x).cuda()
            row = {"case": case, "n": n, "flops": flops, "baselines": base, "ours": {}}
            for prec, opts in VARIANTS:
                label = label_of(prec, opts)
                if want and label not in want:
                    continue
                scale = None
                if prec != "fp32":
                    r = qconv.conv2d_result(x1, w, prec, backend="reference", scale="maxabs")
                    scale = (r.scale_input, r.scale_kernel)
                t = time_ours(xt, w, prec, scale, opts, args.reps)
                cfg = t
                if prec != "fp32":
                    t["unfused"] = time_ours(xt, w, prec, scale, {**opts, "fuse_dequantize": False}, args.reps // 2)
                if args.sweep:
                    sw = {}
                    pr = parse_precision(prec)
                    tiles = cb._tiling.tiles_for(pr, opts.get("int8_path", "mma"),
                                                 cb._tiling.resolve_path(pr, opts.get(f"{prec}_path", "auto")))
                    if prec == "fp32" and opts.get("fp32_path", "auto") != "tf32x3":  # SIMT and outer product
                        tiles = cb.TILES + cb.OUTER_TILES
                    for tile in tiles:
                        for split in (1, 2, 4, 8):
                            try:
                                sw[f"{tile}/{split}"] = time_ours(xt, w, prec, scale,
                                                                  {**opts, "tile": tile, "split_k": split},
                                                                  max(10, args.reps // 5))["convolve"]
                            except Exception as e:  # noqa: BLE001 - report, keep sweeping
                                sw[f"{tile}/{split}"] = str(e)
                    t["sweep"] = sw
                    best = min((v, k) for k, v in sw.items() if isinstance(v, float))
                    t["sweep_best"] = {"config": best[1], "convolve": best[0]}
                row["ours"][label] = t
                print(f"case {case} N={n} {label:10s} conv {t['convolve']*1e6:8.1f} us "
                      f"{flops / t['convolve'] / 1e12:7.2f} TOP/s  cfg {cfg['kernel']} split {cfg['split_k']}"
                      + (f"  sweep best {t['sweep_best']['config']} {t['sweep_best']['convolve']*1e6:.1f} us" if args.sweep else ""),
                      flush=True)
            print(f"case {case} N={n} baselines (us): " + ", ".join(f"{k} {v*1e6:.1f}" for k, v in base.items()), flush=True)
            rows.append(row)
    md = table(meta, rows)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.md:
        Path(args.md).write_text(md)
    return 0


def table(meta: dict, rows: list) -> str:
    us = lambda s: f"{s * 1e6:.1f}"  # noqa: E731
    out = ["| case | N | path | conv us | TOP/s | quant us | dequant us (unfused) | vs cuDNN FP32 | vs cuDNN FP16 | vs cuBLASLt INT8 | kernel / split |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["baselines"]
        for label, t in r["ours"].items():
            c = t["convolve"]
            q = t["quantize"] + t["pack"]
            dq = t["unfused"]["dequantize"] if "unfused" in t else 0.0
            out.append(f"| {r['case']} | {r['n']} | {label} | {us(c)} | {r['flops'] / c / 1e12:.2f} | {us(q)} | "
                       f"{us(dq) if 'unfused' in t else '-'} | {b['cudnn_fp32_best'] / c:.2f}x | "
                       f"{b['cudnn_fp16_cl'] / c:.2f}x | {b['cublaslt_int8_gemm'] / c:.2f}x | {t['kernel']} / {t['split_k']} |")
        out.append(f"| {r['case']} | {r['n']} | baselines | cuDNN FP32 NCHW {us(b['cudnn_fp32_nchw'])}, "
                   f"CL {us(b['cudnn_fp32_cl'])}; cuDNN FP16 CL {us(b['cudnn_fp16_cl'])}; "
                   f"cuBLASLt INT8 {us(b['cublaslt_int8_gemm'])} | | | | | | | | |")
    p = meta["peaks"]
    out.append("")
    wg = p.get("wgmma_peak")
    wgmma = f"{wg / 1e12:.1f} TOP/s" if wg else f"skipped (needs sm_90a; this GPU is {p.get('arch', '?')})"
    if wg and p.get("wgmma_peak_n128"):
        wgmma += f" (m64n128 {p['wgmma_peak_n128'] / 1e12:.1f}, m64n64 {p['wgmma_peak_n64'] / 1e12:.1f})"
    out.append(f"Measured peaks: dp4a {p['dp4a_peak'] / 1e12:.1f} TOP/s, int8 mma.sync {p['mma_peak'] / 1e12:.1f} TOP/s, "
               f"int8 wgmma {wgmma}, tf32 mma.sync {p['tf32_peak'] / 1e12:.1f} TFLOP/s ({p['num_sms']} SMs, max SM clock {p['sm_clock_ghz_max']:.2f} GHz).")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
