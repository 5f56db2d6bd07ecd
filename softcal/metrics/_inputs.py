"""Input handling shared by every metric: shapes (N, C), (N, C, d1, ...) and binary problems,
``ignore_index``, the temperature, probabilities, and their checks."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

Temperature = Optional[Union[float, torch.Tensor]]

# |row sum - 1| allowed for probabilities (probs=True), by the scores' dtype.
_SUM_TOL = {torch.float16: 2e-2, torch.bfloat16: 2e-2}
_SUM_TOL_DEFAULT = 1e-3


def _check_bins(fn: str, n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"{fn}: n_bins must be an int >= 1, got {n_bins!r}")
    return n_bins


def _check_ignore_index(fn: str, ignore_index) -> Optional[int]:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int or None, got {ignore_index!r}")
    return ignore_index


def _check_temperature(fn: str, temperature: Temperature, device: torch.device):
    """A float, or a one-element floating tensor, finite and > 0 (float64 on ``device``)."""
    if temperature is None:
        return None
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.detach()   # a number about the values: never part of a graph
        if temperature.numel() != 1:
            raise ValueError(f"{fn}: temperature tensor must have exactly one element, got shape "
                             f"{tuple(temperature.shape)}")
        if not temperature.dtype.is_floating_point:
            raise TypeError(f"{fn}: temperature tensor must be floating point, got dtype "
                            f"{temperature.dtype}")
        t = temperature.reshape(()).to(device, torch.float64)
        v = float(t)  # one synchronisation: a bad value must not give a silently wrong metric
        if not (v > 0 and v < float("inf")):
            raise ValueError(f"{fn}: temperature must be a finite number > 0, got tensor({v})")
        return t
    if isinstance(temperature, bool):
        raise TypeError(f"{fn}: temperature must be a number or a tensor, got {temperature!r}")
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: temperature must be a number or a tensor, got {temperature!r}") from None
    if not (t > 0 and t < float("inf")):
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got {temperature!r}")
    return t


def _rows(fn: str, scores, labels, probs: bool, ignore_index: Optional[int] = -100,
          allow_empty: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores as float64 rows (M, C) and labels int64 (M,), the ignored rows dropped.

    Shapes: scores (N, C) with labels (N,) or (N, 1); scores (N, C, d1, ..., dk) with labels
    (N, d1, ..., dk) (class dimension 1, as in torch.nn.functional.cross_entropy); a binary
    problem as one score per element (scores of the labels' shape, except (N, C) with C > 1,
    refused as one-hot labels; or a class dimension of size 1): a logit of class 1, or with
    probs=True its probability p, made into the two classes [0, logit] or [1 - p, p].
    """
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores)
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    # Metrics are numbers about the values, never part of a graph: no gradient, no warning.
    scores, labels = scores.detach(), labels.detach()
    name = "probs" if probs else "logits"
    ignore_index = _check_ignore_index(fn, ignore_index)
    if not scores.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be floating point, got dtype {scores.dtype}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise TypeError(f"{fn}: labels must be integer class indices, got dtype {labels.dtype}")
    if scores.dim() == 2 and labels.dim() == 2 and labels.shape[1] == 1 and scores.shape[1] != 1:
        labels = labels.reshape(-1)                       # (N, 1) labels beside (N, C) scores
    binary = scores.shape == labels.shape and scores.dim() >= 1
    if binary and scores.dim() == 2 and scores.shape[1] != 1:
        # (N, C) scores beside (N, C) labels: one-hot labels far more often than a binary
        # (N, d1) problem; refused rather than read silently as C binary problems a row
        raise ValueError(
            f"{fn}: labels has the {name}' shape {tuple(labels.shape)}: labels are class indices "
            f"(N,), not one-hot (pass labels.argmax(1)); for a binary problem with one score per "
            f"element of (N, d1), pass {name} of shape (N, 1, d1)")
    if binary:
        x = scores.reshape(-1)
    elif scores.dim() >= 2 and labels.shape == scores.shape[:1] + scores.shape[2:]:
        binary = scores.shape[1] == 1
        x = scores.movedim(1, -1).reshape(-1, scores.shape[1])
        if binary:
            x = x.reshape(-1)
    else:
        raise ValueError(
            f"{fn}: labels has shape {tuple(labels.shape)} but {name} has shape "
            f"{tuple(scores.shape)} (expected labels (N,) for {name} (N, C), (N, d1, ...) for "
            f"(N, C, d1, ...), or the {name}' own shape for a binary problem)")
    y = labels.reshape(-1).to(x.device, torch.int64)
    if ignore_index is not None:
        keep = y != ignore_index
        if not bool(keep.all()):
            x, y = x[keep], y[keep]
    if y.shape[0] == 0 and not allow_empty:
        if labels.numel():
            raise ValueError(f"{fn}: every label is ignore_index ({ignore_index}): no rows to measure")
        raise ValueError(f"{fn}: empty input (0 rows)")
    x64 = x.to(torch.float64)
    if binary:
        x64 = torch.stack([1 - x64, x64], 1) if probs else \
            torch.stack([torch.zeros_like(x64), x64], 1)
    c = x64.shape[1]
    if y.shape[0]:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= c:
            what = "for a binary problem" if binary else f"for {c} classes"
            extra = f" (or ignore_index={ignore_index})" if ignore_index is not None else ""
            raise ValueError(f"{fn}: labels must be in [0, {c - 1}]{extra} {what}, got label "
                             f"{lo if lo < 0 else hi}")
        if probs:
            _check_probs(fn, x64, scores.dtype)
    return x64, y


def _check_probs(fn: str, p: torch.Tensor, dtype: torch.dtype) -> None:
    tol = _SUM_TOL.get(dtype, _SUM_TOL_DEFAULT)
    err = (p.sum(1) - 1).abs().max()
    bad = torch.stack([p.min(), p.max(), err]).cpu().tolist()
    if not (bad[0] >= 0 and bad[1] <= 1):   # NaN fails too
        raise ValueError(f"{fn}: probs must be probabilities in [0, 1] (probs=True), got values from "
                         f"{bad[0]:.6g} to {bad[1]:.6g}")
    if not bad[2] <= tol:
        raise ValueError(f"{fn}: probs rows must sum to 1 (probs=True), got a row summing to "
                         f"1 {'+' if bad[2] > 0 else '-'} {bad[2]:.3g} (tolerance {tol:g} for {dtype})")


def _prepare(fn: str, scores, labels, temperature: Temperature, probs: bool,
             ignore_index: Optional[int] = -100, allow_empty: bool = False
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities float64 (M, C), log-probabilities float64 (M, C), labels int64 (M,)):
    the M rows of :func:`_rows`, softmax(logits / T) or softmax(log(p) / T)."""
    x, labels = _rows(fn, scores, labels, probs, ignore_index, allow_empty)
    t = _check_temperature(fn, temperature, x.device)
    if probs:
        if t is None:
            logp = torch.log(x.clamp_min(torch.finfo(torch.float64).tiny))
            return x, logp, labels
        x = torch.log(x)
    if t is not None:
        x = x / t
    logp = torch.log_softmax(x, dim=1)
    return logp.exp(), logp, labels


def _top_label(p: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-label confidence max_k p_k and the hit 1[argmax = label] (float64), ties to the first."""
    conf, pred = p.max(dim=1)
    return conf, (pred == labels).to(torch.float64)
