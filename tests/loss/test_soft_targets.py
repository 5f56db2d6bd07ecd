"""Class-probability (soft) targets: softcal.cross_entropy(logits, probs) with probs of the
logits' shape, as F.cross_entropy accepts them (mixup / CutMix, distillation).

Oracles: softcal.reference.soft_cross_entropy in float64 (itself checked against
F.cross_entropy) and F.cross_entropy / timm's SoftTargetCrossEntropy formula in float64.
Every test runs on the CPU kernels, under SOFTCAL_EMULATE_CUDA=1 on the CUDA kernels' code, and
on CUDA where a GPU is visible.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F

import softcal
from softcal import reference
from conftest import EMULATE_CUDA, TOL, rel_err

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["mean", "sum", "none"]
INF = float("inf")


def make_soft_case(shape, dtype, device, *, weighted=False, seed=0, scale=3.0, peaked=False):
    """logits of `shape` (classes in dim 1, or dim 0 for 1-D), a target of rows summing to 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    cdim = 0 if len(shape) == 1 else 1
    t = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64) * (4.0 if peaked else 1.0),
                      dim=cdim)
    w = None
    if weighted:
        w = (torch.rand(shape[cdim], generator=g, dtype=torch.float64) + 0.1).to(dtype).to(device)
    return x.to(dtype).to(device), t.to(dtype).to(device), w


def ref_soft(x, t, w, temp, eps, reduction, grad_out):
    """float64 reference on the CPU: loss and the gradients of x, t and a tensor T."""
    x64 = x.detach().double().cpu().requires_grad_()
    t64 = t.detach().double().cpu().requires_grad_()
    w64 = None if w is None else w.double().cpu()
    T64 = temp.detach().double().cpu().requires_grad_() if isinstance(temp, torch.Tensor) else temp
    loss = reference.soft_cross_entropy(x64, t64, temperature=T64, label_smoothing=eps, weight=w64,
                                        reduction=reduction)
    inputs = (x64, t64) + ((T64,) if isinstance(T64, torch.Tensor) else ())
    grads = torch.autograd.grad(loss, inputs, grad_out.double().cpu(), allow_unused=True)
    grads = [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]
    return loss.detach(), grads


def check_soft(x, t, w, temp, eps, reduction):
    """softcal's loss and gradients (x, t, T) against the float64 reference, dtype tolerances."""
    dtype = x.dtype
    tol = TOL[dtype]
    xin = x.detach().clone().requires_grad_()
    tin = t.detach().clone().requires_grad_()
    loss = softcal.cross_entropy(xin, tin, temperature=temp, label_smoothing=eps, weight=w,
                                 reduction=reduction)
    assert loss.dtype == dtype and loss.device == x.device
    g = torch.Generator().manual_seed(1)
    # the upstream gradient in the tested dtype; the reference gets the same (rounded) values
    grad_out = (torch.randn(loss.shape, generator=g, dtype=torch.float64) if reduction == "none"
                else torch.tensor(1.3, dtype=torch.float64)).to(dtype)
    rl, rg = ref_soft(x, t, w, temp, eps, reduction, grad_out)
    assert loss.shape == rl.shape
    inputs = (xin, tin) + ((temp,) if isinstance(temp, torch.Tensor) else ())
    grads = torch.autograd.grad(loss, inputs, grad_out.to(x.device))
    torch.testing.assert_close(loss.double().cpu(), rl, rtol=tol["rtol"], atol=tol["atol"],
                               equal_nan=True)
    for name, got, want in zip(("logits", "target"), grads[:2], rg[:2]):
        assert got.dtype == dtype and got.shape == x.shape, name
        err = rel_err(got, want)
        assert err <= tol["grad"], f"{name} grad rel err {err}"
    if isinstance(temp, torch.Tensor):
        # dL/dT sums signed terms: bound its error by the size of the terms (one rounding each)
        xd = x.detach().double().cpu()
        scale = (rg[0].abs() * torch.where(torch.isfinite(xd), xd.abs(), 0)).sum().item() / abs(temp.item())
        # (returned in the temperature's dtype: its rounding counts too)
        tol_t = max(tol["grad"], TOL[temp.dtype]["grad"])
        assert grads[2].dtype == temp.dtype
        assert abs(grads[2].item() - rg[2].item()) <= tol_t * scale + 1e-12, (grads[2], rg[2])
    return loss, grads


