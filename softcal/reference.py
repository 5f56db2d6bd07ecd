"""The same maths as the kernels, in plain PyTorch.

Two roles: the oracle of the tests (evaluated in float64) and the fallback when the compiled
extension is not available. Every function here is differentiable by autograd, the temperature
included when it is a tensor. The formulas are written out in csrc/common.h; these functions
follow the same conventions for edge cases (fully masked rows, masked logits and the temperature
gradient, ignored rows).

Inputs are assumed valid (softcal.functional checks them); target values are checked here.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ._validation import flatten_classes

__all__ = [
    "cross_entropy",
    "soft_cross_entropy",
    "softmax",
    "log_softmax",
    "temperature_stats",
    "shard_stats",
    "shard_grad",
    "shard_grad_",
]

Temperature = Union[float, torch.Tensor]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scale(x: torch.Tensor, temperature: Temperature) -> torch.Tensor:
    """z = x / T, with masked logits (-inf) kept at -inf: their T-gradient is 0, their
    x-gradient carries beta = 1/T as every other logit's (the smoothing term's -(eps/C) w_c)."""
    if isinstance(temperature, torch.Tensor):
        masked = torch.isneginf(x)
        safe = torch.where(masked, torch.zeros_like(x), x)
        t = temperature.to(x.dtype)
        return torch.where(masked, x * (1.0 / t).detach(), safe / t)
    return x / temperature


def _check_targets(target: torch.Tensor, n_classes: int, ignore_index: int) -> torch.Tensor:
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"softcal.cross_entropy: target[{idx}] = {int(target[idx])} is out of range for "
            f"{n_classes} classes (ignore_index = {ignore_index})"
        )
    return valid


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: Temperature = 1.0,
    label_smoothing: float = 0.0,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    return_lse: bool = False,
):
    """F.cross_entropy(logits / T, ...) computed explicitly in the accumulation dtype.

    With softcap c the logits are first capped, x -> c tanh(x / c); z_loss adds z lse^2 per
    non-ignored row (summed for "sum", divided by the number of non-ignored rows for "mean");
    return_lse also returns lse = log sum exp(x / T) of every row (acc dtype, batch shape).
    """
    x, t, batch_shape = flatten_classes(logits, target.long())
    rows, n_classes = x.shape
    acc = _acc_dtype(x.dtype)
    eps = float(label_smoothing)
    valid = _check_targets(t, n_classes, ignore_index)
    xa = x.to(acc)
    if softcap:
        xa = softcap * torch.tanh(xa / softcap)
    # Ignored rows contribute nothing; zero them so that a fully masked ignored row stays finite.
    xa_all = xa
    xa = torch.where(valid[:, None], xa, torch.zeros((), dtype=acc, device=x.device))
    z = _scale(xa, temperature)
    m = z.amax(dim=1, keepdim=True) if n_classes > 0 else z.sum(1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m).detach()
    lse = m + torch.log(torch.exp(z - m).sum(dim=1, keepdim=True))
    logp = z - lse
    t_safe = torch.where(valid, t, torch.zeros_like(t))
    w = weight.to(acc) if weight is not None else None
    w_y = w[t_safe] if w is not None else torch.ones(rows, dtype=acc, device=x.device)
    zero = torch.zeros((), dtype=acc, device=x.device)
    nll = -logp.gather(1, t_safe[:, None]).squeeze(1) * w_y
    loss = (1.0 - eps) * nll
    if eps > 0:
        smooth = -(logp * w).sum(1) if w is not None else -logp.sum(1)
        loss = loss + (eps / n_classes) * smooth
    loss = torch.where(valid, loss, zero)
    zrow = torch.where(valid, z_loss * lse.squeeze(1).square(), zero) if z_loss else None
    denom = torch.where(valid, w_y, zero).sum()
    if reduction == "none":
        out = (loss if zrow is None else loss + zrow).reshape(batch_shape)
    elif reduction == "sum":
        out = loss.sum() if zrow is None else loss.sum() + zrow.sum()
    else:
        out = loss.sum() / denom
        if zrow is not None:
            out = out + zrow.sum() / valid.sum().to(acc)
    out = out.to(logits.dtype)
    if not return_lse:
        return out
    za = _scale(xa_all, temperature)
    if n_classes > 0:
        ma = za.amax(dim=1, keepdim=True)
        ma = torch.where(torch.isfinite(ma), ma, torch.zeros_like(ma)).detach()
        lse_all = (ma + torch.log(torch.exp(za - ma).sum(dim=1, keepdim=True))).squeeze(1)
    else:
        lse_all = torch.full((rows,), float("-inf"), dtype=acc, device=x.device)
    return out, lse_all.reshape(batch_shape)


def _softmax_impl(x: torch.Tensor, temperature: Temperature, dim: int, log: bool) -> torch.Tensor:
    acc = _acc_dtype(x.dtype)
    z = _scale(x.to(acc), temperature)
    out = torch.log_softmax(z, dim=dim) if log else torch.softmax(z, dim=dim)
    return out.to(x.dtype)


def softmax(x: torch.Tensor, temperature: Temperature = 1.0, dim: int = -1) -> torch.Tensor:
    """softmax(x / T) along dim."""
    return _softmax_impl(x, temperature, dim, log=False)


def log_softmax(x: torch.Tensor, temperature: Temperature = 1.0, dim: int = -1) -> torch.Tensor:
    """log_softmax(x / T) along dim."""
    return _softmax_impl(x, temperature, dim, log=True)


def temperature_stats(logits: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """[sum NLL(beta), sum (E_p[x] - x_y), sum Var_p[x], rows] in float64, p = softmax(beta x)."""
    x = logits.to(torch.float64)
    t = target.long().reshape(-1, 1)
    z = beta * x
    logp = torch.log_softmax(z, dim=1)
    p = logp.exp()
    x_y = x.gather(1, t).squeeze(1)
    nll = -logp.gather(1, t).squeeze(1)
    # Centre on the row max for a stable variance; masked logits (-inf) have p = 0.
    xmax = x.amax(1, keepdim=True)
    d = torch.where(p > 0, x - xmax, torch.zeros_like(x))
    mean_d = (p * d).sum(1)
    var = ((p * (d - mean_d[:, None]) ** 2)).sum(1)
    dnll = mean_d + xmax.squeeze(1) - x_y
    rows = float(x.shape[0])
    return torch.stack([nll.sum(), dnll.sum(), var.sum(), torch.tensor(rows, dtype=torch.float64, device=x.device)])


# ---------------------------------------------------------------------------------------------
# Vocabulary-parallel cross-entropy: the local work of one rank (softcal.distributed).
#
# Each rank holds x: (rows, C_local), the logits of its class slice [class_offset,
# class_offset + C_local), the full GLOBAL targets, and its (C_local,) slice of the weights.
# beta = 1/T; "acc" is float32 for float16/bfloat16/float32 inputs, float64 for float64.
# These are the exact semantics of the compiled ops torch.ops.softcal.shard_stats /
# shard_grad / shard_grad_ (not differentiable; the autograd lives in
# softcal.distributed).


def _beta(x: torch.Tensor, temperature_t: Optional[torch.Tensor], temperature: float):
    if temperature_t is not None:
        return 1.0 / temperature_t.detach().to(x.dtype)
    return 1.0 / float(temperature)


def _in_slice(target: torch.Tensor, class_offset: int, n_local: int):
    local = target - class_offset
    inside = (local >= 0) & (local < n_local)
    return inside, torch.where(inside, local, torch.zeros_like(local))


@torch.no_grad()
def shard_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    temperature_t: Optional[torch.Tensor],
    temperature: float,
    class_offset: int,
    ignore_index: int,
    smoothing: bool,
) -> torch.Tensor:
    """Per-row partial statistics of this rank's class slice.

    Args:
        logits: (rows, C_local) float16/bfloat16/float32/float64, the slice's logits.
        target: (rows,) int64 GLOBAL class indices (or ignore_index).
        weight: (C_local,) this slice's class weights (logits' dtype) or None.
        temperature_t / temperature: the temperature as a 0-dim tensor, or a float when None.
        class_offset: global index of the slice's first class.
        smoothing: whether d (the smoothing sum) is wanted.

    Returns:
        (rows, 4) acc: per row [m, ls, d, xy] with
        m = max_c x_c (raw logits; -inf for an all -inf row),
        ls = log sum_c exp(beta (x_c - m)) (-inf when m = -inf),
        d = sum_c w_c (m - x_c) when smoothing, else 0 (0 when m = -inf),
        xy = x[target - class_offset] when the target lies in the slice, else 0.
        Rows whose target is ignore_index are all 0. NaN logits give NaN.
    """
    acc = _acc_dtype(logits.dtype)
    x = logits.to(acc)
    rows, n_local = x.shape
    beta = _beta(x, temperature_t, temperature)
    zero = torch.zeros((), dtype=acc, device=x.device)
    if n_local > 0:
        m = x.amax(dim=1)
    else:
        m = torch.full((rows,), float("-inf"), dtype=acc, device=x.device)
    finite_m = ~torch.isneginf(m)
    m_safe = torch.where(finite_m, m, zero)
    ls = torch.log(torch.exp(beta * (x - m_safe[:, None])).sum(dim=1))
    ls = torch.where(finite_m, ls, torch.full_like(ls, float("-inf")))
    if smoothing:
        diff = m_safe[:, None] - x
        if weight is not None:
            diff = weight.to(acc)[None, :] * diff
        d = torch.where(finite_m, diff.sum(dim=1), zero)
    else:
        d = torch.zeros_like(m)
    inside, local = _in_slice(target, class_offset, n_local)
    if n_local > 0:
        xy = torch.where(inside, x.gather(1, local[:, None]).squeeze(1), zero)
    else:
        xy = torch.zeros_like(m)
    out = torch.stack([m, ls, d, xy], dim=1)
    valid = (target != ignore_index)[:, None]
    return torch.where(valid, out, zero)


def _shard_grad_impl(logits, target, weight, lse, coef, temperature_t, temperature, smooth_coef,
                     class_offset, ignore_index, need_logits_grad, need_temperature_grad):
    acc = _acc_dtype(logits.dtype)
    x = logits.to(acc)
    rows, n_local = x.shape
    beta = _beta(x, temperature_t, temperature)
    zero = torch.zeros((), dtype=acc, device=x.device)
    big_m, big_ls = lse[:, 0:1].to(acc), lse[:, 1:2].to(acc)
    g, a_coef, ty = (coef[:, k:k + 1].to(acc) for k in range(3))
    masked = torch.isneginf(x)
    zc = beta * (x - big_m) - big_ls           # log p_c (-inf where masked)
    p = torch.exp(zc)
    dz = a_coef * p
    if smooth_coef != 0.0:
        w = weight.to(acc)[None, :] if weight is not None else torch.ones((), dtype=acc, device=x.device)
        dz = dz - smooth_coef * w
    inside, local = _in_slice(target, class_offset, n_local)
    hit = inside[:, None] & (torch.arange(n_local, device=x.device)[None, :] == local[:, None])
    dz = dz - torch.where(hit, ty, zero)
    valid = (target != ignore_index)[:, None]
    grad = None
    if need_logits_grad:
        grad = torch.where(valid, beta * g * dz, zero).to(logits.dtype)
    if need_temperature_grad:
        a = torch.where(masked, zero, dz * torch.where(masked, zero, zc)).sum(dim=1)
        b = torch.where(masked, dz, zero).sum(dim=1)
        t_rows = torch.where(valid, torch.stack([a, b], dim=1), zero)
    else:
        t_rows = torch.zeros((rows, 2), dtype=acc, device=x.device)
    return grad, t_rows


@torch.no_grad()
def shard_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    lse: torch.Tensor,
    coef: torch.Tensor,
    temperature_t: Optional[torch.Tensor],
    temperature: float,
    smooth_coef: float,
    class_offset: int,
    ignore_index: int,
    need_logits_grad: bool,
    need_temperature_grad: bool,
):
    """Gradient of this rank's slice, given the GLOBAL per-row log-sum-exp.

    Args:
        logits, target, weight, temperature_t, temperature, class_offset, ignore_index: as in
            :func:`shard_stats`.
        lse: (rows, 2) acc, the global [M, LS] of each row (M: global max of the raw logits,
            LS = log sum over all classes of exp(beta (x - M))).
        coef: (rows, 3) acc, [g, A, ty]: g the row's upstream gradient (1/denom included for
            "mean", 0 for ignored rows), A = (1 - eps) w_y + eps W / C_total, ty = (1 - eps) w_y.
        smooth_coef: eps / C_total.

    Returns:
        grad_logits: (rows, C_local) in the logits' dtype, beta g_i dz_ic with
            p_c = exp(beta (x_c - M) - LS), dz_c = A p_c - smooth_coef w_c - ty [c == y - offset]
            (0 for ignored rows); an empty (0,) tensor when not need_logits_grad.
        t_rows: (rows, 2) acc, [sum over finite x_c of dz_c (beta (x_c - M) - LS),
            sum over x_c == -inf of dz_c] (zeros when not need_temperature_grad, and for ignored
            rows). sum_c dz_c z_c = a - lse b with lse = beta M + LS, and
            dL/dT = -sum_i (g_i / T) (a_i - lse_i b_i) once a and b are summed over the slices.
    """
    grad, t_rows = _shard_grad_impl(logits, target, weight, lse, coef, temperature_t, temperature,
                                    smooth_coef, class_offset, ignore_index, need_logits_grad,
                                    need_temperature_grad)
    if grad is None:
        grad = logits.new_empty((0,))
    return grad, t_rows


@torch.no_grad()
def shard_grad_(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    lse: torch.Tensor,
    coef: torch.Tensor,
    temperature_t: Optional[torch.Tensor],
    temperature: float,
    smooth_coef: float,
    class_offset: int,
    ignore_index: int,
    need_temperature_grad: bool,
) -> torch.Tensor:
    """:func:`shard_grad` writing grad_logits into the (contiguous) logits' buffer; returns
    t_rows."""
    grad, t_rows = _shard_grad_impl(logits, target, weight, lse, coef, temperature_t, temperature,
                                    smooth_coef, class_offset, ignore_index, True,
                                    need_temperature_grad)
    logits.copy_(grad)
    return t_rows


# --------------------------------------------------------------------------- class-probability targets

class _MassTimesNll(torch.autograd.Function):
    """q * v with 0 * inf := 0 in the forward; the exact partial derivatives in the backward.

    Autograd's own product would give NaN in the forward (0 * inf) or, behind a torch.where,
    drop the derivative dL/dq = v of a class with no mass (which PyTorch's target gradient has).
    The backward is built from differentiable operations, so double backward works.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, v)
        return torch.where(q == 0, torch.zeros_like(q), q * v)

    @staticmethod
    def backward(ctx, grad):
        q, v = ctx.saved_tensors
        return grad * v, grad * q


