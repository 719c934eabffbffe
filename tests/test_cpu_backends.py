"""c-scalar and c-avx2 (the C extension): what is theirs alone — threads and the thread pool,
ISA levels and their selection, AMX refusal, instruction microbenchmarks and the instructions each
level declares as its bound, phases, fork, memory over many calls, argument checks. Their
differential tests (every variant against the reference) are in test_differential.py.
Every test skips with the backend's own reason where the extension is not built.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import qconv
from checks import assert_matches, assert_same_bits
from conftest import backend_or_skip
from qconv import backends
from qconv.contract import Precision
from qconv.errors import InputError, QconvError
from strategies import INT_PRECISIONS

# (backend, options): the scalar twin, the AVX2 kernels with VNNI forced off, the best family
# this CPU has (VNNI where present; the same as the second on a CPU without it), and the best
# family with a separate dequantize pass instead of the one fused into the microkernel's store.
CONFIGS = [("c-scalar", {}), ("c-avx2", {"isa": "avx2"}), ("c-avx2", {"isa": "auto"}),
           ("c-avx2", {"isa": "auto", "fuse_dequantize": False})]


_need = backend_or_skip  # QCONV_REQUIRE turns "unavailable" into a failure


def _cext():
    _need("c-scalar")
    from qconv.backends import _cext
    return _cext


def _check(x, w, precision, backend, options, scale=None) -> np.ndarray:
    """One call, checked against the contract (checks.assert_matches)."""
    y = qconv.conv2d(x, w, precision, backend, scale=scale, **options)
    assert_matches(y, x, w, precision, scale=scale, what=f"{backend} {options}")
    return y


# (Differential tests of every variant against the reference, tile boundaries and the real layers
# included, are in test_differential.py.)

# ---- threads ----------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", INT_PRECISIONS, ids=lambda p: p.value)
def test_threads_give_identical_bits(precision):
    _need("c-avx2")
    rng = np.random.default_rng(3)
    # Work units of rows only (N*H = 18 rows, 2 OC blocks), and of rows and OC blocks (1 row, 5
    # blocks: groups of 2, 2 and 1 block, split across threads).
    for xs, ws in [((2, 9, 10, 12), (3, 3, 20, 12)), ((1, 1, 11, 6), (3, 3, 80, 6))]:
        x = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
        for isa in ("avx2", "amx-emulated", "auto"):
            outs = [_check(x, w, precision, "c-avx2", {"threads": t, "isa": isa}, 1e5) for t in range(1, 6)]
            for t, y in enumerate(outs[1:], start=2):
                assert_same_bits(y, outs[0], f"threads={t} vs 1, isa={isa}")


def test_every_level_on_strided_layers():
    """Strided layers on every level here, against the reference: padded widths that are not a
    multiple of the stride, kernels wider than the stride (tap offsets past the next output
    pixel's), channel padding (groups of 5), 1x1 layers with a stride, which keep only the pixels
    they sample (run.c's sample_task), and the AMX tiles' reads past a row's last output pixel."""
    _need("c-avx2")
    from qconv.backends import _cext
    rng = np.random.default_rng(7)
    layers = [((1, 7, 11, 16), (3, 3, 20, 16), dict(stride=2)),
              ((2, 9, 13, 8), (5, 5, 12, 8), dict(stride=(2, 3), padding=((2, 1), (0, 2)))),
              ((1, 6, 10, 10), (3, 4, 6, 5), dict(stride=3, padding="valid", groups=2)),
              ((1, 8, 9, 64), (1, 1, 40, 64), dict(stride=2)),
              ((2, 7, 10, 10), (1, 1, 6, 5), dict(stride=(3, 2), groups=2)),
              ((1, 5, 11, 24), (1, 1, 33, 24), dict(stride=(1, 3)))]
    configs = [("c-scalar", {})] + [("c-avx2", {"isa": i, "threads": 2}) for i in _cext.usable_isas()
                                     if i != "scalar"] + [("c-avx2", {"isa": i, "threads": 2}) for i in _cext.EMULATED_ISAS]
    for xs, ws, kw in layers:
        x = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
        for precision in Precision:
            scale = None if precision is Precision.FP32 else 1e5 if precision is Precision.INT32 else "maxabs"
            for backend, opts in configs:
                y = qconv.conv2d(x, w, precision, backend, scale=scale, **opts, **kw)
                assert_matches(y, x, w, precision, kw, scale=scale, what=f"{backend} {opts} {kw}")


def test_a_non_finite_pixel_that_a_strided_1x1_layer_skips_is_still_refused():
    """A 1x1 stride-2 layer quantizes only the pixels it samples (sample_task); NaN and inf
    anywhere in x are refused all the same, with a fixed scale as with maxabs, on every level."""
    _need("c-avx2")
    from qconv.backends import _cext
    x = np.ones((1, 6, 6, 16), np.float32)
    w = np.ones((1, 1, 8, 16), np.float32)
    x[0, 1, 3, 5] = np.nan   # row and column 1 and 3: never sampled at stride 2
    isas = [i for i in _cext.usable_isas() if i != "scalar"] + list(_cext.EMULATED_ISAS)
    for precision, scale in (("fp32", None), ("int8", (2.0, 2.0)), ("int8", "maxabs"), ("int16", (2.0, 2.0))):
        for backend, opts in [("c-scalar", {})] + [("c-avx2", {"isa": i, "threads": 2}) for i in isas]:
            with pytest.raises(InputError, match="non-finite"):
                qconv.conv2d(x, w, precision, backend, scale=scale, stride=2, **opts)


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
    assert_same_bits(out, qconv.conv2d(x, w, "int8", "reference"), "after the 256-thread job")


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
            assert_same_bits(y, job[3], "concurrent call")


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


def test_isa_is_read_alike_from_the_option_and_the_environment(monkeypatch):
    _need("c-avx2")
    from qconv.backends import c_avx2, parse_variant
    monkeypatch.setenv("QCONV_ISA", " AVX2 ")
    assert c_avx2.resolve({})[0] == "avx2"
    monkeypatch.delenv("QCONV_ISA")
    assert c_avx2.resolve(parse_variant("c-avx2[isa=AVX2]")[1])[0] == "avx2"
    with pytest.raises(QconvError, match="option 'isa' is given twice"):
        parse_variant("c-avx2[isa=avx2,isa=avx512]")


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

def test_every_level_declares_the_instructions_that_bound_it():
    """c-avx2's BOUND_INSTRUCTIONS has a row for every level it accepts, each naming an instruction
    qconv_peak measures (or None); bound_instruction reads the row of the level options resolve to."""
    _need("c-avx2")
    from qconv.backends import _cext, c_avx2, c_scalar
    assert set(c_avx2.BOUND_INSTRUCTIONS) == set(c_avx2.ISAS) - {"auto"}
    for level, row in c_avx2.BOUND_INSTRUCTIONS.items():
        assert set(row) == {p.value for p in Precision}, level
        assert {i for i in row.values() if i is not None} <= set(_cext.PEAK_CODES), level
    best = _cext.best_isa("auto")
    for p in Precision:
        want = c_avx2.BOUND_INSTRUCTIONS[best][p.value]
        per_mac = c_avx2.PRODUCTS_PER_MAC.get((best, p.value), 1)
        assert c_avx2.bound_instruction({}, p) == (None if want is None else (want, per_mac))
        assert c_avx2.bound_instruction({"isa": "avx2"}, p)[0] == {"fp32": "fma", "int32": "mullo"}.get(p.value, "madd")
    assert c_scalar.bound_instruction({}, Precision.FP32) == ("scalar-fma", 1)
    assert c_scalar.bound_instruction({}, Precision.INT8) is None


def test_a_new_level_reaches_the_differential_suite_by_itself(monkeypatch):
    """A level added to c_avx2.ISAS that this machine runs (best_isa(level) == level), but which
    "auto" never picks (an emulated one), is listed by backends.variants(for_tests=True), which
    test_differential enumerates: no test file names the levels."""
    _need("c-avx2")
    from qconv.backends import _cext, c_avx2
    real = _cext.best_isa
    monkeypatch.setattr(c_avx2, "ISAS", c_avx2.ISAS + ("new-emulated",))
    monkeypatch.setattr(_cext, "best_isa", lambda cap="auto": cap if cap == "new-emulated" else real(cap))
    listed = [name for name, _, _ in backends.variants(for_tests=True)]
    assert "c-avx2[isa=new-emulated]" in listed and "c-avx2[isa=vnni-emulated]" in listed
    assert "c-avx2[isa=new-emulated]" not in [name for name, _, _ in backends.variants()]


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
    assert_same_bits(y, ref, "forked child")


def test_avx2_backend_reports_a_cpu_without_avx2(monkeypatch):
    """On a CPU without AVX2/FMA, c-avx2 says so (and c-scalar still runs)."""
    _need("c-scalar")
    from qconv.backends import _cext, c_avx2, c_scalar
    monkeypatch.setattr(_cext, "cpu_features", lambda: {"fma"})
    ok, why = c_avx2.is_available()
    assert not ok and "AVX2" in why and "c-scalar" in why
    assert c_scalar.is_available()[0]


def test_many_prepared_calls_do_not_grow_memory():
    import resource
    _need("c-avx2")
    if "ASAN_OPTIONS" in os.environ:  # csrc/sanitize.sh: freed blocks sit in ASan's quarantine
        pytest.skip("RSS grows with AddressSanitizer's quarantine; LeakSanitizer checks leaks in this run")
    rng = np.random.default_rng(8)
    w = rng.standard_normal((3, 3, 16, 8)).astype(np.float32)
    x = rng.standard_normal((1, 12, 12, 8)).astype(np.float32)
    for layer in ({}, {"groups": 8, "padding": "valid"}):
        conv = qconv.prepare(w if not layer else w[..., :1].copy() * 1, "int8", "c-avx2", threads=2, **layer)
        xx = x if not layer else x
        out = conv(xx)
        for _ in range(500):
            conv(xx, out=out)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(10_000):
            conv(xx, out=out)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert grown < 4096, f"max RSS grew by {grown} KiB over 10,000 prepared calls"


def test_threads_option_edges():
    _need("c-avx2")
    from qconv.backends import c_avx2
    cap = c_avx2.max_threads()
    assert cap == min(256, 4 * (os.cpu_count() or 1))
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 5, 7, 6)).astype(np.float32)
    w = rng.standard_normal((3, 3, 9, 6)).astype(np.float32)
    ref = qconv.conv2d(x, w, "int8", "reference")
    for t in sorted({1, 2, 3, cap}):   # more threads than rows or OC blocks: some have no work
        assert_same_bits(qconv.conv2d(x, w, "int8", "c-avx2", threads=t), ref, f"threads={t}")
    for bad in (0, -1, cap + 1, 10**6, True, 2.0, "2"):
        with pytest.raises(InputError, match="threads"):
            qconv.prepare(w, "int8", "c-avx2", threads=bad)
    with pytest.raises(InputError, match=f"more than {cap}"):
        qconv.prepare(w, "int8", "c-avx2", threads=cap + 1)


