"""Command line: `qconv conv|backends|study` and the assignment's `convolution` command.

Every user error is one line on stderr and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from . import backends, tensorfile
from .api import ConvResult, conv2d_result
from .contract import parse_precision
from .errors import QconvError
from .scales import parse_scale_text

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus a hint), not the whole usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


def _guard(fn: Callable[[], int], prog: str) -> int:
    try:
        return fn()
    except QconvError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{prog}: error: out of memory for this layer", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"{prog}: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}",
              file=sys.stderr)
        return EXIT_USAGE


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _shape(s: Sequence[int]) -> str:
    return "x".join(str(d) for d in s)


def _report_lines(r: ConvResult, x_shape: Sequence[int], w_shape: Sequence[int]) -> list[str]:
    k = w_shape[0] * w_shape[1] * w_shape[3]
    lines = [
        f"layer      input {_shape(x_shape)}  kernel {_shape(w_shape)}  K={k}  {r.flops / 1e9:.3f} GFLOP",
        f"backend    {r.backend}  precision {r.precision.value}  rounding {r.rounding.value}",
    ]
    if r.precision.is_integer:
        lines.append(f"scale      s_input={r.scale_input:.6g}  s_kernel={r.scale_kernel:.6g}  ({r.scale_reason})")
    lines.append("phases     " + "  ".join(f"{p} {_fmt_ms(t)}" for p, t in r.phases.items()) + "  (medians)")
    lines.append(f"speed      {r.gops:.1f} GOP/s in the convolve phase")
    if r.precision.is_integer:
        if r.wrapped is None:
            wrapped = "not counted" + (" (possible: K*max|q_x|*max|q_w| > 2^31-1)" if r.overflow_possible else "")
        else:
            why = "int32 accumulators cannot overflow at these scales" if not r.overflow_possible else \
                "K*max|q_x|*max|q_w| > 2^31-1"
            wrapped = f"{r.wrapped} of {r.output.size} outputs wrapped around int32 ({why})"
        lines.append(f"overflow   {wrapped}")
        if r.saturated is not None:
            lines.append(f"saturated  {r.saturated[0]} input and {r.saturated[1]} kernel values clamped "
                         f"at +-{r.precision.qmax}")
    if r.nrmse is not None:
        lines.append(f"NRMSE      {r.nrmse:.3e} against the float64 reference")
    return lines


def _measured(x, w, precision, backend: str, repeat: int, **kwargs: Any) -> ConvResult:
    """One warm-up call (it also gives the output, scales, overflow and NRMSE), then `repeat` timed
    calls; the result carries the median of each phase."""
    if repeat < 1:
        raise QconvError(f"--repeat must be at least 1, got {repeat}")
    first = conv2d_result(x, w, precision, backend, **kwargs)
    kwargs.pop("accuracy", None)
    runs = [conv2d_result(x, w, precision, backend, **kwargs).phases for _ in range(repeat)]
    medians = {p: statistics.median(r[p] for r in runs) for p in first.phases}
    return dataclasses.replace(first, phases=medians)


def _backend_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if args.threads is not None:
        opts["threads"] = args.threads
    if args.int8_path is not None:
        opts["int8_path"] = args.int8_path
    return opts


def _cmd_conv(args: argparse.Namespace) -> int:
    x, w = tensorfile.load_pair(args.input, args.kernel)
    scale = None if args.scale is None else parse_scale_text(args.scale)
    r = _measured(x, w, parse_precision(args.precision), args.backend, args.repeat, scale=scale,
                  rounding=args.rounding, accuracy=not args.no_accuracy, **_backend_options(args))
    if args.output:
        tensorfile.save(args.output, r.output)
    if args.json:
        doc = {"input": str(args.input), "kernel": str(args.kernel), "output": args.output,
               "input_shape": list(x.shape), "kernel_shape": list(w.shape), **r.to_dict()}
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(_report_lines(r, x.shape, w.shape)))
        if args.output:
            print(f"output     {args.output}")
    return 0


def _cmd_backends(args: argparse.Namespace) -> int:
    avail = backends.available_backends()
    if args.json:
        print(json.dumps({n: {"available": ok, "detail": why} for n, (ok, why) in avail.items()}, indent=2))
        return 0
    width = max(len(n) for n in avail)
    for name, (ok, why) in avail.items():
        print(f"{name:<{width}}  {'yes' if ok else 'no ':<3}  {why}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from .study import cli as study_cli
    return study_cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qconv", description="What naive quantization of a convolution buys and costs.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("conv", help="convolve two .bin tensors and report time, scales, overflow, NRMSE")
    c.add_argument("input", help="input tensor file, (N, H, W, C)")
    c.add_argument("kernel", help="kernel tensor file, (KH, KW, OC, IC)")
    c.add_argument("-p", "--precision", default="fp32", help="fp32, int32, int16, int8 (or 32, 16, 8)")
    c.add_argument("-b", "--backend", default="auto", help="auto or a name from `qconv backends`")
    c.add_argument("-s", "--scale", help="S (both tensors), S_INPUT,S_KERNEL, maxabs (default) or sweep")
    c.add_argument("-r", "--rounding", default="nearest", choices=["nearest", "truncate"])
    c.add_argument("-o", "--output", help="write the output tensor here (.bin)")
    c.add_argument("--threads", type=int, help="worker threads (c-avx2)")
    c.add_argument("--int8-path", choices=["mma", "dp4a"], help="INT8 kernel on cuda")
    c.add_argument("-n", "--repeat", type=int, default=5,
                   help="timed runs after one warm-up; phases are their medians (default 5)")
    c.add_argument("--no-accuracy", action="store_true", help="skip the float64 reference (NRMSE)")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.set_defaults(func=_cmd_conv)

    b = sub.add_parser("backends", help="list backends, which are available, and why not")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_cmd_backends)

    s = sub.add_parser("study", help="measure every backend x precision on layers; write plots and a report")
    from .study import cli as study_cli  # argparse only: the study's heavy imports wait for `run`
    study_cli.add_arguments(s)
    s.set_defaults(func=_cmd_study)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return _guard(lambda: args.func(args), "qconv")


# The assignment's command: convolution input_tensor.bin kernel_tensor.bin [32|16|8|FP32|INT32|INT16]
def convolution_main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="convolution",
                description="The assignment's command: convolve, write output_tensor.bin, print the time.")
    p.add_argument("input", help="input_tensor.bin")
    p.add_argument("kernel", help="kernel_tensor.bin")
    p.add_argument("mode", nargs="?", default="FP32", help="32, 16, 8, FP32, INT32, INT16 or INT8 (default FP32)")
    p.add_argument("-b", "--backend", default="auto", help="auto or a name from `qconv backends`")
    p.add_argument("-s", "--scale", help="S, S_INPUT,S_KERNEL, maxabs (default) or sweep")
    p.add_argument("-o", "--output", default="output_tensor.bin", help="where to write (default output_tensor.bin)")
    p.add_argument("-n", "--repeat", type=int, default=5,
                   help="timed runs after one warm-up; times are their medians (default 5)")
    args = p.parse_args(argv)

    def go() -> int:
        prec = parse_precision(args.mode)
        x, w = tensorfile.load_pair(args.input, args.kernel)
        scale = None if args.scale is None else parse_scale_text(args.scale)
        r = _measured(x, w, prec, args.backend, args.repeat, scale=scale, accuracy=prec.is_integer)
        tensorfile.save(args.output, r.output)
        print(f"Convolution time ({r.backend}, {prec.value}, median of {args.repeat}): "
              f"{_fmt_ms(r.phases['convolve'])}")
        if prec.is_integer:
            overhead = r.phases["quantize"] + r.phases["dequantize"]
            print(f"Quantization overhead: {_fmt_ms(overhead)} "
                  f"(quantize {_fmt_ms(r.phases['quantize'])}, dequantize {_fmt_ms(r.phases['dequantize'])})")
            print(f"Scale: s_input={r.scale_input:.6g} s_kernel={r.scale_kernel:.6g} ({r.scale_reason})")
            print(f"NRMSE: {r.nrmse:.3e}" + (f"  ({r.wrapped} outputs wrapped around int32)" if r.wrapped else ""))
        print(f"Wrote {args.output}")
        return 0

    return _guard(go, "convolution")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
