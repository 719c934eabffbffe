"""Every CPU backend against the reference backend, over the whole contract.

Random layers (hypothesis): strides 1-3, every padding form ('same', 'valid', int, pair,
((top, bottom), (left, right))), groups in {1, 2, C} (depthwise with channel multipliers too),
with and without bias, per-tensor and per-channel scales (maxabs, maxabs-per-channel, explicit
pairs with a vector s_w, scales big enough to force int32 wrap-around), every precision and both
roundings. Integer outputs must equal the reference's bit for bit; FP32 must lie within
contract.fp32_error_bound of the float64 convolution (+ bias).

Then the shapes at each kernel's declared tile boundaries (qconv_tile), prepared calls against
one-shot calls, buffer reuse and out=, several Python threads on one prepared convolution, the
errors the C path words like the contract, and the threads option.

The backends are every registered "c-*" backend and its variants (qconv.backends.variants: for
c-avx2, every SIMD level this machine runs — amx, avx512, avx512vnni, avxvnni, avx2), plus
c-avx2 with a separate dequantize pass and c-avx2 running the VNNI kernels with vpdpbusd/vpdpwssd
emulated by AVX2 (isa="vnni-emulated"), so their code is checked on CPUs without VNNI too. An unavailable backend is skipped with its reason, unless
it is named in QCONV_REQUIRE (e.g. QCONV_REQUIRE=c-scalar,c-avx2), which makes that a failure.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import qconv
from qconv import backends
from qconv.contract import Precision, check_layer, conv2d_float64, fp32_error_bound, maxabs_scale
from qconv.errors import InputError

from conftest import REQUIRED, backend_or_skip
from strategies import tensors

PRECISIONS = list(Precision)


def _cpu_configs() -> list[tuple[str, str, dict]]:
    """(id, backend, options) for every CPU backend variant, available or not."""
    out = []
    for vname, name, opts in backends.variants(available_only=False):
        if not name.startswith("c-"):
            continue
        out.append((vname, name, opts))
        if name == "c-avx2" and not opts:
            out.append(("c-avx2[fuse_dequantize=False]", name, {"fuse_dequantize": False}))
            # The VNNI kernels' own code with vpdpbusd/vpdpwssd emulated: runs on any AVX2 CPU.
            out.append(("c-avx2[isa=vnni-emulated]", name, {"isa": "vnni-emulated"}))
    for name in backends.names():   # a backend whose module does not import still gets its row
        if name.startswith("c-") and not any(n == name for _, n, _ in out):
            out.append((name, name, {}))
    return out


CONFIGS = _cpu_configs()
IDS = [c[0] for c in CONFIGS]


_need = backend_or_skip


def test_required_backends_are_registered():
    unknown = REQUIRED - set(backends.names())
    assert not unknown, f"QCONV_REQUIRE names unknown backends {sorted(unknown)}"
    for name in REQUIRED:
        _need(name)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _same_bits(y: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert y.shape == ref.shape, f"{what}: shape {y.shape} vs {ref.shape}"
    bad = _bits(y) != _bits(ref)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} outputs differ from the reference; "
                             f"first at {where}: {y[where]!r} vs {ref[where]!r}")


def _within_bound(y, x, w, layer, bias, what):
    g = check_layer(x.shape, w.shape, stride=layer.get("stride", 1), padding=layer.get("padding", "same"),
                    groups=layer.get("groups", 1))
    y64 = conv2d_float64(x, w, g)
    if bias is not None:
        y64 = y64 + bias.astype(np.float64)
    err = np.abs(y.astype(np.float64) - y64)
    bound = fp32_error_bound(x, w, geom=g, bias=bias)
    if not np.all(err <= bound):
        at = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(f"{what}: FP32 error {err[at]:.3g} > bound {bound[at]:.3g} at {at}")


def _check(cfg, precision, x, w, layer, bias=None, scale=None, rounding="nearest"):
    """The backend's output against the reference's: bits for integers, the bound for FP32."""
    _, name, opts = cfg
    _need(name)
    kw = dict(layer, bias=bias)
    what = f"{cfg[0]} {precision.value} {layer} bias={bias is not None} scale={scale!r} {rounding}"
    if not precision.is_integer:
        y = qconv.conv2d(x, w, precision, name, rounding=rounding, **kw, **opts)
        _within_bound(y, x, w, layer, bias, what)
        return y
    ref = qconv.conv2d(x, w, precision, "reference", scale=scale, rounding=rounding, **kw)
    y = qconv.conv2d(x, w, precision, name, scale=scale, rounding=rounding, **kw, **opts)
    _same_bits(y, ref, what)
    return y


# ---- strategies ----------------------------------------------------------------------------

SINGLE = [0.5, 3.0, 64.0, 1024.0, 2.0**15, 2.0**20, 1e9]   # the large ones force int32 wrap-around


@st.composite
def general_layers(draw, max_hw=9):
    """(x, w, layer kwargs, bias, scale): a layer the contract accepts, of any form."""
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "dense":
        c, g = draw(st.integers(1, 12)), 1
        oc = draw(st.integers(1, 20))
    elif kind == "grouped":
        g = 2
        c = 2 * draw(st.integers(1, 6))
        oc = 2 * draw(st.integers(1, 10))
    else:
        c = draw(st.integers(1, 40))
        g, oc = c, c * draw(st.sampled_from([1, 1, 2, 3]))   # channel multiplier
    kh, kwd = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    h, wd = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    stride = draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    small_h, small_w = st.integers(0, kh - 1), st.integers(0, kwd - 1)
    padding = draw(st.one_of(
        st.just("same"), st.just("valid"), st.integers(0, min(kh, kwd) - 1),
        st.tuples(small_h, small_w), st.tuples(st.tuples(small_h, small_h), st.tuples(small_w, small_w))))
    layer = {"stride": stride, "padding": padding, "groups": g}
    try:
        check_layer((1, h, wd, c), (kh, kwd, oc, c // g), **layer)
    except InputError:
        assume(False)
    n = draw(st.integers(1, 2))
    x = draw(tensors((n, h, wd, c)))
    w = draw(tensors((kh, kwd, oc, c // g)))
    bias = draw(st.one_of(st.none(), tensors((oc,), scale=2.0)))
    single = st.sampled_from(SINGLE)
    per_channel = st.builds(lambda seed: tuple(np.float32(v) for v in
                                               np.random.default_rng(seed).uniform(0.5, 3e3, oc)),
                            st.integers(0, 2**32 - 1))
    scale = draw(st.one_of(st.none(), st.just("maxabs"), st.just("maxabs-per-channel"), single,
                           st.tuples(single, single), st.tuples(single, per_channel.map(np.array))))
    return x, w, layer, bias, scale


# ---- the general layer, hypothesis ---------------------------------------------------------

@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.value)
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much], deadline=None)
@given(layer=general_layers(), rounding=st.sampled_from(["nearest", "truncate"]))
@example(layer=(np.full((1, 5, 5, 3), 0.5, np.float32), np.full((3, 3, 3, 1), 1.5, np.float32),
                {"stride": 2, "padding": "same", "groups": 3}, None, 1.0), rounding="nearest")   # ties, depthwise
@example(layer=(np.full((2, 7, 6, 4), 3e4, np.float32), np.full((3, 2, 6, 2), -3e4, np.float32),
                {"stride": (1, 3), "padding": ((2, 0), (1, 1)), "groups": 2},
                np.arange(6, dtype=np.float32), 1e9), rounding="truncate")                    # wrap, grouped
@example(layer=(np.full((1, 6, 9, 2), -7.0, np.float32), np.full((5, 1, 6, 1), 9.0, np.float32),
                {"stride": (3, 1), "padding": "valid", "groups": 2}, None,
                (2.0**15, np.full(6, 2.0**14, np.float32))), rounding="nearest")              # dw x3, wrap
def test_general_layer_matches_reference(cfg, precision, layer, rounding):
    x, w, kw, bias, scale = layer
    _check(cfg, precision, x, w, kw, bias, None if not precision.is_integer else scale, rounding)


# ---- tile boundaries, from each kernel's declared tile ----------------------------------------

def _tile(cfg, precision):
    _, name, opts = cfg
    from qconv.backends import _cext
    isa = "scalar" if name == "c-scalar" else _cext.best_isa(opts.get("isa", "auto"))
    return _cext.tile(isa, precision.value)


def _around(v: int) -> list[int]:
    return sorted({max(1, v - 1), v, v + 1})


@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.value)
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_tile_boundaries(cfg, precision):
    """OC around the block (nr) and its half (the half-width tile), output widths around the tile
    widths (mr, mrh, and their doubles), input channels around the packed group, at strides 1 and 2
    and with two groups; depthwise channels around the vector block."""
    _need(cfg[1])
    t = _tile(cfg, precision)
    rng = np.random.default_rng(11)
    nr, grp = max(t["nr"], 2), t["grp"]
    ocs = sorted(set(_around(nr // 2) + _around(nr) + [2 * nr + 1]))
    wos = sorted(set(_around(t["mr"]) + _around(2 * t["mr"]) + (_around(t["mrh"]) if t["mrh"] else [])))
    cpad = t.get("cpad", grp)
    cs = sorted(set(_around(grp) + [2 * grp + 1] + (_around(cpad) if cpad > grp else [])))
    scale = None if not precision.is_integer else (3.0, 40.0)
    for i, oc in enumerate(ocs):
        for j, wo in enumerate(wos):
            c = cs[(i + j) % len(cs)]
            stride = 1 + (i + j) % 2
            k = (1, 3, 2)[(i + 2 * j) % 3]
            wd = (wo - 1) * stride + 1            # 'valid' at this stride gives exactly wo columns
            groups = 2 if (i + j) % 3 == 0 else 1
            x = rng.standard_normal((1, 2 + k, wd + k - 1, c * groups)).astype(np.float32)
            w = rng.standard_normal((k, k, oc * groups, c)).astype(np.float32)
            layer = {"stride": stride, "padding": "valid", "groups": groups}
            bias = rng.standard_normal(oc * groups).astype(np.float32) if j % 2 else None
            _check(cfg, precision, x, w, layer, bias, scale)
    blk = t["dw_block"]
    for c in sorted(set(_around(blk) + _around(2 * blk) + [3])):
        for mult, k, stride in ((1, 3, 1), (1, 5, 2), (2, 3, 2)):
            x = rng.standard_normal((1, 7, 9, c)).astype(np.float32)
            w = rng.standard_normal((k, k, c * mult, 1)).astype(np.float32)
            bias = rng.standard_normal(c * mult).astype(np.float32)
            _check(cfg, precision, x, w, {"stride": stride, "padding": "same", "groups": c}, bias, scale)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_int8_accumulators_wrap_like_the_contract(cfg):
    """INT8 operands clamp at 127, so only a long reduction overflows int32: K = 140,000 products
    of 127 * 127 (and of 127 * -127 in the odd channels' columns) pass 2^31, and every kernel
    family (vpdpbusd with its +128 compensation, AMX tdpbssd) must wrap modulo 2^32 as the
    reference does. OC 17 and 3 pixels cross the tiles' channel and pixel blocks."""
    _need(cfg[1])
    c = 140_000
    x = np.full((1, 1, 3, c), 1.0, np.float32)
    x[0, 0, 1, ::3] = -1.0
    w = np.full((1, 1, 17, c), 1.0, np.float32)
    w[:, :, 1::2, ::2] = -1.0
    for scale in ((127.0, 127.0), (127.0, 64.0)):
        ref = qconv.conv2d(x, w, "int8", "reference", scale=scale, padding="valid")
        acc = np.int64(c) * 127 * int(scale[1])
        assert acc > 2**31 - 1 or scale[1] != 127.0   # the first scale overflows int32
        y = qconv.conv2d(x, w, "int8", cfg[1], scale=scale, padding="valid", **cfg[2])
        _same_bits(y, ref, f"{cfg[0]} int8 K={c} scale={scale}")


def test_strided_layers_skip_input_rows_but_still_check_them():
    """1x1 depthwise at stride 3 never reads rows 1, 2, 4, ...: a NaN there is still refused."""
    for cfg in CONFIGS:
        _need(cfg[1])
        x = np.ones((1, 7, 5, 4), np.float32)
        x[0, 5, 2, 1] = np.nan
        w = np.ones((1, 1, 4, 1), np.float32)
        for p in ("fp32", "int8"):
            with pytest.raises(InputError, match=r"input holds 1 non-finite value\(s\)"):
                qconv.conv2d(x, w, p, cfg[1], stride=3, padding="valid", groups=4, **cfg[2])


# ---- prepared calls ------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_prepared_equals_one_shot_and_keeps_no_state(cfg):
    _, name, opts = cfg
    _need(name)
    rng = np.random.default_rng(5)
    layers = [((1, 9, 8, 6), (3, 3, 10, 6), {"stride": 2, "padding": "same"}),
              ((2, 8, 7, 6), (3, 3, 12, 3), {"padding": ((1, 0), (2, 1)), "groups": 2}),
              ((1, 10, 10, 20), (5, 5, 20, 1), {"groups": 20, "padding": 2}),
              ((1, 6, 6, 5), (1, 1, 7, 5), {"padding": "valid"})]
    for xs, ws, layer in layers:
        w = rng.standard_normal(ws).astype(np.float32)
        bias = rng.standard_normal(ws[2]).astype(np.float32)
        for p in PRECISIONS:
            for scale in ([None] if p is Precision.FP32 else [None, "maxabs-per-channel", 300.0]):
                conv = qconv.prepare(w, p, name, scale=scale, bias=bias, **layer, **opts)
                out = None
                for k in range(3):   # different inputs through one prepared conv, out= reused
                    x = (rng.standard_normal(xs) * (1 + 10 * k)).astype(np.float32)
                    one = qconv.conv2d(x, w, p, name, scale=scale, bias=bias, **layer, **opts)
                    y = conv(x)
                    _same_bits(y, one, f"{cfg[0]} {p.value} {layer} {scale} call {k}")
                    out = np.full_like(y, np.nan) if out is None else out
                    y2 = conv(x, out=out)
                    assert y2 is out
                    _same_bits(out, one, f"{cfg[0]} {p.value} out= call {k}")
                    if p.is_integer:
                        ref = qconv.conv2d(x, w, p, "reference", scale=scale, bias=bias, **layer)
                        _same_bits(y, ref, f"{cfg[0]} {p.value} against the reference")


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_maxabs_scale_is_computed_in_c_with_the_contracts_bits(cfg):
    _need(cfg[1])
    rng = np.random.default_rng(6)
    w = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    for mag in (1e-30, 1e-3, 1.0, 3e4, 1e30):
        x = (rng.standard_normal((1, 7, 9, 8)) * mag).astype(np.float32)
        for p in (Precision.INT8, Precision.INT16, Precision.INT32):
            r = qconv.prepare(w, p, cfg[1], **cfg[2]).result(x)
            ref = qconv.prepare(w, p, "reference").result(x)
            assert np.float32(r.scale_input) == maxabs_scale(x, qconv.scales.maxabs_q(p, 9 * 8))
            assert r.scale_input == ref.scale_input
            _same_bits(r.output, ref.output, f"{cfg[0]} maxabs {mag}")
    zero = np.zeros((1, 4, 4, 8), np.float32)
    r = qconv.prepare(w, "int8", cfg[1], **cfg[2]).result(zero)
    assert r.scale_input == 1.0 and not np.any(r.output)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_input_errors_are_worded_like_the_contract(cfg):
    _, name, opts = cfg
    _need(name)
    w = np.ones((3, 3, 4, 4), np.float32)
    x = np.ones((1, 5, 5, 4), np.float32)
    x[0, 1, 2, 3], x[0, 4, 4, 0] = np.inf, np.nan
    for p in PRECISIONS:
        for groups in (1, 4):
            ww = w if groups == 1 else w[..., :1].copy()
            with pytest.raises(InputError, match=r"^input holds 2 non-finite value\(s\) \(NaN or inf\): "
                                                 r"qconv convolves finite data only$"):
                qconv.prepare(ww, p, name, groups=groups, **opts)(x)
    tiny = np.full((1, 5, 5, 4), 1e-45, np.float32)    # denormal: Q / max|x| overflows float32
    with pytest.raises(InputError) as c_err:
        qconv.prepare(w, "int8", name, **opts)(tiny)
    with pytest.raises(InputError) as ref_err:
        maxabs_scale(tiny, 127)
    assert str(c_err.value) == str(ref_err.value)
    with pytest.raises(InputError, match="1/\\(s_input\\*s_kernel\\)"):   # inv underflows float32
        qconv.prepare(w, "int8", name, scale=(1e30, 1e30), **opts)(x * 0 + 1)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_out_of_the_wrong_shape_or_dtype_is_refused(cfg):
    _need(cfg[1])
    conv = qconv.prepare(np.ones((3, 3, 4, 2), np.float32), "int8", cfg[1], stride=2, **cfg[2])
    x = np.ones((1, 6, 6, 2), np.float32)
    for bad in (np.empty((1, 6, 6, 4), np.float32), np.empty((1, 3, 3, 4), np.float64),
                np.empty((1, 3, 3, 4), np.int32), np.empty((1, 3, 4, 4), np.float32)[:, :, :3],
                np.empty((3, 3, 4), np.float32)):
        with pytest.raises(InputError, match="out="):
            conv(x, out=bad)
    assert conv(x, out=np.empty((1, 3, 3, 4), np.float32)).shape == (1, 3, 3, 4)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_one_prepared_conv_from_four_python_threads(cfg):
    _, name, opts = cfg
    _need(name)
    rng = np.random.default_rng(7)
    for ws, layer in (((3, 3, 24, 16), {"stride": 2}), ((3, 3, 32, 1), {"groups": 32})):
        w = rng.standard_normal(ws).astype(np.float32)
        conv = qconv.prepare(w, "int8", name, **layer, **opts)
        ref = qconv.prepare(w, "int8", "reference", **layer)
        xs = [rng.standard_normal((1, 11 + i % 3, 13, ws[3] * layer.get("groups", 1))).astype(np.float32)
              for i in range(8)]
        want = [ref(x) for x in xs]
        start = threading.Barrier(4)

        def work(t):
            start.wait()
            return [(i, conv(xs[i])) for r in range(6) for i in range(t, len(xs), 4)]

        with ThreadPoolExecutor(4) as ex:
            for res in ex.map(work, range(4)):
                for i, y in res:
                    _same_bits(y, want[i], f"{cfg[0]} thread call {i}")


def test_many_prepared_calls_do_not_grow_memory():
    import resource
    _need("c-avx2")
    rng = np.random.default_rng(8)
    w = rng.standard_normal((3, 3, 16, 8)).astype(np.float32)
    x = rng.standard_normal((1, 12, 12, 8)).astype(np.float32)
    for layer in ({}, {"groups": 8, "padding": "valid"}):
        conv = qconv.prepare(w if not layer else w[..., :1].copy() * 1, "int8", "c-avx2", threads=2, **layer)
        xx = x if not layer else x
        out = conv(xx)
        for _ in range(500):
            conv(xx, out=out)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(10_000):
            conv(xx, out=out)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert grown < 4096, f"max RSS grew by {grown} KiB over 10,000 prepared calls"


# ---- the threads option ----------------------------------------------------------------------

def test_threads_option_edges():
    _need("c-avx2")
    from qconv.backends import c_avx2
    cap = c_avx2.max_threads()
    assert cap == min(256, 4 * (os.cpu_count() or 1))
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 5, 7, 6)).astype(np.float32)
    w = rng.standard_normal((3, 3, 9, 6)).astype(np.float32)
    ref = qconv.conv2d(x, w, "int8", "reference")
    for t in sorted({1, 2, 3, cap}):   # more threads than rows or OC blocks: some have no work
        _same_bits(qconv.conv2d(x, w, "int8", "c-avx2", threads=t), ref, f"threads={t}")
    for bad in (0, -1, cap + 1, 10**6, True, 2.0, "2"):
        with pytest.raises(InputError, match="threads"):
            qconv.prepare(w, "int8", "c-avx2", threads=bad)
    with pytest.raises(InputError, match=f"more than {cap}"):
        qconv.prepare(w, "int8", "c-avx2", threads=cap + 1)
