"""What every calibrator shares: reading the fit data (tensors, a model and a loader, chunks,
torch.distributed), row sums over the data with one all-reduce per pass, the fit result, and a
state_dict that loads into a fresh, unfitted calibrator.

The data are read with the helpers of :mod:`softcal.calibration` (the same validation and error
messages as :class:`softcal.nn.TemperatureScaler`): ``_collect_logits`` (a model and a loader),
``_chunk_source`` (re-iterable chunks), ``_Stats._prepare`` (per-chunk validation: dtype, shape,
labels in range, NaN/+inf).

With ``group`` (torch.distributed) the ranks agree through :mod:`softcal._agree`, as
``TemperatureScaler.fit`` does: one small collective on the fit's options (the calibrator's
``options`` callback publishes them) and the outcome of each rank's local checks, one after the
first read of the data on its outcome, number of classes and dtype, and every later sum goes
through :func:`softcal._agree.all_reduce_checked`. A rank's error, or ranks that disagree, give
the same error on every rank; none is left waiting in a collective.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .. import _fit_data as _fd
from .._agree import Signature, agree, agree_on, all_reduce_checked
from .._temperature_fit import _Stats

#: the input dtypes a distributed fit publishes (every rank with rows must read the same one)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

ArrayLike = Any  # torch.Tensor or numpy.ndarray

__all__ = ["CalibratorFitResult", "Calibrator"]


@dataclass
class CalibratorFitResult:
    """What ``fit`` found (every calibrator but TemperatureScaler, which has :class:`FitResult`).

    Attributes:
        method: the calibrator's name ("vector", "matrix", "dirichlet", "ets", "histogram",
            "isotonic", "scaling-binning").
        nll_before: mean NLL per row of the uncalibrated logits on the fit rows.
        nll_after: mean NLL per row of the calibrated output on the fit rows.
        objective: the minimised objective (mean NLL plus the regulariser; NaN for the binning
            calibrators, which minimise nothing).
        iterations: Newton iterations of the final fit (0 for the binning calibrators).
        passes: passes over the fit data of the final fit.
        converged: the stopping rule was met (gradient norm <= tol for the scaling fits).
        grad_norm: max |gradient| of the objective at the end (NaN where there is none).
        rows, classes: the fit data's shape.
        time_s: wall time of the whole fit (cross-validation included).
        hyperparameters: the values used for the final fit (chosen by cross-validation where
            they were not given).
        cv: None, or the cross-validation: {"folds": k, "seed": s, "metric": "nll"|"brier",
            "grid": [{...hyper-parameters...}, ...], "scores": [mean held-out score, ...],
            "chosen": {...}}.
    """

    method: str
    nll_before: float
    nll_after: float
    objective: float
    iterations: int
    passes: int
    converged: bool
    grad_norm: float
    rows: int
    classes: int
    time_s: float
    hyperparameters: Dict[str, Any] = field(default_factory=dict)
    cv: Optional[Dict[str, Any]] = None

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------- the fit data
class Rows:
    """The fit data as validated float64 chunks ``(x (n, C), y (n,) int64, row0)``.

    In memory (``fit(logits, labels)``, ``fit(model, loader)``) the chunks are converted once and
    kept; otherwise (``fit(chunks)``) every pass re-reads them. With ``group`` every sum is
    all-reduced over the ranks (with an error flag, so that an error on one rank is raised on
    all of them instead of leaving the others waiting).
    """

    def __init__(self, fn: str, data: Any, labels: Any, model: Optional[torch.nn.Module],
                 progress: bool, group: Any, check_probabilities: bool = True,
                 options: Optional[Callable[[Signature], Any]] = None) -> None:
        """``options(sig)``: the fit's local option checks; it returns the checked options (kept
        in ``self.options``) and, with ``group``, publishes with ``sig.same`` those every rank
        must pass alike. It runs before the data are read, inside the agreement of the group."""
        self.fn = fn
        self.group = group
        self._dtype: Optional[torch.dtype] = None
        if group is None:
            self.options = options(Signature(fn)) if options is not None else None
            source = _fd.fit_source(fn, data, labels, model, progress, False)
        else:
            from ..distributed import _dist

            _dist()  # a clear error when torch.distributed is not initialised

            def checks(sig: Signature) -> Tuple[Any, Any]:
                opts = options(sig) if options is not None else None
                return opts, _fd.fit_source(fn, data, labels, model, progress, True)

            (self.options, source), _ = agree_on(fn, group, checks)
        self._stats = _Stats(fn, source, check_probabilities, group)
        self.in_memory = isinstance(source, list)
        self._cache: Optional[List[Tuple[torch.Tensor, torch.Tensor, int]]] = None
        self.device = torch.device("cpu")
        self._validated = False
        self._validate()

    def _read(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, int]]:
        row0 = 0
        first = not self._validated
        for i, chunk in enumerate(_fd.chunks(self._stats.source)):
            logits, labels = self._stats._prepare(i, chunk, first)
            n = logits.shape[0]
            if first and self._dtype is None:
                self._dtype = logits.dtype
            if n:
                yield logits.to(torch.float64), labels.to(torch.int64), row0
            row0 += n

    def _validate(self) -> None:
        """First pass: validate every chunk, count rows, agree on C across ranks."""
        fn = self.fn
        error: Optional[BaseException] = None
        rows = 0
        cache = [] if self.in_memory else None
        try:
            for x, y, r0 in self._read():
                rows += x.shape[0]
                self.device = x.device
                if cache is not None:
                    cache.append((x, y, r0))
        except Exception as exc:  # noqa: BLE001  (re-raised below, after the other ranks know)
            if self.group is None:
                raise
            error = exc
        self._validated = True
        c = self._stats.classes
        if self.group is not None:
            # one small collective: a rank's read error, else each rank's classes, rows, dtype
            sig = Signature(fn)
            sig.each("classes", c, kind="int")
            sig.each("rows", rows)
            sig.each("dtype", self._dtype, show=_DTYPES)
            agreed = agree(fn, self.group, sig, error)
            classes = agreed.each("classes")
            seen = sorted({k for k in classes if k is not None})
            if len(seen) > 1:
                raise ValueError(f"{fn}: the ranks' logits have different numbers of classes ("
                                 + ", ".join(f"{k} on rank {r}" for r, k in enumerate(classes)
                                             if k is not None) + "); every rank must pass the same C")
            dtypes = agreed.each("dtype")
            kinds = {str(d) for r, d in enumerate(dtypes) if d is not None and agreed.each("rows")[r]}
            if len(kinds) > 1:
                raise ValueError(f"{fn}: the ranks' logits have different dtypes ("
                                 + ", ".join(f"{str(d).replace('torch.', '')} on rank {r}"
                                             for r, d in enumerate(dtypes) if d is not None)
                                 + "); every rank must pass the same dtype")
            c = seen[0] if seen else None
            self.total_rows = int(sum(agreed.each("rows")))
        else:
            self.total_rows = rows
        if self.total_rows == 0 or c is None:
            raise ValueError(f"{fn}: empty input (0 rows)")
        self.rows = rows  # this rank's
        self.classes = int(c)
        self._cache = cache

    def chunks(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, int]]:
        """This rank's chunks (x float64 (n, C), y int64 (n,), index of the chunk's first row)."""
        if self._cache is not None:
            return iter(self._cache)
        return self._checked()

    def _checked(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, int]]:
        seen = 0
        for x, y, r0 in self._read():
            seen += x.shape[0]
            yield x, y, r0
        if seen != self.rows:
            raise ValueError(f"{self.fn}: the chunks gave {seen} rows on a later pass but "
                             f"{self.rows} on the first; they must be the same on every pass")

    def row_sum(self, fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
                length: int) -> torch.Tensor:
        """sum over this rank's chunks of fn(x, y, row0) (a float64 vector of ``length``), then
        all-reduced over the group; on the CPU."""
        total = torch.zeros(length, dtype=torch.float64)
        error: Optional[BaseException] = None
        try:
            acc: Optional[torch.Tensor] = None
            for x, y, r0 in self.chunks():
                v = fn(x, y, r0).reshape(-1)
                acc = v if acc is None else acc + v
            if acc is not None:
                total = acc.to("cpu")
        except Exception as exc:  # noqa: BLE001
            if self.group is None:
                raise
            error = exc
        if self.group is None:
            return total
        return all_reduce_checked(self.fn, self.group, total, error)

    def gather(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every row of this rank in memory: (x float64 (N, C), y int64 (N,))."""
        xs, ys = [], []
        for x, y, _ in self.chunks():
            xs.append(x)
            ys.append(y)
        if not xs:
            return (torch.empty(0, self.classes, dtype=torch.float64),
                    torch.empty(0, dtype=torch.int64))
        if len(xs) == 1:  # (no copy)
            return xs[0], ys[0]
        return torch.cat(xs), torch.cat(ys)