# --------------------------------------------------------------------------- the oracle itself

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(11, 7), (3, 5, 4, 2), (6,)], ids=str)
def test_reference_matches_torch(reduction, eps, weighted, shape):
    x, t, w = make_soft_case(shape, torch.float64, "cpu", weighted=weighted, seed=len(shape))
    x.requires_grad_()
    t.requires_grad_()
    T = torch.tensor(1.9, dtype=torch.float64, requires_grad=True)
    got = reference.soft_cross_entropy(x, t, temperature=T, label_smoothing=eps, weight=w,
                                       reduction=reduction)
    want = F.cross_entropy(x / T, t, weight=w, label_smoothing=eps, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    go = torch.randn(want.shape, dtype=torch.float64)
    inputs = (x, t, T) if eps < 1 else (x, T)
    for a, b in zip(torch.autograd.grad(got, inputs, go), torch.autograd.grad(want, inputs, go)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- the kernels ran

def test_soft_ops_are_used_on_every_backend():
    for op in ("soft_target_fwd", "soft_target_bwd"):
        assert op in softcal._ops.OPS
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"softcal::{op}", "CPU"), op
    x = torch.randn(8, 5, requires_grad=True)
    t = torch.softmax(torch.randn(8, 5), 1).requires_grad_()
    with torch.profiler.profile() as prof:
        softcal.cross_entropy(x, t, temperature=2.0).backward()
    names = {e.name for e in prof.events()}
    assert "softcal::soft_target_fwd" in names and "softcal::soft_target_bwd" in names, sorted(names)[:20]


# --------------------------------------------------------------------------- parity

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("temp", [1.0, 0.6, "tensor"])
def test_parity_matrix(device, dtype, reduction, eps, weighted, temp):
    x, t, w = make_soft_case((13, 37), dtype, device, weighted=weighted,
                             seed=hash((reduction, eps, weighted)) % 1000)
    assert x.dtype == dtype and t.dtype == dtype and (w is None or w.dtype == dtype)
    T = torch.tensor(1.7, dtype=torch.float64, device=device, requires_grad=True) if temp == "tensor" else temp
    check_soft(x, t, w, T, eps, reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [1, 2, 3, 9, 1000, 2500])
@pytest.mark.parametrize("n", [0, 1, 5])
def test_shapes(device, dtype, c, n):
    x, t, w = make_soft_case((n, c), dtype, device, weighted=True, seed=c + n, peaked=True)
    T = torch.tensor(1.3, dtype=torch.float32, device=device, requires_grad=True)
    for reduction in ("mean", "none"):
        check_soft(x, t, w, T, 0.1, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_k_dimensional_and_unbatched(device, reduction):
    for shape in ((3, 5, 4, 2), (2, 7, 3), (1, 5, 4, 4, 2), (6,)):
        x, t, w = make_soft_case(shape, torch.float64, device, weighted=True, seed=len(shape))
        T = torch.tensor(0.8, dtype=torch.float64, device=device, requires_grad=True)
        loss, _ = check_soft(x, t, w, T, 0.1, reduction)
        want = F.cross_entropy(x / 0.8, t, weight=w, label_smoothing=0.1, reduction=reduction)
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
        if reduction == "none":
            assert loss.shape == want.shape


def test_mean_divides_by_rows_not_weights(device):
    x, t, w = make_soft_case((4, 6, 3), torch.float64, device, weighted=True)
    mean = softcal.cross_entropy(x, t, weight=w)
    total = softcal.cross_entropy(x, t, weight=w, reduction="sum")
    torch.testing.assert_close(mean, total / 12, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layouts(device, dtype):
    """Row-strided, transposed, channels-last and misaligned (offset) views of both inputs: the
    CUDA kernels then read the target by scalars (another alignment than the logits')."""
    g = torch.Generator().manual_seed(3)
    base_x = torch.randn(9, 41, generator=g, dtype=torch.float64).to(dtype).to(device)
    base_t = torch.softmax(torch.randn(9, 42, generator=g, dtype=torch.float64), 1).to(dtype).to(device)
    cases = [
        (base_x[:, 1:], base_t[:, 1:41]),            # unaligned rows, row stride 41 / 42
        (base_x[::2, :40], base_t[::2, 2:42]),        # every other row, different offsets
        (base_x.t().contiguous().t(), base_t[:, :41]),  # class stride 9: copied once
        (base_x, base_t[:, :41].t().contiguous().t()),
    ]
    xk = torch.randn(2, 5, 3, 3, generator=g, dtype=torch.float64).to(dtype).to(device)
    tk = torch.softmax(torch.randn(2, 5, 3, 3, generator=g, dtype=torch.float64), 1).to(dtype).to(device)
    cases.append((xk.contiguous(memory_format=torch.channels_last), tk))
    cases.append((xk, tk.contiguous(memory_format=torch.channels_last)))
    cases.append((torch.randn(5, generator=g, dtype=torch.float64).to(dtype).to(device).expand(4, 5),
                  base_t[:4, :5]))
    for x, t in cases:
        check_soft(x, t, None, 1.4, 0.05, "none")
        check_soft(x, t, None, 1.4, 0.0, "mean")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_logits_shift_invariance(device, dtype):
    """logits + 1000 (and 1e4 in float32/float64): the loss is the same; at least as accurate as
    PyTorch in the same dtype (log p is formed as beta (x - m) - ls)."""
    x, t, _ = make_soft_case((6, 50), torch.float64, "cpu", seed=4)
    shift = 1000.0 if dtype in (torch.float16, torch.bfloat16) else 1e4
    xs = (x + shift).to(dtype)
    want = F.cross_entropy(xs.double() / 1.3, t, reduction="none")
    got = softcal.cross_entropy(xs.to(device), t.to(dtype).to(device), temperature=1.3,
                                reduction="none")
    theirs = F.cross_entropy(xs / 1.3, t.to(dtype), reduction="none") if dtype != torch.float16 else None
    err = (got.double().cpu() - want).abs().max().item()
    bound = TOL[dtype]["rtol"] * want.abs().max().item() + TOL[dtype]["atol"]
    if theirs is not None:
        bound = max(bound, (theirs.double() - want).abs().max().item())
    assert err <= bound, (err, bound)
    # the target gradient is -log p: formed as beta (x - m) - ls, it keeps its digits at 1e4
    tin = t.to(dtype).to(device).requires_grad_()
    (gt,) = torch.autograd.grad(softcal.cross_entropy(xs.to(device), tin, temperature=1.3,
                                                      reduction="sum"), tin)
    want_gt = -torch.log_softmax(xs.double() / 1.3, 1)
    assert rel_err(gt, want_gt) <= TOL[dtype]["grad"]


def test_deterministic_across_thread_counts():
    x, t, w = make_soft_case((3000, 17), torch.float32, "cpu", weighted=True, seed=5)
    T = torch.tensor(1.2, requires_grad=True)
    out = []
    old = torch.get_num_threads()
    try:
        for n in (1, max(2, old)):
            torch.set_num_threads(n)
            xin = x.clone().requires_grad_()
            tin = t.clone().requires_grad_()
            loss = softcal.cross_entropy(xin, tin, temperature=T, weight=w, label_smoothing=0.1)
            out.append((loss, *torch.autograd.grad(loss, (xin, tin, T))))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*out):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck_logits_target_temperature(device, reduction, eps, weighted):
    x, t, w = make_soft_case((3, 5, 2), torch.float64, device, weighted=weighted, seed=7)
    x.requires_grad_()
    t.requires_grad_()
    T = torch.tensor(1.3, dtype=torch.float64, device=device, requires_grad=True)

    def f(x, t, T):
        return softcal.cross_entropy(x, t, temperature=T, label_smoothing=eps, weight=w,
                                     reduction=reduction)

    assert torch.autograd.gradcheck(f, (x, t, T), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradgradcheck(device, reduction):
    """Double backward (gradient penalties, Hessian-vector products): the backward's own graph is
    recorded through the differentiable reference, never silently dropped."""
    x, t, w = make_soft_case((3, 4), torch.float64, device, weighted=True, seed=8)
    x.requires_grad_()
    t.requires_grad_()
    T = torch.tensor(0.9, dtype=torch.float64, device=device, requires_grad=True)

    def f(x, t, T):
        return softcal.cross_entropy(x, t, temperature=T, label_smoothing=0.1, weight=w,
                                     reduction=reduction)

    assert torch.autograd.gradgradcheck(f, (x, t, T), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_target_gradient_is_pytorchs(device):
    """dL/dt_c = -(1 - eps) w_c log p_c times the upstream gradient."""
    x, t, w = make_soft_case((4, 6), torch.float64, device, weighted=True, seed=9)
    t.requires_grad_()
    loss = softcal.cross_entropy(x, t, temperature=2.0, label_smoothing=0.3, weight=w, reduction="sum")
    (gt,) = torch.autograd.grad(loss, t, torch.tensor(0.7, dtype=torch.float64, device=device))
    want = -0.7 * 0.7 * w * torch.log_softmax(x / 2.0, 1)
    torch.testing.assert_close(gt, want, rtol=1e-12, atol=1e-14)


def test_only_requested_gradients_are_computed(device):
    x, t, _ = make_soft_case((4, 6), torch.float32, device)
    loss, lse, mass = torch.ops.softcal.soft_target_fwd(x, t, None, None, 1.0, 0.0, 1)
    assert lse.shape == (4, 2) and mass.shape == (4,)
    torch.testing.assert_close(mass, torch.ones(4, device=device))  # rows of t sum to 1
    g = torch.ones((), device=device)
    gx, gt, gT = torch.ops.softcal.soft_target_bwd(g, x, t, None, lse, mass, None, 1.0, 0.0, 1,
                                                  True, False, False)
    assert gx.shape == (4, 6) and gt.shape == (0,) and gT.item() == 0
    gx, gt, _ = torch.ops.softcal.soft_target_bwd(g, x, t, None, lse, mass, None, 1.0, 0.0, 1,
                                                False, True, False)
    assert gx.shape == (0,) and gt.shape == (4, 6)
    # the autograd path asks only for what is needed: a target without requires_grad is fine
    xin = x.clone().requires_grad_()
    softcal.cross_entropy(xin, t).backward()
    assert xin.grad is not None and torch.isfinite(xin.grad).all()


def _opcheck_cases(device):
    x, t, w = make_soft_case((5, 7), torch.float32, device, weighted=True, seed=10)
    xs = torch.randn(6, 9, device=device)[:, 1:8]  # row stride 9
    T = torch.tensor(1.5, device=device)
    return [
        (x, t, None, None, 1.0, 0.0, 1),
        (x, t, w, T, 1.0, 0.1, 0),
        (xs[:5], t, w, None, 0.7, 0.2, 2),
        (x.double(), t.double(), None, T.double(), 1.0, 0.0, 0),
    ]


def test_opcheck(device):
    for args in _opcheck_cases(device):
        torch.library.opcheck(torch.ops.softcal.soft_target_fwd.default, args)
        # with inputs that require grad: the autograd registration and the backward op
        torch.library.opcheck(torch.ops.softcal.soft_target_fwd.default,
                              (args[0].clone().requires_grad_(), args[1].clone().requires_grad_())
                              + args[2:])
        loss, lse, mass = torch.ops.softcal.soft_target_fwd(*args)
        x, t, w, T, temp, eps, red = args
        g = torch.randn(loss.shape, device=device, dtype=loss.dtype)
        torch.library.opcheck(torch.ops.softcal.soft_target_bwd.default,
                              (g, x, t, w, lse, mass, T, temp, eps, red, True, True, T is not None))


def test_torch_compile_fullgraph(device):
    """The soft-target path traces without a graph break, and the compiled op's backward is the
    kernel's (aot_eager: the registered autograd and fake kernels)."""
    torch._dynamo.reset()
    x, t, w = make_soft_case((8, 16), torch.float32, device, weighted=True, seed=14)

    def step(x_, t_, T_):
        return softcal.cross_entropy(x_, t_, temperature=T_, label_smoothing=0.1, weight=w)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ins_a = [x.clone().requires_grad_(), t.clone().requires_grad_(),
             torch.tensor(1.5, device=device, requires_grad=True)]
    ins_b = [v.detach().clone().requires_grad_() for v in ins_a]
    la, lb = compiled(*ins_a), step(*ins_b)
    torch.testing.assert_close(la, lb)
    la.backward()
    lb.backward()
    for a, b in zip(ins_a, ins_b):
        torch.testing.assert_close(a.grad, b.grad)


# --------------------------------------------------------------------------- uses

def _mlp(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(o, i, generator=g, dtype=dtype) / math.sqrt(i)).requires_grad_()
            for i, o in ((12, 32), (32, 10))]


def _forward(params, x):
    h = torch.tanh(x @ params[0].t())
    return h @ params[1].t()


@pytest.mark.parametrize("eps,temp", [(0.0, 1.0), (0.1, 1.5)])
def test_mixup_training_matches_pytorch(device, eps, temp):
    """A short SGD run with mixup targets (lam ~ Beta(0.4, 0.4), a permuted batch, as timm's
    Mixup): softcal's loss trajectory and parameters equal PyTorch's (float64). With eps == 0
    and T == 1 the PyTorch loss is timm's SoftTargetCrossEntropy, sum(-t * log_softmax(x)).mean()."""
    dtype = torch.float64
    g = torch.Generator().manual_seed(11)
    data = torch.randn(64, 12, generator=g, dtype=dtype)
    labels = torch.randint(0, 10, (64,), generator=g)
    ours, theirs = _mlp(0, dtype), _mlp(0, dtype)
    ours = [p.detach().to(device).requires_grad_() for p in ours]
    beta = torch.distributions.Beta(torch.tensor(0.4, dtype=dtype), torch.tensor(0.4, dtype=dtype))
    torch.manual_seed(12)
    traj_ours, traj_theirs = [], []
    for step in range(25):
        idx = torch.randint(0, 64, (16,), generator=g)
        xb, yb = data[idx], F.one_hot(labels[idx], 10).to(dtype)
        lam = beta.sample()
        perm = torch.randperm(16, generator=g)
        xb = lam * xb + (1 - lam) * xb[perm]
        tb = lam * yb + (1 - lam) * yb[perm]
        loss_o = softcal.cross_entropy(_forward(ours, xb.to(device)), tb.to(device),
                                       temperature=temp, label_smoothing=eps)
        logits_t = _forward(theirs, xb)
        if eps == 0 and temp == 1.0:
            loss_t = torch.sum(-tb * F.log_softmax(logits_t, dim=-1), dim=-1).mean()
        else:
            loss_t = F.cross_entropy(logits_t / temp, tb, label_smoothing=eps)
        go = torch.autograd.grad(loss_o, ours)
        gt = torch.autograd.grad(loss_t, theirs)
        with torch.no_grad():
            for p, d in zip(ours, go):
                p -= 0.5 * d
            for p, d in zip(theirs, gt):
                p -= 0.5 * d
        traj_ours.append(loss_o.item())
        traj_theirs.append(loss_t.item())
    assert traj_theirs[-1] < traj_theirs[0]  # it trained
    torch.testing.assert_close(torch.tensor(traj_ours), torch.tensor(traj_theirs), rtol=1e-10, atol=1e-12)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-10, atol=1e-12)


def test_distillation_from_teacher_probabilities(device):
    """Hinton-style distillation: T^2 * CE(student / T, softmax(teacher / T)); the gradients of the
    student and of a learned temperature equal PyTorch's."""
    g = torch.Generator().manual_seed(13)
    student = torch.randn(8, 20, generator=g, dtype=torch.float64)
    teacher = torch.randn(8, 20, generator=g, dtype=torch.float64) * 2
    T = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(teacher / T.detach(), 1)
    s1 = student.to(device).requires_grad_()
    T1 = T.detach().to(device).requires_grad_()
    ours = T1 ** 2 * softcal.cross_entropy(s1, probs.to(device), temperature=T1)
    s2 = student.clone().requires_grad_()
    theirs = T ** 2 * F.cross_entropy(s2 / T, probs)
    torch.testing.assert_close(ours.cpu(), theirs.detach(), rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(ours, (s1, T1))
    gb = torch.autograd.grad(theirs, (s2, T))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)


def test_module_takes_probability_targets(device):
    x, t, w = make_soft_case((2, 6, 3), torch.float64, device, weighted=True, seed=15)
    crit = softcal.nn.LabelSmoothingLoss(smoothing=0.1, temperature=1.5, weight=w)
    torch.testing.assert_close(crit(x, t), F.cross_entropy(x / 1.5, t, weight=w, label_smoothing=0.1),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(NotImplementedError, match="fused=True"):
        softcal.nn.LabelSmoothingLoss(0.1, fused=True)(x.requires_grad_(), t)


# --------------------------------------------------------------------------- edge cases

def test_zero_mass_on_masked_logit_contributes_zero(device):
    """0 log 0 := 0: a masked logit (-inf) with no target mass adds nothing (PyTorch: NaN). The
    loss and logit gradient equal those of the row without that class; the target gradient
    there is +inf (moving mass onto an impossible class makes the loss infinite), as PyTorch's."""
    x = torch.tensor([[1.0, -INF, 0.5, 2.0], [0.3, 0.1, -INF, -INF]], dtype=torch.float64, device=device)
    t = torch.tensor([[0.2, 0.0, 0.3, 0.5], [0.6, 0.4, 0.0, 0.0]], dtype=torch.float64, device=device)
    assert torch.isnan(F.cross_entropy(x.cpu(), t.cpu()))  # what PyTorch gives
    xin, tin = x.clone().requires_grad_(), t.clone().requires_grad_()
    T = torch.tensor(1.4, dtype=torch.float64, device=device, requires_grad=True)
    loss = softcal.cross_entropy(xin, tin, temperature=T, reduction="none")
    gx, gt, gT = torch.autograd.grad(loss.sum(), (xin, tin, T))
    # the same rows without the masked classes
    want0 = F.cross_entropy(x[0, [0, 2, 3]].cpu() / 1.4, t[0, [0, 2, 3]].cpu(), reduction="none")
    want1 = F.cross_entropy(x[1, :2].cpu() / 1.4, t[1, :2].cpu(), reduction="none")
    torch.testing.assert_close(loss.cpu(), torch.stack([want0, want1]), rtol=1e-12, atol=1e-12)
    assert torch.isfinite(gx).all() and gx[0, 1] == 0 and (gx[1, 2:] == 0).all()
    assert gt[0, 1] == INF and (gt[1, 2:] == INF).all()
    assert torch.isfinite(gT)
    # dL/dT of the reduced rows, by PyTorch
    Tb = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
    lb = (F.cross_entropy(x[0, [0, 2, 3]].cpu() / Tb, t[0, [0, 2, 3]].cpu())
          + F.cross_entropy(x[1, :2].cpu() / Tb, t[1, :2].cpu()))
    (gTb,) = torch.autograd.grad(lb, Tb)
    torch.testing.assert_close(gT.cpu(), gTb, rtol=1e-12, atol=1e-14)


def test_weight_zero_and_full_smoothing_give_zero_target_gradient(device):
    """Where (1 - eps) w_c == 0 the loss does not depend on t_c: its gradient is 0, also at a
    masked logit (PyTorch: NaN)."""
    x = torch.tensor([[1.0, -INF, 0.5]], dtype=torch.float64, device=device)
    t = torch.tensor([[0.5, 0.0, 0.5]], dtype=torch.float64, device=device, requires_grad=True)
    w = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64, device=device)
    loss = softcal.cross_entropy(x, t, weight=w)
    (gt,) = torch.autograd.grad(loss, t)
    assert torch.isfinite(loss) and gt[0, 1] == 0 and torch.isfinite(gt).all()
    x2 = torch.randn(3, 4, dtype=torch.float64, device=device)
    t2 = torch.softmax(torch.randn(3, 4, dtype=torch.float64, device=device), 1).requires_grad_()
    loss = softcal.cross_entropy(x2, t2, label_smoothing=1.0)
    (gt,) = torch.autograd.grad(loss, t2)
    assert (gt == 0).all()
    torch.testing.assert_close(loss.cpu(), F.cross_entropy(x2.cpu(), t2.detach().cpu(), label_smoothing=1.0))


def test_mass_on_masked_logit_and_rows_without_softmax(device):
    x = torch.tensor([[1.0, -INF, 0.5], [-INF, -INF, -INF], [0.0, float("nan"), 1.0],
                      [1.0, -INF, 0.5]], dtype=torch.float64, device=device)
    t = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.5, 0.0, 0.5]],
                     dtype=torch.float64, device=device)
    xin, tin = x.clone().requires_grad_(), t.clone().requires_grad_()
    loss = softcal.cross_entropy(xin, tin, reduction="none")
    assert loss[0] == INF                              # mass on a masked logit, as PyTorch
    assert torch.isnan(loss[1]) and torch.isnan(loss[2])  # no softmax, as PyTorch
    assert torch.isfinite(loss[3])
    gx, gt = torch.autograd.grad(loss[[0, 3]].sum(), (xin, tin))
    assert torch.isfinite(gx[[0, 3]]).all()
    # a row without a softmax has NaN gradients, even with a zero upstream gradient (as PyTorch)
    assert torch.isnan(gx[[1, 2]]).all() and torch.isnan(gt[[1, 2]]).all()
    assert torch.isfinite(softcal.cross_entropy(x[[0, 3]], t[[0, 3]], label_smoothing=0.1,
                                                reduction="none")).logical_not().all()  # eps > 0: +inf
    # with eps > 0 every class has mass: +inf, as PyTorch
    assert softcal.cross_entropy(x[3:], t[3:], label_smoothing=0.1) == INF


