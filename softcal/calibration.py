"""Post-hoc temperature scaling (Guo et al. 2017), fitted exactly.

Maths. With beta = 1/T and p_i = softmax(beta * x_i), the validation NLL

    f(beta)   = sum_i [ logsumexp(beta * x_i) - beta * x_i,y ]
    f'(beta)  = sum_i ( E_p_i[x_i] - x_i,y )
    f''(beta) = sum_i Var_p_i[x_i]  >= 0

is convex in beta, so its minimiser is the root of the monotone function f'. One fused pass over
the logits (:func:`softcal.functional.temperature_stats`) gives f, f' and f'' at once. On data
of more than 4,096 rows, Newton's first steps run on a sample of the rows (1/16 of them, at most
2^23 logits) and the last ones on all rows, with Halley's correction (the third derivative from
the sample and regression estimators, then from the last two passes): typically 2 full passes
(the first at the starting T, for the NLL before and the checks). The details and the stopping
rule are in :mod:`softcal._temperature_fit`. The iteration on all rows is safeguarded:

* a bracket [lo, hi] with f'(lo) < 0 < f'(hi) is kept from every evaluated point;
* while the bracket is open on one side, the Newton step beta - f'/f'' is taken when it stays
  inside, otherwise Newton's step on log beta if it does, otherwise beta moves by a factor of 4
  towards the open side;
* once both ends are known, the next point is the root of the cubic Hermite interpolant of f'
  (f' and f'' at both ends: no extra pass), unless Halley's step is at hand; if that fails,
  Newton or a geometric bisection;
* the iteration stops when the Newton step changes T by less than ``tol`` relatively
  (|dT|/T = |dbeta|/beta to first order), or when the error estimated to be left after Halley's
  step is below tol^2. The last step is applied without another pass, and the reported NLL is
  corrected by the Taylor terms.

Boundaries. T is searched in ``bounds`` = [1e-3, 1e3] by default. When the optimum is outside:

* every row's label holds the row's largest logit (separable data, detected after the first
  pass): f' < 0 for every beta and the NLL keeps falling as T -> 0; the fit stops at
  T = bounds[0] and warns (likewise when f' is still negative at bounds[0]);
* the logits are anti-informative (f'(beta) > 0 down to beta = 1 / bounds[1]): the fit stops at
  T = bounds[1] and warns;
* within every row all logits are equal (f' = f'' = 0): T does not matter; the fit keeps the
  current temperature and warns.

Storage. T is stored as a float64 parameter ``log_temperature`` (so T > 0 always), in the
precision of the fit; every T given or loaded must be in [T_MIN, T_MAX] = [2.2e-308, 4.5e307]
(T and 1/T normal float64 numbers). It is in the state_dict and moves with ``.to(device)``;
dtype casts of the module (``.half()``, ``.to(torch.float32)``) leave it float64. The forward
refuses a T whose 1/T overflows the logits' dtype (T < 2.9e-39 for float32 logits).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional, Sequence, Tuple, Union

import torch

from ._fit_data import fit_source

__all__ = ["FitResult", "TemperatureScaler", "DEFAULT_BOUNDS", "CalibratorFitResult", "VectorScaler",
           "MatrixScaler", "DirichletCalibrator", "EnsembleTemperatureScaler", "HistogramBinning",
           "IsotonicCalibrator", "ScalingBinningCalibrator"]

#: Default search interval for T. Logits of trained networks need T in about [0.5, 5]; the
#: interval leaves three decades either side for logits on unusual scales.
DEFAULT_BOUNDS: Tuple[float, float] = (1e-3, 1e3)
#: The range of T that can be stored: T and 1/T are normal float64 numbers.
T_MIN: float = sys.float_info.min          # 2.2250738585072014e-308
T_MAX: float = 1.0 / sys.float_info.min    # 4.49423283715579e+307

ArrayLike = Any  # torch.Tensor or numpy.ndarray


@dataclass
class FitResult:
    """What :meth:`TemperatureScaler.fit` found.

    Attributes:
        temperature: the fitted T (> 0, finite).
        nll_before: mean NLL per row at the temperature the fit started from.
        nll_after: mean NLL per row at the fitted T.
        iterations: passes over all the rows (each evaluates NLL, gradient and curvature).
        converged: True when the optimum was reached to ``tol`` inside the bounds.
        at_bound: "lower", "upper" or None: the optimum lies outside the bounds (see warnings).
        rows: number of rows fitted on.
        time_s: wall time of the fit in seconds (including collecting logits from a model).
        sample_rows: rows of the sample that the first Newton steps ran on (0: none).
        sample_passes: passes over the sample.
        check_passes: reads of all the rows that only check them (separable data, a NaN to
            name). The fit's work in passes over the data is
            ``iterations + check_passes + sample_passes * sample_rows / rows``.
    """

    temperature: float
    nll_before: float
    nll_after: float
    iterations: int
    converged: bool
    at_bound: Optional[str]
    rows: int
    time_s: float
    sample_rows: int = 0
    sample_passes: int = 0
    check_passes: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class TemperatureScaler(torch.nn.Module):
    """Divide logits by a learned temperature T > 0.

    ``TemperatureScaler()`` maps logits to logits / T; ``TemperatureScaler(model)`` wraps a trained
    classifier so that ``forward(x) = model(x) / T``. Fit T with :meth:`fit`.

    Args:
        model: optional classifier whose output (N, C) logits are scaled.
        init_temperature: starting T (finite, in [T_MIN, T_MAX] = [2.2e-308, 4.5e307]).

    Shapes: forward(logits (N, C) or (..., C), any float dtype) returns the same shape and dtype.
    The parameter is ``log_temperature`` (float64, 0-dim, kept float64 by dtype casts of the
    module); ``temperature`` is its exp as a float.
    """

    def __init__(self, model: Optional[torch.nn.Module] = None, init_temperature: float = 1.0) -> None:
        super().__init__()
        fn = "softcal.nn.TemperatureScaler"
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"{fn}: model must be a torch.nn.Module or None, got {type(model).__name__}")
        t = _check_temperature(fn, "init_temperature", init_temperature)
        self.model = model
        self.log_temperature = torch.nn.Parameter(
            torch.tensor(math.log(t), dtype=torch.float64))
        self._checked: Tuple[int, Any, frozenset] = (-1, None, frozenset())

    # ------------------------------------------------------------------ basics
    @property
    def temperature(self) -> float:
        """The current T as a Python float."""
        return float(self.log_temperature.detach().double().exp())

    @temperature.setter
    def temperature(self, value: float) -> None:
        t = _check_temperature("softcal.nn.TemperatureScaler", "temperature", value)
        with torch.no_grad():
            self.log_temperature.fill_(math.log(t))

    def _apply(self, fn, recurse=True):  # noqa: D401 (torch.nn.Module's hook for .to(), .half())
        """Device moves apply to ``log_temperature``; dtype casts do not (they would round T)."""
        keep = self.log_temperature.detach().clone()
        grad = self.log_temperature.grad
        grad = grad.detach().clone() if grad is not None else None
        out = super()._apply(fn, recurse)
        p = self.log_temperature
        if p.dtype != torch.float64:
            p.data = keep.to(device=p.device, dtype=torch.float64)
            if p.grad is not None and grad is not None:
                p.grad.data = grad.to(device=p.device, dtype=torch.float64)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "log_temperature"
        value = state_dict.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            log_t = float(value.detach().double().reshape(()))
            ok = math.isfinite(log_t) and math.log(T_MIN) <= log_t <= math.log(T_MAX)
            if not ok:
                raise ValueError(
                    f"softcal.nn.TemperatureScaler.load_state_dict: {key} = {log_t!r} is not the "
                    f"log of a temperature in [T_MIN, T_MAX] = [{T_MIN:.3g}, {T_MAX:.3g}]")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _check_scale(self, dtype: torch.dtype) -> None:
        """Refuse a T whose 1/T overflows ``dtype`` (checked once per value of the parameter and
        dtype: one device synchronisation after each change of T)."""
        if torch.compiler.is_compiling():
            return
        version, data_ptr, ok = self._checked
        p = self.log_temperature
        if version == p._version and data_ptr == p.data_ptr() and dtype in ok:
            return
        if version != p._version or data_ptr != p.data_ptr():
            ok = frozenset()
        log_t = float(p.detach().double())
        if dtype != torch.float64 and -log_t > math.log(torch.finfo(dtype).max):
            raise ValueError(
                f"softcal.nn.TemperatureScaler: T = {math.exp(log_t):.6g} cannot scale {dtype} "
                f"logits (1/T overflows {dtype}, whose largest value is "
                f"{torch.finfo(dtype).max:.6g}); use float64 logits or a larger T")
        self._checked = (p._version, p.data_ptr(), ok | {dtype})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x) if self.model is not None else x
        if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
            raise TypeError("softcal.nn.TemperatureScaler: expected floating-point logits, got "
                            f"{getattr(logits, 'dtype', type(logits).__name__)}")
        self._check_scale(logits.dtype)
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
          returning a fresh iterator) of ``(logits, labels)`` pairs, read once per pass; the
          statistics are summed across chunks, so the whole set never has to be in memory
          (memory-mapped numpy arrays work; the first pass keeps a sample of at most 2^24
          logits).

        Args:
            tol: stop when the last Newton step changes T by less than ``tol`` relatively (or
                when the error estimated to be left after a Halley step is below tol^2).
            max_iter: at most this many passes over all the rows.
            bounds: (T_min, T_max), T_MIN <= T_min < T_max <= T_MAX; T is searched there.
            progress: show a progress bar while collecting logits from a model.
            check_probabilities: warn when the input looks like probabilities.
            group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD`` for
                every rank) over which the data are split: each rank passes its own rows (in
                any of the three ways above; a rank may have none), the statistics of every
                pass are all-reduced (one all-reduce of 9 float64 numbers: the 4 sums and
                agreement flags; 5 on the sample), and every rank ends with the same T, the fit
                of the concatenated data. The ranks first agree on the options (tol, max_iter,
                bounds and the starting T must be the same on every rank) and on the outcome
                of their checks, in one small collective: an error on any rank (bad options,
                bad data, a failing model) is raised on every rank. ``None`` (default): this
                process's data only. A ``DistributedSampler`` repeats a few rows to even out
                the ranks (see :func:`softcal.distributed.padding_mask` to drop them).

        Returns:
            FitResult; the scaler's temperature is set to ``result.temperature``.

        Raises:
            TypeError / ValueError naming the argument: wrong types, empty input, lengths that do
            not match, labels out of range, NaN or +inf logits, bad bounds.
        """
        from ._temperature_fit import _Stats, fit_temperature

        fn = "softcal.nn.TemperatureScaler.fit"
        t0 = time.perf_counter()
        if group is None:
            tol, max_iter, bounds = _check_options(fn, tol, max_iter, bounds)
            source = fit_source(fn, data, labels, self.model, progress)
        else:
            from ._agree import agree_on
            from .distributed import _dist

            _dist()  # a clear error when torch.distributed is not initialised
            start = self.temperature

            def checks(sig):
                opts = _check_options(fn, tol, max_iter, bounds)
                src = fit_source(fn, data, labels, self.model, progress, distributed=True)
                sig.same("tol", opts[0])
                sig.same("max_iter", opts[1])
                sig.same("bounds[0]", opts[2][0])
                sig.same("bounds[1]", opts[2][1])
                sig.same("the starting temperature (the scaler's T)", start)
                return opts, src

            ((tol, max_iter, bounds), source), _ = agree_on(fn, group, checks)
        stats = _Stats(fn, source, check_probabilities, group)
        result = fit_temperature(stats, start_t=self.temperature, tol=tol, max_iter=max_iter,
                                 bounds=bounds)
        result.time_s = time.perf_counter() - t0
        self.temperature = result.temperature
        return result


