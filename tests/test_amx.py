"""The AMX kernels (csrc/conv_amx.inc) bit for bit against the reference, at every integer precision.

They run at two levels of c-avx2: "amx-emulated" (the same kernels with every tile instruction
emulated in C, csrc/amx_emu.h: any AVX2 CPU) and "amx" (the hardware; skipped with its reason
where the CPU or Linux refuse it, unless QCONV_REQUIRE_ISA names it, e.g. QCONV_REQUIRE_ISA=amx on
the AMX machine, which makes that a failure).

INT16 and INT32 are exact byte decompositions (x * w = sum over byte pairs of bx_i * bw_j <<
8(i + j), mod 2^32), one tile product per pair with the instruction of its signs. The tests aim at
what that can get wrong: every operand sign combination and the byte values where a byte's sign
matters (lo = 0, 255; hi = -128, -1, 0, 127), int32 wrap-around (long K at +-Qmax), sums that
cancel to a small exact value after wrapping partials (float32(acc) is exact below 2^24, so the
low bits are checked), and shapes at the declared tile's edges (qconv_tile: nr, mr, cpad).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import qconv
from qconv.backends import _cext
from qconv.contract import check_layer
from qconv.errors import InputError

from conftest import backend_or_skip
from strategies import tensors

LEVELS = ["amx-emulated", "amx"]
INTS = ["int8", "int16", "int32"]
QMAX = {"int8": 127, "int16": 32767, "int32": 2**31 - 1}
REQUIRED_ISAS = {s.strip() for s in os.environ.get("QCONV_REQUIRE_ISA", "").split(",") if s.strip()}


def _need(isa: str) -> None:
    backend_or_skip("c-avx2")
    why = _cext.isa_reason(isa)
    if why:
        if isa in REQUIRED_ISAS:
            pytest.fail(f"isa {isa} is required (QCONV_REQUIRE_ISA) but cannot run: {why}")
        pytest.skip(f"isa {isa} cannot run here: {why}")


def _same_bits(y: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert y.shape == ref.shape, f"{what}: shape {y.shape} vs {ref.shape}"
    bad = y.view(np.uint32) != ref.view(np.uint32)
    if bad.any():
        at = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} outputs differ; first at {at}: "
                             f"{y[at]!r} vs reference {ref[at]!r}")


def _check(isa, precision, x, w, scale=None, threads=2, **layer):
    ref = qconv.conv2d(x, w, precision, "reference", scale=scale, **layer)
    y = qconv.conv2d(x, w, precision, "c-avx2", scale=scale, isa=isa, threads=threads, **layer)
    _same_bits(y, ref, f"{isa} {precision} x{x.shape} w{w.shape} {layer} scale={scale!r}")


def _wrap32(v: np.ndarray) -> np.ndarray:
    return ((v.astype(np.int64) + 2**31) % 2**32 - 2**31).astype(np.int64)


# ---- the decomposition itself, in numpy --------------------------------------------------------

@pytest.mark.parametrize("nbytes", [2, 4])
def test_byte_decomposition_is_exact_mod_2_32(nbytes):
    """sum over byte pairs (i + j < 4) of bx_i * bw_j << 8(i + j), each pair's sum over K wrapped to
    int32 as a tile accumulates it, equals the wrap-around int32 dot product: the identity the
    INT16 (4 products) and INT32 (10 products) kernels rely on."""
    rng = np.random.default_rng(1)
    q = QMAX[{2: "int16", 4: "int32"}[nbytes]]
    special = np.array([0, 1, -1, 255, 256, -256, 127, 128, -128, -129, q, -q, q - 255, -q + 255], np.int64)
    for trial in range(20):
        k = 5000
        x = rng.choice(np.r_[special, rng.integers(-q, q + 1, 64)], k)
        w = rng.choice(np.r_[special, rng.integers(-q, q + 1, 64)], k)
        want = _wrap32(np.sum(_wrap32(x * w)))

        def byte(v, i):   # byte i of v's two's complement: the top one signed, the others unsigned
            b = (v >> (8 * i)) & 0xFF
            return b - 256 * (b >= 128) if i == nbytes - 1 else b
        total = 0
        for i in range(nbytes):
            for j in range(nbytes):
                if i + j < 4:
                    acc = _wrap32(np.sum(byte(x, i) * byte(w, j)))   # one C tile's int32 sum
                    total += int(acc) << (8 * (i + j))
        assert _wrap32(np.array(total)) == want, (trial, nbytes)


# ---- the level's plumbing ----------------------------------------------------------------------

def test_amx_emulated_is_a_test_level_never_auto():
    backend_or_skip("c-avx2")
    assert _cext.isa_reason("amx-emulated") == ""        # any AVX2 CPU
    assert _cext.best_isa("amx-emulated") == "amx-emulated"
    assert _cext.best_isa("auto") != "amx-emulated"
    assert "amx-emulated" not in _cext.usable_isas()
    assert "amx-emulated" in _cext.EMULATED_ISAS
    for p in INTS:
        assert _cext.tile("amx-emulated", p) == _cext.tile("amx", p)
    w = np.ones((3, 3, 5, 7), np.float32)
    _, t = _cext.prepare("int16", "amx-emulated", 1, False, w, s_w=1.0)
    assert t["isa"] == "amx-emulated"


def test_fp32_at_amx_emulated_is_the_avx2_kernel():
    backend_or_skip("c-avx2")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 9, 11, 20)).astype(np.float32)
    w = rng.standard_normal((3, 3, 17, 20)).astype(np.float32)
    y = qconv.conv2d(x, w, "fp32", "c-avx2", isa="amx-emulated", threads=1)
    _same_bits(y, qconv.conv2d(x, w, "fp32", "c-avx2", isa="avx2", threads=1), "fp32 amx-emulated vs avx2")


# ---- operand values ----------------------------------------------------------------------------

def _signed_values(precision: str) -> np.ndarray:
    """Integers whose bytes take the values where signedness matters, both signs, +-Qmax."""
    q = QMAX[precision]
    v = [0, 1, -1, 2, 127, -127, q, -q, q - 1, -q + 1]
    if precision != "int8":
        v += [128, -128, 255, -255, 256, -256, 257, -257, 32767 - 255, -32767 + 255, 0x7F00, -0x7F00, 0x00FF]
    if precision == "int32":
        v += [2**24, -2**24, 2**24 - 1, 0x00FFFFFF, -0x00FFFFFF, 2**31 - 256, -(2**31) + 256, 0x7F7F7F7F, -0x7F7F7F7F]
    return np.array(sorted(set(v)), np.float64)


@pytest.mark.parametrize("precision", INTS)
@pytest.mark.parametrize("isa", LEVELS)
def test_every_sign_combination_and_byte_edge(isa, precision):
    """x and w drawn from byte-edge values of each sign, in every pairing (x+ w+, x+ w-, x- w+,
    x- w-, mixed), with scale 1 so q = the value: each tdpb**d form meets each byte pattern."""
    _need(isa)
    rng = np.random.default_rng(3)
    vals = _signed_values(precision)
    pos, neg = vals[vals > 0], vals[vals < 0]
    for xs, ws in ((pos, pos), (pos, neg), (neg, pos), (neg, neg), (vals, vals)):
        x = rng.choice(xs, (1, 5, 19, 70)).astype(np.float32)
        w = rng.choice(ws, (3, 3, 18, 70)).astype(np.float32)
        _check(isa, precision, x, w, scale=(1.0, 1.0))


@pytest.mark.parametrize("precision", INTS)
@pytest.mark.parametrize("isa", LEVELS)
def test_wraparound_long_k_at_qmax(isa, precision):
    """K = 3 * 3 * 520 products at +-Qmax (scales far past saturation): every tile accumulator
    wraps many times (INT16: 4680 * 32767^2 ~ 2^42); the outputs must still equal the reference's
    wrap-around int32 sums."""
    _need(isa)
    rng = np.random.default_rng(4)
    x = rng.choice([-1.0, 1.0, 0.5], (1, 4, 18, 520)).astype(np.float32)
    w = rng.choice([-1.0, 1.0, 0.25], (3, 3, 17, 520)).astype(np.float32)
    _check(isa, precision, x, w, scale=1e12, padding="valid")
    _check(isa, precision, np.abs(x), -np.abs(w), scale=1e12)


@pytest.mark.parametrize("precision", ["int16", "int32"])
@pytest.mark.parametrize("isa", LEVELS)
def test_cancelling_sums_check_the_low_bits(isa, precision):
    """Channel pairs (v, v) against (u, -u) cancel exactly, so each output is a small exact value
    (one last channel's product, below 2^24 where float32(acc) keeps every bit) while each byte
    product's tile accumulated large, wrapping partial sums: a wrong low bit in any of them shows."""
    _need(isa)
    rng = np.random.default_rng(5)
    c, oc = 2 * 200 + 1, 19
    v = rng.choice(_signed_values(precision), (1, 3, 21, c // 2))
    u = rng.choice(_signed_values(precision), (1, 1, oc, c // 2))
    x = np.concatenate([v, v, rng.integers(-60, 61, (1, 3, 21, 1))], axis=3).astype(np.float32)
    w = np.concatenate([u, -u, rng.integers(-60, 61, (1, 1, oc, 1))], axis=3).astype(np.float32)
    _check(isa, precision, x, w, scale=(1.0, 1.0), padding="valid")


# ---- shapes at the declared tile's edges -------------------------------------------------------

def _around(v: int) -> list[int]:
    return sorted({max(1, v - 1), v, v + 1})


@pytest.mark.parametrize("precision", INTS)
@pytest.mark.parametrize("isa", LEVELS)
def test_tile_boundaries(isa, precision):
    """OC around nr and 2 nr, output widths around mr and 2 mr, input channels around cpad (the
    64-channel A row) and its double, at strides 1 and 2 and with two groups (each group's
    channels padded to cpad)."""
    _need(isa)
    t = _cext.tile(isa, precision)
    rng = np.random.default_rng(6)
    ocs = sorted(set(_around(t["nr"]) + _around(2 * t["nr"])))
    wos = sorted(set(_around(t["mr"]) + _around(2 * t["mr"])))
    cs = sorted(set([1, 3] + _around(t["cpad"]) + _around(2 * t["cpad"])))
    for i, oc in enumerate(ocs):
        for j, wo in enumerate(wos):
            c = cs[(i + 2 * j) % len(cs)]
            stride = 1 + (i + j) % 2
            k = (1, 3, 2)[(i + j) % 3]
            groups = 2 if (i + j) % 3 == 0 else 1
            x = rng.standard_normal((1, 1 + k, (wo - 1) * stride + k, c * groups)).astype(np.float32)
            w = rng.standard_normal((k, k, oc * groups, c)).astype(np.float32)
            bias = rng.standard_normal(oc * groups).astype(np.float32) if j % 2 else None
            _check(isa, precision, x, w, scale=(3.0, 40.0) if precision == "int8" else (300.0, 4000.0),
                   stride=stride, padding="valid", groups=groups, bias=bias)


# ---- random layers -----------------------------------------------------------------------------

@st.composite
def layers(draw):
    precision = draw(st.sampled_from(INTS))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    icg = draw(st.sampled_from([1, 5, 63, 64, 65, 100, 130]))
    ocg = draw(st.integers(1, 35))
    k = draw(st.sampled_from([1, 2, 3, 5]))
    n, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 7)), draw(st.integers(1, 40))
    stride = draw(st.sampled_from([1, 2, (1, 3), (2, 1)]))
    padding = draw(st.sampled_from(["same", "valid", 1, ((0, 2), (1, 0))]))
    x = draw(tensors((n, h, w, icg * groups)))
    wt = draw(tensors((k, k, ocg * groups, icg)))
    bias = draw(st.none() | tensors((ocg * groups,)))
    single = st.sampled_from([0.5, 3.0, 127.0, 2.0**15, 2.0**20, 1e9, 1e12])
    scale = draw(st.none() | single | st.tuples(single, single) |
                 st.tuples(single, st.lists(single, min_size=ocg * groups, max_size=ocg * groups)))
    return precision, x, wt, dict(stride=stride, padding=padding, groups=groups, bias=bias), scale


@pytest.mark.parametrize("isa", LEVELS)
@settings(max_examples=25)
@given(layer=layers(), threads=st.sampled_from([1, 3]))
@example(layer=("int16", np.full((1, 2, 17, 64), 7.0, np.float32), np.full((3, 3, 16, 64), -5.0, np.float32),
                dict(stride=1, padding="same", groups=1, bias=None), 1e6), threads=1)
def test_random_layers(isa, layer, threads):
    _need(isa)
    precision, x, w, kw, scale = layer
    if isinstance(scale, tuple) and isinstance(scale[1], list):
        scale = (scale[0], np.array(scale[1], np.float32))
    try:   # 'valid' and explicit pads need the kernel to fit
        check_layer(x.shape, w.shape, stride=kw["stride"], padding=kw["padding"], groups=kw["groups"])
    except InputError:
        assume(False)
    _check(isa, precision, x, w, scale=scale, threads=threads, **kw)
