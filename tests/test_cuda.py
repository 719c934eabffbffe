"""The cuda backend's own things; its differential tests are in test_differential.py with every
other backend's (every cuda variant, tiles from cb.tiles, which reads _tiling).

Without a GPU (CI): every kernel module compiles through NVRTC for sm_80 and sm_90 (the wgmma module
for sm_90a only, and is refused for sm_80 naming both) and holds every
kernel entry point (a compile failure fails; only a missing cuda-python/NVRTC skips, with the
reason), the ctypes parameter structs match the C structs field for field, tile and option
rules, the tiles the backend declares, and the backend reports itself unavailable cleanly. (The
numpy models of the kernels' index math are in test_cuda_models.py.)

With a GPU: every tile and split-K, the FP32 kernel choice, device arrays (torch, CUDA array
interface, DLPack, qconv's own; unaligned), maxabs on the device == host bit for bit (and s_x ==
contract.maxabs_scale), non-finite device inputs, phases and timing=False, streams, threads on
device arrays, 10,000 prepared calls without device-memory growth.

GPU run: QCONV_HYPOTHESIS_PROFILE=gpu PYTHONPATH=src python3 -m pytest tests/test_cuda.py tests/test_differential.py
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import qconv
from checks import assert_matches, assert_same_bits, nvrtc_or_skip
from qconv.backends import BackendUnavailable
from qconv.backends import cuda as cb
from qconv.backends.cuda import _driver, _launch, _tiling
from qconv.contract import Plan, Precision, maxabs_scale
from qconv.errors import BackendError, InputError
from qconv.scales import maxabs_q

AVAILABLE, REASON = cb.is_available()
gpu = pytest.mark.skipif(not AVAILABLE, reason=f"cuda backend unavailable: {REASON}")
ARCHS = ("sm_80", "sm_90")


def _kernel_paths() -> list[tuple[Precision, dict]]:
    """(precision, options) once per kernel path the cuda variants run (FP32 on the CUDA cores and
    as TF32 products; INT32/INT16 on the CUDA cores and by byte planes; INT8 mma and dp4a): one per
    bounding instruction."""
    seen: dict = {}
    for opts in cb.variants() + cb.variants_for_tests():
        for p in Precision:
            seen.setdefault((p, cb.bound_instruction(opts, p)), (p, opts))
    return list(seen.values())


PATHS = _kernel_paths()
PATH_IDS = [f"{p.value}-{cb.bound_instruction(o, p)[0]}" for p, o in PATHS]
KERNEL_DIR = Path(cb.__file__).resolve().parent.parent / "cuda_kernels"


# =========================================================================== no GPU needed

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", sorted(cb.kernel_names()))
def test_every_kernel_compiles(module, arch, tmp_path, monkeypatch):
    nv = nvrtc_or_skip()
    assert module in nv.modules()
    monkeypatch.setenv("QCONV_CACHE_DIR", str(tmp_path))
    need = nv.ARCH_SPECIFIC.get(module)
    if need not in (None, arch):  # an sm_90a module on another arch: refused, naming both
        with pytest.raises(BackendError, match=f"{need}a.*{arch}"):
            nv.compile_module(module, arch, use_disk=False)
        return
    cubin = nv.compile_module(module, arch, use_disk=False)
    assert cubin[:4] == b"\x7fELF"
    for name in cb.kernel_names()[module]:
        assert name.encode() + b"\0" in cubin, f"{name} missing from {module} ({arch})"


def test_every_module_is_listed():
    nv = nvrtc_or_skip()
    assert sorted(nv.modules()) == sorted(cb.kernel_names())


def test_disk_cache_second_start_compiles_nothing(tmp_path, monkeypatch):
    nv = nvrtc_or_skip()
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
    nv = nvrtc_or_skip()
    with pytest.raises(BackendError, match="NVRTC log") as e:
        nv.compile_source('extern "C" __global__ void k() { undeclared_thing = 1; }', {}, "bad.cu", "sm_90")
    assert "undeclared_thing" in str(e.value)


def _c_structs() -> dict[str, list[tuple[str, str]]]:
    """Every `struct Name { ... };` in the kernel sources and headers (.cu, .cuh): [(field, C type)] in order."""
    out: dict[str, list[tuple[str, str]]] = {}
    for f in sorted(KERNEL_DIR.glob("*.cu")) + sorted(KERNEL_DIR.glob("*.cuh")):
        text = re.sub(r"//[^\n]*", "", f.read_text())
        for name, body in re.findall(r"struct\s+(\w+)\s*\{([^{}]*)\};", text):
            fields = []
            for decl in body.split(";"):
                decl = " ".join(decl.split())
                if not decl:
                    continue
                m = re.match(r"^(.*?[\s*])(\w+(?:\[\w+\])*(?:\s*,\s*\w+(?:\[\w+\])*)*)$", decl)
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


def test_held_maxabs_pass_constant_is_the_sources():
    src = (KERNEL_DIR / "quant.cu").read_text()
    assert re.search(r"^constexpr int XREGS = (\d+);", src, re.M).group(1) == str(_tiling.HELD_X4)


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


def test_paths_resolve_and_are_listed_as_variants():
    for prec in (Precision.INT16, Precision.INT32):
        assert _tiling.resolve_path(prec, "auto") == cb.PATH_AUTO[prec] in ("simt", "mma")
        assert _tiling.resolve_path(prec, "mma") == "mma"
        mod, prefix = _tiling.conv_kernel(prec, "mma", "mma")
        assert mod == "conv_planes_mma.cu" and all(f"{prefix}_{t}" in cb.kernel_names()[mod] for t in cb.PLANE_TILES[prec])
        assert _tiling.conv_kernel(prec, "mma", "simt")[1].endswith("_simt")
    assert _tiling.resolve_path(Precision.FP32, "auto") == cb.PATH_AUTO[Precision.FP32] in ("simt", "tf32x3")
    mod, prefix = _tiling.conv_kernel(Precision.FP32, "mma", "tf32x3")
    assert mod == "conv_f32_tf32x3.cu" and all(f"{prefix}_{t}" in cb.kernel_names()[mod] for t in _tiling.TF32X3_TILES)
    assert _tiling.resolve_path(Precision.INT8, "mma") == "simt"  # int8 has its own int8_path
    v = cb.variants()
    assert v[0] == {} and {"fp32_path", "int16_path", "int32_path"} <= {k for o in v for k in o}
    for o in v[1:]:
        (k, p), = o.items()
        assert p != cb.PATH_AUTO[Precision(k.split("_")[0])]  # the paths auto does not take
    # the tf32x3 path keeps a looser, stated FP32 bound; the others the contract's
    assert cb.fp32_bound({"fp32_path": "tf32x3"}) == _tiling.TF32X3_BOUND
    assert cb.fp32_bound({"fp32_path": "simt"}) == (2.0, 0.0)
    with pytest.raises(InputError, match="fp32_path"):
        cb.fp32_bound({"fp32_path": "tf32"})


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


@pytest.mark.parametrize("m, oc, tile", [
    (25088, 128, "128x64/w4"),   # exam 2, N=32: 392 blocks of 128x64
    (12544, 128, "64x64/w4"),    # exam 2, N=16: 196 blocks of 128x64 are under two per SM
    (25088, 64, "64x64/w4"),     # exam 1, N=8
    (266240, 24, "64x64/w4"),    # ppocr, N=64: OC <= 32 never takes the 64-column 128-row tile
    (3136, 64, "auto"),          # exam 1, N=1: choose_tiling's small tiles
    (784, 128, "auto"),
])
def test_int8_mma_auto_tile(m, oc, tile):
    assert _tiling.int8_mma_tile(m, oc, 1, 132) == tile


def test_int8_mma_auto_tile_counts_every_groups_blocks():
    assert _tiling.int8_mma_tile(3136, 64, 4, 132) == "64x64/w4"
    assert _tiling.int8_mma_tile(3136, 64, 32, 132) == "128x64/w4"


def test_window_pays_from_seven_mma_blocks_per_sm_or_one_padded_tile_for_few_channels():
    # exam 1 (56x56, OC=64): N=32 is 784 blocks of 128x64, 5.9 a SM (mma.sync); N=64 11.9 (window)
    assert not _tiling.window_pays(32 * 58 * 58, 32 * 3136, 64, 64, 1, 132)
    assert _tiling.window_pays(64 * 58 * 58, 64 * 3136, 64, 64, 1, 132)
    # exam 2 (28x28, OC=128, two column blocks): N=64 5.9 a SM, N=128 11.9
    assert not _tiling.window_pays(64 * 900, 64 * 784, 128, 128, 1, 132)
    assert _tiling.window_pays(128 * 900, 128 * 784, 128, 128, 1, 132)
    # ppocr (52x80, OC=24): N=32 7.9 a SM; the groups' blocks count as well
    assert _tiling.window_pays(32 * 54 * 82, 32 * 4160, 24, 96, 1, 132)
    assert not _tiling.window_pays(16 * 54 * 82, 16 * 4160, 24, 96, 1, 132)
    assert _tiling.window_pays(16 * 54 * 82, 16 * 4160, 24, 96, 2, 132)
    # mtcnn pnet.conv3 (153x153 padded, C=16): 1.4 padded tiles per SM at N=1
    assert _tiling.window_pays(153 * 153, 151 * 151, 32, 16, 1, 132)
    assert not _tiling.window_pays(153 * 153, 151 * 151, 32, 64, 1, 132)


def test_fp32_outer_tiles_are_consistent():
    names = cb.kernel_names()["conv_f32_outer.cu"]
    for t in cb.OUTER_TILES:
        (bm, bn), (tm, tn) = (tuple(int(v) for v in part.split("x")) for part in t.split("/")[:2])
        assert f"{bm}x{bn}" in cb.TILES and cb._outer_name(t) in names
        assert cb._outer_threads(t) == bm * bn // (tm * tn) and cb._outer_threads(t) % 32 == 0
    assert all(v is None or v in cb.OUTER_TILES for v in cb.F32_AUTO.values())


# =========================================================================== GPU: options and kernels

def _run(x, w, precision, opts=None, *, scale=None, **layer):
    """A cuda call with these options, checked against the contract (checks.assert_matches)."""
    q = {"scale": scale} if Precision(precision).is_integer else {}
    y = qconv.conv2d(x, w, precision, backend="cuda", **layer, **q, **(opts or {}))
    bias = layer.pop("bias", None)
    assert_matches(y, x, w, precision, layer, scale=scale, bias=bias, what=f"cuda {precision} {opts}",
                   fp32_bound=cb.fp32_bound(opts or {}))
    return y


@gpu
@pytest.mark.parametrize("precision,opts", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("split_k", [1, 3])
def test_every_tile_and_split(precision, opts, split_k):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((2, 9, 13, 24)) * 3).astype(np.float32)
    w = (rng.standard_normal((3, 3, 70, 12)) * 0.3).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    for tile in cb.tiles(opts, precision):
        for fuse in (True, False):
            _run(x, w, precision, {**opts, **tile.options, "split_k": split_k, "fuse_dequantize": fuse}, scale=200.0,
                 stride=2, padding=((1, 0), (2, 1)), groups=2, bias=b)


def test_declared_tiles_are_the_kernels_tiles():
    """cb.tiles names every block tile of the kernel a path runs (tile= selects it), FP32's outer
    tiles too, and the depthwise tile; each is a kernel entry point."""
    names = [n for mod in cb.kernel_names().values() for n in mod]
    for precision, opts in PATHS:
        declared = cb.tiles(opts, precision)
        int8_path, path = cb._paths(opts, precision)
        want = _tiling.tiles_for(precision, int8_path, path) + (cb.OUTER_TILES if path == "simt" and precision is Precision.FP32 else ())
        assert [t.options["tile"] for t in declared] == list(want)
        module, prefix = _tiling.conv_kernel(precision, int8_path, path)
        for t in declared:
            name = t.options["tile"]
            assert (t.dw_channels, t.dw_columns) == _tiling.DW_TILE
            wprefix = _tiling.conv_kernel(precision, "wgmma")[1]
            if name == "window":  # wgmma's window kernel: an entry point per channel block and windows
                assert {f"{wprefix}_window_n{bn}_b{nb}" for bn, nb in _tiling.window_configs(128)} <= set(names)
                assert (t.pixels[0], t.out_channels[0]) == (_tiling.WINDOW_BM, 128)
                continue
            if name == "window-ws":  # its warp-specialized form: an entry point per channel block
                assert {f"{wprefix}_ws_n{bn}" for bn in (128, 64)} <= set(names)
                assert (t.pixels[0], t.out_channels[0]) == (_tiling.WS_BM, 128)
                continue
            assert (cb._outer_name(name) if name in cb.OUTER_TILES else _tiling.conv_name(prefix, name)) in names
            assert (t.pixels[0], t.out_channels[0]) == tuple(int(v) for v in name.split("/")[0].split("x"))


@gpu
@pytest.mark.parametrize("precision", list(Precision), ids=lambda p: p.value)
def test_unaligned_device_input_takes_the_scalar_depthwise_kernel(precision):
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((1, 4, 9, 8)) * 3).astype(np.float32)
    w = (rng.standard_normal((3, 3, 8, 1)) * 0.3).astype(np.float32)
    big = cb.to_device(np.concatenate([np.zeros(1, np.float32), x.reshape(-1)]))
    q = {"scale": "maxabs"} if precision.is_integer else {}
    y = qconv.conv2d(_Shifted(big, 4, x.shape), w, precision, backend="cuda", groups=8, **q)
    assert_matches(y, x, w, precision, {"groups": 8}, **q)


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
@pytest.mark.parametrize("tile", cb.OUTER_TILES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_fp32_outer_every_tile_and_split(tile, split_k):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((2, 9, 13, 24)) * 3).astype(np.float32)
    w = (rng.standard_normal((3, 3, 70, 24)) * 0.3).astype(np.float32)
    b = rng.standard_normal(70).astype(np.float32)
    _run(x, w, "fp32", {"tile": tile, "split_k": split_k})
    _run(x[:, :, :, :12].copy(), w[..., :6].copy(), "fp32", {"tile": tile, "split_k": split_k},
         stride=(1, 2), padding="valid", groups=2, bias=b)


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


# =========================================================================== GPU: the prepared call

@gpu
@pytest.mark.parametrize("precision,opts", PATHS, ids=PATH_IDS)
def test_prepared_device_calls_equal_host_calls(precision, opts):
    """Device inputs through one prepared convolution, a device out= reused: the host call's bits
    (integers; maxabs scales change call to call) or the contract's bound (FP32: split-K atomics)."""
    rng = np.random.default_rng(12)
    w = (rng.standard_normal((3, 3, 16, 4)) * 0.3).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    q = {"scale": "maxabs-per-channel"} if precision.is_integer else {}
    layer = {"stride": 2, "groups": 2, "bias": b}
    conv = qconv.prepare(w, precision, "cuda", **layer, **q, **opts)
    yd = None
    for mag in (1.0, 1e3, 1e-2, 7.0):
        x = (rng.standard_normal((2, 9, 10, 8)) * mag).astype(np.float32)
        y = conv(x)
        yd = conv(cb.to_device(x)) if yd is None else conv(cb.to_device(x), out=yd)
        if precision.is_integer:
            assert_same_bits(yd, y, f"{precision.value} {opts} device")
        assert_matches(yd, x, w, precision, {"stride": 2, "groups": 2}, bias=b, **q)
    with pytest.raises(InputError, match="device array"):
        conv(cb.to_device(x), out=np.empty_like(y))


