"""``softcal calibrate``: fit T on validation scores, report the metrics before and after."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from .. import _io
from . import common as C
from .report import calibrate_table

#: every method of ``--method`` (ts: temperature scaling, this module; the others:
#: :mod:`softcal._cli.calibrators`)
METHODS = ("ts", "vector", "matrix", "dirichlet", "ets", "histogram", "isotonic", "scaling-binning")

__all__ = ["METHODS", "FitData", "add_parser", "read_fit_data", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser(
        "calibrate", help="fit a temperature on validation scores, report metrics before/after",
        description="Fit a temperature T on VAL (exactly: the NLL minimiser), print accuracy, NLL, "
                    "ECE, MCE, Brier (and more) before and after on TEST (or on VAL's test split, "
                    "or on VAL itself), and write reliability_diagram.png and report.json into "
                    "--out DIR. With no VAL: the embedded DenseNet-40 / CIFAR-10 logits (fit on "
                    "the 5000-row validation split, evaluated on the 10000-row test split). "
                    "--method fits another calibrator instead of T (vector, matrix or Dirichlet "
                    "scaling, ETS, histogram binning, isotonic regression, scaling-binning).",
        epilog=f"{C.FORMATS_LINE}\n{C.EXIT_CODES}.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("val", nargs="?", default=None, metavar="VAL",
                   help="file with validation (scores, labels); default: the embedded logits")
    c.add_argument("--test", default=None, metavar="TEST",
                   help="file with test (scores, labels) to evaluate on (needs VAL)")
    c.add_argument("--out", default="softcal-out", metavar="DIR",
                   help="directory for reliability_diagram.png and report.json (default: %(default)s)")
    c.add_argument("--save", default=None, metavar="T.json",
                   help="write the fitted temperature with its provenance (input hashes, N, C, NLL "
                        "before/after, softcal version, date) for softcal apply")
    c.add_argument("--bins", type=int, default=15,
                   help=f"equal-width bins for ECE/MCE, 1 to {C.MAX_BINS} (default: 15)")
    c.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    c.add_argument("--method", default="ts", choices=METHODS,
                   help="calibration method (default: ts, temperature scaling); the others are "
                        "softcal.nn's calibrators, fitted with their default options "
                        "(docs/calibrators.md); --save writes any of them for softcal apply")
    C.add_input_options(c)
    return c


def out_files(out: Path) -> Tuple[Path, Path]:
    """(diagram, report) in the --out folder of calibrate and evaluate."""
    return out / "reliability_diagram.png", out / "report.json"


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise C.CLIError(f"--out {out} is a file; --out names a folder (for reliability_diagram.png "
                         "and report.json)")


def finite_metrics(what: str, m: Any) -> None:
    """Refuse metrics that are not finite numbers (a temperature too extreme for the scores)."""
    bad = {k: v for k, v in m.to_dict().items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        k, v = next(iter(bad.items()))
        raise C.CLIError(f"the metrics {what} are not finite ({k} = {v}): the temperature is too "
                         "extreme for these scores")


def _fit(xv: torch.Tensor, yv: torch.Tensor, progress: bool):
    """TemperatureScaler.fit on (xv, yv); a bar counts the passes on a terminal."""
    from ..calibration import TemperatureScaler

    scaler = TemperatureScaler()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if progress:
                with C.bar(True, desc="softcal: fitting T", unit="pass") as b:
                    def passes() -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
                        b.update(1)
                        yield xv, yv

                    result = scaler.fit(passes, progress=False)
            else:
                result = scaler.fit(xv, yv, progress=False)
        except (ValueError, TypeError) as e:
            raise C.CLIError(str(e)) from None
    return result, [str(w.message) for w in caught]


class FitData:
    """What calibrate (any --method) and compare read: the fit rows (xv, yv), the rows the
    metrics are computed on (xt, yt), their names, and the output files of --out."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def read_fit_data(args: argparse.Namespace, command: str, outputs: List[Tuple[str, Path]],
                  fit_what: str = "the temperature") -> FitData:
    """Check the options and outputs (before anything is read), then read VAL (or the embedded
    logits) and TEST as calibrate reads them: fit on VAL's val split (or VAL), evaluate on TEST,
    VAL's test split, or VAL itself."""
    val_arg = getattr(args, "val", None)
    if val_arg is None and args.test is not None:
        raise C.CLIError(f"--test needs a validation file to fit {fit_what} on: softcal {command} "
                         "VAL --test TEST (to fit and evaluate on one file, give it as VAL: softcal "
                         f"{command} {args.test})")
    if val_arg is None and args.probs:
        raise C.CLIError("--probs does not apply to the embedded default (it holds logits)")
    device = C.device(args.device)
    inputs = [C.DEFAULT_DATA if val_arg is None else Path(val_arg)]
    if args.test is not None:
        inputs.append(Path(args.test))
    C.check_outputs(outputs, inputs, create_folders=True)

    if val_arg is None:
        data = _io.load_embedded()
        name, probs = C.DEFAULT_NAME, False
    else:
        data = C.read(args, val_arg, probs=args.probs)
        name, probs = val_arg, args.probs
    val = data["val"]
    test: Optional[_io.Split] = None
    eval_split = "the same data (no test split given)"
    if args.test is not None:
        tdata = C.read(args, args.test, probs=probs)
        test = tdata.get("test", tdata["val"])
        eval_split = args.test
    elif "test" in data:
        test = data["test"]
        eval_split = "test split"
    fit_split = "val split" if "test" in data else (val_arg or "val")
    if test is not None and test[0].shape[1] != val[0].shape[1]:
        raise C.CLIError(f"the test scores have {test[0].shape[1]} classes but the validation scores "
                         f"have {val[0].shape[1]}")
    xv, yv = C.logits(val[0], probs, device), torch.from_numpy(val[1]).to(device)
    if test is not None:
        xt, yt = C.logits(test[0], probs, device), torch.from_numpy(test[1]).to(device)
    else:
        xt, yt = xv, yv
    return FitData(name=name, probs=probs, data=data, xv=xv, yv=yv, xt=xt, yt=yt,
                   fit_split=fit_split, eval_split=eval_split, device=device)


