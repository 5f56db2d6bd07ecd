"""Reading classifier outputs safely, and writing calibrated ones chunk by chunk.

Used by the ``softcal`` command (:mod:`softcal.cli`). Nothing here runs code stored in a file
unless ``allow_pickle=True``:

* ``.npz`` / ``.npy``: ``numpy.load(allow_pickle=False)``; object arrays are refused;
* ``.pt`` / ``.pth``: ``torch.load(weights_only=True)`` (tensors, numbers, lists, tuples, dicts);
* ``.csv`` / ``.tsv``: the standard library's csv reader (a header row of column names, or no
  header: columns are then named ``0``, ``1``, ...; UTF-8 with or without a byte-order mark;
  blank lines skipped; an unnamed first column counting 0..N-1, pandas' index, is not a score);
* ``.parquet`` / ``.pq``: through pyarrow, when it is installed;
* ``.p`` / ``.pkl`` / ``.pickle`` (and object arrays in ``.npy``/``.npz``, and ``.pt`` files that
  are not weights-only): only with ``allow_pickle=True``, because unpickling runs code.

Any other suffix is refused with the list of these formats.

What a file holds (scores (N, C) float, labels (N,) integers):

* tabular files: one label column and C score columns; the label column is the one named by
  ``label_column`` or else the first of ``label``, ``labels``, ``target``, ``targets``, ``y``,
  ``class``, ``ground_truth``; the score columns are ``score_columns`` (names, or ``PREFIX*``) or
  else every other column;
* named arrays (``.npz``, a dict in ``.pt``/pickle): scores under ``logits``, ``probs``,
  ``probabilities``, ``predictions`` or ``scores`` (or ``score_columns``), labels under ``labels``,
  ``targets``, ``target``, ``y`` or ``ground_truth`` (or ``label_column``); or two splits
  ``logits_val``, ``labels_val``, ``logits_test``, ``labels_test``;
* a pair ``(scores, labels)`` or a pair of pairs ``((val_scores, val_labels), (test_scores,
  test_labels))`` (``.pt``, or pickles such as the markus93/NN_calibration files);
* for ``softcal apply`` a file may hold scores only (a 2-D ``.npy`` is read memory-mapped).

Every command reads through the same sources (:mod:`softcal._files.source`) and the same checks
(:mod:`softcal._files.check`): a file is refused by ``calibrate``, ``evaluate`` and ``apply``
alike, with one line that names the file and what is wrong (:class:`InputError`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

from ._files.arrays import open_array_file
from ._files.atomic import atomic_output, check_outputs, same_file, signals_raise, write_text
from ._files.common import (CSV, FORMATS, OUTPUT_SUFFIXES, PARQUET, TSV, InputError, kind_of,
                            pickle_refused, unreadable)
from ._files.source import ArraySource, ScoreSource, Split
from ._files.tabular import Columns, CsvSource, ParquetSource, pyarrow_parquet
from ._files.write import output_columns, write_chunks

__all__ = [
    "FORMATS",
    "InputError",
    "ScoreSource",
    "Split",
    "load_embedded",
    "load_scores",
    "open_scores",
    "open_splits",
    "sha256",
    "write_chunks",
    "OUTPUT_SUFFIXES",
    "atomic_output",
    "check_outputs",
    "output_columns",
    "same_file",
    "signals_raise",
    "write_text",
]

EMBEDDED = Path(__file__).resolve().parent / "data" / "densenet40_c10_logits.npz"

# the names this module had before it was split (kept for callers and tests)
_ArraySource = ArraySource
_pyarrow = pyarrow_parquet
_pickle_refused = pickle_refused
_unreadable = unreadable


def sha256(path: Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(block), b""):
            h.update(b)
    return h.hexdigest()


def open_splits(path: str | Path, *, allow_pickle: bool = False, label_column: Optional[str] = None,
                score_columns: Optional[Sequence[str]] = None, need_labels: bool = True,
                probs: bool = False) -> Dict[str, ScoreSource]:
    """Open a file of scores: ``{"val": source[, "test": source]}``, each a :class:`ScoreSource`
    whose shapes and dtypes are checked already (values are checked as they are read).

    ``.npy`` (a 2-D float array) is memory-mapped; ``.npz`` members, CSV/TSV and Parquet are
    read a block of rows at a time; ``.pt`` and pickles are loaded whole. ``probs``: the scores
    are probabilities (each in [0, 1]). Raises :class:`InputError` (one line) for every file it
    cannot use.
    """
    p = Path(path)
    kind = kind_of(p)
    if not p.is_file():
        raise InputError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
    cols = Columns(label_column, list(score_columns) if score_columns else None)
    try:
        if kind in (CSV, TSV):
            return {"val": CsvSource(p, "\t" if kind == TSV else ",", cols, need_labels, probs)}
        if kind == PARQUET:
            return {"val": ParquetSource(p, cols, need_labels, probs)}
    except (InputError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001  (any unreadable file: one line)
        raise unreadable(p, kind, e) from None
    return open_array_file(p, kind, cols, need_labels=need_labels, allow_pickle=allow_pickle,
                           probs=probs)


def load_scores(path: str | Path, *, allow_pickle: bool = False, label_column: Optional[str] = None,
                score_columns: Optional[Sequence[str]] = None, need_labels: bool = True,
                progress: Optional[Callable[[int, int], None]] = None,
                probs: bool = False) -> Dict[str, Split]:
    """Load a whole file of (scores, labels) safely.

    Returns ``{"val": (scores, labels)[, "test": (scores, labels)]}``: scores (N, C) float32 or
    float64 numpy (float16/bfloat16 widened to float32), labels (N,) int64 in [0, C) (None when
    ``need_labels`` is False and the file has none). Raises :class:`InputError` with one line for
    every file it cannot use, before allocating more memory than is available.
    ``progress(rows_read, rows_total)`` is called after each block of a streamed file.
    """
    sources = open_splits(path, allow_pickle=allow_pickle, label_column=label_column,
                          score_columns=score_columns, need_labels=need_labels, probs=probs)
    return {k: src.read_all(progress) for k, src in sources.items()}


def open_scores(path: str | Path, *, allow_pickle: bool = False, label_column: Optional[str] = None,
                score_columns: Optional[Sequence[str]] = None, need_labels: bool = False,
                probs: bool = False) -> ScoreSource:
    """Open a file of one set of scores for reading chunk by chunk (see :func:`open_splits`);
    a file of a validation and a test split is refused."""
    sources = open_splits(path, allow_pickle=allow_pickle, label_column=label_column,
                          score_columns=score_columns, need_labels=need_labels, probs=probs)
    if "test" in sources:
        raise InputError(f"{path}: holds a validation and a test split; softcal apply and evaluate "
                         "read one set of scores (name them 'logits' and 'labels')")
    return sources["val"]


def load_embedded() -> Dict[str, Split]:
    """The DenseNet-40 / CIFAR-10 logits shipped in softcal/data (val 5000 rows, test 10000)."""
    return load_scores(EMBEDDED)
