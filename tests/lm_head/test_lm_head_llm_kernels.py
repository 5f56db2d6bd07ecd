"""The LM head's z-loss, soft-cap and lse through the compiled in-place kernel (issue 19 item 3:
phase 1 took an exact PyTorch path per chunk for them; phase 2 runs cross_entropy_fused_ with
the LLM terms). The composition of tests/lm_head_cases.py is the oracle."""

import pytest
import torch

import softcal
from softcal import _lm_head_chunks as chunks
from lm_head_cases import composition, make_problem

pytestmark = pytest.mark.skipif(softcal.backend("cpu") != "extension",
                                reason="needs the compiled extension (the kernels are under test)")


def test_the_kernel_takes_the_llm_terms():
    cpu = torch.device("cpu")
    assert chunks.use_kernel(cpu, 3.0, 0.1, True)
    assert chunks.use_kernel(cpu, 0.0, 1e-3, False)
    # a gradient reaching the returned lse keeps the PyTorch path (the kernels' lse is detached)
    assert not chunks.use_kernel(cpu, 3.0, 0.1, True, grad_lse=True)


def _run(prob, reduction, workspace_bytes, upstream=None, grad_lse=None):
    x = prob["x"].clone().requires_grad_()
    W = prob["W"].clone().requires_grad_()
    T = prob["T"].clone().requires_grad_() if isinstance(prob["T"], torch.Tensor) else prob["T"]
    loss, lse = softcal.linear_cross_entropy(
        x, W, prob["t"], weight=prob["w"], reduction=reduction, label_smoothing=prob["eps"],
        temperature=T, z_loss=prob["z_loss"], softcap=prob["softcap"], return_lse=True,
        workspace_bytes=workspace_bytes)
    out = (loss * upstream).sum() if upstream is not None else loss
    if grad_lse is not None:
        out = out + (lse * grad_lse).sum()
    out.backward()
    return loss.detach(), lse.detach(), x.grad, W.grad, T.grad if isinstance(T, torch.Tensor) else None


def _oracle(prob, reduction, upstream=None, grad_lse=None):
    x = prob["x"].clone().requires_grad_()
    W = prob["W"].clone().requires_grad_()
    T = prob["T"].clone().requires_grad_() if isinstance(prob["T"], torch.Tensor) else prob["T"]
    loss, lse = composition(x, W, prob["t"], w=prob["w"], reduction=reduction, eps=prob["eps"],
                            T=T, z_loss=prob["z_loss"], softcap=prob["softcap"])
    out = (loss * upstream).sum() if upstream is not None else loss
    if grad_lse is not None:
        out = out + (lse * grad_lse).sum()
    out.backward()
    return loss.detach(), lse.detach(), x.grad, W.grad, T.grad if isinstance(T, torch.Tensor) else None


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


OPTS = {
    "z_loss_weighted_mean": dict(z_loss=2e-2, weighted=True, eps=0.1, T="tensor"),
    "softcap_z_loss": dict(z_loss=1e-2, softcap=3.0, T="tensor"),
    "everything": dict(eps=0.2, weighted=True, T="tensor", z_loss=5e-3, softcap=4.0),
}


@pytest.mark.parametrize("name", list(OPTS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunks_through_the_kernel_match_the_composition(name, reduction):
    prob = make_problem((37,), 24, 300, torch.float64, opts=OPTS[name], seed=5, ignore_first=3)
    # 7 rows a chunk: several chunks, the last one short
    ws = 7 * 300 * 8
    up = torch.randn(37, dtype=torch.float64) if reduction == "none" else None
    got = _run(prob, reduction, ws, upstream=up)
    ref = _oracle(prob, reduction, upstream=up)
    for a, b in zip(got, ref):
        if b is not None:
            assert _rel(a, b) < 1e-9


def test_gradient_through_the_lse_keeps_the_exact_path():
    prob = make_problem((20,), 16, 90, torch.float64, opts=OPTS["everything"], seed=2)
    gl = torch.randn(20, dtype=torch.float64)
    got = _run(prob, "mean", 5 * 90 * 8, grad_lse=gl)
    ref = _oracle(prob, "mean", grad_lse=gl)
    for a, b in zip(got, ref):
        if b is not None:
            assert _rel(a, b) < 1e-9
