"""What every backend module provides, and what its calls return.

A backend is a module with:
    NAME: str
    ACCEPTS_DEVICE_ARRAYS: bool              (True only where inputs may live on a GPU)
    is_available() -> tuple[bool, str]       (False with the reason and how to fix it)
    to_device(x)                             (where ACCEPTS_DEVICE_ARRAYS: a host array copied to the device)
    prepare(plan, w) -> Prepared             (w: checked float32 (KH, KW, OC, C/g) numpy)
and may describe itself with:
    variants() -> list[dict]                 the options the study and the CLI show side by side
    variants_for_tests() -> list[dict]       options only the tests run besides (emulations, switches)
    tiles(options, precision) -> list[Tile]  its kernels' blocking, for tests at the tile edges
    bound_instruction(options, precision) -> str | None
                                             the instruction whose throughput bounds the kernel:
                                             a name qconv_peak measures, or the GPU's datasheet unit

A Prepared holds the kernel quantized and packed where the backend computes, and runs:
    prepared.run(x, geom, out=None, timed=True) -> BackendRun
x: float32 NHWC, C-contiguous (numpy, or a device array where ACCEPTS_DEVICE_ARRAYS); geom: the
checked contract.Geometry of this input; out: None or a float32 array of geom.out_shape to write.
run refuses non-finite inputs (InputError), takes s_x per call when plan.input_q is set (maxabs),
and times its own phases; timed=False says nobody will read them (Conv.__call__ returns the output
alone), so a backend whose timing costs something (CUDA events) may leave them at 0. It must be
safe to call from several threads at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError

PHASES = ("quantize", "pack", "transfer", "convolve", "dequantize")
_PHASE_SET = frozenset(PHASES)


@dataclass
class BackendRun:
    output: Any                                   # float32 (N, Ho, Wo, OC): numpy, or a device array
    phases: dict[str, float] = field(default_factory=dict)  # seconds, keys from PHASES
    wrapped: int | None = None                    # outputs whose int32 accumulator wrapped, if known
    s_x: np.float32 | None = None                 # the input scale this call used (integer precisions)
    x_absmax: np.float32 | None = None            # max|x|, where the call found it (the device's maxabs scan)

    def __post_init__(self) -> None:
        if self.phases.keys() == _PHASE_SET:  # every phase given (the C backends' every call)
            return
        unknown = set(self.phases) - _PHASE_SET
        if unknown:
            raise ValueError(f"unknown phases {sorted(unknown)}")
        for p in PHASES:
            self.phases.setdefault(p, 0.0)


@dataclass(frozen=True)
class Tile:
    """One blocking of a backend's kernels for one precision: the sizes of each tiled axis, so a
    test can put shapes equal to, one below, one above and a multiple of each. 1: not tiled."""
    options: dict[str, Any]          # options that select this tiling ({}: the backend picks it)
    pixels: tuple[int, ...]          # output pixels per block (along a row): full tile, half tile
    out_channels: int                # output channels per block
    in_channels: tuple[int, ...]     # input channels packed together / per K step of the pipeline
    dw_channels: int = 1             # the depthwise kernels' channel block
    dw_columns: int = 1              # the depthwise kernels' output columns per strip


def check_options(backend: str, options: dict[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        have = ", ".join(known) if known else "none"
        raise InputError(f"backend {backend!r} does not take option(s) {', '.join(unknown)} (it takes: {have})")


def run_once(prepare: Any, plan: Any, x: Any, w: np.ndarray) -> BackendRun:
    """prepare(plan, w).run(x): a one-shot call for tests and benchmarks that hold a Plan."""
    from ..contract import conv_spec
    spec = plan.spec or conv_spec(w.shape)
    if plan.spec is None:
        import dataclasses
        plan = dataclasses.replace(plan, spec=spec)
    return prepare(plan, w).run(x, spec.geometry(tuple(int(d) for d in x.shape)))
