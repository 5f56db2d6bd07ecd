"""softcal calibrate --method M, softcal compare, and softcal apply with a saved calibrator
of any kind (end to end, in-process through softcal.cli.main)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from softcal import cli
from softcal._cli.calibrators import METHODS, read_calibrator

LENET = "tests/data/logits/netcal/lenet-5-cifar-10.npz"


@pytest.fixture()
def small(tmp_path):
    """2000 rows of the LeNet-5 file as val and test files (probabilities)."""
    d = np.load(LENET)
    p, y = d["predictions"], d["ground_truth"]
    val, test = tmp_path / "val.npz", tmp_path / "test.npz"
    np.savez(val, predictions=p[:1000], ground_truth=y[:1000])
    np.savez(test, predictions=p[1000:2000], ground_truth=y[1000:2000])
    return val, test


@pytest.mark.parametrize("method", [m for m in METHODS if m != "ts"])
def test_calibrate_method_save_apply(method, small, tmp_path, capsys):
    val, test = small
    out, cal = tmp_path / "out", tmp_path / "cal.json"
    rc = cli.main(["calibrate", str(val), "--test", str(test), "--probs", "--method", method,
                   "--out", str(out), "--save", str(cal)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"--method {method}" in text and "NLL" in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["method"] == method and rep["after"]["ece"] < rep["before"]["ece"]
    assert (out / "reliability_diagram.png").stat().st_size > 1000
    loaded, m = read_calibrator(str(cal))
    assert m == method
    # apply the saved calibrator: the same probabilities as the fitted one on the test file
    applied = tmp_path / "applied.npz"
    rc = cli.main(["apply", str(test), "--probs", "--temperature", str(cal), "--out", str(applied)])
    assert rc == 0
    got = np.load(applied)["probs"]
    p = np.load(test)["predictions"]
    x = torch.log(torch.from_numpy(p.astype(np.float32)).clamp_min(torch.finfo(torch.float32).tiny))
    with torch.no_grad():
        want = loaded.predict_proba(x).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # the report's test NLL is the NLL of what apply writes
    nll = float(-np.log(np.maximum(got[np.arange(len(got)), np.load(test)["ground_truth"]], 1e-300)).mean())
    assert abs(nll - rep["after"]["nll"]) < 1e-4 or not np.isfinite(rep["after"]["nll"])


def test_compare_prints_one_table(small, tmp_path, capsys):
    val, test = small
    out = tmp_path / "cmp"
    rc = cli.main(["compare", str(val), "--test", str(test), "--probs", "--out", str(out),
                   "--methods", "ts,vector,ets,histogram,isotonic"])
    text = capsys.readouterr().out
    assert rc == 0, text
    for m in ("uncalibrated", "ts", "vector", "ets", "histogram", "isotonic"):
        assert f"\n  {m} " in text
    for col in ("NLL", "ECE", "cw-ECE", "Brier", "accuracy", "fit"):
        assert col in text
    rep = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in rep["results"]] == ["uncalibrated", "ts", "vector", "ets", "histogram", "isotonic"]
    assert (out / "reliability_diagrams.png").stat().st_size > 1000
    assert (out / "compare.csv").read_text().startswith("method,nll,ece,classwise_ece,brier,accuracy,fit_time_s")


def test_compare_and_method_errors(small, tmp_path, capsys):
    val, _ = small
    assert cli.main(["compare", str(val), "--methods", "ts,platt", "--out", str(tmp_path)]) == 2
    assert "unknown method(s) platt" in capsys.readouterr().err
    assert cli.main(["calibrate", str(val), "--method", "platt"]) == 2
    assert "invalid choice: 'platt'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "softcal-calibrator-1", "calibrator": "matrix", "state": {}}))
    assert cli.main(["apply", str(val), "--probs", "--temperature", str(bad), "--out",
                     str(tmp_path / "o.npz")]) == 2
    assert "not a valid matrix calibrator file" in capsys.readouterr().err
