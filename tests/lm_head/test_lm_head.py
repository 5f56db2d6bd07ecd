"""softcal.linear_cross_entropy (issue 19, items 1 and 4): values and gradients against the
issue's composition (F.linear, softcap, / T, F.cross_entropy, + z_loss lse^2) in float64, the
lower precisions against eager PyTorch's own error, torch's linear_cross_entropy as a second
oracle, and the edges (ignored chunks, every reduction with any upstream gradient, lse, repeated
and double backward, no N x V tensor, errors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import softcal
from conftest import rel_err
from lm_head_cases import OPTIONS, composition, leaves, make_problem

REDUCTIONS = ["mean", "sum", "none"]


def _ours(inp, prob, reduction, workspace_bytes, **kw):
    return softcal.linear_cross_entropy(
        inp["x"], inp["W"], prob["t"], linear_bias=inp["b"], weight=inp["w"],
        reduction=reduction, label_smoothing=prob["eps"], temperature=inp["T"],
        z_loss=prob["z_loss"], softcap=prob["softcap"], workspace_bytes=workspace_bytes, **kw)


def _reference(inp, prob, reduction):
    return composition(inp["x"], inp["W"], prob["t"], b=inp["b"], w=inp["w"],
                       reduction=reduction, eps=prob["eps"], T=inp["T"], z_loss=prob["z_loss"],
                       softcap=prob["softcap"])


def _upstream(loss, seed=3):
    g = torch.Generator().manual_seed(seed)
    if loss.dim() == 0:
        return torch.tensor(0.7, dtype=loss.dtype)
    return torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype)


def _grads(loss, leaves_, upstream):
    return torch.autograd.grad(loss, leaves_, upstream)


# ---------------------------------------------------------------------- float64: exact
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", list(OPTIONS))
def test_float64_matches_composition(case, reduction):
    """Loss and every gradient within 1e-9 relative; several chunks, the first ones entirely
    ignored; a random upstream gradient (per row for "none")."""
    V = 37
    prob = make_problem((5, 9), 8, V, torch.float64, opts=OPTIONS[case], ignore_first=20)
    inp, lv = leaves(prob, torch.float64)
    ref, _ = _reference(inp, prob, reduction)
    up = _upstream(ref)
    ref_g = _grads(ref, lv, up)
    inp2, lv2 = leaves(prob, torch.float64)
    out = _ours(inp2, prob, reduction, workspace_bytes=4 * V * 8)
    assert out.shape == ref.shape and out.dtype == torch.float64
    assert rel_err(out, ref) <= 1e-9
    for name, a, r in zip(["x", "W", "b/T", "T"], _grads(out, lv2, up), ref_g):
        assert rel_err(a, r) <= 1e-9, (name, rel_err(a, r))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["plain", "everything"])
def test_return_lse_values_and_gradient(case, reduction):
    """return_lse: lse(s) per row (ignored rows included), and a gradient through it."""
    V = 29
    prob = make_problem((31,), 6, V, torch.float64, opts=OPTIONS[case], ignore_first=3)
    inp, lv = leaves(prob, torch.float64)
    ref, ref_lse = _reference(inp, prob, reduction)
    r = torch.randn(ref_lse.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_g = _grads(ref.sum() + (ref_lse * r).sum(), lv, None)
    inp2, lv2 = leaves(prob, torch.float64)
    out, lse = _ours(inp2, prob, reduction, 5 * V * 8, return_lse=True)
    assert lse.shape == (31,) and lse.dtype == torch.float64
    assert rel_err(out, ref) <= 1e-9 and rel_err(lse, ref_lse) <= 1e-9
    for a, b in zip(_grads(out.sum() + (lse * r).sum(), lv2, None), ref_g):
        assert rel_err(a, b) <= 1e-9
    # the loss alone after return_lse=True: the lse takes no part
    inp3, lv3 = leaves(prob, torch.float64)
    out3, _ = _ours(inp3, prob, reduction, 5 * V * 8, return_lse=True)
    inp4, lv4 = leaves(prob, torch.float64)
    ref4, _ = _reference(inp4, prob, reduction)
    for a, b in zip(_grads(out3.sum(), lv3, None), _grads(ref4.sum(), lv4, None)):
        assert rel_err(a, b) <= 1e-9


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_every_row_ignored(reduction):
    """As PyTorch: "mean" gives NaN and zero gradients, "sum" 0, "none" zeros."""
    prob = make_problem((12,), 5, 11, torch.float64, opts=OPTIONS["smooth_weight_bias"],
                        ignore_first=12)
    inp, lv = leaves(prob, torch.float64)
    ref, _ = _reference(inp, prob, reduction)
    ref_g = _grads(ref, lv, torch.ones_like(ref))
    inp2, lv2 = leaves(prob, torch.float64)
    out = _ours(inp2, prob, reduction, 3 * 11 * 8)
    torch.testing.assert_close(out, ref, equal_nan=True)
    for a, b in zip(_grads(out, lv2, torch.ones_like(out)), ref_g):
        torch.testing.assert_close(a, b)
        assert not a.isnan().any()


def test_single_row_and_unbatched_input():
    """input (H,) with a 0-dim target, and a single class."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(13, 7, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.tensor(5)
    out = softcal.linear_cross_entropy(x, W, t, label_smoothing=0.1)
    ref = F.cross_entropy(F.linear(x, W), t, label_smoothing=0.1)
    assert out.shape == ()
    torch.testing.assert_close(out, ref)
    ga = torch.autograd.grad(out, [x, W])
    gb = torch.autograd.grad(ref, [x, W])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)
    W1 = torch.randn(1, 7, dtype=torch.float64, generator=g)
    out1 = softcal.linear_cross_entropy(x, W1, torch.tensor(0), reduction="none")
    torch.testing.assert_close(out1, torch.zeros((), dtype=torch.float64))


