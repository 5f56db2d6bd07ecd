"""z_loss, softcap and return_lse on softcal.cross_entropy (issue 19 item 3), in the kernels.

The oracle is the composition of the issue, in PyTorch float64:

    z = softcap * tanh(x / softcap)   (when softcap is given),   s = z / T,
    loss = F.cross_entropy(s, ...) + z_loss * lse(s)^2 per non-ignored row
           (summed for "sum", averaged over the non-ignored rows for "mean", per row for "none").

Every case runs the forward, the plain backward, the fused and the in-place fused modes; under
SOFTCAL_EMULATE_CUDA=1 the same cases run the CUDA kernels (tests/cuda_emu).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import softcal
from conftest import EMULATE_CUDA

pytestmark = pytest.mark.skipif(softcal.backend("cpu") != "extension",
                                reason="needs the compiled extension (the kernels are under test)")

MODES = ["plain", "fused", "inplace"]


def composition(x, target, *, temperature=1.0, eps=0.0, weight=None, ignore_index=-100,
                reduction="mean", z_loss=0.0, softcap=None):
    """The issue's composition in the dtype of x (float64 for the oracle)."""
    z = x
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    s = z / temperature
    ce = F.cross_entropy(s, target, weight=weight, ignore_index=ignore_index,
                         label_smoothing=eps, reduction=reduction)
    lse = torch.logsumexp(s, dim=-1)
    if not z_loss:
        return ce, lse
    valid = target != ignore_index
    zrow = torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return ce + zrow, lse
    if reduction == "sum":
        return ce + zrow.sum(), lse
    return ce + zrow.sum() / valid.sum(), lse


def make_case(rows, C, dtype, *, ignore=True, masked=False, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, C, generator=g, dtype=torch.float64) * scale)
    y = torch.randint(0, C, (rows,), generator=g)
    if ignore:
        y[::5] = -100
    if masked:  # some -inf logits, never the target's
        m = torch.rand(rows, C, generator=g) < 0.2
        m[torch.arange(rows), y.clamp(min=0)] = False
        x = x.masked_fill(m, float("-inf"))
    return x.to(dtype), y


def run(x, y, mode, *, temperature, upstream=None, **kw):
    """softcal's loss, lse, dL/dx and dL/dT (None when T is a float) in the given mode."""
    xl = x.detach().clone().requires_grad_(True)
    t = temperature.detach().clone().requires_grad_(True) if isinstance(temperature, torch.Tensor) \
        else temperature
    inp = xl
    if mode == "inplace":  # the in-place kernel writes into a non-leaf's buffer
        inp = xl * 1.0
    loss, lse = softcal.cross_entropy(inp, y, temperature=t, fused=mode != "plain",
                                      inplace=mode == "inplace", return_lse=True, **kw)
    gout = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
    loss.backward(gout)
    return (loss.detach(), lse, xl.grad, t.grad if isinstance(t, torch.Tensor) else None)


def oracle(x, y, *, temperature, upstream=None, **kw):
    xd = x.detach().double().requires_grad_(True)
    t = temperature.detach().double().requires_grad_(True) \
        if isinstance(temperature, torch.Tensor) else temperature
    loss, lse = composition(xd, y, temperature=t, **kw)
    gout = torch.ones_like(loss) if upstream is None else upstream.double()
    loss.backward(gout)
    return (loss.detach(), lse.detach(), xd.grad, t.grad if isinstance(t, torch.Tensor) else None)


def rel(a, b):
    """max |a - b| / max |b| over the finite entries of b (inf/NaN must match exactly)."""
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN pattern differs"
    assert torch.equal(a[~fin & ~torch.isnan(b)], b[~fin & ~torch.isnan(b)]), "inf differs"
    if not fin.any():
        return 0.0
    scale = b[fin].abs().max().item()
    d = (a[fin] - b[fin]).abs().max().item()
    return d if scale == 0 else d / scale


CASES = [
    # (rows, C, options)
    (24, 10, dict(z_loss=1e-2)),
    (24, 10, dict(softcap=3.0)),
    (24, 10, dict(z_loss=0.1, softcap=2.0, eps=0.1)),
    (16, 300, dict(z_loss=1e-2, weight=True)),
    (16, 300, dict(z_loss=0.05, softcap=5.0, eps=0.2, weight=True)),
    (8, 4100, dict(z_loss=1e-3, softcap=10.0)),   # rows longer than a 2048-element chunk
    (8, 4100, dict(z_loss=1e-3, eps=0.05)),
]


