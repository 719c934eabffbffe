"""Energy: an estimate from per-operation energies, and measured energy where a meter exists.

Estimate: Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014,
doi:10.1109/ISSCC.2014.6757323 — 45 nm, 0.9 V figures (pJ): integer add 8 bit 0.03, 32 bit 0.1;
integer multiply 8 bit 0.2, 32 bit 3.1; float add 16 bit 0.4, 32 bit 0.9; float multiply 16 bit
1.1, 32 bit 3.7; a 64-bit DRAM access 1.3-2.6 nJ. The paper gives no 16-bit integer multiply;
we interpolate it (multiplier energy grows about with the square of the width: 0.2 * (16/8)^2 =
0.8 pJ) and say so wherever it is used. GPUs with HBM: HBM2's access energy, about 3.9 pJ/bit
(O'Connor et al., MICRO 2017), for the compulsory traffic instead of the DDR figure.

Measured: GPU board energy through NVML's total-energy counter (pynvml / nvidia-ml-py when
importable, else libnvidia-ml through ctypes); CPU package energy through Linux RAPL
(/sys/class/powercap/intel-rapl:*/energy_uj) where it is readable. Both meters count the whole
device, so the idle power measured in the same run is subtracted, and a figure is called
measured only when the kernel fills at least half of a loop of at least one second
(measure_loop); otherwise the numbers are kept but carry no verdict.
"""

from __future__ import annotations

import ctypes
import glob
import os
import time
from dataclasses import dataclass
from typing import Any

from ..contract import Precision
from .config import ENERGY_LOOP_S, ENERGY_MIN_KERNEL_SHARE

SOURCE = ("M. Horowitz, \"Computing's energy problem (and what we can do about it)\", "
          "ISSCC 2014, doi:10.1109/ISSCC.2014.6757323 (45 nm, 0.9 V)")
HBM_SOURCE = ("M. O'Connor et al., \"Fine-Grained DRAM: Energy-Efficient DRAM for Extreme Bandwidth "
              "Systems\", MICRO 2017, doi:10.1145/3123939.3124545 (HBM2 access energy, about 3.9 pJ/bit)")

# pJ per operation, 45 nm (Horowitz 2014).
PJ = {
    "int8_add": 0.03, "int32_add": 0.1, "int8_mult": 0.2, "int32_mult": 3.1,
    "fp16_add": 0.4, "fp32_add": 0.9, "fp16_mult": 1.1, "fp32_mult": 3.7,
}
INT16_MULT_PJ = 0.8          # interpolated, not in the source: 0.2 pJ * (16/8)^2
DRAM_64BIT_NJ = (1.3, 2.6)   # one 64-bit DDR access (range given by Horowitz 2014)
HBM_PJ_PER_BIT = 3.9         # HBM2 (O'Connor et al. 2017); used for HBM2e/HBM3 cards too, no later figure cited
# GPUs whose memory is HBM (NVIDIA data-center parts); any other GPU is costed with DDR figures.
HBM_GPUS = ("P100", "V100", "A100", "A800", "H100", "H800", "H200", "GH200", "B100", "B200")

# One multiply-accumulate per precision. The contract accumulates integers in int32, so every
# integer precision pays a 32-bit add; the multiply has the operand width.
MAC_PJ = {
    Precision.FP32: PJ["fp32_mult"] + PJ["fp32_add"],
    Precision.INT32: PJ["int32_mult"] + PJ["int32_add"],
    Precision.INT16: INT16_MULT_PJ + PJ["int32_add"],
    Precision.INT8: PJ["int8_mult"] + PJ["int32_add"],
}


def gpu_memory(gpu: str | None) -> str | None:
    """'hbm' for a GPU known to carry HBM, 'other' for another GPU, None without a GPU."""
    if not gpu:
        return None
    return "hbm" if any(k in gpu for k in HBM_GPUS) else "other"


