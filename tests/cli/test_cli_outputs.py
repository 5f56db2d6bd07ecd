"""The command line never damages a user's file (issue 18, items 1-4): an output that is an input
(by identity: hard and symbolic links too) is refused before anything is written; an output is
written to a temporary file beside it and renamed into place only when complete, so that a
failing, interrupted or killed run leaves an existing output as it was and no partial file."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import run, synthetic

ROOT = Path(__file__).resolve().parents[2]


def write_csv(path, x, y=None):
    with open(path, "w") as f:
        f.write(",".join((["label"] if y is not None else []) + [f"logit_{j}" for j in range(x.shape[1])]) + "\n")
        for i, row in enumerate(x):
            f.write(",".join(([str(int(y[i]))] if y is not None else []) + [repr(float(v)) for v in row]) + "\n")
    return path


def make_input(d: Path, suffix: str) -> Path:
    x, y = synthetic()
    p = d / f"in{suffix}"
    if suffix == ".npy":
        np.save(p, x)
    elif suffix == ".npz":
        np.savez(p, logits=x, labels=y)
    elif suffix == ".csv":
        write_csv(p, x, y)
    elif suffix == ".pt":
        torch.save({"logits": torch.from_numpy(x), "labels": torch.from_numpy(y)}, p)
    return p


def padded_npy(path: Path) -> Path:
    """An .npy whose header is padded (a valid header of 4 KiB; numpy reads it)."""
    x, _ = synthetic()
    header = {"descr": "<f4", "fortran_order": False, "shape": x.shape}
    text = repr(header).encode("latin1")
    pad = 4096 - 10 - len(text) - 1
    text = text + b" " * pad + b"\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text)
        f.write(x.astype("<f4").tobytes())
    assert np.array_equal(np.load(path), x)
    return path


def partials(d: Path):
    return sorted(p.name for p in d.iterdir() if "softcal-partial" in p.name)


# ---------------------------------------------------------------------- item 1
@pytest.mark.parametrize("suffix", [".npy", ".npz", ".csv", ".pt", "padded.npy"])
@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_item1_apply_out_through_a_link_to_the_input_is_refused(tmp_path, capsys, suffix, link):
    src = padded_npy(tmp_path / "in.npy") if suffix == "padded.npy" else make_input(tmp_path, suffix)
    before = src.read_bytes()
    alias = tmp_path / f"alias{src.suffix}"
    (os.link if link == "hard" else os.symlink)(src, alias)
    rc, out, err = run(["apply", src, "-t", "2", "--logits", "--out", alias], capsys)
    assert rc == 2, err
    assert "is the input file" in err and len(err.strip().splitlines()) == 1, err
    assert src.read_bytes() == before and partials(tmp_path) == []


def test_item1_another_spelling_of_the_input_path_is_refused(tmp_path, capsys, monkeypatch):
    src = make_input(tmp_path, ".npy")
    before = src.read_bytes()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    rc, _, err = run(["apply", src, "-t", "2", "--out", "../in.npy"], capsys)
    assert rc == 2 and "is the input file" in err and src.read_bytes() == before


# ---------------------------------------------------------------------- item 2
def test_item2_calibrate_save_onto_an_input_is_refused(tmp_path, capsys):
    val, test = make_input(tmp_path, ".npz"), tmp_path / "test.npz"
    x, y = synthetic(seed=3)
    np.savez(test, logits=x, labels=y)
    os.link(val, tmp_path / "hard.npz")
    for save, what in [(val, "in.npz"), (test, "test.npz"), (tmp_path / "hard.npz", "in.npz")]:
        before = (val.read_bytes(), test.read_bytes())
        rc, out, err = run(["calibrate", val, "--test", test, "--save", save, "--out", tmp_path / "o"], capsys)
        assert rc == 2 and "--save" in err and "is the input file" in err and what in err, err
        assert (val.read_bytes(), test.read_bytes()) == before
        assert not (tmp_path / "o").exists(), "nothing is written when a check fails"


def test_item2_no_output_of_calibrate_or_evaluate_is_an_input(tmp_path, capsys):
    val = make_input(tmp_path, ".npz")
    (tmp_path / "o").mkdir()
    os.link(val, tmp_path / "o" / "report.json")  # --out's report.json is the input, by a hard link
    before = val.read_bytes()
    rc, _, err = run(["calibrate", val, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "is the input file" in err and val.read_bytes() == before
    # evaluate reading its temperature from the report.json it would overwrite
    rc, _, err = run(["evaluate", val, "--temperature", "2", "--out", tmp_path / "e"], capsys)
    assert rc == 0, err
    t_file = tmp_path / "e" / "report.json"
    saved = t_file.read_bytes()
    rc, _, err = run(["evaluate", val, "--temperature", t_file, "--out", tmp_path / "e"], capsys)
    assert rc == 2 and "is the input file" in err and t_file.read_bytes() == saved
    # two outputs that are one file
    rc, _, err = run(["calibrate", val, "--save", tmp_path / "x" / "report.json", "--out", tmp_path / "x"], capsys)
    assert rc == 2 and "are the same file" in err and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------- item 3
def test_item3_a_failing_apply_keeps_an_existing_out(tmp_path, capsys):
    x, y = synthetic(n=300)
    np.save(tmp_path / "logits.npy", x)
    out = tmp_path / "p.npz"
    out.write_bytes(b"precious")
    # refused by a check of the values (--probs on logits), in the first block
    rc, _, err = run(["apply", tmp_path / "logits.npy", "-t", "2", "--probs", "--out", out], capsys)
    assert rc == 2 and "not in [0, 1]" in err
    assert out.read_bytes() == b"precious" and partials(tmp_path) == []
    # a bad CSV cell in a later block: the earlier blocks were written (to the temporary file)
    bad = write_csv(tmp_path / "bad.csv", x, y)
    lines = bad.read_text().splitlines()
    lines[250] = lines[250].replace(lines[250].split(",")[3], "oops")
    bad.write_text("\n".join(lines) + "\n")
    for suffix in (".npz", ".npy", ".csv", ".parquet", ".pt"):
        if suffix == ".parquet":
            pytest.importorskip("pyarrow")
        target = tmp_path / f"p{suffix}"
        target.write_bytes(b"precious")
        rc, _, err = run(["apply", bad, "-t", "2", "--chunk-rows", "16", "--out", target], capsys)
        assert rc == 2 and "line 251: 'oops' is not a number" in err, err
        assert target.read_bytes() == b"precious", suffix
        assert partials(tmp_path) == []
    # a NaN in a later block of an .npy
    x[200, 1] = np.nan
    np.save(tmp_path / "nan.npy", x)
    rc, _, err = run(["apply", tmp_path / "nan.npy", "-t", "2", "--chunk-rows", "16", "--out", out], capsys)
    assert rc == 2 and "NaN (first in row 200)" in err and out.read_bytes() == b"precious"


def test_item3_a_successful_apply_replaces_the_out_and_keeps_its_mode(tmp_path, capsys):
    src = make_input(tmp_path, ".npy")
    out = tmp_path / "p.npy"
    out.write_bytes(b"old")
    os.chmod(out, 0o640)
    link = tmp_path / "link.npy"
    os.symlink(out, link)
    rc, _, err = run(["apply", src, "-t", "2", "--out", link], capsys)
    assert rc == 0, err
    assert link.is_symlink(), "written through the link, onto the file it points to"
    assert np.load(out).shape == (600, 5) and (os.stat(out).st_mode & 0o777) == 0o640
    assert partials(tmp_path) == []


# ---------------------------------------------------------------------- item 4
def _default_signals():
    # as from a terminal, whatever this test runs under (nohup ignores SIGHUP, and so would the
    # child: softcal leaves an ignored signal ignored)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _start_apply(tmp_path: Path, out: Path):
    x = np.random.default_rng(0).standard_normal((60000, 100)).astype(np.float32)
    np.save(tmp_path / "big.npy", x)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "softcal", "apply", str(tmp_path / "big.npy"), "-t", "2",
                          "--chunk-rows", "500", "--out", str(out)], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_default_signals)
    # wait until the output is being written: a file other than the input and the old output
    # has grown (a temporary file here; on a writer without one, the output itself)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None:
        grown = [f for f in tmp_path.iterdir() if f.name != "big.npy" and f.is_file()
                 and f.stat().st_size > 100_000]
        if grown:
            return p
        time.sleep(0.05)
    p.kill()
    pytest.fail(f"the apply run never started writing (rc {p.poll()}): {p.communicate()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_item4_a_terminated_apply_leaves_no_output(tmp_path, sig):
    out = tmp_path / "p.csv"
    p = _start_apply(tmp_path, out)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, (p.returncode, err)
    assert f"stopped by {signal.Signals(sig).name}" in err and "Traceback" not in err, err
    assert not out.exists(), "no output that looks complete"
    assert partials(tmp_path) == [], "the temporary file was removed"


def test_item4_a_killed_apply_leaves_the_old_output(tmp_path):
    out = tmp_path / "p.csv"
    out.write_text("precious\n")
    p = _start_apply(tmp_path, out)
    p.kill()  # SIGKILL: nothing can clean up
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL
    assert out.read_text() == "precious\n", "the target is replaced only by a complete file"
    left = partials(tmp_path)
    assert len(left) == 1 and left[0].startswith(".p.") and left[0].endswith(".softcal-partial.csv"), left
