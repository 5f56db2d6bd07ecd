"""The argument checks of :func:`softcal.distributed.vocab_parallel_cross_entropy` and the
ranks' agreement on its call (see :mod:`softcal._agree`): what every rank must pass alike, each
rank's class slice, and the targets (their range against the agreed number of classes, and
that every rank holds the same ones)."""

from __future__ import annotations

import math
from typing import Tuple

import torch

from . import _agree
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
)

_FN = "softcal.distributed.vocab_parallel_cross_entropy"


def _unwrap_dtensor(logits, target, weight, group):
    """A DTensor sharded on the class dimension -> (local tensor, target, weight slice, group)."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover (torch without DTensor)
        return logits, target, weight, group
    if isinstance(target, DTensor):
        if not all(isinstance(p, Replicate) for p in target.placements):
            raise ValueError(f"{_FN}: a DTensor target must be replicated, got placements "
                             f"{target.placements}")
        target = target.to_local()
    if not isinstance(logits, DTensor):
        if isinstance(weight, DTensor):
            raise TypeError(f"{_FN}: weight is a DTensor but logits is not")
        return logits, target, weight, group
    mesh = logits.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"{_FN}: a DTensor logits must live on a 1-D device mesh, got a "
                         f"{mesh.ndim}-D mesh")
    class_dim = 0 if logits.dim() == 1 else 1
    placement = logits.placements[0]
    if not (isinstance(placement, Shard) and placement.dim % logits.dim() == class_dim):
        raise ValueError(f"{_FN}: a DTensor logits must be sharded on the class dimension "
                         f"(Shard({class_dim}) or Shard(-1) for (N, C)), got {placement}")
    if group is not None:
        raise ValueError(f"{_FN}: group must be None with a DTensor (its mesh gives the group)")
    group = mesh.get_group()
    if isinstance(weight, DTensor):
        wp = weight.placements[0]
        if not isinstance(wp, Shard):
            raise ValueError(f"{_FN}: a DTensor weight must be Shard(0), got {wp}")
        weight = weight.to_local()
    return logits.to_local(), target, weight, group


def _mesh_group(logits, group):
    """The group of a DTensor's 1-D mesh (checked here, before the agreement: a DTensor's
    placements are the same on every rank), else ``group``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover (torch without DTensor)
        return group
    if not isinstance(logits, DTensor):
        return group
    mesh = logits.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"{_FN}: a DTensor logits must live on a 1-D device mesh, got a "
                         f"{mesh.ndim}-D mesh")
    if group is not None:
        raise ValueError(f"{_FN}: group must be None with a DTensor (its mesh gives the group)")
    return mesh.get_group()


