"""Tensor files: the assignment's .bin format (four little-endian int32, the shape, then the
values as little-endian float32 in C order), and numpy's .npy and .npz for reading.

Reading never trusts a header. A regular file's size (fstat) is checked against what its header
declares before anything is allocated, so a header that claims more than the file holds, or a file
with trailing bytes (a sparse 6 GiB file behind a (1, 1, 1, 1) header), is refused without reading
the data. A FIFO, a character device or standard input (`-`) is read bounded: the header, the bytes
it declares, and one more byte to detect trailing data, never more. Ctrl-C interrupts a read
between 16 MiB chunks and is never turned into another error.

(Longer than the house's ~400 lines on purpose: the three formats share one bounded reader and one
safe writer, and splitting them would spread the rules about untrusted sizes over two files.)

.npy and .npz are parsed here rather than by np.load, which allocates whatever a header declares
and ignores trailing bytes; the rules are np.load's with allow_pickle=False: numbers only (no
object, structured or complex arrays), any byte order, C or Fortran order. Their values become
float32 (refused if they overflow it), in any number of dimensions (.bin always holds 4).
A .npz holding one array loads it; name one with `key=` or as `weights.npz:NAME`.

Writing (`save`) goes to a temporary file beside the target, `.NAME.qconv-tmp-PID-RANDOM`, which is
renamed over the target once complete and fsynced: a reader never sees half a tensor, and an
existing file keeps its mode. The temporary file is removed on any exception, on Ctrl-C, and on
SIGTERM or SIGHUP (a handler is installed for the write only, in the main thread; afterwards the
previous disposition is restored and the signal delivered again, so the default one still ends the
process). One killed by SIGKILL leaves the file behind: a later save to the same name removes those
whose process is gone, and `stale_temps(folder)` lists them all. A symlink is written through: its
target is replaced and the link stays (a dangling one gets its target created, as `>` would). An
existing file the caller may not write is refused, as open() would refuse it.
Anything that is not a regular file (a character device, a FIFO, `-` for standard output) is
written in place, never replaced, and so is whatever /dev/stdout or /dev/fd/N stands for. A
directory or a block device is refused, and so is a terminal as standard output.

Every problem raises InputError (a QconvError) -- or QconvError for a failing disk (ENOSPC, EIO) --
with one line that names the file, quoted with repr() so no name can break the line.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import io
import os
import re
import secrets
import signal
import stat
import struct
import sys
import threading
import time
import zipfile
from typing import Any, Iterator, Union

import numpy as np

from .errors import InputError, QconvError

HEADER_BYTES = 16
_MAX_ELEMENTS = 2**40  # far above any real layer; stops an absurd header before it allocates
_CHUNK = 1 << 24  # bytes per read or write call: signals are seen between chunks
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAX_HEADER = 1 << 16
_TEMP_TAG = ".qconv-tmp-"
_STALE_AFTER_S = 60.0  # a temp file of a dead process, untouched this long, is removed
_SIGNALS = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s))

PathArg = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]


# ----------------------------------------------------------------------------------- names


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


# ----------------------------------------------------------------------------------- reading


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
    if not os.path.lexists(p) and not _is_std(p):
        from .samples import resolve_tensor  # a shipped sample's name ("exam1/input") works too
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
    with np.errstate(over="raise", invalid="ignore"):
        try:
            return np.ascontiguousarray(arr, dtype=np.float32)
        except FloatingPointError:
            raise InputError(f"{name}: {dtype} values beyond float32's range (+-3.4e38)") from None


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


def _check_dtype(name: str, dtype: np.dtype, verb: str) -> None:
    if dtype.names is not None or dtype.subdtype is not None or dtype.hasobject:
        raise InputError(f"{name}: {verb} {dtype} values (structured or object); a tensor holds "
                         f"real numbers")
    if dtype.kind == "c":
        raise InputError(f"{name}: {verb} complex values ({dtype}); a tensor holds real numbers "
                         f"(pass .real or abs() explicitly)")
    if dtype.kind not in "iuf":
        raise InputError(f"{name}: {verb} {dtype} values; a tensor holds real numbers")


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


# ----------------------------------------------------------------------------------- writing


def save(path: PathArg, tensor: Any) -> None:
    """Write a 4-D real tensor as .bin (float32). See the module docstring for what happens to an
    existing file, a symlink, a device, a FIFO or "-" (standard output), and to an interrupted write."""
    name = _describe(path, "standard output")
    p = _path(path, "save_tensor")
    data, header = _encode(name, tensor)
    if _is_std(p):
        _write_stdout(name, header, data)
        return
    try:
        st: os.stat_result | None = os.stat(p)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _oserror(name, e, "write") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise InputError(f"{name}: is a directory")
    if st is not None and stat.S_ISBLK(st.st_mode):
        raise InputError(f"{name}: is a block device; refusing to write a tensor onto it")
    if st is not None and (not stat.S_ISREG(st.st_mode) or _is_fd_alias(p)):
        # a character device, a FIFO, or /dev/stdout and its kin: written in place, never replaced
        _write_in_place(name, p, header, data)
    else:  # a regular file, or none yet; a symlink is written through: its target is replaced
        _write_replacing(name, os.path.realpath(p), st, header, data)


def _is_fd_alias(p: str) -> bool:
    """Whether `p` reaches an open file descriptor (/dev/stdout, /dev/fd/N, /proc/self/fd/N):
    what it names is whatever that descriptor is, so it is written in place, not replaced."""
    q = os.path.abspath(p)
    for _ in range(40):
        if re.fullmatch(r"/(?:dev|proc/[^/]+)/fd/\d+", q):
            return True
        try:
            target = os.readlink(q)
        except OSError:
            return False
        q = os.path.normpath(os.path.join(os.path.dirname(q), target))
    return False


def _encode(name: str, tensor: Any) -> tuple[np.ndarray, bytes]:
    try:
        t = np.asarray(tensor)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name}: cannot store {type(tensor).__name__}: {e}") from None
    _check_dtype(name, t.dtype, "cannot store")
    if t.ndim != 4:
        raise InputError(f"{name}: the format holds 4-D tensors, got shape {t.shape}")
    if any(d <= 0 or d > 2**31 - 1 for d in t.shape):
        raise InputError(f"{name}: shape {t.shape} cannot be stored (dims must fit int32, > 0)")
    return np.ascontiguousarray(t, dtype="<f4"), struct.pack("<4i", *t.shape)


def _write_all(fd: int, header: bytes, data: np.ndarray) -> None:
    """os.write in chunks, resuming partial writes (pipes); signals are seen between chunks."""
    for buf in (memoryview(header), memoryview(data).cast("B")):
        while len(buf):
            n = os.write(fd, buf[:_CHUNK])
            buf = buf[n:]


def _write_stdout(name: str, header: bytes, data: np.ndarray) -> None:
    for s in (sys.stdout, sys.__stdout__):
        if s is not None:
            with contextlib.suppress(Exception):
                s.flush()
    try:
        if os.isatty(1):
            raise InputError(f"{name}: refusing to write a binary tensor to a terminal; redirect "
                             f"standard output to a file or a pipe")
        _write_all(1, header, data)
    except OSError as e:
        raise _oserror(name, e, "write") from None


def _write_in_place(name: str, path: str, header: bytes, data: np.ndarray) -> None:
    flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    try:  # a FIFO blocks here until a reader opens it, as a shell redirection does
        if stat.S_ISREG(os.stat(path).st_mode):  # a regular file behind /dev/stdout
            flags |= os.O_TRUNC
        fd = os.open(path, flags)
    except OSError as e:
        raise _oserror(name, e, "write") from None
    try:
        _write_all(fd, header, data)
    except OSError as e:
        raise _oserror(name, e, "write") from None
    finally:
        os.close(fd)


def _write_replacing(name: str, real: str, st: os.stat_result | None, header: bytes,
                     data: np.ndarray) -> None:
    folder, base = os.path.split(real)
    folder = folder or "."
    if st is not None and not os.access(real, os.W_OK):  # as open(path, "wb") would refuse
        raise InputError(f"{name}: cannot write: permission denied")
    _remove_stale_temps(folder, base)
    terminated: _Terminated | None = None
    try:
        with _signals_raise():  # from before the temp file exists until it is renamed or removed
            fd, tmp = -1, ""
            try:
                fd, tmp = _create_temp(folder, base)
                if st is not None:  # the new file keeps the old one's mode (and owner, where allowed)
                    os.fchmod(fd, stat.S_IMODE(st.st_mode))
                    with contextlib.suppress(OSError):
                        os.fchown(fd, st.st_uid, st.st_gid)
                _write_all(fd, header, data)
                os.fsync(fd)
                os.close(fd)
                fd = -1
                os.replace(tmp, real)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                if tmp:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                raise
    except _Terminated as t:
        terminated = t
    except FileNotFoundError:
        raise InputError(f"{name}: cannot write: no such folder {folder!r}") from None
    except OSError as e:
        raise _oserror(name, e, "write") from None
    if terminated is not None:  # cleaned up, the previous handler is back: let it act on the signal
        os.kill(os.getpid(), terminated.signum)
        raise QconvError(f"{name}: not written: interrupted by signal {terminated.signum}")
    with contextlib.suppress(OSError):  # make the rename itself survive a crash
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class _Terminated(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated(signum)


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """During the block, SIGTERM and SIGHUP raise _Terminated (so the temp file is removed); a
    signal that is ignored, or handled outside Python, is left alone, as is a non-main thread."""
    installed: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in _SIGNALS:
            prev = signal.getsignal(sig)
            if prev is signal.SIG_IGN or prev is None:
                continue
            installed[sig] = prev
            signal.signal(sig, _raise_terminated)
    try:
        yield
    finally:
        for sig, prev in installed.items():
            signal.signal(sig, prev)


def _temp_prefix(base: str) -> str:
    return f".{base[:200]}{_TEMP_TAG}"


def _create_temp(folder: str, base: str) -> tuple[int, str]:
    """A new hidden file beside the target, `.NAME.qconv-tmp-PID-RANDOM`, opened with mode 0666 so
    the umask applies as for open() (mkstemp would make it 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(folder, f"{_temp_prefix(base)}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {base!r}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def stale_temps(folder: PathArg, name: str | None = None) -> list[str]:
    """Temporary files that an interrupted save left in `folder` (for `name` only, if given):
    their process no longer runs on this machine and they have not changed for a minute."""
    d = _path(folder, "stale_temps")
    try:
        entries = os.listdir(d)
    except OSError:
        return []
    prefix = _temp_prefix(name) if name is not None else "."
    out = []
    now = time.time()
    for entry in entries:
        if not entry.startswith(prefix) or _TEMP_TAG not in entry:
            continue
        tail = entry.rsplit(_TEMP_TAG, 1)[1]
        pid_text, _, rand = tail.partition("-")
        if not pid_text.isdigit() or not rand:
            continue
        pid = int(pid_text)
        if pid == os.getpid() or _pid_alive(pid):
            continue
        full = os.path.join(d, entry)
        try:
            st = os.lstat(full)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and now - st.st_mtime > _STALE_AFTER_S:
            out.append(full)
    return sorted(out)


def _remove_stale_temps(folder: str, base: str) -> None:
    for path in stale_temps(folder, base):
        with contextlib.suppress(OSError):
            os.unlink(path)
