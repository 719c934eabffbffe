"""Per-stream state of the cuda backend: what calls on one stream share (lock, scratch, pools of
outputs, pinned blocks, call records and events)."""

from __future__ import annotations

import ctypes
import threading
from typing import TYPE_CHECKING, Any

from ._driver import ck

if TYPE_CHECKING:
    from ._driver import Runtime

SLOT_BYTES = 16
SLOTS_PER_CHUNK = 256
PINNED_OUTPUT_CAP = 2 << 30  # pinned bytes kept for host outputs; beyond it outputs are pageable


class StreamCtx:
    """Everything ordered by one stream: calls enqueue under its lock, so scratch buffers (reused
    call after call) are never written by one call while another's kernels read them. Pools:
    device outputs (returned when a DeviceArray is collected), pinned host outputs, call records
    (mapped host slots that the convolution kernel writes) and timing events."""

    def __init__(self, rt: "Runtime", stream: Any, owned: bool) -> None:
        self.rt, self.stream, self.owned = rt, stream, owned
        self.handle = int(stream)
        self.lock = threading.RLock()
        self.scratch_bufs: dict[str, tuple[int, int]] = {}
        self.pinned_bufs: dict[str, tuple[int, int]] = {}
        self.out_pool: dict[int, list[int]] = {}
        self.host_pool: dict[int, list[int]] = {}
        self.host_bytes = 0
        self.slots: list[tuple[int, int]] = []
        self.events: list[Any] = []

    # device scratch (grow-only, contents undefined)
    def scratch(self, role: str, nbytes: int) -> int:
        ptr, size = self.scratch_bufs.get(role, (0, 0))
        if size >= nbytes:
            return ptr
        nbytes = max(256, (nbytes + 255) // 256 * 256)
        drv = self.rt.drv
        if ptr:
            ck(drv.cuStreamSynchronize(self.stream), "cuStreamSynchronize")
            ck(drv.cuMemFree(ptr), "cuMemFree")
            del self.scratch_bufs[role]
        ptr = int(ck(drv.cuMemAlloc(nbytes), f"cuMemAlloc({nbytes} bytes for {role})"))
        self.scratch_bufs[role] = (ptr, nbytes)
        return ptr

    # pinned host staging (grow-only)
    def pinned(self, role: str, nbytes: int) -> int:
        ptr, size = self.pinned_bufs.get(role, (0, 0))
        if size >= nbytes:
            return ptr
        nbytes = max(4096, (nbytes + 4095) // 4096 * 4096)
        drv = self.rt.drv
        if ptr:
            ck(drv.cuStreamSynchronize(self.stream), "cuStreamSynchronize")
            ck(drv.cuMemFreeHost(ptr), "cuMemFreeHost")
            del self.pinned_bufs[role]
        ptr = int(ck(drv.cuMemHostAlloc(nbytes, 0), f"cuMemHostAlloc({nbytes} bytes for {role})"))
        self.pinned_bufs[role] = (ptr, nbytes)
        return ptr

    # device outputs: a free list per size
    def take_output(self, nbytes: int) -> int:
        lst = self.out_pool.get(nbytes)
        if lst:
            try:
                return lst.pop()
            except IndexError:
                pass
        return int(ck(self.rt.drv.cuMemAlloc(max(nbytes, 4)), f"cuMemAlloc({nbytes} bytes for an output)"))

    def give_output(self, ptr: int, nbytes: int) -> None:
        self.out_pool.setdefault(nbytes, []).append(ptr)  # atomic under the GIL: safe from __del__

    # pinned host outputs
    def take_host(self, nbytes: int) -> int:
        lst = self.host_pool.get(nbytes)
        if lst:
            try:
                return lst.pop()
            except IndexError:
                pass
        if self.host_bytes + nbytes > PINNED_OUTPUT_CAP:
            return 0
        ptr = int(ck(self.rt.drv.cuMemHostAlloc(max(nbytes, 4), 0), f"cuMemHostAlloc({nbytes} bytes)"))
        self.host_bytes += nbytes
        return ptr

    def give_host(self, ptr: int, nbytes: int) -> None:
        self.host_pool.setdefault(nbytes, []).append(ptr)

    # call records: (host address, device address) of a 16-byte mapped slot
    def take_slot(self) -> tuple[int, int]:
        try:
            return self.slots.pop()
        except IndexError:
            pass
        drv = self.rt.drv
        n = SLOT_BYTES * SLOTS_PER_CHUNK
        host = int(ck(drv.cuMemHostAlloc(n, drv.CU_MEMHOSTALLOC_DEVICEMAP | drv.CU_MEMHOSTALLOC_PORTABLE),
                      "cuMemHostAlloc(call records)"))
        dev = int(ck(drv.cuMemHostGetDevicePointer(host, 0), "cuMemHostGetDevicePointer(call records)"))
        ctypes.memset(host, 0, n)
        self.slots.extend((host + SLOT_BYTES * i, dev + SLOT_BYTES * i) for i in range(SLOTS_PER_CHUNK - 1, 0, -1))
        return host, dev

    def give_slot(self, slot: tuple[int, int]) -> None:
        self.slots.append(slot)

    def take_events(self, n: int) -> list[Any]:
        ev, drv, out = self.events, self.rt.drv, []
        while len(out) < n:
            try:
                out.append(ev.pop())
            except IndexError:
                out.append(ck(drv.cuEventCreate(drv.CUevent_flags.CU_EVENT_DEFAULT), "cuEventCreate"))
        return out

    def give_events(self, evs: list[Any]) -> None:
        self.events.extend(evs)
