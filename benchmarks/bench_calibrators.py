"""Every softcal calibrator on every logit file in tests/data, beside netcal's and
scikit-learn's fits of the same calibrators where they are installed; and the speed of the
fits at C = 100 against the peers at an equal or lower objective.

    python benchmarks/bench_calibrators.py [--out benchmarks/results] [--threads 1] [--quick]

Run it with a Python that also has the peers (they are never softcal dependencies), e.g. the
virtual environment made by

    python3 -m venv build/peers-venv
    echo "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \\
        > "$(build/peers-venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_softcal.pth"
    build/peers-venv/bin/python -m pip install netcal scikit-learn
    build/peers-venv/bin/python benchmarks/bench_calibrators.py

(dirichletcal does not install on Python 3.11: its releases 0.5.x need Python >= 3.12 and the
0.3.dev sdists have a broken setup.py; the script uses it when it imports.)

Splits: the DenseNet-40 file's own (5000 validation rows to fit, 10000 test rows to score);
the netcal files (10000 test-set rows, probabilities: log p are the logits) are cut in two,
the first 5000 rows to fit and the last 5000 to score. Metrics: softcal.metrics (NLL, ECE and
classwise ECE with 15 bins, Brier, accuracy). Writes calibrators.csv / calibrators.md (the
table) and calibrators_speed.csv (the speed comparison) into --out, with the command, the
machine and the versions.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import json
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import softcal  # noqa: E402
from softcal import _io, metrics  # noqa: E402
from softcal._cli.calibrators import METHODS, make_calibrator  # noqa: E402

FILES = [
    ("densenet40_c10 (markus93)", "embedded"),
    ("lenet5_c10 (netcal)", "tests/data/logits/netcal/lenet-5-cifar-10.npz"),
    ("wideresnet16-4_c10 (netcal)", "tests/data/logits/netcal/wideresnet-16-4-cifar-10.npz"),
    ("densenet-bc-100_c100 (netcal)", "tests/data/logits/netcal/densenet-bc-100-cifar-100.npz"),
]


def load(path):
    if path == "embedded":
        d = _io.load_embedded()
        (xv, yv), (xt, yt) = d["val"], d["test"]
        split = "own split: fit on val (5000), score on test (10000)"
        return (torch.from_numpy(xv).double(), torch.from_numpy(yv).reshape(-1),
                torch.from_numpy(xt).double(), torch.from_numpy(yt).reshape(-1), split)
    d = np.load(ROOT / path)
    x = torch.log(torch.from_numpy(d["predictions"]).double().clamp_min(1e-300))
    y = torch.from_numpy(d["ground_truth"]).long()
    return x[:5000], y[:5000], x[5000:], y[5000:], "fit on rows 0-4999, score on rows 5000-9999"


def _speed_runs(command: str) -> int:
    """The --speed-runs of a recorded command (3, the default, when it names none)."""
    m = re.search(r"--speed-runs[ =](\d+)", command)
    return int(m.group(1)) if m else 3


def version(mod):
    try:
        return importlib.import_module(mod).__version__
    except Exception:  # noqa: BLE001
        return None


def scores(logp, y):
    r = metrics.calibration_report(logp, y, 15)
    return {"nll": r.nll, "ece": r.ece, "classwise_ece": r.classwise_ece, "brier": r.brier,
            "accuracy": r.accuracy}


def nll_of_probs(p, y):
    p = np.asarray(p, dtype=np.float64)
    return float(-np.log(np.maximum(p[np.arange(len(y)), y.numpy()], 1e-300)).mean())


# ---------------------------------------------------------------------- peers
def peer_fits(c):
    """name -> (calibrator it implements, fit(xv, yv) -> predict(x) -> probabilities)."""
    out = {}
    if version("netcal"):
        from netcal.binning import HistogramBinning, IsotonicRegression
        from netcal.scaling import LogisticCalibration, TemperatureScaling

        def nc(cls, **kw):
            def fit(xv, yv):
                m = cls(**kw)
                m.fit(torch.softmax(xv, 1).numpy(), yv.numpy())
                return lambda x: m.transform(torch.softmax(x, 1).numpy())
            return fit

        out["netcal TemperatureScaling"] = ("ts", nc(TemperatureScaling))
        out["netcal LogisticCalibration"] = ("vector", nc(LogisticCalibration))
        out["netcal HistogramBinning"] = ("histogram", nc(HistogramBinning))
        out["netcal IsotonicRegression"] = ("isotonic", nc(IsotonicRegression))
    if version("sklearn"):
        from sklearn.isotonic import IsotonicRegression as SkIso
        from sklearn.linear_model import LogisticRegression

        def sk_lr(feature):
            def fit(xv, yv):
                f = (lambda x: torch.log_softmax(x, 1).clamp_min(np.log(np.finfo(float).eps)).numpy()) \
                    if feature == "logprobs" else (lambda x: x.numpy())
                m = LogisticRegression(C=1e6, max_iter=10000, tol=1e-10).fit(f(xv), yv.numpy())
                return lambda x: m.predict_proba(f(x))
            return fit

        def sk_iso(xv, yv):
            p = torch.softmax(xv, 1).numpy()
            ms = [SkIso(out_of_bounds="clip").fit(p[:, k], (yv.numpy() == k).astype(float))
                  for k in range(p.shape[1])]

            def predict(x):
                q = torch.softmax(x, 1).numpy()
                r = np.stack([m.predict(q[:, k]) for k, m in enumerate(ms)], 1)
                r = np.maximum(r, 1e-6)
                return r / r.sum(1, keepdims=True)
            return predict

        out["sklearn LogisticRegression (logits, C=1e6)"] = ("matrix", sk_lr("logits"))
        out["sklearn LogisticRegression (log-probs, C=1e6)"] = ("dirichlet", sk_lr("logprobs"))
        out["sklearn IsotonicRegression (one-vs-rest)"] = ("isotonic", sk_iso)

        def sk_iso_shared(xv, yv):
            p = torch.softmax(xv, 1).numpy()
            m = SkIso(out_of_bounds="clip").fit(p.ravel(), np.eye(p.shape[1])[yv.numpy()].ravel())

            def predict(x):
                q = torch.softmax(x, 1).numpy()
                r = np.maximum(m.predict(q.ravel()).reshape(q.shape) + 1e-9 * q, 1e-6)
                return r / r.sum(1, keepdims=True)
            return predict

        out["sklearn IsotonicRegression (shared map)"] = ("isotonic", sk_iso_shared)
    if version("dirichletcal"):  # pragma: no cover (not installable on Python 3.11)
        from dirichletcal import DirichletCalibrator as DC

        def dc(xv, yv):
            m = DC(matrix_type="full", l2=0.0).fit(torch.softmax(xv, 1).numpy(), yv.numpy())
            return lambda x: m.predict_proba(torch.softmax(x, 1).numpy())

        out["dirichletcal DirichletCalibrator (full, l2=0)"] = ("dirichlet", dc)
    return out


def table(args):
    rows = []
    for i, (fname, path) in enumerate(FILES):
        if args.files is not None and i not in args.files:
            continue
        xv, yv, xt, yt, split = load(path)
        c = xv.shape[1]
        rows.append({"file": fname, "split": split, "library": "-", "method": "uncalibrated",
                     "fit_s": 0.0, "hyperparameters": "", **scores(xt, yt)})
        methods = METHODS if not args.quick else ("ts", "vector", "ets", "histogram", "isotonic")
        for m in methods:
            if args.quick and c > 10 and m in ("matrix", "dirichlet"):
                continue
            cal = make_calibrator(m)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                res = cal.fit(xv, yv, progress=False)
                dt = time.perf_counter() - t0
            with torch.no_grad():
                z = cal(xt)
            hp = res.to_dict().get("hyperparameters") or {"temperature": getattr(res, "temperature", None)}
            rows.append({"file": fname, "split": split, "library": f"softcal {softcal.__version__}",
                         "method": m, "fit_s": dt, "hyperparameters": json.dumps(hp), **scores(z, yt)})
            print(f"{fname:32s} softcal {m:16s} {dt:8.3f} s  NLL {rows[-1]['nll']:.4f}", flush=True)
        for name, (m, fit) in peer_fits(c).items():
            if c > 10 and args.skip_slow_peers and name.startswith(("sklearn LogisticRegression",
                                                                      "netcal LogisticCalibration")):
                continue  # minutes each at C = 100 under load: timed in the speed part instead
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t0 = time.perf_counter()
                    predict = fit(xv, yv)
                    dt = time.perf_counter() - t0
                    p = np.asarray(predict(xt), dtype=np.float64)
                logp = torch.log(torch.from_numpy(p).clamp_min(1e-300))
                rows.append({"file": fname, "split": split, "library": name, "method": m,
                             "fit_s": dt, "hyperparameters": "", **scores(logp, yt)})
                print(f"{fname:32s} {name:45s} {dt:8.3f} s  NLL {rows[-1]['nll']:.4f}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{fname}: {name} failed: {type(e).__name__}: {e}", flush=True)
    return rows


CREG = 0.01  # scikit-learn's C for the matrix / Dirichlet speed comparison (C = 1 is nearly
# unregularised at N = 5000, C = 100: both solvers then creep towards a near-separable optimum)


def _l2_fit(feature, xv, yv, creg):
    """softcal's Newton solver on scikit-learn's objective: mean NLL + ||W||^2 / (2 creg N)
    (matrix scaling on the logits, or on the clamped log-probabilities: Dirichlet)."""
    from softcal.calibrators._base import Rows
    from softcal.calibrators._newton import MatrixModel, Problem, VectorModel, newton

    c = xv.shape[1]
    rows = Rows("bench", xv, yv, None, False, None)
    t = softcal.nn.TemperatureScaler().fit(xv, yv, progress=False).temperature
    v = VectorModel(c, feature, 0.0, 0.0)
    vr = newton(Problem(v, rows), v.identity(t), 1e-8, 100)
    m = MatrixModel(c, feature, l2=1.0 / (2 * creg * xv.shape[0]))
    theta = torch.zeros(c, c + 1, dtype=torch.float64)
    theta[:, :-1] = torch.diag(vr.theta[:c])
    theta[:, -1] = vr.theta[c:]
    return newton(Problem(m, rows), theta.reshape(-1), 1e-9, 100)


def _l2_objective(feature, xv, yv, w, b, creg):
    from softcal.calibrators._newton import features

    z = features(feature, xv) @ torch.as_tensor(w, dtype=torch.float64).T + torch.as_tensor(b, dtype=torch.float64)
    nll = float(torch.nn.functional.cross_entropy(z, yv))
    return nll + float((torch.as_tensor(w) ** 2).sum()) / (2 * creg * xv.shape[0])


def speed(args):
    """C = 100 (the CIFAR-100 file, first 5000 rows): each fit's time and its objective beside
    the peers' fits of the same calibrator (mean NLL on the fit rows; matrix and Dirichlet:
    scikit-learn's objective, mean NLL + ||W||^2 / (2 C N) with C = CREG)."""
    xv, yv, _, _, _ = load(FILES[3][1])
    out = []
    want = None if args.speed_cases is None else set(args.speed_cases.split(","))

    def best_of(fn, runs=args.speed_runs):
        """(the least CPU time of this process over up to ``runs`` runs: 1 when a run takes
        over 5 s, the least wall time, the last result). CPU time: on a loaded machine the wall
        time mostly measures the other jobs."""
        times, walls = [], []
        while True:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0, c0 = time.perf_counter(), time.process_time()
                r = fn()
                times.append(time.process_time() - c0)
                walls.append(time.perf_counter() - t0)
            if len(times) == runs or times[-1] > 5:
                return min(times), min(walls), r

    def ours(m, **kw):
        from softcal.calibrators import CALIBRATORS

        def fit():
            cal = softcal.nn.TemperatureScaler() if m == "ts" else CALIBRATORS[m](**kw)
            cal.fit(xv, yv, progress=False)
            return cal
        dt, wall, cal = best_of(fit)
        with torch.no_grad():
            obj = metrics.nll(cal(xv), yv)
        return dt, wall, obj

    peers = peer_fits(100)
    cases = [("ts", {}, "netcal TemperatureScaling"),
             ("vector", {}, "netcal LogisticCalibration"),
             ("histogram", dict(n_bins=15), "netcal HistogramBinning"),
             ("isotonic", {}, "netcal IsotonicRegression"),
             ("isotonic", {}, "sklearn IsotonicRegression (one-vs-rest)"),
             ("isotonic", dict(mode="shared"), "sklearn IsotonicRegression (shared map)")]
    for m, kw, peer in cases:
        case = m + ("-shared" if kw.get("mode") == "shared" else "")
        if want is not None and case not in want:
            continue
        dt, wall, obj = ours(m, **kw)
        row = {"calibrator": m, "options": json.dumps(kw), "softcal_s": dt, "softcal_nll": obj,
               "peer": peer, "peer_s": None, "peer_nll": None, "speedup": None,
               "softcal_wall_s": wall, "peer_wall_s": None}
        if peer in peers:
            row["peer_s"], row["peer_wall_s"], predict = best_of(lambda: peers[peer][1](xv, yv))
            row["peer_nll"] = nll_of_probs(predict(xv), yv)
            row["speedup"] = row["peer_s"] / dt
        out.append(row)
        print(f"speed C=100 {m:10s} softcal {dt:8.4f} s CPU ({wall:.4f} s wall) NLL {obj:.6f} | {peer}: "
              f"{row['peer_s'] if row['peer_s'] is None else round(row['peer_s'], 4)} s CPU "
              f"({row['peer_wall_s'] if row['peer_wall_s'] is None else round(row['peer_wall_s'], 4)} s wall) "
              f"NLL {row['peer_nll']}", flush=True)
    if version("sklearn"):
        from sklearn.linear_model import LogisticRegression

        for m, feature in (("matrix", "logits"), ("dirichlet", "logprobs")):
            from softcal.calibrators._newton import features

            if want is not None and {"matrix": "matrix", "dirichlet": "dirichlet-sklearn"}[m] not in want:
                continue

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                res = _l2_fit(feature, xv, yv, CREG)
                dt = time.perf_counter() - t0
                th = res.theta.view(100, 101)
                mine = _l2_objective(feature, xv, yv, th[:, :-1], th[:, -1], CREG)
                f = features(feature, xv).numpy()
                t0 = time.perf_counter()
                lr = LogisticRegression(C=CREG, max_iter=100000, tol=1e-8).fit(f, yv.numpy())
                pt = time.perf_counter() - t0
            theirs = _l2_objective(feature, xv, yv, lr.coef_, lr.intercept_, CREG)
            out.append({"calibrator": m, "options": f"scikit-learn's L2 objective, C = {CREG}",
                        "softcal_s": dt, "softcal_nll": mine,
                        "peer": "sklearn LogisticRegression (lbfgs, tol 1e-8)", "peer_s": pt,
                        "peer_nll": theirs, "speedup": pt / dt})
            print(f"speed C=100 {m:10s} softcal {dt:8.3f} s obj {mine:.8f} | sklearn {pt:.3f} s obj {theirs:.8f}", flush=True)

    if args.dirichletcal_python and (want is None or "dirichletcal" in want):
        out.append(_dirichletcal_row(args.dirichletcal_python, xv, yv))
    for m in ("matrix", "vector"):
        if args.dirichletcal_python and (want is None or f"dirichletcal-{m}" in want):
            out.append(_dirichletcal_row(args.dirichletcal_python, xv, yv, m))
    return out


