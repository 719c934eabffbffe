"""The cuda backend's pure decisions, testable without a GPU: kernel names and tiles, tile and
split-K choice (the packed layouts and the weight packing: _layout.py).

Constants here mirror the .cu sources: SIMT_BKW / MMA_BKW are the K words per pipeline stage of
qconv_simt.cuh / qconv_mma.cuh, STAGES their pipeline depth, DW_TILE the depthwise kernels'
channels x output columns per thread (conv_dw.cu).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ...contract import ConvSpec, Precision
from ...errors import InputError

if TYPE_CHECKING:
    from ._layout import GemmLayout

INT8_PATHS = ("auto", "mma", "wgmma", "dp4a")
WGMMA_ARCHS = ("sm_90",)  # int8_path="wgmma": Hopper's warpgroup MMA (conv_s8_wgmma.cu, sm_90a)
# The other precisions' paths (options fp32_path, int32_path, int16_path): "simt" (CUDA cores);
# INT16 / INT32 "mma" (tensor cores by exact 8-bit decomposition, conv_planes_mma.cu); FP32
# "tf32x3" (tensor cores, three TF32 products per term, conv_f32_tf32x3.cu, within TF32X3_BOUND).
# "auto" resolves through PATH_AUTO, set from the H200 measurements in benchmarks/RESULTS.md
# (exam layers, N=32, kernel alone: INT16 mma 94.5 / 69.6 us vs SIMT 286.4 / 285.2 us; INT32 mma
# 194.4 / 149.8 us vs SIMT 299.0 / 300.9 us)
PATHS = {Precision.FP32: ("auto", "simt", "tf32x3"), Precision.INT32: ("auto", "simt", "mma"),
         Precision.INT16: ("auto", "simt", "mma")}
PATH_AUTO = {Precision.FP32: "simt", Precision.INT16: "mma", Precision.INT32: "mma"}
# The FP32 error bound of the "tf32x3" path, (c, per_term) of contract.fp32_error_bound: each
# term is three tensor-core products (c: the contract's 2 for each), and splitting x and w into
# TF32 parts drops at most 10 eps32 |x*w| (+ 2^-32 |x*w|) per term (qconv_mma.cuh's MmaTF32x3).
TF32X3_BOUND = (6.0, 11.0)
PLANES = {Precision.INT16: 2, Precision.INT32: 4}  # byte planes per value on the "mma" path
# tensor-core tiles of the decomposed kernels (registers: one accumulator set per shift class)
PLANE_TILES = {Precision.INT16: ("128x64", "64x64", "64x32", "32x32"),
               Precision.INT32: ("64x64", "64x32", "32x32")}
PLANE_STAGES = {Precision.INT16: 3, Precision.INT32: 2}
TILES = ("128x128", "128x64", "64x64", "64x32", "32x32")    # CUDA-core kernels
MMA_TILES = ("128x128", "96x128") + TILES[1:]                # tensor-core kernel
# INT8 mma.sync with 4 warps and XOR-swizzled unpadded rows (qconv_mma.cuh's SWZ): a 128x64 block
# takes 72 KB, so three fit an SM as in cuBLASLt's kernel (ours, padded: 83 KB, two); "auto" takes
# them by int8_mma_tile's rule
SLIM_TILES = ("128x64/w4", "64x64/w4")
# FP32 tf32x3: its 128x128 tile needs 156 registers, one block per SM, and lost to 128x64 on both
# exam layers at N=32 (193.1 vs 150.6 us on exam 2, H200, RESULTS.md), so it is not built
TF32X3_TILES = TILES[1:]
# BMxBN: BM / 64 warpgroups, m64nBNk32; "window": the stride-1 kernel with resident weights
# (conv_s8_wgmma.cu), 128 rows x 128 or 64 channels with one or two windows (the configuration
# that keeps the most blocks resident), where window_fits(); else 128x128. "window-ws": the same
# warp-specialized (a producer warpgroup, two ping-pong consumers of 64-row tiles, WS_NBUF windows
# in a ring), chosen only by name: on the H200 it equals "window" on exam 2 at N=256 (115.3 vs
# 113.4 us) and loses on exam 1 (203.9 vs 140.4 us; RESULTS.md), its epilogue not hidden
WGMMA_TILES = ("window", "window-ws", "128x128", "128x64", "64x128", "64x64")
WINDOW_TILES = WGMMA_TILES[:2]
WINDOW_BM, WS_BM = 128, 64
WS_THREADS, WS_NBUF = 384, (2, 4)  # conv_wgmma_ws: 3 warpgroups; ring of 2 to NBUF_MAX windows
WS_STATIC_SMEM = 64                # its mbarriers (static shared memory, beside the dynamic)
STAGES = 3
WGMMA_STAGES = 4
# FP32 outer-product kernels (conv_f32_outer.cu): "BMxBN/TMxTN" (threads = BM*BN/(TM*TN))
OUTER_TILES = ("128x128/8x8", "128x64/8x4", "128x64/8x8", "128x64/8x8/k8", "64x64/4x4", "64x64/8x4",
               "64x32/4x4")  # "/k8": 8-word K tiles
# FP32 "auto": block tile (from choose_tiling) -> outer-product tile; a block tile not listed runs
# the SIMT kernel (64x64 + split-K at N=1 measured 17-18 us SIMT vs 21-22 us outer, RESULTS.md)
F32_AUTO = {(128, 64): "128x64/8x8/k8"}
SIMT_BKW, MMA_BKW = 16, 32  # K words per pipeline stage
KPW_ALIGN = 32              # packed K in words: a multiple of both stages
OC_ALIGN = 128              # packed output channels per group: a multiple of every BN
DW_TILE = (4, 4)            # depthwise: channels (float4) x output columns per thread
DW_FIXED = ((3, 1), (3, 2), (5, 1), (5, 2))  # depthwise KxK kernels / column strides compiled as such (FP32)
DW_FIXED_INT = ((3, 1), (3, 2))              # (integers: the 5x5 specialization spills, conv_dw.cu)
BLOCK = 256                 # threads of the elementwise and depthwise kernels
HELD_X4 = 16                # float4 of x a thread holds in qconv_scan_quantize_held_* (quant.cu's XREGS)
INT_LIMIT = 2**31 - 1       # kernels index pixels and outputs with 32-bit ints
MAX_KERNEL = (15, 16)      # KH, KW: the implicit-GEMM loader's tap masks (qconv_common.cuh, TileLoader)

ELEM = {Precision.FP32: 4, Precision.INT32: 4, Precision.INT16: 2, Precision.INT8: 1}
_CONV = {  # precision / int8 path -> (module, kernel name prefix)
    Precision.FP32: ("conv_f32.cu", "qconv_f32_conv_simt"),
    Precision.INT32: ("conv_s32.cu", "qconv_s32_conv_simt"),
    Precision.INT16: ("conv_s16.cu", "qconv_s16_conv_simt"),
    "mma": ("conv_s8_mma.cu", "qconv_s8_conv_mma"),
    "wgmma": ("conv_s8_wgmma.cu", "qconv_s8_conv_wgmma"),
    "dp4a": ("conv_s8_dp4a.cu", "qconv_s8_conv_dp4a"),
    "mma16": ("conv_planes_mma.cu", "qconv_s16_conv_mma"),
    "mma32": ("conv_planes_mma.cu", "qconv_s32_conv_mma"),
    "tf32x3": ("conv_f32_tf32x3.cu", "qconv_f32_conv_tf32x3"),
}
_PLANE_KEY = {Precision.INT16: "mma16", Precision.INT32: "mma32"}
QUANT_SUFFIX = {Precision.INT32: "s32", Precision.INT16: "s16", Precision.INT8: "s8"}


def resolve_int8_path(option: str, arch: str | None) -> str:
    """The INT8 path a prepared convolution runs: the option, or for "auto" on Hopper "window"
    (wgmma's window kernel where a layer allows it and fills the GPU, else mma.sync: measured
    faster on the exam layers at N=32 and 256, slower at N=1, RESULTS.md), elsewhere "mma"."""
    if option != "auto":
        return option
    return "window" if arch in WGMMA_ARCHS else "mma"


def conv_kernel(precision: Precision, int8_path: str, path: str = "simt") -> tuple[str, str]:
    """(module, name prefix) of the implicit-GEMM kernel for a precision (path: the resolved path
    of FP32 / INT32 / INT16, resolve_path)."""
    if precision is Precision.INT8:  # "window": its other layers run mma.sync
        return _CONV["mma" if int8_path == "window" else int8_path]
    if path == "mma" and precision in _PLANE_KEY:
        return _CONV[_PLANE_KEY[precision]]
    return _CONV["tf32x3" if path == "tf32x3" else precision]


def resolve_path(precision: Precision, option: str) -> str:
    """The FP32 / INT32 / INT16 path actually run ("auto": PATH_AUTO); INT8 has int8_path: "simt"."""
    if precision not in PATHS:
        return "simt"
    return PATH_AUTO[precision] if option == "auto" else option


def tensor_cores(precision: Precision, int8_path: str, path: str) -> bool:
    """The resolved paths run the mma-style kernels (32-word K stages, MMA tiling rules)."""
    return path in ("mma", "tf32x3") or (precision is Precision.INT8 and int8_path in ("mma", "wgmma", "window"))


def tiles_for(precision: Precision, int8_path: str = "mma", path: str = "simt") -> tuple[str, ...]:
    """The block tiles of the implicit-GEMM kernel a precision/path runs."""
    if precision is Precision.INT8 and int8_path in ("mma", "wgmma", "window"):
        return {"mma": MMA_TILES + SLIM_TILES, "wgmma": WGMMA_TILES,
                "window": WINDOW_TILES + MMA_TILES + SLIM_TILES}[int8_path]
    if path == "mma" and precision in PLANE_TILES:
        return PLANE_TILES[precision]
    return TF32X3_TILES if path == "tf32x3" else TILES


def tile_shape(tile: str) -> tuple[int, int]:
    """(BM, BN) of a block tile's name: "BMxBN", "BMxBN/w4" or an outer tile "BMxBN/TMxTN"."""
    bm, bn = tile.split("/")[0].split("x")
    return int(bm), int(bn)


