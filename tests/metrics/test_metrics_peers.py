"""softcal.metrics against the peers' own code on every file of tests/data/logits: relplot
(smooth ECE), uncertainty-calibration (debiased L2 calibration error), netcal (MMCE, ECE, MCE),
and Gupta et al.'s KS error (not packaged: its formula is written out below). A test whose
peer is not installed skips, naming it; the Makefile's test environment installs all three."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import EMULATE_CUDA
import softcal
from softcal import metrics as M

# The metrics run no kernel of softcal's: comparing them with their peers once (the CPU pass of
# `make test`) is enough, and the peers' own code is slow (netcal's MMCE is O(n^2) in memory).
pytestmark = pytest.mark.skipif(EMULATE_CUDA, reason="no kernel involved: compared in the CPU pass")

ROOT = Path(__file__).resolve().parents[2]
NETCAL_FILES = ["densenet-bc-100-cifar-100", "lenet-5-cifar-10", "wideresnet-16-4-cifar-10"]
TOL = 1e-9      # the target is 1e-6; every metric below agrees to float64 rounding


def _peer(name):
    try:
        return importlib.import_module(name)
    except ImportError as e:   # pragma: no cover - depends on the environment
        pytest.skip(f"the peer {name!r} is not installed ({e}); `make test` installs it")


def _files():
    """(name, scores, labels, probs, probabilities float64 as the peers see them)."""
    out = []
    d = np.load(Path(softcal.__file__).resolve().parent / "data" / "densenet40_c10_logits.npz")
    for split in ("val", "test"):
        x, y = d[f"logits_{split}"], d[f"labels_{split}"]
        p = torch.softmax(torch.from_numpy(x).double(), 1).numpy()
        out.append((f"densenet40_c10_{split}", x, y, False, p))
    for name in NETCAL_FILES:
        z = np.load(ROOT / f"tests/data/logits/netcal/{name}.npz")
        out.append((name, z["predictions"], z["ground_truth"], True, z["predictions"].astype(np.float64)))
    return out


FILES = _files()
IDS = [f[0] for f in FILES]


def _top(p, y):
    return p.max(1), (p.argmax(1) == y).astype(np.float64)


@pytest.mark.parametrize("case", FILES, ids=IDS)
def test_smooth_ece_equals_relplot(case):
    relplot = _peer("relplot")
    _, s, y, probs, p = case
    conf, hit = _top(p, y)
    assert M.smooth_ece(s, y, probs=probs) == pytest.approx(relplot.smECE(conf, hit), abs=TOL)
    for sigma in (1.0, 0.1, 0.02, 0.004):
        assert M.smooth_ece(s, y, probs=probs, sigma=sigma) == pytest.approx(
            relplot.smECE_sigma(conf, hit, sigma), abs=TOL), sigma


@pytest.mark.parametrize("mode", ["top-label", "marginal"])
@pytest.mark.parametrize("case", FILES, ids=IDS)
def test_debiased_calibration_error_equals_uncertainty_calibration(case, mode):
    cal = _peer("calibration")
    _, s, y, probs, p = case
    for debias in (True, False):
        ref = cal.get_calibration_error(p, y, p=2, debias=debias, mode=mode)
        got = M.debiased_calibration_error(s, y, mode=mode, debias=debias, probs=probs)
        assert got == pytest.approx(ref, abs=TOL), debias
    # the equal-mass bins with another count
    ref = cal.lower_bound_scaling_ce(p, y, p=2, debias=True, num_bins=7, mode=mode)
    assert M.debiased_calibration_error(s, y, 7, mode=mode, probs=probs, binning="mass") == \
        pytest.approx(ref, abs=TOL)


def test_debiased_discrete_outputs_equal_uncertainty_calibration():
    """The output of a binned calibrator (few distinct values): "auto" takes one bin per value."""
    cal = _peer("calibration")
    _, _, y, _, p = FILES[2]
    q = np.round(p * 8) / 8 + 1e-3          # few distinct values per class
    q /= q.sum(1, keepdims=True)
    assert cal.is_discrete(q)
    for mode in ("top-label", "marginal"):
        ref = cal.get_calibration_error(q, y, p=2, debias=True, mode=mode)
        assert M.debiased_calibration_error(q, y, mode=mode, probs=True) == pytest.approx(ref, abs=TOL)


@pytest.mark.slow
@pytest.mark.parametrize("case", FILES, ids=IDS)
def test_mmce_ece_mce_equal_netcal(case):
    _peer("netcal")
    from netcal.metrics import ECE, MCE, MMCE

    _, s, y, probs, p = case
    assert M.mmce(s, y, probs=probs) == pytest.approx(MMCE().measure(p, y), abs=TOL)
    # netcal's bins are [k/n, (k+1)/n) (numpy's histogram), softcal's (k/n, (k+1)/n]: equal
    # unless a confidence lies exactly on an inner edge, which none of these files has
    conf = p.max(1)
    for n_bins in (10, 15):
        inner = np.arange(1, n_bins) / n_bins
        assert not np.isin(conf, inner).any()
        assert M.ece(s, y, n_bins, probs=probs) == pytest.approx(ECE(bins=n_bins).measure(p, y), abs=TOL)
        assert M.mce(s, y, n_bins, probs=probs) == pytest.approx(MCE(bins=n_bins).measure(p, y), abs=TOL)


def gupta_ks_error(scores, labels):
    """Gupta et al.'s ks_error (spline-calibration, utils): the rows sorted by score, the
    largest |cumsum(scores) / n - cumsum(labels) / n|."""
    order = scores.argsort()
    scores, labels = scores[order], labels[order]
    n = scores.shape[0]
    return np.amax(np.absolute(np.cumsum(scores) / n - np.cumsum(labels) / n))


@pytest.mark.parametrize("case", FILES, ids=IDS)
def test_ks_equals_gupta_et_al(case):
    _, s, y, probs, p = case
    conf, hit = _top(p, y)
    tied = np.unique(conf).shape[0] < conf.shape[0]
    # with tied confidences theirs depends on the order of the tied rows; ours reads the end of
    # each tie (documented): equal without ties, and within 1e-6 on these files with them
    assert M.ks_calibration_error(s, y, probs=probs) == pytest.approx(
        gupta_ks_error(conf, hit), abs=1e-6 if tied else TOL)


def test_ks_ties_do_not_depend_on_row_order():
    conf = torch.tensor([0.6, 0.6, 0.6, 0.9, 0.9], dtype=torch.float64)
    p = torch.stack([conf, 1 - conf], 1)
    y = torch.tensor([0, 1, 0, 1, 0])
    a = M.ks_calibration_error(p, y, probs=True)
    b = M.ks_calibration_error(p.flip(0), y.flip(0), probs=True)
    assert a == b
    # by hand: at 0.6 cumsum(conf - hit) = 1.8 - 2 = -0.2; at 0.9 -0.2 + 1.8 - 1 = 0.6
    assert a == pytest.approx(0.6 / 5, abs=1e-15)