DC_LAM, DC_MU = 1e3, 1e-2  # ODIR values of the dirichletcal comparison (softcal's scale)


def one_thread_env():
    """The environment of a dirichletcal child: one thread for jax/XLA and BLAS, as torch has, so that
    the times compared are CPU times of one thread each."""
    return dict(os.environ, XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
                OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _dirichletcal_row(python, xv, yv, method="dirichlet"):
    """DirichletCalibrator (method "dirichlet") or MatrixScaler ("matrix") with ODIR (lam, mu),
    or VectorScaler ("vector", unregularised), against dirichletcal's fit of the same objective:
    FullDirichletCalibrator on softcal's features exponentiated (p clamped at eps, so its
    log(clip(p)) is softcal's clamped log p), its full MultinomialRegression on the logits
    (MatrixScaling's regression; ref_row=False in both), or VectorScaling on the logits; its
    reg_lambda = lam / (C (C - 1)), reg_mu = mu / C; both solutions are scored by softcal's
    objective (mean NLL + ODIR; vector: the mean NLL of its probabilities)."""
    import subprocess
    import tempfile

    from softcal.calibrators import DirichletCalibrator, MatrixScaler, VectorScaler
    from softcal.calibrators._newton import features

    c = xv.shape[1]
    phi = features("logprobs" if method == "dirichlet" else "logits", xv)
    lam, mu = (DC_LAM, DC_MU) if method != "vector" else (0.0, 0.0)

    def objective(w, b):
        z = phi @ w.T + b
        off = w - torch.diag(torch.diagonal(w))
        return (float(torch.nn.functional.cross_entropy(z, yv)) + lam / (c * (c - 1)) * float((off ** 2).sum())
                + mu / c * float((b ** 2).sum()))

    cal = (VectorScaler() if method == "vector" else
           (DirichletCalibrator if method == "dirichlet" else MatrixScaler)(lam=DC_LAM, mu=DC_MU))
    t0, c0 = time.perf_counter(), time.process_time()
    cal.fit(xv, yv, progress=False)
    wall, dt = time.perf_counter() - t0, time.process_time() - c0
    with torch.no_grad():
        mine = (metrics.nll(cal(xv), yv) if method == "vector" else objective(cal.weight, cal.bias))
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(src, X=(phi.exp() if method == "dirichlet" else phi).numpy(), y=yv.numpy(),
                 reg_lambda=lam / (c * (c - 1)), reg_mu=mu / c)
        subprocess.run([python, str(ROOT / "benchmarks" / "_dirichletcal_fit.py"), src, dst, method],
                       check=True, stdout=subprocess.DEVNULL, env=one_thread_env())
        d = np.load(dst)
        wt = torch.from_numpy(d["weights"])
        proba = torch.from_numpy(d["proba"])
        pwall, pt, ver = float(d["fit_s"]), float(d["cpu_s"]), str(d["version"])
    theirs = nll_of_probs(proba, yv) if method == "vector" else objective(wt[:, :-1], wt[:, -1])
    print(f"speed C=100 {method:10s} softcal {dt:8.3f} s CPU ({wall:.3f} s wall) obj {mine:.8f} | dirichletcal {ver} "
          f"{pt:.3f} s CPU ({pwall:.3f} s wall) obj {theirs:.8f}", flush=True)
    peer = {"dirichlet": "FullDirichletCalibrator (L-BFGS)", "matrix": "MultinomialRegression (full, L-BFGS)",
            "vector": "VectorScaling"}[method]
    opts = (f"lam = {DC_LAM:g}, mu = {DC_MU:g} (ODIR, softcal's scale)" if method != "vector"
            else "unregularised")
    return {"calibrator": method, "options": opts + "; CPU times, one thread each",
            "softcal_s": dt, "softcal_nll": mine, "peer": f"dirichletcal {ver} {peer}",
            "peer_s": pt, "peer_nll": theirs, "speedup": pt / dt}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--quick", action="store_true", help="only ts, vector, ets, histogram, isotonic")
    p.add_argument("--files", type=lambda v: [int(i) for i in v.split(",")], default=None,
                   help="indices of FILES to run (default: all)")
    p.add_argument("--csv", default="calibrators.csv", help="table CSV name (default: %(default)s)")
    p.add_argument("--merge", nargs="*", default=None, metavar="CSV",
                   help="concatenate these table CSVs (in --out) into calibrators.csv, rebuild the Markdown, exit")
    p.add_argument("--skip-slow-peers", action="store_true",
                   help="at C = 100 leave out scikit-learn's LogisticRegression and netcal's "
                        "LogisticCalibration (the speed part times them)")
    p.add_argument("--dirichletcal-python", default=None, metavar="PY",
                   help="a Python with dirichletcal (>= 3.12) for the Dirichlet speed row "
                        "(benchmarks/_dirichletcal_fit.py runs in it)")
    p.add_argument("--speed-cases", default=None, metavar="A,B",
                   help="only these speed cases (ts, vector, histogram, isotonic, isotonic-shared, "
                        "matrix, dirichlet-sklearn, dirichletcal, dirichletcal-matrix, dirichletcal-vector)")
    p.add_argument("--keep-other-rows", action="store_true",
                   help="with --speed-cases: keep the rows of the other cases from the existing "
                        "calibrators_speed.csv (their command noted in its head)")
    p.add_argument("--speed-runs", type=int, default=3, metavar="K",
                   help="time each speed case K times and keep the least (default 3)")
    p.add_argument("--load-note", default=None, metavar="TEXT",
                   help="a note on the machine's load (e.g. the load average) for the results head")
    p.add_argument("--part", choices=("table", "speed", "both"), default="both",
                   help="the results table, the C = 100 speed comparison, or both; the Markdown "
                        "file is rebuilt from the CSV files present")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    head = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "threads": args.threads,
        "versions": {k: version(k) for k in ("softcal", "torch", "numpy", "sklearn", "netcal", "dirichletcal")},
        "python": platform.python_version(),
        "load": (f"load average {os.getloadavg()[0]:.1f} at the start"
                 + (f"; {args.load_note}" if args.load_note else "")),
    }
    if args.merge is not None:
        heads, rows = [], []
        for name in args.merge:
            h, r = _read_csv(out / name)
            heads.append(h)
            rows += r
        h = dict(heads[0])
        h["command"] = " ; ".join(x["command"] for x in heads)
        h["versions"] = {k: next((x["versions"][k] for x in heads if x["versions"].get(k)), None)
                         for x0 in heads for k in x0["versions"]}  # each library's version where one head has it
        order = {f: i for i, (f, _) in enumerate(FILES)}
        rows.sort(key=lambda r: order.get(r["file"], len(order)))  # stable: each file's rows together
        write_table(out, h, rows, name="calibrators.csv")
        markdown(out)
        return
    if args.part in ("table", "both"):
        write_table(out, head, table(args), name=args.csv)
    if args.part in ("speed", "both"):
        sp = speed(args)
        path = out / "calibrators_speed.csv"
        if args.keep_other_rows and path.exists() and args.speed_cases:
            old_head, old_rows = _read_csv(path)
            redone = set(args.speed_cases.split(","))
            kept = [r for r in old_rows if _case_of(r) not in redone]
            if kept:
                sp = sp + kept
                head["command"] += (f" ; rows {sorted({_case_of(r) for r in kept})} kept from the earlier run "
                                    f"({old_head['date']}): {old_head['command']}")
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([f"# {json.dumps(head)}"])
            ks = list(dict.fromkeys(k for r in sp for k in r))
            w.writerow(ks)
            for r in sp:
                w.writerow([r.get(k) for k in ks])
    markdown(out)


