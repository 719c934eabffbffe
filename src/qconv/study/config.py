"""What a study runs: its layers, the timed options (backend variants from the registry) and
the constants every other study module shares. Imports nothing else from the study.

A timed option is a variant, a backend plus options, named the way the registry names it and
accepts it back: ``"c-avx2[isa=avx2]"`` runs as ``qconv.prepare(w, p, "c-avx2[isa=avx2]")``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import backends
from ..contract import Precision, check_finite
from ..errors import InputError
from ..tensorfile import load_pair

SCHEMA_NAME = "qconv-study-results"
SCHEMA_VERSION = 3
INT_PRECISIONS = ("int32", "int16", "int8")
ALL_PRECISIONS = ("fp32", *INT_PRECISIONS)
# The assignment's Problem 1: the speedup of every option, at every batch, is over this one.
BASELINE = ("c-scalar", "fp32")
BASELINE_FALLBACK = ("reference", "fp32")
# Untimed calls of an option, for at least this long, before each of its timed runs: after another
# option (a long single-threaded c-scalar call) or a pause, this machine's cores ran the next
# ~10-20 ms slowly (c-avx2 FP32 on exam 1: 3.4-3.9 ms against 1.2 ms; RESULTS.md, 2026-12-05).
WARM_S = 0.02
BASELINE_ROUNDS = 3
# Scale strategies as the study names them (results.json "strategy" values).
SINGLE, SINGLE_TRUNC, PAIR, MAXABS, PER_CHANNEL = ("single-S", "single-S-truncate", "pair", "maxabs",
                                                   "per-channel")
STRATEGIES = (SINGLE, SINGLE_TRUNC, PAIR, MAXABS, PER_CHANNEL)
# Energy verdicts: only a loop this long whose time is at least this much kernel counts as measured.
ENERGY_LOOP_S = 1.0
ENERGY_MIN_KERNEL_SHARE = 0.5
BODY_WORD_LIMIT = 1000


def stats(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and quartiles of timing samples."""
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q[0], "q3": q[2]}


def ok(m: dict[str, Any]) -> bool:
    """A measurement that ran and was timed (no error, phases present)."""
    return m.get("error") is None and "phases_s" in m


@dataclass
class Layer:
    name: str
    x: np.ndarray
    w: np.ndarray
    input_path: str | None = None
    kernel_path: str | None = None


def check_layer_finite(layer: Layer) -> None:
    """Refuse a layer whose input or kernel holds NaN or inf, naming the layer and the file."""
    for what, t, path in (("input", layer.x, layer.input_path), ("kernel", layer.w, layer.kernel_path)):
        check_finite(t, f"layer {layer.name}: the {what}" + (f" ({path})" if path else ""))


def load_layers(specs: Sequence[str]) -> list[Layer]:
    """LAYERS as the CLI takes them: a directory holding input_tensor.bin and kernel_tensor.bin,
    'input.bin:kernel.bin', or a shipped sample's name (exam1)."""
    layers: list[Layer] = []
    for spec in specs:
        p = Path(spec)
        if not p.exists() and ":" not in spec:
            from ..samples import sample_layer_dirs
            p = sample_layer_dirs().get(spec.strip("/"), p)
        if p.is_dir():
            ip, kp = p / "input_tensor.bin", p / "kernel_tensor.bin"
            for f in (ip, kp):
                if not f.is_file():
                    raise InputError(f"layer {spec}: {f.name} is missing (a layer directory holds "
                                     f"input_tensor.bin and kernel_tensor.bin)")
            name = p.resolve().name
        elif ":" in spec:
            a, b = spec.rsplit(":", 1)
            ip, kp = Path(a), Path(b)
            name = ip.stem
        else:
            raise InputError(f"layer {spec!r}: give a directory with input_tensor.bin and "
                             f"kernel_tensor.bin, INPUT.bin:KERNEL.bin, or a sample name")
        x, w = load_pair(ip, kp)
        layers.append(Layer(name, x, w, str(ip), str(kp)))
        check_layer_finite(layers[-1])
    names = [l.name for l in layers]
    for i, l in enumerate(layers):  # make names unique
        if names.count(l.name) > 1:
            l.name = f"{l.name}#{names[:i + 1].count(l.name)}"
    return layers


def progress(res: dict[str, Any], layers: Sequence[Layer], precisions: Sequence[Precision], timed: Sequence[str],
             stage: str | None, network: bool) -> dict[str, Any]:
    """results.json's "progress": what was requested against what finished (results.schema.json)."""
    rows = [{"layer": L.name, "requested": [p.value for p in precisions],
             "swept": [s["precision"] for s in res["single_s"] if s["layer"] == L.name],
             "skipped": [s["precision"] for s in res["skipped"] if s["layer"] == L.name],
             "timed": L.name in timed} for L in layers]
    return {"stopped_in": stage, "layers": rows,
            "network_done": res["status"] == "complete" if network else None}


