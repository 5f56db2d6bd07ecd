"""The accumulating metrics (batches, and ranks of a gloo group) equal the functions; their
memory does not grow with the rows where the metric allows; MMCE's O(n log n) form equals the
n x n sum; bootstrap intervals are the quantiles of the resampled metric."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from softcal import metrics as M
from softcal._teardown import release_group_references


def _data(n=900, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = 2.5 * torch.randn(n, c, generator=g, dtype=torch.float64)
    x[torch.arange(n), y] += 1.0
    return x, y


def _cases():
    """(accumulator factory, the function it must equal)."""
    d = M.debiased_calibration_error
    return [
        (lambda: M.KSCalibrationError(), lambda x, y: M.ks_calibration_error(x, y)),
        (lambda: M.MMCE(kernel_width=0.3), lambda x, y: M.mmce(x, y, kernel_width=0.3)),
        (lambda: M.SmoothECE(), lambda x, y: M.smooth_ece(x, y)),
        (lambda: M.SmoothECE(sigma=0.05), lambda x, y: M.smooth_ece(x, y, sigma=0.05)),
        (lambda: M.DebiasedCalibrationError(12), lambda x, y: d(x, y, 12, binning="width")),
        (lambda: M.DebiasedCalibrationError(mode="marginal", debias=False),
         lambda x, y: d(x, y, mode="marginal", binning="width", debias=False)),
        (lambda: M.DebiasedCalibrationError(binning="auto", mode="marginal"),
         lambda x, y: d(x, y, mode="marginal")),
        (lambda: M.DebiasedCalibrationError(binning="mass"), lambda x, y: d(x, y, binning="mass")),
    ]


CASES = _cases()


@pytest.mark.parametrize("case", range(len(CASES)))
def test_accumulated_equals_function(case):
    make, fn = CASES[case]
    x, y = _data()
    m = make()
    for i in range(0, 900, 250):
        m.update(x[i:i + 250], y[i:i + 250])
    m.update(x[:0], y[:0])
    assert m.compute() == pytest.approx(fn(x, y), abs=1e-13)
    m.reset()
    with pytest.raises(ValueError, match="no rows were added"):
        m.compute()
    m.update(x[:300], y[:300])
    assert m.compute() == pytest.approx(fn(x[:300], y[:300]), abs=1e-13)
    with pytest.raises(ValueError, match="this batch has 4 classes but the earlier ones had 6"):
        m.update(x[:5, :4], y[:5] % 4)


def test_equal_width_debiased_state_does_not_grow_with_rows():
    x, y = _data(n=4000, c=7)
    for mode, k in (("top-label", 1), ("marginal", 7)):
        m = M.DebiasedCalibrationError(9, mode=mode)
        m.update(x[:10], y[:10])
        shape = tuple(m._stats.shape)
        for i in range(10, 4000, 500):
            m.update(x[i:i + 500], y[i:i + 500])
        assert tuple(m._stats.shape) == shape == (3, k, 9) and not m._rows


def test_equal_width_debiased_by_hand():
    # top-label, 2 bins: (0, .5] holds nothing (confidences >= .5), (.5, 1] all four rows
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    # mean confidence .775, accuracy .75: (.025)^2 - .75 * .25 / 3 < 0 -> 0; plug-in .025
    assert M.debiased_calibration_error(p, y, 2, binning="width", probs=True) == 0.0
    assert M.debiased_calibration_error(p, y, 2, binning="width", probs=True, debias=False) == \
        pytest.approx(0.025, abs=1e-15)


@pytest.mark.parametrize("width", [0.4, 0.05, 1e-3])
def test_mmce_equals_the_pairwise_sum(width):
    """The O(n log n) scan (blocks of 300 widths for small widths) against the n x n sum."""
    x, y = _data(n=700, c=4, seed=2)
    p = torch.softmax(x, 1)
    conf, pred = p.max(1)
    a = (pred == y).double() - conf
    k = torch.exp(-(conf[:, None] - conf[None, :]).abs() / width)
    ref = float((a[:, None] * a[None, :] * k).sum().sqrt() / 700)
    assert M.mmce(x, y, kernel_width=width) == pytest.approx(ref, rel=1e-10)
    # ties of the confidence are order-free
    xt = torch.cat([x, x[:50]])
    yt = torch.cat([y, y[:50]])
    perm = torch.randperm(750, generator=torch.Generator().manual_seed(0))
    assert M.mmce(xt, yt, kernel_width=width) == pytest.approx(
        M.mmce(xt[perm], yt[perm], kernel_width=width), rel=1e-12)


def test_mmce_and_ks_of_a_calibrated_sample_are_small():
    g = torch.Generator().manual_seed(7)
    conf = 0.5 + 0.5 * torch.rand(20000, generator=g, dtype=torch.float64)
    hit = (torch.rand(20000, generator=g, dtype=torch.float64) < conf).long()
    p = torch.stack([conf, 1 - conf], 1)
    y = 1 - hit                                          # class 0 is right with probability conf
    assert M.ks_calibration_error(p, y, probs=True) < 0.01
    assert M.mmce(p, y, probs=True) < 0.01
    assert M.smooth_ece(p, y, probs=True) < 0.02
    over = torch.stack([conf.clamp(max=0.99) ** 0.5, 1 - conf.clamp(max=0.99) ** 0.5], 1)
    assert M.ks_calibration_error(over, y, probs=True) > 0.05


def test_bootstrap_is_the_quantiles_of_the_resampled_metric():
    x, y = _data(n=500)
    r = M.bootstrap(M.ece, x, y, n_resamples=200, seed=3, n_bins=10)
    gen = torch.Generator().manual_seed(3)
    vals = []
    for _ in range(200):
        idx = torch.randint(0, 500, (500,), generator=gen)
        vals.append(M.ece(x[idx], y[idx], 10))
    vals = np.array(vals)
    assert r.estimate == M.ece(x, y, 10)
    assert r.low == pytest.approx(np.percentile(vals, 2.5), abs=1e-15)
    assert r.high == pytest.approx(np.percentile(vals, 97.5), abs=1e-15)
    assert r.std == pytest.approx(vals.std(ddof=1), rel=1e-12)
    torch.testing.assert_close(r.samples, torch.from_numpy(vals))
    b = M.bootstrap(M.ece, x, y, n_resamples=200, seed=3, method="basic", n_bins=10)
    assert (b.low, b.high) == pytest.approx((2 * r.estimate - r.high, 2 * r.estimate - r.low))
    # reproducible; K-dimensional input with ignored labels resamples the kept elements
    assert M.bootstrap(M.ece, x, y, n_resamples=200, seed=3, n_bins=10).low == r.low
    keep = torch.arange(500) % 4 != 0
    yi = torch.where(keep, y, torch.full_like(y, -100))
    k = M.bootstrap(M.smooth_ece, x.reshape(50, 10, 6).transpose(1, 2), yi.reshape(50, 10),
                    n_resamples=20, confidence=0.9, temperature=1.3)
    assert k.estimate == M.smooth_ece(x[keep], y[keep], temperature=1.3)
    assert k.low <= k.high and k.confidence == 0.9
    # the interval narrows with the rows (about 1 / sqrt(n))
    xl, yl = _data(n=8000, seed=1)
    wide = M.bootstrap(M.brier_score, xl[:500], yl[:500], n_resamples=100)
    narrow = M.bootstrap(M.brier_score, xl, yl, n_resamples=100)
    assert narrow.high - narrow.low < 0.5 * (wide.high - wide.low)
    for bad, match in ((dict(n_resamples=1), "n_resamples"), (dict(confidence=1.0), "confidence"),
                       (dict(method="bca"), "method")):
        with pytest.raises(ValueError, match=match):
            M.bootstrap(M.ece, x, y, **bad)
    with pytest.raises(TypeError, match="metric must be callable"):
        M.bootstrap("ece", x, y)


def test_option_errors():
    x, y = _data(n=20)
    with pytest.raises(ValueError, match="mode must be one of"):
        M.debiased_calibration_error(x, y, mode="classwise")
    with pytest.raises(ValueError, match="binning must be one of"):
        M.DebiasedCalibrationError(binning="quantile")
    with pytest.raises(ValueError, match="sigma must be a number in"):
        M.smooth_ece(x, y, sigma=0.0)
    with pytest.raises(ValueError, match="kernel_width must be a finite number"):
        M.MMCE(kernel_width=-1)
    with pytest.raises(ValueError, match="n_bins must be an int"):
        M.DebiasedCalibrationError(0)


# ---------------------------------------------------------------------- two gloo ranks
def _rank(rank, world, init, out):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        x, y = _data()
        mine = slice(0, 600) if rank == 0 else slice(600, 900)
        res = []
        for make, fn in CASES:
            m = make()
            m.group = dist.group.WORLD
            m.update(x[mine], y[mine])
            res.append(m.compute())
        # a rank without rows
        m = M.DebiasedCalibrationError(mode="marginal", group=dist.group.WORLD)
        if rank == 0:
            m.update(x, y)
        res.append(m.compute())
        m = M.KSCalibrationError(group=dist.group.WORLD)
        if rank == 1:
            m.update(x, y)
        res.append(m.compute())
        torch.save(res, os.path.join(out, f"{rank}.pt"))
    finally:
        release_group_references()  # before destroy (softcal/_teardown.py)
        dist.destroy_process_group()


def test_two_ranks_equal_the_function_on_all_rows():
    x, y = _data()
    want = [fn(x, y) for _, fn in CASES] + [
        M.debiased_calibration_error(x, y, mode="marginal", binning="width"),
        M.ks_calibration_error(x, y)]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        for r in range(2):
            got = torch.load(os.path.join(tmp, f"{r}.pt"))
            assert got == pytest.approx(want, abs=1e-13), r
