"""The study on tiny generated layers: every artifact, a valid JSON, readable PNGs, the single-S
table equal to sweep_scales' own answer, a report consistent with the numbers (checked by
computations written here, not by the functions that built it), honest energy verdicts, and a
valid partial result after an interruption."""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest

import qconv
from qconv import backends as registry
from qconv import jsonout
from qconv.contract import Precision, conv2d_float64, conv2d_quantized, maxabs_scale, nrmse
from qconv.metrics import accumulator_bits, effective_bits, output_bits_nrmse
from qconv.scales import maxabs_q
from qconv.study import Layer, Study, load_layers, run_study, validate
from qconv.study import cli as study_cli
from qconv.study.appendix import PEAK_NOTE
from qconv.study.plots import PLOTS


def tiny_layers() -> list[Layer]:
    rng = np.random.default_rng(42)
    a = Layer("tiny3x3", (rng.standard_normal((1, 6, 6, 3)) * 5).astype(np.float32),
              (rng.standard_normal((3, 3, 4, 3)) * 0.2).astype(np.float32))
    b = Layer("tiny1x1", (rng.standard_normal((1, 5, 4, 2)) * 2).astype(np.float32),
              (rng.standard_normal((1, 1, 3, 2)) * 0.5).astype(np.float32))
    return [a, b]


def variants() -> list[str]:
    return [name for name, _, _ in registry.variants()]


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


def body(report: str) -> str:
    return report.split("\n## Appendix", 1)[0]


def test_every_artifact_is_written(study):
    out, res = study
    for name in ["results.json", "results.csv", "report.md", *(f"{p}.png" for p in PLOTS)]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert res["status"] == "complete" and res["partial_reason"] is None
    assert set(res["config"]["backends"]) >= set(variants())
    # per layer: FP32 once per option; each integer precision at one S, the best pair, per channel
    n = sum(1 if b in res["config"]["baseline_only"] else 1 + 3 * 3 for b in res["config"]["backends"])
    assert len(res["measurements"]) == 2 * n
    assert len(res["sweeps"]) == 2 * 3 * 2          # nearest (with pairs) and truncate
    assert len(res["strategies"]) == 2 * 3 * 5
    assert len(res["single_s"]) == 2 * 3


def test_json_validates_against_the_schema(study):
    out, _ = study
    doc = json.loads((out / "results.json").read_text())
    assert validate(doc) == []
    assert doc["schema"] == "qconv-study-results" and doc["schema_version"] == 3
    for key in ("cpu_model", "gpu", "versions", "date"):
        assert key in doc["machine"]


def test_the_validator_rejects_what_the_schema_forbids(study):
    out, _ = study
    doc = json.loads((out / "results.json").read_text())
    bad = copy.deepcopy(doc)
    del bad["measurements"][0]["backend"]
    bad["status"] = "done"
    bad["sweeps"][0]["rows"][0]["nrmse"] = "small"
    bad["single_s"][0]["limit"] = "bad luck"
    bad["surprise"] = 1
    errs = validate(bad)
    assert any("missing required key 'backend'" in e for e in errs)
    assert any("status" in e and "not one of" in e for e in errs)
    assert any(".rows[0].nrmse" in e for e in errs)
    assert any("single_s[0].limit" in e for e in errs)
    assert any("unexpected key 'surprise'" in e for e in errs)


def test_variants_come_from_the_registry_and_are_accepted_back(study):
    _, res = study
    for label in res["config"]["backends"]:
        b, opts = registry.parse_variant(label)
        assert registry.variant_name(b, opts) == label
        conv = qconv.prepare(tiny_layers()[1].w, "fp32", label)  # backend= takes the report's name
        assert conv.backend == b


def test_every_png_is_readable_at_its_recorded_size(study):
    out, res = study
    assert [p["name"] for p in res["plots"]] == list(PLOTS)
    for p in res["plots"]:
        assert png_size(out / p["file"]) == (p["width"], p["height"])


@pytest.mark.parametrize("name", ["vcurve", "histograms"])
def test_vcurve_and_histograms_are_not_empty(study, name):
    from matplotlib.image import imread
    out, _ = study
    img = imread(out / f"{name}.png")
    assert img.shape[0] > 300 and img.shape[1] > 600
    rgb = img[..., :3]
    ink = np.mean(np.any(rgb < 0.8, axis=-1))
    colours = len(np.unique((rgb * 15).astype(int).reshape(-1, 3), axis=0))
    assert ink > 0.02 and colours > 8  # lines, bars and text in several colours, not a blank canvas


def test_csv_has_one_row_per_measurement(study):
    out, res = study
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(res["measurements"])
    for row, m in zip(rows, res["measurements"]):
        assert (row["layer"], row["backend"], row["precision"]) == (m["layer"], m["backend"], m["precision"])
        if m["error"] is None:
            assert float(row["convolve_median_s"]) == pytest.approx(m["phases_s"]["convolve"]["median"])


def test_the_single_s_table_is_sweep_scales_answer(study):
    """The table's S (nearest and truncate) and NRMSE equal sweep_scales run here on the same grid."""
    _, res = study
    grid = res["config"]["sweep"]
    layers = {L.name: L for L in tiny_layers()}
    for row in res["single_s"]:
        L = layers[row["layer"]]
        near = qconv.sweep_scales(L.x, L.w, row["precision"], fine_per_octave=grid["fine_per_octave"])
        trunc = qconv.sweep_scales(L.x, L.w, row["precision"], rounding="truncate",
                                   fine_per_octave=grid["fine_per_octave"])
        assert row["s_nearest"] == near.best_single.s_x and row["nrmse_nearest"] == near.best_single.nrmse
        assert row["s_truncate"] == trunc.best_single.s_x and row["nrmse_truncate"] == trunc.best_single.nrmse
        p = Precision(row["precision"])
        assert row["accumulator_bits_worst_case"] == 2 * p.bits + math.ceil(math.log2(L.w.shape[0] * L.w.shape[1]
                                                                                     * L.w.shape[3]))
        clipped = np.mean(np.abs(np.rint(L.x * np.float32(row["s_nearest"]))) > p.qmax)
        assert row["input_clipped_fraction"] == pytest.approx(clipped)
        assert row["limit"] in ("wrap-around", "clipping", "underflow")
    report = (study[0] / "report.md").read_text()
    for row in res["single_s"]:
        assert f"| {row['precision'].upper()} | {qconv.sweep.format_scale(row['s_nearest'])} |" in report


def test_timed_integer_options_use_the_single_s_and_match_the_contract(study):
    _, res = study
    single = {(r["layer"], r["precision"]): r for r in res["single_s"]}
    for m in res["measurements"]:
        if m["error"] is not None:
            continue
        ph = m["phases_s"]["convolve"]
        assert ph["min"] <= ph["median"] <= ph["max"] and m["call_s"]["median"] > 0
        if m["precision"] == "fp32":
            assert m["scale"] is None and m["within_fp32_bound"] is True
            continue
        assert m["bit_exact"] is True  # every backend gives the contract's bits, whatever the scale
        if m["scale_strategy"] == "single-S":
            r = single[(m["layer"], m["precision"])]
            assert m["scale"]["s_x"] == m["scale"]["s_w"] == r["s_nearest"]
            assert m["nrmse"] == r["nrmse_nearest"]


