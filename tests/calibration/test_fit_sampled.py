"""TemperatureScaler.fit in at most 3 full passes (issue 17's target): Newton's first steps on a
sample of the rows, Halley's steps on all of them; the same optimum as before, for tensors,
streams and distributed fits. The pass counts are counters (FitResult), not times."""

from __future__ import annotations

import math
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from softcal import _temperature_fit as TF
from softcal import reference
from softcal._teardown import release_group_references
from softcal.calibration import TemperatureScaler


def problem(n, c, seed=0, margin=4.0, scale=8.0, dtype=torch.float32):
    """benchmarks/bench_fit.py's overconfident classifier (T* about 2 at these defaults)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    z = torch.randn(n, c, generator=g)
    z[torch.arange(n), y] += margin
    return (scale * z).to(dtype).contiguous(), y


def optimum(x, y):
    """T* on the exact float64 statistics (the reference, no kernel): bisection of f' on log
    beta, then Newton."""
    lo, hi = 1e-4, 1e4
    for _ in range(60):
        beta = math.sqrt(lo * hi)
        if float(reference.temperature_stats(x, y, beta)[1]) < 0:
            lo = beta
        else:
            hi = beta
    beta = math.sqrt(lo * hi)
    for _ in range(20):
        s = reference.temperature_stats(x, y, beta)
        step = -float(s[1]) / float(s[2])
        beta += step
        if abs(step) < 1e-15 * beta:
            break
    return 1.0 / beta


def work(r):
    """The fit's work in passes over all the rows."""
    return r.iterations + r.check_passes + r.sample_passes * r.sample_rows / r.rows


