"""softcal.distributed in one process: the shard ops' semantics (reference, and the compiled
kernels once they exist), the dispatcher, a world of one rank, padding_mask, and the
accumulating metrics (plus: metrics on tensors that require grad do not warn)."""

from __future__ import annotations

import gc
import math
import os
import tempfile
import warnings
import weakref

import pytest
import torch
import torch.distributed as dist

import softcal
from softcal import _ops, distributed as D
from softcal import metrics as M
from softcal import reference as R
from softcal.nn import TemperatureScaler

SHARD_OPS = ("shard_stats", "shard_grad", "shard_grad_")


def _rows(seed=0, n=9, c=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(n, c, generator=g, dtype=torch.float64)).to(dtype)
    t = torch.randint(0, 2 * c, (n,), generator=g)  # half the targets outside a slice [0, c)
    t[1] = -100
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.1).to(dtype)
    return x, t, w


def _naive_stats(x, t, w, beta, off, ignore, smoothing):
    """The contract of shard_stats, row by row in Python floats."""
    out = []
    for i in range(x.shape[0]):
        row = [float(v) for v in x[i]]
        if int(t[i]) == ignore:
            out.append([0.0, 0.0, 0.0, 0.0])
            continue
        m = max(row) if row else -math.inf
        if m == -math.inf:
            ls, d = -math.inf, 0.0
        else:
            ls = math.log(sum(math.exp(beta * (v - m)) for v in row))
            wc = [float(v) for v in w] if w is not None else [1.0] * len(row)
            d = sum(wk * (m - v) for wk, v in zip(wc, row)) if smoothing else 0.0
        k = int(t[i]) - off
        xy = row[k] if 0 <= k < len(row) else 0.0
        out.append([m, ls, d, xy])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [False, True])
@pytest.mark.parametrize("temp", [1.0, 0.7, "tensor"])
def test_reference_shard_stats_contract(weighted, smoothing, temp):
    x, t, w = _rows()
    x[3, 2] = float("-inf")  # a masked logit: d = +inf with smoothing
    x[4] = float("-inf")     # a masked row: m = ls = -inf, d = 0
    x[1] = float("-inf")     # masked and ignored: all 0
    temp_t = torch.tensor(1.3, dtype=torch.float64) if temp == "tensor" else None
    beta = 1 / 1.3 if temp == "tensor" else 1 / temp
    got = R.shard_stats(x, t, w if weighted else None, temp_t, 1.0 if temp_t is not None else temp,
                             3, -100, smoothing)
    want = _naive_stats(x, t - 3 + 3, w if weighted else None, beta, 3, -100, smoothing)
    assert got.dtype == torch.float64 and got.shape == (9, 4)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    if smoothing:
        assert got[3, 2] == math.inf and got[4, 2] == 0.0
    assert got[4, 0] == -math.inf and got[4, 1] == -math.inf
    assert bool((got[1] == 0).all())


def test_reference_shard_stats_nan_and_dtypes():
    x, t, w = _rows(seed=1)
    x[0, 0] = float("nan")
    s = R.shard_stats(x, t, None, None, 1.0, 0, -100, True)
    assert bool(torch.isnan(s[0, :3]).all())
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        s = R.shard_stats(x.to(dtype), t, w.to(dtype), None, 1.0, 0, -100, True)
        assert s.dtype == torch.float32
    empty = R.shard_stats(x[:, :0], t, None, None, 1.0, 0, -100, True)
    assert bool(torch.isneginf(empty[t != -100, 0]).all())