def test_speedups_use_the_one_baseline(study):
    _, res = study
    for name, s in res["summary"]["layers"].items():
        assert (s["baseline"]["backend"], s["baseline"]["precision"]) == ("c-scalar", "fp32") or \
            "c-scalar" not in variants()
        base = next(m for m in res["measurements"] if m["layer"] == name and m["backend"] == s["baseline"]["backend"]
                    and m["precision"] == "fp32")
        for m in res["measurements"]:
            if m["layer"] == name and m["error"] is None:
                assert m["speedup_vs_baseline"] == pytest.approx(
                    base["phases_s"]["convolve"]["median"] / m["phases_s"]["convolve"]["median"])


def dominated(a, b) -> bool:
    """b dominates a: no slower, no less accurate, and better in one."""
    return b[0] <= a[0] and b[1] <= a[1] and (b[0] < a[0] or b[1] < a[1])


def test_the_frontier_is_every_undominated_option(study):
    _, res = study
    for name, s in res["summary"]["layers"].items():
        pts = [(m["call_s"]["median"], m["nrmse"], (m["backend"], m["precision"], m["scale_strategy"]))
               for m in res["measurements"] if m["layer"] == name and m["error"] is None]
        want = {p[2] for p in pts if not any(dominated(p, q) for q in pts)}
        got = {(o["backend"], o["precision"], o["scale_strategy"]) for o in s["frontier"]}
        # ties in both coordinates keep one point: compare the undominated (time, error) pairs
        assert {(p[0], p[1]) for p in pts if p[2] in got} == {(p[0], p[1]) for p in pts if p[2] in want}


def test_report_opens_with_the_answer_to_the_assignment(study):
    out, res = study
    report = (out / "report.md").read_text()
    answer = report.split("## The answer", 1)[1].split("\n## ", 1)[0]
    for q in ("Which S?", "What comes on top?", "Best option?", "What decides it?", "Does energy change it?",
              "Is naive quantization justified?"):
        assert f"**{q}**" in answer
    for p in PLOTS:
        assert f"({p}.png)" in report
    for src in ("Horowitz", "Jacob et al.", "Krishnamoorthi"):
        assert src in report
    for name in ("tiny3x3", "tiny1x1"):
        fastest = min((m for m in res["measurements"] if m["layer"] == name and m["error"] is None
                       and m["scale_strategy"] in (None, "single-S")),
                      key=lambda m: m["phases_s"]["convolve"]["median"])
        assert f"{fastest['backend']} {fastest['precision'].upper()}" in answer


def _timed(backend: str, precision: str, strategy: str | None, convolve_s: float, nrmse: float) -> dict:
    """One measurement of a synthetic results table: what summary.derive and the answer read."""
    t = {"median": convolve_s, "q1": convolve_s, "q3": convolve_s}
    return {"layer": "L", "backend": backend, "precision": precision, "scale_strategy": strategy, "error": None,
            "phases_s": {"convolve": t}, "call_s": dict(t), "nrmse": nrmse, "effective_bits": 10.0,
            "energy_estimate_j": {"total_j": 1e-3}, "gops": 1.0, "peak_gops": None}


@pytest.mark.parametrize("per_channel_s,beats", [(0.8e-3, True), (1.2e-3, False)])
def test_best_option_and_what_decides_it_compare_the_same_options(per_channel_s, beats):
    # Every single-S integer option is slower than FP32, an INT8 per-channel one may not be: the
    # answer must not name it faster than FP32 and then say no integer option beats FP32.
    from qconv.study import report as rep, summary
    res = {"layers": [{"name": "L", "k": 27}], "measurements": [
        _timed("c-avx2", "fp32", None, 1e-3, 1e-7),
        _timed("c-avx2", "int8", "single-S", 1.5e-3, 5e-2),
        _timed("c-avx2", "int16", "single-S", 1.4e-3, 1e-5),
        _timed("c-avx2", "int8", "per-channel", per_channel_s, 1e-4)]}
    summary.derive(res)
    d = rep._Data(res)
    best, decides = rep._answer_best(d)[0], rep._answer_factors(d)[0]
    assert ("with any scale strategy: **c-avx2 INT8 per-channel**" in best) is beats, best
    if beats:
        assert "no integer option" not in decides and "runs 1.2x faster than the fastest FP32" in decides, decides
    else:
        assert "no integer option, with any scale strategy, beats FP32" in decides, decides


def _spread(m: dict, q1: float, q3: float, call_s: float | None = None) -> dict:
    """Give a synthetic measurement a convolve-time interquartile range and its own whole-call time."""
    m["phases_s"]["convolve"].update(q1=q1, q3=q3)
    if call_s is not None:
        m["call_s"] = {"median": call_s, "q1": call_s, "q3": call_s}
    return m


def _single(layer: str, p: str, nrmse: float, limit: str = "clipping") -> dict:
    """One single-S row of a synthetic results table: what the answer section reads."""
    return {"layer": layer, "precision": p, "s_nearest": 1.0, "nrmse_nearest": nrmse, "limit": limit,
            "wrap_over_bound": None, "input_clipped_fraction": 0.0, "kernel_qmax": 1, "kernel_zero_fraction": 0.0,
            "accumulator_bits_worst_case": 22}


def _layer(name: str, k: int = 27, x: float = 1.0, w: float = 1.0) -> dict:
    return {"name": name, "k": k, "input_absmax": x, "kernel_absmax": w}


def _strategies(layer: str, p: str, nrmse: float) -> list[dict]:
    return [{"layer": layer, "precision": p, "strategy": s, "nrmse": nrmse}
            for s in ("single-S", "single-S-truncate", "pair", "maxabs", "per-channel")]


def test_best_option_names_its_measure_the_whole_call_winner_and_ties():
    # exam1 as QA saw it: INT8's convolve phase is fastest, its whole call the slowest, FP32's whole call
    # the fastest; INT16's convolve-phase interquartile range overlaps INT8's.
    from qconv.study import report as rep, summary
    res = {"layers": [{"name": "L", "k": 576}], "measurements": [
        _spread(_timed("c-avx2", "fp32", None, 1.40e-3, 1e-7), 1.38e-3, 1.42e-3, 1.46e-3),
        _spread(_timed("c-avx2", "int8", "single-S", 1.26e-3, 5e-2), 1.20e-3, 1.31e-3, 1.70e-3),
        _spread(_timed("c-avx2", "int16", "single-S", 1.29e-3, 1e-3), 1.28e-3, 1.35e-3, 1.60e-3)]}
    summary.derive(res)
    S = res["summary"]["layers"]["L"]
    assert S["fastest_call"]["precision"] == "fp32" and [o["precision"] for o in S["fastest_tied_with"]] == ["int16"]
    d = rep._Data(res)
    best, decides = rep._answer_best(d)[0], rep._answer_factors(d)[0]
    head, call = best.split("whole call", 1)
    assert "convolve phase" in head and "c-avx2 INT8" in head, best
    assert "tied with c-avx2 INT16" in head, best
    assert call.split(".")[0].count("c-avx2 FP32") == 1 and "1.46 ms" in call, best
    assert "in the convolve phase" in decides and "slower than FP32's fastest" in decides, decides


