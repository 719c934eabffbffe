"""Layout shared by the study's figures: panels in a grid that grows with the number of layers,
legends outside the axes, wrapped labels. matplotlib's object API only (no pyplot state)."""

from __future__ import annotations

import math
import textwrap
from typing import Any

DPI = 100
PREC_COLORS = {"fp32": "#4c72b0", "int32": "#dd8452", "int16": "#55a868", "int8": "#c44e52",
               "fp16": "#8172b3", "bf16": "#937860"}
PHASE_COLORS = {"quantize": "#8172b3", "pack": "#937860", "transfer": "#da8bc3",
                "convolve": "#4c72b0", "dequantize": "#ccb974"}
STRAT_COLORS = {"single-S": "#55a868", "single-S-truncate": "#ccb974", "pair": "#64b5cd",
                "maxabs": "#8172b3", "per-channel": "#937860", "fp32": "#4c72b0"}
STRAT_MARKERS = {None: "D", "single-S": "o", "pair": "s", "per-channel": "^"}


class Panels:
    """A figure of n panels in rows of at most `cols`, each panel_w x panel_h inches, with a
    band of legend_h inches at the bottom for a figure legend and title_h at the top."""

    def __init__(self, n: int, panel_w: float, panel_h: float, cols: int = 2, legend_h: float = 0.0,
                 title_h: float = 0.6, left: float = 0.9, right: float = 0.3, hspace_in: float = 0.9,
                 wspace_in: float = 0.9) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        self.n = max(1, n)
        self.cols = min(cols, self.n)
        self.rows = math.ceil(self.n / self.cols)
        w = left + right + self.cols * panel_w + (self.cols - 1) * wspace_in
        h = title_h + legend_h + self.rows * panel_h + (self.rows - 1) * hspace_in + 0.6
        self.size_in = (w, h)
        self.fig = Figure(figsize=(w, h), dpi=DPI)
        self.canvas = FigureCanvasAgg(self.fig)
        gs = self.fig.add_gridspec(self.rows, self.cols, left=left / w, right=1 - right / w,
                                   bottom=(legend_h + 0.6) / h, top=1 - title_h / h,
                                   hspace=hspace_in / panel_h, wspace=wspace_in / panel_w)
        self.axes = [self.fig.add_subplot(gs[i // self.cols, i % self.cols]) for i in range(self.n)]
        self.legend_h, self.h = legend_h, h

    @property
    def pixels(self) -> tuple[int, int]:
        return int(round(self.size_in[0] * DPI)), int(round(self.size_in[1] * DPI))

    def legend(self, handles: list[Any], labels: list[str], ncol: int | None = None) -> None:
        """One legend for the figure, in the band below the panels."""
        if not handles:
            return
        ncol = ncol or max(1, min(len(labels), int(self.size_in[0] // 2.6)))
        self.fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False,
                        bbox_to_anchor=(0.5, 0.02))

    def title(self, text: str) -> None:
        self.fig.suptitle(text, fontsize=11, y=1 - 0.15 / self.h)


def wrap(text: str, width: int = 14) -> str:
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)) or text


def collect_legend(axes: list[Any]) -> tuple[list[Any], list[str]]:
    """Every axes' handles, one per label."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l and not l.startswith("_"):
                seen.setdefault(l, h)
    return list(seen.values()), list(seen.keys())


def empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, wrap(text, 40), ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def layer_names(res: dict[str, Any]) -> list[str]:
    return [L["name"] for L in res["layers"]] or ["(none)"]
