"""Independent float64 forward passes for tests/test_nets.py.

Written from the checkpoints' own definitions, not from qconv.nets: PyTorch layout (NCHW, OIHW
kernels), batch norm applied as batch norm (not folded), TensorFlow 'SAME' padding computed
here, convolution as im2col + one float64 matmul per group. EfficientNet-Lite0's block list is
efficientnet_lite_pytorch's 'r1_k3_s11_e1_i32_o16', 'r2_k3_s22_e6_i16_o24', ... written out.
"""

from __future__ import annotations

import math

import numpy as np

# (repeats, kernel, stride, expand ratio, in, out): efficientnet_lite_pytorch's lite block strings
LITE0_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]


def tf_same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def conv2d_nchw(x: np.ndarray, w: np.ndarray, stride: int = 1, groups: int = 1,
                pads: tuple[int, int, int, int] | None = None, bias: np.ndarray | None = None) -> np.ndarray:
    """x (N, C, H, W), w (O, C/groups, KH, KW); pads (top, bottom, left, right), default TF SAME."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n, c, h, wd = x.shape
    o, icg, kh, kw = w.shape
    if pads is None:
        pads = tf_same_pads(h, kh, stride) + tf_same_pads(wd, kw, stride)
    t, b, l, r = pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))
    ho, wo = (h + t + b - kh) // stride + 1, (wd + l + r - kw) // stride + 1
    # im2col: (N, C, KH, KW, Ho, Wo)
    cols = np.empty((n, c, kh, kw, ho, wo))
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
    ocg = o // groups
    y = np.empty((n, o, ho, wo))
    for g in range(groups):
        patch = cols[:, g * icg:(g + 1) * icg].reshape(n, icg * kh * kw, ho * wo)
        y[:, g * ocg:(g + 1) * ocg] = (w[g * ocg:(g + 1) * ocg].reshape(ocg, -1) @ patch).reshape(n, ocg, ho, wo)
    if bias is not None:
        y += np.asarray(bias, np.float64)[None, :, None, None]
    return y


def batchnorm(x: np.ndarray, sd: dict, prefix: str, eps: float = 1e-3) -> np.ndarray:
    g, b, m, v = (sd[f"{prefix}.{k}"].astype(np.float64)[None, :, None, None]
                  for k in ("weight", "bias", "running_mean", "running_var"))
    return (x - m) / np.sqrt(v + eps) * g + b


def relu6(x: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(x, 0.0), 6.0)


def efficientnet_lite0(sd: dict, x_nhwc: np.ndarray) -> np.ndarray:
    """Logits (float64) of preprocessed NHWC images."""
    x = np.asarray(x_nhwc, np.float64).transpose(0, 3, 1, 2)
    x = relu6(batchnorm(conv2d_nchw(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    idx = 0
    for repeats, _k, stride, expand, cin, cout in LITE0_STAGES:
        for r in range(repeats):
            p = f"_blocks.{idx}."
            s, inp = (stride if r == 0 else 1), x
            if expand != 1:
                x = relu6(batchnorm(conv2d_nchw(x, sd[p + "_expand_conv.weight"]), sd, p + "_bn0"))
            x = relu6(batchnorm(conv2d_nchw(x, sd[p + "_depthwise_conv.weight"], s, groups=x.shape[1]),
                                sd, p + "_bn1"))
            x = batchnorm(conv2d_nchw(x, sd[p + "_project_conv.weight"]), sd, p + "_bn2")
            if s == 1 and (cin if r == 0 else cout) == cout:
                x = x + inp
            idx += 1
    x = relu6(batchnorm(conv2d_nchw(x, sd["_conv_head.weight"]), sd, "_bn1"))
    return x.mean(axis=(2, 3)) @ sd["_fc.weight"].astype(np.float64).T + sd["_fc.bias"]


def mnist_cnn(sd: dict, x_nhwc: np.ndarray) -> np.ndarray:
    """digit_recognizer's CNN: three (conv 3x3 pad 1, ReLU, 2x2 max pool), flatten NCHW, two Linear."""
    x = np.asarray(x_nhwc, np.float64).transpose(0, 3, 1, 2)
    for i in (0, 3, 6):
        x = conv2d_nchw(x, sd[f"conv_layers.{i}.weight"], pads=(1, 1, 1, 1), bias=sd[f"conv_layers.{i}.bias"])
        x = np.maximum(x, 0.0)
        n, c, h, w = x.shape
        x = x[:, :, :h // 2 * 2, :w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
    x = x.reshape(len(x), -1)
    x = np.maximum(x @ sd["fc_layers.0.weight"].T.astype(np.float64) + sd["fc_layers.0.bias"], 0.0)
    return x @ sd["fc_layers.2.weight"].T.astype(np.float64) + sd["fc_layers.2.bias"]


def layer_conv(layer, x_nhwc: np.ndarray) -> np.ndarray:
    """One qconv.nets ConvLayer in float64 through conv2d_nchw (NHWC in and out)."""
    w = layer.weight.transpose(2, 3, 0, 1)  # (KH, KW, OC, IC/g) -> (OC, IC/g, KH, KW)
    pad = layer.padding
    pads = None if pad == "same" else (pad, pad, pad, pad)
    y = conv2d_nchw(x_nhwc.transpose(0, 3, 1, 2), w, layer.stride, layer.groups, pads, layer.bias)
    return y.transpose(0, 2, 3, 1)


def emulated_prepare(layer, precision, backend, scale, rounding, options):
    """A Runner ``prepare`` without qconv: float64 convolution, and for integer precisions the
    contract's quantize (round half to even, clamp to +-Qmax) of both tensors before it and its
    dequantize after (per-channel kernel scales allowed). Only numeric scales, or maxabs."""
    if not precision.is_integer:
        return lambda x: layer_conv(layer, x).astype(np.float32)
    qmax = precision.qmax
    k = layer.k
    q = max(1, min(qmax, math.isqrt((2**31 - 1) // k)))

    def fn(x):
        if isinstance(scale, str):
            s_x = np.float32(q / max(float(np.max(np.abs(x))), 1e-30))
            m = np.max(np.abs(layer.weight), axis=None if scale == "maxabs" else (0, 1, 3))
            s_w = (q / np.where(m > 0, m, 1)).astype(np.float32)
        elif isinstance(scale, tuple):
            s_x, s_w = np.float32(scale[0]), np.asarray(scale[1], np.float32)
        else:
            s_x = s_w = np.float32(scale)
        qx = np.clip(np.rint(x.astype(np.float32) * s_x), -qmax, qmax)
        qw = np.clip(np.rint(layer.weight * s_w.reshape(1, 1, -1, 1) if np.ndim(s_w) else layer.weight * s_w),
                     -qmax, qmax)
        acc = layer_conv(type(layer)(layer.name, qw, None, layer.stride, layer.padding, layer.groups), qx)
        inv = (1.0 / (np.float64(s_x) * np.asarray(s_w, np.float64))).astype(np.float32)
        y = acc.astype(np.int64).astype(np.int32).astype(np.float32) * inv
        return y if layer.bias is None else y + layer.bias
    return fn