def _opts(C, opts, dtype=torch.float64):
    o = dict(opts)
    if o.pop("weight", False):
        o["weight"] = torch.rand(C, generator=torch.Generator().manual_seed(3),
                                 dtype=torch.float64).add(0.5).to(dtype)
    return o


@pytest.mark.parametrize("rows,C,opts", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tensor_t", [False, True])
def test_float64_matches_composition(rows, C, opts, reduction, mode, tensor_t):
    x, y = make_case(rows, C, torch.float64, seed=rows + C)
    T = torch.tensor(1.7, dtype=torch.float64) if tensor_t else 1.7
    o = _opts(C, opts)
    kw = dict(temperature=T, reduction=reduction, z_loss=o.get("z_loss", 0.0),
              softcap=o.get("softcap"), weight=o.get("weight"), label_smoothing=o.get("eps", 0.0))
    up = torch.randn(rows, generator=torch.Generator().manual_seed(7), dtype=torch.float64) \
        if reduction == "none" else None
    loss, lse, gx, gt = run(x, y, mode, upstream=up, **kw)
    okw = dict(kw)
    okw["eps"] = okw.pop("label_smoothing")
    rl, rlse, rgx, rgt = oracle(x, y, upstream=up, **okw)
    assert rel(loss, rl) < 1e-9
    assert rel(lse, rlse) < 1e-9
    assert rel(gx, rgx) < 1e-9
    if tensor_t:
        assert rel(gt, rgt) < 1e-9


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("C", [12, 500])
def test_masked_logits(mode, softcap, C):
    """-inf logits (never the target): p = 0 there; with a softcap they become -c (finite)."""
    x, y = make_case(20, C, torch.float64, masked=True, seed=C)
    T = torch.tensor(0.8, dtype=torch.float64)
    kw = dict(temperature=T, reduction="mean", z_loss=0.02, softcap=softcap)
    loss, lse, gx, gt = run(x, y, mode, **kw)
    rl, rlse, rgx, rgt = oracle(x, y, **kw)
    if softcap is None:
        # the composition's dL/dT is NaN at a -inf logit (-inf / T); softcal's convention (and
        # its float64 reference's) is the limit, 0 (docs/design.md §1)
        assert torch.isnan(rgt)
        t = T.clone().requires_grad_(True)
        softcal.reference.cross_entropy(x, y, temperature=t, z_loss=0.02).backward()
        rgt = t.grad
    assert rel(loss, rl) < 1e-9
    assert rel(lse, rlse) < 1e-9
    assert rel(gx, rgx) < 1e-9
    assert rel(gt, rgt) < 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("C,opts", [(10, dict(z_loss=1e-2, softcap=3.0)),
                                    (1000, dict(z_loss=1e-2, eps=0.1)),
                                    (1000, dict(z_loss=1e-3, softcap=8.0, weight=True))])
def test_low_precision_no_worse_than_eager(dtype, mode, C, opts):
    """Errors against float64 no larger than eager PyTorch's composition in the same dtype."""
    x, y = make_case(64, C, dtype, seed=C)
    o = _opts(C, opts, dtype)
    T = torch.tensor(1.3, dtype=dtype)
    kw = dict(temperature=T, reduction="mean", z_loss=o.get("z_loss", 0.0),
              softcap=o.get("softcap"), weight=o.get("weight"))
    loss, lse, gx, gt = run(x, y, mode, label_smoothing=o.get("eps", 0.0), **kw)
    rl, rlse, rgx, rgt = oracle(x, y, eps=o.get("eps", 0.0),
                                **{**kw, "weight": None if o.get("weight") is None
                                   else o["weight"].double()})
    # eager PyTorch in the same dtype
    xe = x.detach().clone().requires_grad_(True)
    te = T.detach().clone().requires_grad_(True)
    el, else_ = composition(xe, y, eps=o.get("eps", 0.0), **{**kw, "temperature": te})
    el.backward()
    ulp = torch.finfo(dtype).eps
    for mine, eager, ref in ((loss, el.detach(), rl), (lse, else_.detach(), rlse),
                             (gx, xe.grad, rgx), (gt, te.grad, rgt)):
        assert rel(mine, ref) <= max(1.5 * rel(eager, ref), 2 * ulp), (rel(mine, ref), rel(eager, ref))


@pytest.mark.parametrize("mode", MODES)
def test_all_rows_ignored_and_defaults_unchanged(mode):
    x, y = make_case(8, 40, torch.float64)
    y[:] = -100
    loss, lse, gx, _ = run(x, y, mode, temperature=1.0, z_loss=0.1, softcap=3.0, reduction="sum")
    assert loss.item() == 0 and torch.count_nonzero(gx) == 0
    assert rel(lse, torch.logsumexp(3.0 * torch.tanh(x / 3.0), -1)) < 1e-12
    # the defaults are the plain loss, bit for bit
    x, y = make_case(32, 50, torch.float32)
    a = softcal.cross_entropy(x, y, z_loss=0.0, softcap=None, return_lse=False)
    assert torch.equal(a, softcal.cross_entropy(x, y))


def test_module_options():
    x, y = make_case(16, 30, torch.float64)
    m = softcal.nn.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-2, softcap=5.0, return_lse=True)
    loss, lse = m(x, y)
    rl, rlse = composition(x, y, eps=0.1, z_loss=1e-2, softcap=5.0)
    assert rel(loss, rl) < 1e-9 and rel(lse, rlse) < 1e-9
    assert "z_loss=0.01" in repr(m) and "softcap=5.0" in repr(m)


