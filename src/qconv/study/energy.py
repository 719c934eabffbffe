"""Energy: an estimate from per-operation energies, and measured energy where a meter exists.

Estimate: Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014,
doi:10.1109/ISSCC.2014.6757323 — 45 nm, 0.9 V figures (pJ): integer add 8 bit 0.03, 32 bit 0.1;
integer multiply 8 bit 0.2, 32 bit 3.1; float add 16 bit 0.4, 32 bit 0.9; float multiply 16 bit
1.1, 32 bit 3.7; a 64-bit DRAM access 1.3-2.6 nJ. The paper gives no 16-bit integer multiply;
we interpolate it (multiplier energy grows about with the square of the width: 0.2 * (16/8)^2 =
0.8 pJ) and say so wherever it is used.

Measured: GPU board energy through NVML's total-energy counter (pynvml / nvidia-ml-py when
importable, else libnvidia-ml through ctypes); CPU package energy through Linux RAPL
(/sys/class/powercap/intel-rapl:*/energy_uj) where it is readable. Both meters count the whole
device (idle power and other processes included) over the measured loop.
"""

from __future__ import annotations

import ctypes
import glob
import os
import time
from dataclasses import dataclass
from typing import Any

from ..contract import Precision

SOURCE = ("M. Horowitz, \"Computing's energy problem (and what we can do about it)\", "
          "ISSCC 2014, doi:10.1109/ISSCC.2014.6757323 (45 nm, 0.9 V)")

# pJ per operation, 45 nm (Horowitz 2014).
PJ = {
    "int8_add": 0.03, "int32_add": 0.1, "int8_mult": 0.2, "int32_mult": 3.1,
    "fp16_add": 0.4, "fp32_add": 0.9, "fp16_mult": 1.1, "fp32_mult": 3.7,
}
INT16_MULT_PJ = 0.8          # interpolated, not in the source: 0.2 pJ * (16/8)^2
DRAM_64BIT_NJ = (1.3, 2.6)   # one 64-bit DRAM access (range given by the source)

# One multiply-accumulate per precision. The contract accumulates integers in int32, so every
# integer precision pays a 32-bit add; the multiply has the operand width.
MAC_PJ = {
    Precision.FP32: PJ["fp32_mult"] + PJ["fp32_add"],
    Precision.INT32: PJ["int32_mult"] + PJ["int32_add"],
    Precision.INT16: INT16_MULT_PJ + PJ["int32_add"],
    Precision.INT8: PJ["int8_mult"] + PJ["int32_add"],
}


def model() -> dict[str, Any]:
    """The constants as they go into results.json."""
    return {
        "source": SOURCE,
        "pj_per_op": dict(PJ),
        "int16_mult_pj": INT16_MULT_PJ,
        "int16_mult_note": "interpolated (0.2 pJ * (16/8)^2), not in the source",
        "dram_64bit_nj": list(DRAM_64BIT_NJ),
        "mac_pj": {p.value: v for p, v in MAC_PJ.items()},
        "method": ("compute = MACs * (multiply + add at the precision's width; int32 accumulate); "
                   "quantize = one fp32 multiply per input and kernel element; dequantize = one fp32 "
                   "multiply per output; DRAM = compulsory traffic only (each tensor read or written "
                   "once: fp32 tensors read and quantized tensors written by quantize, quantized "
                   "operands read and the float32 output written by the convolution), at 1.3-2.6 nJ "
                   "per 64 bits; caches and reuse are not modeled"),
    }


def estimate(precision: Precision, x_elems: int, w_elems: int, out_elems: int, macs: int) -> dict[str, float]:
    """Joules per convolution by the model: compute, quantize/dequantize, DRAM (low/high), total."""
    compute = macs * MAC_PJ[precision] * 1e-12
    if precision.is_integer:
        qbytes = precision.bits // 8
        quant = (x_elems + w_elems) * PJ["fp32_mult"] * 1e-12 + out_elems * PJ["fp32_mult"] * 1e-12
        traffic = ((x_elems + w_elems) * (4 + qbytes)       # quantize: read fp32, write q
                   + (x_elems + w_elems) * qbytes + out_elems * 4)  # convolve: read q, write y
    else:
        quant = 0.0
        traffic = (x_elems + w_elems) * 4 + out_elems * 4
    words = traffic / 8.0
    dram_lo, dram_hi = words * DRAM_64BIT_NJ[0] * 1e-9, words * DRAM_64BIT_NJ[1] * 1e-9
    return {
        "compute_j": compute, "quantize_dequantize_j": quant,
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


def measure(meter: Meter, call: Any, min_seconds: float, min_calls: int) -> dict[str, float]:
    """Run `call` repeatedly for at least min_seconds and min_calls; joules per call and watts."""
    e0, t0 = meter.joules(), time.perf_counter()
    calls = 0
    while calls < min_calls or time.perf_counter() - t0 < min_seconds:
        call()
        calls += 1
    e1, t1 = meter.joules(), time.perf_counter()
    return {"joules_per_call": (e1 - e0) / calls, "watts": (e1 - e0) / (t1 - t0),
            "calls": calls, "seconds": t1 - t0}
