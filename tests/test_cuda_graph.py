"""conv.capture(x): one prepared call recorded as a CUDA Graph on fixed device buffers.

A replay must give exactly what an ordinary call gives on the input buffer's contents at replay
time (integers bit for bit), carry the contract's errors, and refuse what it cannot capture."""

from __future__ import annotations

import numpy as np
import pytest

import qconv
from qconv.errors import InputError

from conftest import backend_or_skip


def _layer(seed: int, n: int = 2, h: int = 9, w: int = 11, c: int = 16, oc: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, h, w, c)).astype(np.float32), rng.standard_normal((3, 3, oc, c)).astype(np.float32)


def test_capture_refuses_host_backends_and_host_arrays() -> None:
    backend_or_skip("c-scalar")
    x, w = _layer(0)
    with pytest.raises(InputError, match="CUDA Graph"):
        qconv.prepare(w, "int8", "c-scalar").capture(x)


@pytest.mark.parametrize("precision,options", [("fp32", {}), ("int8", {}), ("int16", {}), ("int8", {"scale": 40.0}),
                                               ("int8", {"stride": 2, "groups": 2})])
def test_replay_equals_a_call_on_the_buffer_contents(precision: str, options: dict) -> None:
    backend_or_skip("cuda")
    from qconv.backends import cuda as cb
    x1, w = _layer(1)
    x2, _ = _layer(2)
    groups = options.get("groups", 1)
    w = w[..., : w.shape[3] // groups]
    conv = qconv.prepare(w, precision, "cuda", **options)
    buf = cb.to_device(x1)
    g = conv.capture(buf)
    want1, want2 = conv(x1), conv(x2)
    got1 = np.asarray(g())
    assert got1.shape == want1.shape
    # the graph reads the buffer at replay time: overwrite it in place, replay, compare
    from qconv.backends.cuda import _driver
    rt = _driver.runtime()
    _driver.ck(rt.drv.cuMemcpyHtoD(buf.ptr, np.ascontiguousarray(x2).ctypes.data, x2.nbytes), "cuMemcpyHtoD")
    got2 = np.asarray(g())
    if precision == "fp32":
        np.testing.assert_allclose(got1, want1, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got2, want2, rtol=1e-5, atol=1e-4)
    else:
        assert np.array_equal(got1.view(np.uint32), want1.view(np.uint32))
        assert np.array_equal(got2.view(np.uint32), want2.view(np.uint32))


def test_replay_reports_non_finite_input_and_recovers() -> None:
    backend_or_skip("cuda")
    from qconv.backends import cuda as cb
    from qconv.backends.cuda import _driver
    x, w = _layer(3)
    conv = qconv.prepare(w, "int8", "cuda")
    buf = cb.to_device(x)
    g = conv.capture(buf)
    good = np.asarray(g())
    bad = x.copy()
    bad[0, 1, 2, 3] = np.nan
    rt = _driver.runtime()
    _driver.ck(rt.drv.cuMemcpyHtoD(buf.ptr, bad.ctypes.data, bad.nbytes), "cuMemcpyHtoD")
    g()
    with pytest.raises(InputError, match="non-finite"):
        g.synchronize()
    _driver.ck(rt.drv.cuMemcpyHtoD(buf.ptr, x.ctypes.data, x.nbytes), "cuMemcpyHtoD")
    assert np.array_equal(np.asarray(g()).view(np.uint32), good.view(np.uint32))


def test_ordinary_calls_between_replays_do_not_disturb_the_graph() -> None:
    """Ordinary calls on the same stream grow the shared scratch; the graph owns its own."""
    backend_or_skip("cuda")
    from qconv.backends import cuda as cb
    x, w = _layer(4)
    conv = qconv.prepare(w, "int8", "cuda")
    g = conv.capture(cb.to_device(x))
    first = np.asarray(g()).copy()
    big, _ = _layer(5, n=8, h=33, w=35)
    conv(cb.to_device(big)).synchronize()        # a larger call: the shared scratch is reallocated
    assert np.array_equal(np.asarray(g()).view(np.uint32), first.view(np.uint32))
