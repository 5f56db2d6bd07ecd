"""Binning and isotonic calibrators: histogram binning (Zadrozny and Elkan 2001), isotonic
regression (one-vs-rest, and Zhang et al. 2020's accuracy-preserving shared map) and the
scaling-binning calibrator (Kumar, Liang and Ma 2019).

Each maps a row's probabilities p = softmax(logits) class by class, q_k = g_k(p_k), then
normalises, q / sum(q) (uniform where every q_k is 0); ``forward`` returns log q (log-
probabilities). Histogram binning and isotonic regression give q_k = 0 to a class never seen
in a bin (an infinite NLL when it is the label): their ``min_prob`` (default 1e-6, 0 turns it
off) floors q_k before the normalisation. Histogram binning's bins are equal-width, bin j =
(j/B, (j+1)/B] as in :mod:`softcal.metrics` (0 in the first bin); its fit is a sum over rows
(counts and hits per class and bin), so it streams and all-reduces over ``group``. Isotonic
regression and scaling-binning need the rows sorted: they hold them in memory (float64) and
fit on this process's rows only (``group`` is refused).

Bin counts left at ``None`` are chosen by k-fold cross-validation on the fit rows, by the mean
held-out Brier score (the NLL is infinite wherever a bin's frequency is 0).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch

from ._base import (ArrayLike, Calibrator, CalibratorFitResult, Rows, check_folds, fold_ids,
                    grid_hash, timer)
from ._pav import isotonic_knots
from .. import _ops

__all__ = ["HistogramBinning", "IsotonicCalibrator", "ScalingBinningCalibrator", "DEFAULT_BIN_GRID"]

#: Bin counts searched by cross-validation.
DEFAULT_BIN_GRID: Tuple[int, ...] = (5, 10, 15, 20, 30, 50)


def _check_bins(fn: str, name: str, value: Any, allow_none: bool = True) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{fn}: {name} must be an int >= 1{' or None' if allow_none else ''}, got {value!r}")
    return value


def _check_floor(fn: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= float(v) < 1):
        raise ValueError(f"{fn}: min_prob must be a number in [0, 1), got {v!r}")
    return float(v)


def _normalise_log(q: torch.Tensor) -> torch.Tensor:
    s = q.sum(-1, keepdim=True)
    q = torch.where(s > 0, q / s.clamp_min(1e-300), torch.full_like(q, 1.0 / q.shape[-1]))
    return torch.log(q)


def _brier(logq: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    q = logq.exp()
    return (q * q).sum(1) - 2 * q.gather(1, y[:, None]).squeeze(1) + 1


def _bin_of(p: torch.Tensor, bins: int) -> torch.Tensor:
    """Equal-width bin of each probability: (j/B, (j+1)/B] -> j; 0 -> 0."""
    return (p * bins).ceil_().sub_(1).clamp_(0, bins - 1).long()


def _flat_bins(p: torch.Tensor, bins: int, fold: Optional[torch.Tensor], inplace: bool = False
               ) -> torch.Tensor:
    """int64 (n, C): (fold_i C + k) B + bin of p_ik (``_bin_of``; fold 0 when ``fold`` is None),
    the index of entry (fold, class, bin) of a flat (folds, C, B) table. In float64 (exact
    integers), then one conversion: ceil(p B) clamped to [1, B], plus k B - 1. ``inplace``:
    p is overwritten (one (n, C) allocation fewer)."""
    n, c = p.shape
    off = torch.arange(c, dtype=p.dtype, device=p.device).mul_(bins).sub_(1)
    idx = (p.mul_(bins) if inplace else p * bins).ceil_().clamp_(1, bins).add_(off)
    if fold is not None:
        idx.add_((fold.to(p.dtype) * (c * bins))[:, None])
    return idx.long()


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """softmax along dim 1 of an (n, C) tensor: for float64 on the CPU softcal's kernel where
    it is built (one exp an entry, as accurate as torch.softmax and about 1.7x faster at C =
    100), else torch.softmax. Fits and forward both use it: the same p, so the same bins."""
    if _ops.HAVE_EXTENSION and x.device.type == "cpu" and x.dtype == torch.float64 and x.dim() == 2:
        return torch.ops.softcal.softmax_fwd(x.contiguous(), None, 1.0, 1, False)
    return torch.softmax(x, dim=1)


def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table[idx] for a flat table and an index tensor of any shape (``table.take(idx)``;
    index_select on the flattened indices is about 2.5x faster on the CPU)."""
    return table.index_select(0, idx.reshape(-1)).view(idx.shape)


