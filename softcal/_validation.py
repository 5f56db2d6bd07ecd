"""Argument checks and shape handling shared by the functional API and the reference.

Every error names the argument and the bad value. Nothing here synchronises a CUDA device:
checks on tensor *values* (target range, a temperature tensor's value) are done by the kernels.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

__all__ = [
    "REDUCTIONS",
    "check_logits",
    "check_temperature",
    "check_label_smoothing",
    "check_reduction",
    "check_target",
    "check_weight",
    "flatten_classes",
]

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Temperature = Union[float, int, torch.Tensor]


def check_logits(fn: str, logits: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOATS:
        raise TypeError(
            f"{fn}: {name} must be float16, bfloat16, float32 or float64, got dtype {logits.dtype}"
        )


def check_temperature(fn: str, temperature: Temperature, device: torch.device) -> Temperature:
    """Validate a float or 0-dim tensor temperature; return a float or a 0-dim tensor."""
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1 or temperature.dim() > 1:
            raise ValueError(
                f"{fn}: temperature tensor must have exactly one element (0-dim), "
                f"got shape {tuple(temperature.shape)}"
            )
        if not temperature.dtype.is_floating_point:
            raise TypeError(
                f"{fn}: temperature tensor must be floating point, got dtype {temperature.dtype}"
            )
        if temperature.device != device:
            raise ValueError(
                f"{fn}: temperature is on {temperature.device} but logits is on {device}"
            )
        if (temperature.device.type == "cpu" and not _is_fake(temperature)
                and not torch.compiler.is_compiling()):
            value = float(temperature.detach())
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{fn}: temperature must be a finite number > 0, got {value}")
        return temperature.reshape(())
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(
            f"{fn}: temperature must be a float or a 0-dim tensor, got {type(temperature).__name__}"
        )
    value = float(temperature)
    # comparisons, not math.isfinite: under torch.compile(dynamic=True) a float argument is a
    # SymFloat, which the comparisons guard on (NaN fails both)
    if not (0.0 < value < math.inf):
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got {temperature!r}")
    return value


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, torch._subclasses.FakeTensor) or t.device.type == "meta"


def check_label_smoothing(fn: str, label_smoothing: float, name: str = "label_smoothing") -> float:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"{fn}: {name} must be a float, got {type(label_smoothing).__name__}")
    value = float(label_smoothing)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{fn}: {name} must be in [0, 1], got {label_smoothing!r}")
    return value


def check_reduction(fn: str, reduction: str) -> int:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{fn}: reduction must be one of 'mean', 'sum', 'none', got {reduction!r}"
        )
    return REDUCTIONS[reduction]


def check_ignore_index(fn: str, ignore_index: int) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}")
    return ignore_index


def check_inplace_leaf(fn: str, logits: torch.Tensor, inplace: bool, name: str = "logits") -> None:
    """Refuse ``fused=True, inplace=True`` on a leaf that requires grad (an ``nn.Parameter``) or
    a view of one, as PyTorch's own in-place ops do: the gradient would overwrite its values."""
    if not (inplace and torch.is_grad_enabled() and logits.requires_grad):
        return
    base = logits._base if logits._base is not None else logits
    if logits.is_leaf or (base.is_leaf and base.requires_grad):
        what = "a leaf tensor" if logits.is_leaf else "a view of a leaf tensor"
        raise RuntimeError(
            f"{fn}: a leaf Variable that requires grad is being used in an in-place operation: "
            f"{name} is {what} that requires grad (an nn.Parameter?), and fused=True, "
            f"inplace=True would overwrite its values with the gradient; use inplace=False, or "
            "pass logits computed from it (the output of a layer)")


