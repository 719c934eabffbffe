"""The cuda backend.

Without a GPU (CI): every kernel module compiles through NVRTC for sm_80 and sm_90 and holds every
kernel entry point (a compile failure fails; only a missing cuda-python/NVRTC skips, with the
reason), the ctypes parameter structs match the C structs field for field, numpy models of the
kernels' index math (implicit GEMM over the packed layouts, the depthwise strip loop) reproduce the
contract for random strides, paddings and groups, tile and option rules, and the backend reports
itself unavailable cleanly.

With a GPU: a hypothesis differential suite against the reference backend through qconv.prepare /
qconv.conv2d for strides 1-3, every padding form, groups {1, 2, C}, bias, per-tensor and
per-channel scales, every precision and path (INT8 mma/dp4a, INT16/INT32 simt and the tensor-core
byte-plane decomposition "mma"), both roundings (integers bit for bit, FP32
within contract.fp32_error_bound); tile-boundary shapes derived from each kernel's tile; every tile
and split-K; prepared == one-shot; device arrays with maxabs == host bit for bit (and s_x ==
contract.maxabs_scale); non-finite inputs; streams; threads; 10,000 prepared calls without
device-memory growth.

GPU run: QCONV_HYPOTHESIS_PROFILE=gpu PYTHONPATH=src python3 -m pytest tests/test_cuda.py
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, reject, settings, strategies as st

import qconv
from qconv.backends import BackendUnavailable
from qconv.backends import cuda as cb
from qconv.backends.cuda import _launch, _tiling
from qconv.contract import (Plan, Precision, check_layer, conv2d_direct, conv2d_float64, conv2d_int_wrapped,
                            fp32_error_bound, maxabs_scale)
from qconv.errors import BackendError, InputError
from qconv.scales import maxabs_q
from qconv.tensorfile import load as load_tensor

from conftest import EXAM, REAL, exam_cases, real_layers

AVAILABLE, REASON = cb.is_available()
gpu = pytest.mark.skipif(not AVAILABLE, reason=f"cuda backend unavailable: {REASON}")
ARCHS = ("sm_80", "sm_90")
PATHS = [("fp32", None), ("int32", "simt"), ("int32", "mma"), ("int16", "simt"), ("int16", "mma"), ("int8", "mma"),
         ("int8", "dp4a")]
PLANE_PATHS = [("int16", "mma"), ("int32", "mma")]


def _path_opts(precision, path):
    """The backend option that selects `path` for `precision` (int8_path / int16_path / int32_path)."""
    return {f"{precision}_path": path} if path and precision != "fp32" else {}
KERNEL_DIR = Path(cb.__file__).resolve().parent.parent / "cuda_kernels"


def _nvrtc_or_skip():
    """The NVRTC module, or a skip when cuda-python or the NVRTC library is missing here. Only
    loading NVRTC may skip: a kernel that fails to compile fails its test."""
    try:
        from cuda.bindings import nvrtc  # noqa: F401
    except ImportError as e:
        pytest.skip(f"cuda-python is not installed here: {e}")
    from qconv.backends import _nvrtc
    try:
        _nvrtc.version()
    except (BackendError, OSError, RuntimeError) as e:
        pytest.skip(f"NVRTC cannot be loaded here: {e}")
    return _nvrtc


# =========================================================================== no GPU needed

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", sorted(cb.kernel_names()))
def test_every_kernel_compiles(module, arch, tmp_path, monkeypatch):
    nv = _nvrtc_or_skip()
    assert module in nv.modules()
    monkeypatch.setenv("QCONV_CACHE_DIR", str(tmp_path))
    cubin = nv.compile_module(module, arch, use_disk=False)
    assert cubin[:4] == b"\x7fELF"
    for name in cb.kernel_names()[module]:
        assert name.encode() + b"\0" in cubin, f"{name} missing from {module} ({arch})"


def test_every_module_is_listed():
    nv = _nvrtc_or_skip()
    assert sorted(nv.modules()) == sorted(cb.kernel_names())


def test_disk_cache_second_start_compiles_nothing(tmp_path, monkeypatch):
    nv = _nvrtc_or_skip()
    monkeypatch.setenv("QCONV_CACHE_DIR", str(tmp_path))
    nv._memory.clear()
    a = nv.compile_module("quant.cu", "sm_90")
    files = list(tmp_path.glob("quant-sm_90-*.cubin"))
    assert len(files) == 1 and files[0].read_bytes() == a
    nv._memory.clear()  # a fresh process: only the disk cache remains
    calls = []
    monkeypatch.setattr(nv, "compile_source", lambda *a, **k: calls.append(a) or b"")
    assert nv.compile_module("quant.cu", "sm_90") == a and not calls
    assert nv.cache_key("quant.cu", "sm_80") != nv.cache_key("quant.cu", "sm_90")
    assert nv.cache_key("quant.cu", "sm_90", ("-G",)) != nv.cache_key("quant.cu", "sm_90")


def test_compile_error_is_a_backend_error_with_the_log():
    nv = _nvrtc_or_skip()
    with pytest.raises(BackendError, match="NVRTC log") as e:
        nv.compile_source('extern "C" __global__ void k() { undeclared_thing = 1; }', {}, "bad.cu", "sm_90")
    assert "undeclared_thing" in str(e.value)


def _c_structs() -> dict[str, list[tuple[str, str]]]:
    """Every `struct Name { ... };` in the kernel sources: [(field, C type)] in order."""
    out: dict[str, list[tuple[str, str]]] = {}
    for f in sorted(KERNEL_DIR.glob("*.cu")):
        text = re.sub(r"//[^\n]*", "", f.read_text())
        for name, body in re.findall(r"struct\s+(\w+)\s*\{([^{}]*)\};", text):
            fields = []
            for decl in body.split(";"):
                decl = " ".join(decl.split())
                if not decl:
                    continue
                m = re.match(r"^(.*?[\s*])(\w+(?:\s*,\s*\w+)*)$", decl)
                assert m, f"cannot parse {decl!r} in {f.name}"
                ctype = m.group(1).strip()
                ctype = "pointer" if "*" in ctype else ctype.replace("const ", "")
                fields += [(n.strip(), ctype) for n in m.group(2).split(",")]
            out[name] = fields
    return out


def test_param_structs_match_the_sources():
    """Every kernel takes one struct; its ctypes mirror has the same fields, types and order."""
    import ctypes
    c = _c_structs()
    for name, mirror in _launch.STRUCTS.items():
        assert name in c, f"struct {name} not found in cuda_kernels/"
        want = [(f, ctypes.c_uint64 if t == "pointer" else _launch.C_TYPES[t]) for f, t in c[name]]
        assert [(f, t) for f, t in mirror._fields_] == want, name
    # and every kernel entry point takes exactly one of them (or the gate's one pointer)
    for f in KERNEL_DIR.glob("*.cu"):
        for seg in re.findall(r"__global__([^{]*)\{", f.read_text()):
            args = seg[seg.rindex("(") + 1:seg.rindex(")")].strip()
            assert args in {f"const {s} p" for s in _launch.STRUCTS} | {"const volatile int* flag"}, (f.name, seg)


def test_availability_is_a_reason_never_an_exception():
    ok, reason = cb.is_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    assert qconv.available_backends()["cuda"] == (ok, reason)
    if not ok:
        assert "pip install qconv[cuda]" in reason or "GPU" in reason
        with pytest.raises(BackendUnavailable, match="cuda"):
            qconv.backends.get("cuda")
        x = np.ones((1, 3, 3, 2), np.float32)
        w = np.ones((3, 3, 2, 2), np.float32)
        assert qconv.conv2d(x, w, "int8", scale=1.0).shape == (1, 3, 3, 2)  # auto falls back


def test_unknown_and_bad_options_are_refused_before_any_gpu_work():
    from qconv.backends.cuda._prepared import parse_options
    x = np.ones((1, 3, 3, 2), np.float32)
    w = np.ones((3, 3, 2, 2), np.float32)
    with pytest.raises(InputError, match="bogus"):
        cb.run(Plan(Precision.FP32, options={"bogus": 1}), x, w)
    for bad, what in (({"int8_path": "wmma"}, "int8_path"), ({"tile": "8x8"}, "tile"), ({"split_k": 0}, "split_k"),
                      ({"fuse_dequantize": 1}, "fuse_dequantize"), ({"timing": "no"}, "timing"),
                      ({"stream": "s"}, "stream"), ({"int16_path": "wmma"}, "int16_path"),
                      ({"int32_path": "dp4a"}, "int32_path")):
        with pytest.raises(InputError, match=what):
            parse_options(bad)
    assert parse_options({"stream": 0}).stream == 0
    assert parse_options({}).int16_path == "auto" and parse_options({"int32_path": "mma"}).int32_path == "mma"
    # a tile the decomposed kernels do not have is refused (128x128 is INT8-only)
    with pytest.raises(InputError, match="tile"):
        cb.choose_tiling(10, 10, 40, 132, tile="128x128", mma=True, tiles=cb.PLANE_TILES[Precision.INT16])


def test_int_paths_resolve_and_are_listed_as_variants():
    for prec in (Precision.INT16, Precision.INT32):
        assert _tiling.resolve_int_path(prec, "auto") == cb.INT_AUTO[prec] in ("simt", "mma")
        assert _tiling.resolve_int_path(prec, "mma") == "mma"
        mod, prefix = _tiling.conv_kernel(prec, "mma", "mma")
        assert mod == "conv_planes_mma.cu" and all(f"{prefix}_{t}" in cb.kernel_names()[mod] for t in cb.PLANE_TILES[prec])
        assert _tiling.conv_kernel(prec, "mma", "simt")[1].endswith("_simt")
    assert _tiling.resolve_int_path(Precision.INT8, "mma") == "simt"  # int8 has its own int8_path
    v = cb.variants()
    assert v[0] == {} and {"int16_path", "int32_path"} <= {k for o in v for k in o}
    for o in v[1:]:
        (k, p), = o.items()
        assert p != cb.INT_AUTO[Precision(k.split("_")[0])]  # the path auto does not take


def test_choose_tiling_fills_the_gpu():
    # big: largest tile with at least one block per SM, no split
    assert cb.choose_tiling(100352, 64, 36, 132) == ((128, 64), 1)
    assert cb.choose_tiling(25088, 128, 36, 132, mma=True) == ((128, 128), 1)
    assert cb.choose_tiling(100352, 64, 36, 132, mma=True) == ((128, 64), 1)
    assert cb.choose_tiling(25088, 128, 72, 132) == ((128, 64), 1)
    # small, CUDA cores: 64x64 and K split toward three blocks per SM (at most 8, >= 2 K tiles each)
    assert cb.choose_tiling(3136, 64, 10, 132) == ((64, 64), 5)
    assert cb.choose_tiling(784, 128, 72, 132) == ((64, 64), 8)
    # small, tensor cores: the smallest tile, no split
    assert cb.choose_tiling(784, 128, 9, 132, mma=True) == ((32, 32), 1)
    assert cb.choose_tiling(10, 10, 1, 132)[1] == 1
    assert cb.choose_tiling(10, 10, 40, 132, tile="64x64", split_k=3) == ((64, 64), 3)
    # groups multiply the blocks: 32 groups of a small layer fill the GPU without a split
    assert cb.choose_tiling(3136, 64, 10, 132, groups=32) == ((128, 64), 1)
    for bad in ({"tile": "7x7"}, {"tile": "96x128"}, {"split_k": 0}):
        with pytest.raises(InputError):
            cb.choose_tiling(10, 10, 40, 132, **bad)


def test_fp32_outer_tiles_are_consistent():
    names = cb.kernel_names()["conv_f32_outer.cu"]
    for t in cb.OUTER_TILES:
        (bm, bn), (tm, tn) = (tuple(int(v) for v in part.split("x")) for part in t.split("/")[:2])
        assert f"{bm}x{bn}" in cb.TILES and cb._outer_name(t) in names
        assert cb._outer_threads(t) == bm * bn // (tm * tn) and cb._outer_threads(t) % 32 == 0
    assert all(v is None or v in cb.OUTER_TILES for v in cb.F32_AUTO.values())


# ---- numpy models of the kernels' index math (what the CUDA code computes, line for line)

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
    ww = np.ascontiguousarray(_tiling.pack_gemm_weights(wq, lay)).view(np.uint32).reshape(
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


@st.composite
def layers(draw, max_hw=9, max_icg=6, max_ocg=5, groups=(1, 2, 3), depthwise=False):
    """(x_shape, w_shape, stride, padding, groups): strides 1-3, 'same', 'valid', int, pair and
    asymmetric ((t, b), (l, r)) paddings, the padding smaller than the kernel."""
    g = draw(st.sampled_from(groups))
    icg = 1 if depthwise else draw(st.integers(1, max_icg))
    c = draw(st.integers(1, 9)) if depthwise else icg * g
    if depthwise:
        g = c
    ocg = draw(st.integers(1, 2)) if depthwise else draw(st.integers(1, max_ocg))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    pad = draw(st.sampled_from(["same", "valid", "int", "pair", "asym"]))
    m = min(kh, kw)
    padding = {"same": "same", "valid": "valid", "int": draw(st.integers(0, m - 1)),
               "pair": (draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1))),
               "asym": ((draw(st.integers(0, kh - 1)), draw(st.integers(0, kh - 1))),
                        (draw(st.integers(0, kw - 1)), draw(st.integers(0, kw - 1))))}[pad]
    xs = (draw(st.integers(1, 2)), draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw)), c)
    return xs, (kh, kw, ocg * g, icg), stride, padding, g


def _geom(xs, ws, stride, padding, groups):
    try:
        return check_layer(xs, ws, stride=stride, padding=padding, groups=groups)
    except InputError:
        reject()


@settings(max_examples=150, deadline=None)
@given(layer=layers(), prec=st.sampled_from([Precision.INT8, Precision.INT16, Precision.INT32]),
       seed=st.integers(0, 2**32 - 1))
def test_model_implicit_gemm_layout(layer, prec, seed):
    xs, ws, stride, padding, groups = layer
    g = _geom(xs, ws, stride, padding, groups)
    if _tiling.is_depthwise(g.spec):
        return
    rng = np.random.default_rng(seed)
    xq = rng.integers(-prec.qmax, prec.qmax + 1, size=xs, dtype=np.int64).astype(prec.int_dtype)
    wq = rng.integers(-prec.qmax, prec.qmax + 1, size=ws, dtype=np.int64).astype(prec.int_dtype)
    lay = _tiling.gemm_layout(prec, g.spec)
    assert lay.cw % 4 == 0 and lay.kpw % _tiling.MMA_BKW == 0 and lay.kpw % _tiling.SIMT_BKW == 0
    assert np.array_equal(_emulate_gemm(xq, wq, g, lay), conv2d_int_wrapped(xq, wq, g)[0])


@settings(max_examples=40, deadline=None)
@given(layer=layers(depthwise=True), vector=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_model_depthwise_strip(layer, vector, seed):
    xs, ws, stride, padding, groups = layer
    g = _geom(xs, ws, stride, padding, groups)
    vector = vector and ws[2] == xs[3] and xs[3] % 4 == 0
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    np.testing.assert_allclose(_emulate_dw(x, w, g, vector), conv2d_direct(x, w, g), rtol=1e-12, atol=1e-12)


def test_pack_dw_weights_is_taps_by_channels():
    w = np.arange(3 * 3 * 6, dtype=np.float32).reshape(3, 3, 6, 1)
    p = _tiling.pack_dw_weights(w)
    assert p.shape == (9, 6) and p.dtype == np.float32 and p[4, 5] == w[1, 1, 5, 0]
    assert _tiling.pack_dw_weights(w.astype(np.int8)).dtype == np.int32


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
        xp = _tiling.split_planes(xq, planes).astype(np.int64)
        wp = _tiling.split_planes(wq, planes).astype(np.int64)
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
        lay = _tiling.gemm_layout(prec, spec, planes=True)
        assert lay.planes == _tiling.PLANES[prec] and lay.elem == 1 and lay.icgp == 16
        assert lay.xpw == lay.planes * lay.groups * lay.cw
        packed = _tiling.pack_plane_weights(wq, lay)
        assert packed.shape == (lay.planes, lay.groups, lay.ocgp, lay.kp) and packed.dtype == np.int8
        top = lay.planes - 1  # the signed plane; the others are read as unsigned bytes
        back = sum((packed[b].astype(np.int64) & (0xFF if b < top else -1)) << (8 * b) for b in range(lay.planes))
        assert np.array_equal(back, _tiling.pack_gemm_weights(wq.astype(np.int64), lay))


# =========================================================================== GPU: differential

def _reference(x, w, prec, **kw):
    return qconv.conv2d(x, w, prec, backend="reference", **kw)


def _assert_matches(x, w, prec, y, ref=None, **layer):
    """Integers: the reference's bits. FP32: within contract.fp32_error_bound of float64."""
    g = check_layer(x.shape, w.shape, stride=layer.get("stride", 1), padding=layer.get("padding", "same"),
                    groups=layer.get("groups", 1))
    y = np.asarray(y)
    assert y.dtype == np.float32 and y.shape == g.out_shape
    if prec == "fp32":
        bias = layer.get("bias")
        y64 = conv2d_float64(x, w, g) + (0 if bias is None else np.asarray(bias, np.float64))
        err = np.abs(y.astype(np.float64) - y64)
        bound = fp32_error_bound(x, w, geom=g, bias=bias)
        assert np.all(err <= bound), f"max excess {np.max(err - bound)}"
    else:
        bad = np.flatnonzero(y.view(np.uint32) != ref.view(np.uint32))
        assert bad.size == 0, f"{bad.size} outputs differ, first at {np.unravel_index(bad[0], y.shape)}: " \
                              f"{y.flat[bad[0]]!r} vs {ref.flat[bad[0]]!r}"


