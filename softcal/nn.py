"""Modules: CrossEntropyLoss (a drop-in for torch.nn.CrossEntropyLoss), LabelSmoothingLoss (the
same with smoothing 0.1 by default) and TemperatureScaler (calibration)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import functional as F
from .functional import _check_loss_dtype, _legacy_reduction
from ._validation import check_ignore_index, check_label_smoothing, check_reduction, check_temperature
from .calibration import TemperatureScaler
from .calibration import (DirichletCalibrator, EnsembleTemperatureScaler, HistogramBinning,
                          IsotonicCalibrator, MatrixScaler, ScalingBinningCalibrator, VectorScaler)
from .lm_head import LinearCrossEntropyLoss

__all__ = ["CrossEntropyLoss", "LabelSmoothingLoss", "LinearCrossEntropyLoss", "TemperatureScaler",
           "DirichletCalibrator", "EnsembleTemperatureScaler", "HistogramBinning", "IsotonicCalibrator",
           "MatrixScaler", "ScalingBinningCalibrator", "VectorScaler"]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in replacement for ``torch.nn.CrossEntropyLoss``, with a temperature and a fused kernel.

    A subclass of ``torch.nn.CrossEntropyLoss`` (``isinstance`` checks of training frameworks
    hold), with the same attributes (``weight``, ``ignore_index``, ``reduction``,
    ``label_smoothing``); its forward is softcal's.

    The constructor and the call take the same arguments as PyTorch's, in the same order, with
    the same defaults; softcal adds ``temperature``, ``fused``, ``inplace``, ``loss_dtype`` and the LLM
    options ``z_loss``, ``softcap``, ``return_lse``, keyword-only::

        CrossEntropyLoss(weight=None, size_average=None, ignore_index=-100, reduce=None,
                         reduction="mean", label_smoothing=0.0, *, temperature=1.0,
                         fused=False, inplace=False, loss_dtype=None, z_loss=0.0,
                         softcap=None, return_lse=False)

    ``loss(input, target)`` equals ``torch.nn.CrossEntropyLoss(...)(input / temperature,
    target)``, gradients included (see :func:`softcal.cross_entropy`).

    Args:
        weight: optional (C,) class weights, any floating dtype (float32 weights with
            bfloat16 logits are read in float32); a buffer: it follows .to() and the
            state_dict, as in PyTorch.
        size_average, reduce: deprecated (as in PyTorch); when either is given, ``reduction``
            is derived from them as PyTorch does, with PyTorch's deprecation warning.
        ignore_index: target value whose rows are ignored (contribute 0, not counted by mean).
        reduction: "mean", "sum" or "none".
        label_smoothing: eps in [0, 1]; the target becomes (1 - eps) one-hot + eps / C.
        temperature: a float T > 0; the loss is computed on input / T (use
            :class:`TemperatureScaler` to learn one).
        fused: compute the gradient in the forward (see softcal.cross_entropy).
        inplace: with fused=True, overwrite the logits with their gradient (declared to
            autograd: an op that saved the logits raises at backward instead of going wrong).
        loss_dtype: the dtype of the loss (None: the logits' dtype, float32 for half logits
            under autocast); ``torch.float32`` gives a float32 loss for half logits.
        z_loss, softcap, return_lse: the LLM options of :func:`softcal.cross_entropy` (z-loss
            z lse^2 per row, logit soft-capping c tanh(x / c), and returning (loss, lse)).

    Shapes: input (C,), (N, C) or (N, C, d1, ...), float16/bfloat16/float32/float64, any
    strides; target (), (N,) or (N, d1, ...) class indices, passed unchanged to
    :func:`softcal.cross_entropy`. Output: 0-dim for mean/sum, the batch shape for none.
    """

    _fn = "softcal.nn.CrossEntropyLoss"

    def __init__(
        self,
        weight: Optional[torch.Tensor] = None,
        size_average: Optional[bool] = None,
        ignore_index: int = -100,
        reduce: Optional[bool] = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        temperature: float = 1.0,
        fused: bool = False,
        inplace: bool = False,
        loss_dtype: Optional[torch.dtype] = None,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        return_lse: bool = False,
    ) -> None:
        fn = self._fn
        F._check_llm_options(fn, z_loss, softcap, return_lse)
        if weight is not None and not isinstance(weight, torch.Tensor):
            raise TypeError(f"{fn}: weight must be a torch.Tensor or None, got {type(weight).__name__}")
        if size_average is not None or reduce is not None:
            reduction = _legacy_reduction(size_average, reduce)
        check_reduction(fn, reduction)
        ignore_index = check_ignore_index(fn, ignore_index)
        label_smoothing = check_label_smoothing(fn, label_smoothing)
        if isinstance(temperature, torch.Tensor):
            raise TypeError(f"{fn}: temperature must be a float here (use TemperatureScaler to "
                            "learn one, or softcal.cross_entropy for a tensor), got a tensor")
        temperature = check_temperature(fn, temperature, torch.device("cpu"))
        if inplace and not fused:
            raise ValueError(f"{fn}: inplace=True needs fused=True, got fused={fused!r}")
        # torch.nn.CrossEntropyLoss's own attributes (weight a buffer: it follows .to() and the
        # state_dict), from the validated values; size_average/reduce are resolved above.
        super().__init__(weight, None, ignore_index, None, reduction, label_smoothing)
        self.temperature = temperature
        self.fused = bool(fused)
        self.inplace = bool(inplace)
        self.loss_dtype = _check_loss_dtype(fn, loss_dtype)
        self.z_loss = float(z_loss)
        self.softcap = float(softcap) if softcap is not None else None
        self.return_lse = return_lse

    def forward(self, input: torch.Tensor,
                target: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        return F.cross_entropy(
            input,
            target,
            temperature=self.temperature,
            label_smoothing=self.label_smoothing,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            fused=self.fused,
            inplace=self.inplace,
            loss_dtype=self.loss_dtype,
            z_loss=self.z_loss,
            softcap=self.softcap,
            return_lse=self.return_lse,
        )

    def extra_repr(self) -> str:
        s = f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}"
        if self.temperature != 1.0:
            s += f", temperature={self.temperature}"
        if self.ignore_index != -100:
            s += f", ignore_index={self.ignore_index}"
        if self.fused:
            s += f", fused=True, inplace={self.inplace}"
        if self.loss_dtype is not None:
            s += f", loss_dtype={self.loss_dtype}"
        if self.z_loss:
            s += f", z_loss={self.z_loss}"
        if self.softcap is not None:
            s += f", softcap={self.softcap}"
        if self.return_lse:
            s += ", return_lse=True"
        return s


