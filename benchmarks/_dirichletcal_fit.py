"""Child of bench_calibrators.py --dirichletcal-python PY: dirichletcal's full Dirichlet
calibrator, or its full multinomial regression on logits (MatrixScaling's), fitted in a Python
that has dirichletcal (0.5.x needs Python >= 3.12, softcal's environment is 3.11). Reads IN.npz
(X: probabilities (N, C) for "dirichlet", logits for "matrix" and "vector"; y, reg_lambda,
reg_mu), fits FullDirichletCalibrator(reg_lambda, reg_mu, ref_row=False), MultinomialRegression(
"Full", reg_lambda, reg_mu, ref_row=False) (the objective: mean NLL + reg_lambda sum_{i != j}
W_ij^2 + reg_mu sum_j b_j^2; C > 36: L-BFGS with jax gradients) or VectorScaling(logit_input=
True) (mean NLL), writes OUT.npz (weights (C, C + 1) of the two full maps, proba: its
probabilities of the fit rows, fit_s (wall), cpu_s (process CPU time), version).

    PY benchmarks/_dirichletcal_fit.py IN.npz OUT.npz [dirichlet | matrix | vector]
"""

import sys
import time

import numpy as np


def main(src: str, dst: str, method: str = "dirichlet") -> None:
    import dirichletcal
    from dirichletcal.calib.fulldirichlet import FullDirichletCalibrator
    from dirichletcal.calib.multinomial import MultinomialRegression
    from dirichletcal.calib.vectorscaling import VectorScaling

    d = np.load(src)
    lam, mu = float(d["reg_lambda"]), float(d["reg_mu"])
    if method == "dirichlet":
        cal = FullDirichletCalibrator(reg_lambda=lam, reg_mu=mu, ref_row=False)
    elif method == "matrix":
        cal = MultinomialRegression(method="Full", reg_lambda=lam, reg_mu=mu, ref_row=False)
    elif method == "vector":
        cal = VectorScaling(logit_input=True)
    else:
        raise SystemExit(f"_dirichletcal_fit.py: method must be dirichlet, matrix or vector, got {method!r}")
    t0, c0 = time.perf_counter(), time.process_time()
    cal.fit(d["X"], d["y"])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    weights = {"dirichlet": lambda: cal.weights, "matrix": lambda: cal.weights_}.get(method, lambda: np.zeros(0))()
    np.savez(dst, weights=np.asarray(weights, dtype=np.float64), fit_s=dt, cpu_s=cpu,
             proba=np.asarray(cal.predict_proba(d["X"]), dtype=np.float64),
             version=getattr(dirichletcal, "__version__", "?"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
