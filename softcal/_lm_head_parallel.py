"""The tensor-parallel LM head: the output matrix split over the ranks along the vocabulary.

Rank r holds ``linear_weight_local`` (V_r, H), the rows [offset_r, offset_r + V_r) of the output
matrix (and the same slice of the bias and of the class weights); every rank holds the same
hidden states (N, H) and the same GLOBAL targets. :func:`vocab_parallel_linear_cross_entropy`
returns, on every rank, exactly :func:`softcal.linear_cross_entropy` of the gathered matrix
(value and gradients: the input's is the full one on every rank, each matrix slice gets its
own), and no rank ever holds more than a chunk of its (N, V_r) logits.

Per chunk of rows (softcal.distributed's shard ops, as the vocabulary-parallel loss):
1. z = x_c W_r^T + b_r (one GEMM; c tanh(z / c) with a softcap), shard_stats -> per row
   [m, ls, d, xy] of the slice;
2. all_reduce(MAX) of m, then one all_reduce(SUM) of 4 numbers per row: the global
   log-sum-exp [M, LS], the smoothing sum, the target logit and weight;
3. the loss terms of the rows (cross-entropy as softcal.distributed; z-loss = z_loss lse^2),
   and, when the gradient is wanted ("mean"/"sum"), shard_grad_ turns z into dL/dz in place
   with the z-loss folded into the p coefficient, then dX_r = G W_r, dW_r += G^T x_c, db_r.
After the chunks: dX = all_reduce(SUM) of the dX_r (N x H), dL/dT all-reduced (one number).
Before them, one all_gather of 5 numbers per rank: the slice widths (offsets and the chunk size
every rank uses, so that all make the same collectives), the "mean" denominators, the class
weights' sum, and N and H (ranks that disagree raise the same ValueError).
"reduction='none'" saves the global [M, LS] per row and recomputes each chunk's logits in the
backward (no collective but the final all-reduces).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from ._lm_head_chunks import DEFAULT_WORKSPACE_BYTES, chunk_rows, target_range_check
from ._validation import (
    check_ignore_index,
    check_label_smoothing,
    check_reduction,
    check_temperature,
)
from .lm_head import check_extras, check_head, check_workspace, flat_rows

__all__ = ["vocab_parallel_linear_cross_entropy"]

_FN = "softcal.distributed.vocab_parallel_linear_cross_entropy"
Temperature = Union[float, Tensor]
ProcessGroup = Any


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Setup:
    """What every rank agrees on before the chunks (one all_gather)."""

    __slots__ = ("offset", "n_classes", "step", "denom", "count", "big_w", "w_local")


def _agree(fn, x, wt, t, weight, ignore_index, class_offset, num_classes, workspace_bytes,
           bytes_per_elem, group) -> _Setup:
    from . import distributed as _d  # not at the top: softcal.distributed imports this module
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{fn}: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group(...) first")
    acc = _acc(x.dtype)
    n_local = wt.shape[0]
    w_local = (weight.to(acc).sum() if weight is not None
               else torch.tensor(float(n_local), dtype=acc, device=x.device))
    mine = torch.tensor([float(n_local), float(x.shape[0]), float(x.shape[1]), float(w_local)],
                        dtype=torch.float64, device=_d.comm_device(group))
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()
    widths = [int(v) for v in table[:, 0].tolist()]
    rows, hidden = table[:, 1].tolist(), table[:, 2].tolist()
    if len(set(rows)) != 1 or len(set(hidden)) != 1:
        raise ValueError(f"{fn}: every rank must hold the same input (N, H); the ranks hold "
                         f"N = {[int(v) for v in rows]}, H = {[int(v) for v in hidden]}")
    s = _Setup()
    if class_offset is None:
        s.offset, s.n_classes = sum(widths[:rank]), sum(widths)
    else:
        s.offset, s.n_classes = class_offset, num_classes
    target_range_check(fn, t, s.n_classes, ignore_index)
    s.big_w = torch.tensor(float(table[:, 3].sum()), dtype=acc, device=x.device)
    s.w_local = w_local
    # the same rows per chunk on every rank (from the widest slice): the same collectives
    s.step = chunk_rows(x.shape[0], max(max(widths), 1), bytes_per_elem, workspace_bytes)
    valid = t != ignore_index
    s.count = valid.sum().to(acc)
    if weight is None:
        s.denom = s.count
    else:
        part = _target_weight(t, weight, s.offset, n_local, valid, acc).sum()
        s.denom = _d.all_reduce(part.reshape(1), "sum", group).reshape(())
    return s


def _target_weight(t, weight, offset, n_local, valid, acc):
    """w_y of the rows whose target lies in this slice (0 elsewhere)."""
    local = t - offset
    inside = valid & (local >= 0) & (local < n_local)
    if weight is None:
        return inside.to(acc)
    safe = torch.where(inside, local, torch.zeros_like(local))
    zero = torch.zeros((), dtype=acc, device=t.device)
    return torch.where(inside, weight.to(acc)[safe], zero) if n_local else torch.zeros_like(
        local, dtype=acc)


def _exp_finite(m, big_m, ls, beta):
    """exp(beta (m - M) + ls): the slice's share of the global sum of exps; 0 for an empty
    slice (m = -inf), whatever M."""
    finite = ~torch.isneginf(m)
    zero = torch.zeros((), dtype=m.dtype, device=m.device)
    arg = beta * (torch.where(finite, m, zero) - torch.where(finite, big_m, zero)) + ls
    return torch.where(finite, torch.exp(arg), zero)


def _loop(x, wt, bias, t, weight, temp_t, temp_f, eps, ii, zl, cap, setup, group, *,
          want_grad, a_unit, b_unit, saved, need_x, need_w, need_b, need_t):
    """One pass over the chunks. a_unit / b_unit: 0-dim or (N,) derivatives of the reduced loss
    with respect to each row's cross-entropy and z-loss (the upstream gradient included).
    saved: None (forward: statistics and collectives per chunk) or (lse (N, 2), WY (N,)) from
    the forward. Returns (ce (N,), zrow (N,), lse (N, 2), WY (N,), partial dX, dW, db,
    partial dT sum)."""
    from . import distributed as _d  # not at the top: softcal.distributed imports this module
    n_rows, _ = x.shape
    n_local = wt.shape[0]
    dtype, device = x.dtype, x.device
    acc = _acc(dtype)
    zero = torch.zeros((), dtype=acc, device=device)
    beta = (1.0 / temp_t.detach().to(acc)) if temp_t is not None else 1.0 / temp_f
    valid = t != ii
    n_classes = setup.n_classes
    ce = torch.zeros(n_rows, dtype=acc, device=device)
    zrow = torch.zeros(n_rows, dtype=acc, device=device)
    lse_all = saved[0] if saved is not None else torch.empty((n_rows, 2), dtype=acc, device=device)
    wy_all = saved[1] if saved is not None else torch.empty(n_rows, dtype=acc, device=device)
    gx = gw = gb = None
    tsum = torch.zeros((), dtype=acc, device=device)
    half = dtype in (torch.float16, torch.bfloat16)
    if want_grad:
        a_all = torch.where(valid, a_unit.to(acc).expand(n_rows), zero)
        b_all = torch.where(valid, b_unit.to(acc).expand(n_rows), zero)
        if need_x:
            gx = torch.zeros((n_rows, x.shape[1]), dtype=acc if half else dtype, device=device)
        if need_w:
            gw = torch.zeros(wt.shape, dtype=acc if half else dtype, device=device)
        if need_b and bias is not None:
            gb = torch.zeros(n_local, dtype=acc, device=device)
    ws = torch.empty((min(setup.step, max(n_rows, 1)), n_local), dtype=dtype, device=device)
    pre = torch.empty_like(ws) if cap else None
    wt_t = wt.t()
    for r0 in range(0, n_rows, setup.step):
        r1 = min(n_rows, r0 + setup.step)
        sl = slice(r0, r1)
        xc, tc, vc = x[sl], t[sl], valid[sl]
        z = ws[: r1 - r0]
        if bias is not None:
            torch.addmm(bias, xc, wt_t, out=z)
        else:
            torch.mm(xc, wt_t, out=z)
        if cap:
            pre[: r1 - r0].copy_(z)
            z.copy_(torch.tanh(z.to(acc) / cap) * cap)
        if saved is None:
            stats = _d.shard_stats(z, tc, weight, temp_t, temp_f, setup.offset, ii, eps > 0)
            m, ls, d, xy = stats.unbind(1)
            big_m = _d.all_reduce(m, "max", group)
            wy = _target_weight(tc, weight, setup.offset, n_local, vc, acc)
            s = _exp_finite(m, big_m, ls, beta)
            if eps > 0:
                # the slice's smoothing sum re-centred on the global max (0 for an empty slice)
                dd = torch.where(torch.isneginf(m), zero,
                                 d + setup.w_local * (big_m - torch.where(torch.isneginf(m), zero,
                                                                           m)))
            else:
                dd = torch.zeros_like(m)
            tot = _d.all_reduce(torch.stack([s, dd, xy, wy], 1), "sum", group)
            big_s, big_d, big_xy, big_wy = tot.unbind(1)
            big_ls = torch.log(big_s)
            lse = beta * big_m + big_ls
            row = (1.0 - eps) * big_wy * (beta * (big_m - big_xy) + big_ls)
            if eps > 0:
                row = row + (eps / n_classes) * (beta * big_d + setup.big_w * big_ls)
            ce[sl] = torch.where(vc, row, zero)
            if zl:
                zrow[sl] = torch.where(vc, zl * lse * lse, zero)
            lse_all[sl] = torch.stack([big_m, big_ls], 1)
            wy_all[sl] = big_wy
        if not want_grad:
            continue
        lse2 = lse_all[sl]
        lse = beta * lse2[:, 0] + lse2[:, 1]
        big_wy = wy_all[sl]
        a, b = a_all[sl], b_all[sl]
        # dL/ds_c = a (A p_c - (eps / C) w_c - ty [c == y]) + 2 z_loss b lse p_c; shard_grad_
        # takes per row [g, A, ty] and multiplies the bracket by g: the z-loss joins A as
        # 2 z_loss (b / a) lse (b / a = 1, or count / denom for "mean"; 0 where a = 0)
        big_a = (1.0 - eps) * big_wy + (eps / n_classes) * setup.big_w
        if zl:
            ratio = torch.where(a != 0, b / torch.where(a != 0, a, torch.ones_like(a)), zero)
            big_a = big_a + 2.0 * zl * ratio * lse
        coef = torch.stack([a, big_a, (1.0 - eps) * big_wy], 1)
        t_rows = _d.shard_grad_(z, tc, weight, lse2, coef, temp_t, temp_f, eps / n_classes,
                                setup.offset, ii, need_t)
        if need_t:
            # sum over this slice of dz_c log p_c (t_rows[:, 0]; no masked logits here); the
            # global sum_c dz_c s_c adds lse sum_c dz_c = lse 2 z_loss (b / a) lse after the
            # all-reduce (rank-independent, added once by the caller)
            tsum = tsum + (a * t_rows[:, 0]).sum()
        if cap:
            th = torch.tanh(pre[: r1 - r0].to(acc) / cap)
            z.copy_(z.to(acc) * (1.0 - th * th))
        if gx is not None:
            if half:
                gx[sl] = torch.mm(z, wt).to(acc)
            else:
                torch.mm(z, wt, out=gx[sl])
        if gw is not None:
            if half:
                gw.addmm_(z.t().to(acc), xc.to(acc))
            else:
                gw.addmm_(z.t(), xc)
        if gb is not None:
            gb.add_(z.sum(0, dtype=acc))
    return ce, zrow, lse_all, wy_all, gx, gw, gb, tsum


def _z_t_term(b_all, lse, zl):
    """The z-loss's share of sum_i sum_c dL/ds_ic s_ic beyond the slices' log p sums."""
    return (b_all * 2.0 * zl * lse * lse).sum()


class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wt, bias, temp_t, t, weight, temp_f, eps, ii, red, zl, cap,
                workspace_bytes, group, class_offset, num_classes):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        need_t = temp_t is not None and ctx.needs_input_grad[3]
        dtype = x.dtype
        acc = _acc(dtype)
        item = x.element_size()
        # chunk buffers per logit: z, the pre-cap copy and two acc temporaries with a softcap,
        # float32 copies for dW with half types
        per = item + ((item + 2 * x.new_empty(()).to(acc).element_size()) if cap else 0) + \
            (4 if dtype in (torch.float16, torch.bfloat16) else 0)
        setup = _agree(_FN, x, wt, t, weight, ii, class_offset, num_classes, workspace_bytes, per,
                       group)
        want = red != 0 and (need_x or need_w or need_b or need_t)
        one = torch.ones((), dtype=acc, device=x.device)
        a_unit, b_unit = _units(red, setup, one)
        ce, zrow, lse2, wy, gx, gw, gb, tsum = _loop(
            x, wt, bias, t, weight, temp_t, temp_f, eps, ii, zl, cap, setup, group,
            want_grad=want, a_unit=a_unit, b_unit=b_unit, saved=None, need_x=need_x,
            need_w=need_w, need_b=need_b, need_t=need_t)
        if red == 0:
            loss = ce + zrow
        elif red == 2:
            loss = ce.sum() + zrow.sum()
        else:
            loss = ce.sum() / setup.denom + (zrow.sum() / setup.count if zl else 0.0)
        ctx.c = (temp_f, eps, ii, red, zl, cap, group, setup, x.shape[0], dtype)
        ctx.want = want
        grads = [None] * 4
        if want:
            grads = _finish(gx, gw, gb, tsum, x, wt, bias, temp_t, t, ii, zl, lse2, b_unit,
                            setup, group, need_x, need_w, need_b, need_t)
        ctx.save_for_backward(*(g if g is not None else None for g in grads),
                              x if not want else None, wt if not want else None,
                              bias if not want else None, temp_t, t, weight, lse2, wy)
        return loss.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gx, gw, gb, gt, x, wt, bias, temp_t, t, weight, lse2, wy = ctx.saved_tensors
        temp_f, eps, ii, red, zl, cap, group, setup, rows, dtype = ctx.c
        out = [None] * 16
        need = ctx.needs_input_grad
        if ctx.want:
            for i, g in enumerate((gx, gw, gb, gt)):
                if g is not None and need[i]:
                    out[i] = g * grad.to(g.dtype)
            return tuple(out)
        acc = _acc(dtype)
        a_unit, b_unit = _units(red, setup, grad.to(acc))
        need_x, need_w = need[0], need[1]
        need_b = bias is not None and need[2]
        need_t = temp_t is not None and need[3]
        _, _, _, _, px, pw, pb, tsum = _loop(
            x, wt, bias, t, weight, temp_t, temp_f, eps, ii, zl, cap, setup, group,
            want_grad=True, a_unit=a_unit, b_unit=b_unit, saved=(lse2, wy), need_x=need_x,
            need_w=need_w, need_b=need_b, need_t=need_t)
        grads = _finish(px, pw, pb, tsum, x, wt, bias, temp_t, t, ii, zl, lse2, b_unit, setup,
                        group, need_x, need_w, need_b, need_t)
        out[:4] = grads
        return tuple(out)


def _units(red, setup, grad):
    if red != 1:
        return grad, grad
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    some = setup.count > 0
    return (torch.where(some, grad / setup.denom, zero),
            torch.where(some, grad / setup.count, zero))


def _finish(gx, gw, gb, tsum, x, wt, bias, temp_t, t, ii, zl, lse2, b_unit, setup, group,
            need_x, need_w, need_b, need_t):
    """The collectives after the chunks: dX summed over the ranks, dT all-reduced; the casts."""
    from . import distributed as _d  # not at the top: softcal.distributed imports this module
    acc = _acc(x.dtype)
    out = [None] * 4
    if need_x:
        out[0] = _d.all_reduce(gx.to(acc), "sum", group).to(x.dtype)
    if need_w:
        out[1] = gw.to(wt.dtype)
    if need_b:
        out[2] = gb.to(bias.dtype)
    if need_t:
        total = _d.all_reduce(tsum.reshape(1), "sum", group).reshape(())
        if zl:
            valid = t != ii
            beta = 1.0 / temp_t.detach().to(acc)
            lse = beta * lse2[:, 0] + lse2[:, 1]
            b_all = torch.where(valid, b_unit.to(acc).expand(t.shape[0]),
                                torch.zeros((), dtype=acc, device=t.device))
            total = total + _z_t_term(b_all, torch.where(valid, lse, torch.zeros_like(lse)), zl)
        out[3] = (-total / temp_t.detach().to(acc)).to(temp_t.dtype)
    return out


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    linear_weight_local: Tensor,
    target: Tensor,
    *,
    linear_bias_local: Optional[Tensor] = None,
    weight: Optional[Tensor] = None,
    group: ProcessGroup = None,
    class_offset: Optional[int] = None,
    num_classes: Optional[int] = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    temperature: Temperature = 1.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> Tensor:
    """:func:`softcal.linear_cross_entropy` with the output matrix split over ``group``.

    Args:
        input: (..., H) hidden states, the same on every rank, float16/bfloat16/float32/float64.
        linear_weight_local: (V_r, H) this rank's rows of the output matrix (V_r may be 0 and
            differ between ranks), the input's dtype and device.
        target: (...) GLOBAL class indices in [0, V) or ignore_index, the same on every rank.
        linear_bias_local: (V_r,) this rank's slice of the bias, or None.
        weight: (V_r,) this rank's slice of the class weights, or None.
        group: the process group over which the matrix is split (None: the default group).
        class_offset, num_classes: the global index of this rank's first row and the global V;
            None (default): the slices are taken in rank order (their widths are gathered).
        reduction, ignore_index, label_smoothing (over all V classes), temperature (a float or
            a 0-dim tensor, the same on every rank), z_loss, softcap, workspace_bytes (per rank,
            for its (rows, V_r) chunk): as :func:`softcal.linear_cross_entropy`.

    Returns:
        The loss in the input's dtype, the same on every rank. Gradients: the input's is the
        FULL gradient on every rank (summed over the ranks here: do not all-reduce it again);
        each rank's matrix and bias slices get their own; a tensor temperature gets the global
        dL/dT. Double backward raises.
    """
    fn = _FN
    target = check_head(fn, input, linear_weight_local, target, linear_bias_local, weight,
                        allow_empty=True)
    red = check_reduction(fn, reduction)
    ii = check_ignore_index(fn, ignore_index)
    eps = check_label_smoothing(fn, label_smoothing)
    temperature = check_temperature(fn, temperature, input.device)
    zl, cap = check_extras(fn, z_loss, softcap)
    workspace_bytes = check_workspace(fn, workspace_bytes)
    n_local = linear_weight_local.shape[0]
    if class_offset is not None or num_classes is not None:
        for name, v in (("class_offset", class_offset), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{fn}: class_offset and num_classes must be given together, as "
                                f"ints; got {name}={v!r}")
        if not 0 <= class_offset <= class_offset + n_local <= num_classes:
            raise ValueError(f"{fn}: the slice [class_offset, class_offset + V_r) = "
                             f"[{class_offset}, {class_offset + n_local}) is not inside "
                             f"[0, num_classes = {num_classes})")
    batch_shape, x, t, temp_t, temp_f = flat_rows(input, target, temperature)
    loss = _VocabParallelLinearCE.apply(x, linear_weight_local, linear_bias_local, temp_t, t,
                                        weight, temp_f, eps, ii, red, zl, cap, workspace_bytes,
                                        group, class_offset, num_classes)
    if red == 0:
        loss = loss.reshape(batch_shape)
    return loss
