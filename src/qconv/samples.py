"""The sample layers shipped in the package (the assignment's ResNet-50 tensors; see data/PROVENANCE.md).

After `pip install` the files live inside the installed package, not at the repository's
src/qconv/data/..., so the command line also takes them by name, wherever it takes a tensor path:

    exam1/input   exam1/kernel        a tensor: data/exam1/input_tensor.bin, kernel_tensor.bin
    exam1                             a layer (for `qconv study`): the folder holding both

A path that exists always wins over a sample of the same name. `qconv samples` lists them.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
_ROLES = ("input", "kernel")


def sample_layers() -> list[tuple[str, Path, Path]]:
    """(name, input_path, kernel_path) for every shipped layer that has both tensors."""
    out = []
    for folder in sorted(DATA.glob("exam*")):
        x, w = folder / "input_tensor.bin", folder / "kernel_tensor.bin"
        if x.exists() and w.exists():
            out.append((f"resnet50-{folder.name}", x, w))
    return out


def sample_tensors() -> dict[str, Path]:
    """{"exam1/input": path, "exam1/kernel": path, ...} for every shipped tensor file."""
    out = {}
    for folder in sorted(p for p in DATA.iterdir() if p.is_dir()) if DATA.is_dir() else []:
        for role in _ROLES:
            f = folder / f"{role}_tensor.bin"
            if f.is_file():
                out[f"{folder.name}/{role}"] = f
    return out


def sample_layer_dirs() -> dict[str, Path]:
    """{"exam1": folder, ...} for every shipped layer that has both an input and a kernel."""
    tensors = sample_tensors()
    return {n.split("/")[0]: tensors[n].parent for n in tensors
            if n.endswith("/input") and n[:-len("input")] + "kernel" in tensors}


def resolve_tensor(arg: str) -> str:
    """The installed path of the sample tensor `arg` names ("exam1/input"), if no file `arg`
    exists; otherwise `arg` unchanged (a missing file is then reported by the loader)."""
    if os.path.lexists(arg):
        return arg
    name = arg.strip("/")
    for alias in (name, name.removesuffix("_tensor.bin")):
        path = sample_tensors().get(alias)
        if path is not None:
            return str(path)
    return arg


def resolve_layer(arg: str) -> str:
    """A `qconv study` LAYER: a sample layer's folder for "exam1"; "INPUT:KERNEL" with each side
    resolved as a tensor; anything else unchanged."""
    if os.path.lexists(arg):
        return arg
    folder = sample_layer_dirs().get(arg.strip("/"))
    if folder is not None:
        return str(folder)
    if ":" in arg:
        a, b = arg.rsplit(":", 1)
        return f"{resolve_tensor(a)}:{resolve_tensor(b)}"
    return arg


def shape_of(path: Path) -> tuple[int, ...] | None:
    """The shape in a .bin header, without reading the values (None if unreadable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    return struct.unpack("<4i", head) if len(head) == 16 else None
