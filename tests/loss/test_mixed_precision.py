"""Mixed precision: torch.autocast (a float32 loss, float32 class weights and probability targets
beside bfloat16/float16 logits, as PyTorch, with the logits never copied to float32), float32
class weights outside autocast, and loss_dtype=torch.float32 for half-precision logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import softcal
from conftest import TOL, rel_err

HALF = [torch.bfloat16, torch.float16]
PATHS = {
    "plain": dict(),
    "fused": dict(fused=True),
    "inplace": dict(fused=True, inplace=True),
    "probabilities": dict(),
}
N, C = 9, 13  # distinct, and neither is 2: no logits-sized tensor is mistaken for another


def _case(dtype, device, path, seed=0):
    """Logits in `dtype`, integer or float32 probability targets, float32 class weights whose
    values a bfloat16/float16 copy would round (1 + k/1000)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)
    if path == "probabilities":
        t = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), 1).float().to(device)
    else:
        t = torch.randint(0, C, (N,), generator=g)
        t[::4] = -100
        t = t.to(device)
    w = (1 + torch.arange(C, dtype=torch.float64) * 37 % 100 / 1000).float().to(device)
    return x, t, w


def _reference(x, t, w, reduction, eps=0.1, T=1.3):
    """float64 loss and dL/dx on the CPU from the same values (weights and targets unrounded)."""
    x64 = x.detach().double().cpu().requires_grad_()
    t64 = t.double().cpu() if t.dtype.is_floating_point else t.cpu()
    loss = F.cross_entropy(x64 / T, t64, weight=None if w is None else w.double().cpu(),
                           reduction=reduction, label_smoothing=eps)
    g = torch.linspace(0.5, 2.0, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    (grad,) = torch.autograd.grad(loss, x64, g)
    return loss.detach(), grad, g


def _ours(x, t, w, path, reduction, g, eps=0.1, T=1.3, **kw):
    leaf = x.detach().clone().requires_grad_()
    logits = leaf * 1  # a non-leaf, as a model's output (the in-place mode writes into it)
    loss = softcal.cross_entropy(logits, t, w, reduction=reduction, label_smoothing=eps,
                                 temperature=T, **PATHS[path], **kw)
    loss.backward(g.to(loss.dtype).to(loss.device))
    return loss, leaf.grad


class _Float32Copies(TorchDispatchMode):
    """Records every op that produces a float32 tensor of the logits' (N, C) shape."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(o, torch.Tensor) and o.dtype == torch.float32
                    and tuple(o.shape) == (N, C)):
                self.seen.append(str(func))
        return out


# --------------------------------------------------------------------------- item 3: weights

@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("path", ["plain", "fused", "inplace", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float32_weights_with_half_logits(device, dtype, path, reduction):
    """float32 class weights with bfloat16/float16 logits are accepted (they raised TypeError)
    and read in float32: the float32 loss is as close to float64 as the kernels' float32
    accumulation allows, much closer than weights rounded to the logits' dtype would give."""
    x, t, w = _case(dtype, device, path)
    ref, ref_grad, g = _reference(x, t, w, reduction)
    loss, grad = _ours(x, t, w, path, reduction, g, loss_dtype=torch.float32)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    tol = TOL[torch.float32]
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=tol["rtol"], atol=tol["atol"])
    assert rel_err(grad, ref_grad) < TOL[dtype]["grad"]
    rounded, _, _ = _reference(x, t, w.to(dtype), reduction)
    assert rel_err(loss, ref) < rel_err(rounded, ref) / 4  # the weights were not rounded


@pytest.mark.parametrize("path", ["plain", "fused", "probabilities"])
def test_float64_weights_with_float32_logits(device, path):
    x, t, w = _case(torch.float32, device, path)
    w = w.double() + 1e-9  # not representable in float32
    ref, ref_grad, g = _reference(x, t, w, "sum")
    loss, grad = _ours(x, t, w, path, "sum", g)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=TOL[torch.float32]["rtol"], atol=1e-5)
    assert rel_err(grad, ref_grad) < TOL[torch.float32]["grad"]


def test_module_with_float32_weight_and_bfloat16_logits(device):
    x, t, w = _case(torch.bfloat16, device, "plain")
    m = softcal.nn.CrossEntropyLoss(w, label_smoothing=0.1, temperature=1.3,
                                    loss_dtype=torch.float32)
    ref, _, _ = _reference(x, t, w, "mean")
    torch.testing.assert_close(m(x, t).double().cpu(), ref, rtol=TOL[torch.float32]["rtol"],
                               atol=TOL[torch.float32]["atol"])


def test_weight_of_no_floating_dtype_is_refused():
    x, t, _ = _case(torch.bfloat16, "cpu", "plain")
    with pytest.raises(TypeError, match="weight must be a floating tensor, got dtype torch.int32"):
        softcal.cross_entropy(x, t, torch.ones(C, dtype=torch.int32))


# --------------------------------------------------------------------------- item 8: loss_dtype

