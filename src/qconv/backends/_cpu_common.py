"""What c-scalar and c-avx2 share: the prepared convolution over the C handle (csrc/qconv.h).

prepare quantizes and packs the kernel once, in C (qconv_prepare); each call (qconv_run) takes the
input scale (given, or maxabs reduced in C), quantizes and pads the input in one threaded pass
that also refuses non-finite values, convolves, and dequantizes (+ bias) into the caller's `out`
when given. No numpy pass over the input on this path. The handle keeps its work buffers between
calls; a call from a second Python thread while another runs allocates its own (C does it).
A call long enough for a user to press Ctrl-C during it runs interruptibly (_cext._interruptible).
"""

from __future__ import annotations

import numpy as np

from ..contract import Geometry, Plan, Precision, check_finite, conv_spec, dequant_factor, maxabs_scale
from ..errors import InputError
from . import _cext
from .base import BackendRun, Tile


def c_tiles(isa: str, precision: Precision) -> Tile:
    """A level's tile as C declares it (qconv_tile): pixels per full and half-width tile, output
    channels per block and per half block, input channels packed together and padded to."""
    t = _cext.tile(isa, precision.value)
    half = t["mrh"] > 0
    return Tile({}, (t["mr"], t["mrh"]) if half else (t["mr"],),
                (t["nr"], t["nr"] // 2) if half else (t["nr"],),
                tuple(sorted({t["grp"], t["cpad"]})), t["dw_block"])

# A call estimated to take at least INTERRUPTIBLE_S (at a typical rate per thread: 1e9 MAC/s
# scalar, 2e10 SIMD) runs in a helper thread so that Ctrl-C can stop it; a shorter one is not
# worth a thread start (~0.1 ms).
INTERRUPTIBLE_S = 0.05


class Prepared:
    """A kernel packed in C for one backend configuration; run() is safe from several threads."""

    def __init__(self, plan: Plan, w: np.ndarray, isa: str, threads: int, fuse_dequantize: bool = True) -> None:
        spec = plan.spec if plan.spec is not None else conv_spec(w.shape)
        self.plan, self.spec, self.isa, self.threads = plan, spec, isa, threads
        prec = plan.precision
        self._int = prec.is_integer
        bias = None if plan.bias is None else np.ascontiguousarray(plan.bias, dtype=np.float32)
        self._handle, t = _cext.prepare(prec.value, isa, threads, plan.truncate, np.ascontiguousarray(w, np.float32),
                                        groups=spec.groups, stride=spec.stride,
                                        s_w=plan.s_w if self._int else None, bias=bias,
                                        fuse_dequantize=fuse_dequantize)
        self.prepare_phases = {"quantize": t["quantize"], "pack": t["pack"]}
        self.kind = t["kind"]
        # Integer precisions: a fixed s_x, or 0 and Q for maxabs of each input, computed in C.
        self._s_x = float(plan.s_x) if self._int and plan.s_x is not None else 0.0
        self._q = int(plan.input_q or 0) if self._int and plan.s_x is None else 0
        self._macs_per_s = (1e9 if isa == "scalar" else 2e10) * threads

    def run(self, x: np.ndarray, geom: Geometry, out: np.ndarray | None = None, timed: bool = True) -> BackendRun:
        y = np.empty(geom.out_shape, np.float32) if out is None else out
        try:
            long = geom.flops / 2 >= INTERRUPTIBLE_S * self._macs_per_s
            t = _cext.run(self._handle, x, geom, self._s_x, self._q, y, interruptible=long)
        except _cext.InputStatus as e:
            self._explain(e, x)
            raise
        phases = {"quantize": t.quantize, "pack": t.pack, "transfer": 0.0, "convolve": t.convolve,
                  "dequantize": t.dequantize}
        return BackendRun(y, phases, None, np.float32(t.s_x) if self._int else None,
                          np.float32(t.x_absmax) if self._q else None)

    def _explain(self, e: "_cext.InputStatus", x: np.ndarray) -> None:
        """Raise the contract's own message for a status about the input's values."""
        codes = _cext._codes()
        if e.status == codes["QCONV_ENONFINITE"]:
            check_finite(x, "input")
        elif e.status == codes["QCONV_EMAXABS"]:
            maxabs_scale(x, self._q)
        elif e.status == codes["QCONV_ESCALE"]:
            dequant_factor(self._s_x or maxabs_scale(x, self._q), self.plan.s_w)
        raise InputError(str(e))  # not reached when the contract agrees with C

