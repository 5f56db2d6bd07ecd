"""torch.compile of every mode (plain, fused, fused in-place): fullgraph, dynamic shapes, a float
or tensor temperature; the fused modes as custom ops (opcheck); the in-place mode's honesty."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import softcal

MODES = {
    "plain": dict(),
    "fused": dict(fused=True),
    "inplace": dict(fused=True, inplace=True),
}
C, D = 7, 12


def _models(device, seed=0):
    torch.manual_seed(seed)
    ours = torch.nn.Linear(D, C, dtype=torch.float64).to(device)
    ref = torch.nn.Linear(D, C, dtype=torch.float64).to(device)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _batch(n, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    t = torch.randint(0, C, (n,), generator=g)
    t[::4] = -100
    return x.to(device), t.to(device)


def _train(device, mode, backend, via, temperature, reduction="mean"):
    """Three SGD steps with batch sizes 5, 9 and 16 through a compiled step (fullgraph,
    dynamic shapes) and the same steps in eager PyTorch; returns both models, both
    temperatures and the compile counter."""
    torch._dynamo.reset()
    model, ref = _models(device)
    w = torch.linspace(0.5, 1.5, C, dtype=torch.float64, device=device)
    learned = temperature == "tensor"
    T = torch.tensor(1.3, dtype=torch.float64, device=device, requires_grad=True) if learned else 1.3
    T_ref = T.detach().clone().requires_grad_() if learned else T
    kw = dict(weight=w, label_smoothing=0.1, reduction=reduction, **MODES[mode])
    if via == "module":
        loss_fn = softcal.nn.CrossEntropyLoss(temperature=1.3, **kw)

        def step(x, t, T):
            return loss_fn(model(x), t)
    else:
        def step(x, t, T):
            return softcal.cross_entropy(model(x), t, temperature=T, **kw)

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    params = list(model.parameters()) + ([T] if learned else [])
    params_ref = list(ref.parameters()) + ([T_ref] if learned else [])
    opt = torch.optim.SGD(params, lr=0.5)
    opt_ref = torch.optim.SGD(params_ref, lr=0.5)
    for i, n in enumerate((5, 9, 16)):
        x, t = _batch(n, device, seed=i)
        upstream = torch.linspace(0.5, 2.0, n, dtype=torch.float64, device=device)
        loss = compiled(x, t, T)
        loss_ref = F.cross_entropy(ref(x) / T_ref, t, weight=w, label_smoothing=0.1,
                                   reduction=reduction)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
        if reduction == "none":  # a different upstream gradient per row
            loss, loss_ref = (loss * upstream).sum(), (loss_ref * upstream).sum()
        opt.zero_grad()
        opt_ref.zero_grad()
        loss.backward()
        loss_ref.backward()
        for p, q in zip(params, params_ref):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
        opt.step()
        opt_ref.step()
    return counter


def _graphs(counter):
    """Graphs compiled with ops in them (Dynamo's restart for a float argument hands the
    backend an empty graph first: not a recompilation)."""
    return sum(any(n.op == "call_function" for n in g.graph.nodes) for g in counter.graphs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", ["float", "tensor"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_training_step_every_mode(device, mode, temperature, reduction):
    """fullgraph=True, dynamic=True: one graph for three batch sizes, PyTorch's gradients (of
    the weights and of a learned temperature) at every step. Before: the fused modes raised
    "Expected fwd_out to be a BaseListVariable", and a float temperature argument with
    dynamic=True "torch.* op returned non-Tensor"."""
    counter = _train(device, mode, "aot_eager", "functional", temperature, reduction)
    assert _graphs(counter) == 1


@pytest.mark.parametrize("mode", MODES)
def test_compiled_training_step_module(device, mode):
    """softcal.nn.CrossEntropyLoss(fused=..., inplace=...) in a compiled training step."""
    counter = _train(device, mode, "aot_eager", "module", "float")
    assert _graphs(counter) == 1


@pytest.mark.parametrize("mode", MODES)
def test_compiled_training_step_inductor(device, mode):
    """The same training step compiled by Inductor (the default backend)."""
    counter = _train(device, mode, "inductor", "functional", "tensor")
    assert _graphs(counter) == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dynamic", [None, False, True])
def test_compiled_float_temperature_follows_its_value(device, mode, dynamic):
    """A float temperature argument gives the loss at that temperature under every dynamic
    setting (a value may compile once; it is never baked in wrongly)."""
    torch._dynamo.reset()
    x = torch.randn(6, C, dtype=torch.float64, device=device)
    t = torch.randint(0, C, (6,), device=device)
    f = torch.compile(lambda z, T: softcal.cross_entropy(z * 1.0, t, temperature=T, **MODES[mode]),
                      fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for T in (1.5, 2.5, 0.7):
        z = x.clone().requires_grad_()
        loss = f(z, T)
        loss.backward()
        zr = x.clone().requires_grad_()
        ref = F.cross_entropy(zr / T, t)
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(z.grad, zr.grad, rtol=1e-12, atol=1e-12)


def test_fused_ops_pass_opcheck(device):
    """cross_entropy_fused (autograd now registered on it) and cross_entropy_inplace_loss (the
    in-place mode's differentiable loss): schema, fake kernel, autograd registration, AOT."""
    ops = torch.ops.softcal
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64).to(device)
    t = torch.tensor([0, 4, -100, 2, 1, 3], device=device)
    w = torch.rand(5, generator=g, dtype=torch.float64).to(device) + 0.5
    for red in (0, 1, 2):
        for T in (None, torch.tensor(1.7, dtype=torch.float64, device=device, requires_grad=True)):
            need_t = T is not None
            torch.library.opcheck(ops.cross_entropy_fused.default,
                                  (x.clone().requires_grad_(), t, w, T, 1.3, 0.1, -100, red, need_t))
            buf = x.clone()
            loss, grad_t = ops.cross_entropy_fused_(buf, t, w, None if T is None else T.detach(),
                                                    1.3, 0.1, -100, red, need_t)
            torch.library.opcheck(ops.cross_entropy_inplace_loss.default,
                                  (buf.requires_grad_(), loss, T, grad_t))


