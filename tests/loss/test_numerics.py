"""Numerics of the kernels: exact at the row maximum (issue 9).

Each quantity (probabilities, log-probabilities, per-row loss, gradients with respect to the
logits and to the temperature) is compared against float64, and its largest absolute error must
be no larger than twice PyTorch's own error in the same dtype, PyTorch's own computation being
F.cross_entropy(x / T, ...), torch.softmax(x / T) and torch.log_softmax(x / T) in that dtype
(with a floor of a few ulps of the output, for where PyTorch happens to be exact).

The float64 reference is computed from the logits as they are in the tested dtype, with a known
shift removed exactly (x + 1000 in float32 minus 1000 is exact in float64): every quantity here
is invariant under a shift of the logits, so the reference does not see the large magnitudes.

Runs on the CPU kernels, and on the CUDA kernels under SOFTCAL_EMULATE_CUDA=1.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import softcal
from softcal import reference

from conftest import EMULATE_CUDA

# (dtype, shift) pairs: logits + shift, as in issue 9 (float64 + 1e6), plus bfloat16 + 1000.
SHIFTS = [
    (torch.float32, 0.0),
    (torch.float32, 1000.0),
    (torch.float32, 1e4),
    (torch.float64, 1e6),
    (torch.bfloat16, 0.0),
    (torch.bfloat16, 1000.0),
]
TEMPS = [1.0, 0.625, 2.5]  # exact in every dtype
ULPS = 4  # the floor: a few ulps of the largest output


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error of a against ref (float64), NaN-free by construction."""
    return (a.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def assert_as_accurate_as_torch(name, ours, theirs, ref, dtype):
    """max |ours - ref| <= max(2 max |theirs - ref|, ULPS ulp(dtype) max |ref|)."""
    e_ours = max_err(ours, ref)
    e_torch = max_err(theirs, ref)
    floor = ULPS * ulp(dtype) * ref.detach().double().abs().max().item()
    bound = max(2 * e_torch, floor)
    assert e_ours <= bound, (
        f"{name}: max abs error {e_ours:.3e} > bound {bound:.3e} "
        f"(PyTorch's own error {e_torch:.3e}, floor {floor:.3e})")


def make_logits(kind, n, c, dtype, shift, temp, seed):
    """(x in dtype on the CPU, x64: the same values minus the shift, exact in float64, target)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, c, generator=g, dtype=torch.float64)
    t = torch.randint(0, c, (n,), generator=g)
    if kind == "randn100":
        base = base * 100
    elif kind == "confident":
        # the target is the unique maximum by 15-20 units of z = x / T, plus log C:
        # 1 - 1e-6 < p_y < 1 - 1e-12
        margin = (15 + math.log(c) + 5 * torch.rand(n, generator=g, dtype=torch.float64)) * temp
        base[torch.arange(n), t] = base.amax(1) + margin
    x = (base.to(dtype).double() + shift).to(dtype)
    x64 = x.double() - shift  # exact: x is within a few units of the shift
    return x, x64, t


def torch_ce(x, t, T, eps, reduction="sum"):
    return F.cross_entropy(x / T, t, label_smoothing=eps, reduction=reduction)


def ce_and_grads(fn, x, t, T):
    """loss (reduction none), d(sum loss)/dx, d(sum loss)/dT."""
    xr = x.clone().requires_grad_()
    Tr = T.clone().requires_grad_()
    loss = fn(xr, t, Tr)
    gx, gT = torch.autograd.grad(loss.sum(), (xr, Tr))
    return loss.detach(), gx, gT


def run_cross_entropy(x, x64, t, temp, eps, device, mode):
    dtype = x.dtype
    T = torch.tensor(temp, dtype=dtype)
    T64 = torch.tensor(temp, dtype=torch.float64)
    xd, td, Td = x.to(device), t.to(device), T.to(device)

    def ours(a, tt, TT):
        return softcal.cross_entropy(a, tt, temperature=TT, label_smoothing=eps,
                                     reduction="none", fused=(mode == "fused"))

    def theirs(a, tt, TT):
        return torch_ce(a, tt, TT, eps, reduction="none")

    got = ce_and_grads(ours, xd, td, Td)
    own = ce_and_grads(theirs, x, t, T)
    ref = ce_and_grads(theirs, x64, t, T64)
    for name, a, b, r in zip(("loss", "dL/dx", "dL/dT"), got, own, ref):
        assert a.dtype == dtype, (name, a.dtype)  # the dtype parameter reached the kernel
        assert_as_accurate_as_torch(name, a, b, r, dtype)
    return got, ref


@pytest.mark.parametrize("dtype,shift", SHIFTS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("temp", TEMPS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["autograd", "fused"])
def test_cross_entropy_shift_invariance(device, dtype, shift, temp, eps, mode):
    x, x64, t = make_logits("randn", 64, 10, dtype, shift, temp, seed=1)
    run_cross_entropy(x, x64, t, temp, eps, device, mode)


@pytest.mark.parametrize("dtype,shift", SHIFTS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["autograd", "fused"])
@pytest.mark.parametrize("c", [100, 3000, 9000])
def test_cross_entropy_shift_invariance_row_path(device, dtype, shift, eps, mode, c):
    """The same on the row path (C > 32): one chunk, and rows of 2 and 5 chunks, whose later
    chunks the float32 CPU kernel walks online, relative to the running max."""
    x, x64, t = make_logits("randn", 8, c, dtype, shift, 0.625, seed=4)
    run_cross_entropy(x, x64, t, 0.625, eps, device, mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temp", TEMPS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["autograd", "fused"])
@pytest.mark.parametrize("c", [50, 3000])
def test_cross_entropy_randn_times_100(device, dtype, temp, eps, mode, c):
    x, x64, t = make_logits("randn100", 32, c, dtype, 0.0, temp, seed=2)
    run_cross_entropy(x, x64, t, temp, eps, device, mode)


@pytest.mark.parametrize("dtype,shift", [(torch.float32, 0.0), (torch.float32, 100.0),
                                         (torch.bfloat16, 0.0)],
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("temp", TEMPS)
@pytest.mark.parametrize("mode", ["autograd", "fused"])
@pytest.mark.parametrize("c", [10, 3000])
def test_confident_rows(device, dtype, shift, temp, mode, c):
    """p_y > 1 - 1e-6: the loss (-log p_y, tiny) and the true-class gradient beta (p_y - 1) keep
    their relative accuracy (a rounding to the dtype and the conditioning of the exponents),
    where forming p_y first loses them entirely; and the rest is as accurate as PyTorch."""
    x, x64, t = make_logits("confident", 32, c, dtype, shift, temp, seed=3)
    p_y = torch.softmax(x64 / temp, 1).gather(1, t[:, None]).squeeze(1)
    assert (p_y > 1 - 1e-6).all() and (p_y < 1 - 1e-12).all()
    (loss, gx, _), _ = run_cross_entropy(x, x64, t, temp, 0.0, device, mode)
    if device.type == "cuda" or EMULATE_CUDA:
        # The CUDA kernels sum exp(z - max) in one float32 pass, where 1 + rest rounds as in
        # PyTorch: they meet the bound above (twice PyTorch's own error), not the relative
        # accuracy of the tiny quantities below, which the CPU kernel keeps by summing the rest
        # apart from the exact ones of the maxima (an extra compare per element on the GPU).
        return
    # float64 references that keep the digits of the tiny quantities (F.cross_entropy in float64
    # rounds 1 + rest): -log p_y = log1p(rest), p_y - 1 = expm1(-log1p(rest)), y the maximum.
    rows = torch.arange(len(t))
    zd = (x64[rows, t][:, None] - x64) / temp  # z_y - z_c >= 0
    rest = torch.where(zd > 0, torch.exp(-zd), 0.0).sum(1)
    loss64 = torch.log1p(rest)
    gy64 = torch.expm1(-loss64) / temp
    # One rounding to the dtype, plus the conditioning of the tiny sum_c exp(z_c - z_y) in
    # float32 arithmetic: each exponent carries an error of a few ulps of |z_c - z_y|.
    tol = ulp(dtype) + 4 * ulp(torch.float32) * zd.amax().item()
    rel_loss = ((loss.double().cpu() - loss64) / loss64).abs().max().item()
    gy = gx.double().cpu()[rows, t]
    rel_gy = ((gy - gy64) / gy64).abs().max().item()
    assert rel_loss <= tol, rel_loss
    assert rel_gy <= tol, rel_gy


@pytest.mark.parametrize("dtype,shift", SHIFTS + [(torch.float32, "randn100")],
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("temp", TEMPS)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("layout", ["rows", "strided"])
def test_softmax_shift_invariance(device, dtype, shift, temp, log, layout):
    """softmax / log_softmax and their backward (logits and T), last dim and a middle dim."""
    kind = "randn100" if shift == "randn100" else "randn"
    shift = 0.0 if kind == "randn100" else shift
    x, x64, _ = make_logits(kind, 48, 10, dtype, shift, temp, seed=4)
    dim = 1
    if layout == "strided":  # (4, 10, 12): softmax along the middle dim, inner stride 12
        x = x.reshape(4, 12, 10).transpose(1, 2).contiguous()
        x64 = x64.reshape(4, 12, 10).transpose(1, 2).contiguous()
    g = torch.Generator().manual_seed(5)
    up = torch.randn(x.shape, generator=g, dtype=torch.float64)
    T = torch.tensor(temp, dtype=dtype)
    T64 = torch.tensor(temp, dtype=torch.float64)
    ours_fn = softcal.log_softmax if log else softcal.softmax
    torch_fn = torch.log_softmax if log else torch.softmax

    def run(fn, a, TT, u):
        ar = a.clone().requires_grad_()
        Tr = TT.clone().requires_grad_()
        y = fn(ar, Tr)
        gx, gT = torch.autograd.grad(y, (ar, Tr), u.to(y.dtype).to(y.device))
        return y.detach(), gx, gT

    got = run(lambda a, TT: ours_fn(a, TT, dim=dim), x.to(device), T.to(device), up)
    own = run(lambda a, TT: torch_fn(a / TT, dim), x, T, up)
    ref = run(lambda a, TT: torch_fn(a / TT, dim), x64, T64, up)
    names = ("log_softmax" if log else "softmax", "d/dx", "d/dT")
    for name, a, b, r in zip(names[:2], got, own, ref):
        assert a.dtype == dtype, (name, a.dtype)
        assert_as_accurate_as_torch(name, a, b, r, dtype)
    # dL/dT = -(1/T) sum_c dz_c log y_c is a sum with cancellation. The op's backward sees only
    # the rounded outputs y (its schema keeps no x, unlike PyTorch's autograd of x / T), each
    # off by up to half an ulp: its floor is a few ulps of the sum of the magnitudes of the
    # terms, centred as the kernels centre them (on E_y[log y]).
    y64 = ref[0]
    logy = y64 if log else torch.log(y64)
    p64 = logy.exp()
    centre = (p64 * logy).sum(dim, keepdim=True)
    dz = ref[1] * temp
    terms = (dz * (logy - centre)).abs().sum().item() / temp
    assert got[2].dtype == dtype
    e_ours, e_torch = max_err(got[2], ref[2]), max_err(own[2], ref[2])
    bound = max(2 * e_torch, ULPS * ulp(dtype) * max(terms, ref[2].abs().item()))
    assert e_ours <= bound, ("d/dT", e_ours, bound, e_torch, terms)


@pytest.mark.parametrize("dtype,shift", SHIFTS, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("temp", TEMPS)
def test_temperature_stats_shift_invariance(device, dtype, shift, temp):
    """The NLL as accurate as PyTorch's F.cross_entropy(x / T, reduction="sum") in the dtype; its
    derivatives (no PyTorch counterpart) within a float32-sized relative error of float64."""
    x, x64, t = make_logits("randn", 64, 10, dtype, shift, temp, seed=6)
    got = softcal.temperature_stats(x.to(device), t.to(device), 1.0 / temp).cpu()
    ref = reference.temperature_stats(x64, t, 1.0 / temp)
    own = torch_ce(x, t, torch.tensor(temp, dtype=dtype), 0.0).double()
    assert_as_accurate_as_torch("NLL", got[0], own, ref[0], dtype)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for k in (1, 2):
        assert abs(got[k] - ref[k]).item() <= tol * ref[k].abs().item() + tol, (k, got, ref)
    assert got[3].item() == 64


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["autograd", "fused"])
@pytest.mark.parametrize("near", [1.0, 100.0, -3000.0])
def test_one_class_is_exactly_zero(device, dtype, eps, mode, near):
    """C = 1: p = 1 exactly, so the loss, its gradient and dL/dT are exactly 0 (as PyTorch)."""
    g = torch.Generator().manual_seed(7)
    x = (near + torch.randn(16, 1, generator=g, dtype=torch.float64)).to(dtype).to(device)
    t = torch.zeros(16, dtype=torch.long, device=device)
    for red in ("none", "sum", "mean"):
        xr = x.clone().requires_grad_()
        T = torch.tensor(0.3, dtype=torch.float32, device=device, requires_grad=True)
        loss = softcal.cross_entropy(xr, t, temperature=T, label_smoothing=eps, reduction=red,
                                     fused=(mode == "fused"))
        gx, gT = torch.autograd.grad(loss.sum(), (xr, T))
        assert (loss == 0).all(), (red, loss)
        assert (gx == 0).all(), (red, gx)
        assert gT.item() == 0, (red, gT)
    # softmax over one class is 1, log_softmax 0, and their T-gradients 0
    for log in (False, True):
        xr = x.clone().requires_grad_()
        T = torch.tensor(0.3, dtype=torch.float32, device=device, requires_grad=True)
        y = (softcal.log_softmax if log else softcal.softmax)(xr, T, dim=1)
        assert (y == (0 if log else 1)).all(), y
        gx, gT = torch.autograd.grad(y.sum(), (xr, T))
        assert (gx == 0).all() and gT.item() == 0, (gx, gT)


def test_lse_is_row_max_and_log_sum(device):
    """cross_entropy_fwd's saved lse is [max_c x_c, log sum_c exp(beta (x_c - max))] per row: [0, 0] for
    ignored rows, NaN for rows without a softmax; the max is that of the raw logits."""
    x = torch.tensor([[1000.5, 999.0, 998.0], [1.0, 2.0, 3.0], [-float("inf")] * 3,
                      [5.0, float("nan"), 1.0]], dtype=torch.float32, device=device)
    t = torch.tensor([0, -100, 1, 2], device=device)
    _, lse, _ = torch.ops.softcal.cross_entropy_fwd(x, t, None, None, 0.5, 0.0, -100, 0)
    assert lse.shape == (4, 2) and lse.dtype == torch.float32
    lse = lse.cpu().double()
    want0 = torch.log(torch.exp(2 * torch.tensor([0.0, -1.5, -2.5], dtype=torch.float64)).sum())
    assert lse[0, 0].item() == 1000.5
    assert abs(lse[0, 1].item() - want0.item()) <= 1e-6 * want0.item()
    assert (lse[1] == 0).all()
    assert torch.isnan(lse[2]).all() and torch.isnan(lse[3]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c", [10, 3000])
def test_temperature_stats_confident_rows(device, dtype, c):
    """The summed NLL of confident rows (each -log p_y ~ 1e-7..1e-9) keeps its relative accuracy:
    the ones of the maxima are not rounded into the sum of exps."""
    temp = 1.0
    x, x64, t = make_logits("confident", 32, c, dtype, 0.0, temp, seed=8)
    got = softcal.temperature_stats(x.to(device), t.to(device), 1.0 / temp).cpu()
    rows = torch.arange(len(t))
    zd = (x64[rows, t][:, None] - x64) / temp
    want = torch.log1p(torch.where(zd > 0, torch.exp(-zd), 0.0).sum(1)).sum().item()
    tol = 4 * ulp(torch.float32) * zd.amax().item()
    assert abs(got[0].item() - want) <= tol * want, (got[0].item(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("c", [10, 100, 5000])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["autograd", "fused"])
def test_non_finite_logits_follow_pytorch(device, dtype, c, eps, mode):
    """A NaN or +inf logit anywhere in a row (the first chunk, a later chunk whose max is finite,
    after a run of -inf, at the row max's position) makes that row's loss and gradient NaN, as
    in PyTorch; the other rows are untouched. (The float32 kernels find NaN through the exps,
    not through the max.)"""
    torch.manual_seed(3)
    n = 9
    x = torch.randn(n, c, dtype=torch.float64) * 3
    last = c - 1
    x[0, 0] = math.nan                       # first element
    x[1, last] = math.nan                    # last element (a later chunk for c = 5000)
    x[2, c // 2] = math.inf
    x[3, :] = -math.inf
    x[3, last] = math.nan                    # -inf everywhere, then NaN
    x[4, 1] = 50.0
    x[4, last] = math.nan                    # NaN after a large finite max
    x[5, :] = -math.inf                      # entirely -inf: NaN (no softmax), as PyTorch
    x[6, : c // 2] = -math.inf               # masked first half: finite
    x[7, last] = -math.inf                   # one masked class: finite
    t = torch.arange(n) % c
    t[6] = c - 1
    t[7] = 0
    x = x.to(dtype)
    xs = x.clone().to(device).requires_grad_()
    if mode == "fused":
        loss = softcal.cross_entropy(xs, t.to(device), temperature=1.5, label_smoothing=eps,
                                     reduction="none", fused=True)
    else:
        loss = softcal.cross_entropy(xs, t.to(device), temperature=1.5, label_smoothing=eps,
                                     reduction="none")
    g_out = torch.ones(n, dtype=dtype, device=device)
    (gx,) = torch.autograd.grad(loss, xs, g_out)
    xr = x.double().requires_grad_()
    want = F.cross_entropy(xr / 1.5, t, label_smoothing=eps, reduction="none")
    (gwant,) = torch.autograd.grad(want, xr, torch.ones(n, dtype=torch.float64))
    loss, gx = loss.detach().double().cpu(), gx.double().cpu()
    nan_rows = torch.isnan(want.detach())
    assert nan_rows[[0, 1, 2, 3, 4, 5]].all() and not nan_rows[[6, 7, 8]].any()
    assert torch.equal(torch.isnan(loss), nan_rows), (loss, want)
    assert torch.isnan(gx[nan_rows]).all()
    ok = ~nan_rows
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(loss[ok], want.detach()[ok], rtol=tol, atol=tol)
    gw = gwant[ok]
    assert torch.equal(torch.isnan(gw), torch.isnan(gx[ok]))
    fin = ~torch.isnan(gw)
    torch.testing.assert_close(gx[ok][fin], gw[fin], rtol=tol, atol=tol)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_reference_masked_logits_with_a_temperature_tensor(eps, weighted):
    """softcal.reference.cross_entropy with a temperature tensor: the gradient of a masked (-inf)
    logit is beta times the smoothing term's -(eps/C) w_c, as with a float temperature and as the
    kernels give (it was the term without beta)."""
    torch.manual_seed(11)
    x = torch.randn(6, 9, dtype=torch.float64) * 2
    x[1, 3] = x[2, 0] = x[4, 8] = -math.inf
    t = torch.tensor([0, 1, 2, 3, 4, 5])
    w = torch.rand(9, dtype=torch.float64) + 0.5 if weighted else None
    grads = []
    for temp in (torch.tensor(1.7, dtype=torch.float64), 1.7):
        xs = x.clone().requires_grad_()
        tt = temp.clone().requires_grad_() if isinstance(temp, torch.Tensor) else temp
        loss = reference.cross_entropy(xs, t, temperature=tt, label_smoothing=eps, weight=w,
                                       reduction="none")
        loss.sum().backward()            # rows with a masked logit: loss +inf when eps > 0
        grads.append(xs.grad)
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-14, atol=0)
    masked = torch.isneginf(x)
    want = -(eps / 9) * (w if weighted else torch.ones(9, dtype=torch.float64)) / 1.7
    torch.testing.assert_close(grads[0][masked], want.expand_as(x)[masked], rtol=1e-14, atol=0)
    xs = x.clone().requires_grad_()
    tt = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    softcal.cross_entropy(xs, t, temperature=tt, label_smoothing=eps, weight=w,
                          reduction="sum").backward()
    xr = x.clone().requires_grad_()
    tr = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    reference.cross_entropy(xr, t, temperature=tr, label_smoothing=eps, weight=w,
                            reduction="sum").backward()
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(tt.grad, tr.grad, rtol=1e-12, atol=1e-15, equal_nan=True)
