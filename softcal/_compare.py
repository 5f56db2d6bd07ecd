"""The command line's calibrators beyond temperature scaling:

    softcal calibrate [VAL] --method vector|matrix|dirichlet|ets|histogram|isotonic|scaling-binning
    softcal compare VAL [--test TEST]     every method fitted on VAL, one table, the diagrams
    softcal apply FILE --temperature CAL.json   (a calibrator saved by calibrate --save)

:mod:`softcal.cli` calls :func:`calibrate_method` (``--method`` other than ``ts``),
:func:`add_compare_parser` / :func:`compare` and :func:`read_calibrator`; the reading of files,
devices and probabilities is :mod:`softcal.cli`'s (``_read``, ``_device``, ``_logits``,
``_io.load_embedded``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = ["METHODS", "calibrate_method", "add_compare_parser", "compare", "read_calibrator",
           "save_calibrator", "make_calibrator"]

#: every method of ``--method`` (ts is softcal.cli's own path)
METHODS = ("ts", "vector", "matrix", "dirichlet", "ets", "histogram", "isotonic", "scaling-binning")
FORMAT = "softcal-calibrator-1"


def make_calibrator(method: str) -> torch.nn.Module:
    """A fresh calibrator of ``method`` (one of :data:`METHODS`), default options."""
    from .calibration import TemperatureScaler
    from .calibrators import CALIBRATORS

    if method == "ts":
        return TemperatureScaler()
    if method not in CALIBRATORS:
        raise ValueError(f"unknown calibration method {method!r}; one of {', '.join(METHODS)}")
    return CALIBRATORS[method]()


def _fit(method: str, xv: torch.Tensor, yv: torch.Tensor) -> Tuple[torch.nn.Module, Dict[str, Any], List[str], float]:
    from .cli import CLIError

    cal = make_calibrator(method)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        try:
            result = cal.fit(xv, yv, progress=False)
        except (ValueError, TypeError) as e:
            raise CLIError(str(e)) from None
        dt = time.perf_counter() - t0
    return cal, result.to_dict(), [str(w.message) for w in caught], dt


def _calibrated(cal: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return cal(x).to(torch.float64)


# ---------------------------------------------------------------------- saving and loading
def save_calibrator(cal: torch.nn.Module, path: Path, extra: Dict[str, Any]) -> None:
    """Write a calibrator as JSON: its state_dict's tensors as nested lists (float64), its
    hyper-parameters, and ``extra`` (provenance)."""
    from .calibration import TemperatureScaler

    if isinstance(cal, TemperatureScaler):
        state = {"temperature": cal.temperature}
        method, hp = "ts", {"temperature": cal.temperature}
    else:
        state = {k: v.detach().cpu().double().tolist() for k, v in cal.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        method, hp = cal.method, {k: v for k, v in cal.hyperparameters.items()}
    doc = {"format": FORMAT, "calibrator": method, "hyperparameters": hp,
           "cv": getattr(cal, "cv_results", None), "state": state, **extra}
    if method == "ts":
        doc["temperature"] = cal.temperature  # softcal apply --temperature reads this too
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def read_calibrator(value: str) -> Optional[Tuple[torch.nn.Module, str]]:
    """(calibrator, method) from a file written by ``softcal calibrate --method M --save``;
    None when ``value`` is not such a file (a number, or a temperature file)."""
    from .cli import CLIError
    from .calibrators import CALIBRATORS

    p = Path(value)
    if not p.is_file() or p.suffix.lower() != ".json":
        return None
    try:
        doc = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("calibrator") == "ts":
        return None
    method = doc.get("calibrator")
    if method not in CALIBRATORS:
        raise CLIError(f"--temperature {value}: unknown calibrator {method!r} (this softcal knows "
                       f"{', '.join(METHODS)})")
    cal = CALIBRATORS[method]()
    try:
        state = {k: torch.tensor(v, dtype=torch.float64) for k, v in doc["state"].items()}
        state["_extra_state"] = {"method": method, "hyperparameters": dict(doc["hyperparameters"],
                                                                          _fitted=True),
                                 "cv": doc.get("cv")}
        cal.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CLIError(f"--temperature {value}: not a valid {method} calibrator file "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return cal, method


# ---------------------------------------------------------------------- diagrams
def diagrams(panels: List[Tuple[str, torch.Tensor]], y: torch.Tensor, n_bins: int, path: Path) -> None:
    """One reliability diagram per (title, calibrated logits) in a grid, saved to ``path``."""
    from matplotlib.figure import Figure

    from . import metrics, plots

    k = len(panels)
    cols = min(k, 4)
    rows = math.ceil(k / cols)
    fig = Figure(figsize=(4.2 * cols, 5.2 * rows))
    gs = fig.add_gridspec(2 * rows, cols, height_ratios=[3, 1] * rows)
    for i, (title, z) in enumerate(panels):
        r, c = divmod(i, cols)
        ax_rel = fig.add_subplot(gs[2 * r, c])
        ax_hist = fig.add_subplot(gs[2 * r + 1, c], sharex=ax_rel)
        bins = metrics.reliability_bins(z, y, n_bins)
        plots._panel(ax_rel, ax_hist, bins, metrics.ece(z, y, n_bins), title)
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------------- calibrate --method
def _data(args: argparse.Namespace, command: str):
    """(name, probs, xv, yv, xt, yt, fit_split, eval_split) as softcal calibrate reads them."""
    from . import _io
    from .cli import DEFAULT_NAME, CLIError, _device, _logits, _read

    device = _device(args.device)
    if getattr(args, "val", None) is None:
        if args.probs:
            raise CLIError("--probs does not apply to the embedded default (it holds logits)")
        data = _io.load_embedded()
        name, probs = DEFAULT_NAME, False
    else:
        data = _read(args, args.val)
        name, probs = args.val, args.probs
    val = data["val"]
    test = None
    if args.test is not None:
        tdata = _read(args, args.test)
        test = tdata.get("test", tdata["val"])
        eval_split = args.test
    elif "test" in data:
        test = data["test"]
        eval_split = "test split"
    fit_split = "val split" if "test" in data else (getattr(args, "val", None) or "val")
    if test is None:
        eval_split = "the same data (no test split given)"
    if test is not None and test[0].shape[1] != val[0].shape[1]:
        raise CLIError(f"the test scores have {test[0].shape[1]} classes but the validation scores "
                       f"have {val[0].shape[1]}")
    xv, yv = _logits(val[0], probs, device), torch.from_numpy(val[1]).to(device)
    if test is not None:
        xt, yt = _logits(test[0], probs, device, "the test scores"), torch.from_numpy(test[1]).to(device)
    else:
        xt, yt = xv, yv
    return name, probs, xv, yv, xt, yt, fit_split, eval_split, device


def calibrate_method(args: argparse.Namespace) -> int:
    """``softcal calibrate --method M`` for M other than ts: fit, report before/after, write the
    diagram and report.json, and with --save the calibrator (JSON) for softcal apply."""
    from . import metrics
    from .cli import EXIT_OK, CLIError, _input_id, _metric_lines, _now, _say, _versions

    t_start = time.perf_counter()
    if args.bins < 1:
        raise CLIError(f"--bins must be >= 1, got {args.bins}")
    if args.val is None and args.test is not None:
        raise CLIError("--test needs a validation file to fit on: softcal calibrate VAL --test TEST")
    name, probs, xv, yv, xt, yt, fit_split, eval_split, device = _data(args, "calibrate")
    cal, fit, notes, dt = _fit(args.method, xv, yv)
    for note in notes:
        print(f"softcal calibrate: warning: {note}", file=__import__("sys").stderr)
    z = _calibrated(cal, xt)
    try:
        before = metrics.calibration_report(xt, yt, args.bins)
        after = metrics.calibration_report(z, yt, args.bins)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png, js = out / "reliability_diagram.png", out / "report.json"
    diagrams([("before (uncalibrated)", xt), (f"after ({args.method})", z)], yt, args.bins, png)
    files = {"diagram": str(png), "report": str(js)}
    report = {
        "data": {"name": name, "fit_split": fit_split, "eval_split": eval_split,
                 "fit_rows": int(xv.shape[0]), "eval_rows": int(xt.shape[0]),
                 "classes": int(xv.shape[1]), "probs": bool(probs)},
        "method": args.method, "n_bins": args.bins, "fit": fit,
        "before": before.to_dict(), "after": after.to_dict(), "warnings": notes,
        "device": str(device), "files": files, "versions": _versions(),
        "total_time_s": time.perf_counter() - t_start,
    }
    if args.save:
        files["calibrator"] = str(args.save)
        save_calibrator(cal, Path(args.save), {
            "what": f"softcal calibrator ({args.method}): softcal apply FILE --temperature THIS",
            "inputs": [dict(_input_id(args.val), role="fit")] +
                      ([dict(_input_id(args.test), role="evaluate")] if args.test else []),
            "N": int(xv.shape[0]), "C": int(xv.shape[1]), "probs": bool(probs), "fit": fit,
            "evaluation": {"rows": int(xt.shape[0]), "split": eval_split, "n_bins": args.bins,
                           "nll_before": before.nll, "nll_after": after.nll,
                           "ece_before": before.ece, "ece_after": after.ece},
            "versions": report["versions"], "date": _now(),
            "command": "softcal " + shlex.join(args.argv)})
    js.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        hp = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                       for k, v in fit["hyperparameters"].items() if not isinstance(v, list))
        lines = [f"softcal calibrate --method {args.method}: {name}",
                 f"  fitted on {fit_split} ({xv.shape[0]} rows x {xv.shape[1]} classes), evaluated on "
                 f"{eval_split} ({xt.shape[0]} rows)",
                 f"  {hp or 'no hyper-parameters'}"
                 + (" (chosen by {}-fold cross-validation)".format(fit["cv"]["folds"]) if fit["cv"] else "")
                 + f"; fit {1000 * dt:.1f} ms", ""]
        lines += _metric_lines([("before", before.to_dict()), ("after", after.to_dict())], args.bins)
        lines += [""] + [f"  {k}: {v}" for k, v in files.items()]
        _say(args, "\n".join(lines))
    return EXIT_OK


# ---------------------------------------------------------------------- compare
def add_compare_parser(sub: Any, common: Any, epilog: str) -> None:
    """The ``compare`` sub-command (``common`` adds the input/run options of softcal.cli)."""
    c = sub.add_parser(
        "compare", help="fit every calibration method on VAL, print one table, write the diagrams",
        description="Fit every calibration method (" + ", ".join(METHODS) + ") on VAL and print "
                    "one table of NLL, ECE, classwise ECE, Brier, accuracy and fit time on TEST "
                    "(or VAL's test split, or VAL itself); write reliability_diagrams.png, "
                    "compare.csv and report.json into --out DIR.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("val", metavar="VAL", help="file with validation (scores, labels)")
    c.add_argument("--test", default=None, metavar="TEST", help="file with test (scores, labels)")
    c.add_argument("--methods", default=",".join(METHODS), metavar="A,B,...",
                   help="comma-separated subset of the methods (default: all)")
    c.add_argument("--out", default="softcal-out", metavar="DIR",
                   help="directory for the diagrams, compare.csv and report.json (default: %(default)s)")
    c.add_argument("--bins", type=int, default=15, help="equal-width bins for the ECEs (default: 15)")
    c.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    common(c)


def compare(args: argparse.Namespace) -> int:
    from . import metrics
    from .cli import EXIT_OK, CLIError, _say, _versions

    if args.bins < 1:
        raise CLIError(f"--bins must be >= 1, got {args.bins}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise CLIError(f"--methods: unknown method(s) {', '.join(bad) or '(none given)'}; choose from "
                       f"{', '.join(METHODS)}")
    name, probs, xv, yv, xt, yt, fit_split, eval_split, device = _data(args, "compare")
    rows: List[Dict[str, Any]] = []
    panels = [("uncalibrated", xt)]

    def row(method: str, z: torch.Tensor, fit_s: float, extra: Dict[str, Any]) -> Dict[str, Any]:
        r = metrics.calibration_report(z, yt, args.bins)
        return {"method": method, "nll": r.nll, "ece": r.ece, "classwise_ece": r.classwise_ece,
                "brier": r.brier, "accuracy": r.accuracy, "fit_time_s": fit_s, **extra}

    rows.append(row("uncalibrated", xt, 0.0, {"hyperparameters": {}, "warnings": []}))
    for m in methods:
        cal, fit, notes, dt = _fit(m, xv, yv)
        for note in notes:
            print(f"softcal compare: warning ({m}): {note}", file=__import__("sys").stderr)
        z = _calibrated(cal, xt)
        hp = fit.get("hyperparameters") or ({"temperature": fit["temperature"]} if "temperature" in fit else {})
        rows.append(row(m, z, dt, {"hyperparameters": hp, "warnings": notes}))
        panels.append((m, z))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png, js, cs = out / "reliability_diagrams.png", out / "report.json", out / "compare.csv"
    diagrams(panels, yt, args.bins, png)
    keys = ["method", "nll", "ece", "classwise_ece", "brier", "accuracy", "fit_time_s"]
    with open(cs, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys + ["hyperparameters"])
        for r in rows:
            w.writerow([r[k] for k in keys] + [json.dumps(r["hyperparameters"])])
    report = {"data": {"name": name, "fit_split": fit_split, "eval_split": eval_split,
                       "fit_rows": int(xv.shape[0]), "eval_rows": int(xt.shape[0]),
                       "classes": int(xv.shape[1]), "probs": bool(probs)},
              "n_bins": args.bins, "results": rows, "device": str(device),
              "files": {"diagrams": str(png), "table": str(cs), "report": str(js)},
              "versions": _versions()}
    js.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    lines = [f"softcal compare: {name}",
             f"  fitted on {fit_split} ({xv.shape[0]} rows x {xv.shape[1]} classes), evaluated on "
             f"{eval_split} ({xt.shape[0]} rows); ECEs with {args.bins} bins", "",
             f"  {'method':<16}{'NLL':>9}{'ECE':>9}{'cw-ECE':>9}{'Brier':>9}{'accuracy':>10}{'fit':>11}",
             "  " + "-" * 73]
    for r in rows:
        fit_s = "-" if r["method"] == "uncalibrated" else f"{1000 * r['fit_time_s']:.1f} ms"
        lines.append(f"  {r['method']:<16}{r['nll']:>9.4f}{100 * r['ece']:>8.2f}%"
                     f"{100 * r['classwise_ece']:>8.2f}%{r['brier']:>9.4f}{100 * r['accuracy']:>9.2f}%{fit_s:>11}")
    lines += ["", f"  diagrams: {png}", f"  table: {cs}", f"  report: {js}"]
    _say(args, "\n".join(lines))
    return EXIT_OK
