"""softcal.distributed.vocab_parallel_linear_cross_entropy (issue 19, item 6): the output matrix
split over 2 and 4 gloo ranks in unequal slices (one empty), against the single-process
softcal.linear_cross_entropy and the float64 composition: global smoothing, class weights,
ignore_index, z-loss, softcap, a learnt temperature, every reduction."""

from __future__ import annotations

import datetime
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from softcal._teardown import release_group_references

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

# Unequal slices of V = 23 classes (an empty slice with 4 ranks).
WIDTHS = {2: [9, 14], 4: [7, 0, 12, 4]}


def _entry(rank, world, names, init_file):
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: lm_head_cases
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if os.environ.get("SOFTCAL_EMULATE_CUDA", "0") == "1":  # as tests/conftest.py does
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda_emu"))
        import emulator

        emulator.install()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        for name in names:
            try:
                globals()[name](rank, world)
            except BaseException:
                import traceback

                sys.stderr.write(f"[rank {rank}/{world}] {name} failed:\n{traceback.format_exc()}")
                raise
            dist.barrier()
    finally:
        release_group_references()  # before destroy (softcal/_teardown.py)
        dist.destroy_process_group()


def run_ranks(world, *names):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, names, os.path.join(tmp, "init")), nprocs=world, join=True)


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    d = b.norm().item()
    return (a - b).norm().item() / d if d else (a - b).norm().item()


CASES = [
    dict(red="mean", eps=0.1, weighted=True, bias=True, zl=0.0, cap=None, T="tensor"),
    dict(red="sum", eps=0.0, weighted=False, bias=False, zl=1e-2, cap=None, T=1.3),
    dict(red="none", eps=0.2, weighted=True, bias=True, zl=3e-3, cap=None, T="tensor"),
    dict(red="mean", eps=0.1, weighted=True, bias=True, zl=1e-2, cap=4.0, T="tensor"),
    dict(red="none", eps=0.0, weighted=False, bias=True, zl=0.0, cap=2.5, T=0.8),
]


def _problem(dtype, seed=0, n=(3, 7), h=6, v=23, ignore_all=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*n, h, generator=g, dtype=torch.float64)
    W = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.8
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.3
    w = torch.rand(v, generator=g, dtype=torch.float64) + 0.3
    t = torch.randint(0, v, n, generator=g)
    t.view(-1)[::4] = -100
    t.view(-1)[:5] = -100  # the first chunk (4 rows) entirely ignored
    if ignore_all:
        t.fill_(-100)
    up = torch.randn(n, generator=g, dtype=torch.float64)
    return [a.to(dtype) if a.is_floating_point() else a for a in (x, W, b, w)] + [t, up.to(dtype)]


def _one(rank, world, case, dtype, tol, *, class_offset=False, ignore_all=False):
    import softcal
    from softcal.distributed import vocab_parallel_linear_cross_entropy

    x, W, b, w, t, up = _problem(dtype, ignore_all=ignore_all)
    widths = WIDTHS[world]
    off, vr = sum(widths[:rank]), widths[rank]
    tdt = torch.float64 if dtype == torch.float64 else torch.float32
    what = f"world={world} rank={rank} {case} {dtype}"

    def leaves(Wm, bm):
        xl = x.clone().requires_grad_()
        Wl = Wm.clone().requires_grad_()
        bl = bm.clone().requires_grad_() if case["bias"] else None
        Tl = case["T"]
        if Tl == "tensor":
            Tl = torch.tensor(1.4, dtype=tdt, requires_grad=True)
        return xl, Wl, bl, Tl

    def backward(loss):
        (loss * up).sum().backward() if case["red"] == "none" else (loss * 0.7).backward()

    kw = dict(reduction=case["red"], label_smoothing=case["eps"], z_loss=case["zl"],
              softcap=case["cap"])
    # single process, the whole matrix
    xs, Ws, bs, Ts = leaves(W, b)
    ref = softcal.linear_cross_entropy(xs, Ws, t, linear_bias=bs,
                                       weight=w if case["weighted"] else None, temperature=Ts,
                                       workspace_bytes=4 * 23 * 8, **kw)
    backward(ref)
    # this rank's slice
    xp, Wp, bp, Tp = leaves(W[off:off + vr], b[off:off + vr])
    extra = dict(class_offset=off, num_classes=23) if class_offset else {}
    out = vocab_parallel_linear_cross_entropy(
        xp, Wp, t, linear_bias_local=bp, weight=w[off:off + vr] if case["weighted"] else None,
        temperature=Tp, workspace_bytes=4 * max(widths) * 16, **kw, **extra)
    assert out.dtype == dtype and out.shape == ref.shape, what
    assert torch.allclose(out.double(), ref.double(), equal_nan=True, rtol=tol, atol=tol), \
        (what, out, ref)
    backward(out)
    assert _rel(xp.grad, xs.grad) <= tol, (what, "dX", _rel(xp.grad, xs.grad))
    assert _rel(Wp.grad, Ws.grad[off:off + vr]) <= tol, (what, "dW")
    if case["bias"]:
        assert _rel(bp.grad, bs.grad[off:off + vr]) <= tol, (what, "db")
    if case["T"] == "tensor":
        assert _rel(Tp.grad, Ts.grad) <= tol, (what, "dT", Tp.grad, Ts.grad)