def _run_both(x, w, prec, path=None, *, scale=None, rounding="nearest", opts=None, device=False, **layer):
    opts = {**_path_opts(prec, path), **(opts or {})}
    q = {} if prec == "fp32" else {"scale": scale, "rounding": rounding}
    xin = cb.to_device(x) if device else x
    y = qconv.conv2d(xin, w, prec, backend="cuda", **layer, **q, **opts)
    ref = None if prec == "fp32" else _reference(x, w, prec, **layer, **q)
    _assert_matches(x, w, prec, y, ref, **layer)
    return y


@st.composite
def scales_for(draw, oc):
    """maxabs, maxabs-per-channel, a number, or a pair with per-channel kernel scales."""
    num = st.sampled_from([1.0, 3.0, 127.0, 2.0**15, 2.0**20, 1e9])
    kind = draw(st.sampled_from(["maxabs", "per-channel", "number", "pair-vector"]))
    if kind == "maxabs":
        return draw(st.sampled_from([None, "maxabs"]))
    if kind == "per-channel":
        return "maxabs-per-channel"
    if kind == "number":
        return draw(num)
    return (draw(num), [draw(st.sampled_from([0.5, 3.0, 100.0, 4096.0])) for _ in range(oc)])


@gpu
@pytest.mark.parametrize("precision,path", PATHS)
@given(data=st.data())
@example(data=None)
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_differential_general(precision, path, data):
    if data is None:  # pinned: asymmetric padding, stride (2, 3), two groups, bias, odd channels
        rng = np.random.default_rng(1)
        xs, ws, stride, padding, groups = (2, 9, 11, 6), (3, 4, 10, 3), (2, 3), ((2, 0), (1, 3)), 2
        x = (rng.standard_normal(xs) * 40).astype(np.float32)
        w = (rng.standard_normal(ws) * 0.25).astype(np.float32)
        bias, scale, rounding, device = rng.standard_normal(10).astype(np.float32), "maxabs-per-channel", "nearest", False
    else:
        xs, ws, stride, padding, groups = data.draw(layers(max_hw=12, groups=(1, 2)))
        if data.draw(st.booleans(), label="depthwise"):
            xs, ws, stride, padding, groups = data.draw(layers(max_hw=12, depthwise=True))
        _geom(xs, ws, stride, padding, groups)
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
        mag = data.draw(st.sampled_from([1e-3, 1.0, 40.0, 1e4]), label="magnitude")
        x = (rng.standard_normal(xs) * mag).astype(np.float32)
        w = (rng.standard_normal(ws) * 0.3).astype(np.float32)
        bias = (rng.standard_normal(ws[2]) * mag).astype(np.float32) if data.draw(st.booleans(), label="bias") else None
        scale = data.draw(scales_for(ws[2]), label="scale")
        rounding = data.draw(st.sampled_from(["nearest", "truncate"]), label="rounding")
        device = data.draw(st.booleans(), label="device")
    _run_both(x, w, precision, path, scale=scale, rounding=rounding, device=device,
              stride=stride, padding=padding, groups=groups, bias=bias)


