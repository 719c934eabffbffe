"""The CUDA backend: hand-written kernels compiled at run time by NVRTC, driven through cuda-python.

The whole contract runs on the GPU: stride, explicit and asymmetric padding and groups in the
implicit-GEMM kernels' index math (FP32, INT32, INT16 on the CUDA cores; INT8 with ``__dp4a`` or
the tensor cores' ``mma.sync`` s8 x s8 -> s32, or on Hopper ``wgmma.mma_async``), depthwise layers (groups == C) in their own
memory-bound kernels, per-output-channel dequantize factors and bias in the fused epilogue.
Integer results are bit-identical to the reference backend.

``prepare`` quantizes and packs the kernel once into device memory. A call with device arrays
(PyTorch, CuPy, DLPack, qconv's DeviceArray) enqueues a few kernels on one stream with no
allocation, module load or synchronization; maxabs input scales are computed on the device. Host
arrays go through pinned staging buffers and asynchronous copies, and the call returns when its
output is on the host.

Options (``qconv.prepare(w, ..., backend="cuda", **options)``):
    int8_path: "auto" (default: on Hopper the wgmma window kernel where a stride-1 layer allows it
        and gives every SM enough of its tiles (_tiling.window_pays), else mma.sync; elsewhere
        mma.sync; mma.sync's "auto" tile: _tiling.int8_mma_tile), "mma" (tensor cores' mma.sync),
        "wgmma" (Hopper's warpgroup MMA, sm_90 only: conv_s8_wgmma.cu) or "dp4a" (CUDA cores).
    int16_path, int32_path: "auto" (default: _tiling.PATH_AUTO, the faster path measured on the
        H200), "simt" (CUDA cores) or "mma" (tensor cores by exact 8-bit decomposition: 2 / 4 byte
        planes per value, mma.sync s8/u8 products combined modulo 2^32, conv_planes_mma.cu; the
        same bits).
    fp32_path: "auto" (default: _tiling.PATH_AUTO), "simt" (CUDA cores: FFMA) or "tf32x3" (tensor
        cores: each product as three TF32 mma.sync products, float32 sums, conv_f32_tf32x3.cu;
        within _tiling.TF32X3_BOUND, a looser bound than the contract's c = 2 for small K).
    tile: "auto" (default) or "BMxBN" from TILES (MMA_TILES for int8_path="mma", WGMMA_TILES for
        "wgmma", WINDOW_TILES and MMA_TILES for "auto" on Hopper), the block tile; "window-ws" runs the
        warp-specialized window kernel where its ring of windows fits, else "window";
        for FP32 also "BMxBN/TMxTN" from OUTER_TILES, the outer-product kernel (conv_f32_outer.cu);
        for INT8 mma.sync also "BMxBN/w4" from SLIM_TILES (4 warps, swizzled shared rows).
    split_k: "auto" (default) or a positive int, the number of K slices (atomic int32/float adds).
        Integer sums wrap modulo 2^32 in any order, so their bits never change; FP32 slices add in
        whatever order they finish, so an FP32 output may differ in its last bits from call to
        call (always within the contract's bound). split_k=1 makes FP32 repeatable.
    fuse_dequantize: True (default) dequantizes (+ bias) in the convolution's epilogue when
        split_k == 1 (same bits); False runs the separate epilogue kernel.
    stream: None (qconv's own stream, ordered with PyTorch's default stream) or the caller's stream
        (an int handle, a torch.cuda.Stream, a CuPy stream): every call is enqueued on it.
    timing: True (default) records CUDA events around each phase of a call whose phases can be
        read (Conv.result: ConvResult.phases); False skips them there too (the phases read 0).
        A plain call, conv(x), returns its output alone and records none either way.
(tile, split_k and int8_path apply to the implicit GEMM; depthwise layers run the depthwise kernels.)

Device outputs are DeviceArrays from a per-stream pool, returned to it when collected. Non-finite
inputs raise InputError: at the end of a call with host arrays; for device arrays when the call's
result is looked at (Conv.result, DeviceArray.copy_to_host / np.asarray / synchronize), since
the hot path never waits for the GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ...contract import Plan, Precision
from ..base import BackendRun, Tile, run_once
from ._arrays import DeviceArray, pinned_empty, to_device, to_host
from ._driver import INSTALL_HINT, is_available, runtime as _runtime  # noqa: F401 (tests, benchmarks)
from ._prepared import NAME, OPTIONS, Prepared, parse_options
from ._tiling import (DW_TILE, ELEM, F32_AUTO, INT8_PATHS, MMA_BKW, PATH_AUTO, PATHS, MMA_TILES, PLANES, PLANE_TILES, SLIM_TILES,
                      OUTER_TILES, TF32X3_BOUND, WGMMA_ARCHS, WGMMA_TILES, WINDOW_BM, WINDOW_TILES, WS_BM, SIMT_BKW, TILES, choose_tiling, kernel_names, outer_name as _outer_name,
                      outer_threads as _outer_threads, resolve_int8_path, resolve_path, tensor_cores, tile_shape, tiles_for)

ACCEPTS_DEVICE_ARRAYS = True

__all__ = ["NAME", "ACCEPTS_DEVICE_ARRAYS", "OPTIONS", "INSTALL_HINT", "is_available", "prepare", "run",
           "profile", "Prepared", "DeviceArray", "pinned_empty", "to_device", "to_host", "kernel_names", "choose_tiling", "TILES",
           "MMA_TILES", "SLIM_TILES", "WGMMA_TILES", "OUTER_TILES", "F32_AUTO", "INT8_PATHS", "PATHS", "PATH_AUTO", "PLANE_TILES",
           "release_pools", "variants", "variants_for_tests", "tiles", "bound_instruction", "fp32_bound"]


def variants() -> list[dict]:
    """The default and, for FP32, INT32 and INT16, each path that "auto" does not take (the
    tensor-core kernels or the CUDA-core kernel), so the study and tests time both."""
    out: list[dict] = [{}]
    for prec, paths in PATHS.items():
        out += [{f"{prec.value}_path": p} for p in paths if p not in ("auto", PATH_AUTO[prec])]
    return out


def variants_for_tests() -> list[dict]:
    """What the tests run besides variants(): INT8 on the CUDA cores (__dp4a), and on a Hopper GPU
    through wgmma."""
    out = [{"int8_path": "dp4a"}]
    if _arch() in WGMMA_ARCHS:  # the default runs the window kernel there: keep both others covered
        out += [{"int8_path": "wgmma"}, {"int8_path": "mma"}]
    return out


@functools.lru_cache(maxsize=None)
def _arch() -> str | None:
    """GPU 0's architecture ("sm_90"), or None without a usable GPU."""
    return _runtime().arch if is_available()[0] else None


