"""A true drop-in for torch.nn.CrossEntropyLoss: every layout PyTorch accepts on every path,
in-place mode declared to autograd, double backward, the module's signature, backend()."""

import inspect
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import softcal

# --------------------------------------------------------------------------- layouts
# Each layout maps a contiguous float64 tensor `a` of the logical shape to a tensor with the same
# values in another memory layout (a view wherever PyTorch makes one).


def _transposed2d(a):          # (N, C) stored as (C, N)
    return a.t().contiguous().t()


def _row_sliced(a):            # every other row of a twice-as-tall buffer
    buf = torch.zeros((2 * a.shape[0],) + a.shape[1:], dtype=a.dtype)
    buf[::2] = a
    return buf[::2]


def _class_sliced(a):          # every other class of a twice-as-wide buffer (class stride 2)
    buf = torch.zeros(a.shape[:1] + (2 * a.shape[1],) + a.shape[2:], dtype=a.dtype)
    buf[:, ::2] = a
    return buf[:, ::2]


def _narrowed(a):              # a window of a wider buffer (row stride C + 3)
    buf = torch.zeros(a.shape[0], a.shape[1] + 3, dtype=a.dtype)
    buf[:, 1:a.shape[1] + 1] = a
    return buf[:, 1:a.shape[1] + 1]


def _strided1d(a):             # (C,) with stride 2
    buf = torch.zeros(2 * a.shape[0], dtype=a.dtype)
    buf[::2] = a
    return buf[::2]


def _classes_last(a):          # (N, C, d...) stored as (N, d..., C)
    return a.movedim(1, -1).contiguous().movedim(-1, 1)


def _spatial_sliced(a):        # last spatial dim taken every other element
    buf = torch.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
    buf[..., ::2] = a
    return buf[..., ::2]


def _batch_major_last(a):      # (N, C, d...) stored as (d..., C, N): batch stride 1
    return a.permute(*range(2, a.dim()), 1, 0).contiguous().permute(a.dim() - 1, a.dim() - 2,
                                                                     *range(a.dim() - 2))


LAYOUTS = {
    "contiguous": lambda a: a,
    "transposed": _transposed2d,
    "row_sliced": _row_sliced,
    "class_sliced": _class_sliced,
    "narrowed": _narrowed,
    "strided_1d": _strided1d,
    "classes_last": _classes_last,
    "channels_last": lambda a: a.contiguous(memory_format=torch.channels_last),
    "channels_last_3d": lambda a: a.contiguous(memory_format=torch.channels_last_3d),
    "spatial_sliced": _spatial_sliced,
    "batch_major_last": _batch_major_last,
}

# (logical shape, layouts that apply); N = 0 and 1 everywhere
SHAPES = [
    ((5,), ["contiguous", "strided_1d"]),
    ((1,), ["contiguous", "strided_1d"]),
    ((0, 5), ["contiguous", "transposed", "class_sliced", "narrowed"]),
    ((1, 5), ["contiguous", "transposed", "row_sliced", "class_sliced", "narrowed"]),
    ((4, 5), ["contiguous", "transposed", "row_sliced", "class_sliced", "narrowed"]),
    ((3, 1), ["contiguous", "transposed", "class_sliced"]),
    ((1, 5, 7), ["contiguous", "classes_last", "spatial_sliced", "class_sliced", "batch_major_last"]),
    ((2, 5, 7), ["contiguous", "classes_last", "spatial_sliced", "class_sliced", "batch_major_last"]),
    ((0, 5, 3), ["contiguous", "classes_last"]),
    ((1, 21, 8, 8), ["contiguous", "channels_last", "spatial_sliced", "class_sliced"]),
    ((2, 4, 3, 3), ["contiguous", "channels_last", "spatial_sliced", "batch_major_last"]),
    ((1, 5, 4, 4, 4), ["contiguous", "channels_last_3d", "spatial_sliced"]),
    ((2, 3, 2, 3, 2), ["channels_last_3d", "classes_last"]),
    ((1, 1, 4, 4), ["contiguous", "channels_last"]),
]

# expanded views: a stride-0 dimension over a smaller base
EXPANDED = {
    "rows_expanded": ((4, 5), (1, 5)),
    "classes_expanded": ((4, 5), (4, 1)),
    "vector_expanded": ((5,), (1,)),
    "spatial_expanded": ((2, 5, 3, 4), (2, 5, 1, 4)),
    "batch1_expanded": ((1, 5, 6), (1, 5, 1)),
}

