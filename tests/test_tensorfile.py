"""The assignment's .bin format: round trips, the exact byte layout, atomic saves, and every
malformed file rejected with a message that names the file and the problem."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qconv
from qconv import tensorfile
from qconv.errors import QconvError
from qconv.tensorfile import load, load_pair, save


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


@pytest.mark.parametrize("bad, what", [
    (np.zeros((2, 3, 4), np.float32), r"4-D tensors, got shape \(2, 3, 4\)"),
    (np.zeros((1, 2, 3, 4, 5), np.float32), "4-D tensors"),
    (np.zeros((1, 0, 3, 4), np.float32), r"shape \(1, 0, 3, 4\) cannot be stored"),
])
def test_save_rejects_what_the_format_cannot_hold(tmp_path, bad, what):
    p = tmp_path / "bad.bin"
    with pytest.raises(QconvError, match=what) as e:
        save(p, bad)
    assert str(p) in str(e.value)
    assert not p.exists() and _siblings(p) == []


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
    real_fdopen = os.fdopen

    class HalfWriter:
        """Writes the header, then dies in the middle of the data."""

        def __init__(self, f):
            self.f, self.calls = f, 0

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()
            return False

        def write(self, b):
            self.calls += 1
            if self.calls == 1:
                return self.f.write(b)
            self.f.write(b[: len(b) // 2])
            self.f.flush()
            raise exc("interrupted mid-write")

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(tensorfile.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(exc):
        save(p, np.zeros((4, 8, 8, 4), np.float32))
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert _siblings(p) == ["out.bin"]
    np.testing.assert_array_equal(load(p), old)


def test_failed_rename_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    p = tmp_path / "out.bin"
    save(p, np.ones((1, 1, 1, 3), np.float32))
    before = p.read_bytes()

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tensorfile.os, "replace", refuse)
    with pytest.raises(OSError):
        save(p, np.zeros((1, 1, 1, 3), np.float32))
    monkeypatch.undo()
    assert p.read_bytes() == before and _siblings(p) == ["out.bin"]


def test_interrupted_fresh_save_leaves_nothing(tmp_path, monkeypatch):
    p = tmp_path / "new.bin"

    def boom(fd):
        raise _Boom("fsync failed")

    monkeypatch.setattr(tensorfile.os, "fsync", boom)
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
    with pytest.raises(QconvError, match="k.bin: 5 bytes"):
        load_pair(tmp_path / "i.bin", tmp_path / "k.bin")
    with pytest.raises(QconvError, match="missing.bin: no such file"):
        load_pair(tmp_path / "missing.bin", tmp_path / "i.bin")


def test_public_aliases():
    assert qconv.load_tensor is load and qconv.save_tensor is save
