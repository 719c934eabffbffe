"""A call's record on the GPU: its host-mapped slot (flag, s_x, max|x|, non-finite outputs, written
by the call's last kernel) and its timing events, read once when the call's result is looked at;
the errors a slot's flag stands for, in the contract's words; and the lazy BackendRun of a device
call."""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from ...contract import Plan, check_finite, dequant_factor, maxabs_scale
from ...errors import BackendError, InputError
from ..base import PHASES, BackendRun
from . import _arrays, _driver
from ._launch import QSlot
from ._streams import StreamCtx

NONFINITE = "input holds non-finite value(s) (NaN or inf): qconv convolves finite data only"


class Record:
    """One call: its host-mapped slot (a QSlot: flag, s_x, max|x|, non-finite outputs, written by
    the call's last kernel) and its timing events. resolve() waits for the call, reads them once
    and gives them back."""

    __slots__ = ("ctx", "slot", "events", "marks", "maxabs", "plan", "x", "_phases", "_s_x", "_m", "_error", "_done")

    def __init__(self, ctx: StreamCtx, n_events: int, maxabs: bool, plan: Plan, x: Any = None) -> None:
        self.ctx, self.maxabs, self.plan = ctx, maxabs, plan
        self.x = _weak(x)  # a device input is not kept alive by its output's record
        self.slot = ctx.take_slot()
        self.events = ctx.take_events(n_events) if n_events else []
        self.marks: list[tuple[str, int, int]] = []   # (phase, from event, to event)
        self._done = False
        self._phases: dict[str, float] = {}
        self._s_x: np.float32 | None = None
        self._m: np.float32 | None = None
        self._error: InputError | None = None

    def resolve(self) -> "Record":
        if not self._done:
            ctx, drv = self.ctx, self.ctx.rt.drv
            ctx.rt.make_current()
            if self.events:
                _driver.ck(drv.cuEventSynchronize(self.events[-1]), "cuEventSynchronize")
            else:
                _driver.ck(drv.cuStreamSynchronize(ctx.stream), "cuStreamSynchronize")
            slot = QSlot.from_address(self.slot[0])
            ph = {p: 0.0 for p in PHASES}
            for name, a, b in self.marks:
                ph[name] += ctx.rt.elapsed(self.events[a], self.events[b])
            self._phases = ph
            if self.maxabs:
                self._s_x, self._m = np.float32(slot.s_x), np.float32(slot.m)
            self._error = _flag_error(slot, self.plan, self.x())
            self.x = None
            self._release()
        if self._error:
            raise self._error.with_traceback(None)
        return self

    def phases(self) -> dict[str, float]:
        return self.resolve()._phases

    def s_x(self) -> np.float32 | None:
        return self.resolve()._s_x

    def x_absmax(self) -> np.float32 | None:
        return self.resolve()._m

    def _release(self) -> None:
        if not self._done:
            self._done = True
            self.ctx.give_slot(self.slot)
            if self.events:
                self.ctx.give_events(self.events)
                self.events = []

    def __del__(self) -> None:
        try:
            self._release()
        except Exception:
            pass


def _weak(x: Any) -> Any:
    """A callable giving x back: x itself for host arrays (their call resolves before it returns),
    a weak reference for device arrays where they allow one, else a callable giving None."""
    if x is None or not isinstance(x, np.ndarray):
        try:
            return weakref.ref(x)
        except TypeError:
            return lambda: None
    return lambda: x


def _flag_error(slot: QSlot, plan: Plan, x: Any = None) -> InputError | None:
    """The error a call's record holds (QStats.flag's bits, qconv_common.cuh), in the contract's
    words, or None. x: the call's input, which the contract's non-finite message counts."""
    flag = slot.flag
    if flag & 1:
        if x is not None:  # the error path only: count on the host, as the contract words it
            try:
                check_finite(x if isinstance(x, np.ndarray) else _arrays.to_host(x), "input")
            except InputError as e:
                return e
        return InputError(NONFINITE)
    if flag & 12:  # the per-call scale was refused: the contract's own check on max|x| says why
        try:
            dequant_factor(maxabs_scale(np.float32(slot.m), int(plan.input_q)), plan.s_w)
        except InputError as e:
            return e
        raise BackendError(f"the device refused the scale of max|x| = {slot.m!r}, which the contract accepts")
    if flag & 16:
        from ...contract import fp32_overflow_error
        return fp32_overflow_error(slot.nonfinite or None)  # the count is modulo 2^32: 0 means it wrapped
    return None


class LazyRun(BackendRun):
    """A device call's BackendRun: phases and s_x are read from its record when first asked for
    (that waits for the call), so the hot path (Conv.__call__) never synchronizes."""

    def __init__(self, output: Any, record: Record, s_x: np.float32 | None) -> None:  # noqa: D107
        self.output, self._record, self._fixed_s_x, self.wrapped = output, record, s_x, None

    @property  # type: ignore[override]
    def phases(self) -> dict[str, float]:
        return self._record.phases()

    @property  # type: ignore[override]
    def s_x(self) -> np.float32 | None:
        if self._record.maxabs:
            return self._record.s_x()
        self._record.resolve()  # the flag is checked whenever the result is looked at
        return self._fixed_s_x

    @property  # type: ignore[override]
    def x_absmax(self) -> np.float32 | None:
        return self._record.x_absmax()
