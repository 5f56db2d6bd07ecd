"""Ranks that disagree, or that fail a check on one rank only (issue 18, items 12-14): every rank
raises the same clear error within seconds, no rank aborts or hangs, and the group stays usable
(a later all-reduce of the user's is right).

Each world (2 and 3 gloo ranks) is one spawn that runs every case in turn; a case gives each rank
its own arguments. After each case the ranks compare the messages they raised (all_gather_object)
and all-reduce a tensor of ones. The whole spawn runs under a deadline (a hang fails the test
instead of blocking CI), and a rank killed by a signal (gloo's abort on a size mismatch) fails it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import agreement_harness
from softcal import metrics as M
from softcal.distributed import vocab_parallel_cross_entropy as vpce
from softcal.nn import TemperatureScaler

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

CASE_SECONDS = 20     # one case, on the slowest rank (seconds on a quiet machine)
SPAWN_DEADLINE = 300  # the whole spawn (process start-up included, busy 2-core CI)
C = 11                # classes of the vocab-parallel cases (widths 4 + 7, or 4 + 4 + 3)


def _widths(world):
    return [4, 7] if world == 2 else [4, 4, 3]


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, generator=g, dtype=torch.float64)
    t = torch.randint(0, C, (n,), generator=g)
    return x, t


def _slice(x, rank, world):
    w = _widths(world)
    return x[..., sum(w[:rank]):sum(w[:rank + 1])]


def _last(rank, world, a, b):
    """a on every rank but the last, b on the last."""
    return b if rank == world - 1 else a


# ---------------------------------------------------------------------- the cases
# Each case: (name, function(rank, world), regex every rank's message must match).
def vp_rows(rank, world):  # item 12: N - 2 rows on the last rank
    x, t = _data(40 - 2 * (rank == world - 1))
    vpce(_slice(x, rank, world), t)


def vp_rows_zero(rank, world):  # item 12: 0 rows on one rank
    x, t = _data(0 if rank == world - 1 else 40)
    vpce(_slice(x, rank, world), t)


def vp_rows_large(rank, world):  # item 12: 5000 vs 4000 rows
    x, t = _data(_last(rank, world, 4000, 5000))
    vpce(_slice(x, rank, world), t)


def vp_target_out_of_range(rank, world):  # item 13: a bad target on one rank
    x, t = _data()
    if rank == world - 1:
        t[3] = C
    vpce(_slice(x, rank, world), t)


def vp_target_out_of_range_offsets(rank, world):  # item 13, with explicit offsets
    x, t = _data()
    if rank == world - 1:
        t[5] = -7
    w = _widths(world)
    vpce(_slice(x, rank, world), t, class_offset=sum(w[:rank]), num_classes=C)


def vp_bad_argument(rank, world):  # item 13: one rank's argument check fails
    x, t = _data()
    vpce(_slice(x, rank, world), t, label_smoothing=_last(rank, world, 0.1, 1.5))


def vp_reduction(rank, world):  # item 14
    x, t = _data()
    vpce(_slice(x, rank, world), t, reduction=_last(rank, world, "mean", "sum"))


def vp_smoothing(rank, world):  # item 14
    x, t = _data()
    vpce(_slice(x, rank, world), t, label_smoothing=_last(rank, world, 0.2, 0.0))


def vp_temperature(rank, world):  # item 14
    x, t = _data()
    vpce(_slice(x, rank, world), t, temperature=_last(rank, world, 1.0, 3.0))


def vp_temperature_tensor(rank, world):  # item 14: a tensor temperature that differs
    x, t = _data()
    vpce(_slice(x, rank, world), t,
         temperature=torch.tensor(_last(rank, world, 1.0, 3.0), dtype=torch.float64))


def vp_num_classes(rank, world):  # item 14
    x, t = _data()
    w = _widths(world)
    vpce(_slice(x, rank, world), t, class_offset=sum(w[:rank]),
         num_classes=_last(rank, world, 12, 17))


def vp_overlap(rank, world):  # item 14: overlapping class offsets
    x, t = _data()
    w = _widths(world)
    off = sum(w[:rank]) - (1 if rank == world - 1 else 0)
    vpce(_slice(x, rank, world), t, class_offset=off, num_classes=C)


def vp_gap(rank, world):  # slices that do not cover the classes
    x, t = _data()
    xs = _slice(x, rank, world)
    if rank == world - 1:
        xs = xs[:, :-1]
    w = _widths(world)
    vpce(xs, t.clamp_max(C - 2), class_offset=sum(w[:rank]), num_classes=C)


def vp_targets_differ(rank, world):  # item 14: different (valid) targets
    x, t = _data()
    if rank == world - 1:
        t = t.roll(1)
    vpce(_slice(x, rank, world), t)


def vp_dtype(rank, world):  # the accumulation dtype (and so the collectives' sizes) differ
    x, t = _data()
    vpce(_slice(x, rank, world).to(_last(rank, world, torch.float64, torch.float32)), t)


def vp_offset_mixed(rank, world):  # class_offset on some ranks only
    x, t = _data()
    kw = dict(class_offset=0, num_classes=C) if rank == 0 else {}
    vpce(_slice(x, rank, world), t, **kw)


def vp_temperature_grad(rank, world):  # a temperature that requires grad on one rank only:
    x, t = _data()                     # the backward's all-reduce would be entered by one rank
    temp = torch.tensor(1.5, dtype=torch.float64, requires_grad=rank == world - 1)
    vpce(_slice(x, rank, world), t, temperature=temp)


def fit_bounds(rank, world):  # item 13: an option check fails on one rank
    x, t = _data(60, seed=rank)
    _fit(x, t, bounds=_last(rank, world, (0.01, 100.0), (1.0, 1.0)))


def fit_max_iter(rank, world):  # item 13: options that differ desynchronise the passes
    x, t = _data(60, seed=rank)
    _fit(x, t, max_iter=_last(rank, world, 100, 3))


def fit_tol(rank, world):  # item 13
    x, t = _data(60, seed=rank)
    _fit(x, t, tol=_last(rank, world, 1e-6, 1e-2))


def fit_start(rank, world):  # a scaler that starts from another T
    x, t = _data(60, seed=rank)
    s = TemperatureScaler(init_temperature=_last(rank, world, 1.0, 2.0))
    _fit(x, t, scaler=s)


def fit_model_fails(rank, world):  # a model that raises on one rank, before any pass
    x, t = _data(60, seed=rank)

    class Net(torch.nn.Module):
        def forward(self, inp):
            if rank == world - 1:
                raise RuntimeError("this rank's model failed")
            return inp

    _fit(Net(), [(x, t)])


def fit_bad_logits(rank, world):  # NaN on one rank: found after the first pass, named
    x, t = _data(60, seed=rank)
    if rank == world - 1:
        x[7, 2] = float("nan")
    _fit(x, t)


def metrics_bins(rank, world):  # item 12: n_bins per rank
    x, t = _data(50, seed=rank)
    m = M.CalibrationMetrics(n_bins=_last(rank, world, 15, 10), group=dist.group.WORLD)
    m.update(x, t)
    m.compute()


def metrics_probs(rank, world):
    x, t = _data(50, seed=rank)
    probs = rank == world - 1
    m = M.CalibrationMetrics(probs=probs, group=dist.group.WORLD)
    m.update(torch.softmax(x, 1) if probs else x, t)
    m.compute()


def metrics_adaptive(rank, world):  # adaptive ECE gathers rows on some ranks only
    x, t = _data(50, seed=rank)
    m = M.CalibrationMetrics(adaptive=rank != world - 1, group=dist.group.WORLD)
    m.update(x, t)
    m.compute()


def metrics_classes(rank, world):
    x, t = _data(50, seed=rank)
    if rank == world - 1:
        x, t = x[:, :5], t % 5
    m = M.CalibrationMetrics(group=dist.group.WORLD)
    m.update(x, t)
    m.compute()


def _fit(data, labels=None, scaler=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (scaler or TemperatureScaler()).fit(data, labels, group=dist.group.WORLD, progress=False,
                                            **kw)


CASES = [
    (vp_rows, ValueError, r"disagree on the number of rows: 40 on rank"),
    (vp_rows_zero, ValueError, r"disagree on the number of rows: 40 on rank"),
    (vp_rows_large, ValueError, r"disagree on the number of rows: 4000 on rank"),
    (vp_target_out_of_range, ValueError, r"target\[3\] = 11 is out of range for 11 classes"),
    (vp_target_out_of_range_offsets, ValueError, r"target\[5\] = -7 is out of range"),
    (vp_bad_argument, ValueError, r"label_smoothing.*1\.5.*\[rank \d of the group of \d; "
                                  r"every rank raises this error\]"),
    (vp_reduction, ValueError, r"disagree on reduction: 'mean' on rank"),
    (vp_smoothing, ValueError, r"disagree on label_smoothing: 0\.2 on rank"),
    (vp_temperature, ValueError, r"disagree on temperature: 1\.0 on rank"),
    (vp_temperature_tensor, ValueError, r"disagree on temperature: 1\.0 on rank"),
    (vp_num_classes, ValueError, r"disagree on num_classes: 12 on rank"),
    (vp_overlap, ValueError, r"class slices overlap"),
    (vp_gap, ValueError, r"class slices (leave a gap|cover \[0, 10\))"),
    (vp_targets_differ, ValueError, r"hold different targets"),
    (vp_dtype, ValueError, r"disagree on the logits' dtype: float64 on rank"),
    (vp_offset_mixed, ValueError, r"disagree on class_offset: 'an int' on rank 0"),
    (vp_temperature_grad, ValueError, r"disagree on temperature\.requires_grad"),
    (fit_bounds, ValueError, r"bounds must satisfy 0 < T_min < T_max.*\[rank \d of the group"),
    (fit_max_iter, ValueError, r"disagree on max_iter: 100 on rank"),
    (fit_tol, ValueError, r"disagree on tol: 1e-06 on rank"),
    (fit_start, ValueError, r"disagree on the starting temperature"),
    (fit_model_fails, RuntimeError, r"this rank's model failed \[rank \d of the group"),
    (fit_bad_logits, ValueError, r"logits contain NaN \(first in row 7\).*\[rank \d of the group"),
    (metrics_bins, ValueError, r"disagree on n_bins: 15 on rank"),
    (metrics_probs, ValueError, r"disagree on probs: False on rank"),
    (metrics_adaptive, ValueError, r"disagree on adaptive: True on rank"),
    (metrics_classes, ValueError, r"different numbers of classes \(from 5 to 11\)"),
]


def run_cases(world, names):
    """Spawn ``world`` gloo ranks running the named cases; return each rank's report lines."""
    return agreement_harness.run_cases(__name__, world, names, gloo_seconds=60, case_seconds=CASE_SECONDS,
                                       spawn_deadline=SPAWN_DEADLINE)


@pytest.mark.parametrize("world", [2, 3])
def test_disagreeing_ranks_raise_together(world):
    names = [fn.__name__ for fn, _, _ in CASES]
    reports = run_cases(world, names)
    bad = [line for rep in reports for line in rep if not line.endswith(": ok")]
    assert not bad, "\n".join(bad)
    assert all(len(rep) == len(names) for rep in reports), reports


def test_every_case_is_listed():
    """Each case function of this file is in CASES (none silently left out)."""
    defined = {n for n, v in globals().items() if callable(v) and n.split("_")[0] in
               ("vp", "fit", "metrics") and not n.startswith("_")}
    assert defined == {fn.__name__ for fn, _, _ in CASES}