_REDUCTIONS = ("none", "mean", "sum")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_call(sig, logits_local, target, weight, group, class_offset, num_classes,
                temperature, label_smoothing, ignore_index, reduction, fused, inplace):
    """This rank's argument checks and its part of the call's signature (no collective)."""
    logits_local, target, weight, _ = _unwrap_dtensor(logits_local, target, weight, None)
    check_logits(_FN, logits_local, name="logits_local")
    target = check_target(_FN, logits_local, target)
    weight = check_weight(_FN, logits_local, weight)
    temperature = check_temperature(_FN, temperature, logits_local.device)
    eps = check_label_smoothing(_FN, label_smoothing)
    red = check_reduction(_FN, reduction)
    ignore_index = check_ignore_index(_FN, ignore_index)
    if inplace and not fused:
        raise ValueError(f"{_FN}: inplace=True needs fused=True, got fused={fused!r}")
    check_inplace_leaf(_FN, logits_local, bool(fused and inplace), name="logits_local")
    n_local = logits_local.shape[0] if logits_local.dim() == 1 else logits_local.shape[1]
    if class_offset is None:
        if num_classes is not None:
            raise ValueError(f"{_FN}: num_classes is only used with class_offset; got "
                             f"num_classes={num_classes!r} and class_offset=None")
    else:
        for name, v in (("class_offset", class_offset), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{_FN}: {name} must be an int with class_offset given, got "
                                f"{type(v).__name__}")
        if not 0 <= class_offset <= class_offset + n_local <= num_classes:
            raise ValueError(f"{_FN}: the slice [class_offset, class_offset + C_local) = "
                             f"[{class_offset}, {class_offset + n_local}) is not inside [0, "
                             f"num_classes = {num_classes})")
    if logits_local.dim() > 2 and n_local == 0:  # reshape(-1, 0) cannot infer the rows
        batch_shape = (logits_local.shape[0],) + tuple(logits_local.shape[2:])
        x = logits_local.movedim(1, -1).reshape(math.prod(batch_shape), 0)
        t = target.reshape(-1)
    else:
        x, t, batch_shape = flatten_classes(logits_local, target)
    if isinstance(temperature, torch.Tensor):
        t_value = float(temperature.detach())
        if not (math.isfinite(t_value) and t_value > 0):
            raise ValueError(f"{_FN}: temperature must be a finite number > 0, got {t_value}")
    else:
        t_value = float(temperature)
    # What every rank must pass alike (so that the collectives below meet with equal sizes and
    # dtypes, and the result is the loss of one problem), ...
    sig.same("the number of rows", int(t.numel()))
    sig.same("the target's number of dimensions", len(batch_shape))
    sig.same("the logits' dtype", logits_local.dtype, show=_DTYPES)
    sig.same("reduction", _REDUCTIONS[red], show=_REDUCTIONS)
    sig.same("label_smoothing", eps, kind="float")
    sig.same("ignore_index", ignore_index)
    sig.same("temperature", t_value, kind="float")
    sig.same("temperature's kind", "tensor" if isinstance(temperature, torch.Tensor) else
             "float", show=("float", "tensor"))
    # (the backward all-reduces dL/dT only where the temperature needs a gradient)
    sig.same("temperature.requires_grad", bool(isinstance(temperature, torch.Tensor)
                                               and temperature.requires_grad
                                               and torch.is_grad_enabled()))
    sig.same("weight", "None" if weight is None else "a tensor", show=("None", "a tensor"))
    sig.same("class_offset", "None" if class_offset is None else "an int",
             show=("None", "an int"))
    sig.same("num_classes", num_classes, kind="int")
    # ... and what each rank contributes: its slice, and what the targets hold (the same
    # targets on every rank; their range is checked against the agreed number of classes).
    sig.each("width", int(n_local))
    sig.each("offset", class_offset, kind="int")
    valid = t != ignore_index
    lo = hi = lo_at = hi_at = None
    if bool(valid.any()):
        big = torch.iinfo(torch.int64).max
        tv_hi = torch.where(valid, t, torch.full_like(t, -big - 1))
        tv_lo = torch.where(valid, t, torch.full_like(t, big))
        stats = torch.stack([tv_hi.max(), tv_hi.argmax(), tv_lo.min(), tv_lo.argmin()]).tolist()
        hi, hi_at, lo, lo_at = (int(v) for v in stats)
    sig.each("largest target", hi, kind="int")
    sig.each("largest target's index", hi_at, kind="int")
    sig.each("smallest target", lo, kind="int")
    sig.each("smallest target's index", lo_at, kind="int")
    sig.each("target checksum", _agree.target_checksum(t))
    return x, t, batch_shape, weight, temperature, eps, red, ignore_index


def _agreed_layout(agreed, ignore_index: int) -> Tuple[int, int]:
    """(this rank's class offset, the global number of classes) from the agreed records, after
    the checks that need every rank's values (the same on every rank, so every rank raises
    the same error or none does)."""
    world, rank = agreed.world, agreed.rank
    widths = agreed.each("width")
    if agreed.value("class_offset") == "None":
        offsets = [sum(widths[:r]) for r in range(world)]
        n_classes = sum(widths)
    else:
        offsets = agreed.each("offset")
        n_classes = agreed.value("num_classes")
        order = sorted(range(world), key=lambda r: (offsets[r], widths[r]))
        end = 0
        for r in order:
            if offsets[r] != end:
                what = "overlap" if offsets[r] < end else "leave a gap"
                slices = ", ".join(f"rank {q}: [{offsets[q]}, {offsets[q] + widths[q]})"
                                   for q in order)
                raise ValueError(f"{_FN}: the ranks' class slices {what} ({slices}); with "
                                 f"class_offset they must tile [0, num_classes = {n_classes})")
            end += widths[r]
        if end != n_classes:
            slices = ", ".join(f"rank {q}: [{offsets[q]}, {offsets[q] + widths[q]})"
                               for q in order)
            raise ValueError(f"{_FN}: the ranks' class slices cover [0, {end}), not [0, "
                             f"num_classes = {n_classes}) ({slices})")
    sums = agreed.each("target checksum")
    same_targets = all(v == sums[0] for v in sums)
    for r in range(world):
        for v, at in ((agreed.each("largest target")[r], agreed.each("largest target's index")[r]),
                      (agreed.each("smallest target")[r],
                       agreed.each("smallest target's index")[r])):
            if v is not None and not 0 <= v < n_classes:
                raise ValueError(f"{_FN}: target[{at}] = {v} is out of range for {n_classes} "
                                 f"classes (ignore_index = {ignore_index})"
                                 + ("" if same_targets else f" on rank {r}"))
    if not same_targets:
        groups: dict = {}
        for r, v in enumerate(sums):
            groups.setdefault(v, []).append(str(r))
        parts = "; ".join("ranks " + ", ".join(rs) for rs in groups.values())
        raise ValueError(f"{_FN}: the ranks hold different targets (equal only within each of: "
                         f"{parts}); every rank must pass the same full targets")
    return offsets[rank], n_classes