def quiet(scaler, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return scaler.fit(*a, progress=False, **k)


@pytest.mark.parametrize("seed,margin,scale", [(0, 4.0, 8.0), (1, 2.0, 3.0), (2, 4.0, 20.0),
                                               (3, 1.0, 0.3)])
def test_three_full_passes_at_the_same_exactness(seed, margin, scale):
    x, y = problem(50000, 100, seed, margin, scale)
    r = quiet(TemperatureScaler(), x, y)
    t_star = optimum(x, y)
    assert r.converged and r.sample_rows == 3125
    assert r.iterations <= 3, r
    # 2 full passes and about 0.35 of sample work; 3 and about 0.46 where the second is too far
    assert work(r) <= 3.5, (work(r), r)
    # float32 logits: the kernel's per-row float32 arithmetic sets the floor (about 3e-8; the
    # full-data Newton fit had the same), far below the tests' 1e-5 against scipy
    assert r.temperature == pytest.approx(t_star, rel=2e-7)
    f64 = quiet(TemperatureScaler(), x.double(), y)
    assert f64.temperature == pytest.approx(t_star, rel=1e-10)   # float64: exact to 1e-10
    assert f64.iterations <= 4   # float64: to tol^2 (1e-12), not to the float32 floor


def test_small_data_fit_on_all_rows():
    x, y = problem(3000, 10)
    r = quiet(TemperatureScaler(), x, y)
    assert r.sample_rows == 0 and r.sample_passes == 0
    assert r.temperature == pytest.approx(optimum(x, y), rel=2e-7)


def test_start_near_the_optimum_skips_the_sample():
    x, y = problem(50000, 100, 1, 1.0, 1.0)
    r = quiet(TemperatureScaler(init_temperature=optimum(x, y) * 1.01), x, y)
    assert r.sample_passes == 0 and r.iterations <= 3
    assert r.temperature == pytest.approx(optimum(x, y), rel=2e-7)


def test_streams_and_chunks_take_the_same_sample_and_path():
    x, y = problem(40000, 50, 4)
    whole = quiet(TemperatureScaler(), x, y)
    chunks = list(zip(x.split(3001), y.split(3001)))
    ds = torch.utils.data.TensorDataset(x, y)
    for source in (chunks, lambda: zip(x.split(777), y.split(777)),
                   torch.utils.data.DataLoader(ds, batch_size=5000)):
        r = quiet(TemperatureScaler(), source)
        assert (r.rows, r.sample_rows, r.iterations) == (whole.rows, whole.sample_rows,
                                                         whole.iterations)
        assert r.temperature == pytest.approx(whole.temperature, rel=1e-9)
        assert r.nll_after == pytest.approx(whole.nll_after, rel=1e-9)


def test_a_stream_thins_its_sample(monkeypatch):
    """The first pass keeps the rows of a smaller k while N is unknown and thins them when they
    pass 2 x SAMPLE_ELEMENTS logits: the same sample as for the whole tensor."""
    monkeypatch.setattr(TF, "SAMPLE_ELEMENTS", 1 << 14)       # 1,638 rows of 10 classes
    x, y = problem(40000, 10, 5, 2.0, 3.0)
    whole = quiet(TemperatureScaler(), x, y)
    stream = quiet(TemperatureScaler(), list(zip(x.split(1000), y.split(1000))))
    expected = int(TF._in_sample(torch.arange(40000), 5).sum())  # k = 5 for 40,000 rows
    assert whole.sample_rows == stream.sample_rows == expected
    assert stream.temperature == pytest.approx(whole.temperature, rel=1e-9)
    assert stream.temperature == pytest.approx(optimum(x, y), rel=2e-7)


def test_sample_spreads_over_sorted_data():
    """Rows sorted by label (an ImageFolder without shuffling): the sample still covers every
    class evenly."""
    x, y = problem(64000, 20, 6)
    order = torch.argsort(y, stable=True)
    xs, ys = x[order], y[order]
    sel = TF._in_sample(torch.arange(64000), 4)
    counts = torch.bincount(ys[sel], minlength=20).double()
    expected = torch.bincount(ys, minlength=20).double() / 16
    assert float(((counts - expected).abs() / expected).max()) < 0.05
    r = quiet(TemperatureScaler(), xs, ys)
    assert r.iterations <= 3 and r.temperature == pytest.approx(optimum(x, y), rel=2e-7)


def test_separable_data_with_a_sample():
    y = torch.arange(20000) % 10
    x = torch.nn.functional.one_hot(y, 10).float() * 4.0
    with pytest.warns(RuntimeWarning, match="separable"):
        r = TemperatureScaler().fit(x, y)
    assert r.at_bound == "lower" and r.sample_rows > 0 and r.check_passes == 1
    # one wrong row outside the sample: the sample is all right, the check pass finds it
    sel = TF._in_sample(torch.arange(20000), 4)
    row = int((~sel).nonzero()[0, 0])
    x2 = x.clone()
    x2[row] = torch.roll(x2[row], 1)
    r2 = quiet(TemperatureScaler(), x2, y, bounds=(1e-2, 1e2))
    assert r2.check_passes == 1 and r2.at_bound is None or r2.at_bound == "lower"


def test_nan_in_large_input_names_the_row():
    x, y = problem(30000, 20, 7)
    x[12345, 3] = float("nan")
    with pytest.raises(ValueError, match=r"logits contain NaN \(first in row 12345\)"):
        TemperatureScaler().fit(x, y)
    x[12345, 3] = float("inf")
    with pytest.raises(ValueError, match=r"\+inf \(first in row 2345\) \(chunk 1\)"):
        TemperatureScaler().fit(list(zip(x.split(10000), y.split(10000))))


# ---------------------------------------------------------------------- distributed
def _entry(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        x, y = problem(48000, 50, 8)
        sizes = [30000, 18000, 0][:world] if world == 3 else [30000, 18000]
        lo = sum(sizes[:rank])
        r = quiet(TemperatureScaler(), x[lo:lo + sizes[rank]], y[lo:lo + sizes[rank]],
                  group=dist.group.WORLD)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(repr((r.temperature, r.iterations, r.sample_rows, r.rows)))
    finally:
        release_group_references()  # before destroy (softcal/_teardown.py)
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_distributed_sampled_fit_equals_the_whole_fit():
    x, y = problem(48000, 50, 8)
    whole = quiet(TemperatureScaler(), x, y)
    t_star = optimum(x, y)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        got = [eval(open(os.path.join(tmp, f"rank{r}.txt")).read()) for r in range(2)]
    assert got[0] == got[1]                       # bitwise the same T on every rank
    t, its, sample_rows, rows = got[0]
    assert rows == 48000 and sample_rows > 2000 and its <= 3
    # each rank samples its own rows: another sample than the single process's, the same
    # optimum (to the float32 floor)
    assert t == pytest.approx(whole.temperature, rel=2e-7)
    assert t == pytest.approx(t_star, rel=2e-7)
    assert math.isfinite(t)
