"""The command line's calibrators beyond temperature scaling (shared by three commands):

    softcal calibrate [VAL] --method vector|matrix|dirichlet|ets|histogram|isotonic|scaling-binning
    softcal compare VAL [--test TEST]              (softcal/_cli/compare.py)
    softcal apply FILE --temperature CAL.json      (a calibrator saved by calibrate --save)

A saved calibrator is a JSON object: ``format`` (:data:`FORMAT`), ``calibrator`` (the method),
``hyperparameters``, ``cv`` (the cross-validation, or null), ``state`` (the state_dict's
tensors as nested lists of float64: exact, since JSON numbers are written with repr) and the
provenance (inputs with their sha256, N, C, the fit, the evaluation, versions, date, command).
It is written whole (:func:`softcal._cli.common.write_text`) after the outputs were checked
against the inputs (:func:`softcal._cli.calibrate.read_fit_data`).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .._files.check import check_memory
from . import common as C
from .calibrate import METHODS, FitData

__all__ = ["FORMAT", "METHODS", "make_calibrator", "fit_calibrator", "calibrated", "document",
           "read_calibrator", "diagrams", "calibrate_method"]

FORMAT = "softcal-calibrator-1"
# a parsed JSON number list takes about this many bytes of Python objects per byte of file
_JSON_MEMORY_FACTOR = 12


def make_calibrator(method: str) -> torch.nn.Module:
    """A fresh calibrator of ``method`` (one of :data:`METHODS`) with its default options."""
    from ..calibration import TemperatureScaler
    from ..calibrators import CALIBRATORS

    if method == "ts":
        return TemperatureScaler()
    if method not in CALIBRATORS:
        raise ValueError(f"unknown calibration method {method!r}; one of {', '.join(METHODS)}")
    return CALIBRATORS[method]()


def fit_calibrator(method: str, xv: torch.Tensor, yv: torch.Tensor
                   ) -> Tuple[torch.nn.Module, Dict[str, Any], List[str], float]:
    """(fitted calibrator, its fit result as a dict, the warnings it gave, fit time in s)."""
    cal = make_calibrator(method)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        try:
            result = cal.fit(xv, yv, progress=False)
        except (ValueError, TypeError) as e:
            raise C.CLIError(str(e)) from None
        dt = time.perf_counter() - t0
    return cal, result.to_dict(), [str(w.message) for w in caught], dt


def calibrated(cal: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The calibrated logits (or log-probabilities) of ``x``, float64."""
    with torch.no_grad():
        return cal(x).to(torch.float64)


