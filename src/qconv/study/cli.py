"""`qconv study`: the argparse hook the main CLI (qconv.cli) mounts as a subcommand.

    add_arguments(parser)   # LAYERS..., --backends, --precisions, --batch, --repeat, --out, --quick, --network
    run(args) -> int        # 0 done, 130 interrupted (partial results written); QconvError for bad input

--network NAME adds the network section (network.py); --network-limit N keeps it short.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from ..errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Measure every backend x precision on real layers, sweep the scale S, and "
                          "write results.json, results.csv, seven plots and report.md into --out.")
    parser.add_argument("layers", nargs="*", metavar="LAYER",
                        help="a directory holding input_tensor.bin and kernel_tensor.bin, or "
                             "INPUT.bin:KERNEL.bin (default: the shipped sample layers)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends or variants, e.g. c-scalar,c-avx2[isa=avx2] (default: "
                             "every available variant the registry lists; scalar C FP32 is always timed as the "
                             "baseline)")
    parser.add_argument("--precisions", default="fp32,int32,int16,int8",
                        help="comma-separated precisions (default: fp32,int32,int16,int8)")
    parser.add_argument("--batch", type=int, default=1,
                        help="repeat each input along N to this batch size (default 1)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs per option after one warm-up (default 5; 3 with --quick)")
    parser.add_argument("--out", default="qconv-study", metavar="DIR",
                        help="output directory (default ./qconv-study)")
    parser.add_argument("--force", action="store_true",
                        help="replace a previous study's results in --out (its files are removed first); without it "
                             "such a folder is refused. A folder holding other files is always refused")
    parser.add_argument("--quick", action="store_true",
                        help="coarser scale sweeps and fewer runs: the whole study in well under two minutes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--no-plots", action="store_true",
                        help="no figures (matplotlib not needed); results.json, CSV and report only")
    parser.add_argument("--network", default=None, metavar="NAME",
                        help="also run a pretrained network with every convolution through qconv "
                             "(efficientnet-lite0, efficientnet-lite1, efficientnet-lite2 or mnist; fetched once by "
                             "`qconv fetch-models`): accuracy per precision x scale strategy, per-layer NRMSE, the "
                             "NRMSE the network tolerates (which then answers the acceptable-loss question), images/s")
    parser.add_argument("--network-limit", type=int, default=None, metavar="N",
                        help="evaluate only the first N of the network's evaluation images (labelled first); "
                             "the network section's time grows with N (default: all)")
    parser.add_argument("--network-backend", default=None, metavar="BACKEND",
                        help="backend for the network's accuracy runs (default: the fastest of --backends that "
                             "runs every layer; integer results are bit-identical across backends)")


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in re.split(r",(?![^\[]*\])", text) if t.strip()]  # no split inside [...]
    if not items:
        raise InputError(f"empty list {text!r}")
    return items


def run(args: argparse.Namespace) -> int:
    from .config import Layer, load_layers
    from .grid import run_study
    if args.layers:
        layers = load_layers(args.layers)
    else:
        from ..samples import sample_layers
        from ..tensorfile import load_pair
        layers = [Layer(name, *load_pair(i, k), input_path=str(i), kernel_path=str(k))
                  for name, i, k in sample_layers()]
        if not layers:
            raise InputError("no LAYERS given and no shipped sample layer was found")
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 5)
    # Record the command line when this is `qconv study ...` (not when called from Python).
    command = ("qconv study " + " ".join(shlex.quote(a) for a in sys.argv[2:])
               if len(sys.argv) > 1 and sys.argv[1] == "study" else None)
    out = Path(args.out)
    try:
        run_study(layers, out, backends=_split(args.backends), precisions=_split(args.precisions),
                  batch=args.batch, repeat=repeat, quick=args.quick,
                  progress=not args.no_progress, command=command, plots=not args.no_plots,
                  network_=getattr(args, "network", None), network_limit=getattr(args, "network_limit", None),
                  network_backend=getattr(args, "network_backend", None), force=getattr(args, "force", False))
    except KeyboardInterrupt:
        print(f"interrupted: partial results in {out / 'results.json'}", file=sys.stderr)
        return 130
    print(_answer_section((out / "report.md").read_text()))
    print(f"report: {out / 'report.md'}")
    return 0


def _answer_section(report: str) -> str:
    """The report's '## The answer' section, for the terminal."""
    start = report.find("## The answer")
    if start < 0:
        return ""
    end = report.find("\n## ", start + 1)
    return report[start:end if end > 0 else None].strip() + "\n"
