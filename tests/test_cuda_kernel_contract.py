"""The kernel contract as the CUDA kernels (csrc/cuda) keep it, op by op (issue 20):

* class weights of any floating dtype, converted once on the host to the accumulation dtype: the
  kernels then give exactly the result of weights passed in that dtype;
* class-probability targets of the logits' dtype, or float32 beside float16/bfloat16 logits, read
  in their own dtype (grad_target in the target's dtype);
* the temperature gradient of the soft-target kernels summed in double, as the cross-entropy's.

They run the CUDA kernels on a GPU, or on the CPU under the emulator (SOFTCAL_EMULATE_CUDA=1, the
second half of `make test`); elsewhere they skip. Oracle: float64 references on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softcal import _ops
from conftest import EMULATE_CUDA, TOL, rel_err

CUDA_READY = torch.cuda.is_available() and _ops.has_kernel("cuda")
DEV = "cuda" if CUDA_READY else "cpu"
pytestmark = pytest.mark.skipif(
    not (CUDA_READY or EMULATE_CUDA),
    reason="runs the CUDA kernels: a GPU, or SOFTCAL_EMULATE_CUDA=1 (the CUDA emulator, tests/cuda_emu)")

ops = torch.ops.softcal
HALF = [torch.bfloat16, torch.float16]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _data(n, c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).to(dtype).to(DEV)
    t = torch.randint(0, c, (n,), generator=g).to(DEV)
    t[::7] = -100
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    return x, t, w


def _same(a, b):
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and torch.equal(u, v), (u, v)


@pytest.mark.parametrize("wdtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("c", [10, 300], ids=lambda c: f"C{c}")  # the tile path and the row path
def test_weights_of_any_dtype_are_read_in_the_accumulation_dtype(dtype, wdtype, c):
    """Weights in another dtype give bitwise the result of the same weights in acc, every op."""
    x, t, w64 = _data(64, c, dtype, seed=c)
    w = w64.to(wdtype).to(DEV)
    wa = w.to(_acc(dtype))
    T = torch.tensor(1.3, device=DEV)
    for red in (0, 1):
        a = ops.cross_entropy_fwd(x, t, w, T, 1.0, 0.1, -100, red)
        b = ops.cross_entropy_fwd(x, t, wa, T, 1.0, 0.1, -100, red)
        _same(a, b)
        g = torch.ones(64, device=DEV) if red == 0 else torch.tensor(1.0, device=DEV)
        _same(ops.cross_entropy_bwd(g, x, t, w, a[1], a[2], T, 1.0, 0.1, -100, red, True, True),
              ops.cross_entropy_bwd(g, x, t, wa, a[1], a[2], T, 1.0, 0.1, -100, red, True, True))
        _same(ops.cross_entropy_fused(x, t, w, T, 1.0, 0.1, -100, red, True),
              ops.cross_entropy_fused(x, t, wa, T, 1.0, 0.1, -100, red, True))
    tc = t.clamp(min=0)
    _same([ops.shard_stats(x, tc, w, T, 1.0, 0, -100, True)], [ops.shard_stats(x, tc, wa, T, 1.0, 0, -100, True)])
    q = torch.softmax(x.double(), 1).to(dtype)
    _same(ops.soft_target_fwd(x, q, w, T, 1.0, 0.1, 1), ops.soft_target_fwd(x, q, wa, T, 1.0, 0.1, 1))
    # and the result is the float64 reference's, within the logits' dtype
    want = F.cross_entropy(x.double().cpu() / 1.3, t.cpu(), weight=w.double().cpu(), label_smoothing=0.1)
    got = ops.cross_entropy_fwd(x, t, w, T, 1.0, 0.1, -100, 1)[0]
    assert abs(float(got) - float(want)) <= 2 * TOL[dtype]["rtol"] * abs(float(want))


def _soft_ref(x, q, w, T, eps, grad_out):
    """float64 loss and gradients of logits, target and temperature (PyTorch's probability-target
    cross-entropy of x / T, mean over rows)."""
    x64 = x.detach().double().cpu().requires_grad_()
    q64 = q.detach().double().cpu().requires_grad_()
    T64 = torch.tensor(float(T), dtype=torch.float64, requires_grad=True)
    loss = F.cross_entropy(x64 / T64, q64, weight=None if w is None else w.double().cpu(), label_smoothing=eps)
    gx, gq, gT = torch.autograd.grad(loss, (x64, q64, T64), torch.tensor(grad_out, dtype=torch.float64))
    return loss.detach(), gx, gq, gT


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("c", [10, 3000], ids=lambda c: f"C{c}")
def test_float32_targets_beside_half_logits(dtype, c):
    """A float32 target with float16/bfloat16 logits is read in float32 (not rounded to the logits'
    dtype first) and its gradient comes back in float32."""
    g = torch.Generator().manual_seed(c)
    n = 33
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * 2).to(dtype).to(DEV)
    q = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * 2, 1).float().to(DEV)
    T = torch.tensor(1.7, device=DEV)
    loss, lse, mass = ops.soft_target_fwd(x, q, None, T, 1.0, 0.05, 1)
    assert loss.device.type == DEV and lse.dtype == torch.float32 and mass.dtype == torch.float32
    rl, rgx, rgq, rgT = _soft_ref(x, q, None, 1.7, 0.05, 1.0)
    assert abs(float(loss) - float(rl)) <= TOL[dtype]["rtol"] * abs(float(rl))
    gx, gq, gT = ops.soft_target_bwd(torch.tensor(1.0, device=DEV), x, q, None, lse, mass, T, 1.0, 0.05, 1,
                                     True, True, True)
    assert gx.dtype == dtype and gq.dtype == torch.float32 and gq.shape == q.shape
    assert rel_err(gx, rgx) <= TOL[dtype]["grad"]
    # the target's gradient depends on the logits only through log p: float32 accuracy in it, not
    # the target's rounding to the logits' dtype
    assert rel_err(gq, rgq) <= 4 * TOL[dtype]["grad"]
    assert abs(float(gT) - float(rgT)) <= 4 * TOL[dtype]["grad"] * (abs(float(rgT)) + 1e-3)
    # read in float32: the mass U = sum_c q_c is 1 to float32 accuracy, which the target rounded to
    # the logits' dtype would miss by up to C ulps of that dtype
    assert torch.allclose(mass.cpu(), torch.ones(n), atol=1e-5, rtol=0)
    rounded = ops.soft_target_fwd(x, q.to(dtype), None, T, 1.0, 0.05, 1)[2]
    assert (rounded.cpu() - 1).abs().max() > (mass.cpu() - 1).abs().max()


def test_the_soft_target_temperature_gradient_is_summed_in_double():
    """dL/dT of the soft-target backward at 8 x 32000 float32, T = 2.5, near-uniform logits (where
    sum_c dz_c log p_c cancels most): within 5e-5 of float64, relative. The kernels sum the
    T-gradient's partial sums in double, shifted by beta m as the cross-entropy's (issue 20: one
    precision policy); float partial sums shifted by lse were off by about 3e-4 here (a float32
    model of the kernel: 2.0e-7 absolute against a gradient of -5.8e-4; with double sums and the
    beta m shift 3e-9)."""
    n, c, Tv = 8, 32000, 2.5
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * 0.1).float()
    q = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64), 1).float()
    xd, qd = x.to(DEV), q.to(DEV)
    T = torch.tensor(Tv, device=DEV)
    loss, lse, mass = ops.soft_target_fwd(xd, qd, None, T, 1.0, 0.1, 1)
    _, _, gT = ops.soft_target_bwd(torch.tensor(1.0, device=DEV), xd, qd, None, lse, mass, T, 1.0, 0.1, 1,
                                   False, False, True)
    _, _, _, want = _soft_ref(x, q, None, Tv, 0.1, 1.0)
    err = abs(float(gT) - float(want))
    assert err <= 5e-5 * abs(float(want)), (float(gT), float(want), err / abs(float(want)))
