"""The ``softcal`` command.

    softcal calibrate [VAL] [--test TEST] [--out DIR] [--bins 15] [--json] [--probs] [--device D]

Fits a temperature on VAL, prints accuracy, NLL, ECE, MCE, Brier (and more) before and after on
TEST (or on VAL when there is no test split), and writes ``reliability_diagram.png`` and
``report.json`` into DIR (default ./softcal-out). With no VAL it runs on the embedded DenseNet-40 /
CIFAR-10 logits (softcal/data, MIT licence, see the LICENSE file there). ``softcal`` and
``python -m softcal`` with no arguments run that default.

Files (.npz, .npy, .pt/.pth, or a pickle such as .p/.pkl/.dat) hold (scores, labels):

* a pair ``(scores, labels)``, or a pair of pairs ``((val_scores, val_labels), (test_scores,
  test_labels))`` (the markus93/NN_calibration format): pickle, .pt, or a .npy object array;
* named arrays (.npz, or a dict in the other formats): scores under ``logits``, ``probs``,
  ``probabilities``, ``predictions`` or ``scores``; labels under ``labels``, ``targets``, ``y`` or
  ``ground_truth``; or split as ``logits_val``, ``labels_val``, ``logits_test``, ``labels_test``.

Scores are logits unless --probs is given (then log p is used as the logits). Labels may be (N,)
or (N, 1). Pickle and .npy object arrays run code when loaded: only open files you trust (.pt is
loaded with weights_only=True).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["main", "load_scores", "DEFAULT_DATA"]

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "densenet40_c10_logits.npz"
DEFAULT_NAME = "DenseNet-40 / CIFAR-10 logits (embedded; Kängsepp 2018, MIT)"

_SCORE_KEYS = ("logits", "probs", "probabilities", "predictions", "scores")
_LABEL_KEYS = ("labels", "targets", "target", "y", "ground_truth")

Split = Tuple[np.ndarray, np.ndarray]


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _split_from_mapping(m: Dict[str, Any], path: str) -> Dict[str, Split]:
    keys = set(m)
    if {"logits_val", "labels_val"} <= keys:
        out = {"val": (m["logits_val"], m["labels_val"])}
        if {"logits_test", "labels_test"} <= keys:
            out["test"] = (m["logits_test"], m["labels_test"])
        return out
    s = next((k for k in _SCORE_KEYS if k in keys), None)
    y = next((k for k in _LABEL_KEYS if k in keys), None)
    if s is not None and y is not None:
        return {"val": (m[s], m[y])}
    if len(keys) == 2:  # two unnamed arrays: the 2-D float one holds the scores
        a, b = (np.asarray(m[k]) for k in sorted(keys))
        if a.ndim == 2 and a.dtype.kind == "f" and b.dtype.kind in "iu":
            return {"val": (a, b)}
        if b.ndim == 2 and b.dtype.kind == "f" and a.dtype.kind in "iu":
            return {"val": (b, a)}
    raise CLIError(f"{path}: cannot find scores and labels among the keys {sorted(keys)}; name them "
                   f"'logits' (or 'probs') and 'labels'")


def _split_from_object(obj: Any, path: str) -> Dict[str, Split]:
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 0:
        obj = obj.item()
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 1:
        obj = tuple(obj)
    if isinstance(obj, dict):
        return _split_from_mapping(obj, path)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        a, b = obj
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == 2 and len(b) == 2:
            return {"val": (a[0], a[1]), "test": (b[0], b[1])}
        return {"val": (a, b)}
    raise CLIError(f"{path}: expected (scores, labels), ((val_scores, val_labels), (test_scores, "
                   f"test_labels)) or a dict, got {type(obj).__name__}")


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def load_scores(path: str) -> Dict[str, Split]:
    """Load a file of (scores, labels); return {"val": (scores, labels)[, "test": (...)]} as numpy
    arrays (scores (N, C) float, labels (N,) int64)."""
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{path}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                out = _split_from_mapping({k: z[k] for k in z.files}, path)
        elif suffix == ".npy":
            out = _split_from_object(np.load(p, allow_pickle=True), path)
        elif suffix in (".pt", ".pth"):
            out = _split_from_object(torch.load(p, map_location="cpu", weights_only=True), path)
        else:
            with open(p, "rb") as f:
                out = _split_from_object(pickle.load(f), path)
    except CLIError:
        raise
    except Exception as e:  # unreadable file: one clear line
        raise CLIError(f"{path}: could not read it as {suffix or 'pickle'} ({type(e).__name__}: {e})") from None
    result = {}
    for split, (s, y) in out.items():
        s, y = _to_numpy(s), _to_numpy(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y.ravel()
        if s.ndim != 2 or s.dtype.kind != "f":
            raise CLIError(f"{path} [{split}]: scores must be a 2-D float array (N, C), got "
                           f"{s.dtype} {s.shape}")
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise CLIError(f"{path} [{split}]: labels must be a 1-D integer array (N,), got {y.dtype} {y.shape}")
        if y.shape[0] != s.shape[0]:
            raise CLIError(f"{path} [{split}]: {y.shape[0]} labels for {s.shape[0]} rows of scores")
        result[split] = (s, y.astype(np.int64))
    return result


def _logits(scores: np.ndarray, probs: bool, device: str) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(scores)).to(device)
    if probs:
        x64 = x.double()
        if bool((x64 < 0).any()) or bool((x64 > 1).any()):
            raise CLIError("--probs was given but the scores are not in [0, 1]")
        x = torch.log(x64.clamp_min(torch.finfo(torch.float64).tiny))
    return x


def _fmt_table(report: Dict[str, Any]) -> str:
    b, a = report["before"], report["after"]
    nb = report["n_bins"]
    rows = [
        ("accuracy", "pct", "accuracy"),
        ("NLL", "num", "nll"),
        (f"ECE ({nb} bins)", "pct", "ece"),
        (f"MCE ({nb} bins)", "pct", "mce"),
        ("Brier", "num", "brier"),
        ("RMS cal. error", "pct", "rmsce"),
        ("adaptive ECE", "pct", "adaptive_ece"),
        ("classwise ECE", "pct", "classwise_ece"),
    ]

    def f(kind: str, v: float) -> str:
        return f"{100 * v:.2f}%" if kind == "pct" else f"{v:.4f}"

    fit = report["fit"]
    lines = [
        f"softcal calibrate: {report['data']['name']}",
        f"  fitted on {report['data']['fit_split']} ({report['data']['fit_rows']} rows x "
        f"{report['data']['classes']} classes), evaluated on {report['data']['eval_split']} "
        f"({report['data']['eval_rows']} rows)",
        f"  temperature T = {fit['temperature']:.4f}   ({fit['iterations']} passes, "
        f"{'converged' if fit['converged'] else 'NOT converged'}"
        + (f", at the {fit['at_bound']} bound" if fit["at_bound"] else "")
        + f", {1000 * fit['time_s']:.1f} ms, backend {report['backend']})",
        "",
        f"  {'metric':<16}{'before':>10}{'after':>10}",
        f"  {'-' * 36}",
    ]
    for label, kind, key in rows:
        lines.append(f"  {label:<16}{f(kind, b[key]):>10}{f(kind, a[key]):>10}")
    lines.append("")
    for k, v in report["files"].items():
        lines.append(f"  {k}: {v}")
    return "\n".join(lines)


def _calibrate(args: argparse.Namespace) -> int:
    from . import backend, metrics, plots
    from .calibration import TemperatureScaler

    t_start = time.perf_counter()
    if args.val is None:
        data = load_scores(str(DEFAULT_DATA))
        name, probs = DEFAULT_NAME, False
        if args.probs:
            raise CLIError("--probs does not apply to the embedded default (it holds logits)")
    else:
        data = load_scores(args.val)
        name, probs = args.val, args.probs
    val = data["val"]
    test: Optional[Split] = None
    eval_split = "val"
    if args.test is not None:
        test = load_scores(args.test)["val"]  # a single (scores, labels) or the first split
        eval_split = args.test
    elif "test" in data:
        test = data["test"]
        eval_split = "test split"
    fit_split = "val split" if "test" in data else (args.val or "val")
    if test is None:
        eval_split = "the same data (no test split given)"
    if test is not None and test[0].shape[1] != val[0].shape[1]:
        raise CLIError(f"the test scores have {test[0].shape[1]} classes but the validation scores "
                       f"have {val[0].shape[1]}")

    device = args.device
    xv, yv = _logits(val[0], probs, device), torch.from_numpy(val[1]).to(device)
    if test is not None:
        xt, yt = _logits(test[0], probs, device), torch.from_numpy(test[1]).to(device)
    else:
        xt, yt = xv, yv

    scaler = TemperatureScaler()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = scaler.fit(xv, yv, progress=False)
        except (ValueError, TypeError) as e:
            raise CLIError(str(e)) from None
    notes = [str(w.message) for w in caught]
    for note in notes:
        print(f"softcal calibrate: warning: {note}", file=sys.stderr)
    t = result.temperature
    before = metrics.calibration_report(xt, yt, args.bins)
    after = metrics.calibration_report(xt, yt, args.bins, temperature=t)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "reliability_diagram.png"
    js = out / "report.json"
    plots.reliability_diagram(xt, yt, t, n_bins=args.bins,
                              titles=["before (T = 1)", f"after (T = {t:.3f})"]).savefig(png)
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
        "files": {"diagram": str(png), "report": str(js)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__},
        "total_time_s": time.perf_counter() - t_start,
    }
    from . import __version__
    report["versions"]["softcal"] = __version__
    js.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_fmt_table(report))
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="softcal",
        description="Post-hoc calibration of a classifier's saved outputs by temperature scaling.",
    )
    sub = p.add_subparsers(dest="command")
    c = sub.add_parser(
        "calibrate",
        help="fit a temperature on validation scores, report metrics before/after",
        description=__doc__.split("\n\n", 2)[2] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("val", nargs="?", default=None,
                   help="file with validation (scores, labels); default: the embedded DenseNet-40 / "
                        "CIFAR-10 logits")
    c.add_argument("--test", default=None, help="file with test (scores, labels) to evaluate on")
    c.add_argument("--out", default="softcal-out",
                   help="directory for reliability_diagram.png and report.json (default: %(default)s)")
    c.add_argument("--bins", type=int, default=15, help="equal-width bins for ECE/MCE (default: 15)")
    c.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    c.add_argument("--probs", action="store_true",
                   help="the files hold probabilities (rows summing to 1), not logits")
    c.add_argument("--device", default="cpu", help="torch device for the fit (default: cpu)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``softcal`` and ``python -m softcal``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["calibrate"] + argv
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "calibrate":
        parser.print_help()
        return 2
    if args.bins < 1:
        parser.error(f"--bins must be >= 1, got {args.bins}")
    try:
        return _calibrate(args)
    except CLIError as e:
        print(f"softcal calibrate: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
