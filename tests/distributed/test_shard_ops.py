"""The vocabulary-parallel kernel ops (shard_stats, shard_grad, shard_grad_).

Each test cuts a full (N, C) logits tensor into class slices, runs the ops on every slice as one
rank would, combines the per-row results as softcal.distributed does (without a process group:
the combination is written out here in float64), and compares with the cross-entropy of the
whole logits computed in float64 by autograd. Under SOFTCAL_EMULATE_CUDA=1 the same tests run the
CUDA kernels (tests/cuda_emu).
"""
import math

import pytest
import torch

from softcal import reference

from conftest import TOL, rel_err

ops = torch.ops.softcal

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
SLICES = [(0, 7), (7, 300), (300, 301), (301, 1000)]  # unequal widths, a slice of one class


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _case(n, c, dtype, seed, masked=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * 4).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    t[::5] = -100
    if masked:  # a slice row entirely -inf (row 1, classes 300..1000) and scattered -inf
        x[1, 300:] = -math.inf
        x[2, ::3] = -math.inf
        t[1] = 3
        t[2] = 1
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, t, w


def _combine_stats(stats, slices, beta, w, t, eps, c):
    """The loss per row from every slice's [m, ls, d, xy] (float64), as softcal.distributed."""
    m = torch.stack([s[:, 0].double() for s in stats], 1)
    ls = torch.stack([s[:, 1].double() for s in stats], 1)
    d = torch.stack([s[:, 2].double() for s in stats], 1)
    xy = torch.stack([s[:, 3].double() for s in stats], 1).sum(1)
    M = m.max(1).values
    e = torch.where(torch.isneginf(m), torch.zeros_like(m), torch.exp(beta * (m - M[:, None]) + ls))
    LS = torch.log(e.sum(1))
    wl = [w[a:b].double().sum() for a, b in slices]
    # an all -inf slice row carries d = +inf (its smoothing sum), and no max to move
    D = sum(torch.where(torch.isneginf(m[:, k]), d[:, k], d[:, k] + wl[k] * (M - m[:, k]))
            for k in range(len(slices)))
    W = w.double().sum()
    valid = t != -100
    wy = w.double()[t.clamp(min=0)]
    loss = (1 - eps) * wy * (beta * (M - xy) + LS) + (eps / c) * (beta * D + W * LS)
    return torch.where(valid, loss, torch.zeros_like(loss)), M, LS


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["finite", "masked"])
def test_shard_stats_give_the_loss_of_the_whole_vocabulary(device, dtype, masked):
    n, c, T, eps = 23, 1000, 1.7, 0.1
    x, t, w = _case(n, c, dtype, seed=5 + masked, masked=masked)
    stats = []
    for a, b in SLICES:
        s = ops.shard_stats(x[:, a:b].to(device), t.to(device), w[a:b].to(device), None, T, a, -100, True)
        assert s.shape == (n, 4) and s.dtype == _acc(dtype)
        assert torch.all(s[t == -100] == 0)
        stats.append(s.cpu())
    loss, M, LS = _combine_stats(stats, SLICES, 1 / T, w, t, eps, c)
    ref = reference.cross_entropy(x.double(), t, temperature=T, label_smoothing=eps, weight=w.double(),
                                  reduction="none")
    if masked:  # smoothing over a -inf logit: +inf, as PyTorch
        assert torch.isinf(loss[1]) and torch.isinf(ref[1])
        keep = torch.ones(n, dtype=torch.bool)
        keep[1] = keep[2] = False
        loss, ref = loss[keep], ref[keep]
    tol = TOL[dtype]
    torch.testing.assert_close(loss, ref, rtol=tol["rtol"], atol=tol["atol"] * 10)
    # the row max: the max of the raw logits, exactly
    full_max = x.double().amax(1)
    valid = t != -100
    assert torch.equal(M[valid], full_max[valid])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_shard_grad_gives_the_slices_of_the_whole_gradient(device, dtype, inplace):
    n, c, eps = 19, 1000, 0.2
    x, t, w = _case(n, c, dtype, seed=7)
    Tt = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    xr = x.double().requires_grad_(True)
    g = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = reference.cross_entropy(xr, t, temperature=Tt, label_smoothing=eps, weight=w.double(),
                                  reduction="none")
    gx_ref, gT_ref = torch.autograd.grad(ref, (xr, Tt), g)
    beta = 1 / 1.3
    # the global [M, LS] and the coefficients, from the full row in float64
    xd = x.double()
    M = xd.amax(1)
    LS = torch.log(torch.exp(beta * (xd - M[:, None])).sum(1))
    valid = t != -100
    wy = w.double()[t.clamp(min=0)]
    W = w.double().sum()
    ty = (1 - eps) * wy
    A = ty + eps * W / c
    gv = torch.where(valid, g, torch.zeros_like(g))
    acc = _acc(dtype)
    lse = torch.stack([M, LS], 1).to(acc)
    coef = torch.stack([gv, A, ty], 1).to(acc)
    parts, ta, tb = [], torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    temp = torch.tensor(1.3, dtype=acc, device=device)
    for a, b in SLICES:
        xs = x[:, a:b].contiguous().to(device)
        if inplace:
            tr = ops.shard_grad_(xs, t.to(device), w[a:b].to(device), lse.to(device), coef.to(device),
                                      temp, 1.0, eps / c, a, -100, True)
            gs = xs
        else:
            gs, tr = ops.shard_grad(xs, t.to(device), w[a:b].to(device), lse.to(device), coef.to(device),
                                         temp, 1.0, eps / c, a, -100, True, True)
        assert gs.shape == (n, b - a) and gs.dtype == dtype and tr.shape == (n, 2)
        parts.append(gs.cpu())
        ta += tr[:, 0].double().cpu()
        tb += tr[:, 1].double().cpu()
    gx = torch.cat(parts, 1)
    assert rel_err(gx, gx_ref) <= TOL[dtype]["grad"], rel_err(gx, gx_ref)
    assert torch.all(gx[~valid] == 0)
    lse_full = beta * M + LS
    gT = -(gv / 1.3 * (ta - lse_full * tb)).sum()
    tolT = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    gT, gT_ref = gT.detach(), gT_ref.detach()
    assert abs(float(gT) - float(gT_ref)) <= tolT * (abs(float(gT_ref)) + 1e-3 * n), (float(gT), float(gT_ref))


