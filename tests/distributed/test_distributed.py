"""softcal.distributed: the vocabulary-parallel loss, the distributed fit and metrics.

Multi-process checks run in gloo process groups of 2 and 4 ranks spawned by the test (process
start-up dominates, so each spawn runs many checks). Every result is compared with the
single-process one on the gathered (concatenated) data: float64 to ~1e-12, lower precisions
with their dtype's tolerance. Each rank generates the same full data from the same seed and
takes its own part.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import softcal
from softcal import metrics as M
from softcal._teardown import release_group_references
from softcal.distributed import (
    VocabParallelCrossEntropy,
    padding_mask,
    vocab_parallel_cross_entropy,
)
from softcal.nn import TemperatureScaler

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

# Unequal slices of C = 11 classes (a rank with an empty slice for 4 ranks).
WIDTHS = {1: [11], 2: [4, 7], 4: [5, 0, 2, 4]}
# Unequal data-parallel shards of 500 rows (a rank with no rows for 4 ranks).
SHARDS = {1: [500], 2: [350, 150], 4: [200, 0, 180, 120]}


# ---------------------------------------------------------------------- process harness
def _entry(rank, world, names, init_file):
    torch.set_num_threads(1)
    if os.environ.get("SOFTCAL_EMULATE_CUDA", "0") == "1":  # as tests/conftest.py does
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda_emu"))
        import emulator

        emulator.install()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        for name in names:
            try:
                t0 = time.perf_counter()
                globals()[name](rank, world)
                if rank == 0 and os.environ.get("SOFTCAL_TEST_TIMING"):
                    print(f"[{world} ranks] {name}: {time.perf_counter() - t0:.2f} s", flush=True)
            except BaseException:
                import traceback

                sys.stderr.write(f"[rank {rank}/{world}] {name} failed:\n{traceback.format_exc()}")
                raise
            dist.barrier()
    finally:
        release_group_references()  # (issue 18, item 15: see softcal/_teardown.py)
        dist.destroy_process_group()


def run_ranks(world, *names):
    """Run the named check functions, in order, on every rank of a fresh gloo group."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, names, os.path.join(tmp, "init")), nprocs=world,
                 join=True)


def _slice(full, rank, world, dim=1):
    w = WIDTHS[world]
    off = sum(w[:rank])
    return full.narrow(dim, off, w[rank]), off


