"""The study's network section: a real pretrained network (qconv.nets) with every convolution
through qconv, measured end to end, so that "how much NRMSE is acceptable" is answered by what
the network tolerates rather than by a rule.

    section = NetworkSection(net, split, backends=["reference", "c-avx2"], precisions=[...])
    section.run(record, tick)        # fills `record` (results.json's "network") step by step

Steps, each recorded as soon as it is measured (an interrupted run keeps a valid section):
1. speed: images/s of the whole network per backend x precision at batch 1 and 8 (32 on a GPU);
   integer precisions with the calibrated scales (fixed per layer, as deployed);
2. the accuracy backend: the one given, else the fastest at batch 8 over all precisions among
   those that ran every layer (integer results are bit-identical across backends anyway);
3. accuracy: FP32 and every integer precision x scale strategy (nets.evaluate: top-1/top-5 on
   the labelled images, top-1 agreement with FP32, logits NRMSE, per-layer NRMSE isolated and
   propagated);
4. the derived threshold: Gaussian noise of NRMSE `level` added to every convolution's output of
   the FP32 network (nets.noise_threshold); the largest level keeping top-1 agreement >= 99%
   (95%) is the per-layer NRMSE the network tolerates;
5. which layers break naive INT8: each layer alone quantized with per-tensor (maxabs) INT8
   scales, every other layer FP32; a layer breaks it when that alone drops top-1 agreement with
   FP32 below 99% (the same target as the threshold).
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from ..contract import nrmse, parse_precision
from ..errors import InputError, QconvError, QconvWarning
from .config import stats

# Network-level scale strategies, in the order the report lists them (qconv.nets.STRATEGIES).
NET_STRATEGIES = ("single", "maxabs", "maxabs-per-channel", "calibrated")
NAIVE_INT8 = "maxabs"              # per-tensor max-abs scales: the textbook naive post-training INT8
TARGETS = (0.99, 0.95)             # top-1 agreement targets of the derived threshold
ACCURACY_BATCH = 8
CPU_BATCHES = (1, 8)
GPU_BATCHES = (1, 8, 32)


def load(spec: Any, limit: int | None = None, calibration: int | None = None) -> tuple[Any, Any]:
    """(network, split) for a name (`qconv fetch-models` fetches it) or a ready Network object;
    ``limit`` keeps the first N evaluation images (labelled first). A missing network or archive is
    one InputError line saying how to fetch it."""
    from .. import nets
    from ..nets.data import Split
    if limit is not None and limit < 1:
        raise InputError(f"--network-limit must be at least 1, got {limit}")
    if isinstance(spec, str):
        if spec not in nets.NETWORKS:
            raise InputError(f"unknown network {spec!r}: one of {', '.join(nets.NETWORKS)}")
        try:
            net = nets.load(spec)
            split = net.split(calibration) if calibration is not None else net.split()
        except QconvError as e:
            msg = str(e).splitlines()[0] if str(e) else repr(e)
            raise InputError(msg if "fetch-models" in msg else
                             f"{spec}: {msg} (fetch it with `qconv fetch-models`)") from None
    else:
        net = spec
        split = net.split(calibration) if calibration is not None else net.split()
    if limit is not None:
        ev = split.evaluation
        split = Split(split.calibration, ev.take(slice(0, min(limit, len(ev))), ev.name))
    return net, split


def new_record(net: Any, split: Any, limit: int | None) -> dict[str, Any]:
    """results.json's "network" section before anything is measured."""
    ev = split.evaluation
    return {
        "name": net.name,
        "convolutions": len(net.layers),
        "depthwise": sum(bool(l.depthwise) for l in net.layers),
        "input_shape": list(ev.images.shape[1:]),
        "evaluation_images": len(ev), "labelled_images": int(np.sum(ev.labelled)),
        "calibration_images": len(split.calibration), "limit": limit,
        "layers": [{"index": i, "name": l.name, "kind": l.kind, "depthwise": bool(l.depthwise), "k": int(l.k),
                    "stride": int(l.stride if isinstance(l.stride, int) else l.stride[0]), "groups": int(l.groups),
                    "weight_shape": list(l.weight.shape)} for i, l in enumerate(net.layers)],
        "backend": None, "backend_reason": None, "accuracy_batch": ACCURACY_BATCH,
        "fp32": None, "options": [], "noise": None, "threshold": None, "naive_int8": None,
        "speed": [], "gpu_note": None, "elapsed_s": None,
    }


def _median_max(values: Sequence[float]) -> tuple[float | None, float | None, int | None]:
    v = [(x, i) for i, x in enumerate(values) if x is not None and np.isfinite(x)]
    if not v:
        return None, None, None
    worst = max(v)
    return statistics.median(x for x, _ in v), worst[0], worst[1]