@pytest.mark.parametrize("eps", [0.0, 0.15])
@pytest.mark.parametrize("weighted", [False, True])
def test_reference_shard_grad_slices_equal_full_gradient(eps, weighted):
    """Slices' gradients from the global [M, LS] == autograd of the full loss (reduction none,
    per-row upstream g), and the t_rows give dL/dT."""
    g = torch.Generator().manual_seed(2)
    n, c = 11, 10
    x = 2 * torch.randn(n, c, generator=g, dtype=torch.float64)
    x[5, 3] = float("-inf")
    t = torch.randint(0, c, (n,), generator=g)
    t[5] = 4
    t[2] = -100
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.2 if weighted else None
    up = torch.randn(n, generator=g, dtype=torch.float64)
    temp = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
    xf = x.clone().requires_grad_()
    # (the compiled kernel: the pure reference's autograd gives a masked logit's smoothing gradient
    # without the factor beta when the temperature is a tensor; the kernels' convention has it)
    loss = softcal.cross_entropy(xf, t, temperature=temp, label_smoothing=eps, weight=w,
                                 reduction="none")
    (loss * up).sum().backward()
    beta = 1 / 1.4
    big_m = x.amax(1)
    big_ls = torch.log(torch.exp(beta * (x - big_m[:, None])).sum(1))
    lse = torch.stack([big_m, big_ls], 1)
    valid = t != -100
    wy = torch.where(valid, (w if weighted else torch.ones(c, dtype=torch.float64))[t.clamp_min(0)], 0.0)
    big_w = float(w.sum()) if weighted else float(c)
    coef = torch.stack([torch.where(valid, up, 0.0), (1 - eps) * wy + eps * big_w / c, (1 - eps) * wy], 1)
    grads, t_tot = [], torch.zeros(n, 2, dtype=torch.float64)
    for off, width in ((0, 3), (3, 0), (3, 5), (8, 2)):
        xs = x[:, off:off + width].contiguous()
        ws = w[off:off + width] if weighted else None
        gx, tr = R.shard_grad(xs, t, ws, lse, coef, temp.detach(), 1.0, eps / c, off, -100,
                                   True, True)
        assert gx.shape == xs.shape and gx.dtype == x.dtype and tr.shape == (n, 2)
        xi = xs.clone()
        tr2 = R.shard_grad_(xi, t, ws, lse, coef, temp.detach(), 1.0, eps / c, off, -100, True)
        torch.testing.assert_close(xi, gx, rtol=0, atol=0)
        torch.testing.assert_close(tr2, tr, rtol=0, atol=0)
        grads.append(gx)
        t_tot += tr
    torch.testing.assert_close(torch.cat(grads, 1), xf.grad, rtol=1e-12, atol=1e-13)
    full_lse = beta * big_m + big_ls
    d_t = -(coef[:, 0] / 1.4 * (t_tot[:, 0] - full_lse * t_tot[:, 1])).sum()
    torch.testing.assert_close(d_t, temp.grad, rtol=1e-12, atol=1e-13)
    gx, tr = R.shard_grad(x, t, w, lse, coef, None, 1.4, eps / c, 0, -100, False, False)
    assert gx.shape == (0,) and bool((tr == 0).all())


@pytest.mark.parametrize("op", SHARD_OPS)
def test_dispatcher_calls_the_kernel_when_registered(monkeypatch, op):
    """softcal.distributed runs torch.ops.softcal.<op> when _ops.has_kernel says so."""
    calls = []
    ref = getattr(R, op)

    def fake(*args):
        calls.append(op)
        return ref(*args)

    real = _ops.has_kernel
    monkeypatch.setattr(_ops, "has_kernel", lambda d, o="cross_entropy_fwd": True if o == op else real(d, o))
    monkeypatch.setattr(torch.ops.softcal, op, fake, raising=False)
    x, t, w = _rows(seed=3)
    before = len(calls)
    with _world_of_one():
        xl = x.clone().requires_grad_()
        # (xl * 1.0: in place needs a non-leaf; a leaf that requires grad is refused)
        loss = D.vocab_parallel_cross_entropy(xl * 1.0, t.clamp_max(6), weight=w, label_smoothing=0.1,
                                              fused=op == "shard_grad_", inplace=op == "shard_grad_")
        loss.backward()
    assert len(calls) > before, f"{op} was not dispatched to torch.ops.softcal"


@pytest.mark.skipif(not all(_ops.has_kernel("cpu", op) for op in SHARD_OPS),
                    reason="the compiled shard ops are not in this build yet")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_kernels_equal_reference(dtype):
    x, t, w = _rows(seed=4, n=33, c=37, dtype=dtype)
    x[3, 2] = float("-inf")
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1.6e-2}[dtype]
    ops = torch.ops.softcal
    for smoothing in (False, True):
        a = ops.shard_stats(x, t, w, None, 1.3, 5, -100, smoothing)
        b = R.shard_stats(x, t, w, None, 1.3, 5, -100, smoothing)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    lse = torch.stack([x.float().amax(1) + 0.5, torch.full((33,), 0.3)], 1).to(a.dtype)
    coef = torch.rand(33, 3, dtype=a.dtype)
    a = ops.shard_grad(x, t, w, lse, coef, None, 1.3, 0.01, 5, -100, True, True)
    b = R.shard_grad(x, t, w, lse, coef, None, 1.3, 0.01, 5, -100, True, True)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=tol, atol=tol)


class _world_of_one:
    """A gloo process group of one rank in this process."""

    def __enter__(self):
        self.tmp = tempfile.TemporaryDirectory()
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(self.tmp.name, 'i')}",
                                rank=0, world_size=1)
        return self

    def __exit__(self, *exc):
        dist.destroy_process_group()
        self.tmp.cleanup()


