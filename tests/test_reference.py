"""The reference backend against implementations written in the test: im2col + float64 matmul for
FP32 (within contract.fp32_error_bound), and quantize -> exact Python-int sums -> int32 wrap ->
dequantize for the integer precisions (bit-exact, wrapped count exact)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import qconv
from brute import (conv_f64, conv_int_exact, conv_int_object, dequantize_oracle, quantize_oracle,
                   wrap_int32)
from qconv.contract import Precision, Rounding, fp32_error_bound
from strategies import INT_PRECISIONS, conv_problems, conv_shapes, scale_args, tensors

BACKEND = "reference"


def _assert_within_fp32_bound(y, x, w):
    y64 = conv_f64(x, w)
    bound = fp32_error_bound(x, w)
    err = np.abs(y.astype(np.float64) - y64)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (f"FP32 error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}")


@st.composite
def big_kernel_problems(draw):
    """Kernels larger than the input in at least one direction."""
    k = draw(st.sampled_from([3, 4, 5, 7]))
    h, w = draw(st.integers(1, k - 1)), draw(st.integers(1, 12))
    if draw(st.booleans()):
        h, w = w, h
    n, c, oc = draw(st.integers(1, 3)), draw(st.integers(1, 20)), draw(st.integers(1, 20))
    return draw(tensors((n, h, w, c))), draw(tensors((k, k, oc, c)))


@given(st.one_of(conv_problems(), big_kernel_problems()))
@example((np.ones((1, 1, 1, 1), np.float32), np.ones((7, 7, 1, 1), np.float32)))
@example((np.ones((3, 12, 12, 20), np.float32), np.ones((2, 4, 20, 20), np.float32)))
def test_fp32_against_im2col_float64(problem):
    x, w = problem
    r = qconv.conv2d_result(x, w, "fp32", BACKEND)
    y = r.output
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert y.shape == x.shape[:3] + (w.shape[2],)
    _assert_within_fp32_bound(y, x, w)
    assert r.wrapped is None and not r.overflow_possible and r.scale_input is None


@given(st.data())
def test_fp32_bound_is_tight_enough_to_catch_a_wrong_padding(data):
    # The check above must be able to fail: shifting the even kernel's extra row to the top
    # (the other SAME convention) changes the result far beyond the bound.
    x = data.draw(tensors((1, 6, 6, 3), scale=1.0))
    w = data.draw(tensors((2, 2, 4, 3), scale=1.0))
    y = qconv.conv2d(x, w, "fp32", BACKEND)
    xs = np.zeros_like(x)
    xs[:, 1:, 1:, :] = x[:, :-1, :-1, :]  # top/left convention == ours on a shifted input
    y_other = conv_f64(xs, w)
    assert np.any(np.abs(y - y_other) > fp32_error_bound(x, w))


@st.composite
def int_cases(draw):
    x, w = draw(conv_problems())
    prec = draw(st.sampled_from(INT_PRECISIONS))
    rnd = draw(st.sampled_from(list(Rounding)))
    return x, w, prec, rnd, draw(scale_args())


@given(int_cases())
@example((np.full((1, 3, 3, 20), 40.0, np.float32), np.full((7, 7, 20, 20), 40.0, np.float32),
          Precision.INT32, Rounding.NEAREST, 1e9))
@example((np.full((1, 3, 3, 20), 1.5, np.float32), np.full((3, 3, 2, 20), -2.5, np.float32),
          Precision.INT16, Rounding.TRUNCATE, (1.0, 64.0)))
def test_integer_precisions_bit_exact(case):
    x, w, prec, rnd, scale = case
    r = qconv.conv2d_result(x, w, prec, BACKEND, scale=scale, rounding=rnd)
    truncate = rnd is Rounding.TRUNCATE
    sx, sw = r.scale_input, r.scale_kernel
    if isinstance(scale, tuple):
        assert (sx, sw) == (float(np.float32(scale[0])), float(np.float32(scale[1])))
    elif isinstance(scale, float):
        assert sx == sw == float(np.float32(scale))
    qx = quantize_oracle(x, sx, prec.qmax, truncate)
    qw = quantize_oracle(w, sw, prec.qmax, truncate)
    acc, outside = wrap_int32(conv_int_exact(qx, qw))
    want = dequantize_oracle(acc, sx, sw)
    assert r.output.dtype == np.float32
    np.testing.assert_array_equal(r.output, want)
    assert r.wrapped == outside
    k = w.shape[0] * w.shape[1] * w.shape[3]
    bound = k * int(np.abs(qx).max()) * int(np.abs(qw).max())
    assert r.overflow_possible == (bound > 2**31 - 1)
    if outside:
        assert r.overflow_possible


def test_exact_int_helper_agrees_with_python_object_sums():
    # the fast oracle used above (int64 or 16-bit halves) against plain Python-int sums
    rng = np.random.default_rng(7)
    for q in (127, 32767, 2**31 - 1):
        for kh in (1, 2, 3, 5):
            qx = rng.integers(-q, q, (2, 4, 5, 3), endpoint=True)
            qw = rng.integers(-q, q, (kh, kh, 2, 3), endpoint=True)
            a, b = conv_int_exact(qx, qw), conv_int_object(qx, qw)
            assert a.shape == b.shape and all(int(u) == int(v) for u, v in zip(a.ravel(), b.ravel()))


def test_single_s_equals_the_pair_s_s():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 6, 7)).astype(np.float32)
    w = rng.standard_normal((3, 3, 4, 7)).astype(np.float32)
    for prec in INT_PRECISIONS:
        for rnd in ("nearest", "truncate"):
            a = qconv.conv2d_result(x, w, prec, BACKEND, scale=37.0, rounding=rnd)
            b = qconv.conv2d_result(x, w, prec, BACKEND, scale=(37.0, 37.0), rounding=rnd)
            np.testing.assert_array_equal(a.output, b.output)
            assert a.scale_strategy == "single" and b.scale_strategy == "pair"


def test_rounding_modes_differ_where_they_should():
    x = np.full((1, 1, 1, 1), 0.75, np.float32)
    w = np.ones((1, 1, 1, 1), np.float32)
    # 0.75 * 2 = 1.5: nearest-even -> 2, truncate -> 1; kernel 1 * 2 = 2; inv = 1/4
    assert qconv.conv2d(x, w, "int8", BACKEND, scale=2.0).item() == 1.0
    assert qconv.conv2d(x, w, "int8", BACKEND, scale=2.0, rounding="truncate").item() == 0.5


# ---------------------------------------------------------------------------------------------
# 'SAME' padding, by hand

X3 = np.arange(1, 10, dtype=np.float32).reshape(1, 3, 3, 1)   # [[1,2,3],[4,5,6],[7,8,9]]


def test_same_padding_even_kernel_hand_example():
    # 2x2 kernel: pt = pl = 0, the extra row/column is read at the bottom/right:
    # y[h, w] = 1*x[h, w] + 10*x[h, w+1] + 100*x[h+1, w] + 1000*x[h+1, w+1], zeros outside.
    w = np.array([[1, 10], [100, 1000]], np.float32).reshape(2, 2, 1, 1)
    want = np.array([[5421, 6532, 603],
                     [8754, 9865, 906],
                     [87, 98, 9]], np.float32).reshape(1, 3, 3, 1)
    np.testing.assert_array_equal(qconv.conv2d(X3, w, "fp32", BACKEND), want)
    for prec in ("int32", "int16"):  # integer data, S = 1: exact in every integer precision
        np.testing.assert_array_equal(qconv.conv2d(X3, w, prec, BACKEND, scale=1.0), want)
    np.testing.assert_array_equal(conv_f64(X3, w), want)  # the test's own im2col agrees


def test_same_padding_odd_and_4x4_kernels_hand_examples():
    # 3x3 all-ones: the sum of the 3x3 neighbourhood, zeros outside
    w = np.ones((3, 3, 1, 1), np.float32)
    want = np.array([[12, 21, 16], [27, 45, 33], [24, 39, 28]], np.float32).reshape(1, 3, 3, 1)
    np.testing.assert_array_equal(qconv.conv2d(X3, w, "fp32", BACKEND), want)
    np.testing.assert_array_equal(qconv.conv2d(X3, w, "int8", BACKEND, scale=1.0), want)
    # 4x4 kernel on a 1x1 input: pt = pl = 1, so only tap (1, 1) lands on the pixel
    w4 = np.arange(16, dtype=np.float32).reshape(4, 4, 1, 1)
    y = qconv.conv2d(np.full((1, 1, 1, 1), 2.0, np.float32), w4, "fp32", BACKEND)
    assert y.item() == 2.0 * w4[1, 1, 0, 0] == 10.0
    # 7x3 kernel on a 2x2 input: pt = 3, pl = 1
    w73 = np.arange(21, dtype=np.float32).reshape(7, 3, 1, 1)
    x22 = np.array([[1, 2], [3, 4]], np.float32).reshape(1, 2, 2, 1)
    y = qconv.conv2d(x22, w73, "fp32", BACKEND)[0, :, :, 0]
    k = w73[:, :, 0, 0]
    hand = [[1 * k[3, 1] + 2 * k[3, 2] + 3 * k[4, 1] + 4 * k[4, 2],
             1 * k[3, 0] + 2 * k[3, 1] + 3 * k[4, 0] + 4 * k[4, 1]],
            [1 * k[2, 1] + 2 * k[2, 2] + 3 * k[3, 1] + 4 * k[3, 2],
             1 * k[2, 0] + 2 * k[2, 1] + 3 * k[3, 0] + 4 * k[3, 1]]]
    np.testing.assert_array_equal(y, np.array(hand, np.float32))


def test_kernel_layout_is_kh_kw_oc_ic():
    # OC before IC: w[kh, kw, o, c]. Two input channels, three output channels, 1x1 kernel.
    x = np.array([1.0, 10.0], np.float32).reshape(1, 1, 1, 2)
    w = np.array([[1, 2], [3, 4], [5, 6]], np.float32).reshape(1, 1, 3, 2)
    assert qconv.conv2d(x, w, "fp32", BACKEND).ravel().tolist() == [21.0, 43.0, 65.0]
    assert qconv.conv2d(x, w, "int16", BACKEND, scale=1.0).ravel().tolist() == [21.0, 43.0, 65.0]


@given(conv_shapes(max_hw=6, max_c=6))
def test_batch_items_are_independent(shapes):
    xs, ws = shapes
    rng = np.random.default_rng(0)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    y = qconv.conv2d(x, w, "int8", BACKEND, scale=(20.0, 50.0))
    for i in range(xs[0]):
        np.testing.assert_array_equal(y[i:i + 1], qconv.conv2d(x[i:i + 1], w, "int8", BACKEND,
                                                               scale=(20.0, 50.0)))
