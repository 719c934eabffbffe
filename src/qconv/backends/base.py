"""What every backend module provides, and what its run returns.

A backend is a module with:
    NAME: str
    ACCEPTS_DEVICE_ARRAYS: bool            (True only where inputs may live on a GPU)
    is_available() -> tuple[bool, str]     (False with the reason and how to fix it)
    run(plan, x, w) -> BackendRun          (x, w validated float32, C-contiguous)

The backend quantizes, packs, [transfers,] convolves and dequantizes, timing each phase itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PHASES = ("quantize", "pack", "transfer", "convolve", "dequantize")


@dataclass
class BackendRun:
    output: Any                                   # float32 (N, H, W, OC): numpy, or a device array
    phases: dict[str, float] = field(default_factory=dict)  # seconds, keys from PHASES
    wrapped: int | None = None                    # outputs whose int32 accumulator wrapped, if known

    def __post_init__(self) -> None:
        unknown = set(self.phases) - set(PHASES)
        if unknown:
            raise ValueError(f"unknown phases {sorted(unknown)}")
        for p in PHASES:
            self.phases.setdefault(p, 0.0)


def check_options(backend: str, options: dict[str, Any], known: tuple[str, ...]) -> None:
    from ..errors import QconvError
    unknown = sorted(set(options) - set(known))
    if unknown:
        have = ", ".join(known) if known else "none"
        raise QconvError(f"backend {backend!r} does not take option(s) {', '.join(unknown)} (it takes: {have})")
