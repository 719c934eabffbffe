"""Writing tensor files: `save` and the temporary files an interrupted save leaves.

A name ending in .npy gets a .npy file (float32, any number of dimensions, as np.save writes it);
any other name the assignment's .bin (4-D). A .npz name is refused (np.savez writes archives), and
so is a float64 value beyond float32's range, as loading refuses it.

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
"""

from __future__ import annotations

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
from typing import Any, Iterator

import numpy as np

from ..errors import InputError, QconvError
from ._common import _CHUNK, PathArg, _check_dtype, _describe, _float32, _is_std, _oserror, _path

_TEMP_TAG = ".qconv-tmp-"
_STALE_AFTER_S = 60.0  # a temp file of a dead process, untouched this long, is removed
_SIGNALS = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s))


def save(path: PathArg, tensor: Any) -> None:
    """Write a real tensor as float32: .npy for a name ending in .npy, else .bin (4-D). See the
    module docstring for what happens to an existing file, a symlink, a device, a FIFO or "-"
    (standard output), and to an interrupted write."""
    name = _describe(path, "standard output")
    p = _path(path, "save_tensor")
    suffix = os.path.splitext(p)[1].lower()
    if suffix == ".npz":
        raise InputError(f"{name}: save writes .bin or .npy; write a .npz archive with numpy.savez")
    data, header = _encode(name, tensor, npy=suffix == ".npy")
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


def _encode(name: str, tensor: Any, npy: bool) -> tuple[np.ndarray, bytes]:
    """The float32 little-endian values and the header: .npy's, or .bin's four int32 dimensions."""
    try:
        t = np.asarray(tensor)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name}: cannot store {type(tensor).__name__}: {e}") from None
    _check_dtype(name, t.dtype, "cannot store")
    if not npy and t.ndim != 4:
        raise InputError(f"{name}: the .bin format holds 4-D tensors, got shape {t.shape} (a .npy name "
                         f"holds any)")
    if t.ndim == 0:
        raise InputError(f"{name}: a single value (a 0-d array) is not a tensor")
    if any(d <= 0 or d > 2**31 - 1 for d in t.shape):
        raise InputError(f"{name}: shape {t.shape} cannot be stored (dims must fit int32, > 0)")
    data = _float32(name, t, "<f4")
    if not npy:
        return data, struct.pack("<4i", *t.shape)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": t.shape})
    return data, head.getvalue()


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
    except FileNotFoundError:  # a folder that exists may still refuse new files (/proc)
        why = f"cannot create a file in {folder!r}" if os.path.isdir(folder) else f"no such folder {folder!r}"
        raise InputError(f"{name}: cannot write: {why}") from None
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