def _boundary_shapes(bm, bn):
    """(x_shape, w_shape, stride) with M = N*Ho*Wo and OC below, at, above and a multiple of the tile."""
    out = []
    for m in (bm - 1, bm, bm + 1, 2 * bm):
        for oc in (bn - 1, bn + 1, 2 * bn):
            out.append(((1, 2, m, 20), (3, 3, oc, 20), (2, 1)))   # stride (2, 1), 'same': Ho = 1, Wo = m
    return out


def _tiles(precision, path):
    return _tiling.tiles_for(Precision(precision), path or "mma", path or "simt")


@gpu
@pytest.mark.parametrize("precision,path", PATHS)
@pytest.mark.parametrize("tile", sorted(set(_tiling.MMA_TILES)))
def test_tile_boundaries(precision, path, tile):
    if tile not in _tiles(precision, path):
        pytest.skip(f"{tile} is not a tile of {precision}/{path}")
    bm, bn = (int(v) for v in tile.split("x"))
    rng = np.random.default_rng(7)
    for xs, ws, stride in _boundary_shapes(bm, bn):
        x = (rng.standard_normal(xs) * 3).astype(np.float32)
        w = (rng.standard_normal(ws) * 0.3).astype(np.float32)
        _run_both(x, w, precision, path, scale="maxabs", opts={"tile": tile}, stride=stride)
    # K around the pipeline stage: taps * channel words just below, at and above 16/32 words
    bkw = _tiling.MMA_BKW if path == "mma" else _tiling.SIMT_BKW
    elem = 1 if path == "mma" else _tiling.ELEM[Precision(precision)]  # byte planes: 1 byte per plane
    for words in (bkw - 4, bkw, bkw + 4):
        c = words * 4 // elem
        x = (rng.standard_normal((1, 5, 7, c)) * 3).astype(np.float32)
        w = (rng.standard_normal((1, 1, bn + 1, c)) * 0.3).astype(np.float32)
        _run_both(x, w, precision, path, scale="maxabs", opts={"tile": tile})


