"""The LM head's custom ops and module (issue 19, items 2 and 5): torch.library.opcheck on
softcal::linear_cross_entropy and its backward, torch.compile(fullgraph=True) of a training step,
and softcal.nn.LinearCrossEntropyLoss against torch.nn.LinearCrossEntropyLoss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import softcal
from conftest import rel_err
from lm_head_cases import OPTIONS, composition, make_problem

ops = torch.ops.softcal


def _op_args(prob, dtype, reduction, *, return_lse=False, need=(True, True, True, True),
             workspace_bytes=None):
    x = prob["x"].to(dtype).reshape(-1, prob["x"].shape[-1]).clone().requires_grad_(need[0])
    W = prob["W"].to(dtype).clone().requires_grad_(need[1])
    b = prob["b"].to(dtype).clone().requires_grad_(need[2]) if prob["b"] is not None else None
    w = prob["w"].to(dtype) if prob["w"] is not None else None
    T = prob["T"]
    temp_t = None
    if isinstance(T, torch.Tensor):
        temp_t = T.to(torch.float64 if dtype == torch.float64 else torch.float32).clone()
        temp_t.requires_grad_(need[3])
    temp_f = 1.0 if temp_t is not None else float(T)
    red = {"none": 0, "mean": 1, "sum": 2}[reduction]
    V = W.shape[0]
    ws = workspace_bytes or 3 * V * 8
    return (x, W, b, prob["t"].reshape(-1), w, temp_t, temp_f, prob["eps"], -100, red,
            prob["z_loss"], prob["softcap"] or 0.0, return_lse, ws, *need)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["plain", "smooth_weight_bias", "temperature_tensor",
                                  "everything"])
def test_opcheck_forward(case, reduction):
    prob = make_problem((11,), 5, 13, torch.float64, opts=OPTIONS[case], ignore_first=4)
    for return_lse in (False, True):
        torch.library.opcheck(ops.linear_cross_entropy.default,
                              _op_args(prob, torch.float64, reduction, return_lse=return_lse))
    # frozen weight, no gradients at all
    torch.library.opcheck(ops.linear_cross_entropy.default,
                          _op_args(prob, torch.float32, reduction,
                                   need=(True, False, False, False)))
    torch.library.opcheck(ops.linear_cross_entropy.default,
                          _op_args(prob, torch.float32, reduction,
                                   need=(False, False, False, False)))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck_backward(reduction):
    prob = make_problem((9,), 4, 10, torch.float64, opts=OPTIONS["everything"])
    args = _op_args(prob, torch.float64, reduction)
    x, W, b, t, w, temp_t = args[:6]
    grad_loss = torch.randn(9, dtype=torch.float64) if reduction == "none" else \
        torch.tensor(0.5, dtype=torch.float64)
    for grad_lse in (None, torch.randn(9, dtype=torch.float64)):
        torch.library.opcheck(
            ops.linear_cross_entropy_backward.default,
            (grad_loss, grad_lse, x.detach(), W.detach(), b.detach(), t, w, temp_t.detach(),
             *args[6:12], args[13], True, True, True, True))


def test_fake_shapes_and_dtypes():
    """The fake kernel's outputs match the real ones (meta tensors), for bfloat16 input."""
    prob = make_problem((6,), 4, 7, torch.float64, opts=OPTIONS["everything"])
    args = list(_op_args(prob, torch.bfloat16, "none", return_lse=True))
    real = ops.linear_cross_entropy(*args)
    meta = [a.detach().to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    fake = ops.linear_cross_entropy(*meta)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype


def _train_step_factory(head_kwargs):
    def step(x, W, b, T, t, w):
        h = torch.tanh(x)  # an op before the head, so that its backward runs through the graph
        loss, lse = softcal.linear_cross_entropy(h, W, t, linear_bias=b, weight=w,
                                                 temperature=T, return_lse=True, **head_kwargs)
        return loss + 1e-3 * lse.square().mean()
    return step


@pytest.mark.parametrize("head_kwargs", [
    dict(label_smoothing=0.1, workspace_bytes=4 * 23 * 4),
    dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, reduction="sum"),
])
def test_torch_compile_fullgraph_training_step(head_kwargs):
    """A training step (forward, loss, backward) traced whole by torch.compile; the same
    values and gradients as eager."""
    torch._dynamo.reset()
    prob = make_problem((2, 7), 6, 23, torch.float32, opts=dict(weighted=True, bias=True))
    step = _train_step_factory(head_kwargs)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")

    def run(fn):
        x = prob["x"].float().requires_grad_()
        W = prob["W"].float().requires_grad_()
        b = prob["b"].float().requires_grad_()
        T = torch.tensor(1.3, requires_grad=True)
        loss = fn(x, W, b, T, prob["t"], prob["w"].float())
        loss.backward()
        return [loss.detach(), x.grad, W.grad, b.grad, T.grad]

    for a, e in zip(run(compiled), run(step)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_torch_compile_inductor():
    torch._dynamo.reset()
    prob = make_problem((16,), 8, 40, torch.float32, opts={})
    f = torch.compile(lambda x, W, t: softcal.linear_cross_entropy(torch.tanh(x), W, t,
                                                                   label_smoothing=0.1),
                      fullgraph=True)
    xa = prob["x"].float().requires_grad_()
    Wa = prob["W"].float().requires_grad_()
    la = f(xa, Wa, prob["t"])
    la.backward()
    xb = prob["x"].float().requires_grad_()
    Wb = prob["W"].float().requires_grad_()
    lb = F.cross_entropy(F.linear(torch.tanh(xb), Wb), prob["t"], label_smoothing=0.1)
    lb.backward()
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(Wa.grad, Wb.grad)


# ---------------------------------------------------------------------- the module
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_matches_torch_module(bias, reduction):
    """softcal.nn.LinearCrossEntropyLoss with torch.nn.LinearCrossEntropyLoss's arguments: the
    same parameters (names, shapes, initialisation order), loss and gradients."""
    if not hasattr(torch.nn, "LinearCrossEntropyLoss"):
        pytest.skip("torch.nn.LinearCrossEntropyLoss needs torch >= 2.12")
    cw = torch.rand(17, dtype=torch.float64) + 0.5
    kw = dict(bias=bias, dtype=torch.float64, reduction=reduction, weight=cw, ignore_index=3,
              label_smoothing=0.05)
    torch.manual_seed(0)
    theirs = torch.nn.LinearCrossEntropyLoss(8, 17, **kw)
    torch.manual_seed(0)
    ours = softcal.nn.LinearCrossEntropyLoss(8, 17, **kw)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert set(ours.state_dict()) == set(theirs.state_dict())
    for (_, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(p, q)  # the same initialisation
    x = torch.randn(20, 8, dtype=torch.float64)  # torch's module takes (N, in_features) only
    t = torch.randint(0, 17, (20,))
    t[:3] = 3
    la, lb = ours(x, t), theirs(x, t)
    # ours also takes (..., in_features)
    l3 = ours(x.reshape(4, 5, 8), t.reshape(4, 5))
    torch.testing.assert_close(l3, la.reshape(4, 5) if reduction == "none" else la)
    assert la.shape == lb.shape
    assert rel_err(la, lb) <= 1e-12
    up = torch.randn(la.shape, dtype=torch.float64) if reduction == "none" else None
    la.backward(up)
    lb.backward(up)
    for (_, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-12


def test_module_extras_and_repr():
    torch.manual_seed(1)
    m = softcal.nn.LinearCrossEntropyLoss(6, 9, bias=True, dtype=torch.float64, temperature=1.5,
                                          z_loss=1e-2, softcap=3.0, label_smoothing=0.1)
    x = torch.randn(12, 6, dtype=torch.float64)
    t = torch.randint(0, 9, (12,))
    ref, _ = composition(x, m.linear.weight, t, b=m.linear.bias, eps=0.1, T=1.5, z_loss=1e-2,
                         softcap=3.0)
    assert rel_err(m(x, t), ref) <= 1e-12
    r = repr(m)
    assert "z_loss=0.01" in r and "softcap=3.0" in r and "temperature=1.5" in r


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(out_features=(2,)), ValueError, "out_features must be \\(\\)"),
    (dict(options=object()), ValueError, "options"),
    (dict(weight=torch.rand(4)), ValueError, "class weights"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(temperature=torch.tensor(1.0)), TypeError, "temperature must be a float here"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(softcap=-2.0), ValueError, "softcap"),
    (dict(label_smoothing=2.0), ValueError, "label_smoothing"),
])
def test_module_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        softcal.nn.LinearCrossEntropyLoss(4, 9, **kwargs)