def run(args: argparse.Namespace) -> int:
    from .. import backend, metrics, plots

    t_start = time.perf_counter()
    C.check_bins(args.bins)
    out = Path(args.out)
    png, js = out_files(out)
    check_out_dir(out)
    outputs = [("--out", png), ("--out", js)] + ([("--save", Path(args.save))] if args.save else [])
    if args.method != "ts":  # the calibrators of softcal.nn: softcal/_cli/calibrators.py
        from .calibrators import calibrate_method

        return calibrate_method(args, read_fit_data(args, "calibrate", outputs, "the calibrator"),
                                png, js, t_start)
    d = read_fit_data(args, "calibrate", outputs)
    name, probs, data = d.name, d.probs, d.data
    xv, yv, xt, yt = d.xv, d.yv, d.xt, d.yt
    fit_split, eval_split, device = d.fit_split, d.eval_split, d.device

    result, notes = _fit(xv, yv, C.progress_enabled(args))
    for note in notes:
        print(f"softcal calibrate: warning: {note}", file=sys.stderr)
    t = result.temperature
    try:
        before = metrics.calibration_report(xt, yt, args.bins)
        after = metrics.calibration_report(xt, yt, args.bins, temperature=t)
    except (ValueError, TypeError) as e:
        raise C.CLIError(str(e)) from None
    finite_metrics("at T = 1", before)
    finite_metrics(f"at the fitted T = {t:g}", after)

    files: Dict[str, str] = {"diagram": str(png), "report": str(js)}
    if args.save:
        files["temperature"] = str(args.save)
    report = {
        "data": {"name": name, "fit_split": fit_split, "eval_split": eval_split,
                 "fit_rows": int(xv.shape[0]), "eval_rows": int(xt.shape[0]),
                 "classes": int(xv.shape[1]), "probs": bool(probs)},
        "n_bins": args.bins,
        "fit": result.to_dict(),
        "before": before.to_dict(),
        "after": after.to_dict(),
        "warnings": notes,
        "backend": backend(device),
        "device": str(device),
        "files": files,
        "versions": C.versions(),
        "total_time_s": time.perf_counter() - t_start,
    }
    fig = plots.reliability_diagram(xt, yt, t, n_bins=args.bins,
                                    titles=["before (T = 1)", f"after (T = {t:.3f})"])
    with C.atomic_output(png) as tmp:
        fig.savefig(tmp)
    if args.save:
        C.write_text(Path(args.save), json.dumps(_saved(args, data, result, before, after, xv, xt,
                                                        eval_split, probs, report), indent=2) + "\n")
    C.write_text(js, json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        C.say(args, calibrate_table(report))
    return C.EXIT_OK


def _saved(args, data, result, before, after, xv, xt, eval_split, probs, report) -> Dict[str, Any]:
    """The --save file: T and its provenance."""
    inputs: List[Dict[str, str]] = [dict(C.input_id(args.val),
                                         role="fit (its val split)" if "test" in data else "fit")]
    if "test" in data and args.test is None:
        inputs[0]["role"] += ", evaluate (its test split)"
    if args.test is not None:
        inputs.append(dict(C.input_id(args.test), role="evaluate"))
    return {
        "temperature": result.temperature,
        "what": "softcal temperature: divide logits by T (probabilities: softmax(log p / T))",
        "inputs": inputs,
        "N": int(xv.shape[0]),
        "C": int(xv.shape[1]),
        "probs": bool(probs),
        "nll_before": result.nll_before,
        "nll_after": result.nll_after,
        "fit": result.to_dict(),
        "evaluation": {"rows": int(xt.shape[0]), "split": eval_split, "n_bins": args.bins,
                       "nll_before": before.nll, "nll_after": after.nll,
                       "ece_before": before.ece, "ece_after": after.ece},
        "softcal_version": report["versions"]["softcal"],
        "versions": report["versions"],
        "date": C.now(),
        "command": "softcal " + shlex.join(args.argv),
    }
