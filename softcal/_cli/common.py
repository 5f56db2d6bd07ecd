"""What the commands share: exit statuses, options, devices, temperatures, reading and writing.

Writing an output safely (every command does it this way; a new command should too):

1. before anything is computed, :func:`check_outputs` with every output as ``(option, path)``
   and every file the command read (``inputs``): a directory, a missing folder, an output that
   is an input (by device and inode: hard and symbolic links included) or two outputs that are
   the same file are refused with exit status 2;
2. then write each output with ``with atomic_output(path) as tmp: ...write to tmp...`` (or
   :func:`write_text`): the target is replaced only when the content is complete, and is left
   as it was on an error, Ctrl-C, SIGTERM or SIGHUP (:mod:`softcal._files.atomic`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from .. import _io
from .._io import InputError, Split, atomic_output, check_outputs, write_text

__all__ = ["CLIError", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_PIPE", "EXIT_CODES", "MAX_BINS",
           "DEFAULT_DATA", "DEFAULT_NAME", "EMBEDDED_ID", "FORMATS_LINE", "add_input_options",
           "atomic_output", "bar", "check_bins", "check_outputs", "columns", "device", "input_id", "logits",
           "now", "progress_enabled", "read", "read_temperature", "say", "scaler", "temperature_file", "versions",
           "warn_if_probs", "write_text"]

DEFAULT_DATA = _io.EMBEDDED
DEFAULT_NAME = "DenseNet-40 / CIFAR-10 logits (embedded; Kängsepp 2018, MIT)"
EMBEDDED_ID = "embedded:softcal/data/densenet40_c10_logits.npz"

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away

EXIT_CODES = ("exit status: 0 success; 2 usage or input error (one line on stderr: a bad option, "
              "an unreadable, unsafe or invalid file, an output that would overwrite an input, a "
              "device that is not there); 1 unexpected failure (set SOFTCAL_TRACEBACK=1 to see the "
              "traceback); 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP (no output is left half-written); "
              "141, silently, when stdout is a pipe closed early (softcal ... | head)")
FORMATS_LINE = f"Files read: {_io.FORMATS}; any other suffix is refused."

#: --bins above this is refused before anything is read: the metrics and the diagram allocate and
#: draw per bin (on the embedded 15000 rows, 15 bins take 3 s of CPU, 1000 bins 6.5 s, 10^4 bins
#: 25 s and 560 MB, 10^7 bins ran 290 s to 9.4 GB)
MAX_BINS = 1000
_MAX_TEMPERATURE_FILE = 16 << 20


class CLIError(InputError):
    """A user error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------- options
def add_input_options(p: argparse.ArgumentParser, probs: bool = True) -> None:
    """The input and run options every command (but bench) takes."""
    g = p.add_argument_group("input")
    if probs:
        g.add_argument("--probs", action="store_true",
                       help="the files hold probabilities (rows summing to 1), not logits")
    g.add_argument("--label-column", metavar="NAME", default=None,
                   help="column (CSV/Parquet) or array (.npz, dict) of the labels (default: the "
                        "first of label, labels, target, targets, y, class, ground_truth)")
    g.add_argument("--score-columns", metavar="A,B,...|PREFIX*", default=None,
                   help="score columns, comma-separated or a prefix ending in * (default: every "
                        "column but the labels and an unnamed first column counting 0..N-1, "
                        "pandas' index); for .npz or a dict, the name of the scores array")
    g.add_argument("--allow-pickle", action="store_true",
                   help="also read pickles and object arrays: they run code when loaded, so only "
                        "for files you trust")
    o = p.add_argument_group("run")
    o.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    o.add_argument("--quiet", "-q", action="store_true",
                   help="print nothing but warnings and errors (no table, no progress bars)")


def check_bins(bins: int) -> None:
    if not 1 <= bins <= MAX_BINS:
        raise CLIError(f"--bins must be in [1, {MAX_BINS}], got {bins}")


def columns(args: argparse.Namespace) -> Dict[str, Any]:
    sc = args.score_columns
    return {"allow_pickle": args.allow_pickle, "label_column": args.label_column,
            "score_columns": [c.strip() for c in sc.split(",") if c.strip()] if sc else None}