def conv_name(prefix: str, tile: str) -> str:
    """The implicit-GEMM kernel entry point of a block tile ("BMxBN", or "BMxBN/w4": NAME_w4)."""
    return f"{prefix}_{tile.replace('/', '_')}"


def outer_name(tile: str) -> str:
    return "qconv_f32_conv_outer_" + tile.replace("/", "_")


def outer_threads(tile: str) -> int:
    (bm, bn), (tm, tn) = (tuple(int(v) for v in part.split("x")) for part in tile.split("/")[:2])
    return bm * bn // (tm * tn)


def dw_kernel(precision: Precision, vector: bool, kh: int = 0, kw: int = 0, sw: int = 0) -> str:
    """The depthwise kernel: vector (4 channels, aligned, no channel multiplier) or scalar; the vector
    kernel has compile-time specializations for square kernels and column strides in DW_FIXED."""
    c, w = DW_TILE if vector else (1, DW_TILE[1])
    name = f"qconv_{'f32' if precision is Precision.FP32 else 'q32'}_dwconv_c{c}w{w}"
    if vector and kh == kw and (kh, sw) in (DW_FIXED if precision is Precision.FP32 else DW_FIXED_INT):
        name += f"_k{kh}s{sw}"
    return name


def kernel_names() -> dict[str, list[str]]:
    """Every kernel entry point, by module file: what the NVRTC compile test looks for."""
    out: dict[str, list[str]] = {}
    for key, (mod, prefix) in _CONV.items():
        tiles = {"mma": MMA_TILES + SLIM_TILES, "wgmma": WGMMA_TILES[len(WINDOW_TILES):],
                 "tf32x3": TF32X3_TILES}.get(key, TILES)
        if key in ("mma16", "mma32"):
            tiles = PLANE_TILES[Precision.INT16 if key == "mma16" else Precision.INT32]
        out.setdefault(mod, []).extend(conv_name(prefix, t) for t in tiles)
    out["conv_s8_wgmma.cu"] += [f"qconv_s8_conv_wgmma_window_n{bn}_b{nb}" for bn, nb in window_configs(128)] + [
        f"qconv_s8_conv_wgmma_ws_n{bn}" for bn in (128, 64)]
    out["conv_f32_outer.cu"] = [outer_name(t) for t in OUTER_TILES]
    out["conv_dw.cu"] = [dw_kernel(p, v) for p in (Precision.FP32, Precision.INT8) for v in (True, False)] + [
        dw_kernel(Precision.FP32, True, k, k, s) for k, s in DW_FIXED] + [
        dw_kernel(Precision.INT8, True, k, k, s) for k, s in DW_FIXED_INT]
    out["quant.cu"] = ["qconv_scan_x", "qconv_pad_x_f32", "qconv_epilogue", "qconv_gate_wait"] + [
        f"qconv_{k}_x_{s}" for k in ("quantize", "scan_quantize") for s in ("s8", "s16", "s32", "p16", "p32")]
    return out


