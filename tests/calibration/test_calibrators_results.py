"""The committed results table (benchmarks/results/calibrators.csv, written by
benchmarks/bench_calibrators.py) has every softcal calibrator on every logit file in tests/data,
with the split, each metric, the fit time and the versions; and the peers' rows name their
library."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from softcal._cli.calibrators import METHODS

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "calibrators.csv"
FILES = ["densenet40_c10", "lenet5_c10", "wideresnet16-4_c10", "densenet-bc-100_c100"]


def test_results_table_covers_every_calibrator_and_file():
    assert len(list((ROOT / "tests" / "data" / "logits").rglob("*.npz"))) + 1 == len(FILES)
    lines = RESULTS.read_text().splitlines()
    head = json.loads(next(csv.reader([lines[0]]))[0][2:])
    assert head["versions"]["softcal"] and head["versions"]["torch"] and "command" in head
    rows = list(csv.DictReader(lines[1:]))
    for f in FILES:
        mine = [r for r in rows if r["file"].startswith(f + " ")]
        assert mine, f
        assert all(r["split"] for r in mine)
        got = {r["method"] for r in mine if r["library"].startswith("softcal")}
        assert got == set(METHODS), (f, set(METHODS) - got)
        for r in mine:
            for k in ("nll", "ece", "classwise_ece", "brier", "accuracy", "fit_s"):
                assert math.isfinite(float(r[k])), (f, r["method"], k)
    peers = {r["library"].split()[0] for r in rows if not r["library"].startswith(("softcal", "-"))}
    # the peers that install here (dirichletcal needs Python >= 3.12)
    assert {"netcal", "sklearn"} <= peers
    assert head["versions"]["netcal"] and head["versions"]["sklearn"]
