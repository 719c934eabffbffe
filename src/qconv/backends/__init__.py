"""The backend registry: names to backend modules, imported lazily so `import qconv` never fails."""

from __future__ import annotations

import contextlib
import importlib
import threading
from types import ModuleType
from typing import Iterator

from ..errors import BackendUnavailable, InputError

# name -> module; "auto" tries them in this order (fastest first) and takes the first available.
_MODULES = {
    "cuda": "qconv.backends.cuda",
    "c-avx2": "qconv.backends.c_avx2",
    "reference": "qconv.backends.reference",
    "c-scalar": "qconv.backends.c_scalar",
}
AUTO_ORDER = tuple(_MODULES)

_state = threading.local()


def names() -> tuple[str, ...]:
    return tuple(_MODULES)


def _probe(mod: ModuleType) -> tuple[bool, str]:
    try:
        return mod.is_available()
    except Exception as e:  # a probe must never take the registry down
        return False, f"availability check failed: {e}"


def _load(name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(_MODULES[name]), ""
    except Exception as e:  # not only ImportError: a bad .so or a driver probe may raise anything
        return None, f"cannot import {_MODULES[name]}: {e}"


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every registered backend: (available, reason) — the reason says why a missing one is missing."""
    out = {}
    for name in _MODULES:
        mod, why = _load(name)
        if mod is None:
            out[name] = (False, why)
            continue
        out[name] = _probe(mod)
    return out


def get(name: str | None = None) -> ModuleType:
    """The backend module for a name ('auto' or None: the default, then the fastest available)."""
    if name is None or str(name).strip().lower() == "auto":
        name = getattr(_state, "default", "auto")  # use_backend's choice, where one is set
    key = str(name).strip().lower()
    if key == "auto":
        for candidate in AUTO_ORDER:
            mod, _ = _load(candidate)
            if mod is not None and _probe(mod)[0]:
                return mod
        raise BackendUnavailable("no backend is available (the reference backend should always be)")
    if key not in _MODULES:
        raise InputError(f"unknown backend {name!r}: choose one of auto, {', '.join(_MODULES)}")
    mod, why = _load(key)
    if mod is None:
        raise BackendUnavailable(f"backend {key!r} is unavailable: {why}")
    ok, reason = _probe(mod)
    if not ok:
        raise BackendUnavailable(f"backend {key!r} is unavailable: {reason}")
    return mod


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block (this thread), backend=None / 'auto' calls use `name`."""
    get(name)  # validate now, not at the first call
    old = getattr(_state, "default", "auto")
    _state.default = name
    try:
        yield
    finally:
        _state.default = old
