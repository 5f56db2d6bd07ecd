"""softcal on torch.distributed: a vocabulary-parallel cross-entropy, and helpers for calibration
over data that no single process holds.

Vocabulary-parallel loss
------------------------
When the output layer is split over the ranks of a process group (tensor parallelism), rank r
holds the logits of a slice of the classes, ``[offset_r, offset_r + C_r)``, for every row, and
every rank holds the same full targets. :func:`vocab_parallel_cross_entropy` returns exactly
``softcal.cross_entropy`` of the logits gathered along the classes (temperature, label smoothing
over the GLOBAL number of classes, class weights sliced like the logits, ignore_index, the three
reductions), on every rank, without gathering the logits. Per call (beta = 1/T, eps the
smoothing, w the weights, W = sum_c w_c, C the global number of classes):

1. local statistics of each row (a compiled op, ``torch.ops.softcal.shard_stats``, or its
   pure-PyTorch reference): m = max of the slice, ls = log sum exp(beta (x - m)),
   d = sum w_c (m - x_c), the target logit when the target lies in the slice;
2. ``all_reduce(MAX)`` of m (rows values): the global row max M;
3. one ``all_reduce(SUM)`` of 4 values per row (+2): sum exp(beta (m - M) + ls), the smoothing
   sum d + W_r (M - m), the target logit and the target weight (from the rank whose slice holds
   the target), and W_r;
4. LS = log S, loss = (1 - eps) w_y (beta (M - x_y) + LS) + (eps / C) (beta D + W LS).

So the communication is 5 numbers per row in the accumulation dtype (plus, when ``class_offset``
is not given, an all-gather of the slice widths), never the logits. The backward needs no
collective: each rank computes the gradient of its own slice from the saved [M, LS] (op
``shard_grad``); only the temperature gradient, when a temperature tensor requires grad, is
all-reduced (one number).

Data-parallel calibration
-------------------------
``TemperatureScaler.fit(..., group=...)`` and the accumulating metrics in :mod:`softcal.metrics`
(``update`` / ``compute`` / ``reset`` with ``group=...``) sum their statistics across the ranks.
:func:`padding_mask` tells which rows of a rank are the repeated samples that
``DistributedSampler`` adds so that every rank gets as many rows (drop them before fitting).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import torch

from . import _ops, reference
from ._agree import agree_on
from ._teardown import import_before_groups
from ._validation import (
    check_ignore_index,
    check_label_smoothing,
    check_reduction,
    check_temperature,
)
from ._vocab_checks import _FN, _agreed_layout, _check_call, _mesh_group

# torch.distributed.nn.functional binds the world group into default arguments when imported;
# imported now, before any group exists, it cannot keep one alive (softcal/_teardown.py)
import_before_groups()

__all__ = [
    "VocabParallelCrossEntropy",
    "all_reduce",
    "class_offsets",
    "comm_device",
    "padding_mask",
    "shard_grad",
    "shard_grad_",
    "shard_stats",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]

Temperature = Union[float, torch.Tensor]
ProcessGroup = Any  # torch.distributed.ProcessGroup (None: the default group)

# ---------------------------------------------------------------------- kernels or reference
def _kernel(device: torch.device, op: str) -> bool:
    return _ops.has_kernel(device.type, op)


def shard_stats(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                     temperature_t: Optional[torch.Tensor], temperature: float, class_offset: int,
                     ignore_index: int, smoothing: bool) -> torch.Tensor:
    """Per-row [m, ls, d, xy] of this rank's slice, (rows, 4) in the accumulation dtype: the
    compiled op when this device has it, else :func:`softcal.reference.shard_stats`
    (which documents the semantics)."""
    if _kernel(logits.device, "shard_stats"):
        return torch.ops.softcal.shard_stats(logits, target, weight, temperature_t,
                                                  temperature, class_offset, ignore_index,
                                                  smoothing)
    return reference.shard_stats(logits, target, weight, temperature_t, temperature,
                                      class_offset, ignore_index, smoothing)


def shard_grad(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                    lse: torch.Tensor, coef: torch.Tensor, temperature_t: Optional[torch.Tensor],
                    temperature: float, smooth_coef: float, class_offset: int, ignore_index: int,
                    need_logits_grad: bool, need_temperature_grad: bool
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_logits (rows, C_local), t_rows (rows, 2)) of this rank's slice given the global
    [M, LS]: the compiled op when this device has it, else
    :func:`softcal.reference.shard_grad` (which documents the semantics)."""
    if _kernel(logits.device, "shard_grad"):
        return torch.ops.softcal.shard_grad(logits, target, weight, lse, coef, temperature_t,
                                                 temperature, smooth_coef, class_offset,
                                                 ignore_index, need_logits_grad,
                                                 need_temperature_grad)
    return reference.shard_grad(logits, target, weight, lse, coef, temperature_t,
                                     temperature, smooth_coef, class_offset, ignore_index,
                                     need_logits_grad, need_temperature_grad)


