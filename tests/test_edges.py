"""Edge cases from issue 13 that no other test file pins (CPU only, fast): memory refused up front
(broadcast views, the working set), scales at float32's limits and all-denormal data refused alike
by every CPU backend without a warning, the thread cap, strategy names, the degenerate-scale
warning, and `qconv study` with a bad backend. The rest of the issue's findings are tested where
their code is tested (tests/test_tensorfile.py, test_layers.py, test_cli.py, test_packaging.py...).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import qconv
from qconv import layouts, scales
from qconv.contract import dequant_factor, maxabs_scale
from qconv.errors import InputError

from conftest import backend_or_skip

SRC = Path(__file__).resolve().parent.parent / "src"
CPU = ("reference", "c-scalar", "c-avx2")


def _python(code: str, cwd: Path | None = None, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *(["-c", textwrap.dedent(code)] if code else []), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def _refusal(call) -> str:
    """The one-line InputError `call` raises, with every warning an error (none may come first)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError) as e:
            call()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---- memory -------------------------------------------------------------------------------------

def test_a_broadcast_view_too_big_for_memory_is_refused_before_it_is_copied(monkeypatch):
    monkeypatch.setattr(layouts, "available_memory", lambda: 256 << 20)
    w = np.ones((1, 1, 1, 1), np.float32)
    for view in (np.broadcast_to(np.float32(1), (1, 16384, 16384, 1)),    # 1 GiB as a contiguous copy
                 np.broadcast_to(np.float64(1), (1, 16384, 16384, 1))):   # converted to float32
        msg = _refusal(lambda: qconv.conv2d(view, w, "fp32", "reference"))
        assert msg == "input's float32 copy needs about 1.00 GiB of memory; this machine has 256.0 MiB available"
    kernel = np.broadcast_to(np.float32(1), (16384, 16384, 1, 1))
    assert _refusal(lambda: qconv.prepare(kernel, "fp32", "reference")).startswith("kernel's float32 copy needs")


def test_a_copy_that_cannot_be_allocated_is_an_input_error_not_a_bare_memory_error():
    p = _python("""
        import resource
        import numpy as np
        import qconv
        vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))
        try:
            qconv.conv2d(np.broadcast_to(np.float32(1), (1, 16384, 16384, 1)), np.ones((1, 1, 1, 1), np.float32))
        except qconv.InputError as e:
            print(e)
    """)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert p.stdout.startswith("input's float32 copy needs "), p.stdout  # about 1 GiB: refused or not allocated


def test_a_call_whose_working_set_exceeds_the_memory_is_refused_up_front_with_the_bytes(monkeypatch):
    monkeypatch.setattr(layouts, "available_memory", lambda: 1 << 30)
    x = np.zeros((1, 8192, 8192, 2), np.float32)  # 512 MiB of untouched (lazily mapped) zeros
    w = np.ones((1, 1, 3, 2), np.float32)
    msg = _refusal(lambda: qconv.conv2d(x, w, "fp32", "reference"))
    # 3 x (input 512 MiB + output 768 MiB)
    assert msg == "this call needs about 3.75 GiB of memory; this machine has 1.00 GiB available"


# ---- scales at float32's limits ---------------------------------------------------------------

@pytest.mark.parametrize("scale", [5e-20, 1e-20, 1e30, (1e-30, 1e-15), (1e-25, [1e-20] * 4)],
                         ids=["5e-20", "1e-20", "1e30", "pair", "per-channel"])
def test_scales_whose_dequantize_factor_leaves_float32_are_refused_alike_by_every_backend(scale):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 5, 5, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 4, 4)).astype(np.float32)
    s_x, s_w = scale if isinstance(scale, tuple) else (scale, scale)
    with pytest.raises(InputError) as want:
        dequant_factor(s_x, s_w)
    for backend in CPU:
        backend_or_skip(backend)
        assert _refusal(lambda: qconv.conv2d(x, w, "int8", backend, scale=scale)) == str(want.value), backend
        assert _refusal(lambda: qconv.prepare(w, "int16", backend, scale=scale)) == str(want.value), backend
    with pytest.warns(qconv.QconvWarning, match="zeroes"):  # just inside: 1/(6e-20)^2 = 2.8e38
        assert np.all(qconv.conv2d(x, w, "int8", "reference", scale=6e-20) == 0)


def test_per_call_scales_that_leave_float32_are_refused_alike_by_every_backend():
    rng = np.random.default_rng(2)
    tiny = np.float32(1e-33)  # maxabs: s_x * s_w ~ 1e69, so 1/(s_x*s_w) is 0 in float32
    x = rng.standard_normal((1, 5, 5, 4)).astype(np.float32) * tiny
    w = rng.standard_normal((3, 3, 4, 4)).astype(np.float32) * tiny
    for scale in ("maxabs", "maxabs-per-channel"):
        msgs = set()
        for backend in CPU:
            backend_or_skip(backend)
            msgs.add(_refusal(lambda: qconv.conv2d(x, w, "int8", backend, scale=scale)))
        assert len(msgs) == 1 and "1/(s_input*s_kernel) must be a positive finite float32" in msgs.pop()


