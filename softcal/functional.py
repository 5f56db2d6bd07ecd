"""Functional API: cross_entropy, softmax and log_softmax with a temperature.

Same argument names and defaults as torch.nn.functional, plus `temperature`. Each function runs
the compiled kernel for the input's device when the extension has one (softcal.backend() says
which), and the pure-PyTorch reference otherwise.
"""

from __future__ import annotations

import warnings
import math
from typing import Optional, Tuple, Union

import torch

from . import _ops, _soft, reference
from ._validation import (
    check_ignore_index,
    check_inplace_leaf,
    check_label_smoothing,
    check_logits,
    check_reduction,
    check_target,
    check_temperature,
    check_weight,
    flatten_classes,
    _unit_class_stride,
)

__all__ = ["cross_entropy", "softmax", "log_softmax", "temperature_stats"]

Temperature = Union[float, torch.Tensor]

_warned_devices = set()


def _use_kernel(device: torch.device) -> bool:
    if _ops.has_kernel(device.type):
        return True
    if _ops.HAVE_EXTENSION and device.type not in _warned_devices and device.type != "meta":
        _warned_devices.add(device.type)
        warnings.warn(
            f"softcal: the compiled extension has no {device.type} kernels; using the pure-PyTorch "
            "reference on this device",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def _split_temperature(temperature):
    if isinstance(temperature, torch.Tensor):
        return temperature, 1.0
    return None, float(temperature)


def _fused(x, t, weight, temp_t, temp_f, eps, ignore_index, red, need_t, inplace, zl=0.0,
           cap=0.0, want_lse=False):
    """The fused modes (custom ops; autograd registered in softcal._ops): (loss, the rows'
    [m, ls] (rows, 2) acc when want_lse, else None)."""
    if not inplace:
        loss, _, _ = torch.ops.softcal.cross_entropy_fused(x, t, weight, temp_t, temp_f, eps,
                                                          ignore_index, red, need_t, zl, cap)
        lse2 = None
        if want_lse:  # (the fused op returns no lse: one more read of the logits for it)
            _, lse2, _ = torch.ops.softcal.cross_entropy_fwd(
                x.detach(), t, weight, temp_t.detach() if temp_t is not None else None, temp_f,
                eps, ignore_index, 0, zl, cap, True)
        return loss, lse2
    if not x.is_contiguous():
        x = x.contiguous()
    # The gradient is written into the logits' buffer through a detached alias (the write is no
    # operation of autograd's; it moves the version counter that the alias shares with x, so an
    # op that saved x raises at backward). cross_entropy_inplace_loss then carries the autograd.
    detached_t = temp_t.detach() if temp_t is not None else None
    lse2 = x.new_empty((x.shape[0], 2), dtype=_ops._acc(x.dtype)) if want_lse else None
    loss, grad_t = torch.ops.softcal.cross_entropy_fused_(x.detach(), t, weight, detached_t, temp_f,
                                                          eps, ignore_index, red, need_t, zl, cap,
                                                          lse2)
    return torch.ops.softcal.cross_entropy_inplace_loss(x, loss, temp_t, grad_t), lse2


def _legacy_reduction(size_average: Optional[bool], reduce: Optional[bool]) -> str:
    """PyTorch's deprecated size_average/reduce -> reduction, with PyTorch's warning (the same
    text, so that filters written for PyTorch's apply)."""
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if size_average and reduce:
        reduction = "mean"
    elif reduce:
        reduction = "sum"
    else:
        reduction = "none"
    warnings.warn(
        f"size_average and reduce args will be deprecated, please use reduction='{reduction}' "
        "instead.",
        UserWarning,
        stacklevel=3,
    )
    return reduction


def _check_llm_options(fn: str, z_loss, softcap, return_lse) -> Tuple[float, float]:
    """(z_loss, softcap as the kernels take it: 0.0 for none), or a clear error."""
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)):
        raise TypeError(f"{fn}: z_loss must be a float, got {type(z_loss).__name__}")
    if not 0 <= z_loss < math.inf:  # (comparisons: NaN fails; torch.compile traces them)
        raise ValueError(f"{fn}: z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"{fn}: softcap must be a float or None, got {type(softcap).__name__}")
        if not 0 < softcap < math.inf:
            raise ValueError(f"{fn}: softcap must be a finite number > 0 or None, got {softcap}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"{fn}: return_lse must be a bool, got {type(return_lse).__name__}")
    return float(z_loss), float(softcap) if softcap is not None else 0.0


def _lse_of(lse2: torch.Tensor, temp_t: Optional[torch.Tensor], temp_f: float) -> torch.Tensor:
    """lse = m / T + ls from the kernels' per-row [m, ls] (acc dtype, detached)."""
    m, ls = lse2[:, 0], lse2[:, 1]
    if temp_t is not None:
        return m / temp_t.detach().to(lse2.dtype) + ls
    return m / temp_f + ls


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: Optional[bool] = None,
    ignore_index: int = -100,
    reduce: Optional[bool] = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    temperature: Temperature = 1.0,
    fused: bool = False,
    inplace: bool = False,
    loss_dtype: Optional[torch.dtype] = None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Temperature-scaled, label-smoothed cross-entropy.

    Equals ``F.cross_entropy(input / temperature, target, weight, ignore_index=ignore_index,
    reduction=reduction, label_smoothing=label_smoothing)``, and takes PyTorch's arguments in
    PyTorch's order (``cross_entropy(x, t, w)`` passes class weights); softcal's own arguments
    are keyword-only after them. With the LLM options (docs/loss.md),
    ``F.cross_entropy(s, ...) + z_loss * lse(s)**2`` with
    ``s = softcap * tanh(input / softcap) / temperature``.

    Args:
        input: the logits: (C,), (N, C) or (N, C, d1, ...); float16, bfloat16, float32 or
            float64; any strides (views are read in place when the classes have a unit stride,
            else copied once into (rows, C)).
        target: class indices of shape (), (N,) or (N, d1, ...); any integer dtype. Or class
            probabilities: a floating tensor of the logits' shape and device, in the logits'
            dtype or float32 for float16/bfloat16 logits (mixup, distillation); then "mean"
            divides by the number of rows and the target gets its gradient too (see
            softcal._soft).
        weight: (C,) class weights on the logits' device, any floating dtype (read in the
            accumulation precision: float32 for float16/bfloat16 logits); not differentiable.
        size_average, reduce: deprecated (as in PyTorch); when either is given, ``reduction``
            is derived from them as PyTorch does, with PyTorch's deprecation warning.
        ignore_index: rows with this target contribute 0 and are not counted by "mean".
        reduction: "mean", "sum" or "none".
        label_smoothing: eps in [0, 1]; the target distribution is (1 - eps) one-hot + eps / C.
        temperature: a float > 0 or a 0-dim floating tensor on the logits' device; when the
            tensor requires grad, autograd also returns dL/dT.
        fused: compute the gradient during the forward (one read and one write of the logits
            in all); backward only rescales it by the upstream gradient. Saves the gradient
            (logits-sized) from forward to backward instead of the per-row log-sum-exp.
        inplace: with fused=True, write the gradient into the logits' own buffer (their values
            are lost; no memory beyond the logits is used). Only for logits that nothing else
            needs after this call, such as the output of the last linear layer. The write moves
            the logits' version counter, so an op that saved them for its backward (exp, tanh,
            softmax, ...) raises at backward instead of reading the gradient. Nothing is written
            when no gradient is needed, nor into logits whose layout needs a copy.
        loss_dtype: the dtype of the returned loss (None: the logits' dtype, or float32 for
            float16/bfloat16 logits under torch.autocast, as PyTorch). The kernels accumulate
            in float32 for half types, so ``loss_dtype=torch.float32`` gives the loss to
            float32 precision (for loops that sum many losses) at no cost.
        z_loss: z >= 0: adds z lse(s)^2 per non-ignored row (PaLM's z-loss), summed for "sum",
            divided by the number of non-ignored rows for "mean" (not by the class weights' sum),
            per row (0 at ignored rows) for "none".
        softcap: c > 0 or None: each logit becomes c tanh(logit / c) before the temperature
            (Gemma 2's logit soft-capping; a -inf logit becomes -c).
        return_lse: also return lse(s) = log sum_c exp(s_c) of every row (ignored rows' too),
            in the accumulation dtype (float32 for float16/bfloat16), the batch shape, detached
            (no gradient flows through it); NaN for a row with a NaN or +inf logit or, without
            a softcap, every logit -inf.

    Autocast: under ``torch.autocast`` the loss is float32 for float16/bfloat16 logits, and
    float32 class weights and probability targets are accepted with them, as PyTorch does;
    the logits are read in their own dtype, never copied to float32 (a probability target of
    another dtype is cast to float32).

    Second derivatives: with fused=False, backward(create_graph=True) returns gradients that
    are differentiable (with respect to the logits and a tensor temperature); fused=True raises.

    Returns:
        The loss in ``loss_dtype`` (by default the logits' dtype; float32 under autocast for
        half types): 0-dim for "mean"/"sum", the batch shape for "none". float16/bfloat16
        are computed in float32 inside the kernel. With return_lse,
        (loss, lse).
    """
    logits = input
    fn = "softcal.cross_entropy"
    zl, cap = _check_llm_options(fn, z_loss, softcap, return_lse)
    check_logits(fn, logits)
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce)
    autocast = _autocast_enabled(logits.device)
    out_dtype = _loss_dtype(fn, logits, loss_dtype, autocast)
    if autocast and isinstance(target, torch.Tensor):
        target = _autocast_target(logits, target)
    result = _cross_entropy(fn, logits, target, weight, ignore_index, reduction, label_smoothing,
                            temperature, fused, inplace, zl, cap, return_lse)
    loss, lse = result if return_lse else (result, None)
    loss = loss if loss.dtype == out_dtype else loss.to(out_dtype)
    return (loss, lse) if return_lse else loss


_HALF = (torch.float16, torch.bfloat16)
_LOSS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _autocast_enabled(device: torch.device) -> bool:
    return torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)


def _check_loss_dtype(fn: str, loss_dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    if loss_dtype is not None and loss_dtype not in _LOSS_DTYPES:
        raise TypeError(f"{fn}: loss_dtype must be None or one of torch.float16, torch.bfloat16, "
                        f"torch.float32, torch.float64, got {loss_dtype!r}")
    return loss_dtype


def _loss_dtype(fn: str, logits: torch.Tensor, loss_dtype: Optional[torch.dtype],
                autocast: bool) -> torch.dtype:
    """loss_dtype if given; else float32 for half logits under autocast (PyTorch's autocast
    runs cross_entropy in float32), else the logits' dtype."""
    if _check_loss_dtype(fn, loss_dtype) is not None:
        return loss_dtype
    return torch.float32 if autocast and logits.dtype in _HALF else logits.dtype


def _autocast_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Under autocast, a probability target in a floating dtype that the kernels do not read
    beside these logits (they read the logits' own, and float32 beside half logits) is cast
    to float32 (to the logits' dtype for float64 logits), as autocast casts it."""
    if (not target.dtype.is_floating_point or target.dtype == logits.dtype
            or (target.dtype == torch.float32 and logits.dtype in _HALF)
            or target.shape != logits.shape):  # not probabilities: check_target says why
        return target
    return target.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)


def _cross_entropy(fn, logits, target, weight, ignore_index, reduction, label_smoothing,
                   temperature, fused, inplace, zl=0.0, cap=0.0, return_lse=False):
    """softcal.cross_entropy after the choice of the loss dtype: the loss as the kernel returns
    it (the accumulation dtype: float32 for half types) or the reference (the logits' dtype)."""
    target = check_target(fn, logits, target, probabilities=True)
    weight = check_weight(fn, logits, weight)
    temperature = check_temperature(fn, temperature, logits.device)
    eps = check_label_smoothing(fn, label_smoothing)
    red = check_reduction(fn, reduction)
    ignore_index = check_ignore_index(fn, ignore_index)
    if inplace and not fused:
        raise ValueError(f"{fn}: inplace=True needs fused=True, got fused={fused!r}")
    check_inplace_leaf(fn, logits, inplace)
    if target.dtype.is_floating_point:  # class probabilities of the logits' shape: softcal._soft
        for name, on in (("z_loss", zl != 0), ("softcap", cap != 0), ("return_lse", return_lse)):
            if on:
                raise NotImplementedError(
                    f"{fn}: {name} is not supported with class-probability targets (floating "
                    f"target of the logits' shape); use class-index targets")
        return _soft.soft_cross_entropy(
            fn, logits, target, temperature=temperature, label_smoothing=eps, weight=weight,
            ignore_index=ignore_index, reduction=reduction, fused=fused, inplace=inplace,
            use_kernel=_use_kernel(logits.device))
    if not _use_kernel(logits.device):
        return reference.cross_entropy(logits, target, temperature=temperature,
                                       label_smoothing=eps, weight=weight,
                                       ignore_index=ignore_index, reduction=reduction,
                                       z_loss=zl, softcap=cap or None,
                                       return_lse=return_lse)
    x, t, batch_shape = flatten_classes(logits, target)
    temp_t, temp_f = _split_temperature(temperature)
    need_t = temp_t is not None and temp_t.requires_grad
    lse2 = None
    if fused and torch.is_grad_enabled() and (logits.requires_grad or need_t):
        loss, lse2 = _fused(x, t, weight, temp_t, temp_f, eps, ignore_index, red, need_t, inplace,
                            zl, cap, return_lse)
    else:
        loss, lse2, _ = torch.ops.softcal.cross_entropy_fwd(x, t, weight, temp_t, temp_f, eps,
                                                           ignore_index, red, zl, cap, return_lse)
    # the kernels return the loss in the accumulation dtype (float32 for half types):
    # cross_entropy rounds it once, to the loss dtype
    if red == 0:
        loss = loss.reshape(batch_shape)
    if not return_lse:
        return loss
    return loss, _lse_of(lse2, temp_t, temp_f).reshape(batch_shape)


def _softmax(fn: str, x: torch.Tensor, temperature: Temperature, dim: int, log: bool):
    check_logits(fn, x, name="input")
    temperature = check_temperature(fn, temperature, x.device)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{fn}: dim must be an int, got {type(dim).__name__}")
    ndim = max(x.dim(), 1)
    if not -ndim <= dim < ndim:
        raise IndexError(f"{fn}: dim {dim} is out of range for a tensor of {x.dim()} dimensions")
    dim = dim % ndim
    if not _use_kernel(x.device):
        return reference._softmax_impl(x, temperature, dim, log)
    temp_t, temp_f = _split_temperature(temperature)
    if x.dim() == 0:
        return torch.ops.softcal.softmax_fwd(x.reshape(1), temp_t, temp_f, 0, log).reshape(())
    return torch.ops.softcal.softmax_fwd(x, temp_t, temp_f, dim, log)


def softmax(x: torch.Tensor, temperature: Temperature = 1.0, dim: int = -1) -> torch.Tensor:
    """softmax(x / temperature) along dim, numerically stable in the kernel.

    x: any shape, float16/bfloat16/float32/float64 (computed in float32 at least); the result
    has x's shape and dtype. A slice that is entirely -inf gives NaN, as torch.softmax.
    """
    return _softmax("softcal.softmax", x, temperature, dim, log=False)


def log_softmax(x: torch.Tensor, temperature: Temperature = 1.0, dim: int = -1) -> torch.Tensor:
    """log_softmax(x / temperature) along dim; see softmax."""
    return _softmax("softcal.log_softmax", x, temperature, dim, log=True)


def temperature_stats(logits: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Sufficient statistics for fitting a temperature, at beta = 1/T, in one pass.

    Args:
        logits: (N, C) float16/bfloat16/float32/float64. target: (N,) integer class indices.
    Returns:
        float64 tensor [sum_i NLL_i, sum_i (E_p[x_i] - x_i,y), sum_i Var_p[x_i], N]: the NLL at
        beta and its first and second derivatives with respect to beta.
    """
    fn = "softcal.temperature_stats"
    check_logits(fn, logits)
    if logits.dim() != 2:
        raise ValueError(f"{fn}: logits must be 2-D (N, C), got shape {tuple(logits.shape)}")
    target = check_target(fn, logits, target)
    beta = float(beta)
    if not (beta > 0 and beta < float("inf")):
        raise ValueError(f"{fn}: beta must be a finite number > 0, got {beta}")
    if not _use_kernel(logits.device):
        return reference.temperature_stats(logits, target, beta)
    return torch.ops.softcal.temperature_stats(_unit_class_stride(logits), target, beta)
