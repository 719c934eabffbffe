"""The scale question: which S (or which pair s_x, s_w) minimizes NRMSE on this layer?

    table = qconv.sweep_scales(x, w, "int16")
    table.best.s_x, table.best.nrmse, table.reason
    for row in table: row.S, row.nrmse, row.wrapped_fraction

Every candidate is evaluated exactly as the contract defines the computation — contract.quantize,
the exact integer convolution wrapped to int32 (conv2d_int_wrapped), contract.dequantize — so
the NRMSE of a row is the NRMSE every backend produces with that scale, bit for bit. No backend
is called: the sweep is the same on every machine.

The default grid spans underflow (every value of one tensor quantizes to 0, the output is 0) to
overflow (accumulators wrap, or both tensors saturate at +-Qmax): powers of two plus a finer
log grid (``fine_per_octave`` points per octave), then a local refinement around the best.
``pairs=True`` also searches separate input and kernel scales (s_x != s_w).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .contract import (Precision, Rounding, conv2d_float64, conv2d_int_wrapped, dequant_factor,
                       dequantize, maxabs_scale, nrmse, parse_precision, parse_rounding, quantize)
from .errors import InputError

__all__ = ["SweepRow", "SweepTable", "sweep_scales", "format_scale"]


@dataclass(frozen=True)
class SweepRow:
    """One candidate scale and what it does on this layer."""

    s_x: float                 # input scale (float32 value)
    s_w: float                 # kernel scale (float32 value)
    nrmse: float               # against the float64 reference
    wrapped: int               # outputs whose int32 accumulator wrapped
    wrapped_fraction: float    # wrapped / number of outputs
    qx_max: int                # max |q_x|
    qw_max: int                # max |q_w|
    clamped_fraction: float    # fraction of input and kernel elements saturated at +-Qmax
    zero_output: bool          # every accumulator is 0 (underflow: one tensor quantized to all 0)
    kind: str                  # "pow2", "fine", "refine", "grid" (given), "pair"

    @property
    def S(self) -> float | None:
        """The single constant when s_x == s_w (the assignment's scheme), else None."""
        return self.s_x if self.s_x == self.s_w else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["S"] = self.S
        return d


def format_scale(s: float) -> str:
    """'2^10' for powers of two, '2^10.25' on the quarter-octave grid, else '%.4g'."""
    if s <= 0 or not math.isfinite(s):
        return repr(s)
    e = math.log2(s)
    if abs(e - round(e)) < 1e-9:
        return f"2^{int(round(e))}"
    for den in (2, 4, 8):
        if abs(e * den - round(e * den)) < 1e-6:
            return f"2^{e:.3f}".rstrip("0").rstrip(".")
    return f"{s:.4g} (2^{e:.2f})"


@dataclass
class SweepTable:
    """The rows of a sweep (single S, and pairs when asked), the best row and why it is best."""

    precision: Precision
    rounding: Rounding
    rows: list[SweepRow]                   # single S, sorted by S
    pair_rows: list[SweepRow] = field(default_factory=list)
    outputs: int = 0                       # number of output elements
    k: int = 0                             # reduction length KH*KW*IC

    def __iter__(self) -> Iterator[SweepRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def _argmin(rows: Sequence[SweepRow]) -> SweepRow:
        # Ties (equal NRMSE) go to the smallest s_x * s_w: the most headroom before overflow.
        return min(rows, key=lambda r: (r.nrmse, r.s_x * r.s_w, r.s_x))

    @property
    def best_single(self) -> SweepRow:
        if not self.rows:
            raise InputError("empty sweep")
        return self._argmin(self.rows)

    @property
    def best_pair(self) -> SweepRow | None:
        return self._argmin(self.pair_rows) if self.pair_rows else None

    @property
    def best(self) -> SweepRow:
        """The lowest-NRMSE row of all (single S and, if swept, pairs)."""
        return self._argmin(self.rows + self.pair_rows)

    @property
    def best_pow2(self) -> SweepRow | None:
        """The best single S that is a power of two (dequantize becomes a shift), if any was swept."""
        rows = [r for r in self.rows if math.frexp(r.s_x)[0] == 0.5]
        return self._argmin(rows) if rows else None

    @property
    def wrap_threshold(self) -> float | None:
        """Smallest swept S at which some accumulator wraps (None: none wrapped)."""
        wr = [r.s_x for r in self.rows if r.wrapped > 0]
        return min(wr) if wr else None

    @property
    def saturation_threshold(self) -> float | None:
        """Smallest swept S at which some element saturates at +-Qmax (None: none did)."""
        sat = [r.s_x for r in self.rows if r.clamped_fraction > 0]
        return min(sat) if sat else None

    @property
    def underflow_threshold(self) -> float | None:
        """Largest swept S at which the output is all zero (None: never)."""
        z = [r.s_x for r in self.rows if r.zero_output]
        return max(z) if z else None

    @property
    def reason(self) -> str:
        """One line: which S wins, by how much, and what happens above it."""
        b = self.best_single
        n = len(self.rows)
        parts = [f"S={format_scale(b.s_x)} minimizes NRMSE ({b.nrmse:.3g}, {self.rounding.value} rounding) "
                 f"among {n} candidates for {self.precision.value}"]
        p2 = self.best_pow2
        if p2 is not None and p2 is not b:
            parts[0] += f" (best power of two: S={format_scale(p2.s_x)}, NRMSE {p2.nrmse:.3g})"
        wt, st = self.wrap_threshold, self.saturation_threshold
        if wt is not None:
            parts.append(f"from S={format_scale(wt)} accumulators wrap")
        if st is not None and (wt is None or st < wt):
            parts.append(f"from S={format_scale(st)} values saturate at +-{self.precision.qmax}")
        ut = self.underflow_threshold
        if ut is not None:
            parts.append(f"up to S={format_scale(ut)} every output is 0")
        bp = self.best_pair
        if bp is not None and bp.nrmse < b.nrmse:
            parts.append(f"separate scales s_x={format_scale(bp.s_x)}, s_w={format_scale(bp.s_w)} "
                         f"do better ({bp.nrmse:.3g})")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        best = self.best_single
        bp = self.best_pair
        return {
            "precision": self.precision.value,
            "rounding": self.rounding.value,
            "outputs": self.outputs,
            "k": self.k,
            "rows": [r.to_dict() for r in self.rows],
            "pair_rows": [r.to_dict() for r in self.pair_rows],
            "best": best.to_dict(),
            "best_pair": None if bp is None else bp.to_dict(),
            "best_pow2": None if self.best_pow2 is None else self.best_pow2.to_dict(),
            "wrap_threshold": self.wrap_threshold,
            "saturation_threshold": self.saturation_threshold,
            "underflow_threshold": self.underflow_threshold,
            "reason": self.reason,
        }


class _Evaluator:
    """Evaluates scales on one layer, caching by (s_x, s_w) float32 values."""

    def __init__(self, x: np.ndarray, w: np.ndarray, precision: Precision, rounding: Rounding,
                 reference: np.ndarray) -> None:
        self.x, self.w, self.p, self.r, self.ref = x, w, precision, rounding, reference
        self.n_out = int(reference.size)
        self.n_in = int(x.size + w.size)
        self.cache: dict[tuple[float, float], SweepRow] = {}
        self._qcache: dict[tuple[str, float], tuple[np.ndarray, int, int, bool]] = {}

    def _q(self, which: str, s: float) -> tuple[np.ndarray, int, int, bool]:
        key = (which, s)
        hit = self._qcache.get(key)
        if hit is None:
            t = self.x if which == "x" else self.w
            q = quantize(t, s, self.p, self.r)
            a = np.abs(q.astype(np.int64))
            m = int(a.max(initial=0))
            hit = (q, m, int(np.count_nonzero(a == self.p.qmax)), m == 0)
            if len(self._qcache) > 64:
                self._qcache.clear()
            self._qcache[key] = hit
        return hit

    @staticmethod
    def valid(s_x: float, s_w: float) -> bool:
        """The pair's dequantize factor is a float32 (dequant_factor accepts it)."""
        if not (0 < s_x <= FLOAT32_MAX and 0 < s_w <= FLOAT32_MAX):
            return False
        try:
            dequant_factor(s_x, s_w)
        except InputError:
            return False
        return True

    def __call__(self, s_x: float, s_w: float, kind: str) -> SweepRow:
        s_x, s_w = float(np.float32(s_x)), float(np.float32(s_w))
        key = (s_x, s_w)
        if key in self.cache:
            return self.cache[key]
        if not (math.isfinite(s_x) and math.isfinite(s_w) and s_x > 0 and s_w > 0):
            raise InputError(f"scales must be positive finite float32 values, got ({s_x!r}, {s_w!r})")
        qx, mx, cx, zx = self._q("x", s_x)
        qw, mw, cw, zw = self._q("w", s_w)
        if zx or zw:
            y = np.zeros(self.ref.shape, dtype=np.float32)
            wrapped = 0
        else:
            acc, wrapped = conv2d_int_wrapped(qx, qw)
            y = dequantize(acc, dequant_factor(s_x, s_w))
        row = SweepRow(s_x=s_x, s_w=s_w, nrmse=nrmse(y, self.ref), wrapped=int(wrapped),
                       wrapped_fraction=wrapped / self.n_out, qx_max=mx, qw_max=mw,
                       clamped_fraction=(cx + cw) / self.n_in, zero_output=bool(zx or zw), kind=kind)
        self.cache[key] = row
        return row


def evaluate_scales(x: np.ndarray, w: np.ndarray, precision: "Precision | str | int", s_x: float, s_w: float,
                    *, reference: np.ndarray, rounding: "Rounding | str" = "nearest") -> SweepRow:
    """One (s_x, s_w) evaluated exactly as every backend computes it: NRMSE, wrapped outputs, max|q|."""
    p, r = parse_precision(precision), parse_rounding(rounding)
    return _Evaluator(x, w, p, r, np.asarray(reference, dtype=np.float64))(s_x, s_w, "given")


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _log2_range(lo: float, hi: float, per_octave: int) -> list[float]:
    a, b = math.floor(math.log2(lo) * per_octave), math.ceil(math.log2(hi) * per_octave)
    return [2.0 ** (i / per_octave) for i in range(a, b + 1)]


def _span(mx: float, mw: float, precision: Precision, rounding: Rounding) -> tuple[int, int]:
    """Octaves [lo, hi] of the single-S grid: from one octave below the point where the tensor with
    the smaller max|t| quantizes entirely to 0, to one octave past the point where both tensors'
    maxima saturate at Qmax."""
    first = 0.5 if rounding is Rounding.NEAREST else 1.0  # smallest |S*t| that is not 0
    lo = math.floor(math.log2(first / min(mx, mw))) - 1
    hi = math.ceil(math.log2(precision.qmax / min(mx, mw))) + 1
    return lo, max(hi, lo + 1)


def sweep_scales(x: np.ndarray, w: np.ndarray, precision: "Precision | str | int", *,
                 rounding: "Rounding | str" = "nearest", grid: Iterable[float] | None = None,
                 pairs: bool = False, reference: np.ndarray | None = None,
                 fine_per_octave: int = 8, refine: bool = True,
                 pair_stride: int | None = None, pair_min_step: float = 0.25) -> SweepTable:
    """Sweep the scale for an integer precision on one layer; return the table (rows, best, reason).

    x: float32 (N, H, W, C); w: float32 (KH, KW, OC, IC); precision: int32, int16 or int8.
    rounding: "nearest" (half to even) or "truncate" (the assignment's (int) cast).
    grid: the single-S candidates to evaluate (default: powers of two and a log grid with
        ``fine_per_octave`` points per octave from underflow to overflow, refined around the best).
    pairs: also sweep separate input/kernel scales: a power-of-two grid over both (every
        ``pair_stride`` octaves; default about 12 points per axis), then a pattern search around
        the best pair down to steps of ``pair_min_step`` octaves.
    reference: the float64 reference output, if already computed (saves one convolution).

    Returns a SweepTable: ``rows`` (single S, sorted; iterate the table for them) and
    ``pair_rows``, each a SweepRow (s_x, s_w, nrmse, wrapped and wrapped_fraction, max|q|,
    clamped_fraction, zero_output); ``best`` (lowest NRMSE of all rows; ties go to the smallest
    s_x*s_w, the most headroom), ``best_single``, ``best_pair``, ``best_pow2``; the thresholds
    where outputs start to wrap, values to saturate and the output stops being all zero; and
    ``reason``, one line saying which S wins and why. The default grid stops two octaves past
    the first power of two at which half the outputs wrap.
    """
    p = parse_precision(precision)
    if not p.is_integer:
        raise InputError("the scale sweep is for integer precisions (int32, int16, int8); fp32 has no scale")
    rnd = parse_rounding(rounding)
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if x.ndim != 4 or w.ndim != 4 or w.shape[3] != x.shape[3]:
        raise InputError(f"sweep_scales: want x (N,H,W,C) and w (KH,KW,OC,IC) with IC == C, "
                         f"got {x.shape} and {w.shape}")
    if not (np.isfinite(x).all() and np.isfinite(w).all()):
        raise InputError("sweep_scales: non-finite values in the input or kernel")
    ref = conv2d_float64(x, w) if reference is None else np.asarray(reference, dtype=np.float64)
    if ref.shape != (x.shape[0], x.shape[1], x.shape[2], w.shape[2]):
        raise InputError(f"sweep_scales: reference shape {ref.shape} does not match the layer")
    if fine_per_octave < 1:
        raise InputError("fine_per_octave must be >= 1")
    if pair_stride is not None and (isinstance(pair_stride, bool) or not isinstance(pair_stride, (int, np.integer))
                                    or pair_stride < 1):
        raise InputError(f"sweep_scales: pair_stride must be a whole number of octaves >= 1 (or None for "
                         f"about 12 points per axis), got {pair_stride!r}")
    if not (isinstance(pair_min_step, (int, float, np.floating, np.integer)) and not isinstance(pair_min_step, bool)
            and math.isfinite(pair_min_step) and pair_min_step > 0):
        raise InputError(f"sweep_scales: pair_min_step must be a positive number of octaves, got {pair_min_step!r}")
    ev = _Evaluator(x, w, p, rnd, ref)
    k = w.shape[0] * w.shape[1] * w.shape[3]
    mx, mw = float(np.max(np.abs(x))), float(np.max(np.abs(w)))

    rows: list[SweepRow]
    if grid is not None:
        cands = sorted({float(np.float32(s)) for s in grid})
        if not cands:
            raise InputError("sweep_scales: empty grid")
        rows = [ev(s, s, "grid") for s in cands]
    elif mx == 0.0 or mw == 0.0:
        rows = [ev(1.0, 1.0, "pow2")]  # the output is 0 whatever S is
    else:
        for t in (x, w):   # (near-)denormal data: its scale leaves float32; refused as every backend does
            maxabs_scale(t, p.qmax)
        lo, hi = _span(mx, mw, p, rnd)
        # only the S whose S^2 the dequantize can invert (tiny or huge data: one S may have none
        # inside the span, and the sweep then shows the nearest the contract allows)
        usable = [e for e in range(-150, 151) if ev.valid(2.0 ** e, 2.0 ** e)]
        lo, hi = min(max(lo, usable[0]), usable[-1]), max(min(hi, usable[-1]), usable[0])
        rows = [ev(2.0 ** e, 2.0 ** e, "pow2") for e in range(lo, hi + 1)]
        # Stop the fine grid two octaves past the point where half the outputs wrap: beyond it
        # the curve is flat garbage, and int32's saturation point is ~30 octaves further.
        top = hi
        for e, r in zip(range(lo, hi + 1), rows):
            if r.wrapped_fraction >= 0.5:
                top = min(hi, e + 2)
                break
        rows += [ev(s, s, "fine") for s in _log2_range(2.0 ** lo, 2.0 ** top, fine_per_octave)
                 if 2.0 ** lo <= s <= 2.0 ** top and ev.valid(s, s)]
        if refine:
            b = SweepTable._argmin(rows).s_x
            step = 2.0 ** (1.0 / (4 * fine_per_octave))
            rows += [ev(b * step ** i, b * step ** i, "refine") for i in range(-3, 4)
                     if i and ev.valid(b * step ** i, b * step ** i)]
    rows = sorted({(r.s_x, r.s_w): r for r in rows}.values(), key=lambda r: r.s_x)

    pair_rows: list[SweepRow] = []
    if pairs and mx > 0 and mw > 0:
        pair_rows = _sweep_pairs(ev, mx, mw, p, rnd, pair_stride, pair_min_step)
    return SweepTable(p, rnd, rows, pair_rows, outputs=int(ref.size), k=k)


def _sweep_pairs(ev: _Evaluator, mx: float, mw: float, p: Precision, rnd: Rounding,
                 stride: int | None, min_step: float) -> list[SweepRow]:
    """Separate scales: a power-of-two grid, each axis from underflow to saturation of its own
    tensor (coarsened to about 12 points per axis), then a pattern search around the best pair
    with steps of 1, 1/2 and 1/4 octave."""
    first = 0.5 if rnd is Rounding.NEAREST else 1.0
    ax = (math.floor(math.log2(first / mx)), math.ceil(math.log2(p.qmax / mx)) + 1)
    aw = (math.floor(math.log2(first / mw)), math.ceil(math.log2(p.qmax / mw)) + 1)
    span = max(ax[1] - ax[0], aw[1] - aw[0])
    step = int(stride) if stride is not None else max(1, math.ceil(span / 12))
    seen: dict[tuple[float, float], SweepRow] = {}

    def visit(ex: float, ew: float) -> SweepRow | None:
        if not ev.valid(2.0 ** ex, 2.0 ** ew):  # a pair whose dequantize factor leaves float32
            return None
        r = ev(2.0 ** ex, 2.0 ** ew, "pair")
        seen[(r.s_x, r.s_w)] = r
        return r

    for ex in range(ax[0], ax[1] + 1, step):
        for ew in range(aw[0], aw[1] + 1, step):
            visit(ex, ew)
    if not seen:
        return []
    best = SweepTable._argmin(list(seen.values()))
    bx, bw = math.log2(best.s_x), math.log2(best.s_w)
    budget = 400  # pattern-search evaluations at most (each strictly improves, so it ends anyway)
    for h in sorted({float(step), 1.0, 0.5, 0.25, min_step}, reverse=True):
        if h < min_step:
            continue
        improved = True
        while improved and budget > 0:
            improved = False
            for dx in (-h, 0, h):
                for dw in (-h, 0, h):
                    if dx == 0 and dw == 0:
                        continue
                    r = visit(bx + dx, bw + dw)
                    budget -= 1
                    if r is not None and r.nrmse < best.nrmse:
                        best, bx, bw, improved = r, bx + dx, bw + dw, True
    return sorted(seen.values(), key=lambda r: (r.s_x, r.s_w))
