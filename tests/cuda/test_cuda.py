"""CUDA-specific tests of the compiled kernels (csrc/cuda).

tests/loss/test_core.py already runs its whole matrix on CUDA where a GPU is visible (ids contain
"cuda"); this file covers what only the CUDA backend has: every launch path (several rows per
block for small C, a block per row, the register-resident and the two-read fused kernels, the
strided softmax), 16-byte loads on misaligned rows, int64 offsets, CUDA-graph capture, the
in-place fused op's memory, the absence of host synchronisation and bitwise determinism.

Oracle: softcal.reference in float64 on the CPU. Tolerances travel with the dtype (conftest.TOL).

test_cuda_kernels_registered needs no GPU: it runs wherever the extension was built with CUDA
(torch.version.cuda set and the extension loaded) and fails if a kernel is missing when
SOFTCAL_EXPECT_CUDA=1 (set by CI for the CUDA build) or when a GPU is visible.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import softcal
from softcal import _ops, reference
from conftest import EMULATE_CUDA, TOL, rel_err

HAVE_GPU = torch.cuda.is_available()
BUILT_WITH_CUDA = torch.version.cuda is not None and _ops.HAVE_EXTENSION
EXPECT_CUDA = os.environ.get("SOFTCAL_EXPECT_CUDA", "0") == "1"
CUDA_READY = HAVE_GPU and _ops.has_kernel("cuda")

pytestmark = pytest.mark.cuda

needs_gpu = pytest.mark.skipif(
    not CUDA_READY,
    reason=("no CUDA GPU visible" if not HAVE_GPU else
            "the extension has no CUDA kernels (built with SOFTCAL_CPU_ONLY or without a toolkit)"),
)

# The launch-path tests below also run under the CUDA emulator (SOFTCAL_EMULATE_CUDA=1, see
# tests/cuda_emu): the kernels' code then runs on the CPU, on CPU tensors. The tests of what only a
# GPU can show (graphs, synchronisation, memory, int64 offsets at 5 GiB, scheduling determinism)
# stay needs_gpu.
KDEV = "cuda" if CUDA_READY else "cpu"
needs_kernels = pytest.mark.skipif(
    not (CUDA_READY or EMULATE_CUDA),
    reason="no CUDA GPU visible (SOFTCAL_EMULATE_CUDA=1 runs these through the CUDA emulator)",
)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"softcal::{op}", "CUDA")


# --------------------------------------------------------------------------- registration

def test_cuda_kernels_registered():
    """Every op has a CUDA kernel in a CUDA build (runs without a GPU)."""
    if not _ops.HAVE_EXTENSION:
        if EXPECT_CUDA:
            pytest.fail(f"SOFTCAL_EXPECT_CUDA=1 but the extension did not load: {_ops.IMPORT_ERROR}")
        pytest.skip(f"the compiled extension is not loaded ({_ops.IMPORT_ERROR})")
    if torch.version.cuda is None:
        if EXPECT_CUDA:
            pytest.fail("SOFTCAL_EXPECT_CUDA=1 but this torch is a CPU build")
        pytest.skip("this torch is a CPU build: no CUDA kernels to check")
    missing = [op for op in _ops.OPS if not _cuda_kernel(op)]
    if missing and not (EXPECT_CUDA or HAVE_GPU):
        pytest.skip("the extension was built without its CUDA part (no GPU at build time and "
                    "SOFTCAL_FORCE_CUDA unset); set SOFTCAL_EXPECT_CUDA=1 to require it")
    assert not missing, f"softcal ops without a CUDA kernel: {missing}"
    assert "cuda" in _ops.kernel_devices()


# --------------------------------------------------------------------------- helpers

def _case(n, c, dtype, *, seed=0, ignore_frac=0.2, weighted=False, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = torch.randint(0, max(c, 1), (n,), generator=g)
    if ignore_frac > 0 and n > 0:
        t[torch.rand(n, generator=g) < ignore_frac] = -100
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.1).to(dtype) if weighted else None
    return x, t, w


def _ref(x, t, w, temp, eps, reduction, grad_out):
    """float64 reference on the CPU: (loss, dL/dx, dL/dT or None)."""
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = None if w is None else w.double().cpu()
    T64 = (temp.detach().double().cpu().requires_grad_() if isinstance(temp, torch.Tensor) else temp)
    loss = reference.cross_entropy(x64, t.cpu(), temperature=T64, label_smoothing=eps, weight=w64,
                                   reduction=reduction)
    ins = (x64, T64) if isinstance(T64, torch.Tensor) else (x64,)
    grads = torch.autograd.grad(loss, ins, grad_out.double().cpu(), allow_unused=True)
    gT = grads[1] if len(grads) > 1 else None
    return loss.detach(), grads[0], gT


def _close_loss(got, want, dtype):
    """The loss comes back in the logits' dtype: compare with the float64 reference rounded once."""
    tol = TOL[dtype]
    got = got.detach().double().cpu()
    want = want.to(dtype).double()
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale))


