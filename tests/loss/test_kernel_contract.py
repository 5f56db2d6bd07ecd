"""The kernel contract (csrc/schemas.h, checked by csrc/checks.h), op by op:

* weight: any floating dtype, converted once to the accumulation dtype (float32 for
  float16/bfloat16/float32 logits, float64 for float64): an op's result depends only on the
  weights' value in that dtype;
* class-probability targets: the logits' dtype, or float32 beside float16/bfloat16 logits (read
  in float32); grad_target in the target's dtype;
* every op that returns a loss returns it in the accumulation dtype; every backward takes
  grad_loss in any floating dtype; the public functions still return the logits' dtype, the same
  float rounded once.

The ops are called directly. Under SOFTCAL_EMULATE_CUDA=1 the same tests run the CUDA kernels.
"""
import pytest
import torch

import softcal
from softcal import reference

from conftest import TOL, rel_err

ops = torch.ops.softcal
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _case(n, c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, c, (n,), generator=g)
    t[::7] = -100
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    p = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64), 1)
    return x, t, w, p


def _same(a, b):
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and torch.equal(u, v), (u, v)


@pytest.mark.parametrize("c", [7, 40])  # the tile path (C <= 32) and the row path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_weight_of_any_floating_dtype(dtype, c):
    x, t, w64, p = _case(33, c, dtype)
    acc = _acc(dtype)
    w_acc = w64.to(acc)
    T = torch.tensor(1.3, dtype=torch.float64)
    ts = torch.where(t < 0, t, t + 3)  # shard ops: a slice at class offset 3
    for wd in FLOATS:
        w = w_acc.to(wd)  # each weight dtype, and the same value in acc
        w_ref = w.to(acc)
        runs = {
            "fwd": lambda w: ops.cross_entropy_fwd(x, t, w, T, 1.0, 0.1, -100, 0),
            "fused": lambda w: ops.cross_entropy_fused(x, t, w, T, 1.0, 0.1, -100, 1, True),
            "fused_": lambda w: ops.cross_entropy_fused_(x.clone(), t, w, T, 1.0, 0.1, -100, 2, True),
            "soft": lambda w: ops.soft_target_fwd(x, p.to(dtype), w, T, 1.0, 0.1, 0),
            "stats": lambda w: (ops.shard_stats(x, ts, w, T, 1.0, 3, -100, True),),
        }
        for name, run in runs.items():
            _same(run(w), run(w_ref))
        _, lse, denom = ops.cross_entropy_fwd(x, t, w_ref, T, 1.0, 0.1, -100, 1)
        g = torch.tensor(0.7)
        _same(ops.cross_entropy_bwd(g, x, t, w, lse, denom, T, 1.0, 0.1, -100, 1, True, True),
              ops.cross_entropy_bwd(g, x, t, w_ref, lse, denom, T, 1.0, 0.1, -100, 1, True, True))
        _, slse, mass = ops.soft_target_fwd(x, p.to(dtype), w_ref, T, 1.0, 0.1, 1)
        _same(ops.soft_target_bwd(g, x, p.to(dtype), w, slse, mass, T, 1.0, 0.1, 1, True, True, True),
              ops.soft_target_bwd(g, x, p.to(dtype), w_ref, slse, mass, T, 1.0, 0.1, 1, True, True,
                                  True))
        coef = torch.rand(33, 3, dtype=acc)
        lse2 = torch.stack([x.to(acc).max(1).values, torch.ones(33, dtype=acc)], 1)
        _same(ops.shard_grad(x, ts, w, lse2, coef, T, 1.0, 0.01, 3, -100, True, True),
              ops.shard_grad(x, ts, w_ref, lse2, coef, T, 1.0, 0.01, 3, -100, True, True))
    # and the value is the reference's (float16 weights beside logits of another dtype)
    w16 = w64.to(torch.float16)
    loss = ops.cross_entropy_fwd(x, t, w16, T, 1.0, 0.1, -100, 1)[0]
    ref = reference.cross_entropy(x.double(), t, temperature=1.3, label_smoothing=0.1,
                                  weight=w16.double())
    torch.testing.assert_close(loss.double(), ref, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c", [5, 300])
def test_float32_probability_targets_beside_half_logits(dtype, c):
    x, _, w, p = _case(20, c, dtype, seed=1)
    p[3, 1] = 0.25  # not a distribution: used as given
    T = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    loss, lse, mass = ops.soft_target_fwd(x, p.float(), w.float(), T, 1.0, 0.1, 1)
    assert loss.dtype == torch.float32
    gx, gt, gT = ops.soft_target_bwd(torch.tensor(1.0), x, p.float(), w.float(), lse, mass, T, 1.0,
                                     0.1, 1, True, True, True)
    assert gx.dtype == dtype and gt.dtype == torch.float32 and gT.dtype == torch.float64
    # against float64 with the same inputs (the target read in float32, not rounded to dtype)
    xd = x.double().requires_grad_()
    pd = p.float().double().requires_grad_()
    Td = T.detach().clone().requires_grad_()
    ref = reference.soft_cross_entropy(xd, pd, temperature=Td, label_smoothing=0.1,
                                       weight=w.float().double())
    ref.backward()
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-6, atol=2e-6)
    assert rel_err(gx, xd.grad) < tol["grad"]
    assert rel_err(gt, pd.grad) < 2e-6  # float32, not rounded to the logits' dtype
    assert rel_err(gT, Td.grad) < 2e-5
    # a target of the logits' own dtype still works, and float64 beside half logits does not
    ops.soft_target_fwd(x, p.to(dtype), None, None, 1.0, 0.0, 1)
    with pytest.raises(RuntimeError, match="float32 with float16/bfloat16 logits"):
        ops.soft_target_fwd(x, p, None, None, 1.0, 0.0, 1)