def model(gpu: str | None = None) -> dict[str, Any]:
    """The constants as they go into results.json, each with its source."""
    mem = gpu_memory(gpu)
    return {
        "source": SOURCE,
        "pj_per_op": dict(PJ),
        "int16_mult_pj": INT16_MULT_PJ,
        "int16_mult_note": "interpolated (0.2 pJ * (16/8)^2), not in the source",
        "dram_64bit_nj": list(DRAM_64BIT_NJ),
        "hbm_pj_per_bit": HBM_PJ_PER_BIT,
        "hbm_source": HBM_SOURCE,
        "gpu_memory": mem,
        "mac_pj": {p.value: v for p, v in MAC_PJ.items()},
        "method": ("compute = MACs * (multiply + add at the precision's width; int32 accumulate); "
                   "quantize = one fp32 multiply per input and kernel element; dequantize = one fp32 "
                   "multiply per output; memory = compulsory traffic only (each tensor read or written "
                   "once), at 1.3-2.6 nJ per 64 bits for DDR (CPU options, and GPUs without HBM) or "
                   f"{HBM_PJ_PER_BIT} pJ/bit for HBM (GPUs with HBM); caches and reuse are not modeled"),
    }


def estimate(precision: Precision, x_elems: int, w_elems: int, out_elems: int, macs: int,
             mdl: dict[str, Any] | None = None, on_gpu: bool = False) -> dict[str, float]:
    """Joules per convolution by the model: compute, quantize/dequantize, memory (low/high), total."""
    compute = macs * MAC_PJ[precision] * 1e-12
    if precision.is_integer:
        qbytes = precision.bits // 8
        quant = (x_elems + w_elems) * PJ["fp32_mult"] * 1e-12 + out_elems * PJ["fp32_mult"] * 1e-12
        traffic = ((x_elems + w_elems) * (4 + qbytes)       # quantize: read fp32, write q
                   + (x_elems + w_elems) * qbytes + out_elems * 4)  # convolve: read q, write y
    else:
        quant = 0.0
        traffic = (x_elems + w_elems) * 4 + out_elems * 4
    hbm = on_gpu and (mdl or {}).get("gpu_memory") == "hbm"
    if hbm:
        dram_lo = dram_hi = traffic * 8 * HBM_PJ_PER_BIT * 1e-12
    else:
        words = traffic / 8.0
        dram_lo, dram_hi = words * DRAM_64BIT_NJ[0] * 1e-9, words * DRAM_64BIT_NJ[1] * 1e-9
    return {
        "compute_j": compute, "quantize_dequantize_j": quant, "memory": "hbm" if hbm else "ddr",
        "dram_low_j": dram_lo, "dram_high_j": dram_hi, "dram_bytes": float(traffic),
        "total_low_j": compute + quant + dram_lo, "total_high_j": compute + quant + dram_hi,
        "total_j": compute + quant + (dram_lo + dram_hi) / 2,
    }


# ---------------------------------------------------------------------------------------- meters

@dataclass
class Meter:
    """A cumulative energy counter in joules."""

    name: str            # "nvml" or "rapl"
    device: str          # what it measures
    _read: Any

    def joules(self) -> float:
        return float(self._read())


def _nvml_pynvml() -> tuple[Meter | None, str]:
    try:
        import pynvml  # type: ignore[import-not-found]
    except Exception as e:  # not installed
        return None, f"pynvml not importable ({e.__class__.__name__})"
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else str(name)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    except Exception as e:
        return None, f"pynvml: {e}"
    return Meter("nvml", name, lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0), "pynvml"


def _nvml_ctypes() -> tuple[Meter | None, str]:
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as e:
        return None, f"libnvidia-ml.so.1 not loadable ({e})"
    try:
        if lib.nvmlInit_v2() != 0:
            return None, "nvmlInit_v2 failed"
        handle = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(0), ctypes.byref(handle)) != 0:
            return None, "no NVML device 0"
        buf = ctypes.create_string_buffer(96)
        lib.nvmlDeviceGetName(handle, buf, ctypes.c_uint(96))
        mj = ctypes.c_ulonglong()
        if lib.nvmlDeviceGetTotalEnergyConsumption(handle, ctypes.byref(mj)) != 0:
            return None, "nvmlDeviceGetTotalEnergyConsumption is not supported on this GPU"
    except AttributeError as e:
        return None, f"libnvidia-ml lacks a symbol ({e})"

    def read() -> float:
        v = ctypes.c_ulonglong()
        if lib.nvmlDeviceGetTotalEnergyConsumption(handle, ctypes.byref(v)) != 0:
            raise OSError("NVML energy read failed")
        return v.value / 1000.0
    return Meter("nvml", buf.value.decode(errors="replace"), read), "libnvidia-ml (ctypes)"


