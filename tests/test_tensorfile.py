"""The assignment's .bin format: round trips, the exact byte layout, atomic saves, and every
malformed file rejected with a message that names the file and the problem."""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qconv
from qconv import tensorfile
from qconv.errors import QconvError
from qconv.tensorfile import _read as reading, _write as writing, load, load_pair, save


def _write(path, shape, n_values=None, extra=b""):
    """A file with header `shape` and n_values float32 values (default: exactly prod(shape))."""
    if n_values is None:
        n_values = int(np.prod(shape))
    data = struct.pack("<4i", *shape) + np.arange(n_values, dtype="<f4").tobytes() + extra
    path.write_bytes(data)
    return path


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


# ---------------------------------------------------------------------------------------------
# round trips and layout


@given(st.tuples(*[st.integers(1, 5)] * 4), st.integers(0, 2**32 - 1))
def test_round_trip_is_bit_exact(shape, seed):
    import tempfile
    rng = np.random.default_rng(seed)
    t = rng.standard_normal(shape).astype(np.float32)
    t.ravel()[0] = np.float32(-0.0)
    if t.size > 2:
        t.ravel()[1] = np.inf
        t.ravel()[2] = np.float32(1e-45)  # subnormal
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.bin")
        save(path, t)
        back = load(path)
        assert _siblings_str(d) == ["t.bin"]  # no temp file left behind
    assert back.dtype == np.float32 and back.shape == shape
    assert back.tobytes() == t.tobytes()  # bit-exact, -0.0 and subnormals included
    assert back.flags.c_contiguous and back.flags.writeable


def _siblings_str(d):
    return sorted(os.listdir(d))


def test_byte_layout_is_little_endian_header_then_c_order_float32(tmp_path):
    t = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5) / 7
    path = tmp_path / "x.bin"
    save(path, t)
    raw = path.read_bytes()
    assert len(raw) == 16 + 4 * t.size
    assert struct.unpack("<4i", raw[:16]) == (2, 3, 4, 5)
    assert raw[16:] == t.astype("<f4").tobytes(order="C")
    # and a file written by hand (any writer of the format) loads
    hand = _write(tmp_path / "hand.bin", (1, 2, 2, 1))
    np.testing.assert_array_equal(load(hand).ravel(), [0.0, 1.0, 2.0, 3.0])


def test_save_converts_float64_and_non_contiguous(tmp_path):
    t = np.random.default_rng(0).standard_normal((3, 4, 5, 6))  # float64
    view = t.transpose(1, 0, 3, 2)  # not C-contiguous
    save(tmp_path / "v.bin", view)
    np.testing.assert_array_equal(load(tmp_path / "v.bin"), view.astype(np.float32))


def test_save_overwrites_and_accepts_str_and_pathlike(tmp_path):
    p = tmp_path / "o.bin"
    save(p, np.zeros((1, 1, 1, 2), np.float32))
    save(str(p), np.ones((1, 2, 1, 1), np.float32))
    assert load(p).shape == (1, 2, 1, 1) and load(str(p)).sum() == 2.0
    assert _siblings(p) == ["o.bin"]


def test_save_into_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save("here.bin", np.ones((1, 1, 1, 1), np.float32))
    assert load("here.bin").item() == 1.0
    assert sorted(os.listdir(".")) == ["here.bin"]


def test_saved_file_has_ordinary_permissions(tmp_path):
    # An atomic save must not leave the output readable by its owner only (mkstemp's 0600):
    # the file gets the mode a plain open(path, "wb") would give under the current umask.
    plain = tmp_path / "plain.bin"
    with open(plain, "wb"):
        pass
    save(tmp_path / "saved.bin", np.ones((1, 1, 1, 1), np.float32))
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "saved.bin") == mode(plain)


@pytest.mark.parametrize("name, bad, what", [
    ("bad.bin", np.zeros((2, 3, 4), np.float32), r"4-D tensors, got shape \(2, 3, 4\)"),
    ("bad.bin", np.zeros((1, 2, 3, 4, 5), np.float32), "4-D tensors"),
    ("bad.bin", np.zeros((1, 0, 3, 4), np.float32), r"shape \(1, 0, 3, 4\) cannot be stored"),
    ("bad.bin", np.full((1, 1, 1, 2), 1e300), r"float64 values beyond float32's range"),  # not inf
    ("bad.npy", np.full((3,), -1e39), r"float64 values beyond float32's range"),
    ("bad.npy", np.zeros(0, np.float32), r"shape \(0,\) cannot be stored"),
    ("bad.npy", np.float32(1), r"a single value \(a 0-d array\) is not a tensor"),
    ("bad.npz", np.zeros((1, 1, 1, 1), np.float32), r"save writes .bin or .npy; .* numpy.savez"),
])
def test_save_rejects_what_the_format_cannot_hold(tmp_path, name, bad, what):
    p = tmp_path / name
    with pytest.raises(QconvError, match=what) as e:
        save(p, bad)
    assert str(p) in str(e.value)
    assert not p.exists() and _siblings(p) == []