def test_compiled_inplace_declares_the_write(device):
    """Logits made outside the compiled region by an op that saved them (exp): the compiled
    in-place loss writes their buffer (the version counter moves), so autograd raises at
    backward instead of reading the gradient as the logits."""
    torch._dynamo.reset()
    f = torch.compile(lambda z, t: softcal.cross_entropy(z, t, fused=True, inplace=True),
                      fullgraph=True, dynamic=True, backend="aot_eager")
    a = torch.randn(6, C, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, C, (6,), device=device)
    z = a.exp()
    v0 = z._version
    loss = f(z, t)
    assert z._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_compiled_inplace_writes_the_gradient_into_the_logits(device):
    """Logits from outside the compiled region that nothing saved (a linear layer's output):
    after the compiled in-place loss their buffer holds dL/dlogits, and backward works."""
    torch._dynamo.reset()
    f = torch.compile(lambda z, t: softcal.cross_entropy(z, t, fused=True, inplace=True),
                      fullgraph=True, dynamic=True, backend="aot_eager")
    model, ref = _models(device)
    x, t = _batch(8, device, seed=3)
    z = model(x)
    loss = f(z, t)
    zr = ref(x)
    zr.retain_grad()
    F.cross_entropy(zr, t).backward()
    torch.testing.assert_close(z.detach(), zr.grad, rtol=1e-12, atol=1e-14)
    loss.backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-13)


def test_eager_fused_backward_still_runs_once(device):
    """The fused modes keep their eager checks as custom ops: one backward per forward, no
    double backward."""
    for mode in ("fused", "inplace"):
        z = torch.randn(5, C, dtype=torch.float64, device=device, requires_grad=True) * 1.0
        t = torch.randint(0, C, (5,), device=device)
        loss = softcal.cross_entropy(z, t, **MODES[mode])
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="once per forward|modified by an inplace"):
            loss.backward()
        z = torch.randn(5, C, dtype=torch.float64, device=device, requires_grad=True) * 1.0
        loss = softcal.cross_entropy(z, t, **MODES[mode])
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, z, create_graph=True)


@pytest.mark.parametrize("via", ["functional", "module"])
def test_eager_inplace_gradient_is_the_logits_buffer(device, via):
    """As custom ops the in-place mode keeps its memory: no logits-sized tensor is made in the
    forward or the backward of the loss, and dL/dlogits is the logits' own buffer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LogitsSized(TorchDispatchMode):
        """Ops whose output is a tensor of the logits' shape in other memory than theirs."""

        def __init__(self, logits):
            super().__init__()
            self.shape, self.ptr, self.seen = tuple(logits.shape), logits.data_ptr(), []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if (isinstance(o, torch.Tensor) and tuple(o.shape) == self.shape
                        and o.data_ptr() != self.ptr):
                    self.seen.append(str(func))
            return out

    z = torch.randn(9, 13, dtype=torch.float32, device=device, requires_grad=True) * 1.0
    t = torch.randint(0, 13, (9,), device=device)
    spy = LogitsSized(z)
    with spy:
        if via == "module":
            loss = softcal.nn.CrossEntropyLoss(label_smoothing=0.1, fused=True, inplace=True)(z, t)
        else:
            loss = softcal.cross_entropy(z, t, label_smoothing=0.1, fused=True, inplace=True)
        (g,) = torch.autograd.grad(loss * 2.0, z)
    assert spy.seen == [], spy.seen
    assert g.data_ptr() == z.data_ptr()


def test_inductor_inplace_step_allocates_no_second_logits_buffer():
    """Compiled by Inductor, the in-place mode writes the gradient into the linear layer's
    output and the backward scales that buffer where it lies: the forward and backward code
    allocate one logits-sized buffer in all (the linear layer's output)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 1000)
    f = torch.compile(lambda a, t: softcal.cross_entropy(lin(a), t, fused=True, inplace=True),
                      fullgraph=True, dynamic=True)
    a, t = torch.randn(64, 16), torch.randint(0, 1000, (64,))

    def run():
        f(a, t).backward()

    _, codes = run_and_get_code(run)
    code = "\n".join(codes)
    assert "cross_entropy_fused_" in code and "cross_entropy_inplace_loss" in code
    logits_sized = re.findall(r"empty_strided_cpu\(\(s\d+, 1000\)", code)  # (rows, C), rows symbolic
    assert len(logits_sized) == 1, logits_sized