@gpu
@pytest.mark.parametrize("tile", _tiling.WINDOW_TILES)
def test_a_shape_runs_again_after_a_smaller_shape_of_the_same_kernel(tile):
    """One prepared convolution, two input widths whose window kernels need different shared memory
    past 48 KiB (the window's rows grow with the width: 3x3 taps reach two rows down): the wide, the
    narrow, then the wide again equal the reference (a function's shared-memory allowance must not
    shrink to the last shape's)."""
    if cb._arch() not in _tiling.WGMMA_ARCHS:
        pytest.skip(f"the window kernels run on {', '.join(_tiling.WGMMA_ARCHS)} GPUs only")
    rng = np.random.default_rng(17)
    w = (rng.standard_normal((3, 3, 64, 64)) * 0.2).astype(np.float32)
    conv = qconv.prepare(w, "int8", "cuda", scale="maxabs", int8_path="wgmma", tile=tile)
    wide, narrow = (rng.standard_normal((2, 30, 60, 64)).astype(np.float32),
                    rng.standard_normal((1, 9, 8, 64)).astype(np.float32))
    for x in (wide, narrow, wide):
        assert_matches(conv(x), x, w, Precision.INT8, scale="maxabs")


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
            assert_same_bits(dev.output, host.output, f"{precision} {strategy} device")
            assert_matches(host.output, x, kernel, precision, {"groups": groups}, scale=strategy)