@gpu
@pytest.mark.parametrize("precision", ["fp32", "int8", "int16", "int32"])
def test_depthwise_tile_boundaries(precision):
    """Channels around DW_TILE's vector width, output columns around its strip, both kernels."""
    cvec, tw = _tiling.DW_TILE
    rng = np.random.default_rng(9)
    for c in (cvec - 1, cvec, cvec + 1, 2 * cvec):
        for wo in (tw - 1, tw, tw + 1, 2 * tw + 1):
            for mult in (1, 2):
                x = (rng.standard_normal((2, 3, wo, c)) * 3).astype(np.float32)
                w = (rng.standard_normal((3, 3, c * mult, 1)) * 0.3).astype(np.float32)
                b = rng.standard_normal(c * mult).astype(np.float32)
                _run_both(x, w, precision, scale="maxabs-per-channel", groups=c, bias=b)
    # an unaligned device input takes the scalar kernel
    x = (rng.standard_normal((1, 4, 9, 8)) * 3).astype(np.float32)
    w = (rng.standard_normal((3, 3, 8, 1)) * 0.3).astype(np.float32)
    big = cb.to_device(np.concatenate([np.zeros(1, np.float32), x.reshape(-1)]))
    shifted = _Shifted(big, 4, x.shape)
    q = {} if precision == "fp32" else {"scale": "maxabs"}
    y = qconv.conv2d(shifted, w, precision, backend="cuda", groups=8, **q)
    ref = None if precision == "fp32" else _reference(x, w, precision, groups=8, **q)
    _assert_matches(x, w, precision, y, ref, groups=8)


