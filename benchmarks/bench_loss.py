#!/usr/bin/env python
"""Benchmark softcal.cross_entropy against PyTorch eager, torch.compile and Liger-Kernel.

The benchmark lives in the package (softcal/bench.py), so that an installed softcal runs it too
(``softcal bench``, quick by default); this script runs the same code, full by default:

  python benchmarks/bench_loss.py                       # full CPU run, both THP settings
  python benchmarks/bench_loss.py --quick               # small shapes, a minute or two
  python benchmarks/bench_loss.py --device cuda --bandwidth 4000
  python benchmarks/bench_loss.py --help                # every option

Outputs go outside the source tree unless --out says otherwise (see --help).
Not part of the test suite.
"""

import sys
from pathlib import Path

try:
    import softcal.bench as bench
except ImportError:  # not installed: use the checkout this script lives in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import softcal.bench as bench

if __name__ == "__main__":
    sys.exit(bench.main(sys.argv[1:], prog="python benchmarks/bench_loss.py"))
