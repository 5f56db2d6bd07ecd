"""The tables that calibrate and evaluate print."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

__all__ = ["metric_lines", "calibrate_table"]

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


def metric_lines(columns: List[Tuple[str, Dict[str, float]]], nb: int) -> List[str]:
    """One line per metric, one column per (name, metrics) pair."""
    def f(kind: str, v: float) -> str:
        return f"{100 * v:.2f}%" if kind == "pct" else f"{v:.4f}" if abs(v) < 1e6 else f"{v:.4g}"

    w = max([10] + [len(name) + 2 for name, _ in columns])
    lines = [f"  {'metric':<16}" + "".join(f"{name:>{w}}" for name, _ in columns),
             f"  {'-' * (16 + w * len(columns))}"]
    for label, kind, key in _ROWS:
        lines.append(f"  {label.format(nb=nb):<16}" + "".join(f"{f(kind, m[key]):>{w}}" for _, m in columns))
    return lines


def calibrate_table(report: Dict[str, Any]) -> str:
    """The text that softcal calibrate prints (without --json)."""
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
    lines += metric_lines([("before", report["before"]), ("after", report["after"])], report["n_bins"])
    lines.append("")
    for k, v in report["files"].items():
        lines.append(f"  {k}: {v}")
    return "\n".join(lines)
