"""Modules: LabelSmoothingLoss (a drop-in training loss) and TemperatureScaler (calibration)."""

from __future__ import annotations

from typing import Optional

import torch

from . import functional as F
from ._validation import check_ignore_index, check_label_smoothing, check_reduction, check_temperature
from .calibration import TemperatureScaler

__all__ = ["LabelSmoothingLoss", "TemperatureScaler"]


class LabelSmoothingLoss(torch.nn.Module):
    """Drop-in replacement for ``nn.CrossEntropyLoss(label_smoothing=...)`` with a temperature.

    ``LabelSmoothingLoss(smoothing=0.1)`` computes the same loss as
    ``nn.CrossEntropyLoss(label_smoothing=0.1)``, through softcal's fused kernel.

    Args:
        smoothing: label smoothing eps in [0, 1].
        temperature: T > 0; the loss is computed on logits / T.
        weight: optional (C,) class weights (a buffer: it follows .to() and the state_dict).
        ignore_index: target value whose rows are ignored.
        reduction: "mean", "sum" or "none".
        fused: compute the gradient in the forward (see softcal.cross_entropy).
        inplace: with fused=True, overwrite the logits with their gradient.

    Shapes: forward(logits (N, C) or (N, C, d1, ...) or (C,), target (N,) / (N, d1, ...) / ()).
    """

    def __init__(
        self,
        smoothing: float = 0.1,
        temperature: float = 1.0,
        weight: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        fused: bool = False,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        fn = "softcal.nn.LabelSmoothingLoss"
        self.smoothing = check_label_smoothing(fn, smoothing, name="smoothing")
        if isinstance(temperature, torch.Tensor):
            raise TypeError(f"{fn}: temperature must be a float here (use TemperatureScaler to learn one), "
                            f"got a tensor")
        self.temperature = check_temperature(fn, temperature, torch.device("cpu"))
        check_reduction(fn, reduction)
        self.reduction = reduction
        self.ignore_index = check_ignore_index(fn, ignore_index)
        if inplace and not fused:
            raise ValueError(f"{fn}: inplace=True needs fused=True, got fused={fused!r}")
        self.fused = bool(fused)
        self.inplace = bool(inplace)
        if weight is not None and not isinstance(weight, torch.Tensor):
            raise TypeError(f"{fn}: weight must be a torch.Tensor or None, got {type(weight).__name__}")
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits,
            target,
            temperature=self.temperature,
            label_smoothing=self.smoothing,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            fused=self.fused,
            inplace=self.inplace,
        )

    def extra_repr(self) -> str:
        s = f"smoothing={self.smoothing}, temperature={self.temperature}, reduction={self.reduction!r}"
        if self.ignore_index != -100:
            s += f", ignore_index={self.ignore_index}"
        if self.fused:
            s += f", fused=True, inplace={self.inplace}"
        return s
