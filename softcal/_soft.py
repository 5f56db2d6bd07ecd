"""Class-probability (soft) targets for softcal.cross_entropy.

A floating target of the logits' shape is a distribution over the classes per row (or any real
weights: they are used as given, as PyTorch does), for mixup / CutMix (timm's
SoftTargetCrossEntropy) and distillation from a teacher's probabilities. This module is the
functional dispatch: softcal.cross_entropy validates the arguments and calls soft_cross_entropy
here, which runs the compiled ops soft_target_fwd / soft_target_bwd (softcal._ops, kernels in
csrc/cpu/soft_target_cpu.cpp and csrc/cuda/tsce_soft.cu) or, without them, the pure-PyTorch
reference (softcal.reference.soft_cross_entropy). The maths is written out at the top of
csrc/cpu/soft_target_cpu.cpp.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import _ops, reference
from ._validation import REDUCTIONS

__all__ = ["soft_cross_entropy"]

Temperature = Union[float, torch.Tensor]


def _unit_class_stride(x: torch.Tensor) -> torch.Tensor:
    return x if (x.stride(1) == 1 or x.shape[1] <= 1) else x.contiguous()


def soft_cross_entropy(
    fn: str,
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: Temperature,
    label_smoothing: float,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    fused: bool,
    inplace: bool,
    use_kernel: bool,
) -> torch.Tensor:
    """Cross-entropy of logits / T against class probabilities (arguments already validated).

    Args:
        fn: the public name, for error messages.
        logits: (C,), (N, C) or (N, C, d1, ...); float16, bfloat16, float32 or float64.
        target: the logits' shape and device, their dtype (or float32 beside float16/bfloat16
            logits); row-wise class probabilities.
        temperature: a float > 0 or a 0-dim tensor (its gradient is returned when it requires it).
        label_smoothing: eps in [0, 1]; the target becomes (1 - eps) t + eps / C.
        weight: (C,) class weights in any floating dtype, or None (not differentiable).
        ignore_index: must be negative (PyTorch's rule for probability targets); not used.
        reduction: "mean" (the sum over rows divided by the number of rows, N * d1 * ...),
            "sum" or "none".
        fused, inplace: not supported with probability targets (NotImplementedError).
        use_kernel: run the compiled ops (else the reference).

    Returns:
        The loss in the accumulation dtype from the kernels (float32 for float16/bfloat16
        logits; the caller rounds it to the loss dtype once), in the logits' dtype from the
        reference: 0-dim for "mean"/"sum", the batch shape for "none".
        Differentiable in the logits, the target and a tensor temperature.
    """
    if ignore_index >= 0:
        raise ValueError(
            f"{fn}: ignore_index is not supported with class-probability targets (it must be "
            f"negative, as in PyTorch), got ignore_index={ignore_index}"
        )
    if fused or inplace:
        raise NotImplementedError(
            f"{fn}: fused=True (and inplace=True) is not supported with class-probability "
            f"targets, got fused={fused!r}, inplace={inplace!r}; use fused=False"
        )
    kernels = use_kernel and all(
        _ops.has_kernel(logits.device.type, op) for op in ("soft_target_fwd", "soft_target_bwd"))
    if not kernels:
        return reference.soft_cross_entropy(logits, target, temperature=temperature,
                                            label_smoothing=label_smoothing, weight=weight,
                                            reduction=reduction)
    x, t, batch_shape = reference.flatten_probabilities(logits, target)
    x, t = _unit_class_stride(x), _unit_class_stride(t)
    if isinstance(temperature, torch.Tensor):
        temp_t, temp_f = temperature, 1.0
    else:
        temp_t, temp_f = None, float(temperature)
    red = REDUCTIONS[reduction]
    loss, _, _ = torch.ops.softcal.soft_target_fwd(x, t, weight, temp_t, temp_f, label_smoothing, red)
    if red == 0:
        loss = loss.reshape(batch_shape)
    return loss
