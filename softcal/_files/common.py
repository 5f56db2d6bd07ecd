"""What every reader and writer shares: the file kinds, the formats line, the one error type."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["FORMATS", "InputError", "OUTPUT_SUFFIXES", "kind_of", "pickle_refused", "short",
           "unreadable", "NPZ", "NPY", "PT", "CSV", "TSV", "PARQUET", "PICKLE"]

NPZ, NPY, PT, CSV, TSV, PARQUET, PICKLE = "npz", "npy", "pt", "csv", "tsv", "parquet", "pickle"
_SUFFIX = {".npz": NPZ, ".npy": NPY, ".pt": PT, ".pth": PT, ".csv": CSV, ".tsv": TSV,
           ".parquet": PARQUET, ".pq": PARQUET, ".p": PICKLE, ".pkl": PICKLE, ".pickle": PICKLE}

#: One line naming the formats that are read (used in error messages and the help).
FORMATS = (".npz, .npy, .pt/.pth, .csv, .tsv, .parquet/.pq (with pyarrow); pickles "
           "(.p, .pkl, .pickle) only with --allow-pickle")

#: Suffixes ``softcal apply`` writes.
OUTPUT_SUFFIXES = (".npz", ".npy", ".pt", ".csv", ".tsv", ".parquet")


class InputError(Exception):
    """A file that cannot be used as given: the message is one line for the user."""


def kind_of(path: Path) -> str:
    """The kind of file (``npz``, ``csv``, ...) by its suffix; InputError for any other suffix."""
    kind = _SUFFIX.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{path}: unknown file type {path.suffix or '(no suffix)'!r}; the formats "
                         f"read are {FORMATS}")
    return kind


def pickle_refused(path: Path, what: str) -> InputError:
    return InputError(f"{path}: {what}; loading it would run code stored in the file. Pass "
                      "--allow-pickle only if you trust the file (or save it as .npz: "
                      "numpy.savez(path, logits=..., labels=...))")


def unreadable(path: Path, kind: str, e: BaseException) -> InputError:
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    return InputError(f"{path}: could not read it as {kind} ({type(e).__name__}: {msg}); the formats "
                      f"read are {FORMATS}")


def short(names: Sequence[str], n: int = 12) -> str:
    names = list(names)
    return str(names) if len(names) <= n else f"{names[:n]} ... ({len(names)} columns)"
