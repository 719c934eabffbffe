"""The contract beyond the assignment's layer: stride, padding, groups, bias, per-channel scales.

Checked against tests/brute.py's oracles (loops over output pixels written from the contract's
text), through the reference backend and the public API; the C and CUDA backends are checked
against the reference in test_differential.py and test_cuda.py.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import qconv
from qconv.contract import Precision, check_layer, conv2d_float64, conv2d_quantized, fp32_error_bound
from qconv.errors import InputError

from brute import conv_general_f64, out_size_and_pads, quantize_oracle, wrap_int32
from strategies import INT_PRECISIONS, layer_args, tensors


def _padding_per_axis(padding):
    """prepare()'s padding argument as brute's per-axis form."""
    if isinstance(padding, str):
        return (padding, padding)
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding[0], int):
        return ((padding[0], padding[0]), (padding[1], padding[1]))
    return tuple(tuple(p) for p in padding)


def _stride(stride):
    return (stride, stride) if isinstance(stride, int) else tuple(stride)


@st.composite
def layers(draw, max_hw=9, max_c=6):
    """(x, w, kwargs, bias) for a random layer that the contract accepts."""
    c = draw(st.integers(1, max_c))
    kw_ = draw(layer_args(c))
    g = kw_["groups"]
    oc = g * draw(st.integers(1, 3))
    kh, kwd = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    h, wd = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    pads = _padding_per_axis(kw_["padding"])
    for size, k, p in ((h, kh, pads[0]), (wd, kwd, pads[1])):
        if p != "same" and p != "valid" and max(p) >= k:
            kw_["padding"] = "same"  # padding at least the kernel is refused (tested below)
        if p == "valid" and size < k:
            kw_["padding"] = "same"
    pads = _padding_per_axis(kw_["padding"])
    for size, k, p in ((h, kh, pads[0]), (wd, kwd, pads[1])):
        if p not in ("same", "valid") and size + sum(p) < k:
            kw_["padding"] = "same"
    x = draw(tensors((draw(st.integers(1, 2)), h, wd, c), scale=1.0))
    w = draw(tensors((kh, kwd, oc, c // g), scale=1.0))
    bias = draw(st.one_of(st.none(), tensors((oc,), scale=1.0)))
    return x, w, kw_, bias


@settings(max_examples=60)
@given(layers())
def test_float64_conv_matches_the_pixel_loop_oracle(problem):
    x, w, kw_, _ = problem
    g = check_layer(x.shape, w.shape, **kw_)
    want = conv_general_f64(x, w, _stride(kw_["stride"]), _padding_per_axis(kw_["padding"]), kw_["groups"])
    assert g.out_shape == want.shape
    np.testing.assert_allclose(conv2d_float64(x, w, g), want, rtol=1e-12, atol=1e-12)


@settings(max_examples=40)
@given(layers())
def test_reference_fp32_within_the_bound_with_bias(problem):
    x, w, kw_, bias = problem
    y = qconv.conv2d(x, w, "fp32", "reference", bias=bias, **kw_)
    g = check_layer(x.shape, w.shape, **kw_)
    want = conv_general_f64(x, w, _stride(kw_["stride"]), _padding_per_axis(kw_["padding"]), kw_["groups"])
    if bias is not None:
        want = want + bias.astype(np.float64)
    assert np.all(np.abs(y - want) <= fp32_error_bound(x, w, geom=g, bias=bias))


@settings(max_examples=40)
@given(layers(), st.sampled_from(INT_PRECISIONS), st.sampled_from([0.5, 3.0, 100.0, 2.0**14]),
       st.booleans(), st.booleans())
def test_reference_integer_path_matches_the_oracle_bit_for_bit(problem, prec, s, per_channel, truncate):
    x, w, kw_, bias = problem
    oc = w.shape[2]
    s_w = (np.float32(s) * np.linspace(0.5, 2, oc)).astype(np.float32) if per_channel else np.float32(s)
    y = qconv.conv2d(x, w, prec, "reference", scale=(s, s_w), bias=bias,
                     rounding="truncate" if truncate else "nearest", **kw_)
    qx = quantize_oracle(x, s, prec.qmax, truncate)
    qw = np.stack([quantize_oracle(w[:, :, o, :], s_w if np.ndim(s_w) == 0 else s_w[o], prec.qmax, truncate)
                   for o in range(oc)], axis=2)
    exact = conv_general_f64(qx.astype(np.float64), qw.astype(np.float64), _stride(kw_["stride"]),
                             _padding_per_axis(kw_["padding"]), kw_["groups"])  # < 2^53: exact
    acc, _ = wrap_int32(np.round(exact).astype(np.int64).astype(object))
    inv = np.array([np.float32(1.0 / (float(np.float32(s)) * float(np.float32(sw))))
                    for sw in np.broadcast_to(s_w, (oc,))], dtype=np.float32)
    want = acc.astype(np.float32) * inv
    if bias is not None:
        want = want + bias
    assert np.array_equal(y, want)


def test_tensorflow_same_rule_at_stride_2_puts_the_extra_row_at_the_bottom():
    for h in range(1, 12):
        for k in (1, 2, 3, 4, 5):
            g = check_layer((1, h, h, 1), (k, k, 1, 1), stride=2)
            ho, top, bottom = out_size_and_pads(h, k, 2, "same")
            assert (g.ho, g.pt, g.pb) == (ho, top, bottom) == (-(-h // 2), top, bottom)
            assert g.pb - g.pt in (0, 1)


def test_default_arguments_are_the_assignments_layer_bit_for_bit():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 7, 6, 5)).astype(np.float32)
    w = rng.standard_normal((3, 2, 4, 5)).astype(np.float32)
    for prec in ("fp32", "int16", "int8"):
        a = qconv.conv2d(x, w, prec, "reference")
        b = qconv.conv2d(x, w, prec, "reference", stride=1, padding="same", groups=1, bias=None)
        c = qconv.conv2d(x, w, prec, "reference", stride=(1, 1), padding=((1, 1), (0, 1)))
        assert np.array_equal(a, b) and np.array_equal(a, c)


@pytest.mark.parametrize("kwargs, shapes, match", [
    (dict(groups=2), ((1, 4, 4, 3), (3, 3, 2, 1)), r"C=3"),
    (dict(groups=3), ((1, 4, 4, 6), (3, 3, 4, 2)), r"OC=4 is not divisible by groups=3"),
    (dict(), ((1, 4, 4, 6), (3, 3, 4, 3)), r"IC=3 does not match the input's C=6"),
    (dict(groups=2), ((1, 4, 4, 6), (3, 3, 4, 2)), r"IC=2 x groups=2 = 4 does not match the input's C=6"),
    (dict(padding=3), ((1, 4, 4, 1), (3, 3, 1, 1)), r"not smaller than the kernel 3x3"),
    (dict(padding=((0, 0), (3, 0))), ((1, 4, 4, 1), (3, 3, 1, 1)), r"not smaller than the kernel"),
    (dict(stride=0), ((1, 4, 4, 1), (3, 3, 1, 1)), r"stride must be positive"),
    (dict(stride=(1, -2)), ((1, 4, 4, 1), (3, 3, 1, 1)), r"stride must be positive"),
    (dict(stride=1.5), ((1, 4, 4, 1), (3, 3, 1, 1)), r"stride must be an int"),
    (dict(stride=2**63), ((1, 4, 4, 1), (3, 3, 1, 1)), r"stride 9223372036854775808 is beyond any image side"),
    (dict(padding=((0, 2**31), (0, 0))), ((1, 4, 4, 1), (3, 3, 1, 1)), r"padding \(top, bottom\) .* is beyond"),
    (dict(padding="full"), ((1, 4, 4, 1), (3, 3, 1, 1)), r"padding 'full'"),
    (dict(padding=-1), ((1, 4, 4, 1), (3, 3, 1, 1)), r"negative"),
    (dict(padding="valid"), ((1, 2, 2, 1), (3, 3, 1, 1)), r"smaller than the kernel"),
    (dict(groups=0), ((1, 4, 4, 1), (3, 3, 1, 1)), r"groups must be a positive int"),
    (dict(bias_shape=(3,)), ((1, 4, 4, 1), (3, 3, 2, 1)), r"bias must have shape \(OC,\) = \(2,\), got \(3,\)"),
])
def test_bad_layers_are_refused_with_the_numbers(kwargs, shapes, match):
    with pytest.raises(InputError, match=match):
        check_layer(*shapes, **kwargs)


def test_bias_of_the_wrong_length_is_refused_by_the_api():
    x = np.ones((1, 4, 4, 2), np.float32)
    w = np.ones((3, 3, 3, 2), np.float32)
    with pytest.raises(InputError, match=r"bias must have shape \(OC,\) = \(3,\)"):
        qconv.conv2d(x, w, "fp32", "reference", bias=np.ones(2, np.float32))


def test_per_channel_maxabs_scales_each_channel_to_q_and_beats_per_tensor_on_uneven_channels():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    w = (rng.standard_normal((3, 3, 4, 4)) * np.array([1, 1e-2, 1e-1, 3])[None, None, :, None]).astype(np.float32)
    r = qconv.conv2d_result(x, w, "int8", "reference", scale="maxabs-per-channel", accuracy=True)
    assert isinstance(r.scale_kernel, list) and len(r.scale_kernel) == 4
    for o, s in enumerate(r.scale_kernel):
        assert np.max(np.abs(np.rint(w[:, :, o, :] * np.float32(s)))) <= 127
    r_t = qconv.conv2d_result(x, w, "int8", "reference", scale="maxabs", accuracy=True)
    assert r.nrmse < r_t.nrmse and r.wrapped == 0
    # the same numbers through the contract's one pipeline
    y, _, _ = conv2d_quantized(x, w, Precision.INT8, r.scale_input, np.array(r.scale_kernel, np.float32))
    assert np.array_equal(r.output, y)


def test_depthwise_with_a_channel_multiplier_matches_the_oracle():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 9, 7, 6)).astype(np.float32)
    w = rng.standard_normal((3, 3, 12, 1)).astype(np.float32)
    y = qconv.conv2d(x, w, "fp32", "reference", groups=6, stride=2)
    want = conv_general_f64(x, w, (2, 2), ("same", "same"), 6)
    assert np.all(np.abs(y - want) <= fp32_error_bound(x, w, geom=check_layer(x.shape, w.shape, groups=6, stride=2)))


def test_prepared_calls_equal_one_shot_calls_and_reuse_out():
    rng = np.random.default_rng(11)
    w = rng.standard_normal((3, 3, 8, 4)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    conv = qconv.prepare(w, "int8", "reference", stride=2, bias=b)
    out = np.empty((1, 5, 5, 8), np.float32)
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((1, 10, 9, 4)).astype(np.float32) * (seed + 1)
        one = qconv.conv2d(x, w, "int8", "reference", stride=2, bias=b)
        assert np.array_equal(conv(x), one)
        assert conv(x, out=out) is out and np.array_equal(out, one)
    with pytest.raises(InputError, match=r"out= must be a writeable C-contiguous float32 array of shape \(1, 5, 5, 8\)"):
        conv(x, out=np.empty((1, 5, 5, 7), np.float32))
    with pytest.raises(InputError, match=r"out= must be a writeable"):
        conv(x, out=np.empty((1, 5, 5, 8), np.float64))


def test_a_prepared_conv_is_correct_from_several_threads():
    rng = np.random.default_rng(12)
    w = rng.standard_normal((3, 3, 6, 3)).astype(np.float32)
    conv = qconv.prepare(w, "int16", "reference")
    xs = [rng.standard_normal((1, 8, 8, 3)).astype(np.float32) * (i + 1) for i in range(8)]
    want = [qconv.conv2d(x, w, "int16", "reference") for x in xs]
    got: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(3):
            got[i] = conv(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(got[i], want[i]) for i in range(8))


def test_step_size_is_the_reciprocal_multiplier_and_a_misread_step_warns():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((1, 6, 6, 3)).astype(np.float32)
    w = (rng.standard_normal((3, 3, 4, 3)) * 0.05).astype(np.float32)
    a = qconv.conv2d(x, w, "int8", "reference", scale=(qconv.StepSize(0.25), qconv.StepSize(0.125)))
    b = qconv.conv2d(x, w, "int8", "reference", scale=(4.0, 8.0))
    assert np.array_equal(a, b)
    step = qconv.conv2d_result(x, w, "int8", "reference", scale=qconv.StepSize(0.05))
    assert step.scale_input == step.scale_kernel == np.float32(20.0)
    assert step.scale_reason == "given: step size s=0.05 for both tensors, so S = 1/s = 20", step.scale_reason
    assert "the assignment's scheme" in qconv.conv2d_result(x, w, "int8", "reference", scale=20.0).scale_reason
    with pytest.warns(qconv.QconvWarning, match="StepSize"):
        qconv.conv2d(x, w, "int8", "reference", scale=(0.02, 0.001))  # step sizes passed as S
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qconv.conv2d(x, w, "int8", "reference", scale=(30.0, 2000.0))


@pytest.mark.parametrize("scale", [1e-20, 1e30, (1e-30, 1e-15)])
def test_scales_whose_dequantize_factor_leaves_float32_are_refused_on_one_line(scale):
    x = np.ones((1, 3, 3, 1), np.float32)
    w = np.ones((1, 1, 1, 1), np.float32)
    for backend in ("reference",):
        with pytest.raises(InputError, match=r"must be a positive finite float32") as e:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", qconv.QconvWarning)
                qconv.conv2d(x, w, "int8", backend, scale=scale)
        assert "\n" not in str(e.value)


def test_all_denormal_data_is_refused_by_maxabs_without_a_warning():
    x = np.full((1, 3, 3, 1), 1e-44, np.float32)
    w = np.ones((1, 1, 1, 1), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match="denormal"):
            qconv.conv2d(x, w, "int8", "reference")


def test_prepare_refuses_a_sweep_and_says_what_to_do():
    w = np.ones((3, 3, 2, 2), np.float32)
    with pytest.raises(InputError, match="sweep_scales"):
        qconv.prepare(w, "int8", "reference", scale="sweep-pair")


def test_torch_peer_check_of_the_float64_conv():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 9, 8, 6))
    w = rng.standard_normal((3, 2, 6, 3))  # groups=2
    for stride, pads in (((1, 1), ((1, 1), (0, 1))), ((2, 3), ((0, 2), (1, 0)))):
        g = check_layer(x.shape, w.shape, stride=stride, padding=pads, groups=2)
        xt = F.pad(torch.from_numpy(x).permute(0, 3, 1, 2), (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
        wt = torch.from_numpy(w).permute(2, 3, 0, 1)  # (OC, IC/g, KH, KW)
        want = F.conv2d(xt, wt, stride=stride, groups=2).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(conv2d_float64(x, w, g), want, rtol=1e-12, atol=1e-12)


def test_named_layouts_give_the_same_answer_as_the_default_layout():
    rng = np.random.default_rng(30)
    x = rng.standard_normal((2, 6, 5, 4)).astype(np.float32)
    w = rng.standard_normal((3, 2, 6, 4)).astype(np.float32)   # (KH, KW, OC, IC)
    want = qconv.conv2d(x, w, "int8", "reference", stride=2)
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    for klay, wk in (("OIHW", w.transpose(2, 3, 0, 1)), ("HWIO", w.transpose(0, 1, 3, 2)), ("HWOI", w)):
        got = qconv.conv2d(x_nchw, np.ascontiguousarray(wk), "int8", "reference", stride=2, layout="NCHW",
                           kernel_layout=klay)
        assert np.array_equal(got, want.transpose(0, 3, 1, 2))
    r = qconv.conv2d_result(x_nchw, w, "int8", "reference", layout="NCHW", accuracy=True)
    assert r.output.shape == (2, 6, 6, 5) and r.nrmse < 0.02


def test_a_layout_mixup_gets_a_hint():
    x = np.ones((1, 8, 5, 5), np.float32)      # NCHW with C=8
    w = np.ones((3, 3, 4, 8), np.float32)
    with pytest.raises(InputError, match=r"did you pass NCHW\? use layout='NCHW'"):
        qconv.conv2d(x, w, "fp32", "reference")
    x = np.ones((1, 5, 5, 8), np.float32)
    with pytest.raises(InputError, match=r"kernel_layout='HWIO'"):
        qconv.conv2d(x, np.ones((3, 3, 8, 4), np.float32), "fp32", "reference")
    with pytest.raises(InputError, match=r"kernel_layout='OIHW'"):
        qconv.conv2d(x, np.ones((4, 8, 3, 3), np.float32), "fp32", "reference")
    with pytest.raises(InputError, match=r"layout 'NWHC'"):
        qconv.conv2d(x, w, "fp32", "reference", layout="NWHC")


def test_a_call_larger_than_the_machine_is_refused_with_the_numbers(monkeypatch):
    from qconv import layouts
    monkeypatch.setattr(layouts, "available_memory", lambda: 2**20)
    x = np.ones((1, 64, 64, 8), np.float32)
    w = np.ones((3, 3, 8, 8), np.float32)
    with pytest.raises(InputError, match=r"the float64 reference for NRMSE needs about 1.3 MiB of memory; "
                                         r"this machine has 1.0 MiB available"):
        qconv.conv2d_result(x, w, "int8", "reference", accuracy=True)