def test_an_empty_slice_gives_zeros(device):
    """A rank whose slice holds no class (C_local = 0): stats say "no softmax mass" and the
    T-gradient sums are 0 (a CUDA buffer left unwritten once gave 1e152)."""
    x = torch.randn(3, 0, device=device, dtype=torch.float64)
    t = torch.tensor([0, 5, -100], device=device)
    st = ops.shard_stats(x, t, None, None, 1.3, 4, -100, True).cpu()
    assert torch.isneginf(st[:2, 0]).all() and torch.isneginf(st[:2, 1]).all() and (st[2] == 0).all()
    lse = torch.zeros(3, 2, device=device, dtype=torch.float64)
    coef = torch.ones(3, 3, device=device, dtype=torch.float64)
    g, tr = ops.shard_grad(x, t, None, lse, coef, None, 1.3, 0.01, 4, -100, True, True)
    assert g.shape == (3, 0) and torch.equal(tr.cpu(), torch.zeros(3, 2, dtype=torch.float64))


def test_shard_ops_check_their_arguments(device):
    x = torch.randn(4, 10, device=device)
    t = torch.zeros(4, dtype=torch.int64, device=device)
    with pytest.raises(RuntimeError, match="class_offset must be >= 0, got -1"):
        ops.shard_stats(x, t, None, None, 1.0, -1, -100, False)
    with pytest.raises(RuntimeError, match=r"lse must be \(4, 2\)"):
        ops.shard_grad(x, t, None, torch.zeros(4, device=device), torch.zeros(4, 3, device=device),
                            None, 1.0, 0.0, 0, -100, True, False)
    with pytest.raises(RuntimeError, match=r"coef must be \(4, 3\)"):
        ops.shard_grad(x, t, None, torch.zeros(4, 2, device=device), torch.zeros(4, 2, device=device),
                            None, 1.0, 0.0, 0, -100, True, False)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ops.shard_grad_(torch.randn(4, 12, device=device)[:, :10], t, None, torch.zeros(4, 2, device=device),
                             torch.zeros(4, 3, device=device), None, 1.0, 0.0, 0, -100, False)


def test_shard_ops_pass_opcheck(device):
    x = torch.randn(6, 40, device=device, dtype=torch.float64)
    t = torch.tensor([0, 39, -100, 60, 5, 100], device=device)
    w = torch.rand(40, device=device, dtype=torch.float64) + 0.5
    torch.library.opcheck(ops.shard_stats, (x, t, w, None, 1.3, 20, -100, True))
    lse = torch.randn(6, 2, device=device, dtype=torch.float64)
    coef = torch.rand(6, 3, device=device, dtype=torch.float64)
    torch.library.opcheck(ops.shard_grad, (x, t, w, lse, coef, None, 1.3, 0.01, 20, -100, True, True))
    torch.library.opcheck(ops.shard_grad_, (x.clone(), t, w, lse, coef, None, 1.3, 0.01, 20, -100, True))
