"""group= fits of the calibrators (vector, matrix, Dirichlet, ETS, histogram binning) agree
through softcal/_agree.py as TemperatureScaler.fit does (issue 17): ranks that pass different
options, numbers of classes or dtypes, or that fail a check on one rank only, all raise the same
clear error within seconds; none hangs or aborts, and the group stays usable afterwards (a later
all-reduce of the user's is right).

One spawn per world size (2 and 3 gloo ranks) runs every case in turn; after each case the
ranks compare the messages they raised (all_gather_object) and all-reduce a tensor of ones.
The spawn runs under a deadline, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
import tempfile
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

CASE_SECONDS = 30     # one case on the slowest rank (a hang waits for the 45 s gloo timeout)
SPAWN_DEADLINE = 400  # the whole spawn, process start-up included, on a busy 2-core machine
C = 6


def _data(n=120, c=C, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = 2.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    x[torch.arange(n), y] += 2.0
    return x.to(dtype), y


def _last(rank, world, a, b):
    """a on every rank but the last, b on the last."""
    return b if rank == world - 1 else a


def _fit(cal, x, y, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cal.fit(x, y, progress=False, group=dist.group.WORLD, **kw)


# ---------------------------------------------------------------------- the cases
# Each: (function(rank, world), expected exception type or None, regex of the message).
def matrix_tol_differs(rank, world):
    from softcal.nn import MatrixScaler

    _fit(MatrixScaler(lam=1.0, mu=0.1), *_data(seed=rank), tol=_last(rank, world, 1e-9, 1e-8))


def vector_bad_max_iter_on_one_rank(rank, world):
    from softcal.nn import VectorScaler

    _fit(VectorScaler(), *_data(seed=rank), max_iter=_last(rank, world, 50, 0))


def dirichlet_lam_differs(rank, world):
    from softcal.nn import DirichletCalibrator

    _fit(DirichletCalibrator(lam=_last(rank, world, 1.0, 2.0), mu=0.1), *_data(seed=rank))


def matrix_grid_differs(rank, world):
    from softcal.nn import MatrixScaler

    _fit(MatrixScaler(lam=1.0, mus=_last(rank, world, (0.1, 1.0), (0.1, 2.0)), cv=2),
         *_data(seed=rank))


def histogram_bins_differ(rank, world):
    from softcal.nn import HistogramBinning

    _fit(HistogramBinning(n_bins=_last(rank, world, 5, 7)), *_data(seed=rank))


def histogram_classes_differ(rank, world):
    from softcal.nn import HistogramBinning

    _fit(HistogramBinning(n_bins=5), *_data(seed=rank, c=_last(rank, world, C, C - 1)))


def ets_tol_differs(rank, world):
    from softcal.nn import EnsembleTemperatureScaler

    _fit(EnsembleTemperatureScaler(), *_data(seed=rank), tol=_last(rank, world, 1e-10, 1e-9))


def vector_classes_differ(rank, world):
    from softcal.nn import VectorScaler

    _fit(VectorScaler(), *_data(seed=rank, c=_last(rank, world, C, C + 2)))


def matrix_dtype_differs(rank, world):
    from softcal.nn import MatrixScaler

    _fit(MatrixScaler(lam=1.0, mu=0.1),
         *_data(seed=rank, dtype=_last(rank, world, torch.float64, torch.float32)))


def ets_label_out_of_range_on_one_rank(rank, world):
    from softcal.nn import EnsembleTemperatureScaler

    x, y = _data(seed=rank)
    if rank == world - 1:
        y[5] = C
    _fit(EnsembleTemperatureScaler(), x, y)


def vector_no_rows_on_one_rank(rank, world):  # no error: a rank may hold no rows
    from softcal.nn import VectorScaler

    x, y = _data(seed=rank, n=_last(rank, world, 120, 0))
    res = _fit(VectorScaler(), x, y)
    assert res.rows == 120 * (world - 1), res.rows


CASES = [
    (matrix_tol_differs, ValueError, r"MatrixScaler\.fit: the ranks of the group disagree on tol"),
    (vector_bad_max_iter_on_one_rank, ValueError,
     r"VectorScaler\.fit: max_iter must be an int >= 1, got 0 \[rank \d of the group"),
    (dirichlet_lam_differs, ValueError, r"DirichletCalibrator\.fit: the ranks of the group disagree on lam"),
    (matrix_grid_differs, ValueError, r"MatrixScaler\.fit: the ranks of the group disagree on mus"),
    (histogram_bins_differ, ValueError, r"HistogramBinning\.fit: the ranks of the group disagree on n_bins"),
    (histogram_classes_differ, ValueError,
     r"HistogramBinning\.fit: the ranks' logits have different numbers of classes \(6 on rank 0"),
    (ets_tol_differs, ValueError, r"EnsembleTemperatureScaler\.fit: the ranks of the group disagree on tol"),
    (vector_classes_differ, ValueError,
     r"VectorScaler\.fit: the ranks' logits have different numbers of classes \(6 on rank 0"),
    (matrix_dtype_differs, ValueError,
     r"MatrixScaler\.fit: the ranks' logits have different dtypes \(float64 on rank 0"),
    (ets_label_out_of_range_on_one_rank, ValueError, r"labels must be in .*every rank raises this error"),
    (vector_no_rows_on_one_rank, None, r"^no error$"),
]


def _entry(rank, world, init_file, names, out_dir):
    torch.set_num_threads(1)
    if os.environ.get("SOFTCAL_EMULATE_CUDA", "0") == "1":  # as tests/conftest.py does
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda_emu"))
        import emulator

        emulator.install()
    from softcal._teardown import release_group_references

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=45))
    cases = {fn.__name__: (fn, exc, pattern) for fn, exc, pattern in CASES}
    report = []
    try:
        for name in names:
            fn, exc_type, pattern = cases[name]
            t0 = time.perf_counter()
            try:
                fn(rank, world)
                outcome = "no error"
            except Exception as exc:  # noqa: BLE001 (compared below)
                outcome = f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - t0
            msgs = [None] * world
            dist.all_gather_object(msgs, outcome)        # the group still works ...
            ones = torch.ones(3)
            dist.all_reduce(ones)                        # ... and sums right
            problems = []
            want = "" if exc_type is None else exc_type.__name__ + ": "
            if not outcome.startswith(want) or not re.search(pattern, outcome):
                problems.append(f"expected {want or 'no error'} matching {pattern!r}, got {outcome!r}")
            if len(set(msgs)) != 1:
                problems.append(f"the ranks raised different errors: {msgs}")
            if seconds > CASE_SECONDS:
                problems.append(f"took {seconds:.1f} s")
            if ones.tolist() != [float(world)] * 3:
                problems.append(f"a later all_reduce gave {ones.tolist()}")
            report.append(f"{name}: " + ("ok" if not problems else "; ".join(problems)))
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(report))
        release_group_references()
        dist.destroy_process_group()


def _run(world, names):
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.spawn(_entry, args=(world, os.path.join(tmp, "init"), names, tmp),
                       nprocs=world, join=False)
        deadline = time.monotonic() + SPAWN_DEADLINE
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                path = os.path.join(tmp, "rank0.txt")
                done = open(path).read() if os.path.exists(path) else "(no report)"
                pytest.fail(f"{world} ranks hung (deadline {SPAWN_DEADLINE} s); report: {done}")
        return [open(os.path.join(tmp, f"rank{r}.txt")).read().splitlines() for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_calibrator_ranks_raise_together(world):
    names = [fn.__name__ for fn, _, _ in CASES]
    reports = _run(world, names)
    bad = [line for rep in reports for line in rep if not line.endswith(": ok")]
    assert not bad, "\n".join(bad)
    assert all(len(rep) == len(names) for rep in reports), reports
