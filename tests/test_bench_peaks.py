"""benchmarks/bench_cuda.py's peak microbenchmarks compile through NVRTC without a GPU (the wgmma one
for sm_90a, the others for every arch the backend targets), and the report names the wgmma peak or
why it was skipped. Only a missing cuda-python/NVRTC skips; a compile failure fails."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from checks import nvrtc_or_skip

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cuda.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_cuda", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("n, chains", [(256, 1), (128, 1), (128, 2), (64, 2)])
def test_wgmma_peak_compiles_for_sm90a(n, chains):
    nv = nvrtc_or_skip()
    cubin = nv.compile_source(_bench().wgmma_peak_src(n, chains), {}, "wgmma_peak.cu", "sm_90a")
    assert cubin.startswith(b"\x7fELF")
    assert b"wgmma_peak" in cubin


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_other_peaks_compile(arch):
    nv = nvrtc_or_skip()
    cubin = nv.compile_source(_bench().PEAK_SRC, {}, "peaks.cu", arch)
    assert b"dp4a_peak" in cubin and b"mma_peak" in cubin and b"tf32_peak" in cubin


def test_report_line_names_wgmma_peak_or_skip():
    bench = _bench()
    peaks = {"dp4a_peak": 1.3e14, "mma_peak": 1.28e15, "tf32_peak": 3.2e14, "num_sms": 132, "sm_clock_ghz_max": 1.98}
    line = bench.table({"peaks": {**peaks, "wgmma_peak": 1.9e15, "arch": "sm_90"}}, []).splitlines()[-1]
    assert "int8 wgmma 1900.0 TOP/s" in line and "tf32 mma.sync 320.0 TFLOP/s" in line
    line = bench.table({"peaks": {**peaks, "wgmma_peak": None, "arch": "sm_80"}}, []).splitlines()[-1]
    assert "int8 wgmma skipped" in line and "sm_80" in line
