"""Reading classifier outputs safely, and writing calibrated ones chunk by chunk.

Used by the ``softcal`` command (:mod:`softcal.cli`). Nothing here runs code stored in a file
unless ``allow_pickle=True``:

* ``.npz`` / ``.npy``: ``numpy.load(allow_pickle=False)``; object arrays are refused;
* ``.pt`` / ``.pth``: ``torch.load(weights_only=True)`` (tensors, numbers, lists, tuples, dicts);
* ``.csv`` / ``.tsv``: the standard library's csv reader (a header row of column names, or no
  header: columns are then named ``0``, ``1``, ...);
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
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "FORMATS",
    "InputError",
    "ScoreSource",
    "Split",
    "load_embedded",
    "load_scores",
    "open_scores",
    "sha256",
    "write_chunks",
    "OUTPUT_SUFFIXES",
]

EMBEDDED = Path(__file__).resolve().parent / "data" / "densenet40_c10_logits.npz"

NPZ, NPY, PT, CSV, TSV, PARQUET, PICKLE = "npz", "npy", "pt", "csv", "tsv", "parquet", "pickle"
_SUFFIX = {".npz": NPZ, ".npy": NPY, ".pt": PT, ".pth": PT, ".csv": CSV, ".tsv": TSV,
           ".parquet": PARQUET, ".pq": PARQUET, ".p": PICKLE, ".pkl": PICKLE, ".pickle": PICKLE}

#: One line naming the formats that are read (used in error messages and the help).
FORMATS = (".npz, .npy, .pt/.pth, .csv, .tsv, .parquet/.pq (with pyarrow); pickles "
           "(.p, .pkl, .pickle) only with --allow-pickle")

#: Suffixes ``softcal apply`` writes.
OUTPUT_SUFFIXES = (".npz", ".npy", ".pt", ".csv", ".tsv", ".parquet")

_SCORE_KEYS = ("logits", "probs", "probabilities", "predictions", "scores")
_LABEL_KEYS = ("labels", "label", "targets", "target", "y", "class", "ground_truth")

Split = Tuple[np.ndarray, np.ndarray]


class InputError(Exception):
    """A file that cannot be used as given: the message is one line for the user."""


def sha256(path: Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(block), b""):
            h.update(b)
    return h.hexdigest()


def _kind(path: Path) -> str:
    kind = _SUFFIX.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{path}: unknown file type {path.suffix or '(no suffix)'!r}; the formats "
                         f"read are {FORMATS}")
    return kind


def _pickle_refused(path: Path, what: str) -> InputError:
    return InputError(f"{path}: {what}; loading it would run code stored in the file. Pass "
                      "--allow-pickle only if you trust the file (or save it as .npz: "
                      "numpy.savez(path, logits=..., labels=...))")


# ---------------------------------------------------------------------- column selection
@dataclass
class Columns:
    """Which columns (or arrays) hold the labels and the scores."""

    label: Optional[str] = None
    scores: Optional[Sequence[str]] = None  # names, or one "PREFIX*"

    def pick(self, names: Sequence[str], path: Path, need_labels: bool) -> Tuple[Optional[int], List[int]]:
        """Indices of (label column or None, score columns) among ``names``."""
        names = list(names)
        if self.label is not None:
            if self.label not in names:
                raise InputError(f"{path}: --label-column {self.label!r} is not a column; the "
                                 f"columns are {_short(names)}")
            li: Optional[int] = names.index(self.label)
        else:
            li = next((names.index(k) for k in _LABEL_KEYS if k in names), None)
            if li is None:
                low = [n.lower() for n in names]
                li = next((low.index(k) for k in _LABEL_KEYS if k in low), None)
        if li is None and need_labels:
            raise InputError(f"{path}: no label column among {_short(names)}; name it 'label' or "
                             "pass --label-column NAME")
        if self.scores:
            if len(self.scores) == 1 and self.scores[0].endswith("*"):
                prefix = self.scores[0][:-1]
                si = [i for i, n in enumerate(names) if n.startswith(prefix) and i != li]
                if not si:
                    raise InputError(f"{path}: no column starts with {prefix!r} "
                                     f"(--score-columns {self.scores[0]}); the columns are {_short(names)}")
            else:
                missing = [s for s in self.scores if s not in names]
                if missing:
                    raise InputError(f"{path}: --score-columns names {missing} that are not columns; "
                                     f"the columns are {_short(names)}")
                si = [names.index(s) for s in self.scores]
        else:
            si = [i for i in range(len(names)) if i != li]
        if not si:
            raise InputError(f"{path}: no score columns (the columns are {_short(names)})")
        return li, si


def _short(names: Sequence[str], n: int = 12) -> str:
    names = list(names)
    return str(names) if len(names) <= n else f"{names[:n]} ... ({len(names)} columns)"


# ---------------------------------------------------------------------- whole-file loading
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()  # numpy has no bfloat16; float16 is widened too (exact)
        return x.numpy()
    return np.asarray(x)


def _split_from_mapping(m: Dict[str, Any], path: Path, cols: Columns, need_labels: bool) -> Dict[str, Split]:
    keys = set(m)
    if {"logits_val", "labels_val"} <= keys and cols.label is None and not cols.scores:
        out = {"val": (m["logits_val"], m["labels_val"])}
        if {"logits_test", "labels_test"} <= keys:
            out["test"] = (m["logits_test"], m["labels_test"])
        return out
    if cols.scores:
        if len(cols.scores) != 1 or cols.scores[0] not in keys:
            raise InputError(f"{path}: --score-columns must name one array of {sorted(keys)} for "
                             f"this file, got {list(cols.scores)}")
        s: Optional[str] = cols.scores[0]
    else:
        s = next((k for k in _SCORE_KEYS if k in keys), None)
    if cols.label is not None:
        if cols.label not in keys:
            raise InputError(f"{path}: --label-column {cols.label!r} is not among the arrays {sorted(keys)}")
        y: Optional[str] = cols.label
    else:
        y = next((k for k in _LABEL_KEYS if k in keys), None)
    if s is not None and (y is not None or not need_labels):
        return {"val": (m[s], None if y is None else m[y])}
    if len(keys) == 2 and s is None and y is None:  # two unnamed arrays: the 2-D float one holds the scores
        a, b = (_to_numpy(m[k]) for k in sorted(keys))
        if a.ndim == 2 and a.dtype.kind == "f" and b.dtype.kind in "iu":
            return {"val": (a, b)}
        if b.ndim == 2 and b.dtype.kind == "f" and a.dtype.kind in "iu":
            return {"val": (b, a)}
    if len(keys) == 1 and not need_labels:
        return {"val": (m[next(iter(keys))], None)}
    raise InputError(f"{path}: cannot find scores and labels among the keys {sorted(keys)}; name them "
                     f"'logits' (or 'probs') and 'labels', or pass --score-columns / --label-column")


def _split_from_object(obj: Any, path: Path, cols: Columns, need_labels: bool) -> Dict[str, Split]:
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 0:
        obj = obj.item()
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 1:
        obj = tuple(obj)
    if isinstance(obj, dict):
        return _split_from_mapping(obj, path, cols, need_labels)
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        if not need_labels:
            return {"val": (obj, None)}
        raise InputError(f"{path}: holds one array (scores {tuple(obj.shape)}) and no labels; save "
                         "scores and labels together, e.g. numpy.savez(path, logits=..., labels=...)")
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        a, b = obj
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == 2 and len(b) == 2:
            return {"val": (a[0], a[1]), "test": (b[0], b[1])}
        return {"val": (a, b)}
    raise InputError(f"{path}: expected (scores, labels), ((val_scores, val_labels), (test_scores, "
                     f"test_labels)) or a dict, got {type(obj).__name__}")


def _check_split(path: Path, split: str, s: Any, y: Any, need_labels: bool) -> Split:
    s = _to_numpy(s)
    if s.ndim != 2 or s.dtype.kind != "f":
        raise InputError(f"{path} [{split}]: scores must be a 2-D float array (N, C), got "
                         f"{s.dtype} {s.shape}")
    if y is None:
        if need_labels:
            raise InputError(f"{path} [{split}]: no labels")
        return s, None  # type: ignore[return-value]
    y = _to_numpy(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.ravel()
    if y.dtype.kind == "f" and y.size and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)  # labels stored as floats (CSV, Parquet, some exporters)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise InputError(f"{path} [{split}]: labels must be a 1-D integer array (N,), got {y.dtype} {y.shape}")
    if y.shape[0] != s.shape[0]:
        raise InputError(f"{path} [{split}]: {y.shape[0]} labels for {s.shape[0]} rows of scores")
    return s, y.astype(np.int64)


def load_scores(path: str | Path, *, allow_pickle: bool = False, label_column: Optional[str] = None,
                score_columns: Optional[Sequence[str]] = None, need_labels: bool = True,
                progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, Split]:
    """Load a whole file of (scores, labels) safely.

    Returns ``{"val": (scores, labels)[, "test": (scores, labels)]}``: scores (N, C) float numpy
    (float16/bfloat16 widened to float32), labels (N,) int64 (None when ``need_labels`` is False and
    the file has none). Raises :class:`InputError` with one line for every file it cannot use.
    ``progress(rows_read, rows_total)`` is called after each block of a CSV/TSV/Parquet file.
    """
    p = Path(path)
    kind = _kind(p)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    cols = Columns(label_column, list(score_columns) if score_columns else None)
    if kind in (CSV, TSV, PARQUET):
        src = open_scores(p, allow_pickle=allow_pickle, label_column=label_column,
                          score_columns=score_columns, need_labels=need_labels)
        parts = []
        for part in src.chunks(1 << 16):
            parts.append(part)
            if progress is not None:
                progress(part[0].shape[0], src.rows)
        s = np.concatenate([c[0] for c in parts]) if parts else np.zeros((0, src.classes), src.dtype)
        y = None
        if src.has_labels:
            y = np.concatenate([c[1] for c in parts]) if parts else np.zeros(0, np.int64)
        return {"val": _check_split(p, "val", s, y, need_labels)}
    try:
        if kind == NPZ:
            with np.load(p, allow_pickle=allow_pickle) as z:
                out = _split_from_mapping({k: z[k] for k in z.files}, p, cols, need_labels)
        elif kind == NPY:
            out = _split_from_object(np.load(p, allow_pickle=allow_pickle), p, cols, need_labels)
        elif kind == PT:
            out = _split_from_object(_torch_load(p, allow_pickle), p, cols, need_labels)
        else:
            if not allow_pickle:
                raise _pickle_refused(p, "a pickle")
            with open(p, "rb") as f:
                out = _split_from_object(pickle.load(f), p, cols, need_labels)
    except InputError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise _pickle_refused(p, "it holds Python objects (an object array)") from None
        raise _unreadable(p, kind, e) from None
    except Exception as e:  # noqa: BLE001  (any unreadable file: one line)
        raise _unreadable(p, kind, e) from None
    return {k: _check_split(p, k, s, y, need_labels) for k, (s, y) in out.items()}


def _unreadable(p: Path, kind: str, e: BaseException) -> InputError:
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    return InputError(f"{p}: could not read it as {kind} ({type(e).__name__}: {msg}); the formats "
                      f"read are {FORMATS}")


def _torch_load(p: Path, allow_pickle: bool) -> Any:
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise _pickle_refused(p, "it is not a weights-only file (it holds Python objects)") from None
            raise
    return torch.load(p, map_location="cpu", weights_only=False)


def load_embedded() -> Dict[str, Split]:
    """The DenseNet-40 / CIFAR-10 logits shipped in softcal/data (val 5000 rows, test 10000)."""
    return load_scores(EMBEDDED)


# ---------------------------------------------------------------------- streaming
class ScoreSource:
    """A file of scores (and maybe labels) read chunk by chunk.

    Attributes: ``rows`` N, ``classes`` C, ``dtype`` of the scores as read (numpy; bfloat16 is
    read as float32), ``has_labels``, ``columns`` (score column names for tabular files, else None),
    ``label_name``. :meth:`chunks` yields (scores (n, C), labels (n,) int64 or None).
    """

    rows: int
    classes: int
    dtype: np.dtype
    has_labels: bool
    columns: Optional[List[str]] = None
    label_name: Optional[str] = None
    kind: str

    def chunks(self, rows: int) -> Iterator[Tuple[np.ndarray, Optional[np.ndarray]]]:
        raise NotImplementedError


class _ArraySource(ScoreSource):
    def __init__(self, kind: str, scores: np.ndarray, labels: Optional[np.ndarray], label_name: str = "labels"):
        self.kind = kind
        self.scores, self.labels = scores, labels
        self.rows, self.classes = scores.shape
        self.dtype = scores.dtype
        self.has_labels = labels is not None
        self.label_name = label_name if labels is not None else None

    def chunks(self, rows):
        for i in range(0, self.rows, rows):
            yield (np.asarray(self.scores[i:i + rows]),
                   None if self.labels is None else np.asarray(self.labels[i:i + rows]))


class _NpzMember:
    """One C-order array inside an .npz (stored or deflated), read a block of rows at a time."""

    def __init__(self, path: Path, member: str):
        self.path, self.member = path, member
        with zipfile.ZipFile(path) as z, z.open(member) as f:
            self.shape, self.fortran, self.dtype, self.offset = _npy_header(f)

    def rows(self, block: int) -> Iterator[np.ndarray]:
        n = self.shape[0] if self.shape else 0
        row = int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1
        with zipfile.ZipFile(self.path) as z, z.open(self.member) as f:
            f.read(self.offset)
            for i in range(0, n, block):
                k = min(block, n - i)
                buf = f.read(k * row * self.dtype.itemsize)
                yield np.frombuffer(buf, dtype=self.dtype).reshape((k,) + tuple(self.shape[1:]))


def _npy_header(f) -> Tuple[tuple, bool, np.dtype, int]:
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = fmt.read_array_header_2_0(f)
    return shape, fortran, dtype, f.tell()


class _NpzSource(ScoreSource):
    kind = NPZ

    def __init__(self, path: Path, skey: str, ykey: Optional[str]):
        self.s = _NpzMember(path, skey + ".npy")
        self.y = _NpzMember(path, ykey + ".npy") if ykey else None
        self.rows, self.classes = self.s.shape
        self.dtype = self.s.dtype
        self.has_labels = self.y is not None
        self.label_name = ykey

    def chunks(self, rows):
        ys = self.y.rows(rows) if self.y is not None else itertools.repeat(None)
        for s, y in zip(self.s.rows(rows), ys):
            if y is not None:
                y = y.reshape(-1)
                if y.dtype.kind == "f":
                    if not np.all(y == np.round(y)):
                        raise InputError(f"{self.s.path}: the labels {self.label_name!r} are not integers")
                    y = y.astype(np.int64)
            yield s, y


class _CsvSource(ScoreSource):
    def __init__(self, path: Path, delimiter: str, cols: Columns, need_labels: bool):
        self.path, self.delimiter, self.kind = path, delimiter, (TSV if delimiter == "\t" else CSV)
        with open(path, newline="") as f:
            r = csv.reader(f, delimiter=delimiter)
            first = next(r, None)
            if first is None:
                raise InputError(f"{path}: empty file")
            self.header = not all(_is_number(v) for v in first)
            names = [v.strip() for v in first] if self.header else [str(i) for i in range(len(first))]
            self.rows = sum(1 for row in r if row) + (0 if self.header else 1)
        li, si = cols.pick(names, path, need_labels)
        self.li, self.si, self.width = li, si, len(names)
        self.columns = [names[i] for i in si]
        self.label_name = None if li is None else names[li]
        self.has_labels = li is not None
        self.classes = len(si)
        self.dtype = np.dtype(np.float64)
        self.names = names

    def chunks(self, rows):
        with open(self.path, newline="") as f:
            r = csv.reader(f, delimiter=self.delimiter)
            line = 0
            if self.header:
                next(r)
                line = 1
            while True:
                block = [row for row in itertools.islice(r, rows)]
                block = [row for row in block if row]
                if not block:
                    return
                try:
                    arr = np.array(block, dtype=np.float64)
                except ValueError:
                    for k, row in enumerate(block):
                        if len(row) != self.width:
                            raise InputError(f"{self.path}: line {line + k + 1} has {len(row)} fields, "
                                             f"the header has {self.width}") from None
                        bad = next((v for v in row if not _is_number(v)), None)
                        if bad is not None:
                            raise InputError(f"{self.path}: line {line + k + 1}: {bad!r} is not a "
                                             "number") from None
                    raise
                line += len(block)
                y = None
                if self.li is not None:
                    yf = arr[:, self.li]
                    if not np.all(yf == np.round(yf)):
                        raise InputError(f"{self.path}: the label column {self.label_name!r} holds "
                                         "values that are not integers")
                    y = yf.astype(np.int64)
                yield np.ascontiguousarray(arr[:, self.si]), y


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _pyarrow():
    try:
        import pyarrow.parquet as pq  # noqa: F401
        return pq
    except ImportError:
        raise InputError("reading or writing Parquet needs pyarrow, which is not installed: "
                         "pip install pyarrow (or convert the file to .csv or .npz)") from None


class _ParquetSource(ScoreSource):
    kind = PARQUET

    def __init__(self, path: Path, cols: Columns, need_labels: bool):
        pq = _pyarrow()
        self.path = path
        try:
            self.file = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001
            raise _unreadable(path, PARQUET, e) from None
        names = list(self.file.schema_arrow.names)
        li, si = cols.pick(names, path, need_labels)
        self.columns = [names[i] for i in si]
        self.label_name = None if li is None else names[li]
        self.has_labels = li is not None
        self.rows, self.classes = self.file.metadata.num_rows, len(si)
        types = {str(self.file.schema_arrow.field(n).type) for n in self.columns}
        self.dtype = np.dtype(np.float64 if types & {"double"} or not types <= {"float", "halffloat"} else np.float32)

    def chunks(self, rows):
        want = self.columns + ([self.label_name] if self.label_name else [])
        for b in self.file.iter_batches(batch_size=rows, columns=want):
            cols = [b.column(n).to_numpy(zero_copy_only=False) for n in self.columns]
            s = np.stack(cols, axis=1).astype(self.dtype, copy=False)
            y = None
            if self.label_name:
                yf = b.column(self.label_name).to_numpy(zero_copy_only=False)
                if yf.dtype.kind == "f":
                    if not np.all(yf == np.round(yf)):
                        raise InputError(f"{self.path}: the label column {self.label_name!r} holds "
                                         "values that are not integers")
                y = yf.astype(np.int64)
            yield s, y


def open_scores(path: str | Path, *, allow_pickle: bool = False, label_column: Optional[str] = None,
                score_columns: Optional[Sequence[str]] = None, need_labels: bool = False) -> ScoreSource:
    """Open a file of scores for reading chunk by chunk (see :class:`ScoreSource`).

    ``.npy`` (a 2-D float array) is memory-mapped; ``.npz`` members, CSV/TSV and Parquet are
    read a block of rows at a time; ``.pt`` and pickles are loaded whole.
    """
    p = Path(path)
    kind = _kind(p)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    cols = Columns(label_column, list(score_columns) if score_columns else None)
    try:
        if kind in (CSV, TSV):
            return _CsvSource(p, "\t" if kind == TSV else ",", cols, need_labels)
        if kind == PARQUET:
            return _ParquetSource(p, cols, need_labels)
        if kind == NPY:
            try:
                a = np.load(p, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                if "allow_pickle" in str(e) or "object" in str(e).lower():
                    if not allow_pickle:
                        raise _pickle_refused(p, "it holds Python objects (an object array)") from None
                else:
                    raise
                a = None
            if a is not None and a.dtype != object:
                if a.ndim != 2 or a.dtype.kind != "f":
                    raise InputError(f"{p}: expected a 2-D float array of scores (N, C), got "
                                     f"{a.dtype} {a.shape}")
                if need_labels:
                    raise InputError(f"{p}: a .npy file holds one array (the scores) and no labels; "
                                     "save scores and labels together in an .npz")
                return _ArraySource(NPY, a, None)
        if kind == NPZ:
            with zipfile.ZipFile(p) as z:
                members = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
            split = _split_from_mapping({k: k for k in members}, p, cols, need_labels)
            if "test" in split:
                raise InputError(f"{p}: holds a validation and a test split; softcal apply and "
                                 "evaluate read one set of scores (name them 'logits' and 'labels')")
            skey, ykey = split["val"]
            if skey in members and (ykey is None or ykey in members):
                src = _NpzSource(p, skey, ykey)
                if not src.s.fortran and src.s.dtype != object and len(src.s.shape) == 2 \
                        and src.s.dtype.kind == "f" and (src.y is None or src.y.dtype.kind in "iuf"):
                    return src
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _unreadable(p, kind, e) from None
    # everything else: load whole (checks shapes and dtypes)
    data = load_scores(p, allow_pickle=allow_pickle, label_column=label_column,
                       score_columns=score_columns, need_labels=need_labels)
    if "test" in data:
        raise InputError(f"{p}: holds a validation and a test split; softcal apply and evaluate "
                         "read one set of scores")
    s, y = data["val"]
    return _ArraySource(kind, s, y)


# ---------------------------------------------------------------------- writing
def write_chunks(path: Path, chunks: Iterator[Tuple[np.ndarray, Optional[np.ndarray]]], *, rows: int,
                 classes: int, dtype: np.dtype, key: str, label_name: Optional[str],
                 columns: Optional[List[str]]) -> None:
    """Write (values (n, C), labels (n,) or None) chunks to ``path``, format by suffix.

    ``.npy``: the values only, memory-mapped; ``.npz``: ``key`` (and ``labels`` when there are
    labels) streamed into the archive; ``.csv``/``.tsv``/``.parquet``: the label column (when
    there are labels) and the value columns, named ``columns`` (default ``0..C-1``); ``.pt``: a
    dict of tensors (held in memory). ``rows`` must be the total number of rows.
    """
    suffix = path.suffix.lower()
    dtype = np.dtype(dtype)
    names = columns or [f"{key}_{j}" for j in range(classes)]
    if suffix == ".npy":
        out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, classes))
        i = 0
        for v, _ in chunks:
            out[i:i + v.shape[0]] = v
            i += v.shape[0]
        out.flush()
        del out
    elif suffix == ".npz":
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z, \
                tempfile.TemporaryFile() as spool:
            have_labels = False
            with z.open(f"{key}.npy", "w", force_zip64=True) as f:
                _write_header(f, dtype, (rows, classes))
                for v, y in chunks:
                    f.write(np.ascontiguousarray(v, dtype=dtype).tobytes())
                    if y is not None:
                        have_labels = True
                        spool.write(np.ascontiguousarray(y, dtype=np.int64).tobytes())
            if have_labels:
                spool.seek(0)
                with z.open("labels.npy", "w", force_zip64=True) as f:
                    _write_header(f, np.dtype(np.int64), (rows,))
                    for b in iter(lambda: spool.read(1 << 20), b""):
                        f.write(b)
    elif suffix in (".csv", ".tsv"):
        fmt = "%.17g" if dtype == np.float64 else "%.9g"
        with open(path, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t" if suffix == ".tsv" else ",")
            header_done = False
            for v, y in chunks:
                if not header_done:
                    w.writerow(([label_name or "label"] if y is not None else []) + names)
                    header_done = True
                for k in range(v.shape[0]):
                    w.writerow(([int(y[k])] if y is not None else []) + [fmt % x for x in v[k]])
            if not header_done:
                w.writerow(names)
    elif suffix == ".parquet":
        _pyarrow()
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = None
        try:
            for v, y in chunks:
                arrays = [pa.array(np.ascontiguousarray(v[:, j], dtype=dtype)) for j in range(classes)]
                cols = list(names)
                if y is not None:
                    arrays.insert(0, pa.array(y.astype(np.int64)))
                    cols.insert(0, label_name or "label")
                t = pa.Table.from_arrays(arrays, names=cols)
                if writer is None:
                    writer = pq.ParquetWriter(path, t.schema)
                writer.write_table(t)
        finally:
            if writer is not None:
                writer.close()
    elif suffix == ".pt":
        vs, ys = [], []
        for v, y in chunks:
            vs.append(torch.from_numpy(np.array(v, dtype=dtype)))
            if y is not None:
                ys.append(torch.from_numpy(np.asarray(y, dtype=np.int64)))
        d = {key: torch.cat(vs) if vs else torch.zeros(0, classes, dtype=getattr(torch, dtype.name))}
        if ys:
            d["labels"] = torch.cat(ys)
        torch.save(d, path)
    else:
        raise InputError(f"--out {path}: cannot write {suffix or 'a file without suffix'}; write one "
                         f"of {', '.join(OUTPUT_SUFFIXES)}")


def _write_header(f, dtype: np.dtype, shape: tuple) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)  # a 2-D header is far below its 64 KiB
    f.write(buf.getvalue())