def layer_memory(layer: Layer, batch: int, precisions: Sequence[Precision],
                 options: Sequence["Option"]) -> dict[str, int]:
    """Bytes the study holds at once for one layer at --batch (grid.Study.run and _measure_layer),
    from the same counts the code uses: the repeated input and the float64 reference; one float32
    expected output per (integer precision, scale strategy); one float64 FP32 error bound per
    distinct backends.fp32_bound among the FP32 options; and the peak of one option's warm-up
    (its output, the result's float64 accuracy temporaries, the contract's quantized copy, float64
    accumulators and int32/float32 outputs of conv2d_quantized). Returns the parts and "total"."""
    kh, kw, oc, _ = layer.w.shape
    in1, out1 = layer.x[0].size, layer.x.shape[1] * layer.x.shape[2] * oc  # 'same', stride 1
    n_in, n_out = batch * in1, batch * out1
    n_int = sum(p.is_integer for p in precisions)
    strategies = 3  # SINGLE, PAIR, PER_CHANNEL (grid._measure_layer)
    fp32 = [o for o in options if Precision.FP32 in precisions or o.baseline_only]
    n_bounds = len({backends.fp32_bound(o.backend, o.options) for o in fp32})
    parts = {
        "input": 4 * layer.x.size + (4 * n_in if batch > 1 else 0),
        "reference": 8 * n_out + (8 * out1 if batch > 1 else 0),
        "expected_outputs": 4 * n_out * n_int * strategies,
        "fp32_bounds": 8 * n_out * n_bounds,
        # one option at a time: its output (4), the accuracy's float64 copies (16); the contract's
        # quantized input (up to 4) and its int64/float64 copies (8 + 8), float64 tap and sum and the
        # int64 result (24), the int32 accumulator and float32 output (8)
        "warm_up_peak": 20 * n_out + (20 * n_in + 32 * n_out if n_int else 8 * n_in + 24 * n_out),
    }
    parts["total"] = sum(parts.values())
    return parts


@dataclass(frozen=True)
class Option:
    """One timed variant: its name (as reports show it and backend= accepts it), backend, options."""

    label: str
    backend: str
    options: dict = field(default_factory=dict)
    baseline_only: bool = False     # timed for FP32 only (at most BASELINE_ROUNDS rounds), as the baseline


def timed_options(requested: Sequence[str] | None, precisions: Sequence[Precision],
                  batch: int = 1) -> tuple[list[Option], str]:
    """The variants to time (every available one from the registry, or those asked for), the
    baseline first; returns them and a note on the baseline (empty when it is c-scalar FP32).
    Above batch 1, scalar C is timed for the FP32 baseline only unless asked for by name."""
    avail = backends.available_backends()
    if requested is None:
        opts = [Option(name, b, dict(o)) for name, b, o in backends.variants()]
    else:
        opts = []
        for text in requested:
            b = backends.parse_variant(text.strip())[0].lower()
            if b not in avail:
                raise InputError(f"unknown backend {text!r}: choose from {', '.join(avail)} "
                                 f"(a variant is written name[key=value,...])")
            b, o = backends.check_variant(text.strip())
            name = backends.variant_name(b, o)
            if name not in {x.label for x in opts}:
                opts.append(Option(name, b, o))
    if batch > 1 and requested is None:  # scalar C at a large batch: the FP32 baseline only
        opts = [Option(o.label, o.backend, o.options, baseline_only=True) if o.backend == BASELINE[0] else o
                for o in opts]
    note = ""
    if Precision.FP32 in precisions and not any(o.backend == BASELINE[0] and not o.options for o in opts):
        if avail.get(BASELINE[0], (False, ""))[0]:
            opts.append(Option(BASELINE[0], BASELINE[0], {}, baseline_only=True))
        else:
            note = (f"c-scalar is unavailable ({avail.get(BASELINE[0], (False, '?'))[1]}): speedups are over "
                    f"{BASELINE_FALLBACK[0]} FP32 instead")
    elif Precision.FP32 not in precisions:
        note = "FP32 was not measured: no speedup baseline (the assignment's Problem 1 is scalar C FP32)"
    # The baseline first, then the registry's order.
    order = {b: i for i, b in enumerate(backends.names())}
    opts.sort(key=lambda o: (o.backend != BASELINE[0], order.get(o.backend, 99)))
    return opts, note

