"""FP32 at float32's limits. Outputs that overflow float32 are refused, with the same message on
every backend; outputs in the subnormal range stay within the FP32 bound's absolute term.

Finite inputs near float32's limit (3e38) make sums that leave its range; before this rule the
backends disagreed (the reference NaN and inf, c-scalar NaN, c-avx2 inf) and returned normally.
Now the call raises contract.fp32_overflow_error with the count of non-finite outputs. Each case
puts one huge input pixel among ones, so exactly the outputs whose receptive field holds it
overflow, whatever the summation order (two terms of 3e38, or 3e38 + 3e38 of bias: every order
passes FLT_MAX), and the count is the same on every backend.
"""

from __future__ import annotations

import numpy as np
import pytest

import qconv
from conftest import backend_or_skip
from qconv.contract import conv2d_float64, fp32_error_bound, fp32_overflow_error
from qconv.errors import InputError

CPU = [("reference", {}), ("c-scalar", {}), ("c-avx2", {"threads": 1}), ("c-avx2", {"threads": 2})]


def layer(name: str, big: float):
    """(x, w, conv kwargs, outputs that overflow when `big` is ~3e38): one pixel at (0, 2, 2)
    is `big`, the rest ones; kernel values chosen so that pixel's products sum past FLT_MAX."""
    h, w_, c, oc, kw = {"dense": (6, 6, 2, 4, {}), "depthwise": (6, 6, 3, 3, {"groups": 3}),
                        "grouped": (6, 6, 4, 4, {"groups": 2}), "bias": (6, 6, 2, 4, {}),
                        "oc-split": (1, 8, 2, 64, {})}[name]   # one output row, 4 OC blocks: split by OC
    x = np.ones((1, h, w_, c), np.float32)
    x[0, min(2, h - 1), 2, :] = big
    icg = c // kw.get("groups", 1)
    w = np.full((3, 3, oc, icg), 2.0 if name == "depthwise" else 1.0, np.float32)
    if name == "bias":   # the convolution reaches 2 * big / 3 (2e38); a bias of 2e38 takes it past FLT_MAX
        w[:] = 1 / 3
        kw = {"bias": np.full(oc, 2e38, np.float32)}
    rows = 1 if h == 1 else 3
    return x, w, kw, rows * 3 * oc


@pytest.mark.parametrize("name", ["dense", "depthwise", "grouped", "bias", "oc-split"])
@pytest.mark.parametrize("backend,opts", CPU, ids=[f"{b}{o}" for b, o in CPU])
def test_overflow_is_refused_with_the_contract_message(backend, opts, name):
    backend_or_skip(backend)
    x, w, kw, count = layer(name, 3e38)
    with pytest.raises(InputError) as e:
        qconv.conv2d(x, w, "fp32", backend, **kw, **opts)
    assert str(e.value) == str(fp32_overflow_error(count))


@pytest.mark.parametrize("name", ["dense", "depthwise", "grouped", "bias", "oc-split"])
@pytest.mark.parametrize("backend,opts", CPU, ids=[f"{b}{o}" for b, o in CPU])
def test_just_below_overflow_passes(backend, opts, name):
    backend_or_skip(backend)
    x, w, kw, _ = layer(name, 1.5e38 if name != "bias" else 1e38)
    y = qconv.conv2d(x, w, "fp32", backend, **kw, **opts)
    assert np.isfinite(y).all()
    assert y.max() > 2.5e38   # close to the limit, not trivially small


def test_prepared_conv_recovers_after_an_overflow():
    """The refusal leaves the prepared convolution usable: the next finite call is right."""
    backend_or_skip("c-avx2")
    x, w, kw, _ = layer("dense", 3e38)
    conv = qconv.prepare(w, "fp32", "c-avx2", threads=2)
    with pytest.raises(InputError):
        conv(x)
    ok = np.ones_like(x)
    np.testing.assert_array_equal(conv(ok), qconv.conv2d(ok, w, "fp32", "reference"))


def test_cuda_refuses_overflow_with_the_contract_message():
    backend_or_skip("cuda")
    x, w, kw, count = layer("dense", 3e38)
    with pytest.raises(InputError) as e:
        qconv.conv2d(x, w, "fp32", "cuda", **kw)
    assert str(e.value) in (str(fp32_overflow_error(count)), str(fp32_overflow_error()))


@pytest.mark.parametrize("backend,opts", CPU, ids=[f"{b}{o}" for b, o in CPU])
def test_subnormal_data_is_within_the_bounds_absolute_term(backend, opts):
    """Products below 2^-126 round with an absolute error (up to 2^-150): the relative bound alone
    fails on every backend, the reference's float32 matmuls included; (K + 1) * 2^-149 covers it."""
    backend_or_skip(backend)
    rng = np.random.default_rng(4)
    x = (rng.uniform(-1, 1, (2, 7, 9, 2)) * 1e-39).astype(np.float32)   # subnormal inputs and products
    w = rng.uniform(-1, 1, (1, 1, 4, 2)).astype(np.float32)
    y = qconv.conv2d(x, w, "fp32", backend, **opts).astype(np.float64)
    err = np.abs(y - conv2d_float64(x, w))
    k = 2
    assert np.all(err <= fp32_error_bound(x, w))
    assert np.any(err > fp32_error_bound(x, w) - (k + 1) * 2.0**-149)  # the term is needed
