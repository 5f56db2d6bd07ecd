"""`softcal calibrate`: the embedded default, file formats, --test/--probs/--json, errors."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import softcal
from softcal import cli

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT / "tests" / "data" / "logits"  # in-repo copies of the shared logits files, with licences
DATA = Path(softcal.__file__).resolve().parent / "data"


def run_main(args, capsys):
    rc = cli.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def check_outputs(out_dir: Path):
    png, js = out_dir / "reliability_diagram.png", out_dir / "report.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    return json.loads(js.read_text())


def test_no_arguments_runs_the_embedded_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run_main([], capsys)  # `softcal` with nothing at all
    assert rc == 0
    assert "temperature T = 2.8826" in out
    assert "ECE (15 bins)" in out and "5.50%" in out and "0.95%" in out
    assert "0.4301" in out and "0.2251" in out  # NLL before / after
    rep = check_outputs(tmp_path / "softcal-out")
    assert abs(rep["fit"]["temperature"] - 2.883) <= 1e-3
    assert rep["before"]["ece"] == pytest.approx(0.0550, abs=2e-4)
    assert rep["after"]["ece"] == pytest.approx(0.0095, abs=2e-4)
    assert rep["data"]["fit_rows"] == 5000 and rep["data"]["eval_rows"] == 10000
    assert rep["fit"]["converged"] and rep["fit"]["iterations"] < 10


def test_calibrate_subcommand_with_out(tmp_path, capsys):
    rc, out, _ = run_main(["calibrate", "--out", str(tmp_path / "o"), "--bins", "10"], capsys)
    assert rc == 0 and "ECE (10 bins)" in out
    assert check_outputs(tmp_path / "o")["n_bins"] == 10


def test_python_dash_m_softcal(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for args in (["-m", "softcal"], ["-m", "softcal", "calibrate", "--json"]):
        p = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)  # --json prints the report on stdout
    assert abs(rep["fit"]["temperature"] - 2.883) <= 1e-3
    check_outputs(tmp_path / "softcal-out")


def synthetic(n=2000, c=6, seed=0, scale=6.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, c, generator=g)
    x[torch.arange(n), y] += 1.5
    return (scale * x).numpy(), y.numpy()


def write(path: Path, x, y):
    s = path.suffix
    if s == ".npz":
        np.savez(path, logits=x, labels=y)
    elif s == ".npy":
        arr = np.empty(2, dtype=object)
        arr[0], arr[1] = x, y
        np.save(path, arr, allow_pickle=True)
    elif s == ".pt":
        torch.save((torch.from_numpy(x), torch.from_numpy(y)), path)
    else:
        with open(path, "wb") as f:
            pickle.dump((x, y.reshape(-1, 1)), f)
    return path


@pytest.mark.parametrize("suffix", [".npz", ".npy", ".pt", ".pkl"])
def test_file_formats_with_test_split_and_json(tmp_path, suffix, capsys):
    xv, yv = synthetic(seed=1)
    xt, yt = synthetic(seed=2, n=3000)
    val = write(tmp_path / f"val{suffix}", xv, yv)
    test = write(tmp_path / f"test{suffix}", xt, yt)
    pickled = suffix in (".npy", ".pkl")  # an object array / a pickle: only when allowed
    rc, out, _ = run_main(["calibrate", str(val), "--test", str(test), "--out", str(tmp_path / "o"),
                           "--json"] + (["--allow-pickle"] if pickled else []), capsys)
    assert rc == 0
    rep = json.loads(out)
    assert rep == check_outputs(tmp_path / "o")
    expected = softcal.TemperatureScaler().fit(xv, yv).temperature
    assert rep["fit"]["temperature"] == pytest.approx(expected, rel=1e-9)
    assert rep["data"]["eval_rows"] == 3000
    assert rep["after"]["ece"] == pytest.approx(
        softcal.metrics.ece(xt, yt, temperature=expected), abs=1e-12)
    assert rep["after"]["nll"] < rep["before"]["nll"]


def test_nested_pickle_uses_its_test_split(tmp_path, capsys):
    xv, yv = synthetic(seed=1)
    xt, yt = synthetic(seed=2, n=1500)
    path = tmp_path / "splits.p"
    with open(path, "wb") as f:
        pickle.dump(((xv, yv.reshape(-1, 1)), (xt, yt.reshape(-1, 1))), f)
    rc, out, _ = run_main(["calibrate", str(path), "--out", str(tmp_path / "o"), "--allow-pickle"], capsys)
    assert rc == 0 and "evaluated on test split (1500 rows)" in out


def test_probs_flag(tmp_path, capsys):
    xv, yv = synthetic(seed=3)
    p = torch.softmax(torch.from_numpy(xv).double(), 1).numpy()
    path = tmp_path / "p.npz"
    np.savez(path, probs=p, labels=yv)
    rc, out, err = run_main(["calibrate", str(path), "--probs", "--json", "--out", str(tmp_path / "o")], capsys)
    assert rc == 0 and "looks like probabilities" not in err
    rep = json.loads(out)
    expected = softcal.TemperatureScaler().fit(xv, yv).temperature  # log p = x - const per row
    assert rep["fit"]["temperature"] == pytest.approx(expected, rel=1e-5)
    # without --probs the fit warns and names the fix
    rc, _, err = run_main(["calibrate", str(path), "--out", str(tmp_path / "o2")], capsys)
    assert rc == 0 and "looks like probabilities" in err and "--probs" in err


def test_netcal_file_with_probs(tmp_path, capsys):
    path = SHARED / "netcal" / "wideresnet-16-4-cifar-10.npz"
    rc, out, _ = run_main(["calibrate", str(path), "--probs", "--json", "--out", str(tmp_path)], capsys)
    assert rc == 0
    rep = json.loads(out)
    assert rep["data"]["classes"] == 10 and rep["fit"]["temperature"] == pytest.approx(2.05, abs=0.01)


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "missing.npz", "no such file"),
    (lambda d: (np.savez(d / "k.npz", a=np.zeros((3, 2)), b=np.zeros((3, 2))), d / "k.npz")[1], "cannot find"),
    (lambda d: (np.savez(d / "n.npz", logits=np.zeros((3, 2), np.float32), labels=np.zeros(4, np.int64)),
                d / "n.npz")[1], "4 labels for 3 rows"),
    (lambda d: (np.savez(d / "r.npz", logits=np.zeros((3, 2), np.float32), labels=np.array([0, 1, 5])),
                d / "r.npz")[1], "labels must be in"),
    (lambda d: ((d / "junk.pkl").write_bytes(b"not a pickle"), d / "junk.pkl")[1], "could not read"),
    (lambda d: ((d / "junk.npz").write_bytes(b"not a zip"), d / "junk.npz")[1], "could not read"),
    (lambda d: ((d / "s.csv").write_text("label,a\n1,x\n"), d / "s.csv")[1], "'x' is not a number"),
])
def test_errors_exit_2_with_one_line(tmp_path, capsys, make, match):
    path = make(tmp_path)
    rc, out, err = run_main(["calibrate", str(path), "--out", str(tmp_path / "o"), "--allow-pickle"],
                            capsys)
    assert rc == 2 and match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_embedded_data_is_the_original_and_attributed():
    lic = (DATA / "LICENSE-densenet40_c10_logits.txt").read_text(encoding="utf-8")
    assert "MIT License" in lic and "Copyright (c) 2018 Markus Kängsepp" in lic
    assert "4d23b6ba266f62fc3dddb702dc74b7d629f7a6615b9e304904cee93a6992c1d5" in lic
    src = SHARED / "markus93_NN_calibration" / "probs_densenet40_c10_logits.p"
    import hashlib
    assert hashlib.sha256(src.read_bytes()).hexdigest() == "4d23b6ba266f62fc3dddb702dc74b7d629f7a6615b9e304904cee93a6992c1d5"
    with open(src, "rb") as f:
        (lv, yv), (lt, yt) = pickle.load(f)
    d = np.load(DATA / "densenet40_c10_logits.npz")
    for key, ref in [("logits_val", lv), ("labels_val", yv.ravel()), ("logits_test", lt),
                     ("labels_test", yt.ravel())]:
        assert d[key].dtype == ref.dtype and np.array_equal(d[key], ref), key


def test_reliability_diagram_api(tmp_path):
    from softcal.plots import reliability_diagram
    x, y = synthetic()
    fig = reliability_diagram(x, y, 2.0, path=tmp_path / "r.png")
    assert len(fig.axes) == 4 and (tmp_path / "r.png").stat().st_size > 10_000
    fig = reliability_diagram(torch.softmax(torch.from_numpy(x), 1), y, probs=True, n_bins=10)
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="titles"):
        reliability_diagram(x, y, 2.0, titles=["only one"])