class _Shifted:
    """A device view that starts `offset` bytes into another device array (unaligned on purpose)."""

    def __init__(self, base, offset, shape):
        self._base, self.shape, self.dtype = base, shape, np.dtype(np.float32)
        self._cai = {"shape": shape, "typestr": "<f4", "version": 3, "strides": None,
                     "data": (base.ptr + offset, False)}

    @property  # on the type: api.is_device_array asks the type, never an instance's attributes
    def __cuda_array_interface__(self):
        return self._cai


@gpu
@pytest.mark.parametrize("precision,path", PATHS)
@pytest.mark.parametrize("tile", _tiling.MMA_TILES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_every_tile_and_split(precision, path, tile, split_k):
    if tile not in _tiles(precision, path):
        pytest.skip(f"{tile} is not a tile of {precision}/{path}")
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((2, 9, 13, 24)) * 3).astype(np.float32)
    w = (rng.standard_normal((3, 3, 70, 12)) * 0.3).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    for fuse in (True, False):
        _run_both(x, w, precision, path, scale=200.0, opts={"tile": tile, "split_k": split_k, "fuse_dequantize": fuse},
                  stride=2, padding=((1, 0), (2, 1)), groups=2, bias=b)


@gpu
@pytest.mark.parametrize("tile", cb.OUTER_TILES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_fp32_outer_every_tile_and_split(tile, split_k):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((2, 9, 13, 24)) * 3).astype(np.float32)
    w = (rng.standard_normal((3, 3, 70, 24)) * 0.3).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    _run_both(x, w, "fp32", opts={"tile": tile, "split_k": split_k})
    _run_both(x[:, :, :, :12].copy(), w[..., :6].copy(), "fp32", opts={"tile": tile, "split_k": split_k},
              stride=(1, 2), padding="valid", groups=2, bias=b)
    bm, bn = (int(v) for v in tile.split("/")[0].split("x"))
    for xs, ws, stride in _boundary_shapes(bm, bn)[::3]:
        x = (rng.standard_normal(xs) * 3).astype(np.float32)
        w = (rng.standard_normal(ws) * 0.3).astype(np.float32)
        _run_both(x, w, "fp32", opts={"tile": tile, "split_k": split_k}, stride=stride)


@gpu
def test_fp32_kernel_choice():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 16, 16, 32)).astype(np.float32)
    w = rng.standard_normal((3, 3, 64, 32)).astype(np.float32)
    k = lambda **o: cb.profile(Plan(Precision.FP32, options=o), x, w, reps=1)["kernel"]  # noqa: E731
    (bm, bn), _ = cb.choose_tiling(4 * 16 * 16, 64, 288 // 16, cb._runtime().num_sms)
    auto = cb.F32_AUTO.get((bm, bn))
    assert k() == (cb._outer_name(auto) if auto else f"qconv_f32_conv_simt_{bm}x{bn}")
    assert k(tile="64x64") == "qconv_f32_conv_simt_64x64"
    assert k(tile="64x64/4x4") == "qconv_f32_conv_outer_64x64_4x4"


@gpu
@pytest.mark.parametrize("precision,path", [p for p in PATHS if p[0] != "fp32"])
def test_overflow_wraps_like_the_reference(precision, path):
    # full-range operands with K = 9 * 64: int32/int16 accumulators wrap; the bits must still agree
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (1, 10, 10, 64)).astype(np.float32)
    w = rng.uniform(-1, 1, (3, 3, 16, 64)).astype(np.float32)
    qmax = Precision(precision).qmax
    _run_both(x, w, precision, path, scale=float(qmax))
    _run_both(x, w[..., :16].copy(), precision, path, scale=float(qmax), stride=2, groups=4)
    wd = rng.uniform(-1, 1, (5, 5, 64, 1)).astype(np.float32)
    _run_both(x, wd, precision, path, scale=float(qmax), groups=64)            # depthwise wraps too
    _run_both(x * 1e30, w, precision, path, scale=1e9)                         # saturation past int32


