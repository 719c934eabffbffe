"""Hypothesis strategies with capped sizes, shared by every test module."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from qconv.contract import Precision

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
