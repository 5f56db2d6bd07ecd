"""Issue 17: an unregularised linear calibrator (lam = mu = 0) on rows that its map separates
stops in a few iterations with a clear warning (the NLL has no minimum there) instead of
following the weights to infinity; rows that are not separable fit as before, silently."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from softcal.calibrators import DirichletCalibrator, MatrixScaler, VectorScaler


def _separable(n: int = 60, c: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    x = 0.3 * torch.randn(n, c, generator=g, dtype=torch.float64)
    x[torch.arange(n), y] += 3.0  # the label's logit is the largest in every row
    return x, y


@pytest.mark.parametrize("cls", [MatrixScaler, VectorScaler, DirichletCalibrator])
def test_separable_rows_stop_with_a_warning(cls):
    x, y = _separable()
    cal = cls() if cls is VectorScaler else cls(lam=0.0, mu=0.0)  # vector scaling: no regulariser
    t0 = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="separable by this calibrator's map.*no\\s+minimum"):
        r = cal.fit(x, y, progress=False)
    assert time.perf_counter() - t0 < 30
    assert not r.converged and r.iterations < 100
    assert torch.equal(cal(x).argmax(1), y)  # the iterate it stopped at separates the rows
    assert r.nll_after < r.nll_before  # (0.0 where the probabilities saturate in float64)


def test_large_c_truncated_newton_stops_too():
    # C = 60: 3660 parameters, above the dense limit (truncated Newton with CG)
    x, y = _separable(n=300, c=60, seed=1)
    with pytest.warns(RuntimeWarning, match="separable"):
        r = MatrixScaler(lam=0.0, mu=0.0).fit(x, y, progress=False)
    assert r.iterations < 100


def test_rows_that_are_not_separable_fit_without_the_warning():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (400,), generator=g)  # labels independent of x: not separable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = MatrixScaler(lam=0.0, mu=0.0).fit(x, y, progress=False)
    assert r.converged


def test_regularised_fit_is_not_stopped_on_separable_rows():
    x, y = _separable()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = MatrixScaler(lam=1e-2, mu=1e-2).fit(x, y, progress=False)
    assert r.converged
