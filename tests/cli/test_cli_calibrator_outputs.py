"""The calibrators' command-line parts on softcal/_cli (issue 17 item 3 on the command-line
structure of issue 18): ``compare`` is a command module, ``calibrate --method`` and ``apply``
with a saved calibrator go through the same reader, output checks and atomic writes as the
temperature path (docs/command-line-files.md), and no module of the calibrators is over 600
lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from softcal import cli
from cli_helpers import run

ROOT = Path(__file__).resolve().parents[2]
LENET = ROOT / "tests" / "data" / "logits" / "netcal" / "lenet-5-cifar-10.npz"


def partials(d: Path):
    return sorted(p.name for p in d.rglob("*") if "softcal-partial" in p.name)


@pytest.fixture()
def files(tmp_path):
    d = np.load(LENET)
    p, y = d["predictions"], d["ground_truth"]
    val, test = tmp_path / "val.npz", tmp_path / "test.npz"
    np.savez(val, predictions=p[:800], ground_truth=y[:800])
    np.savez(test, predictions=p[800:1600], ground_truth=y[800:1600])
    return val, test


def test_compare_is_a_command_module():
    from softcal._cli import compare

    assert cli.COMMANDS["compare"] is compare
    assert callable(compare.add_parser) and callable(compare.run)
    assert not (ROOT / "softcal" / "_compare.py").exists()


def test_modules_of_the_calibrators_are_at_most_600_lines():
    paths = sorted((ROOT / "softcal" / "calibrators").glob("*.py")) + \
        sorted((ROOT / "softcal" / "_cli").glob("*.py"))
    long = {p.name: n for p in paths if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_calibrate_method_save_onto_an_input_is_refused_before_fitting(files, tmp_path, capsys, monkeypatch):
    val, test = files
    before = test.read_bytes()
    alias = tmp_path / "alias.json"
    os.link(test, alias)
    from softcal._cli import calibrators

    def no_fit(*a, **k):
        raise AssertionError("fitted before the outputs were checked")

    monkeypatch.setattr(calibrators, "fit_calibrator", no_fit)
    rc, _, err = run(["calibrate", val, "--test", test, "--probs", "--method", "vector",
                      "--save", alias, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "is the input file" in err and len(err.strip().splitlines()) == 1, err
    assert test.read_bytes() == before and partials(tmp_path) == []


def test_compare_output_through_a_link_to_the_input_is_refused(files, tmp_path, capsys):
    val, test = files
    out = tmp_path / "cmp"
    out.mkdir()
    os.symlink(val, out / "compare.csv")
    before = val.read_bytes()
    rc, _, err = run(["compare", val, "--test", test, "--probs", "--methods", "ts", "--out", out], capsys)
    assert rc == 2 and "is the input file" in err, err
    assert val.read_bytes() == before and not (out / "report.json").exists()


def test_compare_interrupted_leaves_the_old_outputs_and_no_partial_file(files, tmp_path, capsys, monkeypatch):
    val, test = files
    out = tmp_path / "cmp"
    rc, _, _ = run(["compare", val, "--test", test, "--probs", "--methods", "ts,vector", "--out", out], capsys)
    assert rc == 0
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(old) == {"compare.csv", "report.json", "reliability_diagrams.png"}
    from softcal._cli import compare

    real = compare.fit_calibrator

    def interrupted(method, *a):
        if method == "vector":
            raise KeyboardInterrupt
        return real(method, *a)

    monkeypatch.setattr(compare, "fit_calibrator", interrupted)
    rc, _, err = run(["compare", val, "--test", test, "--probs", "--methods", "ts,vector", "--out", out], capsys)
    assert rc == 130, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old and partials(tmp_path) == []


def test_compare_on_the_embedded_logits_and_bad_methods(tmp_path, capsys):
    rc, out, err = run(["compare", "--methods", "ts,ets", "--out", tmp_path / "c"], capsys)
    assert rc == 0, err
    assert "embedded" in out and "\n  ets " in out
    rep = json.loads((tmp_path / "c" / "report.json").read_text())
    assert rep["data"]["fit_rows"] == 5000 and rep["data"]["eval_rows"] == 10000
    rc, _, err = run(["compare", "--methods", "ts,ts", "--out", tmp_path / "c"], capsys)
    assert rc == 2 and "named twice" in err
    rc, _, err = run(["compare", "--methods", "ts", "--bins", "0", "--out", tmp_path / "c"], capsys)
    assert rc == 2 and "--bins" in err


def test_apply_a_saved_calibrator_checks_classes_and_output(files, tmp_path, capsys):
    val, test = files
    cal = tmp_path / "cal.json"
    rc, _, err = run(["calibrate", val, "--test", test, "--probs", "--method", "histogram",
                      "--save", cal, "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    doc = json.loads(cal.read_text())
    assert doc["format"] == "softcal-calibrator-1" and doc["calibrator"] == "histogram"
    assert [i["role"] for i in doc["inputs"]] == ["fit", "evaluate"] and len(doc["inputs"][0]["sha256"]) == 64
    # apply onto the calibrator file itself: refused, the file kept
    before = cal.read_bytes()
    rc, _, err = run(["apply", test, "--probs", "-t", cal, "--out", tmp_path / "x.json"], capsys)
    assert rc == 2  # .json is not an output format
    alias = tmp_path / "cal.npz"
    os.symlink(cal, alias)
    rc, _, err = run(["apply", test, "--probs", "-t", cal, "--out", alias], capsys)
    assert rc == 2 and "is the input file" in err, err
    assert cal.read_bytes() == before
    # another number of classes: one line, exit 2, nothing written
    x = np.random.default_rng(0).random((20, 7)).astype(np.float32)
    other = tmp_path / "seven.npy"
    np.save(other, x / x.sum(1, keepdims=True))
    rc, _, err = run(["apply", other, "--probs", "-t", cal, "--out", tmp_path / "seven-out.npy"], capsys)
    assert rc == 2 and "has 7 classes" in err and "fitted on 10" in err, err
    assert not (tmp_path / "seven-out.npy").exists() and partials(tmp_path) == []


@pytest.mark.parametrize("method", ["vector", "isotonic"])
def test_apply_a_saved_calibrator_writes_its_logits(method, files, tmp_path, capsys):
    val, test = files
    cal = tmp_path / "cal.json"
    args = ["calibrate", val, "--test", test, "--probs", "--method", method, "--save", cal,
            "--out", tmp_path / "o"]
    rc, _, err = run(args, capsys)
    assert rc == 0, err
    out = tmp_path / "applied.csv"
    rc, text, err = run(["apply", test, "--probs", "-t", cal, "--logits", "--out", out, "--chunk-rows", "300"], capsys)
    assert rc == 0, err
    assert f"the {method} calibrator" in text
    from softcal._cli.calibrators import read_calibrator

    loaded, m = read_calibrator(str(cal))
    p = np.load(test)["predictions"].astype(np.float32)
    x = torch.log(torch.from_numpy(p).clamp_min(torch.finfo(torch.float32).tiny))
    with torch.no_grad():
        want = loaded(x).numpy()
    got = np.loadtxt(out, delimiter=",", skiprows=1)[:, 1:]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_a_damaged_calibrator_file_is_one_line(files, tmp_path, capsys):
    val, _ = files
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "softcal-calibrator-1", "calibrator": "vector",
                               "hyperparameters": {"classes": 10, "mu": 0.0},
                               "state": {"weight": [1.0] * 10, "bias": [0.0] * 9}}))
    rc, _, err = run(["apply", val, "--probs", "-t", bad, "--out", tmp_path / "o.npz"], capsys)
    assert rc == 2 and "not a valid vector calibrator file" in err and len(err.strip().splitlines()) == 1, err
    bad.write_text(json.dumps({"format": "softcal-calibrator-1", "calibrator": "platt", "state": {}}))
    rc, _, err = run(["apply", val, "--probs", "-t", bad, "--out", tmp_path / "o.npz"], capsys)
    assert rc == 2 and "unknown calibrator 'platt'" in err, err