def test_bad_options_raise():
    x, y = make_case(4, 6, torch.float32)
    with pytest.raises(ValueError, match="z_loss"):
        softcal.cross_entropy(x, y, z_loss=-1.0)
    with pytest.raises(ValueError, match="z_loss"):
        softcal.cross_entropy(x, y, z_loss=math.nan)
    with pytest.raises(ValueError, match="softcap"):
        softcal.cross_entropy(x, y, softcap=0.0)
    with pytest.raises(TypeError, match="softcap"):
        softcal.cross_entropy(x, y, softcap="3")
    with pytest.raises(TypeError, match="return_lse"):
        softcal.cross_entropy(x, y, return_lse=1)
    with pytest.raises(ValueError, match="z_loss"):
        softcal.nn.CrossEntropyLoss(z_loss=-0.5)
    # the op's own checks
    with pytest.raises(RuntimeError, match="softcap"):
        torch.ops.softcal.cross_entropy_fwd(x, y, None, None, 1.0, 0.0, -100, 1, 0.0, -2.0, False)


@pytest.mark.parametrize("option", [dict(z_loss=0.1), dict(softcap=2.0), dict(return_lse=True)])
def test_probability_targets_raise(option):
    x = torch.randn(4, 5)
    p = torch.softmax(torch.randn(4, 5), -1)
    name = next(iter(option))
    with pytest.raises(NotImplementedError, match=name):
        softcal.cross_entropy(x, p, **option)


def test_opcheck_changed_ops():
    from torch.library import opcheck

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 33, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 5, -100, 32, 7, 1])
    T = torch.tensor(1.3, dtype=torch.float64)
    w = torch.rand(33, generator=g, dtype=torch.float64) + 0.5
    ops = torch.ops.softcal
    for red in (0, 1, 2):
        for zl, cap in ((0.1, 0.0), (0.0, 3.0), (0.05, 4.0)):
            opcheck(ops.cross_entropy_fwd, (x.clone().requires_grad_(), y, w, T, 1.0, 0.1, -100, red,
                                            zl, cap, True))
            _, lse, denom = ops.cross_entropy_fwd(x, y, w, T, 1.0, 0.1, -100, red, zl, cap, False)
            gl = torch.randn(6, dtype=torch.float64) if red == 0 else torch.tensor(1.5, dtype=torch.float64)
            opcheck(ops.cross_entropy_bwd, (gl, x, y, w, lse, denom, T, 1.0, 0.1, -100, red, True,
                                            True, zl, cap))
            lse_out = torch.empty(6, 2, dtype=torch.float64)
            opcheck(ops.cross_entropy_fused, (x.clone().requires_grad_(), y, w, T, 1.0, 0.1, -100, red,
                                              True, zl, cap))
            opcheck(ops.cross_entropy_fused_, (x.clone(), y, w, T, 1.0, 0.1, -100, red, True, zl, cap,
                                               lse_out))
            opcheck(ops.cross_entropy_fused_, (x.clone(), y, w, T, 1.0, 0.1, -100, red, True, zl, cap))