@pytest.mark.parametrize("dtype", FLOATS)
def test_losses_in_the_accumulation_dtype(dtype):
    x, t, w, p = _case(40, 9, dtype, seed=2)
    acc = _acc(dtype)
    wd = w.to(dtype)
    for red in (0, 1, 2):
        outs = [ops.cross_entropy_fwd(x, t, wd, None, 1.5, 0.1, -100, red)[0],
                ops.cross_entropy_fused(x, t, wd, None, 1.5, 0.1, -100, red, False)[0],
                ops.cross_entropy_fused_(x.clone(), t, wd, None, 1.5, 0.1, -100, red, False)[0],
                ops.soft_target_fwd(x, p.to(dtype), wd, None, 1.5, 0.1, red)[0]]
        for loss in outs:
            assert loss.dtype == acc, (red, loss.dtype)
        # the public function: the logits' dtype, the kernel's float rounded once
        name = ("none", "mean", "sum")[red]
        pub = softcal.cross_entropy(x, t, weight=wd, temperature=1.5, label_smoothing=0.1,
                                    reduction=name)
        assert pub.dtype == dtype and torch.equal(pub, outs[0].to(dtype))
        xg = x.clone().requires_grad_()
        fused = softcal.cross_entropy(xg, t, weight=wd, temperature=1.5, label_smoothing=0.1,
                                      reduction=name, fused=True)
        assert fused.dtype == dtype and torch.equal(fused, outs[1].to(dtype))
        soft = softcal.cross_entropy(x, p.to(dtype), weight=wd, temperature=1.5,
                                     label_smoothing=0.1, reduction=name)
        assert soft.dtype == dtype and torch.equal(soft, outs[3].to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_backward_takes_grad_loss_of_any_floating_dtype(dtype):
    x, t, w, p = _case(30, 6, dtype, seed=3)
    T = torch.tensor(1.2)
    _, lse, denom = ops.cross_entropy_fwd(x, t, None, T, 1.0, 0.1, -100, 0)
    _, slse, mass = ops.soft_target_fwd(x, p.to(dtype), None, T, 1.0, 0.1, 0)
    g = torch.linspace(-1, 1, 30, dtype=torch.float64).to(torch.bfloat16)  # exact in every dtype
    results = []
    for gd in FLOATS:
        results.append(
            ops.cross_entropy_bwd(g.to(gd), x, t, None, lse, denom, T, 1.0, 0.1, -100, 0, True, True)
            + ops.soft_target_bwd(g.to(gd), x, p.to(dtype), None, slse, mass, T, 1.0, 0.1, 0, True,
                                  True, True))
    for r in results[1:]:
        _same(r, results[0])
