"""Every command checks a file the same way (issue 18, items 5-7): one reader and one validator
behind calibrate, evaluate and apply, so that nothing silently wrong is written; sizes are
checked before anything is allocated; a temperature that the scores' dtype cannot carry is
handled or refused. Issue 16, item 7: pandas' index column in CSV files."""

import json

import numpy as np
import pytest
import torch

import softcal
from cli_helpers import run, synthetic

DATA_ARGS = {"calibrate": [], "evaluate": [], "apply": ["-t", "2"]}


def csv_text(x, y, label="label", names=None, index=False):
    names = names or [f"logit_{j}" for j in range(x.shape[1])]
    lines = [",".join(([""] if index else []) + [label] + names)]
    for i, (row, lab) in enumerate(zip(x, y)):
        lines.append(",".join(([str(i)] if index else []) + [str(lab)] + [repr(float(v)) for v in row]))
    return "\n".join(lines) + "\n"


def all_commands(path, tmp_path, capsys, extra=()):
    """(rc, stderr) of calibrate, evaluate and apply on one file."""
    res = {}
    for cmd in ("calibrate", "evaluate", "apply"):
        out = tmp_path / (f"{cmd}.npz" if cmd == "apply" else cmd)
        rc, _, err = run([cmd, path, *DATA_ARGS[cmd], *extra, "--out", out], capsys)
        res[cmd] = (rc, err)
    return res


def fitted(x, y):
    return softcal.TemperatureScaler().fit(torch.from_numpy(x), torch.from_numpy(y)).temperature


