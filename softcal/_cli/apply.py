"""``softcal apply``: calibrated probabilities (or logits) of new data, written chunk by chunk.

The input is read through the same reader and checks as ``calibrate`` (so a file that calibrate
refuses is refused here too); every check that needs no value (the options, the output's folder
and suffix, the output against the inputs, the file's shapes) runs before the output is opened;
the output is written to a temporary file beside it and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch

from .. import _io
from .._files.check import check_memory
from . import common as C

__all__ = ["add_parser", "run", "DEFAULT_CHUNK_ROWS"]

DEFAULT_CHUNK_ROWS = 65536

_IN_TO_OUT = {".npz": ".npz", ".npy": ".npy", ".pt": ".pt", ".pth": ".pt", ".csv": ".csv",
              ".tsv": ".tsv", ".parquet": ".parquet", ".pq": ".parquet"}


def add_parser(sub) -> argparse.ArgumentParser:
    a = sub.add_parser(
        "apply", help="write calibrated probabilities (or logits) of new data",
        description="Divide FILE's logits by T and write softmax(logits / T) (or, with --logits, "
                    "logits / T) to --out (or, given a calibrator saved by calibrate --method M "
                    "--save, its calibrated probabilities or logits), chunk by chunk: .npy inputs are memory-mapped "
                    "and "
                    ".npz, CSV and Parquet inputs are read a block of rows at a time, so files "
                    "larger than memory work (.pt and pickles are loaded whole). Labels, when "
                    "FILE has them, are copied (not into .npy, which holds one array). FILE is "
                    "checked as calibrate checks it; --out is written whole or not at all (an "
                    "existing --out is replaced only once the new one is complete).",
        epilog="Output format by the suffix of --out: .npz (arrays 'probs' or 'logits', and "
               "'labels'), .npy, .csv, .tsv, .parquet (the label column, then one column per "
               "class named probs_<class> or logits_<class>: logit_3 -> probs_3), .pt. Default: "
               f"FILE-calibrated with the input's suffix (.npz for pickles).\n{C.FORMATS_LINE}\n"
               f"{C.EXIT_CODES}.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("file", metavar="FILE", help="file with scores (labels optional)")
    a.add_argument("--temperature", "-t", metavar="T|T.json|CAL.json", required=True,
                   help="the temperature: a number > 0, or the file written by calibrate --save "
                        "(a temperature, or with --method M any calibrator)")
    a.add_argument("--out", "-o", default=None, metavar="OUT",
                   help="output file, in an existing folder (default: FILE-calibrated.<suffix>)")
    a.add_argument("--logits", action="store_true",
                   help="write calibrated logits (logits / T) instead of probabilities")
    a.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, metavar="N",
                   help="rows per chunk (default: %(default)s)")
    C.add_input_options(a)
    return a


def output_path(src_path: Path, out: Optional[str]) -> Path:
    """--out, or FILE-calibrated.<suffix> beside FILE; refused unless its suffix is written."""
    if out is None:
        suffix = _IN_TO_OUT.get(src_path.suffix.lower(), ".npz")
        path = src_path.with_name(f"{src_path.stem}-calibrated{suffix}")
    else:
        path = Path(out)
    if path.suffix.lower() not in _io.OUTPUT_SUFFIXES:
        raise C.CLIError(f"--out {path}: cannot write {path.suffix or 'a file without suffix'!r}; "
                         f"write one of {', '.join(_io.OUTPUT_SUFFIXES)}")
    return path


def temperature_transform(t: float, device: torch.device,
                          dtype: torch.dtype) -> Callable[[torch.Tensor, torch.dtype], torch.Tensor]:
    """x -> x / T computed in a dtype (the scores' own, or float64 where that overflows)."""
    if not 1 / t < math.inf or t < torch.finfo(torch.float64).tiny:
        raise C.CLIError(f"--temperature {t!r} cannot be used: 1 / T is not a finite float64")
    scalers = {}

    def transform(x: torch.Tensor, in_dtype: torch.dtype) -> torch.Tensor:
        if 1 / t > torch.finfo(in_dtype).max:
            # 1 / T is not a number of this dtype (TemperatureScaler refuses it): x / T rounded
            # to it, +-inf where it overflows, which the caller refuses or redoes in float64
            return (x.to(torch.float64) / t).to(in_dtype)
        if in_dtype not in scalers:
            scalers[in_dtype] = C.scaler(t, device, in_dtype)
        return scalers[in_dtype](x.to(in_dtype))

    return transform


def calibrator_transform(cal: torch.nn.Module, device: torch.device
                         ) -> Callable[[torch.Tensor, torch.dtype], torch.Tensor]:
    """x -> the calibrator's calibrated logits (log-probabilities for ETS and the binning
    calibrators) computed in a dtype, as :func:`temperature_transform` for T."""
    cal = cal.to(device)

    def transform(x: torch.Tensor, in_dtype: torch.dtype) -> torch.Tensor:
        return cal(x.to(in_dtype))

    return transform


def run(args: argparse.Namespace) -> int:
    from .calibrators import read_calibrator

    device = C.device(args.device)
    loaded = read_calibrator(args.temperature)  # a calibrator saved by calibrate --method M --save
    if loaded is None:
        t, t_from = C.read_temperature(args.temperature)
        what = f"T = {t:g}"
    else:
        t, t_from = math.nan, args.temperature
        what = f"the {loaded[1]} calibrator"
    if args.chunk_rows < 1:
        raise C.CLIError(f"--chunk-rows must be >= 1, got {args.chunk_rows}")
    src_path = Path(args.file)
    src = _io.open_scores(src_path, probs=args.probs, **C.columns(args))
    out = output_path(src_path, args.out)
    C.check_outputs([("--out", out)], [src_path, C.temperature_file(args.temperature)])
    if loaded is not None and src.classes != int(loaded[0].hyperparameters["classes"]):
        raise C.CLIError(f"{src_path} has {src.classes} classes but {what} in {t_from} was fitted "
                         f"on {int(loaded[0].hyperparameters['classes'])}")
    suffix = out.suffix.lower()
    if suffix == ".parquet":
        _io._pyarrow()
    key = "logits" if args.logits else "probs"
    dtype = src.dtype  # float32 or float64 (float16/bfloat16 read as float32)
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    if suffix == ".pt":  # held in memory until torch.save
        check_memory(out, f"the {src.rows} x {src.classes} output (.pt is written whole)",
                     src.rows * src.classes * dtype.itemsize)
    transform = (temperature_transform(t, device, tdtype) if loaded is None
                 else calibrator_transform(loaded[0], device))

    def calibrated() -> Iterator[Tuple[np.ndarray, Optional[np.ndarray]]]:
        done = 0
        with C.bar(C.progress_enabled(args), total=src.rows, desc="softcal: applying T",
                   unit="row") as bar, torch.no_grad():
            for i, (s, y) in enumerate(src.chunks(args.chunk_rows)):
                if i == 0:
                    C.warn_if_probs("apply", args.file, s, args.probs)
                x = torch.from_numpy(np.array(s, order="C")).to(device)  # a copy: s may be read-only
                if args.probs:
                    x = torch.log(x.clamp_min(torch.finfo(x.dtype).tiny))
                v = _calibrate_chunk(x, transform, tdtype, args.logits, what, done, loaded is not None)
                bar.update(s.shape[0])
                done += s.shape[0]
                yield v.cpu().numpy(), y

    with C.atomic_output(out) as tmp:
        _io.write_chunks(tmp, calibrated(), rows=src.rows, classes=src.classes, dtype=dtype, key=key,
                         label_name=src.label_name, columns=src.columns, suffix=suffix,
                         has_labels=src.has_labels)
    shown = what if loaded is not None else f"T = {t:.4g}"
    C.say(args, f"softcal apply: {shown} (from {t_from}) applied to {src.rows} rows x "
                f"{src.classes} classes of {src_path}\n  wrote {key}"
                + (" and labels" if src.has_labels and suffix != ".npy" else "")
                + f" ({dtype.name}) to {out}")
    return C.EXIT_OK


def _calibrate_chunk(x: torch.Tensor, transform, tdtype: torch.dtype, logits: bool, what: str,
                     start: int, calibrator: bool = False) -> torch.Tensor:
    """The transform's calibrated logits, or their softmax, in ``tdtype``; the probabilities are
    computed in float64 where the logits overflow ``tdtype``; refused (CLIError) where the
    result cannot be represented in ``tdtype``. ``what``: "T = 0.5" or "the matrix calibrator".
    A calibrator's -inf (the log of a probability 0: binning calibrators with min_prob=0) is a
    value, not an overflow."""
    def bad(z: torch.Tensor) -> torch.Tensor:
        return (torch.isnan(z) | (z == math.inf)) if calibrator else ~torch.isfinite(z)

    def refuse(z: torch.Tensor, dtype: torch.dtype) -> None:
        row = start + int(bad(z).any(1).nonzero()[0, 0])
        if calibrator:
            raise C.CLIError(f"{what} gives calibrated logits that are not {str(dtype)[6:]} numbers "
                             f"(NaN or +inf) in row {row}")
        raise C.CLIError(f"{what} is too small for these scores: logits / T is not a finite "
                         f"{str(dtype)[6:]} in row {row}; use a larger T"
                         + (" or float64 scores" if dtype != torch.float64 else ""))

    z = transform(x, tdtype)
    if bool(bad(z).any()):
        if logits or tdtype == torch.float64:
            refuse(z, tdtype)
        z = transform(x, torch.float64)
        if bool(bad(z).any()):
            refuse(z, torch.float64)
    return z if logits else torch.softmax(z, dim=1).to(tdtype)
