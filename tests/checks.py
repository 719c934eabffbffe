"""What test modules share: the one differential check (a backend's output against the contract),
the one way to reach NVRTC or skip, and cutting one definition out of a kernel source (the tests
that compile kernel code for the host)."""

from __future__ import annotations

import re

import numpy as np
import pytest

import qconv
from qconv.contract import Precision, check_layer, conv2d_float64, fp32_error_bound
from qconv.errors import BackendError


def assert_matches(y, x: np.ndarray, w: np.ndarray, precision, layer: dict | None = None, *, bias=None,
                   scale=None, rounding: str = "nearest", what: str = "",
                   fp32_bound: tuple[float, float] = (2.0, 0.0)) -> None:
    """Integers: the reference backend's bits for the same call. FP32: within
    contract.fp32_error_bound of the float64 convolution (+ bias), with the (c, per_term) the
    backend declares (backends.fp32_bound). y may be a device array."""
    precision = Precision(precision)
    layer = layer or {}
    g = check_layer(x.shape, w.shape, stride=layer.get("stride", 1), padding=layer.get("padding", "same"),
                    groups=layer.get("groups", 1))
    y = np.asarray(y)
    assert y.dtype == np.float32 and y.shape == g.out_shape, f"{what}: {y.dtype} {y.shape}, want {g.out_shape}"
    if precision.is_integer:
        ref = qconv.conv2d(x, w, precision, "reference", scale=scale, rounding=rounding, bias=bias, **layer)
        bad = y.view(np.uint32) != ref.view(np.uint32)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} outputs differ from the reference; "
                                 f"first at {at}: {y[at]!r} vs {ref[at]!r}")
        return
    y64 = conv2d_float64(x, w, g)
    if bias is not None:
        y64 = y64 + np.asarray(bias, np.float64)
    err = np.abs(y.astype(np.float64) - y64)
    bound = fp32_error_bound(x, w, c=fp32_bound[0], geom=g, bias=bias, per_term=fp32_bound[1])
    if not np.all(err <= bound):
        at = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(f"{what}: FP32 error {err[at]:.3g} > bound {bound[at]:.3g} at {at}")


def assert_same_bits(y, want: np.ndarray, what: str = "") -> None:
    """Two outputs of the same computation (a prepared call and a one-shot call, host and device)."""
    y = np.asarray(y)
    assert y.shape == want.shape, f"{what}: shape {y.shape} vs {want.shape}"
    bad = y.view(np.uint32) != np.asarray(want, np.float32).view(np.uint32)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} outputs differ; first at {at}: "
                             f"{y[at]!r} vs {want[at]!r}")


def nvrtc_or_skip():
    """The NVRTC module, or a skip when cuda-python or the NVRTC library is missing here. Only
    loading NVRTC may skip: a kernel that fails to compile fails its test."""
    try:
        from cuda.bindings import nvrtc  # noqa: F401
    except ImportError as e:
        pytest.skip(f"cuda-python is not installed here: {e}")
    from qconv.backends import _nvrtc
    try:
        _nvrtc.version()
    except (BackendError, OSError, RuntimeError) as e:
        pytest.skip(f"NVRTC cannot be loaded here: {e}")
    return _nvrtc


def cut_definition(text: str, start: str) -> str:
    """The definition that begins with the line matching `start`, through its closing brace (and
    the semicolon of a struct)."""
    m = re.search(start, text, re.M)
    assert m, f"{start!r} not found in the kernel source"
    i = text.index("{", m.end() - 1 if text[m.end() - 1] == "{" else m.end())
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            end = j + 1
            return text[m.start():end + (text[end] == ";")]
    raise AssertionError(f"unbalanced braces after {start!r}")