@pytest.mark.parametrize("precision", INT_PRECISIONS, ids=lambda p: p.value)
def test_a_maxabs_call_reports_the_whole_inputs_max(precision):
    # result() takes max|x| from the call; a strided 1x1 layer reads only the sampled pixels, so
    # the largest magnitude is put on one it skips
    _need("c-scalar")
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 6, 6, 8)).astype(np.float32)
    x[0, 1, 1, 3] = -9.5
    w = rng.standard_normal((1, 1, 8, 8)).astype(np.float32)
    for backend, options in CONFIGS:
        if not qconv.available_backends()[backend][0]:
            continue
        for stride in (1, 2):
            conv = qconv.prepare(w, precision, backend, stride=stride, **options)
            run = conv._packed.run(x, conv.geometry(x.shape))
            assert run.x_absmax == np.float32(9.5), (backend, options, stride)
            assert conv.result(x).scale_input == float(run.s_x)
            fixed = qconv.prepare(w, precision, backend, scale=(2.0, 2.0), stride=stride, **options)
            assert fixed._packed.run(x, fixed.geometry(x.shape)).x_absmax is None


def test_c_prepare_refuses_a_non_finite_fp32_kernel_at_every_level():
    # Python refuses it first; C keeps its own check (FP32 packs the caller's array directly)
    _need("c-scalar")
    cext = _cext()
    for pos in (0, 3 * 3 * 8 * 7 - 1):   # the first element and the vector loop's tail
        for bad in (np.nan, np.inf):
            w = np.ones((3, 3, 8, 7), np.float32)
            w.reshape(-1)[pos] = bad
            for isa in cext.usable_isas():
                with pytest.raises(InputError, match="invalid argument"):
                    cext.prepare("fp32", isa, 1, False, w)
