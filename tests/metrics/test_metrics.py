"""softcal.metrics against independent numpy implementations, hand-computed cases and edges."""

import math

import numpy as np
import pytest
import torch

from softcal import metrics as M

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])]


def np_softmax(x):
    z = x - x.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def np_ece_mce(p, y, n_bins=15):
    """Guo et al. / gpleiss loop: bins (lo, hi] from linspace; a confidence of 0 in the first bin."""
    conf = p.max(1)
    acc = (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    ece = mce = rms = 0.0
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        m = (conf > lo) & (conf <= hi)
        if k == 0:
            m |= conf == 0
        if m.any():
            gap = abs(acc[m].mean() - conf[m].mean())
            ece += m.mean() * gap
            rms += m.mean() * gap ** 2
            mce = max(mce, gap)
    return ece, mce, math.sqrt(rms)


def np_adaptive(p, y, n_bins=15):
    conf = p.max(1)
    acc = (p.argmax(1) == y).astype(np.float64)
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for idx in np.array_split(order, n_bins):
        if len(idx):
            total += len(idx) / len(conf) * abs(acc[idx].mean() - conf[idx].mean())
    return total


def np_classwise(p, y, n_bins=15):
    n, c = p.shape
    edges = np.linspace(0, 1, n_bins + 1)
    out = []
    for k in range(c):
        pk, tk = p[:, k], (y == k).astype(np.float64)
        e = 0.0
        for j, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
            m = (pk > lo) & (pk <= hi)
            if j == 0:
                m |= pk == 0
            if m.any():
                e += m.mean() * abs(tk[m].mean() - pk[m].mean())
        out.append(e)
    return float(np.mean(out))


def problem(n=3000, c=10, seed=0, scale=4.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    x = rng.standard_normal((n, c))
    x[np.arange(n), y] += 1.0
    return (scale * x).astype(np.float32), y


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n_bins", [1, 10, 15, 20])
def test_against_numpy_loops(seed, n_bins):
    x, y = problem(seed=seed)
    p = np_softmax(x.astype(np.float64))
    ece, mce, rms = np_ece_mce(p, y, n_bins)
    assert M.ece(x, y, n_bins) == pytest.approx(ece, abs=1e-12)
    assert M.mce(x, y, n_bins) == pytest.approx(mce, abs=1e-12)
    assert M.rms_calibration_error(x, y, n_bins) == pytest.approx(rms, abs=1e-12)
    assert M.adaptive_ece(x, y, n_bins) == pytest.approx(np_adaptive(p, y, n_bins), abs=1e-12)
    assert M.classwise_ece(x, y, n_bins) == pytest.approx(np_classwise(p, y, n_bins), abs=1e-12)
    onehot = np.eye(p.shape[1])[y]
    assert M.brier_score(x, y) == pytest.approx(((p - onehot) ** 2).sum(1).mean(), abs=1e-12)
    assert M.nll(x, y) == pytest.approx(-np.log(p[np.arange(len(y)), y]).mean(), rel=1e-12)
    assert M.accuracy(x, y) == pytest.approx((p.argmax(1) == y).mean(), abs=0)


def test_temperature_and_probs_are_consistent():
    x, y = problem(seed=4)
    t = 2.5
    xt = torch.from_numpy(x).double()
    p = torch.softmax(xt / t, 1)
    for f in (M.ece, M.mce, M.adaptive_ece, M.classwise_ece, M.rms_calibration_error, M.brier_score, M.nll):
        a = f(x, y, temperature=t)
        assert a == pytest.approx(f(xt / t, y), abs=1e-12)
        assert a == pytest.approx(f(p, y, probs=True), abs=1e-9)
        # temperature on probabilities: softmax(log p / T)
        assert f(torch.softmax(xt, 1), y, probs=True, temperature=t) == pytest.approx(a, abs=1e-9)
    # a 0-dim tensor temperature works too
    assert M.ece(x, y, temperature=torch.tensor(t)) == pytest.approx(M.ece(x, y, temperature=t), abs=0)


def test_report_equals_individual_metrics():
    x, y = problem(seed=5, c=7)
    r = M.calibration_report(x, y, 12, temperature=1.7)
    kw = dict(temperature=1.7)
    assert (r.n, r.classes, r.n_bins) == (3000, 7, 12)
    assert r.ece == pytest.approx(M.ece(x, y, 12, **kw), abs=1e-15)
    assert r.mce == pytest.approx(M.mce(x, y, 12, **kw), abs=1e-15)
    assert r.rmsce == pytest.approx(M.rms_calibration_error(x, y, 12, **kw), abs=1e-15)
    assert r.adaptive_ece == pytest.approx(M.adaptive_ece(x, y, 12, **kw), abs=1e-15)
    assert r.classwise_ece == pytest.approx(M.classwise_ece(x, y, 12, **kw), abs=1e-15)
    assert r.brier == pytest.approx(M.brier_score(x, y, **kw), abs=1e-15)
    assert r.nll == pytest.approx(M.nll(x, y, **kw), abs=1e-15)
    assert r.accuracy == M.accuracy(x, y)
    d = r.to_dict()
    assert set(d) >= {"ece", "mce", "brier", "nll", "accuracy"}


def test_hand_computed_two_bins():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.7 (right); 2 bins: (0, .5], (.5, 1]
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    # one bin holds all four: accuracy 3/4, mean confidence 0.775
    assert M.ece(p, y, 2, probs=True) == pytest.approx(0.025)
    assert M.mce(p, y, 2, probs=True) == pytest.approx(0.025)
    # 10 bins: {0.6}: |1 - .6| ; {0.7}: |1 - .7| ; {0.9, 0.9}: |.5 - .9|
    assert M.ece(p, y, 10, probs=True) == pytest.approx((0.4 + 0.3 + 2 * 0.4) / 4)
    assert M.mce(p, y, 10, probs=True) == pytest.approx(0.4)
    assert M.rms_calibration_error(p, y, 10, probs=True) == pytest.approx(
        math.sqrt((0.16 + 0.09 + 2 * 0.16) / 4))
    assert M.accuracy(p, y, probs=True) == 0.75
    assert M.brier_score(p, y, probs=True) == pytest.approx((0.02 + 1.62 + 0.32 + 0.18) / 4)
    assert M.nll(p, y, probs=True) == pytest.approx(
        -(math.log(0.9) + math.log(0.1) + math.log(0.6) + math.log(0.7)) / 4)


def test_bin_boundaries_belong_to_the_lower_bin():
    n_bins = 15
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = M._bin_index(edges, n_bins)
    # 0 -> first bin; edge k/n (k >= 1) -> bin k - 1 (it closes (lo, hi]); 1.0 -> last bin
    assert idx.tolist() == [0] + list(range(n_bins))
    above = torch.nextafter(edges[1:-1], torch.tensor(2.0, dtype=torch.float64))
    assert M._bin_index(above, n_bins).tolist() == list(range(1, n_bins))
    assert M._bin_index(torch.tensor([0.0, 1e-300, 1.0, 1.0 + 1e-12], dtype=torch.float64),
                        n_bins).tolist() == [0, 0, 14, 14]


def test_confidence_exactly_one_and_zero():
    # a confidence of exactly 1.0 (one-hot probabilities) lands in the last bin
    p = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0])
    b = M.reliability_bins(p, y, 15, probs=True)
    assert b.count.tolist() == [0.0] * 14 + [3.0]
    assert b.accuracy[-1].item() == pytest.approx(2 / 3)
    assert b.confidence[-1].item() == 1.0
    assert torch.isnan(b.accuracy[:-1]).all()
    assert M.ece(p, y, probs=True) == pytest.approx(1 / 3)
    assert M.mce(p, y, probs=True) == pytest.approx(1 / 3)
    # classwise: the zeros go to the first bin and count as well-calibrated there except the miss
    assert M.classwise_ece(p, y, probs=True) == pytest.approx(np_classwise(p.numpy(), y.numpy()))
    # NLL of a probability of 0 is finite (clamped), not inf/nan
    assert math.isfinite(M.nll(p, y, probs=True))
    # logits -> extremely confident: softmax saturates to exactly 1.0 in float64
    x = torch.tensor([[1000.0, 0.0], [0.0, 1000.0]])
    assert M.ece(x, torch.tensor([0, 1])) == 0.0
    assert M.mce(x, torch.tensor([0, 0])) == pytest.approx(0.5)  # one bin: accuracy 1/2, confidence 1


