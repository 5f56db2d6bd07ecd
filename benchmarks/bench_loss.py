#!/usr/bin/env python
"""The loss benchmark, full by default: softcal.bench (the code of `softcal bench`) plus a plot.

  python benchmarks/bench_loss.py                       # full CPU run, both THP settings
  python benchmarks/bench_loss.py --quick               # small shapes, a minute or two
  python benchmarks/bench_loss.py --device cuda --bandwidth 4000
  python benchmarks/bench_loss.py --help                # every option

Writes <out>/<device>_<tag>.{csv,md,png}. Not part of the test suite.
"""

import csv
import sys
from pathlib import Path

try:
    import softcal.bench as bench
except ImportError:  # not installed: the checkout this script lives in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import softcal.bench as bench

IMPLS = bench.SOFTCAL_IMPLS + bench.BASELINES
COLORS = dict(zip(IMPLS, ["#1f77b4", "#17becf", "#2ca02c", "#d62728", "#ff7f0e", "#9467bd", "#8c564b"]))


def plot(csv_path: Path) -> Path:
    """GB/s of every implementation per shape: one panel per (THP setting, dtype) and pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    lines = csv_path.read_text().splitlines()
    header = [l[2:] for l in lines if l.startswith("# ")]
    rows = [r for r in csv.DictReader(l for l in lines if not l.startswith("#")) if r["status"] == "ok"]
    panels = list(dict.fromkeys((r["thp"], r["dtype"]) for r in rows))
    passes = ["fwd", "fwd+bwd"]
    fig, axes = plt.subplots(2, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 8), squeeze=False)
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    for j, (thp, dtype) in enumerate(panels):
        for i, pas in enumerate(passes):
            ax = axes[i][j]
            sel = [r for r in rows if (r["thp"], r["dtype"], r["pass"]) == (thp, dtype, pas)]
            shapes = list(dict.fromkeys((r["N"], r["C"]) for r in sel))
            here = [m for m in impls if any(r["impl"] == m for r in sel)]
            width = 0.8 / max(1, len(here))
            for k, impl in enumerate(here):
                gbps = {(r["N"], r["C"]): float(r["GBps"]) for r in sel if r["impl"] == impl}
                ax.bar([x + k * width for x in range(len(shapes))], [gbps.get(s, 0) for s in shapes],
                       width, color=COLORS[impl])
            ax.set_xticks([x + width * (len(here) - 1) / 2 for x in range(len(shapes))])
            ax.set_xticklabels([f"{n}x{c}" for n, c in shapes], rotation=20, fontsize=8)
            ax.set_ylabel("GB/s (bytes that must move)")
            ax.set_title(f"{pas}, {dtype}, {bench.THP_VAR}={thp}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle("\n".join(header[:3]), fontsize=8)
    fig.legend(handles=[Patch(color=COLORS[m], label=m) for m in impls], loc="lower center",
               ncol=len(impls), fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.92))
    png = csv_path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv) -> int:
    rc = bench.main(argv, prog="python benchmarks/bench_loss.py")
    args = bench.parse_args(argv) if rc in (0, 1) else None
    if args is not None and not args.no_plot and not args.worker_json:
        csv_path = Path(args.out) / f"{args.device}_{args.tag}.csv"
        if csv_path.is_file():
            print(f"wrote {plot(csv_path)}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