def test_the_acceptable_verdict_uses_one_rule_for_every_precision():
    # INT8 clears the bar on one layer and is 20x over it on the other: it does not clear it.
    from qconv.study import report as rep
    res = {"layers": [_layer("small"), _layer("const")], "measurements": [], "strategies": [],
           "single_s": [_single("small", "int8", 0.0233), _single("const", "int8", 0.0),
                        _single("small", "int16", 1e-4), _single("const", "int16", 0.0)]}
    text = rep._answer_acceptable(rep._Data(res))[0]
    assert "INT8 with one S clears it on 1 of 2 layers only" in text and "holds up" not in text, text
    assert "not justified" in text and "INT16 with one S clears it (0-0.0001)" in text, text
    res["single_s"][2]["nrmse_nearest"] = 0.02   # INT16 over the bar on one layer: the same rule
    assert "INT16 with one S clears it on 1 of 2 layers only" in rep._answer_acceptable(rep._Data(res))[0]


def test_exact_layers_and_fp32_only_runs_get_no_contradicting_explanation():
    from qconv.study import report as rep
    # a constant layer: every precision exact, clipping its nominal limit
    const = {"layers": [_layer("const")], "measurements": [], "single_s": [_single("const", "int8", 0.0)],
             "strategies": _strategies("const", "int8", 0.0), "config": {"precisions": ["int8"]}}
    d = rep._Data(const)
    scale, on_top = " ".join(rep._answer_scale(d)), rep._answer_on_top(d)[0]
    assert "clipping stops S" not in scale and "cannot serve" not in scale and "NRMSE 0" in scale, scale
    assert "Only the single S" not in on_top and "exact" in on_top, on_top
    assert d.ratio("int8", "single-S", "pair") == [1.0]       # 0 is a value, not a missing one
    # one S exact, per-channel not: the ratio says so instead of dropping the layer
    const["strategies"][-1]["nrmse"] = 1e-3
    assert rep._Data(const).ratio("int8", "per-channel", "single-S") == [math.inf]
    # FP32 only: no S, no empty tables
    fp32 = {"layers": [_layer("L")], "measurements": [], "single_s": [], "strategies": [],
            "config": {"precisions": ["fp32"]}}
    d = rep._Data(fp32)
    tables = "\n".join(rep._single_s_tables(d) + rep._on_top_table(d))
    assert "| precision |" not in tables and "| layer |" not in tables and "FP32 only" in tables, tables
    assert "no integer precision was requested" in rep._answer_on_top(d)[0]
    assert "Only the single S" not in rep._answer_on_top(d)[0]


def _partial_res(finished: bool) -> dict:
    """Two layers asked for at repeat 3; the run stopped while the second ('B', K 999) was prepared."""
    ms = [dict(_timed("c-avx2", "fp32", None, 1e-3, 1e-7), layer="A", repeat=3),
          dict(_timed("c-avx2", "int8", "single-S", 5e-4, 5e-2), layer="A", repeat=3)] if finished else []
    ms += [{"layer": "B", "backend": "c-avx2", "precision": p, "scale_strategy": s, "nrmse": None,
            "error": "interrupted before any timed run"} for p, s in (("fp32", None), ("int8", "single-S"))]
    return {"status": "partial", "partial_reason": "interrupted (KeyboardInterrupt) before the grid finished",
            "config": {"precisions": ["fp32", "int8"], "repeat": 3, "baseline_only": []},
            "layers": ([_layer("A", 27)] if finished else []) + [_layer("B", 999, x=500.0)],
            "single_s": [_single("A", "int8", 0.05)] if finished else [],
            "strategies": _strategies("A", "int8", 0.05) if finished else [], "measurements": ms}


def test_an_interrupted_run_says_so_and_keeps_the_unfinished_layer_out_of_the_answer():
    from qconv.study import report as rep, summary
    res = _partial_res(finished=True)
    summary.derive(res)
    d = rep._Data(res)
    assert d.layers == ["A"] and d.unfinished == ["B"]
    scale = " ".join(rep._answer_scale(d))
    assert "K = 27)" in scale and "999" not in scale and "500x" not in scale, scale
    assert "`B`" in rep._partial_note(d)[0] and "interrupted" in rep._partial_note(d)[0].lower()
    res = _partial_res(finished=False)
    summary.derive(res)
    d = rep._Data(res)
    answer = " ".join(rep._answer_scale(d) + rep._answer_on_top(d) + rep._answer_best(d) + rep._answer_factors(d)
                      + rep._answer_acceptable(d))
    for wrong in ("No integer precision was swept", "was not timed in this run", "not requested"):
        assert wrong not in answer, answer
    assert "interrupted before INT8 finished" in answer and "interrupted before FP32 finished" in answer, answer


def prose_words(text: str) -> int:
    return sum(len(line.split()) for line in text.splitlines()
               if line.strip() and not line.lstrip().startswith(("|", "![", "#")))


def test_body_stays_under_the_word_limit_and_repeats_no_sentence(study):
    out, _ = study
    report = (out / "report.md").read_text()
    assert prose_words(body(report)) < 1000
    sentences = [re.sub(r"[\d.e+-]+|`[^`]*`", "#", s.strip()) for s in re.split(r"(?<=[.!?])\s+", body(report))
                 if len(s.split()) > 6 and not s.lstrip().startswith(("|", "!["))]
    assert len(sentences) == len(set(sentences)), "a sentence template repeats in the body"


def shares_over_100_without_note(report: str) -> list[str]:
    return [c for c in re.findall(r"\|\s*(\d+)%(\\\*)?\s*\|", report) if int(c[0]) > 100 and not c[1]]


def test_no_share_of_peak_above_100_without_a_note(study):
    out, res = study
    report = (out / "report.md").read_text()
    assert shares_over_100_without_note(report) == []
    # Force one share above 100%: the table marks it and the note explains it.
    from qconv.study import artifacts, report as rep
    doc = copy.deepcopy(res)
    m = next(m for m in doc["measurements"] if m["error"] is None)
    m["peak_key"], m["peak_gops"] = None, m["gops"] / 1.5
    artifacts.summary.derive(doc)
    text = rep.render(doc)
    assert "150%\\*" in text and PEAK_NOTE in text and shares_over_100_without_note(text) == []
    assert doc["summary"]["peak_shares_over_100"][0]["share"] == pytest.approx(1.5)


