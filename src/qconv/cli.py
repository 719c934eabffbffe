"""Command line: `qconv conv|backends|study` and the assignment's `convolution` command.

Every user error is one line on stderr and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from . import backends, jsonout, samples, tensorfile
from .api import ConvResult, conv2d_result, prepare
from .contract import parse_precision, parse_rounding, rounding_help
from .errors import BackendError, QconvError
from .scales import parse_scale_text, strategies_help

EXIT_USAGE = 2
EXIT_BACKEND = 1


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus a hint), not the whole usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


def _guard(fn: Callable[[], int], prog: str) -> int:
    def one_line(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        print(f"{prog}: warning: {message}", file=sys.stderr)  # no source line: this is a CLI, not a script
    warnings.showwarning = one_line
    try:
        return fn()
    except BackendError as e:  # a driver, compiler or kernel failure: not the user's input
        print(f"{prog}: backend error: {e}", file=sys.stderr)
        return EXIT_BACKEND
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
        where = f"{e.filename!r}: " if e.filename else ""  # quoted: a newline in a name stays on one line
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _scale_text(s: "float | list[float]") -> str:
    return f"{s:.6g}" if not isinstance(s, list) else f"{min(s):.4g}..{max(s):.4g} ({len(s)} channels)"


def _shape(s: Sequence[int]) -> str:
    return "x".join(str(d) for d in s)


def _report_lines(r: ConvResult, x_shape: Sequence[int], w_shape: Sequence[int],
                  padding_given: bool = False) -> list[str]:
    """The text report; the layer's stride, pads, groups and bias show unless all are the default
    (stride 1, SAME padding not given explicitly, one group, no bias)."""
    k = w_shape[0] * w_shape[1] * w_shape[3]
    lay = r.layer
    default = lay and lay["stride"] == [1, 1] and lay["groups"] == 1 and not lay["bias"] and not padding_given
    extra = "" if not lay or default else \
        f"  stride {_shape(lay['stride'])} pads {lay['padding']} groups {lay['groups']}" + ("  +bias" if lay["bias"] else "")
    lines = [
        f"layer      input {_shape(x_shape)}  kernel {_shape(w_shape)}  K={k}  {r.flops / 1e9:.3f} GFLOP{extra}",
        f"backend    {r.backend}  precision {r.precision.value}  rounding {r.rounding.value}",
    ]
    if r.precision.is_integer:
        lines.append(f"scale      s_input={r.scale_input:.6g}  s_kernel={_scale_text(r.scale_kernel)}  ({r.scale_reason})")
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


def _measured(x, w, precision, backend: str, repeat: int, accuracy: bool = False, **kwargs: Any) -> ConvResult:
    """Prepare once, one warm-up call (it also gives the output, scales, overflow and NRMSE), then
    `repeat` timed calls of the prepared convolution; the result carries the median of each phase."""
    if repeat < 1:
        raise QconvError(f"--repeat must be at least 1, got {repeat}")
    if isinstance(kwargs.get("scale"), str) and kwargs["scale"].startswith("sweep"):
        first = conv2d_result(x, w, precision, backend, accuracy=accuracy, **kwargs)
        kwargs["scale"] = (first.scale_input, first.scale_kernel)  # the sweep's answer, searched once
        conv = prepare(w, precision, backend, **kwargs)
    else:
        conv = prepare(w, precision, backend, **kwargs)
        first = conv.result(x, accuracy=accuracy)
    runs = [conv.result(x).phases for _ in range(repeat)]
    medians = {p: statistics.median(r[p] for r in runs) for p in first.phases}
    return dataclasses.replace(first, phases=medians)


def _layer_options(args: argparse.Namespace) -> dict[str, Any]:
    """--stride, --padding, --groups, --bias as prepare() arguments."""
    def ints(text: str, what: str) -> Any:
        try:
            v = [int(t) for t in text.split(",")]
        except ValueError:
            raise QconvError(f"--{what} {text!r}: use an int or comma-separated ints") from None
        return v[0] if len(v) == 1 else tuple(v)
    opts: dict[str, Any] = {"stride": ints(args.stride, "stride"), "groups": args.groups}
    pad = args.padding.strip().lower()
    if pad in ("same", "valid"):
        opts["padding"] = pad
    else:
        p = ints(pad, "padding")
        opts["padding"] = ((p[0], p[1]), (p[2], p[3])) if isinstance(p, tuple) and len(p) == 4 else p
    if args.bias:
        b = tensorfile.load(args.bias)
        opts["bias"] = b.reshape(-1) if b.ndim > 1 and b.size == max(b.shape) else b
    return opts


def _backend_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if args.threads is not None:
        opts["threads"] = args.threads
    if args.int8_path is not None:
        opts["int8_path"] = args.int8_path
    return opts


def _cmd_conv(args: argparse.Namespace) -> int:
    rounding = parse_rounding(args.rounding)  # every spelling the library takes (contract.ROUNDING_SPELLINGS)
    layer = _layer_options(args)
    if layer["groups"] == 1:
        x, w = tensorfile.load_pair(args.input, args.kernel)
    else:
        x, w = tensorfile.load(args.input), tensorfile.load(args.kernel)
    scale = None if args.scale is None else parse_scale_text(args.scale)
    r = _measured(x, w, parse_precision(args.precision), args.backend, args.repeat, scale=scale,
                  rounding=rounding, accuracy=not args.no_accuracy, **layer, **_backend_options(args))
    if args.output:
        tensorfile.save(args.output, r.output)
    if args.json:
        doc = {"input": str(args.input), "kernel": str(args.kernel), "output": args.output,
               "input_shape": list(x.shape), "kernel_shape": list(w.shape), **r.to_dict()}
        print(jsonout.dumps(doc, indent=2))
    else:
        given = args.padding.strip().lower() != "same"
        print("\n".join(_report_lines(r, x.shape, w.shape, padding_given=given)))
        if args.output:
            print(f"output     {args.output}")
    return 0


def _cmd_backends(args: argparse.Namespace) -> int:
    avail = backends.available_backends()
    if args.json:
        print(jsonout.dumps({n: {"available": ok, "detail": why} for n, (ok, why) in avail.items()}, indent=2))
        return 0
    width = max(len(n) for n in avail)
    for name, (ok, why) in avail.items():
        print(f"{name:<{width}}  {'yes' if ok else 'no ':<3}  {why}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from .study import cli as study_cli
    args.layers = [samples.resolve_layer(a) for a in args.layers]  # "exam1", "exam1/input:exam1/kernel"
    return study_cli.run(args)


def _cmd_samples(args: argparse.Namespace) -> int:
    tensors = samples.sample_tensors()
    if not tensors:
        raise QconvError(f"no sample tensors are installed (looked in {str(samples.DATA)!r})")
    shapes = {n: samples.shape_of(p) for n, p in tensors.items()}
    if args.json:
        print(jsonout.dumps({n: {"path": str(p), "shape": list(shapes[n] or [])} for n, p in tensors.items()},
                         indent=2))
        return 0
    width = max(len(n) for n in tensors)
    for n, p in tensors.items():
        print(f"{n:<{width}}  {_shape(shapes[n] or ()):<12}  {p}")
    print(f"layers: {', '.join(samples.sample_layer_dirs())}.  A NAME goes wherever a tensor path does: "
          f"qconv conv exam1/input exam1/kernel; qconv study exam1")
    return 0


class _Version(argparse.Action):
    """--version: "qconv 0.1.0 from /path/to/qconv (Python 3.11.7)", one line (argparse's own
    version action re-wraps it at the terminal's width)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0,
                         help="print the version and where it is installed, and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from . import __version__
        print(f"{parser.prog} {__version__} from {Path(__file__).resolve().parent} (Python {sys.version.split()[0]})")
        parser.exit()


def _text_to_stderr(args: argparse.Namespace) -> Any:
    """With `-o -` the tensor goes to standard output, so the report goes to standard error."""
    return contextlib.redirect_stdout(sys.stderr) if getattr(args, "output", None) == "-" else contextlib.nullcontext()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qconv", description="What naive quantization of a convolution buys and costs.")
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("conv", help="convolve two .bin tensors and report time, scales, overflow, NRMSE")
    c.add_argument("input", type=samples.resolve_tensor,
                   help="input tensor file (.bin, .npy, .npz), (N, H, W, C), or a sample name (qconv samples)")
    c.add_argument("kernel", type=samples.resolve_tensor,
                   help="kernel tensor file, (KH, KW, OC, IC), or a sample name (qconv samples)")
    c.add_argument("-p", "--precision", default="fp32", help="fp32, int32, int16, int8 (or 32, 16, 8)")
    c.add_argument("-b", "--backend", default="auto", help="auto or a name from `qconv backends`")
    c.add_argument("-s", "--scale", help=f"S (both tensors), S_INPUT,S_KERNEL, or {strategies_help()}")
    c.add_argument("-r", "--rounding", default="nearest",
                   help=f"integer rounding: {rounding_help()}; default nearest")
    c.add_argument("-o", "--output", help="write the output tensor here: .npy if the name ends in .npy, "
                                          "else .bin (the assignment's format); - writes .bin to standard output")
    c.add_argument("--stride", default="1", help="S or SH,SW (default 1)")
    c.add_argument("--padding", default="same",
                   help="same (default), valid, P, PH,PW or TOP,BOTTOM,LEFT,RIGHT")
    c.add_argument("--groups", type=int, default=1, help="channel groups; C for depthwise (default 1)")
    c.add_argument("--bias", help="bias tensor file with OC values, added after dequantization")
    c.add_argument("--threads", type=int, help="worker threads (c-avx2)")
    c.add_argument("--int8-path", choices=["auto", "mma", "wgmma", "dp4a"], help="INT8 kernel on cuda (wgmma: Hopper only)")
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

    from .nets import cli as nets_cli  # argparse only: the networks load when a command runs
    nets_cli.add_parsers(sub)

    m = sub.add_parser("samples", help="list the shipped sample tensors and layers, with their paths")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_cmd_samples)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # `qconv` or `python -m qconv` alone: the help, not a usage error
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    with _text_to_stderr(args):
        return _guard(lambda: args.func(args), "qconv")


