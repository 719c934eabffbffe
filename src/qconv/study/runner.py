"""The study: measure every layer x backend x precision, sweep the scales, write the artifacts.

    from qconv.study import run_study, load_layers
    results = run_study(load_layers(["path/to/layer_dir"]), "out/")

Order of work per layer: the float64 reference; for each integer precision the scale sweeps
(single S with rounding to nearest, with pairs; single S with truncation) and maxabs; then each
backend x precision, timed over `repeat` runs after one warm-up run (which also gives NRMSE,
wrapped outputs and a bit-exactness check against the contract). Integer precisions run with the
best per-tensor scales the sweep found (separate s_x, s_w: still naive, no calibration), so each
option's NRMSE is what that precision can give; the assignment's single S is in the sweep tables.

Ctrl-C (KeyboardInterrupt) at any point writes what was measured — results.json marked
"partial", results.csv, and the plots and report that the data allows — then re-raises.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import api
from ..backends import available_backends
from ..backends.base import PHASES
from ..contract import (Precision, conv2d_float64, conv_spec, maxabs_scale, conv2d_int_wrapped, dequant_factor, dequantize,
                        fp32_error_bound, parse_precision, quantize)
from ..errors import QconvError
from ..scales import for_call as choose_scale
from ..sweep import evaluate_scales, sweep_scales
from ..tensorfile import load_pair
from . import energy, machine

SCHEMA_NAME = "qconv-study-results"
SCHEMA_VERSION = 1
BASELINE_ORDER = (("c-scalar", "fp32"), ("reference", "fp32"))
INT_PRECISIONS = ("int32", "int16", "int8")


def output_bits_nrmse(bits: int) -> float:
    """NRMSE of storing the output itself uniformly in `bits` bits over its range: step/sqrt(12)."""
    return 1.0 / ((2**bits - 1) * math.sqrt(12.0))


def effective_bits(nrmse: float | None) -> float | None:
    """The output precision an NRMSE corresponds to (inverse of output_bits_nrmse)."""
    if nrmse is None or not math.isfinite(nrmse):
        return None
    if nrmse <= 0:
        return 64.0
    return math.log2(1.0 + 1.0 / (nrmse * math.sqrt(12.0)))


@dataclass
class Layer:
    name: str
    x: np.ndarray
    w: np.ndarray
    input_path: str | None = None
    kernel_path: str | None = None


def load_layers(specs: Sequence[str]) -> list[Layer]:
    """LAYERS as the CLI takes them: a directory holding input_tensor.bin and kernel_tensor.bin,
    or 'input.bin:kernel.bin'."""
    layers: list[Layer] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            ip, kp = p / "input_tensor.bin", p / "kernel_tensor.bin"
            for f in (ip, kp):
                if not f.is_file():
                    raise QconvError(f"layer {spec}: {f.name} is missing (a layer directory holds "
                                     f"input_tensor.bin and kernel_tensor.bin)")
            name = p.resolve().name
        elif ":" in spec:
            a, b = spec.rsplit(":", 1)
            ip, kp = Path(a), Path(b)
            name = ip.stem
        else:
            raise QconvError(f"layer {spec!r}: give a directory with input_tensor.bin and "
                             f"kernel_tensor.bin, or INPUT.bin:KERNEL.bin")
        x, w = load_pair(ip, kp)
        layers.append(Layer(name, x, w, str(ip), str(kp)))
    names = [l.name for l in layers]
    for i, l in enumerate(layers):  # make names unique
        if names.count(l.name) > 1:
            l.name = f"{l.name}#{names[:i + 1].count(l.name)}"
    return layers


def _storage_nrmse(t: np.ndarray) -> float:
    """NRMSE of storing a tensor itself in INT8 (maxabs scale, Q = 127): the data's own 8-bit step."""
    m = float(np.max(np.abs(t)))
    if m == 0.0:
        return 0.0
    s = np.float32(127.0 / m)
    q = quantize(t, s, Precision.INT8)
    back = q.astype(np.float64) / float(s)
    from ..contract import nrmse
    return nrmse(back, t.astype(np.float64))


