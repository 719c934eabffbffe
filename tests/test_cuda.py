"""The cuda backend.

Without a GPU (CI): every kernel module compiles through NVRTC for sm_80 and sm_90 and holds every
kernel entry point, compile errors carry the NVRTC log, the disk cache works, and the backend
reports itself unavailable cleanly. With a GPU: a hypothesis differential suite against the
reference backend (integers bit for bit, FP32 within contract.fp32_error_bound), tile-boundary
shapes, every tile and split-K, the exam and real layers, device-array inputs, and a leak check.

GPU run: QCONV_HYPOTHESIS_PROFILE=gpu PYTHONPATH=src python3 -m pytest tests/test_cuda.py
"""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import example, given, strategies as st

import qconv
from qconv import QconvError
from qconv.backends import BackendUnavailable
from qconv.backends import cuda as cb
from qconv.contract import Plan, Precision, conv2d_float64, fp32_error_bound
from qconv.tensorfile import load as load_tensor

from conftest import EXAM, REAL, exam_cases, real_layers
from strategies import conv_problems

AVAILABLE, REASON = cb.is_available()
gpu = pytest.mark.skipif(not AVAILABLE, reason=f"cuda backend unavailable: {REASON}")
ARCHS = ("sm_80", "sm_90")
PATHS = [("fp32", None), ("int32", None), ("int16", None), ("int8", "mma"), ("int8", "dp4a")]


def _nvrtc_or_skip():
    try:
        from cuda.bindings import nvrtc  # noqa: F401
        from qconv.backends import _nvrtc
        _nvrtc.version()
    except Exception as e:  # only NVRTC itself missing is a reason to skip
        pytest.skip(f"NVRTC is not importable here: {e}")
    return _nvrtc


# --------------------------------------------------------------------------- no GPU needed

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
    # a different arch or option is another key
    assert nv.cache_key("quant.cu", "sm_80") != nv.cache_key("quant.cu", "sm_90")
    assert nv.cache_key("quant.cu", "sm_90", ("-G",)) != nv.cache_key("quant.cu", "sm_90")


def test_compile_error_carries_nvrtc_log():
    nv = _nvrtc_or_skip()
    with pytest.raises(QconvError, match="NVRTC log") as e:
        nv.compile_source('extern "C" __global__ void k() { undeclared_thing = 1; }', {}, "bad.cu", "sm_90")
    assert "undeclared_thing" in str(e.value)


def test_availability_is_a_reason_never_an_exception():
    ok, reason = cb.is_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    status = qconv.available_backends()["cuda"]
    assert status == (ok, reason)
    if not ok:
        assert "pip install qconv[cuda]" in reason or "GPU" in reason
        with pytest.raises(BackendUnavailable, match="cuda"):
            qconv.backends.get("cuda")
        # auto falls back to something that works
        x = np.ones((1, 3, 3, 2), np.float32)
        w = np.ones((3, 3, 2, 2), np.float32)
        assert qconv.conv2d(x, w, "int8", scale=1.0).shape == (1, 3, 3, 2)


def test_unknown_options_are_refused_before_any_gpu_work():
    x = np.ones((1, 3, 3, 2), np.float32)
    w = np.ones((3, 3, 2, 2), np.float32)
    with pytest.raises(QconvError, match="bogus"):
        cb.run(Plan(Precision.FP32, options={"bogus": 1}), x, w)


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
    with pytest.raises(QconvError):
        cb.choose_tiling(10, 10, 40, 132, tile="7x7")
    with pytest.raises(QconvError):
        cb.choose_tiling(10, 10, 40, 132, tile="96x128")  # tensor-core only
    with pytest.raises(QconvError):
        cb.choose_tiling(10, 10, 40, 132, split_k=0)


def test_fp32_outer_tiles_are_consistent():
    names = cb.kernel_names()["conv_f32_outer.cu"]
    for t in cb.OUTER_TILES:
        (bm, bn), (tm, tn) = (tuple(int(v) for v in part.split("x")) for part in t.split("/")[:2])
        assert f"{bm}x{bn}" in cb.TILES and cb._outer_name(t) in names
        assert cb._outer_threads(t) == bm * bn // (tm * tn) and cb._outer_threads(t) % 32 == 0
    assert all(v is None or v in cb.OUTER_TILES for v in cb.F32_AUTO.values())
    with pytest.raises(QconvError, match="128x64/8x8"):
        cb.choose_tiling(10, 10, 40, 132, tile="128x64/2x2")


# --------------------------------------------------------------------------- GPU: differential