def check_float64(rank, world):
    for case in CASES:
        _one(rank, world, case, torch.float64, 1e-10)
    _one(rank, world, CASES[0], torch.float64, 1e-10, class_offset=True)
    _one(rank, world, CASES[2], torch.float64, 1e-10, ignore_all=True)


def check_against_composition(rank, world):
    """Independent of the single-process op: the float64 composition itself."""
    import torch.nn.functional as F

    from softcal.distributed import vocab_parallel_linear_cross_entropy

    x, W, b, w, t, up = _problem(torch.float64, seed=3)
    widths = WIDTHS[world]
    off, vr = sum(widths[:rank]), widths[rank]
    xs = x.clone().requires_grad_()
    z = 3.0 * torch.tanh(F.linear(xs, W, b) / 3.0) / 1.2
    ce = F.cross_entropy(z.reshape(-1, 23), t.reshape(-1), weight=w, label_smoothing=0.15)
    lse = torch.logsumexp(z.reshape(-1, 23), -1)
    valid = t.reshape(-1) != -100
    ref = ce + 1e-2 * (lse[valid] ** 2).mean()
    ref.backward()
    xp = x.clone().requires_grad_()
    out = vocab_parallel_linear_cross_entropy(
        xp, W[off:off + vr], t, linear_bias_local=b[off:off + vr], weight=w[off:off + vr],
        label_smoothing=0.15, temperature=1.2, z_loss=1e-2, softcap=3.0, workspace_bytes=1)
    out.backward()
    assert _rel(out, ref) <= 1e-10 and _rel(xp.grad, xs.grad) <= 1e-10


def check_never_the_logits(rank, world):
    """The largest tensor made, forward or backward, is the input's gradient (N, H), the slice's
    (V_r, H) or a chunk (4 rows here): never the (N, V_r) logits of this rank."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from softcal.distributed import vocab_parallel_linear_cross_entropy

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    Largest.largest = max(Largest.largest, o.numel())
            return out

    x, W, b, w, t, up = _problem(torch.float64, n=(40,), h=6)
    widths = WIDTHS[world]
    off, vr = sum(widths[:rank]), widths[rank]
    for red in ("mean", "none"):
        xp = x.clone().requires_grad_()
        Wp = W[off:off + vr].clone().requires_grad_()
        with Largest():
            out = vocab_parallel_linear_cross_entropy(
                xp, Wp, t, weight=w[off:off + vr], label_smoothing=0.1, z_loss=1e-3,
                reduction=red, workspace_bytes=4 * max(widths) * 8)
            out.sum().backward()
        assert Largest.largest <= max(40 * 6, vr * 6, 4 * max(widths)), Largest.largest
    if world == 2:  # slices of 9 and 14 classes: their logits are larger than all of those
        assert Largest.largest < 40 * vr


def check_low_precision(rank, world):
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 3e-2)):
        for case in CASES[:3]:
            _one(rank, world, case, dtype, tol)


def check_errors(rank, world):
    from softcal.distributed import vocab_parallel_linear_cross_entropy

    x, W, b, w, t, up = _problem(torch.float64)
    widths = WIDTHS[world]
    off, vr = sum(widths[:rank]), widths[rank]
    bad = t.clone()
    bad.view(-1)[6] = 23
    try:
        vocab_parallel_linear_cross_entropy(x, W[off:off + vr], bad)
    except ValueError as e:
        assert "out of range for 23 classes" in str(e)
    else:
        raise AssertionError("no error for a target out of range")
    # ranks that disagree on the input's shape: the same clear error on every rank
    xr = x[..., : 6 - rank % 2]
    try:
        vocab_parallel_linear_cross_entropy(xr, W[off:off + vr, : xr.shape[-1]], t)
    except ValueError as e:
        assert "every rank must hold the same input" in str(e)
    else:
        raise AssertionError("no error for ranks with different inputs")


def test_two_ranks():
    run_ranks(2, "check_float64", "check_against_composition", "check_never_the_logits",
              "check_low_precision", "check_errors")


def test_four_ranks():
    run_ranks(4, "check_float64", "check_against_composition", "check_never_the_logits",
              "check_low_precision", "check_errors")


def test_needs_an_initialised_group():
    from softcal.distributed import vocab_parallel_linear_cross_entropy

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="not initialised"):
        vocab_parallel_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4),
                                            torch.tensor([0, 1, 2]))
