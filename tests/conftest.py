"""Hypothesis profiles and paths to the shared data.

Profiles (QCONV_HYPOTHESIS_PROFILE): "default" (fast, CI), "thorough" (more examples),
"gpu" (deadline=None: the first call compiles kernels).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("gpu", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("QCONV_HYPOTHESIS_PROFILE", "default"))

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("QCONV_SHARED", REPO.parent / "shared"))
EXAM = SHARED / "data" / "exam"
REAL = SHARED / "data" / "real"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (it ships beside the qconv checkout, not in a user's clone)")
    return path


@pytest.fixture
def exam_dir() -> Path:
    return _need(EXAM)


@pytest.fixture
def real_dir() -> Path:
    return _need(REAL)


def exam_cases() -> list[str]:
    """Exam cases with both tensors (case 3's kernel was never recovered)."""
    return ["1", "2"]


def real_layers() -> list[str]:
    """Every real layer folder (model/layer) under shared/data/real, or [] where absent."""
    if not REAL.exists():
        return []
    return sorted(str(p.parent.relative_to(REAL)) for p in REAL.glob("*/*/output_tensor.bin"))


# QCONV_REQUIRE=c-scalar,c-avx2 (CI sets it): these backends must be available; a broken build
# then fails the suite instead of skipping it.
REQUIRED = {n.strip() for n in os.environ.get("QCONV_REQUIRE", "").split(",") if n.strip()}


def backend_or_skip(name: str) -> None:
    """Skip with the backend's own reason when it is unavailable, unless QCONV_REQUIRE names it."""
    import qconv
    ok, why = qconv.available_backends().get(name, (False, f"no backend named {name!r}"))
    if not ok:
        if name in REQUIRED:
            pytest.fail(f"{name} is required (QCONV_REQUIRE) but unavailable: {why}")
        pytest.skip(f"{name} unavailable: {why}")
