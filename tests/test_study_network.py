"""The study's network section (`qconv study --network`) on a tiny stand-in network built here
(a 3x3 conv, a strided depthwise 3x3 whose channels span three decades, a pointwise conv, a
linear classifier; random images, so nothing is downloaded): the section, its figure and CSV, a
threshold recomputed here from its own noise injection, naive INT8 layer by layer, the report's
acceptable-loss answer quoting the measured numbers, and the rest of the study unchanged."""

from __future__ import annotations

import argparse
import csv
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

import qconv
from qconv.metrics import output_bits_nrmse
from qconv.nets.data import UNLABELLED, ImageSet, Split
from qconv.nets.runner import ConvLayer, Runner
from qconv.study import cli as study_cli
from qconv.study import validate
from qconv.study.config import Layer
from qconv.study.plots import PLOTS

N_IMAGES, N_CAL, LIMIT = 56, 8, 40


class TinyNet:
    """Follows qconv.nets.runner.Network: name, layers, forward(x, conv), split(calibration)."""

    name = "tiny-net"

    def __init__(self, seed: int = 3) -> None:
        rng = np.random.default_rng(seed)
        spread = np.geomspace(1e-3, 1.0, 8)  # the depthwise channels span three decades:
        self.layers = (                       # one per-tensor INT8 scale rounds the small ones away
            ConvLayer("conv3x3", (rng.standard_normal((3, 3, 8, 3)) * 0.3).astype(np.float32),
                      (rng.standard_normal(8) * 0.05).astype(np.float32)),
            ConvLayer("dw3x3", (rng.standard_normal((3, 3, 8, 1)) * spread[None, None, :, None]).astype(np.float32),
                      None, stride=2, groups=8),
            ConvLayer("pw1x1", (rng.standard_normal((1, 1, 12, 8)) / spread[None, None, None, :] * 0.3)
                      .astype(np.float32), (rng.standard_normal(12) * 0.05).astype(np.float32)),
        )
        self.fc = (rng.standard_normal((12, 10)) * 0.5).astype(np.float32)
        self.images = rng.standard_normal((N_IMAGES, 10, 10, 3)).astype(np.float32)

    def forward(self, x: np.ndarray, conv) -> np.ndarray:
        x = np.maximum(conv(self.layers[0], x), np.float32(0))
        x = conv(self.layers[1], x)                       # no ReLU: negative depthwise outputs matter
        x = np.maximum(conv(self.layers[2], x), np.float32(0))
        return x.mean(axis=(1, 2), dtype=np.float32) @ self.fc

    def split(self, calibration: int = N_CAL) -> Split:
        labels = np.full(N_IMAGES, UNLABELLED, np.int64)
        fp32 = Runner(self, "fp32", "reference").run(self.images)
        labels[N_CAL:N_CAL + 12] = fp32[N_CAL:N_CAL + 12].argmax(1)   # 12 labelled evaluation images,
        labels[N_CAL + 9:N_CAL + 12] = (labels[N_CAL + 9:N_CAL + 12] + 1) % 10  # FP32 right on 9 of them
        every = ImageSet("tiny", self.images, labels, tuple(f"tiny/{i}" for i in range(N_IMAGES)))
        return Split(every.take(slice(0, calibration), "calibration"), every.take(slice(calibration, None), "evaluation"))


def tiny_layer() -> Layer:
    rng = np.random.default_rng(42)
    return Layer("tiny3x3", (rng.standard_normal((1, 6, 6, 3)) * 5).astype(np.float32),
                 (rng.standard_normal((3, 3, 4, 3)) * 0.2).astype(np.float32))


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    study_cli.add_arguments(p)
    return p.parse_args(argv)


