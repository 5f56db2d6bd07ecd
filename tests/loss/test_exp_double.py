"""The float64 exp of the CPU kernels (csrc/cpu/vec.h: exp_pd_avx512 where built for AVX-512, else
Sleef's): at most 1 ulp from a float128 reference, as torch.exp (Sleef's u10 exp).

Read through the float64 softmax of a row [0, t]: for t < -37.5, 1 + e^t rounds to 1, so the
softmax of t IS the kernel's exp(t) (divided by exactly 1). t from -37.5 down to the last
denormal covers every reduced argument r of the polynomial and every power-of-two scaling,
denormal results included.
"""
import numpy as np
import pytest
import torch

from softcal import _ops

pytestmark = pytest.mark.skipif(not _ops.HAVE_EXTENSION, reason="the compiled extension is not built")


def _ulps(got: np.ndarray, t: np.ndarray) -> np.ndarray:
    ref = np.exp(t.astype(np.longdouble))  # 64-bit mantissa: exact to far below a float64 ulp
    spacing = np.spacing(ref.astype(np.float64)).astype(np.longdouble)
    return (np.abs(got.astype(np.longdouble) - ref) / spacing).astype(np.float64)


def _kernel_exp(t: torch.Tensor) -> torch.Tensor:
    rows = torch.stack([torch.zeros_like(t), t], 1)
    return torch.ops.softcal.softmax_fwd(rows, None, 1.0, 1, False)[:, 1]


def test_exp_double_within_one_ulp():
    if np.finfo(np.longdouble).nmant < 60:
        pytest.skip("numpy's longdouble is not extended precision here (no float128 reference)")
    g = torch.Generator().manual_seed(0)
    t = torch.cat([torch.rand(200_000, generator=g, dtype=torch.float64) * (745.0 - 37.5) - 745.0,
                   torch.linspace(-745.0, -37.5, 100_001, dtype=torch.float64)])
    got = _kernel_exp(t).numpy()
    ours = _ulps(got, t.numpy())
    theirs = _ulps(torch.exp(t).numpy(), t.numpy())
    normal = got >= np.finfo(np.float64).tiny
    assert ours[normal].max() <= 1.0, ours[normal].max()
    # denormal results: one rounding of the scaled value, so within half their (absolute) ulp
    # plus the polynomial's relative error, which a denormal's coarse spacing makes negligible
    assert ours[~normal].max() <= 1.0, ours[~normal].max()
    assert ours.max() <= max(1.0, theirs.max())
    assert ours.mean() <= theirs.mean() + 0.05, (ours.mean(), theirs.mean())


def test_exp_double_edges():
    t = torch.tensor([-745.2, -746.0, -800.0, -1e300, float("-inf")], dtype=torch.float64)
    assert bool((_kernel_exp(t) == 0).all())
    rows = torch.tensor([[0.0, float("-inf")], [5.0, 5.0]], dtype=torch.float64)
    p = torch.ops.softcal.softmax_fwd(rows, None, 1.0, 1, False)
    assert p.tolist() == [[1.0, 0.0], [0.5, 0.5]]  # exp(0) == 1 exactly
    nan = torch.tensor([[0.0, float("nan")], [float("inf"), 0.0], [float("-inf")] * 2],
                       dtype=torch.float64)
    assert bool(torch.ops.softcal.softmax_fwd(nan, None, 1.0, 1, False).isnan().all())
