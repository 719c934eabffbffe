"""c-scalar and c-avx2 (the C extension) against the reference backend.

Integer precisions: the output bits equal the reference's (wrap-around included), for both
roundings, single S and pairs, scales that force overflow, every kernel family this CPU has
(the VNNI kernels and, forced with isa="avx2", the plain AVX2 ones), 1..5 threads, several Python
threads at once. FP32: within contract.fp32_error_bound of the float64 convolution.
Every test skips with the backend's own reason where the extension is not built.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import qconv
from conftest import EXAM, REAL, backend_or_skip, exam_cases, real_layers
from qconv import backends
from qconv.contract import Precision, conv2d_float64, fp32_error_bound
from qconv.errors import QconvError
from strategies import INT_PRECISIONS, PRECISIONS, conv_problems, scale_args, tensors

# (backend, options): the scalar twin, the AVX2 kernels with VNNI forced off, the best family
# this CPU has (VNNI where present; the same as the second on a CPU without it), and the best
# family with a separate dequantize pass instead of the one fused into the microkernel's store.
CONFIGS = [("c-scalar", {}), ("c-avx2", {"isa": "avx2"}), ("c-avx2", {"isa": "auto"}),
           ("c-avx2", {"isa": "auto", "fuse_dequantize": False})]
CONFIG_IDS = ["scalar", "avx2", "best", "best-unfused"]


_need = backend_or_skip  # QCONV_REQUIRE turns "unavailable" into a failure


def _cext():
    _need("c-scalar")
    from qconv.backends import _cext
    return _cext


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _assert_same_bits(y: np.ndarray, ref: np.ndarray, what: str = "") -> None:
    assert y.shape == ref.shape
    bad = _bits(y) != _bits(ref)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} outputs differ from the reference; first at "
                             f"{where}: {y[where]!r} vs {ref[where]!r}")


def _assert_fp32_bound(y: np.ndarray, x: np.ndarray, w: np.ndarray, what: str = "") -> None:
    err = np.abs(y.astype(np.float64) - conv2d_float64(x, w))
    bound = fp32_error_bound(x, w)
    if not np.all(err <= bound):
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(f"{what}: FP32 error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}")


def _check(x, w, precision, backend, options, scale=None, rounding="nearest") -> np.ndarray:
    prec = Precision(precision) if isinstance(precision, str) else precision
    if not prec.is_integer:
        y = qconv.conv2d(x, w, prec, backend, rounding=rounding, **options)
        _assert_fp32_bound(y, x, w, f"{backend} {options} fp32")
        return y
    ref = qconv.conv2d(x, w, prec, "reference", scale=scale, rounding=rounding)
    y = qconv.conv2d(x, w, prec, backend, scale=scale, rounding=rounding, **options)
    _assert_same_bits(y, ref, f"{backend} {options} {prec.value} scale={scale} {rounding}")
    return y


# ---- differential, hypothesis ----------------------------------------------------------------

@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.value)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@given(problem=conv_problems(), scale=scale_args(), rounding=st.sampled_from(["nearest", "truncate"]),
       threads=st.integers(1, 5))
@example(problem=(np.full((1, 3, 3, 2), 0.5, np.float32), np.full((3, 3, 1, 2), 1.5, np.float32)),
         scale=1.0, rounding="nearest", threads=1)           # ties: half to even on both tensors
@example(problem=(np.full((2, 5, 7, 3), 3e4, np.float32), np.full((3, 3, 17, 3), -3e4, np.float32)),
         scale=1e9, rounding="truncate", threads=3)          # saturation, and int32 wrap-around
def test_matches_reference(config, precision, problem, scale, rounding, threads):
    backend, options = config
    _need(backend)
    x, w = problem
    opts = dict(options)
    if backend == "c-avx2":
        opts["threads"] = threads
    _check(x, w, precision, backend, opts, None if not precision.is_integer else scale, rounding)


# ---- tile boundaries -------------------------------------------------------------------------

# Tiled axes: output width (tiles of 6 pixels; 8 in the AVX512-VNNI kernels), output channels
# (blocks of 16; a last block of <= 8 runs a half-width tile), input channels (groups of 2 for int16, 4 for int8/dpbusd).
WIDTHS = [1, 5, 6, 7, 8, 9, 12, 16, 17]
OCS = [1, 8, 9, 15, 16, 17, 24, 32, 33]   # also <= 8 left in the last block: the half tile
CHANNELS = [1, 2, 3, 4, 5, 8]


@pytest.mark.parametrize("precision", PRECISIONS, ids=lambda p: p.value)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_tile_boundaries(config, precision):
    backend, options = config
    _need(backend)
    rng = np.random.default_rng(1)
    scale = None if not precision.is_integer else (3.0, 40.0)
    for i, wd in enumerate(WIDTHS):
        for j, oc in enumerate(OCS):
            c = CHANNELS[(i + j) % len(CHANNELS)]
            k = (1, 3, 5, 2)[(i + 2 * j) % 4]
            x = rng.standard_normal((2, 3, wd, c)).astype(np.float32)
            w = rng.standard_normal((k, k, oc, c)).astype(np.float32)
            _check(x, w, precision, backend, dict(options), scale)


def test_odd_channels_even_kernels_and_big_kernels():
    _need("c-avx2")
    rng = np.random.default_rng(2)
    for xs, ws in [((3, 4, 5, 7), (4, 2, 9, 7)), ((1, 2, 3, 13), (7, 7, 21, 13)),
                   ((1, 1, 1, 3), (5, 5, 2, 3)), ((2, 7, 7, 31), (2, 4, 18, 31))]:
        x = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
        for p in PRECISIONS:
            for backend, options in CONFIGS:
                _check(x, w, p, backend, dict(options), None if not p.is_integer else 50.0)


# ---- quantization edge values ------------------------------------------------------------------

def test_quantize_edges_through_identity_kernel():
    """A 1x1 identity kernel turns the output into dequantize(q_x * q_w): ties, saturation at
    +-Qmax, +-2^31 for INT32 (where cvtps returns 0x80000000), and a length that leaves a tail."""
    _need("c-avx2")
    special = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, 127.5, -127.5, 128.0, -128.0, 32766.5,
               32767.5, -32768.0, 2.0**31, -2.0**31, 2.0**31 - 128, -(2.0**31 - 128), 3e9, -3e9,
               1e38, -1e38, 0.0, -0.0, 1e-30, 0.49999997, -0.49999997]
    vals = np.array(special * 2 + [7.25], dtype=np.float32)       # 55 values: not a multiple of 8
    x = vals.reshape(1, 1, -1, 1)
    w = np.ones((1, 1, 1, 1), np.float32)
    for p in INT_PRECISIONS:
        for rounding in ("nearest", "truncate"):
            for backend, options in CONFIGS:
                _check(x, w, p, backend, dict(options), (1.0, 1.0), rounding)


# ---- threads ----------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", INT_PRECISIONS, ids=lambda p: p.value)
def test_threads_give_identical_bits(precision):
    _need("c-avx2")
    rng = np.random.default_rng(3)
    # Rows split (N*H = 18 >= OC blocks) and OC-block split (N*H = 1 < 5 blocks).
    for xs, ws in [((2, 9, 10, 12), (3, 3, 20, 12)), ((1, 1, 11, 6), (3, 3, 80, 6))]:
        x = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
        for isa in ("avx2", "auto"):
            outs = [_check(x, w, precision, "c-avx2", {"threads": t, "isa": isa}, 1e5) for t in range(1, 6)]
            for t, y in enumerate(outs[1:], start=2):
                _assert_same_bits(y, outs[0], f"threads={t} vs 1, isa={isa}")


def test_a_job_wakes_only_the_workers_it_uses():
    """After a 256-thread job (255 pool workers exist), a 2-thread call signals one worker, not
    255: its fastest time stays what it was. Minimums, so other load on the machine only adds."""
    import time
    cext = _cext()
    _need("c-avx2")
    rng = np.random.default_rng(12)
    x = rng.standard_normal((1, 8, 8, 8)).astype(np.float32)
    w = rng.standard_normal((3, 3, 16, 8)).astype(np.float32)
    conv = qconv.prepare(w, "int8", "c-avx2", threads=2)
    out = conv(x)

    def fastest():
        ts = []
        for _ in range(300):
            t0 = time.perf_counter()
            conv(x, out=out)
            ts.append(time.perf_counter() - t0)
        return min(ts)

    before = fastest()
    cext.peak("fma", cext.max_threads(), 10)     # every worker of the pool exists now
    time.sleep(0.05)
    after = fastest()
    assert after <= 2 * before + 50e-6, f"2-thread call {after * 1e6:.0f} us after a 256-thread job, " \
                                        f"{before * 1e6:.0f} us before"
    _assert_same_bits(out, qconv.conv2d(x, w, "int8", "reference"), "after the 256-thread job")


def test_threads_from_environment(monkeypatch):
    _need("c-avx2")
    from qconv.backends import c_avx2
    monkeypatch.setenv("QCONV_THREADS", "3")
    assert c_avx2.resolve({})[1] == 3
    monkeypatch.setenv("QCONV_THREADS", "zero")
    with pytest.raises(QconvError, match="QCONV_THREADS"):
        c_avx2.resolve({})
    monkeypatch.delenv("QCONV_THREADS")
    assert c_avx2.resolve({})[1] >= 1
    assert c_avx2.resolve({"threads": 2})[1] == 2


def test_concurrent_python_threads():
    _need("c-avx2")
    rng = np.random.default_rng(4)
    jobs = []
    for i in range(8):
        x = rng.standard_normal((1, 6 + i, 9, 5 + i)).astype(np.float32)
        w = rng.standard_normal((3, 3, 7 + 3 * i, 5 + i)).astype(np.float32)
        p = INT_PRECISIONS[i % 3]
        jobs.append((x, w, p, qconv.conv2d(x, w, p, "reference", scale=20.0)))
    start = threading.Barrier(len(jobs))

    def call(job):
        x, w, p, _ = job
        start.wait()
        return [qconv.conv2d(x, w, p, "c-avx2" if r % 2 else "c-scalar", scale=20.0, threads=2)
                if r % 2 else qconv.conv2d(x, w, p, "c-scalar", scale=20.0) for r in range(6)]

    with ThreadPoolExecutor(len(jobs)) as ex:
        results = list(ex.map(call, jobs))
    for job, outs in zip(jobs, results):
        for y in outs:
            _assert_same_bits(y, job[3], "concurrent call")


# ---- kernel families --------------------------------------------------------------------------

def test_isa_cap_selects_the_kernels_that_run():
    cext = _cext()
    _need("c-avx2")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 5, 9, 8)).astype(np.float32)
    w = rng.standard_normal((3, 3, 16, 8)).astype(np.float32)
    _, t = cext.conv2d("int8", cext.best_isa("avx2"), 2, False, 10.0, 10.0, 0.01, x, w)
    assert t["isa"] == "avx2" and t["threads"] == 2
    _, t = cext.conv2d("int8", "scalar", 1, False, 10.0, 10.0, 0.01, x, w)
    assert t["isa"] == "scalar"
    feats = cext.cpu_features()
    best = cext.best_isa("auto")
    if not cext.isa_reason("amx"):
        assert best == "amx" and {"amx", "avx512"} <= feats
    elif "avx512" in feats:
        assert best == "avx512"
    elif "avx512vnni_vl" in feats:
        assert best == "avx512vnni"
    elif "avxvnni" in feats:
        assert best == "avxvnni"
    else:
        assert best == "avx2"
    assert cext.usable_isas()[0] == best
    for isa in ("amx", "avx512", "avx512vnni", "avxvnni"):
        why = cext.isa_reason(isa)
        if not why:
            for p in ("int16", "int8"):
                _, t = cext.conv2d(p, isa, 1, False, 10.0, 10.0, 0.01, x, w)
                assert t["isa"] == isa
        else:
            with pytest.raises(QconvError, match="instruction set"):
                cext.conv2d("int16", isa, 1, False, 10.0, 10.0, 0.01, x, w)


def test_amx_refused_falls_back_with_the_reason():
    """AMX refused (QCONV_NO_AMX, as a VM or an old kernel refusing ARCH_REQ_XCOMP_PERM does):
    `auto` runs the next level, and c-avx2's description says why AMX is not used. In a child
    process, since the permission is asked once per process."""
    import subprocess
    import sys
    _cext()
    _need("c-avx2")
    code = ("from qconv.backends import _cext, available_backends; "
            "print(_cext.best_isa('auto')); print(_cext.isa_reason('amx')); "
            "print(available_backends()['c-avx2'][1]); print(','.join(_cext.usable_isas()))")
    env = dict(os.environ, QCONV_NO_AMX="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    best, why, desc, usable = out.stdout.strip().splitlines()
    assert best != "amx" and "amx" not in usable.split(",")
    assert best == usable.split(",")[0]
    assert why == "AMX disabled by QCONV_NO_AMX=1", why
    assert f"amx: {why}" in desc
    # Without the variable, this process's own answer: AMX where it runs, else the real reason.
    from qconv.backends import _cext as cext
    if os.environ.get("QCONV_NO_AMX", "") in ("", "0"):
        assert "QCONV_NO_AMX" not in cext.isa_reason("amx")
    if cext.isa_reason("amx"):
        assert cext.best_isa("auto") == best


def test_env_isa_cap(monkeypatch):
    _need("c-avx2")
    from qconv.backends import c_avx2
    monkeypatch.setenv("QCONV_ISA", "avx2")
    assert c_avx2.resolve({})[0] == "avx2"
    monkeypatch.setenv("QCONV_ISA", "sse2")
    with pytest.raises(QconvError, match="isa"):
        c_avx2.resolve({})


def test_peak_microbenchmarks_count_their_work():
    cext = _cext()
    macs, secs = cext.peak("scalar-fma", 1, 1000)
    assert macs == 12 * 1000 and secs >= 0
    if backends.available_backends()["c-avx2"][0]:
        assert cext.peak("fma", 2, 1000)[0] == 2 * 8 * 12 * 1000
        assert cext.peak("madd", 1, 1000)[0] == 16 * 8 * 1000
        assert cext.peak("mullo", 1, 1000)[0] == 8 * 8 * 1000
        if cext.best_isa("auto") != "avx2":
            assert cext.peak("dpbusd", 1, 1000)[0] == 32 * 12 * 1000
            assert cext.peak("dpwssd", 1, 1000)[0] == 16 * 12 * 1000
        for instr, macs in (("fma512", 16), ("dpwssd512", 32), ("dpbusd512", 64)):
            if cext.isa_reason("avx512"):
                with pytest.raises(QconvError, match="instruction set"):
                    cext.peak(instr, 1, 10)
            else:
                assert cext.peak(instr, 1, 1000)[0] == macs * 12 * 1000
        if cext.isa_reason("amx"):
            with pytest.raises(QconvError, match="instruction set"):
                cext.peak("amx-dpbssd", 1, 10)
        else:
            assert cext.peak("amx-dpbssd", 2, 1000)[0] == 2 * 4 * 16 * 16 * 64 * 1000


# ---- bad input never reaches C ----------------------------------------------------------------

def test_bad_arguments_are_refused_in_python():
    cext = _cext()
    x = np.ones((1, 4, 4, 3), np.float32)
    w = np.ones((3, 3, 2, 3), np.float32)
    with pytest.raises(QconvError, match="threads"):
        cext.conv2d("int8", "scalar", 0, False, 1.0, 1.0, 1.0, x, w)
    with pytest.raises(QconvError, match="contiguous"):
        cext.conv2d("int8", "scalar", 1, False, 1.0, 1.0, 1.0, np.ones((1, 4, 8, 3), np.float32)[:, :, ::2], w)
    with pytest.raises(QconvError, match="float32"):
        cext.conv2d("int8", "scalar", 1, False, 1.0, 1.0, 1.0, x.astype(np.float64), w)
    with pytest.raises(QconvError, match="IC"):
        cext.conv2d("int8", "scalar", 1, False, 1.0, 1.0, 1.0, x, np.ones((3, 3, 2, 4), np.float32))
    with pytest.raises(QconvError, match="s_x"):
        cext.conv2d("int8", "scalar", 1, False, float("nan"), 1.0, 1.0, x, w)
    with pytest.raises(QconvError, match="isa"):
        cext.best_isa("mmx")
    with pytest.raises(QconvError, match="threads"):
        qconv.conv2d(x, w, "int8", "c-scalar", threads=2)      # c-scalar takes no options
    if backends.available_backends()["c-avx2"][0]:
        with pytest.raises(QconvError, match="threads"):
            qconv.conv2d(x, w, "int8", "c-avx2", threads=0)
        with pytest.raises(QconvError, match="threads"):
            qconv.conv2d(x, w, "int8", "c-avx2", threads=True)
        with pytest.raises(QconvError, match="isa"):
            qconv.conv2d(x, w, "int8", "c-avx2", isa="neon")
        with pytest.raises(QconvError, match="fuse_dequantize"):
            qconv.conv2d(x, w, "int8", "c-avx2", fuse_dequantize="yes")


def test_phases_are_reported():
    _need("c-avx2")
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 8, 8, 8)).astype(np.float32)
    w = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    for backend, options in CONFIGS:
        r = qconv.conv2d_result(x, w, "int8", backend, scale=10.0, **options)
        assert set(r.phases) == {"quantize", "pack", "transfer", "convolve", "dequantize"}
        assert all(v >= 0 for v in r.phases.values()) and r.phases["transfer"] == 0.0
        assert r.backend == backend
    cext = _cext()
    _, t = cext.conv2d("int8", "avx2", 1, False, 10.0, 10.0, 0.01, x, w)
    assert t["fused_dequantize"] and t["dequantize"] == 0.0
    _, t = cext.conv2d("int8", "avx2", 1, False, 10.0, 10.0, 0.01, x, w, fuse_dequantize=False)
    assert not t["fused_dequantize"]
    _, t = cext.conv2d("fp32", "avx2", 1, False, 1.0, 1.0, 1.0, x, w)
    assert not t["fused_dequantize"]


# ---- the real layers ----------------------------------------------------------------------------

def _layers():
    return ([("exam", c) for c in exam_cases()] + [("real", l) for l in real_layers()])


@pytest.mark.parametrize("where,name", _layers())
def test_real_layers(where, name):
    _need("c-avx2")
    base = (EXAM if where == "exam" else REAL) / name
    if not base.exists():
        pytest.skip(f"{base} is absent")
    x = qconv.load_tensor(base / "input_tensor.bin")
    w = qconv.load_tensor(base / "kernel_tensor.bin")
    y64 = conv2d_float64(x, w)
    bound = fp32_error_bound(x, w)
    for backend, options in CONFIGS:
        y = qconv.conv2d(x, w, "fp32", backend, **options)
        assert np.all(np.abs(y - y64) <= bound), f"{backend} {options} fp32 beyond the bound on {name}"
    for p in INT_PRECISIONS:
        # maxabs (no overflow possible) and one large S for both tensors (overflow for int32/int16).
        for scale in ("maxabs", 2.0**14):
            ref = qconv.conv2d(x, w, p, "reference", scale=scale)
            for backend, options in CONFIGS:
                y = qconv.conv2d(x, w, p, backend, scale=scale, **options)
                _assert_same_bits(y, ref, f"{name} {backend} {options} {p.value} {scale}")


def test_forked_child_gets_its_own_pool():
    """The pool's workers do not survive fork(); a child must not wait for them."""
    import multiprocessing as mp
    _need("c-avx2")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 6, 7, 5)).astype(np.float32)
    w = rng.standard_normal((3, 3, 9, 5)).astype(np.float32)
    ref = qconv.conv2d(x, w, "int8", "reference", scale=20.0)
    qconv.conv2d(x, w, "int8", "c-avx2", scale=20.0, threads=3)   # the parent's workers exist now
    with mp.get_context("fork").Pool(1) as pool:
        y = pool.apply_async(qconv.conv2d, (x, w, "int8", "c-avx2"), {"scale": 20.0, "threads": 3}).get(timeout=60)
    _assert_same_bits(y, ref, "forked child")


def test_avx2_backend_reports_a_cpu_without_avx2(monkeypatch):
    """On a CPU without AVX2/FMA, c-avx2 says so (and c-scalar still runs)."""
    _need("c-scalar")
    from qconv.backends import _cext, c_avx2, c_scalar
    monkeypatch.setattr(_cext, "cpu_features", lambda: {"fma"})
    ok, why = c_avx2.is_available()
    assert not ok and "AVX2" in why and "c-scalar" in why
    assert c_scalar.is_available()[0]
