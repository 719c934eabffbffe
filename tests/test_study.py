"""The study on tiny generated layers: every artifact, a valid JSON, PNGs of the stated size, a
report consistent with the numbers, and a valid partial result after an interruption."""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

import qconv
from qconv.study import Layer, Study, load_layers, run_study, validate
from qconv.study import cli as study_cli
from qconv.study.plots import PLOTS, expected_size
from qconv.study.runner import effective_bits, output_bits_nrmse, pareto


def tiny_layers() -> list[Layer]:
    rng = np.random.default_rng(42)
    a = Layer("tiny3x3", (rng.standard_normal((1, 6, 6, 3)) * 5).astype(np.float32),
              (rng.standard_normal((3, 3, 4, 3)) * 0.2).astype(np.float32))
    b = Layer("tiny1x1", (rng.standard_normal((1, 5, 4, 2)) * 2).astype(np.float32),
              (rng.standard_normal((1, 1, 3, 2)) * 0.5).astype(np.float32))
    return [a, b]


def available() -> list[str]:
    return [b for b, (ok, _) in qconv.available_backends().items() if ok]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    res = run_study(tiny_layers(), out, repeat=2, quick=True, progress=False, command="test")
    return out, res


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_every_artifact_is_written(study):
    out, res = study
    for name in ["results.json", "results.csv", "report.md", *(f"{p}.png" for p in PLOTS)]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert res["status"] == "complete" and res["partial_reason"] is None
    n_runs = len(res["config"]["backends"])
    assert {m["backend_module"] for m in res["measurements"]} == set(available())
    assert n_runs >= len(available())
    assert len(res["measurements"]) == 2 * n_runs * 4
    # two sweeps (nearest with pairs, truncate) per layer and integer precision, four strategies
    assert len(res["sweeps"]) == 2 * 3 * 2
    assert len(res["strategies"]) == 2 * 3 * 5


def test_json_validates_against_the_schema(study):
    out, _ = study
    doc = json.loads((out / "results.json").read_text())
    assert validate(doc) == []
    assert doc["schema"] == "qconv-study-results" and doc["schema_version"] == 1
    for key in ("cpu_model", "gpu", "versions", "date"):
        assert key in doc["machine"]


def test_the_validator_rejects_what_the_schema_forbids(study):
    out, _ = study
    doc = json.loads((out / "results.json").read_text())
    bad = copy.deepcopy(doc)
    del bad["measurements"][0]["backend"]
    bad["status"] = "done"
    bad["sweeps"][0]["rows"][0]["nrmse"] = "small"
    bad["surprise"] = 1
    errs = validate(bad)
    assert any("missing required key 'backend'" in e for e in errs)
    assert any("status" in e and "not one of" in e for e in errs)
    assert any(".rows[0].nrmse" in e for e in errs)
    assert any("unexpected key 'surprise'" in e for e in errs)


def test_every_png_has_the_expected_size(study):
    out, res = study
    assert [p["name"] for p in res["plots"]] == list(PLOTS)
    for p in res["plots"]:
        path = out / p["file"]
        assert path.stat().st_size > 2000
        assert png_size(path) == expected_size(p["name"], 2) == (p["width"], p["height"])


def test_csv_has_one_row_per_measurement(study):
    out, res = study
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(res["measurements"])
    for row, m in zip(rows, res["measurements"]):
        assert (row["layer"], row["backend"], row["precision"]) == (m["layer"], m["backend"], m["precision"])
        assert float(row["convolve_median_s"]) == pytest.approx(m["phases_s"]["convolve"]["median"])


