"""The command line reads files safely: no code runs from a file unless --allow-pickle, unknown
suffixes are refused with the list of formats, CSV/TSV/Parquet and half-precision .pt are read."""

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import softcal
from softcal import _io
from cli_helpers import run, synthetic


class Evil:
    """Unpickling this creates the directory `marker` (stands for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def write_evil(path: Path, marker: Path) -> Path:
    s = path.suffix
    if s in (".npy", ".npz"):
        arr = np.empty(2, dtype=object)
        arr[0], arr[1] = Evil(marker), 1
        if s == ".npy":
            np.save(path, arr, allow_pickle=True)
        else:
            np.savez(path, logits=arr, labels=np.zeros(2, np.int64))
    elif s in (".pt", ".pth"):
        torch.save({"logits": Evil(marker), "labels": torch.zeros(2)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump((Evil(marker), [0, 1]), f)
    return path


@pytest.mark.parametrize("suffix", [".pkl", ".p", ".pickle", ".npy", ".npz", ".pt"])
@pytest.mark.parametrize("command", ["calibrate", "evaluate", "apply"])
def test_a_pickle_is_refused_and_runs_nothing(tmp_path, capsys, suffix, command):
    marker = tmp_path / "marker"
    path = write_evil(tmp_path / f"evil{suffix}", marker)
    args = [command, path, "--out", tmp_path / ("o.npz" if command == "apply" else "o")]
    if command == "apply":
        args += ["--temperature", "2"]
    rc, out, err = run(args, capsys)
    assert rc == 2, err
    assert "--allow-pickle" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not marker.exists(), "loading the file ran its code"


def test_allow_pickle_really_unpickles(tmp_path, capsys):
    # the control of the test above: with --allow-pickle the same file does run its code (so the
    # refusal is what kept the marker away), and then fails as a file without scores
    marker = tmp_path / "marker"
    path = write_evil(tmp_path / "evil.pkl", marker)
    rc, _, err = run(["calibrate", path, "--allow-pickle", "--out", tmp_path / "o"], capsys)
    assert marker.is_dir()
    assert rc == 2 and "Traceback" not in err


@pytest.mark.parametrize("name", ["scores.dat", "scores.txt", "scores.json", "scores"])
def test_unknown_suffix_is_refused_with_the_formats(tmp_path, capsys, name):
    marker = tmp_path / "marker"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(Evil(marker)))
    for args in (["calibrate", path], ["calibrate", path, "--allow-pickle"], ["evaluate", path],
                 ["apply", path, "-t", "2", "-o", tmp_path / "o.npz"],
                 ["calibrate", tmp_path / "v.npz", "--test", path]):
        if not (tmp_path / "v.npz").exists():
            x, y = synthetic()
            np.savez(tmp_path / "v.npz", logits=x, labels=y)
        rc, _, err = run(args + ["--out", tmp_path / "o"] if args[0] != "apply" else args, capsys)
        assert rc == 2, (args, err)
        assert "unknown file type" in err and ".npz, .npy, .pt/.pth, .csv" in err, err
        assert len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_csv_says_what_is_wrong_not_unpickling(tmp_path, capsys):
    path = tmp_path / "s.csv"
    path.write_text("label,a,b\n0,1.0,2.0\n1,3.0\n")
    rc, _, err = run(["calibrate", path, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "line 3 has 2 fields" in err and "Unpickling" not in err


def write_csv(path, x, y, names=None, label="label", header=True, delimiter=","):
    names = names or [f"logit_{j}" for j in range(x.shape[1])]
    with open(path, "w") as f:
        if header:
            f.write(delimiter.join([label] + names) + "\n")
        for row, lab in zip(x, y):
            f.write(delimiter.join([str(int(lab))] + [repr(float(v)) for v in row]) + "\n")
    return path


def expected_fit(x, y):
    return softcal.TemperatureScaler().fit(torch.from_numpy(x), torch.from_numpy(y)).temperature


def test_csv_calibrate_equals_the_python_api(tmp_path, capsys):
    import json

    xv, yv = synthetic(seed=1)
    xt, yt = synthetic(seed=2, n=400)
    val, test = write_csv(tmp_path / "val.csv", xv, yv), write_csv(tmp_path / "test.csv", xt, yt)
    rc, out, err = run(["calibrate", val, "--test", test, "--json", "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    rep = json.loads(out)
    # CSV holds the float32 values' shortest repr: parsed exactly back (as float64)
    assert rep["fit"]["temperature"] == pytest.approx(expected_fit(xv.astype(np.float64), yv), rel=1e-9)
    assert rep["data"]["classes"] == 5 and rep["data"]["eval_rows"] == 400
    assert rep["after"]["ece"] == pytest.approx(
        softcal.metrics.ece(xt.astype(np.float64), yt, temperature=rep["fit"]["temperature"]), abs=1e-12)


def test_column_options(tmp_path, capsys):
    import json

    x, y = synthetic(seed=3)
    # an extra column that is not a score, labels in a column named 'truth' in the middle
    names = ["id", "s0", "s1", "truth", "s2", "s3", "s4"]
    with open(tmp_path / "d.csv", "w") as f:
        f.write(",".join(names) + "\n")
        for i, (row, lab) in enumerate(zip(x, y)):
            vals = [i, row[0], row[1], int(lab), row[2], row[3], row[4]]
            f.write(",".join(repr(float(v)) if isinstance(v, np.floating) else str(v) for v in vals) + "\n")
    ref = expected_fit(x.astype(np.float64), y)
    rc, _, err = run(["calibrate", tmp_path / "d.csv", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "no label column" in err and "--label-column" in err
    for cols in (["--score-columns", "s*"], ["--score-columns", "s0,s1,s2,s3,s4"]):
        rc, out, err = run(["calibrate", tmp_path / "d.csv", "--label-column", "truth", *cols, "--json",
                            "--out", tmp_path / "o"], capsys)
        assert rc == 0, err
        assert json.loads(out)["fit"]["temperature"] == pytest.approx(ref, rel=1e-9)
    rc, _, err = run(["calibrate", tmp_path / "d.csv", "--label-column", "nope", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "'nope' is not a column" in err
    # .npz: the options name the arrays
    np.savez(tmp_path / "k.npz", z=x, truth=y, other=np.zeros(3))
    rc, out, err = run(["calibrate", tmp_path / "k.npz", "--label-column", "truth", "--score-columns", "z",
                        "--json", "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    assert json.loads(out)["fit"]["temperature"] == pytest.approx(expected_fit(x, y), rel=1e-9)


def test_headerless_csv_and_tsv(tmp_path, capsys):
    import json

    x, y = synthetic(seed=4)
    ref = expected_fit(x.astype(np.float64), y)
    write_csv(tmp_path / "h.csv", x, y, header=False)
    rc, out, err = run(["calibrate", tmp_path / "h.csv", "--label-column", "0", "--json",
                        "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    assert json.loads(out)["fit"]["temperature"] == pytest.approx(ref, rel=1e-9)
    write_csv(tmp_path / "t.tsv", x, y, delimiter="\t")
    rc, out, err = run(["calibrate", tmp_path / "t.tsv", "--json", "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    assert json.loads(out)["fit"]["temperature"] == pytest.approx(ref, rel=1e-9)


def test_parquet(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import json

    import pyarrow.parquet as pq

    x, y = synthetic(seed=5)
    cols = {"label": pa.array(y.astype(np.int64))}
    cols.update({f"logit_{j}": pa.array(x[:, j]) for j in range(x.shape[1])})
    pq.write_table(pa.table(cols), tmp_path / "v.parquet", row_group_size=100)
    rc, out, err = run(["calibrate", tmp_path / "v.parquet", "--json", "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    assert json.loads(out)["fit"]["temperature"] == pytest.approx(expected_fit(x, y), rel=1e-9)
    # apply, Parquet in and out, in chunks smaller than a row group
    rc, _, err = run(["apply", tmp_path / "v.parquet", "-t", "1.7", "--chunk-rows", "64",
                      "-o", tmp_path / "c.parquet"], capsys)
    assert rc == 0, err
    t = pq.read_table(tmp_path / "c.parquet")
    assert t.column_names == ["label"] + [f"probs_{j}" for j in range(5)]  # named as what they hold
    got = np.stack([t.column(f"probs_{j}").to_numpy() for j in range(5)], 1)
    ref = torch.softmax(torch.from_numpy(x).double() / 1.7, 1).numpy()
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-7)
    assert np.array_equal(t.column("label").to_numpy(), y)


def test_parquet_without_pyarrow_says_how(tmp_path, capsys, monkeypatch):
    (tmp_path / "v.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    rc, _, err = run(["calibrate", tmp_path / "v.parquet", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "pip install pyarrow" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_pt_logits(tmp_path, capsys, dtype):
    import json

    x, y = synthetic(seed=6)
    xh = torch.from_numpy(x).to(dtype)
    torch.save({"logits": xh, "labels": torch.from_numpy(y)}, tmp_path / "h.pt")
    rc, out, err = run(["calibrate", tmp_path / "h.pt", "--json", "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    # the half values widened exactly to float32: the same fit as on those float32 values
    assert json.loads(out)["fit"]["temperature"] == pytest.approx(expected_fit(xh.float().numpy(), y), rel=1e-9)


def test_pt_with_python_objects_needs_allow_pickle(tmp_path, capsys):
    x, y = synthetic(seed=7)
    torch.save({"logits": x, "labels": y, "meta": {1, 2}}, tmp_path / "np.pt")  # numpy + a set
    rc, _, err = run(["calibrate", tmp_path / "np.pt", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "--allow-pickle" in err
    rc, _, err = run(["calibrate", tmp_path / "np.pt", "--allow-pickle", "--out", tmp_path / "o"], capsys)
    assert rc == 0, err


def test_npy_is_memory_mapped_for_apply(tmp_path):
    x, _ = synthetic()
    np.save(tmp_path / "x.npy", x)
    src = _io.open_scores(tmp_path / "x.npy")
    assert isinstance(src.scores, np.memmap) and (src.rows, src.classes) == x.shape


def test_embedded_data_is_read_by_the_package(tmp_path):
    d = _io.load_embedded()
    assert d["val"][0].shape == (5000, 10) and d["test"][0].shape == (10000, 10)