def window_smem(spec: ConvSpec, lay: "GemmLayout", wo: int, bn: int, nbuf: int, bm: int = WINDOW_BM) -> int:
    """Shared memory of the window kernels: the block's weights [taps * Cp/16][bn][16 B] and nbuf
    windows [Cp/16][rows][16 B] of bm + (KH-1)*Wp + KW-1 rows (rounded up to 8)."""
    rows = roundup(bm + (spec.kh - 1) * (wo + spec.kw - 1) + spec.kw - 1, 8)
    return lay.taps * lay.icgp * bn + nbuf * lay.icgp * rows


def window_ws_config(spec: ConvSpec, lay: "GemmLayout", wo: int, smem_optin: int) -> tuple[int, int] | None:
    """(BN, shared memory) of the warp-specialized window kernel for a layer window_fits: the widest
    channel block whose weights leave room for at least two windows, as many as fit up to WS_NBUF's
    most (the kernel counts them from its dynamic shared memory); None where none fits, or where a
    pixel has more 16-byte chunks than the producer's 128 threads."""
    if lay.icgp // 16 > 128:
        return None
    for bn in ((128, 64) if lay.ocg > 64 else (64,)):
        base, one = window_smem(spec, lay, wo, bn, 0, WS_BM), window_smem(spec, lay, wo, 0, 1, WS_BM)
        nbuf = min(WS_NBUF[1], (smem_optin - WS_STATIC_SMEM - base) // one)
        if nbuf >= WS_NBUF[0]:
            return bn, base + nbuf * one
    return None


def window_configs(ocg: int) -> list[tuple[int, int]]:
    """(BN, windows) of the window kernels worth trying, best first when equally resident."""
    return ([(128, 2), (128, 1)] if ocg > 64 else []) + [(64, 2), (64, 1)]


def window_fits(spec: ConvSpec, lay: "GemmLayout", wo: int, smem_optin: int) -> bool:
    """The window kernel runs this layer: INT8, stride 1, one group, 32-byte channel padding, and
    its smallest block (64 channels, one window) fits in shared memory."""
    return (spec.stride == (1, 1) and spec.groups == 1 and lay.elem == 1 and lay.planes == 1
            and lay.icgp % 32 == 0 and window_smem(spec, lay, wo, 64, 1) <= smem_optin)


def roundup(a: int, b: int) -> int:
    return (a + b - 1) // b * b


# --------------------------------------------------------------------------- choices

def parse_tile(t: str, mma: bool = False, tiles: tuple[str, ...] | None = None) -> tuple[int, int]:
    if tiles is None:
        tiles = MMA_TILES if mma else TILES
    if t not in tiles:
        extra = "" if mma or tiles != TILES else f"; FP32 also {', '.join(OUTER_TILES)}"
        raise InputError(f"tile {t!r} is not one of {', '.join(tiles)} (or 'auto'{extra})")
    return tile_shape(t)


def window_pays(mp: int, m: int, oc: int, icg: int, groups: int, num_sms: int) -> bool:
    """"auto" takes the window kernel (where window_fits) once mma.sync's 128x64 blocks would give
    each SM at least 7 (m rows, oc output channels of each of `groups`), or, where C <= 32, once its
    padded grid of mp rows gives each SM one of its 128-row tiles (there the mma.sync loader's K
    tiles span taps and it loses from N=2 on). Below that the weights a block loads once are read
    for too few tiles, and int8_mma_tile's 4-warp tiles win. H100 sweep (bench_int8_auto.py,
    RESULTS.md 2026-12-05, night): 5.9 blocks a SM the 4-warp tile wins (exam 1 N=32 31.0 us
    against the window's 34.1), from 7.9 the window (ppocr N=32 41.6 against 43.6)."""
    if icg <= 32:
        return mp >= WINDOW_BM * num_sms
    return mma_blocks(m, oc, groups, 128, 64) >= 7 * num_sms


def mma_blocks(m: int, oc: int, groups: int, bm: int, bn: int) -> int:
    """The blocks of a bm x bn tile over m rows and oc output channels of each of `groups`."""
    return groups * math.ceil(m / bm) * math.ceil(oc / bn)


def int8_mma_tile(m: int, oc: int, groups: int, num_sms: int) -> str:
    """INT8 mma.sync's "auto" tile: 128x64/w4 where OC > 32 and it gives every SM two blocks,
    else 64x64/w4 where that gives every SM one, else "auto" (choose_tiling's rule over MMA_TILES,
    the small tiles of small layers). Fitted to the H100 sweep of 4 layers x N = 1-128 in
    RESULTS.md (2026-12-05, evening), where it picks the fastest mma.sync tile or one within 4%."""
    if oc > 32 and mma_blocks(m, oc, groups, 128, 64) >= 2 * num_sms:
        return "128x64/w4"
    return "64x64/w4" if mma_blocks(m, oc, groups, 64, 64) >= num_sms else "auto"


def choose_tiling(m: int, oc: int, ktiles: int, num_sms: int, tile: Any = "auto",
                  split_k: Any = "auto", mma: bool = False, groups: int = 1,
                  tiles: tuple[str, ...] | None = None) -> tuple[tuple[int, int], int]:
    """Block tile and K split (rules fitted to the H100 sweep in benchmarks/RESULTS.md); oc is the
    output channels of one group, and the grid has `groups` times the blocks.

    The largest tile (for the CUDA-core kernels only 128x64 and 64x64, or 64x32 when OC <= 32:
    128x128 and the small tiles lost on every measured layer) that gives every SM a block.
    (96x128, which fills the last wave on exam case 2 at N=32 where 128x128 leaves it 74% full,
    measured no faster: 32.3 vs 31.2 us; it stays selectable with tile="96x128".)
    Otherwise: the tensor-core kernel takes the smallest tile and no split (its short K loops
    lose more to the atomic adds than they gain); the CUDA-core kernels take 64x64 (64x32 for
    OC <= 32) and split K into up to 8 slices, aiming at three blocks per SM, at least 2 K tiles each.
    `tiles`: the tensor-core tiles when they are not MMA_TILES (the decomposed INT16/INT32 kernels;
    mma must be True), chosen by the same rule.
    """
    if tile != "auto":
        bm, bn = parse_tile(str(tile), mma, tiles)
    else:
        widest = max(32, 1 << max(0, (oc - 1).bit_length()))
        tiles = tuple(t for t in tiles or MMA_TILES if t not in SLIM_TILES) if mma else TILES[1:]
        every = [parse_tile(t, mma, tiles) for t in tiles]
        cands = [c for c in every if c[1] <= widest] or [e for e in every if e[1] == min(c[1] for c in every)]
        if not mma:  # small CUDA-core tiles lost to 64x64 + split-K on every measured layer
            cands = [c for c in cands if c[0] >= 64 and (c[1] >= 64 or oc <= 32)]
        fits = [c for c in cands if groups * math.ceil(m / c[0]) * math.ceil(oc / c[1]) >= num_sms]
        if fits:
            bm, bn = fits[0]
        elif mma:
            bm, bn = cands[-1]
        else:
            bm, bn = (64, 64) if oc > 32 else (64, 32)
    blocks = groups * math.ceil(m / bm) * math.ceil(oc / bn)
    if split_k == "auto":
        split = 1
        if blocks < num_sms and not mma:
            split = max(1, min(math.ceil(3 * num_sms / blocks), 8, ktiles // 2))
    else:
        if isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1:
            raise InputError(f"split_k must be 'auto' or a positive int, got {split_k!r}")
        split = min(split_k, ktiles)
    return (bm, bn), split


def grid1(total: int, num_sms: int, per_sm: int = 16) -> tuple[int, int, int]:
    """Blocks of BLOCK threads for a grid-stride loop over `total` items."""
    return (max(1, min(math.ceil(total / BLOCK), num_sms * per_sm)), 1, 1)
