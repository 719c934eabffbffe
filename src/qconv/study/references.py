"""Reference points: a production library on the same layers, in the same run, where installed.

qconv's own backends stay hand-written; these points show where a tuned library lands:
- CPU: PyTorch FP32 (oneDNN) and PyTorch's quantized INT8 engine (per-tensor asymmetric uint8
  activations, per-channel symmetric int8 weights, MinMax ranges of this very input: PyTorch's
  default post-training scheme, Krishnamoorthi 2018);
- GPU: cuDNN FP16 and BF16 through PyTorch (inputs on the device, CUDA events around the call).

Each point is the whole call a user makes (INT8: quantize the input, convolve, dequantize),
the median of `repeat` calls after a warm-up, and its NRMSE against the float64 reference.
Without torch the study records why there are none.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from .. import metrics
from .config import Layer, stats


def _point(layer: Layer, name: str, precision: str, device: str, times: list[float], y: np.ndarray,
           ref: np.ndarray, flops: int, note: str) -> dict[str, Any]:
    err = metrics.nrmse(y, ref)
    st = stats(times)
    return {"layer": layer.name, "name": name, "precision": precision, "device": device, "call_s": st,
            "gops": flops / st["median"] / 1e9 if st["median"] > 0 else None, "nrmse": err,
            "effective_bits": metrics.effective_bits(err), "note": note}


def _time(fn: Any, repeat: int, sync: Any = None) -> tuple[list[float], Any]:
    out = fn()
    times = []
    for _ in range(repeat):
        if sync:
            sync()
        t0 = time.perf_counter()
        out = fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return times, out


def available() -> tuple[bool, str]:
    try:
        import torch  # type: ignore[import-not-found]
    except ImportError:
        return False, "PyTorch is not installed (pip install torch adds its FP32 and INT8 reference points)"
    return True, f"PyTorch {torch.__version__}"


def measure(layer: Layer, x: np.ndarray, ref: np.ndarray, tables: Any, repeat: int) -> list[dict[str, Any]]:
    """The reference points of one layer (empty without torch, or for an even kernel, whose 'same'
    padding PyTorch's quantized conv cannot express)."""
    ok, _ = available()
    kh, kw, oc, ic = layer.w.shape
    if not ok or kh % 2 == 0 or kw % 2 == 0:
        return []
    import torch  # type: ignore[import-not-found]
    flops = 2 * x.shape[0] * x.shape[1] * x.shape[2] * oc * kh * kw * ic
    pad = (kh // 2, kw // 2)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).contiguous(memory_format=torch.channels_last)
    wt = torch.from_numpy(np.ascontiguousarray(layer.w.transpose(2, 3, 0, 1)))  # (OC, IC, KH, KW)
    nhwc = (0, 2, 3, 1)
    points = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notices for its quantized tensors
        f = torch.nn.functional.conv2d
        times, y = _time(lambda: f(xt, wt, padding=pad), repeat)
        points.append(_point(layer, "PyTorch FP32 (CPU)", "fp32", "cpu", times, y.permute(*nhwc).numpy(), ref,
                             flops, f"torch.nn.functional.conv2d, {torch.get_num_threads()} threads"))
        points += _int8_cpu(torch, layer, xt, wt, pad, ref, flops, repeat)
        if torch.cuda.is_available():
            for dt, label in ((torch.float16, "FP16"), (torch.bfloat16, "BF16")):
                xd = xt.to("cuda", dt)
                wd = wt.to("cuda", dt).contiguous(memory_format=torch.channels_last)
                times, y = _time(lambda: f(xd, wd, padding=pad), repeat, torch.cuda.synchronize)
                points.append(_point(layer, f"cuDNN {label} (PyTorch)", label.lower(), "cuda", times,
                                     y.float().permute(*nhwc).cpu().numpy(), ref, flops,
                                     f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
                                     f"input on the device"))
    return points


def _int8_cpu(torch: Any, layer: Layer, xt: Any, wt: Any, pad: tuple[int, int], ref: np.ndarray,
              flops: int, repeat: int) -> list[dict[str, Any]]:
    engines = torch.backends.quantized.supported_engines
    engine = next((e for e in ("x86", "fbgemm", "onednn") if e in engines), None)
    if engine is None:
        return []
    torch.backends.quantized.engine = engine
    qf = torch.ao.nn.quantized.functional
    lo, hi = min(float(xt.min()), 0.0), max(float(xt.max()), 0.0)
    sx = (hi - lo) / 255 or 1.0
    zx = int(round(-lo / sx))
    wmax = wt.abs().amax(dim=(1, 2, 3)).clamp(min=1e-12)
    qw = torch.quantize_per_channel(wt, (wmax / 127).double(), torch.zeros(wt.shape[0], dtype=torch.long), 0,
                                    torch.qint8)
    ymin, ymax = min(float(ref.min()), 0.0), max(float(ref.max()), 0.0)
    sy = (ymax - ymin) / 255 or 1.0
    zy = int(round(-ymin / sy))

    def call() -> Any:
        qx = torch.quantize_per_tensor(xt, sx, zx, torch.quint8)
        return qf.conv2d(qx, qw, None, padding=pad, scale=sy, zero_point=zy).dequantize()
    try:
        times, y = _time(call, repeat)
    except RuntimeError:  # an engine that refuses this layer
        return []
    return [_point(layer, f"PyTorch INT8 (CPU, {engine})", "int8", "cpu", times,
                   y.permute(0, 2, 3, 1).contiguous().numpy(), ref, flops,
                   "uint8 activations (per-tensor MinMax of this input), int8 per-channel weights, uint8 output "
                   "over the reference's range; the call quantizes the input and dequantizes the output")]