def test_measurements_are_consistent(study):
    _, res = study
    # Options are timed with the best per-tensor pair the sweep found (the single S where none).
    best = {(s["layer"], s["precision"]): s["best_pair"] or s["best"]
            for s in res["sweeps"] if s["rounding"] == "nearest"}
    for m in res["measurements"]:
        assert m["error"] is None, m["error"]
        ph = m["phases_s"]["convolve"]
        assert ph["min"] <= ph["median"] <= ph["max"]
        if m["precision"] == "fp32":
            assert m["scale"] is None and m["within_fp32_bound"] is True
        else:
            b = best[(m["layer"], m["precision"])]
            assert (m["scale"]["s_x"], m["scale"]["s_w"]) == (b["s_x"], b["s_w"])
            assert m["bit_exact"] is True  # every backend gives the contract's bits
            assert m["nrmse"] == pytest.approx(b["nrmse"], rel=0, abs=0)
    for name, s in res["summary"]["layers"].items():
        base = [m for m in res["measurements"] if m["layer"] == name
                and (m["backend"], m["precision"]) == (s["baseline"]["backend"], s["baseline"]["precision"])]
        assert base[0]["speedup_vs_baseline"] == pytest.approx(1.0)


def _fastest(res, name):
    ms = [m for m in res["measurements"] if m["layer"] == name and m["error"] is None]
    return min(ms, key=lambda m: m["phases_s"]["convolve"]["median"])


def test_report_names_the_best_options_the_numbers_support(study):
    out, res = study
    report = (out / "report.md").read_text()
    for p in PLOTS:
        assert f"({p}.png)" in report
    acc = res["summary"]["acceptable_nrmse"]
    for name in ("tiny3x3", "tiny1x1"):
        f = _fastest(res, name)
        s = res["summary"]["layers"][name]
        assert (s["fastest"]["backend"], s["fastest"]["precision"]) == (f["backend"], f["precision"])
        line = next(l for l in report.splitlines() if l.startswith(f"- `{name}` — "))
        assert f"**fastest: {f['backend']} {f['precision'].upper()}**" in line
        ok = [m for m in res["measurements"] if m["layer"] == name and m["nrmse"] is not None and m["nrmse"] <= acc]
        rec = min(ok, key=lambda m: m["phases_s"]["convolve"]["median"])
        assert f"at least 8 effective output bits): **{rec['backend']} {rec['precision'].upper()}**" in line
        most = min((m for m in res["measurements"] if m["layer"] == name), key=lambda m: m["nrmse"])
        assert f"most accurate: **{most['backend']} {most['precision'].upper()}**" in line
        front = [(o["backend"], o["precision"]) for o in s["frontier"]]
        pts = [(m["phases_s"]["convolve"]["median"], m["nrmse"], (m["backend"], m["precision"]))
               for m in res["measurements"] if m["layer"] == name]
        assert front == pareto(pts)
    for sw in res["sweeps"]:
        assert sw["reason"] in report
    assert "RAPL" in report and "NVML" in report  # says where energy was (not) measured
    assert "Horowitz" in report


def test_pareto_and_effective_bits():
    pts = [(1.0, 0.5, "a"), (2.0, 0.6, "b"), (3.0, 0.1, "c"), (3.0, 0.05, "d"), (4.0, 0.05, "e")]
    assert pareto(pts) == ["a", "d"]
    assert effective_bits(output_bits_nrmse(8)) == pytest.approx(8.0)
    assert effective_bits(None) is None and effective_bits(math.inf) is None


def test_interrupt_leaves_a_valid_partial_result(tmp_path, monkeypatch):
    # Ctrl-C in the second timing round of the first layer: every option of that layer has one
    # timed run, the second layer was never reached.
    calls = {"n": 0}
    real = Study._timed_call
    n_options = 4  # reference x 4 precisions

    def flaky(call):
        calls["n"] += 1
        if calls["n"] == n_options + 2:
            raise KeyboardInterrupt
        return real(call)
    monkeypatch.setattr(Study, "_timed_call", staticmethod(flaky))
    with pytest.raises(KeyboardInterrupt):
        run_study(tiny_layers(), tmp_path, backends=["reference"], repeat=3, quick=True, progress=False)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert validate(doc) == []
    assert doc["status"] == "partial" and "interrupted" in doc["partial_reason"]
    assert [L["name"] for L in doc["layers"]] == ["tiny3x3"]
    assert len(doc["measurements"]) == n_options
    assert [m["repeat"] for m in doc["measurements"]] == [2, 1, 1, 1]
    assert all(m["error"] is None and m["nrmse"] is not None for m in doc["measurements"])
    assert (tmp_path / "results.csv").is_file()
    assert "Partial results" in (tmp_path / "report.md").read_text()
    assert all((tmp_path / f"{p}.png").is_file() for p in PLOTS)


