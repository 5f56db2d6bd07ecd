"""`softcal bench` and benchmarks/bench_loss.py: one benchmark on torch.utils.benchmark, its
options, outputs and exit codes."""

import csv
import re
import subprocess
import sys
import time
from pathlib import Path

from softcal import bench, cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--shapes", "16x7", "--dtypes", "float32", "--impls", "softcal,eager", "--min-time", "0.02",
        "--no-plot"]


def run(args, capsys):
    rc = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def read_rows(path):
    return list(csv.DictReader(ln for ln in path.read_text().splitlines() if not ln.startswith("#")))


def test_bench_runs_tiny_and_says_where_its_outputs_went(tmp_path, capsys):
    rc, out, err = run(["bench", *TINY, "--out", tmp_path / "b"], capsys)
    assert rc == 0, err
    csv_path = tmp_path / "b" / "cpu_quick.csv"
    assert f"wrote {tmp_path / 'b' / 'cpu_quick'}.csv" in out and csv_path.is_file()
    md = (tmp_path / "b" / "cpu_quick.md").read_text()
    for text in (out, md):
        assert not re.search(r"issue|target", text, re.I), "internal wording in the output"
    assert "command: `softcal bench --shapes 16x7" in md and "torch.utils.benchmark" in md
    ok = [r for r in read_rows(csv_path) if r["status"] == "ok"]
    assert {(r["pass"], r["impl"]) for r in ok} == {("fwd", "softcal"), ("fwd", "eager"),
                                                    ("fwd+bwd", "softcal"), ("fwd+bwd", "eager")}
    for r in ok:  # measured for at least --min-time, the quick run reports the minimum
        assert float(r["measured_s"]) >= 0.02 and int(r["reps"]) >= 3
        assert r["stat"] == "min" and r["ms"] == r["min_ms"]
        assert float(r["min_ms"]) <= float(r["median_ms"]) and float(r["spread_pct"]) >= 0
    eager = {r["pass"]: r for r in ok if r["impl"] == "eager"}
    for r in ok:
        if r["impl"] == "softcal":
            assert abs(float(r["speedup_vs_eager"]) - float(eager[r["pass"]]["ms"]) / float(r["ms"])) < 1e-3


def test_measure_repeats_until_the_minimum_time_and_refills_untimed():
    calls = []
    m = bench.measure(lambda: calls.append(1), lambda: None, min_time=0.01)
    assert sum(m.raw_times) >= 0.01 and len(m.times) * m.number_per_run > 100  # a ~µs call: many
    # refill: prep() runs before every call and is not timed (a 20 ms prep, a ~0 s call)
    m = bench.measure(lambda: None, lambda: time.sleep(0.02), min_time=0.0, refill=True)
    assert len(m.times) >= 3 and max(m.times) < 0.01
    m = bench.measure(lambda: time.sleep(0.002), lambda: None, min_time=0.0)
    assert 0.0015 < m.median < 0.05


def test_bench_default_out_is_outside_the_source_tree(monkeypatch, tmp_path):
    monkeypatch.delenv("SOFTCAL_BENCH_OUT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert bench.default_out() == tmp_path / "softcal" / "bench"
    assert bench.parse_args(["--quick"]).out == str(tmp_path / "softcal" / "bench")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert ROOT not in bench.default_out().resolve().parents


def test_bench_quick_is_the_default_of_softcal_bench_only():
    a = bench.parse_args([], quick_default=True)
    assert a.quick and a.tag == "quick" and a.shape_list == bench.QUICK_SHAPES and a.thp == "inherit"
    assert (a.threads, a.clock, a.stat, a.no_compile) == (1, "cpu", "min", True)
    b = bench.parse_args([])
    assert not b.quick and b.tag == "bench" and b.thp == "both"
    assert (b.threads, b.clock, b.stat, b.no_compile) == (None, "wall", "median", False)
    assert not bench.parse_args(["--full"], quick_default=True).quick


def test_bench_bad_options_exit_2(capsys):
    for args in (["--shapes", "10by3"], ["--dtypes", "int8"], ["--impls", "nope"], ["--device", "tpu"],
                 ["--min-time", "-1"]):
        rc, _, err = run(["bench", *args], capsys)
        assert rc == 2 and "error" in err, args


def test_bench_exits_1_when_a_softcal_case_fails(tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr("softcal.cross_entropy", broken)
    rc, out, err = run(["bench", *TINY, "--out", tmp_path], capsys)
    assert rc == 1 and "failed" in err
    rows = read_rows(tmp_path / "cpu_quick.csv")
    assert {r["status"] for r in rows if r["impl"] == "softcal"} == {
        "error: RuntimeError: kernel exploded"}


def test_bench_script_is_the_same_benchmark(tmp_path):
    # --thp both: the package's benchmark in two worker processes, as `make bench` runs it; the
    # script adds the plot
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_loss.py"), "--quick",
                        *[a for a in TINY if a != "--no-plot"], "--thp", "both", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "command: `python benchmarks/bench_loss.py --quick --shapes 16x7" in p.stdout
    rows = read_rows(tmp_path / "cpu_quick.csv")
    assert {r["thp"] for r in rows} == {"unset", "1"}
    assert (tmp_path / "cpu_quick.png").stat().st_size > 10_000
    text = (ROOT / "benchmarks" / "bench_loss.py").read_text()
    assert "softcal.bench" in text and "def run_benchmark" not in text  # one implementation