def fold_ids(rows: int, folds: int, seed: int) -> torch.Tensor:
    """The fold (0..folds-1) of each of ``rows`` rows: a seeded random permutation, cut in
    ``folds`` parts of equal size (+- 1); int64 (rows,), on the CPU."""
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(rows, generator=g)
    out = torch.empty(rows, dtype=torch.int64)
    out[perm] = torch.arange(rows) % folds
    return out


def check_folds(fn: str, cv: Any) -> int:
    if isinstance(cv, bool) or not isinstance(cv, int) or cv < 2:
        raise ValueError(f"{fn}: cv must be an int >= 2 (the number of folds), got {cv!r}")
    return cv


def grid_hash(values: Any) -> int:
    """A 32-bit hash of a grid of numbers (its values and order), for the ranks of a group to
    check that they search the same grid."""
    import zlib

    return zlib.crc32(repr(tuple(float(v) for v in values)).encode("utf-8"))


def check_tol(fn: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value!r}")
    return v


def check_max_iter(fn: str, max_iter: Any) -> int:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{fn}: max_iter must be an int >= 1, got {max_iter!r}")
    return max_iter


# ---------------------------------------------------------------------- the module base
class Calibrator(torch.nn.Module):
    """Base of the calibrators: ``forward`` maps logits (N, C) (or the wrapped model's output)
    to calibrated logits / log-probabilities, ``predict_proba`` to probabilities.

    Subclasses keep their fitted state in buffers (float64) registered with :meth:`_state`;
    a state_dict of a fitted calibrator loads into a fresh one (the buffers take the saved
    shapes), and the hyper-parameters travel in the state_dict's extra state.
    """

    method = "calibrator"

    def __init__(self, model: Optional[torch.nn.Module] = None) -> None:
        super().__init__()
        fn = f"softcal.nn.{type(self).__name__}"
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"{fn}: model must be a torch.nn.Module or None, got {type(model).__name__}")
        self.model = model
        self.hyperparameters: Dict[str, Any] = {}
        self.cv_results: Optional[Dict[str, Any]] = None

    def _state(self, name: str, value: Optional[torch.Tensor] = None) -> None:
        self.register_buffer(name, torch.empty(0, dtype=torch.float64) if value is None else value)

    @property
    def fitted(self) -> bool:
        return bool(self.hyperparameters.get("_fitted", False))

    def _logits_in(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x) if self.model is not None else x
        name = type(self).__name__
        if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
            raise TypeError(f"softcal.nn.{name}: expected floating-point logits, got "
                            f"{getattr(logits, 'dtype', type(logits).__name__)}")
        if not self.fitted:
            raise RuntimeError(f"softcal.nn.{name}: not fitted; call fit(logits, labels) first "
                               "(or load a state_dict)")
        c = int(self.hyperparameters["classes"])
        if logits.shape[-1] != c:
            raise ValueError(f"softcal.nn.{name}: logits have {logits.shape[-1]} classes (last "
                             f"dimension, shape {tuple(logits.shape)}) but the calibrator was "
                             f"fitted on {c}")
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities (..., C), rows summing to 1, the input's dtype."""
        return torch.softmax(self(x), dim=-1)

    def get_extra_state(self) -> Dict[str, Any]:
        return {"method": self.method, "hyperparameters": dict(self.hyperparameters),
                "cv": self.cv_results}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("method") != self.method:
            got = state.get("method") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"softcal.nn.{type(self).__name__}: the state_dict is of a "
                             f"{got!r} calibrator, not {self.method!r}")
        self.hyperparameters = dict(state.get("hyperparameters", {}))
        self.cv_results = state.get("cv")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The buffers take the saved shapes (a fresh calibrator has empty ones).
        for name in list(self._buffers):
            key = prefix + name
            if key in state_dict and isinstance(state_dict[key], torch.Tensor):
                old = self._buffers[name]
                self._buffers[name] = torch.empty_like(state_dict[key], device=old.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        hp = {k: v for k, v in self.hyperparameters.items() if not k.startswith("_")}
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())

    def _rows(self, fn: str, data: Any, labels: Any, progress: bool, group: Any,
              check_probabilities: bool = True,
              options: Optional[Callable[[Signature], Any]] = None) -> Rows:
        """The fit data; ``options``: the fit's option checks (see :class:`Rows`)."""
        if isinstance(data, torch.nn.Module):
            return Rows(fn, data, labels, None, progress, group, check_probabilities, options)
        if self.model is not None and not _fd.is_array(data) and labels is None:
            return Rows(fn, self.model, data, None, progress, group, check_probabilities, options)
        return Rows(fn, data, labels, None, progress, group, check_probabilities, options)


def mean_nll_of_logits(rows: Rows) -> float:
    """Mean NLL of the raw logits over every rank's rows (one pass)."""
    def f(x: torch.Tensor, y: torch.Tensor, _r0: int) -> torch.Tensor:
        lp = torch.log_softmax(x, dim=1).gather(1, y[:, None])
        return torch.stack([-lp.sum(), torch.tensor(float(x.shape[0]), dtype=torch.float64,
                                                    device=x.device)])
    s = rows.row_sum(f, 2)
    return float(s[0] / s[1])


def timer() -> Callable[[], float]:
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0
