"""softcal.metrics inputs: K-dimensional scores (N, C, d1, ...), binary problems (one score or
two), ignore_index, and the checks of temperature tensors and probabilities (issue 18, item 11),
for every metric function and the accumulating classes."""

from __future__ import annotations

import math

import pytest
import torch

from softcal import metrics as M

BINNED = [M.ece, M.mce, M.rms_calibration_error, M.adaptive_ece, M.classwise_ece]
OTHERS = [M.brier_score, M.nll, M.smooth_ece, M.ks_calibration_error, M.mmce,
          M.debiased_calibration_error]
ALL = BINNED + OTHERS + [M.accuracy]


def _data(n=600, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = 2 * torch.randn(n, c, generator=g, dtype=torch.float64)
    x[torch.arange(n), y] += 1.5
    return x, y


def _same(a, b, tol=1e-12):
    if isinstance(a, float):
        assert a == pytest.approx(b, abs=tol)
    else:   # reliability bins / report
        for k, v in a.__dict__.items():
            w = getattr(b, k)
            if isinstance(v, torch.Tensor):
                torch.testing.assert_close(v, w, equal_nan=True, rtol=0, atol=tol)
            elif isinstance(v, float) and math.isnan(v):
                assert math.isnan(w)
            else:
                assert v == pytest.approx(w, abs=tol), k


@pytest.mark.parametrize("fn", ALL + [M.calibration_report, M.reliability_bins], ids=lambda f: f.__name__)
def test_k_dimensional_equals_flattened(fn):
    x, y = _data(n=2 * 3 * 4 * 25)
    # (N, C) rows <-> (N', C, 3, 4) elements: the class dimension is dimension 1
    xk = x.reshape(50, 3, 4, 5).permute(0, 3, 1, 2)
    yk = y.reshape(50, 3, 4)
    assert xk.shape == (50, 5, 3, 4)
    _same(fn(xk, yk), fn(x, y))
    # one extra dimension, non-contiguous
    _same(fn(x.reshape(100, 6, 5).transpose(1, 2), y.reshape(100, 6)), fn(x, y))


@pytest.mark.parametrize("fn", ALL + [M.calibration_report], ids=lambda f: f.__name__)
def test_binary_one_score_equals_two(fn):
    g = torch.Generator().manual_seed(3)
    z = 3 * torch.randn(400, generator=g, dtype=torch.float64)
    y = (torch.rand(400, generator=g, dtype=torch.float64) < torch.sigmoid(z / 2)).long()
    two = torch.stack([torch.zeros_like(z), z], 1)
    ref = fn(two, y)
    _same(fn(z, y), ref)                     # (N,) logits of class 1
    _same(fn(z[:, None], y), ref)            # (N, 1)
    _same(fn(z.reshape(20, 1, 20), y.reshape(20, 20)), ref)   # (N, 1, d)
    _same(fn(z.reshape(4, 5, 20), y.reshape(4, 5, 20)), ref)  # one score per label
    _same(fn(z, y), fn(z[:, None], y[:, None]))               # (N, 1) beside (N, 1)
    with pytest.raises(ValueError, match="not one-hot"):      # (N, C) beside (N, C)
        fn(two, torch.nn.functional.one_hot(y, 2))
    if fn is not M.accuracy:
        _same(fn(z, y, temperature=2.0), fn(two, y, temperature=2.0))
    # probabilities of class 1
    p1 = torch.sigmoid(z)
    _same(fn(p1, y, probs=True), fn(torch.stack([1 - p1, p1], 1), y, probs=True))
    _same(fn(p1, y, probs=True), ref, tol=1e-9)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1\].*binary"):
        fn(z, y + 1)