def _nll_of_probs(x: torch.Tensor, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_i -log softmax(x_i)_y_i given p = softmax(x): -log p_iy (one log per row, no second
    pass over x), exactly (logsumexp(x_i) - x_iy) in the rows where p_iy is below 1e-200, whose
    logarithm the rounding of p would spoil (or that underflowed to 0)."""
    py = p.gather(1, y[:, None]).squeeze(1)
    lp = py.log()
    small = py < 1e-200
    if bool(small.any()):
        r = small.nonzero().squeeze(1)
        xr = x.index_select(0, r)
        lp[r] = xr.gather(1, y[r, None]).squeeze(1) - torch.logsumexp(xr, dim=1)
    return -lp.sum()


def _brier_sum(q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum over rows of the Brier score of q (n, C) normalised (uniform where a row sums to 0)."""
    s = q.sum(1, keepdim=True)
    qn = torch.where(s > 0, q / s.clamp_min(1e-300), torch.full_like(q, 1.0 / q.shape[1]))
    return ((qn * qn).sum(1) - 2 * qn.gather(1, y[:, None]).squeeze(1) + 1).sum()


class _Elementwise(Calibrator):
    def _probs(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Size, torch.dtype]:
        logits = self._logits_in(x)
        flat = _softmax(logits.reshape(-1, logits.shape[-1]).to(torch.float64))
        return flat, logits.shape, logits.dtype

    def _map(self, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """log q (..., C): log of the normalised calibrated probabilities, the input's dtype."""
        p, shape, dtype = self._probs(x)
        q = self._map(p).clamp_min(float(self.hyperparameters.get("min_prob", 0.0)))
        return _normalise_log(q).to(dtype).reshape(shape)


# ---------------------------------------------------------------------- histogram binning
class HistogramBinning(_Elementwise):
    """Histogram binning, one-vs-rest (Zadrozny and Elkan 2001): q_k = the frequency of class k
    among the fit rows whose p_k falls in the same equal-width bin (an empty bin keeps its
    centre), then normalised.

    Args:
        model: optional classifier (as :class:`TemperatureScaler`).
        n_bins: bins per class; ``None`` chooses it by ``cv``-fold cross-validation over
            ``bin_grid`` (mean held-out Brier score).
    Buffers: ``values`` (C, B) float64.
    """

    method = "histogram"

    def __init__(self, model: Optional[torch.nn.Module] = None, *, n_bins: Optional[int] = None,
                 cv: int = 5, bin_grid: Sequence[int] = DEFAULT_BIN_GRID, seed: int = 0,
                 min_prob: float = 1e-6) -> None:
        super().__init__(model)
        fn = "softcal.nn.HistogramBinning"
        self.min_prob = _check_floor(fn, min_prob)
        self.n_bins = _check_bins(fn, "n_bins", n_bins)
        self.cv = check_folds(fn, cv)
        self.bin_grid = tuple(_check_bins(fn, "bin_grid", int(b) if not isinstance(b, bool) else b, False)
                              for b in bin_grid)
        if not self.bin_grid:
            raise ValueError(f"{fn}: bin_grid must not be empty")
        self.seed = seed
        self._state("values")

    def _map(self, p):
        v = self.values.to(p.device)
        b = v.shape[1]
        return v.gather(1, _bin_of(p, b).T).T

    @staticmethod
    def _values(count: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
        b = count.shape[-1]
        centre = (torch.arange(b, dtype=torch.float64) + 0.5) / b
        return torch.where(count > 0, hits / count.clamp_min(1), centre.expand_as(count))

    def fit(self, data: Union[ArrayLike, torch.nn.Module, Iterable], labels: Union[ArrayLike, Iterable, None] = None,
            *, progress: bool = True, check_probabilities: bool = True, group: Any = None) -> CalibratorFitResult:
        """Count hits per class and bin (a sum over rows: streams, and all-reduces over
        ``group``); the data come as for :meth:`TemperatureScaler.fit`."""
        fn = "softcal.nn.HistogramBinning.fit"
        elapsed = timer()

        def options(sig):
            sig.same("n_bins", self.n_bins, kind="int")
            sig.same("cv", self.cv)
            sig.same("seed", self.seed)
            sig.same("min_prob", self.min_prob)
            sig.same("bin_grid (hash)", grid_hash(self.bin_grid))

        rows = self._rows(fn, data, labels, progress, group, check_probabilities, options)
        c = rows.classes
        grid = [self.n_bins] if self.n_bins is not None else list(self.bin_grid)
        k = self.cv if self.n_bins is None else 1
        folds = fold_ids(rows.rows, k, self.seed) if k > 1 else None
        sizes = [k * c * b for b in grid]
        # in memory: each chunk's probabilities (and, with one bin count, its bin indices) are
        # kept for the later passes instead of being computed again
        keep: Dict[int, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}

        def fold_of(x, r0):
            return None if folds is None else folds[r0:r0 + x.shape[0]].to(x.device)

        def probs(x, r0):
            if r0 in keep and keep[r0][0] is not None:
                return keep[r0][0]
            return _softmax(x)

        def counts(x, y, r0):
            """[sum NLL of the logits, rows, (counts, hits) of (fold, class, bin) per grid entry]"""
            p = _softmax(x)
            out = [_nll_of_probs(x, p, y).reshape(1),
                   torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device)]
            f = fold_of(x, r0)
            idx = None
            single = len(grid) == 1  # the only bin indices are kept, p is not needed again
            for b, size in zip(grid, sizes):
                idx = _flat_bins(p, b, f, inplace=single)
                out.append(torch.bincount(idx.view(-1), minlength=size).to(torch.float64))
                out.append(torch.bincount(idx.gather(1, y[:, None]).view(-1),
                                          minlength=size).to(torch.float64))
            if rows.in_memory:
                keep[r0] = (None, idx) if single else (p, None)
            return torch.cat(out)

        s = rows.row_sum(counts, 2 + 2 * sum(sizes))
        nll_before = float(s[0] / s[1])
        tables, off = [], 2
        for b, size in zip(grid, sizes):
            tables.append((s[off:off + size].view(k, c, b), s[off + size:off + 2 * size].view(k, c, b)))
            off += 2 * size
        cv_info = None
        if k > 1:
            # table f of each grid entry: the values fitted without fold f (flat (k C b,)),
            # read at each row's own fold: its held-out calibrated probabilities
            held_tables = [self._values(cnt.sum(0) - cnt, hit.sum(0) - hit).reshape(-1)
                           for cnt, hit in tables]

            def held(x, y, r0):
                p = probs(x, r0)
                f = fold_of(x, r0)
                out = [_brier_sum(_lookup(held_tables[gi].to(x.device), _flat_bins(p, b, f)), y)
                       for gi, b in enumerate(grid)]
                out.append(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device))
                return torch.stack(out)

            sc = rows.row_sum(held, len(grid) + 1)
            scores = (sc[:-1] / sc[-1]).tolist()
            best = int(torch.tensor(scores).argmin())
            cv_info = {"folds": k, "seed": self.seed, "metric": "brier",
                       "grid": [{"n_bins": b} for b in grid], "scores": scores,
                       "chosen": {"n_bins": grid[best]}}
        else:
            best = 0
        cnt, hit = tables[best]
        nb = grid[best]
        values = self._values(cnt.sum(0), hit.sum(0))
        self.values = values.to(self.values.device)
        self.hyperparameters = {"classes": c, "n_bins": nb, "min_prob": self.min_prob, "_fitted": True}
        self.cv_results = cv_info
        flat = values.reshape(-1)

        def nll_after(x, y, r0):
            idx = keep[r0][1] if r0 in keep and keep[r0][1] is not None else None
            if idx is None:
                idx = _flat_bins(probs(x, r0), nb, None)
            q = _lookup(flat.to(x.device), idx)  # the fitted map of p, as _map(p)
            return torch.stack([_nll_sum(q, y, self.min_prob, inplace=True),
                                torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)])

        s = rows.row_sum(nll_after, 2)
        keep.clear()
        return CalibratorFitResult(
            method=self.method, nll_before=nll_before, nll_after=float(s[0] / s[1]),
            objective=float("nan"), iterations=0, passes=2 + (1 if k > 1 else 0), converged=True,
            grad_norm=float("nan"), rows=rows.total_rows, classes=c, time_s=elapsed(),
            hyperparameters={"n_bins": nb, "min_prob": self.min_prob}, cv=cv_info)


