"""The calibration workflow on the command line: calibrate --save, apply, evaluate, bench; the
help, --version, exit codes, devices, progress bars and --quiet; the README's commands."""

import datetime as dt
import hashlib
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import softcal
from softcal import cli
from cli_helpers import run, synthetic

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def files(tmp_path):
    xv, yv = synthetic(seed=1)
    xt, yt = synthetic(seed=2, n=1000)
    np.savez(tmp_path / "val.npz", logits=xv, labels=yv)
    np.savez(tmp_path / "test.npz", logits=xt, labels=yt)
    np.save(tmp_path / "new.npy", xt)
    return tmp_path, (xv, yv), (xt, yt)


# ---------------------------------------------------------------------- calibrate
def test_test_without_val_is_refused(tmp_path, capsys):
    x, y = synthetic()
    np.savez(tmp_path / "t.npz", logits=x, labels=y)
    rc, out, err = run(["calibrate", "--test", tmp_path / "t.npz", "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "--test needs a validation file" in err and out == ""
    assert f"softcal calibrate {tmp_path / 't.npz'}" in err  # says how to fit on the user's data
    assert not (tmp_path / "o").exists()


def test_save_writes_the_provenance(files, capsys):
    d, (xv, yv), (xt, yt) = files
    rc, out, err = run(["calibrate", d / "val.npz", "--test", d / "test.npz", "--save", d / "T.json",
                        "--out", d / "o"], capsys)
    assert rc == 0, err
    assert f"temperature: {d / 'T.json'}" in out
    s = json.loads((d / "T.json").read_text())
    ref = softcal.TemperatureScaler().fit(xv, yv)
    assert s["temperature"] == pytest.approx(ref.temperature, rel=1e-12)
    assert s["nll_before"] == pytest.approx(ref.nll_before, rel=1e-12)
    assert s["nll_after"] == pytest.approx(ref.nll_after, rel=1e-12)
    assert (s["N"], s["C"]) == (600, 5) and s["softcal_version"] == softcal.__version__
    sha = {i["role"]: i["sha256"] for i in s["inputs"]}
    assert sha["fit"] == hashlib.sha256((d / "val.npz").read_bytes()).hexdigest()
    assert sha["evaluate"] == hashlib.sha256((d / "test.npz").read_bytes()).hexdigest()
    age = dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(s["date"])
    assert abs(age.total_seconds()) < 600
    assert s["evaluation"]["ece_after"] == pytest.approx(
        softcal.metrics.ece(xt, yt, temperature=s["temperature"]), abs=1e-12)


def test_save_of_the_embedded_default(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(["calibrate", "--save", "T.json", "--quiet"], capsys)
    assert rc == 0, err
    s = json.loads((tmp_path / "T.json").read_text())
    assert s["temperature"] == pytest.approx(2.8826, abs=1e-4) and (s["N"], s["C"]) == (5000, 10)
    assert s["inputs"][0]["sha256"] == hashlib.sha256(cli.DEFAULT_DATA.read_bytes()).hexdigest()


# ---------------------------------------------------------------------- apply
def scaled_probs(x, t_json):
    """What the Python API gives: TemperatureScaler at the saved T, then softmax."""
    scaler = softcal.TemperatureScaler()
    scaler.temperature = json.loads(Path(t_json).read_text())["temperature"]
    with torch.no_grad():
        return torch.softmax(scaler(torch.from_numpy(x)), 1).numpy()


def test_save_apply_round_trip_equals_the_python_api(files, capsys):
    d, (xv, yv), (xt, yt) = files
    assert run(["calibrate", d / "val.npz", "--save", d / "T.json", "--out", d / "o", "-q"], capsys)[0] == 0
    # 1000 rows in chunks of 64: the file is larger than one chunk
    rc, out, err = run(["apply", d / "test.npz", "--temperature", d / "T.json", "--chunk-rows", "64",
                        "--out", d / "cal.npz"], capsys)
    assert rc == 0, err
    assert f"to {d / 'cal.npz'}" in out
    with np.load(d / "cal.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["labels", "probs"]
        got, labels = z["probs"], z["labels"]
    assert got.dtype == np.float32 and got.shape == xt.shape and np.array_equal(labels, yt)
    # the Python API (the scaler fitted in Python, then applied) gives the same probabilities
    fitted = softcal.TemperatureScaler()
    fitted.fit(xv, yv)
    with torch.no_grad():
        api = torch.softmax(fitted(torch.from_numpy(xt)), 1).numpy()
    np.testing.assert_allclose(got, api, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got, scaled_probs(xt, d / "T.json"))
    # and a float64 reference within float32 rounding
    t = json.loads((d / "T.json").read_text())["temperature"]
    ref = torch.softmax(torch.from_numpy(xt).double() / t, 1).numpy()
    np.testing.assert_allclose(got, ref, rtol=3e-6, atol=1e-7)


def test_apply_npy_streams_and_writes_npy_or_logits(files, capsys, monkeypatch):
    d, _, (xt, _) = files
    seen = []
    orig = np.lib.format.open_memmap

    def spy(*a, **k):
        m = orig(*a, **k)
        seen.append((Path(a[0]).name, k.get("mode", a[1] if len(a) > 1 else "r+"), type(m)))
        return m

    monkeypatch.setattr(np.lib.format, "open_memmap", spy)
    rc, _, err = run(["apply", d / "new.npy", "-t", "2.88", "--chunk-rows", "100", "-o", d / "p.npy"], capsys)
    assert rc == 0, err
    # the input .npy is read memory-mapped, the output written memory-mapped (to a temporary
    # file beside p.npy, renamed onto it when complete)
    assert [(n if i == 0 else re.sub(r"^\.p\.\w+\.softcal-partial\.npy$", "p.npy", n), m, t)
            for i, (n, m, t) in enumerate(seen)] == [("new.npy", "r", np.memmap), ("p.npy", "w+", np.memmap)], seen
    assert sorted(f.name for f in d.iterdir() if "partial" in f.name) == []
    p = np.load(d / "p.npy")
    ref = torch.softmax(torch.from_numpy(xt).double() / 2.88, 1).numpy()
    np.testing.assert_allclose(p, ref, rtol=3e-6, atol=1e-7)
    rc, _, err = run(["apply", d / "new.npy", "-t", "2.88", "--logits", "--chunk-rows", "333"], capsys)
    assert rc == 0, err
    lg = np.load(d / "new-calibrated.npy")  # default name: FILE-calibrated with its suffix
    np.testing.assert_allclose(lg, xt.astype(np.float64) / 2.88, rtol=1e-6, atol=1e-6)


def test_apply_streams_compressed_npz(files, capsys):
    d, _, (xt, yt) = files
    np.savez_compressed(d / "z.npz", scores=xt, y=yt.astype(np.float64))  # float labels too
    rc, _, err = run(["apply", d / "z.npz", "-t", "1.25", "--chunk-rows", "99", "-o", d / "c.npz"], capsys)
    assert rc == 0, err
    with np.load(d / "c.npz") as z:
        ref = torch.softmax(torch.from_numpy(xt).double() / 1.25, 1).numpy()
        np.testing.assert_allclose(z["probs"], ref, rtol=3e-6, atol=1e-7)
        assert z["labels"].dtype == np.int64 and np.array_equal(z["labels"], yt)


def test_probabilities_read_as_logits_get_a_warning(files, capsys):
    d, _, (xt, yt) = files
    p = torch.softmax(torch.from_numpy(xt).double(), 1).numpy()
    np.savez(d / "p.npz", probs=p, labels=yt)
    for cmd in (["evaluate", d / "p.npz", "--out", d / "e"], ["apply", d / "p.npz", "-t", "2", "-o", d / "a.npz"]):
        rc, _, err = run(cmd, capsys)
        assert rc == 0 and "look like probabilities" in err and "--probs" in err
        rc, _, err = run(cmd + ["--probs"], capsys)
        assert rc == 0 and "look like probabilities" not in err
    # with --probs, apply gives softmax(log p / T)
    ref = torch.softmax(torch.log(torch.from_numpy(p)) / 2, 1).numpy()
    np.testing.assert_allclose(np.load(d / "a.npz")["probs"], ref, rtol=1e-12, atol=1e-15)


def test_evaluate_needs_labels(files, capsys):
    d, _, _ = files
    rc, _, err = run(["evaluate", d / "new.npy", "--out", d / "e"], capsys)
    assert rc == 2 and "no labels" in err


def test_apply_reads_npy_chunk_by_chunk(files, capsys, monkeypatch):
    from softcal import _io

    d, _, _ = files
    sizes = []
    orig = _io._ArraySource.chunks

    def spy(self, rows):
        for s, y in orig(self, rows):
            sizes.append(s.shape[0])
            yield s, y

    monkeypatch.setattr(_io._ArraySource, "chunks", spy)
    rc, _, err = run(["apply", d / "new.npy", "-t", "2", "--chunk-rows", "300", "-o", d / "p.npz"], capsys)
    assert rc == 0, err
    assert sizes == [300, 300, 300, 100]


def test_apply_csv_keeps_columns_and_labels(tmp_path, capsys):
    x, y = synthetic(n=50)
    with open(tmp_path / "s.csv", "w") as f:
        f.write("target,a,b,c,d,e\n")
        for row, lab in zip(x, y):
            f.write(",".join([str(lab)] + [repr(float(v)) for v in row]) + "\n")
    rc, _, err = run(["apply", tmp_path / "s.csv", "-t", "1.5", "--chunk-rows", "7"], capsys)
    assert rc == 0, err
    lines = (tmp_path / "s-calibrated.csv").read_text().splitlines()
    assert lines[0] == "target,probs_a,probs_b,probs_c,probs_d,probs_e" and len(lines) == 51
    arr = np.array([[float(v) for v in ln.split(",")] for ln in lines[1:]])
    assert np.array_equal(arr[:, 0], y)
    ref = torch.softmax(torch.from_numpy(x).double() / 1.5, 1).numpy()
    np.testing.assert_allclose(arr[:, 1:], ref, rtol=1e-12, atol=1e-15)  # parsed as float64


@pytest.mark.parametrize("args,match", [
    (["-t", "0"], "finite number > 0"),
    (["-t", "nan"], "finite number > 0"),
    (["-t", "missing.json"], "neither a number > 0 nor a file"),
    (["-t", "2", "--chunk-rows", "0"], "--chunk-rows must be >= 1"),
    (["-t", "2", "-o", "out.xlsx"], "cannot write"),
    (["-t", "2", "--probs"], "not in [0, 1]"),
])
def test_apply_errors(files, capsys, args, match):
    d, _, _ = files
    rc, _, err = run(["apply", d / "new.npy", *args], capsys)
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err


def test_apply_bad_temperature_file(tmp_path, capsys, files):
    d, _, _ = files
    (d / "bad.json").write_text('{"T": 2}')
    rc, _, err = run(["apply", d / "new.npy", "-t", d / "bad.json"], capsys)
    assert rc == 2 and "not a temperature file" in err


def test_apply_refuses_to_overwrite_its_input(files, capsys):
    d, _, _ = files
    before = (d / "new.npy").read_bytes()
    rc, _, err = run(["apply", d / "new.npy", "-t", "2", "-o", d / "new.npy"], capsys)
    assert rc == 2 and "is the input file" in err and (d / "new.npy").read_bytes() == before


# ---------------------------------------------------------------------- evaluate
def test_evaluate_does_not_fit(files, capsys, monkeypatch):
    d, _, (xt, yt) = files

    def no_fit(*a, **k):
        raise AssertionError("evaluate fitted something")

    monkeypatch.setattr(softcal.TemperatureScaler, "fit", no_fit)
    rc, out, err = run(["evaluate", d / "test.npz", "--out", d / "e", "--bins", "10"], capsys)
    assert rc == 0, err
    assert "ECE (10 bins)" in out and f"{100 * softcal.metrics.ece(xt, yt, 10):.2f}%" in out
    assert (d / "e" / "reliability_diagram.png").read_bytes()[:4] == b"\x89PNG"
    rc, out, err = run(["evaluate", d / "test.npz", "--temperature", "2.5", "--json", "--out", d / "e"], capsys)
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["metrics"]["T = 2.5"]["ece"] == pytest.approx(softcal.metrics.ece(xt, yt, temperature=2.5), abs=1e-12)
    assert rep["metrics"]["T = 1"]["nll"] == pytest.approx(softcal.metrics.nll(xt, yt), abs=1e-12)


def test_evaluate_the_embedded_test_split_at_the_saved_temperature(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(["calibrate", "--save", "T.json", "-q"], capsys)[0] == 0
    rc, out, err = run(["evaluate", cli.DEFAULT_DATA, "--temperature", "T.json"], capsys)
    assert rc == 0, err
    assert "its test split" in out and "10000 rows" in out
    assert re.search(r"ECE \(15 bins\)\s+5\.50%\s+0\.95%", out), out


# ---------------------------------------------------------------------- the command itself
def test_help_lists_every_subcommand_and_the_exit_codes(capsys):
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0
    for sub in ("calibrate", "evaluate", "apply", "bench"):
        assert re.search(rf"^\s+{sub}\b", out, re.M), sub
    assert "exit status: 0 success; 2 usage or input error" in out and "1 unexpected failure" in out


@pytest.mark.parametrize("sub", ["calibrate", "evaluate", "apply"])
def test_usage_names_every_option(capsys, sub):
    parser = cli._parser()
    subparser = next(a for a in parser._actions if a.dest == "command").choices[sub]
    rc, out, _ = run([sub, "--help"], capsys)
    assert rc == 0
    usage = out.split("\n\n")[0]
    for action in subparser._actions:
        if action.option_strings:
            assert any(o in usage for o in action.option_strings), (sub, action.option_strings)
    assert "exit status" in out
    if sub != "apply":
        assert "--out DIR" in out and "directory for reliability_diagram.png" in out


def test_version(capsys):
    rc, out, _ = run(["--version"], capsys)
    assert rc == 0 and out.startswith(f"softcal {softcal.__version__} (torch {torch.__version__}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("cmd", [["calibrate"], ["evaluate", cli.DEFAULT_DATA],
                                 ["apply", cli.DEFAULT_DATA, "-t", "2"], ["bench"]])
def test_device_cuda_without_cuda_is_one_line(tmp_path, capsys, cmd):
    rc, out, err = run([*cmd, "--device", "cuda", "--out", tmp_path / ("o.npz" if cmd[0] == "apply" else "o")], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "--device cuda" in err and ("no CUDA support" in err or "no CUDA GPU" in err)


def test_bad_device_name(tmp_path, capsys):
    rc, _, err = run(["calibrate", "--device", "gpu0", "--out", tmp_path], capsys)
    assert rc == 2 and "'gpu0' is not a device name" in err


def test_usage_error_exits_2(capsys):
    rc, _, err = run(["calibrate", "--bins", "many"], capsys)
    assert rc == 2 and "invalid int value" in err
    rc, _, err = run(["frobnicate"], capsys)
    assert rc == 2 and "invalid choice" in err


def test_unexpected_failure_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(softcal.metrics, "calibration_report", boom)
    rc, _, err = run(["calibrate", "--out", tmp_path], capsys)
    assert rc == 1 and "unexpected error: RuntimeError: disk on fire" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_progress_bars_only_on_a_terminal_and_quiet(files, capsys, monkeypatch):
    d, _, _ = files
    rc, out, err = run(["apply", d / "new.npy", "-t", "2", "--chunk-rows", "100", "-o", d / "a.npz"], capsys)
    assert rc == 0 and "softcal: applying T" not in err  # stdout is not a terminal here
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    rc, out, err = run(["apply", d / "new.npy", "-t", "2", "--chunk-rows", "100", "-o", d / "b.npz"], capsys)
    assert rc == 0 and "softcal: applying T" in err and "/1000" in err
    rc, out, err = run(["calibrate", d / "val.npz", "--out", d / "o", "--json"], capsys)
    assert rc == 0 and "softcal: fitting T" in err
    # the fit with a bar (chunk source) is the same fit
    assert json.loads(out)["fit"]["temperature"] == pytest.approx(
        softcal.TemperatureScaler().fit(*files[1]).temperature, rel=1e-12)
    with open(d / "s.csv", "w") as f:
        f.write("label,a,b\n" + "".join(f"{i % 2},{i * 0.1},{-i * 0.1}\n" for i in range(50)))
    rc, out, err = run(["evaluate", d / "s.csv", "--out", d / "o"], capsys)
    assert rc == 0 and "softcal: reading s.csv" in err
    rc, out, err = run(["apply", d / "new.npy", "-t", "2", "-o", d / "c.npz", "--quiet"], capsys)
    assert rc == 0 and out == "" and err == ""
    rc, out, err = run(["calibrate", d / "val.npz", "--out", d / "o", "-q"], capsys)
    assert rc == 0 and out == "" and err == ""
    assert np.array_equal(np.load(d / "a.npz")["probs"], np.load(d / "b.npz")["probs"])


TINY = ["--shapes", "16x7", "--dtypes", "float32", "--impls", "softcal,eager", "--min-time", "0.02",
        "--no-plot"]  # the README's bench command, on tiny shapes (tests/project/test_bench.py tests bench)


# ---------------------------------------------------------------------- the README
def readme_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    sec = text.split("### The command line", 1)[1]
    sec = re.split(r"\n##? |\n### ", sec, maxsplit=1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", sec, re.S)
    cmds = []
    for b in blocks:
        for line in b.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("softcal "):
                cmds.append(shlex.split(line)[1:])
    return cmds


def test_readme_commands_run(tmp_path, capsys, monkeypatch):
    cmds = readme_commands()
    assert len(cmds) >= 6 and {c[0] for c in cmds if c} >= {"calibrate", "evaluate", "apply"}
    monkeypatch.chdir(tmp_path)
    # the files the README's commands read
    xv, yv = synthetic(seed=1)
    xt, yt = synthetic(seed=2, n=1000)
    np.savez("val.npz", logits=xv, labels=yv)
    np.savez("test.npz", logits=xt, labels=yt)
    np.save("new_logits.npy", xt)
    with open("scores.csv", "w") as f:
        f.write("label," + ",".join(f"logit_{j}" for j in range(5)) + "\n")
        for row, lab in zip(xt, yt):
            f.write(",".join([str(lab)] + [repr(float(v)) for v in row]) + "\n")
    for c in cmds:
        if c and c[0] == "bench":
            c = c + TINY  # the README's bench command, on tiny shapes
        rc, out, err = run(c, capsys)
        assert rc == 0, (c, err)
    assert Path("calibrated.npz").is_file() and Path("T.json").is_file()
