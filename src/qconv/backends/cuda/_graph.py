"""A prepared call recorded once as a CUDA Graph on fixed device buffers, replayed with one
cuGraphLaunch: what is left of the host's per-call work at small N (Python, launches, events).

The convention is PyTorch's (torch.cuda.CUDAGraph): the graph reads the input buffer given at
capture and writes the output buffer it was captured with; a replay convolves whatever the input
buffer holds by then. Replays are ordered on the prepared convolution's stream, untimed (no
events), and own their scratch, so ordinary calls on the same stream can never move it.
"""

from __future__ import annotations

import math
from typing import Any

from ...errors import InputError
from . import _arrays, _driver
from ._launch import QSlot
from ._record import _flag_error


class _OwnScratch:
    """The stream context as a job sees it during capture, but with scratch buffers of the
    graph's own (ctx.scratch grows by reallocating, which would leave a graph pointing at freed memory)."""

    def __init__(self, ctx: Any, owned: list[int]) -> None:
        self.rt, self.stream, self.handle = ctx.rt, ctx.stream, ctx.handle
        self._owned, self._bufs = owned, {}

    def scratch(self, role: str, nbytes: int) -> int:
        if role not in self._bufs:
            ptr = int(_driver.ck(self.rt.drv.cuMemAlloc(max(nbytes, 256)), f"cuMemAlloc({nbytes} bytes for {role})"))
            self._owned.append(ptr)
            self._bufs[role] = ptr
        return self._bufs[role]


class _GraphRecord:
    """The graph's call record: its slot is written by every replay; reading it waits for the
    stream (the last replay) and raises the contract's error for what that replay saw."""

    def __init__(self, ctx: Any, slot: tuple[int, int], plan: Any, x: Any) -> None:
        self.ctx, self.slot, self.plan, self.x = ctx, slot, plan, x   # the graph keeps its input alive

    def resolve(self) -> "_GraphRecord":
        self.ctx.rt.make_current()
        _driver.ck(self.ctx.rt.drv.cuStreamSynchronize(self.ctx.stream), "cuStreamSynchronize")
        err = _flag_error(QSlot.from_address(self.slot[0]), self.plan, self.x)
        if err is not None:
            raise err
        return self


class Captured:
    """`conv.capture(x)`: call it to replay the convolution of x's buffer into `output`."""

    def __init__(self, prep: Any, x: Any, geom: Any, out: Any = None) -> None:
        ctx, rt = prep.ctx, prep.rt
        drv = rt.drv
        if ctx.handle == 0:
            raise InputError("capture needs a stream other than the legacy default stream: leave stream= "
                             "unset (qconv's own stream) or pass a stream you created")
        rt.make_current()
        self._owned: list[int] = []
        self._keep: list[Any] = [x]
        self.ctx, self.input = ctx, x
        with ctx.lock:
            x_ptr, _ = _arrays.device_view(x, "input", ctx, self._keep)
            job = prep.job(geom, x_ptr % 16 == 0)
            if out is None:
                out_ptr = ctx.take_output(job.out_bytes)  # the graph keeps the array, so the buffer, alive
                self.output = _arrays.DeviceArray(out_ptr, job.out_shape, ctx, pool=True)
            else:
                out_ptr, _ = _arrays.device_view(out, "out", ctx, self._keep)
                if out_ptr % 16:
                    raise InputError("out= must start on a 16-byte boundary")
                self.output = out
            self.slot = ctx.take_slot()
            rec = _SlotOnly(self.slot)
            _driver.ck(drv.cuStreamSynchronize(ctx.stream), "cuStreamSynchronize")  # scratch allocs before capture
            view = _OwnScratch(ctx, self._owned)
            if job.xq_bytes:
                view.scratch("xq", job.xq_bytes)
            _driver.ck(drv.cuStreamBeginCapture(ctx.stream, drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
                       "cuStreamBeginCapture")
            try:
                with _driver.plain_launches():  # PDL in a graph measured slower (RESULTS.md, 2026-12-06)
                    prep._enqueue(job, x_ptr, out_ptr, rec, None, ctx=view)
            finally:
                graph = _driver.ck(drv.cuStreamEndCapture(ctx.stream), "cuStreamEndCapture")
            self._graph = graph
            self._exec = _driver.ck(drv.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        self._record = _GraphRecord(ctx, self.slot, prep.plan, x)
        if isinstance(self.output, _arrays.DeviceArray):
            self.output._record = self._record
        self.shape = tuple(job.out_shape)
        self.flops = 2 * math.prod(job.out_shape) * prep.spec.k

    def __call__(self) -> Any:
        """Replay: enqueue the graph on the conv's stream (nothing waits) and return `output`."""
        _driver.ck(self.ctx.rt.drv.cuGraphLaunch(self._exec, self.ctx.stream), "cuGraphLaunch")
        return self.output

    def synchronize(self) -> "Captured":
        """Wait for the last replay; raise InputError if its input held NaN/inf (or its scale failed)."""
        self._record.resolve()
        return self

    def __del__(self) -> None:
        try:
            drv = self.ctx.rt.drv
            self.ctx.rt.make_current()
            drv.cuStreamSynchronize(self.ctx.stream)
            drv.cuGraphExecDestroy(self._exec)
            drv.cuGraphDestroy(self._graph)
            for p in self._owned:
                drv.cuMemFree(p)
            self.ctx.give_slot(self.slot)
        except Exception:
            pass


class _SlotOnly:
    """What Job.enqueue reads of a record when it runs untimed: the slot."""

    events: list[Any] = []

    def __init__(self, slot: tuple[int, int]) -> None:
        self.slot = slot
        self.marks: list[Any] = []
