"""Reading tensor files: .bin, .npy and .npz, the format told by the first bytes.

Reading never trusts a header. A regular file's size (fstat) is checked against what its header
declares before anything is allocated, so a header that claims more than the file holds, or a file
with trailing bytes (a sparse 6 GiB file behind a (1, 1, 1, 1) header), is refused without reading
the data. A FIFO, a character device or standard input (`-`) is read bounded: the header, the bytes
it declares, and one more byte to detect trailing data, never more. Ctrl-C interrupts a read
between 16 MiB chunks and is never turned into another error.

.npy and .npz are parsed here rather than by np.load, which allocates whatever a header declares
and ignores trailing bytes; the rules are np.load's with allow_pickle=False: numbers only (no
object, structured or complex arrays), any byte order, C or Fortran order. Their values become
float32 (refused if they overflow it), in any number of dimensions (.bin always holds 4).
A .npz holding one array loads it; name one with `key=` or as `weights.npz:NAME`.
"""

from __future__ import annotations

import ast
import io
import os
import stat
import struct
import sys
import zipfile
from typing import Any

import numpy as np

from ..errors import InputError, QconvError
from ._common import _CHUNK, PathArg, _check_dtype, _describe, _float32, _is_std, _oserror, _path

HEADER_BYTES = 16
_MAX_ELEMENTS = 2**40  # far above any real layer; stops an absurd header before it allocates
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAX_HEADER = 1 << 16


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


class _Source:
    """Bytes from a file object, counted; `size` is known for a regular file (fstat) or a .npz
    member (its directory entry), None for a stream read bounded."""

    def __init__(self, f: Any, name: str, size: int | None, kind: str) -> None:
        self.f, self.name, self.size, self.kind = f, name, size, kind
        self.pos = 0
        self._pending = b""

    def readinto(self, view: memoryview) -> int:
        """Fill `view` until full or end of file, in chunks (Ctrl-C is seen between them)."""
        got = 0
        if self._pending:
            got = min(len(self._pending), len(view))
            view[:got] = self._pending[:got]
            self._pending = self._pending[got:]
        while got < len(view):
            n = self.f.readinto(view[got:got + _CHUNK])
            if not n:
                break
            got += n
        self.pos += got
        return got

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        got = self.readinto(memoryview(buf))
        return bytes(buf[:got])

    def unread(self, data: bytes) -> None:
        self._pending = data + self._pending
        self.pos -= len(data)


def load(path: PathArg, *, key: str | None = None) -> np.ndarray:
    """Read a tensor file (.bin, .npy or .npz; the format is told by the file's first bytes) into
    a C-contiguous, writable float32 array. `path` may be str, bytes or os.PathLike, or "-" for
    standard input. `key` names an array in a .npz; "weights.npz:NAME" does the same when no file of
    that exact name exists. A shipped sample's name ("exam1/input", see `qconv samples`) loads that
    sample when no file of that name exists. Every malformed or unreadable file raises InputError naming it."""
    p = _path(path, "load_tensor")
    if key is not None and not isinstance(key, str):
        raise InputError(f"load_tensor: key names an array in a .npz and must be a str, got {type(key).__name__}")
    if not os.path.lexists(p) and not _is_std(p):
        from ..samples import resolve_tensor  # a shipped sample's name ("exam1/input") works too
        p = resolve_tensor(p)
    if _is_std(p):
        stdin = getattr(sys.stdin, "buffer", None)
        if stdin is None:
            raise InputError("'-' (standard input): there is no binary standard input to read")
        return _load_from(_Source(stdin, "'-' (standard input)", None, "stream"), p, key)
    if key is None and ":" in p and not os.path.lexists(p):
        base, _, k = p.rpartition(":")
        if base.lower().endswith(".npz") and k:
            p, key = base, k
    name = repr(p)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise _oserror(name, e, "read") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{name}: is a directory, not a tensor file")
        f = io.FileIO(fd, "rb", closefd=True)
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError):
            raise _oserror(name, e, "read") from None
        raise
    with f:
        regular = stat.S_ISREG(st.st_mode)
        src = _Source(f, name, st.st_size if regular else None, "file" if regular else _kind(st.st_mode))
        return _load_from(src, p, key)