def _per_channel_maxabs(x: np.ndarray, w: np.ndarray, p: Precision, ref: np.ndarray) -> tuple | None:
    """Beyond the assignment: maxabs with one kernel scale per output channel (the contract's
    per-channel extension), evaluated with the contract's arithmetic: quantize each channel with
    its own s_w[o], exact int32-wrapped convolution, dequantize with inv[o]. No backend runs it
    yet; it shows what per-tensor scales leave on the table."""
    from ..contract import conv2d_quantized, conv_spec, nrmse
    from ..scales import for_kernel, maxabs_q
    oc = w.shape[2]
    q = maxabs_q(p, w.shape[0] * w.shape[1] * w.shape[3])
    choice = for_kernel("maxabs-per-channel", p, w, conv_spec(w.shape))
    s_x, s_w = maxabs_scale(x, q), choice.s_w
    y, _, wrapped = conv2d_quantized(x, w, p, s_x, s_w)
    gm = float(np.exp(np.mean(np.log(np.asarray(s_w, dtype=np.float64)))))
    why = (f"maxabs with one kernel scale per output channel ({oc} scales, {float(min(s_w)):.4g} .. "
           f"{float(max(s_w)):.4g}; s_w here is their geometric mean), Q = {q}: beyond the assignment, "
           f"evaluated with the contract's arithmetic")
    return float(s_x), gm, nrmse(y, ref), wrapped / ref.size, "nearest", why


def _stats(values: Sequence[float]) -> dict[str, float]:
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q[0], "q3": q[2]}


