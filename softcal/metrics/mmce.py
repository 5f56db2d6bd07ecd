"""MMCE, the maximum mean calibration error of Kumar, Sarawagi and Jain 2018 ("Trainable
calibration measures for neural networks from kernel mean embeddings", ICML 2018)."""

from __future__ import annotations

from typing import Optional

import torch

from ._inputs import Temperature, _prepare, _top_label

__all__ = ["mmce"]

# exp(x) overflows float64 beyond ~709; a block spans at most this many kernel widths
_SPAN = 300.0


def _laplacian_quadratic_form(r: torch.Tensor, a: torch.Tensor, width: float) -> torch.Tensor:
    """sum_{i,j} a_i a_j exp(-|r_i - r_j| / width) in O(n log n) (0-dim, float64).

    With the rows sorted by r, the pairs i < j contribute a_j exp(-r_j / w) * sum_{i<j} a_i
    exp(r_i / w): a cumulative sum. The exponentials are taken relative to the start of
    blocks of r that span at most 300 widths (so none overflows), and the sum over the earlier
    blocks is carried from block to block, scaled by exp(-(distance) / w)."""
    order = torch.argsort(r, stable=True)
    r, a = r[order], a[order]
    total = (a * a).sum()
    block = ((r - r[0]) / (_SPAN * width)).floor().to(torch.int64)
    bounds = torch.nonzero(block[1:] != block[:-1]).reshape(-1) + 1
    starts = [0] + bounds.tolist() + [r.shape[0]]
    carry = torch.zeros((), dtype=torch.float64, device=r.device)   # sum_{i in earlier blocks} a_i e^{(r_i - base)/w}
    base = r[0]
    cross = torch.zeros((), dtype=torch.float64, device=r.device)
    for lo, hi in zip(starts[:-1], starts[1:]):
        rb, ab = r[lo:hi], a[lo:hi]
        new_base = rb[0]
        carry = carry * torch.exp((base - new_base) / width)
        base = new_base
        up = ab * torch.exp((rb - base) / width)                   # <= e^300
        before = torch.cumsum(up, 0) - up + carry                   # sum over i < j
        cross = cross + (ab * torch.exp(-(rb - base) / width) * before).sum()
        carry = carry + up.sum()
    return total + 2 * cross


def mmce(scores, labels, *, kernel_width: float = 0.4, temperature: Temperature = None,
         probs: bool = False, ignore_index: Optional[int] = -100) -> float:
    """Maximum mean calibration error of the top-label confidence (Kumar et al. 2018), >= 0.

    MMCE = sqrt(sum_{i,j} (hit_i - conf_i)(hit_j - conf_j) k(conf_i, conf_j)) / n with the
    Laplacian kernel k(r, s) = exp(-|r - s| / kernel_width) (width 0.4, as in the paper and
    netcal's ``MMCE``, whose value this equals on (N, C) probabilities up to float64 rounding).
    Computed exactly in O(n log n) time and O(n) memory (a sort and cumulative sums), not
    netcal's n x n kernel matrix.

    scores: (N, C), (N, C, d1, ...) or binary (see :mod:`softcal.metrics`), any float dtype;
    labels: integer; kernel_width: > 0. Returns a Python float.
    """
    fn = "softcal.metrics.mmce"
    if isinstance(kernel_width, bool) or not isinstance(kernel_width, (int, float)) \
            or not 0 < kernel_width < float("inf"):
        raise ValueError(f"{fn}: kernel_width must be a finite number > 0, got {kernel_width!r}")
    p, _, y = _prepare(fn, scores, labels, temperature, probs, ignore_index)
    conf, hit = _top_label(p, y)
    return _mmce_rows(conf, hit, float(kernel_width))


def _mmce_rows(conf: torch.Tensor, hit: torch.Tensor, width: float) -> float:
    q = _laplacian_quadratic_form(conf, hit - conf, width)
    return float(q.clamp_min(0).sqrt() / conf.shape[0])
