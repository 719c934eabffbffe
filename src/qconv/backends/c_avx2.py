"""c-avx2: pthreads + SIMD kernels in C: AVX2/FMA (csrc/conv_avx2.c, csrc/conv_vnni_*.c), AVX-512
(csrc/conv_avx512.c) and AMX INT8/INT16/INT32 (csrc/conv_amx.c), the level chosen at run time.

Implements the whole contract: stride, zero padding, groups (implicit GEMM per group; depthwise
layers get their own kernels, csrc/dwconv_avx2.c), bias and per-channel kernel scales.

Options:
    threads: worker threads, 1..4x the CPUs (at most 256); default: env QCONV_THREADS, else every
        core this process may use.
    isa: the highest kernel family to use — "auto" (default; env QCONV_ISA overrides), then best
        first: "amx" (INT8, INT16, INT32 on AMX tiles, the wider integers by exact byte
        decomposition; FP32 as avx512), "avx512" (zmm kernels:
        FMA, vpmulld, vpdpwssd, vpdpbusd), "avx512vnni" (ymm kernels with EVEX VNNI), "avxvnni"
        (VEX AVX-VNNI), "avx2" (no VNNI). The best family the CPU and the OS allow, no higher
        than this, runs; AMX needs Linux to grant the tile state (asked once per process; env
        QCONV_NO_AMX=1 refuses it, as a VM might), and the reason it cannot run is in
        available_backends()'s description.
        "vnni-emulated" (for tests) runs the AVX512-VNNI family's kernels with vpdpbusd and
        vpdpwssd emulated by AVX2 instructions, so a CPU without VNNI checks their code too;
        "amx-emulated" (for tests) runs the amx level's INT8/INT16/INT32 tile kernels with every
        tile instruction emulated in C (csrc/amx_emu.h), FP32 as avx2.
    fuse_dequantize: True (default): integer outputs are dequantized in the microkernel's store
        (its cost is inside "convolve", and "dequantize" reads 0); False: a separate timed pass.
        The bits are the same either way. Depthwise kernels always dequantize in their store.
"""

from __future__ import annotations

import os

import numpy as np

from ..contract import Plan, Precision
from ..errors import InputError
from . import _cext
from ._cpu_common import Prepared, c_tiles
from .base import BackendRun, Tile, check_options, run_once

NAME = "c-avx2"
ACCEPTS_DEVICE_ARRAYS = False
ISAS = ("auto", "avx2", "avxvnni", "avx512vnni", "avx512", "amx", "vnni-emulated", "amx-emulated")
# Per level and precision, the instruction whose throughput bounds its kernels (the names
# qconv_peak measures, csrc/qconv.h); None: no one instruction the microbenchmarks measure
# (vpmulld zmm; the emulated VNNI sequences and tile instructions).
BOUND_INSTRUCTIONS = {
    "avx2":          {"fp32": "fma",    "int32": "mullo",      "int16": "madd",       "int8": "madd"},
    "avxvnni":       {"fp32": "fma",    "int32": "mullo",      "int16": "dpwssd",     "int8": "dpbusd"},
    "avx512vnni":    {"fp32": "fma",    "int32": "mullo",      "int16": "dpwssd",     "int8": "dpbusd"},
    "avx512":        {"fp32": "fma512", "int32": None,         "int16": "dpwssd512",  "int8": "dpbusd512"},
    "amx":           {"fp32": "fma512", "int32": "amx-dpbssd", "int16": "amx-dpbssd", "int8": "amx-dpbssd"},
    "vnni-emulated": {"fp32": "fma",    "int32": "mullo",      "int16": None,         "int8": None},
    "amx-emulated":  {"fp32": "fma",    "int32": None,         "int16": None,         "int8": None},
}
# Tile products per MAC where a level decomposes a precision into bytes (AMX: INT16 4, INT32 10).
PRODUCTS_PER_MAC = {("amx", "int16"): 4, ("amx", "int32"): 10}