def _paths(options: dict, precision: Precision) -> tuple[str, str]:
    """(int8_path, the FP32/INT32/INT16 path) these options run for a precision, resolved."""
    o = parse_options(options)
    int8_path = resolve_int8_path(o.int8_path, _arch() if o.int8_path == "auto" else None)
    return int8_path, resolve_path(precision, getattr(o, f"{precision.value}_path", "auto"))


def tiles(options: dict, precision: Precision) -> list[Tile]:
    """Every block tile (tile="BMxBN") of the implicit-GEMM kernel these options run for a precision,
    FP32's outer-product tiles too, with the channels of one K stage of a 1x1 kernel (and of one
    16-byte load less: a partial stage), and the depthwise kernels' channels x output columns
    (_tiling's constants, mirrored from the .cu files)."""
    precision = Precision(precision)
    int8_path, path = _paths(options, precision)
    mma = tensor_cores(precision, int8_path, path)
    elem = 1 if path == "mma" else ELEM[precision]      # byte planes: one byte per plane
    names = tiles_for(precision, int8_path, path) + (OUTER_TILES if precision is Precision.FP32 and path == "simt" else ())
    out = []
    for name in names:
        # the window kernels: 128 (warp-specialized: 64) rows of the padded grid x 64 or 128 channels
        bm, bn = ({"window": WINDOW_BM, "window-ws": WS_BM}[name], 128) if name in WINDOW_TILES else tile_shape(name)
        k_words = 8 if name.endswith("/k8") else MMA_BKW if mma else SIMT_BKW
        stage, chunk = k_words * 4 // elem, 16 // elem   # channels per K stage, per 16-byte load
        out.append(Tile({"tile": name}, (bm,), (bn,), (stage, stage - chunk), *DW_TILE))
    return out


# The instruction bounding each kernel, and how many of its multiply-adds one MAC of the
# precision takes (the byte-plane decomposition: the products of shift classes 0..3).
_BOUND = {"simt": {Precision.FP32: "ffma", Precision.INT32: "imad", Precision.INT16: "imad"},
          "mma": {Precision.INT16: "mma-s8", Precision.INT32: "mma-s8"},
          "tf32x3": {Precision.FP32: "mma-tf32"}}
_PRODUCTS = {**{p: sum(1 for i in range(n) for j in range(n) if i + j < 4) for p, n in PLANES.items()},
             Precision.FP32: 3}  # tf32x3: three TF32 products per term


def bound_instruction(options: dict, precision: Precision) -> tuple[str, int] | None:
    """(instruction, its multiply-adds per MAC): FP32 ffma or mma-tf32 (3 products), INT32/INT16 on
    the CUDA cores imad, INT8 mma-s8 / wgmma-s8 (tensor cores) or dp4a, INT16/INT32 by byte planes
    mma-s8 (4 / 10 products)."""
    precision = Precision(precision)
    int8_path, path = _paths(options, precision)
    if precision is Precision.INT8:
        return ({"mma": "mma-s8", "wgmma": "wgmma-s8", "window": "wgmma-s8"}.get(int8_path, "dp4a"), 1)
    return _BOUND[path][precision], (_PRODUCTS[precision] if path != "simt" else 1)


def fp32_bound(options: dict) -> tuple[float, float]:
    """(c, per_term) of contract.fp32_error_bound that these options' FP32 path keeps."""
    return TF32X3_BOUND if _paths(options, Precision.FP32)[1] == "tf32x3" else (2.0, 0.0)


def prepare(plan: Plan, w: np.ndarray) -> Prepared:
    return Prepared(plan, w)


def run(plan: Plan, x: Any, w: np.ndarray) -> BackendRun:
    """One-shot prepare(plan, w).run(x) (tests and benchmarks that hold a Plan)."""
    return run_once(prepare, plan, x, w)


def profile(plan: Plan, x: Any, w: np.ndarray, reps: int = 50) -> dict[str, Any]:
    """Median kernel times of `reps` back-to-back calls (Prepared.profile) for a one-shot plan."""
    import dataclasses

    from ...contract import conv_spec
    if plan.spec is None:
        plan = dataclasses.replace(plan, spec=conv_spec(w.shape))
    return prepare(plan, w).profile(x, reps)


def release_pools() -> None:
    """Free the pooled device outputs and scratch buffers that no array references."""
    from ._driver import current
    rt = current()
    if rt is not None:
        rt.make_current()
        rt.release_pools()
