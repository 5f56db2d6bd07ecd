"""dirichletcal's own fits of the calibrators it shares with softcal (temperature, vector and
matrix scaling on the logits, the full Dirichlet map with ODIR on the probabilities) on every logit
file of tests/data, scored by softcal.metrics as benchmarks/bench_calibrators.py scores softcal's;
writes benchmarks/results/calibrators_dirichletcal.csv (the table's columns), which
`bench_calibrators.py --merge` puts into calibrators.md beside the other libraries.

    python benchmarks/bench_dirichletcal.py --python build/dc-venv/bin/python [--files 0,1,2]

dirichletcal 0.5.x needs Python >= 3.12, so it runs in its own interpreter (--python), e.g.
`python3.12 -m venv build/dc-venv && build/dc-venv/bin/pip install dirichletcal`; it fits in
benchmarks/_dirichletcal_table.py with jax/XLA on one thread. Splits and scores are
bench_calibrators.py's. The ODIR weights are the ones softcal's 5-fold CV chose on the same file
(read from calibrators.csv), with ref_row=False (softcal's parametrisation), converted to
dirichletcal's scale: its objective is mean NLL +
reg_lambda sum_{i != j} W_ij^2 + reg_mu sum_j b_j^2, softcal's mean NLL + lam / (C (C - 1)) sum_{i
!= j} W_ij^2 + mu / C sum_j b_j^2, so reg_lambda = lam / (C (C - 1)) and reg_mu = mu / C. Fit
times are CPU times of one thread (the softcal rows of the table are wall times).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_calibrators as BC  # noqa: E402

from softcal.calibrators._newton import features  # noqa: E402


def chosen(out: Path, fname: str, method: str) -> dict:
    """softcal's hyper-parameters for METHOD on FNAME, from calibrators.csv."""
    _, rows = BC._read_csv(out / "calibrators.csv")
    for r in rows:
        if r["file"] == fname and r["library"].startswith("softcal") and r["method"] == method:
            return json.loads(r["hyperparameters"])
    raise SystemExit(f"no softcal {method} row for {fname} in {out / 'calibrators.csv'}: run bench_calibrators first")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python", required=True, help="a Python with dirichletcal installed")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--files", type=lambda v: [int(i) for i in v.split(",")], default=None)
    p.add_argument("--methods", default="ts,vector,matrix,dirichlet")
    args = p.parse_args(argv)
    out = Path(args.out)
    rows, ver = [], None
    for i, (fname, path) in enumerate(BC.FILES):
        if args.files is not None and i not in args.files:
            continue
        xv, yv, xt, yt, split = BC.load(path)
        c = xv.shape[1]
        ms, di = chosen(out, fname, "matrix"), chosen(out, fname, "dirichlet")
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
            np.savez(src, zf=xv.numpy(), yf=yv.numpy(), zs=xt.numpy(),
                     pf=features("logprobs", xv).exp().numpy(), ps=features("logprobs", xt).exp().numpy(),
                     lam_ms=ms["lam"] / (c * (c - 1)), mu_ms=ms["mu"] / c,
                     lam_dir=di["lam"] / (c * (c - 1)), mu_dir=di["mu"] / c)
            subprocess.run([args.python, str(ROOT / "benchmarks" / "_dirichletcal_table.py"), src, dst,
                            *args.methods.split(",")], check=True, env=BC.one_thread_env())
            d = np.load(dst)
            ver = str(d["version"])
            for m in args.methods.split(","):
                prob = torch.from_numpy(d[f"p_{m}"])
                logp = torch.log(prob.clamp_min(1e-300))
                hp = {"ts": {}, "vector": {}, "matrix": {"lam": ms["lam"], "mu": ms["mu"]},
                      "dirichlet": {"lam": di["lam"], "mu": di["mu"]}}[m]
                rows.append({"file": fname, "split": split, "library": f"dirichletcal {ver}", "method": m,
                             "fit_s": float(d[f"cpu_{m}"]), "hyperparameters": json.dumps(hp) if hp else "",
                             **BC.scores(logp, yt)})
                print(f"{fname:32s} dirichletcal {m:10s} {rows[-1]['fit_s']:8.3f} s CPU  NLL {rows[-1]['nll']:.4f}",
                      flush=True)
    head = {"command": "python benchmarks/bench_dirichletcal.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}", "threads": 1,
            "versions": {"softcal": BC.version("softcal"), "torch": torch.__version__, "numpy": np.__version__,
                         "dirichletcal": f"{ver} (its own Python 3.12 venv)"},
            "python": platform.python_version()}
    BC.write_table(out, head, rows, name="calibrators_dirichletcal.csv")


if __name__ == "__main__":
    main()
