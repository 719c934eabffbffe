"""The cuda backend's packed layouts, testable without a GPU: where the implicit GEMM finds its
activations and weights, and the weights packed for each path (numpy): INT8 / FP32 rows, INT16 /
INT32 byte planes, the tf32x3 split, depthwise taps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...contract import ConvSpec, Precision
from ._tiling import ELEM, KPW_ALIGN, OC_ALIGN, PLANES, roundup


def is_depthwise(spec: ConvSpec) -> bool:
    """groups == C (one input channel per group, any channel multiplier): the depthwise kernels."""
    return spec.groups > 1 and spec.icg == 1


# --------------------------------------------------------------------------- implicit-GEMM layout

@dataclass(frozen=True)
class GemmLayout:
    """Where the implicit GEMM finds its operands. Activations: each pixel is xpw 32-bit words, G
    groups of cw words (icg channels padded to icgp, so every 16-byte chunk lies in one group).
    Weights: [G][ocgp][kpw] words, k = tap * icgp + c, zero-padded."""

    elem: int     # bytes per element
    groups: int
    icg: int      # input channels per group
    icgp: int     # padded: icgp * elem is a multiple of 16 bytes
    taps: int     # KH * KW
    ocg: int      # output channels per group
    ocgp: int     # padded to OC_ALIGN
    planes: int = 1  # byte planes per value (the INT16/INT32 "mma" path: 2 / 4, each an INT8 layout)

    @property
    def cw(self) -> int:
        return self.icgp * self.elem // 4

    @property
    def xpw(self) -> int:
        """Words per pixel: every plane's G groups of cw words."""
        return self.planes * self.groups * self.cw

    @property
    def kpw(self) -> int:
        return roundup(self.taps * self.cw, KPW_ALIGN)

    @property
    def kp(self) -> int:
        """Packed K in elements."""
        return self.kpw * 4 // self.elem

    @property
    def padded(self) -> bool:
        """The channels need padding: the activations cannot be read in place."""
        return self.icgp != self.icg

    def wgs(self) -> int:
        """Words per group of one plane of packed weights."""
        return self.ocgp * self.kpw


def gemm_layout(precision: Precision, spec: ConvSpec, planes: bool = False, chan_bytes: int = 16) -> GemmLayout:
    """The implicit GEMM's layout; planes=True: INT16/INT32 as PLANES[precision] byte planes;
    chan_bytes: each pixel's channels padded to a multiple of that many bytes (16; the wgmma
    window kernel's k-steps: 32)."""
    np_ = PLANES[precision] if planes else 1
    elem = 1 if planes else ELEM[precision]
    icgp = roundup(spec.icg, chan_bytes // elem)
    ocg = spec.oc // spec.groups
    return GemmLayout(elem, spec.groups, spec.icg, icgp, spec.kh * spec.kw, ocg, roundup(ocg, OC_ALIGN), np_)


def pack_gemm_weights(wq: np.ndarray, lay: GemmLayout) -> np.ndarray:
    """(KH, KW, OC, icg) quantized (or FP32) kernel -> [G][ocgp][kp] of the same dtype."""
    kh, kw, oc, icg = wq.shape
    a = wq.reshape(lay.taps, lay.groups, lay.ocg, icg).transpose(1, 2, 0, 3)  # G, ocg, taps, icg
    buf = np.zeros((lay.groups, lay.ocgp, lay.taps, lay.icgp), dtype=wq.dtype)
    buf[:, :lay.ocg, :, :icg] = a
    out = np.zeros((lay.groups, lay.ocgp, lay.kp), dtype=wq.dtype)
    out[:, :, :lay.taps * lay.icgp] = buf.reshape(lay.groups, lay.ocgp, -1)
    return out


def split_planes(q: np.ndarray, planes: int) -> np.ndarray:
    """Integers -> (planes, *shape) int8 byte planes, plane b = (q >> 8b) & 0xFF as bits (the top
    plane is the signed top byte): q == sum_b<P-1 uint8(plane_b) << 8b + int8(plane_P-1) << 8(P-1)."""
    q = np.asarray(q).astype(np.int64)
    return np.stack([((q >> (8 * b)) & 0xFF).astype(np.uint8).view(np.int8) for b in range(planes)])


def pack_plane_weights(wq: np.ndarray, lay: GemmLayout) -> np.ndarray:
    """(KH, KW, OC, icg) int16/int32 kernel -> [P][G][ocgp][kp] int8, each plane packed as INT8."""
    return np.stack([pack_gemm_weights(p, lay) for p in split_planes(wq, lay.planes)])


def tf32(t: np.ndarray) -> np.ndarray:
    """cvt.rna.satfinite.tf32.f32 in numpy: the top 19 bits of each float32, rounded half away
    from zero, clamped to tf32's largest finite value."""
    b = (np.asarray(t, np.float32).view(np.uint32) + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    big = (b & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    b[big] = (b[big] & np.uint32(0x80000000)) | np.uint32(0x7F7FE000)
    return b.view(np.float32)


def tf32_split(t: np.ndarray) -> np.ndarray:
    """float32 -> (2, *shape) float32 planes big = tf32(t), small = tf32(t - big) (t - big exact):
    the tf32x3 path's operands (conv_f32_tf32x3.cu)."""
    t = np.asarray(t, np.float32)
    big = tf32(t)
    return np.stack([big, tf32(t - big)])


def pack_dw_weights(wq: np.ndarray) -> np.ndarray:
    """(KH, KW, OC, 1) depthwise kernel -> [KH*KW][OC], int32 for the integer paths."""
    kh, kw, oc, _ = wq.shape
    dt = np.float32 if wq.dtype == np.float32 else np.int32
    return np.ascontiguousarray(wq.reshape(kh * kw, oc).astype(dt))
