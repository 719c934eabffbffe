"""The implicit-GEMM kernels run on the host, so that a machine without a GPU (CI) checks their
index math: the loader, the shared-memory layouts (padded and swizzled rows), the ldmatrix
addresses, the fragments and the epilogue. Integers (INT8 mma.sync and dp4a, INT16/INT32 by byte
planes and on the CUDA cores) bit for bit against exact wrap-around sums; FP32 (CUDA cores, outer
product, TF32x3) within its path's bound. wgmma's kernels, asynchronous and fed by TMA, and the
depthwise kernels are not emulated.

The kernel sources are compiled as C++ with cuda_emu.hpp, which runs a block's threads as fibers
and stands in for the PTX helpers (cp.async, ldmatrix, mma.sync) with the PTX ISA's definitions;
each helper's definition in the headers is swapped for its emulation. The kernels that the GPU
suite has verified on an H200 pass here too, which pins the emulation (a wrong fragment layout
fails them) and makes it worth trusting for a kernel no GPU has run yet.
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from brute import out_size_and_pads
from checks import assert_matches, cut_definition
from qconv.backends.cuda import _launch, _tiling
from qconv.contract import Precision
from qconv.geometry import conv_spec

HERE = Path(__file__).resolve().parent
KERNELS = HERE.parent / "src" / "qconv" / "backends" / "cuda_kernels"
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")

# each PTX helper -> its emulation (cuda_emu.hpp)
EMULATED = {
    "qconv_common.cuh": {
        r"^QD unsigned smem_u32\(": "",
        r"^QD void cp_async16\(": "QD void cp_async16(void* s, const void* g, bool valid) { emu_cp_async16(s, g, valid); }",
        r"^QD void cp_async_commit\(": "QD void cp_async_commit() {}",
        r"^template <int N> QD void cp_async_wait\(": "template <int N> QD void cp_async_wait() {}",
        r"^QD void mma_s8_16832\(": "QD void mma_s8_16832(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) "
                                   "{ emu_mma_16832<true, true>(d, a, b); }",
        r"^QD void ldsm_x4\(": "QD void ldsm_x4(unsigned (&r)[4], const unsigned* p) { emu_ldsm<4>(r, p); }",
        r"^QD void ldsm_x2\(": "QD void ldsm_x2(unsigned (&r)[2], const unsigned* p) { emu_ldsm<2>(r, p); }",
        r"^template <bool AS, bool BS>\nQD void mma_x8_16832\(":
            "template <bool AS, bool BS>\nQD void mma_x8_16832(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) "
            "{ emu_mma_16832<AS, BS>(d, a, b); }",
    },
    "qconv_mma.cuh": {
        r"^QD void mma_tf32_1688\(": "QD void mma_tf32_1688(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) "
                                     "{ emu_mma_tf32_1688(d, a, b); }",
    },
}
# (precision, int8_path, path): every implicit-GEMM kernel but wgmma's
VARIANTS = [(Precision.INT8, "mma", "simt"), (Precision.INT8, "dp4a", "simt"), (Precision.INT16, "mma", "mma"),
            (Precision.INT16, "mma", "simt"), (Precision.INT32, "mma", "mma"), (Precision.INT32, "mma", "simt"),
            (Precision.FP32, "mma", "simt"), (Precision.FP32, "mma", "tf32x3")]
DTYPE = {1: np.int8, 2: np.int16, 4: np.int32}


def _kernels(variant) -> list[tuple[str, str, str, int]]:
    """(tile, module, entry point, threads) of every tile a variant runs (FP32's outer-product tiles too)."""
    module, prefix = _tiling.conv_kernel(*variant)
    out = [(t, module, _tiling.conv_name(prefix, t), 128 if t in _tiling.SLIM_TILES else 256)
           for t in _tiling.tiles_for(*variant)]
    if variant == (Precision.FP32, "mma", "simt"):
        out += [(t, "conv_f32_outer.cu", _tiling.outer_name(t), _tiling.outer_threads(t)) for t in _tiling.OUTER_TILES]
    return out


def _host_source(text: str) -> str:
    """A kernel source with its static shared arrays as statics (cuda_emu.hpp: __shared__ is static)."""
    return text.replace("extern __shared__", "extern")


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
    for module in sorted({k[1] for v in VARIANTS for k in _kernels(v)}):
        names = sorted({k[2] for v in VARIANTS for k in _kernels(v) if k[1] == module})
        driver = "\n".join(f"static void run_{n}(const void* p) {{ {n}(*(const ConvParams*)p); }}" for n in names)
        table = ", ".join(f'{{"{n}", run_{n}}}' for n in names)
        src = _host_source((KERNELS / module).read_text()) + f"""
{driver}
struct Entry {{ const char* name; emu::Kernel k; }};
static const Entry entries[] = {{{table}}};
extern "C" int run_on_host(const char* name, const ConvParams* p, unsigned gx, unsigned gy, unsigned gz,
                           unsigned threads) {{
  for (const Entry& e : entries)
    if (!std::strcmp(e.name, name)) return emu::launch(e.k, p, {{gx, gy, gz}}, threads);
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
        lib.run_on_host.argtypes = [ctypes.c_char_p, ctypes.c_void_p] + [ctypes.c_uint] * 4
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


def _run(lib, kernel, variant, qx, qw, stride, pads, groups, splits):
    """One kernel on the host over the operands in the GPU path's layouts: (M, OC) uint32 (the
    integer sums, or FP32's bits)."""
    tile, _, name, threads = kernel
    precision, int8_path, path = variant
    n, h, w, c = qx.shape
    kh, kw, oc, icg = qw.shape
    spec = conv_spec(qw.shape, stride=stride, padding=pads, groups=groups)
    mma = _tiling.tensor_cores(*variant)
    lay = _tiling.gemm_layout(precision, spec, planes=path == "mma" and precision in _tiling.PLANES)
    planes = lay.planes
    dtype = np.float32 if precision is Precision.FP32 else DTYPE[lay.elem]
    xb = np.zeros((n, h, w, planes, groups, lay.icgp), dtype)
    for b, plane in enumerate(_tiling.split_planes(qx, planes) if planes > 1 else [qx.astype(dtype)]):
        xb[:, :, :, b, :, :icg] = plane.reshape(n, h, w, groups, icg)
    wb = (_tiling.pack_plane_weights(qw, lay) if planes > 1 else _tiling.pack_gemm_weights(qw.astype(dtype), lay))
    if path == "tf32x3":
        wb = _tiling.tf32_split(wb)
    ho, wo = (h + sum(pads[0]) - kh) // stride + 1, (w + sum(pads[1]) - kw) // stride + 1
    m = n * ho * wo
    ktiles = lay.kpw // (_tiling.MMA_BKW if mma else _tiling.SIMT_BKW)
    kps = math.ceil(ktiles / splits)
    splits = math.ceil(ktiles / kps)
    out = np.zeros((m, oc), np.uint32) if splits > 1 else np.full((m, oc), 0x7FBADBAD, np.uint32)
    p = _launch.ConvParams(x=xb.ctypes.data, w=wb.ctypes.data, out=out.ctypes.data, wgs=lay.wgs(), N=n, H=h, W=w,
                           Cw=lay.cw, XPW=lay.xpw, KH=kh, KW=kw, pt=pads[0][0], pl=pads[1][0], sh=stride, sw=stride,
                           Ho=ho, Wo=wo, OC=oc, OCg=lay.ocg, Kpw=lay.kpw, M=m, T=kh * kw, ktiles=ktiles,
                           ktiles_per_split=kps, splits=splits, mode=2 if splits > 1 else 0, vec_out=1)
    bm, bn = _tiling.tile_shape(tile)
    rc = lib.run_on_host(name.encode(), ctypes.addressof(p), math.ceil(m / bm), math.ceil(lay.ocg / bn),
                         groups * splits, threads)
    assert rc == 0, f"{name}: {'the threads stopped at a barrier' if rc == 1 else 'no such kernel'}"
    return out


# (N, H, W, C, KH, OC, stride, pads, groups): partial M and N tiles, two groups, stride 2 with
# uneven padding, K past one 32-word stage (and short of the next)
LAYERS = [(2, 7, 9, 24, 3, 70, 1, ((1, 1), (1, 1)), 2), (1, 9, 8, 40, 3, 36, 2, ((1, 0), (2, 1)), 1)]


INTEGER = [v for v in VARIANTS if v[0].is_integer]
FLOAT = [v for v in VARIANTS if not v[0].is_integer]


def _id(v) -> str:
    return f"{v[0].value}-{v[1] if v[0] is Precision.INT8 else v[2]}"


@pytest.mark.parametrize("variant", INTEGER, ids=_id)
@pytest.mark.parametrize("layer", range(len(LAYERS)))
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
    for kernel in _kernels(variant):
        for splits in (1, 2):
            got = _run(emulated[kernel[1]], kernel, variant, qx, qw, stride, pads, groups, splits)
            assert np.array_equal(got, want), f"{kernel[2]} split {splits}: {np.count_nonzero(got != want)} outputs differ"


@pytest.mark.parametrize("variant", FLOAT, ids=_id)
@pytest.mark.parametrize("layer", range(len(LAYERS)))
def test_every_fp32_kernel_tile_is_within_its_bound_on_the_host(emulated, variant, layer):
    """FP32's CUDA-core, outer-product and TF32x3 kernels, every tile, within the bound the path
    declares (the emulated TF32 mma sums its products in order, one valid rounding of many)."""
    n, h, w, c, k, oc, stride, pads, groups = LAYERS[layer]
    rng = np.random.default_rng(layer)
    x = (rng.standard_normal((n, h, w, c)) * 3).astype(np.float32)
    wt = (rng.standard_normal((k, k, oc, c // groups)) * 0.3).astype(np.float32)
    bound = _tiling.TF32X3_BOUND if variant[2] == "tf32x3" else (2.0, 0.0)
    layer_args = {"stride": stride, "padding": pads, "groups": groups}
    for kernel in _kernels(variant):
        for splits in (1, 2):
            got = _run(emulated[kernel[1]], kernel, variant, x, wt, stride, pads, groups, splits)
            y = got.view(np.float32).reshape(n, -1, (w + sum(pads[1]) - k) // stride + 1, oc)
            assert_matches(y, x, wt, Precision.FP32, layer_args, fp32_bound=bound, what=f"{kernel[2]} split {splits}")


def test_a_barrier_not_every_thread_reaches_is_reported(tmp_path):
    """The emulator's own check: a kernel whose threads diverge at __syncthreads returns 1, not a hang."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "k.cpp"
    src.write_text('static void k(const void*) { if (threadIdx.x == 0) __syncthreads(); }\n'
                   'extern "C" int go() { return emu::launch(k, nullptr, {1, 1, 1}, 64); }\n')
    so = tmp_path / "k.so"
    r = subprocess.run([CXX, "-std=c++17", "-shared", "-fPIC", "-include", str(HERE / "cuda_emu.hpp"), str(src),
                        "-o", str(so)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ctypes.CDLL(str(so)).go() == 1