def test_empty_batch(device):
    x = torch.randn(0, 5, device=device, requires_grad=True)
    t = torch.rand(0, 5, device=device)
    assert torch.isnan(softcal.cross_entropy(x, t))           # 0 / 0, as PyTorch
    assert softcal.cross_entropy(x, t, reduction="sum") == 0
    assert softcal.cross_entropy(x, t, reduction="none").shape == (0,)
    softcal.cross_entropy(x, t, reduction="sum").backward()
    assert x.grad.shape == (0, 5)


# --------------------------------------------------------------------------- errors

def test_errors_name_argument_and_value(device):
    x = torch.randn(4, 3, device=device)
    t = torch.softmax(torch.randn(4, 3, device=device), 1)
    ce = softcal.cross_entropy
    with pytest.raises(TypeError, match=r"class probabilities of the logits' shape \(4, 3\); got dtype torch.float32 and shape \(4, 2\)"):
        ce(x, t[:, :2])
    with pytest.raises(TypeError, match=r"class-probability target has dtype torch.float64 but logits has dtype torch.float32"):
        ce(x, t.double())
    with pytest.raises(ValueError, match=r"target is on meta but logits is on"):
        ce(x, torch.empty(4, 3, device="meta"))
    with pytest.raises(ValueError, match=r"ignore_index is not supported with class-probability targets .* got ignore_index=0"):
        ce(x, t, ignore_index=0)
    with pytest.raises(NotImplementedError, match=r"fused=True .* not supported with class-probability targets"):
        ce(x.requires_grad_(), t, fused=True)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        ce(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"weight has shape \(2,\) but logits has 3 classes"):
        ce(x, t, weight=torch.ones(2, device=device))
    # the ops check on their own
    with pytest.raises(RuntimeError, match=r"target has dtype Double but logits has Float"):
        torch.ops.softcal.soft_target_fwd(x.detach(), t.double(), None, None, 1.0, 0.0, 1)
    with pytest.raises(RuntimeError, match=r"target has shape \[4, 2\] but logits has shape \[4, 3\]"):
        torch.ops.softcal.soft_target_fwd(x.detach(), t[:, :2].contiguous(), None, None, 1.0, 0.0, 1)


