"""Real pretrained networks with every convolution computed by qconv.

    from qconv import nets
    net = nets.load("efficientnet-lite0")           # weights fetched by `qconv fetch-models`
    split = net.split()                             # calibration / evaluation images
    r = nets.evaluate(net, split, "int8", "reference", "calibrated")
    r.top1, r.agreement, r.logits_nrmse, r.layers

Networks: efficientnet-lite0 (lite1, lite2: `qconv fetch-models efficientnet-lite1`), mnist.
See docs/NETS.md.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import QconvError
from .calibration import Calibration, calibrate, sweep_single_scale
from .evaluation import Evaluation, LayerError, NoiseSweep, evaluate, noise_threshold
from .fetch import fetch_all
from .runner import STRATEGIES, ConvLayer, Network, Runner
from .weights import load_state_dict

NETWORKS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "mnist")


def load(name: str, weights: str | Path | None = None) -> Network:
    """A network by name, from the fetched archives or from a .pth of the same layout."""
    if name.startswith("efficientnet-lite"):
        from . import efficientnet
        return efficientnet.load(name, weights)
    if name == "mnist":
        from . import mnist
        return mnist.load(weights)
    raise QconvError(f"unknown network {name!r}: one of {', '.join(NETWORKS)}")


__all__ = [
    "NETWORKS",
    "STRATEGIES",
    "Calibration",
    "ConvLayer",
    "Evaluation",
    "LayerError",
    "Network",
    "NoiseSweep",
    "Runner",
    "calibrate",
    "evaluate",
    "fetch_all",
    "load",
    "load_state_dict",
    "noise_threshold",
    "sweep_single_scale",
]
