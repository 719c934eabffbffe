"""The convolution kernels run on the host, so that a machine without a GPU (CI) checks their
index math: the loader, the shared-memory layouts (padded and swizzled rows), the ldmatrix
addresses and wgmma descriptors, the fragments, the window kernels' rings and barriers, and the
epilogues. Integers (INT8 wgmma, mma.sync and dp4a, INT16/INT32 by byte planes and on the CUDA
cores, the depthwise kernels) bit for bit against exact wrap-around sums, raw, split-K and
dequantized; FP32 (CUDA cores, outer product, TF32x3, depthwise) within its path's bound. (quant.cu
has its own host test, test_cuda_host.py. wgmma reads its operands when issued, so a kernel that
overwrote them before wgmma.wait_group would still pass here.)

The kernel sources are compiled as C++ with cuda_emu.hpp, which runs a block's threads as fibers
and stands in for the PTX helpers (cp.async, ldmatrix, mma.sync, wgmma, mbarriers, named
barriers) with the PTX ISA's definitions;
each helper's definition in the headers is swapped for its emulation. The kernels that the GPU
suite has verified on an H200 pass here too, which pins the emulation (a wrong fragment layout
fails them) and makes it worth trusting for a kernel no GPU has run yet.
"""

from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from checks import assert_matches, cut_definition
from qconv.backends.cuda import _launch, _layout, _tiling
from qconv.contract import Precision, Rounding, quantize
from qconv.geometry import conv_spec

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parent / "src" / "qconv" / "backends" / "cuda_kernels"
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")

# each PTX helper -> its emulation (cuda_emu.hpp)
EMULATED = {
    "qconv_common.cuh": {
        r"^QD unsigned smem_u32\(": "QD unsigned smem_u32(const void* p) { return emu_smem_u32(p); }",
        r"^QD void cp_async16\(": "QD void cp_async16(void* s, const void* g, bool valid) { emu_cp_async16(s, g, valid); }",
        r"^QD void cp_async_commit\(": "QD void cp_async_commit() { emu_cp_async_commit(); }",
        r"^template <int N> QD void cp_async_wait\(": "template <int N> QD void cp_async_wait() { emu_cp_async_wait<N>(); }",
        r"^QD void mma_s8_16832\(": "QD void mma_s8_16832(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) "
                                   "{ emu_mma_16832<true, true>(d, a, b); }",
        r"^QD void ldsm_x4\(": "QD void ldsm_x4(unsigned (&r)[4], const unsigned* p) { emu_ldsm<4>(r, p); }",
        r"^QD void ldsm_x2\(": "QD void ldsm_x2(unsigned (&r)[2], const unsigned* p) { emu_ldsm<2>(r, p); }",
        r"^template <bool AS, bool BS>\nQD void mma_x8_16832\(":
            "template <bool AS, bool BS>\nQD void mma_x8_16832(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) "
            "{ emu_mma_16832<AS, BS>(d, a, b); }",
    },
    "qconv_wgmma.cuh": {
        r"^QD void wgmma_fence\(": "QD void wgmma_fence() {}",
        r"^QD void wgmma_commit\(": "QD void wgmma_commit() { emu_wgmma_commit(); }",
        r"^template <int N> QD void wgmma_wait\(": "template <int N> QD void wgmma_wait() { emu_wgmma_wait<N>(); }",
        r"^QD void fence_proxy_async\(": "QD void fence_proxy_async() {}",
        r"^template <> QD void wgmma_s8<64>\(": "template <> QD void wgmma_s8<64>(int (&d)[32], unsigned long long a, "
                                                "unsigned long long b) { emu_wgmma_s8<64>(d, a, b); }",
        r"^template <> QD void wgmma_s8<128>\(": "template <> QD void wgmma_s8<128>(int (&d)[64], unsigned long long a, "
                                                 "unsigned long long b) { emu_wgmma_s8<128>(d, a, b); }",
        r"^QD void mbar_init\(": "QD void mbar_init(unsigned long long* b, unsigned n) { emu_mbar_init(b, n); }",
        r"^QD void mbar_arrive\(": "QD void mbar_arrive(unsigned long long* b) { emu_mbar_arrive(b); }",
        r"^QD void mbar_arrive_cp_async\(": "QD void mbar_arrive_cp_async(unsigned long long* b) { emu_mbar_arrive_cp_async(b); }",
        r"^QD void mbar_wait\(": "QD void mbar_wait(unsigned long long* b, unsigned parity) { emu_mbar_wait(b, parity); }",
        r"^QD void named_bar_sync\(": "QD void named_bar_sync(int id, int n) { emu_named_bar_sync(id, n); }",
        r"^QD void named_bar_arrive\(": "QD void named_bar_arrive(int id, int n) { emu_named_bar_arrive(id, n); }",
    },
    "qconv_mma.cuh": {
        r"^QD void mma_tf32_1688\(": "QD void mma_tf32_1688(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) "
                                     "{ emu_mma_tf32_1688(d, a, b); }",
    },
}
# (precision, int8_path, path): every implicit-GEMM kernel
VARIANTS = [(Precision.INT8, "mma", "simt"), (Precision.INT8, "dp4a", "simt"), (Precision.INT8, "wgmma", "simt"),
            (Precision.INT16, "mma", "mma"), (Precision.INT16, "mma", "simt"), (Precision.INT32, "mma", "mma"),
            (Precision.INT32, "mma", "simt"), (Precision.FP32, "mma", "simt"), (Precision.FP32, "mma", "tf32x3")]
