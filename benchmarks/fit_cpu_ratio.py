#!/usr/bin/env python
# Usage (from the repository root): python benchmarks/fit_cpu_ratio.py
"""CPU time (time.process_time, one intra-op thread) of a fit over one temperature_stats pass:
less sensitive to other processes' load than wall time (bench_fit.cpu_ratio)."""
import sys
sys.path.insert(0, "benchmarks")
import bench_fit as B  # noqa: E402

x, y = B.make_problem(50_000, 1000, 0, 4.0, 8.0)
print(B.cpu_ratio_text(*B.cpu_ratio(x, y)) + f"; load average {B.load_average()}")
