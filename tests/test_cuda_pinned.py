"""Host inputs in pinned memory (a cuda host call's output, or cuda.pinned_empty) go to the device
with no staging copy; the answer is the same bits as from pageable memory."""

from __future__ import annotations

import numpy as np
import pytest

import qconv

from conftest import backend_or_skip


@pytest.fixture
def cb():
    backend_or_skip("cuda")
    from qconv.backends import cuda
    return cuda


def test_pinned_input_skips_staging_and_gives_the_same_bits(cb, monkeypatch) -> None:
    from qconv.backends.cuda import _arrays, _prepared
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 11, 13, 16)).astype(np.float32)
    w = rng.standard_normal((3, 3, 24, 16)).astype(np.float32)
    conv = qconv.prepare(w, "int8", "cuda")
    want = conv(x)                                   # pageable: staged
    xp = cb.pinned_empty(x.shape)
    xp[...] = x
    assert _arrays.is_pinned(xp) and not _arrays.is_pinned(x)

    def no_staging(*a, **k):
        raise AssertionError("a pinned input was staged")
    monkeypatch.setattr(_prepared, "_stage_in", no_staging)
    got = conv(xp)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_a_host_calls_output_is_pinned_and_feeds_the_next_call(cb) -> None:
    from qconv.backends.cuda import _arrays
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 9, 9, 8)).astype(np.float32)
    w1 = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    w2 = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    c1, c2 = qconv.prepare(w1, "fp32", "cuda"), qconv.prepare(w2, "int16", "cuda")
    y1 = c1(x)
    assert _arrays.is_pinned(y1)
    got = c2(y1)                                     # straight from the pinned output
    want = c2(np.array(y1))                          # a pageable copy of the same values
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
