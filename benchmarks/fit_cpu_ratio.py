#!/usr/bin/env python
# Usage (from the repository root): python benchmarks/fit_cpu_ratio.py
"""CPU time (time.process_time, one intra-op thread) of a fit over one temperature_stats pass:
less sensitive to other processes' load than wall time."""
import time
import sys
import warnings
sys.path.insert(0, "benchmarks")
import torch
import bench_fit as B
torch.set_num_threads(1)
x, y = B.make_problem(50_000, 1000, 0, 4.0, 8.0)
def cpu(f, reps=5):
    ts = []
    for _ in range(reps):
        t0 = time.process_time()
        out = f()
        ts.append(time.process_time() - t0)
    return min(ts), out
one, _ = cpu(lambda: B.m_one_pass(x, y))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fit, r = cpu(lambda: B.m_softcal(x, y))
    allr, r2 = cpu(lambda: B.m_softcal_all_rows(x, y))
print(f"one pass {one:.3f} s CPU; fit {fit:.3f} s CPU = {fit/one:.2f} passes ({r[1]}); "
      f"all-rows fit {allr:.3f} s = {allr/one:.2f} passes ({r2[1]})")