def test_reference_fallback_is_used_without_kernels(monkeypatch):
    """softcal._soft falls back to the reference when the device has no compiled kernels."""
    from softcal import _soft

    x, t, w = make_soft_case((5, 6), torch.float64, "cpu", weighted=True)
    monkeypatch.setattr(softcal._ops, "has_kernel", lambda device_type, op="cross_entropy_fwd": False)
    got = _soft.soft_cross_entropy("f", x, t, temperature=1.2, label_smoothing=0.1, weight=w,
                                   ignore_index=-100, reduction="mean", fused=False, inplace=False,
                                   use_kernel=True)
    want = F.cross_entropy(x / 1.2, t, weight=w, label_smoothing=0.1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- the CUDA kernels' code
# (SOFTCAL_EMULATE_CUDA=1: csrc/cuda/soft_target.cu compiled for the CPU by tests/cuda_emu)

needs_emu = pytest.mark.skipif(
    not EMULATE_CUDA, reason="runs with SOFTCAL_EMULATE_CUDA=1 (the second half of `make test`)")


def _emu():
    import conftest

    return conftest.EMU_OPS


def _soft_paths():
    """(kind, dtype, rows, C, target offset, kernel pattern): every threads-per-row variant of the
    forward and the backward (capped at 512), the weighted variants, and a target whose rows have
    another 16-byte alignment than the logits' (read by scalars)."""
    f32, bf16, f64 = torch.float32, torch.bfloat16, torch.float64
    cases = []
    for c, tpr in ((40, 4), (100, 8), (200, 16), (400, 32), (1500, 128), (3000, 256), (7000, 512),
                   (20000, 512)):
        cases.append(("fwd", f32, 3, c, 0, rf"soft_target_fwd_kernel<float, float, {tpr}, softcal::ClassWeights::kNone>"))
    cases.append(("bwd", f32, 3, 1500, 0, r"soft_target_bwd_kernel<float, float, 128, softcal::ClassWeights::kNone>"))
    cases.append(("bwd_w", bf16, 4, 5000, 0, r"soft_target_bwd_kernel<c10::BFloat16, [\w:]+, \d+, softcal::ClassWeights::kPerClass>"))
    cases.append(("fwd_w", f64, 5, 300, 0, r"soft_target_fwd_kernel<double, double, \d+, softcal::ClassWeights::kPerClass>"))
    cases.append(("bwd", f32, 5, 301, 1, r"soft_target_bwd_kernel<float, float, \d+, softcal::ClassWeights::kNone>"))
    cases.append(("fwd", bf16, 5, 301, 3, r"soft_target_fwd_kernel<c10::BFloat16, [\w:]+, \d+, softcal::ClassWeights::kNone>"))
    return cases


def _run_soft_path(kind, dtype, n, c, off):
    g = torch.Generator().manual_seed(n * 7 + c)
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).to(dtype)
    tt = torch.softmax(torch.randn(n, c + off, generator=g, dtype=torch.float64), 1).to(dtype)
    t = tt[:, off:]  # rows misaligned against the logits' when off > 0
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(dtype) if kind.endswith("_w") else None
    T = torch.tensor(1.3)
    ops = torch.ops.softcal
    out = ops.soft_target_fwd(x, t, w, T, 1.0, 0.1, 0)
    if kind.startswith("fwd"):
        return out
    g_rows = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    return ops.soft_target_bwd(g_rows, x, t, w, out[1], out[2], T, 1.0, 0.1, 0, True, True, True)