def test_edge_bins_one_bin_and_uniform():
    x = torch.zeros(10, 4)
    y = torch.arange(10) % 4
    # uniform predictions: confidence 1/4, argmax picks class 0
    assert M.ece(x, y) == pytest.approx(abs(0.3 - 0.25))
    assert M.brier_score(x, y) == pytest.approx(1 - 1 / 4)
    assert M.nll(x, y) == pytest.approx(math.log(4))
    assert M.adaptive_ece(x, y, 100) == pytest.approx(np_adaptive(np.full((10, 4), 0.25), y.numpy(), 100))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_devices_and_dtypes(device, dtype):
    x, y = problem(seed=2)
    xt = torch.from_numpy(x).to(device=device, dtype=dtype)
    yt = torch.from_numpy(y).to(device)
    ref = M.calibration_report(xt.double().cpu(), yt.cpu(), temperature=1.3)
    got = M.calibration_report(xt, yt, temperature=1.3)
    for k, v in ref.to_dict().items():
        assert getattr(got, k) == pytest.approx(v, abs=1e-12), k


@pytest.mark.parametrize("call,exc,match", [
    (lambda: M.ece(torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])), ValueError, r"labels must be in \[0, 2\]"),
    (lambda: M.ece(torch.randn(5, 3), torch.tensor([0, 1])), ValueError, "labels has shape"),
    (lambda: M.ece(torch.randn(0, 3), torch.zeros(0, dtype=torch.long)), ValueError, "empty"),
    (lambda: M.ece(torch.randn(5, 3, 2), torch.zeros(5, dtype=torch.long)), ValueError, "labels has shape"),
    (lambda: M.ece(torch.randn(5, 3), torch.zeros(5)), TypeError, "integer"),
    (lambda: M.ece(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), 0), ValueError, "n_bins"),
    (lambda: M.ece(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), temperature=-1.0), ValueError, "temperature"),
    (lambda: M.ece(torch.ones(5, 3, dtype=torch.long), torch.zeros(5, dtype=torch.long)), TypeError, "floating"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


class CountSyncs(torch.overrides.TorchFunctionMode):
    """Counts tensor-to-Python conversions (each one a device synchronisation on CUDA)."""

    NAMES = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fn", [M.ece, M.mce, M.adaptive_ece, M.classwise_ece, M.rms_calibration_error,
                                M.calibration_report, M.reliability_bins])
def test_vectorised_no_per_bin_conversions(fn):
    """The number of tensor -> Python conversions does not grow with the number of bins."""
    x, y = problem(n=2000, seed=1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    counts = []
    for n_bins in (3, 15, 1000):
        with CountSyncs() as mode:
            fn(xt, yt, n_bins)
        counts.append(mode.count)
    assert counts[0] == counts[1] == counts[2] and counts[0] <= 12, counts
