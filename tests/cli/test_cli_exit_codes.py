"""Exit statuses and messages as documented (issue 18, item 8): a user's mistake or an unusable
file is exit status 2 with one line that says what is wrong (never "unexpected error"), a file is
reported as what it is, nothing is said to be written that was not, a closed pipe ends the
command quietly. (bench's exit status when a softcal case fails is tests/project/test_bench.py's.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import run, synthetic

ROOT = Path(__file__).resolve().parents[2]


def one_line_2(rc, err, *needles):
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "unexpected" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


def test_item8_big_endian_arrays_are_read(tmp_path, capsys):
    x, y = synthetic()
    np.savez(tmp_path / "le.npz", logits=x, labels=y)
    np.savez(tmp_path / "be.npz", logits=x.astype(">f4"), labels=y.astype(">i8"))
    reps = []
    for name in ("le", "be"):
        rc, out, err = run(["calibrate", tmp_path / f"{name}.npz", "--json", "--out", tmp_path / "o"], capsys)
        assert rc == 0, err
        reps.append(json.loads(out)["fit"]["temperature"])
    assert reps[0] == reps[1]
    np.save(tmp_path / "be.npy", x.astype(">f8"))
    rc, _, err = run(["apply", tmp_path / "be.npy", "-t", "2", "--out", tmp_path / "p.npy"], capsys)
    assert rc == 0, err
    ref = torch.softmax(torch.from_numpy(x).double() / 2, 1).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), ref, rtol=1e-12)


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="no extended precision here")
def test_item8_float128_is_refused_with_exit_2(tmp_path, capsys):
    x, y = synthetic()
    np.save(tmp_path / "q.npy", x.astype(np.longdouble))
    rc, _, err = run(["apply", tmp_path / "q.npy", "-t", "2", "--out", tmp_path / "p.npy"], capsys)
    one_line_2(rc, err, "torch has no such type", "float64")
    np.savez(tmp_path / "q.npz", logits=x.astype(np.longdouble), labels=y)
    rc, _, err = run(["calibrate", tmp_path / "q.npz", "--out", tmp_path / "o"], capsys)
    one_line_2(rc, err, "torch has no such type")


def test_item8_out_in_a_missing_folder_or_onto_a_directory(tmp_path, capsys):
    x, _ = synthetic()
    np.save(tmp_path / "x.npy", x)
    rc, _, err = run(["apply", tmp_path / "x.npy", "-t", "2", "--out", tmp_path / "nope" / "p.npy"], capsys)
    one_line_2(rc, err, "the folder", "does not exist")
    (tmp_path / "d.npy").mkdir()
    rc, _, err = run(["apply", tmp_path / "x.npy", "-t", "2", "--out", tmp_path / "d.npy"], capsys)
    one_line_2(rc, err, "is a directory")
    (tmp_path / "file").write_text("x")
    rc, _, err = run(["calibrate", "--out", tmp_path / "file"], capsys)
    one_line_2(rc, err, "is a file")
    rc, _, err = run(["calibrate", "--save", tmp_path / "file" / "T.json", "--out", tmp_path / "o"], capsys)
    one_line_2(rc, err, "is a file, not a folder")
    rc, _, err = run(["calibrate", "--save", tmp_path, "--out", tmp_path / "o"], capsys)
    one_line_2(rc, err, "is a directory")


@pytest.mark.parametrize("text,needle", [
    ("[" * 100_000 + "]" * 100_000, "RecursionError"),
    ('{"temperature": true}', "'temperature' is true"),
    ('{"temperature": "2"}', "'temperature' is \"2\""),
    ('[2]', "no 'temperature'"),
    ('{"temperature": 1e999}', "not a finite number"),
], ids=["nested", "true", "string", "list", "overflow"])
def test_item8_temperature_files(tmp_path, capsys, text, needle):
    x, _ = synthetic()
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "T.json").write_text(text)
    rc, _, err = run(["apply", tmp_path / "x.npy", "-t", tmp_path / "T.json", "--out", tmp_path / "p.npy"], capsys)
    one_line_2(rc, err, needle)
    assert not (tmp_path / "p.npy").exists()


@pytest.mark.parametrize("kind", ["sparse", "sparse_csr", "quantized", "meta"])
def test_item8_unusual_tensors_are_refused_with_exit_2(tmp_path, capsys, kind):
    x, y = synthetic(n=50)
    t = torch.from_numpy(x)
    if kind == "sparse":
        t = t.to_sparse()
    elif kind == "sparse_csr":
        t = t.to_sparse_csr()
    elif kind == "quantized":
        t = torch.quantize_per_tensor(t.float(), 0.1, 0, torch.qint8)
    else:
        t = torch.empty(50, 5, device="meta")
    torch.save({"logits": t, "labels": torch.from_numpy(y)}, tmp_path / "t.pt")
    for cmd in (["calibrate", tmp_path / "t.pt", "--out", tmp_path / "o"],
                ["apply", tmp_path / "t.pt", "-t", "2", "--out", tmp_path / "p.npz"]):
        rc, _, err = run(cmd, capsys)
        one_line_2(rc, err, "t.pt")


def test_item8_parquet_columns_that_are_not_numbers(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    x, y = synthetic(n=20, c=2)
    for name, col in [("list", pa.array([[1.0, 2.0]] * 20)),
                      ("timestamp", pa.array(np.arange(20).astype("datetime64[s]"))),
                      ("string", pa.array(["a"] * 20))]:
        t = pa.table({"label": pa.array(y), "logit_0": pa.array(x[:, 0]), "odd": col})
        pq.write_table(t, tmp_path / f"{name}.parquet")
        for cmd in (["calibrate", tmp_path / f"{name}.parquet", "--out", tmp_path / "o"],
                    ["apply", tmp_path / f"{name}.parquet", "-t", "2", "--out", tmp_path / "p.npz"]):
            rc, _, err = run(cmd, capsys)
            one_line_2(rc, err, "the score column 'odd' has type", "must be numbers")


def test_item8_a_large_npy_header_is_not_called_python_objects(tmp_path, capsys):
    x, _ = synthetic()
    header = repr({"descr": "<f4", "fortran_order": False, "shape": x.shape}).encode("latin1")
    header += b" " * (100_000 - len(header) - 12 - 1) + b"\n"
    with open(tmp_path / "h.npy", "wb") as f:
        f.write(b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header + x.astype("<f4").tobytes())
    rc, _, err = run(["apply", tmp_path / "h.npy", "-t", "2", "--out", tmp_path / "p.npy"], capsys)
    one_line_2(rc, err, "header of over 10000 bytes")
    assert "Python objects" not in err


def test_item8_a_file_that_is_not_an_npz_is_called_unreadable(tmp_path, capsys):
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip archive")
    rc, _, err = run(["calibrate", tmp_path / "junk.npz", "--out", tmp_path / "o"], capsys)
    one_line_2(rc, err, "could not read it as npz", "not a zip archive")
    assert "Python objects" not in err and "--allow-pickle" not in err


@pytest.mark.parametrize("suffix", [".parquet", ".npz", ".csv", ".npy", ".pt"])
def test_item8_apply_to_zero_rows_writes_a_file_of_zero_rows(tmp_path, capsys, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    np.savez(tmp_path / "e.npz", logits=np.zeros((0, 4), np.float32), labels=np.zeros(0, np.int64))
    out = tmp_path / f"p{suffix}"
    rc, o, err = run(["apply", tmp_path / "e.npz", "-t", "2", "--out", out], capsys)
    assert rc == 0 and "applied to 0 rows" in o and f"to {out}" in o, err
    assert out.is_file()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(out)
        assert t.num_rows == 0 and t.column_names == ["labels"] + [f"probs_{j}" for j in range(4)]
    elif suffix == ".npz":
        with np.load(out) as z:
            assert z["probs"].shape == (0, 4) and z["labels"].shape == (0,)
    elif suffix == ".csv":
        assert out.read_text() == "labels,probs_0,probs_1,probs_2,probs_3\n"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_item8_apply_and_evaluate_refuse_nan_and_inf_logits(tmp_path, capsys, bad):
    x, y = synthetic()
    x[5, 1] = bad
    np.savez(tmp_path / "v.npz", logits=x, labels=y)
    np.save(tmp_path / "x.npy", x)
    what = "NaN" if np.isnan(bad) else "+inf"
    for cmd in (["evaluate", tmp_path / "v.npz", "--out", tmp_path / "o"],
                ["apply", tmp_path / "x.npy", "-t", "2", "--out", tmp_path / "p.npy"],
                ["calibrate", tmp_path / "v.npz", "--out", tmp_path / "o"]):
        rc, _, err = run(cmd, capsys)
        one_line_2(rc, err, f"the scores contain {what} (first in row 5)")
    assert not (tmp_path / "o").exists() and not (tmp_path / "p.npy").exists()


@pytest.mark.parametrize("cmd,buffered", [(["calibrate", "--json"], True), (["calibrate"], True),
                                          (["calibrate"], False), (["--help"], True), (["--help"], False),
                                          (["bench", "--help"], True)])
def test_item8_a_closed_pipe_ends_quietly(tmp_path, cmd, buffered):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYTHONUNBUFFERED", None)
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    args = cmd + (["--out", str(tmp_path / "o")] if cmd[0] == "calibrate" else [])
    r, w = os.pipe()
    os.close(r)  # the reader has gone before anything is written (as `| head` after its lines)
    try:
        p = subprocess.run([sys.executable, "-m", "softcal", *args], cwd=tmp_path, env=env, stdout=w,
                           stderr=subprocess.PIPE, text=True, timeout=600)
    finally:
        os.close(w)
    assert p.stderr == "", p.stderr
    # 128 + SIGPIPE, as a shell reports a command whose reader went away (argparse's --help
    # ignores a failed write itself when stdout is unbuffered: 0)
    assert p.returncode == 141 or (p.returncode == 0 and "--help" in cmd and not buffered), p.returncode
    if cmd[0] == "calibrate":
        assert (tmp_path / "o" / "report.json").is_file()  # the outputs were written first