def test_world_of_one_rank():
    """World size 1 (what a single GPU with NCCL gives): the loss, the fit and the metrics equal
    the single-process ones."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 6, (40,), generator=g)
    with _world_of_one():
        xl = x.clone().requires_grad_()
        loss = D.vocab_parallel_cross_entropy(xl, y, label_smoothing=0.1, temperature=1.5)
        loss.backward()
        xf = x.clone().requires_grad_()
        ref = softcal.cross_entropy(xf, y, label_smoothing=0.1, temperature=1.5)
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-13, atol=0)
        torch.testing.assert_close(xl.grad, xf.grad, rtol=1e-12, atol=1e-14)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = TemperatureScaler().fit(x, y, group=dist.group.WORLD)
            r0 = TemperatureScaler().fit(x, y)
        assert r.temperature == pytest.approx(r0.temperature, rel=1e-12)
        m = M.CalibrationMetrics(group=dist.group.WORLD)
        m.update(x, y)
        assert m.compute().ece == pytest.approx(M.ece(x, y), rel=1e-13)


def test_metrics_do_not_keep_a_destroyed_group_alive():
    """CalibrationMetrics holds its group weakly: after destroy_process_group the group (and its
    gloo worker threads) is freed at once, not at interpreter exit, where a worker still dropping
    an all_gather's tensors aborted the process (the README's calibrate_sharded.py, 1 run in 3);
    a compute on the destroyed group is a clear error."""
    x = torch.randn(30, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (30,))
    with _world_of_one():
        ref = weakref.ref(dist.group.WORLD)
        m = M.CalibrationMetrics(group=dist.group.WORLD)
        m.update(x, y)
        assert m.group is dist.group.WORLD
        assert m.compute().ece == pytest.approx(M.ece(x, y), rel=1e-13)
    gc.collect()
    assert ref() is None, "the metrics object kept the destroyed process group alive"
    with pytest.raises(RuntimeError, match="process group was destroyed"):
        m.compute()
    m.group = None                       # a group can be dropped: this process only
    assert m.compute().ece == pytest.approx(M.ece(x, y), rel=1e-13)


def test_uninitialised_errors_are_clear():
    x = torch.randn(4, 3)
    y = torch.randint(0, 3, (4,))
    with pytest.raises(RuntimeError, match="not initialised"):
        D.vocab_parallel_cross_entropy(x, y)
    with pytest.raises(RuntimeError, match="not initialised"):
        TemperatureScaler().fit(x, y, group=object())


@pytest.mark.parametrize("n", [1, 7, 10, 13])
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_padding_mask_keeps_each_sample_once(n, world, shuffle):
    from torch.utils.data.distributed import DistributedSampler

    ds = list(range(n))
    kept = []
    for rank in range(world):
        s = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=shuffle, seed=1)
        idx = list(s)
        mask = D.padding_mask(s)
        assert len(mask) == len(idx)
        kept += [i for i, keep in zip(idx, mask.tolist()) if keep]
    assert sorted(kept) == ds
    with pytest.raises(TypeError, match="DistributedSampler"):
        D.padding_mask(range(3))


# ---------------------------------------------------------------------- metrics
FUNCS = [M.ece, M.mce, M.adaptive_ece, M.classwise_ece, M.rms_calibration_error, M.brier_score,
         M.nll, M.accuracy, M.calibration_report, M.reliability_bins]


@pytest.mark.parametrize("fn", FUNCS, ids=lambda f: f.__name__)
def test_metrics_on_tensors_that_require_grad_do_not_warn(fn):
    x = torch.randn(50, 5, requires_grad=True)
    y = torch.randint(0, 5, (50,))
    kw = {} if fn is M.accuracy else {"temperature": torch.tensor(1.5, requires_grad=True)}
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    class GradInputs(TorchFunctionMode):
        """Records every torch function that gets a tensor requiring grad (the warning itself
        is emitted once per process, so its absence alone proves little)."""
        seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            leaves = tree_leaves((args, kwargs or {}))
            if any(isinstance(a, torch.Tensor) and a.requires_grad for a in leaves):
                self.seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    z, p = x * 2, torch.softmax(x, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with GradInputs() as mode:
            fn(z, y, **kw)
            fn(p, y, probs=True)
    # only the detach() calls themselves may see the graph
    assert set(mode.seen) <= {"detach"}, mode.seen


@pytest.mark.parametrize("probs", [False, True])
def test_accumulating_metrics_equal_the_functions(probs):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(301, 8, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 8, (301,), generator=g)
    s = torch.softmax(x, 1) if probs else x
    ref = M.calibration_report(s, y, n_bins=12, probs=probs, temperature=1.3)
    acc = M.CalibrationMetrics(n_bins=12, probs=probs)
    for i in range(0, 301, 50):
        acc.update(s[i:i + 50].float() if i == 0 else s[i:i + 50], y[i:i + 50], temperature=1.3)
    acc.reset()  # reset forgets everything
    for i in range(0, 301, 50):
        acc.update(s[i:i + 50], y[i:i + 50], temperature=1.3)
    got = acc.compute()
    for k, v in ref.to_dict().items():
        assert getattr(got, k) == pytest.approx(v, rel=1e-12, abs=1e-15), k
    no_adaptive = M.CalibrationMetrics(n_bins=12, probs=probs, adaptive=False)
    no_adaptive.update(s, y, temperature=1.3)
    assert math.isnan(no_adaptive.compute().adaptive_ece)
    assert no_adaptive._conf == []


def test_accumulating_metrics_errors():
    m = M.ECE()
    with pytest.raises(ValueError, match="no rows"):
        m.compute()
    m.update(torch.randn(4, 3), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError, match="4 classes but the earlier ones had 3"):
        m.update(torch.randn(4, 4), torch.randint(0, 4, (4,)))
    with pytest.raises(ValueError, match="n_bins"):
        M.CalibrationMetrics(n_bins=0)