def _run_both(x, w, precision, path, scale=None, rounding="nearest", **opts):
    if path:
        opts["int8_path"] = path
    kw = {} if precision == "fp32" else {"scale": scale, "rounding": rounding}
    got = qconv.conv2d_result(x, w, precision, backend="cuda", **kw, **opts)
    if precision == "fp32":
        return got, None
    ref = qconv.conv2d_result(x, w, precision, backend="reference", **kw)
    return got, ref


def _assert_matches(x, w, precision, got, ref):
    y = got.output
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == x.shape[:3] + (w.shape[2],)
    if precision == "fp32":
        err = np.abs(y.astype(np.float64) - conv2d_float64(x, w))
        bound = fp32_error_bound(x, w)
        assert np.all(err <= bound), f"max excess {np.max(err - bound)}"
    else:
        bad = np.flatnonzero(y.view(np.uint32) != ref.output.view(np.uint32))
        assert bad.size == 0, f"{bad.size} outputs differ, first at {np.unravel_index(bad[0], y.shape)}: " \
                              f"{y.flat[bad[0]]!r} vs {ref.output.flat[bad[0]]!r}"


@gpu
@pytest.mark.parametrize("precision,path", PATHS)
@given(data=st.data())
@example(data=None)
def test_differential_random(precision, path, data):
    if data is None:  # pinned: channels not a multiple of any vector width, even kernel, N > 1
        rng = np.random.default_rng(1)
        x = rng.standard_normal((2, 5, 7, 3)).astype(np.float32) * 40
        w = rng.standard_normal((2, 4, 5, 3)).astype(np.float32) * 0.25
        scale, rounding = 64.0, "nearest"
    else:
        x, w = data.draw(conv_problems(max_n=3, max_hw=12, max_c=40))
        scale = data.draw(st.sampled_from([None, 1.0, 3.0, 127.0, 2.0**15, 2.0**20, 1e9]))
        rounding = data.draw(st.sampled_from(["nearest", "truncate"]))
    got, ref = _run_both(x, w, precision, path, scale, rounding)
    _assert_matches(x, w, precision, got, ref)


# Tile-boundary sizes: M = N*H*W and OC below, at, above and multiples of 32/64/128; C around the
# 16-byte vector widths (4 floats, 8 int16, 16 int8); K around the 16/32-word stage.
BOUNDARY = [
    ((1, 4, 8, 16), (3, 3, 32, 16)),      # M = 32, OC = 32
    ((1, 4, 8, 16), (3, 3, 31, 16)),
    ((1, 3, 11, 17), (3, 3, 33, 17)),     # M = 33
    ((1, 8, 16, 64), (3, 3, 64, 64)),     # M = 128, OC = 64
    ((1, 9, 15, 63), (3, 3, 65, 63)),     # M = 135
    ((2, 8, 8, 8), (1, 1, 128, 8)),       # M = 128, OC = 128, 1x1
    ((1, 16, 16, 4), (5, 5, 129, 4)),     # OC = 129, 5x5
    ((3, 7, 9, 1), (3, 3, 7, 1)),         # C = 1
    ((1, 6, 6, 15), (4, 4, 16, 15)),      # even kernel
    ((1, 2, 2, 32), (7, 7, 8, 32)),       # kernel larger than the input
]


@gpu
@pytest.mark.parametrize("precision,path", PATHS)
@pytest.mark.parametrize("shapes", BOUNDARY, ids=lambda s: "x".join(map(str, s[0])) + "-" + "x".join(map(str, s[1])))
def test_tile_boundaries(precision, path, shapes):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shapes[0]) * 3).astype(np.float32)
    w = (rng.standard_normal(shapes[1]) * 0.3).astype(np.float32)
    got, ref = _run_both(x, w, precision, path, "maxabs")
    _assert_matches(x, w, precision, got, ref)


@gpu
@pytest.mark.parametrize("precision,path", PATHS)
@pytest.mark.parametrize("tile", cb.MMA_TILES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_every_tile_and_split(precision, path, tile, split_k):
    if tile not in cb.TILES and path != "mma":
        pytest.skip(f"{tile} is a tensor-core tile only")
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((2, 9, 13, 24)) * 3).astype(np.float32)
    w = (rng.standard_normal((3, 3, 70, 24)) * 0.3).astype(np.float32)
    for fuse in (True, False):
        got, ref = _run_both(x, w, precision, path, 200.0, tile=tile, split_k=split_k, fuse_dequantize=fuse)
        _assert_matches(x, w, precision, got, ref)