def _layer_dir(tmp: Path) -> str:
    d = tmp / "layer"
    d.mkdir(exist_ok=True)
    lay = tiny_layer()
    qconv.save_tensor(d / "input_tensor.bin", lay.x)
    qconv.save_tensor(d / "kernel_tensor.bin", lay.w)
    return str(d)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same study twice, through the command-line hook: with the stand-in network (the
    network loader patched to return it) and without any network."""
    tmp = tmp_path_factory.mktemp("netstudy")
    layer = _layer_dir(tmp)
    common = [layer, "--backends", "reference", "--repeat", "1", "--quick", "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        from qconv import nets
        mp.setattr(nets, "load", lambda name, weights=None: TinyNet())
        assert study_cli.run(_args([*common, "--network", "mnist", "--network-limit", str(LIMIT),
                                    "--out", str(tmp / "net")])) == 0
    assert study_cli.run(_args([*common, "--out", str(tmp / "plain")])) == 0
    load = lambda d: json.loads((tmp / d / "results.json").read_text())  # noqa: E731
    return tmp / "net", load("net"), tmp / "plain", load("plain")


def section(report: str, heading: str) -> str:
    return report.split(heading, 1)[1].split("\n## ", 1)[0]


def answer_line(report: str, question: str) -> str:
    return next(line for line in section(report, "## The answer").splitlines() if f"**{question}**" in line)


def test_network_section_is_written_valid_and_complete(runs):
    out, res, _, _ = runs
    assert validate(res) == [] and res["schema_version"] == 3 and res["status"] == "complete"
    net = res["network"]
    assert res["config"]["network"] == "tiny-net" and res["config"]["network_limit"] == LIMIT
    assert net["evaluation_images"] == LIMIT and net["calibration_images"] == N_CAL and net["labelled_images"] == 12
    assert [L["name"] for L in net["layers"]] == ["conv3x3", "dw3x3", "pw1x1"]
    assert [L["depthwise"] for L in net["layers"]] == [False, True, False]
    assert net["backend"] == "reference" and net["fp32"]["top1"] == 9
    # FP32 once, every integer precision at every network scale strategy
    got = [(o["precision"], o["strategy"]) for o in net["options"]]
    assert got == [("fp32", None)] + [(p, s) for p in ("int32", "int16", "int8")
                                      for s in ("single", "maxabs", "maxabs-per-channel", "calibrated")]
    for o in net["options"]:
        assert len(o["isolated"]) == len(o["propagated"]) == 3
        assert 0 <= o["agreement"] <= 1 and o["top1"] <= 12
    # speed: every precision at batch 1 and 8 on the one backend; the GPU noted as not run
    assert {(r["precision"], r["batch"]) for r in net["speed"]} == {(p, b) for p in ("fp32", "int32", "int16", "int8")
                                                                    for b in (1, 8)}
    assert all(r["error"] is None and r["images_per_s"] > 0 for r in net["speed"])
    assert net["gpu_note"].startswith("GPU: not run here") or "cuda" in res["config"]["backends"]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_the_figure_and_the_csv(runs):
    out, res, _, _ = runs
    plots = {p["name"]: p for p in res["plots"]}
    assert list(plots) == [*PLOTS, "network_layers"]
    p = plots["network_layers"]
    assert png_size(out / p["file"]) == (p["width"], p["height"])
    from matplotlib.image import imread
    rgb = imread(out / p["file"])[..., :3]
    assert np.mean(np.any(rgb < 0.8, axis=-1)) > 0.02  # lines and text, not a blank canvas
    assert "![network_layers](network_layers.png)" in (out / "report.md").read_text()
    rows = list(csv.DictReader((out / "network.csv").open()))
    assert len(rows) == len(res["network"]["options"])
    for row, o in zip(rows, res["network"]["options"]):
        assert (row["precision"], row["scale_strategy"] or None) == (o["precision"], o["strategy"])
        assert float(row["agreement"]) == pytest.approx(o["agreement"])


def _noise_agreement(net: TinyNet, images: np.ndarray, clean_top1: np.ndarray, level: float) -> float:
    """The derived threshold's injection, written here: N(0, (level x range of the layer's FP32
    output on the batch)^2) added to every convolution's output, float32 draws from one generator
    seeded 0 per level, batches of 8, layers in network order."""
    rng = np.random.default_rng(0)

    def hook(_layer, _x, y):
        std = np.float32(level * float(y.max() - y.min()))
        return (y + rng.standard_normal(size=y.shape, dtype=np.float32) * std).astype(np.float32)
    top1 = Runner(net, "fp32", "reference").run(images, 8, hook=hook).argmax(1)
    return float(np.mean(top1 == clean_top1))


def test_the_threshold_is_the_noise_injection_recomputed_here(runs):
    _, res, _, _ = runs
    net = TinyNet()
    images = net.split().evaluation.images[:LIMIT]
    clean = Runner(net, "fp32", "reference").run(images).argmax(1)
    table = res["network"]["noise"]["table"]
    levels = [r["nrmse"] for r in table]
    assert levels == pytest.approx([10 ** (e / 4) for e in range(-16, -16 + len(levels))])
    for r in table:
        assert r["agreement"] == pytest.approx(_noise_agreement(net, images, clean, r["nrmse"]), abs=1e-12)
    for target in (0.99, 0.95):  # the largest level before agreement first falls below the target
        below = next((i for i, r in enumerate(table) if r["agreement"] < target), None)
        want = table[-1]["nrmse"] if below is None else (table[below - 1]["nrmse"] if below else 0.0)
        assert res["network"]["threshold"]["agreement"][f"{target:g}"] == pytest.approx(want)


def test_naive_int8_layer_by_layer(runs):
    _, res, _, _ = runs
    nv = res["network"]["naive_int8"]
    assert nv["strategy"] == "maxabs" and [a["layer"] for a in nv["alone"]] == ["conv3x3", "dw3x3", "pw1x1"]
    assert nv["breaks"] == [a["layer"] for a in nv["alone"] if a["agreement"] < 0.99]
    # the depthwise layer alone, by hand: per-tensor INT8 (maxabs) for it, FP32 for the rest
    net = TinyNet()
    images = net.split().evaluation.images[:LIMIT]
    dw = net.layers[1]

    def hook(layer, x, _y):
        if layer.name == "dw3x3":
            return qconv.conv2d(x, dw.weight, "int8", "reference", stride=2, groups=8, scale="maxabs")
        return None
    clean = Runner(net, "fp32", "reference").run(images).argmax(1)
    alone = Runner(net, "fp32", "reference").run(images, 8, hook=hook).argmax(1)
    assert nv["alone"][1]["agreement"] == pytest.approx(float(np.mean(alone == clean)))
    assert "dw3x3" in nv["breaks"]  # three decades of channel scale: one INT8 scale cannot serve them
    by = {(o["precision"], o["strategy"]): o for o in res["network"]["options"]}
    assert by[("int8", "maxabs-per-channel")]["agreement"] > by[("int8", "maxabs")]["agreement"]


def test_the_acceptable_loss_answer_quotes_the_measured_threshold(runs):
    out, res, _, _ = runs
    net = res["network"]
    t99, t95 = (net["threshold"]["agreement"][k] for k in ("0.99", "0.95"))
    assert res["summary"]["acceptable_source"] == "network"
    assert res["summary"]["acceptable_nrmse"] == pytest.approx(t99)
    line = answer_line((out / "report.md").read_text(), "Is naive quantization justified?")
    assert "tiny-net" in line and "8-bit rule" in line
    m = re.search(r">= 99% up to a per-layer NRMSE of ([0-9.e+-]+).*>= 95% up to ([0-9.e+-]+)", line)
    assert m, line
    assert float(m.group(1)) == pytest.approx(t99, rel=0.05) and float(m.group(2)) == pytest.approx(t95, rel=0.05)
    by = {(o["precision"], o["strategy"]): o for o in net["options"]}
    for name, key in (("INT8 per-tensor maxabs", ("int8", "maxabs")),
                      ("INT8 per-channel + calibrated input", ("int8", "calibrated"))):
        q = re.search(re.escape(name) + r" ([0-9.]+)%", line)
        assert q and float(q.group(1)) == pytest.approx(100 * by[key]["agreement"], abs=0.05), (name, line)
    if by[("int8", "maxabs")]["agreement"] < 0.99:
        assert "naive INT8" in line and "not justified" in line
    # the fastest option within the bar really is within it
    for v in res["summary"]["layers"].values():
        if v and v.get("recommended"):
            assert v["recommended"]["nrmse"] <= t99


def test_without_a_network_the_single_layer_rule_is_the_stated_fallback(runs):
    _, _, plain_out, plain = runs
    assert validate(plain) == [] and plain["network"] is None and plain["config"]["network"] is None
    assert plain["summary"]["acceptable_source"] == "single-layer rule"
    assert plain["summary"]["acceptable_nrmse"] == pytest.approx(output_bits_nrmse(8))
    assert not (plain_out / "network.csv").exists()
    assert [p["name"] for p in plain["plots"]] == list(PLOTS)
    report = (plain_out / "report.md").read_text()
    assert "## The network" not in report and "### H. Network" not in report
    line = answer_line(report, "Is naive quantization justified?")
    assert "fallback" in line and "no network was run" in line and "--network" in line


def test_the_rest_of_the_study_is_unchanged(runs):
    out, res, plain_out, plain = runs
    net_report, plain_report = (out / "report.md").read_text(), (plain_out / "report.md").read_text()
    for heading in ("## One S per precision", "## What scales and rounding buy", "## Energy", "## Sources"):
        assert section(net_report, heading) == section(plain_report, heading), heading
    assert answer_line(net_report, "Which S?") == answer_line(plain_report, "Which S?")
    for key in ("layers", "sweeps", "strategies", "single_s", "common_s", "energy_model"):
        assert res[key] == plain[key], key
    assert len(res["measurements"]) == len(plain["measurements"])
    assert (out / "results.csv").read_text().splitlines()[0] == (plain_out / "results.csv").read_text().splitlines()[0]


def test_body_stays_under_the_word_limit_with_the_network(runs):
    out, _, _, _ = runs
    body = (out / "report.md").read_text().split("\n## Appendix", 1)[0]
    words = sum(len(line.split()) for line in body.splitlines()
                if line.strip() and not line.lstrip().startswith(("|", "![", "#")))
    assert words < 1000
    sentences = [re.sub(r"[\d.e+-]+|`[^`]*`", "#", s.strip()) for s in re.split(r"(?<=[.!?])\s+", body)
                 if len(s.split()) > 6 and not s.lstrip().startswith(("|", "!["))]
    assert len(sentences) == len(set(sentences))


def test_a_missing_network_is_one_line_naming_fetch_models(tmp_path, monkeypatch, capsys):
    from qconv import cli
    monkeypatch.setenv("QCONV_CACHE", str(tmp_path / "empty-cache"))
    rc = cli.main(["study", _layer_dir(tmp_path), "--backends", "reference", "--quick", "--no-progress",
                   "--network", "efficientnet-lite0", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "qconv fetch-models" in err and "efficientnet-lite0" in err
    assert not (tmp_path / "out").exists()  # refused before any measurement or folder


@pytest.mark.parametrize("argv, match", [
    (["--network", "resnet-9000"], "unknown network"),
    (["--network", "mnist", "--network-limit", "0"], "network-limit"),
])
def test_bad_network_options_are_refused(tmp_path, argv, match):
    with pytest.raises(qconv.QconvError, match=match):
        study_cli.run(_args([_layer_dir(tmp_path), "--backends", "reference", "--no-progress",
                             "--out", str(tmp_path / "o"), *argv]))
    assert not (tmp_path / "o").exists()  # checked before the output folder is made


def test_bad_network_backend_is_refused_before_loading(tmp_path, monkeypatch):
    from qconv import nets
    monkeypatch.setattr(nets, "load", lambda *a, **k: pytest.fail("loaded the network before checking the backend"))
    with pytest.raises(qconv.QconvError, match="network-backend"):
        study_cli.run(_args([_layer_dir(tmp_path), "--backends", "reference", "--no-progress", "--out",
                             str(tmp_path / "o"), "--network", "mnist", "--network-backend", "nope"]))
    assert not (tmp_path / "o").exists()


def test_an_interrupt_in_the_network_section_leaves_a_valid_partial_result(tmp_path, monkeypatch):
    from qconv.study import network, run_study

    def stop(*_a, **_k):
        raise KeyboardInterrupt
    monkeypatch.setattr(network.NetworkSection, "_naive_int8", stop)
    with pytest.raises(KeyboardInterrupt):
        run_study([tiny_layer()], tmp_path, backends=["reference"], precisions=["fp32", "int8"], repeat=1,
                  quick=True, progress=False, plots=False, network_=TinyNet(), network_limit=16)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["status"] == "partial" and validate(doc) == []
    # where it stopped, and that the layers themselves finished
    assert doc["partial_reason"] == "interrupted (KeyboardInterrupt) during the network section"
    prog = doc["progress"]
    assert prog["stopped_in"] == "the network section" and prog["network_done"] is False
    assert prog["layers"] == [{"layer": tiny_layer().name, "requested": ["fp32", "int8"], "swept": ["int8"],
                               "skipped": [], "timed": True}]
    net = doc["network"]
    assert net["threshold"] is not None and net["naive_int8"] is None and len(net["options"]) == 5
    report = (tmp_path / "report.md").read_text()
    assert "Partial results" in report and "## The network: tiny-net" in report
