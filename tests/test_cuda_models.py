"""numpy models of the cuda kernels' index math, line for line, without a GPU: the implicit GEMM
over the packed layouts, the wgmma window kernel's shifted rows and the walk of its padded-grid
quantize, the quantize grid's layout, the TF32x3 split's stated bound, the depthwise strip loop and
the byte-plane decomposition, each reproducing the contract for random strides, paddings and
groups. (The kernels themselves run on a GPU in test_cuda.py and test_differential.py, and on the
host in test_cuda_emulated.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, example, given, settings, strategies as st

from qconv.backends.cuda import _layout, _tiling
from qconv.contract import Precision, check_layer, conv2d_direct, conv2d_int_wrapped
from strategies import layer_shapes

def _pack_x(xq, lay):
    """(N, H, W, C) -> [pixels][G][icgp], as qconv_quantize_x_* writes it."""
    n, h, w, c = xq.shape
    out = np.zeros((n * h * w, lay.groups, lay.icgp), xq.dtype)
    out[:, :, :lay.icg] = xq.reshape(n * h * w, lay.groups, lay.icg)
    return out.reshape(-1)


def _emulate_gemm(xq, wq, g, lay):
    """int32 accumulators, addressing the packed operands as TileLoader does."""
    spec = g.spec
    xw = np.ascontiguousarray(_pack_x(xq, lay)).view(np.uint32)
    ww = np.ascontiguousarray(_layout.pack_gemm_weights(wq, lay)).view(np.uint32).reshape(
        lay.groups, lay.ocgp, lay.kpw)
    m = np.arange(g.n * g.ho * g.wo)
    hw = g.ho * g.wo
    n_, r = m // hw, m % hw
    i = r // g.wo
    a_nh, a_h, a_w = n_ * g.h, i * spec.stride[0] - g.pt, (r - i * g.wo) * spec.stride[1] - g.pl
    kword = np.arange(lay.kpw)
    tap, cw = kword // lay.cw, kword % lay.cw
    kh, kw = tap // spec.kw, tap % spec.kw
    hi, wi = a_h[:, None] + kh[None], a_w[:, None] + kw[None]
    ok = (tap[None] < lay.taps) & (hi >= 0) & (hi < g.h) & (wi >= 0) & (wi < g.w)
    acc = np.zeros((m.size, spec.oc), np.int64)
    for grp in range(lay.groups):
        idx = ((a_nh[:, None] + hi) * g.w + wi) * lay.xpw + grp * lay.cw + cw[None]
        a = np.where(ok, xw[np.where(ok, idx, 0)], 0).astype(np.uint32).view(xq.dtype).reshape(m.size, -1)
        b = ww[grp, :lay.ocg].view(wq.dtype).reshape(lay.ocg, -1)
        acc[:, grp * lay.ocg:(grp + 1) * lay.ocg] = a.astype(np.int64) @ b.astype(np.int64).T
    return (acc & 0xFFFFFFFF).astype(np.uint32).view(np.int32).reshape(g.out_shape)


def _emulate_window(xq, wq, g, lay):
    """The wgmma window kernel: the input on the zero-padded grid [N][Hp][Wp][icgp] (as the padded
    quantize writes it), every tap a row shift u*Wp + v of one window, rows past the grid zero,
    rows with i >= Ho or j >= Wo dropped."""
    spec = g.spec
    hp, wp = g.ho + spec.kh - 1, g.wo + spec.kw - 1
    xp = np.zeros((g.n, hp, wp, lay.icgp), np.int64)
    xp[:, g.pt:g.pt + g.h, g.pl:g.pl + g.w, :spec.c] = xq
    rows = xp.reshape(g.n * hp * wp, lay.icgp)
    rows = np.concatenate([rows, np.zeros(((spec.kh - 1) * wp + spec.kw, lay.icgp), np.int64)])
    wk = _layout.pack_gemm_weights(wq, lay)[0, :spec.oc].astype(np.int64)  # [oc][kp], tap-major
    mp = g.n * hp * wp
    acc = np.zeros((mp, spec.oc), np.int64)
    for t in range(lay.taps):
        u, v = divmod(t, spec.kw)
        acc += rows[u * wp + v:u * wp + v + mp] @ wk[:, t * lay.icgp:(t + 1) * lay.icgp].T
    out = acc.reshape(g.n, hp, wp, spec.oc)[:, :g.ho, :g.wo]
    return (out & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


@settings(max_examples=60, deadline=None)
@given(layer=layer_shapes(kinds=("dense",)), seed=st.integers(0, 2**32 - 1))
def test_model_window_kernel_shifted_rows(layer, seed):
    xs, ws, kw = layer
    g = check_layer(xs, ws, **kw)
    assume(g.spec.stride == (1, 1))  # the window kernel runs stride-1 layers only (window_fits)
    rng = np.random.default_rng(seed)
    xq = rng.integers(-127, 128, size=xs).astype(np.int8)
    wq = rng.integers(-127, 128, size=ws).astype(np.int8)
    lay = _layout.gemm_layout(Precision.INT8, g.spec, chan_bytes=32)
    assert lay.icgp % 32 == 0 and _tiling.window_fits(g.spec, lay, g.wo, 227 * 1024)
    assert np.array_equal(_emulate_window(xq, wq, g, lay), conv2d_int_wrapped(xq, wq, g)[0])


def _grid_walk(pixels: int, icgp: int, v: int, threads: int) -> list[tuple[int, int]]:
    """quant.cu's quantize_grid walk: thread t starts at item t of the pixels * icgp / v (pixel,
    channel) items and steps by `threads` items, the step's quotient and remainder by icgp / v
    added to pixel and channel, a channel past icgp carried into the next pixel."""
    per = icgp // v
    dpix, dc = threads // per, (threads % per) * v
    items = []
    for t in range(threads):
        pix, c = t // per, (t % per) * v
        while pix < pixels:
            items.append((pix, c))
            if c + dc >= icgp:
                c -= icgp
                pix += 1
            pix, c = pix + dpix, c + dc
    return items


@settings(max_examples=200, deadline=None)
@given(pixels=st.integers(1, 400), chunks=st.integers(1, 8), v=st.sampled_from([1, 4, 16]),
       threads=st.integers(1, 1500))
def test_model_padded_grid_quantize_visits_every_item_once(pixels, chunks, v, threads):
    icgp = 32 * chunks   # the window kernels' channel padding
    walk = _grid_walk(pixels, icgp, v, threads)
    assert sorted(walk) == [(p, c) for p in range(pixels) for c in range(0, icgp, v)]


def _emulate_quantize_grid(xq: np.ndarray, hp: int, wp: int, pt: int, pl: int, icgp: int, v: int,
                           threads: int) -> np.ndarray:
    """quant.cu's quantize_grid on already-quantized values xq (N, H, W, C): each walked item
    (grid pixel, channel) maps to image, row and column as the kernel's integer steps do, and
    takes V values from x or zeros."""
    n, h, w, c = xq.shape
    out = np.full(n * hp * wp * icgp, 99, np.int64)   # 99: never written
    flat = xq.reshape(-1)
    for pix, ch in _grid_walk(n * hp * wp, icgp, v, threads):
        img, r = divmod(pix, hp * wp)
        i = r // wp
        hh, ww = i - pt, r - i * wp - pl
        inside = ch < c and 0 <= hh < h and 0 <= ww < w
        src = ((img * h + hh) * w + ww) * c + ch
        out[pix * icgp + ch:pix * icgp + ch + v] = flat[src:src + v] if inside else 0
    return out.reshape(n, hp, wp, icgp)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 2), h=st.integers(1, 6), w=st.integers(1, 6), c=st.sampled_from([3, 4, 16, 20, 32]),
       pads=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)),
       chunk=st.sampled_from([16, 32]), threads=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_model_quantize_grid_layout(n, h, w, c, pads, chunk, threads, seed):
    """The window kernels' padded grid (a border of pads) and the unpadded one that one group's
    channel-padded input uses (pads 0; INT8 channels padded to 16 there, to 32 for the window
    kernels): every value where the kernels read it, zero elsewhere, for each item width the host
    picks from C."""
    pt, pb, pl, pr = pads
    icgp = -(-c // chunk) * chunk
    v = 16 if c % 16 == 0 else 4 if c % 4 == 0 else 1
    xq = np.random.default_rng(seed).integers(-127, 128, (n, h, w, c))
    want = np.zeros((n, h + pt + pb, w + pl + pr, icgp), np.int64)
    want[:, pt:pt + h, pl:pl + w, :c] = xq
    got = _emulate_quantize_grid(xq, h + pt + pb, w + pl + pr, pt, pl, icgp, v, threads)
    assert np.array_equal(got, want)


def _emulate_tf32x3(x: np.ndarray, w: np.ndarray, products: int = 3) -> np.ndarray:
    """conv_f32_tf32x3.cu's arithmetic for one output per row of x (terms along axis 1): w split on
    the host (_layout.tf32_split), x as MmaTF32x3::a_frag splits it (big truncated, small the exact
    rest rounded to nearest); the small products then the big one (products=2 drops xs*wb, a wrong
    kernel), summed into a float32 accumulator one k-step of 8 terms at a time."""
    xb = (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)
    xs = (((x - xb).view(np.uint32) + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
    wb, ws = _layout.tf32_split(w)
    pairs = [(xs, wb), (xb, ws), (xb, wb)][3 - products:]
    acc = np.zeros(x.shape[0], np.float32)
    for k0 in range(0, x.shape[1], 8):
        for a, b in pairs:  # tf32 x tf32 is exact in float64; each mma rounds its sum once
            acc = (acc.astype(np.float64) + (a[:, k0:k0 + 8].astype(np.float64) * b[k0:k0 + 8]).sum(1)).astype(np.float32)
    return acc


@settings(max_examples=80, deadline=None)
@given(k=st.integers(1, 300), seed=st.integers(0, 2**32 - 1), mag=st.sampled_from([1e-30, 1.0, 3e4, 1e30, 3.3e38]))
@example(k=1, seed=0, mag=1.0)
def test_model_tf32x3_keeps_its_stated_bound(k, seed, mag):
    """The tf32x3 arithmetic (numpy model) keeps _tiling.TF32X3_BOUND on full-mantissa operands,
    near float32's largest values too (satfinite); dropping one small product breaks it."""
    rng = np.random.default_rng(seed)
    rows = 64
    x = (rng.uniform(-1, 1, (rows, k)) * mag).astype(np.float32)
    w = rng.uniform(-1, 1, k).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    assume(np.all(np.abs(exact) < 3.4e38))
    c, per_term = _tiling.TF32X3_BOUND
    eps32 = float(np.finfo(np.float32).eps)
    bound = (c * k + per_term) * eps32 * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64))
    y = _emulate_tf32x3(x, w)
    assert np.all(np.isfinite(y)) and np.all(np.abs(y - exact) <= bound)
    if k == 1 and mag < 1e30:  # one term: the dropped product is 2^-11 of it, far past the bound
        assert np.any(np.abs(_emulate_tf32x3(x, w, products=2) - exact) > bound)


