"""softcal: honest confidence and a fast loss for PyTorch classifiers.

* A fused, numerically stable, temperature-scaled and label-smoothed softmax cross-entropy
  (C++ kernels for the CPU, CUDA kernels for NVIDIA GPUs), forward and backward, with the
  gradient with respect to the temperature: :func:`cross_entropy`, :func:`softmax`,
  :func:`log_softmax` and :class:`softcal.nn.LabelSmoothingLoss`.
* Post-hoc calibration: :class:`softcal.nn.TemperatureScaler`, fitted exactly by a safeguarded
  Newton method, calibration metrics (:mod:`softcal.metrics`) and reliability diagrams
  (:mod:`softcal.plots`), and the ``softcal calibrate`` command.

:func:`backend` tells which implementation runs on a device: the compiled extension or the
pure-PyTorch reference.
"""

import torch  # noqa: F401  (the extension links against torch: load it first)

from . import _ops
from ._ops import HAVE_EXTENSION
from .functional import cross_entropy, log_softmax, softmax, temperature_stats
from . import nn  # noqa: E402
from . import metrics  # noqa: E402
from .nn import LabelSmoothingLoss, TemperatureScaler  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "HAVE_EXTENSION",
    "LabelSmoothingLoss",
    "TemperatureScaler",
    "backend",
    "cross_entropy",
    "log_softmax",
    "metrics",
    "nn",
    "softmax",
    "temperature_stats",
]


def backend(device="cpu") -> str:
    """The implementation that runs on `device`: "extension" (compiled kernels) or "reference"."""
    device_type = torch.device(device).type
    return "extension" if _ops.has_kernel(device_type) else "reference"
