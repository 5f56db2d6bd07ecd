"""Vector scaling, matrix scaling and Dirichlet calibration (Guo et al. 2017; Kull et al. 2019),
fitted exactly by Newton's method (see :mod:`softcal.calibrators._newton`), with ODIR
regularisation and its hyper-parameters chosen by k-fold cross-validation on the fit rows.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from ._base import (ArrayLike, Calibrator, CalibratorFitResult, Rows, check_folds,
                    check_max_iter, check_tol, fold_ids, grid_hash, mean_nll_of_logits, timer)
from ._newton import DENSE_MAX, MatrixModel, Model, Problem, VectorModel, features, newton

__all__ = ["VectorScaler", "MatrixScaler", "DirichletCalibrator", "DEFAULT_LAMBDAS", "DEFAULT_MUS",
           "MAX_MATRIX_PARAMETERS"]

#: ODIR grids searched by cross-validation when lam / mu are not given (the regulariser is
#: lam / (C (C - 1)) sum_{i != j} W_ij^2 + mu / C sum_j b_j^2, added to the mean NLL).
DEFAULT_LAMBDAS: Tuple[float, ...] = (1.0, 1e1, 1e2, 1e3, 1e4, 1e5)
DEFAULT_MUS: Tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)

#: The tolerance (max |gradient|) of the cross-validation fits, looser than the final fit's: a
#: held-out score moves by far less than the gaps between the grid's scores.
CV_TOL = 1e-5
#: The cross-validation fits with truncated Newton steps (C >= 38) rebuild the preconditioner
#: every this many iterations (building it costs about ten Hessian-vector products).
CV_PRECOND_EVERY = 1000

#: The most parameters C (C + 1) a matrix fit takes (C = 4095): beyond, the C x C map, its
#: gradient and the solver's vectors (about 10 copies in float64) would need several GB.
MAX_MATRIX_PARAMETERS = 4095 * 4096


def _check_reg(fn: str, name: str, value: Any, allow_none: bool = True) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a number >= 0{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {value!r}")
    return v


def _check_grid(fn: str, name: str, grid: Any) -> Tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in grid)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: {name} must be a sequence of numbers >= 0, got {grid!r}") from None
    if not vals or any(not (math.isfinite(v) and v >= 0) for v in vals):
        raise ValueError(f"{fn}: {name} must be a non-empty sequence of finite numbers >= 0, got {grid!r}")
    return vals


class _LinearCalibrator(Calibrator):
    """Shared by VectorScaler, MatrixScaler and DirichletCalibrator."""

    method = "linear"
    feature = "logits"
    regularised = True

    def __init__(self, model: Optional[torch.nn.Module] = None, *, lam: Optional[float] = None,
                 mu: Optional[float] = None, cv: int = 5, lambdas: Sequence[float] = DEFAULT_LAMBDAS,
                 mus: Sequence[float] = DEFAULT_MUS, seed: int = 0) -> None:
        super().__init__(model)
        fn = f"softcal.nn.{type(self).__name__}"
        self.lam = _check_reg(fn, "lam", lam)
        self.mu = _check_reg(fn, "mu", mu)
        self.cv = check_folds(fn, cv)
        self.lambdas = _check_grid(fn, "lambdas", lambdas)
        self.mus = _check_grid(fn, "mus", mus)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{fn}: seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self._state("weight")
        self._state("bias")

    # ------------------------------------------------------------------ model
    def _model(self, classes: int, lam: float, mu: float) -> Model:
        raise NotImplementedError

    def _set(self, m: Model, theta: torch.Tensor) -> None:
        raise NotImplementedError

    def _z(self, phi: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated logits (..., C), the input's dtype (computed in float64 for float64 input,
        float32 otherwise)."""
        logits = self._logits_in(x)
        shape = logits.shape
        work = torch.float64 if logits.dtype == torch.float64 else torch.float32
        flat = logits.reshape(-1, shape[-1]).to(work)
        phi = features(self.feature, flat) if self.feature == "logprobs" else flat
        return self._z(phi).to(logits.dtype).reshape(shape)

    # ------------------------------------------------------------------ fitting
    def fit(self, data: Union[ArrayLike, torch.nn.Module, Iterable], labels: Union[ArrayLike, Iterable, None] = None,
            *, tol: float = 1e-9, max_iter: int = 100, progress: bool = True,
            check_probabilities: bool = True, group: Any = None) -> CalibratorFitResult:
        """Fit by Newton's method to max |gradient| <= ``tol`` and return a
        :class:`CalibratorFitResult`.

        The data come as for :meth:`TemperatureScaler.fit`: ``fit(logits, labels)`` (logits (N, C)
        float16/bfloat16/float32/float64, labels (N,) int in [0, C)), ``fit(model, loader)``, or
        ``fit(chunks)`` (a re-iterable of (logits, labels), read once per pass: streaming); with
        ``group`` (torch.distributed) every pass's sums are all-reduced and every rank ends with
        the fit of the concatenated rows. Without ``lam``/``mu`` given, they are chosen by
        ``cv``-fold cross-validation on these rows (lowest mean held-out NLL over the grid
        ``lambdas`` x ``mus``), then the model is refitted on all rows; the grid and its scores
        are in ``result.cv`` and ``self.cv_results``.
        """
        fn = f"softcal.nn.{type(self).__name__}.fit"
        elapsed = timer()

        def options(sig):
            checked = check_tol(fn, "tol", tol), check_max_iter(fn, max_iter)
            sig.same("tol", checked[0])
            sig.same("max_iter", checked[1])
            sig.same("lam", self.lam, kind="float")
            sig.same("mu", self.mu, kind="float")
            sig.same("cv", self.cv)
            sig.same("seed", self.seed)
            sig.same("lambdas (hash)", grid_hash(self.lambdas))
            sig.same("mus (hash)", grid_hash(self.mus))
            return checked

        rows = self._rows(fn, data, labels, progress, group, check_probabilities, options)
        tol, max_iter = rows.options
        c = rows.classes
        if c < 2:
            raise ValueError(f"{fn}: logits must have at least 2 classes, got {c}")
        self._check_size(fn, c)
        nll_before = mean_nll_of_logits(rows)
        t0 = self._start_temperature(rows)

        cv_info = None
        lam, mu = self._fixed()
        if lam is None or mu is None:
            lam, mu, cv_info = self._cross_validate(rows, lam, mu, t0, tol, max_iter)
        m = self._model(c, lam, mu)
        res = newton(Problem(m, rows), self._initial(rows, m, t0, tol, max_iter), tol, max_iter)
        if res.separable:
            warnings.warn(f"{fn}: the fit rows are separable by this calibrator's map (after "
                          f"{res.iterations} Newton iterations every row's calibrated argmax is its "
                          f"label), so with no regularisation ({self._hp(lam, mu)}) the NLL has no "
                          "minimum: it falls towards 0 as the weights grow without bound. Stopped "
                          "there; the fit is over-confident. Give lam > 0 and mu > 0, or leave them "
                          "to cross-validation (lam=None, mu=None)", RuntimeWarning, stacklevel=2)
        elif not res.converged:
            warnings.warn(f"{fn}: Newton's method stopped after {res.iterations} iterations with "
                          f"max |gradient| {res.grad_norm:.3g} > tol={tol:g}; the objective could "
                          "not be reduced further in float64 (or raise max_iter)",
                          RuntimeWarning, stacklevel=2)
        self._set(m, res.theta)
        self.hyperparameters = {"classes": c, **self._hp(lam, mu), "_fitted": True}
        self.cv_results = cv_info
        return CalibratorFitResult(
            method=self.method, nll_before=nll_before, nll_after=res.nll, objective=res.objective,
            iterations=res.iterations, passes=res.passes, converged=res.converged,
            grad_norm=res.grad_norm, rows=rows.total_rows, classes=c, time_s=elapsed(),
            hyperparameters=self._hp(lam, mu), cv=cv_info)

    def _check_size(self, fn: str, c: int) -> None:
        pass

    def _initial(self, rows: Rows, m: Model, t0: float, tol: float, max_iter: int) -> torch.Tensor:
        return m.identity(t0)

    def _hp(self, lam: float, mu: float) -> Dict[str, Any]:
        return {"lam": lam, "mu": mu}

    def _fixed(self) -> Tuple[Optional[float], Optional[float]]:
        return self.lam, self.mu

    def _start_temperature(self, rows: Rows) -> float:
        """The exact temperature scaling fit (one cheap 1-D Newton): Newton starts from W = I / T."""
        from ..calibration import DEFAULT_BOUNDS
        from .._temperature_fit import _Stats, fit_temperature

        src = ([(x, y) for x, y, _ in rows.chunks()] if rows.in_memory
               else (lambda: ((x, y) for x, y, _ in rows.chunks())))
        stats = _Stats("softcal.nn.TemperatureScaler.fit", src, False, rows.group)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = fit_temperature(stats, start_t=1.0, tol=1e-6, max_iter=100, bounds=DEFAULT_BOUNDS)
        return r.temperature

    def _cross_validate(self, rows: Rows, lam: Optional[float], mu: Optional[float], t0: float,
                        tol: float, max_iter: int):
        """k-fold CV over lambdas x mus (most regularised first, each fit warm-started from the
        previous one). With more parameters than the dense Newton path takes (C >= 38: every
        fit is a truncated-Newton fit) and both free, the grid is searched coordinate-wise:
        lam over ``lambdas`` at the middle mu, then mu over ``mus`` at the best lam."""
        c = rows.classes
        k = self.cv
        folds = fold_ids(rows.rows, k, self.seed)
        lams = sorted([lam] if lam is not None else list(self.lambdas), reverse=True)
        mus = sorted([mu] if mu is not None else list(self.mus), reverse=True)
        coordinate = (self._model(c, 0.0, 0.0).size > DENSE_MAX and len(lams) > 1 and len(mus) > 1)
        if coordinate:
            mid = mus[len(mus) // 2]
            grid = [(x, mid) for x in lams]
            scores = self._cv_scores(rows, grid, folds, t0, tol, max_iter)
            best_lam = grid[int(torch.argmin(scores))][0]
            rest = [(best_lam, y) for y in mus if y != mid]
            grid = grid + rest
            scores = torch.cat([scores, self._cv_scores(rows, rest, folds, t0, tol, max_iter)])
        else:
            grid = [(x, y) for x in lams for y in mus]
            scores = self._cv_scores(rows, grid, folds, t0, tol, max_iter)
        best = int(torch.argmin(scores))
        a, b = grid[best]
        info = {"folds": k, "seed": self.seed, "metric": "nll",
                "search": "coordinate" if coordinate else "grid",
                "grid": [self._hp(x, y) for x, y in grid], "scores": scores.tolist(),
                "chosen": self._hp(a, b)}
        return a, b, info

    def _cv_scores(self, rows: Rows, grid, folds, t0: float, tol: float, max_iter: int) -> torch.Tensor:
        """Mean held-out NLL of each grid point over the folds. Each fold's fits run along the
        grid, each warm-started from the better (lower training objective) of the previous grid
        point's solution in this fold and this grid point's solution in the previous fold, to the
        looser tolerance ``max(tol, CV_TOL)``. In memory (no group) each fold's training and
        held-out rows are cut once; otherwise the folds are 0/1 row weights."""
        c = rows.classes
        k = self.cv
        scores = torch.zeros(len(grid), dtype=torch.float64)
        cv_tol = max(tol, CV_TOL)
        split = rows.in_memory and rows.group is None
        if split:
            x_all, y_all = rows.gather()
            fold_all = folds.to(x_all.device)
        previous: List[Optional[torch.Tensor]] = [None] * len(grid)  # the last fold's solutions
        for f in range(k):
            if split:
                train, test = RowSubset(rows, x_all, y_all, fold_all != f), RowSubset(rows, x_all, y_all, fold_all == f)
                train_w = test_w = None
            else:
                train = test = rows

                def train_w(x, y, r0, f=f):
                    return (folds[r0:r0 + x.shape[0]] != f).to(torch.float64).to(x.device)

                def test_w(x, y, r0, f=f):
                    return (folds[r0:r0 + x.shape[0]] == f).to(torch.float64).to(x.device)

            held = Problem(self._model(c, 0.0, 0.0), test, test_w)
            theta = first = None
            for i, (a, b) in enumerate(grid):
                problem = Problem(self._model(c, a, b), train, train_w)
                # warm start along the grid: the previous grid point's solution (same lam: one mu
                # apart; new lam: the solution of the previous lam at its first mu) ...
                if theta is None:
                    start = problem.model.identity(t0)
                elif grid[i - 1][0] != a:
                    start = first
                else:
                    start = theta
                # ... or across the folds: this grid point's solution in the previous fold
                if previous[i] is not None:
                    if float(problem.evaluate(previous[i], 0)[0]) < float(problem.evaluate(start, 0)[0]):
                        start = previous[i]
                res = newton(problem, start, cv_tol, max_iter, precond_every=CV_PRECOND_EVERY)
                theta = previous[i] = res.theta
                if i == 0 or grid[i - 1][0] != a:
                    first = theta
                scores[i] += held.evaluate(theta, 0)[1] / k
        return scores


class RowSubset:
    """Some rows of an in-memory :class:`Rows` (no group) as one chunk, for :class:`Problem`:
    a cross-validation fold's training or held-out rows, cut once."""

    def __init__(self, rows: Rows, x: torch.Tensor, y: torch.Tensor, keep: torch.Tensor) -> None:
        self.fn = rows.fn
        self.group = None
        self.in_memory = True
        self.classes = rows.classes
        self._chunk = [(x[keep], y[keep], 0)]
        self.rows = self.total_rows = int(self._chunk[0][0].shape[0])

    def chunks(self):
        return iter(self._chunk)


class VectorScaler(_LinearCalibrator):
    """Vector scaling (Guo et al. 2017): z = a * logits + b, a scale and a bias per class.

    Args:
        model: optional classifier whose (N, C) logits are calibrated (``forward(x) =
            calibrate(model(x))``).
        mu: L2 penalty on the biases, mu / C sum_j b_j^2 (default 0: plain vector scaling,
            as Guo et al. and Kull et al.; ``None`` chooses it by cross-validation over ``mus``).
        cv, mus, seed: the cross-validation (folds, grid, seed of the fold assignment).

    Buffers (float64): ``weight`` (C,) = a, ``bias`` (C,) = b. ``forward(logits (..., C))``
    returns calibrated logits of the input's dtype.
    """

    method = "vector"

    def __init__(self, model: Optional[torch.nn.Module] = None, *, mu: Optional[float] = 0.0,
                 cv: int = 5, mus: Sequence[float] = DEFAULT_MUS, seed: int = 0) -> None:
        super().__init__(model, lam=0.0, mu=mu, cv=cv, mus=mus, seed=seed)

    def _model(self, classes, lam, mu):
        return VectorModel(classes, self.feature, 0.0, mu)

    def _hp(self, lam, mu):
        return {"mu": mu}

    def _set(self, m, theta):
        c = m.c
        self.weight = theta[:c].clone().to(self.weight.device)
        b = theta[c:].clone()
        if m.mu == 0:  # b + const gives the same probabilities: keep the zero-mean one
            b -= b.mean()
        self.bias = b.to(self.bias.device)

    def _z(self, phi):
        return phi * self.weight.to(phi) + self.bias.to(phi)


class MatrixScaler(_LinearCalibrator):
    """Matrix scaling (Guo et al. 2017) with ODIR regularisation (Kull et al. 2019):
    z = W logits + b, W (C, C), b (C,).

    The objective is the mean NLL plus lam / (C (C - 1)) sum_{i != j} W_ij^2 + mu / C sum_j b_j^2
    (Off-Diagonal and Intercept Regularisation). ``lam = mu = 0`` is plain matrix scaling: its
    optimum does not exist when the map separates the fit rows (every row's argmax its label,
    common for C in the hundreds); the fit then stops at the first such iterate with a
    RuntimeWarning.
    ``lam``/``mu`` left at ``None`` are chosen by ``cv``-fold cross-validation over ``lambdas`` x
    ``mus`` on the fit rows (chosen values and scores in ``cv_results`` after the fit).

    C (C + 1) parameters must stay below :data:`MAX_MATRIX_PARAMETERS` (C <= 4095): for more
    classes (language models) fit :class:`VectorScaler` or :class:`TemperatureScaler`, whose
    parameters grow as C.

    Buffers (float64): ``weight`` (C, C), ``bias`` (C,).
    """

    method = "matrix"

    def _model(self, classes, lam, mu):
        return MatrixModel(classes, self.feature, lam, mu)

    def _check_size(self, fn, c):
        if c * (c + 1) > MAX_MATRIX_PARAMETERS:
            gb = 10 * 8 * c * (c + 1) / 2 ** 30
            raise ValueError(
                f"{fn}: {c} classes need a {c} x {c} map ({c * (c + 1)} parameters, about {gb:.1f} "
                f"GB for the solver); at most {MAX_MATRIX_PARAMETERS} parameters (C <= 4095) are "
                "fitted. Use VectorScaler (2 C parameters) or TemperatureScaler for this many classes.")

    def _initial(self, rows, m, t0, tol, max_iter):
        """Start from the vector scaling fit (same features, same bias penalty): the ODIR
        optimum is near it, and its 2 C x 2 C Newton fit costs little."""
        v = VectorModel(m.c, self.feature, 0.0, m.mu)
        res = newton(Problem(v, rows), v.identity(t0), max(tol, 1e-8), max_iter)
        theta = torch.zeros(m.c, m.c + 1, dtype=torch.float64)
        theta[:, :-1] = torch.diag(res.theta[: m.c])
        theta[:, -1] = res.theta[m.c:]
        return theta.reshape(-1)

    def _set(self, m, theta):
        # [W | b] + 1 v^T gives the same probabilities; where the regulariser does not fix v
        # (W when lam = 0, b when mu = 0), keep the representative with zero column means.
        t = theta.view(m.c, m.c + 1).clone()
        if m.lam == 0:
            t[:, :-1] -= t[:, :-1].mean(0, keepdim=True)
        if m.mu == 0:
            t[:, -1] -= t[:, -1].mean()
        self.weight = t[:, :-1].clone().to(self.weight.device)
        self.bias = t[:, -1].clone().to(self.bias.device)

    def _z(self, phi):
        return torch.addmm(self.bias.to(phi), phi, self.weight.to(phi).T)


class DirichletCalibrator(MatrixScaler):
    """Dirichlet calibration (Kull et al. 2019): z = W log(p) + b with p = softmax(logits)
    (log p clamped at log(eps) = -36.04, as Kull et al. clip p at eps), ODIR regularisation and
    cross-validation as :class:`MatrixScaler`. ``forward`` returns calibrated logits (their
    softmax is the calibrated distribution; log_softmax of them the log-probabilities).
    """

    method = "dirichlet"
    feature = "logprobs"