@pytest.mark.parametrize("name", ["y.npy", "Y.NPY"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (7,), (3, 1, 2)])
def test_save_to_a_npy_name_writes_npy_that_numpy_and_load_read_back(tmp_path, name, shape):
    t = np.random.default_rng(1).standard_normal(shape)  # float64: stored as float32
    save(tmp_path / name, t)
    back = np.load(tmp_path / name, allow_pickle=False)
    assert back.dtype == np.float32 and back.shape == shape
    np.testing.assert_array_equal(back, t.astype(np.float32))
    np.testing.assert_array_equal(load(tmp_path / name), back)


def test_load_refuses_a_key_that_is_not_a_str(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.ones(2), b=np.zeros(2))
    with pytest.raises(QconvError, match="key names an array in a .npz and must be a str, got int"):
        load(tmp_path / "two.npz", key=5)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, a folder that refuses new files")
def test_save_into_a_folder_that_refuses_new_files_does_not_call_it_missing():
    with pytest.raises(QconvError, match=r"cannot write: cannot create a file in '/proc'$"):
        save("/proc/qconv-out.bin", np.ones((1, 1, 1, 1), np.float32))


def test_save_into_a_missing_folder_names_the_file(tmp_path):
    p = tmp_path / "no" / "such" / "out.bin"
    with pytest.raises(QconvError) as e:
        save(p, np.ones((1, 1, 1, 1), np.float32))
    assert str(p) in str(e.value)


# ---------------------------------------------------------------------------------------------
# interrupted saves


