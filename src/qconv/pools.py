"""The other thread pools in a qconv process, and how qconv keeps them off its measurements.

numpy's BLAS (OpenBLAS) and PyTorch's OpenMP runtime keep their worker threads spinning for a
while after each parallel call, waiting for the next one. On the same cores those spinning threads
starve qconv's C workers: on a 16-core Xeon, exam layer 1's FP32 convolve phase measured 0.20 ms
alone, 3.8 ms right after a few 256x256 numpy matmuls, and 0.56 ms after PyTorch convolutions
(benchmarks/RESULTS.md, "Sharing the cores"). Users who mix them choose the switch (README):
OMP_WAIT_POLICY=PASSIVE for PyTorch, fewer BLAS threads for numpy. qconv's own timing loops (the
study, the benchmarks) run their numpy work with BLAS on one thread, so numpy's pool never spins.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def quiet_blas() -> Iterator[None]:
    """Run the block with numpy's BLAS limited to one thread (threadpoolctl), so its workers are
    not spinning when qconv's C workers run next."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"):
        yield
