"""The run grid: every layer x timed option x precision x scale strategy, measured.

    from qconv.study import run_study, load_layers
    results = run_study(load_layers(["path/to/layer_dir"]), "out/")

Per layer: the float64 reference; the accuracy half (accuracy.py: sweeps, strategies, the
single-S table); then every option is prepared once per precision and scale (``qconv.prepare``
with the variant's name) and warmed up with ``conv.result(x, reference=...)``, which gives the
NRMSE, the wrapped outputs and a bit-exactness check against ``contract.conv2d_quantized``.
The options are then timed in rounds (each option once per round, so that load from elsewhere
spreads over all of them): untimed calls for config.WARM_S (after another option or a pause the
cores ran the next milliseconds slowly), then ``conv.result(x)``, which gives the backend's phase
times, and ``conv(x)``, timed from outside, the whole call a user makes.

Integer options run the assignment's scheme, one S for both tensors (the sweep's best, rounding
to nearest); the best pair and per-channel scales run beside it where a backend takes them.
Ctrl-C writes what was measured (results.json marked "partial", the CSV, plots and report).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import api, backends, layouts, metrics
from ..arrays import MAX_TENSOR_BYTES
from ..backends.base import PHASES
from ..contract import Precision, conv2d_float64, conv2d_quantized, fp32_error_bound, parse_precision
from ..errors import InputError, QconvError, QconvWarning
from ..pools import quiet_blas
from . import accuracy, artifacts, energy, machine, network, references
from .config import (BASELINE_ROUNDS, ENERGY_LOOP_S, PAIR, PER_CHANNEL, SCHEMA_NAME, SCHEMA_VERSION, SINGLE,
                     WARM_S, Layer, Option, check_layer_finite, layer_memory, progress, stats, timed_options)
from .summary import headline


class _Timed:
    """One prepared option: its record, the prepared convolution, and its samples."""

    def __init__(self, rec: dict[str, Any], conv: Any) -> None:
        self.rec, self.conv = rec, conv
        self.phases: list[dict[str, float]] = []
        self.calls: list[float] = []


class Study:
    def __init__(self, layers: Sequence[Layer], out_dir: "str | os.PathLike[str]", *,
                 backends: Sequence[str] | None = None, precisions: Sequence[str] | None = None,
                 batch: int = 1, repeat: int = 5, quick: bool = False, progress: bool = True,
                 command: str | None = None, measure_energy: bool = True, plots: bool = True,
                 references_: bool = True, energy_loop_s: float = ENERGY_LOOP_S, network_: Any = None,
                 network_limit: int | None = None, network_backend: str | None = None, force: bool = False) -> None:
        if not layers:
            raise InputError("the study needs at least one layer")
        names = [layer.name for layer in layers]
        if len(set(names)) != len(names):
            raise InputError(f"layer names must be unique, got {names}")
        if batch < 1:
            raise InputError(f"--batch must be >= 1, got {batch}")
        if repeat < 1:
            raise InputError(f"--repeat must be >= 1, got {repeat}")
        for layer in layers:  # NaN or inf: one line naming the layer and file, before any output exists
            check_layer_finite(layer)
        for layer in layers:  # the repeated input, its output and the float64 reference, before any work
            out1 = layer.x.shape[1] * layer.x.shape[2] * layer.w.shape[2]  # 'same', stride 1: H x W x OC
            nbytes = batch * (4 * layer.x[0].size + 12 * out1)
            if nbytes > MAX_TENSOR_BYTES:
                raise InputError(f"--batch {batch}: layer {layer.name} would need {nbytes / 2**30:.3g} GiB "
                                 f"for its input and outputs")
        if plots:
            try:  # fail before minutes of measuring, not after
                __import__("matplotlib")
            except ImportError:
                raise InputError("the study draws its plots with matplotlib, which is not installed: "
                                 "pip install 'qconv[plot]', or run `qconv study --no-plots` "
                                 "(plots=False from Python)") from None
        self.layers = list(layers)
        self.out = Path(out_dir)
        self.quick, self.batch, self.repeat = quick, batch, repeat
        self.progress, self.plots, self.want_refs = progress, plots, references_
        self.energy_loop_s = energy_loop_s
        precs = [parse_precision(p) for p in (precisions or ["fp32", "int32", "int16", "int8"])]
        self.precisions = list(dict.fromkeys(precs))
        self.options, baseline_note = timed_options(backends, self.precisions, batch)
        for layer in layers:  # what _measure_layer holds at once (config.layer_memory), before any work
            layouts.check_working_set(layer_memory(layer, batch, self.precisions, self.options)["total"],
                                      f"--batch {batch} on layer {layer.name}")
        self.baseline_only = {o.label for o in self.options if o.baseline_only}
        from .. import backends as registry
        avail = registry.available_backends()
        off = (None, "energy measurement turned off")
        nvml, nvml_why = energy.nvml_meter() if measure_energy else off
        rapl, rapl_why = energy.rapl_meter() if measure_energy else off
        self.meters = {"nvml": nvml, "rapl": rapl}
        gpu_name = nvml.device if nvml is not None else None
        if gpu_name is None and avail.get("cuda", (False, ""))[0]:
            gpu_name = avail["cuda"][1].split(" (sm_")[0]  # the cuda backend's probe names the GPU first
        self.machine = machine.describe(gpu_name)
        self.machine["backends"] = {k: {"available": a, "reason": why} for k, (a, why) in avail.items()}
        self.machine["energy_meters"] = {
            "nvml": {"available": nvml is not None, "detail": nvml.device if nvml else nvml_why},
            "rapl": {"available": rapl is not None, "detail": rapl.device if rapl else rapl_why},
        }
        self.machine["measured_peaks"] = []
        self.settings = accuracy.sweep_settings(quick)
        # The network section (--network): loaded now, so that a missing download is one line
        # before minutes of measuring. ``network_`` is a name or a ready qconv.nets Network.
        self.section: network.NetworkSection | None = None
        net_record = None
        if network_ is not None:
            if network_backend is not None:
                try:
                    network_backend = registry.variant_name(*registry.check_variant(network_backend.strip()))
                except QconvError as e:  # the same error, naming the argument
                    raise type(e)(f"--network-backend: {e}") from None
            net, split = network.load(network_, network_limit)
            cuda = avail.get("cuda", (False, "not in the registry"))
            self.section = network.NetworkSection(
                net, split, backends=[o.label for o in self.options if not o.baseline_only],
                precisions=[p.value for p in self.precisions], backend=network_backend, quick=quick,
                gpu_reason=None if cuda[0] else cuda[1].split(";")[0])
            net_record = network.new_record(net, split, network_limit)
        # Every argument (the network's too) checked first, so a bad one leaves no empty folder
        # behind; then an unusable or foreign output folder is an error now, not after measuring.
        artifacts.prepare_out(self.out, force)
        self.results: dict[str, Any] = {
            "schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "status": "running",
            "partial_reason": None, "command": command, "machine": self.machine,
            "config": {"backends": [o.label for o in self.options],
                       "baseline_only": [o.label for o in self.options if o.baseline_only],
                       "baseline_note": baseline_note,
                       "precisions": [p.value for p in self.precisions],
                       "batch": batch, "repeat": repeat, "warmup": 1, "warm_s": WARM_S, "quick": quick,
                       "sweep": self.settings,
                       "network": None if net_record is None else net_record["name"],
                       "network_limit": network_limit, "network_backend": network_backend,
                       "scale_for_integer_runs": ("single-S: the sweep's best single S for both tensors, rounding "
                                                  "to nearest (the assignment's scheme); the sweep's best (s_x, s_w) "
                                                  "pair and maxabs-per-channel scales are timed beside it where the "
                                                  "backend takes them")},
            "units": {"time": "s (suffix _s)", "energy": "J (suffix _j)", "throughput": "G ops/s (2 ops per multiply-add)",
                      "nrmse": "dimensionless, RMSE / (max - min) of the float64 reference output",
                      "effective_bits": "bits: log2(1 + 1/(NRMSE*sqrt(12)))", "scale": "dimensionless multiplier"},
            "energy_model": energy.model(self.machine.get("gpu")),
            "layers": [], "measurements": [], "sweeps": [], "skipped": [], "strategies": [], "single_s": [], "common_s": [],
            "reference_points": [], "reference_points_note": None, "idle_power_w": {}, "summary": {}, "plots": [], "elapsed_s": None,
            "network": net_record,
        }
        self._bar: Any = None
        self.peaks: dict[tuple[str, int], float] = {}
        self._peak_keys: dict[tuple[str, str], tuple[str, int]] = {}
        self._tables: dict[Precision, dict[str, Any]] = {}

    # ---------------------------------------------------------------------------- progress bar
    def _steps(self) -> int:
        n_int = sum(p.is_integer for p in self.precisions)
        return len(self.layers) * (n_int + self.repeat + 1) + (self.section.steps() if self.section else 0)

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

    def _measure_peaks(self, tries: int) -> None:
        """The benchmarks' method: the best of several ~50 ms runs of each instruction's
        microbenchmark, sampled at the start, before each layer and at the end; one table."""
        got = machine.measure_peaks(set(self._peak_keys.values()), tries, 0.05)
        for k, g in got.items():
            self.peaks[k] = max(g, self.peaks.get(k, 0.0))
        self.machine["measured_peaks"] = [{"instruction": i, "threads": t, "gops": g}
                                          for (i, t), g in sorted(self.peaks.items())]

    # ---------------------------------------------------------------------------- measurements
    def _precisions_of(self, o: Option) -> list[Precision]:  # less the precisions skipped for this layer
        if o.baseline_only:
            return [Precision.FP32]
        return [p for p in self.precisions if not p.is_integer or p in self._tables]

    def _scales(self, p: Precision, strategy: str) -> Any:
        t = self._tables[p]
        if strategy == SINGLE:
            return float(t.best_single.s_x)
        if strategy == PAIR:
            return (t.best_pair.s_x, t.best_pair.s_w) if t.best_pair is not None else None
        return "maxabs-per-channel"

    def _prepare(self, layer: Layer, x: np.ndarray, ref: np.ndarray, o: Option, p: Precision, strategy: str | None,
                 expected: dict[Any, np.ndarray], bound: Callable[[], np.ndarray]) -> _Timed | None:
        """Prepare one option and warm it up: accuracy, wrapped outputs, bit-exactness, peaks."""
        rec: dict[str, Any] = {"layer": layer.name, "backend": o.label, "backend_module": o.backend,
                               "backend_options": dict(o.options), "precision": p.value,
                               "scale_strategy": strategy, "rounding": "nearest", "error": None, "scale": None}
        try:
            with warnings.catch_warnings():  # a naive S that zeroes most of the kernel is the point here
                warnings.simplefilter("ignore", QconvWarning)
                if strategy is None:
                    conv = api.prepare(layer.w, p, o.label)
                else:
                    scale = self._scales(p, strategy)
                    if scale is None:
                        return None
                    conv = api.prepare(layer.w, p, o.label, scale=scale)
            warm = conv.result(x, reference=ref)
        except QconvError as e:
            rec["error"] = str(e)
            return _Timed(rec, None)
        out = np.asarray(warm.output)
        if p.is_integer:
            rec["scale"] = {"s_x": warm.scale_input, "s_w": warm.scale_kernel if not isinstance(warm.scale_kernel, list)
                            else float(np.exp(np.mean(np.log(warm.scale_kernel)))),
                            "per_channel": isinstance(warm.scale_kernel, list), "strategy": strategy,
                            "reason": warm.scale_reason}
            key = (p, strategy)
            if key not in expected:
                s_w = np.asarray(warm.scale_kernel, dtype=np.float32)
                expected[key] = conv2d_quantized(x, layer.w, p, warm.scale_input, s_w)[0]
            rec["bit_exact"] = bool(np.array_equal(out, expected[key]))
            rec["within_fp32_bound"] = None
        else:
            rec["bit_exact"] = None
            rec["within_fp32_bound"] = bool(np.all(np.abs(out.astype(np.float64) - ref)
                                                   <= bound(backends.fp32_bound(o.backend, o.options))))
        rec["flops"] = warm.flops
        rec["nrmse"] = warm.nrmse
        rec["effective_bits"] = metrics.effective_bits(warm.nrmse)
        rec["wrapped_outputs"] = warm.wrapped
        rec["wrapped_fraction"] = None if warm.wrapped is None else warm.wrapped / out.size
        rec["overflow_possible"] = warm.overflow_possible
        key = self._peak_keys.get((o.label, p.value))
        rec["peak_key"] = list(key) if key is not None else None
        pk = None if key is not None else machine.peak_gops(o.backend, p, self.machine, o.options)
        rec["peak_gops"] = None if pk is None else pk[0]
        rec["peak_note"] = (f"measured {key[0]} throughput, {key[1]} thread(s) (qconv_peak, best run)"
                            if key is not None else None if pk is None else pk[1])
        rec["energy_estimate_j"] = energy.estimate(p, x.size, layer.w.size, out.size, warm.flops // 2,
                                                   self.results["energy_model"], on_gpu=o.backend == "cuda")
        rec["energy_measured"] = None
        return _Timed(rec, conv)

    @staticmethod
    def _timed_call(t: _Timed, x: np.ndarray) -> None:
        end = time.perf_counter() + WARM_S  # untimed calls first (config.WARM_S says why)
        t.conv(x)
        while time.perf_counter() < end:
            t.conv(x)
        t.phases.append(dict(t.conv.result(x).phases))
        t0 = time.perf_counter()
        t.conv(x)
        t.calls.append(time.perf_counter() - t0)

    def _finalize(self, t: _Timed, x: np.ndarray, measure_energy: bool) -> None:
        rec = t.rec
        rec["repeat"] = len(t.phases)
        rec["phases_s"] = {ph: stats([s[ph] for s in t.phases]) for ph in PHASES}
        rec["total_s"] = stats([sum(s.values()) for s in t.phases])
        rec["call_s"] = stats(t.calls)
        conv = rec["phases_s"]["convolve"]["median"]
        rec["gops"] = rec["flops"] / conv / 1e9 if conv > 0 else None
        meter = self.meters["nvml"] if rec["backend_module"] == "cuda" else self.meters["rapl"]
        if meter is not None and measure_energy and headline(rec):
            try:
                m = energy.measure_loop(meter, t.conv, energy.resident_input(rec["backend_module"], x),
                                        self.energy_loop_s, self.results["idle_power_w"].get(meter.name), conv,
                                        rec["flops"])
                rec["energy_measured"] = {"meter": meter.name, "device": meter.device, **m}
            except (OSError, QconvError) as e:
                rec["energy_error"] = str(e)

    def _measure_layer(self, layer: Layer, x: np.ndarray, ref: np.ndarray) -> None:
        """Prepare and warm up every option, then time them in rounds (each option once per round,
        after WARM_S of untimed calls), so that load from elsewhere on the machine spreads over all options."""
        timed: list[_Timed] = []
        expected: dict[Any, np.ndarray] = {}
        cache: dict[tuple[float, float], np.ndarray] = {}

        def bound(c_terms: tuple[float, float]) -> np.ndarray:
            if c_terms not in cache:
                cache[c_terms] = fp32_error_bound(x, layer.w, c=c_terms[0], per_term=c_terms[1])
            return cache[c_terms]
        complete = False
        try:
            for o in self.options:
                for p in self._precisions_of(o):
                    for strategy in ((SINGLE, PAIR, PER_CHANNEL) if p.is_integer else (None,)):
                        t = self._prepare(layer, x, ref, o, p, strategy, expected, bound)
                        if t is not None:
                            timed.append(t)
            self._tick(f"{layer.name} warm-up")
            for r in range(self.repeat):
                for t in timed:
                    if t.conv is not None and (r < BASELINE_ROUNDS or t.rec["backend"] not in self.baseline_only):
                        self._timed_call(t, x)
                self._tick(f"{layer.name} timing round {r + 1}/{self.repeat}")
            complete = True
        finally:
            for t in timed:
                if t.conv is not None:
                    if t.phases:
                        self._finalize(t, x, measure_energy=complete)
                    else:
                        t.rec["error"] = "interrupted before any timed run"
                self.results["measurements"].append(t.rec)

    # ------------------------------------------------------------------------------- the grid
    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._open_bar()
        self._stage: str | None = "the peak measurements before the layers"
        self._timed: list[str] = []
        try:
            self._peak_keys = machine.cpu_peak_keys(self.options, self.precisions)
            self._measure_peaks(5)
            for name, meter in self.meters.items():
                if meter is not None:
                    self.results["idle_power_w"][name] = energy.idle_watts(meter, 1.0)
            refs_ok, refs_why = references.available() if self.want_refs else (False, "turned off")
            self.results["reference_points_note"] = None if refs_ok else refs_why
            tables: dict[Precision, dict[str, Any]] = {p: {} for p in self.precisions if p.is_integer}
            for layer in self.layers:
                # --batch repeats the input along N: every accuracy figure of the repeated layer
                # equals the layer's own, so the accuracy half runs at batch 1.
                ref1 = conv2d_float64(layer.x, layer.w)
                if self.batch > 1:
                    x = np.ascontiguousarray(np.concatenate([layer.x] * self.batch, axis=0))
                    ref = np.concatenate([ref1] * self.batch, axis=0)
                else:
                    x, ref = layer.x, ref1
                self.results["layers"].append(accuracy.layer_record(layer, x, ref))
                self._stage = f"the scale sweeps of layer {layer.name}"
                # each precision's rows go into the results as soon as it is swept
                acc = accuracy.accuracy_for_layer(layer, self.precisions, ref1, self.settings, self._tick,
                                                  into=self.results)
                self._tables = acc["tables"]
                for p, t in acc["tables"].items():
                    tables[p][layer.name] = t
                self._stage = f"the timing of layer {layer.name}"
                self._measure_peaks(2)
                with quiet_blas():  # numpy's BLAS pool must not spin beside the timed C workers
                    self._measure_layer(layer, x, ref)
                self._timed.append(layer.name)
                if refs_ok:
                    self._stage = f"the reference points of layer {layer.name}"
                    self.results["reference_points"] += references.measure(layer, x, ref, self._tables,
                                                                           self.repeat)
            self._stage = "the peak measurements after the layers"
            for p, by_layer in tables.items():
                c = accuracy.common_s(by_layer)
                if c is not None:
                    self.results["common_s"].append({"precision": p.value, **c})
            self._measure_peaks(5)
            for m in self.results["measurements"]:
                if m.get("peak_key"):
                    m["peak_gops"] = self.peaks.get(tuple(m["peak_key"]))
            if self.section is not None:
                self._stage = "the network section"
                self.section.run(self.results["network"], self._tick)
            self._stage = None
            self.results["status"] = "complete"
        except KeyboardInterrupt:
            self.results["status"] = "partial"
            self.results["partial_reason"] = f"interrupted (KeyboardInterrupt) during {self._stage}"
            raise
        except BaseException as e:
            self.results["status"] = "partial"
            self.results["partial_reason"] = f"stopped during {self._stage} by an error: {e.__class__.__name__}: {e}"
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
            self.results["elapsed_s"] = time.perf_counter() - t0
            self.results["progress"] = progress(self.results, self.layers, self.precisions, self._timed, self._stage,
                                                self.section is not None)
            artifacts.finish(self.results, self.out, self.plots)
        return self.results


def run_study(layers: Sequence[Layer], out_dir: "str | os.PathLike[str]", **kw: Any) -> dict[str, Any]:
    """Run the whole study; see Study for the arguments. Returns the results dict (also in
    out_dir/results.json)."""
    return Study(layers, out_dir, **kw).run()
