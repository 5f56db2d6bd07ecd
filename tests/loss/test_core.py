"""Parity, gradients, edge cases and errors of softcal.cross_entropy / softmax / log_softmax.

Oracles: softcal.reference evaluated in float64 (itself checked against torch.nn.functional)
and, where PyTorch defines the result, F.cross_entropy(logits / T, ...) in float64.
Every test runs on the CPU and, where a GPU is visible, on CUDA (ids contain "cuda").
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import softcal
from softcal import reference
from conftest import EMULATE_CUDA, TOL, rel_err

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]
TEMPS = [0.5, 1.0, 2.5, "tensor"]


def make_case(n, c, dtype, device, *, ignore_frac=0.25, weighted=False, seed=0, scale=3.0,
              extra_dims=()):
    g = torch.Generator().manual_seed(seed)
    shape = (n, c) + tuple(extra_dims)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    tshape = (n,) + tuple(extra_dims)
    t = torch.randint(0, max(c, 1), tshape, generator=g)
    if ignore_frac > 0 and t.numel() > 0:
        mask = torch.rand(tshape, generator=g) < ignore_frac
        t[mask] = -100
    w = None
    if weighted:
        w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.1).to(dtype).to(device)
    return x, t.to(device), w


def temp_arg(temp, device, requires_grad=True):
    if temp == "tensor":
        return torch.tensor(1.7, dtype=torch.float64, device=device, requires_grad=requires_grad)
    return temp


def ref_loss_and_grads(x, t, w, temp, eps, reduction, grad_out, ignore_index=-100):
    """float64 reference on the CPU: loss, dL/dx and dL/dT (None for a float T)."""
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = None if w is None else w.double().cpu()
    if isinstance(temp, torch.Tensor):
        T64 = temp.detach().double().cpu().requires_grad_()
    else:
        T64 = temp
    loss = reference.cross_entropy(x64, t.cpu(), temperature=T64, label_smoothing=eps,
                                   weight=w64, ignore_index=ignore_index, reduction=reduction)
    inputs = (x64, T64) if isinstance(T64, torch.Tensor) else (x64,)
    grads = torch.autograd.grad(loss, inputs, grad_out.double().cpu(), allow_unused=True)
    gx = grads[0] if grads[0] is not None else torch.zeros_like(x64)
    gT = grads[1] if len(grads) > 1 else None
    return loss.detach(), gx, gT


def check_against_reference(x, t, w, temp, eps, reduction, *, fused=False, inplace=False,
                            ignore_index=-100):
    dtype = x.dtype
    tol = TOL[dtype]
    xin = x.detach().clone().requires_grad_()
    # in place needs a non-leaf (a leaf that requires grad is refused, as by PyTorch's own ops)
    loss = softcal.cross_entropy(xin * 1 if inplace else xin, t, temperature=temp,
                                 label_smoothing=eps, weight=w,
                                 reduction=reduction, fused=fused, inplace=inplace,
                                 ignore_index=ignore_index)
    assert loss.dtype == dtype, "the loss must come back in the logits' dtype"
    assert loss.device == x.device
    g = torch.Generator().manual_seed(1)
    if reduction == "none":
        grad_out = torch.randn(loss.shape, generator=g, dtype=torch.float64)
    else:
        grad_out = torch.tensor(1.3, dtype=torch.float64)
    rl, rgx, rgT = ref_loss_and_grads(x, t, w, temp, eps, reduction, grad_out, ignore_index)
    assert loss.shape == rl.shape
    inputs = (xin, temp) if isinstance(temp, torch.Tensor) else (xin,)
    grads = torch.autograd.grad(loss, inputs, grad_out.to(dtype).to(x.device))
    if reduction == "none" or not torch.isnan(rl).any():
        torch.testing.assert_close(loss.double().cpu(), rl, rtol=tol["rtol"], atol=tol["atol"],
                                   equal_nan=True)
    else:
        assert torch.isnan(loss).all()
    assert grads[0].dtype == dtype and grads[0].shape == x.shape
    err = rel_err(grads[0], rgx)
    assert err <= tol["grad"], f"grad rel err {err}"
    if isinstance(temp, torch.Tensor):
        # dL/dT sums signed terms over all elements: bound the error by the size of the terms
        xd = x.detach().double().cpu()
        finite = torch.isfinite(xd)
        scale = (rgx.abs() * torch.where(finite, xd.abs(), 0)).sum().item() / abs(temp.item())
        # floor for exact zeros (C = 1): one rounding of each row's terms
        rows = max(1, t.numel())
        floor = grad_out.abs().sum().item() / (rows if reduction == "mean" else 1) * \
            (torch.where(finite, xd.abs(), 0).amax().item() if xd.numel() else 0) / abs(temp.item())
        assert abs(grads[1].item() - rgT.item()) <= tol["grad"] * (scale + floor) + 1e-12, (grads[1], rgT)
    return loss


# --------------------------------------------------------------------------- the oracle itself

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_reference_matches_torch(reduction, eps, weighted):
    x, t, w = make_case(11, 7, torch.float64, "cpu", weighted=weighted, extra_dims=())
    T = 1.9
    got = reference.cross_entropy(x, t, temperature=T, label_smoothing=eps, weight=w,
                                  reduction=reduction)
    want = F.cross_entropy(x / T, t, weight=w, label_smoothing=eps, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- the extension ran

def test_compiled_extension_is_used():
    assert softcal.HAVE_EXTENSION, f"extension failed to load: {softcal._ops.IMPORT_ERROR}"
    assert softcal.backend("cpu") == "extension"
    for op in softcal._ops.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"softcal::{op}", "CPU"), op
    x = torch.randn(8, 5, requires_grad=True)
    t = torch.randint(0, 5, (8,))
    with torch.profiler.profile() as prof:
        softcal.cross_entropy(x, t, temperature=2.0).backward()
    names = {e.name for e in prof.events()}
    assert "softcal::cross_entropy_fwd" in names and "softcal::cross_entropy_bwd" in names, sorted(names)[:20]


def test_fallback_runs_without_extension_and_warns_once():
    code = (
        "import sys, warnings\n"
        "sys.modules['softcal._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, softcal, torch.nn.functional as F\n"
        "    x = torch.randn(6, 4, dtype=torch.float64); t = torch.tensor([0, 1, 2, 3, 1, -100])\n"
        "    a = softcal.cross_entropy(x, t, temperature=2.0, label_smoothing=0.1)\n"
        "    b = F.cross_entropy(x / 2.0, t, label_smoothing=0.1)\n"
        "    softcal.cross_entropy(x, t)\n"
        "assert softcal.backend('cpu') == 'reference'\n"
        "assert abs(a.item() - b.item()) < 1e-12\n"
        "n = sum('compiled extension could not be loaded' in str(m.message) for m in w)\n"
        "assert n == 1, n\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


# --------------------------------------------------------------------------- parity matrix

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("temp", TEMPS)
def test_parity_matrix(device, dtype, reduction, eps, weighted, temp):
    x, t, w = make_case(13, 37, dtype, device, weighted=weighted, seed=hash((reduction, eps)) % 1000)
    assert x.dtype == dtype and (w is None or w.dtype == dtype)  # the dtype reached the inputs
    check_against_reference(x, t, w, temp_arg(temp, device), eps, reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [1, 2, 3, 1000, pytest.param(50257, marks=pytest.mark.slow),
                               pytest.param(128256, marks=pytest.mark.slow)])
@pytest.mark.parametrize("n", [0, 1, 5])
def test_shapes(device, dtype, c, n):
    x, t, w = make_case(n, c, dtype, device, weighted=True, ignore_frac=0.2, seed=c + n)
    assert x.dtype == dtype
    for reduction in ("mean", "none"):
        check_against_reference(x, t, w, temp_arg("tensor", device), 0.1, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_odd_row_counts_and_large_batch(device, dtype):
    for n in (2, 3, 7, 257, 4099):
        x, t, w = make_case(n, 10, dtype, device, seed=n)
        check_against_reference(x, t, w, 1.5, 0.1, "mean")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_k_dimensional_inputs(device, reduction):
    x, t, w = make_case(3, 5, torch.float64, device, extra_dims=(4, 2), weighted=True)
    T = torch.tensor(0.8, dtype=torch.float64, device=device, requires_grad=True)
    loss = check_against_reference(x, t, w, T, 0.1, reduction)
    want = F.cross_entropy(x / 0.8, t, weight=w, label_smoothing=0.1, reduction=reduction)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    if reduction == "none":
        assert loss.shape == (3, 4, 2)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_single_sample_input(device, reduction):
    x = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.tensor(4, device=device)
    loss = softcal.cross_entropy(x, t, temperature=2.0, label_smoothing=0.2, reduction=reduction)
    want = F.cross_entropy(x / 2.0, t, label_smoothing=0.2, reduction=reduction)
    assert loss.shape == want.shape == ()
    torch.testing.assert_close(loss, want)
    g1, = torch.autograd.grad(loss, x)
    g2, = torch.autograd.grad(want, x)
    torch.testing.assert_close(g1, g2)


def test_int32_target_is_accepted(device):
    x, t, _ = make_case(9, 4, torch.float32, device)
    a = softcal.cross_entropy(x, t.int())
    b = softcal.cross_entropy(x, t)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- ignore_index

def test_all_rows_ignored(device):
    x = torch.randn(5, 4, device=device, requires_grad=True)
    t = torch.full((5,), -100, device=device)
    assert torch.isnan(softcal.cross_entropy(x, t, reduction="mean"))
    assert torch.isnan(F.cross_entropy(x, t, reduction="mean"))  # PyTorch's behaviour
    s = softcal.cross_entropy(x, t, reduction="sum", label_smoothing=0.1)
    assert s.item() == 0.0
    s.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    n = softcal.cross_entropy(x, t, reduction="none")
    assert torch.equal(n, torch.zeros(5, device=device))


def test_custom_ignore_index_inside_class_range(device):
    x, t, w = make_case(20, 6, torch.float64, device, ignore_frac=0.0, weighted=True)
    for reduction in REDUCTIONS:
        got = softcal.cross_entropy(x, t, ignore_index=2, weight=w, label_smoothing=0.3,
                                    reduction=reduction)
        want = F.cross_entropy(x, t, ignore_index=2, weight=w, label_smoothing=0.3,
                               reduction=reduction)
        torch.testing.assert_close(got, want)


def test_empty_batch_follows_pytorch(device):
    x = torch.randn(0, 7, device=device, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=device)
    for reduction in REDUCTIONS:
        got = softcal.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
        want = F.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, equal_nan=True)
    softcal.cross_entropy(x, t, reduction="sum").backward()
    assert x.grad.shape == (0, 7)


# --------------------------------------------------------------------------- upstream gradients

def test_nonuniform_and_expanded_grad_output(device):
    x, t, w = make_case(9, 11, torch.float64, device, weighted=True)
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    la = softcal.cross_entropy(xa, t, weight=w, reduction="none", temperature=1.3, label_smoothing=0.1)
    lb = F.cross_entropy(xb / 1.3, t, weight=w, reduction="none", label_smoothing=0.1)
    g = torch.linspace(-2, 3, 9, dtype=torch.float64, device=device)
    la.backward(g)
    lb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    # stride-0 upstream gradient (what .sum() hands back)
    xa.grad = None
    xb.grad = None
    softcal.cross_entropy(xa, t, weight=w, reduction="none").backward(
        torch.tensor(2.5, dtype=torch.float64, device=device).expand(9))
    (F.cross_entropy(xb, t, weight=w, reduction="none") * 2.5).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_scaled_scalar_loss(device):
    x, t, _ = make_case(6, 5, torch.float64, device)
    for fused in (False, True):
        xa = x.clone().requires_grad_()
        (softcal.cross_entropy(xa, t, fused=fused) * -4.0).backward()
        xb = x.clone().requires_grad_()
        (F.cross_entropy(xb, t) * -4.0).backward()
        torch.testing.assert_close(xa.grad, xb.grad)


# --------------------------------------------------------------------------- layouts

def test_non_contiguous_logits(device):
    base = torch.randn(20, 40, dtype=torch.float64, device=device)
    t = torch.randint(0, 17, (6,), device=device)
    views = {
        "row_strided": base[:12:2, :17],              # unit class stride, row stride 80
        "transposed": base[:17, :6].t(),              # class stride 40 -> copied
        "column_slice": base[:6, 3:20],
    }
    for name, v in views.items():
        a = v.clone().requires_grad_()
        b = v.detach().contiguous().requires_grad_()
        la = softcal.cross_entropy(a, t, temperature=0.7, label_smoothing=0.1)
        lb = F.cross_entropy(b / 0.7, t, label_smoothing=0.1)
        torch.testing.assert_close(la, lb, msg=name)
        torch.testing.assert_close(torch.autograd.grad(la, a)[0], torch.autograd.grad(lb, b)[0], msg=name)
        # a genuinely strided view (not a clone) gives the same result
        lv = softcal.cross_entropy(v, t, temperature=0.7, label_smoothing=0.1)
        torch.testing.assert_close(lv, lb.detach(), msg=name)


# --------------------------------------------------------------------------- extreme values

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [0.5, 1.0, 3.0])
def test_large_magnitude_logits(device, dtype, T):
    """|x| ~ 1e4: finite, and at least as close to float64 as PyTorch's own result in `dtype`.

    At this magnitude the per-row log-sum-exp, saved in float32, carries an absolute rounding
    error of ~|z| * 2^-24, which bounds the accuracy of p (and PyTorch's x / T in float32 has
    the same kind of error).
    """
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 50, generator=g, dtype=torch.float64) * 1e4).to(dtype).to(device)
    t = torch.randint(0, 50, (16,), generator=g).to(device)
    zmax = x.double().abs().max().item() / T
    for eps in (0.0, 0.1):
        xa = x.clone().requires_grad_()
        loss = softcal.cross_entropy(xa, t, temperature=T, label_smoothing=eps, reduction="none")
        assert torch.isfinite(loss).all()
        gx, = torch.autograd.grad(loss.sum(), xa)
        assert torch.isfinite(gx).all()
        x64 = x.double().cpu().requires_grad_()
        want = F.cross_entropy(x64 / T, t.cpu(), label_smoothing=eps, reduction="none")
        gwant, = torch.autograd.grad(want.sum(), x64)
        xp = x.clone().requires_grad_()
        theirs = F.cross_entropy(xp / T, t, label_smoothing=eps, reduction="none")
        gtheirs, = torch.autograd.grad(theirs.sum(), xp)
        ulp = zmax * 2.0 ** -23
        loss_err = (loss.double().cpu() - want).abs().max().item()
        loss_err_torch = (theirs.double().cpu() - want).abs().max().item()
        assert loss_err <= max(2 * loss_err_torch, 4 * ulp, TOL[dtype]["atol"]), (loss_err, loss_err_torch)
        g_err = rel_err(gx, gwant)
        g_err_torch = rel_err(gtheirs, gwant)
        assert g_err <= max(2 * g_err_torch, 4 * ulp, TOL[dtype]["grad"]), (g_err, g_err_torch)


def test_masked_logits_match_pytorch(device):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 30, generator=g, dtype=torch.float64).to(device)
    x[:, 10:20] = -math.inf
    t = torch.randint(0, 10, (8,), generator=g).to(device)
    for eps in (0.0, 0.1):
        for reduction in REDUCTIONS:
            a = x.clone().requires_grad_()
            b = x.clone().requires_grad_()
            la = softcal.cross_entropy(a, t, temperature=1.5, label_smoothing=eps, reduction=reduction)
            lb = F.cross_entropy(b / 1.5, t, label_smoothing=eps, reduction=reduction)
            torch.testing.assert_close(la, lb)  # +inf with smoothing, as PyTorch
            ga = torch.autograd.grad(la.sum(), a)[0]
            gb = torch.autograd.grad(lb.sum(), b)[0]
            torch.testing.assert_close(ga, gb)
            assert torch.isfinite(ga).all()


def test_masked_logits_temperature_gradient_is_finite(device):
    x = torch.randn(6, 12, dtype=torch.float64, device=device)
    x[:, :4] = -math.inf
    t = torch.randint(4, 12, (6,), device=device)
    T = torch.tensor(1.4, dtype=torch.float64, device=device, requires_grad=True)
    loss = softcal.cross_entropy(x, t, temperature=T)
    gT, = torch.autograd.grad(loss, T)
    assert torch.isfinite(gT)
    # masked classes are constants: same gradient as the problem without them
    T2 = T.detach().clone().requires_grad_()
    want = F.cross_entropy(x[:, 4:] / T2, t - 4)
    gT2, = torch.autograd.grad(want, T2)
    torch.testing.assert_close(gT, gT2)


def test_target_logit_masked_gives_inf_like_pytorch(device):
    x = torch.randn(3, 5, dtype=torch.float64, device=device)
    x[1, 2] = -math.inf
    t = torch.tensor([0, 2, 1], device=device)
    a = x.clone().requires_grad_()
    la = softcal.cross_entropy(a, t, reduction="none")
    lb = F.cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(la, lb)
    assert la[1].item() == math.inf
    la.sum().backward()
    assert torch.isfinite(a.grad).all()


def test_fully_masked_rows(device):
    """Documented: ignored -> loss 0 and gradient 0; not ignored -> NaN (as PyTorch)."""
    x = torch.randn(4, 6, dtype=torch.float64, device=device)
    x[1] = -math.inf
    x[2] = -math.inf
    t = torch.tensor([0, -100, 3, 5], device=device)
    a = x.clone().requires_grad_()
    la = softcal.cross_entropy(a, t, reduction="none", temperature=2.0)
    _, lse, _ = torch.ops.softcal.cross_entropy_fwd(x, t, None, None, 2.0, 0.0, -100, 0)
    assert lse.shape == (4, 2)
    assert torch.isnan(lse[2]).all()  # the saved [max, log sum exp] of a non-ignored masked row: NaN
    assert (lse[1] == 0).all()  # an ignored row: [0, 0]
    assert la[1].item() == 0.0
    assert math.isnan(la[2].item())
    assert math.isnan(F.cross_entropy(x, t, reduction="none")[2].item())
    assert torch.isfinite(la[[0, 3]]).all()
    la[[0, 1, 3]].sum().backward()
    assert torch.equal(a.grad[1], torch.zeros(6, dtype=torch.float64, device=device))
    assert torch.isfinite(a.grad[[0, 1, 3]]).all()
    # with only the ignored fully masked row, the batch loss is finite
    lm = softcal.cross_entropy(x[[0, 1, 3]], t[[0, 1, 3]], label_smoothing=0.1)
    assert torch.isfinite(lm)
    torch.testing.assert_close(lm, F.cross_entropy(x[[0, 3]], t[[0, 3]], label_smoothing=0.1))


# --------------------------------------------------------------------------- temperature

def test_temperature_tensor_gradient_matches_autograd(device):
    x, t, w = make_case(10, 9, torch.float64, device, weighted=True)
    for reduction in REDUCTIONS:
        for eps in (0.0, 0.25):
            T = torch.tensor(0.9, dtype=torch.float64, device=device, requires_grad=True)
            la = softcal.cross_entropy(x, t, temperature=T, weight=w, label_smoothing=eps, reduction=reduction)
            ga, = torch.autograd.grad(la.sum(), T)
            T2 = T.detach().clone().requires_grad_()
            lb = F.cross_entropy(x / T2, t, weight=w, label_smoothing=eps, reduction=reduction)
            gb, = torch.autograd.grad(lb.sum(), T2)
            torch.testing.assert_close(ga, gb)


def test_float32_temperature_tensor(device):
    x, t, _ = make_case(10, 9, torch.float32, device)
    T = torch.tensor(2.0, device=device, requires_grad=True)
    loss = softcal.cross_entropy(x, t, temperature=T)
    gT, = torch.autograd.grad(loss, T)
    assert gT.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(x / 2.0, t))


# --------------------------------------------------------------------------- gradcheck / opcheck

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck(device, reduction, weighted):
    x, t, w = make_case(5, 4, torch.float64, device, weighted=weighted, ignore_frac=0.3, seed=7)
    x.requires_grad_()
    T = torch.tensor(1.3, dtype=torch.float64, device=device, requires_grad=True)

    def f(x_, T_):
        return softcal.cross_entropy(x_, t, temperature=T_, label_smoothing=0.15, weight=w,
                                     reduction=reduction)

    assert torch.autograd.gradcheck(f, (x, T))


def test_fused_gradients_equal_gradchecked_path(device):
    """fused=True scales its stored gradient in place, so gradcheck (which runs backward twice)
    does not apply; its gradients must equal those of the gradchecked fused=False path."""
    x, t, w = make_case(5, 4, torch.float64, device, weighted=True, seed=8)
    for reduction in REDUCTIONS:
        grads = []
        for fused in (False, True):
            xa = x.clone().requires_grad_()
            T = torch.tensor(0.7, dtype=torch.float64, device=device, requires_grad=True)
            loss = softcal.cross_entropy(xa, t, temperature=T, label_smoothing=0.1, weight=w,
                                         reduction=reduction, fused=fused)
            g = torch.linspace(0.5, 2.0, loss.numel(), dtype=torch.float64, device=device).reshape(loss.shape)
            grads.append(torch.autograd.grad(loss, (xa, T), g))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-12, atol=1e-14)


def test_fused_backward_twice_is_an_error(device):
    x, t, _ = make_case(5, 4, torch.float64, device)
    xa = x.clone().requires_grad_()
    loss = softcal.cross_entropy(xa, t, fused=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="can run only once per forward"):
        loss.backward()


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_gradcheck_softmax(device, log, dim):
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    T = torch.tensor(1.6, dtype=torch.float64, device=device, requires_grad=True)
    fn = softcal.log_softmax if log else softcal.softmax
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, dim), (x, T))


def _opcheck_cases(device):
    x, t, w = make_case(6, 5, torch.float32, device, weighted=True)
    T = torch.tensor(1.5, device=device)
    ops = torch.ops.softcal
    loss, lse, denom = ops.cross_entropy_fwd(x, t, w, T, 1.0, 0.1, -100, 1)
    cases = []
    for red in (0, 1, 2):
        cases.append((ops.cross_entropy_fwd.default, (x.clone().requires_grad_(), t, w, None, 1.5, 0.1, -100, red)))
        cases.append((ops.cross_entropy_fwd.default, (x, t, None, T, 1.0, 0.0, -100, red)))
        cases.append((ops.cross_entropy_fused.default, (x, t, w, T, 1.0, 0.1, -100, red, True)))
        cases.append((ops.cross_entropy_fused_.default, (x.clone(), t, w, None, 2.0, 0.1, -100, red, False)))
    g_none = torch.randn(6, device=device)
    cases.append((ops.cross_entropy_bwd.default, (g_none, x, t, w, lse, denom, T, 1.0, 0.1, -100, 0, True, True)))
    cases.append((ops.cross_entropy_bwd.default, (torch.tensor(1.0, device=device), x, t, w, lse, denom, T, 1.0, 0.1, -100, 1, True, False)))
    cases.append((ops.cross_entropy_bwd.default, (torch.tensor(1.0, device=device), x, t, w, lse, denom, T, 1.0, 0.1, -100, 2, False, True)))
    cases.append((ops.scale_rows_.default, (torch.randn(6, 5, device=device), torch.tensor(2.0, device=device))))
    cases.append((ops.scale_rows_.default, (torch.randn(6, 5, device=device), torch.randn(6, device=device))))
    y = torch.randn(2, 3, 4, device=device)
    for dim in (0, 2):
        for log in (False, True):
            cases.append((ops.softmax_fwd.default, (y.clone().requires_grad_(), None, 1.7, dim, log)))
            out = ops.softmax_fwd(y, T, 1.0, dim, log)
            cases.append((ops.softmax_bwd.default, (torch.randn_like(y), out, T, 1.0, dim, log, True)))
    cases.append((ops.temperature_stats.default, (x, t.clamp(min=0), 0.6)))
    # the vocabulary-parallel pieces (tests/distributed/test_shard_ops.py checks their values)
    cases.append((ops.shard_stats.default, (x, t, w, T, 1.0, 2, -100, True)))
    acc_lse = torch.randn(6, 2, device=device)
    coef = torch.rand(6, 3, device=device)
    cases.append((ops.shard_grad.default, (x, t, w, acc_lse, coef, T, 1.0, 0.02, 2, -100, True, True)))
    cases.append((ops.shard_grad_.default, (x.clone(), t, None, acc_lse, coef, None, 1.5, 0.0, 2, -100, False)))
    # class-probability targets (more cases in tests/loss/test_soft_targets.py)
    p = torch.softmax(torch.randn(6, 5, device=device), 1)
    _, slse, smass = ops.soft_target_fwd(x, p, w, T, 1.0, 0.1, 1)
    cases.append((ops.soft_target_fwd.default,
                  (x.clone().requires_grad_(), p.clone().requires_grad_(), w, T, 1.0, 0.1, 1)))
    cases.append((ops.soft_target_bwd.default, (torch.tensor(1.0, device=device), x, p, w, slse, smass,
                                              T, 1.0, 0.1, 1, True, True, True)))
    return cases


def test_opcheck_every_op(device):
    cases = _opcheck_cases(device)
    covered = {str(op).split(".")[0].replace("softcal::", "") for op, _ in cases}
    assert {name for name in softcal._ops.OPS} <= {str(op._name).split("::")[1] for op, _ in cases}, covered
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x, t, w = make_case(8, 16, torch.float32, device, weighted=True)

    def step(x_, T_):
        loss = softcal.cross_entropy(x_, t, temperature=T_, label_smoothing=0.1, weight=w)
        p = softcal.softmax(x_, 2.0)
        return loss + p.sum() * 0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    Ta = torch.tensor(1.5, device=device, requires_grad=True)
    Tb = torch.tensor(1.5, device=device, requires_grad=True)
    la = compiled(xa, Ta)
    lb = step(xb, Tb)
    torch.testing.assert_close(la, lb)
    la.backward()
    lb.backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(Ta.grad, Tb.grad)


def test_torch_compile_inductor(device):
    torch._dynamo.reset()
    x, t, _ = make_case(8, 16, torch.float32, device)
    f = torch.compile(lambda v: softcal.cross_entropy(v, t, temperature=1.5, label_smoothing=0.1),
                      fullgraph=True)
    xa = x.clone().requires_grad_()
    la = f(xa)
    la.backward()
    xb = x.clone().requires_grad_()
    lb = F.cross_entropy(xb / 1.5, t, label_smoothing=0.1)
    lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(xa.grad, xb.grad)


# --------------------------------------------------------------------------- fused modes

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_parity(device, dtype, reduction, inplace):
    x, t, w = make_case(17, 300, dtype, device, weighted=True)
    check_against_reference(x, t, w, temp_arg("tensor", device), 0.1, reduction, fused=True,
                            inplace=inplace)


def test_fused_inplace_overwrites_logits_with_gradient(device):
    x, t, _ = make_case(7, 9, torch.float32, device)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as the output of a model
    loss = softcal.cross_entropy(logits, t, fused=True, inplace=True, label_smoothing=0.1)
    loss.backward()
    xr = x.clone().requires_grad_()
    F.cross_entropy(xr, t, label_smoothing=0.1).backward()
    torch.testing.assert_close(leaf.grad, xr.grad)
    torch.testing.assert_close(logits.detach(), xr.grad)  # the buffer now holds the gradient


def test_fused_backward_scales_by_grad_output(device):
    x, t, _ = make_case(7, 9, torch.float64, device)
    for reduction in REDUCTIONS:
        a = x.clone().requires_grad_()
        la = softcal.cross_entropy(a, t, fused=True, reduction=reduction)
        b = x.clone().requires_grad_()
        lb = F.cross_entropy(b, t, reduction=reduction)
        g = torch.rand(la.shape, dtype=torch.float64, device=device) + 0.5
        la.backward(g)
        lb.backward(g)
        torch.testing.assert_close(a.grad, b.grad)


# --------------------------------------------------------------------------- determinism

def test_deterministic_across_runs_and_threads():
    x, t, w = make_case(301, 2000, torch.float32, "cpu", weighted=True)
    T = torch.tensor(1.3, requires_grad=True)
    n0 = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1, max(2, n0)):
            torch.set_num_threads(threads)
            xa = x.clone().requires_grad_()
            loss = softcal.cross_entropy(xa, t, temperature=T, label_smoothing=0.1, weight=w)
            gx, gT = torch.autograd.grad(loss, (xa, T))
            stats = softcal.temperature_stats(x, t.clamp(min=0), 0.7)
            results.append((loss, gx, gT, stats))
    finally:
        torch.set_num_threads(n0)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- softmax

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("temp", [0.5, 1.0, 2.5, "tensor"])
def test_softmax_parity(device, dtype, log, dim, temp):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 33, 7, generator=g, dtype=torch.float64) * 4).to(dtype).to(device)
    T = temp_arg(temp, device)
    fn = softcal.log_softmax if log else softcal.softmax
    xa = x.clone().requires_grad_()
    out = fn(xa, T, dim)
    assert out.dtype == dtype and out.shape == x.shape
    x64 = x.double().cpu().requires_grad_()
    T64 = T.detach().double().cpu().requires_grad_() if isinstance(T, torch.Tensor) else T
    ref = (torch.log_softmax if log else torch.softmax)(x64 / T64, dim)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=tol["rtol"], atol=tol["atol"])
    gout = torch.randn(x.shape, generator=g, dtype=torch.float64)
    inputs = (xa, T) if isinstance(T, torch.Tensor) else (xa,)
    grads = torch.autograd.grad(out, inputs, gout.to(dtype).to(device))
    rinputs = (x64, T64) if isinstance(T, torch.Tensor) else (x64,)
    rgrads = torch.autograd.grad(ref, rinputs, gout)
    assert rel_err(grads[0], rgrads[0]) <= tol["grad"] * 2
    if isinstance(T, torch.Tensor):
        assert rel_err(grads[1], rgrads[1]) <= tol["grad"] * 10


def test_softmax_extremes(device):
    x = torch.tensor([[1e4, -1e4, 0.0], [-math.inf, 2.0, -math.inf], [-math.inf] * 3],
                     dtype=torch.float32, device=device)
    for T in (0.5, 2.0):
        out = softcal.softmax(x, T)
        ref = torch.softmax(x.double() / T, -1)
        torch.testing.assert_close(out.double(), ref.to(out.device), equal_nan=True)
        lout = softcal.log_softmax(x, T)
        lref = torch.log_softmax(x.double() / T, -1)
        torch.testing.assert_close(lout.double(), lref.to(out.device), equal_nan=True)
    assert torch.isnan(softcal.softmax(x, 1.0)[2]).all()  # entirely -inf: NaN, as torch.softmax


def test_softmax_0dim_and_empty(device):
    torch.testing.assert_close(softcal.softmax(torch.tensor(3.0, device=device), 2.0),
                               torch.tensor(1.0, device=device))
    assert softcal.log_softmax(torch.zeros(0, 5, device=device), 1.0).shape == (0, 5)


# --------------------------------------------------------------------------- temperature_stats

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_temperature_stats(device, dtype):
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(200, 30, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)
    t = torch.randint(0, 30, (200,), generator=g).to(device)
    for beta in (0.2, 1.0, 3.0):
        got = softcal.temperature_stats(x, t, beta)
        want = reference.temperature_stats(x.double().cpu(), t.cpu(), beta)
        assert got.dtype == torch.float64 and got.shape == (4,)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    # the statistics are the NLL and its derivatives in beta (finite differences)
    x64 = x.double()
    b, h = 0.8, 1e-4
    s = softcal.temperature_stats(x64, t, b).cpu()
    sp = softcal.temperature_stats(x64, t, b + h).cpu()
    sm = softcal.temperature_stats(x64, t, b - h).cpu()
    assert abs((sp[0] - sm[0]) / (2 * h) - s[1]) < 1e-5 * abs(s[1]) + 1e-6
    assert abs((sp[1] - sm[1]) / (2 * h) - s[2]) < 1e-5 * abs(s[2]) + 1e-6


# --------------------------------------------------------------------------- bad input

def _err(exc, match, fn, *a, **k):
    with pytest.raises(exc, match=match):
        r = fn(*a, **k)
        if isinstance(r, torch.Tensor) and r.device.type == "cuda":
            torch.cuda.synchronize()


def test_errors_name_argument_and_value(device):
    x = torch.randn(4, 3, device=device)
    t = torch.tensor([0, 1, 2, 1], device=device)
    ce = softcal.cross_entropy
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        _err(ValueError, r"temperature must be a finite number > 0, got", ce, x, t, temperature=bad)
    if device.type == "cpu":  # a CPU tensor's value is checked (on CUDA the kernel reads it)
        _err(ValueError, r"temperature must be a finite number > 0, got -2", ce, x, t,
             temperature=torch.tensor(-2.0))
    _err(TypeError, r"temperature must be a float or a 0-dim tensor, got str", ce, x, t, temperature="2")
    _err(ValueError, r"temperature tensor must have exactly one element .* got shape \(2,\)", ce, x, t,
         temperature=torch.ones(2, device=device))
    for bad in (-0.1, 1.5):
        _err(ValueError, rf"label_smoothing must be in \[0, 1\], got {bad}", ce, x, t, label_smoothing=bad)
    _err(ValueError, r"reduction must be one of 'mean', 'sum', 'none', got 'avg'", ce, x, t, reduction="avg")
    _err(TypeError, r"target must be an integer tensor .* got dtype torch.float32", ce, x, t.float())
    _err(ValueError, r"target has shape \(3,\) but logits of shape \(4, 3\)", ce, x, t[:3])
    _err(ValueError, r"weight has shape \(2,\) but logits has 3 classes", ce, x, t,
         weight=torch.ones(2, device=device))
    _err(TypeError, r"weight must be a floating tensor, got dtype torch.int64", ce, x, t,
         weight=torch.ones(3, dtype=torch.int64, device=device))
    _err(TypeError, r"logits must be float16, bfloat16, float32 or float64, got dtype torch.int64",
         ce, torch.ones(4, 3, dtype=torch.long, device=device), t)
    _err(ValueError, r"inplace=True needs fused=True", ce, x, t, inplace=True)
    _err(NotImplementedError, r"gradient with respect to weight", ce, x, t,
         weight=torch.ones(3, device=device, requires_grad=True))
    if device.type == "cpu" and EMULATE_CUDA:  # the CUDA kernels check on the device
        for bad_t, fused in (([0, 3, 1, 1], False), ([0, 1, -5, 1], False), ([7, 1, 1, 1], True)):
            _err(RuntimeError, r"device-side assert triggered.*target out of range", ce, x,
                 torch.tensor(bad_t), fused=fused)
    elif device.type == "cpu":
        _err(RuntimeError, r"target\[1\] = 3 is out of range for 3 classes", ce, x,
             torch.tensor([0, 3, 1, 1]))
        _err(RuntimeError, r"target\[2\] = -5 is out of range", ce, x, torch.tensor([0, 1, -5, 1]))
        _err(RuntimeError, r"target\[0\] = 7 is out of range", ce, x, torch.tensor([7, 1, 1, 1]),
             fused=True)


def test_device_mismatch_errors():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU: logits and target on different devices")
    x = torch.randn(4, 3, device="cuda")
    t = torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"target is on cpu but logits is on cuda"):
        softcal.cross_entropy(x, t)
    with pytest.raises(ValueError, match=r"weight is on cpu but logits is on cuda"):
        softcal.cross_entropy(x, t.cuda(), weight=torch.ones(3))
    with pytest.raises(ValueError, match=r"temperature is on cpu but logits is on cuda"):
        softcal.cross_entropy(x, t.cuda(), temperature=torch.tensor(2.0))


def test_softmax_errors(device):
    x = torch.randn(3, 4, device=device)
    with pytest.raises(IndexError, match="dim 2 is out of range"):
        softcal.softmax(x, 1.0, dim=2)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got -1"):
        softcal.log_softmax(x, -1.0)
    with pytest.raises(TypeError, match="input must be float16"):
        softcal.softmax(torch.ones(3, dtype=torch.long, device=device))


# --------------------------------------------------------------------------- the module

def test_label_smoothing_loss_is_drop_in(device):
    x, t, w = make_case(12, 8, torch.float64, device, weighted=True)
    ours = softcal.nn.LabelSmoothingLoss(smoothing=0.2, weight=w, reduction="sum")
    theirs = torch.nn.CrossEntropyLoss(label_smoothing=0.2, weight=w, reduction="sum")
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    assert "smoothing=0.2" in repr(ours)
    sd = ours.state_dict()
    assert torch.equal(sd["weight"], w)
    with_t = softcal.nn.LabelSmoothingLoss(smoothing=0.1, temperature=2.0)
    torch.testing.assert_close(with_t(x, t), F.cross_entropy(x / 2.0, t, label_smoothing=0.1))


def test_label_smoothing_loss_training_loop_matches_pytorch(device):
    torch.manual_seed(0)
    data = torch.randn(64, 10, device=device)
    labels = torch.randint(0, 5, (64,), device=device)
    models = []
    for loss_fn in (softcal.nn.LabelSmoothingLoss(0.1),
                    softcal.nn.LabelSmoothingLoss(0.1, fused=True, inplace=True),
                    torch.nn.CrossEntropyLoss(label_smoothing=0.1)):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(20):
            opt.zero_grad()
            loss_fn(model(data), labels).backward()
            opt.step()
        models.append(model)
    for m in models[:2]:
        for p, q in zip(m.parameters(), models[2].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_label_smoothing_loss_validates_in_init():
    with pytest.raises(ValueError, match=r"smoothing must be in \[0, 1\], got 2"):
        softcal.nn.LabelSmoothingLoss(smoothing=2)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        softcal.nn.LabelSmoothingLoss(temperature=0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        softcal.nn.LabelSmoothingLoss(reduction="batchmean")
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        softcal.nn.LabelSmoothingLoss(ignore_index=1.5)
    with pytest.raises(ValueError, match="inplace=True needs fused=True"):
        softcal.nn.LabelSmoothingLoss(inplace=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_row_max_in_a_later_chunk(device, dtype):
    """Long rows are walked in chunks: a chunk whose max jumps far above the running max (its
    exps relative to the old max would overflow), rows whose only finite values come late, and
    (the float32 CPU kernel walks later chunks online, relative to the running max) the max tied
    across chunks, a later chunk's max equal to the running max, logits shifted by 1000."""
    C = 9000
    x = torch.randn(9, C, dtype=torch.float64)
    x[6, 10] = x[6, 8000] = 30.0            # the max twice, in the first and the fourth chunk
    x[7, 3000] = 20.0
    x[7, 2047] = 20.0                        # ... in the first chunk's last element and later
    x[8] += 1000.0
    x[0, 7000] = 500.0        # jump of 500 / T after 3 chunks
    x[1, 2100] = 95.0         # jump just above the 80 / beta threshold at T = 1
    x[1, 5000] = 190.0
    x[2, :4100] = -math.inf   # first finite values in the third chunk
    x[3, 1:] = -math.inf      # a single finite value
    x[4] = torch.linspace(-50, 50, C)  # the max grows in every chunk
    x[5, 8999] = 60.0
    t = torch.tensor([7000, 5000, 4100, 0, 8999, 3, 8000, 2047, 5])
    x = x.to(dtype).to(device)
    for T in (0.5, 1.0, 4.0):
        for eps in (0.0, 0.1):
            check_against_reference(x, t.to(device), None, T, eps, "none")