def test_energy_loop_gives_no_verdict_when_the_kernel_is_under_half_the_loop():
    from qconv.study import energy
    state = {"j": 0.0}
    meter = energy.Meter("rapl", "fake", lambda: state["j"])

    def call(x):
        state["j"] += 0.5
    short = energy.measure_loop(meter, call, None, 1.0, idle_w=0.0, convolve_s=1e-9, flops=10)
    assert short["seconds"] >= 1.0 and short["kernel_share"] < 0.5 and short["measured"] is False
    assert short["dynamic_joules_per_call"] == pytest.approx(0.5, rel=1e-6)
    full = energy.measure_loop(meter, call, None, 1.0, idle_w=0.0, convolve_s=1.0, flops=10)
    assert full["kernel_share"] == 1.0 and full["measured"] is True
    no_idle = energy.measure_loop(meter, call, None, 1.0, idle_w=None, convolve_s=1.0, flops=10)
    assert no_idle["measured"] is False  # idle power unknown: no dynamic energy, no verdict


def test_report_states_energy_verdicts_only_for_measured_loops(study):
    from qconv.study import artifacts, report as rep
    _, res = study
    base = copy.deepcopy(res)
    for measured in (False, True):
        doc = copy.deepcopy(base)
        for m in doc["measurements"]:
            if m["error"] is None and m["scale_strategy"] in (None, "single-S"):
                m["energy_measured"] = {"meter": "rapl", "device": "fake", "joules_per_call": 1e-3, "watts": 10.0,
                                        "calls": 100, "seconds": 1.0, "idle_watts": 5.0,
                                        "dynamic_joules_per_call": 5e-4, "kernel_share": 0.9 if measured else 0.1,
                                        "gops_per_watt": 1.0, "measured": measured}
        artifacts.summary.derive(doc)
        text = body(rep.render(doc))
        assert ("Measured (dynamic energy" in text) is measured
        assert ("no measured verdict" in text) is (not measured)
        assert validate(jsonout.clean(doc)) == []


def test_per_channel_strategy_matches_a_hand_computation(tmp_path):
    layer = tiny_layers()[0]
    w = layer.w * np.array([1, 1e-2, 1e-1, 1], dtype=np.float32)[None, None, :, None]
    lay = Layer("scaled", layer.x, w)
    res = run_study([lay], tmp_path, backends=["reference"],
                    precisions=["int8"], repeat=1, quick=True, progress=False, plots=False)
    pc = next(s for s in res["strategies"] if s["strategy"] == "per-channel")
    pt = next(s for s in res["strategies"] if s["strategy"] == "maxabs")
    q = maxabs_q(Precision.INT8, 3 * 3 * 3)
    s_w = np.array([maxabs_scale(w[:, :, o, :], q) for o in range(w.shape[2])], dtype=np.float32)
    y, _, wrapped = conv2d_quantized(layer.x, w, Precision.INT8, maxabs_scale(layer.x, q), s_w)
    assert pc["nrmse"] == nrmse(y, conv2d_float64(layer.x, w)) and wrapped == 0
    assert pc["s_w_range"] == [float(s_w.min()), float(s_w.max())]
    assert pc["nrmse"] < pt["nrmse"]  # the small channels get their own, finer scale


def test_metrics():
    assert effective_bits(output_bits_nrmse(8)) == pytest.approx(8.0)
    assert effective_bits(None) is None and effective_bits(math.inf) is None
    assert accumulator_bits(8, 576) == 16 + 10 and accumulator_bits(16, 1152) == 32 + 11


def test_interrupt_leaves_a_valid_partial_result(tmp_path, monkeypatch):
    # Ctrl-C in the second timing round of the first layer: every option of that layer has one
    # timed run, the second layer was never reached.
    calls = {"n": 0}
    real = Study._timed_call
    # reference: FP32, and 3 scale strategies x 3 integer precisions; the c-scalar FP32 baseline
    n_options = 1 + 3 * 3 + ("c-scalar" in variants())

    def flaky(t, x):
        calls["n"] += 1
        if calls["n"] == n_options + 2:
            raise KeyboardInterrupt
        return real(t, x)
    monkeypatch.setattr(Study, "_timed_call", staticmethod(flaky))
    with pytest.raises(KeyboardInterrupt):
        run_study(tiny_layers(), tmp_path, backends=["reference"], repeat=3, quick=True, progress=False)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert validate(doc) == []
    assert doc["status"] == "partial" and "interrupted" in doc["partial_reason"]
    assert [L["name"] for L in doc["layers"]] == ["tiny3x3"]
    assert len(doc["measurements"]) == n_options
    assert [m["repeat"] for m in doc["measurements"]] == [2] + [1] * (n_options - 1)
    assert all(m["error"] is None and m["nrmse"] is not None for m in doc["measurements"])
    assert (tmp_path / "results.csv").is_file()
    assert "Partial results" in (tmp_path / "report.md").read_text()
    assert all((tmp_path / f"{p}.png").is_file() for p in PLOTS)


