"""qconv: what naive quantization of a convolution buys, and costs, on real hardware.

    import qconv
    conv = qconv.prepare(w, "int8")                    # w (KH, KW, OC, C/groups): packed once
    y = conv(x)                                        # x NHWC float32
    y = qconv.conv2d(x, w, "int8", stride=2)           # one shot
    r = qconv.conv2d_result(x, w, "int8", accuracy=True)
    r.phases["convolve"], r.nrmse, r.wrapped, r.scale_reason
"""

from .api import Conv, ConvResult, conv2d, conv2d_result, prepare, reference_output
from .backends import available_backends, use_backend
from .contract import Precision, Rounding, nrmse
from .errors import BackendError, BackendUnavailable, InputError, QconvError, QconvWarning
from .scales import StepSize
from .sweep import SweepTable, sweep_scales
from .tensorfile import load as load_tensor, save as save_tensor

__version__ = "0.1.0"

__all__ = [
    "BackendError", "BackendUnavailable", "Conv", "ConvResult", "InputError", "QconvWarning", "StepSize", "prepare", "Precision", "QconvError", "Rounding", "available_backends",
    "conv2d", "conv2d_result", "load_tensor", "nrmse", "reference_output", "save_tensor",
    "SweepTable", "sweep_scales", "use_backend", "__version__",
]
