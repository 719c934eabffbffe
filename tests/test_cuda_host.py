"""quant.cu's quantize passes, their own source text, compiled for the host and run block by block.

The GPU tests need an NVIDIA GPU; this one needs only a C++ compiler. It cuts quantize_x_body and
what it calls (quantize_grid, quantize4, quantize1, nonfinite4, PassParams, QStats), and
quantize_planes_body (the INT16/INT32 tensor-core path's byte planes), out of the kernel sources,
compiles them with a few lines that stand in for CUDA (blockIdx and friends as globals, __ldg as a
load, __fmul_rn as a float32 multiply the compiler may not contract), and runs every thread of a
launch one after another; the passes have no shared memory or barrier, so that is the launch's
result. The output must be the contract's quantize in the layout the convolution kernels read:
the padded grid of the window kernels, the unbordered one a channel-padded single group uses (a
C=3 stem), the dense copy, or the byte planes.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checks import cut_definition
from qconv.backends.cuda import _jobs, _layout, _tiling
from qconv.contract import Precision, Rounding, conv_spec, quantize

KERNELS = Path(__file__).resolve().parent.parent / "src" / "qconv" / "backends" / "cuda_kernels"
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")

SHIM = r"""
#include <algorithm>
#include <cmath>
#include <cstring>
struct dim3_ { unsigned x, y, z; };
static dim3_ blockIdx, blockDim, gridDim, threadIdx;
#define QD static inline
#define __align__(n) alignas(n)
struct float4 { float x, y, z, w; };
struct char4 { signed char x, y, z, w; };
struct short4 { short x, y, z, w; };
struct int4 { int x, y, z, w; };
struct uint4 { unsigned x, y, z, w; };
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
using std::min;
using std::max;
#define __global__
#define __launch_bounds__(n)
typedef signed char qs8;
typedef short qs16;
struct QSlot;
template <typename T> static inline T __ldg(const T* p) { return *p; }
static inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
static inline int atomicOr(int* a, int v) { int o = *a; *a |= v; return o; }
using std::isfinite;
"""

DRIVER = r"""
// Every thread of a (blocks x threads) launch in turn: body(p, s) is one thread's work.
template <typename Body>
static int launch(PassParams p, float s, unsigned blocks, unsigned threads, Body body) {
  QStats st = {};
  p.stats = &st;
  gridDim = {blocks, 1, 1};
  blockDim = {threads, 1, 1};
  for (unsigned b = 0; b < blocks; ++b)
    for (unsigned t = 0; t < threads; ++t) {
      blockIdx = {b, 0, 0};
      threadIdx = {t, 0, 0};
      body(p, s);
    }
  return st.flag;
}
// The planes (P = 2, 4) and FP32's padding (P = 0) over the pixels as they are (H x W, no border).
extern "C" int planes_on_host(int P, const float* x, void* out, long long n, int C, int G, int icgp, int qmax,
                              float s, int vec, int H, int W, unsigned blocks, unsigned threads) {
  PassParams p = {};
  p.x = x; p.out = out; p.n = n; p.C = C; p.G = G; p.icg = C / G; p.icgp = icgp; p.qmax = qmax; p.vec = vec;
  p.H = p.Hp = H; p.W = p.Wp = W; p.N = (int)(n / ((long long)H * W * C));
  if (P == 0) return launch(p, s, blocks, threads, [](const PassParams& q, float) { qconv_pad_x_f32(q); });
  return P == 2 ? launch(p, s, blocks, threads, quantize_planes_body<2>)
                : launch(p, s, blocks, threads, quantize_planes_body<4>);
}
extern "C" int quantize_on_host(int elem, const float* x, void* out, long long n, int C, int G, int icg, int icgp,
                                int qmax, int trunc, float s, int vec, int H, int W, int Hp, int Wp, int pt, int pl,
                                unsigned blocks, unsigned threads) {
  PassParams p = {};
  p.x = x; p.out = out; p.n = n; p.C = C; p.G = G; p.icg = icg; p.icgp = icgp; p.qmax = qmax; p.trunc = trunc;
  p.vec = vec; p.H = H; p.W = W; p.Hp = Hp; p.Wp = Wp; p.pt = pt; p.pl = pl;
  p.N = Hp ? (int)(n / ((long long)H * W * C)) : 0;
  if (elem == 1) return launch(p, s, blocks, threads, quantize_x_body<qs8>);
  if (elem == 2) return launch(p, s, blocks, threads, quantize_x_body<qs16>);
  return launch(p, s, blocks, threads, quantize_x_body<int>);
}
"""




def _source() -> str:
    common = (KERNELS / "qconv_common.cuh").read_text()
    quant = (KERNELS / "quant_scale.cuh").read_text() + (KERNELS / "quant.cu").read_text()
    macro = re.search(r"^#define QGRID_STRIDE\(i, n\)(?:.*\\\n)+.*\n", quant, re.M)
    assert macro, "QGRID_STRIDE not found in quant_scale.cuh"
    vec4 = re.search(r"^template <typename T> struct Vec4;\n(?:template <> struct Vec4<.*\n)+", quant, re.M)
    assert vec4, "Vec4 not found in quant.cu"
    parts = [
        cut_definition(common, r"^struct QStats \{"),
        cut_definition(common, r"^QD int quantize1\("),
        cut_definition(common, r"^QD int nonfinite4\("),
        cut_definition(common, r"^QD void launch_next_grid\("),
        cut_definition(quant, r"^struct PassParams \{"),
        macro.group(0),
        vec4.group(0),
        cut_definition(quant, r"^template <typename T>\nQD typename Vec4<T>::type quantize4\("),
        cut_definition(quant, r"^template <int V, class Item>\nQD void walk_padded\("),
        cut_definition(quant, r"^template <int V, bool F4, typename Q>\nQD void quantize_item\("),
        cut_definition(quant, r"^template <typename T, int V, bool F4>\nQD int quantize_grid\("),
        cut_definition(quant, r"^template <typename T>\nQD void quantize_x_body\("),
        cut_definition(quant, r"^template <int P, bool F4>\nQD int planes_grid\("),
        cut_definition(quant, r"^template <int P>\nQD void quantize_planes_body\("),
        cut_definition(quant, r"^extern \"C\" __global__ void __launch_bounds__\(256\) qconv_pad_x_f32\("),
    ]
    return SHIM + "\n".join(parts) + DRIVER


@pytest.fixture(scope="module")
def host_pass(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) to build quant.cu's pass for the host")
    d = tmp_path_factory.mktemp("quant_host")
    (d / "quant_host.cpp").write_text(_source())
    # -ffp-contract=off: the contract's multiply is never fused; -fno-strict-aliasing: the 16-byte store
    r = subprocess.run([CXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing",
                        "-o", str(d / "quant_host.so"), str(d / "quant_host.cpp")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    lib = ctypes.CDLL(str(d / "quant_host.so"))
    head = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong]  # elem or P, x, out, n
    lib.quantize_on_host.argtypes = head + [ctypes.c_int] * 6 + [ctypes.c_float] + [ctypes.c_int] * 7 + \
        [ctypes.c_uint, ctypes.c_uint]
    lib.planes_on_host.argtypes = head + [ctypes.c_int] * 4 + [ctypes.c_float] + [ctypes.c_int] * 3 + \
        [ctypes.c_uint, ctypes.c_uint]
    return lib


DTYPE = {1: np.int8, 2: np.int16, 4: np.int32}
PREC = {1: Precision.INT8, 2: Precision.INT16, 4: Precision.INT32}


def _launch(lib, x, elem, s, out_shape, *, G=1, icgp, vec, grid=None, blocks=3, threads=64, trunc=False):
    n, h, w, c = x.shape
    out = np.full(out_shape, 77, DTYPE[elem])  # not zero: every value must be written
    if grid is None and (G * icgp != c or not vec):  # as _jobs.quantize_pass: only the dense layout has none
        grid = (h, w, h, w, 0, 0)
    H, W, Hp, Wp, pt, pl = grid or (0, 0, 0, 0, 0, 0)
    flag = lib.quantize_on_host(elem, x.ctypes.data, out.ctypes.data, x.size, c, G, c // G, icgp, PREC[elem].qmax,
                                int(trunc), s, int(vec), H, W, Hp, Wp, pt, pl, blocks, threads)
    return out, flag


def _q(x, elem, s, trunc=False):
    return quantize(x, np.float32(s), PREC[elem], Rounding.TRUNCATE if trunc else Rounding.NEAREST).astype(np.int64)


@pytest.mark.parametrize("c, icgp", [(3, 16), (4, 16), (16, 16), (48, 64), (64, 64), (5, 32), (32, 32)])
@pytest.mark.parametrize("pads", [(1, 1, 1, 1), (0, 2, 3, 0), (0, 0, 0, 0)])
@pytest.mark.parametrize("elem", [1, 2, 4])
@pytest.mark.parametrize("vec", [True, False])
def test_the_padded_grid_is_the_contracts_quantize_where_the_kernels_read_it(host_pass, c, icgp, pads, elem, vec):
    """Every item the pass picks from C (16 or 4 channels read as float4, or 16 bytes read one float
    at a time) and the unaligned fallback; a border (the window kernels) or none (one group's
    padded channels); int8, int16, int32."""
    rng = np.random.default_rng(c * 7 + elem)
    n, h, w = 2, 5, 7
    x = (rng.standard_normal((n, h, w, c)) * 40).astype(np.float32)
    x.flat[::13] = 0.5  # ties: half to even
    pt, pb, pl, pr = pads
    hp, wp = h + pt + pb, w + pl + pr
    for blocks, threads in ((1, 1), (3, 64), (7, 96)):
        got, flag = _launch(host_pass, x, elem, 1.7, (n, hp, wp, icgp), icgp=icgp, vec=vec,
                            grid=(h, w, hp, wp, pt, pl), blocks=blocks, threads=threads)
        want = np.zeros((n, hp, wp, icgp), np.int64)
        want[:, pt:pt + h, pl:pl + w, :c] = _q(x, elem, 1.7)
        assert flag == 0
        assert np.array_equal(got, want), (blocks, threads)


@pytest.mark.parametrize("elem, c, icgp", [(4, 32, 36), (2, 16, 24), (4, 16, 20)])
def test_an_item_never_straddles_a_pixels_padded_channels(host_pass, elem, c, icgp):
    """icgp past icg by more than an item's worth of padding, where icg alone would pick 16-channel
    items that icgp does not divide (found by the hypothesis walk below: the items overlapped the
    next pixel's slots and read past x)."""
    x = (np.random.default_rng(7620).standard_normal((1, 5, 5, c))).astype(np.float32)
    pt, pb, pl, pr = 1, 2, 0, 2
    hp, wp = 5 + pt + pb, 5 + pl + pr
    for blocks, threads in ((1, 1), (2, 33)):
        got, flag = _launch(host_pass, x, elem, 1.7, (1, hp, wp, icgp), icgp=icgp, vec=True,
                            grid=(5, 5, hp, wp, pt, pl), blocks=blocks, threads=threads)
        want = np.zeros((1, hp, wp, icgp), np.int64)
        want[:, pt:pt + 5, pl:pl + 5, :c] = _q(x, elem, 1.7)
        assert flag == 0 and np.array_equal(got, want), (blocks, threads)


@pytest.mark.parametrize("trunc", [False, True])
def test_the_dense_and_grouped_layouts_and_saturation(host_pass, trunc):
    """No grid: the dense float4 path, and groups whose channels are padded (one value per item)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 3, 5, 8)) * 1e3).astype(np.float32)
    x[0, 0, 0, :4] = [3e38, -3e38, 2.5, -2.5]  # saturate at +-qmax; ties
    for elem in (1, 2, 4):
        got, flag = _launch(host_pass, x, elem, 0.37, x.shape, icgp=8, vec=True, trunc=trunc)
        assert flag == 0 and np.array_equal(got, _q(x, elem, 0.37, trunc))
        got, flag = _launch(host_pass, x, elem, 0.37, (2, 3, 5, 2, 16), G=2, icgp=16, vec=False, trunc=trunc)
        want = np.zeros((2, 3, 5, 2, 16), np.int64)
        want[..., :4] = _q(x, elem, 0.37, trunc).reshape(2, 3, 5, 2, 4)
        assert flag == 0 and np.array_equal(got, want)


@pytest.mark.parametrize("vec", [True, False])
def test_a_non_finite_input_sets_the_flag(host_pass, vec):
    x = np.ones((1, 3, 3, 16), np.float32)
    x[0, 2, 1, 5] = np.nan
    _, flag = _launch(host_pass, x, 1, 1.0, (1, 5, 5, 16), icgp=16, vec=vec, grid=(3, 3, 5, 5, 1, 1))
    assert flag & 1
    x[0, 2, 1, 5] = 1.0
    _, flag = _launch(host_pass, x, 1, 1.0, (1, 5, 5, 16), icgp=16, vec=vec, grid=(3, 3, 5, 5, 1, 1))
    assert flag == 0


@pytest.mark.parametrize("P, prec", [(2, Precision.INT16), (4, Precision.INT32)])
@pytest.mark.parametrize("c, groups, icgp, vec", [(32, 1, 32, True), (16, 1, 16, True), (3, 1, 16, False),
                                                  (10, 2, 16, False), (32, 2, 16, True), (12, 1, 16, True)])
def test_the_byte_planes_hold_each_quantized_values_bytes(host_pass, P, prec, c, groups, icgp, vec):
    """[pixel][plane b][group][icgp] bytes, plane b = (q >> 8b) & 0xFF (the top one q's signed top
    byte as bits), padding channels 0; every value of a wide range, ties and saturation included."""
    rng = np.random.default_rng(P * 100 + c)
    x = (rng.standard_normal((2, 3, 4, c)) * 3e4).astype(np.float32)
    x.flat[:6] = [3e38, -3e38, 0.5, -1.5, 2.5e9, -2.5e9]
    s = 1.3e4 if P == 4 else 0.7
    q = quantize(x, np.float32(s), prec).astype(np.int64).reshape(2, 3, 4, groups, c // groups)
    want = np.zeros((2, 3, 4, P, groups, icgp), np.uint8)
    for b in range(P):
        want[:, :, :, b, :, :c // groups] = (q >> (8 * b)) & 0xFF
    for blocks, threads in ((1, 1), (5, 32)):
        got = np.full(want.shape, 77, np.uint8)
        flag = host_pass.planes_on_host(P, x.ctypes.data, got.ctypes.data, x.size, c, groups, icgp, prec.qmax, s,
                                        int(vec), 3, 4, blocks, threads)
        assert flag == 0 and np.array_equal(got, want), (blocks, threads)


@pytest.mark.parametrize("c, groups, icgp", [(3, 1, 4), (5, 1, 8), (6, 2, 4), (4, 1, 4)])
def test_fp32s_padding_copies_x_into_its_groups_and_flags_a_non_finite_input(host_pass, c, groups, icgp):
    """qconv_pad_x_f32: [pixel][group][icgp] floats, x's bits unchanged, padding 0 (and an unpadded but
    unaligned input copied as it is)."""
    rng = np.random.default_rng(c)
    x = rng.standard_normal((2, 3, 4, c)).astype(np.float32)
    x.flat[:3] = [3e38, -0.0, 1e-45]
    want = np.zeros((2, 3, 4, groups, icgp), np.float32)
    want[..., :c // groups] = x.reshape(2, 3, 4, groups, c // groups)
    for blocks, threads in ((1, 1), (5, 32)):
        got = np.full(want.shape, 77, np.float32)
        flag = host_pass.planes_on_host(0, x.ctypes.data, got.ctypes.data, x.size, c, groups, icgp, 0, 1.0, 0, 3, 4,
                                        blocks, threads)
        assert flag == 0 and np.array_equal(got.view(np.uint32), want.view(np.uint32)), (blocks, threads)
    x[1, 2, 3, c - 1] = np.inf
    got = np.zeros(want.shape, np.float32)
    assert host_pass.planes_on_host(0, x.ctypes.data, got.ctypes.data, x.size, c, groups, icgp, 0, 1.0, 0, 3, 4,
                                    3, 64) & 1


@pytest.mark.parametrize("c, kh, window", [(3, 7, False), (3, 3, True), (4, 3, False), (64, 3, True), (64, 3, False),
                                            (48, 1, True), (5, 3, False)])
def test_the_pass_the_host_configures_writes_the_layout_the_convolution_reads(host_pass, c, kh, window):
    """_jobs.quantize_pass (the PassParams grid fields, vec and the item count a GemmJob launches
    with) run through the kernel's source: the window kernels' padded grid (channels padded to 32
    bytes), a C=3 stem's channels padded to 16 without a border, or x as it is; and the item count
    is what the kernel walks (V channels an item where it reads float4)."""
    x = (np.random.default_rng(c + kh).standard_normal((2, 9, 8, c)) * 50).astype(np.float32)
    g = conv_spec((kh, kh, 8, c)).geometry(x.shape)
    lay = _layout.gemm_layout(Precision.INT8, g.spec, chan_bytes=32 if window else 16)
    hp, wp = g.ho + kh - 1, g.wo + kh - 1
    grid, vec, items = _jobs.quantize_pass(g, lay, (hp, wp) if window else None, vec_x=True)
    q = _q(x, 1, 0.9)
    if grid is None:
        assert not lay.padded and vec and items == x.size // 4
        shape, want = x.shape, q
    else:
        shape = (2, grid["Hp"], grid["Wp"], lay.icgp)
        want = np.zeros(shape, np.int64)
        want[:, grid["pt"]:grid["pt"] + 9, grid["pl"]:grid["pl"] + 8, :c] = q
        v = 16 if c % 16 == 0 else 4 if c % 4 == 0 else 16  # int8: one 16-byte item a pixel
        assert vec and items * v == want.size
        assert window or (grid["Hp"], grid["Wp"], grid["pt"], grid["pl"]) == (9, 8, 0, 0)
        assert grid["N"] == 2  # the batch the walk covers (the harness derives it from n)
    got, flag = _launch(host_pass, x, 1, 0.9, shape, icgp=lay.icgp, vec=vec,
                        grid=None if grid is None else tuple(grid[k] for k in ("H", "W", "Hp", "Wp", "pt", "pl")),
                        blocks=_tiling.grid1(items, 2)[0], threads=_tiling.BLOCK)
    assert flag == 0 and np.array_equal(got, want)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_every_walked_layout_matches_the_contract(host_pass, data):
    """walk_padded's layouts drawn at random: quantize into a grid (a border or none, G groups of
    icg channels padded to icgp, int8/16/32), byte planes and FP32's padding; any launch shape."""
    kind = data.draw(st.sampled_from(["q1", "q2", "q4", "p2", "p4", "f32"]), label="kind")
    elem = {"q1": 1, "q2": 2, "q4": 4, "f32": 4}.get(kind, 1)
    G = data.draw(st.integers(1, 3), label="G")
    icg = data.draw(st.integers(1, 40), label="icg")
    unit = 16 // elem
    icgp = -(-icg // unit) * unit + unit * data.draw(st.integers(0, 1), label="extra")
    n, h, w = (data.draw(st.integers(1, k), label=a) for a, k in (("n", 3), ("h", 6), ("w", 6)))
    pads = data.draw(st.tuples(*[st.integers(0, 2)] * 4), label="pads") if kind[0] == "q" else (0, 0, 0, 0)
    blocks, threads = data.draw(st.integers(1, 5), label="blocks"), data.draw(st.integers(1, 70), label="threads")
    c = G * icg
    x = (np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed")).standard_normal((n, h, w, c))
         * data.draw(st.sampled_from([1.0, 300.0, 3e6]), label="spread")).astype(np.float32)
    vec = x.size % 4 == 0  # as the host: x is aligned here
    s = data.draw(st.sampled_from([0.37, 1.7, 64.0]), label="s")
    pt, pb, pl, pr = pads
    hp, wp = h + pt + pb, w + pl + pr
    if kind[0] == "q":
        got, flag = _launch(host_pass, x, elem, s, (n, hp, wp, G * icgp), G=G, icgp=icgp, vec=vec,
                            grid=None if pads == (0, 0, 0, 0) else (h, w, hp, wp, pt, pl), blocks=blocks, threads=threads)
        want = np.zeros((n, hp, wp, G, icgp), np.int64)
        want[:, pt:pt + h, pl:pl + w, :, :icg] = _q(x, elem, s).reshape(n, h, w, G, icg)
        assert flag == 0 and np.array_equal(got.reshape(want.shape), want)
        return
    if kind == "f32":
        want = np.zeros((n, h, w, G, icgp), np.float32)
        want[..., :icg] = x.reshape(n, h, w, G, icg)
        got = np.full(want.shape, 77, np.float32)
        flag = host_pass.planes_on_host(0, x.ctypes.data, got.ctypes.data, x.size, c, G, icgp, 0, 1.0, int(vec), h, w,
                                        blocks, threads)
        assert flag == 0 and np.array_equal(got.view(np.uint32), want.view(np.uint32))
        return
    P = int(kind[1])
    prec = Precision.INT16 if P == 2 else Precision.INT32
    q = quantize(x, np.float32(s), prec).astype(np.int64).reshape(n, h, w, G, icg)
    want = np.zeros((n, h, w, P, G, icgp), np.uint8)
    for b in range(P):
        want[:, :, :, b, :, :icg] = (q >> (8 * b)) & 0xFF
    got = np.full(want.shape, 77, np.uint8)
    flag = host_pass.planes_on_host(P, x.ctypes.data, got.ctypes.data, x.size, c, G, icgp, prec.qmax, s, int(vec), h, w,
                                    blocks, threads)
    assert flag == 0 and np.array_equal(got, want)
