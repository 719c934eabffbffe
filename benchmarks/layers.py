"""The layers the benchmarks run: the exam layers shipped in the package (exam1, exam2), then the
real layers under <shared>/data/real, named by their folder there ("model/layer"), with stride,
padding and groups from their meta.json and their bias. <shared> defaults to $QCONV_SHARED, else
the repository's sibling folder "shared"; without its data/real there are no real layers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qconv.samples import DATA
from qconv.tensorfile import load

SHARED = Path(os.environ.get("QCONV_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))


@dataclass
class Layer:
    name: str
    directory: Path | None
    x: np.ndarray
    w: np.ndarray
    bias: np.ndarray | None = None
    stride: int | tuple = 1
    padding: str | tuple = "same"
    groups: int = 1

    def kwargs(self) -> dict:
        """The layer's options for qconv.prepare / qconv.conv2d."""
        return {"stride": self.stride, "padding": self.padding, "groups": self.groups, "bias": self.bias}


def _load(name: str, d: Path, **options) -> Layer:
    return Layer(name, d, load(d / "input_tensor.bin"), load(d / "kernel_tensor.bin"), **options)


def exam_layers() -> list[Layer]:
    return [_load(d.name, d) for d in sorted(DATA.glob("exam*")) if (d / "kernel_tensor.bin").exists()]


def real_layers(shared: Path | str | None = None) -> list[Layer]:
    real = Path(shared or SHARED) / "data" / "real"
    out = []
    for p in sorted(real.glob("*/*/kernel_tensor.bin")) if real.is_dir() else []:
        d = p.parent
        meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").exists() else {}
        options = {k: tuple(v) if isinstance(v, list) else v.lower() if isinstance(v, str) else v
                   for k, v in meta.items() if k in ("stride", "padding", "groups")}
        b = d / "bias_tensor.bin"
        out.append(_load(str(d.relative_to(real)), d, bias=load(b).reshape(-1) if b.exists() else None, **options))
    return out


def load_layers(shared: Path | str | None = None) -> list[Layer]:
    return exam_layers() + real_layers(shared)
