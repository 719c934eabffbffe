"""The assignment's .bin tensor format: four little-endian int32 (the shape), then float32 values."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np

from .errors import QconvError

HEADER_BYTES = 16
_MAX_ELEMENTS = 2**40  # far above any real layer; stops an absurd header before it allocates


def _describe(path: "str | os.PathLike[str]") -> str:
    return f"{os.fspath(path)}"


def load(path: "str | os.PathLike[str]") -> np.ndarray:
    """Read a tensor file; every malformed file raises QconvError naming the file and the problem."""
    name = _describe(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise QconvError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise QconvError(f"{name}: is a directory, not a tensor file") from None
    except OSError as e:
        raise QconvError(f"{name}: cannot read ({e.strerror})") from None
    if len(data) < HEADER_BYTES:
        raise QconvError(f"{name}: {len(data)} bytes is shorter than the 16-byte shape header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype="<i4", count=4))
    if any(d <= 0 for d in shape):
        raise QconvError(f"{name}: shape {shape} has a non-positive dimension")
    count = 1
    for d in shape:
        count *= d
    if count > _MAX_ELEMENTS:
        raise QconvError(f"{name}: shape {shape} holds {count} elements, beyond any real tensor "
                         f"(limit 2^40): the header is corrupt")
    expected = HEADER_BYTES + 4 * count
    if len(data) < expected:
        raise QconvError(f"{name}: truncated: shape {shape} needs {expected} bytes, file has {len(data)}")
    if len(data) > expected:
        raise QconvError(f"{name}: {len(data) - expected} trailing bytes after the {expected} that "
                         f"shape {shape} needs")
    return np.frombuffer(data, dtype="<f4", offset=HEADER_BYTES).astype(np.float32).reshape(shape)


def save(path: "str | os.PathLike[str]", tensor: np.ndarray) -> None:
    """Write a 4-D float32 tensor atomically (temp file in the same folder, then rename)."""
    t = np.asarray(tensor)
    if t.ndim != 4:
        raise QconvError(f"{_describe(path)}: the format holds 4-D tensors, got shape {t.shape}")
    if any(d <= 0 or d > 2**31 - 1 for d in t.shape):
        raise QconvError(f"{_describe(path)}: shape {t.shape} cannot be stored (dims must fit int32, > 0)")
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = _create_temp(folder, target.name)
    except OSError as e:
        raise QconvError(f"{_describe(path)}: cannot write ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(np.asarray(t.shape, dtype="<i4").tobytes())
            f.write(np.ascontiguousarray(t, dtype="<f4").tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _create_temp(folder: Path, name: str) -> tuple[int, str]:
    """A new hidden file beside the target, opened with mode 0666 so the umask applies as for open()
    (mkstemp would make it 0600)."""
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {name}")


def load_pair(input_path: "str | os.PathLike[str]",
              kernel_path: "str | os.PathLike[str]") -> tuple[np.ndarray, np.ndarray]:
    """Load an (input, kernel) pair and check they fit together: NHWC input, (KH,KW,OC,IC) kernel."""
    x = load(input_path)
    w = load(kernel_path)
    if w.shape[3] != x.shape[3]:
        raise QconvError(f"{_describe(kernel_path)}: kernel IC={w.shape[3]} does not match the input's "
                         f"C={x.shape[3]} ({_describe(input_path)}, shape {x.shape})")
    return x, w