# ---------------------------------------------------------------------- small helpers
def device(name: str) -> torch.device:
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


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars only on a terminal, never with --quiet."""
    return not getattr(args, "quiet", False) and sys.stdout.isatty()


def bar(enabled: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, leave=False, file=sys.stderr, **kw)


def say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text)


def read(args: argparse.Namespace, path: str, probs: bool = False) -> Dict[str, Split]:
    """The whole file (every split), checked as every command checks it; a bar over the rows of
    streamed files on a terminal."""
    with bar(progress_enabled(args), desc=f"softcal: reading {Path(path).name}", unit="row") as b:
        def progress(rows: int, total: int) -> None:
            b.total = total
            b.update(rows)

        return _io.load_scores(path, progress=progress, probs=probs, **columns(args))


def warn_if_probs(command: str, path: str, scores: np.ndarray, probs: bool) -> None:
    """Warn when scores read as logits look like probabilities (rows in [0, 1] summing to 1)."""
    head = np.asarray(scores[:4096], dtype=np.float64)
    if probs or head.size == 0 or head.shape[1] < 2:
        return
    if head.min() >= 0 and head.max() <= 1 and np.allclose(head.sum(1), 1, atol=1e-3):
        print(f"softcal {command}: warning: {path}: the scores look like probabilities (rows in "
              "[0, 1] summing to 1) but are read as logits; pass --probs if they are", file=sys.stderr)


def logits(scores: np.ndarray, probs: bool, dev: torch.device) -> torch.Tensor:
    """Checked scores as logits on ``dev``: probabilities (in [0, 1], checked by the reader) as
    their log in float64 (0 as the log of the smallest float64)."""
    x = torch.from_numpy(np.ascontiguousarray(scores)).to(dev)
    if probs:
        x = torch.log(x.double().clamp_min(torch.finfo(torch.float64).tiny))
    return x


def read_temperature(value: str) -> Tuple[float, str]:
    """(T, where it came from) for --temperature: a number > 0 or a JSON file from --save."""
    try:
        t: Optional[float] = float(value)
    except ValueError:
        t = None
    if t is not None:
        if not (math.isfinite(t) and t > 0):
            raise CLIError(f"--temperature must be a finite number > 0 or a .json file, got {value!r}")
        return t, "the command line"
    p = Path(value)
    if not p.is_file():
        raise CLIError(f"--temperature {value!r} is neither a number > 0 nor a file")
    not_ours = (f"--temperature {value}: not a temperature file written by softcal calibrate --save "
                "(a JSON object whose 'temperature' is a number")
    try:
        if p.stat().st_size > _MAX_TEMPERATURE_FILE:
            raise CLIError(f"{not_ours}; this file has {p.stat().st_size} bytes)")
        d = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CLIError(f"{not_ours}; {type(e).__name__})") from None
    except OSError as e:
        raise CLIError(f"--temperature {value}: cannot read it ({e.strerror or e})") from None
    raw = d.get("temperature") if isinstance(d, dict) else None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        got = "no 'temperature'" if raw is None else f"'temperature' is {json.dumps(raw)[:40]}"
        raise CLIError(f"{not_ours}; {got})")
    t = float(raw)
    if not (math.isfinite(t) and t > 0):
        raise CLIError(f"--temperature {value}: the temperature {t!r} is not a finite number > 0")
    return t, str(p)


def scaler(t: float, dev: torch.device, dtype: torch.dtype):
    """TemperatureScaler at T, its parameter in ``dtype`` (float64 keeps T exact for float64 data)."""
    from ..calibration import TemperatureScaler

    s = TemperatureScaler().to(device=dev, dtype=dtype)
    s.temperature = t
    return s


def versions() -> Dict[str, str]:
    from .. import __version__

    return {"softcal": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def input_id(path: Optional[str]) -> Dict[str, str]:
    p = DEFAULT_DATA if path is None else Path(path)
    return {"path": EMBEDDED_ID if path is None else str(p), "sha256": _io.sha256(p)}


def temperature_file(value: Optional[str]) -> Optional[Path]:
    """The file --temperature names (an input to protect), or None for a number."""
    if value is None:
        return None
    try:
        float(value)
        return None
    except ValueError:
        return Path(value)
