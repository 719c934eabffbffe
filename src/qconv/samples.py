"""The sample layers shipped in the package (the assignment's ResNet-50 tensors; see data/PROVENANCE.md)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def sample_layers() -> list[tuple[str, Path, Path]]:
    """(name, input_path, kernel_path) for every shipped layer that has both tensors."""
    out = []
    for folder in sorted(DATA.glob("exam*")):
        x, w = folder / "input_tensor.bin", folder / "kernel_tensor.bin"
        if x.exists() and w.exists():
            out.append((f"resnet50-{folder.name}", x, w))
    return out