# ---------------------------------------------------------------------- item 5
def test_item5_csv_with_a_byte_order_mark_is_read_by_every_command(tmp_path, capsys):
    x, y = synthetic(n=200, c=3)
    path = tmp_path / "excel.csv"
    path.write_text("\ufeff" + csv_text(x, y), encoding="utf-8")  # Excel's "CSV UTF-8"
    rc, out, err = run(["calibrate", path, "--json", "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    assert json.loads(out)["data"]["classes"] == 3
    rc, _, err = run(["apply", path, "-t", "2", "--out", tmp_path / "p.csv"], capsys)
    assert rc == 0, err
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0] == "label,probs_0,probs_1,probs_2", lines[0]  # the label is not a class
    got = np.array([[float(v) for v in ln.split(",")] for ln in lines[1:]])
    assert np.array_equal(got[:, 0], y)
    ref = torch.softmax(torch.from_numpy(x).double() / 2, 1).numpy()
    np.testing.assert_allclose(got[:, 1:], ref, rtol=1e-12, atol=1e-15)


def test_item5_blank_lines_never_drop_rows(tmp_path, capsys):
    x, y = synthetic(n=200)
    text = csv_text(x, y).replace("\n", "\n\n")  # a blank line after every line
    (tmp_path / "b.csv").write_text(text)
    rc, _, err = run(["apply", tmp_path / "b.csv", "-t", "2", "--chunk-rows", "1", "--out", tmp_path / "p.npz"], capsys)
    assert rc == 0, err
    with np.load(tmp_path / "p.npz") as z:
        assert z["probs"].shape == (200, 5) and np.array_equal(z["labels"], y)
    # a run of blank lines longer than a block of the whole-file reader
    lines = csv_text(x, y).splitlines()
    (tmp_path / "r.csv").write_text("\n".join(lines[:11] + [""] * 140_000 + lines[11:]) + "\n")
    rc, out, err = run(["calibrate", tmp_path / "r.csv", "--json", "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["data"]["fit_rows"] == 200
    assert rep["fit"]["temperature"] == pytest.approx(fitted(x.astype(np.float64), y), rel=1e-9)


@pytest.mark.parametrize("case", ["fewer_labels", "labels_N_by_2", "label_inf", "label_2e63_plus_5",
                                  "label_ge_C", "label_minus_1", "nan_logit", "posinf_logit", "row_all_neginf"])
def test_item5_apply_refuses_what_calibrate_refuses(tmp_path, capsys, case):
    x, y = synthetic(n=1000)
    x, y = x.copy(), y.astype(np.float64)
    if case == "fewer_labels":
        path = tmp_path / "f.npz"
        np.savez(path, logits=x, labels=y[:10].astype(np.int64))
    elif case == "labels_N_by_2":
        path = tmp_path / "f.npz"
        np.savez(path, logits=x, labels=np.stack([y, y], 1).astype(np.int64))
    else:
        if case == "label_inf":
            y[700] = np.inf
        elif case == "label_2e63_plus_5":
            y[700] = 2.0 ** 63 + 5
        elif case == "label_ge_C":
            y[700] = 5
        elif case == "label_minus_1":
            y[700] = -1
        elif case == "nan_logit":
            x[700, 2] = np.nan
        elif case == "posinf_logit":
            x[700, 2] = np.inf
        elif case == "row_all_neginf":
            x[700] = -np.inf
        path = tmp_path / "f.csv"
        path.write_text(csv_text(x, [format(float(v), ".17g") for v in y]))  # inf as "inf"
    res = all_commands(path, tmp_path, capsys)
    for cmd, (rc, err) in res.items():
        assert rc == 2, (cmd, err)
        assert len(err.strip().splitlines()) == 1 and "unexpected" not in err, (cmd, err)
    msgs = {cmd: err.split(": error: ", 1)[1] for cmd, (_, err) in res.items()}
    assert len(set(msgs.values())) == 1, msgs  # one validator: the same message from every command
    assert not (tmp_path / "apply.npz").exists()
    # and apply streaming in small blocks refuses it too, without leaving an output
    rc, _, err = run(["apply", path, "-t", "2", "--chunk-rows", "64", "--out", tmp_path / "s.npz"], capsys)
    assert rc == 2 and err.split(": error: ", 1)[1] == msgs["apply"], err
    assert not (tmp_path / "s.npz").exists()


# ---------------------------------------------------------------------- item 6
def test_item6_an_expanded_tensor_is_refused_before_it_is_materialised(tmp_path, capsys):
    x = torch.zeros(1).expand(100_000, 500)  # 200 MB as a dense tensor, 4 bytes in the file
    y = torch.zeros(1, dtype=torch.int64).expand(100_000)
    torch.save({"logits": x, "labels": y}, tmp_path / "tiny.pt")
    assert (tmp_path / "tiny.pt").stat().st_size < 4000
    res = all_commands(tmp_path / "tiny.pt", tmp_path, capsys)
    for cmd, (rc, err) in res.items():
        assert rc == 2 and "expanded view" in err and "(100000, 500)" in err, (cmd, err)


def test_item6_bins_have_an_upper_bound_checked_first(tmp_path, capsys):
    from softcal._cli.common import MAX_BINS

    for bins in (MAX_BINS + 1, 10_000_000):
        for cmd in (["calibrate"], ["evaluate", softcal.cli.DEFAULT_DATA]):
            rc, _, err = run([*cmd, "--bins", bins, "--out", tmp_path / "o"], capsys)
            assert rc == 2 and f"--bins must be in [1, {MAX_BINS}], got {bins}" in err, err
            assert not (tmp_path / "o").exists()
    rc, _, err = run(["evaluate", softcal.cli.DEFAULT_DATA, "--bins", MAX_BINS, "--out", tmp_path / "o"], capsys)
    assert rc == 0, err


def test_item6_a_declared_size_beyond_memory_is_refused_before_reading(tmp_path, capsys):
    import io
    import zipfile

    # headers announcing (10^9, 1000) float64 scores (8 TB) and 10^9 labels, over 64 bytes of data
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        for name, descr, shape in (("logits", "<f8", (10 ** 9, 1000)), ("labels", "<i8", (10 ** 9,))):
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
            z.writestr(f"{name}.npy", buf.getvalue() + b"\0" * 64)
    for cmd in ("calibrate", "evaluate"):
        rc, _, err = run([cmd, tmp_path / "huge.npz", "--out", tmp_path / "o"], capsys)
        assert rc == 2 and "would take 8.01e+03 GB in memory, more than the" in err, err
    # apply streams it: the size is no obstacle, the missing rows are
    rc, _, err = run(["apply", tmp_path / "huge.npz", "-t", "2", "--out", tmp_path / "p.npz"], capsys)
    assert rc == 2 and "truncated" in err and not (tmp_path / "p.npz").exists(), err


def test_item6_memory_check_uses_the_memory_available(tmp_path, capsys, monkeypatch):
    from softcal._files import check

    x, y = synthetic()
    np.savez(tmp_path / "v.npz", logits=x, labels=y)
    monkeypatch.setattr(check, "memory_available", lambda: 10_000)
    rc, _, err = run(["calibrate", tmp_path / "v.npz", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "would take" in err and "more than the 0.01 MB available" in err, err


# ---------------------------------------------------------------------- item 7 (command line)
def test_item7_apply_tiny_temperature_on_float32(tmp_path, capsys):
    x, _ = synthetic(n=300)
    x = x.astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    rc, _, err = run(["apply", tmp_path / "x.npy", "-t", "1e-39", "--out", tmp_path / "p.npy"], capsys)
    assert rc == 0, err
    p = np.load(tmp_path / "p.npy")
    assert p.dtype == np.float32 and np.isfinite(p).all()
    ref = torch.softmax(torch.from_numpy(x).double() / 1e-39, 1).numpy()  # one-hot at the maximum
    np.testing.assert_allclose(p, ref, atol=1e-7)
    # calibrated logits of 1e39 do not exist in float32: refused, nothing written
    rc, _, err = run(["apply", tmp_path / "x.npy", "-t", "1e-39", "--logits", "--out", tmp_path / "l.npy"], capsys)
    assert rc == 2 and "too small" in err and "float64 scores" in err and not (tmp_path / "l.npy").exists(), err
    np.save(tmp_path / "x64.npy", x.astype(np.float64))
    rc, _, err = run(["apply", tmp_path / "x64.npy", "-t", "1e-39", "--logits", "--out", tmp_path / "l.npy"], capsys)
    assert rc == 0, err
    # (T goes through TemperatureScaler: exp(-log T) is within a few float64 ulps of 1 / T)
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"), x.astype(np.float64) / 1e-39, rtol=1e-14)
    # a temperature whose inverse is not a float64
    rc, _, err = run(["apply", tmp_path / "x64.npy", "-t", "1e-320", "--out", tmp_path / "q.npy"], capsys)
    assert rc == 2 and "1 / T" in err and not (tmp_path / "q.npy").exists(), err


# ---------------------------------------------------------------------- issue 16, item 7
@pytest.mark.parametrize("index_name", ["", "Unnamed: 0"], ids=["empty", "Unnamed_0"])
def test_issue16_pandas_index_column_is_not_a_class(tmp_path, capsys, index_name):
    x, y = synthetic(n=2000, c=6, seed=5)
    text = csv_text(x, y, index=True)
    if index_name:
        text = index_name + text
    (tmp_path / "pd.csv").write_text(text)
    rc, out, err = run(["calibrate", tmp_path / "pd.csv", "--json", "--out", tmp_path / "o"], capsys)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["data"]["classes"] == 6
    assert rep["fit"]["temperature"] == pytest.approx(fitted(x.astype(np.float64), y), rel=1e-9)
    rc, _, err = run(["apply", tmp_path / "pd.csv", "-t", "2", "--out", tmp_path / "p.csv"], capsys)
    assert rc == 0, err
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == "label," + ",".join(f"probs_{j}" for j in range(6))


def test_issue16_an_unnamed_column_that_is_not_an_index_is_refused(tmp_path, capsys):
    x, y = synthetic(n=100, c=4)
    text = csv_text(x, y, index=True).splitlines()
    text[50] = "7" + text[50][text[50].index(","):]  # row 49's "index" is 7
    (tmp_path / "pd.csv").write_text("\n".join(text) + "\n")
    res = all_commands(tmp_path / "pd.csv", tmp_path, capsys)
    for cmd, (rc, err) in res.items():
        assert rc == 2 and "no name and is not the row number" in err and "--score-columns" in err, (cmd, err)
    rc, _, err = run(["calibrate", tmp_path / "pd.csv", "--score-columns", "logit_*", "--out", tmp_path / "o"], capsys)
    assert rc == 0, err


@pytest.mark.parametrize("names,key,expected", [
    (["logit_0", "logit_1"], "probs", ["probs_0", "probs_1"]),
    (["logits_cat", "logits_dog"], "probs", ["probs_cat", "probs_dog"]),
    (["prob_0", "prob_1"], "logits", ["logits_0", "logits_1"]),
    (["cat", "dog"], "probs", ["probs_cat", "probs_dog"]),
    (["score0", "score1"], "probs", ["probs_0", "probs_1"]),
    (None, "probs", ["probs_0", "probs_1"]),
])
def test_issue16_apply_names_columns_as_what_they_hold(names, key, expected):
    from softcal._io import output_columns

    assert output_columns(names, key, 2) == expected


def test_issue16_unknown_option_prints_the_commands_usage(tmp_path, capsys):
    x, y = synthetic()
    np.savez(tmp_path / "val.npz", logits=x, labels=y)
    for cmd in (["calibrate", tmp_path / "val.npz"], ["evaluate", tmp_path / "val.npz"],
                ["apply", tmp_path / "val.npz", "-t", "2"]):
        rc, _, err = run([*cmd, "--nonsense"], capsys)
        assert rc == 2
        assert err.startswith(f"usage: softcal {cmd[0]} "), err
        assert f"softcal {cmd[0]}: error: unrecognized arguments: --nonsense" in err
