"""The backend registry: names to backend modules, imported lazily so `import qconv` never fails.

A variant is a backend plus options, written and accepted as ``"c-avx2[isa=avx2]"``: each backend
module may list its own in ``variants() -> list[dict]`` (default: just the backend itself), so the
study, the CLI and the tests enumerate them from here.
"""

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


def variant_name(backend: str, options: dict | None = None) -> str:
    """'c-avx2' + {'isa': 'avx2'} -> 'c-avx2[isa=avx2]' (options sorted; none: the plain name)."""
    if not options:
        return backend
    return f"{backend}[{','.join(f'{k}={v}' for k, v in sorted(options.items()))}]"


def parse_variant(text: str) -> tuple[str, dict]:
    """'c-avx2[isa=avx2,threads=2]' -> ('c-avx2', {'isa': 'avx2', 'threads': 2}); ints become ints."""
    t = str(text).strip()
    if not t.endswith("]") or "[" not in t:
        return t, {}
    name, _, body = t[:-1].partition("[")
    opts: dict = {}
    for item in filter(None, (i.strip() for i in body.split(","))):
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise InputError(f"backend {text!r}: options are written name[key=value,...]")
        k, v = k.strip(), v.strip()
        if k in opts:
            raise InputError(f"backend {text!r}: option {k!r} is given twice")
        opts[k] = int(v) if v.lstrip("-").isdigit() else {"true": True, "false": False}.get(v.lower(), v)
    return name.strip(), opts


def check_variant(text: str) -> tuple[str, dict]:
    """(backend, options) of a variant name, refused now as a call would refuse it: an unknown
    backend or option value (InputError), an unavailable backend (BackendUnavailable). For
    commands that run many calls later (the study)."""
    import numpy as np

    from ..api import prepare  # here: api imports this module
    b, opts = parse_variant(text)
    if b.strip().lower() == "auto":
        raise InputError(f"backend {text!r}: name a backend ({', '.join(_MODULES)}), not auto")
    prepare(np.zeros((1, 1, 1, 1), np.float32), "fp32", text)  # each backend checks its own options
    return b.strip().lower(), opts


def variants(available_only: bool = True, for_tests: bool = False) -> list[tuple[str, str, dict]]:
    """Every (variant name, backend, options) the registered backends offer, in AUTO_ORDER;
    for_tests: also what only the tests run (each module's variants_for_tests(): emulated ISA
    levels, non-default switches)."""
    out = []
    for name in _MODULES:
        mod, _ = _load(name)
        if mod is None or (available_only and not _probe(mod)[0]):
            continue
        listed = getattr(mod, "variants", None)
        extra = getattr(mod, "variants_for_tests", None) if for_tests else None
        for opts in (listed() if listed else [{}]) + (extra() if extra else []):
            out.append((variant_name(name, opts), name, dict(opts)))
    return out


def fp32_bound(backend: str, options: dict | None = None) -> tuple[float, float]:
    """(c, per_term) of contract.fp32_error_bound that a backend's FP32 path keeps with these
    options: the contract's (2, 0) unless the module declares its own (fp32_bound(options))."""
    declare = getattr(module(backend), "fp32_bound", None)
    return declare(dict(options or {})) if declare is not None else (2.0, 0.0)


_probed: dict[str, tuple[bool, str]] = {}


def _probe(mod: ModuleType) -> tuple[bool, str]:
    """mod.is_available(), asked once per process (a machine's backends do not come and go)."""
    hit = _probed.get(mod.__name__)
    if hit is None:
        try:
            hit = mod.is_available()
        except Exception as e:  # a probe must never take the registry down
            hit = (False, f"availability check failed: {e}")
        _probed[mod.__name__] = hit
    return hit


def _load(name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(_MODULES[name]), ""
    except Exception as e:  # not only ImportError: a bad .so or a driver probe may raise anything
        return None, f"cannot import {_MODULES[name]}: {e}"


def module(name: str) -> ModuleType | None:
    """The backend's module, available or not (None where it does not import): what it says about
    itself (variants, tiles, bound_instruction) needs no device."""
    key = parse_variant(str(name))[0].lower()
    return _load(key)[0] if key in _MODULES else None


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
    key = parse_variant(str(name))[0].lower()
    if key == "auto":
        for candidate in AUTO_ORDER:
            mod, _ = _load(candidate)
            if mod is not None and _probe(mod)[0]:
                return mod
        raise BackendUnavailable("no backend is available (the reference backend should always be)")
    if key not in _MODULES:
        have = available_backends()
        off = [n for n, (ok, _) in have.items() if not ok]
        raise InputError(f"unknown backend {name!r}: choose one of auto, {', '.join(n for n in have if have[n][0])}"
                         + (f" (not available here: {', '.join(off)})" if off else ""))
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
