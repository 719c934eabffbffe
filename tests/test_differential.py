"""Every variant of every registered backend against the contract: the one differential suite.

The variants come from the registry (qconv.backends.variants(for_tests=True)): each backend's own
list (c-avx2: every SIMD level this machine runs; cuda: the INT16/INT32 paths "auto" does not
take) and what only tests run (c-avx2: emulated levels such as vnni-emulated and the separate
dequantize pass; cuda: INT8 on __dp4a). The reference backend is the oracle, so it is not a variant
here. An unavailable backend is skipped with its own reason, unless QCONV_REQUIRE names it
(e.g. QCONV_REQUIRE=c-scalar,c-avx2), which makes that a failure.

One check (checks.assert_matches): integer outputs equal the reference backend's bit for bit; FP32
lies within contract.fp32_error_bound of the float64 convolution (+ bias).

- random layers (hypothesis, strategies.layers): strides 1-3, every padding form, groups
  {1, 2, C} (depthwise with channel multipliers), bias, per-tensor and per-channel scales, scales
  that force int32 wrap-around, both roundings; device inputs where the backend takes them;
- shapes at each variant's declared tiles (the backend's tiles(): C's qconv_tile, the cuda
  package's _tiling): every tiled axis equal to, one below, one above and a multiple of the tile;
- accumulators at full range (wrap-around, saturation), a reduction long enough to wrap INT8,
  quantization edge values, big and even kernels, the exam and real layers;
- prepared calls against one-shot calls, out=, several Python threads, maxabs scales, and the
  errors for non-finite inputs and bad out= arrays.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import qconv
from checks import assert_matches, assert_same_bits
from conftest import EXAM, REAL, REQUIRED, backend_or_skip, exam_cases, real_layers
from qconv import backends
from qconv.contract import Precision, maxabs_scale
from qconv.errors import InputError
from qconv.tensorfile import load as load_tensor
from strategies import INT_PRECISIONS, PRECISIONS, layers

ORACLE = "reference"


def _variants() -> list[tuple[str, str, dict]]:
    """(id, backend, options) for every variant of every registered backend but the oracle,
    available or not; a backend whose module does not import still gets its row (skipped)."""
    out = [v for v in backends.variants(available_only=False, for_tests=True) if v[1] != ORACLE]
    listed = {name for _, name, _ in out}
    return out + [(name, name, {}) for name in backends.names() if name != ORACLE and name not in listed]


def _param(variant):
    """The variant as a test parameter, skipped at collection with the backend's reason where it is
    unavailable and QCONV_REQUIRE does not name it (then _module fails instead)."""
    ok, why = qconv.available_backends().get(variant[1], (False, "not registered"))
    skip = () if ok or variant[1] in REQUIRED else (pytest.mark.skip(reason=f"{variant[1]} unavailable: {why}"),)
    return pytest.param(variant, id=variant[0], marks=skip)


VARIANTS = _variants()
with_variants = pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
with_precisions = pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.value)
with_int_precisions = pytest.mark.parametrize("precision", INT_PRECISIONS, ids=lambda p: p.value)


def _module(variant):
    """The variant's backend module, or a skip with the backend's reason (a failure under QCONV_REQUIRE)."""
    backend_or_skip(variant[1])
    return backends.get(variant[1])


def _check(variant, precision, x, w, layer=None, *, bias=None, scale=None, rounding="nearest", device=False):
    """One call of the variant, checked against the contract; returns its output (host)."""
    _, name, opts = variant
    mod = _module(variant)
    layer = layer or {}
    xin = mod.to_device(x) if device and mod.ACCEPTS_DEVICE_ARRAYS else x
    q = {"scale": scale, "rounding": rounding} if precision.is_integer else {}
    y = np.asarray(qconv.conv2d(xin, w, precision, name, bias=bias, **q, **layer, **opts))
    assert_matches(y, x, w, precision, layer, bias=bias, scale=scale, rounding=rounding,
                   what=f"{variant[0]} {precision.value} {layer} bias={bias is not None} scale={scale!r} {rounding}",
                   fp32_bound=backends.fp32_bound(name, opts))
    return y


def test_required_backends_are_registered():
    unknown = REQUIRED - set(backends.names())
    assert not unknown, f"QCONV_REQUIRE names unknown backends {sorted(unknown)}"
    for name in REQUIRED:
        backend_or_skip(name)


# ---- the general layer, hypothesis ---------------------------------------------------------

@with_precisions
@with_variants
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much], deadline=None)
@given(layer=layers(), rounding=st.sampled_from(["nearest", "truncate"]), device=st.booleans())
@example(layer=(np.full((1, 5, 5, 3), 0.5, np.float32), np.full((3, 3, 3, 1), 1.5, np.float32),
                {"stride": 2, "padding": "same", "groups": 3}, None, 1.0), rounding="nearest", device=False)  # ties, dw
@example(layer=(np.full((2, 7, 6, 4), 3e4, np.float32), np.full((3, 2, 6, 2), -3e4, np.float32),
                {"stride": (1, 3), "padding": ((2, 0), (1, 1)), "groups": 2},
                np.arange(6, dtype=np.float32), 1e9), rounding="truncate", device=False)         # wrap, grouped
@example(layer=(np.full((1, 6, 9, 2), -7.0, np.float32), np.full((5, 1, 6, 1), 9.0, np.float32),
                {"stride": (3, 1), "padding": "valid", "groups": 2}, None,
                (2.0**15, np.full(6, 2.0**14, np.float32))), rounding="nearest", device=False)  # dw x3, wrap
@example(layer=((np.random.default_rng(1).standard_normal((2, 9, 11, 6)) * 40).astype(np.float32),
                (np.random.default_rng(2).standard_normal((3, 4, 10, 3)) * 0.25).astype(np.float32),
                {"stride": (2, 3), "padding": ((2, 0), (1, 3)), "groups": 2},
                np.random.default_rng(3).standard_normal(10).astype(np.float32), "maxabs-per-channel"),
         rounding="nearest", device=True)                                 # asymmetric, odd channels, device
def test_general_layer_matches_reference(variant, precision, layer, rounding, device):
    x, w, kw, bias, scale = layer
    _check(variant, precision, x, w, kw, bias=bias, scale=scale if precision.is_integer else None,
           rounding=rounding, device=device)


# ---- tile boundaries, from each variant's declared tiles --------------------------------------

def _around(v: int) -> list[int]:
    """Equal to, one below, one above and a multiple of v (XNNPACK's testers' eq / lt / gt / div)."""
    return sorted({max(1, v - 1), v, v + 1, 2 * v})


def tile_layers(tile) -> list[tuple[tuple, tuple, dict]]:
    """(x_shape, w_shape, layer): each tiled axis in turn around each of its sizes, the others at
    the tile's first size; one output row, so output pixels = output columns (stride and kernel
    size cycled, 'valid' padding); two groups in every fourth. Then depthwise layers with channels
    and output columns around the depthwise tile (channel multipliers, 3x3 and 5x5, strides 1-2)."""
    wo0, oc0, c0 = tile.pixels[0], tile.out_channels[0], tile.in_channels[0]
    sizes = ([(wo, oc0, c0) for p in tile.pixels for wo in _around(p)]
             + [(wo0, oc, c0) for n in tile.out_channels for oc in _around(n)]
             + [(wo0, oc0, c) for k in tile.in_channels for c in _around(k)])
    out = []
    for i, (wo, oc, c) in enumerate(dict.fromkeys(sizes)):
        stride, k, groups = 1 + i % 2, (1, 3, 2)[i % 3], 2 if i % 4 == 3 else 1
        out.append(((1, k, (wo - 1) * stride + k, c * groups), (k, k, oc * groups, c),
                    {"stride": stride, "padding": "valid", "groups": groups}))
    dw = [(c, wo) for c in _around(tile.dw_channels) for wo in _around(tile.dw_columns)]
    for i, (c, wo) in enumerate(dw):
        mult, k, stride = ((1, 3, 1), (2, 3, 2), (1, 5, 2))[i % 3]
        out.append(((1, 3, wo * stride, c), (k, k, c * mult, 1), {"stride": stride, "padding": "same", "groups": c}))
    return out


@with_precisions
@with_variants
def test_tile_boundaries(variant, precision):
    mod = _module(variant)
    tiles = mod.tiles(variant[2], precision)
    assert tiles, f"{variant[0]} declares no tiles for {precision.value}"
    rng = np.random.default_rng(11)
    for tile in tiles:
        for i, (xs, ws, layer) in enumerate(tile_layers(tile)):
            x = rng.standard_normal(xs).astype(np.float32)
            w = (rng.standard_normal(ws) * 0.3).astype(np.float32)
            bias = rng.standard_normal(ws[2]).astype(np.float32) if i % 2 else None
            scale = None if not precision.is_integer else ((3.0, 40.0) if i % 2 else "maxabs")
            _check((variant[0], variant[1], {**variant[2], **tile.options}), precision, x, w, layer,
                   bias=bias, scale=scale)


def test_tile_layers_put_every_axis_on_its_edges():
    """tile_layers' shapes, read back through the contract: every size around the tile appears on
    its axis (output columns in one row, output and input channels per group, depthwise channels
    and columns)."""
    from qconv.backends.base import Tile
    from qconv.contract import check_layer
    geoms = [check_layer(xs, ws, **layer) for xs, ws, layer in tile_layers(Tile({}, (6, 12), (16, 8), (4,), 16, 4))]
    dense = [g for g in geoms if g.spec.groups <= 2]
    dw = [g for g in geoms if g.spec.groups > 2]
    assert all(g.ho == 1 for g in dense)
    assert {g.wo for g in dense} == {5, 6, 7, 11, 12, 13, 24}
    assert {g.spec.oc // g.spec.groups for g in dense} == {7, 8, 9, 15, 16, 17, 32}
    assert {g.spec.icg for g in dense} == {3, 4, 5, 8}
    assert {g.spec.groups for g in dw} == {15, 16, 17, 32} and {g.wo for g in dw} == {3, 4, 5, 8}


# ---- accumulators at full range ----------------------------------------------------------------

@with_int_precisions
@with_variants
def test_full_range_operands_wrap_and_saturate_like_the_reference(variant, precision):
    """Operands at up to +-Qmax of every sign combination (INT32/INT16 accumulators wrap: K = 9 *
    channels), all at -Qmax or +Qmax, saturation past int32, per-channel kernel scales; with 48
    channels and with 20 (not a multiple of any vector), grouped strided and depthwise layers too."""
    _module(variant)
    qmax = float(precision.qmax)
    rng = np.random.default_rng(17)
    for channels in (48, 20):
        xs, ws = (2, 7, 9, channels), (3, 3, 33, channels)
        mag_x = rng.uniform(0.01, 1.0, xs).astype(np.float32)
        mag_w = rng.uniform(0.01, 1.0, ws).astype(np.float32)
        signs = {"pos": lambda a: a, "neg": lambda a: -a,
                 "mixed": lambda a: np.where(rng.random(a.shape) < 0.5, -a, a).astype(np.float32)}
        ones_x, ones_w = np.ones(xs, np.float32), np.ones(ws, np.float32)
        cases = [(signs[a](mag_x), signs[b](mag_w), qmax) for a in signs for b in signs]
        cases += [(-ones_x, -ones_w, qmax), (-ones_x, ones_w, qmax), (ones_x, ones_w, qmax),
                  (mag_x * 1e30, signs["mixed"](mag_w), 1e9),
                  (signs["mixed"](mag_x), signs["mixed"](mag_w), (qmax, np.float32(qmax) / np.arange(1, 34)))]
        for x, w, scale in cases:
            _check(variant, precision, x, w, scale=scale)
    x = rng.uniform(-1, 1, (1, 10, 10, 64)).astype(np.float32)
    _check(variant, precision, x, rng.uniform(-1, 1, (3, 3, 16, 16)).astype(np.float32), {"stride": 2, "groups": 4},
           scale=qmax)
    _check(variant, precision, x, rng.uniform(-1, 1, (5, 5, 64, 1)).astype(np.float32), {"groups": 64}, scale=qmax)
    assert 9 * 48 * int(qmax) ** 2 > 2**32 or precision is Precision.INT8   # the all-Qmax cases wrap


@with_variants
def test_int8_accumulators_wrap_like_the_contract(variant):
    """INT8 operands clamp at 127, so only a long reduction overflows int32: K = 140,000 products
    of 127 * 127 (and of 127 * -127 in the odd channels' columns) pass 2^31, and every kernel
    family (vpdpbusd with its +128 compensation, AMX tdpbssd, mma.sync) must wrap modulo 2^32 as
    the reference does. OC 17 and 3 pixels cross the tiles' channel and pixel blocks."""
    _module(variant)
    c = 140_000
    x = np.full((1, 1, 3, c), 1.0, np.float32)
    x[0, 0, 1, ::3] = -1.0
    w = np.full((1, 1, 17, c), 1.0, np.float32)
    w[:, :, 1::2, ::2] = -1.0
    assert c * 127 * 127 > 2**31 - 1
    for scale in ((127.0, 127.0), (127.0, 64.0)):
        _check(variant, Precision.INT8, x, w, {"padding": "valid"}, scale=scale)


@with_variants
def test_quantize_edges_through_identity_kernel(variant):
    """A 1x1 identity kernel turns the output into dequantize(q_x * q_w): ties, saturation at
    +-Qmax, +-2^31 for INT32 (where cvtps returns 0x80000000), and a length that leaves a tail."""
    _module(variant)
    special = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, 127.5, -127.5, 128.0, -128.0, 32766.5,
               32767.5, -32768.0, 2.0**31, -2.0**31, 2.0**31 - 128, -(2.0**31 - 128), 3e9, -3e9,
               1e38, -1e38, 0.0, -0.0, 1e-30, 0.49999997, -0.49999997]
    x = np.array(special * 2 + [7.25], dtype=np.float32).reshape(1, 1, -1, 1)   # 55: not a multiple of 8
    w = np.ones((1, 1, 1, 1), np.float32)
    for p in INT_PRECISIONS:
        for rounding in ("nearest", "truncate"):
            _check(variant, p, x, w, scale=(1.0, 1.0), rounding=rounding)


