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


def test_conv_json_is_strict_json_when_the_nrmse_is_infinite(tmp_path):
    # one output: the reference has no range, so NRMSE is inf (documented); JSON has no Infinity
    qconv.save_tensor(tmp_path / "x.bin", np.full((1, 1, 1, 1), 0.3, np.float32))
    qconv.save_tensor(tmp_path / "w.bin", np.full((1, 1, 1, 1), 0.7, np.float32))
    p = _run(["conv", "x.bin", "w.bin", "-p", "int8", "-b", "reference", "-n", "1", "--json"], tmp_path)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert doc["nrmse"] is None


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
    _one_line_error(_run(["conv"], tmp_path), "required")


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


# ---------------------------------------------------------------------------------------------
# --version, help, samples by name, -o -, file errors


def test_version(tmp_path):
    for args, module in ((["--version"], "qconv"), (["--version"], "convolution")):
        p = _run(args, tmp_path, module=module)
        assert p.returncode == 0, p.stderr
        assert p.stdout.split()[1] == qconv.__version__
        assert str(Path(qconv.__file__).resolve().parent) in p.stdout  # which copy is running


def test_no_arguments_prints_the_help(tmp_path):
    p = _run([], tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: qconv") and "samples" in p.stdout and "--version" in p.stdout
    assert p.stderr == ""


def test_samples_lists_names_shapes_and_installed_paths(tmp_path):
    p = _run(["samples"], tmp_path)
    assert p.returncode == 0, p.stderr
    rows = [line.split() for line in p.stdout.splitlines() if "/" in line.split()[0]]
    names = [r[0] for r in rows]
    assert names[:2] == ["exam1/input", "exam1/kernel"] and "exam3/input" in names
    assert "exam3/kernel" not in names  # not shipped (see data/PROVENANCE.md)
    for _, shape, path in rows:
        assert Path(path).is_file() and tuple(map(int, shape.split("x"))) == qconv.load_tensor(path).shape
    doc = json.loads(_run(["samples", "--json"], tmp_path).stdout)
    assert doc["exam1/kernel"]["shape"] == [3, 3, 64, 64] and Path(doc["exam1/kernel"]["path"]).is_file()


def test_conv_takes_sample_names(tmp_path):
    p = _run(["conv", "exam2/input", "exam2/kernel", "-b", "reference", "-n", "1", "--no-accuracy", "--json"],
             tmp_path)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["input_shape"] == [1, 28, 28, 128] and doc["kernel_shape"] == [3, 3, 128, 128]
    assert Path(doc["input"]).is_file() and doc["input"].endswith("input_tensor.bin")
    _one_line_error(_run(["conv", "exam9/input", "exam2/kernel"], tmp_path), "'exam9/input'", "no such file")


def test_a_file_named_like_a_sample_wins(tmp_path, layer):
    xp, wp, x, w = layer
    (tmp_path / "exam1").mkdir()
    os.replace(xp, tmp_path / "exam1" / "input")
    p = _run(["conv", "exam1/input", str(wp), "-b", "reference", "-n", "1", "--json"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["input_shape"] == list(x.shape)


def test_sample_layer_names_resolve_for_the_study():
    from qconv import samples
    assert Path(samples.resolve_layer("exam1")).is_dir()
    a, b = samples.resolve_layer("exam1/input:exam1/kernel").rsplit(":", 1)
    assert Path(a).name == "input_tensor.bin" and Path(b).name == "kernel_tensor.bin"
    assert samples.resolve_layer("exam3") == "exam3"  # no kernel shipped: not a layer
    assert samples.resolve_layer("no/such:thing") == "no/such:thing"
    assert samples.resolve_tensor("exam1/kernel_tensor.bin") == str(samples.sample_tensors()["exam1/kernel"])


@pytest.mark.parametrize("module", ["qconv", "convolution"])
def test_output_dash_writes_the_tensor_to_stdout_and_the_report_to_stderr(layer, tmp_path, module):
    xp, wp, x, w = layer
    args = ["conv", str(xp), str(wp)] if module == "qconv" else [str(xp), str(wp)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "qconv"] if module == "qconv" else \
        [sys.executable, "-c", "import sys; from qconv.cli import convolution_main; sys.exit(convolution_main())"]
    p = subprocess.run([*cmd, *args, "-b", "reference", "-n", "1", "-o", "-"], cwd=tmp_path, env=env,
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    (tmp_path / "y.bin").write_bytes(p.stdout)
    np.testing.assert_array_equal(qconv.load_tensor(tmp_path / "y.bin"), qconv.conv2d(x, w, "fp32", "reference"))
    assert b"layer" in p.stderr or b"Convolution time" in p.stderr
    assert not (tmp_path / "-").exists() and not (tmp_path / "output_tensor.bin").exists()


def test_output_to_a_fifo_stays_a_fifo(layer, tmp_path):
    import stat
    import threading
    xp, wp, x, w = layer
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    p = _run(["conv", str(xp), str(wp), "-b", "reference", "-n", "1", "-o", str(fifo)], tmp_path)
    reader.join(10)
    assert p.returncode == 0, p.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and got and len(got[0]) == 16 + 4 * 9 * 7 * 4


def test_file_errors_are_one_line_naming_the_file(layer, tmp_path):
    xp, wp, _, _ = layer
    odd = tmp_path / "new\nline.bin"
    _one_line_error(_run(["conv", str(odd), str(wp)], tmp_path), repr(str(odd)), "no such file")
    _one_line_error(_run(["conv", str(tmp_path), str(wp)], tmp_path), "is a directory")
    _one_line_error(_run(["conv", "/dev/zero", str(wp)], tmp_path), "'/dev/zero'", "non-positive dimension")
    np.save(tmp_path / "c.npy", np.ones((1, 3, 3, 5), np.complex64))
    _one_line_error(_run(["conv", str(tmp_path / "c.npy"), str(wp)], tmp_path), "c.npy'", "complex")
    _one_line_error(_run(["conv", str(xp), str(wp), "-b", "reference", "-n", "1", "-o", str(tmp_path)], tmp_path),
                    "is a directory")


def test_conv_reads_npy_and_npz(layer, tmp_path):
    xp, wp, x, w = layer
    np.save(tmp_path / "x.npy", x.astype(np.float64))
    np.savez(tmp_path / "w.npz", kernel=w, other=w[:1])
    p = _run(["conv", str(tmp_path / "x.npy"), f"{tmp_path / 'w.npz'}:kernel", "-b", "reference", "-n", "1",
              "-o", str(tmp_path / "y.bin")], tmp_path)
    assert p.returncode == 0, p.stderr
    np.testing.assert_array_equal(qconv.load_tensor(tmp_path / "y.bin"), qconv.conv2d(x, w, "fp32", "reference"))


def test_a_scale_warning_is_one_line_on_stderr(layer, tmp_path):
    xp, wp, _, _ = layer
    r = _run(["conv", str(xp), str(wp), "-p", "int8", "-s", "1e-6", "-b", "reference", "-n", "1",
              "--no-accuracy"], tmp_path)
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(warn) == 1 and warn[0].startswith("qconv: warning: this scale zeroes"), r.stderr
    assert "StepSize" in warn[0]


def test_conv_help_lists_every_scale_strategy_rounding_spelling_and_output_format(tmp_path, monkeypatch):
    from qconv.contract import ROUNDING_SPELLINGS
    from qconv.scales import STRATEGIES
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no name broken at a hyphen
    for args, module in ((["conv", "--help"], "qconv"), (["--help"], "convolution")):
        p = _run(args, tmp_path, module=module)
        assert p.returncode == 0, p.stderr
        scale = next(ln for ln in p.stdout.splitlines() if ln.lstrip().startswith("S ") or "S_INPUT" in ln)
        assert all(s in scale for s in STRATEGIES), scale
        out = next(ln for ln in p.stdout.splitlines() if "write" in ln and ".npy" in ln)
        assert ".bin" in out and "standard output" in out, out
    p = _run(["conv", "--help"], tmp_path)
    rounding = next(ln for ln in p.stdout.splitlines() if "rounding:" in ln)
    assert all(n in rounding for names in ROUNDING_SPELLINGS.values() for n in names), rounding


@pytest.mark.parametrize("spelling,expected", [("rint", "nearest"), ("even", "nearest"), ("NEAREST", "nearest"),
                                               ("trunc", "truncate"), ("toward-zero", "truncate")])
def test_conv_takes_every_rounding_spelling_the_library_takes(layer, tmp_path, spelling, expected):
    xp, wp, _, _ = layer
    p = _run(["conv", str(xp), str(wp), "-p", "int8", "-r", spelling, "-b", "reference", "-n", "1",
              "--no-accuracy", "--json"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["rounding"] == expected


def test_conv_refuses_an_unknown_rounding_in_the_librarys_words(layer, tmp_path):
    xp, wp, _, _ = layer
    _one_line_error(_run(["conv", str(xp), str(wp), "-p", "int8", "-r", "floor"], tmp_path),
                    "unknown rounding 'floor'", "toward-zero")


@pytest.mark.parametrize("padding,shown", [("same", None), ("valid", "pads [[0, 0], [0, 0]]"),
                                           ("1", "pads [[1, 1], [1, 1]]"), ("0,2,1,1", "pads [[0, 2], [1, 1]]")])
def test_conv_layer_line_shows_explicit_padding_at_stride_one(layer, tmp_path, padding, shown):
    xp, wp, _, _ = layer
    p = _run(["conv", str(xp), str(wp), "--padding", padding, "-b", "reference", "-n", "1", "--no-accuracy"],
             tmp_path)
    assert p.returncode == 0, p.stderr
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("layer"))
    assert ("pads" in line) is (shown is not None), line
    if shown:
        assert shown in line and "stride 1x1" in line, line


def _readme_synopses() -> dict[str, str]:
    """The README's command-line block: 'conv' -> its synopsis (continuation lines joined)."""
    text = (SRC.parent / "README.md").read_text().split("## Command line", 1)[1]
    groups: dict[str, str] = {}
    last = None
    for line in text.splitlines()[1:]:
        if line and not line.startswith("    "):
            break
        words = line.split()
        if words[:1] == ["qconv"] and len(words) > 1 or words[:1] == ["convolution"]:
            last = words[0] if words[0] == "convolution" else words[1]
            groups[last] = line.split("#", 1)[0]
        elif words and last:
            groups[last] += " " + line.split("#", 1)[0]
    return groups


def test_readme_synopses_list_every_option_of_the_parser(tmp_path):
    import argparse
    import re

    from qconv.cli import build_parser
    synopses = _readme_synopses()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    usage = _run(["--help"], tmp_path, module="convolution").stdout.split("\n\n", 1)[0]
    options = {name: [a.option_strings for a in parser._actions if a.option_strings and a.dest != "help"]
               for name, parser in sub.choices.items()}
    options["convolution"] = [[o] for o in re.findall(r"\[(--?[\w-]+)", usage) if o not in ("-h", "--version")]
    assert set(options) <= set(synopses), set(options) - set(synopses)
    for name, opts in options.items():
        for strings in opts:
            assert any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", synopses[name]) for o in strings), \
                (name, strings, synopses[name])
