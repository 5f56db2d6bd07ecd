"""Bootstrap confidence intervals for any metric of :mod:`softcal.metrics` (or any function
``metric(scores, labels, **kwargs) -> float``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import torch

from ._inputs import Temperature, _rows

__all__ = ["BootstrapResult", "bootstrap"]


@dataclass
class BootstrapResult:
    """A metric's value on the data and its bootstrap interval.

    estimate: the metric on all rows; low, high: the interval's ends; confidence: its level;
    std: the standard deviation of the resampled values; n_resamples; samples: the resampled
    values, float64 (n_resamples,) on the CPU.
    """

    estimate: float
    low: float
    high: float
    confidence: float
    std: float
    n_resamples: int
    samples: torch.Tensor

    def to_dict(self) -> Dict[str, float]:
        d = asdict(self)
        d.pop("samples")
        return d


def bootstrap(metric: Callable[..., float], scores, labels, *, n_resamples: int = 1000,
              confidence: float = 0.95, method: str = "percentile", seed: int = 0,
              temperature: Temperature = None, probs: bool = False,
              ignore_index: Optional[int] = -100, **kwargs) -> BootstrapResult:
    """Bootstrap confidence interval of ``metric`` (e.g. ``softcal.metrics.ece``).

    The rows (the elements of K-dimensional inputs, ignored labels left out) are resampled
    with replacement ``n_resamples`` times (indices drawn by a ``torch.Generator`` seeded with
    ``seed`` on the CPU, so the result is reproducible), and the metric is computed on each
    resample as ``metric(scores[idx], labels[idx], temperature=..., probs=..., **kwargs)``
    (``kwargs``: the metric's own options, e.g. ``n_bins=15``).
    ``method``: "percentile" (the interval is the (1 - confidence) / 2 and (1 + confidence) / 2
    quantiles of the resampled values, linear interpolation as numpy's default) or "basic"
    (2 * estimate minus those quantiles, in reverse order).

    scores: (N, C), (N, C, d1, ...) or binary (see :mod:`softcal.metrics`); labels: integer.
    Returns a :class:`BootstrapResult`.
    """
    fn = "softcal.metrics.bootstrap"
    if not callable(metric):
        raise TypeError(f"{fn}: metric must be callable (e.g. softcal.metrics.ece), got {metric!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 2:
        raise ValueError(f"{fn}: n_resamples must be an int >= 2, got {n_resamples!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) \
            or not 0 < confidence < 1:
        raise ValueError(f"{fn}: confidence must be a number in (0, 1), got {confidence!r}")
    if method not in ("percentile", "basic"):
        raise ValueError(f"{fn}: method must be 'percentile' or 'basic', got {method!r}")
    x, y = _rows(fn, scores, labels, probs, ignore_index)
    kw = dict(kwargs, probs=probs)
    if temperature is not None:
        kw["temperature"] = temperature
    estimate = float(metric(x, y, **kw))
    gen = torch.Generator().manual_seed(int(seed))
    n = y.shape[0]
    values = torch.empty(n_resamples, dtype=torch.float64)
    for b in range(n_resamples):
        idx = torch.randint(0, n, (n,), generator=gen).to(x.device)
        values[b] = float(metric(x[idx], y[idx], **kw))
    alpha = (1 - confidence) / 2
    q = torch.quantile(values, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    low, high = (q[0], q[1]) if method == "percentile" else (2 * estimate - q[1], 2 * estimate - q[0])
    return BootstrapResult(estimate=estimate, low=low, high=high, confidence=float(confidence),
                           std=float(values.std()), n_resamples=n_resamples, samples=values)