def _clean(o: Any) -> Any:
    """JSON-safe: non-finite floats become null, numpy scalars become Python numbers."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, (int, np.integer)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        f = float(o)
        return f if math.isfinite(f) else None
    return o


class Study:
    def __init__(self, layers: Sequence[Layer], out_dir: "str | os.PathLike[str]", *,
                 backends: Sequence[str] | None = None, precisions: Sequence[str] | None = None,
                 batch: int = 1, repeat: int = 5, quick: bool = False, progress: bool = True,
                 command: str | None = None, measure_energy: bool = True,
                 plots: bool = True) -> None:
        if not layers:
            raise QconvError("the study needs at least one layer")
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            raise QconvError(f"layer names must be unique, got {names}")
        if batch < 1:
            raise QconvError(f"--batch must be >= 1, got {batch}")
        if repeat < 1:
            raise QconvError(f"--repeat must be >= 1, got {repeat}")
        if plots:
            try:  # fail before minutes of measuring, not after
                __import__("matplotlib")
            except ImportError:
                raise QconvError("the study draws its plots with matplotlib, which is not installed: "
                                 "pip install 'qconv[plot]' (or pass plots=False)") from None
        self.layers = list(layers)
        self.out = Path(out_dir)
        try:  # an unusable output folder is an error now, not after the measurements
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QconvError(f"output folder {self.out}: cannot create it ({e.strerror or e})") from None
        if not os.access(self.out, os.W_OK):
            raise QconvError(f"output folder {self.out}: not writable")
        self.quick, self.batch, self.repeat = quick, batch, repeat
        self.progress, self.plots = progress, plots
        self.command = command
        precs = [parse_precision(p) for p in (precisions or ["fp32", "int32", "int16", "int8"])]
        self.precisions = list(dict.fromkeys(precs))
        avail = available_backends()
        if backends is None:
            self.backends = [b for b, (ok, _) in avail.items() if ok]
        else:
            self.backends = []
            for b in backends:
                key = b.strip().lower()
                if key not in avail:
                    raise QconvError(f"unknown backend {b!r}: choose from {', '.join(avail)}")
                if not avail[key][0]:
                    raise QconvError(f"backend {key!r} is unavailable: {avail[key][1]}")
                if key not in self.backends:
                    self.backends.append(key)
        # Baseline first so speedups can be computed as soon as possible; then the registry order.
        order = {name: i for i, name in enumerate(["c-scalar", "reference", "c-avx2", "cuda"])}
        self.backends.sort(key=lambda b: order.get(b, 99))
        # What is timed: (label, backend, options). c-avx2 runs its AVX2 kernels (the assignment's
        # Problem 3) and, where the CPU has a VNNI family, that too under its own label.
        # CUDA runs its default INT8 path (tensor-core mma) and, for INT8 only, dp4a as well.
        self.runs: list[tuple[str, str, dict[str, Any]]] = []
        self.run_precisions: dict[str, set[Precision]] = {}
        for b in self.backends:
            if b == "c-avx2":
                self.runs.append(("c-avx2", b, {"isa": "avx2"}))
                best = _best_isa()
                if best not in (None, "avx2"):
                    self.runs.append((f"c-avx2-{best}", b, {"isa": best}))
            elif b == "cuda":
                self.runs.append(("cuda", b, {}))
                if Precision.INT8 in self.precisions:
                    self.runs.append(("cuda-dp4a", b, {"int8_path": "dp4a"}))
                    self.run_precisions["cuda-dp4a"] = {Precision.INT8}
            else:
                self.runs.append((b, b, {}))
        # NVML is opened whenever it can be (it also names the GPU); it meters only cuda runs.
        off = (None, "energy measurement turned off")
        nvml, nvml_why = energy.nvml_meter() if measure_energy else off
        rapl, rapl_why = energy.rapl_meter() if measure_energy else off
        self.meters = {"nvml": nvml, "rapl": rapl}
        gpu_name = nvml.device if nvml is not None else None
        if gpu_name is None and avail.get("cuda", (False, ""))[0]:
            gpu_name = avail["cuda"][1].split(" (sm_")[0]  # the cuda backend's probe names the GPU first
        self.machine = machine.describe(gpu_name)
        self.machine["backends"] = {k: {"available": ok, "reason": why} for k, (ok, why) in avail.items()}
        self.machine["energy_meters"] = {
            "nvml": {"available": nvml is not None, "detail": nvml.device if nvml else nvml_why},
            "rapl": {"available": rapl is not None, "detail": rapl.device if rapl else rapl_why},
        }
        self.results: dict[str, Any] = {
            "schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "status": "running",
            "partial_reason": None, "command": command, "machine": self.machine,
            "config": {"backends": [r[0] for r in self.runs], "precisions": [p.value for p in self.precisions],
                       "batch": batch, "repeat": repeat, "warmup": 1, "quick": quick,
                       "scale_for_integer_runs": "the sweep's best single S (rounding to nearest)"},
            "units": {"time": "s (suffix _s)", "energy": "J (suffix _j)", "throughput": "G ops/s (2 ops per multiply-add)",
                      "nrmse": "dimensionless, RMSE / (max - min) of the float64 reference output",
                      "effective_bits": "bits: log2(1 + 1/(NRMSE*sqrt(12)))", "scale": "dimensionless multiplier"},
            "energy_model": energy.model(),
            "layers": [], "measurements": [], "sweeps": [], "strategies": [], "summary": {},
            "plots": [], "elapsed_s": None,
        }
        self._bar: Any = None
        self.peaks: dict[tuple[str, int], float] = {}
        self._peak_keys: dict[tuple[str, str], tuple[str, int]] = {}
        self.machine["measured_peaks"] = []

    # ---------------------------------------------------------------------------- progress bar
    def _steps(self) -> int:
        n_int = sum(p.is_integer for p in self.precisions)
        return len(self.layers) * (2 * n_int + sum(len(self._precisions_of(r[0])) for r in self.runs)
                                   + self.repeat)

    def _precisions_of(self, label: str) -> list[Precision]:
        only = self.run_precisions.get(label)
        return [p for p in self.precisions if only is None or p in only]

    def _open_bar(self) -> None:
        if not self.progress:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=self._steps(), file=sys.stderr, unit="step", dynamic_ncols=True,
                         desc="qconv study")

    def _tick(self, what: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(1)

    def _measure_peaks(self) -> None:
        tries, seconds = (3, 0.02) if self.quick else (5, 0.05)
        got = machine.measure_peaks(set(self._peak_keys.values()), tries, seconds)
        for k, g in got.items():
            self.peaks[k] = max(g, self.peaks.get(k, 0.0))
        self.machine["measured_peaks"] = [{"instruction": i, "threads": t, "gops": g}
                                          for (i, t), g in sorted(self.peaks.items())]

    # ---------------------------------------------------------------------------------- layers
    def _layer_info(self, layer: Layer, x: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
        kh, kw, oc, ic = layer.w.shape
        n, h, wd, c = x.shape
        k = kh * kw * ic
        return {
            "name": layer.name, "input_path": layer.input_path, "kernel_path": layer.kernel_path,
            "input_shape": list(x.shape), "kernel_shape": list(layer.w.shape),
            "output_shape": [n, h, wd, oc], "k": k, "flops": 2 * n * h * wd * oc * k,
            "input_absmax": float(np.max(np.abs(x))), "kernel_absmax": float(np.max(np.abs(layer.w))),
            "output_min": float(ref.min()), "output_max": float(ref.max()),
            "overflow_free_q": {p: int(min(Precision(p).qmax, math.isqrt((2**31 - 1) // k)))
                                for p in INT_PRECISIONS},
            "input_int8_nrmse": _storage_nrmse(x), "kernel_int8_nrmse": _storage_nrmse(layer.w),
        }

    def _sweeps(self, layer: Layer, x: np.ndarray, ref: np.ndarray, p: Precision) -> dict[str, Any]:
        fine = 2 if self.quick else 8
        kw = dict(reference=ref, fine_per_octave=fine)
        near = sweep_scales(x, layer.w, p, rounding="nearest", pairs=True,
                            pair_stride=3 if self.quick else None,
                            pair_min_step=0.5 if self.quick else 0.25, **kw)
        self._tick(f"{layer.name} sweep {p.value}")
        trunc = sweep_scales(x, layer.w, p, rounding="truncate", pairs=False, **kw)
        self._tick(f"{layer.name} sweep {p.value} truncate")
        for table in (near, trunc):
            d = table.to_dict()
            d["layer"] = layer.name
            self.results["sweeps"].append(d)
        # maxabs, evaluated exactly as the contract defines it
        mc = choose_scale("maxabs", p, x, layer.w, conv_spec(layer.w.shape))
        ma = evaluate_scales(x, layer.w, p, maxabs_scale(x, mc.input_q), mc.s_w, reference=ref)
        strat = []
        b, bt, bp = near.best_single, trunc.best_single, near.best_pair
        strat.append(("maxabs", ma.s_x, ma.s_w, ma.nrmse, ma.wrapped_fraction, "nearest", mc.reason))
        strat.append(("sweep-S", b.s_x, b.s_w, b.nrmse, b.wrapped_fraction, "nearest", near.reason))
        strat.append(("sweep-S-truncate", bt.s_x, bt.s_w, bt.nrmse, bt.wrapped_fraction, "truncate", trunc.reason))
        if bp is not None:
            strat.append(("sweep-pair", bp.s_x, bp.s_w, bp.nrmse, bp.wrapped_fraction, "nearest",
                          f"best of {len(near.pair_rows)} (s_x, s_w) pairs"))
        pc = _per_channel_maxabs(x, layer.w, p, ref)
        if pc is not None:
            strat.append(("per-channel", *pc))
        for name, sx, sw, e, wf, rnd, why in strat:
            self.results["strategies"].append({
                "layer": layer.name, "precision": p.value, "strategy": name, "rounding": rnd,
                "s_x": sx, "s_w": sw, "nrmse": e, "effective_bits": effective_bits(e),
                "wrapped_fraction": wf, "reason": why})
        # Time each option with the best naive per-tensor scales (one S for both where no pair was swept).
        if bp is not None:
            return {"s_x": bp.s_x, "s_w": bp.s_w, "strategy": "sweep-pair",
                    "reason": f"best of {len(near.pair_rows)} (s_x, s_w) pairs by NRMSE"}
        return {"s_x": b.s_x, "s_w": b.s_w, "strategy": "sweep-S", "reason": near.reason}

    # ---------------------------------------------------------------------------- measurements
    def _prepare(self, layer: Layer, x: np.ndarray, ref: np.ndarray, run: tuple[str, str, dict[str, Any]],
                 p: Precision, scale: dict[str, Any] | None, expected: np.ndarray | None,
                 bound: Callable[[], np.ndarray]) -> tuple[dict[str, Any], Callable[[], Any] | None]:
        """The warm-up call of one option: accuracy, wrapped outputs, bit-exactness, static fields.
        Returns the record and the call to time (None where the backend refused the option)."""
        label, backend, options = run
        rec: dict[str, Any] = {"layer": layer.name, "backend": label, "backend_module": backend,
                               "backend_options": dict(options), "precision": p.value,
                               "rounding": "nearest", "error": None}
        sc = None if scale is None else (scale["s_x"], scale["s_w"])
        rec["scale"] = None if scale is None else {"s_x": scale["s_x"], "s_w": scale["s_w"],
                                                   "strategy": scale["strategy"], "reason": scale["reason"]}

        def call(reference: np.ndarray | None = None) -> api.ConvResult:
            return api.conv2d_result(x, layer.w, p, backend, scale=sc, reference=reference, **options)
        try:
            warm = call(ref)
        except QconvError as e:
            rec["error"] = str(e)
            return rec, None
        out = np.asarray(warm.output)
        if p.is_integer:
            rec["bit_exact"] = bool(expected is not None and np.array_equal(out, expected))
            rec["within_fp32_bound"] = None
        else:
            rec["bit_exact"] = None
            rec["within_fp32_bound"] = bool(np.all(np.abs(out.astype(np.float64) - ref) <= bound()))
        rec["flops"] = warm.flops
        rec["nrmse"] = warm.nrmse
        rec["effective_bits"] = effective_bits(warm.nrmse)
        rec["wrapped_outputs"] = warm.wrapped
        rec["wrapped_fraction"] = None if warm.wrapped is None else warm.wrapped / out.size
        rec["overflow_possible"] = warm.overflow_possible
        key = self._peak_keys.get((label, p.value))
        if key is not None and key in self.peaks:
            ins, threads = key
            pk = (self.peaks[key], f"measured {ins} throughput, {threads} thread(s) (qconv_peak, best run)")
        else:
            pk = machine.peak_gops(backend, p, self.machine, options.get("isa") or options.get("int8_path"))
        rec["peak_key"] = list(key) if key is not None and key in self.peaks else None
        rec["peak_gops"] = None if pk is None else pk[0]
        rec["peak_note"] = None if pk is None else pk[1]
        rec["energy_estimate_j"] = energy.estimate(p, x.size, layer.w.size, out.size, warm.flops // 2)
        rec["energy_measured"] = None
        return rec, call

    @staticmethod
    def _timed_call(call: Callable[[], Any]) -> dict[str, float]:
        return dict(call().phases)

    def _finalize(self, rec: dict[str, Any], call: Callable[[], Any], samples: list[dict[str, float]],
                  measure_energy: bool) -> None:
        rec["repeat"] = len(samples)
        rec["phases_s"] = {ph: _stats([s[ph] for s in samples]) for ph in PHASES}
        rec["total_s"] = _stats([sum(s.values()) for s in samples])
        conv = rec["phases_s"]["convolve"]["median"]
        rec["gops"] = rec["flops"] / conv / 1e9 if conv > 0 else None
        meter = self.meters["nvml"] if rec["backend_module"] == "cuda" else self.meters["rapl"]
        if meter is not None and measure_energy:
            try:
                m = energy.measure(meter, call, 0.25 if self.quick else 0.5, self.repeat)
                rec["energy_measured"] = {"meter": meter.name, "device": meter.device, **m}
            except OSError as e:
                rec["energy_error"] = str(e)

    def _measure_layer(self, layer: Layer, x: np.ndarray, ref: np.ndarray,
                       scales: dict[Precision, dict[str, Any]], expected: dict[Precision, np.ndarray],
                       bound: Callable[[], np.ndarray]) -> None:
        """Warm up every option, then time them in rounds (one call of each option per round), so
        that load from elsewhere on the machine spreads over all options instead of hitting one."""
        prepared: list[tuple[dict[str, Any], Callable[[], Any] | None, list[dict[str, float]]]] = []
        complete = False
        try:
            for run in self.runs:
                for p in self._precisions_of(run[0]):
                    rec, call = self._prepare(layer, x, ref, run, p, scales.get(p), expected.get(p), bound)
                    prepared.append((rec, call, []))
                    self._tick(f"{layer.name} {run[0]} {p.value} warm-up")
            for r in range(self.repeat):
                for rec, call, samples in prepared:
                    if call is not None:
                        samples.append(self._timed_call(call))
                self._tick(f"{layer.name} timing round {r + 1}/{self.repeat}")
            complete = True
        finally:
            for rec, call, samples in prepared:
                if call is not None:
                    if samples:
                        self._finalize(rec, call, samples, measure_energy=complete)
                    else:
                        rec["error"] = "interrupted before any timed run"
                self.results["measurements"].append(rec)

    # ------------------------------------------------------------------------------- the grid
    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self._open_bar()
        try:
            self._peak_keys = machine.cpu_peak_keys(self.runs, self.precisions)
            self._measure_peaks()
            for layer in self.layers:
                # --batch repeats the input along N. Every accuracy figure (NRMSE, wrapped fraction)
                # of the repeated layer equals that of the layer itself, so the sweeps run on the
                # layer as given and only the timed runs see the batch.
                ref1 = conv2d_float64(layer.x, layer.w)
                if self.batch > 1:
                    x = np.ascontiguousarray(np.concatenate([layer.x] * self.batch, axis=0))
                    ref = np.concatenate([ref1] * self.batch, axis=0)
                else:
                    x, ref = layer.x, ref1
                self.results["layers"].append(self._layer_info(layer, x, ref))
                scales: dict[Precision, dict[str, Any]] = {}
                expected: dict[Precision, np.ndarray] = {}
                for p in self.precisions:
                    if p.is_integer:
                        scales[p] = self._sweeps(layer, layer.x, ref1, p)
                        s_x, s_w = scales[p]["s_x"], scales[p]["s_w"]
                        acc, _ = conv2d_int_wrapped(quantize(x, s_x, p), quantize(layer.w, s_w, p))
                        expected[p] = dequantize(acc, dequant_factor(s_x, s_w))
                cache: dict[str, np.ndarray] = {}

                def bound() -> np.ndarray:
                    if "b" not in cache:
                        cache["b"] = fp32_error_bound(x, layer.w)
                    return cache["b"]
                self._measure_layer(layer, x, ref, scales, expected, bound)
            self._measure_peaks()  # again after the grid: the best of both is the estimate
            for m in self.results["measurements"]:
                if m.get("peak_key"):
                    m["peak_gops"] = self.peaks[tuple(m["peak_key"])]
            self.results["status"] = "complete"
        except KeyboardInterrupt:
            self.results["status"] = "partial"
            self.results["partial_reason"] = "interrupted (KeyboardInterrupt) before the grid finished"
            raise
        except BaseException as e:
            self.results["status"] = "partial"
            self.results["partial_reason"] = f"stopped by an error: {e.__class__.__name__}: {e}"
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
            self.results["elapsed_s"] = time.perf_counter() - t0
            self.finish()
        return self.results

    # ------------------------------------------------------------------------------- outputs
    def finish(self) -> None:
        """Derive speedups and the summary; write results.json and results.csv first (so a valid
        result exists whatever happens next), then the plots, results.json again with the plot
        list, and report.md. A partial run writes whatever plots and report its data allows."""
        from . import report
        derive(self.results)
        write_json(self.results, self.out / "results.json")
        write_csv(self.results, self.out / "results.csv")
        failure: Exception | None = None
        if self.plots:
            try:
                from . import plots
                self.results["plots"] = plots.draw_all(self.results, self.out)
            except Exception as e:
                self.results["plots_error"] = f"{e.__class__.__name__}: {e}"
                failure = e
            write_json(self.results, self.out / "results.json")
        try:
            (self.out / "report.md").write_text(report.render(self.results))
        except Exception as e:
            failure = failure or e
        if failure is not None and self.results["status"] == "complete":
            raise failure


def _best_isa() -> str | None:
    try:
        from ..backends import _cext
        return _cext.best_isa("auto")
    except Exception:  # the extension is missing or too old: only the AVX2 run
        return None


def run_study(layers: Sequence[Layer], out_dir: "str | os.PathLike[str]", **kw: Any) -> dict[str, Any]:
    """Run the whole study; see Study for the arguments. Returns the results dict (also in
    out_dir/results.json)."""
    return Study(layers, out_dir, **kw).run()


# ------------------------------------------------------------------------------------ derive

def _ok(m: dict[str, Any]) -> bool:
    return m.get("error") is None and "phases_s" in m


def overlaps(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two options' convolve-time interquartile ranges overlap (not distinguishable)."""
    pa, pb = a["phases_s"]["convolve"], b["phases_s"]["convolve"]
    return pa["q1"] <= pb["q3"] and pb["q1"] <= pa["q3"]


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """'faster' / 'slower' when a's convolve-time interquartile range lies wholly below / above
    b's, else 'tied'."""
    if overlaps(a, b):
        return "tied"
    return "faster" if a["phases_s"]["convolve"]["median"] < b["phases_s"]["convolve"]["median"] else "slower"


