"""Child of bench_dirichletcal.py: dirichletcal's own calibrators fitted in a Python that has
dirichletcal (0.5.x needs Python >= 3.12; softcal's environment is 3.11). Reads IN.npz (zf, yf:
the fit rows' logits and labels; pf: the fit rows' probabilities for the Dirichlet map; zs, ps:
the scoring rows'; lam_ms, mu_ms, lam_dir, mu_dir: dirichletcal's ODIR weights, already on its
scale), fits TemperatureScaling, VectorScaling (logit input), the full multinomial regression of
MatrixScaling (logits) and
FullDirichletCalibrator (probabilities), each with its defaults but the ODIR weights given and ref_row=False for the two full maps (its
default, ref_row=True, subtracts the last row of W before the penalty: another objective), and
writes OUT.npz: for each method its scoring-row probabilities (p_<method>) and CPU time of the
fit (cpu_<method>, one thread), and the version.

    PY benchmarks/_dirichletcal_table.py IN.npz OUT.npz [METHOD ...]
"""

import sys
import time

import numpy as np


def main(src: str, dst: str, methods: list[str]) -> None:
    import dirichletcal
    from dirichletcal.calib.fulldirichlet import FullDirichletCalibrator
    from dirichletcal.calib.multinomial import MultinomialRegression
    from dirichletcal.calib.tempscaling import TemperatureScaling
    from dirichletcal.calib.vectorscaling import VectorScaling

    d = np.load(src)
    make = {
        "ts": lambda: (TemperatureScaling(logit_input=True), "z"),
        "vector": lambda: (VectorScaling(logit_input=True), "z"),
        # MatrixScaling(logit_input=True) is this regression with ref_row=True and no way to change it
        "matrix": lambda: (MultinomialRegression(method="Full", reg_lambda=float(d["lam_ms"]),
                                                 reg_mu=float(d["mu_ms"]), ref_row=False), "z"),
        "dirichlet": lambda: (FullDirichletCalibrator(reg_lambda=float(d["lam_dir"]), reg_mu=float(d["mu_dir"]),
                                                      ref_row=False), "p"),
    }
    out = {"version": getattr(dirichletcal, "__version__", "?")}
    for m in methods or list(make):
        cal, feat = make[m]()
        c0 = time.process_time()
        cal.fit(d[feat + "f"], d["yf"])
        out[f"cpu_{m}"] = time.process_time() - c0
        out[f"p_{m}"] = np.asarray(cal.predict_proba(d[feat + "s"]), dtype=np.float64)
        print(f"{m}: {out[f'cpu_{m}']:.3f} s CPU", flush=True)
    np.savez(dst, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
