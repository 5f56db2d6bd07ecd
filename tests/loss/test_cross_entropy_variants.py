"""The LM-head terms (z-loss, soft-cap) as compile-time variants of the CPU cross-entropy paths
(issue 20): run_pass switches on them once (llm_switch, csrc/cpu/ce_row.h), and below that
point the row path (C > 32) and the tile path (C <= 32, float accumulation) are templates on
common.h's ZLoss and Softcap, so that a call without them runs kernels with no trace of them.
The tile path now takes the soft-capped calls too (before, every capped call took a separate
capped row path, one row at a time).

The numbers are checked against the float64 composition of tests/loss/test_cross_entropy_llm.py,
within what eager PyTorch achieves in the same dtype; the structure by reading the kernel
headers. Under SOFTCAL_EMULATE_CUDA=1 the numerical cases run the CUDA kernels.
"""

import pathlib
import re

import pytest
import torch

import softcal
from test_cross_entropy_llm import composition, make_case, oracle, rel, run

pytestmark = pytest.mark.skipif(softcal.backend("cpu") != "extension",
                                reason="needs the compiled extension (the kernels are under test)")

# the repository root: the first folder above this file that holds csrc/ (tests/ or tests/<group>/)
ROOT = next(d for d in pathlib.Path(__file__).resolve().parents if (d / "csrc").is_dir())
CPU = ROOT / "csrc" / "cpu"
OPTIONS = [dict(softcap=3.0), dict(z_loss=1e-2), dict(z_loss=0.1, softcap=2.0, eps=0.1),
           dict(softcap=5.0, eps=0.2, weight=True), dict(eps=0.1)]


def _weight(C, dtype):
    g = torch.Generator().manual_seed(3)
    return torch.rand(C, generator=g, dtype=torch.float64).add(0.5).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["plain", "fused", "inplace"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize("C", [1, 7, 16, 17, 32])  # the tile path: every tile shape up to 32
def test_tile_path_variants_match_float64(dtype, mode, opts, C):
    """Rows with -inf logits and ignored rows, 37 rows (two full tiles and a partial one): loss,
    lse, dL/dx and dL/dT no further from float64 than eager PyTorch in the same dtype."""
    x, y = make_case(37, C, dtype, masked=C > 1, seed=C)
    o = dict(opts)
    w = _weight(C, dtype) if o.pop("weight", False) else None
    eps = o.pop("eps", 0.0)
    T = torch.tensor(1.3, dtype=dtype)
    kw = dict(temperature=T, reduction="mean", z_loss=o.get("z_loss", 0.0),
              softcap=o.get("softcap"), weight=w)
    mine = run(x, y, mode, label_smoothing=eps, **kw)
    ref = oracle(x, y, eps=eps, **{**kw, "weight": None if w is None else w.double()})
    xe = x.detach().clone().requires_grad_(True)
    te = T.detach().clone().requires_grad_(True)
    el, else_ = composition(xe, y, eps=eps, **{**kw, "temperature": te})
    el.backward()
    ulp = torch.finfo(dtype).eps
    for name, m, e, r in zip(("loss", "lse", "grad", "grad_T"), mine,
                             (el.detach(), else_.detach(), xe.grad, te.grad), ref):
        if name == "grad_T" and kw["softcap"] is None and torch.isinf(x).any():
            continue  # the composition's dL/dT is NaN there (-inf / T^2 times 0), softcal's not
        assert rel(m, r) <= max(1.5 * rel(e, r), 4 * ulp), (name, rel(m, r), rel(e, r))


@pytest.mark.parametrize("C", [10, 300])  # the tile path and the row path
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_variants_with_nan_rows_and_every_row_ignored(C, reduction):
    """A row with a NaN logit gives a NaN loss and gradient in every variant; a tile or group of
    ignored rows gives 0 and a zero gradient."""
    x, y = make_case(20, C, torch.float32, seed=1)
    x[3, 1] = float("nan")
    y[16:] = -100
    for opts in OPTIONS:
        o = dict(opts)
        o.pop("weight", None)
        eps = o.pop("eps", 0.0)
        loss, lse, gx, _ = run(x, y, "fused", temperature=1.5, label_smoothing=eps,
                               reduction=reduction, **o)
        if reduction == "none":
            assert torch.isnan(loss[3]) and torch.isfinite(loss[torch.arange(20) != 3]).all()
            assert (loss[16:] == 0).all()
        else:
            assert torch.isnan(loss)
        assert torch.isnan(gx[3]).all() and torch.isfinite(gx[torch.arange(20) != 3]).all()
        assert (gx[16:] == 0).all() and (gx[y == -100] == 0).all()


def _without_comments(text):
    return "\n".join(line.split("//")[0] for line in text.splitlines())


def test_llm_terms_are_switched_once():
    """The kernel headers test the call's z-loss and soft-cap (CEParams' zloss and softcap) in
    one place, llm_switch; every other use is a template parameter (if constexpr)."""
    uses = []
    for path in sorted(CPU.glob("*.h")):
        text = _without_comments(path.read_text())
        start = text.find("inline void llm_switch(")
        end = text.find("\n}\n", start) if start >= 0 else -1
        for m in re.finditer(r"\bp\.(zloss|softcap)\s*[=!]=|\.needs_p_y\(\)", text):
            if not start <= m.start() < end:
                line = text.count("\n", 0, m.start()) + 1
                uses.append(f"{path.name}:{line}: {m.group(0)}")
    assert not uses, "run-time tests of the LLM terms in the kernels:\n" + "\n".join(uses)
    assert "llm_switch(p," in (CPU / "cross_entropy.cpp").read_text()


def test_one_row_path_for_capped_and_plain_rows():
    """The soft-capped rows take the row path's one row-group loop (ce_row_group, a Softcap
    template parameter), not a second copy of it."""
    text = (CPU / "ce_row_path.h").read_text()
    assert "ce_row_capped" not in text
    assert len(re.findall(r"^inline void ce_row_group\(", text, re.M)) == 1
    assert re.search(r"template <Pass kPass, ZLoss kZ, Softcap kCap,", text)