# ---- what prepare keeps --------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_prepared_conv_is_not_changed_by_later_writes_to_the_callers_kernel_and_bias(precision):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 5, 5, 2)).astype(np.float32)
    for backend in CPU:
        backend_or_skip(backend)
        w = rng.standard_normal((3, 3, 2, 2)).astype(np.float32)
        b = np.ones(2, np.float32)
        conv = qconv.prepare(w, precision, backend, bias=b)
        y, r = conv(x), conv.result(x, accuracy=True)
        w[:] = np.nan  # the reference read both on every call, and result() rebuilt its float64 reference
        b[:] = 100
        again = conv.result(x, accuracy=True)
        assert np.array_equal(conv(x), y) and np.array_equal(again.output, y), backend
        assert again.nrmse == r.nrmse and again.saturated == r.saturated, backend
        with pytest.raises(ValueError):  # and what it keeps is read-only
            conv.kernel[0, 0, 0, 0] = 1


@pytest.mark.parametrize("which", ["input", "kernel"])
@pytest.mark.parametrize("scale", ["maxabs", "maxabs-per-channel"])
def test_all_denormal_data_is_refused_alike_by_every_backend_without_a_warning(which, scale):
    x = np.full((1, 5, 5, 4), 1e-44, np.float32)
    w = np.ones((3, 3, 4, 4), np.float32)
    if which == "kernel":
        x, w = np.ones_like(x), np.full_like(w, 1e-44)
    with pytest.raises(InputError) as want:
        maxabs_scale(np.float32(1e-44), scales.maxabs_q(qconv.Precision.INT8, 36))
    for backend in CPU:
        backend_or_skip(backend)
        assert _refusal(lambda: qconv.conv2d(x, w, "int8", backend, scale=scale)) == str(want.value), backend
        assert _refusal(lambda: qconv.conv2d_result(x, w, "int8", backend, scale=scale)) == str(want.value)


def test_a_sweep_over_all_denormal_data_is_refused_without_a_warning():
    x = np.full((1, 5, 5, 4), 1e-44, np.float32)
    w = np.ones((3, 3, 4, 4), np.float32)
    assert "denormal" in _refusal(lambda: qconv.conv2d(x, w, "int8", "reference", scale="sweep"))


def test_a_scale_that_saturates_most_of_the_kernel_warns():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 6, 6, 3)).astype(np.float32)
    w = (rng.standard_normal((3, 3, 4, 3)) * 0.05).astype(np.float32)
    with pytest.warns(qconv.QconvWarning, match=r"this scale saturates [5-9]\d% of the kernel.*StepSize"):
        qconv.conv2d(x, w, "int8", "reference", scale=(30.0, 1e4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qconv.conv2d(x, w, "int8", "reference", scale=(30.0, 2000.0))


# ---- names and options --------------------------------------------------------------------------

def test_strategy_names_are_read_alike_everywhere():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 6, 6, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 4, 3)).astype(np.float32)
    for canonical, spellings in (("maxabs", [" MAXABS ", "MaxAbs"]), ("sweep", [" sweep ", "SWEEP", "Sweep-Single"]),
                                 ("maxabs-per-channel", ["MAXABS-PER-CHANNEL "])):
        want = qconv.conv2d_result(x, w, "int8", "reference", scale=canonical)
        for s in spellings:
            got = qconv.conv2d_result(x, w, "int8", "reference", scale=s)
            assert got.scale_strategy == want.scale_strategy and np.array_equal(got.output, want.output), s
            assert scales.parse_scale_text(s) == s.strip().lower()  # the CLI's --scale
    assert repr(qconv.prepare(w, "int8", "reference", scale=" MAXABS ")) == repr(qconv.prepare(w, "int8", "reference"))
    for s in (" sweep ", "SWEEP", "sweep-pair"):
        assert "searches on the input" in _refusal(lambda: qconv.prepare(w, "int8", "reference", scale=s))
    assert "unknown scale strategy 'max abs'" in _refusal(lambda: qconv.conv2d(x, w, "int8", scale="max abs"))


def test_threads_above_the_cap_are_refused_naming_the_cap(monkeypatch):
    backend_or_skip("c-avx2")
    from qconv.backends import c_avx2
    cap = c_avx2.max_threads()
    w = np.ones((3, 3, 4, 4), np.float32)
    for n in sorted({cap + 1, 257, 10**6}):
        assert f"c-avx2: threads={n} is more than {cap} " in _refusal(lambda: qconv.prepare(w, "int8", "c-avx2", threads=n))
    monkeypatch.setenv("QCONV_THREADS", str(cap + 1))
    assert f"c-avx2: QCONV_THREADS={cap + 1} is more than {cap} " in _refusal(lambda: qconv.prepare(w, "int8", "c-avx2"))
    x = np.ones((1, 5, 5, 4), np.float32)
    assert np.array_equal(qconv.conv2d(x, w, "int8", "c-avx2", threads=cap), qconv.conv2d(x, w, "int8", "reference"))


def test_study_with_an_unknown_backend_leaves_no_output_folder(tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    qconv.save_tensor(layer / "input_tensor.bin", np.ones((1, 4, 4, 2), np.float32))
    qconv.save_tensor(layer / "kernel_tensor.bin", np.ones((3, 3, 2, 2), np.float32))
    out = tmp_path / "out"
    p = _python("", tmp_path, "-m", "qconv", "study", str(layer), "--backends", "nope", "--out", str(out),
                "--no-progress", "--no-plots", "--quick")
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "unknown backend 'nope'" in p.stderr, p.stderr
    assert not out.exists()
