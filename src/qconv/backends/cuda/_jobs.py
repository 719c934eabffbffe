"""Per-input-shape jobs of a prepared convolution: which kernels a call enqueues, their launch
configurations and parameter structs, built once per (geometry, input alignment); a call writes
pointers into the structs and enqueues (see _prepared.py for the paths, _tiling.py for the layouts)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ...contract import Geometry, Precision
from ...errors import InputError
from . import _driver, _layout, _tiling
from ._launch import ConvParams, DwParams, PassParams
from ._streams import StreamCtx

if TYPE_CHECKING:
    from ._prepared import Prepared
    from ._record import Record


class Job:
    """One input shape: launch configurations and parameter structs built once; a call writes
    pointers into them and enqueues. Stages: an optional pass before the main kernel (phase
    `first`), the main kernel ("convolve"), an optional epilogue pass (phase `last`)."""

    pre: "_driver.Launch | None" = None
    pre_writes: bool = False          # the pass writes the packed input (xq)
    post: "_driver.Launch | None" = None
    scan_in_main: bool = False        # the main kernel scans x for NaN/inf itself
    xq_bytes: int = 0
    split_words: int = 0
    first, last = "quantize", "dequantize"

    @property
    def n_events(self) -> int:
        return 2 + (self.pre is not None) + (self.post is not None)

    def enqueue(self, ctx: StreamCtx, x_ptr: int, out_ptr: int, rec: Record, ev0: int | None) -> None:
        rt, s, h = ctx.rt, ctx.stream, ctx.handle
        ev, i = rec.events, ev0
        xq = ctx.scratch("xq", self.xq_bytes) if self.xq_bytes else x_ptr
        if i is not None:
            rt.record(ev[i], h)
        if self.pre is not None:
            pp = self.pre.params
            pp.x = x_ptr
            if self.pre_writes:
                pp.out = xq
            self.pre.launch(s)
            if i is not None:
                rt.record(ev[i + 1], h)
                rec.marks.append((self.first, i, i + 1))
                i += 1
        if self.split_words:
            _driver.ck(rt.drv.cuMemsetD32Async(out_ptr, 0, self.split_words, s), "cuMemsetD32Async(output)")
        cp = self.main.params
        cp.x, cp.out = xq, out_ptr
        cp.slot = 0 if self.post is not None else rec.slot[1]  # the call's last kernel publishes its record
        if self.scan_in_main:
            cp.scan_x = x_ptr
        self.main.launch(s)
        if i is not None:
            rt.record(ev[i + 1], h)
            rec.marks.append(("convolve", i, i + 1))
            i += 1
        if self.post is not None:
            self.post.params.out, self.post.params.slot = out_ptr, rec.slot[1]
            self.post.launch(s)
            if i is not None:
                rt.record(ev[i + 1], h)
                rec.marks.append((self.last, i, i + 1))


class GemmJob(Job):
    """The implicit-GEMM kernels. Integers: [fused scan + quantize (maxabs, one cooperative
    launch) | quantize] -> convolve (+ dequantize, bias) [-> epilogue]. FP32: [pad] -> convolve
    (+ bias; scans x itself when it reads x in place) [-> bias and non-finite count after split-K]."""

    def __init__(self, prep: Prepared, g: Geometry, aligned: bool) -> None:
        rt, plan, prec, lay, spec, o = prep.rt, prep.plan, prep.prec, prep.layout, prep.spec, prep.opts
        assert lay is not None  # (a job keeps no reference to prep: no cycle, so a dropped Prepared is freed at once)
        m = g.n * g.ho * g.wo
        if max(m, g.n * g.h * g.w) > _tiling.INT_LIMIT:
            raise InputError(f"the cuda backend indexes pixels with 32-bit ints: {g.n}x{g.h}x{g.w} -> "
                             f"{g.n}x{g.ho}x{g.wo} is too large; split the batch")
        planes = lay.planes                    # > 1: INT16/INT32 as byte planes on the tensor cores
        path8 = prep.int8_path                 # resolved: mma, wgmma, dp4a or window (auto on Hopper)
        wgmma = prec is Precision.INT8 and path8 in ("wgmma", "window")
        if wgmma and rt.arch not in _tiling.WGMMA_ARCHS:
            raise InputError(f"int8_path 'wgmma' needs a Hopper GPU ({', '.join(_tiling.WGMMA_ARCHS)}); this one is "
                             f"{rt.arch}: use int8_path='mma'")
        mma = _tiling.tensor_cores(prec, path8, prep.path)
        tiles = _tiling.tiles_for(prec, path8, prep.path)
        bkw = _tiling.MMA_BKW if mma else _tiling.SIMT_BKW
        ktiles = lay.kpw // bkw
        tile, outer = o.tile, None
        if tile in _tiling.OUTER_TILES:
            if prec is not Precision.FP32 or prep.path != "simt":
                raise InputError(f"tile {tile!r} is an outer-product tile of fp32_path 'simt'")
            outer, tile = tile, tile.split("/")[0]
        # wgmma's window kernels: tile="window" / "window-ws", or "auto" where window_pays, over the
        # zero-padded grid of mp = N * hp * wp rows
        hp, wp = g.ho + spec.kh - 1, g.wo + spec.kw - 1
        mp = g.n * hp * wp
        window = (wgmma and tile in ("auto",) + _tiling.WINDOW_TILES and _tiling.window_fits(spec, lay, g.wo, rt.smem_optin)
                  and mp <= _tiling.INT_LIMIT
                  and (tile != "auto" or _tiling.window_pays(mp, m, lay.ocg, spec.icg, spec.groups, rt.num_sms)))
        ws = _tiling.window_ws_config(spec, lay, g.wo, rt.smem_optin) if window and tile == "window-ws" else None
        if tile in _tiling.WINDOW_TILES and wgmma:  # (other paths refuse the names in choose_tiling)
            tile = "auto" if window or path8 == "window" else "128x128"
        if path8 == "window" and not window:  # auto on Hopper: the rest runs mma.sync
            wgmma = False
        if tile == "auto" and prec is Precision.INT8 and path8 in ("mma", "window") and not wgmma:
            tile = _tiling.int8_mma_tile(m, lay.ocg, spec.groups, rt.num_sms)
        (bm, bn), split = _tiling.choose_tiling(m, lay.ocg, ktiles, rt.num_sms, tile, o.split_k, mma, spec.groups,
                                                tiles[len(_tiling.WINDOW_TILES):]
                                                if prec is Precision.INT8 and path8 in ("wgmma", "window")
                                                else tiles if mma else None)
        if window:
            bm, bn, split = _tiling.WS_BM if ws else _tiling.WINDOW_BM, 0, 1  # bn: chosen with the kernel below
        if prec is Precision.FP32 and prep.path == "simt" and tile == "auto":
            outer = _tiling.F32_AUTO.get((bm, bn))
        kps = math.ceil(ktiles / split)
        self.split = split = math.ceil(ktiles / kps)
        module, prefix = _tiling.conv_kernel(prec, "wgmma" if wgmma else path8, prep.path)
        if outer is not None:
            module, self.conv_name, self.smem, threads = "conv_f32_outer.cu", _tiling.outer_name(outer), 0, \
                _tiling.outer_threads(outer)
        elif window:
            self.conv_name, bn, threads, self.smem, fit = _window_kernel(rt, module, prefix, spec, lay, g.wo, ws)
        elif wgmma:  # 128-byte rows, 1 KiB-aligned swizzle atoms (one KiB of slack to align)
            self.smem = _tiling.WGMMA_STAGES * (bm + bn) * bkw * 4 + 1024
            self.conv_name, threads = f"{prefix}_{bm}x{bn}", 2 * bm
        else:
            stages = _tiling.PLANE_STAGES[prec] if planes > 1 else _tiling.STAGES
            wplanes = 2 if prep.path == "tf32x3" else planes  # tf32x3: the weights' big and small parts
            slim = tile in _tiling.SLIM_TILES  # 4 warps, swizzled rows without the 4-word padding
            self.smem = stages * (planes * bm + wplanes * bn) * (bkw + (0 if slim else 4)) * 4
            self.conv_name = _tiling.conv_name(prefix, tile if slim else f"{bm}x{bn}")
            threads = 128 if slim else 256
        self.grid = (math.ceil(m / bm), math.ceil(lay.ocg / bn), spec.groups * split)
        if window:  # persistent blocks over the padded grid's M tiles, per BN column, as many as fit
            cols = math.ceil(lay.ocg / bn)
            self.grid = (min(math.ceil(mp / bm), max(1, fit // cols)), cols, 1)
        fused = prec.is_integer and o.fuse_dequantize
        mode = 2 if split > 1 else (1 if fused else 0)
        npix = g.n * g.h * g.w
        nx = npix * spec.c
        vec_x = aligned and nx % 4 == 0
        self.scan_in_main = prec is Precision.FP32 and not lay.padded and aligned
        self.xq_bytes = 0 if self.scan_in_main else (mp if window else npix) * lay.xpw * 4
        self.split_words = m * spec.oc if split > 1 else 0   # zeroed before split-K's atomics
        st = prep.stats

        def pass_params(**kw: Any) -> PassParams:
            return PassParams(stats=st, s_w=prep.s_w_dev, inv=prep.inv_dev, bias=prep.bias_dev, OC=spec.oc,
                              C=spec.c, G=spec.groups, icg=lay.icg, icgp=lay.icgp, **kw)

        if prec.is_integer:
            self.first = "quantize"
            grid, qv, items = quantize_pass(g, lay, (hp, wp) if window else None, vec_x)
            p = pass_params(n=nx, q=plan.input_q or 0, qmax=prec.qmax, trunc=int(plan.truncate),
                            s=float(plan.s_x or 0.0), dev_scale=int(prep.maxabs), vec=int(qv), do_max=int(prep.maxabs),
                            **(grid or {}))
            suf = _tiling.QUANT_SUFFIX[prec] if planes == 1 else f"p{8 * _tiling.ELEM[prec]}"
            if prep.maxabs:  # one launch: scan, grid barrier, quantize (needs every block resident)
                self.pre = _scan_quantize(rt, suf, p, items, nx, qv, dense=grid is None)
            else:
                self.pre = _driver.Launch(rt, "quant.cu", f"qconv_quantize_x_{suf}", _tiling.grid1(items, rt.num_sms),
                                          256, 0, p)
            self.pre_writes = True
        elif not self.scan_in_main:
            self.first = "pack"
            grid, _, items = quantize_pass(g, lay, None, vec_x, fp32=True)
            assert grid is not None  # padded or unaligned: never the dense layout
            p = pass_params(n=nx, **grid)
            self.pre = _driver.Launch(rt, "quant.cu", "qconv_pad_x_f32", _tiling.grid1(items, rt.num_sms), 256, 0, p)
            self.pre_writes = True
        cp = ConvParams(w=prep.w_dev, inv=prep.inv_dev, bias=prep.bias_dev, stats=st, scan_n=nx if self.scan_in_main else 0,
                        wgs=lay.wgs(), N=g.n, H=g.h, W=g.w, Cw=lay.cw, XPW=lay.xpw, KH=spec.kh, KW=spec.kw, pt=g.pt,
                        pl=g.pl, sh=spec.stride[0], sw=spec.stride[1], Ho=g.ho, Wo=g.wo, OC=spec.oc, OCg=lay.ocg,
                        Kpw=lay.kpw, M=m, T=spec.kh * spec.kw, ktiles=ktiles, ktiles_per_split=kps, splits=split,
                        mode=mode, vec_out=1, scan_vec=int(vec_x), inv_uniform=int(not plan.per_channel))
        self.main = _driver.Launch(rt, module, self.conv_name, self.grid, threads, self.smem, cp,
                                   after_pass=self.pre is not None and not self.split_words)
        vec = spec.oc % 4 == 0
        grid = _tiling.grid1(m * spec.oc // (4 if vec else 1), rt.num_sms)
        if prec.is_integer and mode != 1:
            self.post = _driver.Launch(rt, "quant.cu", "qconv_epilogue", grid, 256, 0,
                                       pass_params(n=m * spec.oc, vec=int(vec), mode=1))
        elif prec is Precision.FP32 and split > 1:  # the sums are final here: bias, non-finite count
            self.post = _driver.Launch(rt, "quant.cu", "qconv_epilogue", grid, 256, 0,
                                       pass_params(n=m * spec.oc, vec=int(vec), mode=0))
            self.last = "convolve"


def _scan_quantize(rt: Any, suf: str, p: PassParams, items: int, nx: int, vec: bool, dense: bool) -> "_driver.Launch":
    """The maxabs pass, one cooperative launch: qconv_scan_quantize_held_* where the layout is
    dense and x fits the resident threads (HELD_X4 float4 each in registers, the rest in shared
    memory, as many blocks resident as without it): x read once; else qconv_scan_quantize_x_* (x
    read twice), its grid covering the scan's float4 too."""
    if dense:  # (float4 in, one suffix per precision: quantize_pass's dense layout)
        name, n4, b = f"qconv_scan_quantize_held_{suf}", nx // 4, _tiling.BLOCK
        resident = _driver.resident_blocks(rt, "quant.cu", name, b)
        per_thread = math.ceil(n4 / (resident * b))
        smem = max(0, per_thread - _tiling.HELD_X4) * b * 16
        if smem == 0 or (smem + 1024 <= rt.smem_optin and
                         _driver.resident_blocks(rt, "quant.cu", name, b, smem) == resident):
            blocks = min(resident, math.ceil(n4 / b))
            return _driver.Launch(rt, "quant.cu", name, (blocks, 1, 1), b, smem, p, cooperative=True)
    name = f"qconv_scan_quantize_x_{suf}"
    blocks = min(_tiling.grid1(max(items, nx // 4 if vec else nx), rt.num_sms)[0],
                 _driver.resident_blocks(rt, "quant.cu", name, _tiling.BLOCK))
    return _driver.Launch(rt, "quant.cu", name, (blocks, 1, 1), _tiling.BLOCK, 0, p, cooperative=True)


def quantize_pass(g: Geometry, lay: "_layout.GemmLayout", window: tuple[int, int] | None, vec_x: bool,
                  fp32: bool = False) -> tuple[dict[str, int] | None, bool, int]:
    """How quant.cu's quantize (or, fp32, pad) pass runs for a layer: the grid fields of its
    PassParams (None: the dense layout, read as float4 and written as it is), whether it may read
    float4 (vec), and how many items it walks (the launch's size). Every other layout is a grid that
    walk_padded covers: the window kernels' zero-padded one of `window` = (Hp, Wp) pixels, or the
    pixels as they are, their channels padded per group or split into byte planes."""
    npix = g.n * g.h * g.w
    if window is not None:
        grid = dict(N=g.n, H=g.h, W=g.w, Hp=window[0], Wp=window[1], pt=g.pt, pl=g.pl)
    elif lay.padded or lay.planes > 1 or not vec_x:
        grid = dict(N=g.n, H=g.h, W=g.w, Hp=g.h, Wp=g.w, pt=0, pl=0)
    else:
        return None, True, npix * lay.groups * lay.icg // 4
    if lay.planes > 1:
        per_item = 16
    elif fp32:
        per_item = 4
    else:  # quantize_grid's V: float4 where it can, else one 16-byte store
        per_item = 16 if vec_x and lay.icg % 16 == 0 else 4 if vec_x and lay.icg % 4 == 0 else 16 // lay.elem
    return grid, vec_x, g.n * grid["Hp"] * grid["Wp"] * lay.groups * lay.icgp // per_item


def _window_kernel(rt: Any, module: str, prefix: str, spec: Any, lay: Any, wo: int,
                   ws: tuple[int, int] | None) -> tuple[str, int, int, int, int]:
    """(name, BN, threads, shared memory, blocks resident on the GPU) of the window kernel that runs
    a layer: the warp-specialized one where `ws` (window_ws_config) says so, else the configuration
    with the most resident blocks (then more channels, more windows)."""
    if ws is not None:
        bn, smem = ws
        name, threads = f"{prefix}_ws_n{bn}", _tiling.WS_THREADS
        return name, bn, threads, smem, _driver.resident_blocks(rt, module, name, threads, smem)
    best = None
    for bn, nbuf in _tiling.window_configs(lay.ocg):
        smem = _tiling.window_smem(spec, lay, wo, bn, nbuf)
        if smem <= rt.smem_optin:
            name = f"{prefix}_window_n{bn}_b{nbuf}"
            fit = _driver.resident_blocks(rt, module, name, 256, smem)
            if best is None or fit > best[-1]:
                best = (name, bn, 256, smem, fit)
    assert best is not None  # window_fits checked the smallest
    return best


class DwJob(Job):
    """The depthwise kernels (groups == C): one pass that quantizes on load and scans the input for
    NaN/inf itself; with maxabs a scan pass first computes s_x and inv[o]."""

    def __init__(self, prep: Prepared, g: Geometry, aligned: bool) -> None:
        rt, plan, prec, spec = prep.rt, prep.plan, prep.prec, prep.spec
        mult = spec.oc // spec.groups
        vector = aligned and mult == 1 and spec.c % 4 == 0
        cv, tw = (_tiling.DW_TILE if vector else (1, _tiling.DW_TILE[1]))
        tiles_w = math.ceil(g.wo / tw)
        total = g.n * g.ho * tiles_w * (spec.oc // cv)
        if total > _tiling.INT_LIMIT or g.n * g.h * g.w * spec.c > 2**40:
            raise InputError(f"the depthwise kernel indexes its work with 32-bit ints: {g.out_shape} is too "
                             f"large; split the batch")
        nx = g.n * g.h * g.w * spec.c
        vec_x = aligned and nx % 4 == 0
        self.first = "quantize" if prec.is_integer else "pack"
        if prep.maxabs:
            p = PassParams(stats=prep.stats, s_w=prep.s_w_dev, inv=prep.inv_dev, OC=spec.oc, n=nx,
                           q=plan.input_q or 0, vec=int(vec_x), do_max=1)
            self.pre = _driver.Launch(rt, "quant.cu", "qconv_scan_x",
                                      _tiling.grid1(nx // 4 if vec_x else nx, rt.num_sms), 256, 0, p)
        self.scan_in_main = not prep.maxabs
        self.conv_name = _tiling.dw_kernel(prec, vector, spec.kh, spec.kw, spec.stride[1])
        dp = DwParams(w=prep.w_dev, inv=prep.inv_dev, bias=prep.bias_dev, stats=prep.stats,
                      scan_n=nx if self.scan_in_main else 0, N=g.n, H=g.h, W=g.w,
                      C=spec.c, KH=spec.kh, KW=spec.kw, pt=g.pt, pl=g.pl, sh=spec.stride[0], sw=spec.stride[1],
                      Ho=g.ho, Wo=g.wo, OC=spec.oc, mult=mult, tiles_w=tiles_w, s=float(plan.s_x or 0.0),
                      dev_scale=int(prep.maxabs), qmax=prec.qmax if prec.is_integer else 0,
                      trunc=int(plan.truncate), scan_vec=int(vec_x))
        self.grid = _tiling.grid1(total, rt.num_sms, per_sm=32)
        self.split, self.smem = 1, 0
        self.main = _driver.Launch(rt, "conv_dw.cu", self.conv_name, self.grid, _tiling.BLOCK, 0, dp,
                                   after_pass=self.pre is not None)