CASES = [(shape, lay) for shape, lays in SHAPES for lay in lays] + \
        [(shape, name) for name, (shape, _) in EXPANDED.items()]

PATHS = ["autograd", "fused", "inplace", "no_grad", "CrossEntropyLoss", "LabelSmoothingLoss"]


def _leaf_and_logits(shape, layout, device, seed=0):
    """A float64 leaf and logits of `shape` in `layout` computed from it (a non-leaf, so that
    inplace=True may overwrite it)."""
    g = torch.Generator().manual_seed(seed)
    base_shape = EXPANDED[layout][1] if layout in EXPANDED else shape
    leaf = (torch.randn(base_shape, generator=g, dtype=torch.float64) * 3).to(device).requires_grad_()
    if layout in EXPANDED:
        logits = (leaf * 1.0).expand(shape)
        assert 0 in logits.stride() or logits.numel() <= 1
    else:
        logits = LAYOUTS[layout](leaf * 1.0)
    assert tuple(logits.shape) == tuple(shape)
    return leaf, logits


def _target(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    c = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])
    t = torch.randint(0, c, tshape, generator=g)
    if t.dim() >= 1 and t.numel() > 2:
        t.view(-1)[1] = -100
    return t.to(device)


def _run(path, logits, target, reduction, eps, w):
    kw = dict(reduction=reduction, weight=w)
    if path == "autograd":
        return softcal.cross_entropy(logits, target, label_smoothing=eps, **kw)
    if path == "fused":
        return softcal.cross_entropy(logits, target, label_smoothing=eps, fused=True, **kw)
    if path == "inplace":
        return softcal.cross_entropy(logits, target, label_smoothing=eps, fused=True, inplace=True,
                                     **kw)
    if path == "no_grad":
        with torch.no_grad():
            return softcal.cross_entropy(logits, target, label_smoothing=eps, **kw)
    if path == "CrossEntropyLoss":
        return softcal.nn.CrossEntropyLoss(label_smoothing=eps, **kw)(logits, target)
    return softcal.nn.LabelSmoothingLoss(label_smoothing=eps, fused=True, **kw)(logits, target)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape,layout", CASES, ids=[f"{s}-{l}" for s, l in CASES])
def test_every_layout_on_every_path(device, shape, layout, path):
    """Loss and gradient equal PyTorch's (float64) for every layout, batch size 1 K-dim inputs
    and class-strided 1-D logits included (they raised "unit stride along classes" before)."""
    c = shape[0] if len(shape) == 1 else shape[1]
    for reduction, eps, weighted in [("mean", 0.1, True), ("none", 0.0, False), ("sum", 0.2, False)]:
        leaf, logits = _leaf_and_logits(shape, layout, device)
        t = _target(shape, device)
        w = torch.linspace(0.5, 1.5, c, dtype=torch.float64, device=device) if weighted else None
        ref_leaf, ref_logits = _leaf_and_logits(shape, layout, device)
        ref_logits = ref_logits.contiguous()
        ref = F.cross_entropy(ref_logits, t, weight=w, reduction=reduction, label_smoothing=eps)
        loss = _run(path, logits, t, reduction, eps, w)
        assert loss.shape == ref.shape and loss.dtype == ref.dtype
        torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-12, atol=1e-12,
                                   equal_nan=True)
        if path == "no_grad":
            assert not loss.requires_grad
            continue
        go = torch.linspace(0.5, 1.5, ref.numel(), dtype=torch.float64, device=device).reshape(ref.shape)
        (g,) = torch.autograd.grad(loss, leaf, go)
        (gr,) = torch.autograd.grad(ref, ref_leaf, go)
        # atol: classes_expanded has an exactly-zero gradient, computed with rounding
        torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-14 * max([1.0] + gr.abs().flatten().tolist()))


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("shape,layout", CASES, ids=[f"{s}-{l}" for s, l in CASES])
def test_softmax_every_layout(device, shape, layout, log):
    fn, ref_fn = (softcal.log_softmax, torch.log_softmax) if log else (softcal.softmax, torch.softmax)
    dim = 0 if len(shape) == 1 else 1
    leaf, x = _leaf_and_logits(shape, layout, device)
    ref_leaf, rx = _leaf_and_logits(shape, layout, device)
    out = fn(x, 1.5, dim)
    ref = ref_fn(rx.contiguous() / 1.5, dim)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
    (g,) = torch.autograd.grad(out, leaf, go)
    (gr,) = torch.autograd.grad(ref, ref_leaf, go)
    torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-14 * max([1.0] + gr.abs().flatten().tolist()))