@pytest.mark.parametrize("fused", [False, True])
def test_compiled_training_step(fused):
    """The forward traced whole by torch.compile(fullgraph=True) (the backward graph by AOT
    autograd); the same values and gradients as eager, and as the composition."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 40, dtype=torch.float64)
    T = torch.nn.Parameter(torch.tensor(1.2, dtype=torch.float64))
    x = torch.randn(32, 16, dtype=torch.float64)
    y = torch.randint(0, 40, (32,))
    y[::7] = -100
    params = (*lin.parameters(), T)

    def step(x, y):
        return softcal.cross_entropy(lin(x), y, temperature=T, label_smoothing=0.1, z_loss=1e-2,
                                     softcap=4.0, return_lse=True, fused=fused, inplace=fused)

    def run(fn):
        for p in params:
            p.grad = None
        loss, lse = fn(x, y)
        loss.backward()
        return [loss.detach(), lse] + [p.grad.clone() for p in params]

    got = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    eager = run(step)
    for a, b in zip(got, eager):
        assert rel(a, b) < 1e-12
    for p in params:
        p.grad = None
    ref, ref_lse = composition(lin(x), y, temperature=T, eps=0.1, z_loss=1e-2, softcap=4.0)
    ref.backward()
    assert rel(eager[0], ref.detach()) < 1e-9 and rel(eager[1], ref_lse.detach()) < 1e-9
    for a, p in zip(eager[2:], params):
        assert rel(a, p.grad) < 1e-9


def test_double_backward_uses_the_composition():
    x, y = make_case(6, 9, torch.float64, ignore=False)
    x.requires_grad_(True)
    loss = softcal.cross_entropy(x, y, z_loss=0.1, softcap=2.0)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    (hv,) = torch.autograd.grad(g.sum(), x)
    xd = x.detach().clone().requires_grad_(True)
    ref, _ = composition(xd, y, z_loss=0.1, softcap=2.0)
    (gr,) = torch.autograd.grad(ref, xd, create_graph=True)
    (hr,) = torch.autograd.grad(gr.sum(), xd)
    assert rel(g, gr) < 1e-9 and rel(hv, hr) < 1e-9


@pytest.mark.parametrize("mode", ["fused", "inplace"])
def test_long_rows(mode):
    """Rows too long to be held in registers (the CUDA fused kernel's two-read path)."""
    x, y = make_case(3, 20000, torch.float64, ignore=False, seed=11)
    y[1] = -100
    T = torch.tensor(1.1, dtype=torch.float64)
    kw = dict(temperature=T, reduction="sum", z_loss=1e-3, softcap=6.0)
    loss, lse, gx, gt = run(x, y, mode, label_smoothing=0.05, **kw)
    rl, rlse, rgx, rgt = oracle(x, y, eps=0.05, **kw)
    for a, b in ((loss, rl), (lse, rlse), (gx, rgx), (gt, rgt)):
        assert rel(a, b) < 1e-9


@pytest.mark.skipif(not EMULATE_CUDA, reason="the thread schedule is the CUDA emulator's")
@pytest.mark.parametrize("C", [10, 300, 20000])
def test_emulated_results_do_not_depend_on_the_schedule(C):
    """The CUDA kernels with the LLM terms (tile, row and long-row paths) give bitwise the same
    outputs whatever the order of the threads between barriers."""
    from conftest import EMU_OPS
    import emulator as emu_build

    x, y = make_case(40 if C < 1000 else 3, C, torch.float32, seed=C)
    w = torch.rand(C, generator=torch.Generator().manual_seed(1)) + 0.5
    T = torch.tensor(1.3)
    ops = torch.ops.softcal
    outs = []
    try:
        for sched, seed in (("forward", 0), ("reverse", 0), ("random", 1)):
            EMU_OPS.emu_set_schedule(sched, seed)
            lse_out = torch.empty(x.shape[0], 2)
            fwd = ops.cross_entropy_fwd(x, y, w, T, 1.0, 0.1, -100, 1, 0.01, 4.0, True)
            xc = x.clone()
            fused = ops.cross_entropy_fused_(xc, y, w, T, 1.0, 0.1, -100, 1, True, 0.01, 4.0, lse_out)
            fused = (*fused, xc)
            bwd = ops.cross_entropy_bwd(torch.tensor(1.0), x, y, w, fwd[1], fwd[2], T, 1.0, 0.1,
                                        -100, 1, True, True, 0.01, 4.0)
            outs.append([*fwd, *fused, lse_out, *bwd])
    finally:
        emu_build.configure(EMU_OPS)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)