def _nll_sum(q: torch.Tensor, y: torch.Tensor, floor: float, dim: int = 1,
             inplace: bool = False) -> torch.Tensor:
    """sum_i -log(q_iy / sum_k q_ik) for unnormalised q (n, C) floored at ``floor`` (uniform
    where a row sums to 0), each term at most -log(tiny): the NLL of ``forward`` (log q
    normalised) with one log per row instead of one per entry. ``dim=0``: q is (C, n);
    ``inplace``: q is floored in place."""
    q = q.clamp_min_(floor) if inplace else q.clamp_min(floor)
    s = q.sum(dim)
    qy = q.gather(dim, y[:, None] if dim == 1 else y[None, :]).reshape(-1)
    lq = torch.where(s > 0, qy.log() - s.clamp_min(1e-300).log(),
                     torch.full_like(s, -math.log(q.shape[dim])))
    return -lq.clamp_min(math.log(torch.finfo(torch.float64).tiny)).sum()


def _mean_nll(cal: "_Elementwise", rows: Rows) -> float:
    """The mean NLL of the fitted calibrator on the fit rows (one pass)."""
    floor = float(cal.hyperparameters.get("min_prob", 0.0))

    def f(x, y, r0):
        with torch.no_grad():
            q = cal._map(_softmax(x.to(torch.float64)))
        return torch.stack([_nll_sum(q, y, floor),
                            torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)])
    s = rows.row_sum(f, 2)
    return float(s[0] / s[1])


