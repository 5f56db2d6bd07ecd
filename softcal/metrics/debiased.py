"""The debiased L2 calibration error of Kumar, Liang and Ma 2019 ("Verified uncertainty
calibration"), as uncertainty-calibration's ``get_calibration_error(p=2, debias=True)``."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._inputs import Temperature, _check_bins, _prepare, _top_label

__all__ = ["debiased_calibration_error"]

_MODES = ("top-label", "marginal")
_BINNINGS = ("auto", "mass", "width", "discrete")


def _check_options(fn: str, mode: str, binning: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"{fn}: mode must be one of {_MODES}, got {mode!r}")
    if binning not in _BINNINGS:
        raise ValueError(f"{fn}: binning must be one of {_BINNINGS}, got {binning!r}")


def _columns(p: torch.Tensor, y: torch.Tensor, mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scores, outcomes) as columns (M, K) float64: K = 1 for top-label (confidence, hit),
    K = C for marginal (p_k, 1[y = k])."""
    if mode == "top-label":
        conf, hit = _top_label(p, y)
        return conf[:, None], hit[:, None]
    return p, torch.zeros_like(p).scatter_(1, y[:, None], 1.0)


def _is_discrete(x: torch.Tensor) -> bool:
    """uncertainty-calibration's test for the output of a binned model: in every column, fewer
    distinct values than a quarter of the rows."""
    n = x.shape[0]
    return all(torch.unique(x[:, k]).numel() < n / 4.0 for k in range(x.shape[1]))


def _mass_edges(col: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Upper bin edges of uncertainty-calibration's get_equal_bins: the sorted scores split in
    min(n_bins, n) runs whose sizes differ by at most one (the longer first, numpy's
    array_split), an edge halfway between consecutive runs, and 1.0 (duplicates kept: they
    only make empty bins)."""
    s, _ = torch.sort(col)
    n = s.shape[0]
    k = min(n_bins, n)
    q, r = divmod(n, k)
    ends = torch.arange(1, k, device=s.device) * q + torch.arange(1, k, device=s.device).clamp(max=r)
    one = torch.ones(1, dtype=torch.float64, device=s.device)
    return torch.cat([(s[ends - 1] + s[ends]) / 2.0, one])


def _discrete_edges(col: torch.Tensor) -> torch.Tensor:
    """get_discrete_bins: an edge halfway between consecutive distinct values, and 1.0."""
    u = torch.unique(col)
    one = torch.ones(1, dtype=torch.float64, device=col.device)
    return torch.cat([(u[:-1] + u[1:]) / 2.0, one])


def _bin_stats(x: torch.Tensor, o: torch.Tensor, idx: torch.Tensor, n_bins: int) -> torch.Tensor:
    """(3, K, n_bins): per column and bin, the count, the sum of scores and of outcomes."""
    k = x.shape[1]
    flat = (idx + n_bins * torch.arange(k, device=x.device)[None, :]).reshape(-1)
    out = torch.zeros(3, k * n_bins, dtype=torch.float64, device=x.device)
    out[0].index_add_(0, flat, torch.ones_like(x).reshape(-1))
    out[1].index_add_(0, flat, x.reshape(-1))
    out[2].index_add_(0, flat, o.reshape(-1))
    return out.reshape(3, k, n_bins)


def _l2_from_stats(stats: torch.Tensor, debias: bool) -> torch.Tensor:
    """The calibration error from bin statistics (3, K, B): per column k,
    e_k = sum_b (n_b / n) [(mean score_b - mean outcome_b)^2 - debias * v_b] with
    v_b = a_b (1 - a_b) / (n_b - 1), a_b the bin's mean outcome (bins of fewer than two rows
    count 0 when debiased); the result is sqrt(mean_k max(e_k, 0))."""
    count, sx, so = stats[0], stats[1], stats[2]
    n = count.sum(1, keepdim=True)
    safe = count.clamp_min(1)
    mx, mo = sx / safe, so / safe
    term = (mx - mo) ** 2
    if debias:
        term = torch.where(count >= 2, term - mo * (1 - mo) / (count - 1).clamp_min(1),
                           torch.zeros_like(term))
    per_column = ((count / n) * term).sum(1).clamp_min(0)
    return per_column.mean().sqrt()


def _debiased_from_columns(x: torch.Tensor, o: torch.Tensor, n_bins: int, binning: str,
                           debias: bool) -> float:
    if binning == "width":
        from .binned import _bin_index
        idx, nb = _bin_index(x, n_bins), n_bins
    else:
        edges = [_discrete_edges(x[:, k]) if binning == "discrete" else _mass_edges(x[:, k], n_bins)
                 for k in range(x.shape[1])]
        nb = max(e.shape[0] for e in edges)
        # searchsorted side "left": bin i holds edges[i-1] < score <= edges[i], as numpy's
        idx = torch.stack([torch.searchsorted(e, x[:, k].contiguous()) for k, e in enumerate(edges)], 1)
        idx = idx.clamp_(max=nb - 1)
    return float(_l2_from_stats(_bin_stats(x, o, idx, nb), debias))


def debiased_calibration_error(scores, labels, n_bins: int = 15, *, mode: str = "top-label",
                               binning: str = "auto", debias: bool = True,
                               temperature: Temperature = None, probs: bool = False,
                               ignore_index: Optional[int] = -100) -> float:
    """The debiased L2 calibration error of Kumar et al. 2019, in [0, 1].

    For each bin b of n_b rows: (mean score - mean outcome)^2 - a_b (1 - a_b) / (n_b - 1)
    (a_b: the mean outcome; the subtracted term removes the plug-in estimator's bias), weighted
    by n_b / n and summed; negative sums count 0; the result is the square root. ``mode``:
    "top-label" (score: the top-label confidence, outcome: whether the top label is right) or
    "marginal" (each class k: p_k against 1[y = k]; the squares averaged over the classes, then
    the square root). ``debias=False`` gives the plug-in L2 error (RMS calibration error).

    ``binning``: "auto" (the default) is uncertainty-calibration's choice: "discrete" when the
    probabilities of every class (all C columns, in either mode) take fewer distinct values
    than a quarter of the rows (the output of a binned calibrator: one bin per distinct
    value), else "mass": min(n_bins, n) equal-mass bins whose
    edges lie halfway between the neighbouring sorted scores (a score equal to an edge belongs
    to the lower bin). With these, the value equals
    ``calibration.get_calibration_error(probs, labels, p=2, debias=True, mode=mode)`` of
    uncertainty-calibration 0.1.4 (which uses n_bins = 15) up to float64 rounding. "width":
    ``n_bins`` equal-width bins (k/n, (k+1)/n] as :func:`ece`'s, which streaming can
    accumulate (:class:`DebiasedCalibrationError`); equal-mass bins need every row first.

    scores: (N, C), (N, C, d1, ...) or binary (see :mod:`softcal.metrics`), any float dtype;
    labels: integer. Returns a Python float.
    """
    fn = "softcal.metrics.debiased_calibration_error"
    n_bins = _check_bins(fn, n_bins)
    _check_options(fn, mode, binning)
    p, _, y = _prepare(fn, scores, labels, temperature, probs, ignore_index)
    if binning == "auto":   # decided on every class's probabilities, in both modes
        binning = "discrete" if _is_discrete(p) else "mass"
    x, o = _columns(p, y, mode)
    return _debiased_from_columns(x, o, n_bins, binning, bool(debias))
