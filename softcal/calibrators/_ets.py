"""Ensemble temperature scaling (Zhang, Kailkhura and Han 2020, "Mix-n-Match"), fitted exactly.

    p(x) = w1 softmax(x / T) + w2 softmax(x) + w3 / C,   w in the simplex

T is the exact temperature scaling fit (:class:`softcal.nn.TemperatureScaler`); then the
weights minimise the mean NLL -mean_i log(Q_i . w) with Q_i = (softmax(x_i/T)_y, softmax(x_i)_y,
1/C), a convex function of w: one pass keeps Q (3 numbers per row), and the minimum over the
triangle is the best of the interior Newton point (when it lies inside) and the minima along
the three edges (1-D convex: safeguarded Newton on the derivative). With ``group`` every
evaluation's sums are all-reduced. Each component has the same order of classes as x, so the
mixture keeps every argmax (accuracy-preserving).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Optional, Tuple, Union

import torch

from ._base import (ArrayLike, Calibrator, CalibratorFitResult, Rows, check_tol, mean_nll_of_logits,
                    timer)

__all__ = ["EnsembleTemperatureScaler"]


class EnsembleTemperatureScaler(Calibrator):
    """Ensemble temperature scaling (Zhang et al. 2020): a convex mix of the temperature-scaled,
    the uncalibrated and the uniform distribution. Accuracy-preserving.

    ``forward(logits (..., C))`` returns log-probabilities (..., C) (their softmax is the
    mixture), in the input's dtype. Buffers (float64): ``temperature`` (0-dim), ``weights`` (3,).
    """

    method = "ets"

    def __init__(self, model: Optional[torch.nn.Module] = None) -> None:
        super().__init__(model)
        self._state("temperature")
        self._state("weights")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._logits_in(x)
        work = torch.float64 if logits.dtype == torch.float64 else torch.float32
        z = logits.to(work)
        c = z.shape[-1]
        with torch.no_grad():
            lw = torch.log(self.weights.to(work))
        t = self.temperature.to(work)
        parts = torch.stack([lw[0] + torch.log_softmax(z / t, dim=-1),
                             lw[1] + torch.log_softmax(z, dim=-1),
                             (lw[2] - math.log(c)).expand_as(z)], dim=0)
        return torch.logsumexp(parts, dim=0).to(logits.dtype)

    def fit(self, data: Union[ArrayLike, torch.nn.Module, Iterable], labels: Union[ArrayLike, Iterable, None] = None,
            *, tol: float = 1e-10, progress: bool = True, check_probabilities: bool = True,
            group: Any = None) -> CalibratorFitResult:
        """Fit T (temperature scaling, exact) then the weights (exact on the simplex). The data
        come as for :meth:`TemperatureScaler.fit` (tensors, model and loader, chunks; ``group``)."""
        from ..calibration import TemperatureScaler

        fn = "softcal.nn.EnsembleTemperatureScaler.fit"
        elapsed = timer()

        def options(sig):
            checked = check_tol(fn, "tol", tol)
            sig.same("tol", checked)
            return checked

        rows = self._rows(fn, data, labels, progress, group, check_probabilities, options)
        tol = rows.options
        c = rows.classes
        nll_before = mean_nll_of_logits(rows)
        src = ([(x, y) for x, y, _ in rows.chunks()] if rows.in_memory
               else (lambda: ((x, y) for x, y, _ in rows.chunks())))
        ts = TemperatureScaler()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = ts.fit(src, progress=False, group=group)
        t = r.temperature
        qs = []
        for x, y, _ in rows.chunks():
            a = torch.log_softmax(x / t, dim=1).gather(1, y[:, None]).exp()
            b = torch.log_softmax(x, dim=1).gather(1, y[:, None]).exp()
            qs.append(torch.cat([a, b, torch.full_like(a, 1.0 / c)], 1).cpu())
        q = torch.cat(qs) if qs else torch.empty(0, 3, dtype=torch.float64)
        w, value, evals = _simplex_min(q, rows, tol)
        self.temperature = torch.tensor(t, dtype=torch.float64, device=self.temperature.device)
        self.weights = w.to(self.weights.device)
        self.hyperparameters = {"classes": c, "_fitted": True}
        return CalibratorFitResult(
            method=self.method, nll_before=nll_before, nll_after=value, objective=value,
            iterations=evals, passes=r.iterations + 2, converged=True, grad_norm=float("nan"),
            rows=rows.total_rows, classes=c, time_s=elapsed(),
            hyperparameters={"temperature": t, "weights": w.tolist()})


def _stats(q: torch.Tensor, w: torch.Tensor, rows: Rows, order: int):
    """(mean F, grad (3,), hess (3, 3)) of F(w) = -mean log(q w), summed over the ranks."""
    s = q @ w
    f = -torch.log(s).sum() if q.shape[0] else torch.zeros((), dtype=torch.float64)
    parts = [f.reshape(1), torch.tensor([float(q.shape[0])], dtype=torch.float64)]
    if order >= 1:
        parts.append(-(q / s[:, None]).sum(0))
    if order >= 2:
        qs = q / s[:, None]
        parts.append((qs.T @ qs).reshape(-1))
    v = torch.cat(parts)
    if rows.group is not None:
        from .._agree import all_reduce_checked

        v = all_reduce_checked(rows.fn, rows.group, v, None)
    n = float(v[1])
    out = [float(v[0]) / n]
    if order >= 1:
        out.append(v[2:5] / n)
    if order >= 2:
        out.append(v[5:14].view(3, 3) / n)
    return out


def _edge_min(q, rows, a: torch.Tensor, b: torch.Tensor, tol: float):
    """min over t in [0, 1] of F(a + t (b - a)): safeguarded Newton on F' (convex)."""
    d = b - a
    lo, hi = 0.0, 1.0

    def at(t):
        f, g, h = _stats(q, a + t * d, rows, 2)
        return f, float(g @ d), float(d @ h @ d)

    evals = 2
    f0, g0, _ = at(0.0)
    f1, g1, _ = at(1.0)
    if g0 >= 0:
        return a, f0, evals
    if g1 <= 0:
        return b, f1, evals
    t = 0.5
    for _ in range(100):
        f, g, h = at(t)
        evals += 1
        if g > 0:
            hi = t
        else:
            lo = t
        if abs(g) <= tol or hi - lo <= 1e-15:
            break
        cand = t - g / h if h > 0 else 0.5 * (lo + hi)
        t = cand if lo < cand < hi else 0.5 * (lo + hi)
    return a + t * d, f, evals