def pareto(points: Sequence[tuple[float, float, Any]]) -> list[Any]:
    """Items not dominated in (time, nrmse), both minimized; sorted by time."""
    front, best = [], math.inf
    for t, e, item in sorted(points, key=lambda p: (p[0], p[1])):
        if e < best:
            front.append(item)
            best = e
    return front


def derive(res: dict[str, Any]) -> None:
    """Speedups over the baseline and the best FP32, per-layer answers, the frontier."""
    ms = [m for m in res["measurements"] if _ok(m)]
    summary: dict[str, Any] = {"layers": {}, "acceptable_nrmse": output_bits_nrmse(8),
                               "acceptable_rule": ("NRMSE at most that of storing the output in 8 bits "
                                                   "(1/(255*sqrt(12)) = 1.13e-3), i.e. >= 8 effective bits")}
    for L in res["layers"]:
        name = L["name"]
        lm = [m for m in ms if m["layer"] == name]
        conv = {(m["backend"], m["precision"]): m["phases_s"]["convolve"]["median"] for m in lm}
        base = next(((b, p) for b, p in BASELINE_ORDER if (b, p) in conv), None)
        fp32 = [(t, b) for (b, p), t in conv.items() if p == "fp32"]
        best_fp32 = min(fp32) if fp32 else None
        for m in lm:
            t = m["phases_s"]["convolve"]["median"]
            tot = m["total_s"]["median"]
            m["speedup_vs_baseline"] = conv[base] / t if base and t > 0 else None
            m["speedup_total_vs_baseline"] = (next(x for x in lm if (x["backend"], x["precision"]) == base)["total_s"]["median"] / tot
                                              if base and tot > 0 else None)
            m["speedup_vs_best_fp32"] = best_fp32[0] / t if best_fp32 and t > 0 else None
            pk = m.get("peak_gops")
            base_gops = (next(x for x in lm if (x["backend"], x["precision"]) == base)["gops"] if base else None)
            m["peak_speedup_vs_baseline"] = pk / base_gops if pk and base_gops else None
        if not lm:
            summary["layers"][name] = None
            continue

        def opt(m: dict[str, Any]) -> dict[str, Any]:
            return {"backend": m["backend"], "precision": m["precision"],
                    "convolve_s": m["phases_s"]["convolve"]["median"], "total_s": m["total_s"]["median"],
                    "nrmse": m["nrmse"], "effective_bits": m["effective_bits"],
                    "speedup_vs_baseline": m["speedup_vs_baseline"],
                    "speedup_total_vs_baseline": m["speedup_total_vs_baseline"],
                    "energy_estimate_j": m["energy_estimate_j"]["total_j"]}
        fastest = min(lm, key=lambda m: m["phases_s"]["convolve"]["median"])
        ties = [m for m in lm if m is not fastest and overlaps(m, fastest)]
        fastest_total = min(lm, key=lambda m: m["total_s"]["median"])
        with_err = [m for m in lm if m["nrmse"] is not None]
        accurate = min(with_err, key=lambda m: m["nrmse"]) if with_err else None
        quant = [m for m in with_err if m["precision"] != "fp32"]
        accurate_q = min(quant, key=lambda m: m["nrmse"]) if quant else None
        acceptable = [m for m in with_err if m["nrmse"] <= summary["acceptable_nrmse"]]
        recommended = min(acceptable, key=lambda m: m["phases_s"]["convolve"]["median"]) if acceptable else None
        front = pareto([(m["phases_s"]["convolve"]["median"], m["nrmse"], m) for m in with_err])
        energy_best = min(lm, key=lambda m: m["energy_estimate_j"]["total_j"])
        acc_energy = [m for m in acceptable]
        energy_best_ok = min(acc_energy, key=lambda m: m["energy_estimate_j"]["total_j"]) if acc_energy else None
        measured = [m for m in lm if m.get("energy_measured")]
        measured_best = min(measured, key=lambda m: m["energy_measured"]["joules_per_call"]) if measured else None
        summary["layers"][name] = {
            "baseline": None if base is None else {"backend": base[0], "precision": base[1], "convolve_s": conv[base]},
            "best_fp32": None if best_fp32 is None else {"backend": best_fp32[1], "convolve_s": best_fp32[0]},
            "fastest": opt(fastest), "fastest_end_to_end": opt(fastest_total),
            "fastest_tied_with": [opt(m) for m in ties],
            "most_accurate": None if accurate is None else opt(accurate),
            "most_accurate_quantized": None if accurate_q is None else opt(accurate_q),
            "recommended": None if recommended is None else opt(recommended),
            "frontier": [opt(m) for m in front],
            "energy_best_estimate": opt(energy_best),
            "energy_best_estimate_acceptable": None if energy_best_ok is None else opt(energy_best_ok),
            "energy_best_measured": None if measured_best is None else {
                **opt(measured_best), "joules_per_call": measured_best["energy_measured"]["joules_per_call"]},
        }
    res["summary"] = summary