def _run_ce(x, t, w, temp, eps, reduction, mode, grad_out):
    """softcal on CUDA in one of the modes; returns (loss, dL/dx, dL/dT or None)."""
    xin = x.detach().clone().requires_grad_()
    logits = xin * 1 if mode == "inplace" else xin  # in place needs a non-leaf buffer
    loss = softcal.cross_entropy(logits, t, temperature=temp, label_smoothing=eps, weight=w,
                                 reduction=reduction, fused=mode != "autograd",
                                 inplace=mode == "inplace")
    ins = (xin, temp) if isinstance(temp, torch.Tensor) else (xin,)
    grads = torch.autograd.grad(loss, ins, grad_out.to(loss.dtype).to(loss.device))
    return loss, grads[0], (grads[1] if len(grads) > 1 else None)


# (n, C): small C (several rows per block: TPR 4..32), a block per row (128..1024 threads),
# the fused kernel held in registers (4 or 8 vectors per thread) and its two-read fallback.
def slow_large(cases, key=lambda s: s):
    """The cases with more than 40000 classes, marked slow (`make test-slow`, run by CI)."""
    return [pytest.param(c, marks=pytest.mark.slow) if key(c)[-1] > 40000 else c for c in cases]


SHAPES = [(64, 1), (33, 3), (257, 10), (40, 128), (16, 1000), (24, 4099), (6, 50257), (3, 128256)]
CONFIGS = [  # reduction, eps, weighted, temperature
    ("mean", 0.1, False, "tensor"),
    ("none", 0.0, True, 0.7),
    ("sum", 0.3, True, "tensor"),
    ("mean", 0.0, False, 1.0),
]


def _temp(kind, dtype=torch.float32):
    """A float, or a 0-dim tensor on KDEV (float64 for float64 logits, else float32)."""
    if kind == "tensor":
        tdtype = torch.float64 if dtype == torch.float64 else torch.float32
        return torch.tensor(1.7, dtype=tdtype, device=KDEV, requires_grad=True)
    return kind


def _check_ce(x, t, w, kind, eps, reduction, mode, dtype):
    temp = _temp(kind, dtype)
    g = torch.Generator().manual_seed(11)
    n = x.shape[0]
    grad_out = (torch.randn(n, generator=g, dtype=torch.float64) if reduction == "none"
                else torch.tensor(1.3, dtype=torch.float64))
    loss, gx, gT = _run_ce(x.to(KDEV), t.to(KDEV), None if w is None else w.to(KDEV), temp, eps,
                           reduction, mode, grad_out)
    rl, rgx, rgT = _ref(x, t, w, temp, eps, reduction, grad_out.to(dtype).double())
    assert loss.dtype == dtype and loss.device.type == KDEV
    _close_loss(loss, rl, dtype)
    assert gx.dtype == dtype and gx.shape == x.shape
    assert rel_err(gx, rgx) <= TOL[dtype]["grad"], (mode, reduction, rel_err(gx, rgx))
    if rgT is not None:
        # a sum over every element: float accumulation error relative to the terms' magnitude
        tolT = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
        err = abs(float(gT) - float(rgT))
        assert err <= tolT * (abs(float(rgT)) + 1e-3 * max(1, n)), (float(gT), float(rgT))