@gpu
@pytest.mark.parametrize("tile", cb.OUTER_TILES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_fp32_outer_every_tile_and_split(tile, split_k):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((2, 9, 13, 24)) * 3).astype(np.float32)
    w = (rng.standard_normal((3, 3, 70, 24)) * 0.3).astype(np.float32)
    got, _ = _run_both(x, w, "fp32", None, tile=tile, split_k=split_k)
    _assert_matches(x, w, "fp32", got, None)


@gpu
@pytest.mark.parametrize("tile", cb.OUTER_TILES)
@pytest.mark.parametrize("shapes", BOUNDARY, ids=lambda s: "x".join(map(str, s[0])) + "-" + "x".join(map(str, s[1])))
def test_fp32_outer_tile_boundaries(tile, shapes):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shapes[0]) * 3).astype(np.float32)
    w = (rng.standard_normal(shapes[1]) * 0.3).astype(np.float32)
    for split_k in (1, 2):
        got, _ = _run_both(x, w, "fp32", None, tile=tile, split_k=split_k)
        _assert_matches(x, w, "fp32", got, None)


@gpu
def test_fp32_kernel_choice():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 16, 16, 32)).astype(np.float32)
    w = rng.standard_normal((3, 3, 64, 32)).astype(np.float32)
    k = lambda **o: cb.profile(Plan(Precision.FP32, options=o), x, w, reps=1)["kernel"]  # noqa: E731
    (bm, bn), _ = cb.choose_tiling(4 * 16 * 16, 64, 288 // 16, cb._runtime().num_sms)
    auto = cb.F32_AUTO.get((bm, bn))
    assert k() == (cb._outer_name(auto) if auto else f"qconv_f32_conv_simt_{bm}x{bn}")
    assert k(tile="64x64") == "qconv_f32_conv_simt_64x64"           # the SIMT kernel stays reachable
    assert k(tile="64x64/4x4") == "qconv_f32_conv_outer_64x64_4x4"


@gpu
@pytest.mark.parametrize("precision,path", [p for p in PATHS if p[0] != "fp32"])
def test_overflow_wraps_like_the_reference(precision, path):
    # full-range operands with K = 9 * 64: int32/int16 accumulators wrap; the bits must still agree
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (1, 10, 10, 64)).astype(np.float32)
    w = rng.uniform(-1, 1, (3, 3, 16, 64)).astype(np.float32)
    qmax = Precision(precision).qmax
    got, ref = _run_both(x, w, precision, path, float(qmax))
    _assert_matches(x, w, precision, got, ref)
    big = qconv.conv2d(x * 1e30, w, precision, backend="cuda", scale=1e9, int8_path=path or "mma")
    refbig = qconv.conv2d(x * 1e30, w, precision, backend="reference", scale=1e9)
    assert np.array_equal(big.view(np.uint32), refbig.view(np.uint32))  # saturation past int32


@gpu
@pytest.mark.parametrize("precision,path", PATHS)
@pytest.mark.parametrize("case", exam_cases())
@pytest.mark.parametrize("n", [1, 3])
def test_exam_cases(precision, path, case, n):
    if not EXAM.exists():
        pytest.skip(f"{EXAM} is absent")
    x = load_tensor(EXAM / case / "input_tensor.bin")
    w = load_tensor(EXAM / case / "kernel_tensor.bin")
    x = np.concatenate([x] + [x[:, ::-1] for _ in range(n - 1)]) if n > 1 else x
    x = np.ascontiguousarray(x)
    got, ref = _run_both(x, w, precision, path, "maxabs")
    _assert_matches(x, w, precision, got, ref)


@gpu
@pytest.mark.parametrize("precision,path", PATHS)
@pytest.mark.parametrize("layer", real_layers() or ["(absent)"])
def test_real_layers(precision, path, layer):
    if layer == "(absent)":
        pytest.skip(f"{REAL} is absent")
    x = load_tensor(REAL / layer / "input_tensor.bin")
    w = load_tensor(REAL / layer / "kernel_tensor.bin")
    got, ref = _run_both(x, w, precision, path, "maxabs")
    _assert_matches(x, w, precision, got, ref)
    if precision != "fp32":
        got, ref = _run_both(x, w, precision, path, 2.0**10)  # an S that overflows INT32/INT16
        _assert_matches(x, w, precision, got, ref)


@gpu
def test_phases_are_timed():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 16, 32)).astype(np.float32)
    w = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    r = qconv.conv2d_result(x, w, "int8", backend="cuda", scale=20.0, fuse_dequantize=False)
    for p in ("quantize", "transfer", "convolve", "dequantize"):
        assert r.phases[p] > 0, p
    r = qconv.conv2d_result(x, w, "fp32", backend="cuda")
    assert r.phases["convolve"] > 0 and r.phases["pack"] > 0