class NetworkSection:
    def __init__(self, net: Any, split: Any, *, backends: Sequence[str], precisions: Sequence[str],
                 backend: str | None = None, quick: bool = False, gpu_reason: str | None = None,
                 progress: bool = False) -> None:
        self.net, self.split = net, split
        self.backends = list(dict.fromkeys(backends)) or ["reference"]
        if backend is not None and backend not in self.backends:
            self.backends.append(backend)
        self.given = backend
        self.precisions = [parse_precision(p).value for p in precisions]
        if "fp32" not in self.precisions:
            self.precisions.insert(0, "fp32")  # the baseline every option is compared with
        self.quick, self.gpu_reason, self.progress = quick, gpu_reason, progress
        self.cal: Any = None

    def steps(self) -> int:
        n_int = sum(p != "fp32" for p in self.precisions)
        # speed per backend x precision; the FP32 logits; FP32 and each integer option; noise; naive INT8
        return len(self.backends) * len(self.precisions) + 2 + n_int * len(NET_STRATEGIES) + 1 + 1

    # ------------------------------------------------------------------------------------ speed
    def _time(self, precision: str, backend: str, images: np.ndarray, batch: int) -> dict[str, Any]:
        from ..nets import Runner
        scale = "calibrated" if precision != "fp32" else "maxabs"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", QconvWarning)
            r = Runner(self.net, precision, backend, scale, calibration=self.cal)
        rounds = 2 if self.quick else 3
        if batch == 1:
            n = min(len(images), 4 if self.quick else 8)
            r.forward(images[:1])  # warm-up
            r.conv_seconds = 0.0
            samples = []
            for i in range(n):
                t0 = time.perf_counter()
                r.forward(images[i:i + 1])
                samples.append(time.perf_counter() - t0)
            per_image = statistics.median(samples)
            total = sum(samples)
            timed = n
        else:
            x = images[:batch]
            r.forward(x[:1])
            r.conv_seconds = 0.0
            samples = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                r.forward(x)
                samples.append(time.perf_counter() - t0)
            per_image = statistics.median(samples) / len(x)
            total = sum(samples)
            timed = len(x) * rounds
        return {"images_per_s": 1.0 / per_image if per_image > 0 else None, "images_timed": timed,
                "batch_s": stats(samples), "conv_share": min(r.conv_seconds / total, 1.0) if total > 0 else None}

    def _speed(self, rec: dict[str, Any], tick: Callable[[str], None]) -> None:
        images = self.split.evaluation.images
        if len(images) == 0:
            return
        for b in self.backends:
            batches = GPU_BATCHES if b.split("[", 1)[0] == "cuda" else CPU_BATCHES
            for p in self.precisions:
                for n in dict.fromkeys(min(n, len(images)) for n in batches):
                    row: dict[str, Any] = {"backend": b, "precision": p, "batch": n,
                                           "scale": "calibrated" if p != "fp32" else None, "error": None}
                    try:
                        row.update(self._time(p, b, images, n))
                    except QconvError as e:
                        row["error"] = str(e).splitlines()[0]
                    rec["speed"].append(row)
                    if row["error"]:
                        break
                tick(f"{self.net.name} speed {b} {p}")
        if not any(b.split("[", 1)[0] == "cuda" for b in self.backends):
            why = (self.gpu_reason or "").split(" (")[0]
            rec["gpu_note"] = "GPU: not run here" + (f" ({why})" if why else "")

    def _choose_backend(self, rec: dict[str, Any]) -> str:
        if self.given is not None:
            rec["backend"], rec["backend_reason"] = self.given, "given (--network-backend)"
            return self.given
        n8 = min(8, len(self.split.evaluation))
        best, best_s = None, float("inf")
        for b in self.backends:
            rows = {r["precision"]: r for r in rec["speed"] if r["backend"] == b and r["batch"] == n8}
            if len(rows) < len(self.precisions) or any(r["error"] or not r.get("images_per_s") for r in rows.values()):
                continue
            seconds = sum(1.0 / r["images_per_s"] for r in rows.values())  # one image at every precision
            if seconds < best_s:
                best, best_s = b, seconds
        if best is None:
            best = "reference"
            rec["backend_reason"] = "no timed backend ran every layer at every precision; the reference always does"
        else:
            rec["backend_reason"] = (f"the fastest at batch 8 over {', '.join(self.precisions)} of those timed "
                                     f"({', '.join(self.backends)}) that ran every layer")
        rec["backend"] = best
        return best

    # --------------------------------------------------------------------------------- accuracy
    def _accuracy(self, rec: dict[str, Any], backend: str, tick: Callable[[str], None]) -> np.ndarray:
        from ..nets import Runner, evaluate
        ev = self.split.evaluation
        clean = Runner(self.net, "fp32", backend).run(ev.images, ACCURACY_BATCH)
        lab = ev.labelled
        top = np.argsort(-clean[lab], axis=1, kind="stable")
        labels = ev.labels[lab]
        rec["fp32"] = {"top1": int(np.sum(top[:, 0] == labels)), "top5": int(np.sum(np.any(top[:, :5] == labels[:, None], axis=1))),
                       "backend": backend}
        tick(f"{self.net.name} FP32")
        for p in self.precisions:
            for s in (NET_STRATEGIES if p != "fp32" else ("-",)):
                e = evaluate(self.net, self.split, p, backend, s if p != "fp32" else "maxabs",
                             batch=ACCURACY_BATCH, baseline_backend=backend, calibration=self.cal,
                             progress=self.progress)
                iso = [l.isolated for l in e.layers]
                med, worst, wi = _median_max(iso)
                rec["options"].append({
                    "precision": p, "strategy": None if p == "fp32" else s, "label": e.scale,
                    "top1": e.top1, "top5": e.top5, "lost": e.lost, "agreement": e.agreement,
                    "logits_nrmse": e.logits_nrmse, "images_per_s": e.images_per_s, "conv_share": e.conv_share,
                    "single_s": e.calibration.get("single_s"), "scale_reason": e.calibration.get("reason"),
                    "isolated": iso, "propagated": [l.propagated for l in e.layers],
                    "layer_nrmse_median": med, "layer_nrmse_max": worst,
                    "worst_layer": None if wi is None or not worst else self.net.layers[wi].name,
                    "layers_over": None})
                tick(f"{self.net.name} {e.scale}")
        return clean

    def _threshold(self, rec: dict[str, Any], backend: str, clean: np.ndarray) -> None:
        from ..metrics import effective_bits
        from ..nets import noise_threshold
        sweep = noise_threshold(self.net, self.split.evaluation.images, layer=None, targets=TARGETS,
                                batch=ACCURACY_BATCH, backend=backend, clean_logits=clean)
        rec["noise"] = {"where": "all", "seed": 0, "images": len(self.split.evaluation),
                        "table": sweep.table, "lowest_level": min(r["nrmse"] for r in sweep.table)}
        th = {f"{t:g}": sweep.thresholds[t] for t in TARGETS}
        rec["threshold"] = {"agreement": th, "effective_bits": {k: (effective_bits(v) if v else None)
                                                                for k, v in th.items()},
                            "resolution": 1.0 / max(1, len(self.split.evaluation))}
        for o in rec["options"]:
            if o["precision"] != "fp32":
                o["layers_over"] = {k: sum(1 for x in o["isolated"] if x is not None and x > v)
                                    for k, v in th.items()}

    def _naive_int8(self, rec: dict[str, Any], backend: str, clean: np.ndarray) -> None:
        from ..nets import Runner
        ev = self.split.evaluation
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", QconvWarning)
            int8 = Runner(self.net, "int8", backend, NAIVE_INT8)
        fp32 = Runner(self.net, "fp32", backend)
        target = TARGETS[0]
        alone = []
        for layer in self.net.layers:
            def hook(l: Any, x: np.ndarray, _y: np.ndarray, name: str = layer.name) -> np.ndarray | None:
                return np.asarray(int8.convs[name](np.ascontiguousarray(x))) if l.name == name else None
            logits = fp32.run(ev.images, ACCURACY_BATCH, hook=hook)
            agree = float(np.mean(logits.argmax(1) == clean.argmax(1)))
            alone.append({"layer": layer.name, "agreement": agree, "logits_nrmse": nrmse(logits, clean),
                          "breaks": agree < target})
        rec["naive_int8"] = {"strategy": NAIVE_INT8, "target": target, "alone": alone,
                             "breaks": [a["layer"] for a in alone if a["breaks"]]}

    # ------------------------------------------------------------------------------------- run
    def run(self, rec: dict[str, Any], tick: Callable[[str], None] = lambda _w: None) -> dict[str, Any]:
        from ..nets import calibrate
        t0 = time.perf_counter()
        try:
            probe = self.given or next((b for b in self.backends if b != "reference"), "reference")
            try:
                self.cal = calibrate(self.net, self.split.calibration.images, batch=ACCURACY_BATCH, backend=probe)
            except QconvError:
                self.cal = calibrate(self.net, self.split.calibration.images, batch=ACCURACY_BATCH,
                                     backend="reference")
            self._speed(rec, tick)
            backend = self._choose_backend(rec)
            clean = self._accuracy(rec, backend, tick)
            self._threshold(rec, backend, clean)
            tick(f"{self.net.name} noise threshold")
            if "int8" in self.precisions:
                self._naive_int8(rec, backend, clean)
            tick(f"{self.net.name} naive INT8 layer by layer")
        finally:
            rec["elapsed_s"] = time.perf_counter() - t0
        return rec