# ---------------------------------------------------------------------- saving and loading
def document(cal: torch.nn.Module, extra: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON object of a fitted calibrator (not TemperatureScaler: calibrate --save writes
    its own temperature file) with ``extra`` (provenance) added."""
    state = {k: v.detach().cpu().double().tolist() for k, v in cal.state_dict().items()
             if isinstance(v, torch.Tensor)}
    hp = {k: v for k, v in cal.hyperparameters.items() if not k.startswith("_")}
    return {"format": FORMAT, "calibrator": cal.method, "hyperparameters": hp,
            "cv": getattr(cal, "cv_results", None), "state": state, **extra}


def read_calibrator(value: str) -> Optional[Tuple[torch.nn.Module, str]]:
    """(calibrator, method) from a file written by ``softcal calibrate --method M --save``;
    None when ``value`` is not such a file (a number, a temperature file, anything else: then
    --temperature reads it as a temperature). A file of this format that does not hold a valid
    calibrator is a CLIError."""
    from ..calibrators import CALIBRATORS

    p = Path(value)
    if not p.is_file() or p.suffix.lower() != ".json":
        return None
    try:
        size = p.stat().st_size
        check_memory(p, "the calibrator file, parsed", _JSON_MEMORY_FACTOR * size)
        with open(p, "rb") as f:
            if FORMAT.encode() not in f.read(4096):  # written first, after "format"
                return None
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    except OSError as e:
        raise C.CLIError(f"--temperature {value}: cannot read it ({e.strerror or e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return None
    method = doc.get("calibrator")
    bad = f"--temperature {value}: not a valid {method} calibrator file"
    if method not in CALIBRATORS:
        raise C.CLIError(f"--temperature {value}: unknown calibrator {method!r} (this softcal "
                         f"knows {', '.join(m for m in METHODS if m != 'ts')})")
    cal = CALIBRATORS[method]()
    try:
        if not isinstance(doc.get("state"), dict) or not isinstance(doc.get("hyperparameters"), dict):
            raise ValueError("'state' and 'hyperparameters' must be objects")
        state: Dict[str, Any] = {k: torch.tensor(v, dtype=torch.float64) for k, v in doc["state"].items()}
        state["_extra_state"] = {"method": method, "cv": doc.get("cv"),
                                 "hyperparameters": dict(doc["hyperparameters"], _fitted=True)}
        cal.load_state_dict(state)
        c = doc["hyperparameters"].get("classes")
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"'classes' is {c!r}")
        with torch.no_grad():  # the buffers' shapes agree with each other and with C
            probe = cal(torch.zeros(2, c, dtype=torch.float64))
        if probe.shape != (2, c) or bool(torch.isnan(probe).any()):
            raise ValueError("its map of two rows of zeros is not (2, C) numbers")
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise C.CLIError(f"{bad} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return cal, method


# ---------------------------------------------------------------------- diagrams
def diagrams(panels: List[Tuple[str, torch.Tensor]], y: torch.Tensor, n_bins: int):
    """A matplotlib Figure: one reliability diagram per (title, calibrated logits), in a grid of
    at most 4 columns."""
    from matplotlib.figure import Figure

    from .. import metrics, plots

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
    return fig


def hyperparameter_line(fit: Dict[str, Any]) -> str:
    hp = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}"
                   for k, v in (fit.get("hyperparameters") or {}).items() if not isinstance(v, list))
    cv = fit.get("cv")
    return (hp or "no hyper-parameters") + (f" (chosen by {cv['folds']}-fold cross-validation)" if cv else "")


# ---------------------------------------------------------------------- calibrate --method
def calibrate_method(args: argparse.Namespace, d: FitData, png: Path, js: Path, t_start: float) -> int:
    """``softcal calibrate --method M`` for M other than ts (the outputs already checked by
    :func:`softcal._cli.calibrate.read_fit_data`): fit, report before/after, write the diagram,
    report.json and, with --save, the calibrator for softcal apply."""
    from .. import backend, metrics

    cal, fit, notes, dt = fit_calibrator(args.method, d.xv, d.yv)
    for note in notes:
        print(f"softcal calibrate: warning: {note}", file=sys.stderr)
    z = calibrated(cal, d.xt)
    try:
        before = metrics.calibration_report(d.xt, d.yt, args.bins)
        after = metrics.calibration_report(z, d.yt, args.bins)
    except (ValueError, TypeError) as e:
        raise C.CLIError(str(e)) from None
    files = {"diagram": str(png), "report": str(js)}
    if args.save:
        files["calibrator"] = str(args.save)
    report = {
        "data": {"name": d.name, "fit_split": d.fit_split, "eval_split": d.eval_split,
                 "fit_rows": int(d.xv.shape[0]), "eval_rows": int(d.xt.shape[0]),
                 "classes": int(d.xv.shape[1]), "probs": bool(d.probs)},
        "method": args.method, "n_bins": args.bins, "fit": fit,
        "before": before.to_dict(), "after": after.to_dict(), "warnings": notes,
        "backend": backend(d.device), "device": str(d.device), "files": files,
        "versions": C.versions(), "total_time_s": time.perf_counter() - t_start,
    }
    fig = diagrams([("before (uncalibrated)", d.xt), (f"after ({args.method})", z)], d.yt, args.bins)
    with C.atomic_output(png) as tmp:
        fig.savefig(tmp)
    if args.save:
        val = getattr(args, "val", None)
        inputs = [dict(C.input_id(val), role="fit (its val split)" if "test" in d.data else "fit")]
        if "test" in d.data and args.test is None:
            inputs[0]["role"] += ", evaluate (its test split)"
        if args.test is not None:
            inputs.append(dict(C.input_id(args.test), role="evaluate"))
        doc = document(cal, {
            "what": f"softcal calibrator ({args.method}): softcal apply FILE --temperature THIS",
            "inputs": inputs, "N": int(d.xv.shape[0]), "C": int(d.xv.shape[1]),
            "probs": bool(d.probs), "fit": fit,
            "evaluation": {"rows": int(d.xt.shape[0]), "split": d.eval_split, "n_bins": args.bins,
                           "nll_before": before.nll, "nll_after": after.nll,
                           "ece_before": before.ece, "ece_after": after.ece},
            "softcal_version": report["versions"]["softcal"], "versions": report["versions"],
            "date": C.now(), "command": "softcal " + shlex.join(args.argv)})
        C.write_text(Path(args.save), json.dumps(doc, indent=1) + "\n")
    C.write_text(js, json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return C.EXIT_OK
    from .report import metric_lines

    lines = [f"softcal calibrate --method {args.method}: {d.name}",
             f"  fitted on {d.fit_split} ({d.xv.shape[0]} rows x {d.xv.shape[1]} classes), evaluated "
             f"on {d.eval_split} ({d.xt.shape[0]} rows)",
             f"  {hyperparameter_line(fit)}; fit {1000 * dt:.1f} ms", ""]
    lines += metric_lines([("before", before.to_dict()), ("after", after.to_dict())], args.bins)
    lines += [""] + [f"  {k}: {v}" for k, v in files.items()]
    C.say(args, "\n".join(lines))
    return C.EXIT_OK
