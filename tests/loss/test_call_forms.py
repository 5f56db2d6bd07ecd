"""PyTorch's call forms: softcal.cross_entropy takes F.cross_entropy's arguments in F.cross_entropy's
order (softcal's own keyword-only after them), and softcal.nn.CrossEntropyLoss is a
torch.nn.CrossEntropyLoss."""

import inspect
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import softcal


def _case(device, n=6, c=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=g, dtype=torch.float64).to(device)
    t = torch.randint(0, c, (n,), generator=g).to(device)
    t[1] = 3
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(device)
    return x, t, w


def test_functional_signature_is_pytorchs():
    ours = inspect.signature(softcal.cross_entropy).parameters
    theirs = inspect.signature(F.cross_entropy).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    for name, p in theirs.items():
        assert (ours[name].default, ours[name].kind) == (p.default, p.kind), name
    for extra in list(ours)[len(theirs):]:
        assert ours[extra].kind == inspect.Parameter.KEYWORD_ONLY, extra
    assert {"temperature", "fused", "inplace"} <= set(ours)


@pytest.mark.parametrize("path", ["plain", "fused", "probabilities"])
def test_functional_positional_weight_as_pytorch(device, path):
    """cross_entropy(x, t, w) passes class weights (it raised TypeError: weight was keyword-only)."""
    x, t, w = _case(device)
    if path == "probabilities":
        t = torch.softmax(torch.randn_like(x), 1)
    kw = dict(fused=True) if path == "fused" else {}
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ours = softcal.cross_entropy(xa, t, w, None, -100, None, "sum", 0.1, **kw)
    theirs = F.cross_entropy(xb, t, w, None, -100, None, "sum", 0.1)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    # PyTorch's keywords, input= included
    torch.testing.assert_close(softcal.cross_entropy(input=x, target=t, weight=w),
                               F.cross_entropy(input=x, target=t, weight=w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size_average,reduce", list(itertools.product([None, True, False], repeat=2)))
def test_functional_legacy_arguments_as_pytorch(device, size_average, reduce):
    """size_average / reduce are taken by the functional form as by F.cross_entropy: the same
    reduction, the same deprecation warning (they were refused)."""
    x, t, w = _case(device)
    with warnings.catch_warnings(record=True) as wo:
        warnings.simplefilter("always")
        ours = softcal.cross_entropy(x, t, w, size_average, 3, reduce, "sum", 0.1)
    with warnings.catch_warnings(record=True) as wt:
        warnings.simplefilter("always")
        theirs = F.cross_entropy(x, t, w, size_average, 3, reduce, "sum", 0.1)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert [str(m.message) for m in wo] == [str(m.message) for m in wt]
    assert all(issubclass(m.category, UserWarning) for m in wo)
    if wo:  # the warning points at the caller, as PyTorch's does
        assert wo[0].filename == __file__


def test_functional_extras_are_keyword_only():
    x, t, w = _case("cpu")
    with pytest.raises(TypeError):
        softcal.cross_entropy(x, t, w, None, -100, None, "mean", 0.0, 2.0)


def test_module_is_a_torch_cross_entropy_loss():
    """Training frameworks check isinstance(loss_fn, torch.nn.CrossEntropyLoss): it holds, and
    the module keeps softcal's forward (the temperature applies)."""
    for m in (softcal.nn.CrossEntropyLoss(), softcal.nn.CrossEntropyLoss(fused=True),
              softcal.nn.LabelSmoothingLoss(0.1), softcal.CrossEntropyLoss(temperature=2.0)):
        assert isinstance(m, torch.nn.CrossEntropyLoss)
        assert isinstance(m, torch.nn.modules.loss._WeightedLoss)
    x, t, w = _case("cpu")
    m = softcal.nn.CrossEntropyLoss(w, ignore_index=3, label_smoothing=0.1, temperature=2.0)
    torch.testing.assert_close(m(x, t), F.cross_entropy(x / 2, t, w, ignore_index=3,
                                                          label_smoothing=0.1))
    assert (m.ignore_index, m.reduction, m.label_smoothing) == (3, "mean", 0.1)
    assert torch.equal(m.weight, w) and "weight" in dict(m.named_buffers())
    assert "weight" not in softcal.nn.CrossEntropyLoss().state_dict()
    # the state_dict loads both ways with PyTorch's module
    theirs = torch.nn.CrossEntropyLoss(w)
    theirs.load_state_dict(m.state_dict())
    m.load_state_dict(theirs.state_dict())
