"""softcal: honest confidence and a fast loss for PyTorch classifiers.

* A fused, numerically stable, temperature-scaled and label-smoothed softmax cross-entropy
  (C++ kernels for the CPU, CUDA kernels for NVIDIA GPUs), forward and backward, with the
  gradient with respect to the temperature: :func:`cross_entropy`, :func:`softmax`,
  :func:`log_softmax`, :class:`softcal.nn.CrossEntropyLoss` (a drop-in for
  ``torch.nn.CrossEntropyLoss``) and :class:`softcal.nn.LabelSmoothingLoss`.
* Post-hoc calibration: :class:`softcal.nn.TemperatureScaler`, fitted exactly by a safeguarded
  Newton method, calibration metrics (:mod:`softcal.metrics`) and reliability diagrams
  (:mod:`softcal.plots`), and the ``softcal calibrate`` command.

:func:`backend` (a query, not a setter) tells which implementation runs on a device: the
compiled extension or the pure-PyTorch reference.

:mod:`softcal.distributed` and :mod:`softcal.plots` are loaded on first access
(``softcal.plots.reliability_diagram(...)`` works after a plain ``import softcal``), so that
importing softcal imports neither matplotlib nor softcal's torch.distributed code.
"""

import importlib as _importlib
from typing import Union as _Union

import torch as _torch  # the extension links against torch: load it first

from . import _ops
from ._ops import HAVE_EXTENSION
from .functional import cross_entropy, log_softmax, softmax, temperature_stats
from .lm_head import linear_cross_entropy
from . import nn  # noqa: E402
from . import metrics  # noqa: E402
from .nn import CrossEntropyLoss, LabelSmoothingLoss, TemperatureScaler  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyLoss",
    "HAVE_EXTENSION",
    "LabelSmoothingLoss",
    "TemperatureScaler",
    "backend",
    "cross_entropy",
    "distributed",
    "linear_cross_entropy",
    "log_softmax",
    "metrics",
    "nn",
    "plots",
    "softmax",
    "temperature_stats",
]

# Submodules imported on first attribute access (PEP 562): plots needs matplotlib, distributed
# is of use only under torch.distributed; neither is imported by `import softcal`.
_LAZY_SUBMODULES = ("distributed", "plots")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        module = _importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))


def backend(device: _Union[str, _torch.device] = "cpu") -> str:
    """Which implementation runs on `device`: a query; it selects nothing.

    Returns "extension" when the compiled kernels serve this device type, "reference" when the
    pure-PyTorch fallback does (no extension, or no kernels for that device). The choice is
    made per call from the tensors' device; there is no switch to set.

    Args:
        device: a device string ("cpu", "cuda", "cuda:1") or a torch.device.

    Raises:
        ValueError: when `device` is not a device (e.g. backend("reference"): to know whether
            the extension loaded at all, read softcal.HAVE_EXTENSION).
    """
    if not isinstance(device, (str, _torch.device)):
        raise TypeError(f"softcal.backend: device must be a device string such as 'cpu' or 'cuda' "
                        f"or a torch.device, got {type(device).__name__}")
    try:
        device_type = _torch.device(device).type
    except RuntimeError:
        raise ValueError(
            f"softcal.backend: device must be a device string such as 'cpu' or 'cuda', got "
            f"{device!r}; backend(device) only reports which implementation runs on that device "
            "('extension' or 'reference') and selects nothing") from None
    return "extension" if _ops.has_kernel(device_type) else "reference"