@with_variants
def test_odd_channels_even_kernels_and_big_kernels(variant):
    _module(variant)
    rng = np.random.default_rng(2)
    for xs, ws in [((3, 4, 5, 7), (4, 2, 9, 7)), ((1, 2, 3, 13), (7, 7, 21, 13)),
                   ((1, 1, 1, 3), (5, 5, 2, 3)), ((2, 7, 7, 31), (2, 4, 18, 31))]:
        x = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
        for p in PRECISIONS:
            _check(variant, p, x, w, scale=50.0 if p.is_integer else None)


def _data_layers() -> list:
    found = [("exam", c) for c in exam_cases() if (EXAM / c).exists()] + [("real", n) for n in real_layers()]
    return found or [pytest.param(None, None, marks=pytest.mark.skip(reason=f"{EXAM} and {REAL} are absent"))]


@pytest.mark.parametrize("where,name", _data_layers())
@with_variants
def test_exam_and_real_layers(variant, where, name):
    """The assignment's exam layers and the real layers: FP32, and every integer precision at
    maxabs (no overflow possible) and at one large S (INT32/INT16 accumulators wrap), with bias."""
    _module(variant)
    d = (EXAM if where == "exam" else REAL) / name
    x, w = load_tensor(d / "input_tensor.bin"), load_tensor(d / "kernel_tensor.bin")
    bias = load_tensor(d / "bias_tensor.bin").reshape(-1) if (d / "bias_tensor.bin").exists() else None
    _check(variant, Precision.FP32, x, w, bias=bias)
    for p in INT_PRECISIONS:
        for scale in ("maxabs", 2.0**14):
            _check(variant, p, x, w, bias=bias, scale=scale)


