"""What reading and writing tensor files share: a path argument as str, a file's name in a
message, an OSError as one line, the dtypes a tensor may hold and their conversion to float32."""

from __future__ import annotations

import errno
import os
from typing import Any, Union

import numpy as np

from ..errors import InputError, QconvError

_CHUNK = 1 << 24  # bytes per read or write call: signals are seen between chunks

PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]


def _path(path: Any, what: str) -> str:
    """os.fspath as str (bytes decoded as the OS does, so they round-trip); InputError if not a path."""
    try:
        p = os.fspath(path)
    except TypeError:
        raise InputError(f"{what}: a path must be str, bytes or os.PathLike, got "
                         f"{type(path).__name__}") from None
    p = os.fsdecode(p)
    if "\0" in p:
        raise InputError(f"{p!r}: a path cannot contain a NUL byte")
    return p


def _is_std(p: str) -> bool:
    return p == "-"


def _describe(path: Any, std: str = "") -> str:
    """The file's name for a message: repr-quoted, so a newline or quote in it stays on one line;
    "-" is followed by what it stands for (`std`)."""
    try:
        p = os.fsdecode(os.fspath(path))
    except TypeError:
        return repr(path)
    return f"{p!r} ({std})" if _is_std(p) and std else repr(p)


_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG,
                errno.ENXIO, errno.EROFS, errno.ENODEV, errno.ETXTBSY}


def _oserror(name: str, e: OSError, doing: str) -> QconvError:
    """One line for an OSError. A missing or forbidden file is the caller's to fix (InputError); a
    disk that fails (ENOSPC, EIO, ...) is not, but it is still a QconvError that names the file."""
    if isinstance(e, FileNotFoundError):
        return InputError(f"{name}: no such file" if doing == "read" else f"{name}: cannot write: no such folder")
    if e.errno == errno.EPIPE:
        return QconvError(f"{name}: cannot write: the reader closed the pipe")
    why = e.strerror or str(e) or e.__class__.__name__
    why = why[:1].lower() + why[1:]
    return (InputError if e.errno in _USER_ERRNOS else QconvError)(f"{name}: cannot {doing}: {why}")


def _check_dtype(name: str, dtype: np.dtype, verb: str) -> None:
    if dtype.names is not None or dtype.subdtype is not None or dtype.hasobject:
        raise InputError(f"{name}: {verb} {dtype} values (structured or object); a tensor holds "
                         f"real numbers")
    if dtype.kind == "c":
        raise InputError(f"{name}: {verb} complex values ({dtype}); a tensor holds real numbers "
                         f"(pass .real or abs() explicitly)")
    if dtype.kind not in "iuf":
        raise InputError(f"{name}: {verb} {dtype} values; a tensor holds real numbers")


def _float32(name: str, a: np.ndarray, dtype: str = "=f4") -> np.ndarray:
    """a as C-contiguous float32 (native, or "<f4" for a file); values beyond float32's range are
    refused, never turned into inf."""
    with np.errstate(over="raise", invalid="ignore"):
        try:
            return np.ascontiguousarray(a, dtype=dtype)
        except FloatingPointError:
            raise InputError(f"{name}: {a.dtype} values beyond float32's range (+-3.4e38)") from None
