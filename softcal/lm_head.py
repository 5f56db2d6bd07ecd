"""The LM head: a fused linear + cross-entropy that never holds the N x V logits.

:func:`linear_cross_entropy` takes ``torch.nn.functional.linear_cross_entropy``'s arguments plus
softcal's (temperature, z_loss, softcap, return_lse, workspace_bytes);
:class:`LinearCrossEntropyLoss` is the module that owns the output layer, with
``torch.nn.LinearCrossEntropyLoss``'s constructor arguments. The rows are processed in chunks
sized to ``workspace_bytes`` (softcal._lm_head_chunks: one GEMM per chunk, the in-place
cross-entropy kernel turning the chunk into its own gradient, then the GEMMs for dX and dW).
The maths is in docs/lm_head.md.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _lm_head_ops  # noqa: F401  (registers softcal::linear_cross_entropy)
from ._lm_head_chunks import DEFAULT_WORKSPACE_BYTES
from ._validation import (
    check_ignore_index,
    check_label_smoothing,
    check_reduction,
    check_temperature,
)

__all__ = ["DEFAULT_WORKSPACE_BYTES", "LinearCrossEntropyLoss", "linear_cross_entropy"]

Temperature = Union[float, Tensor]
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(fn: str, name: str, t, input: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != input.dtype:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype} but input has dtype {input.dtype}")
    if t.device != input.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but input is on {input.device}")


def flat_rows(input: Tensor, target: Tensor, temperature):
    """(batch shape, input as contiguous (N, H) rows, target (N,), tensor temperature or None,
    float temperature): the rows every LM-head form works on."""
    batch_shape = tuple(input.shape[:-1])
    x = input.reshape(-1, input.shape[-1])
    if not x.is_contiguous():
        x = x.contiguous()
    t = target.reshape(-1)
    if isinstance(temperature, Tensor):
        return batch_shape, x, t, temperature, 1.0
    return batch_shape, x, t, None, float(temperature)


def check_extras(fn: str, z_loss: float, softcap: Optional[float]) -> Tuple[float, float]:
    """z_loss >= 0 and softcap None or > 0 (finite floats); returns (z_loss, softcap or 0.0)."""
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)):
        raise TypeError(f"{fn}: z_loss must be a float, got {type(z_loss).__name__}")
    if not (math.isfinite(float(z_loss)) and float(z_loss) >= 0):
        raise ValueError(f"{fn}: z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is None:
        return float(z_loss), 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"{fn}: softcap must be a float or None, got {type(softcap).__name__}")
    if not (math.isfinite(float(softcap)) and float(softcap) > 0):
        raise ValueError(f"{fn}: softcap must be a finite number > 0 or None, got {softcap!r}")
    return float(z_loss), float(softcap)


def check_workspace(fn: str, workspace_bytes: int) -> int:
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int):
        raise TypeError(f"{fn}: workspace_bytes must be an int, got "
                        f"{type(workspace_bytes).__name__}")
    if workspace_bytes <= 0:
        raise ValueError(f"{fn}: workspace_bytes must be > 0, got {workspace_bytes}")
    return workspace_bytes


def check_head(fn: str, input: Tensor, linear_weight: Tensor, target: Tensor,
               linear_bias: Optional[Tensor], weight: Optional[Tensor],
               allow_empty: bool = False):
    """The LM head's tensors: input (..., H), linear_weight (V, H) (V = 0 only with
    allow_empty: a rank's empty slice), target (...) class indices, linear_bias (V,), weight
    (V,). Returns target as int64."""
    weight_name = "weight"
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOATS:
        raise TypeError(f"{fn}: input must be float16, bfloat16, float32 or float64, got dtype "
                        f"{input.dtype}")
    if input.dim() < 1:
        raise ValueError(f"{fn}: input must have at least 1 dimension (..., H), got a 0-dim tensor")
    _check_tensor(fn, "linear_weight", linear_weight, input)
    if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(f"{fn}: linear_weight must be (V, H) with H = input.shape[-1] = "
                         f"{input.shape[-1]}, got shape {tuple(linear_weight.shape)}")
    n_classes = linear_weight.shape[0]
    if n_classes == 0 and not allow_empty:
        raise ValueError(f"{fn}: linear_weight has 0 rows (no classes)")
    if not isinstance(target, Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(
            f"{fn}: target must be an integer tensor of class indices, got dtype {target.dtype}; "
            "class-probability targets are not supported by the fused LM head (compute the "
            "logits with F.linear and use softcal.cross_entropy, which takes them)")
    if target.device != input.device:
        raise ValueError(f"{fn}: target is on {target.device} but input is on {input.device}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"{fn}: target has shape {tuple(target.shape)} but input of shape "
                         f"{tuple(input.shape)} needs target of shape {tuple(input.shape[:-1])}")
    if linear_bias is not None:
        _check_tensor(fn, "linear_bias", linear_bias, input)
        if tuple(linear_bias.shape) != (n_classes,):
            raise ValueError(f"{fn}: linear_bias must have shape ({n_classes},), got "
                             f"{tuple(linear_bias.shape)}")
    if weight is not None:
        _check_tensor(fn, weight_name, weight, input)
        if tuple(weight.shape) != (n_classes,):
            raise ValueError(f"{fn}: {weight_name} (class weights) must have shape "
                             f"({n_classes},), got {tuple(weight.shape)}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(f"{fn}: the gradient with respect to {weight_name} (the "
                                      "class weights) is not supported; pass "
                                      f"{weight_name}.detach()")
    return target if target.dtype == torch.int64 else target.long()


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = -100,
    label_smoothing: float = 0.0,
    temperature: Temperature = 1.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Cross-entropy of ``input @ linear_weight.T + linear_bias`` without the N x V logits.

    Exactly (value and gradients)::

        z = F.linear(input, linear_weight, linear_bias)
        if softcap is not None: z = softcap * tanh(z / softcap)
        s = z / temperature
        loss = F.cross_entropy(s, target, weight, ignore_index=ignore_index,
                               label_smoothing=label_smoothing, reduction=reduction)
               + z_loss * lse(s)^2 counted per non-ignored row (summed for "sum", averaged over
                 the non-ignored rows for "mean", per row with 0 at ignored rows for "none")

    Args:
        input: (..., H) hidden states, float16/bfloat16/float32/float64.
        linear_weight: (V, H) output matrix, the input's dtype and device.
        target: (...) class indices in [0, V) or ignore_index, any integer dtype.
            Class-probability targets are not supported (TypeError).
        linear_bias: (V,) or None.
        weight: (V,) class weights or None (not differentiable).
        reduction: "mean", "sum" or "none".
        ignore_index: rows with this target contribute 0 (None: -100, as PyTorch's).
        label_smoothing: eps in [0, 1].
        temperature: a float > 0 or a 0-dim floating tensor; a tensor that requires grad gets
            dL/dT.
        z_loss: weight of lse(s)^2 (PaLM's z-loss), >= 0.
        softcap: None or c > 0: logits soft-capped to c tanh(z / c) before the temperature.
        return_lse: also return lse(s) per row, shape (...), float32 (float64 for float64
            input), differentiable.
        workspace_bytes: budget of the chunk buffers (default 128 MiB): the rows per chunk are
            workspace_bytes / (V x bytes per logit). Smaller: less memory, more GEMM calls.

    Returns:
        loss in the input's dtype (0-dim, or (...) for "none"), or (loss, lse).

    Gradients: input, linear_weight, linear_bias, a tensor temperature; dW and db are
    accumulated in float32 for bfloat16/float16. For "mean"/"sum" they are computed in the
    forward (three GEMMs in all) and scaled in the backward; "none" and a gradient through lse
    recompute the logits in the backward (four GEMMs). retain_graph works; double backward
    raises RuntimeError.
    """
    fn = "softcal.linear_cross_entropy"
    target = check_head(fn, input, linear_weight, target, linear_bias, weight)
    red = check_reduction(fn, reduction)
    ignore_index = check_ignore_index(fn, -100 if ignore_index is None else ignore_index)
    eps = check_label_smoothing(fn, label_smoothing)
    temperature = check_temperature(fn, temperature, input.device)
    z_loss, cap = check_extras(fn, z_loss, softcap)
    workspace_bytes = check_workspace(fn, workspace_bytes)
    if not isinstance(return_lse, bool):
        raise TypeError(f"{fn}: return_lse must be a bool, got {type(return_lse).__name__}")
    batch_shape, x, t, temp_t, temp_f = flat_rows(input, target, temperature)
    grad_on = torch.is_grad_enabled()
    loss, lse, _, _, _, _ = torch.ops.softcal.linear_cross_entropy(
        x, linear_weight, linear_bias, t, weight, temp_t, temp_f, eps, ignore_index, red, z_loss,
        cap, return_lse, workspace_bytes,
        grad_on and input.requires_grad, grad_on and linear_weight.requires_grad,
        grad_on and linear_bias is not None and linear_bias.requires_grad,
        grad_on and temp_t is not None and temp_t.requires_grad)
    if red == 0:
        loss = loss.reshape(batch_shape)
    if return_lse:
        return loss, lse.reshape(batch_shape)
    return loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """The output layer and its loss in one module, without the N x V logits.

    ``torch.nn.LinearCrossEntropyLoss``'s constructor arguments (the module owns
    ``self.linear``, a ``torch.nn.Linear(in_features, num_classes, bias=bias)``), plus
    temperature, z_loss, softcap and workspace_bytes::

        LinearCrossEntropyLoss(in_features, num_classes, *, out_features=(), bias=False,
                               device=None, dtype=None, reduction="mean", weight=None,
                               ignore_index=None, label_smoothing=0.0, options=None,
                               temperature=1.0, z_loss=0.0, softcap=None,
                               workspace_bytes=128 MiB)

    ``forward(input (..., in_features), target (...))`` is :func:`linear_cross_entropy` with
    ``self.linear.weight`` / ``self.linear.bias``. ``out_features`` (K-dimensional losses) must
    be ``()`` and ``options`` (PyTorch's chunking options) must be None: softcal always
    chunks, by ``workspace_bytes``. ``weight`` (class weights) is a buffer.
    """

    _fn = "softcal.nn.LinearCrossEntropyLoss"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: Tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        label_smoothing: float = 0.0,
        options=None,
        temperature: float = 1.0,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    ) -> None:
        super().__init__()
        fn = self._fn
        if tuple(out_features) != ():
            raise ValueError(f"{fn}: out_features must be () (K-dimensional losses are not "
                             f"supported by the fused LM head), got {tuple(out_features)!r}")
        if options is not None:
            raise ValueError(f"{fn}: options (PyTorch's chunking options) must be None: softcal "
                             f"always chunks, sized by workspace_bytes; got {options!r}")
        if weight is not None and not isinstance(weight, Tensor):
            raise TypeError(f"{fn}: weight must be a torch.Tensor or None, got "
                            f"{type(weight).__name__}")
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"{fn}: weight (class weights) must have shape ({num_classes},), got "
                             f"{tuple(weight.shape)}")
        check_reduction(fn, reduction)
        self.reduction = reduction
        self.ignore_index = ignore_index
        if ignore_index is not None:
            check_ignore_index(fn, ignore_index)
        self.label_smoothing = check_label_smoothing(fn, label_smoothing)
        if isinstance(temperature, Tensor):
            raise TypeError(f"{fn}: temperature must be a float here (pass a tensor to "
                            "softcal.linear_cross_entropy to learn one), got a tensor")
        self.temperature = check_temperature(fn, temperature, torch.device("cpu"))
        self.z_loss, cap = check_extras(fn, z_loss, softcap)
        self.softcap = cap if softcap is not None else None
        self.workspace_bytes = check_workspace(fn, workspace_bytes)
        self.num_classes = num_classes
        self.out_features = ()
        self.options = None
        self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device,
                                      dtype=dtype)
        self.register_buffer("weight", weight)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, temperature=self.temperature,
            z_loss=self.z_loss, softcap=self.softcap, workspace_bytes=self.workspace_bytes)

    def extra_repr(self) -> str:
        s = (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
             f"bias={self.linear.bias is not None}, reduction={self.reduction!r}, "
             f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}")
        if self.temperature != 1.0:
            s += f", temperature={self.temperature}"
        if self.z_loss:
            s += f", z_loss={self.z_loss}"
        if self.softcap is not None:
            s += f", softcap={self.softcap}"
        return s
