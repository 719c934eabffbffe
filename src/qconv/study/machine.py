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


def _gpu_instruction_peaks(fp32: float, int8_tc: float) -> dict[str, tuple[float, str]]:
    """G ops/s of each GPU instruction a backend may name as its bound, from one GPU's datasheet."""
    return {"ffma": (fp32 * 1e3, f"FP32 CUDA-core peak {fp32} TFLOP/s (NVIDIA datasheet)"),
            "imad": (fp32 * 500, f"INT32 peak: half the FP32 lanes ({fp32 / 2:.1f} TOP/s)"),
            "mma-s8": (int8_tc * 1e3, f"INT8 tensor-core peak {int8_tc} TOP/s dense (NVIDIA datasheet)"),
            "wgmma-s8": (int8_tc * 1e3, f"INT8 tensor-core peak {int8_tc} TOP/s dense (NVIDIA datasheet)"),
            "mma-tf32": (int8_tc * 250, f"TF32 tensor-core peak {int8_tc / 4:.1f} TFLOP/s dense: a quarter of INT8's "
                                        f"(NVIDIA datasheet)")}


def _bound(backend: str, precision: Precision, options: dict[str, Any] | None) -> tuple[str, int] | None:
    """What the backend declares bounds its kernel for these options: (instruction, its
    multiply-adds per MAC), or None (it declares none, or the options are not its own)."""
    from .. import backends
    from ..errors import QconvError
    mod = backends.module(backend)
    declare = getattr(mod, "bound_instruction", None)
    if declare is None:
        return None
    try:
        return declare(dict(options or {}), precision)
    except QconvError:   # options the backend refuses: no kernel, no bound
        return None


def peak_gops(backend: str, precision: Precision, machine: dict[str, Any],
              options: dict[str, Any] | None = None) -> tuple[float, str] | None:
    """Datasheet peak (G ops/s) of a GPU option's bounding instruction, with where it comes from;
    None where unknown. CPU peaks are measured (cpu_peak_keys, measure_peaks), never taken from here."""
    bound = _bound(backend, precision, options)
    name = machine.get("gpu") or ""
    for key, fp32, int8_tc in _GPU_PEAKS:
        if key in name and bound is not None:
            hit = _gpu_instruction_peaks(fp32, int8_tc).get(bound[0])
            if hit is None:
                return None
            gops, note = hit
            per_mac = bound[1]
            return gops / per_mac, f"{key} {note}" + (f", / {per_mac} {bound[0]} per MAC" if per_mac > 1 else "")
    return None


def cpu_peak_keys(options: Sequence[Any], precisions: list[Precision]) -> dict[tuple[str, str], tuple[str, int]]:
    """{(label, precision): (instruction, threads)} for the options whose backend declares a bounding
    instruction that the C extension's qconv_peak microbenchmark measures, at the option's threads."""
    try:
        from ..backends import _cext
        measured = set(_cext.PEAK_CODES)
    except ImportError:
        return {}
    from .. import backends
    out = {}
    for o in options:
        for p in precisions:
            bound = _bound(o.backend, p, o.options)
            # a byte-decomposed path (AMX INT16/INT32) would need the peak divided by its products per
            # MAC, which the study's measured-peak records do not carry yet: no peak rather than a wrong one
            if bound is not None and bound[0] in measured and bound[1] == 1:
                out[(o.label, p.value)] = (bound[0], backends.module(o.backend).threads(dict(o.options)))
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
