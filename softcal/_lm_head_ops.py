"""The LM head's custom ops: ``softcal::linear_cross_entropy`` and its backward.

``linear_cross_entropy(input (N, H), linear_weight (V, H), linear_bias (V,)?, target (N,), ...)``
returns ``(loss, lse, grad_input, grad_weight, grad_bias, grad_temperature)``. For "mean" and
"sum" with a gradient wanted, the gradients (for an upstream gradient of 1) are computed in the
forward, chunk by chunk (three GEMMs in all), and the backward only scales them. For "none",
and when a returned lse receives a gradient, the backward op
``linear_cross_entropy_backward`` recomputes each chunk's logits (four GEMMs in all). Unwanted
outputs are empty (0,) tensors. The ops are opaque to torch.compile (fake kernels below) and
registered with autograd; torch.library.opcheck tests them (tests/lm_head/test_lm_head_ops.py).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._lm_head_chunks import Problem, lm_head_loop, target_range_check

__all__ = ["linear_cross_entropy_op", "linear_cross_entropy_backward_op"]

_FN = "softcal.linear_cross_entropy"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return like.new_empty((0,), dtype=dtype if dtype is not None else like.dtype)


def _denominators(target: Tensor, weight: Optional[Tensor], ignore_index: int,
                  acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    """("mean"'s divisor of the cross-entropy: sum_i w_y over the non-ignored rows, their number,
    the z-loss's divisor)."""
    valid = target != ignore_index
    count = valid.sum().to(acc)
    if weight is None:
        return count, count
    safe = torch.where(valid, target, torch.zeros_like(target))
    zero = torch.zeros((), dtype=acc, device=target.device)
    return torch.where(valid, weight.to(acc)[safe], zero).sum(), count


def _units(target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: int,
           grad: Tensor, acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(a, b): d(reduced loss)/d(ce_i) and d(reduced loss)/d(z-loss_i) times the upstream grad.

    "mean" divides ce by sum_i w_y over the non-ignored rows and the z-loss by their number.
    With every row ignored the units are 0 (PyTorch's gradient is 0 there, its loss NaN); with
    rows whose weights sum to 0 they are inf (PyTorch's gradient is NaN there).
    """
    g = grad.to(acc)
    if reduction != 1:
        return g, g
    denom, count = _denominators(target, weight, ignore_index, acc)
    some = count > 0
    zero = torch.zeros((), dtype=acc, device=target.device)
    return torch.where(some, g / denom, zero), torch.where(some, g / count, zero)


def _problem(input, linear_weight, linear_bias, target, weight, temperature_t, temperature,
             label_smoothing, ignore_index, z_loss, softcap, workspace_bytes) -> Problem:
    target_range_check(_FN, target, linear_weight.shape[0], ignore_index)
    return Problem(input, linear_weight, linear_bias, target, weight, temperature_t, temperature,
                   label_smoothing, ignore_index, z_loss, softcap, workspace_bytes)


def _cast_grads(gw, gb, gt, linear_weight, linear_bias, temperature_t):
    gw = gw.to(linear_weight.dtype) if gw is not None else _empty(linear_weight)
    gb = gb.to(linear_bias.dtype) if gb is not None else _empty(linear_weight)
    gt = gt.to(temperature_t.dtype) if gt is not None else _empty(linear_weight)
    return gw, gb, gt


@torch.library.custom_op("softcal::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    input: Tensor, linear_weight: Tensor, linear_bias: Optional[Tensor], target: Tensor,
    weight: Optional[Tensor], temperature_t: Optional[Tensor], temperature: float,
    label_smoothing: float, ignore_index: int, reduction: int, z_loss: float, softcap: float,
    return_lse: bool, workspace_bytes: int, need_input_grad: bool, need_weight_grad: bool,
    need_bias_grad: bool, need_temperature_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss, lse and (for "mean"/"sum" with need_*_grad) the gradients at an upstream gradient
    of 1. input (N, H), linear_weight (V, H), linear_bias (V,) or None, target (N,) int64,
    weight (V,) or None, all of the input's dtype; softcap 0 means none; reduction 0/1/2 =
    none/mean/sum. Returns loss ((N,) or 0-dim, the input's dtype), lse ((N,) acc or empty),
    grad_input (N, H), grad_weight (V, H), grad_bias (V,), grad_temperature (0-dim) or empties."""
    p = _problem(input, linear_weight, linear_bias, target, weight, temperature_t, temperature,
                 label_smoothing, ignore_index, z_loss, softcap, workspace_bytes)
    acc = _acc(input.dtype)
    need_t = need_temperature_grad and temperature_t is not None
    need_b = need_bias_grad and linear_bias is not None
    want_grad = reduction != 0 and (need_input_grad or need_weight_grad or need_b or need_t)
    one = torch.ones((), dtype=acc, device=input.device)
    a, b = _units(target, weight, ignore_index, reduction, one, acc)
    ce, zrow, lse, gx, gw, gb, gt = lm_head_loop(
        p, want_grad=want_grad, a_unit=a, b_unit=b, grad_lse=None, want_lse=return_lse,
        need_input_grad=need_input_grad, need_weight_grad=need_weight_grad,
        need_bias_grad=need_b, need_temperature_grad=need_t)
    # the rows' sums in float64 (the precision policy of the kernels' own reductions)
    if reduction == 0:
        loss = ce + zrow if z_loss else ce
    elif reduction == 2:
        loss = ce.sum(dtype=torch.float64) + zrow.sum(dtype=torch.float64) if z_loss \
            else ce.sum(dtype=torch.float64)
    else:
        denom, count = _denominators(target, weight, ignore_index, acc)
        loss = ce.sum(dtype=torch.float64) / denom.double()
        if z_loss:
            loss = loss + zrow.sum(dtype=torch.float64) / count.double()
    gw, gb, gt = _cast_grads(gw, gb, gt, linear_weight, linear_bias, temperature_t)
    return (loss.to(input.dtype), lse if lse is not None else _empty(input, acc),
            gx if gx is not None else _empty(input), gw, gb, gt)


@linear_cross_entropy_op.register_fake
def _linear_cross_entropy_fake(input, linear_weight, linear_bias, target, weight, temperature_t,
                               temperature, label_smoothing, ignore_index, reduction, z_loss,
                               softcap, return_lse, workspace_bytes, need_input_grad,
                               need_weight_grad, need_bias_grad, need_temperature_grad):
    rows = input.shape[0]
    acc = _acc(input.dtype)
    need_t = need_temperature_grad and temperature_t is not None
    need_b = need_bias_grad and linear_bias is not None
    want = reduction != 0 and (need_input_grad or need_weight_grad or need_b or need_t)
    loss = input.new_empty((rows,) if reduction == 0 else ())
    lse = input.new_empty((rows,) if return_lse else (0,), dtype=acc)
    gx = torch.empty_like(input, memory_format=torch.contiguous_format) \
        if want and need_input_grad else _empty(input)
    gw = torch.empty_like(linear_weight, memory_format=torch.contiguous_format) \
        if want and need_weight_grad else _empty(linear_weight)
    gb = linear_bias.new_empty(linear_bias.shape) if want and need_b else _empty(linear_weight)
    gt = temperature_t.new_empty(()) if want and need_t else _empty(linear_weight)
    return loss, lse, gx, gw, gb, gt


@torch.library.custom_op("softcal::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    grad_loss: Tensor, grad_lse: Optional[Tensor], input: Tensor, linear_weight: Tensor,
    linear_bias: Optional[Tensor], target: Tensor, weight: Optional[Tensor],
    temperature_t: Optional[Tensor], temperature: float, label_smoothing: float,
    ignore_index: int, reduction: int, z_loss: float, softcap: float, workspace_bytes: int,
    need_input_grad: bool, need_weight_grad: bool, need_bias_grad: bool,
    need_temperature_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of input, linear_weight, linear_bias and temperature_t for the upstream
    gradients grad_loss (the loss's shape) and grad_lse ((N,) or None), the logits recomputed
    chunk by chunk. Unwanted gradients are empty (0,) tensors."""
    p = _problem(input, linear_weight, linear_bias, target, weight, temperature_t, temperature,
                 label_smoothing, ignore_index, z_loss, softcap, workspace_bytes)
    acc = _acc(input.dtype)
    need_t = need_temperature_grad and temperature_t is not None
    need_b = need_bias_grad and linear_bias is not None
    a, b = _units(target, weight, ignore_index, reduction, grad_loss, acc)
    _, _, _, gx, gw, gb, gt = lm_head_loop(
        p, want_grad=True, a_unit=a, b_unit=b, grad_lse=grad_lse, want_lse=False,
        need_input_grad=need_input_grad, need_weight_grad=need_weight_grad,
        need_bias_grad=need_b, need_temperature_grad=need_t)
    gw, gb, gt = _cast_grads(gw, gb, gt, linear_weight, linear_bias, temperature_t)
    return gx if gx is not None else _empty(input), gw, gb, gt


@linear_cross_entropy_backward_op.register_fake
def _linear_cross_entropy_backward_fake(grad_loss, grad_lse, input, linear_weight, linear_bias,
                                        target, weight, temperature_t, temperature,
                                        label_smoothing, ignore_index, reduction, z_loss, softcap,
                                        workspace_bytes, need_input_grad, need_weight_grad,
                                        need_bias_grad, need_temperature_grad):
    need_t = need_temperature_grad and temperature_t is not None
    need_b = need_bias_grad and linear_bias is not None
    gx = torch.empty_like(input, memory_format=torch.contiguous_format) \
        if need_input_grad else _empty(input)
    gw = torch.empty_like(linear_weight, memory_format=torch.contiguous_format) \
        if need_weight_grad else _empty(linear_weight)
    gb = linear_bias.new_empty(linear_bias.shape) if need_b else _empty(linear_weight)
    gt = temperature_t.new_empty(()) if need_t else _empty(linear_weight)
    return gx, gw, gb, gt


# ---------------------------------------------------------------------- autograd
_N_INPUTS = 18


def _setup_context(ctx, inputs, output):
    (input, linear_weight, linear_bias, target, weight, temperature_t, temperature, eps,
     ignore_index, reduction, z_loss, softcap, return_lse, workspace_bytes, need_in, need_w,
     need_b, need_t) = inputs
    _, lse, gx, gw, gb, gt = output
    in_forward = reduction != 0 and (need_in or need_w or (need_b and linear_bias is not None)
                                     or (need_t and temperature_t is not None))
    ctx.in_forward = in_forward
    ctx.scalars = (temperature, eps, ignore_index, reduction, z_loss, softcap, workspace_bytes)
    ctx.rows = input.shape[0]
    ctx.has_bias = linear_bias is not None
    ctx.has_t = temperature_t is not None
    ctx.return_lse = return_lse
    # The inputs are kept only where a backward may recompute the logits ("none", or a
    # gradient reaching the returned lse): otherwise the hidden states could be freed.
    keep = not in_forward or return_lse
    ctx.save_for_backward(input if keep else None, linear_weight if keep else None,
                          linear_bias if keep else None, target, weight, temperature_t,
                          gx, gw, gb, gt)
    ctx.mark_non_differentiable(gx, gw, gb, gt)
    if not return_lse:
        ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _scaled(saved: Tensor, grad: Tensor) -> Tensor:
    """saved * grad (0-dim), the saved tensor itself for an upstream gradient of exactly 1 on
    the CPU (autograd then takes it as the .grad without a copy when the graph is freed)."""
    if (type(grad) is torch.Tensor and grad.device.type == "cpu"  # eager: no fake or traced tensor
            and not torch.compiler.is_compiling() and not torch._is_functional_tensor(grad)
            and float(grad) == 1.0):
        return saved
    return saved * grad.to(saved.dtype)


def _backward(ctx, grad_loss, grad_lse, *unused):
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{_FN}: double backward (backward with create_graph=True) is not supported: the "
            "gradients are computed chunk by chunk without a graph of their own; compute the "
            "logits with F.linear and use softcal.cross_entropy for second derivatives")
    (input, linear_weight, linear_bias, target, weight, temperature_t,
     gx, gw, gb, gt) = ctx.saved_tensors
    out = [None] * _N_INPUTS
    need = ctx.needs_input_grad
    if grad_loss is None and grad_lse is None:
        return tuple(out)
    if ctx.in_forward and grad_lse is None:
        if need[0]:
            out[0] = _scaled(gx, grad_loss)
        if need[1]:
            out[1] = _scaled(gw, grad_loss)
        if need[2] and ctx.has_bias:
            out[2] = _scaled(gb, grad_loss)
        if need[5] and ctx.has_t:
            out[5] = _scaled(gt, grad_loss)
        return tuple(out)
    temperature, eps, ignore_index, reduction, z_loss, softcap, workspace_bytes = ctx.scalars
    if grad_loss is None:
        shape = (ctx.rows,) if reduction == 0 else ()
        grad_loss = torch.zeros(shape, dtype=input.dtype, device=input.device)
    rx, rw, rb, rt = torch.ops.softcal.linear_cross_entropy_backward(
        grad_loss, grad_lse, input, linear_weight, linear_bias, target, weight, temperature_t,
        temperature, eps, ignore_index, reduction, z_loss, softcap, workspace_bytes,
        need[0], need[1], need[2] and linear_bias is not None,
        need[5] and temperature_t is not None)
    out[0] = rx if need[0] else None
    out[1] = rw if need[1] else None
    out[2] = rb if need[2] and linear_bias is not None else None
    out[5] = rt if need[5] and temperature_t is not None else None
    return tuple(out)


torch.library.register_autograd("softcal::linear_cross_entropy", _backward,
                                setup_context=_setup_context)