@pytest.mark.parametrize("t_layout", ["expanded", "transposed", "sliced", "int32_strided"])
def test_target_layouts(device, t_layout):
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=device)
    if t_layout == "expanded":
        t = torch.randint(0, 4, (1, 5), device=device).expand(3, 5)
    elif t_layout == "transposed":
        t = torch.randint(0, 4, (5, 3), device=device).t()
    elif t_layout == "sliced":
        t = torch.randint(0, 4, (3, 10), device=device)[:, ::2]
    else:
        t = torch.randint(0, 4, (3, 10), device=device, dtype=torch.int32)[:, 1::2]
    for fused in (False, True):
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        la = softcal.cross_entropy(xa, t, label_smoothing=0.1, fused=fused, reduction="none")
        lb = F.cross_entropy(xb, t.long(), label_smoothing=0.1, reduction="none")
        torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
        la.sum().backward()
        lb.sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)


def test_issue_examples_batch_one_and_strided_vector():
    """The exact inputs that raised: (1, 21, 8, 8), (1, 5, 7), (1, 5, 4, 4, 4), randn(10)[::2]."""
    torch.manual_seed(0)
    for shape in [(1, 21, 8, 8), (1, 5, 7), (1, 5, 4, 4, 4)]:
        x = torch.randn(shape)
        t = torch.randint(0, shape[1], (shape[0],) + shape[2:])
        torch.testing.assert_close(softcal.cross_entropy(x, t), F.cross_entropy(x, t))
        torch.testing.assert_close(softcal.nn.LabelSmoothingLoss(0.1)(x, t),
                                   F.cross_entropy(x, t, label_smoothing=0.1))
    v = torch.randn(10)[::2]
    torch.testing.assert_close(softcal.cross_entropy(v, torch.tensor(3)), F.cross_entropy(v, torch.tensor(3)))


# --------------------------------------------------------------------------- inplace=True is declared

def _softcal_softmax(a):
    return softcal.softmax(a, 1.0, 1)


@pytest.mark.parametrize("upstream", [torch.exp, torch.tanh, torch.sigmoid,
                                      lambda a: torch.softmax(a, 1), _softcal_softmax],
                         ids=["exp", "tanh", "sigmoid", "softmax", "softcal.softmax"])
@pytest.mark.parametrize("via", ["functional", "module"])
def test_inplace_after_an_op_that_saved_its_output_raises(device, upstream, via):
    """exp, tanh, sigmoid and softmax save their output for backward: overwriting it with the
    gradient must make autograd raise instead of giving a wrong gradient (it gave a.grad off by
    up to 1.35 before, with z._version still 0)."""
    a = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randint(0, 5, (6,), device=device)
    z = upstream(a)
    v0 = z._version
    if via == "functional":
        loss = softcal.cross_entropy(z, t, label_smoothing=0.1, fused=True, inplace=True)
    else:
        loss = softcal.nn.LabelSmoothingLoss(0.1, fused=True, inplace=True)(z, t)
    assert z._version > v0, "the in-place write must move the logits' version counter"
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("shape", [(6, 5), (5,), (2, 5, 3, 3)])
def test_inplace_after_a_linear_layer_keeps_working(device, shape):
    """A linear layer does not save its output: in-place mode must keep working there and give
    PyTorch's gradients; the version counter moves when the logits' own buffer is written."""
    torch.manual_seed(0)
    c = 5
    lin = torch.nn.Linear(4, c, dtype=torch.float64).to(device)
    ref = torch.nn.Linear(4, c, dtype=torch.float64).to(device)
    ref.load_state_dict(lin.state_dict())
    if len(shape) == 1:
        a = torch.randn(4, dtype=torch.float64, device=device)
        t = torch.tensor(2, device=device)
        z, zr = lin(a), ref(a)
    elif len(shape) == 2:
        a = torch.randn(shape[0], 4, dtype=torch.float64, device=device)
        t = torch.randint(0, c, (shape[0],), device=device)
        z, zr = lin(a), ref(a)
    else:  # a 1x1 convolution as a linear layer over channels, in channels-last memory
        a = torch.randn(shape[0], shape[2], shape[3], 4, dtype=torch.float64, device=device)
        t = torch.randint(0, c, (shape[0],) + shape[2:], device=device)
        z, zr = lin(a).permute(0, 3, 1, 2), ref(a).permute(0, 3, 1, 2)
    v0 = z._version
    loss = softcal.cross_entropy(z, t, label_smoothing=0.1, fused=True, inplace=True)
    assert z._version > v0
    loss.backward()
    F.cross_entropy(zr, t, label_smoothing=0.1).backward()
    for p, q in zip(lin.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-13)


