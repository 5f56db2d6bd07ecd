"""Post-hoc temperature scaling (Guo et al. 2017), fitted exactly.

Maths. With beta = 1/T and p_i = softmax(beta * x_i), the validation NLL

    f(beta)   = sum_i [ logsumexp(beta * x_i) - beta * x_i,y ]
    f'(beta)  = sum_i ( E_p_i[x_i] - x_i,y )
    f''(beta) = sum_i Var_p_i[x_i]  >= 0

is convex in beta, so its minimiser is the root of the monotone function f'. One fused pass over
the logits (:func:`softcal.functional.temperature_stats`) gives f, f' and f'' at once, and a
safeguarded Newton iteration on beta finds the root in a handful of passes:

* a bracket [lo, hi] with f'(lo) < 0 < f'(hi) is kept from every evaluated point;
* while the bracket is open on one side, the Newton step beta - f'/f'' is taken when it stays
  inside, otherwise beta moves by a factor of 4 towards the open side;
* once both ends are known, the next point is the root of the cubic Hermite interpolant of f'
  (f' and f'' at both ends: no extra pass), which converges at least as fast as Newton and saves
  about one pass on real logits; if that fails, Newton or a geometric bisection;
* the iteration stops when the Newton step changes T by less than ``tol`` relatively
  (|dT|/T = |dbeta|/beta to first order). The last step is applied without another pass, and the
  reported NLL is corrected by the second-order Taylor term (its error is O(dbeta^3)).

Boundaries. T is searched in ``bounds`` = [1e-3, 1e3] by default. When the optimum is outside:

* every row's label holds the row's largest logit (separable data, detected on the first pass):
  f' < 0 for every beta and the NLL keeps falling as T -> 0; the fit stops at T = bounds[0] and
  warns (likewise when f' is still negative at bounds[0]);
* the logits are anti-informative (f'(beta) > 0 down to beta = 1 / bounds[1]): the fit stops at
  T = bounds[1] and warns;
* within every row all logits are equal (f' = f'' = 0): T does not matter; the fit keeps the
  current temperature and warns.

The temperature is stored as a parameter ``log_temperature`` (so T > 0 always); it is in the
state_dict and moves with ``.to()``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from . import functional as F

__all__ = ["FitResult", "TemperatureScaler", "DEFAULT_BOUNDS", "CalibratorFitResult", "VectorScaler",
           "MatrixScaler", "DirichletCalibrator", "EnsembleTemperatureScaler", "HistogramBinning",
           "IsotonicCalibrator", "ScalingBinningCalibrator"]

#: Default search interval for T. Logits of trained networks need T in about [0.5, 5]; the
#: interval leaves three decades either side for logits on unusual scales.
DEFAULT_BOUNDS: Tuple[float, float] = (1e-3, 1e3)

ArrayLike = Any  # torch.Tensor or numpy.ndarray


@dataclass
class FitResult:
    """What :meth:`TemperatureScaler.fit` found.

    Attributes:
        temperature: the fitted T (> 0, finite).
        nll_before: mean NLL per row at the temperature the fit started from.
        nll_after: mean NLL per row at the fitted T.
        iterations: passes over the data (each evaluates NLL, gradient and curvature).
        converged: True when |dT|/T < tol was reached inside the bounds.
        at_bound: "lower", "upper" or None: the optimum lies outside the bounds (see warnings).
        rows: number of rows fitted on.
        time_s: wall time of the fit in seconds (including collecting logits from a model).
    """

    temperature: float
    nll_before: float
    nll_after: float
    iterations: int
    converged: bool
    at_bound: Optional[str]
    rows: int
    time_s: float

    def to_dict(self) -> dict:
        return asdict(self)


class TemperatureScaler(torch.nn.Module):
    """Divide logits by a learned temperature T > 0.

    ``TemperatureScaler()`` maps logits to logits / T; ``TemperatureScaler(model)`` wraps a trained
    classifier so that ``forward(x) = model(x) / T``. Fit T with :meth:`fit`.

    Args:
        model: optional classifier whose output (N, C) logits are scaled.
        init_temperature: starting T (> 0, finite).

    Shapes: forward(logits (N, C) or (..., C), any float dtype) returns the same shape and dtype.
    The parameter is ``log_temperature`` (float32, 0-dim); ``temperature`` is its exp as a float.
    """

    def __init__(self, model: Optional[torch.nn.Module] = None, init_temperature: float = 1.0) -> None:
        super().__init__()
        fn = "softcal.nn.TemperatureScaler"
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"{fn}: model must be a torch.nn.Module or None, got {type(model).__name__}")
        _check_positive(fn, "init_temperature", init_temperature)
        self.model = model
        self.log_temperature = torch.nn.Parameter(torch.tensor(math.log(float(init_temperature))))

    # ------------------------------------------------------------------ basics
    @property
    def temperature(self) -> float:
        """The current T as a Python float."""
        return float(self.log_temperature.detach().exp())

    @temperature.setter
    def temperature(self, value: float) -> None:
        _check_positive("softcal.nn.TemperatureScaler", "temperature", value)
        with torch.no_grad():
            self.log_temperature.fill_(math.log(float(value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x) if self.model is not None else x
        if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
            raise TypeError("softcal.nn.TemperatureScaler: expected floating-point logits, got "
                            f"{getattr(logits, 'dtype', type(logits).__name__)}")
        inv_t = torch.exp(-self.log_temperature).to(device=logits.device, dtype=logits.dtype)
        return logits * inv_t

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.6g}"

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        data: Union[ArrayLike, torch.nn.Module, Iterable],
        labels: Union[ArrayLike, Iterable, None] = None,
        *,
        tol: float = 1e-6,
        max_iter: int = 100,
        bounds: Tuple[float, float] = DEFAULT_BOUNDS,
        progress: bool = True,
        check_probabilities: bool = True,
        group: Any = None,
    ) -> FitResult:
        """Set T to the minimiser of the NLL on held-out data and return a :class:`FitResult`.

        Three ways to give the data:

        * ``fit(logits, labels)``: logits (N, C) float16/bfloat16/float32/float64 tensor or numpy
          array on any device, labels (N,) (or (N, 1)) integers in [0, C).
        * ``fit(model, loader)`` (or ``fit(loader)`` when the scaler wraps a model): the logits
          are collected once, in eval mode under no_grad on the model's device, from batches
          ``(inputs, labels, ...)``; a tqdm bar shows progress unless ``progress=False``.
        * ``fit(chunks)``: a re-iterable (a list, a DataLoader, or a zero-argument callable
          returning a fresh iterator) of ``(logits, labels)`` pairs, read once per Newton pass;
          the statistics are summed across chunks, so the whole set never has to be in memory
          (memory-mapped numpy arrays work).

        Args:
            tol: stop when the last Newton step changes T by less than ``tol`` relatively.
            max_iter: at most this many passes over the data.
            bounds: (T_min, T_max), 0 < T_min < T_max < inf; T is searched there.
            progress: show a progress bar while collecting logits from a model.
            check_probabilities: warn when the input looks like probabilities.
            group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD`` for
                every rank) over which the data are split: each rank passes its own rows (in
                any of the three ways above; a rank may have none), the statistics of every
                Newton pass are all-reduced (one all-reduce of 10 float64 numbers: the 4
                sums and agreement flags), and every rank ends with the
                same T, the fit of the concatenated data. Every rank of the group must call
                ``fit`` with the same options. ``None`` (default): this process's data only.
                A ``DistributedSampler`` repeats a few rows to even out the ranks (see
                :func:`softcal.distributed.padding_mask` to drop them).

        Returns:
            FitResult; the scaler's temperature is set to ``result.temperature``.

        Raises:
            TypeError / ValueError naming the argument: wrong types, empty input, lengths that do
            not match, labels out of range, NaN or +inf logits, bad bounds.
        """
        fn = "softcal.nn.TemperatureScaler.fit"
        t0 = time.perf_counter()
        tol = _check_positive(fn, "tol", tol)
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"{fn}: max_iter must be an int >= 1, got {max_iter!r}")
        bounds = _check_bounds(fn, bounds)

        if isinstance(data, torch.nn.Module):
            if labels is None:
                raise ValueError(f"{fn}: fit(model, loader) needs a loader as the second argument")
            source = _collect_logits(data, labels, progress, group is not None)
        elif _is_array(data):
            if labels is None:
                raise ValueError(f"{fn}: labels is required with logits (fit(logits, labels))")
            source = [(data, labels)]
        else:
            if labels is not None:
                raise TypeError(
                    f"{fn}: data must be a tensor, numpy array, nn.Module or an iterable of "
                    f"(logits, labels) chunks, got {type(data).__name__} with labels")
            if self.model is not None:
                source = _collect_logits(self.model, data, progress, group is not None)
            else:
                source = _chunk_source(fn, data)

        if group is not None:
            from .distributed import _dist

            _dist()  # a clear error when torch.distributed is not initialised
        stats = _Stats(fn, source, check_probabilities, group)
        result = _newton(stats, start_t=self.temperature, tol=tol, max_iter=max_iter, bounds=bounds)
        result.time_s = time.perf_counter() - t0
        self.temperature = result.temperature
        return result


# ---------------------------------------------------------------------- helpers
def _check_positive(fn: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value!r}")
    return v


def _check_bounds(fn: str, bounds: Sequence[float]) -> Tuple[float, float]:
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: bounds must be a pair (T_min, T_max), got {bounds!r}") from None
    if not (0 < lo < hi < math.inf):
        raise ValueError(f"{fn}: bounds must satisfy 0 < T_min < T_max < inf, got {bounds!r}")
    return lo, hi


def _is_array(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, np.ndarray)


def _as_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.as_tensor(x)


def _chunk_source(fn: str, data: Any) -> Callable[[], Iterator]:
    if callable(data) and not hasattr(data, "__iter__"):
        return data
    if not hasattr(data, "__iter__"):
        raise TypeError(f"{fn}: data must be a tensor, numpy array, nn.Module or an iterable of "
                        f"(logits, labels) chunks, got {type(data).__name__}")
    if iter(data) is data:
        raise TypeError(
            f"{fn}: data is a one-shot iterator ({type(data).__name__}); the fit reads the chunks "
            "once per Newton pass, so pass a re-iterable (a list, a DataLoader) or a zero-argument "
            "callable that returns a fresh iterator")
    return lambda: iter(data)


def _model_device(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _collect_logits(model: torch.nn.Module, loader: Iterable, progress: bool,
                    allow_empty: bool = False) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    fn = "softcal.nn.TemperatureScaler.fit"
    if not hasattr(loader, "__iter__"):
        raise TypeError(f"{fn}: loader must be an iterable of (inputs, labels) batches, got "
                        f"{type(loader).__name__}")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        from tqdm.auto import tqdm
        total = len(loader) if hasattr(loader, "__len__") else None
        bar = tqdm(loader, total=total, desc="softcal: collecting logits", unit="batch",
                   disable=not progress, leave=False)
        with torch.no_grad():
            for i, batch in enumerate(bar):
                if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                    raise TypeError(f"{fn}: loader batch {i} must be a tuple (inputs, labels, ...), "
                                    f"got {type(batch).__name__}")
                inputs, y = batch[0], batch[1]
                out = model(_to_device(inputs, device))
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"{fn}: the model must return a logits tensor, got {type(out).__name__}")
                logits.append(out.detach())
                labels.append(_as_tensor(y).to(out.device))
    finally:
        model.train(was_training)
    if not logits:
        if allow_empty:  # distributed: this rank has no rows, the others may
            return []
        raise ValueError(f"{fn}: the loader yielded no batches (empty input)")
    return [(torch.cat(logits), torch.cat(labels))]


class _Stats:
    """Evaluates [sum NLL, sum f', sum f'', N] at beta over all chunks; validates on first use."""

    def __init__(self, fn: str, source: Any, check_probabilities: bool, group: Any = None) -> None:
        self.fn = fn
        self.group = group
        self.source = source
        self.check_probabilities = check_probabilities
        self.validated = False
        self.rows = 0
        self.classes: Optional[int] = None
        self.all_correct = True  # every label holds its row's maximum logit (after the first pass)

    def _chunks(self) -> Iterator:
        return iter(self.source) if isinstance(self.source, list) else self.source()

    def _prepare(self, i: int, chunk: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        fn = self.fn
        if not isinstance(chunk, (list, tuple)) or len(chunk) != 2:
            raise TypeError(f"{fn}: chunk {i} must be a pair (logits, labels), got {type(chunk).__name__}")
        logits, labels = _as_tensor(chunk[0]), _as_tensor(chunk[1])
        if not self.validated:
            logits, labels = self._validate(i, logits, labels)
        else:
            if labels.dim() == 2:
                labels = labels.reshape(-1)
            labels = labels.to(logits.device)
        return logits, labels

    def _validate(self, i: int, logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        fn = self.fn
        where = "" if i == 0 and isinstance(self.source, list) and len(self.source) == 1 else f" (chunk {i})"
        if not logits.dtype.is_floating_point:
            raise TypeError(f"{fn}: logits must be floating point (float16/bfloat16/float32/float64), "
                            f"got dtype {logits.dtype}{where}")
        if logits.dim() != 2:
            raise ValueError(f"{fn}: logits must be 2-D (N, C), got shape {tuple(logits.shape)}{where}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
            raise TypeError(f"{fn}: labels must be integer class indices, got dtype {labels.dtype}{where}")
        if labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels.reshape(-1)
        if labels.dim() != 1:
            raise ValueError(f"{fn}: labels must have shape (N,), got {tuple(labels.shape)}{where}")
        n, c = logits.shape
        if labels.shape[0] != n:
            raise ValueError(f"{fn}: labels has {labels.shape[0]} rows but logits has {n}{where}")
        if c < 1:
            raise ValueError(f"{fn}: logits has 0 classes (shape {tuple(logits.shape)}){where}")
        if self.classes is None:
            self.classes = c
        elif c != self.classes:
            raise ValueError(f"{fn}: chunk {i} has {c} classes but chunk 0 has {self.classes}")
        labels = labels.to(logits.device)
        if n:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= c:
                bad = lo if lo < 0 else hi
                raise ValueError(f"{fn}: labels must be in [0, {c - 1}] for {c} classes, got label {bad}{where}")
            # One cheap pass (row max) checks for NaN/+inf (max propagates NaN) and whether every
            # label holds its row's maximum (separable data: the optimum is T -> 0).
            mx = logits.amax(1)
            if bool(torch.isnan(mx).any()):
                row = int(torch.isnan(mx).nonzero()[0, 0])
                raise ValueError(f"{fn}: logits contain NaN (first in row {row}){where}")
            if bool(torch.isposinf(mx).any()):
                row = int(torch.isposinf(mx).nonzero()[0, 0])
                raise ValueError(f"{fn}: logits contain +inf (first in row {row}){where}")
            xy = logits.gather(1, labels.reshape(-1, 1).long()).reshape(-1)
            if bool(torch.isneginf(xy).any()):
                row = int(torch.isneginf(xy).nonzero()[0, 0])
                raise ValueError(f"{fn}: the label's logit is -inf in row {row}{where} (NLL is infinite)")
            self.all_correct = self.all_correct and bool((xy >= mx).all())
            if self.check_probabilities and self.rows == 0:
                _warn_if_probabilities(fn, logits[:4096])
        return logits, labels

    def all_rows_constant(self) -> bool:
        """Whether every row's finite logits are all equal (one extra pass; degenerate cases only;
        on every rank of the group)."""
        local = self._local_rows_constant()
        if self.group is None:
            return local
        flag = torch.tensor([0.0 if local else 1.0], dtype=torch.float64)
        return float(_all_reduce(flag, "max", self.group)[0]) == 0.0

    def _local_rows_constant(self) -> bool:
        for i, chunk in enumerate(self._chunks()):
            logits, _ = self._prepare(i, chunk)
            if logits.shape[0] == 0:
                continue
            x = logits.float().masked_fill(torch.isneginf(logits), float("nan"))
            spread = torch.nan_to_num(x.nan_to_num(float("-inf")).amax(1) -
                                      x.nan_to_num(float("inf")).amin(1), nan=0.0)
            if bool((spread != 0).any()):
                return False
        return True

    def _local(self, beta: float) -> Tuple[Optional[torch.Tensor], int]:
        total: Optional[torch.Tensor] = None
        rows_seen = 0
        for i, chunk in enumerate(self._chunks()):
            logits, labels = self._prepare(i, chunk)
            if not self.validated:
                self.rows += logits.shape[0]
            if logits.shape[0] == 0:
                continue
            s = F.temperature_stats(logits, labels, beta)
            total = s if total is None else total + s.to(total.device)
            rows_seen += logits.shape[0]
        return total, rows_seen

    def __call__(self, beta: float) -> Tuple[float, float, float, int]:
        if self.group is not None:
            return self._call_distributed(beta)
        total, rows_seen = self._local(beta)
        if not self.validated:
            self.validated = True
            if self.rows == 0:
                raise ValueError(f"{self.fn}: empty input (0 rows)")
        if total is None:
            raise ValueError(f"{self.fn}: the chunks yielded no rows on a later pass (is the iterable re-iterable?)")
        v = total.double().cpu().tolist()
        if rows_seen != self.rows:
            raise ValueError(f"{self.fn}: the chunks gave {rows_seen} rows on a later pass but "
                             f"{self.rows} on the first; they must be the same on every pass")
        return v[0], v[1], v[2], int(v[3])

    def _call_distributed(self, beta: float) -> Tuple[float, float, float, int]:
        """One pass over this rank's rows, then ONE all-reduce of [sum NLL, f', f'', N] with the
        flags that every rank must agree on (an error on one rank is raised on every rank
        instead of leaving the others waiting in the collective)."""
        fn = self.fn
        first = not self.validated
        error: Optional[BaseException] = None
        total: Optional[torch.Tensor] = None
        rows_seen = 0
        try:
            total, rows_seen = self._local(beta)
        except Exception as exc:  # re-raised below, after the other ranks know
            error = exc
        self.validated = True
        c = float(self.classes) if self.classes is not None else 0.0
        has_c = 1.0 if self.classes is not None else 0.0
        sums = torch.zeros(4, dtype=torch.float64)
        if total is not None and error is None:
            sums = total.double().cpu()
        # Summed flags (> 0: some rank): error, rows changed, not all correct; and the number
        # of ranks that saw logits, the sum of their C and of C^2 (all equal iff k sum C^2 ==
        # (sum C)^2, exact in float64).
        flags = torch.tensor([
            1.0 if error is not None else 0.0,
            1.0 if (not first and rows_seen != self.rows) else 0.0,
            0.0 if self.all_correct else 1.0,
            has_c, c, c * c,
        ], dtype=torch.float64)
        packed = _all_reduce(torch.cat([sums, flags]), "sum", self.group)
        sums, flags = packed[:4], packed[4:]
        if flags[0] > 0:
            if error is not None:
                raise error
            raise RuntimeError(f"{fn}: the input of another rank of the group is invalid (its "
                               "error is raised there)")
        if flags[1] > 0:
            raise ValueError(f"{fn}: the chunks of a rank gave a different number of rows on a "
                             "later pass than on the first; they must be the same on every pass")
        if flags[3] * flags[5] != flags[4] * flags[4]:
            raise ValueError(f"{fn}: the ranks' logits have different numbers of classes "
                             f"(this rank: {self.classes})")
        self.all_correct = bool(flags[2] == 0)
        v = sums.tolist()
        if first and v[3] == 0:
            raise ValueError(f"{fn}: empty input (0 rows on every rank of the group)")
        return v[0], v[1], v[2], int(v[3])


def _all_reduce(t: torch.Tensor, op: str, group: Any) -> torch.Tensor:
    from .distributed import all_reduce

    return all_reduce(t, op, group)


def _warn_if_probabilities(fn: str, x: torch.Tensor) -> None:
    if x.shape[1] < 2:
        return
    xf = x.float()
    if bool(((xf >= 0) & (xf <= 1)).all()) and bool(((xf.sum(1) - 1).abs() < 1e-3).all()):
        warnings.warn(
            f"{fn}: the input looks like probabilities (every row is in [0, 1] and sums to 1), not "
            "logits. Temperature scaling divides logits; pass torch.log(probs) (log-probabilities "
            "are valid logits), or use `softcal calibrate --probs` on the command line.",
            UserWarning, stacklevel=7)


def _hermite_root(a: float, ga: float, ha: float, b: float, gb: float, hb: float) -> float:
    """Root in (a, b) of the cubic Hermite interpolant with values ga < 0 < gb and slopes ha, hb
    (found by bisection on the polynomial, to about 1e-15 of the interval; no data pass)."""
    span = b - a

    def p(t: float) -> float:
        t2, t3 = t * t, t * t * t
        return ((2 * t3 - 3 * t2 + 1) * ga + (t3 - 2 * t2 + t) * span * ha
                + (-2 * t3 + 3 * t2) * gb + (t3 - t2) * span * hb)

    lo, hi = 0.0, 1.0
    for _ in range(52):
        mid = 0.5 * (lo + hi)
        if p(mid) < 0:
            lo = mid
        else:
            hi = mid
    return a + 0.5 * (lo + hi) * span


def _newton(stats: _Stats, start_t: float, tol: float, max_iter: int,
            bounds: Tuple[float, float]) -> FitResult:
    """Safeguarded Newton on beta = 1/T for the root of f'(beta) (see the module docstring)."""
    fn = "softcal.nn.TemperatureScaler.fit"
    b_min, b_max = 1.0 / bounds[1], 1.0 / bounds[0]

    def result(beta: float, nll: float, its: int, converged: bool, at_bound: Optional[str]) -> FitResult:
        t = min(max(1.0 / beta, bounds[0]), bounds[1]) if at_bound != "keep" else 1.0 / beta
        if not (math.isfinite(t) and t > 0):  # cannot happen: beta stays in [b_min, b_max]
            raise RuntimeError(f"{fn}: internal error, T = {t}")
        return FitResult(temperature=t, nll_before=nll_before, nll_after=nll, iterations=its,
                         converged=converged, at_bound=None if at_bound == "keep" else at_bound,
                         rows=n, time_s=0.0)

    beta = 1.0 / start_t
    f, g, h, n = stats(beta)  # the first pass also validates the input
    its = 1
    nll_before = f / n

    if h == 0.0 and g == 0.0 and stats.all_rows_constant():
        warnings.warn(
            f"{fn}: the NLL does not depend on the temperature (within every row all logits are "
            f"equal); keeping T = {start_t:.6g}.", RuntimeWarning, stacklevel=3)
        return result(beta, f / n, its + 1, True, "keep")

    if stats.all_correct:
        # Every label holds its row's maximum: f' < 0 for every beta, the NLL falls as T -> 0.
        if beta != b_max:
            f, g, h, _ = stats(b_max)
            its += 1
        warnings.warn(
            f"{fn}: every row's label has the largest logit (the data are separable), so the NLL "
            f"keeps decreasing as T -> 0; stopped at the lower bound T = {bounds[0]:g}. Fit on "
            "held-out data the model has not memorised, or widen bounds=.", RuntimeWarning, stacklevel=3)
        return result(b_max, f / n, its, False, "lower")
    if not b_min <= beta <= b_max:  # start outside the bounds: restart at the nearest bound
        beta = min(max(beta, b_min), b_max)
        f, g, h, _ = stats(beta)
        its += 1

    lo, hi = b_min, b_max           # bracket of the root of f'
    lo_known = hi_known = False     # whether f' was evaluated at lo / hi
    g_lo = h_lo = g_hi = h_hi = 0.0
    best_nll, best_beta = f / n, beta
    while True:
        if f / n < best_nll:
            best_nll, best_beta = f / n, beta
        if g == 0.0:
            return result(beta, f / n, its, True, None)
        if g < 0:
            lo, lo_known, g_lo, h_lo = beta, True, g, h
        else:
            hi, hi_known, g_hi, h_hi = beta, True, g, h
        if g < 0 and beta >= b_max:
            warnings.warn(
                f"{fn}: the NLL keeps decreasing as T -> 0 (the logits separate the classes almost "
                f"perfectly); stopped at the lower bound T = {bounds[0]:g}. Widen bounds= if the "
                "logits are on an unusual scale.", RuntimeWarning, stacklevel=3)
            return result(beta, f / n, its, False, "lower")
        if g > 0 and beta <= b_min:
            warnings.warn(
                f"{fn}: the NLL keeps decreasing as T grows (the logits carry no usable signal "
                f"about the labels); stopped at the upper bound T = {bounds[1]:g}.",
                RuntimeWarning, stacklevel=3)
            return result(beta, f / n, its, False, "upper")

        step = -g / h if h > 0 else math.copysign(math.inf, -g)
        cand = beta + step
        newton_ok = lo < cand < hi
        if newton_ok and abs(step) <= tol * beta:
            # Converged: take the last Newton step without another pass; the NLL there is the
            # second-order Taylor value (error O(step^3)).
            return result(cand, (f + g * step + 0.5 * h * step * step) / n, its, True, None)
        if lo_known and hi_known:
            # Closed bracket: the root of the cubic Hermite interpolant of f' (values and slopes
            # at both ends) models f' better than the tangent at one end (saves about one pass).
            cand = _hermite_root(lo, g_lo, h_lo, hi, g_hi, h_hi)
            if not lo < cand < hi:
                cand = beta + step if newton_ok else math.sqrt(lo * hi)
        elif newton_ok:
            pass
        elif g < 0:                            # root above beta, bracket open above
            cand = min(beta * 4.0, b_max)
        else:                                  # root below beta, bracket open below
            cand = max(beta / 4.0, b_min)
        if lo_known and hi_known and hi - lo <= tol * lo:
            return result(math.sqrt(lo * hi), best_nll, its, True, None)
        if its >= max_iter:
            warnings.warn(
                f"{fn}: no convergence in max_iter={max_iter} passes; returning the best T seen "
                f"({1.0 / best_beta:.6g})", RuntimeWarning, stacklevel=3)
            return result(best_beta, best_nll, its, False, None)
        beta = cand
        f, g, h, _ = stats(beta)
        its += 1


# Calibrators beyond temperature scaling (softcal/calibrators/; they import this module's helpers).
from .calibrators import (CalibratorFitResult, DirichletCalibrator, EnsembleTemperatureScaler,  # noqa: E402
                          HistogramBinning, IsotonicCalibrator, MatrixScaler,
                          ScalingBinningCalibrator, VectorScaler)
