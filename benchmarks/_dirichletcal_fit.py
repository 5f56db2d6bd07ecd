"""Child of bench_calibrators.py --dirichletcal-python PY: dirichletcal's full Dirichlet
calibrator fitted in a Python that has dirichletcal (0.5.x needs Python >= 3.12, softcal's
environment is 3.11). Reads IN.npz (X: probabilities (N, C), y, reg_lambda, reg_mu), fits
FullDirichletCalibrator(reg_lambda, reg_mu, ref_row=False) (its objective: mean NLL +
reg_lambda sum_{i != j} W_ij^2 + reg_mu sum_j b_j^2; C > 36: L-BFGS with jax gradients),
writes OUT.npz (weights (C, C + 1), fit_s (wall), cpu_s (process CPU time), version).

    PY benchmarks/_dirichletcal_fit.py IN.npz OUT.npz
"""

import sys
import time

import numpy as np


def main(src: str, dst: str) -> None:
    import dirichletcal
    from dirichletcal.calib.fulldirichlet import FullDirichletCalibrator

    d = np.load(src)
    cal = FullDirichletCalibrator(reg_lambda=float(d["reg_lambda"]), reg_mu=float(d["reg_mu"]),
                                  ref_row=False)
    t0, c0 = time.perf_counter(), time.process_time()
    cal.fit(d["X"], d["y"])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    np.savez(dst, weights=np.asarray(cal.weights, dtype=np.float64), fit_s=dt, cpu_s=cpu,
             version=getattr(dirichletcal, "__version__", "?"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
