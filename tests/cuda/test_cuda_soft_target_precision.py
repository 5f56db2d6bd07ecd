"""The soft-target backward's temperature gradient in the CUDA kernels (csrc/cuda/soft_target.cu):
its partial sums in double and shifted by beta m, as the cross-entropy kernels' (issue 20: one
precision policy). House-cpu's tests/loss/test_kernel_contract.py and tests/loss/test_precision.py cover
the rest of the kernel contract on every backend; this case is where the CUDA kernel's float
partial sums (shifted by lse) lost most, and it runs the CUDA kernels only: on a GPU, or on the
CPU under the emulator (SOFTCAL_EMULATE_CUDA=1, the second half of `make test`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softcal import _ops
from conftest import EMULATE_CUDA

CUDA_READY = torch.cuda.is_available() and _ops.has_kernel("cuda")
DEV = "cuda" if CUDA_READY else "cpu"
pytestmark = pytest.mark.skipif(
    not (CUDA_READY or EMULATE_CUDA),
    reason="runs the CUDA kernels: a GPU, or SOFTCAL_EMULATE_CUDA=1 (the CUDA emulator, tests/cuda_emu)")

ops = torch.ops.softcal


def _soft_ref(x, q, w, T, eps, grad_out):
    """float64 loss and gradients of logits, target and temperature (PyTorch's probability-target
    cross-entropy of x / T, mean over rows)."""
    x64 = x.detach().double().cpu().requires_grad_()
    q64 = q.detach().double().cpu().requires_grad_()
    T64 = torch.tensor(float(T), dtype=torch.float64, requires_grad=True)
    loss = F.cross_entropy(x64 / T64, q64, weight=None if w is None else w.double().cpu(), label_smoothing=eps)
    gx, gq, gT = torch.autograd.grad(loss, (x64, q64, T64), torch.tensor(grad_out, dtype=torch.float64))
    return loss.detach(), gx, gq, gT


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