def nvml_meter() -> tuple[Meter | None, str]:
    """GPU 0's total-energy counter, or None and why not."""
    m, why = _nvml_pynvml()
    if m is not None:
        return m, why
    m2, why2 = _nvml_ctypes()
    if m2 is not None:
        return m2, why2
    return None, f"{why}; {why2}"


def rapl_meter(root: str = "/sys/class/powercap") -> tuple[Meter | None, str]:
    """Sum of the CPU package domains' energy_uj counters (wrap-around handled), or None and why."""
    if not os.path.isdir(root):
        return None, f"{root} does not exist (no RAPL powercap interface on this machine/kernel)"
    zones = []
    for d in sorted(glob.glob(os.path.join(root, "*rapl:[0-9]*"))):
        if d.count(":") != 1:   # package domains only (intel-rapl:0), not subzones (intel-rapl:0:0)
            continue
        f = os.path.join(d, "energy_uj")
        try:
            with open(f) as fh:
                int(fh.read())
            with open(os.path.join(d, "max_energy_range_uj")) as fh:
                rng = int(fh.read())
        except (OSError, ValueError) as e:
            return None, f"{f} is not readable ({e.__class__.__name__}: RAPL usually needs root)"
        zones.append((f, rng))
    if not zones:
        return None, f"no RAPL package domain under {root}"
    last = {f: None for f, _ in zones}
    total = {"j": 0.0}

    def read() -> float:
        for f, rng in zones:
            with open(f) as fh:
                v = int(fh.read())
            prev = last[f]
            if prev is not None:
                total["j"] += ((v - prev) % rng if rng > 0 else v - prev) / 1e6
            last[f] = v
        return total["j"]
    read()
    return Meter("rapl", f"CPU package ({len(zones)} domain(s))", read), "RAPL powercap"


def idle_watts(meter: Meter, seconds: float) -> float:
    """The meter's power while this process sleeps (other load on the device included)."""
    e0, t0 = meter.joules(), time.perf_counter()
    time.sleep(seconds)
    return (meter.joules() - e0) / (time.perf_counter() - t0)


def resident_input(backend: str, x: Any) -> Any:
    """The input where the backend computes: on the GPU for cuda (through the backend's own
    to_device, else torch), so the loop times kernels, not copies; the host array otherwise."""
    if backend != "cuda":
        return x
    from .. import backends
    from ..errors import QconvError
    try:
        to_device = getattr(backends.get("cuda"), "to_device", None)
    except QconvError:
        return x
    if to_device is not None:
        return to_device(x)
    try:
        import torch  # type: ignore[import-not-found]
        if torch.cuda.is_available():
            return torch.as_tensor(x, device="cuda")
    except ImportError:
        pass
    return x  # host input: the copies stay in the loop, and its kernel share shows it


def measure_loop(meter: Meter, call: Any, x: Any, min_seconds: float, idle_w: float | None,
                 convolve_s: float, flops: int) -> dict[str, Any]:
    """Run call(x) back to back for at least min_seconds. Dynamic energy = the meter's energy
    minus idle power times the loop's time; "measured" only when the kernel (calls x its median
    convolve time) is at least ENERGY_MIN_KERNEL_SHARE of the loop, the loop lasted min_seconds
    and the idle power is known."""
    call(x)
    e0, t0 = meter.joules(), time.perf_counter()
    calls = 0
    while calls < 1 or time.perf_counter() - t0 < min_seconds:
        call(x)
        calls += 1
    e1, t1 = meter.joules(), time.perf_counter()
    secs, joules = t1 - t0, e1 - e0
    share = min(1.0, calls * convolve_s / secs) if secs > 0 else 0.0
    dyn_w = None if idle_w is None else joules / secs - idle_w
    dyn_j = None if dyn_w is None else dyn_w * secs / calls
    ok = bool(secs >= ENERGY_LOOP_S and share >= ENERGY_MIN_KERNEL_SHARE and dyn_w is not None and dyn_w > 0)
    return {"joules_per_call": joules / calls, "watts": joules / secs, "calls": calls, "seconds": secs,
            "idle_watts": idle_w, "dynamic_joules_per_call": dyn_j, "kernel_share": share,
            "gops_per_watt": (flops * calls / secs / 1e9) / dyn_w if dyn_w and dyn_w > 0 else None,
            "measured": ok}