def _emulate_dw(x, w, g, vector):
    """The depthwise kernels' strip loop: TW output columns per thread, each input column once."""
    spec = g.spec
    (sh, sw), oc, mult = spec.stride, spec.oc, spec.oc // spec.groups
    v, tw = _tiling.DW_TILE if vector else (1, _tiling.DW_TILE[1])
    wt = w.reshape(spec.kh * spec.kw, oc)
    y = np.full(g.out_shape, np.nan)
    for n in range(g.n):
        for i in range(g.ho):
            for j0 in range(0, g.wo, tw):
                for o in range(0, oc, v):
                    c = o // mult if v == 1 else o
                    acc = np.zeros((tw, v))
                    for kh in range(spec.kh):
                        hi = i * sh - g.pt + kh
                        for t in range((tw - 1) * sw + spec.kw):
                            wi = j0 * sw - g.pl + t
                            if not (0 <= hi < g.h and 0 <= wi < g.w):
                                continue
                            for u in range(tw):
                                kw = t - u * sw
                                if 0 <= kw < spec.kw:
                                    acc[u] += x[n, hi, wi, c:c + v] * wt[kh * spec.kw + kw, o:o + v]
                    for u in range(min(tw, g.wo - j0)):
                        y[n, i, j0 + u, o:o + v] = acc[u]
    return y