@needs_kernels
@pytest.mark.parametrize("mode", ["autograd", "fused", "inplace"])
@pytest.mark.parametrize("shape", slow_large(SHAPES), ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_ce_parity_paths(dtype, shape, mode):
    n, c = shape
    for i in range(2):
        reduction, eps, weighted, kind = CONFIGS[(SHAPES.index(shape) + i) % len(CONFIGS)]
        x, t, w = _case(n, c, dtype, seed=i + 3 * n, weighted=weighted)
        _check_ce(x, t, w, kind, eps, reduction, mode, dtype)


@needs_kernels
@pytest.mark.parametrize("offset", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("c", [7, 300, 5000])
def test_cuda_ce_misaligned_rows(dtype, c, offset):
    """Rows that start off a 16-byte boundary (row stride != C): scalar head/tail, and a
    gradient whose alignment differs from the logits' (scalar stores)."""
    n = 19
    x, t, w = _case(n, c, dtype, seed=c + offset, weighted=True)
    base = torch.zeros(n, c + offset + 2, dtype=dtype)
    base[:, offset:offset + c] = x
    xb = base.to(KDEV)[:, offset:offset + c]
    assert xb.stride(0) == c + offset + 2
    for mode in ("autograd", "fused"):
        temp = _temp("tensor", dtype)
        xin = xb.detach().requires_grad_()  # the strided view itself reaches the kernels
        loss = softcal.cross_entropy(xin, t.to(KDEV), temperature=temp, label_smoothing=0.1,
                                     weight=w.to(KDEV), fused=mode == "fused")
        gx, = torch.autograd.grad(loss, xin)
        rl, rgx, _ = _ref(x, t, w, temp, 0.1, "mean", torch.tensor(1.0, dtype=torch.float64))
        _close_loss(loss, rl, dtype)
        assert rel_err(gx, rgx) <= TOL[dtype]["grad"]
    # the raw op on the strided view (functional layer passes it as is)
    loss, lse, denom = torch.ops.softcal.cross_entropy_fwd(xb, t.to(KDEV), None, None, 1.3, 0.0, -100, 0)
    want = reference.cross_entropy(x.double(), t, temperature=1.3, reduction="none")
    _close_loss(loss, want, dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_fused_grad_temperature_per_row(dtype):
    """cross_entropy_fused with reduction none returns the per-row dL_i/dT; mean/sum a 0-dim sum."""
    x, t, w = _case(50, 37, dtype, seed=2, weighted=True)
    T = torch.tensor(1.4, dtype=torch.float64, device=KDEV)
    xc, tc, wc = x.to(KDEV), t.to(KDEV), w.to(KDEV)
    loss, grad, gT = torch.ops.softcal.cross_entropy_fused(xc, tc, wc, T, 1.0, 0.2, -100, 0, True)
    assert gT.shape == (50,) and gT.dtype == torch.float64
    x64 = x.double().requires_grad_()
    T64 = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
    ref = reference.cross_entropy(x64, t, temperature=T64, label_smoothing=0.2, weight=w.double(),
                                  reduction="none")
    want = torch.stack([torch.autograd.grad(ref[i], T64, retain_graph=True)[0] for i in range(50)])
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    assert rel_err(gT, want) <= tol
    for red in (1, 2):
        _, _, gs = torch.ops.softcal.cross_entropy_fused(xc, tc, wc, T, 1.0, 0.2, -100, red, True)
        assert gs.shape == ()


# --------------------------------------------------------------------------- softmax

SOFTMAX_SHAPES = [  # shape, dim
    ((300, 10), -1), ((17, 1000), -1), ((5, 50257), -1), ((3, 70001), -1),
    ((6, 33, 7), 1), ((40, 3, 2), 0), ((4, 257, 129), 1), ((1, 5), -1), ((9,), 0),
]


@needs_kernels
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("case", slow_large(SOFTMAX_SHAPES, key=lambda c: c[0]), ids=lambda c: f"{'x'.join(map(str, c[0]))}_d{c[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_softmax_paths(dtype, case, log):
    shape, dim = case
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[0])
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).to(dtype)
    T = torch.tensor(1.6, dtype=torch.float32, device=KDEV, requires_grad=True)
    xa = x.to(KDEV).requires_grad_()
    fn = softcal.log_softmax if log else softcal.softmax
    out = fn(xa, T, dim)
    x64 = x.double().requires_grad_()
    # the temperature the kernel reads: 1.6 rounded to float32 (as x / T in PyTorch promotes it)
    T64 = T.detach().double().cpu().requires_grad_()
    ref = (torch.log_softmax if log else torch.softmax)(x64 / T64, dim)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=tol["rtol"], atol=tol["atol"])
    gout = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    gx, gT = torch.autograd.grad(out, (xa, T), gout.to(KDEV))
    rgx, rgT = torch.autograd.grad(ref, (x64, T64), gout.double())
    # The backward reads the rounded output y: dL/dz = y (g - sum g y) cancels where g ~ sum g y,
    # so a short half-precision row can lose more than tol["grad"]; PyTorch's own kernel, in the
    # same dtype, loses as much. Bound: twice the larger of the two.
    xt = x.detach().clone().requires_grad_()
    eager = (torch.log_softmax if log else torch.softmax)(xt / T.detach().cpu(), dim)
    egx, = torch.autograd.grad(eager, xt, gout)
    assert rel_err(gx, rgx) <= 2 * max(tol["grad"], rel_err(egx, rgx)), (rel_err(gx, rgx), rel_err(egx, rgx))
    assert rel_err(gT, rgT) <= max(tol["grad"] * 20, 1e-4)


# --------------------------------------------------------------------------- temperature_stats

@needs_kernels
@pytest.mark.parametrize("shape", slow_large([(500, 10), (64, 1000), (8, 50257), (3, 1)]), ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_temperature_stats_paths(dtype, shape):
    g = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, shape[1], (shape[0],), generator=g)
    for beta in (0.3, 1.0, 2.5):
        got = softcal.temperature_stats(x.to(KDEV), t.to(KDEV), beta)
        want = reference.temperature_stats(x.double(), t, beta)
        assert got.dtype == torch.float64 and got.shape == (4,)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-7, atol=1e-7 * shape[0])


