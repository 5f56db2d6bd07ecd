"""TemperatureScaler: exact fit (against scipy in float64), published figures, chunks, models,
state, errors and warnings."""

import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import softcal
from softcal import metrics
from softcal.calibration import DEFAULT_BOUNDS, FitResult, TemperatureScaler

from conftest import TEST_DATA

SHARED = Path(TEST_DATA)  # tests/data/logits: in the repository (attribution in its README.md)
EMBEDDED = Path(softcal.__file__).resolve().parent / "data" / "densenet40_c10_logits.npz"

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])]


def shared(rel):
    p = SHARED / rel
    assert p.is_file(), f"test data file {p} is missing from the repository"
    return p


def scipy_optimum(logits, labels):
    """T minimising the float64 NLL, by scipy's bounded Brent on log T (independent of softcal)."""
    optimize = pytest.importorskip("scipy.optimize")
    special = pytest.importorskip("scipy.special")
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).ravel()
    xy = x[np.arange(len(y)), y]

    def f(log_t):
        z = x / math.exp(log_t)
        return float(np.mean(special.logsumexp(z, axis=1) - xy / math.exp(log_t)))

    res = optimize.minimize_scalar(f, bounds=(math.log(1e-2), math.log(1e2)), method="bounded",
                                   options={"xatol": 1e-11, "maxiter": 500})
    return math.exp(res.x), res.fun


