"""Class weights of inf for classes absent from the batch (weight = 1 / bincount, issue 18 item 9).

PyTorch's loss and gradient without smoothing are finite there: the weight of a class enters
only through rows whose target it is. With smoothing every weight enters (the smoothing term is
-(eps / C) sum_c w_c log p_c), and PyTorch gives inf and NaN: softcal gives the same values
(except on ignored rows, whose gradient is 0, where PyTorch's autograd makes NaN of 0 * inf), in
the plain, fused, fused in-place and module forms, on the tile path (C <= 32) and the row path.
"""
import pytest
import torch
import torch.nn.functional as F

import softcal


def _case(n, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64).to(dtype)
    present = torch.arange(0, c, 2)  # every other class never appears as a target
    t = present[torch.randperm(n, generator=g) % len(present)]  # each present class once at least
    t[n - 1] = -100
    w = 1.0 / torch.bincount(t[t >= 0], minlength=c).to(dtype)
    assert torch.isinf(w).sum() == c // 2
    return x, t, w


def _forms(x, t, w, T, eps, reduction):
    """(loss, dL/dx, dL/dT) of each form; the first is PyTorch's."""
    def run(fn, inplace=False):
        xi = x.clone().requires_grad_()
        Ti = T.clone().requires_grad_()
        src = xi * 1 if inplace else xi  # the in-place form needs a non-leaf to write into
        loss = fn(src, Ti)
        loss.sum().backward()
        return loss.detach(), xi.grad, Ti.grad

    kw = dict(weight=w, label_smoothing=eps, reduction=reduction)
    return {
        "torch": run(lambda a, T: F.cross_entropy(a / T, t, **kw)),
        "plain": run(lambda a, T: softcal.cross_entropy(a, t, temperature=T, **kw)),
        "fused": run(lambda a, T: softcal.cross_entropy(a, t, temperature=T, fused=True, **kw)),
        "inplace": run(lambda a, T: softcal.cross_entropy(a, t, temperature=T, fused=True,
                                                          inplace=True, **kw), inplace=True),
        # the module takes a float temperature (T's value): no dL/dT
        "module": run(lambda a, T: softcal.nn.CrossEntropyLoss(temperature=T.item(), **kw)(a, t)),
        "module_fused": run(lambda a, T: softcal.nn.CrossEntropyLoss(
            temperature=T.item(), fused=True, **kw)(a, t)),
    }


@pytest.mark.parametrize("c", [6, 50])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_infinite_weight_of_an_absent_class(c, eps, reduction):
    x, t, w = _case(40, c, torch.float64, seed=c)
    T = torch.tensor(1.3, dtype=torch.float64)
    forms = _forms(x, t, w, T, eps, reduction)
    ref_loss, ref_gx, ref_gT = forms.pop("torch")
    if eps == 0:
        assert torch.isfinite(ref_gx).all() and torch.isfinite(ref_gT)
    for name, (loss, gx, gT) in forms.items():
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12, equal_nan=True,
                                   msg=f"{name}: loss")
        # with smoothing, PyTorch's gradient of an ignored row is NaN (0 * inf in its autograd of
        # the masked smoothing term); softcal's is 0 there, as for every ignored row
        rows = slice(None) if eps == 0 else t != -100
        if eps > 0:
            assert (gx[t == -100] == 0).all() and torch.isnan(ref_gx[t == -100]).any()
        torch.testing.assert_close(gx[rows], ref_gx[rows], rtol=1e-10, atol=1e-12, equal_nan=True,
                                   msg=lambda m: f"{name}: dL/dx: {m}")
        if not name.startswith("module"):
            torch.testing.assert_close(gT, ref_gT, rtol=1e-10, atol=1e-12, equal_nan=True,
                                       msg=lambda m: f"{name}: dL/dT: {m}")


@pytest.mark.parametrize("c", [6, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_infinite_weight_finite_gradients_in_low_precision(c, dtype):
    """float32 / bfloat16 logits (the kernels' float paths): every gradient finite without
    smoothing, close to PyTorch's float64 one."""
    x, t, w = _case(64, c, dtype, seed=7)
    for fused in (False, True):
        xi = x.clone().requires_grad_()
        softcal.cross_entropy(xi, t, weight=w, fused=fused).backward()
        assert torch.isfinite(xi.grad).all(), fused
        xd = x.double().requires_grad_()
        F.cross_entropy(xd, t, weight=w.double()).backward()
        torch.testing.assert_close(xi.grad.double(), xd.grad, rtol=2e-2, atol=2e-3)
