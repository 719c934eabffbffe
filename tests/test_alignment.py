"""Misaligned float32 arrays (views at a 1-byte offset) never reach C (issue 13).

C reads and writes float32 through float pointers; a misaligned one is undefined behaviour that
UBSan reports (it did in pack_kernel and conv_scalar.c). The C wrappers (_cext) copy a misaligned
input, kernel, bias or scale into an aligned array, and run a misaligned output through an
aligned one. csrc/sanitize.sh runs this file under ASan + UBSan (alignment checks included), where
a misaligned array reaching C aborts the run; here the results must equal the aligned calls'.
"""

from __future__ import annotations

import numpy as np
import pytest

import qconv
from conftest import backend_or_skip
from qconv.backends import _cext
from qconv.contract import check_layer


def misaligned(a: np.ndarray) -> np.ndarray:
    """A copy of a, C-contiguous float32 at an odd address."""
    buf = np.zeros(a.size * 4 + 1, np.uint8)
    m = buf[1:].view(np.float32).reshape(a.shape)
    m[...] = a
    assert not m.flags.aligned
    return m


CASES = [("c-scalar", "fp32", 1), ("c-scalar", "int8", 1), ("c-avx2", "fp32", 1), ("c-avx2", "int16", 1),
         ("c-avx2", "int8", 1), ("c-avx2", "fp32", 4), ("c-avx2", "int8", 4)]


@pytest.mark.parametrize("backend,precision,groups", CASES)
def test_misaligned_arrays_give_the_aligned_result(backend, precision, groups):
    backend_or_skip(backend)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 7, 9, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 4, 4 // groups)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    s_w = np.array([40.0, 50.0, 60.0, 70.0], np.float32)
    is_int = precision != "fp32"
    opts = {"threads": 2} if backend == "c-avx2" else {}
    kw = {"groups": groups, "scale": (20.0, s_w) if is_int else None, **opts}
    expected = qconv.conv2d(x, w, precision, backend, bias=b, **kw)

    # Through the API: the input, kernel, bias, per-channel scales and out= misaligned.
    kw_m = dict(kw, scale=(20.0, misaligned(s_w)) if is_int else None)
    conv = qconv.prepare(misaligned(w), precision, backend, bias=misaligned(b), **kw_m)
    out = misaligned(np.zeros_like(expected))
    conv(misaligned(x), out=out)
    np.testing.assert_array_equal(out, expected)

    # Straight to the C wrappers, which api.py's copies would otherwise shield.
    isa = "scalar" if backend == "c-scalar" else "auto"
    handle, _ = _cext.prepare(precision, isa, opts.get("threads", 1), False, misaligned(w), groups=groups,
                              s_w=misaligned(s_w) if is_int else None, bias=misaligned(b))
    y = misaligned(np.zeros_like(expected))
    _cext.run(handle, misaligned(x), check_layer(x.shape, w.shape, groups=groups), 20.0 if is_int else 0.0, 0, y)
    np.testing.assert_array_equal(y, expected)