# --------------------------------------------------------------------------- scale_rows_

@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_scale_rows(dtype):
    n, c = 37, 45
    buf = torch.randn(n * c + 3, dtype=torch.float64).to(dtype).to(KDEV)
    grad = buf[1:1 + n * c].view(n, c)  # contiguous, 1 element off alignment
    orig = grad.clone()
    torch.ops.softcal.scale_rows_(grad, torch.tensor(1.0, dtype=dtype, device=KDEV))
    assert torch.equal(grad, orig)
    torch.ops.softcal.scale_rows_(grad, torch.tensor(-2.5, dtype=dtype, device=KDEV))
    torch.testing.assert_close(grad.double(), (orig.double() * -2.5).to(dtype).double())
    grad.copy_(orig)
    s = torch.randn(2 * n, dtype=dtype, device=KDEV)[::2]  # stride 2
    torch.ops.softcal.scale_rows_(grad, s)
    torch.testing.assert_close(grad.double(), (orig.double() * s.double()[:, None]).to(dtype).double())
    grad.copy_(orig)
    torch.ops.softcal.scale_rows_(grad, torch.tensor(3.0, dtype=dtype, device=KDEV).expand(n))
    torch.testing.assert_close(grad.double(), (orig.double() * 3.0).to(dtype).double())
    assert torch.equal(buf[0], buf[0]) and buf.shape == (n * c + 3,)


# --------------------------------------------------------------------------- int64 offsets