def _close(a, b, tol, what):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    same_nan = torch.isnan(a) == torch.isnan(b)
    assert bool(same_nan.all()), f"{what}: NaN pattern differs: {a} vs {b}"
    fin = ~torch.isnan(a)
    torch.testing.assert_close(a[fin], b[fin], rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _data(c=11, n=13, kdim=False, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, 3) if kdim else (n, c)
    x = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    t = torch.randint(0, c, (n, 3) if kdim else (n,), generator=g)
    t.view(-1)[2] = -100
    t.view(-1)[7] = -100
    w = torch.rand(c, generator=g, dtype=torch.float64).to(dtype) + 0.1
    return x, t, w


def _one_case(rank, world, x, t, w, *, red, eps, weighted, temp, fused, inplace, tol,
              class_offset=False):
    """vocab-parallel loss and gradients == softcal.cross_entropy of the full logits."""
    kdim = x.dim() == 3
    what = (f"world={world} rank={rank} red={red} eps={eps} weighted={weighted} temp={temp} "
            f"fused={fused} inplace={inplace} kdim={kdim} dtype={x.dtype}")
    v = torch.randn(t.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    v = v.to(x.dtype)
    scale = 1.3

    def upstream(loss):
        return (loss * v).sum() if red == "none" else loss * scale

    # single process, on the full logits
    xf = x.clone().requires_grad_()
    tf = torch.tensor(temp, dtype=x.dtype, requires_grad=True) if temp is not None else None
    ref = softcal.cross_entropy(xf, t, temperature=tf if tf is not None else 1.7,
                                label_smoothing=eps, weight=w if weighted else None,
                                reduction=red)
    upstream(ref).backward()
    # this rank's slice
    leaf = _slice(x, rank, world)[0].clone().requires_grad_()
    off = sum(WIDTHS[world][:rank])
    xl = leaf.clone() if inplace else leaf  # in place: a non-leaf whose producer saved nothing
    tl = torch.tensor(temp, dtype=x.dtype, requires_grad=True) if temp is not None else None
    kw = dict(class_offset=off, num_classes=x.shape[1]) if class_offset else {}
    out = vocab_parallel_cross_entropy(
        xl, t, temperature=tl if tl is not None else 1.7, label_smoothing=eps,
        weight=_slice(w, rank, world, 0)[0] if weighted else None, reduction=red, fused=fused,
        inplace=inplace, **kw)
    assert out.dtype == x.dtype and out.shape == ref.shape, what
    _close(out, ref, tol, what + " loss")
    upstream(out).backward()
    _close(leaf.grad, _slice(xf.grad, rank, world)[0], tol, what + " grad")
    if tl is not None:
        _close(tl.grad, tf.grad, tol, what + " dT")


def check_loss_float64(rank, world):
    x, t, w = _data()
    # the whole matrix on 2 ranks; on 4 (process start-up and 4 processes on CI's 2 cores) the
    # two corners of (smoothing, weights, temperature) with every reduction and mode
    if world == 2:
        options = [(e, wt, tp) for e in (0.0, 0.1) for wt in (False, True) for tp in (None, 0.8)]
    else:
        options = [(0.0, False, None), (0.1, True, 0.8)]
    for red in ("none", "mean", "sum"):
        for eps, weighted, temp in options:
            for fused, inplace in ((False, False), (True, False), (True, True)):
                _one_case(rank, world, x, t, w, red=red, eps=eps, weighted=weighted,
                          temp=temp, fused=fused, inplace=inplace, tol=1e-12)
    # explicit offsets, K-dimensional logits, every reduction and mode
    xk, tk, wk = _data(kdim=True, seed=1)
    for red in ("none", "mean", "sum"):
        for fused, inplace in ((False, False), (True, False), (True, True)):
            _one_case(rank, world, xk, tk, wk, red=red, eps=0.2, weighted=True, temp=1.4,
                      fused=fused, inplace=inplace, tol=1e-12)
            _one_case(rank, world, x, t, w, red=red, eps=0.1, weighted=True, temp=None,
                      fused=fused, inplace=inplace, tol=1e-12, class_offset=True)


def check_loss_low_precision(rank, world):
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
        x, t, w = _data(dtype=dtype, seed=2)
        for red in ("mean", "none"):
            for fused in (False, True):
                _one_case(rank, world, x, t, w, red=red, eps=0.1, weighted=True, temp=1.2,
                          fused=fused, inplace=False, tol=tol)


def check_loss_edges(rank, world):
    x, t, w = _data(seed=3)
    # targets only in rank 0's slice: the other ranks hold no target (and a rank with width 0)
    t0 = t.clone()
    t0[t0 >= 0] = t0[t0 >= 0] % WIDTHS[world][0]
    for red in ("mean", "none"):
        _one_case(rank, world, x, t0, w, red=red, eps=0.1, weighted=True, temp=0.9, fused=False,
                  inplace=False, tol=1e-12)
    # every row ignored: mean NaN, sum 0, gradient 0 (as PyTorch)
    ti = torch.full_like(t, -100)
    for red in ("mean", "sum", "none"):
        for fused in (False, True):
            _one_case(rank, world, x, ti, w, red=red, eps=0.1, weighted=False, temp=1.1,
                      fused=fused, inplace=False, tol=1e-12)
    # masked logits: some -inf, a row with one rank's whole slice -inf, a row entirely -inf that
    # is ignored, a row entirely -inf that is not (NaN, as PyTorch)
    xm = x.clone()
    g = torch.Generator().manual_seed(9)
    mask = torch.rand(xm.shape, generator=g) < 0.2
    mask[torch.arange(len(t)), t.clamp_min(0)] = False
    xm[mask] = float("-inf")
    xm[4, :4] = float("-inf")
    xm[2] = float("-inf")  # row 2 is ignored
    for red in ("none", "sum"):
        for eps in (0.0, 0.1):
            _one_case(rank, world, xm, t, w, red=red, eps=eps, weighted=False, temp=1.3,
                      fused=False, inplace=False, tol=1e-12)
    xn = xm.clone()
    xn[5] = float("-inf")
    _one_case(rank, world, xn, t, w, red="none", eps=0.0, weighted=False, temp=None,
              fused=False, inplace=False, tol=1e-12)
    # a 1-D input (C_r,) with a 0-dim target
    x1 = x[0].clone().requires_grad_()
    l1 = vocab_parallel_cross_entropy(_slice(x1, rank, world, 0)[0], t[0], label_smoothing=0.1)
    _close(l1, softcal.cross_entropy(x1, t[0], label_smoothing=0.1), 1e-12, "1-D")
    # the module
    mod = VocabParallelCrossEntropy(weight=_slice(w, rank, world, 0)[0], label_smoothing=0.1,
                                    temperature=2.0, reduction="sum")
    _close(mod(_slice(x, rank, world)[0], t),
           softcal.cross_entropy(x, t, weight=w, label_smoothing=0.1, temperature=2.0,
                                 reduction="sum"), 1e-12, "module")
    # bad input is refused on every rank, with the argument and the value
    bad = t.clone()
    bad[0] = 11
    with pytest.raises(ValueError, match=r"target\[0\] = 11 is out of range for 11 classes"):
        vocab_parallel_cross_entropy(_slice(x, rank, world)[0], bad)
    with pytest.raises(TypeError, match="num_classes"):
        vocab_parallel_cross_entropy(_slice(x, rank, world)[0], t, class_offset=0)
    with pytest.raises(ValueError, match="inplace=True needs fused=True"):
        vocab_parallel_cross_entropy(_slice(x, rank, world)[0], t, inplace=True)


def check_loss_communication(rank, world):
    """O(rows) communication in the forward, none in the backward except dL/dT (one number);
    an in-place write is declared to autograd."""
    x, t, w = _data(n=64, c=11, seed=4)
    calls = []
    real_ar, real_ag = dist.all_reduce, dist.all_gather

    def ar(tensor, *a, **k):
        calls.append(("all_reduce", tensor.numel()))
        return real_ar(tensor, *a, **k)

    def ag(out, tensor, *a, **k):
        calls.append(("all_gather", tensor.numel()))
        return real_ag(out, tensor, *a, **k)

    dist.all_reduce, dist.all_gather = ar, ag
    try:
        for temp_grad in (False, True):
            for fused in (False, True):
                xl = _slice(x, rank, world)[0].clone().requires_grad_()
                temp = torch.tensor(1.5, dtype=x.dtype, requires_grad=temp_grad)
                calls.clear()
                loss = vocab_parallel_cross_entropy(xl, t, temperature=temp, label_smoothing=0.1,
                                                    fused=fused)
                fwd = list(calls)
                calls.clear()
                loss.backward()
                bwd = list(calls)
                # forward: the ranks' agreement on the call (softcal._agree: one record of
                # WORDS int64 a rank, the widths among them), the row max (64), the packed sums
                from softcal._agree import WORDS

                assert fwd == [("all_reduce", world * WORDS), ("all_reduce", 64),
                               ("all_reduce", 4 * 64 + 1)], fwd
                assert bwd == ([("all_reduce", 1)] if temp_grad else []), bwd
    finally:
        dist.all_reduce, dist.all_gather = real_ar, real_ag
    # in place: the version counter moves, so an op that saved the logits fails loudly
    a = _slice(x, rank, world)[0].clone().requires_grad_()
    z = a.exp()  # exp saves its output
    v0 = z._version
    loss = vocab_parallel_cross_entropy(z, t, fused=True, inplace=True)
    assert z._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def check_dtensor(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    x, t, w = _data(seed=6)
    for placement in (Shard(-1), Shard(1)):
        xd = distribute_tensor(x.clone(), mesh, [placement]).requires_grad_()
        wd = distribute_tensor(w.clone(), mesh, [Shard(0)])
        td = distribute_tensor(t.clone(), mesh, [Replicate()])
        loss = vocab_parallel_cross_entropy(xd, td, weight=wd, label_smoothing=0.1,
                                            temperature=1.3)
        xf = x.clone().requires_grad_()
        ref = softcal.cross_entropy(xf, t, weight=w, label_smoothing=0.1, temperature=1.3)
        _close(loss, ref, 1e-12, f"DTensor {placement}")
        loss.backward()
        ref.backward()
        full_grad = xd.grad.full_tensor()
        _close(full_grad, xf.grad, 1e-12, f"DTensor {placement} grad")
    with pytest.raises(ValueError, match="sharded on the class dimension"):
        vocab_parallel_cross_entropy(distribute_tensor(x.clone(), mesh, [Shard(0)]), t)


def _fit_data(n=500, c=10, seed=7):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    x[torch.arange(n), y] += 2.5  # informative logits, T about 2
    return x, y


def _quiet_fit(*a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TemperatureScaler().fit(*a, progress=False, **k)


def check_fit(rank, world):
    x, y = _fit_data()
    sizes = SHARDS[world]
    lo = sum(sizes[:rank])
    xr, yr = x[lo:lo + sizes[rank]], y[lo:lo + sizes[rank]]
    single = _quiet_fit(x, y)
    group = dist.group.WORLD
    for dtype in (torch.float64, torch.float32):
        r = _quiet_fit(xr.to(dtype), yr, group=group)
        assert r.rows == 500
        ref = single if dtype == torch.float64 else _quiet_fit(x.to(dtype), y)
        assert r.temperature == pytest.approx(ref.temperature, rel=1e-9), (dtype, rank)
        assert r.nll_after == pytest.approx(ref.nll_after, rel=1e-9)
        ts = [None] * world
        dist.all_gather_object(ts, r.temperature)
        assert len(set(ts)) == 1, ts  # bitwise the same T on every rank
    # chunks of unequal sizes on each rank
    chunks = [(xr[i:i + 64], yr[i:i + 64]) for i in range(0, xr.shape[0], 64)]
    r = _quiet_fit(chunks, group=group)
    assert r.temperature == pytest.approx(single.temperature, rel=1e-9)
    # fit(model, loader): each rank evaluates its shard (a rank may have none)
    from torch.utils.data import DataLoader, TensorDataset

    net = torch.nn.Linear(10, 10).double()
    with torch.no_grad():
        net.weight.copy_(torch.eye(10))
        net.bias.zero_()
    loader = DataLoader(TensorDataset(xr, yr), batch_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = TemperatureScaler().fit(net, loader, group=group, progress=False)
    assert r.temperature == pytest.approx(single.temperature, rel=1e-9) and r.rows == 500
    # invalid input on one rank: every rank raises (no rank is left waiting)
    ybad = yr.clone()
    if rank == world - 1:
        ybad[0] = 99
    with pytest.raises(ValueError, match=rf"labels must be in .*\[rank {world - 1} of the group"):
        _quiet_fit(xr, ybad, group=group)
    # a DistributedSampler repeats rows to even out the ranks: the mask drops them
    from torch.utils.data.distributed import DistributedSampler

    n = 499  # not a multiple of 2 or 4: the sampler pads
    ds = TensorDataset(x[:n], y[:n])
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=3)
    idx = torch.tensor(list(sampler))
    mask = padding_mask(sampler)
    assert mask.shape == idx.shape and int((~mask).sum()) <= 1
    masked = _quiet_fit(x[idx][mask], y[idx][mask], group=group)
    whole = _quiet_fit(x[:n], y[:n])
    assert masked.temperature == pytest.approx(whole.temperature, rel=1e-9)
    assert masked.rows == n
    if world > 1 and n % world:
        padded = _quiet_fit(x[idx], y[idx], group=group)
        assert padded.rows == n + (world - n % world)
        assert padded.temperature != pytest.approx(whole.temperature, rel=1e-9)


def check_metrics(rank, world):
    x, y = _fit_data(seed=8)
    sizes = SHARDS[world]
    lo = sum(sizes[:rank])
    xr, yr = x[lo:lo + sizes[rank]], y[lo:lo + sizes[rank]]
    group = dist.group.WORLD
    for probs in (False, True):
        s = torch.softmax(x / 1.5, 1) if probs else x
        sr = s[lo:lo + sizes[rank]]
        ref = M.calibration_report(s, y, n_bins=10, probs=probs)
        acc = M.CalibrationMetrics(n_bins=10, probs=probs, group=group)
        for i in range(0, sr.shape[0], 37):
            acc.update(sr[i:i + 37], yr[i:i + 37])
        got = acc.compute()
        for k, v in ref.to_dict().items():
            assert getattr(got, k) == pytest.approx(v, rel=1e-12, abs=1e-15), (k, probs, rank)
        acc.reset()
        acc.update(sr[:0], yr[:0])
        with pytest.raises(ValueError, match="no rows"):
            acc.compute()
    for cls, fn in ((M.ECE, M.ece), (M.AdaptiveECE, M.adaptive_ece), (M.MCE, M.mce),
                    (M.ClasswiseECE, M.classwise_ece), (M.RMSCE, M.rms_calibration_error),
                    (M.Brier, M.brier_score), (M.NLL, M.nll)):
        m = cls(group=group)
        m.update(xr, yr)
        assert m.compute() == pytest.approx(fn(x, y), rel=1e-12, abs=1e-15), cls.__name__


# ---------------------------------------------------------------------- the tests
ALL = ("check_loss_float64", "check_loss_low_precision", "check_loss_edges",
       "check_loss_communication", "check_fit", "check_metrics")


def _have_dtensor() -> bool:
    try:
        import torch.distributed.tensor  # noqa: F401
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
    except ImportError:
        return False
    return True


def test_two_ranks():
    run_ranks(2, *ALL)


@pytest.mark.skipif(not _have_dtensor(), reason="torch.distributed.tensor is not available")
def test_two_ranks_dtensor():
    # (uneven sharding: DTensor splits the 11 classes as 6 + 5)
    run_ranks(2, "check_dtensor")


def test_four_ranks():
    run_ranks(4, "check_loss_float64", "check_loss_edges", "check_fit", "check_metrics")