class _Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
def test_interrupted_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch, exc):
    p = tmp_path / "out.bin"
    old = np.full((1, 2, 2, 1), 7.0, np.float32)
    save(p, old)
    before = p.read_bytes()
    real_write = os.write
    calls = []

    def half_write(fd, b):
        """Writes the header, then dies in the middle of the data."""
        calls.append(len(b))
        if len(calls) == 1:
            return real_write(fd, b)
        real_write(fd, bytes(b[: len(b) // 2]))
        raise exc("interrupted mid-write")

    monkeypatch.setattr(writing.os, "write", half_write)
    with pytest.raises(exc):
        save(p, np.zeros((4, 8, 8, 4), np.float32))
    monkeypatch.undo()
    assert len(calls) == 2
    assert p.read_bytes() == before
    assert _siblings(p) == ["out.bin"]
    np.testing.assert_array_equal(load(p), old)


def test_failed_rename_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    p = tmp_path / "out.bin"
    save(p, np.ones((1, 1, 1, 3), np.float32))
    before = p.read_bytes()

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writing.os, "replace", refuse)
    with pytest.raises(QconvError, match="no space left on device") as e:
        save(p, np.zeros((1, 1, 1, 3), np.float32))
    monkeypatch.undo()
    assert repr(str(p)) in str(e.value)
    assert p.read_bytes() == before and _siblings(p) == ["out.bin"]


def test_interrupted_fresh_save_leaves_nothing(tmp_path, monkeypatch):
    p = tmp_path / "new.bin"

    def boom(fd):
        raise _Boom("fsync failed")

    monkeypatch.setattr(writing.os, "fsync", boom)
    with pytest.raises(_Boom):
        save(p, np.ones((1, 1, 1, 1), np.float32))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# rejections: each names the file and says what is wrong


def _rejects(path, *fragments):
    with pytest.raises(QconvError) as e:
        load(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_missing_file(tmp_path):
    _rejects(tmp_path / "nope.bin", "no such file")


def test_directory(tmp_path):
    d = tmp_path / "adir.bin"
    d.mkdir()
    _rejects(d, "is a directory")


@pytest.mark.parametrize("size", [0, 1, 4, 15])
def test_shorter_than_header(tmp_path, size):
    p = tmp_path / "short.bin"
    p.write_bytes(b"\x01" * size)
    _rejects(p, f"{size} bytes", "shorter than the 16-byte shape header")


@pytest.mark.parametrize("missing", [1, 4, 23])
def test_truncated_data(tmp_path, missing):
    p = _write(tmp_path / "trunc.bin", (1, 2, 3, 4), n_values=24)
    p.write_bytes(p.read_bytes()[:-missing])
    _rejects(p, "truncated", "(1, 2, 3, 4)", "needs 112 bytes", f"has {112 - missing}")


def test_header_only(tmp_path):
    p = _write(tmp_path / "hdr.bin", (1, 1, 1, 1), n_values=0)
    _rejects(p, "truncated", "needs 20 bytes", "has 16")


@pytest.mark.parametrize("extra", [b"\x00", b"\x00" * 4, b"junk-after-the-data"])
def test_trailing_bytes(tmp_path, extra):
    p = _write(tmp_path / "trail.bin", (1, 2, 2, 1), extra=extra)
    _rejects(p, f"{len(extra)} trailing bytes", "(1, 2, 2, 1)")


@pytest.mark.parametrize("shape", [(0, 1, 1, 1), (1, 1, 1, 0), (1, -3, 2, 2), (-1, -1, -1, -1),
                                   (1, 1, 1, -(2**31))])
def test_non_positive_dims(tmp_path, shape):
    p = _write(tmp_path / "dims.bin", shape, n_values=4)
    _rejects(p, "non-positive dimension", str(shape))


@pytest.mark.parametrize("shape", [(2**31 - 1,) * 4, (65536, 65536, 65536, 65536),
                                   (1, 1, 2**31 - 1, 2**31 - 1)])
def test_absurd_dims_whose_product_overflows(tmp_path, shape):
    # prod would overflow int64 (2^124, 2^64) or claim terabytes: rejected before any allocation
    p = _write(tmp_path / "absurd.bin", shape, n_values=8)
    _rejects(p, "the header is corrupt", str(shape))


def test_large_but_plausible_header_is_reported_as_truncated(tmp_path):
    p = _write(tmp_path / "big.bin", (1, 1024, 1024, 256), n_values=8)
    _rejects(p, "truncated", str(4 * 1024 * 1024 * 256 + 16))


# ---------------------------------------------------------------------------------------------
# load_pair


def test_load_pair_ok(tmp_path):
    x = np.ones((1, 4, 4, 3), np.float32)
    w = np.ones((3, 3, 5, 3), np.float32)
    save(tmp_path / "i.bin", x)
    save(tmp_path / "k.bin", w)
    a, b = load_pair(tmp_path / "i.bin", tmp_path / "k.bin")
    assert a.shape == x.shape and b.shape == w.shape


def test_load_pair_rejects_kernel_ic_mismatch(tmp_path):
    save(tmp_path / "i.bin", np.ones((1, 4, 4, 3), np.float32))
    save(tmp_path / "k.bin", np.ones((3, 3, 3, 5), np.float32))  # OC=3 == C but IC=5: wrong
    with pytest.raises(QconvError) as e:
        load_pair(tmp_path / "i.bin", tmp_path / "k.bin")
    msg = str(e.value)
    assert str(tmp_path / "k.bin") in msg and str(tmp_path / "i.bin") in msg
    assert "IC=5" in msg and "C=3" in msg


def test_load_pair_names_the_bad_file(tmp_path):
    save(tmp_path / "i.bin", np.ones((1, 4, 4, 3), np.float32))
    (tmp_path / "k.bin").write_bytes(b"short")
    with pytest.raises(QconvError, match="k.bin': 5 bytes"):
        load_pair(tmp_path / "i.bin", tmp_path / "k.bin")
    with pytest.raises(QconvError, match="missing.bin': no such file"):
        load_pair(tmp_path / "missing.bin", tmp_path / "i.bin")


def test_public_aliases():
    assert qconv.load_tensor is load and qconv.save_tensor is save


# ---------------------------------------------------------------------------------------------
# reading hardened: size checked before allocating, streams read bounded, Ctrl-C passes through

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


def _tensor_bytes(shape, extra=b""):
    t = np.arange(int(np.prod(shape)), dtype="<f4").reshape(shape)
    return struct.pack("<4i", *shape) + t.tobytes() + extra, t


class _FifoWriter:
    """Writes `data` into the FIFO at `path` from a thread (the open blocks until a reader comes);
    on exit, a writer still waiting for its reader is released, so no test can hang on it."""

    def __init__(self, path, data):
        self.path, self.data, self.error = path, data, None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            with open(self.path, "wb") as f:
                f.write(self.data)
        except BrokenPipeError:  # the reader stopped early (a refused stream): expected
            pass
        except OSError as e:  # pragma: no cover
            self.error = e

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.thread.join(5)
        if self.thread.is_alive():  # nobody opened the FIFO for reading: release the writer
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            self.thread.join(5)
            os.close(fd)
        return False


def _fifo(tmp_path, name="pipe.bin"):
    p = tmp_path / name
    os.mkfifo(p)
    return p


def _run_py(code, timeout=60, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, timeout=timeout, **kw)


class _AllocSpy:
    """Records the sizes np.empty is asked for inside tensorfile."""

    def __init__(self, monkeypatch):
        self.sizes = []
        real = np.empty

        def spy(n, *a, **k):
            self.sizes.append(int(np.prod(n)))
            return real(n, *a, **k)

        monkeypatch.setattr(reading.np, "empty", spy)


def test_header_larger_than_file_is_refused_before_allocating(tmp_path, monkeypatch):
    p = _write(tmp_path / "liar.bin", (64, 1024, 1024, 64), n_values=4)  # claims 16 GiB
    spy = _AllocSpy(monkeypatch)
    _rejects(p, "truncated", "needs 17179869200 bytes", "has 32")
    assert spy.sizes == []


def test_sparse_6gib_file_is_refused_as_trailing_bytes_without_reading_it(tmp_path, monkeypatch):
    p = tmp_path / "sparse.bin"
    with open(p, "wb") as f:
        f.write(struct.pack("<4i", 1, 1, 1, 1) + b"\0\0\x80\x3f")
        f.truncate(6 << 30)  # a hole: nothing of it is on disk
    read = []
    real = reading._Source.readinto
    monkeypatch.setattr(reading._Source, "readinto", lambda self, v: read.append(len(v)) or real(self, v))
    t0 = time.monotonic()
    _rejects(p, f"{(6 << 30) - 20} trailing bytes", "(1, 1, 1, 1)")
    assert time.monotonic() - t0 < 2
    assert sum(read) == 16  # the header only


def test_fifo_input_is_read(tmp_path):
    data, t = _tensor_bytes((1, 3, 4, 2))
    p = _fifo(tmp_path)
    with _FifoWriter(p, data):
        back = load(p)
    assert back.tobytes() == t.tobytes() and back.shape == t.shape and back.flags.writeable


@pytest.mark.parametrize("extra, cut, what", [
    (b"\0" * 70000, 0, "trailing bytes after the 40 that shape (1, 3, 1, 2) needs (a FIFO is read up to "
                       "that size and one byte more)"),
    (b"", 5, "truncated: shape (1, 3, 1, 2) needs 40 bytes, file has 35"),
    (b"", 30, "10 bytes is shorter than the 16-byte shape header"),
])
def test_fifo_input_refused_with_one_line(tmp_path, extra, cut, what):
    data, _ = _tensor_bytes((1, 3, 1, 2), extra)
    p = _fifo(tmp_path)
    with _FifoWriter(p, data[:len(data) - cut] if cut else data):
        msg = _rejects(p, what)
    assert "\n" not in msg


def test_fifo_with_an_absurd_header_reads_16_bytes(tmp_path):
    p = _fifo(tmp_path)
    with _FifoWriter(p, struct.pack("<4i", 2**31 - 1, 2**31 - 1, 7, 7) + b"\0" * 100):
        _rejects(p, "the header is corrupt")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_endless_devices_are_refused_quickly_under_a_memory_cap(device):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    code = f"""
        import resource, time
        from qconv import tensorfile
        from qconv.errors import InputError
        vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
        t0 = time.monotonic()
        try:
            tensorfile.load({device!r})
        except InputError as e:
            print("refused", round(time.monotonic() - t0, 3), e)
    """
    p = _run_py(code, timeout=30, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("refused"), p.stdout
    assert float(p.stdout.split()[1]) < 2
    assert repr(device) in p.stdout and "Traceback" not in p.stderr


def test_ctrl_c_during_a_read_is_not_swallowed(tmp_path):
    p = _fifo(tmp_path)
    code = f"""
        import os, signal, threading, time
        from qconv import tensorfile
        path = {str(p)!r}
        def writer():  # a header that promises 1 MiB, then nothing: the reader waits
            fd = os.open(path, os.O_WRONLY)
            os.write(fd, (1).to_bytes(4, "little") * 3 + (262144).to_bytes(4, "little"))
            time.sleep(0.3)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(30)
        threading.Thread(target=writer, daemon=True).start()
        try:
            tensorfile.load(path)
        except KeyboardInterrupt:
            print("KeyboardInterrupt")
    """
    r = _run_py(code, timeout=30, text=True)
    assert r.stdout.strip() == "KeyboardInterrupt", (r.stdout, r.stderr)
    assert r.returncode == 0 and "Traceback" not in r.stderr


def test_bytes_and_pathlike_paths(tmp_path):
    t = np.ones((1, 2, 2, 1), np.float32)
    p = os.fsencode(tmp_path / "b.bin")
    save(p, t)
    np.testing.assert_array_equal(load(p), t)

    class BytesPath:
        def __fspath__(self):
            return p

    np.testing.assert_array_equal(load(BytesPath()), t)
    assert load_pair(p, p)[0].shape == t.shape


def test_undecodable_bytes_path_round_trips(tmp_path):
    p = os.fsencode(tmp_path) + b"/\xff\xfe.bin"
    save(p, np.ones((1, 1, 1, 2), np.float32))
    assert load(p).sum() == 2.0
    with pytest.raises(QconvError, match=r"\\udcff\\udcfex.bin': no such file"):
        load(p[:-4] + b"x.bin")


@pytest.mark.parametrize("bad", [3, None, 2.5, ["a.bin"]])
def test_a_non_path_is_an_input_error(bad):
    with pytest.raises(qconv.InputError, match="a path must be str, bytes or os.PathLike"):
        load(bad)
    with pytest.raises(qconv.InputError, match="a path must be str, bytes or os.PathLike"):
        save(bad, np.ones((1, 1, 1, 1), np.float32))


def test_names_are_quoted_so_every_error_is_one_line(tmp_path):
    odd = tmp_path / "two\nlines 'and quotes'.bin"
    for call in (lambda: load(odd), lambda: load_pair(odd, odd)):
        with pytest.raises(QconvError) as e:
            call()
        assert "\n" not in str(e.value) and repr(str(odd)) in str(e.value)
    odd.write_bytes(b"short")
    with pytest.raises(QconvError) as e:
        load(odd)
    assert "\n" not in str(e.value) and "5 bytes" in str(e.value)
    with pytest.raises(QconvError, match="NUL byte"):
        load(str(tmp_path / "nul\0.bin"))


# ---------------------------------------------------------------------------------------------
# .npy and .npz


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f8", "<f2", "<i2", "|u1", ">i8"])
@pytest.mark.parametrize("fortran", [False, True])
def test_npy_any_real_dtype_and_order(tmp_path, dtype, fortran):
    a = (np.arange(2 * 3 * 4 * 5) % 100).reshape(2, 3, 4, 5).astype(dtype)
    if fortran:
        a = np.asfortranarray(a)
    np.save(tmp_path / "a.npy", a)
    back = load(tmp_path / "a.npy")
    assert back.dtype == np.float32 and back.flags.c_contiguous and back.flags.writeable
    np.testing.assert_array_equal(back, a.astype(np.float32))


def test_npy_keeps_its_own_dimensions(tmp_path):
    np.save(tmp_path / "bias.npy", np.arange(7, dtype=np.float32))
    assert load(tmp_path / "bias.npy").shape == (7,)
    with pytest.raises(QconvError, match=r"holds a 1-D array of shape \(7,\); an input is"):
        load_pair(tmp_path / "bias.npy", tmp_path / "bias.npy")


def test_npy_is_told_by_content_not_suffix(tmp_path):
    np.save(tmp_path / "w.npy", np.ones((1, 1, 2, 2), np.float32))
    os.rename(tmp_path / "w.npy", tmp_path / "w.bin")
    assert load(tmp_path / "w.bin").shape == (1, 1, 2, 2)
    (tmp_path / "x.npy").write_bytes(struct.pack("<4i", 1, 1, 1, 1) + np.float32(1).tobytes())  # a .bin named .npy
    _rejects(tmp_path / "x.npy", "not a .npy file")


@pytest.mark.parametrize("array, what", [
    (np.ones(3, np.complex64), "complex values"),
    (np.array(1.5), "a single float64 value (a 0-d array)"),
    (np.zeros((2, 0, 3), np.float32), r"an empty array of shape (2, 0, 3)"),
    (np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")]), "structured or object"),
    (np.array(["a", "b"]), "<U1 values"),
    (np.ones(2, bool), "bool values"),
    (np.array([1e300, 1.0]), "float64 values beyond float32's range"),
])
def test_npy_refusals(tmp_path, array, what):
    np.save(tmp_path / "bad.npy", array)
    _rejects(tmp_path / "bad.npy", what)


def test_npy_with_pickled_objects_is_refused_without_unpickling(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    _rejects(tmp_path / "obj.npy", "structured or object")


@pytest.mark.parametrize("cut, extra, what", [
    (4, b"", "truncated: shape (2, 3) needs 152 bytes, file has 148"),
    (0, b"xx", "2 trailing bytes after the 152"),
    (130, b"", "truncated .npy header"),
])
def test_npy_truncated_or_trailing(tmp_path, cut, extra, what):
    np.save(tmp_path / "a.npy", np.ones((2, 3), np.float32))
    raw = (tmp_path / "a.npy").read_bytes()
    assert len(raw) == 152
    (tmp_path / "a.npy").write_bytes(raw[:len(raw) - cut] + extra)
    _rejects(tmp_path / "a.npy", what)


def test_npy_header_that_lies_is_refused_before_allocating(tmp_path, monkeypatch):
    np.save(tmp_path / "a.npy", np.ones((2, 3), np.float32))
    raw = (tmp_path / "a.npy").read_bytes()
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4000000000,), }".ljust(117) + "\n"
    lie = raw[:8] + len(header).to_bytes(2, "little") + header.encode() + raw[128:]  # 16 GB claimed
    (tmp_path / "a.npy").write_bytes(lie)
    spy = _AllocSpy(monkeypatch)
    _rejects(tmp_path / "a.npy", "truncated: shape (4000000000,) needs 16000000128 bytes")
    assert spy.sizes == []


def test_npy_from_a_fifo(tmp_path):
    import io
    buf = io.BytesIO()
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.save(buf, a)
    p = _fifo(tmp_path, "a.npy")
    with _FifoWriter(p, buf.getvalue()):
        np.testing.assert_array_equal(load(p), a.astype(np.float32))


def test_npz_single_named_and_compressed(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)
    np.savez(tmp_path / "one.npz", x)
    np.testing.assert_array_equal(load(tmp_path / "one.npz"), x)
    np.savez_compressed(tmp_path / "two.npz", input=x, kernel=x[:, :, :, :1] * 2)
    np.testing.assert_array_equal(load(tmp_path / "two.npz", key="kernel"), x[:, :, :, :1] * 2)
    np.testing.assert_array_equal(load(f"{tmp_path / 'two.npz'}:input"), x)
    np.testing.assert_array_equal(load(tmp_path / "two.npz", key="input.npy"), x)
    _rejects(tmp_path / "two.npz", "holds 2 arrays (input, kernel): name one, as FILE.npz:NAME or key=NAME")
    with pytest.raises(QconvError, match="has no array 'bias' .it holds input, kernel."):
        load(tmp_path / "two.npz", key="bias")
    with pytest.raises(QconvError, match="is a .bin tensor; key='input'"):
        save(tmp_path / "x.bin", x)
        load(tmp_path / "x.bin", key="input")


def test_npz_corrupt_or_odd_archives(tmp_path):
    x = np.ones((1, 2, 2, 1), np.float32)
    np.savez(tmp_path / "a.npz", x=x)
    raw = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    _rejects(tmp_path / "cut.npz", "not a readable .npz archive")
    flipped = bytearray(raw)
    flipped[raw.index(b"\x93NUMPY") + 140] ^= 0xFF  # a data byte: the CRC no longer matches
    (tmp_path / "crc.npz").write_bytes(bytes(flipped))
    _rejects(tmp_path / "crc.npz", "not a readable .npz archive")
    import zipfile
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    (tmp_path / "empty.npz").write_bytes(b"PK\x03\x04" + (tmp_path / "empty.npz").read_bytes())
    _rejects(tmp_path / "empty.npz")
    with zipfile.ZipFile(tmp_path / "notes.npz", "w") as z:
        z.writestr("x.npy", b"not an npy")
    _rejects(tmp_path / "notes.npz", "truncated .npy header")
    p = _fifo(tmp_path, "f.npz")
    with _FifoWriter(p, raw):
        _rejects(p, "a .npz archive is read by seeking; a FIFO cannot be")


# ---------------------------------------------------------------------------------------------
# saving: modes, symlinks, devices, stdout, temp files, signals, disk errors


def test_save_keeps_an_existing_files_mode(tmp_path):
    p = tmp_path / "m.bin"
    save(p, np.ones((1, 1, 1, 1), np.float32))
    for mode in (0o640, 0o604, 0o755):
        os.chmod(p, mode)
        save(p, np.zeros((1, 1, 1, 2), np.float32))
        assert stat.S_IMODE(os.stat(p).st_mode) == mode
        assert load(p).shape == (1, 1, 1, 2)


def test_save_refuses_a_read_only_file_as_open_would(tmp_path):
    p = tmp_path / "ro.bin"
    save(p, np.ones((1, 1, 1, 1), np.float32))
    os.chmod(p, 0o444)
    if os.geteuid() == 0:  # root may write it: replaced, and still read-only
        save(p, np.zeros((1, 1, 1, 1), np.float32))
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o444 and load(p).item() == 0.0
    else:
        with pytest.raises(qconv.InputError, match="ro.bin': cannot write: permission denied"):
            save(p, np.zeros((1, 1, 1, 1), np.float32))


def test_save_writes_through_a_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "t.bin"
    save(target, np.ones((1, 1, 1, 1), np.float32))
    os.chmod(target, 0o600)
    link = tmp_path / "link.bin"
    link.symlink_to(os.path.join("real", "t.bin"))  # relative, as most links are
    save(link, np.full((1, 1, 1, 3), 5.0, np.float32))
    assert link.is_symlink() and os.readlink(link) == os.path.join("real", "t.bin")
    assert load(target).shape == (1, 1, 1, 3) and stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path / "real")) == ["t.bin"] and sorted(os.listdir(tmp_path)) == ["link.bin", "real"]
    dangling = tmp_path / "dangling.bin"
    dangling.symlink_to(tmp_path / "real" / "new.bin")
    save(dangling, np.ones((1, 1, 1, 1), np.float32))  # creates the target, as `>` would
    assert dangling.is_symlink() and load(tmp_path / "real" / "new.bin").item() == 1.0
    loop = tmp_path / "loop.bin"
    loop.symlink_to(loop)
    with pytest.raises(qconv.InputError, match="loop.bin': cannot write"):
        save(loop, np.ones((1, 1, 1, 1), np.float32))


def test_save_to_a_fifo_writes_in_place(tmp_path):
    p = _fifo(tmp_path, "out.fifo")
    t = np.arange(2 * 64 * 64 * 8, dtype=np.float32).reshape(2, 64, 64, 8)  # 256 KiB > a pipe's buffer
    got = []
    reader = threading.Thread(target=lambda: got.append(open(p, "rb").read()), daemon=True)
    reader.start()
    save(p, t)
    reader.join(10)
    assert got and got[0] == struct.pack("<4i", *t.shape) + t.tobytes()
    assert stat.S_ISFIFO(os.lstat(p).st_mode)  # still a FIFO, not replaced by a regular file
    assert sorted(os.listdir(tmp_path)) == ["out.fifo"]


def test_save_to_a_fifo_whose_reader_leaves(tmp_path):
    p = _fifo(tmp_path, "out.fifo")
    t = np.zeros((1, 256, 256, 8), np.float32)  # 2 MiB: the reader leaves after 16 bytes
    reader = threading.Thread(target=lambda: open(p, "rb").read(16), daemon=True)
    reader.start()
    with pytest.raises(QconvError, match="out.fifo': cannot write: the reader closed the pipe"):
        save(p, t)
    reader.join(10)
    assert stat.S_ISFIFO(os.lstat(p).st_mode)


def test_save_refuses_directories(tmp_path):
    with pytest.raises(qconv.InputError, match="is a directory"):
        save(tmp_path, np.ones((1, 1, 1, 1), np.float32))


def test_save_dash_is_standard_output(tmp_path):
    code = """
        import numpy as np
        from qconv import tensorfile
        print("text first", flush=False)
        tensorfile.save("-", np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3))
    """
    r = _run_py(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"text first\n")
    back = r.stdout[len(b"text first\n"):]
    assert back == struct.pack("<4i", 1, 1, 2, 3) + np.arange(6, dtype="<f4").tobytes()


def test_save_dash_refuses_a_terminal():
    import pty
    master, slave = pty.openpty()
    try:
        r = _run_py("""
            import numpy as np
            from qconv import tensorfile
            from qconv.errors import InputError
            try:
                tensorfile.save("-", np.ones((1, 1, 1, 1)))
            except InputError as e:
                import sys
                print(e, file=sys.stderr)
        """, stdout=slave, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(slave)
        os.close(master)
    assert r.returncode == 0
    assert "'-' (standard output): refusing to write a binary tensor to a terminal" in r.stderr


def test_temp_file_is_named_for_its_target_and_process(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(writing.os, "replace", lambda a, b: seen.append(a) or real(a, b))
    save(tmp_path / "out.bin", np.ones((1, 1, 1, 1), np.float32))
    assert len(seen) == 1
    assert re.fullmatch(rf"\.out\.bin\.qconv-tmp-{os.getpid()}-[0-9a-f]{{8}}", os.path.basename(seen[0]))


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    dead = _dead_pid()
    old = time.time() - 3600
    names = {
        "stale": f".out.bin.qconv-tmp-{dead}-deadbeef",          # dead, old: removed
        "fresh": f".out.bin.qconv-tmp-{dead}-0badf00d",          # dead, but just written: kept
        "alive": f".out.bin.qconv-tmp-{os.getppid()}-12345678",  # its process runs: kept
        "other": f".other.bin.qconv-tmp-{dead}-deadbeef",        # another target's: kept by a save of out.bin
        "plain": ".out.bin.qconv-tmp-notapid",                     # not ours
    }
    for key, n in names.items():
        (tmp_path / n).write_bytes(b"x" * 10)
        if key != "fresh":
            os.utime(tmp_path / n, (old, old))
    assert tensorfile.stale_temps(tmp_path) == sorted(str(tmp_path / names[k]) for k in ("stale", "other"))
    save(tmp_path / "out.bin", np.ones((1, 1, 1, 1), np.float32))
    left = set(os.listdir(tmp_path))
    assert names["stale"] not in left
    assert {names[k] for k in ("fresh", "alive", "other", "plain")} <= left


_SIGTERM_CHILD = """
    import os, signal, sys, time
    import numpy as np
    from qconv.tensorfile import _write as tensorfile
    {setup}
    real_write = os.write
    def slow_write(fd, b):  # announce the first data chunk, then crawl so the signal lands mid-write
        n = real_write(fd, b)
        if len(b) > 16:
            print("writing", flush=True)
            time.sleep(0.05)
        return n
    tensorfile.os.write = slow_write
    tensorfile._CHUNK = 1 << 16
    before = signal.getsignal(signal.SIGTERM)
    tensorfile.save({out!r}, np.zeros((1, 64, 64, 64), np.float32))
    print("finished", signal.getsignal(signal.SIGTERM) is before, flush=True)
"""


@pytest.mark.parametrize("setup, expect_rc", [
    ("", -signal.SIGTERM),  # default disposition: cleaned up, then killed by the signal
    ("signal.signal(signal.SIGTERM, lambda s, f: sys.exit(7))", 7),  # the program's handler runs after
])
def test_sigterm_mid_write_removes_the_temp_file(tmp_path, setup, expect_rc):
    out = tmp_path / "big.bin"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_SIGTERM_CHILD.format(setup=setup, out=str(out)))],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert any(".qconv-tmp-" in n for n in os.listdir(tmp_path))  # mid-write: the temp exists
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
    finally:
        proc.kill()
    stderr = proc.stderr.read()
    assert rc == expect_rc, stderr
    assert "Traceback" not in stderr
    assert os.listdir(tmp_path) == []


def test_signal_handlers_are_restored_and_only_installed_in_the_main_thread(tmp_path):
    before = {s: signal.getsignal(s) for s in writing._SIGNALS}
    save(tmp_path / "a.bin", np.ones((1, 1, 1, 1), np.float32))
    assert {s: signal.getsignal(s) for s in writing._SIGNALS} == before
    errors = []

    def in_thread():
        try:
            save(tmp_path / "b.bin", np.ones((1, 1, 1, 1), np.float32))
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    t = threading.Thread(target=in_thread)
    t.start()
    t.join()
    assert errors == [] and load(tmp_path / "b.bin").item() == 1.0


@pytest.mark.parametrize("err, cls, what", [
    (errno.ENOSPC, QconvError, "cannot write: no space left on device"),
    (errno.EIO, QconvError, "cannot write: input/output error"),
    (errno.EDQUOT, QconvError, "cannot write: disk quota exceeded"),
])
def test_disk_errors_are_qconv_errors_naming_the_file(tmp_path, monkeypatch, err, cls, what):
    p = tmp_path / "full.bin"
    save(p, np.ones((1, 1, 1, 1), np.float32))
    before = p.read_bytes()

    def fail(fd, b):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(writing.os, "write", fail)
    with pytest.raises(cls) as e:
        save(p, np.zeros((1, 2, 2, 1), np.float32))
    monkeypatch.undo()
    assert not isinstance(e.value, OSError)
    assert str(e.value) == f"{str(p)!r}: {what}"
    assert p.read_bytes() == before and _siblings(p) == ["full.bin"]


def test_unwritable_folder_is_an_input_error(tmp_path, monkeypatch):
    def deny(folder, base):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(writing, "_create_temp", deny)
    with pytest.raises(qconv.InputError, match=r"x.bin': cannot write: permission denied"):
        save(tmp_path / "x.bin", np.ones((1, 1, 1, 1), np.float32))


@pytest.mark.parametrize("bad, what", [
    (np.ones((1, 1, 1, 2), np.complex64), "cannot store complex values"),
    (np.ones((1, 1, 1, 2), bool), "cannot store bool values"),
    (np.array([[[["a"]]]]), "cannot store <U1 values"),
    (np.array([[[[{}]]]], dtype=object), "cannot store object values"),
])
def test_save_refuses_non_real_values(tmp_path, bad, what):
    p = tmp_path / "c.bin"
    with pytest.raises(qconv.InputError, match=what):
        save(p, bad)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# the malformed-file fuzz: any bytes load into the shape they declare, or raise QconvError


_dims = st.one_of(st.integers(-3, 6), st.sampled_from([0, 2**31 - 1, -(2**31), 65536, 1 << 20]))


@settings(max_examples=150, deadline=None)
@given(header=st.one_of(st.tuples(_dims, _dims, _dims, _dims).map(lambda d: struct.pack("<4i", *d)),
                        st.tuples(*[st.integers(1, 4)] * 4).map(lambda d: struct.pack("<4i", *d)),
                        st.binary(max_size=24)),
       body=st.one_of(st.integers(0, 900), st.just(("declared", 0)),
                      st.integers(-5, 5).map(lambda k: ("declared", k))),
       suffix=st.sampled_from([".bin", ".npy", ".npz", ""]))
def test_fuzz_bin_headers_and_sizes(header, body, suffix):
    if isinstance(body, tuple):  # the size the header declares, give or take a few bytes
        dims = struct.unpack("<4i", header[:16]) if len(header) >= 16 else (0,)
        n = int(np.prod(dims)) if all(0 < d <= 64 for d in dims) else 0
        body = max(0, 4 * n - (len(header) - 16) + body[1])
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f" + suffix)
        with open(path, "wb") as f:
            f.write(header + bytes(range(256)) * (body // 256) + bytes(body % 256))
        try:
            t = load(path)
        except QconvError as e:
            assert "\n" not in str(e) and repr(path) in str(e)
            return
    assert t.dtype == np.float32 and t.flags.c_contiguous
    shape = struct.unpack("<4i", header[:16])
    assert t.shape == shape and 16 + 4 * t.size == len(header) + body


def _npy_bytes(a):
    import io
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


_NPY_SEEDS = [_npy_bytes(np.arange(6, dtype="<f4").reshape(2, 3)),
              _npy_bytes(np.arange(4, dtype=">i2")),
              _npy_bytes(np.asfortranarray(np.ones((2, 2), "<f8")))]


@settings(max_examples=150, deadline=None)
@given(seed=st.sampled_from(_NPY_SEEDS), cut=st.integers(0, 200),
       flips=st.lists(st.tuples(st.integers(0, 170), st.integers(0, 255)), max_size=4),
       extra=st.binary(max_size=8))
def test_fuzz_npy_headers(seed, cut, flips, extra):
    raw = bytearray(seed[: max(0, len(seed) - cut)] if cut < 100 else seed)
    for i, v in flips:
        if i < len(raw):
            raw[i] = v
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f.npy")
        with open(path, "wb") as f:
            f.write(bytes(raw) + extra)
        try:
            t = load(path)
        except QconvError as e:
            assert "\n" not in str(e)
            return
    assert isinstance(t, np.ndarray) and t.dtype == np.float32 and t.flags.c_contiguous and t.size > 0


def test_load_dash_is_standard_input():
    data, t = _tensor_bytes((1, 2, 2, 3))
    r = _run_py("""
        import sys
        from qconv import tensorfile
        print(tensorfile.load("-").sum())
    """, input=data)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) == t.sum()
    r = _run_py("""
        from qconv import tensorfile
        from qconv.errors import InputError
        try:
            tensorfile.load("-")
        except InputError as e:
            print(e)
    """, input=data + b"x")
    assert r.stdout.decode().strip() == ("'-' (standard input): trailing bytes after the 64 that shape (1, 2, 2, 3) "
                                         "needs (a stream is read up to that size and one byte more)")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("stdout_kind", ["pipe", "file"])
def test_save_to_an_fd_path_writes_in_place(tmp_path, stdout_kind):
    # /proc/self/fd/1 is what /dev/stdout links to (the tests never write to /dev itself)
    code = """
        import numpy as np
        from qconv import tensorfile
        tensorfile.save("/proc/self/fd/1", np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3))
    """
    expected = struct.pack("<4i", 1, 1, 2, 3) + np.arange(6, dtype="<f4").tobytes()
    if stdout_kind == "pipe":
        r = _run_py(code)
        assert r.returncode == 0, r.stderr
        assert r.stdout == expected
    else:
        out = tmp_path / "redirected.bin"
        with open(out, "wb") as f:
            inode = os.fstat(f.fileno()).st_ino
            r = _run_py(code, stdout=f)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == expected and os.stat(out).st_ino == inode  # the same file, written in place
        assert os.listdir(tmp_path) == ["redirected.bin"]
