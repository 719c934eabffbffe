"""qconv.conv2d / conv2d_result: argument spellings, scale forms, validation, result fields, the
backend registry, maxabs's no-overflow guarantee, and the real layers' published numbers."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import qconv
from brute import conv_int_exact, quantize_oracle, wrap_int32
from conftest import REAL, backend_or_skip, real_layers
from qconv import backends
from qconv.backends.base import PHASES
from qconv.contract import Precision, Rounding, conv2d_float64, nrmse, quantize
from qconv.errors import BackendUnavailable, QconvError
from qconv.scales import maxabs_q
from qconv.tensorfile import load
from strategies import INT_PRECISIONS, conv_problems

REF = "reference"
RNG = np.random.default_rng(11)
X = RNG.standard_normal((2, 6, 5, 4)).astype(np.float32)
W = (RNG.standard_normal((3, 3, 3, 4)) * 0.2).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# precision and rounding spellings


@pytest.mark.parametrize("spelling, want", [
    ("fp32", Precision.FP32), ("FP32", Precision.FP32), ("float32", Precision.FP32),
    (32, Precision.INT32), ("32", Precision.INT32), ("INT32", Precision.INT32),
    ("16", Precision.INT16), (16, Precision.INT16), ("int16", Precision.INT16), ("INT16", Precision.INT16),
    (8, Precision.INT8), ("8", Precision.INT8), ("INT8", Precision.INT8), (" int8 ", Precision.INT8),
    (Precision.INT8, Precision.INT8),
])
def test_precision_spellings(spelling, want):
    r = qconv.conv2d_result(X, W, spelling, REF)
    assert r.precision is want
    assert r.to_dict()["precision"] == want.value


@pytest.mark.parametrize("bad", ["int4", 4, 64, "fp16", "float64", "", None, True, 32.0, "int 8"])
def test_bad_precision_lists_the_valid_ones(bad):
    with pytest.raises(QconvError) as e:
        qconv.conv2d(X, W, bad, REF)
    msg = str(e.value)
    assert repr(bad) in msg
    for valid in ("fp32", "int32", "int16", "int8", "32", "16", "8"):
        assert valid in msg


@pytest.mark.parametrize("name, want", [
    ("nearest", Rounding.NEAREST), ("rint", Rounding.NEAREST), ("even", Rounding.NEAREST),
    ("NEAREST", Rounding.NEAREST), ("truncate", Rounding.TRUNCATE), ("trunc", Rounding.TRUNCATE),
    ("toward-zero", Rounding.TRUNCATE), (" Truncate ", Rounding.TRUNCATE),
    (Rounding.TRUNCATE, Rounding.TRUNCATE),
])
def test_rounding_names(name, want):
    r = qconv.conv2d_result(X, W, "int8", REF, scale=10.0, rounding=name)
    assert r.rounding is want
    q = quantize(X, 10.0, Precision.INT8, want)
    assert np.array_equal(q, quantize_oracle(X, 10.0, 127, want is Rounding.TRUNCATE))


@pytest.mark.parametrize("bad", ["up", "floor", "round", "", None])
def test_bad_rounding(bad):
    with pytest.raises(QconvError, match="nearest.*truncate"):
        qconv.conv2d(X, W, "int8", REF, scale=1.0, rounding=bad)


# ---------------------------------------------------------------------------------------------
# scales


@pytest.mark.parametrize("prec", INT_PRECISIONS)
def test_scale_forms(prec):
    single = qconv.conv2d_result(X, W, prec, REF, scale=64)
    assert single.scale_strategy == "single" and single.scale_input == single.scale_kernel == 64.0
    odd = qconv.conv2d_result(X, W, prec, REF, scale=0.1)
    assert odd.scale_input == odd.scale_kernel == float(np.float32(0.1))  # float32 scales
    pair = qconv.conv2d_result(X, W, prec, REF, scale=(16.0, 1024))
    assert pair.scale_strategy == "pair" and (pair.scale_input, pair.scale_kernel) == (16.0, 1024.0)
    as_list = qconv.conv2d_result(X, W, prec, REF, scale=[16.0, np.float32(1024)])
    np.testing.assert_array_equal(as_list.output, pair.output)
    for s in (None, "maxabs", "MaxAbs"):
        m = qconv.conv2d_result(X, W, prec, REF, scale=s)
        assert m.scale_strategy == "maxabs" and "no accumulator can overflow" in m.scale_reason
    # numpy scalars are numbers too
    np.testing.assert_array_equal(qconv.conv2d(X, W, prec, REF, scale=np.float64(64.0)), single.output)


@pytest.mark.parametrize("bad, match", [
    (0, "positive"), (0.0, "positive"), (-1.0, "positive"), (math.nan, "positive and finite"),
    (math.inf, "finite"), (-math.inf, "finite"), ("abc", "unknown scale strategy"),
    ("64", "unknown scale strategy"), (True, "must be a number"), (1e39, "outside float32"),
    (1e-50, "outside float32"), ((1.0,), "pair"), ((1.0, 2.0, 3.0), "pair"), ([], "pair"),
    ((1.0, 0.0), "kernel scale"), ((math.nan, 1.0), "input scale"), ((1.0, "x"), "kernel scale"),
    (object(), "must be a number"), (10**400, "int of 401 digits, outside float32"),
    ((1.0, 10**400), "kernel scale is an int of 401 digits"), (qconv.StepSize(2**2000), "step size is an int"),
])
def test_bad_scales(bad, match):
    with pytest.raises(QconvError, match=match):
        qconv.conv2d(X, W, "int8", REF, scale=bad)


@pytest.mark.parametrize("scale", [1.0, (1.0, 2.0), "maxabs"])
def test_scale_with_fp32_is_an_error(scale):
    with pytest.raises(QconvError, match="fp32 takes no scale"):
        qconv.conv2d(X, W, "fp32", REF, scale=scale)


@pytest.mark.parametrize("k", [1, 9, 144, 864, 1152, 4608, 2**20, 2**31 - 1])
def test_maxabs_q_formula(k):
    for prec in INT_PRECISIONS:
        q = maxabs_q(prec, k)
        assert q == max(1, min(prec.qmax, math.isqrt((2**31 - 1) // k)))
        assert k * q * q <= 2**31 - 1
        assert q == prec.qmax or k * (q + 1) ** 2 > 2**31 - 1  # the largest such Q


@given(conv_problems(max_hw=8, max_c=12), st.sampled_from(INT_PRECISIONS),
       st.sampled_from(["nearest", "truncate"]))
@example((np.full((1, 1, 1, 1), 0.00034558418, np.float32), np.full((1, 1, 1, 1), 0.00034558418, np.float32)),
         Precision.INT8, "nearest")  # float32(127 / m) * m rounds above 127: the scale must step down
def test_maxabs_never_wraps(problem, prec, rnd):
    x, w = problem
    r = qconv.conv2d_result(x, w, prec, REF, scale="maxabs", rounding=rnd, accuracy=True)
    k = w.shape[0] * w.shape[1] * w.shape[3]
    assert not r.overflow_possible and r.wrapped == 0
    q = maxabs_q(prec, k)
    qx = quantize(x, r.scale_input, prec, Rounding(rnd))
    qw = quantize(w, r.scale_kernel, prec, Rounding(rnd))
    assert int(np.abs(qx.astype(np.int64)).max()) <= q and int(np.abs(qw.astype(np.int64)).max()) <= q
    if rnd == "nearest":  # the largest magnitude maps to Q itself: the range is used in full
        assert int(np.abs(qx.astype(np.int64)).max()) == q == int(np.abs(qw.astype(np.int64)).max())
    assert r.saturated == (0, 0)
    # the scale itself keeps the float32 product of the largest magnitude at or below Q
    assert np.abs(x).max() * np.float32(r.scale_input) <= q
    assert np.abs(w).max() * np.float32(r.scale_kernel) <= q


@pytest.mark.parametrize("backend", ["reference", "c-scalar", "c-avx2", "cuda"])
@pytest.mark.parametrize("rnd", ["nearest", "truncate"])
def test_result_counts_the_inputs_a_fixed_scale_saturates(backend, rnd):
    # |x| * 100 passes 127 from |x| = 1.275 (nearest) or 1.28 (truncate), ties included
    backend_or_skip(backend)
    x = np.concatenate([np.linspace(-2, 2, 92, dtype=np.float32), np.float32([1.275, -1.275, 1.28, -1.28])])
    x = x.reshape(1, 4, 4, 6)
    r = qconv.conv2d_result(x, W[:, :, :, :2].repeat(3, axis=3), "int8", backend, scale=(100.0, 50.0), rounding=rnd)
    unclamped = quantize_oracle(x, np.float32(100.0), 2**40, truncate=rnd == "truncate")
    want = int(np.count_nonzero(np.abs(unclamped) > 127))
    assert r.saturated[0] == want > 0


@pytest.mark.parametrize("prec, q, k_safe", [("int16", 32767, 2), ("int8", 127, 133144),
                                             ("int32", 46340, 1)])
def test_overflow_possible_reported_at_the_exact_bound(prec, q, k_safe):
    # K * q * q <= 2^31 - 1 < (K + 1) * q * q: K outputs are safe, K + 1 may overflow
    assert k_safe * q * q <= 2**31 - 1 < (k_safe + 1) * q * q
    for k, possible in ((k_safe, False), (k_safe + 1, True)):
        x = np.full((1, 1, 1, k), float(q), np.float32)
        w = np.full((1, 1, 1, k), 1.0, np.float32)
        r = qconv.conv2d_result(x, w, prec, REF, scale=(1.0, float(q)), accuracy=True)
        assert r.overflow_possible is possible
        assert r.wrapped == (1 if possible else 0)  # every product is +q*q: the sum does leave


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("x, w, match", [
    (X[0], W, r"input must be 4-D \(N, H, W, C\), got shape \(6, 5, 4\)"),
    (X, W[None], r"kernel must be 4-D \(KH, KW, OC, IC\)"),
    (X, np.ones((3, 3, 3, 5), np.float32), "kernel IC=5 does not match the input's C=4"),
    (X, np.ones((3, 3, 4, 3), np.float32), "kernel IC=3 does not match the input's C=4"),
    (np.ones((0, 3, 3, 4), np.float32), W, "empty dimension"),
    (np.ones((1, 3, 0, 4), np.float32), W, "empty dimension"),
    (X, np.ones((0, 3, 3, 4), np.float32), "empty dimension"),
    (X.astype(np.complex64), W, "complex64 is not a real number type"),
    (X.astype(object), W, "object is not a real number type"),
    (X > 0, W, "bool is not a real number type"),
    (X.astype(str), W, "is not a real number type"),
    (X.astype(np.float64) * 1e300, W, "beyond float32's range"),
])
@pytest.mark.parametrize("prec", ["fp32", "int8"])
def test_validation_errors(x, w, match, prec):
    with pytest.raises(QconvError, match=match):
        qconv.conv2d(x, w, prec, REF)


@pytest.mark.parametrize("prec", ["fp32", "int32", "int16", "int8"])
def test_non_finite_rejected_in_every_precision(prec):
    for bad in (np.nan, np.inf):
        x = X.copy()
        x[1, 2, 3, 0] = bad
        x[0, 0, 0, 0] = -np.inf
        with pytest.raises(QconvError, match="input holds 2 non-finite"):
            qconv.conv2d(x, W, prec, REF)
    x64 = X.astype(np.float64)
    x64[0, 0, 0, 0] = np.nan
    with pytest.raises(QconvError, match="non-finite"):
        qconv.conv2d(x64, W, prec, REF)


@pytest.mark.parametrize("prec", ["fp32", "int16", "int8"])
def test_inputs_converted_not_rejected(prec):
    want = qconv.conv2d(X, W, prec, REF)
    # non-contiguous views, float64, float16, integer dtypes and nested lists are accepted
    xt = np.ascontiguousarray(X.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    assert not xt.flags.c_contiguous
    np.testing.assert_array_equal(qconv.conv2d(xt, W, prec, REF), want)
    wt = np.asfortranarray(W)
    np.testing.assert_array_equal(qconv.conv2d(X, wt, prec, REF), want)
    np.testing.assert_array_equal(qconv.conv2d(X.astype(np.float64), W.astype(np.float64), prec, REF), want)
    np.testing.assert_array_equal(qconv.conv2d(X.tolist(), W.tolist(), prec, REF), want)
    xi = np.round(X * 10).astype(np.int32)
    np.testing.assert_array_equal(qconv.conv2d(xi, W, prec, REF),
                                  qconv.conv2d(xi.astype(np.float32), W, prec, REF))
    x16 = X.astype(np.float16)
    np.testing.assert_array_equal(qconv.conv2d(x16, W, prec, REF),
                                  qconv.conv2d(x16.astype(np.float32), W, prec, REF))


def test_float64_input_is_rounded_to_float32_first():
    x64 = X.astype(np.float64) + 1e-12  # the offset is lost in float32
    np.testing.assert_array_equal(qconv.conv2d(x64, W, "int8", REF, scale=50.0),
                                  qconv.conv2d(X, W, "int8", REF, scale=50.0))


def test_inputs_are_not_modified():
    x, w = X.copy(), W.copy()
    for prec in ("fp32", "int8"):
        qconv.conv2d_result(x, w, prec, REF, accuracy=True)
    assert np.array_equal(x, X) and np.array_equal(w, W)


# ---------------------------------------------------------------------------------------------
# result fields


@pytest.mark.parametrize("prec", ["fp32", "int32", "int16", "int8"])
def test_result_fields(prec):
    r = qconv.conv2d_result(X, W, prec, REF, accuracy=True)
    n, h, wd, c = X.shape
    kh, kw, oc, _ = W.shape
    assert r.output.shape == (n, h, wd, oc) and r.output.dtype == np.float32
    assert set(r.phases) == set(PHASES) == {"quantize", "pack", "transfer", "convolve", "dequantize"}
    assert all(isinstance(v, float) and v >= 0 for v in r.phases.values())
    assert r.phases["convolve"] > 0
    assert r.flops == 2 * n * h * wd * oc * kh * kw * c
    assert r.gops == pytest.approx(r.flops / r.phases["convolve"] / 1e9)
    assert r.convolve_seconds == r.phases["convolve"]
    assert r.backend == REF
    d = r.to_dict()
    back = json.loads(json.dumps(d, allow_nan=False))
    assert back["output_shape"] == [n, h, wd, oc] and back["flops"] == r.flops
    assert back["phases_s"] == r.phases and back["backend"] == REF
    assert back["nrmse"] == r.nrmse and back["wrapped_outputs"] == r.wrapped
    assert set(back["scale"]) == {"input", "kernel", "strategy", "reason"}
    if prec == "fp32":
        assert r.scale_input is None and r.wrapped is None and r.saturated is None
        assert 0 < r.nrmse < 1e-6  # FP32's own error is reported, and it is not zero
    else:
        assert isinstance(r.scale_input, float) and r.wrapped == 0 and r.nrmse > 0


def test_accuracy_off_leaves_nrmse_none_and_given_reference_is_used():
    r = qconv.conv2d_result(X, W, "int8", REF, scale=30.0)
    assert r.nrmse is None
    ref = conv2d_float64(X, W)
    a = qconv.conv2d_result(X, W, "int8", REF, scale=30.0, accuracy=True)
    b = qconv.conv2d_result(X, W, "int8", REF, scale=30.0, reference=ref)
    assert a.nrmse == b.nrmse == nrmse(a.output, ref)
    c = qconv.conv2d_result(X, W, "int8", REF, scale=30.0, reference=np.zeros_like(ref) + ref[..., :1])
    assert c.nrmse != a.nrmse


@pytest.mark.parametrize("prec, scale", [("int16", 2.0**12), ("int16", (2.0**13, 2.0**14)),
                                         ("int32", 2.0**20), ("int32", 1e9), ("int8", 1e9)])
@pytest.mark.parametrize("backend", [None, REF])
def test_accuracy_gives_exact_wrapped_count(prec, scale, backend):
    rng = np.random.default_rng(5)
    x = np.abs(rng.standard_normal((1, 7, 6, 9))).astype(np.float32) * 4  # post-ReLU-like
    w = (rng.standard_normal((3, 3, 5, 9)) + 0.5).astype(np.float32)
    r = qconv.conv2d_result(x, w, prec, backend, scale=scale, accuracy=True)
    p = Precision(prec)
    qx = quantize_oracle(x, r.scale_input, p.qmax)
    qw = quantize_oracle(w, r.scale_kernel, p.qmax)
    acc, outside = wrap_int32(conv_int_exact(qx, qw))
    assert r.wrapped == outside
    assert r.overflow_possible or outside == 0
    if prec != "int8":  # int8 saturates at 127: 81 * 127^2 cannot leave int32
        assert r.overflow_possible
        assert outside > 0  # these scales do wrap: the count is a real one
    assert r.nrmse == pytest.approx(nrmse(r.output, conv2d_float64(x, w)), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# registry


def test_available_backends():
    avail = qconv.available_backends()
    assert avail["reference"][0] is True
    assert set(avail) == set(backends.names())
    for name, (ok, reason) in avail.items():
        assert isinstance(ok, bool) and isinstance(reason, str) and reason, name


def test_unknown_backend_lists_the_names():
    with pytest.raises(QconvError) as e:
        qconv.conv2d(X, W, "fp32", "tpu")
    msg = str(e.value)
    assert "'tpu'" in msg and "auto" in msg
    for name in backends.names():
        assert name in msg


def test_backend_names_are_case_insensitive_and_auto_works():
    assert qconv.conv2d_result(X, W, "int8", " Reference ").backend == REF
    auto = qconv.conv2d_result(X, W, "int8", "auto")
    first = next(n for n in backends.AUTO_ORDER if qconv.available_backends()[n][0])
    assert auto.backend == first
    assert qconv.conv2d_result(X, W, "int8").backend == first


def test_use_backend_context():
    first = qconv.conv2d_result(X, W, "fp32").backend
    with qconv.use_backend("reference"):
        assert qconv.conv2d_result(X, W, "fp32").backend == REF
        assert qconv.conv2d_result(X, W, "fp32", "auto").backend == REF
    assert qconv.conv2d_result(X, W, "fp32").backend == first
    with pytest.raises(QconvError, match="unknown backend 'nope'") as e:
        with qconv.use_backend("nope"):
            pass  # pragma: no cover - validated on entry
    have = qconv.available_backends()
    offered = str(e.value).split("choose one of ")[1].split(" (")[0].split(", ")
    assert offered == ["auto"] + [n for n, (ok, _) in have.items() if ok]  # the unavailable ones apart
    assert all(n in str(e.value) for n in have)
    with pytest.raises(RuntimeError):
        with qconv.use_backend("reference"):
            raise RuntimeError("restored even on error")
    assert qconv.conv2d_result(X, W, "fp32").backend == first


def test_reference_rejects_unknown_options():
    with pytest.raises(QconvError, match="does not take option.*threads"):
        qconv.conv2d(X, W, "fp32", REF, threads=2)


def test_a_backend_that_breaks_at_import_does_not_take_the_registry_down(tmp_path, monkeypatch):
    # A backend module whose import raises something other than ImportError (a bad .so, a
    # RuntimeError from a driver probe) must show up as unavailable, not break qconv.
    (tmp_path / "qconv_broken_backend.py").write_text("raise RuntimeError('driver exploded')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backends._MODULES, "broken", "qconv_broken_backend")
    monkeypatch.setattr(backends, "AUTO_ORDER", ("broken",) + tuple(backends.AUTO_ORDER))
    avail = qconv.available_backends()
    assert avail["broken"][0] is False and "driver exploded" in avail["broken"][1]
    assert avail["reference"][0] is True
    with pytest.raises(BackendUnavailable, match="driver exploded"):
        qconv.conv2d(X, W, "fp32", "broken")
    assert qconv.conv2d_result(X, W, "fp32", "auto").backend != "broken"
    sys.modules.pop("qconv_broken_backend", None)


# ---------------------------------------------------------------------------------------------
# real layers: maxabs never wraps; the published per-tensor int8/int16 numbers are reproduced


def _layers():
    found = real_layers()
    if found:
        return found
    return [pytest.param(None, marks=pytest.mark.skip(reason=f"{REAL} is absent (it ships beside "
                                                                "the qconv checkout)"))]


def _load_layer(layer):
    d = REAL / layer
    return load(d / "input_tensor.bin"), load(d / "kernel_tensor.bin"), json.loads((d / "meta.json").read_text())


@pytest.mark.parametrize("layer", _layers())
def test_real_layer_maxabs_never_wraps(layer):
    x, w, _ = _load_layer(layer)
    for prec in INT_PRECISIONS:
        r = qconv.conv2d_result(x, w, prec, REF, scale="maxabs", accuracy=True)
        assert r.wrapped == 0 and not r.overflow_possible, (layer, prec)
        assert r.nrmse < 0.05


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("layer", _layers())
def test_real_layer_published_numbers(layer, bits):
    x, w, meta = _load_layer(layer)
    q = meta[f"quant_int{bits}"]
    r = qconv.conv2d_result(x, w, f"int{bits}", REF, scale=(q["scale_input"], q["scale_kernel"]),
                            accuracy=True)
    assert r.wrapped == q["final_acc_outside_int32"]
    assert r.output.size == q["n_outputs"]
    # our output wraps like int32 hardware, so it matches the meta's "if int32 wraps" figure;
    # meta dequantized in float64, hence a relative tolerance rather than equality
    assert r.nrmse == pytest.approx(q["nrmse_if_int32_wraps"], rel=1e-3)
    if q["max_abs_final_acc"] > 2**31 - 1:  # an accumulator that did leave int32 was possible
        assert r.overflow_possible


@pytest.mark.parametrize("call", [
    lambda: qconv.conv2d(X, W, "int8", REF, scale=1e39),
    lambda: qconv.conv2d(X, W, "int8", REF, scale=(1.0, 1e-50)),
    lambda: qconv.conv2d(X.astype(np.float64) * 1e300, W, "fp32", REF),
], ids=["scale-overflows-float32", "scale-underflows-float32", "input-beyond-float32"])
def test_rejections_raise_without_numpy_warnings(call):
    # the CLI promises one line on stderr: a RuntimeWarning before the error would be a second
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(QconvError):
            call()
