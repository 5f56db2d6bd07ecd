"""The Kolmogorov-Smirnov calibration error of Gupta et al. 2021 ("Calibration of neural
networks using splines", ICLR 2021): no bins, the largest gap between the cumulative sums of
confidence and of accuracy along the sorted confidences."""

from __future__ import annotations

from typing import Optional

import torch

from ._inputs import Temperature, _prepare, _top_label

__all__ = ["ks_calibration_error"]


def _ks(conf: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
    """max over distinct confidences c of |sum_{conf_i <= c} (conf_i - hit_i)| / n (0-dim)."""
    order = torch.argsort(conf, stable=True)
    s = conf[order]
    gap = torch.cumsum(s - hit[order], 0) / s.shape[0]
    # the cumulative gap is a function of the confidence: read it at the last row of each run
    # of equal confidences, so that the order of tied rows does not matter
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    return gap[last].abs().max()


def ks_calibration_error(scores, labels, *, temperature: Temperature = None, probs: bool = False,
                         ignore_index: Optional[int] = -100) -> float:
    """Kolmogorov-Smirnov calibration error of the top-label confidence (Gupta et al. 2021),
    in [0, 1].

    With the n rows sorted by confidence, KS = max_i |sum_{j <= i} (conf_j - hit_j)| / n:
    the largest distance between the integrated confidence and the integrated accuracy.
    Gupta et al.'s code (``ks_error``) takes the maximum over every position of the sorted
    rows, so with tied confidences its value depends on the order of the tied rows; here the
    maximum is over the distinct confidences (the last row of each tie), which is
    order-free and equal to theirs when no two confidences tie.

    scores: (N, C), (N, C, d1, ...) or binary (see :mod:`softcal.metrics`), any float dtype;
    labels: integer. Returns a Python float.
    """
    p, _, y = _prepare("softcal.metrics.ks_calibration_error", scores, labels, temperature, probs,
                       ignore_index)
    conf, hit = _top_label(p, y)
    return float(_ks(conf, hit))