def is_available() -> tuple[bool, str]:
    why = _cext.load_error()
    if why:
        return False, why
    have = _cext.cpu_features()
    if not {"avx2", "fma"} <= have:
        return False, f"this CPU lacks AVX2 and/or FMA (has: {', '.join(sorted(have)) or 'neither'}); use c-scalar"
    best = _cext.best_isa("auto")
    desc = f"C extension qconv._qconv_c, kernels: {best}"
    if best != "amx":
        desc += f" (amx: {_cext.isa_reason('amx')})"
    return True, desc


def variants() -> list[dict]:
    """The default (the best kernel family) and every lower SIMD level this machine runs (amx,
    avx512, avx512vnni, avxvnni, avx2), so the study and the tests show each beside the others."""
    out: list[dict] = [{}]
    try:
        levels = [i for i in _cext.usable_isas() if i != "scalar"]
    except Exception:  # the extension is absent: only the default, which reports why
        return out
    out += [{"isa": i} for i in levels[1:]]
    return out


def variants_for_tests() -> list[dict]:
    """What the tests run besides variants(): every other level this machine runs (the emulated
    ones, e.g. vnni-emulated: a family's kernels with its special instructions emulated in AVX2)
    and the separate dequantize pass."""
    try:
        best = _cext.best_isa("auto")
    except Exception:  # the extension is absent: nothing more to list
        return []
    shown = {best} | {o["isa"] for o in variants() if "isa" in o}
    levels = [i for i in ISAS if i != "auto" and i not in shown and _cext.best_isa(i) == i]
    return [{"isa": i} for i in levels] + [{"fuse_dequantize": False}]


def tiles(options: dict, precision: Precision) -> list[Tile]:
    """The tile the level these options run declares in C (qconv_tile)."""
    return [c_tiles(resolve(dict(options))[0], Precision(precision))]


def bound_instruction(options: dict, precision: Precision) -> tuple[str, int] | None:
    """(the instruction bounding the kernels these options run, its multiply-adds per MAC)."""
    level, prec = resolve(dict(options))[0], Precision(precision).value
    ins = BOUND_INSTRUCTIONS.get(level, {}).get(prec)
    return None if ins is None else (ins, PRODUCTS_PER_MAC.get((level, prec), 1))


def threads(options: dict) -> int:
    """The worker threads these options run (the threads option, QCONV_THREADS, or every core)."""
    return resolve(dict(options))[1]


def max_threads() -> int:
    """The thread cap: 4x this machine's CPUs, at most the C pool's 256."""
    return min(_cext.max_threads(), 4 * (os.cpu_count() or 1))


def default_threads() -> int:
    env = os.environ.get("QCONV_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise InputError(f"QCONV_THREADS={env!r} is not an integer") from None
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve(options: dict) -> tuple[str, int]:
    """(isa, threads) from the options, the environment and the machine."""
    check_options(NAME, options, ("threads", "isa", "fuse_dequantize"))
    if not isinstance(options.get("fuse_dequantize", True), bool):
        raise InputError(f"c-avx2: fuse_dequantize must be True or False, got {options['fuse_dequantize']!r}")
    threads = options.get("threads")
    where = "threads"
    if threads is None:
        threads, where = default_threads(), "QCONV_THREADS"
    cap = max_threads()
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise InputError(f"c-avx2: {where} must be a positive integer, got {threads!r}")
    if threads > cap:
        raise InputError(f"c-avx2: {where}={threads} is more than {cap} (4x this machine's "
                         f"{os.cpu_count()} CPUs, at most {_cext.max_threads()}): more threads than that "
                         f"only contend for the same cores")
    isa = options.get("isa") or os.environ.get("QCONV_ISA", "") or "auto"
    isa = isa.strip().lower() if isinstance(isa, str) else isa
    if isa not in ISAS:
        raise InputError(f"c-avx2: isa must be one of {', '.join(ISAS)}, got {isa!r}")
    return _cext.best_isa(isa), int(threads)


def prepare(plan: Plan, w: np.ndarray) -> Prepared:
    isa, threads = resolve(plan.options)
    return Prepared(plan, w, isa, threads, plan.options.get("fuse_dequantize", True))


def run(plan: Plan, x: np.ndarray, w: np.ndarray) -> BackendRun:
    return run_once(prepare, plan, x, w)