def test_inplace_without_grad_leaves_logits_alone(device):
    x = torch.randn(4, 5, device=device)
    t = torch.randint(0, 5, (4,), device=device)
    before = x.clone()
    with torch.no_grad():
        softcal.cross_entropy(x, t, fused=True, inplace=True)
    assert torch.equal(x, before) and x._version == 0


# --------------------------------------------------------------------------- double backward

def _temperature(kind, device):
    if kind == "tensor":
        return torch.tensor(1.3, dtype=torch.float64, device=device, requires_grad=True)
    return 1.3


def _ce_case(device, n=5, c=4, extra=(), ignore_index=-100):
    g = torch.Generator().manual_seed(11)
    x = torch.randn((n, c) + extra, generator=g, dtype=torch.float64).to(device).requires_grad_()
    t = torch.randint(0, c, (n,) + extra, generator=g)
    t.view(-1)[0] = ignore_index
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(device)
    return x, t.to(device), w


@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("temp", ["float", "tensor"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradgradcheck_cross_entropy(device, reduction, eps, weighted, temp, ignore_index):
    x, t, w = _ce_case(device, ignore_index=ignore_index)
    T = _temperature(temp, device)
    w = w if weighted else None

    if temp == "tensor":
        def f(x_, T_):
            return softcal.cross_entropy(x_, t, temperature=T_, label_smoothing=eps, weight=w,
                                         reduction=reduction, ignore_index=ignore_index)
        inputs = (x, T)
    else:
        def f(x_):
            return softcal.cross_entropy(x_, t, temperature=T, label_smoothing=eps, weight=w,
                                         reduction=reduction, ignore_index=ignore_index)
        inputs = (x,)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradgradcheck_cross_entropy_k_dim(device, reduction):
    x, t, w = _ce_case(device, n=2, c=3, extra=(2, 2))
    T = _temperature("tensor", device)
    f = lambda x_, T_: softcal.cross_entropy(x_, t, temperature=T_, label_smoothing=0.1, weight=w,  # noqa: E731
                                             reduction=reduction)
    assert torch.autograd.gradgradcheck(f, (x, T))


@pytest.mark.parametrize("temp", ["float", "tensor"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_matches_pytorch(device, reduction, temp):
    """Hessian-vector products and a gradient penalty equal PyTorch's (they were None before,
    with only a UserWarning)."""
    for extra, ignore_index in [((), -100), ((3,), 2)]:
        x, t, w = _ce_case(device, extra=extra, ignore_index=ignore_index)
        vals = []
        for impl in ("softcal", "torch"):
            xa = x.detach().clone().requires_grad_()
            T = _temperature(temp, device)
            if impl == "softcal":
                loss = softcal.cross_entropy(xa, t, temperature=T, label_smoothing=0.1, weight=w,
                                             reduction=reduction, ignore_index=ignore_index)
            else:
                loss = F.cross_entropy(xa / T, t, label_smoothing=0.1, weight=w,
                                       reduction=reduction, ignore_index=ignore_index)
            go = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64, device=device).reshape(loss.shape)
            ins = (xa, T) if temp == "tensor" else (xa,)
            grads = torch.autograd.grad(loss, ins, go, create_graph=True)
            assert all(gr.requires_grad for gr in grads)
            v = torch.cos(torch.arange(x.numel(), dtype=torch.float64, device=device)).reshape(x.shape)
            penalty = (grads[0] * v).sum() + grads[0].pow(2).sum()
            if temp == "tensor":
                penalty = penalty + grads[1] ** 2
            penalty.backward()
            assert xa.grad is not None
            vals.append((grads, xa.grad, T.grad if temp == "tensor" else None))
        (ga, hxa, hta), (gb, hxb, htb) = vals
        for p, q in zip(ga, gb):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(hxa, hxb, rtol=1e-10, atol=1e-12)
        if temp == "tensor":
            torch.testing.assert_close(hta, htb, rtol=1e-10, atol=1e-12)


def test_create_graph_first_derivative_equals_kernel_gradient(device):
    x, t, w = _ce_case(device, n=9, c=7)
    T = _temperature("tensor", device)
    loss = softcal.cross_entropy(x, t, temperature=T, label_smoothing=0.1, weight=w)
    g1 = torch.autograd.grad(loss, (x, T), retain_graph=True)
    g2 = torch.autograd.grad(loss, (x, T), create_graph=True)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("temp", ["float", "tensor"])
@pytest.mark.parametrize("dim", [0, -1])
@pytest.mark.parametrize("log", [False, True])
def test_gradgradcheck_softmax(device, log, dim, temp):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    fn = softcal.log_softmax if log else softcal.softmax
    if temp == "tensor":
        T = _temperature("tensor", device)
        assert torch.autograd.gradgradcheck(lambda a, b: fn(a, b, dim), (x, T))
    else:
        assert torch.autograd.gradgradcheck(lambda a: fn(a, 0.7, dim), (x,))


@pytest.mark.parametrize("temp", ["float", "tensor"])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_double_backward_with_masked_logits(device, log, temp):
    """Masked logits (-inf) are constants: the second derivatives with respect to the finite
    logits and T pass gradgradcheck, and the create_graph first derivative equals the kernel's
    (masked logits contribute 0 to dL/dT, csrc/common.h)."""
    g = torch.Generator().manual_seed(9)
    xf = torch.randn(4, 6, generator=g, dtype=torch.float64).to(device).requires_grad_()
    mask = torch.zeros(4, 6, dtype=torch.bool, device=device)
    mask[0, 2] = mask[2, 0] = mask[2, 5] = True
    fn = softcal.log_softmax if log else softcal.softmax
    T = _temperature(temp, device)

    def f(xf_, T_=T):
        return fn(xf_.masked_fill(mask, -float("inf")), T_, -1)

    inputs = (xf, T) if temp == "tensor" else (xf,)
    assert torch.autograd.gradgradcheck(f, inputs)
    x = xf.detach().masked_fill(mask, -float("inf")).requires_grad_()
    go = torch.randn(4, 6, generator=g, dtype=torch.float64).to(device)
    ins = (x, T) if temp == "tensor" else (x,)
    first = torch.autograd.grad(fn(x, T, -1), ins, go)
    second = torch.autograd.grad(fn(x, T, -1), ins, go, create_graph=True)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)


def test_fused_double_backward_refuses_clearly(device):
    x, t, _ = _ce_case(device)
    loss = softcal.cross_entropy(x, t, fused=True)
    with pytest.raises(RuntimeError, match=r"fused=True.*double backward.*fused=False"):
        torch.autograd.grad(loss, x, create_graph=True)


# --------------------------------------------------------------------------- the module

def test_cross_entropy_loss_signature_is_pytorchs():
    ours = inspect.signature(softcal.nn.CrossEntropyLoss.__init__).parameters
    theirs = inspect.signature(torch.nn.CrossEntropyLoss.__init__).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert (ours[name].default, ours[name].kind) == (p.default, p.kind), name
    for extra in ("temperature", "fused", "inplace"):
        assert ours[extra].kind == inspect.Parameter.KEYWORD_ONLY
    fwd = inspect.signature(softcal.nn.CrossEntropyLoss.forward).parameters
    assert list(fwd) == list(inspect.signature(torch.nn.CrossEntropyLoss.forward).parameters)
    assert softcal.CrossEntropyLoss is softcal.nn.CrossEntropyLoss
    assert "CrossEntropyLoss" in softcal.__all__ and "CrossEntropyLoss" in softcal.nn.__all__


@pytest.mark.parametrize("size_average,reduce", list(itertools.product([None, True, False], repeat=2)))
def test_cross_entropy_loss_legacy_arguments_as_pytorch(device, size_average, reduce):
    x, t, w = _ce_case(device, n=6, c=5, ignore_index=3)
    x = x.detach()
    with warnings.catch_warnings(record=True) as wo:
        warnings.simplefilter("always")
        ours = softcal.nn.CrossEntropyLoss(w, size_average, 3, reduce, "sum", 0.1)
    with warnings.catch_warnings(record=True) as wt:
        warnings.simplefilter("always")
        theirs = torch.nn.CrossEntropyLoss(w, size_average, 3, reduce, "sum", 0.1)
    assert ours.reduction == theirs.reduction
    assert [str(m.message) for m in wo] == [str(m.message) for m in wt]
    assert all(issubclass(m.category, UserWarning) for m in wo)
    torch.testing.assert_close(ours(x, t), theirs(x, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours(input=x, target=t), theirs(input=x, target=t), rtol=1e-12, atol=1e-12)
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_cross_entropy_loss_extras_and_state():
    x, t, w = _ce_case("cpu", n=6, c=5)
    x = x.detach()
    m = softcal.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1, temperature=2.0, fused=True)
    torch.testing.assert_close(m(x, t), F.cross_entropy(x / 2, t, weight=w, label_smoothing=0.1))
    assert torch.equal(m.state_dict()["weight"], w)
    m2 = softcal.nn.CrossEntropyLoss(label_smoothing=0.1)
    assert "weight" not in m2.state_dict()
    with pytest.raises(TypeError, match="temperature must be a float here"):
        softcal.nn.CrossEntropyLoss(temperature=torch.tensor(2.0))
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        softcal.nn.CrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor or None, got list"):
        softcal.nn.CrossEntropyLoss([1.0, 2.0])
    with pytest.raises(ValueError, match="inplace=True needs fused=True"):
        softcal.nn.CrossEntropyLoss(inplace=True)
    with pytest.raises(TypeError):
        softcal.nn.CrossEntropyLoss(None, None, -100, None, "mean", 0.0, 2.0)  # extras are keyword-only


def test_label_smoothing_loss_spellings():
    x, t, w = _ce_case("cpu", n=6, c=5)
    x = x.detach()
    ref = F.cross_entropy(x, t, label_smoothing=0.1)
    for m in (softcal.nn.LabelSmoothingLoss(), softcal.nn.LabelSmoothingLoss(0.1),
              softcal.nn.LabelSmoothingLoss(smoothing=0.1),
              softcal.nn.LabelSmoothingLoss(label_smoothing=0.1)):
        torch.testing.assert_close(m(x, t), ref)
        assert m.smoothing == m.label_smoothing == 0.1
    m = softcal.nn.LabelSmoothingLoss(label_smoothing=0.3, weight=w)
    torch.testing.assert_close(m(x, t), F.cross_entropy(x, t, weight=w, label_smoothing=0.3))
    with pytest.raises(TypeError, match=r"first argument is the smoothing.*weight="):
        softcal.nn.LabelSmoothingLoss(w)
    with pytest.raises(TypeError, match="not both"):
        softcal.nn.LabelSmoothingLoss(0.1, label_smoothing=0.2)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got -0.1"):
        softcal.nn.LabelSmoothingLoss(label_smoothing=-0.1)
    assert isinstance(m, softcal.nn.CrossEntropyLoss)


def test_modules_pass_the_target_through_unchanged(monkeypatch):
    """The modules hand any target to softcal.functional.cross_entropy as it is (class-probability
    targets are handled there)."""
    seen = []

    def spy(logits, target, **kw):
        seen.append(target)
        return logits.sum()

    monkeypatch.setattr(softcal.functional, "cross_entropy", spy)
    target = object()
    for m in (softcal.nn.CrossEntropyLoss(), softcal.nn.LabelSmoothingLoss()):
        m(torch.zeros(2, 3), target)
    assert seen == [target, target]


# --------------------------------------------------------------------------- backend()

def test_backend_is_a_query_with_a_clear_error():
    assert softcal.backend("cpu") == softcal.backend(torch.device("cpu"))
    assert softcal.backend("cpu") in ("extension", "reference")
    with pytest.raises(ValueError, match=r"device string such as 'cpu'.*got 'reference'.*selects nothing"):
        softcal.backend("reference")
    with pytest.raises(TypeError, match="got int"):
        softcal.backend(0)
    assert "query" in softcal.backend.__doc__


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "row_sliced", "class_sliced", "narrowed"])
@pytest.mark.parametrize("n", [0, 1, 6])
def test_temperature_stats_every_layout(device, layout, n):
    g = torch.Generator().manual_seed(2)
    x = LAYOUTS[layout](torch.randn(n, 5, generator=g, dtype=torch.float64) * 2).to(device)
    t = torch.randint(0, 5, (n,), generator=g).to(device)
    got = softcal.temperature_stats(x, t, 0.7)
    ref = softcal.reference.temperature_stats(x.contiguous(), t, 0.7)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