# ---------------------------------------------------------------------- isotonic
def _interp(p: torch.Tensor, kx: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation through the knots, constant outside them."""
    if kx.numel() == 1:
        return kv.expand_as(p).clone()
    i = torch.searchsorted(kx, p.contiguous()).clamp(1, kx.numel() - 1)
    x0, x1, v0, v1 = kx[i - 1], kx[i], kv[i - 1], kv[i]
    t = ((p - x0) / (x1 - x0)).clamp(0.0, 1.0)
    return v0 + t * (v1 - v0)


def _interp_rows(q: torch.Tensor, kx: torch.Tensor, kv: torch.Tensor, kn: torch.Tensor) -> torch.Tensor:
    """Row k of q (K, n) through the first kn[k] knots of row k of kx, kv (K, M) (padded with
    the last knot): piecewise linear, constant outside the knots; (K, n)."""
    m = kx.shape[1]
    if m == 1:
        return kv.expand_as(q).clone()
    last = (kn.to(torch.int64) - 1).clamp(1, m - 1)[:, None]
    i = torch.minimum(torch.searchsorted(kx, q.contiguous()).clamp_min(1), last)
    x0, x1 = kx.gather(1, i - 1), kx.gather(1, i)
    v0, v1 = kv.gather(1, i - 1), kv.gather(1, i)
    span = x1 - x0  # 0 only in a row with one knot (its padding)
    t = ((q - x0) / torch.where(span > 0, span, 1.0)).clamp(0.0, 1.0)
    return torch.where(span > 0, v0 + t * (v1 - v0), v0)


class IsotonicCalibrator(_Elementwise):
    """Isotonic regression calibrator.

    * ``mode="ovr"`` (default): one isotonic map per class, fitted on (p_k, 1[y = k]) over the
      fit rows (Zadrozny and Elkan 2002), then normalised. It may change a row's argmax.
    * ``mode="shared"``: ONE map for every class, fitted on all (p_ik, 1[y_i = k]) pairs, made
      strictly increasing (plus 1e-9 p), then normalised: it keeps every row's order of classes,
      so the argmax (accuracy-preserving; Zhang et al. 2020's IRM), up to float64 rounding
      (two probabilities within about 1e-7 of each other on a flat stretch of the map may tie).

    The maps are scikit-learn's: each pooled block's frequency from its smallest to its largest
    p, linear between blocks, constant beyond them. Buffers: ``knots_x``, ``knots_v`` (float64
    (K, M), padded with the last knot), ``knots_n`` (K,) (K = C for "ovr", 1 for "shared").
    """

    method = "isotonic"

    def __init__(self, model: Optional[torch.nn.Module] = None, *, mode: str = "ovr",
                 min_prob: float = 1e-6) -> None:
        super().__init__(model)
        self.min_prob = _check_floor("softcal.nn.IsotonicCalibrator", min_prob)
        if mode not in ("ovr", "shared"):
            raise ValueError(f"softcal.nn.IsotonicCalibrator: mode must be 'ovr' or 'shared', got {mode!r}")
        self.mode = mode
        self._state("knots_x")
        self._state("knots_v")
        self._state("knots_n")

    def _map(self, p):
        kx, kv, kn = (t.to(p.device) for t in (self.knots_x, self.knots_v, self.knots_n))
        if self.hyperparameters.get("mode", getattr(self, "mode", "ovr")) == "shared":
            n = int(kn[0])
            return _interp(p.reshape(-1), kx[0, :n], kv[0, :n]).view_as(p) + 1e-9 * p
        return _interp_rows(p.T, kx, kv, kn).T

    def fit(self, data: Union[ArrayLike, torch.nn.Module, Iterable], labels: Union[ArrayLike, Iterable, None] = None,
            *, progress: bool = True, check_probabilities: bool = True, group: Any = None) -> CalibratorFitResult:
        """Fit the map(s) by pool-adjacent-violators on the rows held in memory (chunks are
        read once and concatenated; ``group`` is refused: the fit needs every row sorted)."""
        fn = "softcal.nn.IsotonicCalibrator.fit"
        if group is not None:
            raise ValueError(f"{fn}: group= is not supported (isotonic regression sorts all the "
                             "rows; gather them on one rank and fit there)")
        elapsed = timer()
        rows = self._rows(fn, data, labels, progress, None, check_probabilities)
        c = rows.classes
        x, y = rows.gather()
        x, y = x.cpu(), y.cpu()
        p = _softmax(x)
        nll_before = float(_nll_of_probs(x, p, y)) / max(x.shape[0], 1)
        q = self._fit_arrays(p, y)
        self.hyperparameters = {"classes": c, "mode": self.mode, "min_prob": self.min_prob, "_fitted": True}
        nll_after = float(_nll_sum(q, y, self.min_prob, dim=0 if self.mode == "ovr" else 1,
                                   inplace=True)) / max(x.shape[0], 1)
        return CalibratorFitResult(
            method=self.method, nll_before=nll_before, nll_after=nll_after, objective=float("nan"),
            iterations=0, passes=2, converged=True, grad_norm=float("nan"), rows=rows.total_rows,
            classes=c, time_s=elapsed(), hyperparameters={"mode": self.mode, "min_prob": self.min_prob})

    def _fit_arrays(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """p (N, C) float64 CPU probabilities, y (N,) int64: the knots of every map; returns
        the map of p (as ``_map(p)``, from the fit itself: no interpolation): (N, C) for
        "shared", (C, N) (transposed) for "ovr"."""
        if self.mode == "shared":
            onehot = torch.zeros_like(p).scatter_(1, y[:, None], 1.0)
            kx, kv, kn, fitted = isotonic_knots(p.reshape(1, -1), onehot.reshape(1, -1))
            q = fitted.view_as(p) + 1e-9 * p
        else:  # one problem per class: (C, N), the labels' indicator per class
            n, c = p.shape
            pt = p.T  # a view: the kernel reads x at its strides (no (C, N) copy)
            hits = torch.zeros(c, n, dtype=torch.float64).index_put_(
                (y, torch.arange(n)), torch.ones((), dtype=torch.float64))
            kx, kv, kn, fitted = isotonic_knots(pt, hits)
            q = fitted  # (C, N): the caller's NLL reads it along dim 0
        self.knots_x, self.knots_v = kx, kv
        self.knots_n = kn.to(torch.float64)
        return q


# ---------------------------------------------------------------------- scaling-binning
class ScalingBinningCalibrator(_Elementwise):
    """The scaling-binning calibrator (Kumar, Liang and Ma 2019), marginal (per class).

    The fit rows are split in two halves (seeded): temperature scaling is fitted on the first;
    on the second, each class's scaled probabilities s_k = softmax(x / T)_k are cut into
    ``n_bins`` bins of equal mass, and each bin outputs the MEAN of s_k over its rows (not the
    label frequency: that is what makes its calibration error measurable). Then normalised.

    Args:
        n_bins: bins per class; ``None``: chosen by ``cv``-fold cross-validation over
            ``bin_grid`` (mean held-out Brier score).
    Buffers: ``temperature`` (0-dim), ``edges`` (C, B - 1) inner bin edges, ``values`` (C, B).
    """

    method = "scaling-binning"

    def __init__(self, model: Optional[torch.nn.Module] = None, *, n_bins: Optional[int] = None,
                 cv: int = 5, bin_grid: Sequence[int] = DEFAULT_BIN_GRID, seed: int = 0) -> None:
        super().__init__(model)
        fn = "softcal.nn.ScalingBinningCalibrator"
        self.n_bins = _check_bins(fn, "n_bins", n_bins)
        self.cv = check_folds(fn, cv)
        self.bin_grid = tuple(_check_bins(fn, "bin_grid", b, False) for b in bin_grid)
        self.seed = seed
        self._state("temperature")
        self._state("edges")
        self._state("values")

    def _map(self, p):
        t = self.temperature.to(p.device)
        s = torch.softmax(torch.log(p.clamp_min(1e-300)) / t, dim=1)
        e, v = self.edges.to(p.device), self.values.to(p.device)
        idx = torch.searchsorted(e.contiguous(), s.T.contiguous(), right=False)  # (C, n)
        return v.gather(1, idx).T

    def _fit_arrays(self, x: torch.Tensor, y: torch.Tensor, n_bins: int) -> None:
        from ..calibration import TemperatureScaler

        n, c = x.shape
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n, generator=g)
        first, second = perm[: n // 2], perm[n // 2:]
        if first.numel() == 0 or second.numel() == 0:
            raise ValueError(f"softcal.nn.ScalingBinningCalibrator.fit: needs at least 2 rows, got {n}")
        import warnings

        ts = TemperatureScaler()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = ts.fit(x[first], y[first], progress=False).temperature
        s = torch.softmax(x[second] / t, dim=1)                 # (m, C)
        ss, _ = torch.sort(s, dim=0)
        m = ss.shape[0]
        cuts = [(j * m) // n_bins for j in range(1, n_bins)]
        edges = (ss[[min(max(k, 0), m - 1) for k in cuts]].T.contiguous() if cuts
                 else torch.empty(c, 0, dtype=torch.float64))
        idx = torch.searchsorted(edges, s.T.contiguous(), right=False)  # (C, m)
        cnt = torch.zeros(c, n_bins, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(s.T))
        tot = torch.zeros(c, n_bins, dtype=torch.float64).scatter_add_(1, idx, s.T.contiguous())
        # an empty bin (ties in s) takes the mean of its edges
        lo = torch.cat([torch.zeros(c, 1, dtype=torch.float64), edges], 1)
        hi = torch.cat([edges, torch.ones(c, 1, dtype=torch.float64)], 1)
        self.temperature = torch.tensor(t, dtype=torch.float64)
        self.edges = edges
        self.values = torch.where(cnt > 0, tot / cnt.clamp_min(1), 0.5 * (lo + hi))

    def fit(self, data: Union[ArrayLike, torch.nn.Module, Iterable], labels: Union[ArrayLike, Iterable, None] = None,
            *, progress: bool = True, check_probabilities: bool = True, group: Any = None) -> CalibratorFitResult:
        """Fit on the rows held in memory (chunks are concatenated; ``group`` is refused: the
        equal-mass bins need every row sorted)."""
        fn = "softcal.nn.ScalingBinningCalibrator.fit"
        if group is not None:
            raise ValueError(f"{fn}: group= is not supported (equal-mass bins sort all the rows; "
                             "gather them on one rank and fit there)")
        elapsed = timer()
        rows = self._rows(fn, data, labels, progress, None, check_probabilities)
        c = rows.classes
        x, y = rows.gather()
        x, y = x.cpu(), y.cpu()
        nll_before = float(torch.nn.functional.cross_entropy(x, y))
        cv_info = None
        nb = self.n_bins
        if nb is None:
            k = self.cv
            folds = fold_ids(x.shape[0], k, self.seed + 1)
            scores = []
            for b in self.bin_grid:
                tot = 0.0
                for f in range(k):
                    tr, te = folds != f, folds == f
                    self._fit_arrays(x[tr], y[tr], b)
                    q = _normalise_log(self._map(_softmax(x[te])))
                    tot += float(_brier(q, y[te]).sum())
                scores.append(tot / x.shape[0])
            nb = self.bin_grid[int(torch.tensor(scores).argmin())]
            cv_info = {"folds": k, "seed": self.seed + 1, "metric": "brier",
                       "grid": [{"n_bins": b} for b in self.bin_grid], "scores": scores,
                       "chosen": {"n_bins": nb}}
        self._fit_arrays(x, y, nb)
        self.hyperparameters = {"classes": c, "n_bins": nb, "_fitted": True}
        self.cv_results = cv_info
        nll_after = _mean_nll(self, rows)
        return CalibratorFitResult(
            method=self.method, nll_before=nll_before, nll_after=nll_after, objective=float("nan"),
            iterations=0, passes=2, converged=True, grad_norm=float("nan"), rows=rows.total_rows,
            classes=c, time_s=elapsed(), hyperparameters={"n_bins": nb, "temperature": float(self.temperature)},
            cv=cv_info)
