"""The scale sweep: finds the S that minimizes NRMSE where the answer is known by construction,
agrees with what a backend produces at each S, and explains itself."""

from __future__ import annotations

import math

import numpy as np
import pytest

import qconv
from qconv.contract import Precision
from qconv.sweep import format_scale, sweep_scales

from brute import conv_f64, conv_int_exact, dequantize_oracle, quantize_oracle, wrap_int32
from hypothesis import given, strategies as st
from strategies import INT_PRECISIONS, conv_problems

INT32_MAX = 2**31 - 1


def fine_grid_layer(seed: int = 0, frac_bits: int = 20):
    """Values k / 2^frac_bits: quantizing with S = 2^j (j < frac_bits) loses about half as much
    per doubling of S, and is exact only at S = 2^frac_bits — far past int32's wrap point."""
    rng = np.random.default_rng(seed)
    x = (rng.integers(-2**frac_bits, 2**frac_bits, size=(1, 8, 8, 8)) / 2.0**frac_bits).astype(np.float32)
    w = (rng.integers(-2**frac_bits, 2**frac_bits, size=(3, 3, 4, 8)) / 2.0**frac_bits).astype(np.float32)
    return x, w


def wraps_at(x, w, s: float, qmax: int) -> bool:
    """Independent: does any exact accumulator leave int32 at S = s (rounding to nearest)?"""
    qx = quantize_oracle(x, s, qmax)
    qw = quantize_oracle(w, s, qmax)
    return bool(np.any(np.abs(conv_int_exact(qx, qw)) > INT32_MAX))


def test_best_s_is_the_largest_power_of_two_below_the_wrap_point():
    x, w = fine_grid_layer()
    grid = [2.0**j for j in range(0, 20)]
    # The answer by construction: NRMSE halves with every doubling of S until accumulators wrap,
    # and a wrapped output costs more than all the rounding: the best S is the last one that
    # does not wrap. Which one that is comes from an exact int64 computation, not from qconv.
    no_wrap = [s for s in grid if not wraps_at(x, w, s, Precision.INT32.qmax)]
    expected = max(no_wrap)
    assert expected < grid[-1] and wraps_at(x, w, 2 * expected, Precision.INT32.qmax)
    table = sweep_scales(x, w, "int32", grid=grid)
    assert table.best.s_x == table.best.s_w == expected
    assert table.best.wrapped == 0
    assert table.wrap_threshold == 2 * expected
    rows = {r.s_x: r for r in table}
    assert rows[2 * expected].wrapped > 0 and rows[2 * expected].nrmse > 10 * table.best.nrmse
    # below the wrap point the error falls with every doubling
    below = [rows[s].nrmse for s in grid if s <= expected and s >= 4]
    assert all(a > b for a, b in zip(below, below[1:]))
    assert f"S={format_scale(expected)} minimizes NRMSE" in table.reason
    assert f"from S={format_scale(2 * expected)} accumulators wrap" in table.reason


def test_default_grid_spans_underflow_to_overflow_and_lands_below_the_wrap_point():
    x, w = fine_grid_layer(seed=1)
    table = sweep_scales(x, w, "int32")
    kinds = {r.kind for r in table}
    assert {"pow2", "fine"} <= kinds
    assert table.rows[0].zero_output and table.underflow_threshold is not None
    assert table.wrap_threshold is not None and table.rows[-1].wrapped_fraction > 0.5
    b = table.best
    assert b.wrapped == 0 and b.s_x < table.wrap_threshold
    # the winner sits within one fine-grid step (1/8 octave) of the first wrapping S
    assert math.log2(table.wrap_threshold / b.s_x) <= 1 / 8 + 1e-9
    assert all(r.nrmse >= b.nrmse for r in table)
    # by construction the best power of two is the largest one that does not wrap
    pow2_below = [r.s_x for r in table if r.kind == "pow2" and r.s_x < table.wrap_threshold]
    assert table.best_pow2.s_x == max(pow2_below)
    assert "best power of two" in table.reason or table.best_pow2 is b


def test_exactly_representable_data_ties_go_to_the_smallest_s():
    # values are multiples of 1/16: every S that is a multiple of 16 quantizes exactly, and while
    # |acc| < 2^24 the float32 dequantize is exact too, so NRMSE is exactly 0; the smallest such S
    # (most headroom before overflow) is 16.
    rng = np.random.default_rng(3)
    x = (rng.integers(-40, 41, size=(1, 6, 6, 4)) / 16).astype(np.float32)
    w = (rng.integers(-40, 41, size=(3, 3, 2, 4)) / 16).astype(np.float32)
    x[0, 0, 0, 0] = w[0, 0, 0, 0] = 1 / 16  # an odd numerator in each tensor
    table = sweep_scales(x, w, "int16", grid=[4.0, 8.0, 12.0, 16.0, 32.0, 48.0, 64.0])
    assert table.best.s_x == 16.0 and table.best.nrmse == 0.0
    assert {r.s_x for r in table if r.nrmse == 0.0} == {16.0, 32.0, 48.0, 64.0}


