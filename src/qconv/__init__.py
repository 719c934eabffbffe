"""qconv: what naive quantization of a convolution buys, and costs, on real hardware.

    import qconv
    y = qconv.conv2d(x, w, "int8")                     # x NHWC float32, w (KH, KW, OC, IC)
    r = qconv.conv2d_result(x, w, "int8", accuracy=True)
    r.phases["convolve"], r.nrmse, r.wrapped, r.scale_reason
"""

from .api import ConvResult, conv2d, conv2d_result, reference_output
from .backends import available_backends, use_backend
from .contract import Precision, Rounding, nrmse
from .errors import BackendUnavailable, QconvError
from .sweep import SweepTable, sweep_scales
from .tensorfile import load as load_tensor, save as save_tensor

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable", "ConvResult", "Precision", "QconvError", "Rounding", "available_backends",
    "conv2d", "conv2d_result", "load_tensor", "nrmse", "reference_output", "save_tensor",
    "SweepTable", "sweep_scales", "use_backend", "__version__",
]