def shard_grad_(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                     lse: torch.Tensor, coef: torch.Tensor, temperature_t: Optional[torch.Tensor],
                     temperature: float, smooth_coef: float, class_offset: int, ignore_index: int,
                     need_temperature_grad: bool) -> torch.Tensor:
    """In-place :func:`shard_grad`: the gradient overwrites the (contiguous) logits; returns
    t_rows."""
    if _kernel(logits.device, "shard_grad_"):
        return torch.ops.softcal.shard_grad_(logits, target, weight, lse, coef,
                                                  temperature_t, temperature, smooth_coef,
                                                  class_offset, ignore_index,
                                                  need_temperature_grad)
    return reference.shard_grad_(logits, target, weight, lse, coef, temperature_t,
                                      temperature, smooth_coef, class_offset, ignore_index,
                                      need_temperature_grad)


# ---------------------------------------------------------------------- collectives
def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "softcal.distributed: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (torchrun sets up the environment)")
    return dist


def comm_device(group: ProcessGroup = None) -> torch.device:
    """The device whose tensors the group's backend reduces: CUDA (current device) for NCCL,
    the CPU otherwise (gloo)."""
    dist = _dist()
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum", group: ProcessGroup = None) -> torch.Tensor:
    """All-reduce ``tensor`` ("sum", "max" or "min") over ``group`` and return the result on the
    tensor's device; goes through :func:`comm_device` when the backend cannot reduce tensors of
    that device (gloo and CUDA, NCCL and the CPU)."""
    dist = _dist()
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    dev = comm_device(group)
    buf = tensor.detach().to(dev).contiguous()
    if buf.data_ptr() == tensor.data_ptr():
        buf = buf.clone()
    dist.all_reduce(buf, op=ops[op], group=group)
    return buf.to(tensor.device)


def class_offsets(width: int, group: ProcessGroup = None) -> Tuple[int, int, List[int]]:
    """All-gather the slice widths of the group's ranks (in rank order).

    Returns (this rank's class offset, the global number of classes, the list of widths).
    """
    dist = _dist()
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    dev = comm_device(group)
    mine = torch.tensor([int(width)], dtype=torch.int64, device=dev)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    widths = [int(w) for w in torch.cat(out).cpu().tolist()]
    return sum(widths[:rank]), sum(widths), widths


def padding_mask(sampler: Any) -> torch.Tensor:
    """Which rows of this rank are real for a ``torch.utils.data.DistributedSampler``.

    With ``drop_last=False`` the sampler repeats the first ``total_size - len(dataset)`` indices
    of its (shuffled or not) order so that every rank gets ``num_samples`` rows; rank r takes the
    positions r, r + world, r + 2 world, ... of that order, so its k-th row is a repeat when
    ``r + k * world >= len(dataset)`` (only the last row of some ranks). Returns a (num_samples,)
    bool tensor, False for the repeats: ``logits[mask], labels[mask]`` on every rank together
    hold each sample exactly once. With ``drop_last=True`` nothing is repeated (the tail of the
    dataset is dropped instead) and the mask is all True.
    """
    from torch.utils.data.distributed import DistributedSampler

    if not isinstance(sampler, DistributedSampler):
        raise TypeError("softcal.distributed.padding_mask: sampler must be a "
                        f"torch.utils.data.DistributedSampler, got {type(sampler).__name__}")
    k = torch.arange(sampler.num_samples, dtype=torch.int64)
    if sampler.drop_last:
        return torch.ones(sampler.num_samples, dtype=torch.bool)
    return sampler.rank + k * sampler.num_replicas < len(sampler.dataset)


# ---------------------------------------------------------------------- the loss
def _exp_finite(m, big_m, ls, beta):
    """exp(beta (m - M) + ls), 0 where m = -inf (also when M = -inf)."""
    finite = ~torch.isneginf(m)
    zero = torch.zeros((), dtype=m.dtype, device=m.device)
    arg = beta * (torch.where(finite, m, zero) - torch.where(finite, big_m, zero)) + ls
    return torch.where(finite, torch.exp(arg), zero)


class _Ctx:
    """What the forward leaves for the backward (besides the saved tensors)."""

    __slots__ = ("temperature", "eps", "ignore_index", "reduction", "offset", "n_classes",
                 "group", "fused", "used")