@with_variants
def test_strided_layers_skip_input_rows_but_still_check_them(variant):
    """1x1 depthwise at stride 3 never reads rows 1, 2, 4, ...: a NaN there is still refused."""
    _module(variant)
    x = np.ones((1, 7, 5, 4), np.float32)
    x[0, 5, 2, 1] = np.nan
    w = np.ones((1, 1, 4, 1), np.float32)
    for p in ("fp32", "int8"):
        with pytest.raises(InputError, match=r"input holds 1 non-finite value\(s\)"):
            qconv.conv2d(x, w, p, variant[1], stride=3, padding="valid", groups=4, **variant[2])


# ---- prepared calls ------------------------------------------------------------------------

@with_variants
def test_prepared_equals_one_shot_and_keeps_no_state(variant):
    """Different inputs through one prepared convolution, out= reused: integers give the one-shot
    call's bits (and the reference's); FP32 (which may sum in any order) the contract's bound."""
    _, name, opts = variant
    _module(variant)
    rng = np.random.default_rng(5)
    cases = [((1, 9, 8, 6), (3, 3, 10, 6), {"stride": 2, "padding": "same"}),
             ((2, 8, 7, 6), (3, 3, 12, 3), {"padding": ((1, 0), (2, 1)), "groups": 2}),
             ((1, 10, 10, 20), (5, 5, 20, 1), {"groups": 20, "padding": 2}),
             ((1, 6, 6, 5), (1, 1, 7, 5), {"padding": "valid"})]
    for xs, ws, layer in cases:
        w = rng.standard_normal(ws).astype(np.float32)
        bias = rng.standard_normal(ws[2]).astype(np.float32)
        for p in PRECISIONS:
            for scale in ([None] if p is Precision.FP32 else [None, "maxabs-per-channel", 300.0]):
                conv = qconv.prepare(w, p, name, scale=scale, bias=bias, **layer, **opts)
                out = None
                for k in range(3):
                    x = (rng.standard_normal(xs) * (1 + 10 * k)).astype(np.float32)
                    what = f"{variant[0]} {p.value} {layer} {scale} call {k}"
                    y = conv(x)
                    out = np.full_like(y, np.nan) if out is None else out
                    assert conv(x, out=out) is out
                    assert_matches(y, x, w, p, layer, bias=bias, scale=scale, what=what,
                                   fp32_bound=backends.fp32_bound(name, opts))
                    if p.is_integer:
                        one = qconv.conv2d(x, w, p, name, scale=scale, bias=bias, **layer, **opts)
                        assert_same_bits(y, one, what)
                        assert_same_bits(out, one, what + " out=")
                    else:
                        assert_matches(out, x, w, p, layer, bias=bias, what=what + " out=",
                                       fp32_bound=backends.fp32_bound(name, opts))


