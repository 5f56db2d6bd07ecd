"""Named arrays: .npy (memory-mapped), .npz (members streamed), .pt (weights only), pickles.

No code stored in a file runs unless ``allow_pickle``: a file's first bytes say what it is
(NumPy's magic, a zip archive, a pickle) before anything is loaded, so that a pickle is refused
as a pickle and a file that is neither is reported as unreadable, never as "Python objects".
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from .check import check_memory, tensor_to_numpy
from .common import NPY, NPZ, PT, InputError, pickle_refused, unreadable
from .source import ArraySource, ScoreSource
from .tabular import Columns

__all__ = ["open_array_file"]

SCORE_KEYS = ("logits", "probs", "probabilities", "predictions", "scores")
LABEL_KEYS = ("labels", "label", "targets", "target", "y", "class", "ground_truth")

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_HEADER_LIMIT = 10000  # numpy's own limit for a header read without trusting the file


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


def _looks_like_pickle(head: bytes) -> bool:
    return head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5


# ---------------------------------------------------------------------- which arrays
def _shape_kind(v: Any) -> Tuple[int, str]:
    """(ndim, dtype kind) of an array, tensor or header; (-1, "") for anything else."""
    if isinstance(v, torch.Tensor):
        kind = "f" if v.is_floating_point() else ("b" if v.dtype == torch.bool else
                                                   "c" if v.is_complex() else "i")
        return v.dim(), kind
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], np.dtype):  # (shape, dtype)
        return len(v[0]), v[1].kind
    if isinstance(v, np.ndarray):
        return v.ndim, v.dtype.kind
    return -1, ""


def pick_keys(info: Dict[str, Any], path: Path, cols: Columns,
              need_labels: bool) -> Dict[str, Tuple[str, Optional[str]]]:
    """{split: (scores key, labels key or None)} among the named arrays ``info``."""
    keys = set(info)
    if {"logits_val", "labels_val"} <= keys and cols.label is None and not cols.scores:
        out: Dict[str, Tuple[str, Optional[str]]] = {"val": ("logits_val", "labels_val")}
        if {"logits_test", "labels_test"} <= keys:
            out["test"] = ("logits_test", "labels_test")
        return out
    if cols.scores:
        if len(cols.scores) != 1 or cols.scores[0] not in keys:
            raise InputError(f"{path}: --score-columns must name one array of {sorted(keys)} for "
                             f"this file, got {list(cols.scores)}")
        s: Optional[str] = cols.scores[0]
    else:
        s = next((k for k in SCORE_KEYS if k in keys), None)
    if cols.label is not None:
        if cols.label not in keys:
            raise InputError(f"{path}: --label-column {cols.label!r} is not among the arrays {sorted(keys)}")
        y: Optional[str] = cols.label
    else:
        y = next((k for k in LABEL_KEYS if k in keys), None)
    if s is not None and (y is not None or not need_labels):
        return {"val": (s, y)}
    if len(keys) == 2 and s is None and y is None:  # two unnamed arrays: the 2-D float one holds the scores
        a, b = sorted(keys)
        (na, ka), (nb, kb) = _shape_kind(info[a]), _shape_kind(info[b])
        if na == 2 and ka == "f" and kb in "iu" and kb:
            return {"val": (a, b)}
        if nb == 2 and kb == "f" and ka in "iu" and ka:
            return {"val": (b, a)}
    if len(keys) == 1 and not need_labels:
        return {"val": (next(iter(keys)), None)}
    raise InputError(f"{path}: cannot find scores and labels among the keys {sorted(keys)}; name them "
                     f"'logits' (or 'probs') and 'labels', or pass --score-columns / --label-column")


# ---------------------------------------------------------------------- in memory (.pt, pickles)
def _splits_of_object(obj: Any, path: Path, cols: Columns, need_labels: bool) -> Dict[str, Tuple[Any, Any, str]]:
    """{split: (scores, labels or None, label name)} of a loaded object."""
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 0:
        obj = obj.item()
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 1:
        obj = tuple(obj)
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise InputError(f"{path}: a dict whose keys are not all strings; name the arrays "
                             "'logits' and 'labels'")
        return {k: (obj[s], None if y is None else obj[y], y or "labels")
                for k, (s, y) in pick_keys(obj, path, cols, need_labels).items()}
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        if not need_labels:
            return {"val": (obj, None, "labels")}
        raise InputError(f"{path}: holds one array (scores {tuple(obj.shape)}) and no labels; save "
                         "scores and labels together, e.g. numpy.savez(path, logits=..., labels=...)")
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        a, b = obj
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == 2 and len(b) == 2:
            return {"val": (a[0], a[1], "labels"), "test": (b[0], b[1], "labels")}
        return {"val": (a, b, "labels")}
    raise InputError(f"{path}: expected (scores, labels), ((val_scores, val_labels), (test_scores, "
                     f"test_labels)) or a dict, got {type(obj).__name__}")


def _as_array(path: Path, name: str, v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return tensor_to_numpy(path, name, v)
    if isinstance(v, np.ndarray):
        return v
    if isinstance(v, (list, tuple)):
        a = np.asarray(v)  # lists of numbers from a pickle: already in memory
        if a.dtype == object:
            raise InputError(f"{path}: {name} is a list that is not a rectangular array of numbers")
        return a
    raise InputError(f"{path}: {name} is a {type(v).__name__}, not an array")


def _sources_of_object(obj: Any, path: Path, kind: str, cols: Columns, need_labels: bool,
                       probs: bool) -> Dict[str, ScoreSource]:
    parts = _splits_of_object(obj, path, cols, need_labels)
    two = len(parts) > 1
    out: Dict[str, ScoreSource] = {}
    for split, (s, y, yname) in parts.items():
        sa = _as_array(path, f"the scores{f' [{split}]' if two else ''}", s)
        ya = None if y is None else _as_array(path, f"the labels{f' [{split}]' if two else ''}", y)
        out[split] = ArraySource(path, kind, sa, ya, split=split if two else None, label_name=yname,
                                 need_labels=need_labels, probs=probs)
    return out


def _torch_load(p: Path, allow_pickle: bool) -> Any:
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise pickle_refused(p, "it is not a weights-only file (it holds Python objects)") from None
            raise
    return torch.load(p, map_location="cpu", weights_only=False)


def _load_pickle(p: Path) -> Any:
    with open(p, "rb") as f:
        return pickle.load(f)


# ---------------------------------------------------------------------- .npy / .npz headers
def read_npy_header(f, path: Path, name: str, allow_pickle: bool) -> Tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of the .npy stream ``f``, read without trusting it."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
    except ValueError:
        raise InputError(f"{path}: {name} is not a NumPy array (no .npy magic)") from None
    limit = 2 ** 64 if allow_pickle else _HEADER_LIMIT
    try:
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f, max_header_size=limit)
        else:
            shape, fortran, dtype = fmt.read_array_header_2_0(f, max_header_size=limit)
    except ValueError as e:
        if "max_header_size" in str(e):
            raise InputError(f"{path}: {name} has an array header of over {_HEADER_LIMIT} bytes, "
                             "more than a scores array needs (numpy reads such a header only from a "
                             "trusted file: --allow-pickle)") from None
        raise InputError(f"{path}: {name} has a malformed array header ({str(e).splitlines()[0][:160]})") from None
    return shape, fortran, dtype, f.tell()


class _NpzMember:
    """One array inside an .npz (stored or deflated), read a block of rows at a time."""

    def __init__(self, path: Path, member: str, allow_pickle: bool):
        self.path, self.member = path, member
        with zipfile.ZipFile(path) as z, z.open(member) as f:
            self.shape, self.fortran, self.dtype, self.offset = read_npy_header(
                f, path, f"the array {member[:-4]!r}", allow_pickle)

    def rows(self, block: int) -> Iterator[np.ndarray]:
        n = self.shape[0] if self.shape else 0
        row = int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1
        with zipfile.ZipFile(self.path) as z, z.open(self.member) as f:
            f.read(self.offset)
            for i in range(0, n, block):
                k = min(block, n - i)
                want = k * row * self.dtype.itemsize
                buf = f.read(want)
                if len(buf) != want:
                    raise InputError(f"{self.path}: the array {self.member[:-4]!r} ends after "
                                     f"{i + len(buf) // max(row * self.dtype.itemsize, 1)} of the "
                                     f"{n} rows its header announces (a truncated file)")
                yield np.frombuffer(buf, dtype=self.dtype).reshape((k,) + tuple(self.shape[1:]))


class _NpzSource(ScoreSource):
    kind = NPZ

    def __init__(self, path: Path, s: _NpzMember, y: Optional[_NpzMember], split: Optional[str],
                 label_name: Optional[str], need_labels: bool, probs: bool):
        self.path, self.s, self.y, self.split, self.probs = path, s, y, split, probs
        self._layout(s.shape, s.dtype, None if y is None else y.shape, None if y is None else y.dtype,
                     need_labels)
        self.label_name = label_name

    def _blocks(self, rows):
        ys = self.y.rows(rows) if self.y is not None else None
        for s in self.s.rows(rows):
            yield s, None if ys is None else next(ys)


def _open_npz(p: Path, cols: Columns, need_labels: bool, allow_pickle: bool,
              probs: bool) -> Optional[Dict[str, ScoreSource]]:
    """Streamed sources of an .npz, or None when it must be loaded whole (object or Fortran-order
    members, which need allow_pickle or a copy)."""
    with zipfile.ZipFile(p) as z:
        members = [n for n in z.namelist() if n.endswith(".npy")]
    headers = {m[:-4]: _NpzMember(p, m, allow_pickle) for m in members}
    picked = pick_keys({k: (h.shape, h.dtype) for k, h in headers.items()}, p, cols, need_labels)
    used = [headers[k] for pair in picked.values() for k in pair if k is not None]
    if any(h.dtype.hasobject for h in used):
        if not allow_pickle:
            raise pickle_refused(p, "it holds Python objects (an object array)")
        return None
    if any(h.fortran and len(h.shape) > 1 for h in used):
        check_memory(p, "its arrays", sum(int(np.prod(h.shape)) * h.dtype.itemsize for h in used))
        return None
    two = len(picked) > 1
    return {split: _NpzSource(p, headers[s], None if y is None else headers[y], split if two else None,
                              y, need_labels, probs) for split, (s, y) in picked.items()}


def _open_npy(p: Path, need_labels: bool, allow_pickle: bool, probs: bool) -> Optional[Dict[str, ScoreSource]]:
    with open(p, "rb") as f:
        shape, fortran, dtype, _ = read_npy_header(f, p, "the file", allow_pickle)
    if dtype.hasobject:
        if not allow_pickle:
            raise pickle_refused(p, "it holds Python objects (an object array)")
        return None
    if len(shape) != 2 or dtype.kind != "f":
        raise InputError(f"{p}: expected a 2-D float array of scores (N, C), got {dtype} {shape}")
    if need_labels:
        raise InputError(f"{p}: a .npy file holds one array (the scores) and no labels; save scores "
                         "and labels together in an .npz")
    a = np.load(p, mmap_mode="r", allow_pickle=False)
    return {"val": ArraySource(p, NPY, a, None, probs=probs)}


def open_array_file(p: Path, kind: str, cols: Columns, *, need_labels: bool, allow_pickle: bool,
                    probs: bool) -> Dict[str, ScoreSource]:
    """{split: source} of an .npy, .npz, .pt or pickle file (``kind``); InputError when refused."""
    head = _magic(p)
    try:
        if kind in (NPY, NPZ):
            if kind == NPZ and head[:4] in _ZIP_MAGIC:
                out = _open_npz(p, cols, need_labels, allow_pickle, probs)
            elif kind == NPY and head[:6] == _NPY_MAGIC:
                out = _open_npy(p, need_labels, allow_pickle, probs)
            elif _looks_like_pickle(head):
                if not allow_pickle:
                    raise pickle_refused(p, "it is a pickle")
                out = None
            else:
                what = "a zip archive (.npz)" if kind == NPZ else "a NumPy .npy file"
                raise InputError(f"{p}: could not read it as {kind}: it is not {what} (its first bytes "
                                 f"are {head[:6]!r})")
            if out is not None:
                return out
            if head[:4] in _ZIP_MAGIC:
                with np.load(p, allow_pickle=allow_pickle) as z:
                    obj: Any = {k: z[k] for k in z.files}
            elif head[:6] == _NPY_MAGIC:
                obj = np.load(p, allow_pickle=allow_pickle)
            else:
                obj = _load_pickle(p)
        elif kind == PT:
            obj = _torch_load(p, allow_pickle)
        else:
            if not allow_pickle:
                raise pickle_refused(p, "a pickle")
            obj = _load_pickle(p)
        return _sources_of_object(obj, p, kind, cols, need_labels, probs)
    except (InputError, MemoryError):
        raise
    except RecursionError as e:
        raise unreadable(p, kind, e) from None
    except Exception as e:  # noqa: BLE001  (any unreadable file: one line)
        raise unreadable(p, kind, e) from None