# ---------------------------------------------------------------------- checks
def _check_positive(fn: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value!r}")
    return v


def _check_temperature(fn: str, name: str, value: Any) -> float:
    """A T that can be stored: finite, > 0, and in [T_MIN, T_MAX]."""
    v = _check_positive(fn, name, value)
    if not T_MIN <= v <= T_MAX:
        raise ValueError(f"{fn}: {name} must be in [T_MIN, T_MAX] = [{T_MIN:.3g}, {T_MAX:.3g}] "
                         f"(T and 1/T normal float64 numbers), got {value!r}")
    return v


def _check_bounds(fn: str, bounds: Sequence[float]) -> Tuple[float, float]:
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: bounds must be a pair (T_min, T_max), got {bounds!r}") from None
    if not (0 < lo < hi < math.inf):
        raise ValueError(f"{fn}: bounds must satisfy 0 < T_min < T_max < inf, got {bounds!r}")
    if lo < T_MIN or hi > T_MAX:
        raise ValueError(f"{fn}: bounds must lie in [T_MIN, T_MAX] = [{T_MIN:.3g}, {T_MAX:.3g}] "
                         f"(T and 1/T normal float64 numbers), got {bounds!r}")
    return lo, hi


def _check_options(fn: str, tol: Any, max_iter: Any, bounds: Any
                   ) -> Tuple[float, int, Tuple[float, float]]:
    """(tol, max_iter, bounds) of a fit, checked."""
    tol = _check_positive(fn, "tol", tol)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{fn}: max_iter must be an int >= 1, got {max_iter!r}")
    return tol, max_iter, _check_bounds(fn, bounds)


# Calibrators beyond temperature scaling (softcal/calibrators/; they import this module).
from .calibrators import (CalibratorFitResult, DirichletCalibrator, EnsembleTemperatureScaler,  # noqa: E402
                          HistogramBinning, IsotonicCalibrator, MatrixScaler,
                          ScalingBinningCalibrator, VectorScaler)
