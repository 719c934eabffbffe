"""The numerical contract (shared/CONTRACT.md, docs/SEMANTICS.md), checked function by function
against oracles written from the text: quantize, dequantize, exact wrapped integer convolution,
the overflow bound, and NRMSE."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import qconv
from brute import (INT32_MAX, INT32_MIN, conv_int_object, dequantize_oracle, quantize_oracle,
                   wrap_int32)
from qconv.contract import (Precision, Rounding, conv2d_int_wrapped, count_saturated,
                            dequant_factor, dequantize, nrmse, overflow_possible, quantize)
from qconv.errors import QconvError
from strategies import INT_PRECISIONS

ROUNDINGS = list(Rounding)


# --------------------------------------------------------------------------------------------
# quantize


@st.composite
def float32_arrays(draw, max_len=64):
    """float32 values of every kind quantize meets: ordinary, half-integers (ties), huge, tiny."""
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(1, max_len))
    kind = draw(st.sampled_from(["normal", "ties", "wide", "ints"]))
    rng = np.random.default_rng(seed)
    if kind == "normal":
        v = rng.standard_normal(n) * draw(st.sampled_from([1e-3, 1.0, 100.0, 1e5]))
    elif kind == "ties":
        v = rng.integers(-1000, 1000, n) + 0.5
    elif kind == "wide":
        v = np.sign(rng.standard_normal(n)) * 10.0 ** rng.uniform(-40, 38, n)
    else:
        v = rng.integers(-(2**31), 2**31, n).astype(np.float64)
    return v.astype(np.float32)


scales = st.sampled_from([0.5, 1.0, 1.3126729, 3.0, 127.0, 1024.0, 2.0**15, 2.0**20, 1e9, 3e38])


@given(float32_arrays(), scales, st.sampled_from(INT_PRECISIONS), st.sampled_from(ROUNDINGS))
@example(np.array([2170.0], dtype=np.float32), 1.3126729, Precision.INT32, Rounding.NEAREST)
@example(np.array([2.0**31, -(2.0**31), 2147483520.0, 3e38], dtype=np.float32), 1.0,
         Precision.INT32, Rounding.NEAREST)
def test_quantize_matches_oracle(t, s, prec, rnd):
    q = quantize(t, s, prec, rnd)
    assert q.dtype == prec.int_dtype
    want = quantize_oracle(t, s, prec.qmax, truncate=rnd is Rounding.TRUNCATE)
    np.testing.assert_array_equal(q.astype(np.int64), want)
    # symmetric range: -Qmax-1 (-128, -32768, -2^31) is never produced
    assert int(q.min()) >= -prec.qmax and int(q.max()) <= prec.qmax
    # odd and monotone
    np.testing.assert_array_equal(quantize(-t, s, prec, rnd).astype(np.int64), -q.astype(np.int64))
    order = np.argsort(t, kind="stable")
    assert np.all(np.diff(q[order].astype(np.int64)) >= 0)


@pytest.mark.parametrize("rnd, want", [
    (Rounding.NEAREST, [0, 2, 2, 4, 0, -2, -2, -4, 0, 3, 1, -1]),
    (Rounding.TRUNCATE, [0, 1, 2, 3, 0, -1, -2, -3, 0, 2, 0, 0]),
])
@pytest.mark.parametrize("prec", INT_PRECISIONS)
def test_quantize_ties_to_even_and_truncation(rnd, want, prec):
    below_half = np.nextafter(np.float32(0.5), np.float32(0))   # 0.49999997 -> 0 either way
    above_2_5 = np.nextafter(np.float32(2.5), np.float32(3))    # 2.5000002 -> 3 when rounding
    t = np.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, below_half, above_2_5,
                  0.9999999, -0.9999999], dtype=np.float32)
    assert quantize(t, 1.0, prec, rnd).tolist() == want


def test_quantize_is_one_float32_multiply():
    # float32(2170) * float32(1.3126729) is exactly 2848.5 in float32 (a tie -> 2848), while the
    # float64 product 2848.50009... would round to 2849: the contract's product is float32.
    t, s = np.float32(2170.0), np.float32(1.3126729)
    assert float(t) * float(s) > 2848.5 and t * s == np.float32(2848.5)
    for prec in (Precision.INT32, Precision.INT16):  # int8 would saturate
        assert int(quantize(np.array([t]), s, prec)[0]) == 2848
        assert int(quantize(np.array([-t]), s, prec)[0]) == -2848
    # the input is taken as float32 first: float64 0.5 + 2^-30 becomes 0.5, a tie -> 0
    assert int(quantize(np.array([0.5 + 2.0**-30]), 1.0, Precision.INT8)[0]) == 0
    # the scale too is float32: 1 + 2^-30 is 1.0f, so 0.5 stays a tie
    assert int(quantize(np.array([np.float32(0.5)]), 1.0 + 2.0**-30, Precision.INT8)[0]) == 0


@pytest.mark.parametrize("prec", INT_PRECISIONS)
@pytest.mark.parametrize("rnd", ROUNDINGS)
def test_quantize_saturates_at_qmax(prec, rnd):
    qmax = prec.qmax
    big = np.array([qmax + 1.0, qmax + 0.5, 2.0 * qmax, 1e30, 3.4e38], dtype=np.float32)
    q = quantize(np.concatenate([big, -big]), 1.0, prec, rnd).astype(np.int64)
    assert q.tolist() == [qmax] * len(big) + [-qmax] * len(big)
    # a product that overflows float32 to inf saturates too
    assert quantize(np.array([3e38, -3e38], np.float32), 3e38, prec, rnd).astype(np.int64).tolist() == [qmax, -qmax]


def test_quantize_int32_saturates_where_qmax_is_not_a_float32():
    # 2^31 - 1 is not a float32: the products 2^31 (the float32 nearest 2^31-1) and beyond clamp
    # to exactly 2147483647, never to -2^31 (the C cast's overflow) nor to 2^31.
    top = np.float32(2.0**31)
    below = np.nextafter(top, np.float32(0))  # 2147483520, the largest float32 below 2^31
    t = np.array([top, -top, below, -below, np.float32(2.0**32)], dtype=np.float32)
    for rnd in ROUNDINGS:
        q = quantize(t, 1.0, Precision.INT32, rnd)
        assert q.dtype == np.int32
        assert q.tolist() == [INT32_MAX, -INT32_MAX, 2147483520, -2147483520, INT32_MAX]


@given(float32_arrays(), scales, st.sampled_from(INT_PRECISIONS), st.sampled_from(ROUNDINGS))
@example(np.array([2.0**31, -(2.0**31), 2147483520.0, 2.0**32], dtype=np.float32), 1.0,
         Precision.INT32, Rounding.NEAREST)
@example(np.array([1.9460574e-39, -2.7231945e+23, 1.5665166e+31], dtype=np.float32), 0.5,
         Precision.INT32, Rounding.NEAREST)
@example(np.array([127.5, -127.5, 127.49999, 128.0, 127.99999], dtype=np.float32), 1.0, Precision.INT8, Rounding.NEAREST)
@example(np.array([127.5, -127.5, 127.49999, 128.0, 127.99999], dtype=np.float32), 1.0, Precision.INT8, Rounding.TRUNCATE)
@example(np.array([32767.5, -32767.5, 32767.498, 32768.0], dtype=np.float32), 1.0, Precision.INT16, Rounding.NEAREST)
def test_count_saturated_counts_exactly_the_clamped_elements(t, s, prec, rnd):
    # clamped: |R(float32(t) * float32(s))| > Qmax, decided in exact arithmetic
    truncate = rnd is Rounding.TRUNCATE
    unclamped = quantize_oracle(t, s, 2**200, truncate=truncate)
    want = sum(1 for v in unclamped.ravel() if abs(int(v)) > prec.qmax)
    assert count_saturated(t, s, prec, rnd) == want


@pytest.mark.parametrize("prec", INT_PRECISIONS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_api_rejects_non_finite_values(prec, bad):
    x = np.ones((1, 3, 3, 2), np.float32)
    w = np.ones((3, 3, 2, 2), np.float32)
    xb = x.copy()
    xb[0, 1, 1, 0] = bad
    with pytest.raises(QconvError, match=r"input holds 1 non-finite"):
        qconv.conv2d(xb, w, prec, scale=1.0)
    wb = w.copy()
    wb[0, 0, 0, 0] = bad
    with pytest.raises(QconvError, match=r"kernel holds 1 non-finite"):
        qconv.conv2d(x, wb, prec, scale="maxabs")


# --------------------------------------------------------------------------------------------
# dequantize


def test_dequant_factor_is_float64_then_one_rounding():
    # 1/(s_x*s_w) in float32 arithmetic differs here from the float64 value rounded once.
    sx, sw = np.float32(760.4167), np.float32(925.9552)
    want = np.float32(1.0 / (float(sx) * float(sw)))
    assert np.float32(1) / (sx * sw) != want
    assert dequant_factor(sx, sw) == want
    assert dequant_factor(sx, sw).dtype == np.float32
    assert qconv.contract.Plan(Precision.INT8, s_x=sx, s_w=sw).inv == want


@st.composite
def accumulators(draw):
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(1, 64))
    kind = draw(st.sampled_from(["full", "small", "ties"]))
    if kind == "full":
        a = rng.integers(INT32_MIN, INT32_MAX, n, endpoint=True)
    elif kind == "small":
        a = rng.integers(-300, 300, n)
    else:  # odd integers just above 2^24 and 2^30: float32(acc) is a tie -> even
        a = (2 ** rng.integers(24, 31, n) + 2 * rng.integers(0, 1000, n) + 1) * rng.choice([-1, 1], n)
    return a.astype(np.int32)


@given(accumulators(), st.sampled_from([1.0, 3.0, 127.0, 1.7461237, 9.948241]),
       st.sampled_from([1.0, 0.3, 151.61269, 44633.934, 2.0**20]))
@example(np.array([2**24 + 1, 2**24 + 3, -(2**24 + 1), INT32_MIN, INT32_MAX], np.int32), 1.0, 1.0)
def test_dequantize_matches_oracle(acc, sx, sw):
    y = dequantize(acc, dequant_factor(sx, sw))
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, dequantize_oracle(acc, sx, sw))


def test_dequantize_rounds_acc_to_nearest_even_then_multiplies_once():
    acc = np.array([2**24 + 1, 2**24 + 3, 2**25 + 2, INT32_MAX], np.int32)
    y = dequantize(acc, np.float32(1.0))
    assert y.tolist() == [2.0**24, 2.0**24 + 4, 2.0**25, 2.0**31]
    # one float32 multiply: float32(acc) * inv, not float64(acc) * inv rounded afterwards
    acc = np.array([16777217], np.int32)
    inv = np.float32(3.0)
    assert dequantize(acc, inv)[0] == np.float32(np.float32(2.0**24) * inv)
    assert dequantize(acc, inv)[0] != np.float32(16777217 * 3.0)


# --------------------------------------------------------------------------------------------
# exact integer convolution, wrapped to int32


@st.composite
def int_operands(draw):
    """(qx, qw) quantized operands of one precision, small shapes, from tame to overflow-forcing."""
    prec = draw(st.sampled_from(INT_PRECISIONS))
    n, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    c, oc = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    kh, kw = draw(st.sampled_from([1, 2, 3, 4, 5])), draw(st.sampled_from([1, 2, 3, 5]))
    kind = draw(st.sampled_from(["full", "extreme", "small", "same-sign"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    qmax = prec.qmax

    def gen(shape):
        if kind == "full":
            v = rng.integers(-qmax, qmax, shape, endpoint=True)
        elif kind == "extreme":
            v = rng.choice([-qmax, -qmax + 1, 0, qmax - 1, qmax], shape)
        elif kind == "small":
            v = rng.integers(-3, 4, shape)
        else:  # all one sign at the top of the range: forces every long-enough sum out of int32
            v = rng.integers(qmax // 2, qmax, shape, endpoint=True)
        return v.astype(prec.int_dtype)

    return gen((n, h, w, c)), gen((kh, kw, oc, c))


@given(int_operands())
def test_conv2d_int_wrapped_matches_python_int_sums(ops):
    qx, qw = ops
    acc, wrapped = conv2d_int_wrapped(qx, qw)
    want, outside = wrap_int32(conv_int_object(qx, qw))
    assert acc.dtype == np.int32 and acc.shape == want.shape
    np.testing.assert_array_equal(acc, want)
    assert wrapped == outside


@pytest.mark.parametrize("prec", [Precision.INT32, Precision.INT16])
def test_conv2d_int_wrapped_overflow_forcing_full_range(prec):
    # every product is Qmax^2; K = 3*3*4 = 36 of them: every output leaves int32 and wraps
    q = prec.qmax
    qx = np.full((1, 4, 4, 4), q, prec.int_dtype)
    qw = np.full((3, 3, 2, 4), q, prec.int_dtype)
    acc, wrapped = conv2d_int_wrapped(qx, qw)
    want, outside = wrap_int32(conv_int_object(qx, qw))
    np.testing.assert_array_equal(acc, want)
    # corners see 4 taps * 4 channels (16 products), edges 24, interior 36: all outside int32
    assert 16 * q * q > INT32_MAX
    assert wrapped == outside == acc.size
    # alternating signs cancel: nothing wraps although overflow is "possible"
    qx2 = qx.copy()
    qx2[..., 1::2] = -q
    acc2, wrapped2 = conv2d_int_wrapped(qx2, qw)
    assert wrapped2 == 0 and np.all(acc2 == 0)
    assert overflow_possible(q, q, 36)


@pytest.mark.parametrize("total, inside", [
    (INT32_MAX, True), (INT32_MAX + 1, False), (INT32_MIN, True), (INT32_MIN - 1, False),
    (0, True), (2**32, False), (-(2**32), False), (2**32 + 5, False),
])
@pytest.mark.parametrize("q", [INT32_MAX, 46341], ids=["split-path", "float64-path"])
def test_conv2d_int_wrapped_decides_the_int32_boundary_exactly(total, inside, q):
    # K = 3 products q*(q-5) + q*(m-q+5) + 1*r = q*m + r = total. With q near 2^31,
    # K*max|qx|*max|qw| >= 2^53 and the 16-bit split path runs (two products of about +-2^62
    # cancel); with q = 46341 the plain float64 path runs. Either way the exact sum sits right at
    # the int32 boundary and both the bits and the wrapped count must be exact.
    m, r = divmod(total, q)                     # 0 <= r < q
    qx = [q, q, 1]
    qw = [q - 5, m - q + 5, r]
    assert sum(a * b for a, b in zip(qx, qw)) == total
    assert all(abs(v) <= INT32_MAX for v in qw)
    split = 3 * float(q) * float(max(abs(v) for v in qw)) >= 2.0**53
    assert split == (q == INT32_MAX)
    qx = np.array(qx, np.int32).reshape(1, 1, 1, 3)
    qw = np.array(qw, np.int32).reshape(1, 1, 1, 3)
    acc, wrapped = conv2d_int_wrapped(qx, qw)
    want, outside = wrap_int32(np.array([total], dtype=object).reshape(1, 1, 1, 1))
    assert int(acc[0, 0, 0, 0]) == int(want[0, 0, 0, 0])
    assert wrapped == outside == (0 if inside else 1)


def test_conv2d_int_wrapped_int32_min_operand():
    # -2^31 is never produced by quantize, but it is a valid int32 and the oracle must stay exact
    # for it (|-2^31| does not fit int32: the magnitude check must not wrap to negative).
    qx = np.array([INT32_MIN, 3], np.int32).reshape(1, 1, 1, 2)
    qw = np.array([INT32_MAX, 5], np.int32).reshape(1, 1, 1, 2)
    acc, wrapped = conv2d_int_wrapped(qx, qw)
    want, outside = wrap_int32(conv_int_object(qx, qw))
    assert int(acc.ravel()[0]) == int(want.ravel()[0])
    assert wrapped == outside == 1


def test_conv2d_int_wrapped_refuses_reductions_too_long_to_be_exact():
    k = 2**20
    qx = np.full((1, 1, 1, k), 2**30, np.int32)
    qw = np.full((1, 1, 1, k), 2**30, np.int32)
    with pytest.raises(QconvError, match="K=1048576 is too long"):
        conv2d_int_wrapped(qx, qw)


# --------------------------------------------------------------------------------------------
# overflow_possible


def test_overflow_possible_boundary():
    assert not overflow_possible(1, 1, INT32_MAX)
    assert overflow_possible(1, 1, INT32_MAX + 1)
    assert not overflow_possible(127, 127, INT32_MAX // (127 * 127))
    assert overflow_possible(127, 127, INT32_MAX // (127 * 127) + 1)
    assert overflow_possible(32767, 32767, 3) and not overflow_possible(32767, 32767, 2)
    assert not overflow_possible(0, 2**31 - 1, 10**9)


@given(int_operands())
def test_no_wrap_when_overflow_impossible(ops):
    qx, qw = ops
    k = qw.shape[0] * qw.shape[1] * qw.shape[3]
    mx, mw = int(np.abs(qx.astype(np.int64)).max()), int(np.abs(qw.astype(np.int64)).max())
    _, wrapped = conv2d_int_wrapped(qx, qw)
    if not overflow_possible(mx, mw, k):
        assert wrapped == 0
    if wrapped:
        assert overflow_possible(mx, mw, k)


# --------------------------------------------------------------------------------------------
# NRMSE


@given(st.integers(0, 2**32 - 1), st.integers(2, 200))
def test_nrmse_definition(seed, n):
    rng = np.random.default_rng(seed)
    y = rng.standard_normal(n) * 10
    x = (y + rng.standard_normal(n) * 0.01).astype(np.float32)
    want = math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(x, y)) / n) / (max(y) - min(y))
    got = nrmse(x, y)
    assert isinstance(got, float)
    assert got == pytest.approx(want, rel=1e-12)
    assert nrmse(y, y) == 0.0
    assert qconv.nrmse is nrmse


def test_nrmse_is_relative_to_the_reference_range_not_the_output_range():
    y = np.array([0.0, 1.0, 2.0, 4.0])
    x = np.array([0.0, 1.0, 2.0, 3.0])
    assert nrmse(x, y) == pytest.approx(math.sqrt(1 / 4) / 4.0)
    assert nrmse(y, x) == pytest.approx(math.sqrt(1 / 4) / 3.0)


def test_nrmse_constant_reference():
    y = np.full((2, 3), 5.0)
    assert nrmse(y.copy(), y) == 0.0
    assert nrmse(y + 1e-9, y) == math.inf


def test_nrmse_rejects_shape_mismatch_and_empty():
    with pytest.raises(QconvError, match=r"shapes differ, \(2, 3\) vs \(3, 2\)"):
        nrmse(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(QconvError, match="empty"):
        nrmse(np.zeros(0), np.zeros(0))


def test_quantize_saturation_through_inf_is_silent():
    # saturation is the contract's behaviour, not a numerical accident: no RuntimeWarning
    import warnings
    t = np.array([3e38, -3e38, 1.0], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quantize(t, 1e9, Precision.INT8).tolist() == [127, -127, 127]
        assert count_saturated(t, 1e9, Precision.INT8) == 3
