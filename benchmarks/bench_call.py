"""The whole prepared call on the CPU, as a user makes it, beside its convolve phase and PyTorch.

    python3 benchmarks/bench_call.py [--threads 2] [--reps 200] [--sections layers,strided,depthwise,overhead]
                                     [--json out.json] [--md out.md]
    python3 benchmarks/bench_call.py --torch-only ...   (PyTorch's rows alone: what the default runs
                                                         in a child process, so the two libraries'
                                                         thread pools never share a process)
    python3 benchmarks/bench_call.py --qconv-only ...   (no PyTorch at all)

Sections (issue 8's and issue 10's CPU targets):

- layers: the exam layers (shipped samples) and ../shared/data/real at N=1, for fp32, int16 and
  int8 (maxabs: the input's scale is taken per call, in C) and int8 with a fixed scale pair:
    * prepared call: ``conv(x, out=y)`` timed from outside with perf_counter, median of --reps;
    * its convolve phase: ``conv.result(x).phases["convolve"]`` (timed in C), median; calls and
      results alternate, and call / convolve is the median of the per-pair ratios;
    * one-shot ``qconv.conv2d(x, w, ...)`` (prepare, then call), median of --reps // 4;
    * PyTorch on the same layer and threads, in its own process: ``F.conv2d`` FP32 on
      channels-last tensors; the quantized INT8 conv (``torch.ops.quantized.conv2d`` with weights
      prepacked once, x86/onednn engine) on an already-quantized input ("op"), and the same with
      ``quantize_per_tensor`` before and ``dequantize`` after ("float in/out", what a qconv call does).
- strided: 3x3 and 1x1 layers at stride 1 and 2 with equal FLOPs: convolve GOP/s and its share of
  the peak of the instruction c-avx2 declares bounds the level that ran (c_avx2.BOUND_INSTRUCTIONS:
  ymm FMA on AVX2, zmm FMA on AVX-512, tdpbssd for AMX INT8; qconv_peak, same threads), and stride
  2's share over stride 1's.
- depthwise: 3x3 and 5x5, C = 144..1152: bytes moved (float32 input + output) per second of the
  convolve phase (quantize fused into it, median) and of the whole call (median), against the
  fastest copy of the input (minimum time of numpy copyto, one thread or split over the same
  threads), which moves the same bytes at stride 1 (the input read and written once).
- overhead: a layer small enough that its call is mostly overhead: the whole prepared call against
  the bare C call (qconv_run with prebuilt arguments); the difference is one call's Python path.
  Beside it, PyTorch's call on the same layer (its child process, as in layers).

The GPU has its own script (bench_call_gpu.py); the timing helpers here take plain callables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from bench_cpu import cpu_name  # noqa: E402  (its folder is on sys.path: benchmarks run as scripts)
from layers import Layer, load_layers  # noqa: E402

VARIANTS = [  # label, precision, scale
    ("fp32", "fp32", None),
    ("int16", "int16", None),           # maxabs per call, reduced in C
    ("int8", "int8", None),
    ("int8 S", "int8", "fixed"),        # a fixed (s_x, s_w) pair: no reduction pass
]


# ---- helpers ----------------------------------------------------------------------------------

def wall_times(fn, reps: int, warm: int = 5) -> list[float]:
    """Wall times of fn() (perf_counter around each call), after warm-up calls."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def wall(fn, reps: int, warm: int = 5) -> float:
    """Median wall time of fn()."""
    return statistics.median(wall_times(fn, reps, warm))


def fixed_scale(x: np.ndarray, w: np.ndarray, q: int) -> tuple[float, float]:
    return (float(np.float32(q / np.max(np.abs(x)))), float(np.float32(q / np.max(np.abs(w)))))


# ---- qconv ------------------------------------------------------------------------------------