def check_target(fn: str, logits: torch.Tensor, target: torch.Tensor,
                 probabilities: bool = False) -> torch.Tensor:
    """Check the target's type, device and shape against the logits.

    Returns class indices as int64. With ``probabilities=True`` a floating target of the
    logits' shape (class probabilities) is accepted too and returned as it is; it must have the
    logits' device, and their dtype (or float32 beside float16/bfloat16 logits).
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor, got {type(target).__name__}")
    if probabilities and target.dtype.is_floating_point:
        if tuple(target.shape) != tuple(logits.shape):
            raise TypeError(
                f"{fn}: target must be an integer tensor of class indices, or class probabilities "
                f"of the logits' shape {tuple(logits.shape)}; got dtype {target.dtype} and shape "
                f"{tuple(target.shape)}"
            )
        half_logits = logits.dtype in (torch.float16, torch.bfloat16)
        if target.dtype != logits.dtype and not (half_logits and target.dtype == torch.float32):
            raise TypeError(
                f"{fn}: class-probability target has dtype {target.dtype} but logits has dtype "
                f"{logits.dtype}"
            )
        if target.device != logits.device:
            raise ValueError(f"{fn}: target is on {target.device} but logits is on {logits.device}")
        if logits.dim() == 0:
            raise ValueError(f"{fn}: logits must have at least 1 dimension (classes), got a 0-dim tensor")
        return target
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(
            f"{fn}: target must be an integer tensor of class indices, got dtype {target.dtype} "
            "(class-probability targets are not supported)"
        )
    if target.device != logits.device:
        raise ValueError(f"{fn}: target is on {target.device} but logits is on {logits.device}")
    if logits.dim() == 0:
        raise ValueError(f"{fn}: logits must have at least 1 dimension (classes), got a 0-dim tensor")
    if logits.dim() == 1:
        expected: Tuple[int, ...] = ()
    else:
        expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{fn}: target has shape {tuple(target.shape)} but logits of shape "
            f"{tuple(logits.shape)} needs target of shape {expected}"
        )
    return target if target.dtype == torch.int64 else target.long()


def check_weight(fn: str, logits: torch.Tensor, weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{fn}: weight must be a torch.Tensor or None, got {type(weight).__name__}")
    n_classes = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    if weight.dim() != 1 or weight.shape[0] != n_classes:
        raise ValueError(
            f"{fn}: weight has shape {tuple(weight.shape)} but logits has {n_classes} classes "
            f"(expected shape ({n_classes},))"
        )
    if not weight.dtype.is_floating_point:  # any floating dtype: read in the accumulation type
        raise TypeError(f"{fn}: weight must be a floating tensor, got dtype {weight.dtype}")
    if weight.device != logits.device:
        raise ValueError(f"{fn}: weight is on {weight.device} but logits is on {logits.device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            f"{fn}: the gradient with respect to weight is not supported; pass weight.detach()"
        )
    return weight


def _unit_class_stride(x: torch.Tensor) -> torch.Tensor:
    """x (rows, C) with a unit stride along C (a copy only when it has not).

    clone(), not contiguous(): an empty tensor counts as contiguous whatever its strides.
    """
    if x.stride(1) == 1 or x.shape[1] <= 1:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def flatten_classes(logits: torch.Tensor, target: torch.Tensor):
    """(C,), (N, C) or (N, C, d1, ...) -> 2-D (rows, C) with classes last, 1-D target, batch shape.

    The 2-D result always has a unit stride along C (the kernels' contract, csrc/schemas.h); any
    row stride, 0 included, is kept. A view of the logits is returned when their layout allows
    it (contiguous (N, C) and (C,), row-strided or row-expanded (N, C), channels-last K-dim), a
    copy otherwise (transposed or class-strided views, channels-first K-dim inputs with d > 1).
    """
    if logits.dim() == 1:
        return _unit_class_stride(logits.unsqueeze(0)), target.reshape(1), ()
    if logits.dim() == 2:
        return _unit_class_stride(logits), target, (logits.shape[0],)
    n_classes = logits.shape[1]
    batch_shape = (logits.shape[0],) + tuple(logits.shape[2:])
    # reshape returns a view whenever the strides allow it, whatever its class stride (batch
    # size 1 gives one): the kernels need the class stride to be 1.
    x = _unit_class_stride(logits.movedim(1, -1).reshape(-1, n_classes))
    return x, target.reshape(-1), batch_shape
