"""The convolution launched while its input pass finishes (programmatic dependent launch, sm_90
and later; cuda/_driver.py Launch): calls back to back on different inputs give the reference's
bits with it on and off, and the launch uses it exactly where it should; a driver that refuses it
gets plain launches."""

from __future__ import annotations

import types

import numpy as np
import pytest

import qconv

from conftest import backend_or_skip


@pytest.mark.parametrize("precision,options", [("int8", {}), ("int8", {"scale": 40.0}), ("int16", {}),
                                               ("int8", {"groups": 16})])
def test_back_to_back_calls_give_the_reference_bits_with_and_without_pdl(monkeypatch, precision: str,
                                                                          options: dict) -> None:
    backend_or_skip("cuda")
    from qconv.backends import cuda as cb
    from qconv.backends.cuda import _driver
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((4, 20, 20, 16)).astype(np.float32) * (1 + i) for i in range(3)]
    w = rng.standard_normal((3, 3, 16, 1 if options.get("groups") else 16)).astype(np.float32)
    want = [qconv.conv2d(x, w, precision, "reference", **options) for x in xs]
    xd = [cb.to_device(x) for x in xs]
    for pdl in (False, True):
        monkeypatch.setattr(_driver, "PDL", pdl)
        conv = qconv.prepare(w, precision, "cuda", **options)
        ys = [conv(x) for x in xd]  # enqueued back to back: each pass rewrites what the last convolution read
        job = conv._packed.job(conv.geometry(xs[0].shape), True)
        assert job.pre is not None
        assert (job.main.cfg is not None) == (pdl and _driver.runtime().cc >= (9, 0))
        for y, ref in zip(ys, want):
            assert np.array_equal(np.asarray(y).view(np.uint32), ref.view(np.uint32)), f"pdl={pdl}"


def test_a_driver_that_refuses_pdl_gets_plain_launches() -> None:
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")
    from cuda.bindings import driver
    from qconv.backends.cuda import _driver

    class Drv:  # answers as a driver without programmatic dependent launch would
        def __init__(self) -> None:
            self.calls: list[str] = []

        def cuLaunchKernelEx(self, cfg, f, args, extra):
            self.calls.append(f"ex on {cfg.hStream}")
            return (driver.CUresult.CUDA_ERROR_NOT_SUPPORTED,)

        def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, smem, stream, args, extra):
            self.calls.append(f"plain on {stream}")
            return (driver.CUresult.CUDA_SUCCESS,)

    _driver._ok()
    launch = object.__new__(_driver.Launch)
    launch.f, launch.name, launch.grid, launch.block, launch.smem, launch.argp = "f", "conv", (2, 1, 1), 128, 0, 0
    launch.drv, launch.coop, launch._stream = Drv(), False, None
    launch.cfg = types.SimpleNamespace(hStream=None)
    launch.launch("s1")
    launch.launch("s2")
    assert launch.drv.calls == ["ex on s1", "plain on s1", "plain on s2"]
    assert launch.cfg is None