def _simplex_min(q: torch.Tensor, rows: Rows, tol: float) -> Tuple[torch.Tensor, float, int]:
    e = torch.eye(3, dtype=torch.float64)
    best_w, best_f, evals = None, math.inf, 0
    for i, j in ((0, 1), (0, 2), (1, 2)):
        w, f, k = _edge_min(q, rows, e[i], e[j], tol)
        evals += k
        if f < best_f:
            best_w, best_f = w, f
    # interior: Newton on (w1, w2) with w3 = 1 - w1 - w2, kept strictly inside
    w = torch.full((3,), 1.0 / 3, dtype=torch.float64)
    basis = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    f, g, h = _stats(q, w, rows, 2)
    for _ in range(100):
        evals += 1
        gr, hr = basis.T @ g, basis.T @ h @ basis
        if float(gr.abs().max()) <= tol:
            if f < best_f:
                best_w, best_f = w, f
            break
        try:
            step = basis @ torch.linalg.solve(hr, -gr)
        except RuntimeError:
            break
        neg = step < 0
        tmax = float((w[neg] / -step[neg]).min()) if bool(neg.any()) else math.inf
        tt = min(1.0, 0.99 * tmax)
        while tt > 1e-12:
            fn, gn, hn = _stats(q, w + tt * step, rows, 2)
            if fn <= f + 1e-4 * tt * float(g @ step):
                break
            tt *= 0.5
        else:
            break
        w, f, g, h = w + tt * step, fn, gn, hn
    best_w = best_w.clamp_min(0.0)
    best_w = best_w / best_w.sum()
    return best_w, _stats(q, best_w, rows, 0)[0], evals
