"""The calibrators beyond temperature scaling (softcal/calibrators/): exact fits against an
independent float64 L-BFGS fit (scipy), accuracy preservation, the interface shared with
TemperatureScaler (tensors, model + loader, chunks, state_dict), cross-validation results,
the binning calibrators against independent computations, and clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import softcal
from softcal import _io
from softcal.calibrators import (CALIBRATORS, DirichletCalibrator, EnsembleTemperatureScaler,
                                 HistogramBinning, IsotonicCalibrator, MatrixScaler,
                                 ScalingBinningCalibrator, VectorScaler)
from softcal.calibrators._newton import MatrixModel, Problem, newton
from softcal.calibrators import _binning
from softcal.calibrators._base import Rows

NETCAL = "tests/data/logits/netcal/"


def _densenet():
    d = _io.load_embedded()
    (xv, yv), (xt, yt) = d["val"], d["test"]
    return (torch.from_numpy(xv), torch.from_numpy(yv).reshape(-1),
            torch.from_numpy(xt), torch.from_numpy(yt).reshape(-1))


def _netcal(name, rows=5000):
    d = np.load(NETCAL + name)
    x = torch.log(torch.from_numpy(d["predictions"]).double())
    y = torch.from_numpy(d["ground_truth"]).long()
    return x[:rows], y[:rows]


# ---------------------------------------------------------------------- the independent oracle
def _oracle(kind, feature, x, y, lam=0.0, mu=0.0):
    """min of mean NLL + ODIR by scipy's L-BFGS-B in numpy float64 (tight tolerances), written
    from the definitions (not from softcal's code). Returns (objective, function)."""
    scipy_opt = pytest.importorskip("scipy.optimize")
    from scipy.special import log_softmax, logsumexp

    x = x.double().numpy()
    y = y.numpy()
    n, c = x.shape
    phi = np.maximum(log_softmax(x, axis=1), math.log(np.finfo(np.float64).eps)) if feature == "logprobs" else x
    onehot = np.eye(c)[y]
    off = 1.0 - np.eye(c)

    def unpack(t):
        if kind == "vector":
            return np.diag(t[:c]), t[c:]
        return t[: c * c].reshape(c, c), t[c * c:]

    def f(t):
        w, b = unpack(t)
        z = phi @ w.T + b
        lse = logsumexp(z, axis=1)
        val = np.mean(lse - z[np.arange(n), y])
        p = np.exp(z - lse[:, None])
        r = (p - onehot) / n
        gw, gb = r.T @ phi, r.sum(0)
        if kind == "vector":
            gt = np.concatenate([np.diag(gw), gb])
        else:
            gt = np.concatenate([gw.ravel(), gb])
        if lam and c > 1:
            val += lam / (c * (c - 1)) * np.sum((w * off) ** 2)
            gt[: c * c] += 2 * lam / (c * (c - 1)) * (w * off).ravel()
        if mu:
            val += mu / c * np.sum(b ** 2)
            gt[-c:] += 2 * mu / c * b
        return val, gt

    t0 = np.concatenate([np.ones(c), np.zeros(c)]) if kind == "vector" else \
        np.concatenate([np.eye(c).ravel(), np.zeros(c)])
    res = scipy_opt.minimize(f, t0, jac=True, method="L-BFGS-B",
                             options=dict(maxiter=50000, maxfun=100000, gtol=1e-13, ftol=1e-17, maxcor=50))
    return float(res.fun), (lambda t: f(t)[0])


def _theta(cal):
    if isinstance(cal, VectorScaler):
        return np.concatenate([cal.weight.numpy(), cal.bias.numpy()])
    return np.concatenate([cal.weight.numpy().ravel(), cal.bias.numpy()])


CASES = [
    ("vector", VectorScaler, "logits", {}),
    ("matrix", MatrixScaler, "logits", dict(lam=0.0, mu=0.0)),
    ("dirichlet", DirichletCalibrator, "logprobs", dict(lam=0.0, mu=0.0)),
    ("matrix", MatrixScaler, "logits", dict(lam=50.0, mu=0.01)),
    ("dirichlet", DirichletCalibrator, "logprobs", dict(lam=50.0, mu=0.01)),
]


@pytest.mark.parametrize("data", ["densenet40", "lenet5"])
@pytest.mark.parametrize("kind,cls,feature,kw", CASES, ids=[f"{c[0]}-{'odir' if c[3].get('lam') else 'plain'}" for c in CASES])
def test_fit_reaches_float64_optimum(data, kind, cls, feature, kw):
    """Each fit ends within 1e-7 of the objective's minimum found by an independent L-BFGS fit,
    its parameters evaluated by the oracle's own objective."""
    if data == "densenet40":
        x, y, _, _ = _densenet()
    else:
        x, y = _netcal("lenet-5-cifar-10.npz")
    cal = cls(**kw)
    res = cal.fit(x, y, progress=False)
    assert res.converged and res.grad_norm <= 1e-9
    best, objective = _oracle("vector" if kind == "vector" else "matrix", feature, x, y,
                              kw.get("lam", 0.0), kw.get("mu", 0.0))
    mine = objective(_theta(cal))
    assert abs(mine - res.objective) <= 1e-12 * max(1.0, mine)   # the reported value is the true one
    assert mine <= best + 1e-7, (mine, best)
    assert best <= mine + 1e-7, (mine, best)    # (and the oracle is near: the test can fail both ways)
    assert cal.hyperparameters["lam" if kind != "vector" else "mu"] == kw.get("lam" if kind != "vector" else "mu", 0.0)


def test_truncated_newton_equals_dense_newton():
    """The Hessian-free path (preconditioned CG on Hessian-vector products, used for large C)
    reaches the same optimum as the dense Hessian path."""
    x, y = _netcal("wideresnet-16-4-cifar-10.npz", 3000)
    rows = Rows("t", x, y, None, False, None)
    m = MatrixModel(10, "logits", 5.0, 0.1)
    dense = newton(Problem(m, rows), m.identity(2.0), 1e-10, 100)
    cg = newton(Problem(m, rows), m.identity(2.0), 1e-10, 100, dense_max=0)
    assert dense.converged and cg.converged
    assert abs(dense.objective - cg.objective) <= 1e-12
    torch.testing.assert_close(dense.theta, cg.theta, rtol=0, atol=1e-7)


def test_ts_and_ets_keep_every_argmax():
    x, y, xt, yt = _densenet()
    for data, lab in [(x, y), (xt, yt)]:
        for cal in (softcal.nn.TemperatureScaler(), EnsembleTemperatureScaler()):
            cal.fit(x, y, progress=False)
            with torch.no_grad():
                assert torch.equal(cal(data).argmax(1), data.argmax(1)), type(cal).__name__
    # the shared isotonic map is strictly increasing: the order of the classes is kept up to
    # float64 rounding (rows whose two largest probabilities differ by > 1e-6)
    cal = IsotonicCalibrator(mode="shared")
    cal.fit(x, y, progress=False)
    p = torch.softmax(xt.double(), 1)
    top2 = p.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-6
    with torch.no_grad():
        assert torch.equal(cal(xt.double()).argmax(1)[clear], xt.argmax(1)[clear])
    assert int(clear.sum()) > 9900


def test_ets_weights_are_the_simplex_optimum():
    """ETS: the weights are on the simplex and no point of a fine grid of the simplex has a
    lower NLL (with the fitted T)."""
    x, y = _netcal("lenet-5-cifar-10.npz")
    cal = EnsembleTemperatureScaler()
    res = cal.fit(x, y, progress=False)
    w = cal.weights
    assert abs(float(w.sum()) - 1) < 1e-12 and bool((w >= 0).all())
    t = float(cal.temperature)
    q = torch.stack([torch.softmax(x / t, 1).gather(1, y[:, None])[:, 0],
                     torch.softmax(x, 1).gather(1, y[:, None])[:, 0],
                     torch.full((x.shape[0],), 0.1, dtype=torch.float64)], 1)
    g = torch.linspace(0, 1, 101, dtype=torch.float64)
    a, b = torch.meshgrid(g, g, indexing="ij")
    keep = a + b <= 1
    ws = torch.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], 1)
    grid_nll = -(torch.log(q @ ws.T)).mean(0)
    assert res.nll_after <= float(grid_nll.min()) + 1e-12
    assert abs(res.nll_after - float(-torch.log(q @ w).mean())) < 1e-12
    assert abs(res.nll_after - softcal.metrics.nll(cal(x), y)) < 1e-9


