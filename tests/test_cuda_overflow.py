"""Float32 overflow on the cuda backend (issue 13). FP32: a convolution of finite data whose float32 output
holds inf is refused with contract.fp32_overflow_error(count), the reference's error, on host
arrays (at the end of the call) and on device arrays (when the result is read); the same call just
below float32's range passes, and an overflow does not outlive its call.

Every kernel that writes final FP32 outputs is covered: the SIMT and outer-product implicit GEMMs
(float4 and scalar stores), the bias pass after split-K (with and without a bias), the channel-pad
pre-pass, the depthwise kernels (vector and channel-multiplier), each with and without a bias
large enough that the bias add alone overflows some outputs.

GPU run: PYTHONPATH=src python3 -m pytest -q tests/test_cuda_overflow.py
"""

from __future__ import annotations

import numpy as np
import pytest

import qconv
from qconv.backends import cuda as cb
from qconv.errors import InputError

from conftest import backend_or_skip

FMAX = float(np.finfo(np.float32).max)

# name -> (C, OC, groups, backend options)
CASES = {
    "simt": (32, 32, 1, {"tile": "64x64", "split_k": 1}),
    "outer-float4": (32, 32, 1, {"tile": "128x64/8x8", "split_k": 1}),
    "outer-scalar": (32, 30, 1, {"tile": "64x64/4x4", "split_k": 1}),
    "simt-split-k": (32, 32, 1, {"tile": "64x64", "split_k": 4}),
    "outer-split-k": (32, 32, 1, {"tile": "128x64/8x8", "split_k": 4}),
    "padded-channels": (30, 32, 1, {}),
    "depthwise": (8, 8, 8, {}),
    "depthwise-multiplier": (8, 16, 8, {}),
}


def _case(c, oc, groups, bias, peak):
    """Positive data (every partial sum is below the final one, in any order) whose convolution
    outputs are whole multiples of one unit: ones for the kernel, 1 or 3 units for each input pixel,
    scaled so that the largest output is `peak` * float32 max; with `bias`, 0.25 * float32 max on odd
    channels (whatever the peak: one prepared kernel serves both sides). Returns x, w, b and how
    many outputs exceed float32 max; none lies within 0.1% of it (float32 sums of <= 288 terms are
    off by far less, so every summation order counts the same)."""
    rng = np.random.default_rng(13)
    w = np.ones((3, 3, oc, c // groups), np.float32)
    v = np.repeat(rng.choice([1.0, 3.0], (2, 9, 11, 1)), c, axis=3)
    b = np.where(np.arange(oc) % 2 == 1, 0.25 * FMAX, 0.0).astype(np.float32) if bias else None
    top = 0.25 * FMAX if bias else 0.0
    x = (v * ((peak * FMAX - top) / qconv.reference_output(v, w, groups=groups).max())).astype(np.float32)
    y64 = qconv.reference_output(x, w, groups=groups, bias=b)
    assert not np.any(np.abs(y64 / FMAX - 1) < 1e-3), "an output too close to float32 max"
    if bias and peak > 1:  # the bias add alone takes some outputs past float32 max
        assert np.any((y64 - b.astype(np.float64) < FMAX) & (y64 > FMAX))
    return x, w, b, int(np.sum(y64 > FMAX))


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_fp32_overflow_is_refused_like_the_reference(name, bias):
    backend_or_skip("cuda")
    from qconv.contract import fp32_overflow_error
    c, oc, groups, opts = CASES[name]
    x, w, b, count = _case(c, oc, groups, bias, 1.3)
    below, _, _, none = _case(c, oc, groups, bias, 0.99)
    assert 0 < count < x.shape[0] * x.shape[1] * x.shape[2] * oc and none == 0
    want = str(fp32_overflow_error(count))
    with pytest.raises(InputError) as ref:
        qconv.conv2d(x, w, "fp32", "reference", groups=groups, bias=b)
    assert str(ref.value) == want

    conv = qconv.prepare(w, "fp32", "cuda", groups=groups, bias=b, **opts)
    for _ in range(2):  # the overflow does not outlive its call
        with pytest.raises(InputError) as e:
            conv(x)                                       # host: raised at the end of the call
        assert str(e.value) == want
        y = conv(cb.to_device(x))                         # device: raised when the result is read
        with pytest.raises(InputError) as e:
            y.copy_to_host()
        assert str(e.value) == want
        with pytest.raises(InputError) as e:
            conv.result(cb.to_device(x))
        assert str(e.value) == want

        ok = conv(below)
        ref_ok = qconv.conv2d(below, w, "fp32", "reference", groups=groups, bias=b)
        assert np.all(np.isfinite(ok))
        np.testing.assert_allclose(ok, ref_ok, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(conv(cb.to_device(below))), ref_ok, rtol=1e-4)


@pytest.mark.parametrize("groups", [1, 8], ids=["gemm", "depthwise"])
@pytest.mark.parametrize("precision", ["int8", "int16", "int32"])
def test_per_call_scales_that_leave_float32_are_refused_like_the_reference(precision, groups):
    """maxabs on the device: all-denormal input (s_x = Q / max|x| overflows) and an input and kernel
    so small that 1/(s_x*s_w) leaves float32, refused with the reference's words, host and device."""
    backend_or_skip("cuda")
    rng = np.random.default_rng(14)
    x = rng.standard_normal((1, 6, 6, 8)).astype(np.float32)
    w = rng.standard_normal((3, 3, 8, 8 // groups)).astype(np.float32)
    tiny = np.float32(1e-33)
    for xb, wb in ((np.full_like(x, 1e-44), w), (x * tiny, w * tiny)):
        with pytest.raises(InputError) as ref:
            qconv.conv2d(xb, wb, precision, "reference", groups=groups)
        conv = qconv.prepare(wb, precision, "cuda", groups=groups)
        with pytest.raises(InputError) as e:
            conv(xb)
        assert str(e.value) == str(ref.value)
        y = conv(cb.to_device(xb))
        with pytest.raises(InputError) as e:
            y.copy_to_host()
        assert str(e.value) == str(ref.value)
        good = x * np.float32(1e30)  # scales well inside float32 with either kernel: the refusal does not outlive its call
        assert np.array_equal(conv(good), qconv.conv2d(good, wb, precision, "reference", groups=groups))