def test_empty_batch():
    x = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    for red in REDUCTIONS:
        out = softcal.linear_cross_entropy(x, W, t, reduction=red)
        ref = F.cross_entropy(F.linear(x, W), t, reduction=red)
        torch.testing.assert_close(out, ref, equal_nan=True)
    out = softcal.linear_cross_entropy(x, W, t, reduction="sum")
    gx, gW = torch.autograd.grad(out, [x, W])
    assert gx.shape == (0, 4) and torch.equal(gW, torch.zeros_like(W))


# ---------------------------------------------------------------------- lower precisions
# The error of each result against float64 must not exceed eager PyTorch's in the same dtype.
# Both share the dominant term (the logits rounded to the dtype by a GEMM), and the temperature's
# gradient is a sum that cancels heavily, so on one problem either error may be the smaller by
# chance: the errors are compared as root-mean-squares over four problems, within 1.25 x.
def _errors(prob, reduction, dtype):
    """Relative errors against float64 of (loss, gradients...): eager's and ours."""
    V = prob["W"].shape[0]
    inp64, lv64 = leaves(prob, torch.float64)
    ref, _ = _reference(inp64, prob, reduction)
    up64 = _upstream(ref)
    ref_g = _grads(ref, lv64, up64)
    inp_e, lv_e = leaves(prob, dtype)
    assert inp_e["x"].dtype == dtype and inp_e["W"].dtype == dtype  # the dtype reaches the inputs
    eager, _ = _reference(inp_e, prob, reduction)
    eager_g = _grads(eager, lv_e, up64.to(eager.dtype))
    inp_o, lv_o = leaves(prob, dtype)
    out = _ours(inp_o, prob, reduction, 20 * V * 8)
    assert out.dtype == dtype
    out_g = _grads(out, lv_o, up64.to(dtype))
    assert [g.dtype for g in out_g] == [g.dtype for g in eager_g]
    refs = [ref] + list(ref_g)
    return ([rel_err(e, r) for e, r in zip([eager] + list(eager_g), refs)],
            [rel_err(o, r) for o, r in zip([out] + list(out_g), refs)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["plain", "smooth_weight_bias", "everything"])
def test_low_precision_no_worse_than_eager(case, reduction, dtype):
    floor = {torch.float32: 1e-7, torch.bfloat16: 1e-3, torch.float16: 1e-4}[dtype]
    eager, ours = [], []
    for seed in range(4):
        e, o = _errors(make_problem((96,), 32, 300, dtype, opts=OPTIONS[case], seed=seed),
                       reduction, dtype)
        eager.append(e)
        ours.append(o)
    names = ["loss", "grad x", "grad W"] + ["grad b/T", "grad T"][: len(eager[0]) - 3]
    for k, name in enumerate(names):
        e = [row[k] for row in eager]
        o = [row[k] for row in ours]
        if not all(math.isfinite(v) for v in e):  # eager overflowed (float16 smoothing sums)
            assert max(o) <= 10 * floor, (name, o)
            continue
        rms_e = math.sqrt(sum(v * v for v in e) / len(e))
        rms_o = math.sqrt(sum(v * v for v in o) / len(o))
        assert rms_o <= max(1.25 * rms_e, floor), (name, rms_o, rms_e)


def _bf16_dw_error(monkeypatch=None):
    V = 64
    prob = make_problem((256,), 16, V, torch.bfloat16, opts={}, seed=5, ignore_every=0)
    inp64, _ = leaves(prob, torch.float64)
    ref, _ = _reference(inp64, prob, "sum")
    ref_gw = _grads(ref, [inp64["W"]], None)[0]
    inp_e, _ = leaves(prob, torch.bfloat16)
    eager, _ = _reference(inp_e, prob, "sum")
    eager_gw = _grads(eager, [inp_e["W"]], None)[0]
    inp_o, _ = leaves(prob, torch.bfloat16)
    out = _ours(inp_o, prob, "sum", workspace_bytes=1)  # 256 chunks of one row
    gw = _grads(out, [inp_o["W"]], None)[0]
    assert gw.dtype == torch.bfloat16
    return rel_err(gw, ref_gw), rel_err(eager_gw, ref_gw)


def test_half_weight_gradient_accumulates_in_float32(monkeypatch):
    """bfloat16 dW summed over 256 chunks of one row: as accurate as eager's one GEMM over all
    rows. The same test with the running sum rounded to bfloat16 after every chunk (what a
    bfloat16 accumulator does) fails it."""
    ours, eager = _bf16_dw_error()
    assert ours <= 1.25 * eager, (ours, eager)

    from softcal import _lm_head_chunks

    real = _lm_head_chunks._accumulate_dw

    def bf16_running_sum(gw, *args):
        real(gw, *args)
        gw.copy_(gw.to(torch.bfloat16))

    monkeypatch.setattr(_lm_head_chunks, "_accumulate_dw", bf16_running_sum)
    rounded, eager2 = _bf16_dw_error()
    assert rounded > 1.25 * eager2, (rounded, eager2)


# ---------------------------------------------------------------------- torch's own LM head
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("chunked", [False, True])
def test_against_torch_linear_cross_entropy(reduction, chunked):
    """torch.nn.functional.linear_cross_entropy (torch >= 2.12) as a second oracle, with its
    chunked path (no label smoothing there: it falls back to the logits) and without."""
    if not hasattr(F, "linear_cross_entropy"):
        pytest.skip("torch.nn.functional.linear_cross_entropy needs torch >= 2.12")
    from torch.nn import LinearCrossEntropyOptions

    prob = make_problem((40,), 12, 50, torch.float64, opts=dict(weighted=True, bias=True),
                        seed=2)
    eps = 0.0 if chunked else 0.1
    inp, lv = leaves(prob, torch.float64)
    theirs = F.linear_cross_entropy(inp["x"], inp["W"], prob["t"], linear_bias=inp["b"],
                                    weight=inp["w"], reduction=reduction, ignore_index=-100,
                                    label_smoothing=eps,
                                    options=LinearCrossEntropyOptions() if chunked else None)
    up = _upstream(theirs)
    their_g = _grads(theirs, lv, up)
    inp2, lv2 = leaves(prob, torch.float64)
    ours = softcal.linear_cross_entropy(inp2["x"], inp2["W"], prob["t"], linear_bias=inp2["b"],
                                        weight=inp2["w"], reduction=reduction,
                                        label_smoothing=eps, workspace_bytes=7 * 50 * 8)
    assert rel_err(ours, theirs) <= 1e-9
    for a, b in zip(_grads(ours, lv2, up), their_g):
        assert rel_err(a, b) <= 1e-9


# ---------------------------------------------------------------------- autograd edges
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("return_lse", [False, True])
def test_retain_graph_backward_twice(reduction, return_lse):
    prob = make_problem((17,), 6, 23, torch.float64, opts=OPTIONS["temperature_tensor"])
    inp, lv = leaves(prob, torch.float64)
    out = _ours(inp, prob, reduction, 4 * 23 * 8, return_lse=return_lse)
    loss = out[0] if return_lse else out
    loss = loss.sum() if reduction == "none" else loss
    loss.backward(retain_graph=True)
    first = [v.grad.clone() for v in lv]
    loss.backward()
    for v, f in zip(lv, first):
        torch.testing.assert_close(v.grad, 2 * f)
    inp2, lv2 = leaves(prob, torch.float64)
    ref, _ = _reference(inp2, prob, reduction)
    for a, b in zip(first, _grads(ref.sum(), lv2, None)):
        assert rel_err(a, b) <= 1e-9


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_raises(reduction):
    prob = make_problem((9,), 4, 7, torch.float64, opts={})
    inp, lv = leaves(prob, torch.float64)
    loss = _ours(inp, prob, reduction, 1 << 20).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, lv, create_graph=True)