@needs_emu
def test_every_soft_launch_path_is_reached():
    emu = _emu()
    missing = []
    for kind, dtype, n, c, off, pattern in _soft_paths():
        before = {k.rsplit("=", 1)[0]: int(k.rsplit("=", 1)[1]) for k in emu.emu_kernels()}
        _run_soft_path(kind, dtype, n, c, off)
        after = {k.rsplit("=", 1)[0]: int(k.rsplit("=", 1)[1]) for k in emu.emu_kernels()}
        ran = [k for k, v in after.items() if v > before.get(k, 0)]
        if not any(re.search(pattern, k) for k in ran):
            missing.append((kind, str(dtype), n, c, pattern, ran))
    assert not missing, missing


@needs_emu
@pytest.mark.parametrize("case", _soft_paths(), ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-{c[2]}x{c[3]}+{c[4]}")
def test_soft_results_do_not_depend_on_the_schedule(case):
    """Bitwise the same outputs whatever the order of the threads of a block between barriers
    (by index, reversed, two random permutations): no shared-memory race."""
    import emulator as emu_build

    emu = _emu()
    kind, dtype, n, c, off, _ = case
    outs = {}
    try:
        for mode, seed in (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)):
            emu.emu_set_schedule(mode, seed)
            outs[(mode, seed)] = [o for o in _run_soft_path(kind, dtype, n, c, off) if o.numel()]
    finally:
        emu_build.configure(emu)
    base = outs[("forward", 0)]
    for key, out in outs.items():
        assert len(out) == len(base)
        for a, b in zip(base, out):
            assert torch.equal(a, b), key


