"""The float32 kernels' temperature gradient carries no systematic rounding (issue 20).

dL/dT sums a term per row in double, but a factor common to every row (beta = 1/T, the
upstream gradient g = 1/N of the mean) rounded to float once is the same relative error in each
term: a bias of the sum that no double partial sum removes (4e-8 of dL/dT, a third of a float32
ulp: enough to round dL/dT to the wrong float). With a float64 temperature the gradient comes
back in float64, so the kernels' double sum is seen before its final rounding: it must match the
float64 reference at the same T to 1e-8 (the per-element float errors are random across rows and
average out far below that at these sizes).
"""
import pytest
import torch
import torch.nn.functional as F

import softcal
from conftest import EMULATE_CUDA

# The CUDA kernels (under the emulator here; tests/cuda/test_cuda.py runs the suite on a GPU). The CPU
# kernels (csrc/cpu) still round beta to float in dL/dT: 12 of these 16 cases fail there (2.5e-8
# to 5e-8), left to their owner.
pytestmark = pytest.mark.skipif(not EMULATE_CUDA, reason="the CUDA kernels' test (SOFTCAL_EMULATE_CUDA=1); "
                                "the CPU kernels' float beta in dL/dT is open (csrc/cpu)")


def _case(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g) * 4
    t = torch.randint(0, c, (n,), generator=g)
    return x, t


def _reference(x, t, T, reduction):
    Td = torch.tensor(T, dtype=torch.float64, requires_grad=True)
    loss = F.cross_entropy(x.double() / Td, t, reduction=reduction)
    (loss.sum() if reduction == "none" else loss).backward()
    return Td.grad.item()


@pytest.mark.parametrize("n, c", [(20_000, 100), (40_000, 20)], ids=["rows", "tiles"])
@pytest.mark.parametrize("T", [0.7, 1.3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_float32_temperature_gradient_has_no_float_bias(n, c, T, reduction, fused):
    x, t = _case(n, c, seed=c)
    ref = _reference(x, t, T, reduction)
    Td = torch.tensor(T, dtype=torch.float64, requires_grad=True)
    loss = softcal.cross_entropy(x.requires_grad_(), t, temperature=Td, reduction=reduction,
                                 fused=fused)
    loss.backward()
    assert Td.grad.dtype == torch.float64
    rel = abs(Td.grad.item() - ref) / abs(ref)
    assert rel <= 1e-8, f"dL/dT {Td.grad.item():.12g} against {ref:.12g}: relative error {rel:.3g}"
