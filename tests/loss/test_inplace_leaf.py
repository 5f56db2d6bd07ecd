"""fused=True, inplace=True on a leaf that requires grad (issue 18, item 10): refused, as
PyTorch's own in-place ops refuse it, instead of overwriting an nn.Parameter with its gradient."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import softcal

LEAF = r"a leaf Variable that requires grad is being used in an in-place operation"


def _case(c=7):
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, c, generator=g), torch.randint(0, c, (5,), generator=g)


@pytest.mark.parametrize("how", ["function", "module", "label_smoothing_loss", "soft_target"])
@pytest.mark.parametrize("leaf_kind", ["parameter", "requires_grad", "view"])
def test_inplace_on_a_leaf_is_refused_and_leaves_it_intact(how, leaf_kind):
    x, t = _case()
    p = torch.nn.Parameter(x.clone())
    leaf = p if leaf_kind == "parameter" else x.clone().requires_grad_()
    logits = leaf[:, :] if leaf_kind == "view" else leaf   # a view of a leaf is refused too
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match=LEAF):
        if how == "function":
            softcal.cross_entropy(logits, t, fused=True, inplace=True)
        elif how == "module":
            softcal.nn.CrossEntropyLoss(fused=True, inplace=True)(logits, t)
        elif how == "label_smoothing_loss":
            softcal.nn.LabelSmoothingLoss(0.1, fused=True, inplace=True)(logits, t)
        else:
            soft = torch.softmax(torch.randn_like(x), 1)
            softcal.cross_entropy(logits, soft, fused=True, inplace=True)
    assert torch.equal(leaf.detach(), before), "the leaf's values were overwritten"
    with torch.no_grad():                                  # no gradient: nothing is written
        softcal.cross_entropy(logits, t, fused=True, inplace=True)
    assert torch.equal(leaf.detach(), before)


def test_inplace_on_a_layer_output_still_works():
    x, t = _case()
    lin = torch.nn.Linear(7, 7)
    out = lin(x)                                           # not a leaf: written in place
    softcal.cross_entropy(out, t, fused=True, inplace=True).backward()
    ref = torch.nn.Linear(7, 7)
    ref.load_state_dict(lin.state_dict())
    torch.nn.functional.cross_entropy(ref(x), t).backward()
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_vocab_parallel_inplace_on_a_leaf_is_refused():
    from softcal.distributed import vocab_parallel_cross_entropy

    x, t = _case()
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}",
                                rank=0, world_size=1)
        try:
            p = torch.nn.Parameter(x.clone())
            with pytest.raises(RuntimeError, match=LEAF):
                vocab_parallel_cross_entropy(p, t, fused=True, inplace=True)
            assert torch.equal(p.detach(), x)
            loss = vocab_parallel_cross_entropy(p * 1.0, t, fused=True, inplace=True)
            loss.backward()
            assert p.grad is not None and torch.equal(p.detach(), x)
        finally:
            dist.destroy_process_group()
