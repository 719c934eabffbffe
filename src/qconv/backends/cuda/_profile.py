"""Kernel times of a prepared call for the benchmarks: calls enqueued back to back behind the
stream gate, so CUDA events time the GPU's work and not Python's."""

from __future__ import annotations

import gc
import math
from typing import Any

import numpy as np

from . import _arrays
from ._record import Record


def profile(prep: Any, x: Any, reps: int = 50) -> dict[str, Any]:
    """Kernel times for benchmarks: `reps` calls on device-resident x enqueued back to back
    behind the stream gate (so events time GPU work, not Python), median seconds per phase."""
    rt, ctx = prep.rt, prep.ctx
    rt.make_current()
    dev = _arrays.to_device(x) if isinstance(x, np.ndarray) else x
    keep: list[Any] = []
    with ctx.lock:
        x_ptr, xs = _arrays.device_view(dev, "input", ctx, keep)
    geom = prep.spec.geometry(xs)
    job = prep.job(geom, x_ptr % 16 == 0)
    out = _arrays.DeviceArray(ctx.take_output(4 * math.prod(geom.out_shape)), geom.out_shape, ctx, pool=True)
    samples: dict[str, list[float]] = {}
    gc_was = gc.isenabled()
    gc.disable()  # no finalizer may synchronize the stream while the gate holds it
    try:
        _profile(prep, job, x_ptr, out, reps, samples)
    finally:
        if gc_was:
            gc.enable()
    med = {k: float(np.median(v)) for k, v in samples.items()}
    return {"median": med, "samples": samples, "kernel": job.conv_name, "split_k": job.split,
            "grid": job.grid, "smem": job.smem}


def _profile(prep: Any, job: Any, x_ptr: int, out: Any, reps: int, samples: dict[str, list[float]]) -> None:
    rt, ctx = prep.rt, prep.ctx
    with ctx.lock:
        rec = Record(ctx, job.n_events, prep.maxabs, prep.plan)
        prep._enqueue(job, x_ptr, out.ptr, rec, 0)  # warm-up (module loads) outside the gate
        rec.resolve()
        done = 0
        while done < reps:
            batch = min(64, reps - done)  # bounded: the launch queue must never fill behind the gate
            recs = [Record(ctx, job.n_events, prep.maxabs, prep.plan) for _ in range(batch)]
            rt.gate_close(ctx.stream)
            try:
                for r in recs:
                    prep._enqueue(job, x_ptr, out.ptr, r, 0)
            finally:
                rt.gate_open()
            for r in recs:
                for k, v in r.phases().items():
                    samples.setdefault(k, []).append(v)
            done += batch
