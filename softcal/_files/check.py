"""The one validator of what a file of scores holds, shared by every reader and every command.

``calibrate``, ``evaluate`` and ``apply`` read through the same sources (:mod:`.source`), and
every source calls these checks, so that a file is either refused by all three commands or used
by all three in the same way:

* :func:`check_layout`, before a value is read (and so before any output is opened): scores a
  2-D float array (N, C) with C >= 1 of float16/32/64, labels (when present) N integers (shape
  (N,) or (N, 1)), in integer or float storage;
* :func:`check_chunk`, on every block of rows as it is read: no NaN and no +inf score, no row
  whose logits are all -inf, labels integers in [0, C) whose logit is not -inf (the conditions of
  ``TemperatureScaler.fit``); with ``--probs`` every score in [0, 1];
* :func:`check_memory` / :func:`tensor_to_numpy`: what a file would take in memory is compared
  with the memory available before it is allocated, and a tensor whose elements would take more
  bytes than its file stores (an expanded, stride-0 view) is refused before it is materialised.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np
import torch

from .common import InputError

__all__ = ["check_layout", "check_chunk", "check_memory", "memory_available", "tensor_to_numpy",
           "score_dtype"]

_SCORE_DTYPES = {np.dtype(np.float16): np.dtype(np.float32), np.dtype(np.float32): np.dtype(np.float32),
                 np.dtype(np.float64): np.dtype(np.float64)}
_INT64_MAX = float(2 ** 63)


def _where(path: Path, split: Optional[str]) -> str:
    return f"{path}" + (f" [{split}]" if split else "")


def score_dtype(dtype: np.dtype) -> Optional[np.dtype]:
    """The native dtype scores of ``dtype`` are used in (float16 widened to float32), or None."""
    dtype = np.dtype(dtype)
    return _SCORE_DTYPES.get(dtype.newbyteorder("=") if dtype.byteorder not in "=|" else dtype)


def check_layout(path: Path, split: Optional[str], score_shape: Tuple[int, ...], score_dt: np.dtype,
                 label_shape: Optional[Tuple[int, ...]], label_dt: Optional[np.dtype],
                 need_labels: bool) -> np.dtype:
    """Check shapes and dtypes before reading values; return the dtype the scores are used in.

    score_shape must be (N, C) with C >= 1 and score_dt float16/float32/float64 (either byte
    order); label_shape (N,) or (N, 1) of an integer or float dtype, or None (refused when
    ``need_labels``). Raises :class:`InputError` naming the file and what is wrong.
    """
    where = _where(path, split)
    score_dt = np.dtype(score_dt)
    if len(score_shape) != 2 or score_dt.kind != "f":
        raise InputError(f"{where}: scores must be a 2-D float array (N, C), got {score_dt} "
                         f"{tuple(score_shape)}")
    used = score_dtype(score_dt)
    if used is None:
        raise InputError(f"{where}: scores of dtype {score_dt} ({score_dt.itemsize * 8}-bit float) "
                         "cannot be used: torch has no such type; save them as float32 or float64")
    if score_shape[1] < 1:
        raise InputError(f"{where}: the scores have 0 classes (shape {tuple(score_shape)})")
    if label_shape is None:
        if need_labels:
            raise InputError(f"{where}: no labels")
        return used
    label_dt = np.dtype(label_dt)
    if not (len(label_shape) == 1 or (len(label_shape) == 2 and label_shape[1] == 1)) \
            or label_dt.kind not in "iuf":
        raise InputError(f"{where}: labels must be a 1-D integer array (N,), got {label_dt} "
                         f"{tuple(label_shape)}")
    if label_shape[0] != score_shape[0]:
        raise InputError(f"{where}: {label_shape[0]} labels for {score_shape[0]} rows of scores")
    return used


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_chunk(path: Path, split: Optional[str], start: int, scores: np.ndarray,
                labels: Optional[np.ndarray], *, probs: bool = False,
                name: str = "labels") -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Check one block of rows (rows ``start``.. of the file); return it ready to use.

    scores (n, C) float of any byte order -> native C-contiguous float32/float64 (float16 widened);
    labels (n,) or (n, 1) integers or integral floats -> (n,) int64, or None. Refuses NaN, +inf, a
    row whose logits are all -inf, a label outside [0, C) or whose logit is -inf; with ``probs``
    a score outside [0, 1]. Rows in messages count from 0 over the whole file.
    """
    where = _where(path, split)
    used = score_dtype(scores.dtype)
    if used is None:  # check_layout refused it already; kept for direct callers
        raise InputError(f"{where}: scores of dtype {scores.dtype} cannot be used")
    s = np.ascontiguousarray(scores, dtype=used)
    n, c = s.shape
    if n:
        if probs:
            bad = ~((s >= 0) & (s <= 1))  # NaN fails both
            if bad.any():
                r = _first(bad.any(1))
                v = s[r][bad[r]][0]
                raise InputError(f"--probs was given but the scores are not in [0, 1] ({where}: row "
                                 f"{start + r} holds {v!r})")
        else:
            mx = s.max(1)  # NaN propagates
            if np.isnan(mx).any():
                raise InputError(f"{where}: the scores contain NaN (first in row {start + _first(np.isnan(mx))})")
            if np.isposinf(mx).any():
                raise InputError(f"{where}: the scores contain +inf (first in row "
                                 f"{start + _first(np.isposinf(mx))})")
            if np.isneginf(mx).any():
                raise InputError(f"{where}: every logit of row {start + _first(np.isneginf(mx))} is "
                                 "-inf (its probabilities are undefined)")
    if labels is None:
        return s, None
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != n:
        raise InputError(f"{where}: {y.shape[0]} labels for {n} rows of scores (rows {start}..)")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y)) | (np.abs(y) >= _INT64_MAX)
        if bad.any():
            r = _first(bad)
            raise InputError(f"{where}: the labels {name!r} hold values that are not integers "
                             f"(row {start + r}: {y[r]!r})")
    elif y.dtype.kind == "u" and y.dtype.itemsize == 8 and n and int(y.max()) >= 2 ** 63:
        r = _first(y >= np.uint64(2 ** 63))
        raise InputError(f"{where}: labels must be in [0, {c - 1}] for {c} classes, got label "
                         f"{int(y[r])} (row {start + r})")
    elif y.dtype.kind not in "iuf":
        raise InputError(f"{where}: labels must be integers, got {y.dtype}")
    y = y.astype(np.int64)
    if n:
        bad = (y < 0) | (y >= c)
        if bad.any():
            r = _first(bad)
            raise InputError(f"{where}: labels must be in [0, {c - 1}] for {c} classes, got label "
                             f"{int(y[r])} (row {start + r})")
        if not probs:
            xy = s[np.arange(n), y]
            if np.isneginf(xy).any():
                r = _first(np.isneginf(xy))
                raise InputError(f"{where}: the label's logit is -inf in row {start + r} (NLL is "
                                 "infinite)")
    return s, y