# ---------------------------------------------------------------------- the interface
ALL = [VectorScaler, MatrixScaler, DirichletCalibrator, EnsembleTemperatureScaler,
       HistogramBinning, IsotonicCalibrator, ScalingBinningCalibrator]
FAST = {MatrixScaler: dict(lam=10.0, mu=0.1), DirichletCalibrator: dict(lam=10.0, mu=0.1),
        HistogramBinning: dict(n_bins=10), ScalingBinningCalibrator: dict(n_bins=10)}


@pytest.mark.parametrize("cls", ALL)
def test_interface(cls):
    x, y, xt, _ = _densenet()
    cal = cls(**FAST.get(cls, {}))
    res = cal.fit(x, y, progress=False)
    assert res.rows == 5000 and res.classes == 10 and res.time_s > 0
    assert math.isfinite(res.nll_before) and res.nll_after < res.nll_before
    with torch.no_grad():
        out = cal(xt)
        assert out.shape == xt.shape and out.dtype == xt.dtype
        p = cal.predict_proba(xt)
        torch.testing.assert_close(p.double().sum(1), torch.ones(xt.shape[0], dtype=torch.float64),
                                   rtol=0, atol=1e-6)
        p64 = cal.predict_proba(xt.double())
        torch.testing.assert_close(p64.sum(1), torch.ones(xt.shape[0], dtype=torch.float64),
                                   rtol=0, atol=1e-13)
        # (..., C) inputs and float64
        assert cal(xt[:6].reshape(2, 3, 10)).shape == (2, 3, 10)
        assert cal(xt.double()).dtype == torch.float64
    # state_dict round trip into a fresh, unfitted calibrator
    fresh = cls()
    fresh.load_state_dict(cal.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(xt), out)
    assert fresh.hyperparameters == cal.hyperparameters
    # fit(model, loader): the logits collected from the model
    model = torch.nn.Identity()
    wrapped = cls(model, **FAST.get(cls, {}))
    wrapped.fit(DataLoader(TensorDataset(x, y), batch_size=1000), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(xt), out, rtol=1e-5, atol=1e-5)
    # re-exported like TemperatureScaler
    assert getattr(softcal.nn, cls.__name__) is cls
    assert getattr(softcal.calibration, cls.__name__) is cls
    assert CALIBRATORS[cal.method] is cls