@needs_kernels
@pytest.mark.parametrize("c", [40, 3000], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernels_read_rows_beyond_2_31_elements(dtype, c):
    """Three rows at element offsets 0, S and 2S with S = 2^30 + 1 (a row-strided view into a
    buffer of 2^31 + C elements; the reads at 2S need 64-bit offsets, and S odd misaligns every
    row's 16-byte vectors). Only the three rows are written: on the CPU (the emulated kernels) the
    untouched rest of the buffer is never committed to memory. Rows-per-block (C = 40) and
    block-per-row (C = 3000) paths; forward, backward, fused and temperature_stats."""
    s_ = (1 << 30) + 1
    buf = torch.empty(2 * s_ + c, dtype=dtype, device=KDEV)
    x = buf.as_strided((3, c), (s_, 1))
    g = torch.Generator().manual_seed(c)
    xd = (torch.randn(3, c, generator=g, dtype=torch.float64) * 3).to(dtype)
    x.copy_(xd.to(KDEV))
    t = torch.tensor([1, c - 1, c // 2])
    tk = t.to(KDEV)
    ops = torch.ops.softcal
    loss, lse, denom = ops.cross_entropy_fwd(x, tk, None, None, 1.3, 0.1, -100, 0)
    want = reference.cross_entropy(xd.double(), t, temperature=1.3, label_smoothing=0.1, reduction="none")
    _close_loss(loss, want, dtype)
    x64 = xd.double().requires_grad_()
    rg, = torch.autograd.grad(reference.cross_entropy(x64, t, temperature=1.3, label_smoothing=0.1,
                                                      reduction="sum"), x64)
    gx, _ = ops.cross_entropy_bwd(torch.tensor(1.0, dtype=dtype, device=KDEV), x, tk, None, lse, denom, None,
                         1.3, 0.1, -100, 2, True, False)
    assert rel_err(gx, rg) <= TOL[dtype]["grad"]
    lf, gf, _ = ops.cross_entropy_fused(x, tk, None, None, 1.3, 0.1, -100, 0, False)
    _close_loss(lf, want, dtype)
    assert rel_err(gf, rg) <= TOL[dtype]["grad"]
    st = ops.temperature_stats(x, tk, 0.7)
    torch.testing.assert_close(st.cpu(), reference.temperature_stats(xd.double(), t, 0.7),
                               rtol=1e-6, atol=1e-6)
    del buf


@needs_gpu
@pytest.mark.slow
def test_cuda_int64_offsets():
    """40000 x 65536 bfloat16 (N*C > 2^31 elements, > 4 GiB): rows near the end are right."""
    n, c = 40000, 65536
    need = n * c * 2 * 2 + (1 << 30)  # logits + gradient + slack
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free on the GPU, has {free / 2**30:.1f}")
    torch.manual_seed(0)
    x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, c, (n,), device="cuda")
    rows = torch.tensor([0, 1, n // 2, n - 2, n - 1])
    xs, ts = x[rows.cuda()].cpu(), t[rows.cuda()].cpu()
    loss, lse, denom = torch.ops.softcal.cross_entropy_fwd(x, t, None, None, 1.3, 0.1, -100, 0)
    want = reference.cross_entropy(xs.double(), ts, temperature=1.3, label_smoothing=0.1, reduction="none")
    _close_loss(loss[rows.cuda()], want, torch.bfloat16)
    assert float(denom) == n
    # backward of the rows (mean): rows at the end of the buffer
    gx, _ = torch.ops.softcal.cross_entropy_bwd(torch.tensor(1.0, dtype=torch.bfloat16, device="cuda"), x, t,
                                       None, lse, denom, None, 1.3, 0.1, -100, 1, True, False)
    xr = xs.double().requires_grad_()
    lr = reference.cross_entropy(xr, ts, temperature=1.3, label_smoothing=0.1, reduction="sum") / n
    rg, = torch.autograd.grad(lr, xr)
    assert rel_err(gx[rows.cuda()], rg) <= TOL[torch.bfloat16]["grad"]
    del gx
    # fused, in place: the gradient lands in the logits' own buffer
    lf, _ = torch.ops.softcal.cross_entropy_fused_(x, t, None, None, 1.3, 0.1, -100, 1, False)
    mean_fwd = loss.double().mean().cpu()  # the forward's per-row losses (bf16), averaged
    torch.testing.assert_close(lf.double().cpu(), mean_fwd.to(torch.bfloat16).double(),
                               rtol=2e-2, atol=1e-3)
    assert rel_err(x[rows.cuda()], rg) <= TOL[torch.bfloat16]["grad"]
    # softmax over the last dim, and the statistics
    del x
    y = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
    p = torch.ops.softcal.softmax_fwd(y, None, 2.0, -1, False)
    ref = torch.softmax(y[rows.cuda()].double() / 2.0, -1)
    assert rel_err(p[rows.cuda()], ref) <= 1e-2
    st = torch.ops.softcal.temperature_stats(y, t, 0.5)
    assert float(st[3]) == n and torch.isfinite(st).all()


# --------------------------------------------------------------------------- CUDA graphs

def _all_ops_once(x, t, w, T, gl):
    ops = torch.ops.softcal
    loss, lse, denom = ops.cross_entropy_fwd(x, t, w, T, 1.0, 0.1, -100, 1)
    gx, gT = ops.cross_entropy_bwd(gl, x, t, w, lse, denom, T, 1.0, 0.1, -100, 1, True, True)
    fl, fg, fT = ops.cross_entropy_fused(x, t, w, T, 1.0, 0.1, -100, 1, True)
    xi = x.clone()
    il, iT = ops.cross_entropy_fused_(xi, t, w, T, 1.0, 0.1, -100, 2, True)
    ops.scale_rows_(fg, gl)
    p = ops.softmax_fwd(x, T, 1.0, -1, False)
    sg, sT = ops.softmax_bwd(x, p, T, 1.0, -1, False, True)
    q = ops.softmax_fwd(x.view(8, -1, x.shape[1]), T, 1.0, 1, True)
    st = ops.temperature_stats(x, t.clamp(min=0), 0.8)
    return [loss, lse, denom, gx, gT, fl, fg, fT, il, iT, xi, p, sg, sT, q, st]


@needs_gpu
def test_cuda_graph_capture_every_op():
    torch.manual_seed(0)
    n, c = 256, 1000
    x = torch.randn(n, c, device="cuda")
    t = torch.randint(0, c, (n,), device="cuda")
    t[::7] = -100
    w = torch.rand(c, device="cuda") + 0.5
    T = torch.tensor(1.3, device="cuda")
    gl = torch.tensor(0.7, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            _all_ops_once(x, t, w, T, gl)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = _all_ops_once(x, t, w, T, gl)
    for step in range(2):
        x.copy_(torch.randn(n, c, device="cuda"))
        T.fill_(0.9 + step)
        graph.replay()
        torch.cuda.synchronize()
        want = _all_ops_once(x, t, w, T, gl)
        for i, (a, b) in enumerate(zip(outs, want)):
            assert torch.equal(a, b), f"output {i} differs after replay {step}"


@needs_gpu
def test_cuda_graph_capture_autograd_forward_backward():
    torch.manual_seed(1)
    n, c = 128, 4099
    x = torch.randn(n, c, device="cuda", requires_grad=True)
    t = torch.randint(0, c, (n,), device="cuda")
    T = torch.tensor(1.5, device="cuda", requires_grad=True)

    def step():
        loss = softcal.cross_entropy(x, t, temperature=T, label_smoothing=0.1)
        loss.backward()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            x.grad = T.grad = None
            step()
    torch.cuda.current_stream().wait_stream(s)
    x.grad = T.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    with torch.no_grad():
        x.copy_(torch.randn(n, c, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    xr = x.detach().clone().requires_grad_()
    Tr = T.detach().clone().requires_grad_()
    lr = softcal.cross_entropy(xr, t, temperature=Tr, label_smoothing=0.1)
    lr.backward()
    assert torch.equal(loss, lr)
    assert torch.equal(x.grad, xr.grad)
    assert torch.equal(T.grad, Tr.grad)


# --------------------------------------------------------------------------- no host sync

def _api_once(x, t, w, temperature):
    """The functional API once: the loss (autograd and fused) forward and backward, softmax along
    dim 0 with its backward, temperature_stats."""
    for fused in (False, True):
        xa = x.clone().requires_grad_()
        loss = softcal.cross_entropy(xa, t, temperature=temperature, weight=w, label_smoothing=0.1,
                                     fused=fused)
        loss.backward()
    xb = x.clone().requires_grad_()
    softcal.softmax(xb, temperature, dim=0).sum().backward()
    softcal.temperature_stats(x, t, 0.7)


@needs_gpu
def test_cuda_no_host_synchronisation():
    torch.manual_seed(2)
    x = torch.randn(64, 300, device="cuda")
    t = torch.randint(0, 300, (64,), device="cuda")
    w = torch.rand(300, device="cuda") + 0.5
    T = torch.tensor(1.3, device="cuda", requires_grad=True)
    gl = torch.tensor(1.0, device="cuda")
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _all_ops_once(x, t, w, T.detach(), gl)
        _api_once(x, t, w, T)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.synchronize()


# The host-side reads of tensor values that a host synchronisation would be on a GPU: recorded by
# the profiler for every aten op, those that the C++ host code calls included.
_HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero",
               "aten::equal", "aten::allclose")


def _host_reads(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name for e in prof.events() if e.name in _HOST_READS})


@needs_kernels
def test_kernels_read_no_tensor_value_on_the_host():
    """Every op (tensor temperature, weights, grad_output) and the functional API: no host-side
    read of a tensor's value, which on a GPU is a synchronisation. On the emulated kernels this
    checks the CUDA host code. The API calls use a float temperature here: a tensor temperature on
    CPU tensors is read once on purpose, to validate it (softcal/_validation.py; skipped on other
    devices), and on a GPU the test above covers that case with sync-debug mode."""
    torch.manual_seed(2)
    x = torch.randn(64, 300, device=KDEV)
    t = torch.randint(0, 300, (64,), device=KDEV)
    w = torch.rand(300, device=KDEV) + 0.5
    T = torch.tensor(1.3, device=KDEV)
    gl = torch.tensor(1.0, device=KDEV)

    def work():
        _all_ops_once(x, t, w, T, gl)
        _api_once(x, t, w, 1.3)

    assert _host_reads(work) == []
    assert _host_reads(lambda: x.sum().item()) == ["aten::_local_scalar_dense", "aten::item"]


# --------------------------------------------------------------------------- memory

@needs_gpu
def test_cuda_fused_inplace_uses_no_extra_memory():
    torch.manual_seed(3)
    n, c = 2048, 32000
    x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, c, (n,), device="cuda")
    nbytes = x.numel() * x.element_size()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, gT = torch.ops.softcal.cross_entropy_fused_(x, t, None, None, 1.5, 0.1, -100, 1, False)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 1 << 20, f"cross_entropy_fused_ allocated {extra} bytes beyond its inputs"
    assert extra < 0.01 * nbytes
    # the functional in-place path: no logits-sized buffer in the forward
    h = torch.randn(n, c, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    logits = h * 1.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = softcal.cross_entropy(logits, t, fused=True, inplace=True, label_smoothing=0.1)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 0.05 * nbytes
    # out of place, for contrast: one gradient-sized buffer
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _, g, _ = torch.ops.softcal.cross_entropy_fused(h.detach(), t, None, None, 1.5, 0.1, -100, 1, False)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base >= nbytes
    del loss, g


# --------------------------------------------------------------------------- determinism

@needs_gpu
@pytest.mark.parametrize("shape", [(100000, 10), (4096, 1000), (64, 50257)], ids=str)
def test_cuda_bitwise_deterministic(shape):
    n, c = shape
    torch.manual_seed(4)
    x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, c, (n,), device="cuda")
    t[::5] = -100
    w = (torch.rand(c, device="cuda") + 0.5).to(torch.bfloat16)
    T = torch.tensor(1.3, device="cuda")

    def run():
        return _all_ops_once(x, t, w, T, torch.tensor(0.5, device="cuda", dtype=torch.bfloat16)) + [
            torch.ops.softcal.cross_entropy_fwd(x, t, None, T, 1.0, 0.0, -100, 2)[0],
            torch.ops.softcal.cross_entropy_bwd(torch.ones(n, device="cuda", dtype=torch.bfloat16), x, t, None,
                                       torch.ops.softcal.cross_entropy_fwd(x, t, None, T, 1.0, 0.0, -100, 0)[1],
                                       torch.tensor(float(n), device="cuda"), T, 1.0, 0.0, -100, 0,
                                       False, True)[1],
        ]

    a = run()
    b = run()
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"output {i} differs between two runs"


# --------------------------------------------------------------------------- device assert

@needs_gpu
@pytest.mark.slow
def test_cuda_target_out_of_range_is_a_device_assert():
    """As PyTorch's own kernels: a device-side assert (checked in a subprocess, since it leaves
    the CUDA context unusable)."""
    code = textwrap.dedent("""
        import torch, softcal
        x = torch.randn(4, 3, device="cuda")
        t = torch.tensor([0, 3, 1, 1], device="cuda")
        try:
            softcal.cross_entropy(x, t)
            torch.cuda.synchronize()
        except RuntimeError as e:
            print("RAISED", str(e).splitlines()[0])
            raise SystemExit(0)
        raise SystemExit(3)
    """)
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert r.returncode == 0 and "RAISED" in r.stdout, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