# ---------------------------------------------------------------------- sizes
def memory_available() -> Optional[int]:
    """Bytes of memory this process can still take (MemAvailable on Linux), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n / 1e6:.3g} MB"


def check_memory(path: Path, what: str, nbytes: int) -> None:
    """Refuse (InputError) before allocating ``nbytes`` for ``what`` when memory cannot hold it."""
    avail = memory_available()
    if avail is not None and nbytes > avail:
        raise InputError(f"{path}: {what} would take {_gb(nbytes)} in memory, more than the "
                         f"{_gb(avail)} available; use a smaller file (softcal apply reads .npy, "
                         ".npz, CSV and Parquet a block of rows at a time)")


def tensor_to_numpy(path: Path, name: str, x: Any) -> np.ndarray:
    """A tensor (or array) read from a file, as numpy, refused before it is materialised when it
    is sparse, quantized, on the meta device, or would take more bytes than its storage holds."""
    if not isinstance(x, torch.Tensor):
        return np.asarray(x)
    what = f"{path}: {name}"
    if x.layout != torch.strided:
        raise InputError(f"{what} is a {x.layout} tensor; save a dense one (x.to_dense())")
    if x.is_quantized:
        raise InputError(f"{what} is a quantized tensor ({x.dtype}); save x.dequantize()")
    if x.device.type == "meta":
        raise InputError(f"{what} is a meta tensor: it holds no values")
    if x.is_complex() or x.dtype == torch.bool:
        raise InputError(f"{what} has dtype {x.dtype}; scores are float, labels integers")
    size = x.element_size() * x.numel()
    stored = x.untyped_storage().nbytes()
    if size > stored:
        raise InputError(f"{what} of shape {tuple(x.shape)} (strides {x.stride()}) would take "
                         f"{_gb(size)} in memory from {stored} bytes of the file (an expanded "
                         "view); save x.contiguous() if that is meant")
    x = x.detach().cpu()
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()  # numpy has no bfloat16; float16 is widened too (exact)
    return x.numpy()