@pytest.mark.parametrize("fn", ALL + [M.calibration_report], ids=lambda f: f.__name__)
def test_ignore_index(fn):
    x, y = _data()
    keep = torch.arange(600) % 7 != 3
    y_ign = torch.where(keep, y, torch.full_like(y, -100))
    _same(fn(x, y_ign), fn(x[keep], y[keep]))
    y255 = torch.where(keep, y, torch.full_like(y, 255))
    _same(fn(x, y255, ignore_index=255), fn(x[keep], y[keep]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\] \(or ignore_index=-100\)"):
        fn(x, y255)
    with pytest.raises(ValueError, match="labels must be in"):
        fn(x, y_ign, ignore_index=None)
    with pytest.raises(ValueError, match="every label is ignore_index"):
        fn(x, torch.full_like(y, -100))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        fn(x, y, ignore_index=1.5)
    # K-dimensional and ignored together (a segmentation map with a void label)
    yk = y_ign.reshape(20, 30)
    xk = x.reshape(20, 30, 5).permute(0, 2, 1)
    _same(fn(xk, yk), fn(x[keep], y[keep]))


@pytest.mark.parametrize("fn", ALL[:-1] + [M.calibration_report, M.reliability_bins],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf")])
def test_tensor_temperature_is_checked(fn, bad):
    """Issue 18 item 11: a tensor temperature of -1, 0 or NaN was accepted (a float was checked)."""
    x, y = _data(n=50)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        fn(x, y, temperature=torch.tensor(bad))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        fn(x, y, temperature=bad)
    with pytest.raises(ValueError, match="exactly one element"):
        fn(x, y, temperature=torch.tensor([1.0, 2.0]))
    _same(fn(x, y, temperature=torch.tensor([[1.5]])), fn(x, y, temperature=1.5))


@pytest.mark.parametrize("fn", ALL + [M.calibration_report, M.reliability_bins],
                         ids=lambda f: f.__name__)
def test_probabilities_are_checked(fn):
    """Issue 18 item 11: probabilities with negative entries gave ECE 1.125 with probs=True."""
    p = torch.tensor([[1.25, -0.25], [0.5, 0.5], [0.2, 0.8]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match=r"probs must be probabilities in \[0, 1\].*-0\.25"):
        fn(p, y, probs=True)
    with pytest.raises(ValueError, match=r"probs must be probabilities in \[0, 1\]"):
        fn(torch.tensor([[float("nan"), 1.0], [0.5, 0.5]]), y[:2], probs=True)
    with pytest.raises(ValueError, match="rows must sum to 1"):
        fn(torch.tensor([[0.3, 0.3], [0.5, 0.5]]), y[:2], probs=True)
    with pytest.raises(ValueError, match=r"probs must be probabilities in \[0, 1\]"):
        fn(torch.tensor([1.5, 0.5]), y[:2], probs=True)         # binary: one probability
    # float32 softmax output passes (rows sum to 1 within rounding)
    q = torch.softmax(torch.randn(64, 1000), 1)
    fn(q, torch.zeros(64, dtype=torch.long), probs=True)


def test_accumulating_classes_take_the_same_inputs():
    x, y = _data(n=240)
    keep = torch.arange(240) % 5 != 0
    y_ign = torch.where(keep, y, torch.full_like(y, -100))
    xk = x.reshape(12, 20, 5).permute(0, 2, 1)          # (12, 5, 20)
    yk = y_ign.reshape(12, 20)
    m = M.CalibrationMetrics(n_bins=10)
    for i in range(0, 12, 5):
        m.update(xk[i:i + 5], yk[i:i + 5])
    m.update(xk[:0], yk[:0])                             # empty batch
    m.update(xk[:1], torch.full_like(yk[:1], -100))      # every label ignored: nothing added
    _same(m.compute(), M.calibration_report(x[keep], y[keep], 10))
    z = x[:, 1] - x[:, 0]
    m = M.ECE(ignore_index=None)
    m.update(z, (y % 2))
    assert m.compute() == pytest.approx(M.ece(z, y % 2), abs=1e-15)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0"):
        M.CalibrationMetrics().update(x, y, temperature=torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"probs must be probabilities"):
        M.CalibrationMetrics(probs=True).update(-torch.softmax(x, 1), y)
