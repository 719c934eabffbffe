"""Ctrl-C stops a long C convolution (issue 13: a 15.7 s call ignored it until it finished).

Long calls run in a helper thread while the main thread waits, so SIGINT reaches Python; the
main thread then sets the call's cancel flag (qconv_cancel), which the C driver polls between
blocks of the convolution, waits for C to stop, and re-raises KeyboardInterrupt.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import qconv
from conftest import backend_or_skip
from qconv.contract import check_layer

# ~6e10 multiply-accumulates: tens of seconds on the scalar kernels.
LONG_CALL = """
import numpy as np, qconv
x = np.ones((1, 160, 160, 512), np.float32)
w = np.full((3, 3, 512, 512), 0.01, np.float32)
conv = qconv.prepare(w, "fp32", "c-scalar")
print("ready", flush=True)
conv(x)
print("finished", flush=True)
"""


def test_sigint_stops_a_long_call_promptly():
    backend_or_skip("c-scalar")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.Popen([sys.executable, "-c", LONG_CALL], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(1.0)   # inside the C call
        sent = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=5)
        took = time.monotonic() - sent
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "finished" not in out, "the call ended before the signal: make LONG_CALL longer"
    assert p.returncode != 0
    assert err.strip().splitlines()[-1] == "KeyboardInterrupt", err
    assert "Error" not in err and "Exception" not in err, err   # nothing failed on the way out
    assert took < 5


@pytest.mark.parametrize("precision,groups,fuse", [("fp32", 1, True), ("int8", 1, True), ("int16", 1, False),
                                                   ("int8", 8, True)])
def test_a_cancelled_call_stops_and_the_handle_still_works(precision, groups, fuse):
    """A call whose flag is already set returns QCONV_ECANCELED from every worker (GEMM with
    fused and separate dequantize, depthwise); the next call on the same handle is exact."""
    backend_or_skip("c-avx2")
    from qconv.backends import _cext
    ffi, lib = _cext._lib()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 12, 12, 8)).astype(np.float32)
    w = rng.standard_normal((3, 3, 8, 8 // groups)).astype(np.float32)
    handle, _ = _cext.prepare(precision, "auto", 2, False, w, groups=groups, s_w=np.float32(50),
                              fuse_dequantize=fuse)
    geom = check_layer(x.shape, w.shape, groups=groups)
    y = np.zeros(geom.out_shape, np.float32)
    t = ffi.new("qconv_timings *")
    st = lib.qconv_run(handle, ffi.from_buffer("float[]", x), 1, 12, 12, geom.pt, geom.pb, geom.pl, geom.pr,
                       geom.ho, geom.wo, 20.0, 0, ffi.from_buffer("float[]", y), t, ffi.new("int *", 1))
    assert st == _cext._c("QCONV_ECANCELED")
    s_x = 0.0 if precision == "fp32" else 20.0
    _cext.run(handle, x, geom, s_x, 0, y)
    scale = None if precision == "fp32" else (20.0, 50.0)
    expected = qconv.conv2d(x, w, precision, "c-scalar", groups=groups, scale=scale)
    if precision == "fp32":
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_array_equal(y, expected)
