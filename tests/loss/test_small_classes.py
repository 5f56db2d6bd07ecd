"""Small class counts (the CPU kernels' tile path, C <= 32: R rows per vector; and the row path
just above it): partial tiles, row-strided views, weights, smoothing, ignored and masked rows,
the fused and in-place modes, against the float64 reference. Runs on the CUDA kernels too under
SOFTCAL_EMULATE_CUDA=1."""

import math

import pytest
import torch

from test_core import check_against_reference, make_case


@pytest.mark.parametrize("c", [1, 2, 10, 16, 17, 32, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("mode", ["autograd", "fused", "inplace"])
def test_small_c_matches_reference(device, c, dtype, layout, mode):
    if mode == "inplace" and layout == "strided":
        pytest.skip("in-place mode needs contiguous logits")
    n = 37  # two full tiles of 16 rows and a partial one (and 4.6 of 8 on AVX2)
    x, t, w = make_case(n, c, dtype, device, weighted=True, seed=c)
    x = x.clone()
    if c > 2:
        x[3, : c // 2] = -math.inf  # masked classes (not the target: tested in test_core)
        t[3] = c - 1
    x[5] = -math.inf  # a fully masked row, ignored
    t[5] = -100
    x[20, 0] = float("nan")  # a row without a softmax, ignored: loss and gradient 0
    t[20] = -100
    if layout == "strided":
        big = torch.randn(n, c + 3, dtype=torch.float64).to(dtype).to(device)
        big[:, :c] = x
        x = big[:, :c]
        assert x.stride(0) == c + 3
    temp = torch.tensor(1.3, dtype=torch.float64, device=device, requires_grad=True)
    for eps in (0.0, 0.1):
        for weight in (None, w):
            for reduction in ("mean", "sum", "none"):
                if eps > 0 and c > 2:
                    xx = x.clone()
                    xx[3] = torch.randn(c).to(dtype)  # -inf with smoothing is +inf: tested elsewhere
                else:
                    xx = x
                check_against_reference(xx, t, weight, temp, eps, reduction,
                                        fused=mode != "autograd", inplace=mode == "inplace")


def test_small_c_saved_lse_matches_row_path(device):
    """The tile path (C = 32) and the row path (C = 33, the 33rd class masked) save the same
    [max, log sum exp] for the same rows."""
    g = torch.Generator().manual_seed(0)
    x32 = (torch.randn(50, 32, generator=g) * 5).to(device)
    x33 = torch.cat([x32, torch.full((50, 1), -math.inf, device=device)], 1)
    t = torch.randint(0, 32, (50,), generator=g).to(device)
    _, a, _ = torch.ops.softcal.cross_entropy_fwd(x32, t, None, None, 0.7, 0.0, -100, 0)
    _, b, _ = torch.ops.softcal.cross_entropy_fwd(x33, t, None, None, 0.7, 0.0, -100, 0)
    assert torch.equal(a[:, 0], b[:, 0])
    torch.testing.assert_close(a[:, 1], b[:, 1], rtol=4e-7, atol=4e-7)