@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_dtype_float32(device, dtype, path, reduction):
    """loss_dtype=torch.float32 gives the float32 loss of half-precision logits to float32
    precision (not a half-precision loss cast up); the gradient is the logits' dtype."""
    x, t, _ = _case(dtype, device, path)
    ref, ref_grad, g = _reference(x, t, None, reduction)
    loss, grad = _ours(x, t, None, path, reduction, g, loss_dtype=torch.float32)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=TOL[torch.float32]["rtol"],
                               atol=TOL[torch.float32]["atol"])
    assert rel_err(grad, ref_grad) < TOL[dtype]["grad"]


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_default_loss_dtype_is_the_logits_as_pytorch(device, dtype):
    """Outside autocast PyTorch returns a bfloat16/float16 loss for such logits: so does softcal
    by default."""
    x, t, _ = _case(dtype, device, "plain")
    for path in PATHS:
        tt = _case(dtype, device, path)[1]
        if path == "probabilities":
            tt = tt.to(dtype)
        loss = softcal.cross_entropy(x.clone().requires_grad_() * 1, tt, **PATHS[path])
        assert loss.dtype == F.cross_entropy(x.cpu(), tt.cpu()).dtype == dtype, path
    m = softcal.nn.CrossEntropyLoss()
    assert m(x, t).dtype == dtype
    m = softcal.nn.CrossEntropyLoss(loss_dtype=torch.float32, fused=True)
    assert m(x.clone().requires_grad_() * 1, t).dtype == torch.float32
    assert "loss_dtype=torch.float32" in repr(m)
    m = softcal.nn.LabelSmoothingLoss(0.1, loss_dtype=torch.float32)
    assert m(x, t).dtype == torch.float32


def test_loss_dtype_is_checked():
    x, t, _ = _case(torch.bfloat16, "cpu", "plain")
    with pytest.raises(TypeError, match="loss_dtype must be None or one of .* got 'float32'"):
        softcal.cross_entropy(x, t, loss_dtype="float32")
    with pytest.raises(TypeError, match="loss_dtype must be None or one of .* got torch.int64"):
        softcal.nn.CrossEntropyLoss(loss_dtype=torch.int64)


# --------------------------------------------------------------------------- item 2: autocast

@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_as_pytorch(device, dtype, path, reduction):
    """Under torch.autocast, F.cross_entropy takes float32 weights and float32 probability
    targets beside half logits and returns a float32 loss: softcal does the same (it raised
    TypeError, and without weights returned a half loss), to float32 precision, and never
    makes a float32 copy of the logits."""
    x, t, w = _case(dtype, device, path)
    ref, ref_grad, g = _reference(x, t, w, reduction)
    leaf = x.detach().clone().requires_grad_()
    spy = _Float32Copies()
    with torch.autocast(device.type, dtype=dtype), spy:
        logits = leaf * 1
        loss = softcal.cross_entropy(logits, t, w, reduction=reduction, label_smoothing=0.1,
                                     temperature=1.3, **PATHS[path])
    assert spy.seen == [], f"float32 copies of the logits: {spy.seen}"
    loss.backward(g.float().to(device))
    with torch.autocast(device.type, dtype=dtype):
        theirs = F.cross_entropy(x / 1.3, t, w, reduction=reduction, label_smoothing=0.1)
    assert loss.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=TOL[torch.float32]["rtol"],
                               atol=TOL[torch.float32]["atol"])
    assert leaf.grad.dtype == dtype
    assert rel_err(leaf.grad, ref_grad) < TOL[dtype]["grad"]


@pytest.mark.parametrize("target_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_autocast_probability_target_of_another_dtype(device, target_dtype):
    """Under autocast a probability target of any floating dtype is taken (cast to float32 as
    autocast casts it); outside autocast such a mismatch is still an error."""
    x, t, _ = _case(torch.bfloat16, device, "probabilities")
    t = t.to(target_dtype)
    ref, _, _ = _reference(x, t, None, "mean")
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = softcal.cross_entropy(x, t, label_smoothing=0.1, temperature=1.3)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), ref, rtol=TOL[torch.float32]["rtol"],
                               atol=TOL[torch.float32]["atol"])
    if target_dtype != torch.bfloat16:
        with pytest.raises(TypeError, match="class-probability target has dtype"):
            softcal.cross_entropy(x, t)


def test_autocast_module_and_explicit_loss_dtype(device):
    x, t, w = _case(torch.bfloat16, device, "plain")
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert softcal.nn.CrossEntropyLoss(w)(x, t).dtype == torch.float32
        assert softcal.nn.LabelSmoothingLoss(0.1, weight=w)(x, t).dtype == torch.float32
        assert softcal.cross_entropy(x, t, loss_dtype=torch.bfloat16).dtype == torch.bfloat16
        # float32 and float64 logits keep their dtype, as PyTorch's
        assert softcal.cross_entropy(x.float(), t, w).dtype == torch.float32
        assert softcal.cross_entropy(x.double(), t).dtype == torch.float64


@pytest.mark.parametrize("path", ["plain", "fused", "inplace"])
def test_autocast_compiled_training_step(device, path):
    """A bfloat16-autocast training step compiled with fullgraph=True and dynamic shapes, with
    float32 class weights: a float32 loss and PyTorch's autocast gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, C).to(device)
    ref = torch.nn.Linear(8, C).to(device)
    ref.load_state_dict(model.state_dict())
    w = _case(torch.bfloat16, device, "plain")[2]

    def step(a, t):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return softcal.cross_entropy(model(a), t, w, label_smoothing=0.1, **PATHS[path])

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (6, 11):
        a = torch.randn(n, 8, device=device)
        t = torch.randint(0, C, (n,), device=device)
        loss = compiled(a, t)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss_ref = F.cross_entropy(ref(a), t, w, label_smoothing=0.1)
        assert loss.dtype == loss_ref.dtype == torch.float32
        torch.testing.assert_close(loss, loss_ref, rtol=2e-5, atol=2e-6)
        model.zero_grad()
        ref.zero_grad()
        loss.backward()
        loss_ref.backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert rel_err(p.grad, q.grad) < TOL[torch.bfloat16]["grad"]
