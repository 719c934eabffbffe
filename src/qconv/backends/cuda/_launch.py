"""Kernel launch signatures, declared once: every qconv kernel takes one parameter struct by
value, mirrored here field for field from cuda_kernels/*.cu and *.cuh (tests/test_cuda.py parses the C
structs and compares them with these, so the two cannot drift apart).

    struct in C                     ctypes mirror   kernels
    ConvParams (qconv_common.cuh)   ConvParams      qconv_{f32,s32,s16}_conv_simt_*, qconv_s8_conv_{mma,dp4a}_*,
                                                    qconv_f32_conv_outer_*
    PassParams (quant_scale.cuh)    PassParams      qconv_scan_x, qconv_quantize_x_*, qconv_pad_x_f32, qconv_epilogue
    DwParams (conv_dw.cu)           DwParams        qconv_{f32,q32}_dwconv_*
    QStats, QSlot                   QStats, QSlot   (device statistics and the host-mapped call record)
"""

from __future__ import annotations

import ctypes
from typing import Any

P = ctypes.c_uint64   # every pointer (an int assigns directly)
I = ctypes.c_int
U = ctypes.c_uint
F = ctypes.c_float
LL = ctypes.c_longlong


def _ints(*names: str) -> list[tuple[str, Any]]:
    return [(n, I) for n in names]


class QStats(ctypes.Structure):
    _fields_ = [("maxbits", U), ("flag", I), ("counter", U), ("s_x", F), ("m", F), ("gen", U), ("done", U), ("nonfinite", U)]


class QSlot(ctypes.Structure):
    _fields_ = [("flag", I), ("s_x", F), ("m", F), ("nonfinite", U)]


class ConvParams(ctypes.Structure):
    _fields_ = [(n, P) for n in ("x", "w", "out", "inv", "bias", "stats", "slot", "scan_x")] + [
        ("scan_n", LL), ("wgs", LL)] + _ints(
        "N", "H", "W", "Cw", "XPW", "KH", "KW", "pt", "pl", "sh", "sw", "Ho", "Wo", "OC", "OCg",
        "Kpw", "M", "T", "ktiles", "ktiles_per_split", "splits", "mode", "vec_out", "scan_vec", "inv_uniform")


class PassParams(ctypes.Structure):
    _fields_ = [(n, P) for n in ("x", "out", "stats", "slot", "s_w", "inv", "bias")] + [("n", LL)] + _ints(
        "C", "G", "icg", "icgp", "OC", "q", "qmax", "trunc") + [("s", F)] + _ints(
        "dev_scale", "vec", "do_max", "mode", "N", "H", "W", "Hp", "Wp", "pt", "pl")


class DwParams(ctypes.Structure):
    _fields_ = [(n, P) for n in ("x", "w", "out", "inv", "bias", "stats", "slot", "scan_x")] + [("scan_n", LL)] + _ints(
        "N", "H", "W", "C", "KH", "KW", "pt", "pl", "sh", "sw", "Ho", "Wo", "OC", "mult", "tiles_w") + [
        ("s", F)] + _ints("dev_scale", "qmax", "trunc", "scan_vec")


STRUCTS = {"QStats": QStats, "QSlot": QSlot, "ConvParams": ConvParams, "PassParams": PassParams,
           "DwParams": DwParams}

# C spelling -> ctypes type, for the test that compares the mirrors with the .cu sources
C_TYPES = {"int": I, "unsigned": U, "float": F, "long long": LL}


def launch_gate(rt: Any, stream: Any, flag_dev: int) -> None:
    """qconv_gate_wait(const volatile int* flag): the one kernel whose argument is not a struct."""
    from ._driver import ck
    f = rt.func("quant.cu", "qconv_gate_wait")
    arg = ctypes.c_uint64(flag_dev)
    arr = (ctypes.c_void_p * 1)(ctypes.addressof(arg))
    ck(rt.drv.cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, stream, ctypes.addressof(arr), 0), "cuLaunchKernel(gate_wait)")