@settings(max_examples=150, deadline=None)
@given(layer=layer_shapes(kinds=("dense", "grouped")), prec=st.sampled_from([Precision.INT8, Precision.INT16, Precision.INT32]),
       seed=st.integers(0, 2**32 - 1))
def test_model_implicit_gemm_layout(layer, prec, seed):
    xs, ws, kw = layer
    g = check_layer(xs, ws, **kw)
    rng = np.random.default_rng(seed)
    xq = rng.integers(-prec.qmax, prec.qmax + 1, size=xs, dtype=np.int64).astype(prec.int_dtype)
    wq = rng.integers(-prec.qmax, prec.qmax + 1, size=ws, dtype=np.int64).astype(prec.int_dtype)
    lay = _layout.gemm_layout(prec, g.spec)
    assert lay.cw % 4 == 0 and lay.kpw % _tiling.MMA_BKW == 0 and lay.kpw % _tiling.SIMT_BKW == 0
    assert np.array_equal(_emulate_gemm(xq, wq, g, lay), conv2d_int_wrapped(xq, wq, g)[0])


@settings(max_examples=40, deadline=None)
@given(layer=layer_shapes(kinds=("depthwise",), max_dw_c=9), vector=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_model_depthwise_strip(layer, vector, seed):
    xs, ws, kw = layer
    g = check_layer(xs, ws, **kw)
    vector = vector and ws[2] == xs[3] and xs[3] % 4 == 0
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    np.testing.assert_allclose(_emulate_dw(x, w, g, vector), conv2d_direct(x, w, g), rtol=1e-12, atol=1e-12)


def test_pack_dw_weights_is_taps_by_channels():
    w = np.arange(3 * 3 * 6, dtype=np.float32).reshape(3, 3, 6, 1)
    p = _layout.pack_dw_weights(w)
    assert p.shape == (9, 6) and p.dtype == np.float32 and p[4, 5] == w[1, 1, 5, 0]
    assert _layout.pack_dw_weights(w.astype(np.int8)).dtype == np.int32


@pytest.mark.parametrize("precision", ["int16", "int32"])
@pytest.mark.parametrize("seed", range(4))
def test_model_byte_plane_decomposition(precision, seed):
    """What conv_planes_mma.cu computes, in numpy: byte planes (top signed, the rest unsigned), one
    int32 accumulator per shift class s = i + j < 4 summing the byte products with wrap-around,
    combined as sum acc_s << 8s modulo 2^32: equal to the contract's wrapped dot product, for full
    range operands of every sign (forced wrap-around) and the extremes."""
    prec = Precision(precision)
    planes = _tiling.PLANES[prec]
    rng = np.random.default_rng(seed)
    k = 700
    qmax = prec.qmax
    for xq, wq in ((rng.integers(-qmax, qmax + 1, (5, k)), rng.integers(-qmax, qmax + 1, (3, k))),
                   (np.full((2, k), -qmax), np.full((2, k), -qmax)),         # all -Qmax: wraps
                   (np.full((2, k), qmax), np.full((2, k), -qmax)),
                   (-rng.integers(0, qmax + 1, (2, k)), rng.integers(0, qmax + 1, (2, k))),
                   (rng.choice([-1, 0, 1, -256, 255, 256, -qmax, qmax], (4, k)),
                    rng.choice([-1, 0, 1, -256, 255, 256, -qmax, qmax], (4, k)))):
        xp = _layout.split_planes(xq, planes).astype(np.int64)
        wp = _layout.split_planes(wq, planes).astype(np.int64)
        # unsigned view for every plane but the top one (what .u8 reads)
        xp[:-1] &= 0xFF
        wp[:-1] &= 0xFF
        assert np.array_equal(sum(xp[b] << (8 * b) for b in range(planes)), xq)  # exact identity
        out = np.zeros((xq.shape[0], wq.shape[0]), np.uint64)
        for s in range(min(4, 2 * planes - 1)):
            acc = sum(xp[i] @ wp[s - i].T for i in range(planes) if 0 <= s - i < planes)
            acc = (acc & 0xFFFFFFFF).astype(np.uint64)     # the mma's s32 accumulator, wrapped
            out = (out + (acc << np.uint64(8 * s))) & np.uint64(0xFFFFFFFF)
        want = (xq.astype(np.int64) @ wq.astype(np.int64).T) & 0xFFFFFFFF      # contract: modulo 2^32
        assert np.array_equal(out.astype(np.int64), want)


def test_plane_weights_pack_like_int8_planes():
    rng = np.random.default_rng(2)
    from qconv.contract import conv_spec
    for prec in (Precision.INT16, Precision.INT32):
        wq = rng.integers(-prec.qmax, prec.qmax + 1, (3, 3, 10, 6)).astype(np.int32)
        spec = conv_spec(wq.shape, groups=2)
        lay = _layout.gemm_layout(prec, spec, planes=True)
        assert lay.planes == _tiling.PLANES[prec] and lay.elem == 1 and lay.icgp == 16
        assert lay.xpw == lay.planes * lay.groups * lay.cw
        packed = _layout.pack_plane_weights(wq, lay)
        assert packed.shape == (lay.planes, lay.groups, lay.ocgp, lay.kp) and packed.dtype == np.int8
        top = lay.planes - 1  # the signed plane; the others are read as unsigned bytes
        back = sum((packed[b].astype(np.int64) & (0xFF if b < top else -1)) << (8 * b) for b in range(lay.planes))
        assert np.array_equal(back, _layout.pack_gemm_weights(wq.astype(np.int64), lay))
