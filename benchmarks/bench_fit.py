#!/usr/bin/env python
"""Benchmark fitting a temperature: softcal's safeguarded Newton against scipy and LBFGS.

Problem: N x C float32 logits (default 50,000 x 1,000, like an ImageNet validation set) of a
seeded synthetic classifier that is overconfident: the label's latent score is shifted by
``--margin``, every latent score has unit noise, and the logits are the latent scores multiplied
by ``--scale`` (so the optimal temperature is well above 1, as for modern networks).

Methods (each fits T on the same tensor; times include everything the method does):

  one-pass             one call of softcal.temperature_stats on all rows: the unit of the "time in
                       passes" column (the target: a fit in at most 3 passes' time).
  softcal              TemperatureScaler().fit(logits, labels): a pass at T = 1 (NLL before, the
                       checks, a row sample), Newton on the sample corrected by regression
                       estimators, then quartic/Halley steps on all rows (each a fused pass of
                       softcal.temperature_stats giving the NLL and its first and second
                       derivatives), tol 1e-6 (softcal._temperature_fit, _temperature_sample).
  softcal-all-rows     the same with the sample phase switched off (all rows from the start).
  scipy-bounded        scipy.optimize.minimize_scalar(method="bounded", bounds=(0.05, 20)) on T,
                       default xatol (1e-5), on the float64 NLL (float64 copy made once, in the
                       timing; each evaluation is torch.nn.functional.cross_entropy in float64).
  scipy-bounded-tight  the same with xatol=1e-9: what scipy needs for an exactness like softcal's.
  lbfgs-guo            the reference implementation of Guo et al. (gpleiss/temperature_scaling):
                       nn.Parameter T = 1.5, optim.LBFGS([T], lr=0.01, max_iter=50), one step,
                       closure = cross_entropy(logits / T, labels) + backward, float32 logits.
  lbfgs-wolfe          a well-configured LBFGS for comparison: lr=1, max_iter=100,
                       line_search_fn="strong_wolfe", tolerance_change=1e-12, on log T.

For each: best wall time over --repeats (median also recorded), function evaluations (passes over
the logits), final T, |T - T*| / T* and the float64 mean NLL at the returned T. T* is the optimum
computed by float64 Newton on softcal.reference.temperature_stats (exact float64 arithmetic),
iterated to |dbeta| < 1e-15 beta; the table also shows f'(1/T*) to prove it.

Usage:
  python benchmarks/bench_fit.py                    # 50,000 x 1,000, writes benchmarks/results/fit_cpu.{csv,md}
  python benchmarks/bench_fit.py --n 5000 --c 100 --out /tmp/fit   # quick
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import softcal  # noqa: E402
from softcal import reference  # noqa: E402


def make_problem(n: int, c: int, seed: int, margin: float, scale: float):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    z = torch.randn(n, c, generator=g)
    z[torch.arange(n), y] += margin
    return (scale * z).contiguous(), y


def nll64(x64: torch.Tensor, y: torch.Tensor, t: float) -> float:
    return float(torch.nn.functional.cross_entropy(x64 / t, y))


def exact_optimum(x: torch.Tensor, y: torch.Tensor, t0: float):
    """float64 Newton on the exact float64 statistics; returns (T*, f'(beta*) per row)."""
    beta = 1.0 / t0
    for _ in range(50):
        s = reference.temperature_stats(x, y, beta)
        g, h = float(s[1]), float(s[2])
        step = -g / h
        beta = beta + step
        if abs(step) < 1e-15 * beta:
            break
    s = reference.temperature_stats(x, y, beta)
    return 1.0 / beta, float(s[1]) / x.shape[0]


# ------------------------------------------------------------------ methods
def _work(r) -> str:
    """A fit's passes (counters of the FitResult): full passes, checks, and the sample passes
    in units of full passes."""
    total = r.iterations + r.check_passes + r.sample_passes * r.sample_rows / r.rows
    text = f"{r.iterations} full"
    if r.check_passes:
        text += f" + {r.check_passes} check"
    if r.sample_passes:
        text += f" + {r.sample_passes:g} on {r.sample_rows} rows"
    return f"{text} = {total:.2f}"


def m_softcal(x, y):
    r = softcal.TemperatureScaler().fit(x, y, progress=False)
    return r.temperature, _work(r)


def m_softcal_all_rows(x, y):
    """The same fit with the sample phase switched off: Newton/Halley on all rows only."""
    from softcal import _temperature_fit as TF

    keep = TF.MIN_SAMPLE_ROWS
    TF.MIN_SAMPLE_ROWS = 1 << 62
    try:
        r = softcal.TemperatureScaler().fit(x, y, progress=False)
    finally:
        TF.MIN_SAMPLE_ROWS = keep
    return r.temperature, _work(r)


def m_one_pass(x, y):
    """One pass of the statistics kernel (softcal.temperature_stats at T = 2): the unit of the
    "passes' time" column."""
    softcal.temperature_stats(x, y, 0.5)
    return float("nan"), "1"


def _scipy(x, y, xatol):
    from scipy.optimize import minimize_scalar

    x64 = x.double()
    evals = [0]

    def f(t):
        evals[0] += 1
        return nll64(x64, y, t)

    res = minimize_scalar(f, bounds=(0.05, 20.0), method="bounded", options={"xatol": xatol, "maxiter": 500})
    return float(res.x), evals[0]


def m_scipy(x, y):
    return _scipy(x, y, 1e-5)


def m_scipy_tight(x, y):
    return _scipy(x, y, 1e-9)


def m_lbfgs_guo(x, y):
    t = torch.nn.Parameter(torch.ones(1) * 1.5)
    opt = torch.optim.LBFGS([t], lr=0.01, max_iter=50)
    evals = [0]

    def closure():
        evals[0] += 1
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x / t, y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(t.detach()), evals[0]


def m_lbfgs_wolfe(x, y):
    log_t = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-12)
    evals = [0]

    def closure():
        evals[0] += 1
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x * torch.exp(-log_t), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp()), evals[0]


