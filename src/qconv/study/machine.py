"""What the study ran on (CPU, GPU, versions, date) and the hardware peaks we know."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from typing import Any, Sequence

import numpy as np

from ..contract import Precision


def _cpuinfo() -> dict[str, Any]:
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "mhz": None,
                            "flags": [], "physical_cores": None}
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return info
    cores = set()
    phys = core = None
    for line in text.splitlines():
        if ":" not in line:
            continue
        k, v = (s.strip() for s in line.split(":", 1))
        if k == "model name" and info["model"] in (platform.processor() or platform.machine(), None):
            info["model"] = v
        elif k == "cpu MHz" and info["mhz"] is None:
            try:
                info["mhz"] = float(v)
            except ValueError:
                pass
        elif k == "flags" and not info["flags"]:
            info["flags"] = v.split()
        elif k == "physical id":
            phys = v
        elif k == "core id":
            core = v
            cores.add((phys, core))
    info["physical_cores"] = len(cores) or None
    try:  # the rated maximum beats the instantaneous "cpu MHz"
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            info["mhz"] = int(f.read()) / 1000.0
    except (OSError, ValueError):
        pass
    return info


def describe(gpu_name: str | None) -> dict[str, Any]:
    cpu = _cpuinfo()
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        from .. import __version__
        versions["qconv"] = __version__
    except ImportError:
        pass
    for mod in ("matplotlib", "cffi"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = __import__(mod)
            except ImportError:
                continue
        versions[mod] = getattr(m, "__version__", "?")
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu["model"],
        "cpu_logical_cores": os.cpu_count(),
        "cpu_physical_cores": cpu["physical_cores"],
        "cpu_mhz": cpu["mhz"],
        "cpu_simd": [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in cpu["flags"]],
        "gpu": gpu_name,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": versions,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# NVIDIA datasheet peaks (dense, no sparsity), by name: FP32 on the CUDA cores (TFLOP/s) and INT8
# on the tensor cores (TOP/s). INT32 on Hopper: half the FP32 lanes (64 INT32 vs 128 FP32 per SM).
_GPU_PEAKS = (("H100 PCIe", 51.0, 1513.0), ("H100 NVL", 60.0, 1670.0), ("H100", 67.0, 1979.0),
              ("H200", 67.0, 1979.0))


def peak_gops(backend: str, precision: Precision, machine: dict[str, Any],
              options: dict[str, Any] | None = None) -> tuple[float, str] | None:
    """Datasheet peak (G ops/s) of a GPU option, with where it comes from; None where unknown.
    CPU peaks are measured (cpu_peak_keys, measure_peaks), never taken from here."""
    if backend != "cuda":
        return None
    path = (options or {}).get("int8_path")
    name = machine.get("gpu") or ""
    for key, fp32, int8_tc in _GPU_PEAKS:
        if key in name:
            if precision is Precision.FP32:
                return fp32 * 1e3, f"{key} FP32 CUDA-core peak {fp32} TFLOP/s (NVIDIA datasheet)"
            if precision is Precision.INT32:
                return fp32 * 500, f"{key} INT32 peak: half the FP32 lanes ({fp32 / 2:.1f} TOP/s)"
            if precision is Precision.INT8 and path in (None, "mma"):
                return int8_tc * 1e3, f"{key} INT8 tensor-core peak {int8_tc} TOP/s dense (NVIDIA datasheet)"
    return None


def _isa(backend: str, options: dict[str, Any]) -> str | None:
    """The kernel family a c-avx2 option runs (its isa option resolved as the backend does)."""
    if backend != "c-avx2":
        return None
    try:
        from ..backends.c_avx2 import resolve
        return resolve(dict(options))[0]
    except Exception:
        return None


def _instruction(backend: str, isa: str | None, precision: Precision) -> str | None:
    """The instruction whose throughput bounds a CPU kernel (the one qconv_peak measures)."""
    if backend == "c-scalar":
        return "scalar-fma" if precision is Precision.FP32 else None
    if backend != "c-avx2" or isa is None:
        return None
    if precision is Precision.FP32:
        return "fma"
    if precision is Precision.INT32:
        return "mullo"
    if isa == "avx2":
        return "madd"  # INT8 runs on the INT16 vpmaddwd kernel without VNNI
    return "dpwssd" if precision is Precision.INT16 else "dpbusd"


def cpu_peak_keys(options: Sequence[Any], precisions: list[Precision]) -> dict[tuple[str, str], tuple[str, int]]:
    """{(label, precision): (instruction, threads)} for the CPU options whose kernels are built on
    an instruction the C extension's qconv_peak microbenchmark measures."""
    try:
        from ..backends.c_avx2 import resolve
    except Exception:
        return {}
    out = {}
    for o in options:
        isa = _isa(o.backend, o.options)
        for p in precisions:
            ins = _instruction(o.backend, isa, p)
            if ins is not None:
                threads = 1 if o.backend == "c-scalar" else resolve(dict(o.options))[1]
                out[(o.label, p.value)] = (ins, threads)
    return out


def measure_peaks(keys: set[tuple[str, int]], tries: int, seconds: float) -> dict[tuple[str, int], float]:
    """G ops/s (2 per multiply-add) of each (instruction, threads): the best of `tries` runs of
    about `seconds` each. Contention only lowers a run's rate, so the best run is the estimate."""
    try:
        from ..backends import _cext
    except Exception:
        return {}
    out = {}
    for ins, threads in sorted(keys):
        try:
            _, secs = _cext.peak(ins, threads, 1000)
            iters = max(1000, int(1000 * seconds / max(secs, 1e-6)))
            rates = []
            for _ in range(tries):
                macs, secs = _cext.peak(ins, threads, iters)
                rates.append(2 * macs / secs / 1e9)
            out[(ins, threads)] = max(rates)
        except Exception:
            continue
    return out