class LabelSmoothingLoss(CrossEntropyLoss):
    """:class:`CrossEntropyLoss` with label smoothing 0.1 by default (timm's spelling).

    ``LabelSmoothingLoss(smoothing=0.1)``, ``LabelSmoothingLoss(0.1)`` and
    ``LabelSmoothingLoss(label_smoothing=0.1)`` all compute the same loss as
    ``torch.nn.CrossEntropyLoss(label_smoothing=0.1)``. The first positional argument is the
    smoothing: class weights are passed as ``weight=...`` (a tensor in the first place is an
    error, never read as the smoothing).

    Args:
        smoothing: label smoothing eps in [0, 1] (None: 0.1); ``label_smoothing`` is the
            same argument under PyTorch's name (give one of the two).
        temperature, weight, ignore_index, reduction, fused, inplace, loss_dtype: as
            CrossEntropyLoss.

    Shapes: as CrossEntropyLoss.
    """

    _fn = "softcal.nn.LabelSmoothingLoss"

    def __init__(
        self,
        smoothing: Optional[float] = None,
        temperature: float = 1.0,
        weight: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        fused: bool = False,
        inplace: bool = False,
        *,
        label_smoothing: Optional[float] = None,
        loss_dtype: Optional[torch.dtype] = None,
    ) -> None:
        fn = self._fn
        if isinstance(smoothing, torch.Tensor):
            raise TypeError(
                f"{fn}: the first argument is the smoothing (a float in [0, 1]), got a tensor of "
                f"shape {tuple(smoothing.shape)}; pass class weights as weight=..., e.g. "
                "LabelSmoothingLoss(0.1, weight=w) or softcal.nn.CrossEntropyLoss(w, label_smoothing=0.1)")
        if smoothing is not None and label_smoothing is not None:
            raise TypeError(f"{fn}: give smoothing or label_smoothing, not both (got smoothing="
                            f"{smoothing!r}, label_smoothing={label_smoothing!r})")
        if smoothing is not None:
            eps, name = smoothing, "smoothing"
        elif label_smoothing is not None:
            eps, name = label_smoothing, "label_smoothing"
        else:
            eps, name = 0.1, "smoothing"
        check_label_smoothing(fn, eps, name=name)
        super().__init__(weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=eps, temperature=temperature, fused=fused,
                         inplace=inplace, loss_dtype=loss_dtype)

    @property
    def smoothing(self) -> float:
        """The label smoothing eps (the same as ``label_smoothing``)."""
        return self.label_smoothing

    @smoothing.setter
    def smoothing(self, value: float) -> None:
        self.label_smoothing = check_label_smoothing(self._fn, value, name="smoothing")

    def extra_repr(self) -> str:
        s = f"smoothing={self.smoothing}, temperature={self.temperature}, reduction={self.reduction!r}"
        if self.ignore_index != -100:
            s += f", ignore_index={self.ignore_index}"
        if self.fused:
            s += f", fused=True, inplace={self.inplace}"
        if self.loss_dtype is not None:
            s += f", loss_dtype={self.loss_dtype}"
        return s
