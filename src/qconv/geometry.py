"""The layer's shape, defined once: stride, padding, groups, and the output they give.

check_layer (or conv_spec, then ConvSpec.geometry per input shape) is the contract's one shape and
parameter check; every backend takes the Geometry it returns. contract re-exports these names.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .errors import InputError


def same_padding(kh: int, kw: int) -> tuple[int, int]:
    """Top and left zero padding for 'SAME', stride 1; the extra row/column of an even kernel goes
    at the bottom/right."""
    return (kh - 1) // 2, (kw - 1) // 2


_MAX_STEP = 2**31 - 1  # a stride or a padding beyond any image side; the C backends take int64


def _pair(v: object, what: str) -> tuple[int, int]:
    if isinstance(v, (bool, np.bool_)):
        raise InputError(f"{what} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, (int, np.integer)):
        pair = int(v), int(v)
    elif isinstance(v, (tuple, list)) and len(v) == 2 and all(
            isinstance(e, (int, np.integer)) and not isinstance(e, (bool, np.bool_)) for e in v):
        pair = int(v[0]), int(v[1])
    else:
        raise InputError(f"{what} must be an int or a pair of ints, got {v!r}")
    if max(pair) > _MAX_STEP:
        raise InputError(f"{what} {v!r} is beyond any image side (at most 2^31 - 1)")
    return pair


def _padding_spec(padding: object) -> "str | tuple[tuple[int, int], tuple[int, int]]":
    """'same', 'valid', int, (ph, pw) or ((top, bottom), (left, right)) -> 'same' or explicit pads."""
    if isinstance(padding, str):
        key = padding.strip().lower()
        if key == "same":
            return "same"
        if key == "valid":
            return ((0, 0), (0, 0))
        raise InputError(f"padding {padding!r}: use 'same', 'valid', an int, (ph, pw) or "
                         f"((top, bottom), (left, right))")
    if isinstance(padding, (tuple, list)) and len(padding) == 2 and all(
            isinstance(p, (tuple, list)) for p in padding):
        (t, b), (l, r) = _pair(padding[0], "padding (top, bottom)"), _pair(padding[1], "padding (left, right)")
    else:
        ph, pw = _pair(padding, "padding")
        t, b, l, r = ph, ph, pw, pw
    if min(t, b, l, r) < 0:
        raise InputError(f"padding {padding!r} is negative")
    return ((t, b), (l, r))


@dataclass(frozen=True)
class ConvSpec:
    """The kernel-side description of a convolution, fixed when it is prepared.

    Kernel layout (KH, KW, OC, C // groups). ``padding`` is "same" (resolved per input size, the
    TensorFlow rule at stride > 1) or explicit ((top, bottom), (left, right)).
    """

    kh: int
    kw: int
    oc: int
    icg: int                     # input channels per group (the kernel's last axis)
    stride: tuple[int, int] = (1, 1)
    padding: "str | tuple[tuple[int, int], tuple[int, int]]" = "same"
    groups: int = 1

    @property
    def c(self) -> int:
        return self.icg * self.groups

    @property
    def k(self) -> int:
        """Reduction length of one output: KH * KW * C / groups."""
        return self.kh * self.kw * self.icg

    @property
    def is_default(self) -> bool:
        """The assignment's layer: 'same', stride 1, one group."""
        return self.stride == (1, 1) and self.padding == "same" and self.groups == 1

    def geometry(self, x_shape: tuple[int, ...]) -> "Geometry":
        """The whole layer for one input shape (N, H, W, C); refuses a shape that does not fit."""
        xs = tuple(int(d) for d in x_shape)
        if len(xs) != 4:
            raise InputError(f"input must be 4-D (N, H, W, C), got shape {xs}")
        if any(d <= 0 for d in xs):
            raise InputError(f"empty dimension: input {xs}")
        n, h, w, c = xs
        if c != self.c:
            if self.groups == 1:
                raise InputError(f"kernel IC={self.icg} does not match the input's C={c} "
                                 f"(input {xs}, kernel (KH, KW, OC, IC) = {(self.kh, self.kw, self.oc, self.icg)})")
            raise InputError(f"kernel IC={self.icg} x groups={self.groups} = {self.c} does not match the "
                             f"input's C={c} (input {xs}; a grouped kernel is (KH, KW, OC, C // groups))")
        sh, sw = self.stride
        if self.padding == "same":
            ho, wo = -(-h // sh), -(-w // sw)
            th, tw = max((ho - 1) * sh + self.kh - h, 0), max((wo - 1) * sw + self.kw - w, 0)
            pads = ((th // 2, th - th // 2), (tw // 2, tw - tw // 2))
        else:
            pads = self.padding
        (pt, pb), (pl, pr) = pads
        if max(pt, pb) >= self.kh or max(pl, pr) >= self.kw:
            raise InputError(f"padding {pads} is not smaller than the kernel {self.kh}x{self.kw}: "
                             f"some outputs would read only padding")
        hp, wp = h + pt + pb, w + pl + pr
        if hp < self.kh or wp < self.kw:
            raise InputError(f"the padded input {hp}x{wp} is smaller than the kernel {self.kh}x{self.kw}")
        return Geometry(self, n, h, w, pt, pb, pl, pr, (hp - self.kh) // sh + 1, (wp - self.kw) // sw + 1)


@dataclass(frozen=True)
class Geometry:
    """One convolution with its input size: everything a kernel's index math needs."""

    spec: ConvSpec
    n: int
    h: int
    w: int
    pt: int
    pb: int
    pl: int
    pr: int
    ho: int
    wo: int

    # cached: every call reads them (a frozen dataclass still has the __dict__ they are kept in)
    @functools.cached_property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.ho, self.wo, self.spec.oc)

    @functools.cached_property
    def flops(self) -> int:
        """2 * N * Ho * Wo * OC * K (a multiply-add counts two)."""
        return 2 * self.n * self.ho * self.wo * self.spec.oc * self.spec.k


def check_layer(x_shape: tuple[int, ...], w_shape: tuple[int, ...], *, stride: object = 1,
                padding: object = "same", groups: object = 1, bias_shape: tuple[int, ...] | None = None
                ) -> Geometry:
    """The contract's one shape and parameter check: input (N, H, W, C), kernel (KH, KW, OC, C/g)."""
    return conv_spec(w_shape, stride=stride, padding=padding, groups=groups,
                     bias_shape=bias_shape).geometry(x_shape)


def conv_spec(w_shape: tuple[int, ...], *, stride: object = 1, padding: object = "same",
              groups: object = 1, bias_shape: tuple[int, ...] | None = None) -> ConvSpec:
    """The kernel-side half of check_layer: what prepare() can check before any input exists."""
    ws = tuple(int(d) for d in w_shape)
    if len(ws) != 4:
        raise InputError(f"kernel must be 4-D (KH, KW, OC, IC), got shape {ws}")
    if any(d <= 0 for d in ws):
        raise InputError(f"empty dimension: kernel {ws}")
    kh, kw, oc, icg = ws
    sh, sw = _pair(stride, "stride")
    if sh < 1 or sw < 1:
        raise InputError(f"stride must be positive, got {stride!r}")
    if isinstance(groups, (bool, np.bool_)) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise InputError(f"groups must be a positive int, got {groups!r}")
    g = int(groups)
    if oc % g:
        raise InputError(f"OC={oc} is not divisible by groups={g}")
    if bias_shape is not None and tuple(bias_shape) != (oc,):
        raise InputError(f"bias must have shape (OC,) = ({oc},), got {tuple(bias_shape)}")
    return ConvSpec(kh, kw, oc, icg, (sh, sw), _padding_spec(padding), g)


def default_geometry(x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> Geometry:
    """The assignment's layer ('same', stride 1, one group) for these shapes."""
    return check_layer(x_shape, w_shape)
