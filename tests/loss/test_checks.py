"""The argument checks of the compiled ops (csrc/checks.h): the same checks and the same messages
on every backend, each message naming the op as users know it (softcal.cross_entropy, ...), the
argument and the bad value. The ops are called directly (the Python layer validates first and
would hide them). Under SOFTCAL_EMULATE_CUDA=1 the same tests run the CUDA kernels' host code.
"""
import re

import pytest
import torch

ops = torch.ops.softcal


def _ce(rows=4, c=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, c, generator=g, dtype=dtype)
    t = torch.randint(0, c, (rows,), generator=g)
    return x, t


def _raises(exc, message, fn, *args):
    with pytest.raises(exc, match=re.escape(message)):
        fn(*args)


def test_backward_checks_grad_loss_and_denom():
    x, t = _ce()
    loss, lse, denom = ops.cross_entropy_fwd(x, t, None, None, 1.0, 0.0, -100, 1)
    bwd = ops.cross_entropy_bwd
    tail = (None, 1.0, 0.0, -100, 1, True, False)
    _raises(RuntimeError, "softcal.cross_entropy (backward): grad_loss must be floating, got Long",
            bwd, torch.tensor(1), x, t, None, lse, denom, *tail)
    _raises(RuntimeError, "softcal.cross_entropy (backward): grad_loss must be 0-dim, got [2]",
            bwd, torch.ones(2), x, t, None, lse, denom, *tail)
    _raises(RuntimeError, "softcal.cross_entropy (backward): denom must be a 0-dim Float tensor, "
            "got [] Double", bwd, torch.tensor(1.0), x, t, None, lse, denom.double(), *tail)
    _raises(RuntimeError, "softcal.cross_entropy (backward): lse must be (4, 2) Float",
            bwd, torch.tensor(1.0), x, t, None, lse[:3], denom, *tail)
    _raises(RuntimeError, "softcal.cross_entropy (backward): grad_loss must be (4,) for reduction "
            "none, got [3]", bwd, torch.ones(3), x, t, None, lse, denom, None, 1.0, 0.0, -100, 0,
            True, False)


def test_soft_target_backward_checks_mass_and_grad_loss():
    x, _ = _ce()
    p = torch.softmax(torch.randn(4, 5), 1)
    loss, lse, mass = ops.soft_target_fwd(x, p, None, None, 1.0, 0.0, 1)
    bwd = ops.soft_target_bwd
    tail = (None, 1.0, 0.0, 1, True, False, False)
    op = "softcal.cross_entropy (class-probability targets, backward)"
    _raises(RuntimeError, f"{op}: grad_loss must be floating, got Int", bwd,
            torch.tensor(1, dtype=torch.int32), x, p, None, lse, mass, *tail)
    _raises(RuntimeError, f"{op}: mass must be (4,) Float, got [4] Double", bwd,
            torch.tensor(1.0), x, p, None, lse, mass.double(), *tail)


def test_inplace_ops_need_contiguous_logits():
    _, t = _ce(c=8)
    xs = torch.randn(4, 16)[:, :8]  # unit class stride: read in place, but not contiguous
    _raises(RuntimeError, "softcal.cross_entropy (fused, in place): logits must be contiguous (the "
            "gradient is written into its buffer), got strides [16, 1]", ops.cross_entropy_fused_,
            xs, t, None, None, 1.0, 0.0, -100, 1, False)
    lse = torch.zeros(4, 2)
    coef = torch.zeros(4, 3)
    _raises(RuntimeError, "softcal.shard_grad_: logits must be contiguous", ops.shard_grad_,
            xs, t, None, lse, coef, None, 1.0, 0.0, 0, -100, False)