@gpu
@pytest.mark.parametrize("precision", ["int16", "int32"])
@pytest.mark.parametrize("channels", [48, 20])  # 48: the vector byte-plane quantize; 20: padded channels
def test_planes_every_sign_and_wrap(precision, channels):
    """The tensor-core decomposition against the reference and the CUDA-core kernel, bit for bit:
    every operand sign combination (positive, negative, mixed), operands all at -Qmax or +Qmax
    (every accumulator wraps, K = 9 * channels), forced wrap-around and saturation by huge scales."""
    qmax = float(Precision(precision).qmax)
    rng = np.random.default_rng(17)
    xs, ws = (2, 7, 9, channels), (3, 3, 33, channels)
    mag_x = rng.uniform(0.01, 1.0, xs).astype(np.float32)
    mag_w = rng.uniform(0.01, 1.0, ws).astype(np.float32)
    signs = {"pos": lambda a: a, "neg": lambda a: -a,
             "mixed": lambda a: np.where(rng.random(a.shape) < 0.5, -a, a).astype(np.float32)}
    cases = [(signs[a](mag_x), signs[b](mag_w), qmax) for a in signs for b in signs]
    ones_x, ones_w = np.ones(xs, np.float32), np.ones(ws, np.float32)
    cases += [(-ones_x, -ones_w, qmax), (-ones_x, ones_w, qmax), (ones_x, ones_w, qmax),   # all at +-Qmax
              (mag_x * 1e30, signs["mixed"](mag_w), 1e9),                                 # saturation past int32
              (signs["mixed"](mag_x), signs["mixed"](mag_w), (qmax, [qmax / (o + 1) for o in range(33)]))]
    for x, w, scale in cases:
        y = _run_both(x, w, precision, "mma", scale=scale)
        simt = qconv.conv2d(x, w, precision, backend="cuda", scale=scale, **_path_opts(precision, "simt"))
        assert np.array_equal(np.asarray(y).view(np.uint32), simt.view(np.uint32))
    assert 9 * channels * int(qmax) ** 2 > 2**32  # the all-Qmax cases wrap (several times over)
    wg = -np.ones((3, 3, 32, channels // 2), np.float32)
    _run_both(-ones_x, wg, precision, "mma", scale=qmax, stride=2, groups=2)  # groups, stride: the plane offsets


@gpu
@pytest.mark.parametrize("precision,path", PATHS)
@pytest.mark.parametrize("case", exam_cases())
@pytest.mark.parametrize("n", [1, 3])
def test_exam_cases(precision, path, case, n):
    if not EXAM.exists():
        pytest.skip(f"{EXAM} is absent")
    x = load_tensor(EXAM / case / "input_tensor.bin")
    w = load_tensor(EXAM / case / "kernel_tensor.bin")
    x = np.ascontiguousarray(np.concatenate([x] + [x[:, ::-1] for _ in range(n - 1)]) if n > 1 else x)
    _run_both(x, w, precision, path, scale="maxabs")
    if n == 1:
        _run_both(x, w, precision, path, scale="maxabs-per-channel", stride=2)


@gpu
@pytest.mark.parametrize("precision,path", PATHS)
@pytest.mark.parametrize("layer", real_layers() or ["(absent)"])
def test_real_layers(precision, path, layer):
    if layer == "(absent)":
        pytest.skip(f"{REAL} is absent")
    d = REAL / layer
    x = load_tensor(d / "input_tensor.bin")
    w = load_tensor(d / "kernel_tensor.bin")
    bias = load_tensor(d / "bias_tensor.bin").reshape(-1) if (d / "bias_tensor.bin").exists() else None
    _run_both(x, w, precision, path, scale="maxabs", bias=bias)
    if precision != "fp32":
        _run_both(x, w, precision, path, scale=2.0**10)  # an S that overflows INT32/INT16


# =========================================================================== GPU: the prepared call

@gpu
@pytest.mark.parametrize("precision,path", PATHS)
def test_prepared_equals_one_shot_and_keeps_no_state(precision, path):
    rng = np.random.default_rng(12)
    w = (rng.standard_normal((3, 3, 16, 4)) * 0.3).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    opts = _path_opts(precision, path)
    q = {} if precision == "fp32" else {"scale": "maxabs-per-channel"}
    conv = qconv.prepare(w, precision, "cuda", stride=2, groups=2, bias=b, **q, **opts)
    yd = None
    for i, mag in enumerate((1.0, 1e3, 1e-2, 7.0)):  # maxabs scales change call to call
        x = (rng.standard_normal((2, 9, 10, 8)) * mag).astype(np.float32)
        one = qconv.conv2d(x, w, precision, "cuda", stride=2, groups=2, bias=b, **q, **opts)
        y = conv(x)
        assert y.view(np.uint32).tobytes() == one.view(np.uint32).tobytes() or precision == "fp32"
        _assert_matches(x, w, precision, y, None if precision == "fp32" else
                        _reference(x, w, precision, stride=2, groups=2, bias=b, **q), stride=2, groups=2, bias=b)
        out = np.empty_like(y)
        assert conv(x, out=out) is out and np.array_equal(out.view(np.uint32), y.view(np.uint32))
        dev = conv(cb.to_device(x)) if yd is None else conv(cb.to_device(x), out=yd)
        yd = dev
        assert np.array_equal(np.asarray(dev).view(np.uint32), y.view(np.uint32))
    with pytest.raises(InputError, match="out="):
        conv(x, out=np.empty((1, 2, 3, 4), np.float32))
    with pytest.raises(InputError, match="device array"):
        conv(cb.to_device(x), out=np.empty_like(y))


@gpu
@pytest.mark.parametrize("precision", ["int8", "int16", "int32"])
@pytest.mark.parametrize("strategy", ["maxabs", "maxabs-per-channel"])
def test_device_maxabs_matches_host_bit_for_bit(precision, strategy):
    rng = np.random.default_rng(13)
    w = (rng.standard_normal((3, 3, 24, 12)) * 0.2).astype(np.float32)
    wd = (rng.standard_normal((3, 3, 12, 1)) * 0.2).astype(np.float32)
    for kernel, groups in ((w, 1), (wd, 12)):
        conv = qconv.prepare(kernel, precision, "cuda", scale=strategy, groups=groups)
        q = maxabs_q(Precision(precision), conv.spec.k)
        for mag in (1e-30, 1e-3, 1.0, 3e5):
            x = (rng.standard_normal((2, 7, 8, 12)) * mag).astype(np.float32)
            host = conv.result(x)
            dev = conv.result(cb.to_device(x))
            assert host.scale_input == dev.scale_input == float(maxabs_scale(x, q))
            assert np.array_equal(np.asarray(dev.output).view(np.uint32), host.output.view(np.uint32))
            ref = _reference(x, kernel, precision, scale=strategy, groups=groups)
            assert np.array_equal(host.output.view(np.uint32), ref.view(np.uint32))


@gpu
def test_device_maxabs_scale_is_the_contracts_everywhere():
    """s_x from the device reduction == contract.maxabs_scale for crafted maxima: ties, steps
    down, powers of two, denormal neighbours, and an all-zero input (s = 1)."""
    rng = np.random.default_rng(14)
    w = np.ones((1, 1, 4, 4), np.float32)
    for prec in ("int8", "int16"):
        conv = qconv.prepare(w, prec, "cuda", scale="maxabs")
        q = maxabs_q(Precision(prec), 4)
        ms = [0.0, 1.0, 3.0, 127.0, 0.1, 2.0**-100, 1.17549435e-38, 3.4e38, 2170.0]
        ms += list(rng.uniform(0, 1, 40).astype(np.float32)) + list((rng.standard_normal(40) * 1e4).astype(np.float32))
        for m in ms:
            x = np.zeros((1, 2, 2, 4), np.float32)
            x[0, 1, 0, 2] = m
            x[0, 0, 1, 3] = -abs(np.float32(m)) * 0.5
            try:
                want = maxabs_scale(x, q)
            except InputError:  # q / m leaves float32: the device refuses it alike
                with pytest.raises(InputError, match="too small"):
                    conv.result(cb.to_device(x))
                continue
            r = conv.result(cb.to_device(x))
            assert np.float32(r.scale_input) == want, m


@gpu
@pytest.mark.parametrize("precision", ["fp32", "int8", "int16", "int32"])
@pytest.mark.parametrize("groups", [1, 2, 8])
def test_non_finite_inputs_are_refused(precision, groups):
    rng = np.random.default_rng(15)
    w = (rng.standard_normal((3, 3, 8, 8 // groups)) * 0.3).astype(np.float32)
    for scale in ([None] if precision == "fp32" else [None, 4.0]):
        q = {} if precision == "fp32" else {"scale": scale}
        conv = qconv.prepare(w, precision, "cuda", groups=groups, **q)
        x = rng.standard_normal((1, 6, 6, 8)).astype(np.float32)
        for bad in (np.nan, np.inf, -np.inf):
            xb = x.copy()
            xb[0, 5, 5, 7] = bad
            with pytest.raises(InputError, match="non-finite"):
                conv(xb)                                  # host: raised at the end of the call
            y = conv(cb.to_device(xb))                    # device: raised when the result is read
            with pytest.raises(InputError, match="non-finite"):
                y.copy_to_host()
            with pytest.raises(InputError, match="non-finite"):
                conv.result(cb.to_device(xb))
            good = conv(x)                                # the flag does not outlive its call
            assert np.all(np.isfinite(good))
            assert np.array_equal(np.asarray(conv(cb.to_device(x))).view(np.uint32), good.view(np.uint32))


@gpu
def test_phases_are_timed_and_timing_can_be_off():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 16, 32)).astype(np.float32)
    w = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    r = qconv.conv2d_result(x, w, "int8", backend="cuda", scale=20.0, fuse_dequantize=False)
    for p in ("quantize", "transfer", "convolve", "dequantize"):
        assert r.phases[p] > 0, p
    r = qconv.conv2d_result(x, w, "fp32", backend="cuda")  # read in place: the scan is in the kernel
    assert r.phases["convolve"] > 0 and r.phases["pack"] == 0 and r.phases["transfer"] > 0
    r = qconv.conv2d_result(x[..., :30].copy(), w[..., :30].copy(), "fp32", backend="cuda")  # padded channels
    assert r.phases["convolve"] > 0 and r.phases["pack"] > 0
    r = qconv.conv2d_result(cb.to_device(x), w, "int8", backend="cuda", scale="maxabs")
    assert r.phases["transfer"] == 0 and r.phases["convolve"] > 0
    r = qconv.conv2d_result(x, w, "int8", backend="cuda", scale=20.0, timing=False)
    assert all(v == 0 for v in r.phases.values())


@gpu
def test_stream_option_orders_on_the_callers_stream():
    torch = _torch_cuda()
    rng = np.random.default_rng(16)
    x = rng.standard_normal((2, 12, 12, 16)).astype(np.float32)
    w = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    s = torch.cuda.Stream()
    conv = qconv.prepare(w, "int8", "cuda", scale="maxabs", stream=s)
    with torch.cuda.stream(s):
        xt = torch.from_numpy(x).cuda()
        y = conv(xt)
        yt = torch.as_tensor(y, device="cuda") * 1.0   # consumed on the same stream
    s.synchronize()
    ref = _reference(x, w, "int8", scale="maxabs")
    assert np.array_equal(yt.cpu().numpy().view(np.uint32), ref.view(np.uint32))


@gpu
@pytest.mark.parametrize("device", [False, True])
def test_threads_share_a_prepared_conv(device):
    rng = np.random.default_rng(17)
    w = (rng.standard_normal((3, 3, 32, 16)) * 0.3).astype(np.float32)
    conv = qconv.prepare(w, "int8", "cuda", scale="maxabs-per-channel")
    xs = [(rng.standard_normal((1, 10, 10, 16)) * 10 ** rng.uniform(-2, 3)).astype(np.float32) for _ in range(8)]
    refs = [_reference(x, w, "int8", scale="maxabs-per-channel") for x in xs]
    errors = []

    def work(i):
        try:
            for _ in range(25):
                y = conv(cb.to_device(xs[i])) if device else conv(xs[i])
                if not np.array_equal(np.asarray(y).view(np.uint32), refs[i].view(np.uint32)):
                    errors.append(i)
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


# =========================================================================== GPU: device arrays

def _torch_cuda():
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not importable")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no GPU")
    return torch


class _DLPackOnly:
    """A device array that speaks DLPack only (no __cuda_array_interface__)."""

    def __init__(self, t):
        self._t, self.shape = t, tuple(t.shape)

    def __dlpack__(self, stream=None):
        return self._t.__dlpack__()

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


@gpu
@pytest.mark.parametrize("precision,path", PATHS)
@pytest.mark.parametrize("kind", ["torch", "cai", "dlpack", "qconv"])
def test_device_arrays_stay_on_device(precision, path, kind):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 11, 9, 20)) * 2).astype(np.float32)
    w = (rng.standard_normal((3, 3, 24, 20)) * 0.5).astype(np.float32)
    if kind == "qconv":
        xt = cb.to_device(x)
    else:
        torch = _torch_cuda()
        xt = torch.from_numpy(x).cuda()
        if kind == "dlpack":
            xt = _DLPackOnly(xt)
        elif kind == "cai":
            xt = _Shifted(_CAIOf(xt), 0, x.shape)
    q = {} if precision == "fp32" else {"scale": "maxabs"}
    opts = _path_opts(precision, path)
    conv = qconv.prepare(w, precision, "cuda", **q, **opts)
    y = conv(xt)
    assert isinstance(y, cb.DeviceArray) and y.shape == (2, 11, 9, 24)
    host = conv(x)
    back = np.asarray(y)
    if precision == "fp32":  # split-K float atomics: any summation order, within the bound
        _assert_matches(x, w, "fp32", back)
    else:
        assert np.array_equal(back.view(np.uint32), host.view(np.uint32))
    if kind == "torch":
        torch = _torch_cuda()
        assert np.array_equal(torch.as_tensor(y, device="cuda").cpu().numpy(), back)