DTYPE = {1: np.int8, 2: np.int16, 4: np.int32}


@dataclass(frozen=True)
class Kernel:
    tile: str
    module: str
    name: str
    threads: int
    window: tuple[int, int] | None = None  # wgmma's window kernels: (BN, windows; 0: warp-specialized)


def _kernels(variant) -> list[Kernel]:
    """Every kernel a variant runs: one per tile (FP32's outer-product tiles too; wgmma's window
    kernels, one per channel block and windows)."""
    module, prefix = _tiling.conv_kernel(*variant)
    out = []
    for t in _tiling.tiles_for(*variant):
        if t == "window":
            out += [Kernel(t, module, f"{prefix}_window_n{bn}_b{nb}", 256, (bn, nb)) for bn, nb in _tiling.window_configs(128)]
        elif t == "window-ws":
            out += [Kernel(t, module, f"{prefix}_ws_n{bn}", _tiling.WS_THREADS, (bn, 0)) for bn in (128, 64)]
        else:
            bm = _tiling.tile_shape(t)[0]
            threads = 2 * bm if variant[1] == "wgmma" else 128 if t in _tiling.SLIM_TILES else 256
            out.append(Kernel(t, module, _tiling.conv_name(prefix, t), threads))
    if variant == (Precision.FP32, "mma", "simt"):
        out += [Kernel(t, "conv_f32_outer.cu", _tiling.outer_name(t), _tiling.outer_threads(t)) for t in _tiling.OUTER_TILES]
    return out


# lines of the module files themselves -> their emulation
EMULATED_LINES = {
    'asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));': "dyn = emu::dynamic_smem;",
    'asm volatile("fence.mbarrier_init.release.cluster;\\n" ::: "memory");': "",
}