def test_interrupt_before_any_measurement_is_still_valid(tmp_path, monkeypatch):
    def boom(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(Study, "_sweeps", boom)
    with pytest.raises(KeyboardInterrupt):
        run_study(tiny_layers(), tmp_path, backends=["reference"], repeat=1, quick=True, progress=False)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert validate(doc) == [] and doc["status"] == "partial" and doc["measurements"] == []


def test_reference_only_and_a_precision_subset(tmp_path):
    res = run_study(tiny_layers()[:1], tmp_path, backends=["reference"], precisions=["fp32", "int8"],
                    repeat=1, quick=True, progress=False)
    assert validate(json.loads((tmp_path / "results.json").read_text())) == []
    assert {(m["backend"], m["precision"]) for m in res["measurements"]} == {("reference", "fp32"), ("reference", "int8")}
    s = res["summary"]["layers"]["tiny3x3"]["baseline"]
    assert (s["backend"], s["precision"]) == ("reference", "fp32")


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    study_cli.add_arguments(p)
    return p.parse_args(argv)


def test_cli_hook_reads_layer_dirs_and_pairs(tmp_path):
    lay = tiny_layers()[0]
    d = tmp_path / "layer"
    d.mkdir()
    qconv.save_tensor(d / "input_tensor.bin", lay.x)
    qconv.save_tensor(d / "kernel_tensor.bin", lay.w)
    pair = f"{d / 'input_tensor.bin'}:{d / 'kernel_tensor.bin'}"
    out = tmp_path / "out"
    rc = study_cli.run(_args([str(d), pair, "--backends", "reference", "--precisions", "fp32,int16",
                              "--repeat", "1", "--quick", "--no-progress", "--out", str(out)]))
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert validate(doc) == []
    assert [L["name"] for L in doc["layers"]] == ["layer", "input_tensor"]
    assert doc["layers"][0]["input_shape"] == list(lay.x.shape)


@pytest.mark.parametrize("argv", [
    ["no/such/dir"], ["--backends", "nope"], ["--precisions", "int4"], ["--batch", "0"], ["--repeat", "0"],
])
def test_cli_rejects_bad_input(tmp_path, argv):
    lay = tiny_layers()[1]
    d = tmp_path / "l"
    d.mkdir()
    qconv.save_tensor(d / "input_tensor.bin", lay.x)
    qconv.save_tensor(d / "kernel_tensor.bin", lay.w)
    if argv[0] != "no/such/dir":
        argv = [str(d), *argv]
    with pytest.raises(qconv.QconvError):
        study_cli.run(_args([*argv, "--out", str(tmp_path / "o"), "--no-progress"]))


def test_load_layers_names_the_missing_file(tmp_path):
    (tmp_path / "input_tensor.bin").write_bytes(b"")
    with pytest.raises(qconv.QconvError, match="kernel_tensor.bin is missing"):
        load_layers([str(tmp_path)])


def test_energy_estimate_follows_the_per_operation_table():
    from qconv.contract import Precision
    from qconv.study import energy
    e8 = energy.estimate(Precision.INT8, 100, 10, 50, 1000)
    e32 = energy.estimate(Precision.FP32, 100, 10, 50, 1000)
    assert e8["compute_j"] == pytest.approx(1000 * (0.2 + 0.1) * 1e-12)
    assert e32["compute_j"] == pytest.approx(1000 * (3.7 + 0.9) * 1e-12)
    assert e32["dram_bytes"] == (100 + 10 + 50) * 4
    assert e8["dram_low_j"] == pytest.approx(e8["dram_bytes"] / 8 * 1.3e-9)
    assert e8["total_low_j"] <= e8["total_j"] <= e8["total_high_j"]
    assert energy.model()["pj_per_op"]["int32_mult"] == 3.1


def test_rapl_meter_sums_packages_and_handles_wraparound(tmp_path):
    from qconv.study import energy
    for zone, val in (("intel-rapl:0", 990), ("intel-rapl:1", 5)):
        d = tmp_path / zone
        d.mkdir()
        (d / "energy_uj").write_text(f"{val}\n")
        (d / "max_energy_range_uj").write_text("1000\n")
    sub = tmp_path / "intel-rapl:0:0"  # a subzone (core), not counted
    sub.mkdir()
    (sub / "energy_uj").write_text("123\n")
    m, why = energy.rapl_meter(str(tmp_path))
    assert m is not None and "2 domain" in m.device, why
    assert m.joules() == 0.0
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("10\n")   # wrapped: +20 uJ
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("35\n")   # +30 uJ
    assert m.joules() == pytest.approx(50e-6)
    none, why = energy.rapl_meter(str(tmp_path / "absent"))
    assert none is None and "does not exist" in why


def test_energy_measure_divides_by_calls():
    from qconv.study import energy
    state = {"j": 0.0}
    meter = energy.Meter("rapl", "fake", lambda: state["j"])

    def call():
        state["j"] += 0.5
    r = energy.measure(meter, call, min_seconds=0.0, min_calls=4)
    assert r["calls"] == 4 and r["joules_per_call"] == pytest.approx(0.5)


def test_batch_tiles_the_input(tmp_path):
    res = run_study(tiny_layers()[1:], tmp_path, backends=["reference"], precisions=["int8"], batch=3,
                    repeat=1, quick=True, progress=False, plots=False)
    L = res["layers"][0]
    assert L["input_shape"][0] == 3 and L["output_shape"][0] == 3
    assert res["measurements"][0]["flops"] == 3 * 2 * 5 * 4 * 3 * 2
    # the sweep ran on the layer itself (one copy); its NRMSE is the batch's NRMSE
    sw = next(s for s in res["sweeps"] if s["rounding"] == "nearest")
    assert sw["outputs"] == 5 * 4 * 3
    m = res["measurements"][0]
    assert m["bit_exact"] is True
    assert m["nrmse"] == pytest.approx((sw["best_pair"] or sw["best"])["nrmse"], rel=1e-9)


def test_gpu_runs_and_nvml_energy_with_a_stand_in_backend(tmp_path, monkeypatch):
    """The CUDA-specific paths (an INT8 dp4a variant, NVML energy, GPU peaks) without a GPU: the
    'cuda' backend is stood in for by the reference backend and NVML by a fake counter."""
    from qconv import api
    from qconv.study import energy, runner
    real = api.conv2d_result
    seen = []

    def shim(x, w, precision, backend, **kw):
        if backend == "cuda":
            seen.append({k: v for k, v in kw.items() if k in ("int8_path",)})
            kw = {k: v for k, v in kw.items() if k not in ("int8_path",)}
            backend = "reference"
        return real(x, w, precision, backend, **kw)
    clock = {"j": 0.0}

    def fake_nvml():
        def read():
            clock["j"] += 0.25
            return clock["j"]
        return energy.Meter("nvml", "NVIDIA H100 80GB HBM3", read), "fake"
    monkeypatch.setattr(runner.api, "conv2d_result", shim)
    monkeypatch.setattr(runner, "available_backends",
                        lambda: {"reference": (True, "numpy"), "cuda": (True, "stand-in")})
    monkeypatch.setattr(energy, "nvml_meter", fake_nvml)
    res = run_study(tiny_layers()[:1], tmp_path, repeat=1, quick=True, progress=False)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert validate(doc) == []
    labels = [(m["backend"], m["precision"]) for m in res["measurements"]]
    assert ("cuda-dp4a", "int8") in labels and ("cuda-dp4a", "fp32") not in labels
    assert {"int8_path": "dp4a"} in seen
    cuda = {m["precision"]: m for m in res["measurements"] if m["backend"] == "cuda"}
    assert cuda["fp32"]["peak_gops"] == 67000.0 and cuda["int8"]["peak_gops"] == 1979000.0
    assert all(m["energy_measured"]["meter"] == "nvml" for m in cuda.values())
    assert res["machine"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert res["summary"]["layers"]["tiny3x3"]["energy_best_measured"] is not None
    assert "Measured, the least energy per call was" in (tmp_path / "report.md").read_text()


def test_missing_matplotlib_is_a_clear_error_before_any_work(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_mpl(name, *a, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(qconv.QconvError, match="qconv\\[plot\\]"):
        Study(tiny_layers(), tmp_path, backends=["reference"], progress=False)
    assert not (tmp_path / "results.json").exists()


def test_cpu_peaks_are_measured_where_the_c_extension_runs(study):
    _, res = study
    if "c-avx2" not in available():
        pytest.skip(qconv.available_backends()["c-avx2"][1])
    peaks = {(p["instruction"], p["threads"]): p["gops"] for p in res["machine"]["measured_peaks"]}
    assert any(i == "fma" for i, _ in peaks) and all(g > 0 for g in peaks.values())
    for m in res["measurements"]:
        if m["backend"] == "c-avx2" or (m["backend"] == "c-scalar" and m["precision"] == "fp32"):
            assert m["peak_gops"] > 0 and m["peak_note"].startswith("measured")
            assert m["peak_speedup_vs_baseline"] == pytest.approx(
                m["peak_gops"] / next(b["gops"] for b in res["measurements"] if b["layer"] == m["layer"]
                                      and b["speedup_vs_baseline"] == 1.0))
        if m["backend"] == "reference":
            assert m["peak_gops"] is None


def test_gpu_name_falls_back_to_the_cuda_probe(tmp_path, monkeypatch):
    from qconv.study import energy, runner
    monkeypatch.setattr(runner, "available_backends", lambda: {
        "reference": (True, "numpy"),
        "cuda": (True, "NVIDIA H100 PCIe (sm_90), CUDA driver 13.0, NVRTC 13.0")})
    monkeypatch.setattr(energy, "nvml_meter", lambda: (None, "no NVML here"))
    st = Study(tiny_layers(), tmp_path, backends=["reference"], progress=False)
    assert st.machine["gpu"] == "NVIDIA H100 PCIe"
    from qconv.contract import Precision
    from qconv.study.machine import peak_gops
    assert peak_gops("cuda", Precision.FP32, st.machine)[0] == 51000.0


def test_unusable_output_folder_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(qconv.QconvError, match="output folder"):
        Study(tiny_layers(), f / "out", backends=["reference"], progress=False)
    with pytest.raises(qconv.QconvError, match="output folder"):
        Study(tiny_layers(), f, backends=["reference"], progress=False)


def test_per_channel_scales_reduce_to_maxabs_and_help_when_channels_differ():
    from qconv.contract import Precision, conv2d_float64
    from qconv.contract import conv_spec
    from qconv.scales import for_kernel
    from qconv.study.runner import _per_channel_maxabs
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 6, 6, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 5, 4)).astype(np.float32)
    ref = conv2d_float64(x, w)
    w_eq = w.copy()
    m = float(np.max(np.abs(w)))
    w_eq[0, 0, :, 0] = m  # every channel has the global max: per-channel scales = the tensor's
    ref_eq = conv2d_float64(x, w_eq)
    s_x, s_w, e, wf, _, _ = _per_channel_maxabs(x, w_eq, Precision.INT8, ref_eq)
    r = qconv.conv2d_result(x, w_eq, "int8", "reference", scale="maxabs", reference=ref_eq)
    assert e == r.nrmse and s_w == pytest.approx(float(for_kernel("maxabs", Precision.INT8, w_eq, conv_spec(w_eq.shape)).s_w))
    w_scaled = w * np.array([1, 1e-3, 1e-2, 1e-1, 1], dtype=np.float32)[None, None, :, None]
    ref_s = conv2d_float64(x, w_scaled)
    e_pc = _per_channel_maxabs(x, w_scaled, Precision.INT8, ref_s)[2]
    e_pt = qconv.conv2d_result(x, w_scaled, "int8", "reference", scale="maxabs", reference=ref_s).nrmse
    assert e_pc < e_pt  # small channels get their own, finer scale
    assert _per_channel_maxabs(x, w, Precision.INT8, ref)[3] == 0.0  # maxabs never wraps


def test_duplicate_layer_names_are_rejected(tmp_path):
    a, b = tiny_layers()
    b.name = a.name
    with pytest.raises(qconv.QconvError, match="unique"):
        Study([a, b], tmp_path, backends=["reference"], progress=False)