def test_softmax_checks_dim_temperature_and_shapes():
    x = torch.randn(3, 4)
    _raises(IndexError, "softcal.softmax: dim 2 is out of range for a tensor of 2 dimensions",
            ops.softmax_fwd, x, None, 1.0, 2, False)
    _raises(IndexError, "softcal.log_softmax: dim -3 is out of range for a tensor of 2 dimensions",
            ops.softmax_fwd, x, None, 1.0, -3, True)
    _raises(RuntimeError, "softcal.softmax: temperature must be a finite number > 0, got 0",
            ops.softmax_fwd, x, None, 0.0, 1, False)
    _raises(RuntimeError, "softcal.softmax: input must be a floating tensor (float16, bfloat16, "
            "float32 or float64), got Long", ops.softmax_fwd, torch.ones(3, dtype=torch.long),
            None, 1.0, 0, False)
    y = ops.softmax_fwd(x, None, 1.0, 1, False)
    _raises(RuntimeError, "softcal.softmax (backward): temperature tensor must be 0-dim, got shape "
            "[2]", ops.softmax_bwd, torch.ones_like(y), y, torch.ones(2), 1.0, 1, False, True)
    _raises(RuntimeError, "softcal.log_softmax (backward): grad_out has shape [3, 3] but out has "
            "shape [3, 4]", ops.softmax_bwd, torch.ones(3, 3), y, None, 1.0, 1, True, False)
    _raises(IndexError, "softcal.softmax (backward): dim 2 is out of range", ops.softmax_bwd,
            torch.ones_like(y), y, None, 1.0, 2, False, False)


def test_softmax_of_a_0_dim_input():
    """A 0-dim input is a softmax over one element (as torch.softmax), on every backend."""
    x = torch.tensor(3.0)
    y = ops.softmax_fwd(x, None, 2.0, 0, False)
    assert y.shape == () and y.item() == 1.0
    assert ops.softmax_fwd(x, None, 2.0, -1, True).item() == 0.0
    gx, _ = ops.softmax_bwd(torch.tensor(0.5), y, None, 2.0, 0, False, False)
    assert gx.shape == () and gx.item() == 0.0


def test_temperature_stats_and_scale_rows_checks():
    x, t = _ce()
    _raises(RuntimeError, "softcal.temperature_stats: beta must be a finite number > 0, got -1",
            ops.temperature_stats, x, t, -1.0)
    _raises(RuntimeError, "softcal.temperature_stats: target has shape [3] but logits has 4 rows",
            ops.temperature_stats, x, t[:3], 1.0)
    _raises(RuntimeError, "softcal.scale_rows_: scale must be a floating tensor", ops.scale_rows_,
            x.clone(), torch.tensor(2))
    _raises(RuntimeError, "softcal.scale_rows_: scale must be 0-dim or (4,), got [3]",
            ops.scale_rows_, x.clone(), torch.ones(3))


@pytest.mark.parametrize("op, args, name", [
    ("cross_entropy_fwd", lambda x, t: (x, t, None, None, 1.0, 0.0, -100, 7),
     "softcal.cross_entropy"),
    ("cross_entropy_fused", lambda x, t: (x, t, None, None, 1.0, 0.0, -100, 7, False),
     "softcal.cross_entropy (fused)"),
    ("cross_entropy_fused_", lambda x, t: (x, t, None, None, 1.0, 0.0, -100, 7, False),
     "softcal.cross_entropy (fused, in place)"),
    ("soft_target_fwd", lambda x, t: (x, torch.ones_like(x), None, None, 1.0, 0.0, 7),
     "softcal.cross_entropy (class-probability targets)"),
])
def test_each_op_names_itself_as_users_know_it(op, args, name):
    x, t = _ce()
    _raises(RuntimeError, f"{name}: reduction must be 0 (none), 1 (mean) or 2 (sum), got 7",
            getattr(ops, op), *args(x, t))


def test_temperature_tensor_checks_are_the_same_for_every_op():
    x, t = _ce()
    bad = torch.ones(1, 1)
    msg = "temperature tensor must be 0-dim, got shape [1, 1]"
    _raises(RuntimeError, f"softcal.cross_entropy: {msg}", ops.cross_entropy_fwd, x, t, None, bad,
            1.0, 0.0, -100, 1)
    _raises(RuntimeError, f"softcal.shard_stats: {msg}", ops.shard_stats, x, t, None, bad, 1.0, 0,
            -100, False)
    _raises(RuntimeError, f"softcal.softmax: {msg}", ops.softmax_fwd, x, bad, 1.0, 1, False)
    _raises(RuntimeError, "softcal.softmax: temperature tensor must be floating, got Long",
            ops.softmax_fwd, x, torch.tensor(2), 1.0, 1, False)
