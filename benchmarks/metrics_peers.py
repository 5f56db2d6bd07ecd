"""softcal.metrics against the peers' own code on every file of tests/data/logits: the largest
absolute difference per metric and file, and each side's time.

    python benchmarks/metrics_peers.py [--out benchmarks/results] [--skip-slow]

Prints a table and writes metrics_peers.csv and metrics_peers.md (command, machine, versions).
Peers: relplot (smECE), uncertainty-calibration (get_calibration_error p=2), netcal (MMCE, ECE,
MCE), Gupta et al.'s ks_error (written out: not packaged). A peer that is not installed is left
out of the table, and said so.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from softcal import metrics as M  # noqa: E402


def files():
    d = np.load(ROOT / "softcal/data/densenet40_c10_logits.npz")
    for split in ("val", "test"):
        x, y = d[f"logits_{split}"], d[f"labels_{split}"]
        yield f"densenet40_c10_{split} (logits)", x, y, False, torch.softmax(torch.from_numpy(x).double(), 1).numpy()
    for name in ("densenet-bc-100-cifar-100", "lenet-5-cifar-10", "wideresnet-16-4-cifar-10"):
        z = np.load(ROOT / f"tests/data/logits/netcal/{name}.npz")
        yield f"{name} (probs)", z["predictions"], z["ground_truth"], True, z["predictions"].astype(np.float64)


def gupta_ks_error(scores, labels):
    order = scores.argsort()
    scores, labels = scores[order], labels[order]
    n = scores.shape[0]
    return np.amax(np.absolute(np.cumsum(scores) / n - np.cumsum(labels) / n))


def timed(f):
    t = time.perf_counter()
    v = f()
    return float(v), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--skip-slow", action="store_true", help="leave out netcal's O(n^2) MMCE")
    args = ap.parse_args()
    peers, missing = {}, []
    for name in ("relplot", "calibration", "netcal"):
        try:
            peers[name] = importlib.import_module(name)
        except ImportError:
            missing.append(name)
    versions = {"torch": torch.__version__, "numpy": np.__version__}
    for dist_name in ("relplot", "uncertainty-calibration", "netcal"):
        try:
            from importlib.metadata import version
            versions[dist_name] = version(dist_name)
        except Exception:
            pass
    rows = []
    for name, s, y, probs, p in files():
        conf, hit = p.max(1), (p.argmax(1) == y).astype(np.float64)
        checks = []
        if "relplot" in peers:
            checks.append(("smooth_ece", "relplot.smECE",
                           lambda: M.smooth_ece(s, y, probs=probs), lambda: peers["relplot"].smECE(conf, hit)))
        if "calibration" in peers:
            for mode in ("top-label", "marginal"):
                checks.append((f"debiased_calibration_error({mode})",
                               f"calibration.get_calibration_error(p=2, debias=True, mode={mode})",
                               lambda mode=mode: M.debiased_calibration_error(s, y, mode=mode, probs=probs),
                               lambda mode=mode: peers["calibration"].get_calibration_error(p, y, p=2, debias=True, mode=mode)))
        if "netcal" in peers:
            from netcal.metrics import ECE, MCE, MMCE
            if not args.skip_slow:
                checks.append(("mmce", "netcal.metrics.MMCE", lambda: M.mmce(s, y, probs=probs),
                               lambda: MMCE().measure(p, y)))
            checks.append(("ece (15 bins)", "netcal.metrics.ECE(bins=15)", lambda: M.ece(s, y, probs=probs),
                           lambda: ECE(bins=15).measure(p, y)))
            checks.append(("mce (15 bins)", "netcal.metrics.MCE(bins=15)", lambda: M.mce(s, y, probs=probs),
                           lambda: MCE(bins=15).measure(p, y)))
        checks.append(("ks_calibration_error", "Gupta et al. ks_error (in the script)",
                       lambda: M.ks_calibration_error(s, y, probs=probs), lambda: gupta_ks_error(conf, hit)))
        for metric, peer, ours, theirs in checks:
            a, ta = timed(ours)
            b, tb = timed(theirs)
            rows.append(dict(file=name, metric=metric, peer=peer, softcal=a, peer_value=b,
                             abs_diff=abs(a - b), softcal_s=ta, peer_s=tb))
    head = f"{'file':38} {'metric':38} {'softcal':>12} {'peer':>12} {'|diff|':>9} {'ours s':>7} {'peer s':>7}"
    print(head)
    for r in rows:
        print(f"{r['file']:38} {r['metric']:38} {r['softcal']:12.9f} {r['peer_value']:12.9f} "
              f"{r['abs_diff']:9.2e} {r['softcal_s']:7.3f} {r['peer_s']:7.3f}")
    worst = {}
    for r in rows:
        worst[r["metric"]] = max(worst.get(r["metric"], 0.0), r["abs_diff"])
    print("\nlargest |difference| per metric:")
    for k, v in worst.items():
        print(f"  {k:40} {v:.2e}")
    if missing:
        print(f"\nnot installed, left out: {', '.join(missing)}")
    os.makedirs(args.out, exist_ok=True)
    cmd = "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs), Python {platform.python_version()}"
    with open(os.path.join(args.out, "metrics_peers.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "metrics_peers.md"), "w") as fh:
        fh.write(f"# softcal.metrics against the peers' own code\n\ncommand: `{cmd}`  \nmachine: {machine}  \n"
                 f"versions: {', '.join(f'{k} {v}' for k, v in versions.items())}  \n"
                 "times: one call each, on a machine shared with other jobs (measured under load)\n\n"
                 "| file | metric | peer | softcal | peer value | abs diff | softcal s | peer s |\n"
                 "|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            fh.write(f"| {r['file']} | {r['metric']} | {r['peer']} | {r['softcal']:.12f} | {r['peer_value']:.12f} "
                     f"| {r['abs_diff']:.2e} | {r['softcal_s']:.3f} | {r['peer_s']:.3f} |\n")
        fh.write("\nlargest |difference| per metric: "
                 + "; ".join(f"{k} {v:.2e}" for k, v in worst.items()) + "\n")
        if missing:
            fh.write(f"\nnot installed, left out: {', '.join(missing)}\n")


if __name__ == "__main__":
    main()