def _load_from(src: _Source, p: str, key: str | None) -> np.ndarray:
    name = src.name
    try:
        head = src.read(HEADER_BYTES)
    except OSError as e:
        raise _oserror(name, e, "read") from None
    suffix = os.path.splitext(p)[1].lower()
    if head.startswith(_NPY_MAGIC):
        if key is not None:
            raise InputError(f"{name}: is a .npy file; key={key!r} names an array in a .npz")
        src.unread(head)
        return _guarded(src, lambda: _read_npy(src, name))
    if head.startswith(_ZIP_MAGIC):
        return _load_npz(src, name, key)
    if suffix == ".npy":
        raise InputError(f"{name}: not a .npy file (it does not start with numpy's magic bytes)")
    if suffix == ".npz":
        raise InputError(f"{name}: not a .npz archive (it does not start with a zip header)")
    if key is not None:
        raise InputError(f"{name}: is a .bin tensor; key={key!r} names an array in a .npz")
    return _guarded(src, lambda: _read_bin(src, name, head))


def _guarded(src: _Source, read: Any) -> np.ndarray:
    """Run a reader: an OSError becomes one line naming the file; Ctrl-C passes through."""
    try:
        return read()
    except OSError as e:
        raise _oserror(src.name, e, "read") from None


def _read_bin(src: _Source, name: str, head: bytes) -> np.ndarray:
    if len(head) < HEADER_BYTES:
        raise InputError(f"{name}: {len(head)} bytes is shorter than the 16-byte shape header")
    shape = struct.unpack("<4i", head)
    if any(d <= 0 for d in shape):
        raise InputError(f"{name}: shape {shape} has a non-positive dimension")
    return _read_values(src, name, shape, np.dtype("<f4"))


def _count(name: str, shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    if count > _MAX_ELEMENTS:
        raise InputError(f"{name}: shape {shape} holds {count} elements, beyond any real tensor "
                         f"(limit 2^40): the header is corrupt")
    return count


def _read_values(src: _Source, name: str, shape: tuple[int, ...], dtype: np.dtype,
                 order: str = "C") -> np.ndarray:
    """The `shape` values that follow the header, checked against the size before allocating,
    as a C-contiguous native float32 array."""
    count = _count(name, shape)
    nbytes = count * dtype.itemsize
    expected = src.pos + nbytes
    if src.size is not None:  # a regular file or a .npz member: the size is known, check first
        if src.size < expected:
            raise InputError(f"{name}: truncated: shape {shape} needs {expected} bytes, "
                             f"file has {src.size}")
        if src.size > expected:
            raise InputError(f"{name}: {src.size - expected} trailing bytes after the {expected} "
                             f"that shape {shape} needs")
    try:
        flat = np.empty(count, dtype=dtype)
    except MemoryError:
        raise InputError(f"{name}: shape {shape} needs {nbytes} bytes of memory, more than this "
                         f"machine can give") from None
    got = src.readinto(memoryview(flat).cast("B"))
    if got < nbytes:
        raise InputError(f"{name}: truncated: shape {shape} needs {expected} bytes, "
                         f"file has {src.pos}")
    if src.read(1):
        where = "the file grew while it was read" if src.kind == "file" else \
            f"a {src.kind} is read up to that size and one byte more"
        raise InputError(f"{name}: trailing bytes after the {expected} that shape {shape} needs "
                         f"({where})")
    arr = flat.reshape(shape, order=order)  # type: ignore[call-overload]
    if dtype == np.float32 and dtype.isnative and order == "C":
        return arr
    return _float32(name, arr)


def _read_npy(src: _Source, name: str) -> np.ndarray:
    """One .npy: magic, version, header dict, data; the header's every field is checked."""
    pre = src.read(8)
    if len(pre) < 8 or not pre.startswith(_NPY_MAGIC):
        raise InputError(f"{name}: truncated .npy header")
    version = (pre[6], pre[7])
    if version == (1, 0):
        size_bytes, encoding = 2, "latin1"
    elif version in ((2, 0), (3, 0)):
        size_bytes, encoding = 4, "latin1" if version == (2, 0) else "utf8"
    else:
        raise InputError(f"{name}: .npy format version {version[0]}.{version[1]} is not one numpy writes")
    raw = src.read(size_bytes)
    if len(raw) < size_bytes:
        raise InputError(f"{name}: truncated .npy header")
    hlen = int.from_bytes(raw, "little")
    if hlen > _NPY_MAX_HEADER:
        raise InputError(f"{name}: .npy header of {hlen} bytes: the header is corrupt")
    text = src.read(hlen)
    if len(text) < hlen:
        raise InputError(f"{name}: truncated .npy header")
    try:
        d = ast.literal_eval(text.decode(encoding))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, UnicodeDecodeError):
        raise InputError(f"{name}: .npy header is not a Python literal: the header is corrupt") from None
    if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
        raise InputError(f"{name}: .npy header must hold exactly descr, fortran_order and shape")
    shape, fortran = d["shape"], d["fortran_order"]
    if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
        raise InputError(f"{name}: .npy shape {shape!r} is not a tuple of sizes")
    if not isinstance(fortran, bool):
        raise InputError(f"{name}: .npy fortran_order {fortran!r} is not True or False")
    try:
        dtype = np.lib.format.descr_to_dtype(d["descr"])
    except Exception:  # numpy raises TypeError, ValueError or others for a bad descr
        raise InputError(f"{name}: .npy dtype {d['descr']!r} is not one numpy knows") from None
    _check_dtype(name, dtype, "holds")
    if not shape:
        raise InputError(f"{name}: holds a single {dtype} value (a 0-d array), not a tensor")
    if 0 in shape:
        raise InputError(f"{name}: holds an empty array of shape {shape}")
    return _read_values(src, name, shape, dtype, "F" if fortran else "C")


