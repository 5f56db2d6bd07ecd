"""The work of the calibrators' fits (issue 17, "Fast"), counted (their speed is measured in
benchmarks/bench_calibrators.py, never in a unit test):

* histogram binning computes each row's probabilities once per fit (main: softmax twice and
  log_softmax once), and its result equals the straightforward count per class and bin;
* the cross-validation of MatrixScaler / DirichletCalibrator (warm starts across the folds, folds
  cut once, the CV fits to 1e-5, the truncated-Newton preconditioner built once per CV fit, the
  dense Hessian formed only where a step needs it) does at most 70% of the work of main 896de74
  (counts below, measured there on the same seeded data) and chooses the same lam, mu.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from softcal.calibrators import (DirichletCalibrator, HistogramBinning, MatrixScaler, _binning, _newton)


def _data(c, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = 1.5 * torch.randn(n, c, generator=g, dtype=torch.float64)
    x[torch.arange(n), y] += 2.0
    return x, y


def test_histogram_binning_reads_the_probabilities_once(monkeypatch):
    # the calibrators' softmax (_binning._softmax: softcal's float64 kernel, else torch's) and
    # torch's own, counted
    calls = {"softmax": 0, "log_softmax": 0, "_binning._softmax": 0}
    for owner, name, key in ((torch, "softmax", "softmax"), (torch, "log_softmax", "log_softmax"),
                             (_binning, "_softmax", "_binning._softmax")):
        orig = getattr(owner, name)

        def counted(*a, _orig=orig, _key=key, **k):
            calls[_key] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(owner, name, counted)
    x, y = _data(7, 900)
    cal = HistogramBinning(n_bins=6)
    res = cal.fit(x, y, progress=False)
    assert calls["softmax"] + calls["_binning._softmax"] == 1 and calls["log_softmax"] == 0, calls
    monkeypatch.undo()
    # the straightforward fit: frequency of each class per (class, bin), float64
    p = _binning._softmax(x)
    b = _binning._bin_of(p, 6)
    hit = (y[:, None] == torch.arange(7)).to(torch.float64)
    for k in range(7):
        for j in range(6):
            m = b[:, k] == j
            want = hit[m, k].mean() if bool(m.any()) else torch.tensor((j + 0.5) / 6, dtype=torch.float64)
            torch.testing.assert_close(cal.values[k, j], want, rtol=1e-15, atol=0)
    ref = torch.nn.functional.cross_entropy(x, y).item()
    assert res.nll_before == pytest.approx(ref, rel=1e-13)
    with torch.no_grad():
        after = torch.nn.functional.nll_loss(cal(x), y).item()
    assert res.nll_after == pytest.approx(after, rel=1e-12)


def _count(monkeypatch, names):
    counts = dict.fromkeys(names, 0)
    for name in names:
        orig = getattr(_newton.MatrixModel, name)

        def counted(*a, _orig=orig, _name=name, **k):
            counts[_name] += 1
            return _orig(*a, **k)
        monkeypatch.setattr(_newton.MatrixModel, name, counted)
    return counts


# (class, C, rows) -> (chosen on main, the work on main 896de74: Hessian-vector products and
# preconditioner builds of the truncated-Newton fits, or dense Hessians)
MAIN = {
    ("matrix", 40, 600): ({"lam": 1e5, "mu": 1.0}, {"hvp": 808, "precond": 175}),
    ("dirichlet", 8, 600): ({"lam": 1e3, "mu": 1.0}, {"hess": 461}),
}


@pytest.mark.parametrize("key", list(MAIN))
def test_cross_validation_does_less_work_and_chooses_the_same(monkeypatch, key):
    kind, c, n = key
    chosen, work = MAIN[key]
    counts = _count(monkeypatch, list(work))
    x, y = _data(c, n)
    cls = MatrixScaler if kind == "matrix" else DirichletCalibrator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = cls().fit(x, y, progress=False)
    assert res.cv["chosen"] == chosen
    # a preconditioner build costs about ten Hessian-vector products (C + 1 Gram matrices)
    cost = {"hvp": 1, "precond": 10, "hess": 1}
    ours = sum(cost[k] * v for k, v in counts.items())
    main = sum(cost[k] * v for k, v in work.items())
    assert ours <= 0.7 * main, (counts, work)
    assert res.converged