def flatten_probabilities(logits: torch.Tensor, target: torch.Tensor):
    """(C,), (N, C) or (N, C, d1, ...) logits and a target of the same shape -> both as 2-D
    (rows, C) with classes last, and the batch shape. (N, C) inputs are returned as they are
    (views); K-dim inputs are moved (one copy each)."""
    if logits.dim() == 1:
        return logits.unsqueeze(0), target.unsqueeze(0), ()
    if logits.dim() == 2:
        return logits, target, (logits.shape[0],)
    n_classes = logits.shape[1]
    batch_shape = (logits.shape[0],) + tuple(logits.shape[2:])
    return (logits.movedim(1, -1).reshape(-1, n_classes),
            target.movedim(1, -1).reshape(-1, n_classes), batch_shape)


def soft_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: Temperature = 1.0,
    label_smoothing: float = 0.0,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """F.cross_entropy(logits / T, target) for class-probability targets of the logits' shape.

    Per row, with q = (1 - eps) t + eps / C: loss = -sum_c w_c q_c log p_c, where a class with
    w_c q_c == 0 contributes 0 (also at a masked logit, -inf, where PyTorch gives NaN); "mean"
    divides by the number of rows. Differentiable in the logits, the target and a tensor
    temperature; dL/dt_c = -(1 - eps) w_c log p_c (0 where (1 - eps) w_c == 0). The maths is
    written out at the top of csrc/cpu/soft_target_cpu.cpp.
    """
    x, t, batch_shape = flatten_probabilities(logits, target)
    rows, n_classes = x.shape
    acc = _acc_dtype(x.dtype)
    eps = float(label_smoothing)
    z = _scale(x.to(acc), temperature)
    if n_classes > 0:
        zmax = z.amax(dim=1, keepdim=True).detach()
        no_softmax = ~torch.isfinite(zmax.squeeze(1))  # every logit -inf, or a NaN / +inf
        m = torch.where(torch.isneginf(zmax), torch.zeros_like(zmax), zmax)
        logp = (z - m) - torch.log(torch.exp(z - m).sum(dim=1, keepdim=True))
    else:
        no_softmax = torch.zeros(rows, dtype=torch.bool, device=x.device)
        logp = z
    ta = t.to(acc)
    # (1 - eps) t + eps / C; for eps == 1 the loss does not depend on t at all
    if eps < 1.0:
        q = ta * (1.0 - eps) + eps / max(n_classes, 1)
    else:
        q = torch.full_like(ta.detach(), 1.0 / max(n_classes, 1))
    nll = -logp
    if weight is not None:
        w = weight.to(acc)
        # w_c (-log p_c), 0 where w_c == 0 (w is not differentiable: no NaN from 0 * inf)
        nll = torch.where(w == 0, torch.zeros_like(nll), w * nll)
    loss = _MassTimesNll.apply(q, nll).sum(dim=1)
    loss = torch.where(no_softmax, torch.full_like(loss, float("nan")), loss)
    if reduction == "none":
        out = loss.reshape(batch_shape)
    elif reduction == "sum":
        out = loss.sum()
    else:
        out = loss.sum() / rows
    return out.to(logits.dtype)
