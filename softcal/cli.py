"""The ``softcal`` command: post-hoc calibration of a classifier's saved outputs.

    softcal calibrate [VAL] [--test TEST] [--save T.json] ...   fit T, report before/after
    softcal evaluate FILE [--temperature T|T.json] ...          metrics and diagram, no fitting
    softcal apply FILE --temperature T|T.json [--out OUT] ...   write calibrated probabilities
    softcal bench [...]                                         the loss benchmark (quick)

``softcal`` and ``python -m softcal`` with no arguments run ``softcal calibrate`` on the embedded
DenseNet-40 / CIFAR-10 logits (softcal/data, MIT licence, see the LICENSE file there).

Files are read safely (see :mod:`softcal._io`): .npz/.npy without pickles, .pt with
``weights_only=True``, CSV/TSV, Parquet (with pyarrow); pickles and object arrays only with
``--allow-pickle``. Exit status: 0 success, 2 usage or input error (one line on stderr), 1
unexpected failure (set SOFTCAL_TRACEBACK=1 for the traceback).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from . import _io
from ._io import FORMATS, InputError, Split

__all__ = ["main", "load_scores", "DEFAULT_DATA", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

DEFAULT_DATA = _io.EMBEDDED
DEFAULT_NAME = "DenseNet-40 / CIFAR-10 logits (embedded; Kängsepp 2018, MIT)"
EMBEDDED_ID = "embedded:softcal/data/densenet40_c10_logits.npz"

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEFAULT_CHUNK_ROWS = 65536

EXIT_CODES = ("exit status: 0 success; 2 usage or input error (one line on stderr: a bad option, "
              "an unreadable or unsafe file, a device that is not there); 1 unexpected failure "
              "(set SOFTCAL_TRACEBACK=1 to see the traceback)")


class CLIError(InputError):
    """A user error: printed as one line, exit status 2."""


def load_scores(path: str, allow_pickle: bool = False) -> Dict[str, Split]:
    """Load a file of (scores, labels) safely (see :func:`softcal._io.load_scores`)."""
    return _io.load_scores(path, allow_pickle=allow_pickle)


# ---------------------------------------------------------------------- small helpers
def _device(name: str) -> torch.device:
    """The torch device named by --device, or a one-line CLIError when it is not usable here."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise CLIError(f"--device {name}: this build of torch ({torch.__version__}) has no CUDA "
                           "support; use --device cpu, or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: no CUDA GPU is visible (torch.cuda.is_available() is "
                           "False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as e:  # noqa: BLE001
            raise CLIError(f"--device {name}: not usable here ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return dev


def _progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal, never with --quiet."""
    return not getattr(args, "quiet", False) and sys.stdout.isatty()


def _bar(enabled: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, leave=False, file=sys.stderr, **kw)


def _say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text)


def _columns(args: argparse.Namespace) -> Dict[str, Any]:
    sc = args.score_columns
    return {"allow_pickle": args.allow_pickle, "label_column": args.label_column,
            "score_columns": [c.strip() for c in sc.split(",") if c.strip()] if sc else None}


def _read(args: argparse.Namespace, path: str) -> Dict[str, Split]:
    """load_scores with the column options; a bar over the rows of CSV/Parquet files on a terminal."""
    with _bar(_progress_enabled(args), desc=f"softcal: reading {Path(path).name}", unit="row") as bar:
        def progress(rows: int, total: int) -> None:
            bar.total = total
            bar.update(rows)

        return _io.load_scores(path, progress=progress, **_columns(args))


def _warn_if_probs(command: str, path: str, scores: np.ndarray, probs: bool) -> None:
    """Warn when scores read as logits look like probabilities (rows in [0, 1] summing to 1)."""
    head = np.asarray(scores[:4096], dtype=np.float64)
    if probs or head.size == 0 or head.shape[1] < 2:
        return
    if head.min() >= 0 and head.max() <= 1 and np.allclose(head.sum(1), 1, atol=1e-3):
        print(f"softcal {command}: warning: {path}: the scores look like probabilities (rows in "
              "[0, 1] summing to 1) but are read as logits; pass --probs if they are", file=sys.stderr)


def _logits(scores: np.ndarray, probs: bool, device: torch.device, what: str = "the scores") -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(scores)).to(device)
    if probs:
        x64 = x.double()
        if bool((x64 < 0).any()) or bool((x64 > 1).any()):
            raise CLIError(f"--probs was given but {what} are not in [0, 1]")
        x = torch.log(x64.clamp_min(torch.finfo(torch.float64).tiny))
    return x


def read_temperature(value: str) -> Tuple[float, str]:
    """(T, where it came from) for --temperature: a number > 0 or a JSON file from --save."""
    try:
        t = float(value)
    except ValueError:
        t = None
    if t is not None:
        if not (math.isfinite(t) and t > 0):
            raise CLIError(f"--temperature must be a finite number > 0 or a .json file, got {value!r}")
        return t, "the command line"
    p = Path(value)
    if not p.is_file():
        raise CLIError(f"--temperature {value!r} is neither a number > 0 nor a file")
    try:
        d = json.loads(p.read_text())
        t = float(d["temperature"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CLIError(f"--temperature {value}: not a temperature file written by softcal calibrate "
                       f"--save (a JSON object with a 'temperature'; {type(e).__name__})") from None
    if not (math.isfinite(t) and t > 0):
        raise CLIError(f"--temperature {value}: the temperature {t!r} is not a finite number > 0")
    return t, str(p)


def _scaler(t: float, device: torch.device, dtype: torch.dtype):
    """TemperatureScaler at T, its parameter in ``dtype`` (float64 keeps T exact for float64 data)."""
    from .calibration import TemperatureScaler

    scaler = TemperatureScaler().to(device=device, dtype=dtype)
    scaler.temperature = t
    return scaler


# ---------------------------------------------------------------------- report tables
_ROWS = [
    ("accuracy", "pct", "accuracy"),
    ("NLL", "num", "nll"),
    ("ECE ({nb} bins)", "pct", "ece"),
    ("MCE ({nb} bins)", "pct", "mce"),
    ("Brier", "num", "brier"),
    ("RMS cal. error", "pct", "rmsce"),
    ("adaptive ECE", "pct", "adaptive_ece"),
    ("classwise ECE", "pct", "classwise_ece"),
]


def _metric_lines(columns: List[Tuple[str, Dict[str, float]]], nb: int) -> List[str]:
    def f(kind: str, v: float) -> str:
        return f"{100 * v:.2f}%" if kind == "pct" else f"{v:.4f}"

    w = max([10] + [len(name) + 2 for name, _ in columns])
    lines = [f"  {'metric':<16}" + "".join(f"{name:>{w}}" for name, _ in columns),
             f"  {'-' * (16 + w * len(columns))}"]
    for label, kind, key in _ROWS:
        lines.append(f"  {label.format(nb=nb):<16}" + "".join(f"{f(kind, m[key]):>{w}}" for _, m in columns))
    return lines


def _fmt_table(report: Dict[str, Any]) -> str:
    fit = report["fit"]
    d = report["data"]
    lines = [
        f"softcal calibrate: {d['name']}",
        f"  fitted on {d['fit_split']} ({d['fit_rows']} rows x {d['classes']} classes), evaluated "
        f"on {d['eval_split']} ({d['eval_rows']} rows)",
        f"  temperature T = {fit['temperature']:.4f}   ({fit['iterations']} passes, "
        f"{'converged' if fit['converged'] else 'NOT converged'}"
        + (f", at the {fit['at_bound']} bound" if fit["at_bound"] else "")
        + f", {1000 * fit['time_s']:.1f} ms, backend {report['backend']})",
        "",
    ]
    lines += _metric_lines([("before", report["before"]), ("after", report["after"])], report["n_bins"])
    lines.append("")
    for k, v in report["files"].items():
        lines.append(f"  {k}: {v}")
    return "\n".join(lines)


def _versions() -> Dict[str, str]:
    from . import __version__

    return {"softcal": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _input_id(path: Optional[str]) -> Dict[str, str]:
    p = DEFAULT_DATA if path is None else Path(path)
    return {"path": EMBEDDED_ID if path is None else str(p), "sha256": _io.sha256(p)}


# ---------------------------------------------------------------------- calibrate
def _fit(xv: torch.Tensor, yv: torch.Tensor, progress: bool):
    """TemperatureScaler.fit on (xv, yv); a bar counts the passes on a terminal."""
    from .calibration import TemperatureScaler

    scaler = TemperatureScaler()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if progress:
                with _bar(True, desc="softcal: fitting T", unit="pass") as bar:
                    def passes() -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
                        bar.update(1)
                        yield xv, yv

                    result = scaler.fit(passes, progress=False)
            else:
                result = scaler.fit(xv, yv, progress=False)
        except (ValueError, TypeError) as e:
            raise CLIError(str(e)) from None
    return result, [str(w.message) for w in caught]


def _calibrate(args: argparse.Namespace) -> int:
    from . import backend, metrics, plots

    if args.method != "ts":  # the other calibrators: softcal/_compare.py
        from ._compare import calibrate_method

        return calibrate_method(args)
    t_start = time.perf_counter()
    if args.bins < 1:
        raise CLIError(f"--bins must be >= 1, got {args.bins}")
    if args.val is None and args.test is not None:
        raise CLIError("--test needs a validation file to fit the temperature on: softcal calibrate "
                       "VAL --test TEST (to fit and evaluate on one file, give it as VAL: softcal "
                       f"calibrate {args.test})")
    device = _device(args.device)
    if args.val is None:
        if args.probs:
            raise CLIError("--probs does not apply to the embedded default (it holds logits)")
        data = _io.load_embedded()
        name, probs = DEFAULT_NAME, False
    else:
        data = _read(args, args.val)
        name, probs = args.val, args.probs
    val = data["val"]
    test: Optional[Split] = None
    if args.test is not None:
        tdata = _read(args, args.test)
        test = tdata.get("test", tdata["val"])
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

    xv, yv = _logits(val[0], probs, device), torch.from_numpy(val[1]).to(device)
    if test is not None:
        xt, yt = _logits(test[0], probs, device, "the test scores"), torch.from_numpy(test[1]).to(device)
    else:
        xt, yt = xv, yv

    result, notes = _fit(xv, yv, _progress_enabled(args))
    for note in notes:
        print(f"softcal calibrate: warning: {note}", file=sys.stderr)
    t = result.temperature
    try:
        before = metrics.calibration_report(xt, yt, args.bins)
        after = metrics.calibration_report(xt, yt, args.bins, temperature=t)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "reliability_diagram.png"
    js = out / "report.json"
    plots.reliability_diagram(xt, yt, t, n_bins=args.bins,
                              titles=["before (T = 1)", f"after (T = {t:.3f})"]).savefig(png)
    files = {"diagram": str(png), "report": str(js)}
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
        "versions": _versions(),
        "total_time_s": time.perf_counter() - t_start,
    }
    if args.save:
        inputs = [dict(_input_id(args.val), role="fit (its val split)" if "test" in data else "fit")]
        if "test" in data and args.test is None:
            inputs[0]["role"] += ", evaluate (its test split)"
        if args.test is not None:
            inputs.append(dict(_input_id(args.test), role="evaluate"))
        save = {
            "temperature": t,
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
            "date": _now(),
            "command": "softcal " + shlex.join(args.argv),
        }
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(save, indent=2) + "\n")
    js.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _say(args, _fmt_table(report))
    return EXIT_OK


# ---------------------------------------------------------------------- evaluate
def _evaluate(args: argparse.Namespace) -> int:
    from . import backend, metrics, plots

    if args.bins < 1:
        raise CLIError(f"--bins must be >= 1, got {args.bins}")
    device = _device(args.device)
    t, t_from = (None, None) if args.temperature is None else read_temperature(args.temperature)
    data = _read(args, args.file)
    split = "test" if "test" in data else "val"
    s, y = data[split]
    _warn_if_probs("evaluate", args.file, s, args.probs)
    x, yt = _logits(s, args.probs, device), torch.from_numpy(y).to(device)
    try:
        cols = [("T = 1", metrics.calibration_report(x, yt, args.bins))]
        if t is not None:
            cols.append((f"T = {t:.4g}", metrics.calibration_report(x, yt, args.bins, temperature=t)))
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png, js = out / "reliability_diagram.png", out / "report.json"
    titles = ["uncalibrated (T = 1)"] + ([f"T = {t:.3f}"] if t is not None else [])
    plots.reliability_diagram(x, yt, t, n_bins=args.bins, titles=titles).savefig(png)
    report = {
        "data": {"name": args.file, "split": split if "test" in data else "all rows",
                 "rows": int(x.shape[0]), "classes": int(x.shape[1]), "probs": bool(args.probs),
                 **_input_id(args.file)},
        "n_bins": args.bins,
        "temperature": t,
        "temperature_from": t_from,
        "metrics": {name: m.to_dict() for name, m in cols},
        "backend": backend(device),
        "device": str(device),
        "files": {"diagram": str(png), "report": str(js)},
        "versions": _versions(),
    }
    js.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        lines = [f"softcal evaluate: {args.file}"
                 + (" (its test split)" if "test" in data else ""),
                 f"  {x.shape[0]} rows x {x.shape[1]} classes"
                 + ("" if t is None else f"; temperature T = {t:.4f} from {t_from}"), ""]
        lines += _metric_lines([(n, m.to_dict()) for n, m in cols], args.bins)
        lines += ["", f"  diagram: {png}", f"  report: {js}"]
        _say(args, "\n".join(lines))
    return EXIT_OK


# ---------------------------------------------------------------------- apply
_IN_TO_OUT = {".npz": ".npz", ".npy": ".npy", ".pt": ".pt", ".pth": ".pt", ".csv": ".csv",
              ".tsv": ".tsv", ".parquet": ".parquet", ".pq": ".parquet"}


def _apply(args: argparse.Namespace) -> int:
    from ._compare import read_calibrator

    device = _device(args.device)
    loaded = read_calibrator(args.temperature)  # a calibrator saved by calibrate --method M --save
    t, t_from = read_temperature(args.temperature) if loaded is None else (math.nan, args.temperature)
    if args.chunk_rows < 1:
        raise CLIError(f"--chunk-rows must be >= 1, got {args.chunk_rows}")
    src_path = Path(args.file)
    src = _io.open_scores(src_path, **_columns(args))
    if args.out is None:
        suffix = _IN_TO_OUT.get(src_path.suffix.lower(), ".npz")
        out = src_path.with_name(f"{src_path.stem}-calibrated{suffix}")
    else:
        out = Path(args.out)
    if out.suffix.lower() not in _io.OUTPUT_SUFFIXES:
        raise CLIError(f"--out {out}: cannot write {out.suffix or 'a file without suffix'!r}; "
                       f"write one of {', '.join(_io.OUTPUT_SUFFIXES)}")
    if out.exists() and out.resolve() == src_path.resolve():
        raise CLIError(f"--out {out} is the input file; write to another file")
    if out.suffix.lower() == ".parquet":
        _io._pyarrow()
    key = "logits" if args.logits else "probs"
    dtype = np.dtype(np.float64 if src.dtype == np.float64 else np.float32)
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    scaler = _scaler(t, device, tdtype) if loaded is None else loaded[0].to(device)

    def calibrated() -> Iterator[Tuple[np.ndarray, Optional[np.ndarray]]]:
        with _bar(_progress_enabled(args), total=src.rows, desc="softcal: applying T",
                  unit="row") as bar, torch.no_grad():
            for i, (s, y) in enumerate(src.chunks(args.chunk_rows)):
                if i == 0:
                    _warn_if_probs("apply", args.file, s, args.probs)
                x = torch.from_numpy(np.array(s, order="C")).to(device)  # a copy: s may be read-only
                if x.dtype != tdtype:
                    x = x.to(tdtype)
                if args.probs:
                    if bool((x < 0).any()) or bool((x > 1).any()):
                        raise CLIError("--probs was given but the scores are not in [0, 1]")
                    x = torch.log(x.clamp_min(torch.finfo(tdtype).tiny))
                z = scaler(x)
                v = z if args.logits else torch.softmax(z, dim=1)
                bar.update(s.shape[0])
                yield v.cpu().numpy(), y

    try:
        _io.write_chunks(out, calibrated(), rows=src.rows, classes=src.classes, dtype=dtype, key=key,
                         label_name=src.label_name, columns=src.columns)
    except BaseException:
        if out.exists():
            out.unlink()  # no half-written output
        raise
    what = f"T = {t:.4f}" if loaded is None else f"the {loaded[1]} calibrator"
    _say(args, f"softcal apply: {what} (from {t_from}) applied to {src.rows} rows x "
               f"{src.classes} classes of {src_path}\n  wrote {key}"
               + (" and labels" if src.has_labels and out.suffix.lower() != ".npy" else "")
               + f" ({dtype.name}) to {out}")
    return EXIT_OK


# ---------------------------------------------------------------------- bench
def _bench(argv: List[str]) -> int:
    from . import bench

    return bench.main(argv, prog="softcal bench", quick_default=True)


# ---------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, probs: bool = True) -> None:
    g = p.add_argument_group("input")
    if probs:
        g.add_argument("--probs", action="store_true",
                       help="the files hold probabilities (rows summing to 1), not logits")
    g.add_argument("--label-column", metavar="NAME", default=None,
                   help="column (CSV/Parquet) or array (.npz, dict) of the labels (default: the "
                        "first of label, labels, target, targets, y, class, ground_truth)")
    g.add_argument("--score-columns", metavar="A,B,...|PREFIX*", default=None,
                   help="score columns, comma-separated or a prefix ending in * (default: every "
                        "column but the labels); for .npz or a dict, the name of the scores array")
    g.add_argument("--allow-pickle", action="store_true",
                   help="also read pickles and object arrays: they run code when loaded, so only "
                        "for files you trust")
    o = p.add_argument_group("run")
    o.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    o.add_argument("--quiet", "-q", action="store_true",
                   help="print nothing but warnings and errors (no table, no progress bars)")


def _compare_methods() -> Tuple[str, ...]:
    from ._compare import METHODS

    return METHODS


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    formats = f"Files read: {FORMATS}; any other suffix is refused."
    p = argparse.ArgumentParser(
        prog="softcal",
        description="Post-hoc calibration of a classifier's saved outputs by temperature "
                    "scaling. With no arguments: softcal calibrate on the embedded DenseNet-40 / "
                    "CIFAR-10 logits.",
        epilog=f"{formats}\n{EXIT_CODES}.\n'softcal COMMAND --help' describes each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version",
                   version=f"softcal {__version__} (torch {torch.__version__}, python "
                           f"{platform.python_version()})")
    sub = p.add_subparsers(dest="command", metavar="COMMAND",
                           title="commands (softcal COMMAND --help for each)")

    c = sub.add_parser(
        "calibrate", help="fit a temperature on validation scores, report metrics before/after",
        description="Fit a temperature T on VAL (exactly: the NLL minimiser), print accuracy, NLL, "
                    "ECE, MCE, Brier (and more) before and after on TEST (or on VAL's test split, "
                    "or on VAL itself), and write reliability_diagram.png and report.json into "
                    "--out DIR. With no VAL: the embedded DenseNet-40 / CIFAR-10 logits (fit on "
                    "the 5000-row validation split, evaluated on the 10000-row test split).",
        epilog=f"{formats}\n{EXIT_CODES}.",
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
    c.add_argument("--bins", type=int, default=15, help="equal-width bins for ECE/MCE (default: 15)")
    c.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    c.add_argument("--method", default="ts", choices=_compare_methods(),
                   help="calibration method (default: ts, temperature scaling); the others are "
                        "fitted as softcal.nn's calibrators with their default options")
    _common(c)

    e = sub.add_parser(
        "evaluate", help="print calibration metrics and write the diagram, without fitting",
        description="Print accuracy, NLL, ECE, MCE, Brier (and more) of FILE's scores (its test "
                    "split when it has one) at T = 1, and at --temperature when given, and write "
                    "reliability_diagram.png and report.json into --out DIR. Nothing is fitted.",
        epilog=f"{formats}\n{EXIT_CODES}.", formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("file", metavar="FILE", help="file with (scores, labels)")
    e.add_argument("--temperature", metavar="T|T.json", default=None,
                   help="also evaluate at this temperature (a number, or the file of --save)")
    e.add_argument("--out", default="softcal-out", metavar="DIR",
                   help="directory for reliability_diagram.png and report.json (default: %(default)s)")
    e.add_argument("--bins", type=int, default=15, help="equal-width bins for ECE/MCE (default: 15)")
    e.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    _common(e)

    a = sub.add_parser(
        "apply", help="write calibrated probabilities (or logits) of new data",
        description="Divide FILE's logits by T and write softmax(logits / T) (or, with --logits, "
                    "logits / T) to --out, chunk by chunk: .npy inputs are memory-mapped and "
                    ".npz, CSV and Parquet inputs are read a block of rows at a time, so files "
                    "larger than memory work (.pt and pickles are loaded whole). Labels, when "
                    "FILE has them, are copied (not into .npy, which holds one array).",
        epilog="Output format by the suffix of --out: .npz (arrays 'probs' or 'logits', and "
               "'labels'), .npy, .csv, .tsv, .parquet (the input's column names), .pt. Default: "
               f"FILE-calibrated with the input's suffix (.npz for pickles).\n{formats}\n{EXIT_CODES}.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("file", metavar="FILE", help="file with scores (labels optional)")
    a.add_argument("--temperature", "-t", metavar="T|T.json", required=True,
                   help="the temperature: a number > 0, or the file written by calibrate --save")
    a.add_argument("--out", "-o", default=None, metavar="OUT",
                   help="output file (default: FILE-calibrated.<suffix>)")
    a.add_argument("--logits", action="store_true",
                   help="write calibrated logits (logits / T) instead of probabilities")
    a.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, metavar="N",
                   help="rows per chunk (default: %(default)s)")
    _common(a)

    from ._compare import add_compare_parser

    add_compare_parser(sub, _common, f"{formats}\n{EXIT_CODES}.")

    sub.add_parser("bench", add_help=False,
                   help="the loss benchmark (quick by default; softcal bench --help for options)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``softcal`` and ``python -m softcal``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["calibrate"] + argv
    if argv[0] == "bench":
        return _guard("bench", lambda: _bench(argv[1:]))
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2, message printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    args.argv = argv
    from ._compare import compare

    run = {"calibrate": _calibrate, "evaluate": _evaluate, "apply": _apply, "compare": compare}[args.command]
    return _guard(args.command, lambda: run(args))


def _guard(command: str, fn: Callable[[], int]) -> int:
    try:
        return fn()
    except InputError as e:
        print(f"softcal {command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"softcal {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (unexpected: one line, status 1)
        if os.environ.get("SOFTCAL_TRACEBACK", "0") not in ("", "0"):
            traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else ""
        print(f"softcal {command}: unexpected error: {type(e).__name__}: {msg} (please report it; "
              "SOFTCAL_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
