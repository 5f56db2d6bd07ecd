"""Scores read a block of rows at a time: the one reader behind every command.

Every format's reader is a :class:`ScoreSource`; its :meth:`ScoreSource.chunks` passes every block
through :func:`softcal._files.check.check_chunk`, so that ``calibrate`` and ``evaluate`` (which
read a whole file with :meth:`ScoreSource.read_all`) and ``apply`` (which streams it) accept and
refuse exactly the same files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

from .check import check_chunk, check_layout, check_memory
from .common import InputError, unreadable

__all__ = ["ScoreSource", "ArraySource", "Split"]

Split = Tuple[np.ndarray, np.ndarray]


class ScoreSource:
    """A file of scores (and maybe labels) read chunk by chunk.

    Attributes: ``path``, ``kind``, ``split`` (None, or "val"/"test" for a file of two splits),
    ``rows`` N, ``classes`` C, ``dtype`` of the scores as used (numpy float32 or float64; float16
    and bfloat16 are widened to float32), ``has_labels``, ``columns`` (score column names for
    tabular files, else None), ``label_name``. :meth:`chunks` yields checked blocks (scores (n, C)
    ``dtype``, labels (n,) int64 or None).
    """

    path: Path
    kind: str
    split: Optional[str] = None
    rows: int
    classes: int
    dtype: np.dtype
    has_labels: bool
    columns: Optional[List[str]] = None
    label_name: Optional[str] = None
    probs: bool = False

    def _layout(self, score_shape, score_dtype, label_shape, label_dtype, need_labels: bool) -> None:
        """Shapes and dtypes, checked before any value is read (check_layout)."""
        self.dtype = check_layout(self.path, self.split, tuple(score_shape), score_dtype,
                                  None if label_shape is None else tuple(label_shape), label_dtype,
                                  need_labels)
        self.rows, self.classes = int(score_shape[0]), int(score_shape[1])
        self.has_labels = label_shape is not None

    def _blocks(self, rows: int) -> Iterator[Tuple[np.ndarray, Optional[np.ndarray]]]:
        """The raw blocks of the format (unchecked); subclasses define it."""
        raise NotImplementedError

    def chunks(self, rows: int) -> Iterator[Tuple[np.ndarray, Optional[np.ndarray]]]:
        """Checked blocks of at most ``rows`` rows; InputError for a value the commands refuse,
        or when the file holds fewer or more rows than it announced."""
        done = 0
        blocks = self._blocks(rows)
        while True:
            try:
                s, y = next(blocks)
            except StopIteration:
                break
            except (InputError, MemoryError):
                raise
            except Exception as e:  # noqa: BLE001  (a file that breaks half-way: one line)
                raise unreadable(self.path, self.kind, e) from None
            s, y = check_chunk(self.path, self.split, done, s, y if self.has_labels else None,
                               probs=self.probs, name=self.label_name or "labels")
            done += s.shape[0]
            if done > self.rows:
                break
            yield s, y
        if done != self.rows:
            raise InputError(f"{self.path}: {done} rows read, but the file announced {self.rows} "
                             "(a truncated or changed file?)")

    def _materialises(self) -> bool:
        """Whether read_all allocates the whole file (not when it is in memory already)."""
        return True

    def nbytes(self) -> int:
        """Bytes that the whole file takes in memory once read (scores and labels)."""
        return self.rows * (self.classes * self.dtype.itemsize + (8 if self.has_labels else 0))

    def read_all(self, progress: Optional[Callable[[int, int], None]] = None,
                 block: int = 1 << 16) -> Split:
        """The whole file, checked: (scores (N, C) ``dtype``, labels (N,) int64 or None).
        Refused before reading when it would not fit in the memory available."""
        if self._materialises():
            check_memory(self.path, f"its {self.rows} x {self.classes} scores", self.nbytes())
        parts = []
        for part in self.chunks(block):
            parts.append(part)
            if progress is not None:
                progress(part[0].shape[0], self.rows)
        if len(parts) == 1:  # a copy where the block is a read-only view (a memory map, a buffer)
            s, y = parts[0]
            s = s if s.flags.writeable else s.copy()
            y = y if y is None or y.flags.writeable else y.copy()
        else:
            s = np.concatenate([c[0] for c in parts]) if parts else np.zeros((0, self.classes), self.dtype)
            y = None
            if self.has_labels:
                y = np.concatenate([c[1] for c in parts]) if parts else np.zeros(0, np.int64)
        return s, y  # type: ignore[return-value]


class ArraySource(ScoreSource):
    """Scores (and labels) already in memory, or a memory-mapped .npy, sliced into blocks."""

    def __init__(self, path: Path, kind: str, scores: np.ndarray, labels: Optional[np.ndarray],
                 *, split: Optional[str] = None, label_name: str = "labels", need_labels: bool = False,
                 probs: bool = False):
        self.path, self.kind, self.split, self.probs = path, kind, split, probs
        self.scores, self.labels = scores, labels
        self._layout(scores.shape, scores.dtype, None if labels is None else labels.shape,
                     None if labels is None else labels.dtype, need_labels)
        self.label_name = label_name if labels is not None else None

    def _blocks(self, rows):
        for i in range(0, self.rows, rows):
            yield (np.asarray(self.scores[i:i + rows]),
                   None if self.labels is None else np.asarray(self.labels[i:i + rows]))

    def _materialises(self) -> bool:
        return isinstance(self.scores, np.memmap)

    def read_all(self, progress=None, block: int = 1 << 16) -> Split:
        # in memory already (or memory-mapped): checked as one block, not copied when usable as is
        return super().read_all(progress, block=max(self.rows, 1))