@gpu
def test_bad_options():
    x = np.ones((1, 3, 3, 2), np.float32)
    w = np.ones((3, 3, 2, 2), np.float32)
    with pytest.raises(QconvError, match="int8_path"):
        qconv.conv2d(x, w, "int8", backend="cuda", scale=1.0, int8_path="wmma")
    with pytest.raises(QconvError, match="tile"):
        qconv.conv2d(x, w, "int8", backend="cuda", scale=1.0, tile="8x8")


# --------------------------------------------------------------------------- GPU: device arrays

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
@pytest.mark.parametrize("kind", ["cai", "dlpack"])
def test_device_arrays_stay_on_device(precision, path, kind):
    torch = _torch_cuda()
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 11, 9, 20)) * 2).astype(np.float32)
    w = (rng.standard_normal((3, 3, 24, 20)) * 0.5).astype(np.float32)
    xt, wt = torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda()
    if kind == "dlpack":
        xt, wt = _DLPackOnly(xt), _DLPackOnly(wt)
    kw = {} if precision == "fp32" else {"scale": 30.0}
    opts = {"int8_path": path} if path else {}
    r = qconv.conv2d_result(xt, wt, precision, backend="cuda", **kw, **opts)
    assert isinstance(r.output, cb.DeviceArray)
    assert r.phases["transfer"] == 0.0
    host = qconv.conv2d(x, w, precision, backend="cuda", **kw, **opts)
    back = torch.as_tensor(r.output, device="cuda").cpu().numpy()
    assert np.array_equal(np.asarray(r.output), back)
    if precision == "fp32":  # split-K float atomics: any summation order, within the bound
        err = np.abs(back.astype(np.float64) - conv2d_float64(x, w))
        assert np.all(err <= fp32_error_bound(x, w))
    else:
        assert np.array_equal(back.view(np.uint32), host.view(np.uint32))


@gpu
def test_device_arrays_refused_when_wrong():
    torch = _torch_cuda()
    x = torch.ones((1, 4, 4, 8), device="cuda")
    w = torch.ones((3, 3, 8, 8), device="cuda")
    with pytest.raises(QconvError, match="float32"):
        qconv.conv2d(x.double(), w.double(), "int8", backend="cuda", scale=1.0)
    with pytest.raises(QconvError, match="contiguous"):
        qconv.conv2d(x.permute(0, 2, 1, 3), w, "int8", backend="cuda", scale=1.0)
    bad = x.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(QconvError, match="non-finite"):
        qconv.conv2d(bad, w, "int16", backend="cuda", scale=1.0)
    badw = w.clone()
    badw[0, 0, 0, 0] = float("inf")
    with pytest.raises(QconvError, match="kernel holds non-finite"):
        qconv.conv2d(x, badw, "int8", backend="cuda", scale=1.0)


# --------------------------------------------------------------------------- GPU: leaks

def _free_bytes() -> int:
    from cuda.bindings import driver
    cb._runtime().make_current()
    err, free, _ = driver.cuMemGetInfo()
    assert err == driver.CUresult.CUDA_SUCCESS
    return int(free)


@gpu
def test_ten_thousand_calls_leak_nothing():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 8, 8, 16)).astype(np.float32)
    w = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    for p in ("fp32", "int8"):  # warm: modules loaded, pool sized
        qconv.conv2d(x, w, p, backend="cuda", **({} if p == "fp32" else {"scale": 8.0}))
    before = _free_bytes()
    first = None
    for i in range(10_000):
        p = ("fp32", "int32", "int16", "int8")[i % 4]
        y = qconv.conv2d(x, w, p, backend="cuda", **({} if p == "fp32" else {"scale": 8.0}))
        if i == 3:
            first = y
    assert np.array_equal(y.view(np.uint32), qconv.conv2d(x, w, "int8", backend="reference", scale=8.0).view(np.uint32))
    assert first is not None
    assert before - _free_bytes() <= 4 << 20


@gpu
def test_device_outputs_are_freed():
    torch = _torch_cuda()
    x = torch.randn((1, 32, 32, 16), device="cuda")
    w = torch.randn((3, 3, 16, 16), device="cuda")
    qconv.conv2d(x, w, "int8", backend="cuda", scale=8.0)
    torch.cuda.synchronize()
    before = _free_bytes()
    for _ in range(2000):
        y = qconv.conv2d(x, w, "int8", backend="cuda", scale=8.0)
    del y
    assert before - _free_bytes() <= 4 << 20