@needs_emu
@pytest.mark.parametrize("c", [10, 3000], ids=lambda c: f"C{c}")
def test_soft_results_do_not_depend_on_the_grid(c):
    """1 SM (long grid-stride loops) and 132 SMs: per-row results bitwise equal, reductions equal
    to rounding, both equal to the float64 reference."""
    import emulator as emu_build

    emu = _emu()
    x, t, w = make_soft_case((700, c), torch.float32, "cpu", weighted=True, seed=c)
    T = torch.tensor(1.4)
    ops = torch.ops.softcal
    res = {}
    try:
        for sms in (1, 132):
            emu.emu_set_sm_count(sms)
            none = ops.soft_target_fwd(x, t, w, T, 1.0, 0.1, 0)
            mean = ops.soft_target_fwd(x, t, w, T, 1.0, 0.1, 1)
            bwd = ops.soft_target_bwd(torch.tensor(1.0), x, t, w, mean[1], mean[2], T, 1.0, 0.1, 1,
                                    True, True, True)
            res[sms] = (none, mean, bwd)
    finally:
        emu_build.configure(emu)
    (n1, m1, b1), (n2, m2, b2) = res[1], res[132]
    for a, b in zip(n1 + b1[:2], n2 + b2[:2]):
        assert torch.equal(a, b)
    torch.testing.assert_close(m1[0], m2[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(b1[2], b2[2], rtol=1e-5, atol=1e-7)
    want = reference.soft_cross_entropy(x.double(), t.double(), temperature=1.4, label_smoothing=0.1,
                                        weight=w.double(), reduction="none")
    assert rel_err(n1[0], want) <= TOL[torch.float32]["rtol"]