@with_variants
def test_maxabs_scale_has_the_contracts_bits(variant):
    _module(variant)
    rng = np.random.default_rng(6)
    w = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    for mag in (1e-30, 1e-3, 1.0, 3e4, 1e30):
        x = (rng.standard_normal((1, 7, 9, 8)) * mag).astype(np.float32)
        for p in INT_PRECISIONS:
            r = qconv.prepare(w, p, variant[1], **variant[2]).result(x)
            assert np.float32(r.scale_input) == maxabs_scale(x, qconv.scales.maxabs_q(p, 9 * 8))
            assert_matches(r.output, x, w, p, scale="maxabs", what=f"{variant[0]} maxabs {mag}")
    zero = np.zeros((1, 4, 4, 8), np.float32)
    r = qconv.prepare(w, "int8", variant[1], **variant[2]).result(zero)
    assert r.scale_input == 1.0 and not np.any(np.asarray(r.output))


@with_variants
def test_input_errors_are_worded_like_the_contract(variant):
    _, name, opts = variant
    _module(variant)
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
    with pytest.raises(InputError) as backend_err:
        qconv.prepare(w, "int8", name, **opts)(tiny)
    with pytest.raises(InputError) as contract_err:
        maxabs_scale(tiny, 127)
    assert str(backend_err.value) == str(contract_err.value)
    with pytest.raises(InputError, match="1/\\(s_input\\*s_kernel\\)"):   # inv underflows float32
        qconv.prepare(w, "int8", name, scale=(1e30, 1e30), **opts)(x * 0 + 1)