@pytest.mark.parametrize("cls", [VectorScaler, MatrixScaler, DirichletCalibrator,
                                 EnsembleTemperatureScaler, HistogramBinning])
def test_streaming_fit_equals_in_memory(cls):
    """fit(chunks): a re-iterable of (logits, labels) read once per pass gives the in-memory
    fit (the objective is a sum over rows)."""
    x, y, xt, _ = _densenet()
    kw = dict(FAST.get(cls, {}))
    a, b = cls(**kw), cls(**kw)
    a.fit(x, y, progress=False)
    chunks = [(x[i:i + 700].float(), y[i:i + 700]) for i in range(0, 5000, 700)]
    b.fit(chunks, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(b(xt.double()), a(xt.double()), rtol=1e-7, atol=1e-7)


def test_cross_validation_results_available():
    x, y, _, _ = _densenet()
    cal = MatrixScaler(lambdas=(1.0, 1e3), mus=(1e-3, 1.0), cv=3)
    res = cal.fit(x, y, progress=False)
    cv = res.cv
    assert cv is cal.cv_results and cv["folds"] == 3 and cv["metric"] == "nll"
    assert len(cv["grid"]) == 4 and len(cv["scores"]) == 4
    best = min(range(4), key=lambda i: cv["scores"][i])
    assert cv["chosen"] == cv["grid"][best] == res.hyperparameters
    assert cal.hyperparameters["lam"] == cv["chosen"]["lam"]
    # only mu given: lam alone is searched
    res2 = DirichletCalibrator(mu=0.5, lambdas=(1.0, 10.0), cv=2).fit(x, y, progress=False)
    assert [g["mu"] for g in res2.cv["grid"]] == [0.5, 0.5]
    hb = HistogramBinning(bin_grid=(5, 20), cv=3).fit(x, y, progress=False)
    assert hb.cv["metric"] == "brier" and hb.hyperparameters["n_bins"] in (5, 20)


# ---------------------------------------------------------------------- binning calibrators
def test_histogram_binning_matches_counts():
    x, y, xt, _ = _densenet()
    cal = HistogramBinning(n_bins=10)
    cal.fit(x, y, progress=False)
    p = torch.softmax(x.double(), 1).numpy()
    pt = torch.softmax(xt.double(), 1).numpy()
    yy = y.numpy()
    q = np.zeros_like(pt)
    for k in range(10):
        b = np.clip(np.ceil(p[:, k] * 10).astype(int) - 1, 0, 9)
        bt = np.clip(np.ceil(pt[:, k] * 10).astype(int) - 1, 0, 9)
        for j in range(10):
            m = b == j
            v = (yy[m] == k).mean() if m.any() else (j + 0.5) / 10
            q[bt == j, k] = v
    q = np.maximum(q, 1e-6)  # min_prob
    q = q / q.sum(1, keepdims=True)
    with torch.no_grad():
        got = cal.predict_proba(xt.double()).numpy()
    np.testing.assert_allclose(got, q, rtol=0, atol=1e-12)


def test_isotonic_matches_sklearn():
    iso = pytest.importorskip("sklearn.isotonic", reason="scikit-learn is not installed (the oracle)")
    x, y, xt, _ = _densenet()
    for mode in ("ovr", "shared"):
        cal = IsotonicCalibrator(mode=mode)
        cal.fit(x, y, progress=False)
        # the calibrator's own softmax (softcal's float64 kernel, within an ulp or two of
        # torch.softmax): its knots sit at those p, where a 1-ulp step of interpolation is steep
        p = _binning._softmax(x.double()).numpy()
        pt = _binning._softmax(xt.double()).numpy()
        onehot = np.eye(10)[y.numpy()]
        want, want_t = np.zeros_like(p), np.zeros_like(pt)
        if mode == "ovr":
            for k in range(10):
                r = iso.IsotonicRegression(out_of_bounds="clip").fit(p[:, k], onehot[:, k])
                want[:, k], want_t[:, k] = r.predict(p[:, k]), r.predict(pt[:, k])
            extra, extra_t = 0.0, 0.0
        else:
            r = iso.IsotonicRegression(out_of_bounds="clip").fit(p.ravel(), onehot.ravel())
            want, want_t = r.predict(p.ravel()).reshape(p.shape), r.predict(pt.ravel()).reshape(pt.shape)
            extra, extra_t = 1e-9 * p, 1e-9 * pt
        # scikit-learn merges x values closer than 1e-15 (absolute) before pooling; softcal
        # pools exact ties only: compare where that cannot matter (p > 1e-12)
        got, got_t = cal._map(torch.from_numpy(p)).numpy(), cal._map(torch.from_numpy(pt)).numpy()
        # (in the shared map that merging moves the lowest block's value by ~1e-7: compared
        # above p = 0.01)
        lo = 1e-12 if mode == "ovr" else 1e-2
        m, mt = p > lo, pt > lo
        np.testing.assert_allclose(got[m], (want + extra)[m], rtol=0, atol=1e-12)
        np.testing.assert_allclose(got_t[mt], (want_t + extra_t)[mt], rtol=0, atol=1e-12)


def test_scaling_binning_bins_are_equal_mass_and_hold_scaled_means():
    x, y, _, _ = _densenet()
    cal = ScalingBinningCalibrator(n_bins=8)
    cal.fit(x, y, progress=False)
    assert cal.edges.shape == (10, 7) and cal.values.shape == (10, 8)
    assert bool((cal.edges[:, 1:] >= cal.edges[:, :-1]).all())
    # every value lies inside its bin and the values increase with the bins
    lo = torch.cat([torch.zeros(10, 1, dtype=torch.float64), cal.edges], 1)
    hi = torch.cat([cal.edges, torch.ones(10, 1, dtype=torch.float64)], 1)
    assert bool(((cal.values >= lo - 1e-12) & (cal.values <= hi + 1e-12)).all())


# ---------------------------------------------------------------------- errors
def test_clear_errors():
    x, y, _, _ = _densenet()
    with pytest.raises(RuntimeError, match="not fitted"):
        VectorScaler()(x)
    with pytest.raises(ValueError, match="lam must be a finite number >= 0, got -1"):
        MatrixScaler(lam=-1.0)
    with pytest.raises(TypeError, match="mu must be a number"):
        MatrixScaler(mu="big")
    with pytest.raises(ValueError, match="cv must be an int >= 2"):
        DirichletCalibrator(cv=1)
    with pytest.raises(ValueError, match="labels must be in \\[0, 9\\]"):
        VectorScaler().fit(x, y + 5, progress=False)
    with pytest.raises(ValueError, match="mode must be 'ovr' or 'shared'"):
        IsotonicCalibrator(mode="both")
    with pytest.raises(ValueError, match="n_bins must be an int >= 1"):
        HistogramBinning(n_bins=0)
    cal = VectorScaler()
    cal.fit(x, y, progress=False)
    with pytest.raises(ValueError, match="logits have 7 classes .* fitted on 10"):
        cal(x[:, :7])
    with pytest.raises(ValueError, match="group= is not supported"):
        IsotonicCalibrator().fit(x, y, group=object())
    other = EnsembleTemperatureScaler()
    with pytest.raises(ValueError, match="state_dict is of a 'vector' calibrator"):
        other.load_state_dict(cal.state_dict(), strict=False)


def test_matrix_scaler_refuses_c_by_c_too_large():
    """C x C parameters that would not fit: a clear error that names C and the alternatives
    (checked before any fitting work)."""
    c = 5000
    x = torch.zeros(4, c)
    y = torch.tensor([0, 1, 2, 3])
    for cls in (MatrixScaler, DirichletCalibrator):
        with pytest.raises(ValueError, match=r"5000 classes need a 5000 x 5000 map .* Use VectorScaler"):
            cls(lam=1.0, mu=1.0).fit(x, y, progress=False)


def test_cross_validation_coordinate_search_for_large_c():
    """C >= 38 (truncated-Newton fits): lam is searched at the middle mu, then mu at the best
    lam; the scores of every evaluated pair are reported."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 40, (600,), generator=g)
    x = torch.randn(600, 40, generator=g, dtype=torch.float64)
    x[torch.arange(600), y] += 3.0
    cal = MatrixScaler(lambdas=(1.0, 100.0), mus=(0.01, 0.1, 1.0), cv=2)
    res = cal.fit(x, y, progress=False)
    cv = res.cv
    assert cv["search"] == "coordinate"
    assert [g["mu"] for g in cv["grid"][:2]] == [0.1, 0.1]
    best_lam = cv["grid"][min(range(2), key=lambda i: cv["scores"][i])]["lam"]
    assert [(g["lam"], g["mu"]) for g in cv["grid"][2:]] == [(best_lam, 1.0), (best_lam, 0.01)]
    assert cv["chosen"] == cv["grid"][min(range(4), key=lambda i: cv["scores"][i])]
