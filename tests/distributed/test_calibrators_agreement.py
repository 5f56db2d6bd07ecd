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

import warnings

import pytest
import torch
import torch.distributed as dist

import agreement_harness

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


def _run(world, names):
    return agreement_harness.run_cases(__name__, world, names, gloo_seconds=45, case_seconds=CASE_SECONDS,
                                       spawn_deadline=SPAWN_DEADLINE)


@pytest.mark.parametrize("world", [2, 3])
def test_calibrator_ranks_raise_together(world):
    names = [fn.__name__ for fn, _, _ in CASES]
    reports = _run(world, names)
    bad = [line for rep in reports for line in rep if not line.endswith(": ok")]
    assert not bad, "\n".join(bad)
    assert all(len(rep) == len(names) for rep in reports), reports
