"""JSON every parser reads: non-finite floats (an NRMSE of inf, the GOP/s of a phase timed at 0 s)
become null, numpy scalars become Python numbers. Used for every JSON qconv writes."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def clean(o: Any) -> Any:
    """JSON-safe: non-finite floats become null, numpy scalars become Python numbers."""
    if isinstance(o, dict):
        return {str(k): clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean(v) for v in o]
    if isinstance(o, (bool, np.bool_)):
        return bool(o)
    if isinstance(o, (int, np.integer)):
        return int(o)
    if isinstance(o, (float, np.floating)):
        f = float(o)
        return f if math.isfinite(f) else None
    return o


def dumps(o: Any, **kwargs: Any) -> str:
    """json.dumps of clean(o); never writes NaN or Infinity, which JSON does not have."""
    return json.dumps(clean(o), allow_nan=False, **kwargs)