def test_rows_match_what_a_backend_produces():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 7, 7, 5)).astype(np.float32) * 3
    w = rng.standard_normal((3, 3, 6, 5)).astype(np.float32) * 0.1
    ref = qconv.reference_output(x, w)
    grid = [1.0, 7.0, 30.0, 127.0, 1000.0]
    for prec in ("int8", "int16"):
        for rounding in ("nearest", "truncate"):
            table = sweep_scales(x, w, prec, rounding=rounding, grid=grid, reference=ref)
            for row in table:
                r = qconv.conv2d_result(x, w, prec, "reference", scale=row.s_x, rounding=rounding,
                                        reference=ref)
                assert r.nrmse == row.nrmse
                assert r.wrapped == row.wrapped
            by_backend = min(grid, key=lambda s: (qconv.conv2d_result(
                x, w, prec, "reference", scale=s, rounding=rounding, reference=ref).nrmse, s))
            assert table.best_single.s_x == np.float32(by_backend)


def test_underflow_rows_are_the_all_zero_output():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 5, 5, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 2, 3)).astype(np.float32)
    ref = conv_f64(x, w)
    zero = math.sqrt(float(np.mean(ref**2))) / float(ref.max() - ref.min())
    table = sweep_scales(x, w, "int8")
    z = [r for r in table if r.zero_output]
    assert z and all(r.nrmse == pytest.approx(zero, rel=1e-12) and r.qx_max * r.qw_max == 0 for r in z)
    assert "every output is 0" in table.reason
    assert "saturate at +-127" in table.reason  # int8 saturates before it could wrap


def test_pairs_beat_one_constant_when_the_ranges_differ():
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((1, 8, 8, 6)) * 40).astype(np.float32)
    w = (rng.standard_normal((3, 3, 5, 6)) * 0.05).astype(np.float32)
    table = sweep_scales(x, w, "int8", pairs=True)
    bp = table.best_pair
    assert bp is not None and bp.kind == "pair"
    assert bp.nrmse < table.best_single.nrmse / 5
    assert bp.s_w > bp.s_x  # the small-valued kernel wants the larger scale
    assert table.best is bp
    assert "separate scales" in table.reason
    d = table.to_dict()
    assert d["best_pair"]["s_x"] == bp.s_x and len(d["pair_rows"]) == len(table.pair_rows)


def test_scale_sweep_through_the_api():
    x, w = fine_grid_layer(seed=2)
    r = qconv.conv2d_result(x, w, "int32", "reference", scale="sweep", accuracy=True)
    table = qconv.sweep_scales(x, w, "int32")
    assert r.scale_strategy == "sweep-single"  # "sweep" names the assignment's single-S search
    assert r.scale_input == r.scale_kernel == table.best.s_x
    assert r.nrmse == table.best.nrmse and r.wrapped == 0
    assert r.scale_reason == table.reason


@pytest.mark.parametrize("bad", [
    dict(precision="fp32"), dict(precision="int8", grid=[]), dict(precision="int8", grid=[-1.0]),
    dict(precision="int8", rounding="up"), dict(precision="int8", fine_per_octave=0),
])
def test_rejections(bad):
    x, w = fine_grid_layer()
    p = bad.pop("precision")
    with pytest.raises(qconv.QconvError):
        sweep_scales(x, w, p, **bad)


@pytest.mark.parametrize("kw, match", [
    (dict(pair_stride=0), "pair_stride must be"), (dict(pair_stride=-1), "pair_stride must be"),
    (dict(pair_stride=1.5), "pair_stride must be"), (dict(pair_min_step=0), "pair_min_step must be"),
    (dict(pair_min_step=-0.5), "pair_min_step must be"), (dict(pair_min_step=float("nan")), "pair_min_step must be"),
])
def test_pair_search_arguments_are_checked_with_one_line(kw, match):
    x, w = fine_grid_layer()
    with pytest.raises(qconv.InputError, match=match) as e:
        sweep_scales(x, w, "int8", pairs=True, **kw)
    assert "\n" not in str(e.value)


def test_rejects_mismatched_shapes_and_non_finite():
    x, w = fine_grid_layer()
    with pytest.raises(qconv.QconvError):
        sweep_scales(x, w[..., :3], "int8")
    x2 = x.copy()
    x2[0, 0, 0, 0] = np.nan
    with pytest.raises(qconv.QconvError):
        sweep_scales(x2, w, "int8")


@given(problem=conv_problems(max_n=2, max_hw=6, max_c=6, max_k=5), prec=st.sampled_from(INT_PRECISIONS),
       truncate=st.booleans(), scales=st.lists(st.sampled_from([0.3, 1.0, 5.0, 64.0, 1000.0, 2.0**14, 2.0**20]),
                                               min_size=1, max_size=3))
def test_every_row_is_the_contract_computed_independently(problem, prec, truncate, scales):
    x, w = problem
    ref = qconv.reference_output(x, w)  # shared: the rows' own arithmetic is what is checked
    table = sweep_scales(x, w, prec, rounding="truncate" if truncate else "nearest", grid=scales,
                         reference=ref)
    assert [r.s_x for r in table] == sorted({float(np.float32(s)) for s in scales})
    for row in table:
        qx = quantize_oracle(x, row.s_x, prec.qmax, truncate)
        qw = quantize_oracle(w, row.s_w, prec.qmax, truncate)
        acc, outside = wrap_int32(conv_int_exact(qx, qw))
        y = dequantize_oracle(acc, row.s_x, row.s_w)
        assert row.wrapped == outside
        assert row.qx_max == int(np.max(np.abs(qx))) and row.qw_max == int(np.max(np.abs(qw)))
        assert row.zero_output == (row.qx_max == 0 or row.qw_max == 0)
        assert row.nrmse == qconv.nrmse(y, ref)
    assert table.best.nrmse == min(r.nrmse for r in table)