def test_gradients_only_where_required():
    """A frozen output matrix gets no gradient (and no dW GEMM); a frozen input likewise."""
    prob = make_problem((10,), 4, 9, torch.float64, opts=dict(bias=True))
    x = prob["x"].clone().requires_grad_()
    W = prob["W"].clone()
    b = prob["b"].clone().requires_grad_()
    loss = softcal.linear_cross_entropy(x, W, prob["t"], linear_bias=b)
    loss.backward()
    assert W.grad is None and x.grad is not None and b.grad is not None
    ref = F.cross_entropy(F.linear(prob["x"].clone().requires_grad_(), W, prob["b"]), prob["t"])
    torch.testing.assert_close(loss, ref)
    with torch.no_grad():
        nog = softcal.linear_cross_entropy(x, W, prob["t"], linear_bias=b)
    assert not nog.requires_grad
    torch.testing.assert_close(nog, ref.detach())


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["plain", "everything"])
def test_never_the_logits(case, reduction):
    """No tensor of N x V elements is ever made: the largest is one chunk of the workspace
    (the composition, for contrast, makes several)."""
    N, H, V = 64, 8, 200
    prob = make_problem((N,), H, V, torch.float32, opts=OPTIONS[case])
    budget = 8 * V * 4
    inp, lv = leaves(prob, torch.float32)
    with _LargestTensor() as rec:
        loss = _ours(inp, prob, reduction, budget)
        torch.autograd.grad(loss.sum(), lv)
    assert rec.largest <= 8 * V, rec.largest
    inp2, lv2 = leaves(prob, torch.float32)
    with _LargestTensor() as rec_eager:
        ref, _ = _reference(inp2, prob, reduction)
        torch.autograd.grad(ref.sum(), lv2)
    assert rec_eager.largest >= N * V