def test_interrupt_before_any_measurement_is_still_valid(tmp_path, monkeypatch):
    from qconv.study import accuracy

    def boom(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(accuracy, "accuracy_for_layer", boom)
    with pytest.raises(KeyboardInterrupt):
        run_study(tiny_layers(), tmp_path, backends=["reference"], repeat=1, quick=True, progress=False)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert validate(doc) == [] and doc["status"] == "partial" and doc["measurements"] == []


def test_interrupt_while_the_plots_are_drawn_still_leaves_a_report_and_says_partial(tmp_path, monkeypatch):
    from qconv.study import artifacts

    def boom(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(artifacts.figures, "draw_all", boom)
    with pytest.raises(KeyboardInterrupt):
        run_study(tiny_layers()[:1], tmp_path, backends=["reference"], precisions=["int8"], repeat=1, quick=True,
                  progress=False)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert validate(doc) == [] and doc["status"] == "partial" and "plots were drawn" in doc["partial_reason"]
    report = (tmp_path / "report.md").read_text()
    assert "Partial results" in report and ".png" not in report  # no link to a figure that is not there


def test_reference_only_and_a_precision_subset(tmp_path):
    res = run_study(tiny_layers()[:1], tmp_path, backends=["reference"], precisions=["fp32", "int8"],
                    repeat=1, quick=True, progress=False)
    assert validate(json.loads((tmp_path / "results.json").read_text())) == []
    got = {(m["backend"], m["precision"]) for m in res["measurements"]}
    assert ("reference", "fp32") in got and ("reference", "int8") in got
    if "c-scalar" in variants():  # the baseline is always scalar C FP32, timed for FP32 only
        assert {p for b, p in got if b == "c-scalar"} == {"fp32"}
        s = res["summary"]["layers"]["tiny3x3"]["baseline"]
        assert (s["backend"], s["precision"]) == ("c-scalar", "fp32")


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


@pytest.mark.parametrize("argv, match", [
    (["no/such/dir"], "no/such/dir"), (["--backends", "nope"], "unknown backend 'nope'"),
    (["--precisions", "int4"], "int4"), (["--batch", "0"], "--batch must be >= 1"),
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--backends", "c-scalar[isa=avx2]"], "does not take option"),        # the backend's own check, up front
    (["--backends", "reference[threads=2]"], "does not take option"),
    (["--batch", str(10**20)], r"--batch 1\d+: layer l would need .* GiB"),  # not an OverflowError later
])
def test_cli_rejects_bad_input(tmp_path, argv, match):
    lay = tiny_layers()[1]
    d = tmp_path / "l"
    d.mkdir()
    qconv.save_tensor(d / "input_tensor.bin", lay.x)
    qconv.save_tensor(d / "kernel_tensor.bin", lay.w)
    if argv[0] != "no/such/dir":
        argv = [str(d), *argv]
    with pytest.raises(qconv.QconvError, match=match):
        study_cli.run(_args([*argv, "--out", str(tmp_path / "o"), "--no-progress"]))
    assert not (tmp_path / "o").exists()


def test_load_layers_names_the_missing_file(tmp_path):
    (tmp_path / "input_tensor.bin").write_bytes(b"")
    with pytest.raises(qconv.QconvError, match="kernel_tensor.bin is missing"):
        load_layers([str(tmp_path)])


def test_energy_estimate_follows_the_cited_constants():
    from qconv.study import energy
    e8 = energy.estimate(Precision.INT8, 100, 10, 50, 1000)
    e32 = energy.estimate(Precision.FP32, 100, 10, 50, 1000)
    assert e8["compute_j"] == pytest.approx(1000 * (0.2 + 0.1) * 1e-12)
    assert e32["compute_j"] == pytest.approx(1000 * (3.7 + 0.9) * 1e-12)
    assert e32["dram_bytes"] == (100 + 10 + 50) * 4
    assert e8["dram_low_j"] == pytest.approx(e8["dram_bytes"] / 8 * 1.3e-9)
    assert e8["total_low_j"] <= e8["total_j"] <= e8["total_high_j"]
    hbm = energy.estimate(Precision.FP32, 100, 10, 50, 1000, energy.model("NVIDIA H200"), on_gpu=True)
    assert hbm["memory"] == "hbm" and hbm["dram_low_j"] == pytest.approx(160 * 4 * 8 * 3.9e-12)
    m = energy.model("NVIDIA H200")
    assert m["gpu_memory"] == "hbm" and "O'Connor" in m["hbm_source"] and "Horowitz" in m["source"]
    assert energy.model("NVIDIA GeForce RTX 4090")["gpu_memory"] == "other"


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


def test_batch_tiles_the_input(tmp_path):
    res = run_study(tiny_layers()[1:], tmp_path, backends=["reference"], precisions=["int8"], batch=3,
                    repeat=1, quick=True, progress=False, plots=False)
    L = res["layers"][0]
    assert L["input_shape"][0] == 3 and L["output_shape"][0] == 3
    m = next(m for m in res["measurements"] if m["scale_strategy"] == "single-S")
    assert m["flops"] == 3 * 2 * 5 * 4 * 3 * 2
    sw = next(s for s in res["sweeps"] if s["rounding"] == "nearest")
    assert sw["outputs"] == 5 * 4 * 3  # the sweep ran on the layer itself; its NRMSE is the batch's
    assert m["bit_exact"] is True and m["nrmse"] == pytest.approx(sw["best"]["nrmse"], rel=1e-9)


def test_gpu_options_with_a_stand_in_backend(tmp_path, monkeypatch):
    """The CUDA paths (a variant with options, NVML energy loops, datasheet peaks, HBM energy)
    without a GPU: 'cuda' is stood in for by the reference backend and NVML by a fake counter."""
    from qconv import api
    from qconv.study import energy
    real_prepare, seen = api.prepare, []

    def shim(w, precision, backend=None, **kw):
        if str(backend).startswith("cuda"):
            seen.append(backend)
            backend = "reference"
        return real_prepare(w, precision, backend, **kw)
    clock = {"j": 0.0}

    def fake_nvml():
        def read():
            clock["j"] += 0.25
            return clock["j"]
        return energy.Meter("nvml", "NVIDIA H200", read), "fake"
    avail = {"reference": (True, "numpy"), "cuda": (True, "stand-in")}
    monkeypatch.setattr(api, "prepare", shim)
    monkeypatch.setattr(registry, "available_backends", lambda: avail)
    monkeypatch.setattr(registry, "variants", lambda available_only=True: [
        ("cuda", "cuda", {}), ("cuda[int8_path=dp4a]", "cuda", {"int8_path": "dp4a"}),
        ("reference", "reference", {})])
    monkeypatch.setattr(energy, "nvml_meter", fake_nvml)
    res = run_study(tiny_layers()[:1], tmp_path, repeat=1, quick=True, progress=False, energy_loop_s=0.02)
    assert validate(json.loads((tmp_path / "results.json").read_text())) == []
    assert "cuda[int8_path=dp4a]" in seen
    cuda = {m["precision"]: m for m in res["measurements"] if m["backend"] == "cuda" and
            m["scale_strategy"] in (None, "single-S")}
    assert cuda["fp32"]["peak_gops"] == 67000.0 and cuda["int8"]["peak_gops"] == 1979000.0
    assert cuda["int8"]["energy_estimate_j"]["memory"] == "hbm"
    loops = [m["energy_measured"] for m in cuda.values()]
    assert all(e["meter"] == "nvml" and e["measured"] is False for e in loops)  # 0.02 s loops: no verdict
    assert res["summary"]["layers"]["tiny3x3"]["energy_best_measured"] is None
    assert "Measured (dynamic energy" not in (tmp_path / "report.md").read_text()


def test_cpu_peaks_are_measured_where_the_c_extension_runs(study):
    _, res = study
    if "c-avx2" not in {registry.parse_variant(v)[0] for v in variants()}:
        pytest.skip(qconv.available_backends()["c-avx2"][1])
    peaks = {(p["instruction"], p["threads"]): p["gops"] for p in res["machine"]["measured_peaks"]}
    assert any(i == "fma" for i, _ in peaks) and all(g > 0 for g in peaks.values())
    for m in res["measurements"]:
        if m["error"] is None and m["backend_module"] in ("c-avx2", "c-scalar"):
            # the peak is the one of the instruction the backend itself declares for this variant
            name, opts = registry.parse_variant(m["backend"])
            bound = registry.module(name).bound_instruction(opts, Precision(m["precision"]))
            if bound is None:
                assert m["peak_gops"] is None and m["peak_key"] is None
            else:
                assert m["peak_key"][0] == bound[0]
                assert m["peak_gops"] == peaks[tuple(m["peak_key"])] and m["peak_note"].startswith("measured")
        if m["backend"] == "reference":
            assert m["peak_gops"] is None


def test_gpu_name_falls_back_to_the_cuda_probe(tmp_path, monkeypatch):
    from qconv.study import energy
    monkeypatch.setattr(registry, "available_backends", lambda: {
        "reference": (True, "numpy"),
        "cuda": (True, "NVIDIA H100 PCIe (sm_90), CUDA driver 13.0, NVRTC 13.0")})
    monkeypatch.setattr(energy, "nvml_meter", lambda: (None, "no NVML here"))
    st = Study(tiny_layers(), tmp_path, backends=["reference"], progress=False)
    assert st.machine["gpu"] == "NVIDIA H100 PCIe"
    from qconv.study.machine import peak_gops
    assert peak_gops("cuda", Precision.FP32, st.machine)[0] == 51000.0


def test_unusable_output_folder_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(qconv.QconvError, match="output folder"):
        Study(tiny_layers(), f / "out", backends=["reference"], progress=False)
    with pytest.raises(qconv.QconvError, match="output folder"):
        Study(tiny_layers(), f, backends=["reference"], progress=False)


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


def test_duplicate_layer_names_are_rejected(tmp_path):
    a, b = tiny_layers()
    b.name = a.name
    with pytest.raises(qconv.QconvError, match="unique"):
        Study([a, b], tmp_path, backends=["reference"], progress=False)


def test_study_modules_import_no_cycle():
    """Each study module imports only modules before it in this order (module-level imports)."""
    import ast
    import qconv.study as pkg
    order = ["config", "schema", "accuracy", "energy", "machine", "references", "network", "summary", "figures",
             "plots_scale", "plots_network", "appendix", "report_network", "plots", "report_answer", "report",
             "artifacts", "grid", "cli"]
    root = Path(pkg.__file__).parent
    assert {p.stem for p in root.glob("*.py")} - {"__init__"} == set(order)
    for i, name in enumerate(order):
        tree = ast.parse((root / f"{name}.py").read_text())
        deps = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}
        deps |= {a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 1 and not n.module
                 for a in n.names}
        assert deps <= set(order[:i]), f"{name} imports {deps - set(order[:i])}"
        assert len((root / f"{name}.py").read_text().splitlines()) <= 400, f"{name}.py passes 400 lines"


def test_reference_points_are_labelled_and_measured_against_the_same_reference():
    pytest.importorskip("torch")
    from qconv.study import references
    layer = tiny_layers()[0]
    ref = conv2d_float64(layer.x, layer.w)
    points = references.measure(layer, layer.x, ref, None, 2)
    assert {p["name"] for p in points} >= {"PyTorch FP32 (CPU)"}
    for p in points:
        assert p["layer"] == "tiny3x3" and p["call_s"]["median"] > 0 and p["note"]
    fp32 = next(p for p in points if p["precision"] == "fp32")
    assert fp32["nrmse"] < 1e-6


def test_an_unknown_backend_leaves_no_empty_output_folder(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(qconv.QconvError, match="unknown backend 'nope'"):
        Study(tiny_layers(), out, backends=["nope"], progress=False)
    assert not out.exists()


def test_histogram_labels_do_not_round_a_nonzero_share_to_zero(study):
    from qconv.study import plots_scale
    assert [plots_scale.share_text(f) for f in (0.0, 1e-4, 5.5e-5, 0.27)] == ["0%", "0.01%", "<0.01%", "27%"]
    doc = copy.deepcopy(study[1])
    for r in doc["single_s"]:
        r["input_clipped_fraction"] = 1e-4          # the table says 0.01%
    texts = [t.get_text() for ax in plots_scale.histograms(doc).axes for t in ax.texts]
    clips = [t for t in texts if t.endswith(" clip ")]
    assert clips and all("0.01% clip" in t for t in clips), clips


def test_plots_keep_exact_zeros_and_zero_thresholds(study):
    from qconv.study import plots, plots_network, plots_scale
    doc = copy.deepcopy(study[1])
    name = doc["layers"][0]["name"]
    st = [s for s in doc["strategies"] if s["layer"] == name]
    st[0]["nrmse"] = 0.0
    m = next(m for m in doc["measurements"] if m["layer"] == name and m["error"] is None)
    m["nrmse"] = 0.0
    ax = plots_scale.nrmse_bars(doc).axes[0]
    assert len(ax.patches) == len(st) + 1 and "0" in [t.get_text() for t in ax.texts]   # + the FP32 bar
    timed = [m for m in doc["measurements"] if m["layer"] == name and m["error"] is None]
    ax = plots.pareto_plot(doc).axes[0]
    assert sum(len(c.get_offsets()) for c in ax.collections) == len(timed) + len(
        [r for r in doc["reference_points"] if r["layer"] == name])
    assert "0" in [t.get_text() for t in ax.texts]
    net = {"name": "net", "evaluation_images": 1, "naive_int8": {}, "threshold": {"agreement": {"0.99": 0.0,
                                                                                                "0.95": 1e-4}},
           "layers": [{"name": "a", "index": 0, "depthwise": False}, {"name": "b", "index": 1, "depthwise": True}],
           "options": [{"precision": "int8", "strategy": "single", "label": "INT8", "isolated": [0.0, 1e-3],
                        "propagated": [1e-3, 2e-3]}]}
    ax = plots_network.network_layers({"network": net}).axes[0]
    labels = [ln.get_label() for ln in ax.lines]
    assert any("99% agreement up to NRMSE 0" in t for t in labels), labels
    line = next(ln for ln in ax.lines if ln.get_label() == "INT8 one S (the assignment's)")
    assert np.isfinite(line.get_ydata()).all()     # the exact layer is drawn (at the floor), not dropped


def test_the_vcurve_keeps_exact_zeros(study):
    from qconv.study import plots_scale
    doc = copy.deepcopy(study[1])
    name = doc["layers"][0]["name"]
    sw = next(s for s in doc["sweeps"] if s["layer"] == name and s["rounding"] == "nearest")
    sw["rows"][0]["nrmse"] = 0.0
    ax = plots_scale.vcurve(doc).axes[0]
    line = next(ln for ln in ax.lines if ln.get_label() == f"{sw['precision'].upper()}, rounding to nearest")
    assert len(line.get_xdata()) == len(sw["rows"]) and np.all(np.asarray(line.get_ydata()) > 0)
    assert "0" in [t.get_text() for t in ax.texts]


def test_sweep_candidate_counts_agree_and_are_labelled(study):
    out, res = study
    report = (out / "report.md").read_text()
    appendix_d = report.split("### D. Scale sweeps", 1)[1].split("### E.", 1)[0]
    appendix_e = report.split("### E. Scale strategies", 1)[1].split("### F.", 1)[0]
    assert "| single-S candidates | (s_x, s_w) pairs |" in appendix_d
    for s in res["sweeps"]:
        row = (f"| `{s['layer']}` | {s['precision']} | {s['rounding']} | {len(s['rows'])} | "
               f"{len(s['pair_rows']) or ''} |")
        assert row in appendix_d, row
        if s["rounding"] == "nearest":
            assert f"among {len(s['rows'])} single-S candidates for {s['precision']}" in appendix_e
    assert re.search(r"among \d+ candidates", appendix_e) is None


def test_csv_flags_per_channel_scales_and_leaves_fp32_rounding_empty(study):
    out, res = study
    rows = list(csv.DictReader((out / "results.csv").open()))
    for row, m in zip(rows, res["measurements"]):
        if m["precision"] == "fp32":
            assert row["rounding"] == "" and row["per_channel"] == "", row
        elif m["error"] is None:
            assert row["per_channel"] == str(m["scale_strategy"] == "per-channel"), row


# ------------------------------------------------------------------ QA: interrupts, bad data
def test_an_interrupt_in_the_sweeps_keeps_the_precisions_already_swept(tmp_path, monkeypatch):
    from qconv.study import accuracy
    real, seen = accuracy.sweeps, []

    def flaky(x, w, p, ref, settings):
        seen.append(p)
        if len(seen) == 2:                      # the second precision of the first layer
            raise KeyboardInterrupt
        return real(x, w, p, ref, settings)
    monkeypatch.setattr(accuracy, "sweeps", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_study(tiny_layers(), tmp_path, backends=["reference"], precisions=["fp32", "int32", "int8"],
                  repeat=1, quick=True, progress=False, plots=False)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert validate(doc) == [] and doc["status"] == "partial"
    assert doc["partial_reason"] == "interrupted (KeyboardInterrupt) during the scale sweeps of layer tiny3x3"
    # int32's rows are kept: both sweeps, the five strategies and its single-S row
    assert {(s["layer"], s["precision"]) for s in doc["sweeps"]} == {("tiny3x3", "int32")}
    assert len(doc["sweeps"]) == 2 and len(doc["strategies"]) == 5
    assert [(r["layer"], r["precision"]) for r in doc["single_s"]] == [("tiny3x3", "int32")]
    prog = doc["progress"]
    assert prog["stopped_in"] == "the scale sweeps of layer tiny3x3" and prog["network_done"] is None
    assert prog["layers"] == [
        {"layer": "tiny3x3", "requested": ["fp32", "int32", "int8"], "swept": ["int32"], "skipped": [], "timed": False},
        {"layer": "tiny1x1", "requested": ["fp32", "int32", "int8"], "swept": [], "skipped": [], "timed": False}]


def test_a_complete_run_records_every_requested_precision_as_done(study):
    _, res = study
    assert res["progress"]["stopped_in"] is None and res["skipped"] == []
    for L in res["progress"]["layers"]:
        assert L["requested"] == ["fp32", "int32", "int16", "int8"] and L["timed"] is True
        assert L["swept"] == ["int32", "int16", "int8"] and L["skipped"] == []


def test_an_interrupt_after_the_layers_says_where_it_stopped(tmp_path, monkeypatch):
    from qconv.study import accuracy

    def boom(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(accuracy, "common_s", boom)
    with pytest.raises(KeyboardInterrupt):
        run_study(tiny_layers(), tmp_path, backends=["reference"], precisions=["int8"], repeat=1, quick=True,
                  progress=False, plots=False)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert validate(doc) == [] and "before the grid finished" not in doc["partial_reason"]
    assert doc["partial_reason"].endswith("during the peak measurements after the layers")
    assert all(L["timed"] and L["swept"] == ["int8"] for L in doc["progress"]["layers"])


def _save_layer(d: Path, x: np.ndarray, w: np.ndarray) -> Path:
    d.mkdir(parents=True)
    qconv.save_tensor(d / "input_tensor.bin", x)
    qconv.save_tensor(d / "kernel_tensor.bin", w)
    return d


@pytest.mark.parametrize("where", ["input", "kernel"])
def test_a_non_finite_layer_is_refused_naming_the_file_before_any_output(tmp_path, where):
    lay = tiny_layers()[1]
    x, w = lay.x.copy(), lay.w.copy()
    (x if where == "input" else w)[0, 0, 0, 0] = np.nan
    d = _save_layer(tmp_path / "bad", x, w)
    out = tmp_path / "o"
    msg = rf"layer bad: the {where} \(.*bad/{where}_tensor.bin\) holds 1 non-finite value\(s\)"
    with pytest.raises(qconv.InputError, match=msg):
        study_cli.run(_args([str(d), "--backends", "reference", "--precisions", "int8", "--repeat", "1",
                             "--quick", "--no-progress", "--out", str(out)]))
    assert not out.exists()
    with pytest.raises(qconv.InputError, match=f"layer py: the {where} holds 1 non-finite"):  # from Python
        Study([Layer("py", x, w)], out, backends=["reference"], progress=False)
    assert not out.exists()


def test_maxabs_scale_reports_non_finite_data_and_calls_only_denormals_denormal():
    with pytest.raises(qconv.InputError, match="holds 1 non-finite value") as e:
        maxabs_scale(np.array([1.0, np.nan], np.float32), 127)
    assert "too small" not in str(e.value)
    with pytest.raises(qconv.InputError, match="too small") as e:  # normal float32, INT32's scale overflows
        maxabs_scale(np.full(4, 3e-30, np.float32), 2**31 - 1)
    assert "denormal" not in str(e.value) and "normal float32" in str(e.value)
    with pytest.raises(qconv.InputError, match="all denormal"):
        maxabs_scale(np.full(4, 1e-45, np.float32), 127)


def test_a_precision_that_cannot_scale_a_layer_is_skipped_for_that_layer_only(tmp_path):
    small, normal = tiny_layers()
    small = Layer("small", (small.x * np.float32(1e-31)).astype(np.float32), small.w)  # normal, under 6e-30
    assert np.abs(small.x).max() >= np.finfo(np.float32).tiny
    res = run_study([small, normal], tmp_path, backends=["reference"], precisions=["fp32", "int32", "int8"],
                    repeat=1, quick=True, progress=False, plots=True)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert validate(doc) == [] and res["status"] == "complete"
    skipped = {(s["layer"], s["precision"]): s["reason"] for s in res["skipped"]}
    assert set(skipped) == {("small", "int32")}  # int8's maxabs scale fits; its single-S sweep stops
    assert skipped[("small", "int32")].startswith("int32 skipped for layer small: the input's maxabs scale")
    assert "denormal" not in skipped[("small", "int32")]
    got = {(m["layer"], m["precision"]) for m in res["measurements"] if m["error"] is None}
    assert ("small", "fp32") in got and ("small", "int32") not in got and ("small", "int8") in got
    assert {("tiny1x1", "int32"), ("tiny1x1", "int8")} <= got
    by = {L["layer"]: L for L in res["progress"]["layers"]}
    assert by["small"]["swept"] == ["int8"] and by["small"]["skipped"] == ["int32"]
    assert by["tiny1x1"]["swept"] == ["int32", "int8"] and by["tiny1x1"]["skipped"] == []
    assert (tmp_path / "report.md").is_file()


def test_the_single_s_sweep_stops_at_the_largest_s_the_dequantize_allows():
    """Data near 1e-30: one S that reaches the input would need S^2 past float32, which the
    dequantize refuses; the sweep shows the S up to that limit (and the pairs, which get there)."""
    from qconv.contract import dequant_factor
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((1, 6, 6, 4)) * 1e-30).astype(np.float32)
    w = (rng.standard_normal((3, 3, 4, 4)) * 0.3).astype(np.float32)
    t = qconv.sweep_scales(x, w, "int8", pairs=True)
    assert t.rows and all(np.isfinite(dequant_factor(r.s_x, r.s_w)) for r in list(t.rows) + list(t.pair_rows))
    top = max(r.s_x for r in t.rows)
    with pytest.raises(qconv.QconvError):
        dequant_factor(4 * top, 4 * top)  # two octaves up is past the limit
    assert t.best.nrmse < t.best_single.nrmse < 1.0


@pytest.mark.parametrize("precisions", [["int8"], ["fp32", "int16", "int8"], ["fp32"]])
def test_the_batch_memory_check_counts_every_array_a_layer_holds(precisions):
    from qconv.study.config import layer_memory
    lay, batch = tiny_layers()[0], 7
    opts, _ = config_timed_options(["reference"], precisions, batch)
    n, h, w_, c = lay.x.shape
    out = batch * h * w_ * lay.w.shape[2]
    n_int = sum(p != "fp32" for p in precisions)
    fp32_opts = [o for o in opts if "fp32" in precisions or o.baseline_only]
    n_bounds = len({registry.fp32_bound(o.backend, o.options) for o in fp32_opts})
    held = (4 * batch * h * w_ * c           # the repeated input
            + 8 * out                        # its float64 reference
            + 4 * out * 3 * n_int            # expected outputs: one per (precision, single-S/pair/per-channel)
            + 8 * out * n_bounds             # float64 FP32 error bounds
            + 4 * out)                       # the option being warmed up: its output
    if n_int:
        held += 1 * batch * h * w_ * c + 4 * out  # a quantized input and an int32 accumulator (int8 at least)
    got = layer_memory(lay, batch, [Precision(p) for p in precisions], opts)
    assert got["total"] >= held and got["total"] == sum(v for k, v in got.items() if k != "total")


def test_a_batch_that_does_not_fit_is_refused_up_front_with_the_size(tmp_path, monkeypatch):
    from qconv import layouts
    from qconv.study.config import layer_memory
    lay = tiny_layers()[0]
    opts, _ = config_timed_options(["reference"], [Precision.INT8], 50)
    need = layer_memory(lay, 50, [Precision.INT8], opts)["total"]
    monkeypatch.setattr(layouts, "available_memory", lambda: need - 1)
    out = tmp_path / "o"
    with pytest.raises(qconv.InputError, match=r"--batch 50 on layer tiny3x3 needs about .* available"):
        Study([lay], out, backends=["reference"], precisions=["int8"], batch=50, progress=False)
    assert not out.exists()
    monkeypatch.setattr(layouts, "available_memory", lambda: need)
    Study([lay], out, backends=["reference"], precisions=["int8"], batch=50, progress=False)


def config_timed_options(backends_, precisions, batch):
    from qconv.study.config import timed_options
    return timed_options(backends_, [Precision(p) for p in precisions], batch)


def test_a_rerun_into_a_previous_studys_folder_needs_force_and_leaves_nothing_stale(tmp_path):
    out = tmp_path / "o"
    kw = dict(backends=["reference"], precisions=["int8"], repeat=1, quick=True, progress=False, plots=False)
    run_study(tiny_layers()[1:], out, **kw)
    (out / "network.csv").write_text("stale\n")        # an earlier study's files this run would not rewrite
    (out / "network_layers.png").write_bytes(b"stale")
    before = (out / "results.json").read_text()
    with pytest.raises(qconv.InputError, match=r"previous study's results: pass --force") as e:
        run_study(tiny_layers()[:1], out, **kw)
    assert "\n" not in str(e.value) and (out / "results.json").read_text() == before
    run_study(tiny_layers()[:1], out, force=True, **kw)
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.csv", "results.json"]
    assert [L["name"] for L in json.loads((out / "results.json").read_text())["layers"]] == ["tiny3x3"]


@pytest.mark.parametrize("files", [["report.md"], ["results.csv", "notes.txt"], ["results.json", "notes.txt"]])
@pytest.mark.parametrize("force", [False, True])
def test_a_folder_holding_other_files_is_refused_even_with_force(tmp_path, files, force):
    out = tmp_path / "mine"
    out.mkdir()
    for f in files:
        (out / f).write_text("the user's own\n")
    with pytest.raises(qconv.InputError, match="holds files the study did not write"):
        Study(tiny_layers(), out, backends=["reference"], progress=False, force=force)
    assert all((out / f).read_text() == "the user's own\n" for f in files)


def test_the_cli_refuses_a_reused_folder_in_one_line_with_exit_2(tmp_path, capsys):
    from qconv import cli
    d = _save_layer(tmp_path / "l", tiny_layers()[1].x, tiny_layers()[1].w)
    argv = ["study", str(d), "--backends", "reference", "--precisions", "int8", "--repeat", "1", "--quick",
            "--no-progress", "--no-plots", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err
    assert cli.main([*argv, "--force"]) == 0


def test_a_full_disk_names_results_json_and_leaves_no_tmp(tmp_path, monkeypatch, capsys):
    import errno
    from qconv import cli
    real = Path.write_text

    def full(self, data, *a, **kw):
        if self.name == "results.json.tmp":
            real(self, data[:10], *a, **kw)           # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, *a, **kw)
    d = _save_layer(tmp_path / "l", tiny_layers()[1].x, tiny_layers()[1].w)
    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "o"
    rc = cli.main(["study", str(d), "--backends", "reference", "--precisions", "int8", "--repeat", "1", "--quick",
                   "--no-progress", "--no-plots", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert str(out / "results.json") in err and "results.json could not be written" in err and "No space" in err
    assert not (out / "results.json.tmp").exists() and not (out / "results.json").exists()


def test_results_json_that_is_a_folder_is_named_not_its_tmp(tmp_path):
    from qconv.study import artifacts
    (tmp_path / "results.json").mkdir()
    with pytest.raises(OSError) as e:
        artifacts.write_json({"a": 1}, tmp_path / "results.json")
    assert e.value.filename == str(tmp_path / "results.json") and ".tmp" not in str(e.value)
    assert not (tmp_path / "results.json.tmp").exists()