def _host_source(text: str) -> str:
    """A kernel source for the host: each dynamic shared array is the one `smem` (cuda_emu.hpp), the
    static ones statics (its __shared__ is static), and the module's own PTX lines emulated."""
    text = re.sub(r"extern __shared__ (?:__align__\(\d+\) )?unsigned (\w+)\[\];", r"unsigned* const \1 = ::smem;", text)
    for line, emulation in EMULATED_LINES.items():
        text = text.replace(line, emulation)
    return text


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """module file -> the library of its kernels built for the host (run_on_host(name, params, grid))."""
    if CXX is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) to build the kernels for the host")
    d = tmp_path_factory.mktemp("kernels_host")
    for header in KERNELS.glob("*.cuh"):
        text = header.read_text()
        for start, emulation in EMULATED.get(header.name, {}).items():
            text = text.replace(cut_definition(text, start), emulation)
        (d / header.name).write_text(_host_source(text))
    libs = {}
    kernels = [k for v in VARIANTS for k in _kernels(v)] + [Kernel("", "conv_dw.cu", n, _tiling.BLOCK)
                                                            for n in _tiling.kernel_names()["conv_dw.cu"]]
    for module in sorted({k.module for k in kernels}):
        names = sorted({k.name for k in kernels if k.module == module})
        params = "DwParams" if module == "conv_dw.cu" else "ConvParams"
        driver = "\n".join(f"static void run_{n}(const void* p) {{ {n}(*(const {params}*)p); }}" for n in names)
        table = ", ".join(f'{{"{n}", run_{n}}}' for n in names)
        src = _host_source((KERNELS / module).read_text()) + f"""
{driver}
struct Entry {{ const char* name; emu::Kernel k; }};
static const Entry entries[] = {{{table}}};
extern "C" void land_copies_late(int late) {{ emu::late_copies = late; }}
extern "C" int run_on_host(const char* name, const void* p, unsigned gx, unsigned gy, unsigned gz,
                           unsigned threads, unsigned smem_bytes) {{
  for (const Entry& e : entries)
    if (!std::strcmp(e.name, name)) return emu::launch(e.k, p, {{gx, gy, gz}}, threads, smem_bytes);
  return 2;
}}
"""
        (d / module).write_text(src)
        so = d / (module + ".so")
        r = subprocess.run([CXX, "-std=c++17", "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-w",
                            "-include", str(HERE / "cuda_emu.hpp"), "-I", str(d), "-x", "c++", str(d / module),
                            "-o", str(so)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        lib = ctypes.CDLL(str(so))
        lib.run_on_host.argtypes = [ctypes.c_char_p, ctypes.c_void_p] + [ctypes.c_uint] * 5
        lib.land_copies_late.argtypes = [ctypes.c_int]
        libs[module] = lib
    return libs


def _exact(qx, qw, stride, pads, groups):
    """The contract's int32 accumulation (wrap-around) of the integer convolution, as uint32."""
    n, h, w, c = qx.shape
    kh, kw, oc, icg = qw.shape
    (pt, pb), (pl, pr) = pads
    xp = np.zeros((n, h + pt + pb, w + pl + pr, c), np.uint64)
    xp[:, pt:pt + h, pl:pl + w] = qx.astype(np.int64).astype(np.uint64)  # two's complement: sums mod 2^64
    ho, wo = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
    y = np.zeros((n, ho, wo, oc), np.uint64)
    ocg, w64 = oc // groups, qw.astype(np.int64).astype(np.uint64)
    for a in range(kh):
        for b in range(kw):
            patch = xp[:, a:a + (ho - 1) * stride + 1:stride, b:b + (wo - 1) * stride + 1:stride]
            for g in range(groups):
                y[..., g * ocg:(g + 1) * ocg] += patch[..., g * icg:(g + 1) * icg] @ w64[a, b, g * ocg:(g + 1) * ocg].T
    return (y & np.uint64(0xFFFFFFFF)).astype(np.uint32)


LAUNCH_ERRORS = {1: "the threads stopped at a barrier", 2: "no such kernel",
                 3: "a wgmma's operands changed between its issue and its wait_group"}


def _run(lib, kernel: Kernel, variant, qx, qw, stride, pads, groups, splits, dequantize=None):
    """One kernel on the host over the operands in the GPU path's layouts: (M, OC) uint32 (the
    integer sums, or FP32's bits); dequantize = (inv, bias): the fused epilogue's float32 bits."""
    precision, int8_path, path = variant
    n, h, w, c = qx.shape
    kh, kw, oc, icg = qw.shape
    spec = conv_spec(qw.shape, stride=stride, padding=pads, groups=groups)
    mma, wgmma = _tiling.tensor_cores(*variant), int8_path == "wgmma"
    lay = _layout.gemm_layout(precision, spec, path == "mma" and precision in _tiling.PLANES, 32 if wgmma else 16)
    planes = lay.planes
    dtype = np.float32 if precision is Precision.FP32 else DTYPE[lay.elem]
    ho, wo = (h + sum(pads[0]) - kh) // stride + 1, (w + sum(pads[1]) - kw) // stride + 1
    if kernel.window:  # the quantize pass's zero-padded grid of (Ho + KH - 1) x (Wo + KW - 1) pixels
        (pt, _), (pl, _) = pads
        xb = np.zeros((n, ho + kh - 1, wo + kw - 1, lay.icgp), dtype)
        xb[:, pt:pt + h, pl:pl + w, :c] = qx
        splits = 1
    else:
        xb = np.zeros((n, h, w, planes, groups, lay.icgp), dtype)
        for b, plane in enumerate(_layout.split_planes(qx, planes) if planes > 1 else [qx.astype(dtype)]):
            xb[:, :, :, b, :, :icg] = plane.reshape(n, h, w, groups, icg)
    wb = (_layout.pack_plane_weights(qw, lay) if planes > 1 else _layout.pack_gemm_weights(qw.astype(dtype), lay))
    if path == "tf32x3":
        wb = _layout.tf32_split(wb)
    m = n * ho * wo
    ktiles = lay.kpw // (_tiling.MMA_BKW if mma else _tiling.SIMT_BKW)
    kps = math.ceil(ktiles / splits)
    splits = math.ceil(ktiles / kps)
    out = np.zeros((m, oc), np.uint32) if splits > 1 else np.full((m, oc), 0x7FBADBAD, np.uint32)
    p = _launch.ConvParams(x=xb.ctypes.data, w=wb.ctypes.data, out=out.ctypes.data, wgs=lay.wgs(), N=n, H=h, W=w,
                           Cw=lay.cw, XPW=lay.xpw, KH=kh, KW=kw, pt=pads[0][0], pl=pads[1][0], sh=stride, sw=stride,
                           Ho=ho, Wo=wo, OC=oc, OCg=lay.ocg, Kpw=lay.kpw, M=m, T=kh * kw, ktiles=ktiles,
                           ktiles_per_split=kps, splits=splits, mode=2 if splits > 1 else 0, vec_out=1)
    if dequantize is not None:
        assert splits == 1
        p.inv, p.bias, p.mode = dequantize[0].ctypes.data, dequantize[1].ctypes.data, 1
    if kernel.window:  # persistent blocks, two per channel block, each walking several M tiles
        bn, nbuf = kernel.window
        bm = _tiling.WINDOW_BM if nbuf else _tiling.WS_BM
        smem = (_tiling.window_smem(spec, lay, wo, bn, nbuf) if nbuf else  # warp-specialized: a ring of 2 (reused)
                _tiling.window_smem(spec, lay, wo, bn, 0, bm) + 2 * _tiling.window_smem(spec, lay, wo, 0, 1, bm))
        grid = (min(2, math.ceil(n * (ho + kh - 1) * (wo + kw - 1) / bm)), math.ceil(lay.ocg / bn), 1)
    else:
        bm, bn = _tiling.tile_shape(kernel.tile)
        smem = _tiling.WGMMA_STAGES * (bm + bn) * _tiling.MMA_BKW * 4 + 1024 if wgmma else 0
        grid = (math.ceil(m / bm), math.ceil(lay.ocg / bn), groups * splits)
    rc = lib.run_on_host(kernel.name.encode(), ctypes.addressof(p), *grid, kernel.threads, smem)
    assert rc == 0, f"{kernel.name}: {LAUNCH_ERRORS.get(rc, rc)}"
    if int8_path == "wgmma":  # again with the copies landing at once: no operand overwritten in flight
        early = np.zeros_like(out) if splits > 1 else np.full_like(out, 0x7FBADBAD)
        p.out = early.ctypes.data
        lib.land_copies_late(0)
        try:
            rc = lib.run_on_host(kernel.name.encode(), ctypes.addressof(p), *grid, kernel.threads, smem)
        finally:
            lib.land_copies_late(1)
        assert rc == 0, f"{kernel.name}, copies landing at once: {LAUNCH_ERRORS.get(rc, rc)}"
        assert np.array_equal(early, out), f"{kernel.name}: the copies' landing time changes the output"
    return out


def _runs(variant, layer):
    """(kernel, splits) of every run for a layer: the window kernels only where the layer allows them."""
    n, h, w, c, k, oc, stride, pads, groups = layer
    spec = conv_spec((k, k, oc, c // groups), stride=stride, padding=pads, groups=groups)
    lay = _layout.gemm_layout(variant[0], spec, False, 32)
    wo = (w + sum(pads[1]) - k) // stride + 1
    window = variant[1] == "wgmma" and _tiling.window_fits(spec, lay, wo, SMEM_OPTIN)
    return [(kn, s) for kn in _kernels(variant) if window or not kn.window for s in ((1,) if kn.window else (1, 2))]


# (N, H, W, C, KH, OC, stride, pads, groups): partial M and N tiles, two groups, stride 2 with
# uneven padding, K past one 32-word stage (and short of the next); the last two, for wgmma only,
# also run its window kernels (stride 1, one group), several M tiles per persistent block, with OC
# a multiple of 4 (the epilogue's 16-byte stores) and not
LAYERS = [(2, 7, 9, 24, 3, 70, 1, ((1, 1), (1, 1)), 2), (1, 9, 8, 40, 3, 36, 2, ((1, 0), (2, 1)), 1),
          (2, 9, 11, 48, 3, 72, 1, ((1, 1), (0, 2)), 1), (1, 5, 6, 32, 1, 70, 1, ((0, 0), (0, 0)), 1)]
WINDOW_LAYERS = (2, 3)
SMEM_OPTIN = 232448  # the H100/H200's opt-in shared memory per block


INTEGER = [(v, i) for v in VARIANTS if v[0].is_integer for i in range(len(LAYERS))
           if i not in WINDOW_LAYERS or v[1] == "wgmma"]
FLOAT = [(v, i) for v in VARIANTS if not v[0].is_integer for i in range(len(LAYERS)) if i not in WINDOW_LAYERS]


def _id(v) -> str:
    return f"{v[0].value}-{v[1] if v[0] is Precision.INT8 else v[2]}"


@pytest.mark.parametrize("variant, layer", INTEGER, ids=lambda c: _id(c) if isinstance(c, tuple) else str(c))
def test_every_integer_kernel_tile_is_exact_on_the_host(emulated, variant, layer):
    """Every tile of every integer kernel (tensor cores, byte planes, CUDA cores), one K slice and
    split-K's atomic sums, against the exact wrap-around sums; values over the whole range (the
    INT16/INT32 sums wrap past 2^31)."""
    n, h, w, c, k, oc, stride, pads, groups = LAYERS[layer]
    q = variant[0].qmax
    rng = np.random.default_rng(layer * 10 + VARIANTS.index(variant))
    qx = rng.integers(-q, q + 1, (n, h, w, c), dtype=np.int64)
    qw = rng.integers(-q, q + 1, (k, k, oc, c // groups), dtype=np.int64)
    qx.flat[::7], qw.flat[::5] = -q, q  # the extremes: every byte pattern's sign
    want = _exact(qx, qw, stride, pads, groups).reshape(-1, oc)
    inv = (rng.random(oc) * 1e-3).astype(np.float32)
    bias = rng.standard_normal(oc).astype(np.float32)
    # the contract's dequantize: float32(acc) * inv, then + bias, each rounded to float32
    fused = ((want.view(np.int32).astype(np.float32) * inv) + bias).view(np.uint32)
    for kernel, splits in _runs(variant, LAYERS[layer]):
        got = _run(emulated[kernel.module], kernel, variant, qx, qw, stride, pads, groups, splits)
        assert np.array_equal(got, want), f"{kernel.name} split {splits}: {np.count_nonzero(got != want)} outputs differ"
        if splits == 1:
            got = _run(emulated[kernel.module], kernel, variant, qx, qw, stride, pads, groups, 1, (inv, bias))
            assert np.array_equal(got, fused), f"{kernel.name} dequantized: {np.count_nonzero(got != fused)} outputs differ"


# kernels the random layers run: the swizzled 4-warp tiles, wgmma's tiles and window kernels, a
# byte-plane tile and a CUDA-core one
RANDOM_KERNELS = {(Precision.INT8, "mma", "simt"): ("128x64/w4", "64x64/w4", "32x32"),
                  (Precision.INT8, "wgmma", "simt"): ("64x64", "window", "window-ws"),
                  (Precision.INT16, "mma", "mma"): ("64x32",), (Precision.INT32, "mma", "simt"): ("64x32",)}


@st.composite
def _layers(draw):
    """(N, H, W, C, KH, OC, stride, pads, groups): any small layer (KW = KH)."""
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c = groups * draw(st.integers(1, 24))
    oc = groups * draw(st.integers(1, 40))
    k = draw(st.sampled_from([1, 2, 3, 5]))
    stride = draw(st.sampled_from([1, 1, 2]))
    pads = tuple(tuple(draw(st.integers(0, k - 1)) for _ in range(2)) for _ in range(2))
    h, w = (draw(st.integers(max(1, k - sum(p)), 11)) for p in pads)
    return draw(st.integers(1, 2)), h, w, c, k, oc, stride, pads, groups


@settings(max_examples=6, deadline=None)
@given(layer=_layers(), seed=st.integers(0, 2**31 - 1))
def test_random_layers_on_the_host(emulated, layer, seed):
    """Random small layers (any channels, kernel size, stride, padding, groups) through the newest
    kernels and one of each other kind, raw and split-K, against the exact wrap-around sums."""
    n, h, w, c, k, oc, stride, pads, groups = layer
    rng = np.random.default_rng(seed)
    for variant, tiles in RANDOM_KERNELS.items():
        q = variant[0].qmax
        qx = rng.integers(-q, q + 1, (n, h, w, c), dtype=np.int64)
        qw = rng.integers(-q, q + 1, (k, k, oc, c // groups), dtype=np.int64)
        want = _exact(qx, qw, stride, pads, groups).reshape(-1, oc)
        for kernel, splits in _runs(variant, layer):
            if kernel.tile in tiles:
                got = _run(emulated[kernel.module], kernel, variant, qx, qw, stride, pads, groups, splits)
                assert np.array_equal(got, want), f"{kernel.name} split {splits}: {np.count_nonzero(got != want)} differ"


@pytest.mark.parametrize("variant, layer", FLOAT, ids=lambda c: _id(c) if isinstance(c, tuple) else str(c))
def test_every_fp32_kernel_tile_is_within_its_bound_on_the_host(emulated, variant, layer):
    """FP32's CUDA-core, outer-product and TF32x3 kernels, every tile, within the bound the path
    declares (the emulated TF32 mma sums its products in order, one valid rounding of many)."""
    n, h, w, c, k, oc, stride, pads, groups = LAYERS[layer]
    rng = np.random.default_rng(layer)
    x = (rng.standard_normal((n, h, w, c)) * 3).astype(np.float32)
    wt = (rng.standard_normal((k, k, oc, c // groups)) * 0.3).astype(np.float32)
    bound = _tiling.TF32X3_BOUND if variant[2] == "tf32x3" else (2.0, 0.0)
    layer_args = {"stride": stride, "padding": pads, "groups": groups}
    for kernel, splits in _runs(variant, LAYERS[layer]):
        got = _run(emulated[kernel.module], kernel, variant, x, wt, stride, pads, groups, splits)
        y = got.view(np.float32).reshape(n, -1, (w + sum(pads[1]) - k) // stride + 1, oc)
        assert_matches(y, x, wt, Precision.FP32, layer_args, fp32_bound=bound, what=f"{kernel.name} split {splits}")


# depthwise layers (N, H, W, C, KH, KW, mult, stride, pads): every entry point of conv_dw.cu runs in
# one of them (vector kernels where mult == 1 and C % 4 == 0, their fixed 3x3 / 5x5 forms at
# column strides 1 and 2, the generic and scalar ones otherwise)
DW_LAYERS = [(2, 7, 10, 8, 3, 3, 1, 1, ((1, 1), (1, 1))), (1, 9, 11, 12, 3, 3, 1, 2, ((1, 0), (0, 1))),
             (1, 8, 9, 8, 5, 5, 1, 1, ((2, 2), (2, 2))), (1, 9, 13, 4, 5, 5, 1, 2, ((2, 1), (1, 2))),
             (2, 6, 7, 6, 3, 2, 2, 1, ((1, 1), (0, 1))), (1, 7, 9, 8, 2, 4, 1, 1, ((0, 1), (1, 2)))]


def _run_dw(lib, precision, x, wt, layer, inv, bias, s):
    """The depthwise kernel that layer takes, on the host: (name, float32 output)."""
    n, h, w, c, kh, kw, mult, stride, pads = layer
    oc = c * mult
    ho, wo = (h + sum(pads[0]) - kh) // stride + 1, (w + sum(pads[1]) - kw) // stride + 1
    vector = mult == 1 and c % 4 == 0
    cv, tw = _tiling.DW_TILE if vector else (1, _tiling.DW_TILE[1])
    tiles_w = math.ceil(wo / tw)
    name = _tiling.dw_kernel(precision, vector, kh, kw, stride)
    out = np.full((n, ho, wo, oc), np.nan, np.float32)
    p = _launch.DwParams(x=x.ctypes.data, w=wt.ctypes.data, out=out.ctypes.data, inv=inv.ctypes.data,
                         bias=bias.ctypes.data, N=n, H=h, W=w, C=c, KH=kh, KW=kw, pt=pads[0][0], pl=pads[1][0],
                         sh=stride, sw=stride, Ho=ho, Wo=wo, OC=oc, mult=mult, tiles_w=tiles_w, s=s,
                         qmax=precision.qmax if precision.is_integer else 0)
    blocks = min(3, math.ceil(n * ho * tiles_w * (oc // cv) / _tiling.BLOCK))  # a grid-stride loop over 3 blocks at most
    assert lib.run_on_host(name.encode(), ctypes.addressof(p), blocks, 1, 1, _tiling.BLOCK, 0) == 0, name
    return name, out


@pytest.mark.parametrize("precision", [Precision.FP32, Precision.INT8, Precision.INT32], ids=lambda p: p.value)
def test_every_depthwise_kernel_on_the_host(emulated, precision):
    """The depthwise kernels (quantize on load, wrap-around sums, fused dequantize and bias): every
    entry point, integers bit for bit against the exact sums, FP32 within the contract's bound."""
    ran = set()
    for i, layer in enumerate(DW_LAYERS):
        n, h, w, c, kh, kw, mult, stride, pads = layer
        rng = np.random.default_rng(i)
        x = (rng.standard_normal((n, h, w, c)) * 3).astype(np.float32)
        wt = (rng.standard_normal((kh, kw, c * mult, 1)) * 0.3).astype(np.float32)
        bias = rng.standard_normal(c * mult).astype(np.float32)
        inv = (rng.random(c * mult) * 1e-3).astype(np.float32)
        s = np.float32(precision.qmax / 9.0) if precision.is_integer else np.float32(0)
        if precision.is_integer:  # the kernel quantizes x; the weights come quantized
            qw = rng.integers(-precision.qmax, precision.qmax + 1, wt.shape, dtype=np.int64)
            name, y = _run_dw(emulated["conv_dw.cu"], precision, x, _layout.pack_dw_weights(qw.astype(np.int32)),
                              layer, inv, bias, s)
            qx = quantize(x, s, precision, Rounding.NEAREST).astype(np.int64)
            acc = _exact(qx, qw, stride, pads, c)
            want = (acc.view(np.int32).astype(np.float32) * inv) + bias
            assert np.array_equal(y.view(np.uint32), want.view(np.uint32)), f"{name}: {np.count_nonzero(y != want)} differ"
        else:
            name, y = _run_dw(emulated["conv_dw.cu"], precision, x, _layout.pack_dw_weights(wt), layer, inv, bias, s)
            assert_matches(y, x, wt, precision, {"stride": stride, "padding": pads, "groups": c}, bias=bias, what=name)
        ran.add(name)
    entry = "f32" if precision is Precision.FP32 else "q32"
    assert ran == {k for k in _tiling.kernel_names()["conv_dw.cu"] if f"_{entry}_" in k}, ran


def test_a_barrier_not_every_thread_reaches_is_reported(tmp_path):
    """The emulator's own check: a kernel whose threads diverge at __syncthreads returns 1, not a hang."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "k.cpp"
    src.write_text('static void k(const void*) { if (threadIdx.x == 0) __syncthreads(); }\n'
                   'extern "C" int go() { return emu::launch(k, nullptr, {1, 1, 1}, 64, 0); }\n')
    so = tmp_path / "k.so"
    r = subprocess.run([CXX, "-std=c++17", "-shared", "-fPIC", "-include", str(HERE / "cuda_emu.hpp"), str(src),
                        "-o", str(so)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ctypes.CDLL(str(so)).go() == 1
