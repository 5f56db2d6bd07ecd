"""Calibrated scores written chunk by chunk, in the format of the output's suffix.

The writers write to the path they are given; the command line gives them a temporary file beside
the target (:mod:`.atomic`), so that they never need to clean up after themselves.
"""

from __future__ import annotations

import csv
import io
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .common import OUTPUT_SUFFIXES, InputError
from .tabular import pyarrow_parquet

__all__ = ["write_chunks", "output_columns"]

# a leading word that says what a column holds: "logit_3" holds class 3's logit
_WHAT = re.compile(r"^(?:logits?|probs?|probabilit(?:y|ies)|scores?|preds?|predictions?)"
                   r"(?:[_\-. ]+|(?=\d)|$)", re.IGNORECASE)


def output_columns(columns: Optional[Sequence[str]], key: str, classes: int) -> List[str]:
    """Names of the C output columns holding ``key`` ("probs" or "logits"): ``{key}_{class}``,
    the class taken from the input's column name without a word such as logit/prob/score
    (``logit_3`` -> ``probs_3``, ``cat`` -> ``probs_cat``), else its index."""
    if not columns:
        return [f"{key}_{j}" for j in range(classes)]
    names = []
    for j, name in enumerate(columns):
        rest = _WHAT.sub("", str(name), count=1)
        names.append(f"{key}_{rest if rest else j}")
    if len(set(names)) != len(names):
        names = [f"{key}_{j}" for j in range(classes)]
    return names


def write_chunks(path: Path, chunks: Iterator[Tuple[np.ndarray, Optional[np.ndarray]]], *, rows: int,
                 classes: int, dtype: np.dtype, key: str, label_name: Optional[str],
                 columns: Optional[List[str]], suffix: Optional[str] = None,
                 has_labels: bool = False) -> None:
    """Write (values (n, C), labels (n,) or None) chunks to ``path``, in the format of ``suffix``
    (default: the path's own).

    ``.npy``: the values only, memory-mapped; ``.npz``: ``key`` (and ``labels`` when there are
    labels) streamed into the archive; ``.csv``/``.tsv``/``.parquet``: the label column (when
    there are labels) and C value columns named by :func:`output_columns`; ``.pt``: a dict of
    tensors (held in memory). ``rows`` must be the total number of rows; ``has_labels`` writes
    the labels (empty) also when there is no row.
    """
    suffix = (suffix or path.suffix).lower()
    dtype = np.dtype(dtype)
    names = output_columns(columns, key, classes)
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
            if have_labels or has_labels:
                spool.seek(0)
                with z.open("labels.npy", "w", force_zip64=True) as f:
                    _write_header(f, np.dtype(np.int64), (rows,))
                    for b in iter(lambda: spool.read(1 << 20), b""):
                        f.write(b)
    elif suffix in (".csv", ".tsv"):
        fmt = "%.17g" if dtype == np.float64 else "%.9g"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t" if suffix == ".tsv" else ",")
            header_done = False
            for v, y in chunks:
                if not header_done:
                    w.writerow(([label_name or "label"] if y is not None else []) + names)
                    header_done = True
                for k in range(v.shape[0]):
                    w.writerow(([int(y[k])] if y is not None else []) + [fmt % x for x in v[k]])
            if not header_done:
                w.writerow(([label_name or "label"] if has_labels else []) + names)
    elif suffix == ".parquet":
        pyarrow_parquet()
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
            if writer is None:  # no rows: a file with the columns and no row
                ptype = pa.float64() if dtype == np.float64 else pa.float32()
                fields = ([pa.field(label_name or "label", pa.int64())] if has_labels else []) + \
                    [pa.field(n, ptype) for n in names]
                pq.write_table(pa.schema(fields).empty_table(), path)
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
        if ys or has_labels:
            d["labels"] = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.int64)
        torch.save(d, path)
    else:
        raise InputError(f"--out {path}: cannot write {suffix or 'a file without suffix'}; write one "
                         f"of {', '.join(OUTPUT_SUFFIXES)}")


def _write_header(f, dtype: np.dtype, shape: tuple) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)  # a 2-D header is far below its 64 KiB
    f.write(buf.getvalue())