@gpu
@pytest.mark.parametrize("precision,opts", [("int8", {"int8_path": "mma"}), ("int16", {"int16_path": "simt"})])
def test_maxabs_pass_holding_x_or_reading_it_twice_is_the_contracts(precision, opts):
    """The dense layout's maxabs pass holds x in registers (_tiling.HELD_X4 float4 a thread), then
    in shared memory too, while x fits the resident grid (threads holding none, one or all of
    their slots); past the grid (64 MB here) it reads x twice. Every way gives the reference's
    bits and the contract's scale."""
    rng = np.random.default_rng(16)
    c = 32
    w = (rng.standard_normal((1, 1, 8, c)) * 0.2).astype(np.float32)
    conv = qconv.prepare(w, precision, "cuda", scale="maxabs", **opts)
    suffix = _tiling.QUANT_SUFFIX[Precision(precision)]
    held = _driver.resident_blocks(_driver.runtime(), "quant.cu", f"qconv_scan_quantize_held_{suffix}", _tiling.BLOCK)
    in_regs = held * _tiling.BLOCK * _tiling.HELD_X4 * 4 // c  # pixels the registers hold
    one = held * _tiling.BLOCK * 4 // c                        # one float4 a thread
    for pixels, kernel, smem in ((3, "held", False), (one, "held", False), (in_regs, "held", False),
                                 (in_regs + 1, "held", True), (2**24 // c, "x", False)):
        x = rng.standard_normal((1, 1, pixels, c)).astype(np.float32)
        x[0, 0, pixels - 1, c - 1] = 40.0  # max|x| in the last float4: the held pass must scan it
        pre = conv._packed.job(conv.geometry(x.shape), True).pre
        assert (pre.name, pre.smem > 0) == (f"qconv_scan_quantize_{kernel}_{suffix}", smem)
        r = conv.result(cb.to_device(x))
        assert r.scale_input == float(maxabs_scale(x, maxabs_q(Precision(precision), c)))
        assert_matches(r.output, x, w, precision, scale="maxabs", what=f"{precision} {pixels} pixels")


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
            what = f"{precision} device after a refused call"
            if precision == "fp32":  # split-K's float atomics add in any order: the bound, not the bits
                assert_matches(conv(cb.to_device(x)), x, w, "fp32", {"groups": groups}, what=what)
            else:
                assert_same_bits(conv(cb.to_device(x)), good, what)


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


@pytest.mark.parametrize("kh, kw", [(16, 3), (3, 17)])
def test_kernels_past_the_loaders_tap_masks_are_refused(kh, kw):
    """The implicit-GEMM loader marks taps inside the input in 15 + 16 bits (qconv_common.cuh): a
    larger kernel gets a clear error, before any GPU is needed; depthwise layers take any size."""
    w = np.ones((kh, kw, 4, 4), np.float32)
    with pytest.raises(InputError, match=f"this one is {kh} x {kw}: use a CPU backend"):
        cb.Prepared(Plan(Precision.FP32), w)


@gpu
def test_a_plain_call_records_no_events(monkeypatch):
    """conv(x) returns the output alone, so it records no timing events; result() does."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 12, 12, 16)).astype(np.float32)
    w = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    conv = qconv.prepare(w, "int8", "cuda", scale="maxabs")
    xd = cb.to_device(x)
    rt = cb._runtime()
    recorded = []
    record = rt.record
    monkeypatch.setattr(rt, "record", lambda ev, s: (recorded.append(ev), record(ev, s))[1])
    y = conv(xd)
    assert recorded == []
    assert_matches(cb.to_host(y), x, w, "int8", scale="maxabs", what="cuda int8, a plain device call")
    r = conv.result(xd)
    assert len(recorded) >= 2 and r.phases["convolve"] > 0


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
    assert_matches(yt.cpu().numpy(), x, w, "int8", scale="maxabs")


@gpu
def test_threads_share_a_prepared_conv_with_device_inputs():
    """(Host inputs from several threads: test_differential.)"""
    rng = np.random.default_rng(17)
    w = (rng.standard_normal((3, 3, 32, 16)) * 0.3).astype(np.float32)
    conv = qconv.prepare(w, "int8", "cuda", scale="maxabs-per-channel")
    xs = [(rng.standard_normal((1, 10, 10, 16)) * 10 ** rng.uniform(-2, 3)).astype(np.float32) for _ in range(8)]
    refs = [qconv.conv2d(x, w, "int8", "reference", scale="maxabs-per-channel") for x in xs]

    def work(i):
        for _ in range(25):
            assert_same_bits(conv(cb.to_device(xs[i])), refs[i], f"thread {i}")

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(work, range(8)))   # a worker's assertion re-raises here


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
@pytest.mark.parametrize("precision,opts", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("kind", ["torch", "cai", "dlpack", "qconv"])
def test_device_arrays_stay_on_device(precision, opts, kind):
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
    q = {"scale": "maxabs"} if precision.is_integer else {}
    conv = qconv.prepare(w, precision, "cuda", **q, **opts)
    y = conv(xt)
    assert isinstance(y, cb.DeviceArray) and y.shape == (2, 11, 9, 24)
    host = conv(x)
    back = np.asarray(y)
    if precision.is_integer:
        assert_same_bits(back, host, f"{kind} {precision.value} {opts}")
    assert_matches(back, x, w, precision, **q)  # FP32: split-K float atomics sum in any order
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
    assert_matches(y, x, w, "int8", scale="maxabs")
    assert before - _free_bytes() <= 4 << 20
    for _ in range(300):  # one-shot calls free their prepared kernel
        qconv.conv2d(xd, w, "int8", backend="cuda", scale=8.0)
    assert before - _free_bytes() <= 4 << 20
