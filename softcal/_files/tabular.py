"""Tables: CSV/TSV (the standard library's reader) and Parquet (pyarrow), a block of rows at a time.

A header row names the columns (UTF-8, with or without the byte-order mark that Excel writes);
without one the columns are named ``0``, ``1``, ... Blank lines are skipped (and never end the
reading early). An unnamed first column (pandas' ``DataFrame.to_csv`` index: ``,label,logit_0``,
read back by pandas as ``Unnamed: 0``) is taken as the row index: it must count 0..N-1 and is not a
score; in Parquet, pandas' ``__index_level_*`` columns are never scores.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .common import CSV, PARQUET, TSV, InputError, short, unreadable
from .source import ScoreSource

__all__ = ["Columns", "CsvSource", "ParquetSource", "pyarrow_parquet"]

LABEL_KEYS = ("labels", "label", "targets", "target", "y", "class", "ground_truth")
INDEX_NAMES = ("", "Unnamed: 0")


@dataclass
class Columns:
    """Which columns (or arrays) hold the labels and the scores."""

    label: Optional[str] = None
    scores: Optional[Sequence[str]] = None  # names, or one "PREFIX*"

    def pick(self, names: Sequence[str], path: Path, need_labels: bool,
             skip: Sequence[int] = ()) -> Tuple[Optional[int], List[int]]:
        """Indices of (label column or None, score columns) among ``names``; the columns ``skip``
        (an index) are scores only when named by --score-columns."""
        names = list(names)
        if self.label is not None:
            if self.label not in names:
                raise InputError(f"{path}: --label-column {self.label!r} is not a column; the "
                                 f"columns are {short(names)}")
            li: Optional[int] = names.index(self.label)
        else:
            li = next((names.index(k) for k in LABEL_KEYS if k in names), None)
            if li is None:
                low = [n.lower() for n in names]
                li = next((low.index(k) for k in LABEL_KEYS if k in low), None)
        if li is None and need_labels:
            raise InputError(f"{path}: no label column among {short(names)}; name it 'label' or "
                             "pass --label-column NAME")
        if self.scores:
            if len(self.scores) == 1 and self.scores[0].endswith("*"):
                prefix = self.scores[0][:-1]
                si = [i for i, n in enumerate(names) if n.startswith(prefix) and i != li]
                if not si:
                    raise InputError(f"{path}: no column starts with {prefix!r} "
                                     f"(--score-columns {self.scores[0]}); the columns are {short(names)}")
            else:
                missing = [s for s in self.scores if s not in names]
                if missing:
                    raise InputError(f"{path}: --score-columns names {missing} that are not columns; "
                                     f"the columns are {short(names)}")
                si = [names.index(s) for s in self.scores]
        else:
            si = [i for i in range(len(names)) if i != li and i not in skip]
        if not si:
            raise InputError(f"{path}: no score columns (the columns are {short(names)})")
        return li, si


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


class CsvSource(ScoreSource):
    """A CSV/TSV file read a block of rows at a time (every value parsed as float64)."""

    def __init__(self, path: Path, delimiter: str, cols: Columns, need_labels: bool, probs: bool = False):
        self.path, self.delimiter, self.probs = path, delimiter, probs
        self.kind = TSV if delimiter == "\t" else CSV
        with self._open() as f:
            r = csv.reader(f, delimiter=delimiter)
            first = next((row for row in r if row), None)
            if first is None:
                raise InputError(f"{path}: empty file")
            self.header = not all(_is_number(v) for v in first)
            names = [v.strip() for v in first] if self.header else [str(i) for i in range(len(first))]
            rows = sum(1 for row in r if row) + (0 if self.header else 1)
        # pandas' index column: unnamed, first, and not chosen by the column options
        self.index = 0 if (self.header and names[0] in INDEX_NAMES and cols.label != names[0]
                           and not cols.scores and len(names) > 1) else None
        li, si = cols.pick(names, path, need_labels, skip=() if self.index is None else (0,))
        self.li, self.si, self.width, self.names = li, si, len(names), names
        self.columns = [names[i] for i in si]
        self.label_name = None if li is None else names[li]
        self._layout((rows, len(si)), np.dtype(np.float64), None if li is None else (rows,),
                     np.dtype(np.float64), need_labels)

    def _open(self):
        return open(self.path, newline="", encoding="utf-8-sig")

    def _blocks(self, rows):
        with self._open() as f:
            r = csv.reader(f, delimiter=self.delimiter)
            nonblank = (row for row in r if row)
            if self.header:
                next(nonblank)
            done = 0
            while True:
                lines: List[int] = []
                block = []
                for row in itertools.islice(nonblank, rows):
                    block.append(row)
                    lines.append(r.line_num)
                if not block:
                    return
                try:
                    arr = np.array(block, dtype=np.float64)
                except ValueError:
                    for k, row in enumerate(block):
                        if len(row) != self.width:
                            raise InputError(f"{self.path}: line {lines[k]} has {len(row)} fields, "
                                             f"the header has {self.width}") from None
                        bad = next((v for v in row if not _is_number(v)), None)
                        if bad is not None:
                            raise InputError(f"{self.path}: line {lines[k]}: {bad!r} is not a "
                                             "number") from None
                    raise
                if self.index is not None:
                    want = np.arange(done, done + len(block), dtype=np.float64)
                    off = np.flatnonzero(arr[:, 0] != want)
                    if off.size:
                        k = int(off[0])
                        raise InputError(
                            f"{self.path}: the first column has no name and is not the row number "
                            f"0..N-1 of a pandas index (line {lines[k]} holds {block[k][0]!r}); "
                            "name it in the header, or pass --score-columns to choose the scores")
                done += len(block)
                yield (arr[:, self.si], None if self.li is None else arr[:, self.li])


def pyarrow_parquet():
    """pyarrow.parquet, or an InputError that says how to install it."""
    try:
        import pyarrow.parquet as pq  # noqa: F401
        return pq
    except ImportError:
        raise InputError("reading or writing Parquet needs pyarrow, which is not installed: "
                         "pip install pyarrow (or convert the file to .csv or .npz)") from None


class ParquetSource(ScoreSource):
    """A Parquet file read a batch of rows at a time; score columns numeric, labels int or float."""

    kind = PARQUET

    def __init__(self, path: Path, cols: Columns, need_labels: bool, probs: bool = False):
        pq = pyarrow_parquet()
        import pyarrow.types as pat

        self.path, self.probs = path, probs
        try:
            self.file = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001
            raise unreadable(path, PARQUET, e) from None
        schema = self.file.schema_arrow
        names = list(schema.names)
        index = [i for i, n in enumerate(names) if n.startswith("__index_level_")]
        li, si = cols.pick(names, path, need_labels, skip=index)
        for i in si + ([] if li is None else [li]):
            t = schema.field(names[i]).type
            if not (pat.is_floating(t) or pat.is_integer(t)):
                what = "label" if i == li else "score"
                raise InputError(f"{path}: the {what} column {names[i]!r} has type {t}; {what}s "
                                 "must be numbers (integer or float columns)")
        self.columns = [names[i] for i in si]
        self.label_name = None if li is None else names[li]
        types = {str(schema.field(n).type) for n in self.columns}
        dtype = np.dtype(np.float32 if types <= {"float", "halffloat"} else np.float64)
        rows = self.file.metadata.num_rows
        self._layout((rows, len(si)), dtype, None if li is None else (rows,),
                     None if li is None else np.dtype(np.float64), need_labels)

    def _blocks(self, rows):
        want = self.columns + ([self.label_name] if self.label_name else [])
        for b in self.file.iter_batches(batch_size=rows, columns=want):
            cols = [b.column(n).to_numpy(zero_copy_only=False) for n in self.columns]
            s = np.stack(cols, axis=1).astype(self.dtype, copy=False)
            y = None
            if self.label_name:
                y = b.column(self.label_name).to_numpy(zero_copy_only=False)
                if y.dtype == object:  # an integer column with nulls
                    y = np.array([np.nan if v is None else v for v in y], dtype=np.float64)
            yield s, y