@with_variants
def test_out_of_the_wrong_shape_or_dtype_is_refused(variant):
    _module(variant)
    conv = qconv.prepare(np.ones((3, 3, 4, 2), np.float32), "int8", variant[1], stride=2, **variant[2])
    x = np.ones((1, 6, 6, 2), np.float32)
    for bad in (np.empty((1, 6, 6, 4), np.float32), np.empty((1, 3, 3, 4), np.float64),
                np.empty((1, 3, 3, 4), np.int32), np.empty((1, 3, 4, 4), np.float32)[:, :, :3],
                np.empty((3, 3, 4), np.float32)):
        with pytest.raises(InputError, match="out="):
            conv(x, out=bad)
    assert conv(x, out=np.empty((1, 3, 3, 4), np.float32)).shape == (1, 3, 3, 4)


@with_variants
def test_one_prepared_conv_from_four_python_threads(variant):
    _, name, opts = variant
    _module(variant)
    rng = np.random.default_rng(7)
    for ws, layer in (((3, 3, 24, 16), {"stride": 2}), ((3, 3, 32, 1), {"groups": 32})):
        w = rng.standard_normal(ws).astype(np.float32)
        conv = qconv.prepare(w, "int8", name, **layer, **opts)
        ref = qconv.prepare(w, "int8", ORACLE, **layer)
        xs = [rng.standard_normal((1, 11 + i % 3, 13, ws[3] * layer.get("groups", 1))).astype(np.float32)
              for i in range(8)]
        want = [ref(x) for x in xs]
        start = threading.Barrier(4)

        def work(t):
            start.wait()
            return [(i, conv(xs[i])) for _ in range(6) for i in range(t, len(xs), 4)]

        with ThreadPoolExecutor(4) as ex:
            for res in ex.map(work, range(4)):
                for i, y in res:
                    assert_same_bits(y, want[i], f"{variant[0]} thread call {i}")