KEYS = ["file", "split", "library", "method", "nll", "ece", "classwise_ece", "brier", "accuracy",
        "fit_s", "hyperparameters"]


def write_table(out, head, rows, name="calibrators.csv"):
    with open(out / name, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"# {json.dumps(head)}"])
        w.writerow(KEYS)
        for r in rows:
            w.writerow([r[k] for k in KEYS])


def _case_of(row):
    """The --speed-cases name of a speed row."""
    m, opts, peer = row["calibrator"], row["options"], row["peer"]
    if m == "isotonic" and "shared" in opts:
        return "isotonic-shared"
    if m == "dirichlet":
        return "dirichletcal" if peer.startswith("dirichletcal") else "dirichlet-sklearn"
    if m in ("matrix", "vector") and peer.startswith("dirichletcal"):
        return f"dirichletcal-{m}"
    return m


def _read_csv(path):
    lines = path.read_text().splitlines()
    head = json.loads(next(csv.reader([lines[0]]))[0][2:])
    return head, list(csv.DictReader(lines[1:]))


def markdown(out):
    """calibrators.md from calibrators.csv and calibrators_speed.csv (whichever exist)."""
    lines = ["# Calibrators on the logit files of tests/data", "",
             "Written by `benchmarks/bench_calibrators.py` (the command, date, machine and versions "
             "of each part below). Measured on a shared 2-core machine under load (other jobs "
             "running, load average about 18): the times are upper bounds; torch uses 1 thread. "
             "Metrics on the scoring rows; ECE and classwise ECE with 15 equal-width bins. The "
             "dirichletcal rows (benchmarks/bench_dirichletcal.py: its own Python 3.12 venv, softcal's "
             "CV-chosen ODIR weights on its scale) give the CPU time of one thread.", ""]
    if (out / "calibrators.csv").exists():
        head, rows = _read_csv(out / "calibrators.csv")
        lines += [f"Command: `{head['command']}`; {head['date']}; {head['machine']}; versions "
                  f"{json.dumps(head['versions'])}, Python {head['python']}.", "",
                  "| file | library | method | NLL | ECE | cw-ECE | Brier | accuracy | fit (s) | hyper-parameters |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        last = None
        for r in rows:
            if r["file"] != last:
                lines.append(f"| **{r['file']}** ({r['split']}) | | | | | | | | | |")
                last = r["file"]
            lines.append(f"| | {r['library']} | {r['method']} | {float(r['nll']):.4f} | "
                         f"{100 * float(r['ece']):.2f}% | {100 * float(r['classwise_ece']):.2f}% | "
                         f"{float(r['brier']):.4f} | {100 * float(r['accuracy']):.2f}% | "
                         f"{float(r['fit_s']):.3f} | {r['hyperparameters'].replace('|', '/')} |")
    speed_files = sorted(out.glob("calibrators_speed*.csv"), key=lambda f: (f.name != "calibrators_speed.csv", f.name))
    for i, f in enumerate(speed_files):
        head, sp = _read_csv(f)
        lines += ["", "## Fit speed at C = 100 (densenet-bc-100_c100, rows 0-4999)" + ("" if i == 0 else f" ({f.name})"), "",
                  f"Command: `{head['command']}`; {head['date']}; {head['machine']}; versions "
                  f"{json.dumps(head['versions'])}" + (f"; {head['load']}" if head.get("load") else "")
                  + ". Times: " + ("one run each" if "previous" in f.name or "dirichletcal" in f.name else
                                   f"the least of up to {_speed_runs(head['command'])} runs (1 run "
                                   "where a fit takes over 5 s)")
                  + (", CPU time of the process with one torch thread (wall times in the CSV)"
                     if sp and "softcal_wall_s" in sp[0] else
                     ", CPU time of one thread each" if sp and "CPU times" in sp[0].get("options", "")
                     else ", wall time") + ". "
                  f"Objective: the mean NLL on the fit rows (matrix "
                  f"and Dirichlet against scikit-learn: its objective, mean NLL + ||W||^2 / (2 C N), C = {CREG}; "
                  "Dirichlet against dirichletcal: mean NLL + ODIR with the lam, mu given; each evaluated by the "
                  "same code on each fit's parameters).", "",
                  "| calibrator | options | softcal (s) | softcal objective | peer | peer (s) | peer objective | peer time / softcal time |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sp:
            has = r["peer_s"] not in ("", "None")
            ps = f"{float(r['peer_s']):.3f}" if has else "-"
            pn = f"{float(r['peer_nll']):.8f}" if has else "-"
            su = f"{float(r['speedup']):.1f}x" if has else "-"
            kept = "softcal_wall_s" in r and r["softcal_wall_s"] in ("", "None")  # a wall-time row kept
            opts = r["options"] + (" (wall times: a row kept from the earlier run)" if kept else "")
            lines.append(f"| {r['calibrator']} | {opts} | {float(r['softcal_s']):.3f} | "
                         f"{float(r['softcal_nll']):.8f} | {r['peer'] if has else r['peer'] + ' (not installed)'} | "
                         f"{ps} | {pn} | {su} |")
    (out / "calibrators.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
