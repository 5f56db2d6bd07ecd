"""``softcal evaluate``: the metrics and the diagram of a file's scores, nothing fitted."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import common as C
from .calibrate import check_out_dir, finite_metrics, out_files
from .report import metric_lines

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    e = sub.add_parser(
        "evaluate", help="print calibration metrics and write the diagram, without fitting",
        description="Print accuracy, NLL, ECE, MCE, Brier (and more) of FILE's scores (its test "
                    "split when it has one) at T = 1, and at --temperature when given, and write "
                    "reliability_diagram.png and report.json into --out DIR. Nothing is fitted.",
        epilog=f"{C.FORMATS_LINE}\n{C.EXIT_CODES}.", formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("file", metavar="FILE", help="file with (scores, labels)")
    e.add_argument("--temperature", metavar="T|T.json", default=None,
                   help="also evaluate at this temperature (a number, or the file of --save)")
    e.add_argument("--out", default="softcal-out", metavar="DIR",
                   help="directory for reliability_diagram.png and report.json (default: %(default)s)")
    e.add_argument("--bins", type=int, default=15,
                   help=f"equal-width bins for ECE/MCE, 1 to {C.MAX_BINS} (default: 15)")
    e.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    C.add_input_options(e)
    return e


def run(args: argparse.Namespace) -> int:
    from .. import backend, metrics, plots

    C.check_bins(args.bins)
    device = C.device(args.device)
    t, t_from = (None, None) if args.temperature is None else C.read_temperature(args.temperature)
    out = Path(args.out)
    png, js = out_files(out)
    check_out_dir(out)
    C.check_outputs([("--out", png), ("--out", js)],
                    [Path(args.file), C.temperature_file(args.temperature)], create_folders=True)
    data = C.read(args, args.file, probs=args.probs)
    split = "test" if "test" in data else "val"
    s, y = data[split]
    if s.shape[0] == 0:
        raise C.CLIError(f"{args.file}: no rows to evaluate")
    C.warn_if_probs("evaluate", args.file, s, args.probs)
    x, yt = C.logits(s, args.probs, device), torch.from_numpy(y).to(device)
    try:
        cols = [("T = 1", metrics.calibration_report(x, yt, args.bins))]
        if t is not None:
            cols.append((f"T = {t:.4g}", metrics.calibration_report(x, yt, args.bins, temperature=t)))
    except (ValueError, TypeError) as e:
        raise C.CLIError(str(e)) from None
    for name, m in cols:
        finite_metrics(f"at {name}", m)
    titles = ["uncalibrated (T = 1)"] + ([f"T = {t:.3f}"] if t is not None else [])
    report = {
        "data": {"name": args.file, "split": split if "test" in data else "all rows",
                 "rows": int(x.shape[0]), "classes": int(x.shape[1]), "probs": bool(args.probs),
                 **C.input_id(args.file)},
        "n_bins": args.bins,
        "temperature": t,
        "temperature_from": t_from,
        "metrics": {name: m.to_dict() for name, m in cols},
        "backend": backend(device),
        "device": str(device),
        "files": {"diagram": str(png), "report": str(js)},
        "versions": C.versions(),
    }
    fig = plots.reliability_diagram(x, yt, t, n_bins=args.bins, titles=titles)
    with C.atomic_output(png) as tmp:
        fig.savefig(tmp)
    C.write_text(js, json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        lines = [f"softcal evaluate: {args.file}"
                 + (" (its test split)" if "test" in data else ""),
                 f"  {x.shape[0]} rows x {x.shape[1]} classes"
                 + ("" if t is None else f"; temperature T = {t:.6g} from {t_from}"), ""]
        lines += metric_lines([(n, m.to_dict()) for n, m in cols], args.bins)
        lines += ["", f"  diagram: {png}", f"  report: {js}"]
        C.say(args, "\n".join(lines))
    return C.EXIT_OK