# The assignment's command: convolution input_tensor.bin kernel_tensor.bin [32|16|8|FP32|INT32|INT16]
def convolution_main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="convolution",
                description="The assignment's command: convolve, write output_tensor.bin, print the time.")
    p.add_argument("--version", action=_Version)
    p.add_argument("input", type=samples.resolve_tensor, help="input_tensor.bin (or a sample name: qconv samples)")
    p.add_argument("kernel", type=samples.resolve_tensor, help="kernel_tensor.bin (or a sample name)")
    p.add_argument("mode", nargs="?", default="FP32", help="32, 16, 8, FP32, INT32, INT16 or INT8 (default FP32)")
    p.add_argument("-b", "--backend", default="auto", help="auto or a name from `qconv backends`")
    p.add_argument("-s", "--scale", help=f"S, S_INPUT,S_KERNEL, or {strategies_help()}")
    p.add_argument("-o", "--output", default="output_tensor.bin",
                   help="where to write: .npy if the name ends in .npy, else .bin (default output_tensor.bin; "
                        "- writes .bin to standard output)")
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
            print(f"Scale: s_input={r.scale_input:.6g} s_kernel={_scale_text(r.scale_kernel)} ({r.scale_reason})")
            print(f"NRMSE: {r.nrmse:.3e}" + (f"  ({r.wrapped} outputs wrapped around int32)" if r.wrapped else ""))
        print(f"Wrote {args.output}")
        return 0

    with _text_to_stderr(args):
        return _guard(go, "convolution")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
