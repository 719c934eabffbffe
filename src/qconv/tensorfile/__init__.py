"""Tensor files: the assignment's .bin format (four little-endian int32, the shape, then the
values as little-endian float32 in C order), and numpy's .npy and .npz for reading.

Reading (`load`, `load_pair`: _read.py) never trusts a header; writing (`save`: _write.py) never
leaves half a tensor behind. Each module's docstring says how.

Every problem raises InputError (a QconvError) -- or QconvError for a failing disk (ENOSPC, EIO) --
with one line that names the file, quoted with repr() so no name can break the line.
"""

from ._common import PathArg
from ._read import HEADER_BYTES, load, load_pair
from ._write import save, stale_temps

__all__ = ["HEADER_BYTES", "PathArg", "load", "load_pair", "save", "stale_temps"]