METHODS = {
    "one-pass": m_one_pass,
    "softcal": m_softcal,
    "softcal-all-rows": m_softcal_all_rows,
    "scipy-bounded": m_scipy,
    "scipy-bounded-tight": m_scipy_tight,
    "lbfgs-guo": m_lbfgs_guo,
    "lbfgs-wolfe": m_lbfgs_wolfe,
}


def cpu_ratio(x, y, reps: int = 5):
    """CPU time (time.process_time, one intra-op thread) of one temperature_stats pass, of the
    fit and of the all-rows fit (best of ``reps``), and the fits' work counters: less sensitive
    to other processes' load than wall time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def cpu(f):
        ts, out = [], None
        for _ in range(reps):
            t0 = time.process_time()
            out = f()
            ts.append(time.process_time() - t0)
        return min(ts), out

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            one, _ = cpu(lambda: m_one_pass(x, y))
            fit, r = cpu(lambda: m_softcal(x, y))
            allr, r2 = cpu(lambda: m_softcal_all_rows(x, y))
    finally:
        torch.set_num_threads(threads)
    return one, fit, allr, r[1], r2[1]


def cpu_ratio_text(one, fit, allr, work, work_all) -> str:
    return (f"one pass {one:.3f} s CPU; fit {fit:.3f} s CPU = {fit / one:.2f} passes ({work}); "
            f"all-rows fit {allr:.3f} s = {allr / one:.2f} passes ({work_all})")


def load_average() -> str:
    try:
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def _loaded(*loads: str) -> bool:
    """Whether a 1-minute load average exceeds half the logical CPUs."""
    try:
        return any(float(v.split(",")[0]) > 0.5 * (os.cpu_count() or 1) for v in loads)
    except ValueError:
        return True


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"


def versions() -> str:
    import numpy
    try:
        import scipy
        sv = scipy.__version__
    except ImportError:
        sv = "absent"
    return (f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
            f"scipy {sv}, softcal {softcal.__version__} (cpu backend: {softcal.backend('cpu')})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--c", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--margin", type=float, default=4.0)
    ap.add_argument("--scale", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each method (slow ones: 1 unless --repeats-all)")
    ap.add_argument("--repeats-all", action="store_true", help="repeat the slow baselines too")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tag", default="fit_cpu")
    ap.add_argument("--no-cpu-ratio", action="store_true",
                    help="skip the one-thread CPU-time measurement of the fits")
    args = ap.parse_args()
    load_start = load_average()

    torch.manual_seed(0)
    x, y = make_problem(args.n, args.c, args.seed, args.margin, args.scale)
    x64 = x.double()
    acc = float((x.argmax(1) == y).double().mean())
    print(f"problem: {args.n} x {args.c} float32 logits, seed {args.seed}, margin {args.margin}, "
          f"scale {args.scale}; accuracy {100 * acc:.2f}%, NLL at T=1 {nll64(x64, y, 1.0):.4f}")

    # warm-up (thread pools, first-call dispatch), untimed
    softcal.TemperatureScaler().fit(x[:1000], y[:1000], progress=False)

    rows = []
    for name in args.methods.split(","):
        fn = METHODS[name]
        reps = args.repeats if (name.startswith(("softcal", "one-pass")) or args.repeats_all) else 1
        times = []
        for _ in range(reps):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                t_fit, evals = fn(x, y)
                times.append(time.perf_counter() - t0)
        rows.append(dict(method=name, time_s=min(times), median_s=statistics.median(times), repeats=reps,
                         evals=evals, temperature=t_fit))
        print(f"  {name:<20} {min(times):8.3f} s  {evals:>3} evals  T = {t_fit:.9f}", flush=True)

    soft_t = next((r["temperature"] for r in rows if r["method"] == "softcal"), 2.0)
    t_star, gstar = exact_optimum(x, y, soft_t)
    nll_star = nll64(x64, y, t_star)
    for r in rows:
        fitted = r["temperature"] == r["temperature"]  # not the one-pass row (NaN)
        r["rel_err"] = abs(r["temperature"] - t_star) / t_star if fitted else float("nan")
        r["nll"] = nll64(x64, y, r["temperature"]) if fitted else float("nan")
        r["nll_excess"] = r["nll"] - nll_star
    base = next((r["time_s"] for r in rows if r["method"] == "softcal"), float("nan"))
    unit = next((r["time_s"] for r in rows if r["method"] == "one-pass"), float("nan"))
    for r in rows:
        r["softcal_speedup"] = r["time_s"] / base
        r["passes_time"] = r["time_s"] / unit

    ratio = None if args.no_cpu_ratio else cpu_ratio(x, y)
    load_end = load_average()
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    header = ("| method | time (s) | time in passes | passes / evals | T | abs(T - T*) / T* | "
              "NLL (float64) | NLL - NLL* | softcal is x faster |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['time_s']:.3f} | {r['passes_time']:.2f} | {r['evals']} | "
                     f"{r['temperature']:.9f} | {r['rel_err']:.2e} | {r['nll']:.9f} | "
                     f"{r['nll_excess']:.2e} | {r['softcal_speedup']:.1f} |")
    table = "\n".join(lines)
    info = [
        f"Command: `{cmd}` (run from the repository root)",
        f"Date: {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"Machine: {machine()}",
        f"Versions: {versions()}",
        f"Problem: {args.n} x {args.c} float32 logits, seed {args.seed}, margin {args.margin}, "
        f"scale {args.scale}; accuracy {100 * acc:.2f}%.",
        f"T* = {t_star:.12f} (float64 Newton on the exact statistics; mean f'(1/T*) = {gstar:.1e}); "
        f"NLL* = {nll_star:.9f}.",
        "Time: best of the repeats (softcal: {} repeats; baselines: {}).".format(
            args.repeats, args.repeats if args.repeats_all else 1),
        f"Load average (1, 5, 15 min) at the start {load_start}, at the end {load_end} on "
        f"{os.cpu_count()} logical CPUs" + (": measured under load, the wall times are inflated "
                                            "and noisy." if _loaded(load_start, load_end) else "."),
    ]
    if ratio is not None:
        info.append("CPU time with one thread (less sensitive to the load; also "
                    "`python benchmarks/fit_cpu_ratio.py`): " + cpu_ratio_text(*ratio) + ".")
    print()
    print("\n".join(info))
    print()
    print(table)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{args.tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / f"{args.tag}.md").write_text(
        "# Temperature fit: softcal vs scipy vs LBFGS (CPU)\n\n" + "\n\n".join(f"{s}" for s in info)
        + "\n\n" + table + "\n\nColumns: time in passes = the time over one-pass's (one call of "
        "softcal.temperature_stats on all rows). passes / evals = passes over the logits (softcal: "
        "FitResult's counters: full passes, check passes, passes over the row sample, and their sum "
        "in full passes) or objective evaluations (scipy: NLL; LBFGS: NLL + gradient). "
        "softcal-all-rows: the same fit with the sample phase switched off. abs(T - T*) / T*: "
        "relative error of the fitted temperature. NLL - NLL*: excess mean NLL (float64) over the "
        "optimum.\n")
    print(f"\nwrote {out / (args.tag + '.csv')} and {out / (args.tag + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