# ---------------------------------------------------------------------- CUDA (a GPU machine)
def _cuda_errors(prob, reduction, dtype):
    """Relative errors against the float64 composition on the CPU: eager's and ours on CUDA."""
    def run(dev, dt, ours):
        x = prob["x"].to(dev, dt).requires_grad_()
        W = prob["W"].to(dev, dt).requires_grad_()
        b = prob["b"].to(dev, dt).requires_grad_() if prob["b"] is not None else None
        w = prob["w"].to(dev, dt) if prob["w"] is not None else None
        T = prob["T"]
        if isinstance(T, torch.Tensor):
            T = T.to(dev, torch.float64 if dt == torch.float64 else torch.float32)
            T.requires_grad_()
        t = prob["t"].to(dev)
        if ours:
            out = softcal.linear_cross_entropy(
                x, W, t, linear_bias=b, weight=w, reduction=reduction,
                label_smoothing=prob["eps"], temperature=T, z_loss=prob["z_loss"],
                softcap=prob["softcap"], workspace_bytes=64 * W.shape[0] * 4)
        else:
            out, _ = composition(x, W, t, b=b, w=w, reduction=reduction, eps=prob["eps"], T=T,
                                 z_loss=prob["z_loss"], softcap=prob["softcap"])
        up = torch.randn(out.shape, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64).to(dev, out.dtype)
        lv = [v for v in (x, W, b, T) if isinstance(v, torch.Tensor) and v.requires_grad]
        return [out] + list(torch.autograd.grad(out, lv, up))

    ref = run("cpu", torch.float64, False)
    eager = run("cuda", dtype, False)
    ours = run("cuda", dtype, True)
    return [rel_err(e, r) for e, r in zip(eager, ref)], [rel_err(o, r) for o, r in zip(ours, ref)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", ["plain", "everything"])
def test_cuda_lm_head_no_worse_than_eager(case, reduction, dtype):
    """On the GPU (CUDA kernels; the float32 dW of bfloat16 by addmm out_dtype): errors against
    float64 within 1.25 x eager PyTorch's on the same GPU (root-mean-square over 3 problems)."""
    eager, ours = [], []
    for seed in range(3):
        prob = make_problem((300,), 64, 1000, dtype, opts=OPTIONS[case], seed=seed)
        e, o = _cuda_errors(prob, reduction, dtype)
        eager.append(e)
        ours.append(o)
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    for k in range(len(eager[0])):
        rms_e = (sum(r[k] ** 2 for r in eager) / 3) ** 0.5
        rms_o = (sum(r[k] ** 2 for r in ours) / 3) ** 0.5
        assert rms_o <= max(1.25 * rms_e, floor), (k, rms_o, rms_e)