# ------------------------------------------------------------------------------------ writers

def write_json(res: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(res), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


CSV_FIELDS = ["layer", "backend", "precision", "rounding", "scale_strategy", "s_x", "s_w", "repeat",
              *(f"{ph}_median_s" for ph in PHASES), "convolve_min_s", "convolve_max_s",
              "total_median_s", "gops", "speedup_vs_baseline", "speedup_vs_best_fp32", "nrmse",
              "effective_bits", "wrapped_outputs", "wrapped_fraction", "overflow_possible",
              "bit_exact", "energy_estimate_j", "energy_measured_j", "energy_meter", "error"]


def write_csv(res: dict[str, Any], path: Path) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        wr.writeheader()
        for m in res["measurements"]:
            row = {k: m.get(k) for k in ("layer", "backend", "precision", "rounding", "repeat", "gops",
                                           "speedup_vs_baseline", "speedup_vs_best_fp32", "nrmse",
                                           "effective_bits", "wrapped_outputs", "wrapped_fraction",
                                           "overflow_possible", "bit_exact", "error")}
            sc = m.get("scale") or {}
            row.update(scale_strategy=sc.get("strategy"), s_x=sc.get("s_x"), s_w=sc.get("s_w"))
            if "phases_s" in m:
                for ph in PHASES:
                    row[f"{ph}_median_s"] = m["phases_s"][ph]["median"]
                row["convolve_min_s"] = m["phases_s"]["convolve"]["min"]
                row["convolve_max_s"] = m["phases_s"]["convolve"]["max"]
                row["total_median_s"] = m["total_s"]["median"]
                row["energy_estimate_j"] = m["energy_estimate_j"]["total_j"]
                em = m.get("energy_measured")
                row["energy_measured_j"] = em["joules_per_call"] if em else None
                row["energy_meter"] = em["meter"] if em else None
            wr.writerow({k: ("" if v is None else v) for k, v in row.items()})
