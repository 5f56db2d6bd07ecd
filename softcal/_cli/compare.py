"""``softcal compare``: every calibration method fitted on VAL, one table, the diagrams.

The outputs (reliability_diagrams.png, compare.csv, report.json in --out DIR) are checked
against the inputs before anything is read and each is written whole
(:mod:`softcal._cli.common`).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

from . import common as C
from .calibrate import METHODS, check_out_dir, read_fit_data
from .calibrators import calibrated, diagrams, fit_calibrator

__all__ = ["add_parser", "run", "TABLE_KEYS"]

#: the columns of compare.csv (then the hyper-parameters as JSON)
TABLE_KEYS = ["method", "nll", "ece", "classwise_ece", "brier", "accuracy", "fit_time_s"]


def add_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser(
        "compare", help="fit every calibration method on VAL, print one table, write the diagrams",
        description="Fit every calibration method (" + ", ".join(METHODS) + ") on VAL with its "
                    "default options and print one table of NLL, ECE, classwise ECE, Brier, "
                    "accuracy and fit time on TEST (or VAL's test split, or VAL itself); write "
                    "reliability_diagrams.png, compare.csv and report.json into --out DIR. With "
                    "no VAL: the embedded DenseNet-40 / CIFAR-10 logits.",
        epilog=f"{C.FORMATS_LINE}\n{C.EXIT_CODES}.", formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("val", nargs="?", default=None, metavar="VAL",
                   help="file with validation (scores, labels); default: the embedded logits")
    c.add_argument("--test", default=None, metavar="TEST", help="file with test (scores, labels)")
    c.add_argument("--methods", default=",".join(METHODS), metavar="A,B,...",
                   help="comma-separated subset of the methods (default: all)")
    c.add_argument("--out", default="softcal-out", metavar="DIR",
                   help="directory for reliability_diagrams.png, compare.csv and report.json "
                        "(default: %(default)s)")
    c.add_argument("--bins", type=int, default=15,
                   help=f"equal-width bins for the ECEs, 1 to {C.MAX_BINS} (default: 15)")
    c.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    C.add_input_options(c)
    return c


def _methods(text: str) -> List[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise C.CLIError(f"--methods: unknown method(s) {', '.join(bad) or '(none given)'}; choose "
                         f"from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise C.CLIError(f"--methods: a method is named twice in {text!r}")
    return methods


def run(args: argparse.Namespace) -> int:
    from .. import backend, metrics

    C.check_bins(args.bins)
    methods = _methods(args.methods)
    out = Path(args.out)
    check_out_dir(out)
    png, js, cs = out / "reliability_diagrams.png", out / "report.json", out / "compare.csv"
    d = read_fit_data(args, "compare", [("--out", png), ("--out", cs), ("--out", js)],
                      "the calibrators")
    xt, yt = d.xt, d.yt

    def row(method: str, z: torch.Tensor, fit_s: float, extra: Dict[str, Any]) -> Dict[str, Any]:
        try:
            r = metrics.calibration_report(z, yt, args.bins)
        except (ValueError, TypeError) as e:
            raise C.CLIError(f"{method}: {e}") from None
        return {"method": method, "nll": r.nll, "ece": r.ece, "classwise_ece": r.classwise_ece,
                "brier": r.brier, "accuracy": r.accuracy, "fit_time_s": fit_s, **extra}

    rows = [row("uncalibrated", xt, 0.0, {"hyperparameters": {}, "warnings": []})]
    panels = [("uncalibrated", xt)]
    for m in methods:
        cal, fit, notes, dt = fit_calibrator(m, d.xv, d.yv)
        for note in notes:
            print(f"softcal compare: warning ({m}): {note}", file=sys.stderr)
        z = calibrated(cal, xt)
        hp = fit.get("hyperparameters") or ({"temperature": fit["temperature"]} if "temperature" in fit else {})
        rows.append(row(m, z, dt, {"hyperparameters": hp, "warnings": notes}))
        panels.append((m, z))
    report = {"data": {"name": d.name, "fit_split": d.fit_split, "eval_split": d.eval_split,
                       "fit_rows": int(d.xv.shape[0]), "eval_rows": int(xt.shape[0]),
                       "classes": int(d.xv.shape[1]), "probs": bool(d.probs)},
              "n_bins": args.bins, "results": rows, "backend": backend(d.device),
              "device": str(d.device), "files": {"diagrams": str(png), "table": str(cs), "report": str(js)},
              "versions": C.versions()}
    fig = diagrams(panels, yt, args.bins)
    with C.atomic_output(png) as tmp:
        fig.savefig(tmp)
    with C.atomic_output(cs) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(TABLE_KEYS + ["hyperparameters"])
            for r in rows:
                w.writerow([r[k] for k in TABLE_KEYS] + [json.dumps(r["hyperparameters"])])
    C.write_text(js, json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return C.EXIT_OK
    lines = [f"softcal compare: {d.name}",
             f"  fitted on {d.fit_split} ({d.xv.shape[0]} rows x {d.xv.shape[1]} classes), evaluated "
             f"on {d.eval_split} ({xt.shape[0]} rows); ECEs with {args.bins} bins", "",
             f"  {'method':<16}{'NLL':>9}{'ECE':>9}{'cw-ECE':>9}{'Brier':>9}{'accuracy':>10}{'fit':>11}",
             "  " + "-" * 73]
    for r in rows:
        fit_s = "-" if r["method"] == "uncalibrated" else f"{1000 * r['fit_time_s']:.1f} ms"
        lines.append(f"  {r['method']:<16}{r['nll']:>9.4f}{100 * r['ece']:>8.2f}%"
                     f"{100 * r['classwise_ece']:>8.2f}%{r['brier']:>9.4f}{100 * r['accuracy']:>9.2f}%"
                     f"{fit_s:>11}")
    lines += ["", f"  diagrams: {png}", f"  table: {cs}", f"  report: {js}"]
    C.say(args, "\n".join(lines))
    return C.EXIT_OK