class _CAIOf:
    def __init__(self, t):
        self.t, self.ptr = t, t.data_ptr()


@gpu
def test_device_arrays_refused_when_wrong():
    torch = _torch_cuda()
    x = torch.ones((1, 4, 4, 8), device="cuda")
    w = np.ones((3, 3, 8, 8), np.float32)
    with pytest.raises(InputError, match="float32"):
        qconv.conv2d(x.double(), w, "int8", backend="cuda", scale=1.0)
    with pytest.raises(InputError, match="contiguous"):
        qconv.conv2d(x.permute(0, 2, 1, 3), w, "int8", backend="cuda", scale=1.0)
    conv = qconv.prepare(w, "int8", "cuda", scale=1.0)
    with pytest.raises(InputError, match="16-byte"):
        conv(x, out=_Shifted(cb.to_device(np.zeros(200, np.float32)), 4, (1, 4, 4, 8)))


# =========================================================================== GPU: leaks

def _free_bytes() -> int:
    from cuda.bindings import driver
    cb._runtime()
    err, free, _ = driver.cuMemGetInfo()
    assert err == driver.CUresult.CUDA_SUCCESS
    return int(free)


@gpu
def test_ten_thousand_prepared_calls_do_not_grow_device_memory():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 8, 8, 16)).astype(np.float32)
    w = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    xd = cb.to_device(x)
    convs = [qconv.prepare(w, p, "cuda", **({} if p == "fp32" else {"scale": "maxabs"}))
             for p in ("fp32", "int32", "int16", "int8")]
    for c in convs:  # warm: modules loaded, pools sized
        c(xd).synchronize()
        c(x)
    before = _free_bytes()
    for i in range(10_000):
        y = convs[i % 4](xd)
        if i % 500 == 0:
            convs[i % 4](x)
    y.synchronize()
    assert np.array_equal(np.asarray(y).view(np.uint32), _reference(x, w, "int8", scale="maxabs").view(np.uint32))
    assert before - _free_bytes() <= 4 << 20
    for _ in range(300):  # one-shot calls free their prepared kernel
        qconv.conv2d(xd, w, "int8", backend="cuda", scale=8.0)
    assert before - _free_bytes() <= 4 << 20
