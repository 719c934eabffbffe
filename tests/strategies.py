"""Hypothesis strategies with capped sizes, shared by every test module."""

from __future__ import annotations

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from qconv.contract import Precision, check_layer
from qconv.errors import InputError

PRECISIONS = list(Precision)
INT_PRECISIONS = [p for p in Precision if p.is_integer]
KERNEL_SIZES = [1, 2, 3, 4, 5, 7]


@st.composite
def conv_shapes(draw, max_n: int = 3, max_hw: int = 12, max_c: int = 20, max_k: int = 7):
    """(x_shape, w_shape): N 1..3, H, W 1..12, C, OC 1..20, odd/even kernels, kernels > input."""
    n = draw(st.integers(1, max_n))
    h = draw(st.integers(1, max_hw))
    w = draw(st.integers(1, max_hw))
    c = draw(st.integers(1, max_c))
    oc = draw(st.integers(1, max_c))
    sizes = [k for k in KERNEL_SIZES if k <= max_k]
    kh = draw(st.sampled_from(sizes))
    kw = draw(st.one_of(st.just(kh), st.sampled_from(sizes)))  # mostly square, sometimes not
    return (n, h, w, c), (kh, kw, oc, c)


@st.composite
def tensors(draw, shape, scale=None):
    """float32 tensor of `shape` with values of a drawn magnitude (seeded, so shrinking works)."""
    seed = draw(st.integers(0, 2**32 - 1))
    mag = scale if scale is not None else draw(st.sampled_from([1e-3, 0.25, 1.0, 40.0, 1e4]))
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * mag).astype(np.float32)


@st.composite
def conv_problems(draw, **shape_kw):
    """(x, w): a random convolution problem."""
    xs, ws = draw(conv_shapes(**shape_kw))
    return draw(tensors(xs)), draw(tensors(ws))


@st.composite
def scale_args(draw):
    """None (maxabs), 'maxabs', a single S (powers of two, odd values, overflow-forcing) or a pair."""
    single = st.sampled_from([0.5, 1.0, 3.0, 64.0, 127.0, 1024.0, 2.0**15, 2.0**20, 1e9])
    return draw(st.one_of(st.none(), st.just("maxabs"), single, st.tuples(single, single)))


@st.composite
def layer_args(draw, c: int, oc_choices=None):
    """Keyword arguments for prepare/conv2d beyond the assignment's layer: stride 1-3, every
    padding form (asymmetric too), groups in {1, 2, C} where they divide, with or without bias."""
    groups = draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0]))
    stride = draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    small = st.integers(0, 2)
    padding = draw(st.one_of(st.just("same"), st.just("valid"), small, st.tuples(small, small),
                             st.tuples(st.tuples(small, small), st.tuples(small, small))))
    return {"stride": stride, "padding": padding, "groups": groups}


@st.composite
def layer_shapes(draw, max_hw: int = 9, kinds=("dense", "grouped", "depthwise"), max_dw_c: int = 40):
    """(x_shape, w_shape, layer kwargs) the contract accepts: dense, two groups, or depthwise
    (channel multipliers 1-3); strides 1-3 (pairs too); 'same', 'valid', int, pair and
    ((top, bottom), (left, right)) paddings smaller than the kernel; N 1-2."""
    kind = draw(st.sampled_from(kinds))
    if kind == "dense":
        c, g = draw(st.integers(1, 12)), 1
        oc = draw(st.integers(1, 20))
    elif kind == "grouped":
        g = 2
        c = 2 * draw(st.integers(1, 6))
        oc = 2 * draw(st.integers(1, 10))
    else:
        c = draw(st.integers(1, max_dw_c))
        g, oc = c, c * draw(st.sampled_from([1, 1, 2, 3]))
    kh, kwd = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    h, wd = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    stride = draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    small_h, small_w = st.integers(0, kh - 1), st.integers(0, kwd - 1)
    padding = draw(st.one_of(
        st.just("same"), st.just("valid"), st.integers(0, min(kh, kwd) - 1),
        st.tuples(small_h, small_w), st.tuples(st.tuples(small_h, small_h), st.tuples(small_w, small_w))))
    layer = {"stride": stride, "padding": padding, "groups": g}
    x_shape, w_shape = (draw(st.integers(1, 2)), h, wd, c), (kh, kwd, oc, c // g)
    try:
        check_layer(x_shape, w_shape, **layer)
    except InputError:
        assume(False)
    return x_shape, w_shape, layer


SCALES = [0.5, 3.0, 64.0, 1024.0, 2.0**15, 2.0**20, 1e9]   # the large ones force int32 wrap-around


@st.composite
def layers(draw, max_hw: int = 9):
    """(x, w, layer kwargs, bias, scale): a layer_shapes layer with data, bias or none, and a scale:
    maxabs (None, "maxabs", "maxabs-per-channel"), one S, or a pair with a scalar or per-channel s_w."""
    x_shape, w_shape, layer = draw(layer_shapes(max_hw))
    oc = w_shape[2]
    x, w = draw(tensors(x_shape)), draw(tensors(w_shape))
    bias = draw(st.one_of(st.none(), tensors((oc,), scale=2.0)))
    single = st.sampled_from(SCALES)
    per_channel = st.builds(lambda seed: np.random.default_rng(seed).uniform(0.5, 3e3, oc).astype(np.float32),
                            st.integers(0, 2**32 - 1))
    scale = draw(st.one_of(st.none(), st.just("maxabs"), st.just("maxabs-per-channel"), single,
                           st.tuples(single, single), st.tuples(single, per_channel)))
    return x, w, layer, bias, scale