def qconv_call_rows(layers: list[Layer], threads: int, reps: int) -> list[dict]:
    import qconv
    from qconv.contract import check_layer
    rows = []
    for L in layers:
        x, w, layer = L.x, L.w, L.kwargs()
        geom = check_layer(x.shape, w.shape, stride=L.stride, padding=L.padding, groups=L.groups)
        for label, prec, scale in VARIANTS:
            if scale == "fixed":
                scale = fixed_scale(x, w, 127)
            conv = qconv.prepare(w, prec, "c-avx2", scale=scale, threads=threads, **layer)
            out = conv(x)
            for _ in range(20):
                conv(x, out=out)
            # Interleaved, so both see the same load: a call timed from outside, then a
            # result() whose C-timed phases stand for the convolve phase at that moment.
            calls, phases = [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                conv(x, out=out)
                calls.append(time.perf_counter() - t0)
                phases.append(conv.result(x, out=out).phases)
            call = statistics.median(calls)
            med = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
            ratio = statistics.median(c / p["convolve"] for c, p in zip(calls, phases))
            ones = wall_times(lambda: qconv.conv2d(x, w, prec, "c-avx2", scale=scale, threads=threads, **layer),
                              max(10, reps // 4), warm=3)
            one = statistics.median(ones)
            rows.append({"layer": L.name, "x": list(x.shape), "w": list(w.shape), "variant": label,
                         "threads": threads, "call_s": call, "one_shot_s": one, "flops": geom.flops,
                         "call_min_s": min(calls), "one_shot_min_s": min(ones), "call_over_convolve": ratio,
                         "convolve_min_s": min(p["convolve"] for p in phases),
                         **{f"{k}_s": v for k, v in med.items()}})
            print(f"  qconv {L.name} {label}: call {call * 1e3:.3f} ms, convolve {med['convolve'] * 1e3:.3f} ms, "
                  f"one-shot {one * 1e3:.3f} ms", file=sys.stderr, flush=True)
    return rows


def peak_gmacs(instruction: str, threads: int) -> float:
    """G MAC/s of one instruction (qconv_peak), best of 5 runs of ~50 ms, at `threads`."""
    from qconv.backends import _cext
    macs, secs = _cext.peak(instruction, threads, 1000)
    iters = max(1000, int(1000 * 0.05 / max(secs, 1e-6)))
    return max(m / s / 1e9 for m, s in (_cext.peak(instruction, threads, iters) for _ in range(5)))


STRIDED = [  # name, x shape, w shape, stride: pairs of equal FLOPs (ResNet-50 shapes)
    ("3x3 s1", (1, 56, 56, 64), (3, 3, 64, 64), 1),
    ("3x3 s2", (1, 112, 112, 64), (3, 3, 64, 64), 2),
    ("1x1 s1", (1, 28, 28, 256), (1, 1, 512, 256), 1),
    ("1x1 s2", (1, 56, 56, 256), (1, 1, 512, 256), 2),
]


def strided_rows(threads: int, reps: int) -> list[dict]:
    import qconv
    from qconv.backends import c_avx2
    from qconv.contract import Precision, check_layer
    rng = np.random.default_rng(0)
    pk: dict[str, float] = {}   # instruction -> G MAC/s at `threads`, measured once
    rows = []
    for name, xs, ws, s in STRIDED:
        x = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
        geom = check_layer(xs, ws, stride=s)
        for prec in ("fp32", "int16", "int8"):
            conv = qconv.prepare(w, prec, "c-avx2", stride=s, threads=threads)
            out = conv(x)
            for _ in range(5):
                conv(x, out=out)
            phases = [conv.result(x, out=out).phases for _ in range(reps // 4 or 1)]
            conv_s = statistics.median(p["convolve"] for p in phases)
            prep_s = statistics.median(p["quantize"] + p["pack"] for p in phases)   # fp32: the padded copy
            call = wall(lambda: conv(x, out=out), reps // 4 or 1)
            gops = geom.flops / conv_s / 1e9
            # the instruction the backend declares bounds this level's kernel, at its own width
            bound = c_avx2.bound_instruction({"threads": threads}, Precision(prec))
            ins, per_mac = bound if bound else (None, 1)
            if ins is not None and ins not in pk:
                pk[ins] = peak_gmacs(ins, threads)
            rows.append({"layer": name, "x": list(xs), "w": list(ws), "stride": s, "precision": prec,
                         "convolve_s": conv_s, "quantize_s": prep_s, "call_s": call, "gops": gops, "instr": ins or "-",
                         "peak_pct": 100 * gops / (2 * pk[ins] / per_mac) if ins else None})
            print(f"  strided {name} {prec}: {conv_s * 1e3:.3f} ms, {gops:.0f} GOP/s", file=sys.stderr, flush=True)
    return rows


DEPTHWISE = [  # x shape, kernel size, stride
    ((1, 56, 56, 144), 3, 1), ((1, 28, 28, 144), 3, 2), ((1, 14, 14, 576), 3, 1), ((1, 7, 7, 1152), 3, 1),
    ((1, 28, 28, 240), 5, 1), ((1, 14, 14, 672), 5, 1), ((1, 7, 7, 1152), 5, 1),
]


def tiny_layer() -> Layer:
    """The overhead section's layer (PyTorch's child times it too)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 8, 16), dtype=np.float32)
    w = rng.standard_normal((3, 3, 16, 16), dtype=np.float32)
    return Layer(f"{x.shape} x {w.shape}", None, x, w)


def overhead_rows(threads: int, reps: int) -> list[dict]:
    """A layer so small that its call is mostly overhead: the whole prepared call, the bare C call
    (lib.qconv_run with its arguments built once, no Python around it), and the difference, which
    is the Python path of one call (checks, cffi, the result)."""
    import qconv
    from qconv.backends import _cext
    ffi, lib = _cext._lib()
    tiny = tiny_layer()
    x, w = tiny.x, tiny.w
    rows = []
    for prec in ("fp32", "int8"):
        conv = qconv.prepare(w, prec, "c-avx2", threads=threads)
        p, g = conv._packed, conv.geometry(x.shape)
        y = np.empty(g.out_shape, np.float32)
        t = ffi.new("qconv_timings *")
        args = (p._handle, ffi.from_buffer("float[]", x), g.n, g.h, g.w, g.pt, g.pb, g.pl, g.pr, g.ho, g.wo,
                p._s_x, p._q, ffi.from_buffer("float[]", y, require_writable=True), t, ffi.NULL)
        call, bare = wall(lambda: conv(x), reps * 10, 100), wall(lambda: lib.qconv_run(*args), reps * 10, 100)
        rows.append({"layer": tiny.name, "precision": prec, "call_s": call, "c_call_s": bare})
    return rows


def copy_time(x: np.ndarray, threads: int, reps: int) -> float:
    """The fastest copy of x this machine does: the minimum over --reps of a single-threaded
    np.copyto and of one split over `threads` Python threads (numpy releases the GIL), whichever
    is faster (the thread hand-off costs tens of microseconds on small arrays)."""
    dst = np.empty_like(x)
    flat_s, flat_d = x.reshape(-1), dst.reshape(-1)

    def best(fn):
        for _ in range(5):
            fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    t1 = best(lambda: np.copyto(flat_d, flat_s))
    if threads == 1:
        return t1
    bounds = np.linspace(0, flat_s.size, threads + 1).astype(int)
    parts = [(flat_d[a:b], flat_s[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(threads) as ex:
        tn = best(lambda: list(ex.map(lambda p: np.copyto(*p), parts)))
    return min(t1, tn)


def depthwise_rows(threads: int, reps: int) -> list[dict]:
    import qconv
    from qconv.contract import check_layer
    rng = np.random.default_rng(1)
    rows = []
    for xs, k, s in DEPTHWISE:
        c = xs[3]
        x = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal((k, k, c, 1)).astype(np.float32)
        geom = check_layer(xs, w.shape, stride=s, groups=c)
        moved = 4 * (x.size + int(np.prod(geom.out_shape)))
        t_copy = copy_time(x, threads, reps)
        copy_bw = 2 * x.nbytes / t_copy
        for prec in ("fp32", "int16", "int8"):
            conv = qconv.prepare(w, prec, "c-avx2", stride=s, groups=c, threads=threads)
            out = conv(x)
            call = wall(lambda: conv(x, out=out), reps)
            conv_s = statistics.median(conv.result(x, out=out).phases["convolve"] for _ in range(reps // 2 or 1))
            rows.append({"x": list(xs), "k": k, "stride": s, "precision": prec, "convolve_s": conv_s, "call_s": call,
                         "copy_s": t_copy, "bytes": moved, "copy_gbs": copy_bw / 1e9,
                         "convolve_gbs": moved / conv_s / 1e9, "call_gbs": moved / call / 1e9,
                         "convolve_pct": 100 * (moved / conv_s) / copy_bw, "call_pct": 100 * (moved / call) / copy_bw})
            print(f"  depthwise {xs} {k}x{k} s{s} {prec}: {conv_s * 1e6:.1f} us, copy {t_copy * 1e6:.1f} us",
                  file=sys.stderr, flush=True)
    return rows


# ---- PyTorch (its own process) ---------------------------------------------------------------

def torch_rows(layers: list[Layer], threads: int, reps: int) -> list[dict]:
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    import torch.nn.functional as F
    from qconv.contract import check_layer
    torch.set_num_threads(threads)
    engines = [e for e in ("x86", "onednn", "fbgemm") if e in torch.backends.quantized.supported_engines]
    torch.backends.quantized.engine = engines[0]
    rows = []
    with torch.inference_mode():
        for L in layers:
            x, w, s, g = L.x, L.w, L.stride, L.groups
            stride = (s, s) if isinstance(s, int) else tuple(s)
            geom = check_layer(x.shape, w.shape, stride=stride, padding=L.padding, groups=g)
            pads = (geom.pl, geom.pr, geom.pt, geom.pb)
            sym = geom.pl == geom.pr and geom.pt == geom.pb
            xt = torch.from_numpy(x).permute(0, 3, 1, 2)             # NHWC memory: channels-last NCHW view
            wt = torch.from_numpy(np.ascontiguousarray(w.transpose(2, 3, 0, 1))).contiguous(
                memory_format=torch.channels_last)
            bt = None if L.bias is None else torch.from_numpy(L.bias)
            pad_arg = (geom.pt, geom.pl) if sym else 0

            def fp32():
                xin = xt if sym else F.pad(xt, pads)
                return F.conv2d(xin, wt, bt, stride, pad_arg, 1, g)

            f32t = wall_times(fp32, reps, warm=20)
            t_fp32 = statistics.median(f32t)
            # INT8: per-tensor scales from the data (maxabs), weights prepacked once.
            sx = float(np.max(np.abs(x))) / 127 * 2    # quint8 with zero point 128: range +-127 * s
            sw = float(np.max(np.abs(w))) / 127
            wq = torch.quantize_per_tensor(torch.from_numpy(np.ascontiguousarray(w.transpose(2, 3, 0, 1))), sw, 0,
                                           torch.qint8)
            packed = torch.ops.quantized.conv2d_prepack(wq, bt, list(stride), [geom.pt, geom.pl] if sym else [0, 0],
                                                        [1, 1], g)
            out_scale = float(np.max(np.abs(x))) * float(np.max(np.abs(w))) * w.shape[0] * w.shape[1] * w.shape[3] / 127 / 8
            xq = torch.quantize_per_tensor((xt if sym else F.pad(xt, pads)).contiguous(memory_format=torch.channels_last),
                                           sx, 128, torch.quint8)

            def int8_op():
                return torch.ops.quantized.conv2d(xq, packed, out_scale, 128)

            def int8_float():
                xin = (xt if sym else F.pad(xt, pads)).contiguous(memory_format=torch.channels_last)
                q = torch.quantize_per_tensor(xin, sx, 128, torch.quint8)
                return torch.ops.quantized.conv2d(q, packed, out_scale, 128).dequantize()

            opt, flt = wall_times(int8_op, reps, warm=20), wall_times(int8_float, reps, warm=20)
            t_op, t_fl = statistics.median(opt), statistics.median(flt)
            rows.append({"layer": L.name, "threads": threads, "torch_fp32_s": t_fp32, "torch_int8_op_s": t_op,
                         "torch_int8_float_s": t_fl, "torch_fp32_min_s": min(f32t), "torch_int8_op_min_s": min(opt),
                         "torch_int8_float_min_s": min(flt), "engine": engines[0], "torch": torch.__version__})
            print(f"  torch {L.name}: fp32 {t_fp32 * 1e3:.3f} ms, int8 op {t_op * 1e3:.3f} ms, "
                  f"int8 float in/out {t_fl * 1e3:.3f} ms", file=sys.stderr, flush=True)
    return rows


def torch_in_child(args) -> list[dict] | None:
    """PyTorch's rows from a child process (its OpenMP pool never meets qconv's), or None."""
    cmd = [sys.executable, __file__, "--torch-only", "--threads", str(args.threads), "--reps", str(args.reps),
           "--sections", args.sections, "--json", "-"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(p.stderr)
    if p.returncode != 0:
        print(f"(PyTorch rows skipped: the child exited {p.returncode})", file=sys.stderr)
        return None
    return json.loads(p.stdout)["torch"]


# ---- report -----------------------------------------------------------------------------------

def ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.3f}"


def render(out: dict) -> str:
    lines = [f"Measured {out['date']} on {out['cpu']} ({out['cpus']} logical CPUs), {out['threads']} threads, "
             f"kernel family `{out['isa']}`, Python {out['python']}" +
             (f", PyTorch {out['torch_version']} (`{out['torch_engine']}` quantized engine, own process)"
              if out.get("torch_version") else "") + ".", "", f"Command: `{out['command']}`", ""]
    if out.get("layers"):
        torch = {r["layer"]: r for r in out.get("torch") or []}
        lines += ["Medians, and (in brackets) minimums, which other load on the machine can only raise. "
                  "call / convolve: the median over calls of (call time / the convolve phase of the "
                  "result() timed right after it), and (in brackets) the ratio of the minimums.", "",
                  "| layer | variant | prepared call ms | convolve ms | call / convolve | quantize+pack ms | "
                  "one-shot ms | one-shot / convolve | torch FP32 CL ms | torch INT8 op ms | torch INT8 float in/out ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in out["layers"]:
            t = torch.get(r["layer"], {})
            v = r["variant"]
            def tc(k):
                return f"{ms(t.get(k + '_s'))} ({ms(t.get(k + '_min_s'))})" if t else "-"
            cols = [tc("torch_fp32") if v == "fp32" else "-",
                    tc("torch_int8_op") if v.startswith("int8") else "-",
                    tc("torch_int8_float") if v.startswith("int8") else "-"]
            lines.append(f"| {r['layer']} | {v} | {ms(r['call_s'])} ({ms(r['call_min_s'])}) | "
                         f"{ms(r['convolve_s'])} ({ms(r['convolve_min_s'])}) | "
                         f"{r['call_over_convolve']:.2f} ({r['call_min_s'] / r['convolve_min_s']:.2f}) | "
                         f"{ms(r['quantize_s'] + r['pack_s'])} | {ms(r['one_shot_s'])} ({ms(r['one_shot_min_s'])}) | "
                         f"{r['one_shot_s'] / r['convolve_s']:.2f} ({r['one_shot_min_s'] / r['convolve_min_s']:.2f}) | "
                         f"{' | '.join(cols)} |")
        lines.append("")
    if out.get("strided"):
        lines += ["| layer | x | kernel | precision | quantize (fp32: pack) ms | convolve ms | GOP/s | instr | % peak | "
                  "stride 2 / stride 1 share |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        by = {(r["layer"], r["precision"]): r for r in out["strided"]}
        for r in out["strided"]:
            rel = "-"
            if r["stride"] == 2:
                base = by.get((r["layer"].replace("s2", "s1"), r["precision"]))
                rel = f"{r['gops'] / base['gops']:.2f}" if base else "-"   # equal FLOPs, same peak: the share's ratio
            pct = "-" if r["peak_pct"] is None else f"{r['peak_pct']:.0f}"
            lines.append(f"| {r['layer']} | {tuple(r['x'])} | {tuple(r['w'])} | {r['precision']} | "
                         f"{ms(r.get('quantize_s', float('nan')))} | {ms(r['convolve_s'])} | "
                         f"{r['gops']:.0f} | {r['instr']} | {pct} | {rel} |")
        lines.append("")
    if out.get("depthwise"):
        lines += ["| x | kernel | stride | precision | convolve us | whole call us | copy us | MB moved | "
                  "convolve GB/s | copy GB/s | convolve % of copy | call % of copy |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in out["depthwise"]:
            lines.append(f"| {tuple(r['x'])} | {r['k']}x{r['k']} | {r['stride']} | {r['precision']} | "
                         f"{r['convolve_s'] * 1e6:.1f} | {r['call_s'] * 1e6:.1f} | {r['copy_s'] * 1e6:.1f} | "
                         f"{r['bytes'] / 1e6:.2f} | {r['convolve_gbs']:.1f} | {r['copy_gbs']:.1f} | "
                         f"{r['convolve_pct']:.0f} | {r['call_pct']:.0f} |")
        lines.append("")
    if out.get("overhead"):
        torch = {r["layer"]: r for r in out.get("torch") or []}
        lines += ["| layer | precision | whole call us | C call us | Python us | torch call us |",
                  "|---|---|---|---|---|---|"]
        for r in out["overhead"]:
            t = torch.get(r["layer"], {}).get("torch_fp32_s" if r["precision"] == "fp32" else "torch_int8_float_s")
            lines.append(f"| {r['layer']} | {r['precision']} | {r['call_s'] * 1e6:.1f} | {r['c_call_s'] * 1e6:.1f} | "
                         f"{(r['call_s'] - r['c_call_s']) * 1e6:.1f} | {'-' if t is None else f'{t * 1e6:.1f}'} |")
        lines.append("(torch call: F.conv2d channels-last for fp32; quantize, quantized conv2d, dequantize for int8, "
                     "as one qconv call does.)")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=200, help="timed calls per configuration (median)")
    ap.add_argument("--sections", default="layers,strided,depthwise")
    ap.add_argument("--torch-only", action="store_true", help="only PyTorch's rows (JSON with --json -)")
    ap.add_argument("--qconv-only", action="store_true", help="no PyTorch rows")
    ap.add_argument("--json", help="write the results as JSON here ('-': stdout)")
    ap.add_argument("--md", help="write the markdown tables here")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    layers = load_layers() if "layers" in sections else []
    if args.torch_only:
        res = {"torch": torch_rows(layers + ([tiny_layer()] if "overhead" in sections else []), args.threads,
                                   args.reps)}
        text = json.dumps(res)
        if args.json == "-":
            print(text)
        elif args.json:
            Path(args.json).write_text(text)
        return 0
    from qconv.pools import quiet_blas
    with quiet_blas():  # numpy's BLAS pool must not spin beside the timed C workers (qconv.pools)
        return measure(args, layers, sections)


def measure(args, layers: list[Layer], sections: set[str]) -> int:
    from qconv.backends import _cext
    out = {"date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "cpu": cpu_name(),
           "cpus": os.cpu_count(), "threads": args.threads, "isa": _cext.best_isa("auto"),
           "python": platform.python_version(),
           "command": "python3 benchmarks/bench_call.py " + " ".join(sys.argv[1:])}
    if "layers" in sections:
        out["layers"] = qconv_call_rows(layers, args.threads, args.reps)
    if sections & {"layers", "overhead"} and not args.qconv_only:
        t = torch_in_child(args)
        if t:
            out["torch"] = t
            out["torch_version"], out["torch_engine"] = t[0]["torch"], t[0]["engine"]
    if "strided" in sections:
        out["strided"] = strided_rows(args.threads, args.reps)
    if "depthwise" in sections:
        out["depthwise"] = depthwise_rows(args.threads, args.reps)
    if "overhead" in sections:
        out["overhead"] = overhead_rows(args.threads, args.reps)
    text = render(out)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