def test_default_workspace_keeps_the_memory_target():
    """The default budget: a chunk of (8192, 256) x 32000 float32 is 1048 rows, 0.128 x the
    logits (the issue's target: 0.15 x beyond the inputs' gradients)."""
    from softcal._lm_head_chunks import DEFAULT_WORKSPACE_BYTES, bytes_per_logit, chunk_rows

    per = bytes_per_logit(torch.float32, True)
    rows = chunk_rows(8192, 32000, per, DEFAULT_WORKSPACE_BYTES)
    assert rows * 32000 * 4 <= 0.13 * 8192 * 32000 * 4


# ---------------------------------------------------------------------- errors
def _args(**over):
    x = torch.randn(4, 3)
    W = torch.randn(5, 3)
    t = torch.tensor([0, 1, 4, -100])
    kw = dict(input=x, linear_weight=W, target=t)
    kw.update(over)
    return kw


@pytest.mark.parametrize("over, exc, match", [
    (dict(target=torch.rand(4, 5)), TypeError, "class-probability targets are not supported"),
    (dict(target=torch.tensor([0, 1, 5, 2])), ValueError, r"target\[2\] = 5 is out of range"),
    (dict(target=torch.tensor([0, 1, 2])), ValueError, "target has shape"),
    (dict(linear_weight=torch.randn(5, 4)), ValueError, "linear_weight must be \\(V, H\\)"),
    (dict(linear_weight=torch.randn(5, 3, dtype=torch.float64)), TypeError,
     "linear_weight has dtype"),
    (dict(linear_weight=torch.randn(0, 3)), ValueError, "0 rows"),
    (dict(input=torch.randn(4, 3).to(torch.int32)), TypeError, "input must be float"),
    (dict(linear_bias=torch.randn(4)), ValueError, "linear_bias must have shape \\(5,\\)"),
    (dict(weight=torch.rand(6)), ValueError, "class weights"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be in"),
    (dict(temperature=0.0), ValueError, "temperature must be"),
    (dict(z_loss=-1.0), ValueError, "z_loss must be a finite number >= 0"),
    (dict(softcap=0.0), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=float("inf")), ValueError, "softcap must be"),
    (dict(workspace_bytes=0), ValueError, "workspace_bytes must be > 0"),
    (dict(workspace_bytes=1.5), TypeError, "workspace_bytes must be an int"),
    (dict(return_lse=1), TypeError, "return_lse must be a bool"),
])
def test_bad_arguments(over, exc, match):
    kw = _args(**over)
    with pytest.raises(exc, match=match):
        softcal.linear_cross_entropy(kw.pop("input"), kw.pop("linear_weight"), kw.pop("target"),
                                     **kw)


def test_class_weight_gradient_refused():
    kw = _args(weight=torch.rand(5, requires_grad=True))
    with pytest.raises(NotImplementedError, match="class weights"):
        softcal.linear_cross_entropy(kw["input"], kw["linear_weight"], kw["target"],
                                     weight=kw["weight"])


def test_ignore_index_none_means_minus_100():
    kw = _args()
    a = softcal.linear_cross_entropy(kw["input"], kw["linear_weight"], kw["target"],
                                     ignore_index=None)
    b = F.cross_entropy(F.linear(kw["input"], kw["linear_weight"]), kw["target"])
    torch.testing.assert_close(a, b)
    assert math.isfinite(float(a))
