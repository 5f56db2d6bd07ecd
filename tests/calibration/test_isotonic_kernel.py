"""The CPU op ``softcal::isotonic_fit`` (csrc/cpu/isotonic.cpp, contract in csrc/schemas.h):
the same knots (and fitted values) as the Python pool-adjacent-violators (softcal/calibrators/_pav.py) and as
scikit-learn's IsotonicRegression, on both of its sorts (std::sort below 512 points, radix
sort above), with ties, weights and padding; its fake kernel (opcheck); its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from softcal.calibrators import _pav

pytestmark = pytest.mark.skipif(not _pav.HAVE_KERNEL, reason="the softcal extension is not built")


def _problems(k: int, n: int, seed: int, ties: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(k, n, generator=g, dtype=torch.float64)
    if ties:  # many equal x (as probabilities rounded in a float32 model)
        x = torch.round(x * 200) / 200
    if n >= 3:  # signed zeros (equal: pooled) and a negative value sort correctly
        x[0, :3] = torch.tensor([-0.0, 0.0, -1e-300], dtype=torch.float64)
    y = (torch.rand(k, n, generator=g, dtype=torch.float64) < x.clamp(0, 1)).to(torch.float64)
    w = torch.rand(k, n, generator=g, dtype=torch.float64) + 0.1
    return x, y, w


def _interp_at(kx: torch.Tensor, kv: torch.Tensor, q: torch.Tensor) -> np.ndarray:
    return np.interp(q.numpy(), kx.numpy(), kv.numpy())


@pytest.mark.parametrize("n", [1, 7, 1000, 20000])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_kernel_equals_python_pav(n, ties, weighted):
    x, y, w = _problems(3, n, seed=n, ties=ties)
    kx, kv, kn, fitted = torch.ops.softcal.isotonic_fit(x, y, w if weighted else None)
    assert kx.shape == (3, n) and kv.shape == (3, n) and kn.dtype == torch.int64
    assert fitted.shape == (3, n)
    for k in range(3):
        px, pv = _pav.pav_python(x[k], y[k], w[k] if weighted else None)
        m = int(kn[k])
        assert m == px.numel()
        torch.testing.assert_close(kx[k, :m], px, rtol=0, atol=0)
        # the block means: sums in a different order than the Python loop's
        torch.testing.assert_close(kv[k, :m], pv, rtol=1e-12, atol=1e-15)
        assert bool((kx[k, m:] == kx[k, m - 1]).all()) and bool((kv[k, m:] == kv[k, m - 1]).all())
        assert bool((kx[k, 1:m] > kx[k, :m - 1]).all())  # knots strictly increasing
        assert bool((kv[k, 1:m] >= kv[k, :m - 1]).all())  # the fit is non-decreasing
        # the fitted values are the knots' interpolation at the points (their blocks' means)
        np.testing.assert_allclose(fitted[k].numpy(), _interp_at(px, pv, x[k]), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("n", [500, 30000])
def test_kernel_fit_equals_sklearn(n):
    iso = pytest.importorskip("sklearn.isotonic", reason="scikit-learn is not installed (the oracle)")
    x, y, w = _problems(2, n, seed=3, ties=True)
    kx, kv, kn, fitted = torch.ops.softcal.isotonic_fit(x, y, w)
    for k in range(2):
        r = iso.IsotonicRegression(out_of_bounds="clip").fit(x[k].numpy(), y[k].numpy(),
                                                            sample_weight=w[k].numpy())
        m = int(kn[k])
        got = _interp_at(kx[k, :m], kv[k, :m], x[k])
        np.testing.assert_allclose(got, r.predict(x[k].numpy()), rtol=0, atol=1e-12)
        np.testing.assert_allclose(fitted[k].numpy(), r.predict(x[k].numpy()), rtol=0, atol=1e-12)


def test_isotonic_knots_trims_and_matches_the_fallback(monkeypatch):
    x, y, _ = _problems(4, 300, seed=5, ties=True)
    kx, kv, kn, kf = _pav.isotonic_knots(x, y)
    monkeypatch.setattr(_pav, "HAVE_KERNEL", False)
    fx, fv, fn, ff = _pav.isotonic_knots(x, y)
    torch.testing.assert_close(kf, ff, rtol=1e-12, atol=1e-15)
    assert kx.shape[1] == int(kn.max()) == fx.shape[1]
    torch.testing.assert_close(kn, fn, rtol=0, atol=0)
    torch.testing.assert_close(kx, fx, rtol=0, atol=0)
    torch.testing.assert_close(kv, fv, rtol=1e-12, atol=1e-15)


def test_empty_problems():
    kx, kv, kn, fitted = torch.ops.softcal.isotonic_fit(torch.empty(2, 0, dtype=torch.float64),
                                                        torch.empty(2, 0, dtype=torch.float64), None)
    assert kx.shape == (2, 0) and fitted.shape == (2, 0) and kn.tolist() == [0, 0]


def test_opcheck():
    x, y, w = _problems(3, 50, seed=1, ties=True)
    torch.library.opcheck(torch.ops.softcal.isotonic_fit.default, (x, y, w))
    torch.library.opcheck(torch.ops.softcal.isotonic_fit.default, (x, y, None))


@pytest.mark.parametrize("bad, message", [
    (lambda x, y, w: (x[0], y[0], None), "x must be 2-D"),
    (lambda x, y, w: (x.float(), y, None), "x must be float64"),
    (lambda x, y, w: (x, y[:, :3], None), "y must be float64 of x's shape"),
    (lambda x, y, w: (x.index_fill(1, torch.tensor([2]), float("nan")), y, None), "x holds NaN"),
    (lambda x, y, w: (x, y.index_fill(1, torch.tensor([2]), float("inf")), None), "y holds NaN or infinity"),
    (lambda x, y, w: (x, y, -w), "weights w must be finite and > 0"),
    (lambda x, y, w: (x, y, w[:, :2]), "w must be a float64 CPU tensor of x's shape"),
])
def test_errors_name_the_argument(bad, message):
    x, y, w = _problems(2, 5, seed=2, ties=False)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.softcal.isotonic_fit(*bad(x, y, w))


@pytest.mark.parametrize("n", [300, 3000])
def test_real_valued_y_strided_x_and_errors_on_both_sorts(n):
    """y not all 0/1 (the general walk, whose labels do not travel in the sort's words), x a
    transposed view (read at its strides), and the input errors on the std::sort (n < 512) and
    radix-sort paths (a NaN of either sign is found after the radix sort, at one end)."""
    x, y, _ = _problems(3, n, seed=n + 1, ties=True)
    y = y * 0.75 + 0.5 * torch.rand(3, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    xt = x.T.contiguous().T  # the same values, strides (1, 3)
    assert xt.stride() == (1, 3)
    kx, kv, kn, fitted = torch.ops.softcal.isotonic_fit(xt, y, None)
    for k in range(3):
        px, pv = _pav.pav_python(x[k], y[k], None)
        m = int(kn[k])
        assert m == px.numel()
        torch.testing.assert_close(kx[k, :m], px, rtol=0, atol=0)
        torch.testing.assert_close(kv[k, :m], pv, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(fitted[k].numpy(), _interp_at(px, pv, x[k]), rtol=1e-12, atol=1e-15)
    for nan in (float("nan"), -float("nan")):
        bad = x.clone()
        bad[1, n // 2] = nan
        with pytest.raises(RuntimeError, match="x holds NaN"):
            torch.ops.softcal.isotonic_fit(bad, y, None)
    for v in (float("inf"), float("nan")):
        bad = y.clone()
        bad[2, n - 1] = v
        with pytest.raises(RuntimeError, match="y holds NaN or infinity"):
            torch.ops.softcal.isotonic_fit(x, bad, None)
