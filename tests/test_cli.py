"""The command line, through subprocesses: success paths, --json, and every bad input (exit 2, one line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qconv
from qconv.contract import conv2d_float64, fp32_error_bound

SRC = Path(__file__).resolve().parent.parent / "src"


def _run(args: list[str], cwd: Path, module: str = "qconv") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    if module == "qconv":
        cmd = [sys.executable, "-m", "qconv", *args]
    else:  # the assignment's `convolution` entry point
        cmd = [sys.executable, "-c", "import sys; from qconv.cli import convolution_main; "
                                     "sys.exit(convolution_main())", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def layer(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((1, 9, 7, 5)) * 3).astype(np.float32)
    w = (rng.standard_normal((3, 3, 4, 5)) * 0.2).astype(np.float32)
    xp, wp = tmp_path / "input_tensor.bin", tmp_path / "kernel_tensor.bin"
    qconv.save_tensor(xp, x)
    qconv.save_tensor(wp, w)
    return xp, wp, x, w


def _one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_conv_prints_report_and_writes_output(layer, tmp_path):
    xp, wp, x, w = layer
    out = tmp_path / "y.bin"
    p = _run(["conv", str(xp), str(wp), "-b", "reference", "-o", str(out), "-n", "3"], tmp_path)
    assert p.returncode == 0, p.stderr
    for label in ("layer", "backend", "phases", "speed", "NRMSE", "output"):
        assert any(line.startswith(label) for line in p.stdout.splitlines()), label
    y = qconv.load_tensor(out)
    ref = conv2d_float64(x, w)
    assert np.all(np.abs(y - ref) <= fp32_error_bound(x, w))


@pytest.mark.parametrize("precision", ["int8", "16", "INT32"])
def test_conv_json_schema(layer, tmp_path, precision):
    xp, wp, x, w = layer
    p = _run(["conv", str(xp), str(wp), "-p", precision, "-b", "reference", "--json"], tmp_path)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["input_shape"] == list(x.shape) and doc["kernel_shape"] == list(w.shape)
    assert doc["output_shape"] == [1, 9, 7, 4]
    assert doc["backend"] == "reference"
    assert doc["precision"] == qconv.contract.parse_precision(precision).value
    assert set(doc["phases_s"]) == {"quantize", "pack", "transfer", "convolve", "dequantize"}
    assert all(isinstance(t, float) and t >= 0 for t in doc["phases_s"].values())
    assert doc["flops"] == 2 * 9 * 7 * 4 * 3 * 3 * 5
    assert doc["scale"]["strategy"] == "maxabs" and doc["scale"]["input"] > 0
    assert doc["wrapped_outputs"] == 0 and doc["overflow_possible"] is False
    assert 0 < doc["nrmse"] < 0.05


def test_conv_scale_pair_and_truncation(layer, tmp_path):
    xp, wp, x, w = layer
    p = _run(["conv", str(xp), str(wp), "-p", "8", "-s", "10,300", "-r", "truncate", "-b", "reference",
              "--json"], tmp_path)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["scale"]["input"] == 10.0 and doc["scale"]["kernel"] == 300.0
    assert doc["rounding"] == "truncate"
    expected = qconv.conv2d(x, w, "int8", "reference", scale=(10, 300), rounding="truncate")
    got = qconv.conv2d_result(x, w, "int8", "reference", scale=(10, 300), rounding="truncate",
                              accuracy=True)
    assert doc["nrmse"] == pytest.approx(got.nrmse, rel=1e-12)
    assert np.array_equal(expected, got.output)


def test_backends_lists_reference(tmp_path):
    p = _run(["backends", "--json"], tmp_path)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["reference"]["available"] is True
    assert set(doc) == set(qconv.available_backends())
    for entry in doc.values():
        assert entry["available"] or entry["detail"], "a missing backend must say why"


@pytest.mark.parametrize("extra,needle", [
    (["-p", "int4"], "unknown precision"),
    (["-p", "int8", "-s", "abc"], "--scale"),
    (["-p", "int8", "-s", "0"], "positive"),
    (["-p", "int8", "-s", "1,2,3"], "pair"),
    (["-s", "4"], "fp32 takes no scale"),
    (["-b", "tpu"], "unknown backend"),
    (["--threads", "2", "-b", "reference"], "does not take option"),
    (["-n", "0"], "--repeat"),
])
def test_conv_bad_arguments(layer, tmp_path, extra, needle):
    xp, wp, _, _ = layer
    _one_line_error(_run(["conv", str(xp), str(wp), *extra], tmp_path), needle)


def test_conv_bad_files(layer, tmp_path):
    xp, wp, _, _ = layer
    _one_line_error(_run(["conv", str(tmp_path / "missing.bin"), str(wp)], tmp_path), "missing.bin", "no such file")
    short = tmp_path / "short.bin"
    short.write_bytes(xp.read_bytes()[:-4])
    _one_line_error(_run(["conv", str(short), str(wp)], tmp_path), "short.bin", "truncated")
    other = tmp_path / "other_kernel.bin"
    qconv.save_tensor(other, np.ones((3, 3, 2, 6), np.float32))
    _one_line_error(_run(["conv", str(xp), str(other)], tmp_path), "IC=6", "C=5")
    _one_line_error(_run(["conv", str(xp), str(wp), "-o", str(tmp_path / "no" / "dir" / "y.bin")], tmp_path),
                    "y.bin")
    nan = tmp_path / "nan.bin"
    bad = np.ones((1, 3, 3, 5), np.float32)
    bad[0, 1, 1, 2] = np.nan
    qconv.save_tensor(nan, bad)
    _one_line_error(_run(["conv", str(nan), str(wp), "-p", "int8"], tmp_path), "non-finite")


def test_usage_errors_are_one_line(tmp_path):
    _one_line_error(_run(["conv", "only_one.bin"], tmp_path), "kernel")
    _one_line_error(_run(["frobnicate"], tmp_path), "invalid choice")
    _one_line_error(_run([], tmp_path), "required")


@pytest.mark.parametrize("mode", ["FP32", "32", "16", "8", "INT32", "INT16"])
def test_convolution_command(layer, tmp_path, mode):
    xp, wp, x, w = layer
    p = _run([str(xp), str(wp), mode, "-b", "reference"], tmp_path, module="convolution")
    assert p.returncode == 0, p.stderr
    assert "Convolution time" in p.stdout
    y = qconv.load_tensor(tmp_path / "output_tensor.bin")
    prec = qconv.contract.parse_precision(mode)
    assert np.array_equal(y, qconv.conv2d(x, w, prec, "reference"))
    if prec.is_integer:
        assert "Quantization overhead" in p.stdout and "NRMSE" in p.stdout and "Scale" in p.stdout


def test_convolution_command_errors(layer, tmp_path):
    xp, wp, _, _ = layer
    _one_line_error(_run([str(xp), str(wp), "4"], tmp_path, module="convolution"), "unknown precision")
    _one_line_error(_run([str(xp)], tmp_path, module="convolution"), "kernel")
    assert not (tmp_path / "output_tensor.bin").exists()