def quiet_fit(scaler, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean fit must not warn
        return scaler.fit(*args, **kw)


# ------------------------------------------------------------------ published figures
def densenet40():
    d = np.load(EMBEDDED)
    return d["logits_val"], d["labels_val"], d["logits_test"], d["labels_test"]


@pytest.mark.parametrize("device", DEVICES)
def test_densenet40_cifar10_reproduces_published_figures(device):
    lv, yv, lt, yt = densenet40()
    s = TemperatureScaler()
    r = quiet_fit(s, torch.tensor(lv, device=device), torch.tensor(yv, device=device))
    assert isinstance(r, FitResult) and r.converged and r.at_bound is None
    assert abs(r.temperature - 2.883) <= 1e-3
    assert s.temperature == pytest.approx(r.temperature, rel=1e-6)  # float32 parameter
    assert r.iterations < 10
    assert r.nll_after < r.nll_before
    xt = torch.tensor(lt, device=device)
    ytt = torch.tensor(yt, device=device)
    assert 100 * metrics.ece(xt, ytt) == pytest.approx(5.50, abs=0.02)
    assert 100 * metrics.ece(xt, ytt, temperature=r.temperature) == pytest.approx(0.95, abs=0.02)
    assert metrics.nll(xt, ytt) == pytest.approx(0.430, abs=5e-4)
    assert metrics.nll(xt, ytt, temperature=r.temperature) == pytest.approx(0.225, abs=5e-4)
    assert metrics.accuracy(xt, ytt) == pytest.approx(0.9242, abs=1e-9)


def test_densenet40_shared_pickle_matches_embedded_fit():
    path = shared("markus93_NN_calibration/probs_densenet40_c10_logits.p")
    with open(path, "rb") as f:
        (lv, yv), _ = pickle.load(f)
    r = quiet_fit(TemperatureScaler(), lv, yv)  # numpy input, (N, 1) labels
    t_ref, nll_ref = scipy_optimum(lv, yv)
    assert r.temperature == pytest.approx(t_ref, rel=1e-5)
    assert r.nll_after == pytest.approx(nll_ref, rel=1e-6)  # kernel: fp32 per row
    assert abs(r.temperature - 2.883) <= 1e-3


def test_netcal_densenet_bc_100_cifar100():
    d = np.load(shared("netcal/densenet-bc-100-cifar-100.npz"))
    p, y = d["predictions"], d["ground_truth"]
    logp = np.log(p)
    r = quiet_fit(TemperatureScaler(), torch.from_numpy(logp[:5000]), torch.from_numpy(y[:5000]))
    assert r.temperature == pytest.approx(2.12, abs=5e-3)
    t_ref, _ = scipy_optimum(logp[:5000], y[:5000])
    assert r.temperature == pytest.approx(t_ref, rel=1e-5)
    assert 100 * metrics.ece(p[5000:], y[5000:], probs=True) == pytest.approx(14.47, abs=0.02)
    after = 100 * metrics.ece(p[5000:], y[5000:], probs=True, temperature=r.temperature)
    assert after == pytest.approx(1.37, abs=0.02)
    # the same through log p as logits
    assert 100 * metrics.ece(logp[5000:], y[5000:], temperature=r.temperature) == pytest.approx(after, abs=1e-4)


@pytest.mark.parametrize("name", ["netcal/lenet-5-cifar-10.npz", "netcal/wideresnet-16-4-cifar-10.npz",
                                  "netcal/densenet-bc-100-cifar-100.npz"])
def test_other_shared_files_match_scipy(name):
    d = np.load(shared(name))
    logp, y = np.log(d["predictions"]), d["ground_truth"]
    r = quiet_fit(TemperatureScaler(), logp, y)
    t_ref, nll_ref = scipy_optimum(logp, y)
    assert r.temperature == pytest.approx(t_ref, rel=1e-5)
    assert r.nll_after <= nll_ref * (1 + 1e-6)
    assert r.iterations < 10


# ------------------------------------------------------------------ random problems
def synthetic(n, c, seed, scale=8.0, dtype=torch.float32, device="cpu"):
    """An overconfident classifier: informative logits, multiplied by `scale`."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, c, generator=g)
    x[torch.arange(n), y] += 1.5
    return (scale * x).to(device=device, dtype=dtype), y.to(device)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n,c,scale", [(2000, 10, 8.0), (500, 3, 0.3), (3000, 100, 20.0), (200, 2, 1.0),
                                       (1000, 1000, 5.0)])
def test_random_problems_match_scipy(seed, n, c, scale):
    x, y = synthetic(n, c, seed, scale)
    r = quiet_fit(TemperatureScaler(), x, y)
    t_ref, nll_ref = scipy_optimum(x.numpy(), y.numpy())
    assert r.converged
    assert r.temperature == pytest.approx(t_ref, rel=1e-5)
    assert r.nll_after <= nll_ref * (1 + 1e-6)
    assert r.nll_after <= r.nll_before + 1e-12
    assert r.iterations <= 12


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype, device):
    x, y = synthetic(1500, 7, 3, 6.0, dtype=dtype, device=device)
    r = quiet_fit(TemperatureScaler(), x, y)
    t_ref, _ = scipy_optimum(x.double().cpu().numpy(), y.cpu().numpy())  # the same rounded values
    assert r.temperature == pytest.approx(t_ref, rel=1e-5)


@pytest.mark.parametrize("start", [1e-3, 0.01, 1.0, 50.0, 1e3])
def test_any_start_temperature_converges(start):
    x, y = synthetic(1000, 10, 1)
    r = quiet_fit(TemperatureScaler(init_temperature=start), x, y)
    t_ref, _ = scipy_optimum(x.numpy(), y.numpy())
    assert r.converged and r.temperature == pytest.approx(t_ref, rel=1e-5)


@pytest.mark.parametrize("scale", [1e-2, 1e2])
def test_logits_on_extreme_scales(scale):
    """The optimum T scales with the logits; it stays exact far from T = 1."""
    x, y = synthetic(1000, 10, 2, 1.0)
    t1 = quiet_fit(TemperatureScaler(), x, y).temperature
    r = quiet_fit(TemperatureScaler(), x * scale, y)
    assert r.temperature == pytest.approx(t1 * scale, rel=1e-5)


def test_guo_lbfgs_failure_modes_do_not_happen():
    """Guo et al.'s LBFGS(lr=0.01) fit barely moves T; ours always reaches the optimum with T > 0
    and an NLL no higher than before, also for underconfident logits (T < 1)."""
    for scale in (0.05, 40.0):
        x, y = synthetic(2000, 10, 7, scale)
        r = quiet_fit(TemperatureScaler(), x, y)
        t_ref, _ = scipy_optimum(x.numpy(), y.numpy())
        assert 0 < r.temperature < math.inf
        assert r.temperature == pytest.approx(t_ref, rel=1e-5)
        assert r.nll_after < r.nll_before


# ------------------------------------------------------------------ chunks and models
def test_chunked_fit_equals_whole_fit():
    x, y = synthetic(5003, 10, 11)
    whole = quiet_fit(TemperatureScaler(), x, y)
    chunks = list(zip(x.split(999), y.split(999)))
    r_list = quiet_fit(TemperatureScaler(), chunks)
    r_call = quiet_fit(TemperatureScaler(), lambda: zip(x.split(1000), y.split(1000)))
    ds = torch.utils.data.TensorDataset(x, y)
    r_loader = quiet_fit(TemperatureScaler(), torch.utils.data.DataLoader(ds, batch_size=777))
    np_chunks = [(a.numpy(), b.numpy()) for a, b in chunks]
    r_np = quiet_fit(TemperatureScaler(), np_chunks)
    for r in (r_list, r_call, r_loader, r_np):
        assert r.rows == 5003
        assert r.temperature == pytest.approx(whole.temperature, rel=1e-9)
        assert r.nll_after == pytest.approx(whole.nll_after, rel=1e-9)
        assert r.iterations == whole.iterations


def test_one_shot_iterator_is_rejected():
    x, y = synthetic(100, 3, 0)
    with pytest.raises(TypeError, match="one-shot iterator"):
        TemperatureScaler().fit(iter([(x, y)]))


def test_chunks_must_agree():
    x, y = synthetic(100, 3, 0)
    x4, y4 = synthetic(100, 4, 0)
    with pytest.raises(ValueError, match="chunk 1 has 4 classes"):
        TemperatureScaler().fit([(x, y), (x4, y4)])
    with pytest.raises(TypeError, match="pair"):
        TemperatureScaler().fit([(x, y, y)])


class Net(torch.nn.Module):
    def __init__(self, d=5, c=4):
        super().__init__()
        self.lin = torch.nn.Linear(d, c)
        self.drop = torch.nn.Dropout(0.5)  # must be off during the fit (eval mode)

    def forward(self, x):
        return 10 * self.lin(self.drop(x))


@pytest.mark.parametrize("device", DEVICES)
def test_fit_model_and_loader(device):
    torch.manual_seed(0)
    net = Net().to(device)
    inputs = torch.randn(700, 5)
    with torch.no_grad():
        labels = (net.eval()(inputs.to(device)) + 8 * torch.randn(700, 4, device=device)).argmax(1).cpu()
    net.train()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=64)
    with torch.no_grad():
        logits = net.eval()(inputs.to(device))
    net.train()
    direct = quiet_fit(TemperatureScaler(), logits, labels.to(device))

    s = TemperatureScaler()
    r = quiet_fit(s, net, loader, progress=False)
    assert net.training  # mode restored
    assert r.temperature == pytest.approx(direct.temperature, rel=1e-6)

    wrapped = TemperatureScaler(net).to(device)
    r2 = quiet_fit(wrapped, loader, progress=False)
    assert r2.temperature == pytest.approx(direct.temperature, rel=1e-6)
    wrapped.eval()
    x = inputs[:3].to(device)
    torch.testing.assert_close(wrapped(x), net(x) / wrapped.temperature, rtol=1e-6, atol=1e-6)


def test_progress_bar_can_be_shown(capsys):
    net = Net()
    loader = [(torch.randn(10, 5), torch.randint(0, 4, (10,))) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random labels: T may run to a bound; not the point here
        TemperatureScaler().fit(net, loader, progress=True)
    assert "collecting logits" in capsys.readouterr().err


# ------------------------------------------------------------------ module behaviour
def test_forward_state_dict_and_to():
    s = TemperatureScaler(init_temperature=2.5)
    assert s.temperature == pytest.approx(2.5, rel=1e-6)
    x = torch.randn(4, 3, dtype=torch.float64)
    out = s(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x / 2.5)
    x, y = synthetic(500, 5, 4)
    r = quiet_fit(s, x, y)
    sd = s.state_dict()
    assert list(sd) == ["log_temperature"]
    s2 = TemperatureScaler()
    s2.load_state_dict(sd)
    assert s2.temperature == s.temperature == pytest.approx(r.temperature, rel=1e-6)
    # save / load through a file-like object
    import io
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    s3 = TemperatureScaler()
    s3.load_state_dict(torch.load(buf, weights_only=True))
    assert s3.temperature == s.temperature
    assert s.to(torch.float64).log_temperature.dtype == torch.float64
    # gradient flows to log T (for users who fine-tune it jointly)
    s4 = TemperatureScaler()
    torch.nn.functional.cross_entropy(s4(x), y).backward()
    assert s4.log_temperature.grad is not None
    assert "temperature=" in repr(s)


@pytest.mark.parametrize("device", DEVICES)
def test_moves_with_to(device):
    s = TemperatureScaler(init_temperature=3.0).to(device)
    assert s.log_temperature.device.type == device
    x = torch.randn(2, 3, device=device)
    torch.testing.assert_close(s(x), x / 3.0)


# ------------------------------------------------------------------ errors and warnings
@pytest.mark.parametrize("make,exc,match", [
    (lambda x, y: (x, y[:-1]), ValueError, "labels has 99 rows but logits has 100"),
    (lambda x, y: (x, torch.full_like(y, 3)), ValueError, r"labels must be in \[0, 2\].*got label 3"),
    (lambda x, y: (x, torch.full_like(y, -1)), ValueError, "got label -1"),
    (lambda x, y: (x.index_fill(0, torch.tensor([5]), float("nan")), y), ValueError, "NaN"),
    (lambda x, y: (x.index_fill(0, torch.tensor([5]), float("inf")), y), ValueError, r"\+inf"),
    (lambda x, y: (x[:0], y[:0]), ValueError, "empty input"),
    (lambda x, y: (x[0], y[:1]), ValueError, "2-D"),
    (lambda x, y: (x, y.float()), TypeError, "integer"),
    (lambda x, y: (x.long(), y), TypeError, "floating point"),
    (lambda x, y: (x, None), ValueError, "labels is required"),
])
def test_input_errors_name_the_problem(make, exc, match):
    x, y = synthetic(100, 3, 0)
    with pytest.raises(exc, match=match):
        TemperatureScaler().fit(*make(x, y))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(bounds=(0.0, 10.0)), ValueError, "bounds"),
    (dict(bounds=(5.0, 1.0)), ValueError, "bounds"),
    (dict(bounds=3.0), TypeError, "bounds"),
    (dict(tol=-1.0), ValueError, "tol"),
    (dict(max_iter=0), ValueError, "max_iter"),
])
def test_option_errors(kw, exc, match):
    x, y = synthetic(100, 3, 0)
    with pytest.raises(exc, match=match):
        TemperatureScaler().fit(x, y, **kw)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_init_temperature_errors(bad):
    with pytest.raises(ValueError, match="init_temperature"):
        TemperatureScaler(init_temperature=bad)
    with pytest.raises(TypeError, match="model"):
        TemperatureScaler(model="resnet")


def test_probabilities_warn_with_the_fix():
    x, y = synthetic(500, 10, 0, 3.0)
    p = torch.softmax(x, 1)
    with pytest.warns(UserWarning, match=r"looks like probabilities.*torch\.log\(probs\)"):
        TemperatureScaler().fit(p, y)
    quiet_fit(TemperatureScaler(), torch.log(p), y)  # the fix: no warning


def test_separable_logits_stop_at_lower_bound():
    y = torch.arange(200) % 5
    x = torch.nn.functional.one_hot(y, 5).float() * 4.0  # every row right with margin 4
    s = TemperatureScaler()
    with pytest.warns(RuntimeWarning, match="separable"):
        r = s.fit(x, y)
    assert r.temperature == pytest.approx(DEFAULT_BOUNDS[0], rel=1e-9)
    assert r.at_bound == "lower" and not r.converged
    assert r.nll_after < r.nll_before and math.isfinite(r.nll_after)
    with pytest.warns(RuntimeWarning):
        r = TemperatureScaler().fit(x, y, bounds=(0.1, 10.0))
    assert r.temperature == pytest.approx(0.1)


def test_anti_informative_logits_stop_at_upper_bound():
    y = torch.arange(200) % 5
    x = -torch.nn.functional.one_hot(y, 5).float()  # the label always has the smallest logit
    with pytest.warns(RuntimeWarning, match="upper bound"):
        r = TemperatureScaler().fit(x, y)
    assert r.temperature == pytest.approx(DEFAULT_BOUNDS[1], rel=1e-9)
    assert r.at_bound == "upper"
    assert r.nll_after <= r.nll_before


def test_constant_logits_keep_temperature():
    y = torch.arange(50) % 4
    x = torch.full((50, 4), 2.0)
    s = TemperatureScaler(init_temperature=1.7)
    with pytest.warns(RuntimeWarning, match="does not depend on the temperature"):
        r = s.fit(x, y)
    assert r.temperature == pytest.approx(1.7, rel=1e-6)
    assert r.nll_after == pytest.approx(math.log(4))


def test_masked_logits_are_allowed():
    x, y = synthetic(300, 6, 5)
    x[:, 5] = float("-inf")
    y = y % 5
    r = quiet_fit(TemperatureScaler(), x, y)
    t_ref, _ = scipy_optimum(x[:, :5].numpy(), y.numpy())
    assert r.temperature == pytest.approx(t_ref, rel=1e-5)


def test_max_iter_returns_best_with_warning():
    x, y = synthetic(300, 6, 5)
    with pytest.warns(RuntimeWarning, match="no convergence"):
        r = TemperatureScaler().fit(x, y, max_iter=2)
    assert not r.converged and r.iterations == 2
    assert r.nll_after <= r.nll_before


def test_exported_names():
    assert softcal.TemperatureScaler is TemperatureScaler
    assert softcal.nn.TemperatureScaler is TemperatureScaler