def _forward(x, temp_t, t, weight, temp_f, eps, ignore_index, red, offset, n_classes, group):
    """Loss (acc) and everything the gradient needs: [M, LS] (rows, 2), w_y (rows,), W, denom."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows, n_local = x.shape
    zero = torch.zeros((), dtype=acc, device=x.device)
    stats = shard_stats(x, t, weight, temp_t, temp_f, offset, ignore_index, eps > 0)
    m, ls, d, xy = stats.unbind(1)
    big_m = all_reduce(m, "max", group) if rows else m
    beta = (1.0 / temp_t.detach().to(acc)) if temp_t is not None else 1.0 / temp_f
    valid = t != ignore_index
    local_t = t - offset
    inside = valid & (local_t >= 0) & (local_t < n_local)
    safe_t = torch.where(inside, local_t, torch.zeros_like(local_t))
    if weight is not None:
        w_local = weight.to(acc).sum()
        wy = torch.where(inside, weight.to(acc)[safe_t], zero) if n_local else torch.zeros_like(m)
    else:
        w_local = torch.tensor(float(n_local), dtype=acc, device=x.device)
        wy = inside.to(acc)
    s = _exp_finite(m, big_m, ls, beta)
    if eps > 0:
        inf = torch.tensor(float("inf"), dtype=acc, device=x.device)
        masked_slice = torch.where(w_local > 0, inf, zero)  # a slice that is all -inf
        dd = torch.where(torch.isneginf(m), masked_slice,
                         d + w_local * (big_m - torch.where(torch.isneginf(m), zero, m)))
    else:
        dd = torch.zeros_like(m)
    packed = torch.cat([torch.stack([s, dd, xy, wy], 1).reshape(-1), w_local.reshape(1)])
    packed = all_reduce(packed, "sum", group)
    tot = packed[:-1].reshape(rows, 4)
    big_w = packed[-1]
    big_s, big_d, big_xy, big_wy = tot.unbind(1)
    big_ls = torch.log(big_s)
    loss = (1.0 - eps) * big_wy * (beta * (big_m - big_xy) + big_ls)
    if eps > 0:
        loss = loss + (eps / n_classes) * (beta * big_d + big_w * big_ls)
    loss = torch.where(valid, loss, zero)
    denom = torch.where(valid, big_wy, zero).sum()
    if red == 0:
        out = loss
    elif red == 2:
        out = loss.sum()
    else:
        out = loss.sum() / denom
    lse = torch.stack([big_m, big_ls], 1)
    return out.to(x.dtype), lse, big_wy, big_w, denom, valid, beta


def _row_unit(red, denom, valid, rows, acc, device):
    """d(reduced loss)/d(row loss) for an upstream gradient of 1, 0 for ignored rows."""
    zero = torch.zeros((), dtype=acc, device=device)
    one = torch.ones((rows,), dtype=acc, device=device)
    unit = one / denom if red == 1 else one
    return torch.where(valid, unit, zero)


def _coef(g, wy, big_w, eps, n_classes):
    a_coef = (1.0 - eps) * wy + (eps / n_classes) * big_w if n_classes else (1.0 - eps) * wy
    return torch.stack([g, a_coef, (1.0 - eps) * wy], 1)


def _t_partial(t_rows, lse, beta):
    """Per row sum over this slice of dz_c z_c = a - lse b (lse = beta M + LS)."""
    full_lse = beta * lse[:, 0] + lse[:, 1]
    b = t_rows[:, 1]
    # b is 0 unless the row has masked logits; keep 0 * inf (lse of a bad row) out of it.
    return t_rows[:, 0] - torch.where(b != 0, full_lse * b, torch.zeros_like(b))


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, temp_t, t, weight, temp_f, eps, ignore_index, red, offset, n_classes,
                group, fused, inplace):
        out, lse, wy, big_w, denom, valid, beta = _forward(
            x, temp_t, t, weight, temp_f, eps, ignore_index, red, offset, n_classes, group)
        acc = lse.dtype
        rows = x.shape[0]
        need_t = temp_t is not None and temp_t.requires_grad
        c = _Ctx()
        c.eps, c.ignore_index, c.reduction, c.offset = eps, ignore_index, red, offset
        c.n_classes, c.group, c.fused, c.used, c.temperature = n_classes, group, fused, False, temp_f
        ctx.c = c
        if fused:
            unit = _row_unit(red, denom, valid, rows, acc, x.device)
            coef = _coef(unit, wy, big_w, eps, n_classes)
            smooth = eps / n_classes if n_classes else 0.0
            if inplace:
                version = x._version
                t_rows = shard_grad_(x, t, weight, lse, coef, temp_t, temp_f, smooth, offset,
                                          ignore_index, need_t)
                if x._version == version:  # declare the write, so that autograd sees it
                    torch.autograd.graph.increment_version(x)
                grad = x
            else:
                grad, t_rows = shard_grad(x, t, weight, lse, coef, temp_t, temp_f, smooth,
                                               offset, ignore_index, True, need_t)
            # per row: sum_c dL_row/dz_c z_c times the row's unit (mean: 1/denom)
            tpart = unit * _t_partial(t_rows, lse, beta) if need_t else None
            ctx.save_for_backward(grad, tpart, temp_t)
        else:
            ctx.save_for_backward(x, t, weight, temp_t, lse, wy, big_w, denom, valid)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        c = ctx.c
        need_x = ctx.needs_input_grad[0]
        need_t = ctx.needs_input_grad[1]
        gx = gt = None
        if c.fused:
            grad, tpart, temp_t = ctx.saved_tensors
            if c.used:
                raise RuntimeError(
                    f"{_FN}(fused=True): the backward scales the stored gradient in place and "
                    "can run only once per forward; use fused=False to call backward twice")
            c.used = True
            if need_x:
                scale = grad_out.reshape(-1) if c.reduction == 0 else grad_out.reshape(())
                if _kernel(grad.device, "scale_rows_") and grad.is_contiguous():
                    torch.ops.softcal.scale_rows_(grad, scale)
                else:
                    grad.mul_((scale[:, None] if scale.dim() else scale).to(grad.dtype))
                gx = grad
            if need_t:
                gl = grad_out.reshape(-1) if c.reduction == 0 else grad_out.reshape(())
                part = (tpart * gl.to(tpart.dtype)).sum()
                gt = _dt(part, temp_t, c.group)
            return gx, gt, None, None, None, None, None, None, None, None, None, None, None
        x, t, weight, temp_t, lse, wy, big_w, denom, valid = ctx.saved_tensors
        acc = lse.dtype
        rows = x.shape[0]
        unit = _row_unit(c.reduction, denom, valid, rows, acc, x.device)
        g = unit * (grad_out.reshape(-1) if c.reduction == 0 else grad_out.reshape(())).to(acc)
        g = torch.where(valid, g, torch.zeros((), dtype=acc, device=x.device))
        coef = _coef(g, wy, big_w, c.eps, c.n_classes)
        smooth = c.eps / c.n_classes if c.n_classes else 0.0
        grad, t_rows = shard_grad(x, t, weight, lse, coef, temp_t, c.temperature, smooth,
                                       c.offset, c.ignore_index, need_x, need_t)
        if need_x:
            gx = grad
        if need_t:
            beta = 1.0 / temp_t.detach().to(acc)
            gt = _dt((g * _t_partial(t_rows, lse, beta)).sum(), temp_t, c.group)
        return gx, gt, None, None, None, None, None, None, None, None, None, None, None


def _dt(part: torch.Tensor, temp_t: torch.Tensor, group) -> torch.Tensor:
    """dL/dT = -(1/T) sum over rows and slices of g sum_c dz_c z_c (one all-reduce)."""
    total = all_reduce(part.reshape(1), "sum", group).reshape(())
    return (-total / temp_t.detach().to(total.dtype)).to(temp_t.dtype)


def vocab_parallel_cross_entropy(
    logits_local: torch.Tensor,
    target: torch.Tensor,
    *,
    group: ProcessGroup = None,
    class_offset: Optional[int] = None,
    num_classes: Optional[int] = None,
    temperature: Temperature = 1.0,
    label_smoothing: float = 0.0,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    fused: bool = False,
    inplace: bool = False,
) -> torch.Tensor:
    """Cross-entropy of logits whose classes are split across the ranks of ``group``.

    Equals ``softcal.cross_entropy(torch.cat(slices, dim=class_dim), target, ...)`` (and so
    ``F.cross_entropy(logits / T, ...)``), value and gradients, on every rank, with O(rows)
    communication (see the module docstring).

    Args:
        logits_local: this rank's slice of the classes: (C_r,), (N, C_r) or (N, C_r, d1, ...);
            float16/bfloat16/float32/float64. Or a DTensor on a 1-D mesh sharded on the class
            dimension (``Shard(-1)`` / ``Shard(1)``); its mesh gives the group. Slices may have
            unequal widths (0 included).
        target: the FULL targets, the same on every rank: (), (N,) or (N, d1, ...) GLOBAL class
            indices in [0, C) or ``ignore_index`` (a replicated DTensor is accepted).
        group: the process group over which the classes are split (None: the default group).
        class_offset: global index of this rank's first class. None (default): the widths are
            all-gathered (one small collective) and the slices are taken in rank order.
        num_classes: the global number of classes C; required with ``class_offset``.
        temperature: float > 0 or a 0-dim tensor (the same on every rank); when it requires
            grad, its gradient is the all-reduced dL/dT (the same on every rank).
        label_smoothing: eps in [0, 1], spread over all C classes (not the slice's).
        weight: (C_r,) this rank's slice of the class weights, the logits' dtype, or None.
        ignore_index, reduction: as ``F.cross_entropy``.
        fused: compute the gradient during the forward; backward only rescales it.
        inplace: with fused=True, write the gradient into the logits' buffer (their values are
            lost; the version counter moves, so autograd raises if anything saved them). Only
            contiguous (N, C_r) logits are written in place; other layouts are copied first.

    Returns:
        The loss in the logits' dtype: 0-dim for "mean"/"sum", the batch shape for "none"; the
        same on every rank. The gradient of ``logits_local`` is this rank's slice of the full
        gradient. Class-probability (soft) targets are not supported here.
    """
    _dist()
    group = _mesh_group(logits_local, group)

    def checks(sig):
        return _check_call(sig, logits_local, target, weight, group, class_offset, num_classes,
                           temperature, label_smoothing, ignore_index, reduction, fused, inplace)

    checked, agreed = agree_on(_FN, group, checks)
    x, t, batch_shape, weight, temperature, eps, red, ignore_index = checked
    offset, n_classes = _agreed_layout(agreed, ignore_index)
    if isinstance(temperature, torch.Tensor):
        temp_t, temp_f = temperature, 1.0
    else:
        temp_t, temp_f = None, float(temperature)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (temp_t is not None and temp_t.requires_grad))
    use_fused = fused and needs_grad
    if use_fused and inplace and not x.is_contiguous():
        x = x.contiguous()
    if x.stride(-1) != 1 and x.shape[1] > 1:
        x = x.contiguous()
    loss = _VocabParallelCE.apply(x, temp_t, t, weight, temp_f, eps, ignore_index, red, offset,
                                  n_classes, group, use_fused, inplace and use_fused)
    if red == 0:
        loss = loss.reshape(batch_shape)
    return loss


class VocabParallelCrossEntropy(torch.nn.Module):
    """Module form of :func:`vocab_parallel_cross_entropy`, with ``nn.CrossEntropyLoss``'s
    argument names (plus temperature, fused, inplace and the distribution arguments).

    ``weight`` is this rank's (C_r,) slice (a buffer). forward(logits_local, target) as the
    function.
    """

    def __init__(self, weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0,
                 temperature: float = 1.0, fused: bool = False, inplace: bool = False,
                 group: ProcessGroup = None, class_offset: Optional[int] = None,
                 num_classes: Optional[int] = None) -> None:
        super().__init__()
        fn = "softcal.distributed.VocabParallelCrossEntropy"
        self.label_smoothing = check_label_smoothing(fn, label_smoothing)
        check_reduction(fn, reduction)
        self.reduction = reduction
        self.ignore_index = check_ignore_index(fn, ignore_index)
        if isinstance(temperature, torch.Tensor):
            raise TypeError(f"{fn}: temperature must be a float here (pass a tensor to the "
                            "function to learn one), got a tensor")
        self.temperature = check_temperature(fn, temperature, torch.device("cpu"))
        if inplace and not fused:
            raise ValueError(f"{fn}: inplace=True needs fused=True, got fused={fused!r}")
        self.fused, self.inplace = bool(fused), bool(inplace)
        if weight is not None and not isinstance(weight, torch.Tensor):
            raise TypeError(f"{fn}: weight must be a torch.Tensor or None, got {type(weight).__name__}")
        self.register_buffer("weight", weight)
        self.group, self.class_offset, self.num_classes = group, class_offset, num_classes

    def forward(self, logits_local: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(
            logits_local, target, group=self.group, class_offset=self.class_offset,
            num_classes=self.num_classes, temperature=self.temperature,
            label_smoothing=self.label_smoothing, weight=self.weight,
            ignore_index=self.ignore_index, reduction=self.reduction, fused=self.fused,
            inplace=self.inplace)

    def extra_repr(self) -> str:
        return (f"label_smoothing={self.label_smoothing}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}, fused={self.fused}, inplace={self.inplace}")


from ._lm_head_parallel import vocab_parallel_linear_cross_entropy  # noqa: E402  (the LM head)
