"""CFFI build of qconv._qconv_c (API mode, out-of-line). Declares only; setup.py points here.

The cdef is qconv.h's block between QCONV_CDEF_BEGIN and QCONV_CDEF_END, read verbatim.
Options from the environment:
    QCONV_CFLAGS   extra compiler flags, appended (e.g. "-fsanitize=address,undefined -g")
    QCONV_LDFLAGS  extra linker flags, appended
Base flags: -O3, -ffp-contract=off (quantize and dequantize are one multiply each, never fused),
-fvisibility=hidden (only the module init is exported; cffi calls the ABI inside the .so),
-pthread, -g0 (no debug info in the shipped module: Python's own CFLAGS carry -g, which made it
1.5 MB; QCONV_CFLAGS="-g" comes later on the command line and wins, as the sanitizer build does).
ISA flags are not global: each SIMD file enables its own with `#pragma GCC target`.
cffi builds the module against the stable ABI (Py_LIMITED_API); setup.py tags the wheel abi3.
"""

import os
import shlex

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["qconv.c", "run.c", "cpu_features.c", "peak.c", "threadpool.c", "conv_scalar.c", "conv_avx2.c", "conv_avx512.c", "conv_amx.c", "conv_amx_emu.c", "amx_planes.c", "conv_vnni_evex.c", "conv_vnni_vex.c",
           "conv_vnni_emu.c", "dwconv_scalar.c", "dwconv_avx2.c"]


def _cdef() -> str:
    with open(os.path.join(HERE, "qconv.h"), encoding="utf-8") as f:
        text = f.read()
    return text.split("/* QCONV_CDEF_BEGIN */", 1)[1].split("/* QCONV_CDEF_END */", 1)[0]


def _rel(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "qconv._qconv_c",
    '#include "qconv.h"',
    sources=[_rel(os.path.join(HERE, s)) for s in SOURCES],
    include_dirs=[_rel(HERE)],
    depends=[_rel(os.path.join(HERE, s)) for s in ("qconv.h", "qconv_impl.h", "driver.h", "threadpool.h", "conv_tile.h", "conv_vnni.inc", "conv_amx.inc", "amx_emu.h")],
    extra_compile_args=["-O3", "-ffp-contract=off", "-fvisibility=hidden", "-pthread", "-g0"] + shlex.split(os.environ.get("QCONV_CFLAGS", "")),
    extra_link_args=["-pthread"] + shlex.split(os.environ.get("QCONV_LDFLAGS", "")),
    libraries=["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
