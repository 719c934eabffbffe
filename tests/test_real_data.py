"""Real data, where ../shared/data is present: the reference FP32 output against the stored
float64 output (real layers) and against conv2d_float64 (the assignment's exam cases), within
the contract's bound. Skips with the reason where the data is absent."""

from __future__ import annotations

import json

import numpy as np
import pytest

import qconv
from brute import conv_f64
from conftest import EXAM, REAL, exam_cases, real_layers
from qconv.contract import conv2d_float64, fp32_error_bound
from qconv.tensorfile import load, load_pair

EPS32 = float(np.finfo(np.float32).eps)


def _layers():
    found = real_layers()
    if found:
        return found
    return [pytest.param(None, marks=pytest.mark.skip(
        reason=f"{REAL} is absent (it ships beside the qconv checkout, not in a user's clone)"))]


def _assert_within(y, y64, bound, what):
    err = np.abs(y.astype(np.float64) - y64)
    i = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"{what}: |error| {err[i]:.3g} > bound {bound[i]:.3g} at {i}"


@pytest.mark.parametrize("layer", _layers())
def test_real_layer_fp32_against_stored_float64_output(real_dir, layer):
    d = real_dir / layer
    x, w = load_pair(d / "input_tensor.bin", d / "kernel_tensor.bin")
    stored = load(d / "output_tensor.bin")
    meta = json.loads((d / "meta.json").read_text())
    assert list(x.shape) == meta["input_shape_nhwc"] and list(w.shape) == meta["kernel_shape_khkwocic"]
    assert stored.shape == x.shape[:3] + (w.shape[2],)
    # The stored file is the float64 convolution rounded once to float32: it is our float64
    # reference to within half a float32 ulp (plus float64 summation-order noise).
    y64 = conv2d_float64(x, w)
    k = w.shape[0] * w.shape[1] * w.shape[3]
    abs_sum = conv2d_float64(np.abs(x), np.abs(w))
    _assert_within(stored, y64, EPS32 / 2 * np.abs(y64) + 2 * k * 2.0**-53 * abs_sum,
                   f"{layer}: stored output vs conv2d_float64 (SAME convention, layout)")
    # The reference backend's FP32 output: the contract's bound, plus the storage rounding.
    r = qconv.conv2d_result(x, w, "fp32", "reference")
    _assert_within(r.output, stored.astype(np.float64),
                   fp32_error_bound(x, w) + EPS32 / 2 * np.abs(stored.astype(np.float64)),
                   f"{layer}: reference FP32 vs stored output")
    # FP32 is not exact, but it is very close: NRMSE well below any integer precision's
    r = qconv.conv2d_result(x, w, "fp32", "reference", reference=y64)
    assert 0 < r.nrmse < 1e-6


@pytest.mark.parametrize("case", exam_cases())
def test_exam_case_fp32_against_float64(exam_dir, case):
    d = exam_dir / case
    x, w = load_pair(d / "input_tensor.bin", d / "kernel_tensor.bin")
    assert x.shape[0] == 1 and w.shape[:2] == (3, 3) and w.shape[3] == x.shape[3]
    y64 = conv2d_float64(x, w)
    y = qconv.conv2d(x, w, "fp32", "reference")
    _assert_within(y, y64, fp32_error_bound(x, w), f"exam case {case}: reference FP32")
    # and the float64 reference itself against the test's own im2col (one spot per image row
    # would do; the whole thing is cheap enough at these sizes)
    np.testing.assert_allclose(y64, conv_f64(x, w), rtol=0, atol=1e-9 * float(np.abs(y64).max()))


def test_exam_case_3_has_its_input_only(exam_dir):
    d = exam_dir / "3"
    x = load(d / "input_tensor.bin")
    assert x.shape == (1, 7, 7, 512)
    assert not (d / "kernel_tensor.bin").exists()  # never recovered: exam_cases() leaves it out
    assert "3" not in exam_cases()