def _load_npz(src: _Source, name: str, key: str | None) -> np.ndarray:
    if src.kind != "file":
        raise InputError(f"{name}: a .npz archive is read by seeking; a {src.kind} cannot be: "
                         f"save it to a regular file first")
    try:
        src.f.seek(0)
        with zipfile.ZipFile(io.BufferedReader(src.f)) as zf:
            members = {}
            for info in zf.infolist():
                if not info.is_dir():
                    n = info.filename
                    members[n[:-4] if n.endswith(".npy") else n] = info
            if not members:
                raise InputError(f"{name}: the .npz archive holds no arrays")
            if key is None:
                if len(members) > 1:
                    listed = ", ".join(sorted(members)[:8]) + (", ..." if len(members) > 8 else "")
                    raise InputError(f"{name}: the .npz archive holds {len(members)} arrays ({listed}): "
                                     f"name one, as FILE.npz:NAME or key=NAME")
                key, info = next(iter(members.items()))
            else:
                info = members.get(key) or members.get(key[:-4] if key.endswith(".npy") else "")
                if info is None:
                    listed = ", ".join(sorted(members)[:8]) + (", ..." if len(members) > 8 else "")
                    raise InputError(f"{name}: the .npz archive has no array {key!r} (it holds {listed})")
            member_name = f"{name}[{key!r}]"
            if info.flag_bits & 0x1:
                raise InputError(f"{member_name}: is encrypted")
            if info.compress_type == zipfile.ZIP_STORED:
                if info.file_size != info.compress_size:
                    raise InputError(f"{member_name}: stored member whose sizes disagree: the archive is corrupt")
            elif info.compress_type == zipfile.ZIP_DEFLATED:
                if info.file_size > 1100 * info.compress_size + 4096:  # deflate tops out near 1032:1
                    raise InputError(f"{member_name}: claims {info.file_size} bytes from "
                                     f"{info.compress_size} compressed: the archive is corrupt")
            else:
                raise InputError(f"{member_name}: compression method {info.compress_type} (numpy "
                                 f"writes stored or deflated members only)")
            with zf.open(info) as m:
                msrc = _Source(m, member_name, info.file_size, "file")
                return _read_npy(msrc, member_name)
    except QconvError:
        raise
    except MemoryError:
        raise InputError(f"{name}: out of memory while reading the .npz archive") from None
    except Exception as e:  # zipfile, zlib and struct report a bad archive in many ways
        raise InputError(f"{name}: not a readable .npz archive ({e.__class__.__name__}: "
                         f"{' '.join(str(e).split())})") from None


def load_pair(input_path: PathArg, kernel_path: PathArg) -> tuple[np.ndarray, np.ndarray]:
    """Load an (input, kernel) pair and check they fit together: NHWC input, (KH,KW,OC,IC) kernel."""
    x = load(input_path)
    w = load(kernel_path)
    for t, p, what in ((x, input_path, "an input is (N, H, W, C)"),
                       (w, kernel_path, "a kernel is (KH, KW, OC, IC)")):
        if t.ndim != 4:
            raise InputError(f"{_describe(p)}: holds a {t.ndim}-D array of shape {t.shape}; {what}")
    if w.shape[3] != x.shape[3]:
        raise InputError(f"{_describe(kernel_path)}: kernel IC={w.shape[3]} does not match the input's "
                         f"C={x.shape[3]} ({_describe(input_path)}, shape {x.shape})")
    return x, w
