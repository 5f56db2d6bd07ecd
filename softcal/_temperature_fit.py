"""The temperature fit: passes over the data, a row sample, and the safeguarded Newton/Halley
iteration on beta = 1/T (the maths is in :mod:`softcal.calibration`'s docstring).

Passes. ``_Stats.full(beta)`` is one pass over every row: [sum NLL, f', f'', N] at beta from
``softcal.temperature_stats`` (float64 sums). The first pass also checks every chunk (types,
shapes, classes, label range) and keeps a sample of the rows; the values themselves (NaN, +inf,
a label's logit of -inf) are checked by reading the logits again only when the sums come out
non-finite (to name the first bad row). ``_Stats.sample(beta)`` evaluates the same sums on the
sample only (``sub=True``: on 1/8 of it).

The sample. Row i (its index in the order the rows are read, on each rank) is in the sample
when the top k bits of (i * 2654435769) mod 2^32 are 0: a Weyl sequence, every 2^k-th row on
average, evenly spread whatever the order of the data (rows sorted by class included), and the
same rows for a tensor and for the same rows in chunks. k >= 2 is the largest that leaves at
least ``TARGET_SAMPLE_ROWS`` rows (3,125 of 50,000; 3,906 of 10^6), or larger to keep the sample
within ``SAMPLE_ELEMENTS`` logits; there is a sample phase for at least 4 x TARGET_SAMPLE_ROWS
rows (smaller data are cheap: all rows from the start). A stream whose length is unknown keeps
the rows of k = 2 in its first pass and thins them as they pass 2 x SAMPLE_ELEMENTS logits.

The iteration (``fit_temperature``):

1. a full pass at the starting T (the NLL before; the checks; the sample);
2. when Newton's step from there is longer than 5 %: Newton on the sample (Halley's step once
   two iterates give f'''), first on its 1/8 sub-sample while the steps are longer than 3 %,
   until the step is below 1e-2; then the sample's optimum corrected by a regression on the
   per-row NLL, f', f'' at the starting T (:mod:`softcal._temperature_sample`);
3. a full pass there; f''' (the sample's difference of f'') and f'''' (per row, on 1/32 of the
   sample), each corrected by a regression on the per-row NLL, f', f'' here and at the start,
   with their standard errors; the root s of f' + f'' s + f''' s^2 / 2 + f'''' s^3 / 6;
4. full passes after that: Halley's step with f''' from the last two full passes (when they
   are within 5 % of each other), else Newton's step, a cubic Hermite root in a closed bracket,
   Newton's step on log beta or a factor of 4 towards the open side (the safeguards of the
   full-data method). It stops when the Newton step is below ``tol`` (relative), or when the
   error left after the last step is below tol^2 beta (the Newton rule leaves about K tol^2,
   K = |f'''| beta / f''), or below 1.2e-8 beta for logits in float32 or lower, whose
   statistics are float32 per row: their optimum is only defined to about 3e-8 (every method's
   T differs from the float64 optimum by that much), so no pass below it is worth its time.
   The error left: after the quartic step of 3, (|f'''| s^2 / 2 x (3 standard errors of f''')
   + |f''''| |s|^3 / 6 x (3 of f'''')) / f'' + s^4 K^3 / beta^3; after a Halley step,
   |Halley - Newton| x (the relative error of f''') + |Newton|^3 K^2 / beta^2.

Typically (50,000 x 1,000 float32 rows): 2 full passes and about 7 passes over the 3,125-row
sample (0.43 of a full pass; 2.7 passes' CPU time in all), where Newton on all rows takes 3
full passes; float64 logits take 3 or 4 (to tol^2).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Tuple

import torch

from . import functional as F
from ._agree import all_reduce_checked
from ._fit_data import Source, as_tensor, check_chunk, check_values, chunks, warn_if_probabilities
from ._temperature_sample import (corrected_optimum, halley, row_stats, sample_optimum,
                                  third_derivative)

#: Largest sample, in logits (32 MiB of float32).
SAMPLE_ELEMENTS = 1 << 23
#: Rows the sample aims at (between this and twice this, unless the memory cap binds): its
#: optimum is then typically within 1e-2 of the data's, close enough for Halley's step.
TARGET_SAMPLE_ROWS = 3072
#: Smallest sample worth a phase of its own (rows, over every rank).
MIN_SAMPLE_ROWS = 256
#: The far steps run on a sub-sample: the sample rows with SUB_BITS more zero bits (1/8 of it).
SUB_BITS = 3
#: The regressions of the sample phase (softcal._temperature_sample) take per-row statistics of
#: the sample rows with REG_BITS more zero bits (1/32 of it: 98 of 50,000 rows).
REG_BITS = 5
_HASH = 2654435769
_MASK = 0xFFFFFFFF


def _sample_exponent(rows: int, classes: int) -> int:
    """k: the sample keeps about rows / 2^k rows: the largest k >= 2 that leaves at least
    TARGET_SAMPLE_ROWS rows, or larger to stay within SAMPLE_ELEMENTS logits."""
    cap = max(1, SAMPLE_ELEMENTS // max(classes, 1))
    k = 2
    while rows >> (k + 1) >= TARGET_SAMPLE_ROWS:
        k += 1
    while rows > cap << k:
        k += 1
    return k


def _use_sample(rows: int, k: int) -> bool:
    """Whether a sample phase pays: at least 4 TARGET_SAMPLE_ROWS rows, and a sample of at least
    MIN_SAMPLE_ROWS rows (fewer when the memory cap binds, for thousands of classes)."""
    return rows >= 4 * TARGET_SAMPLE_ROWS and rows >> k >= MIN_SAMPLE_ROWS


def _in_sample(idx: torch.Tensor, k: int) -> torch.Tensor:
    """Whether rows ``idx`` (int64) are in the sample of exponent k."""
    return ((idx * _HASH) & _MASK) < (1 << (32 - k))


def _rows_of(source: Source) -> int:
    """The rows of a list of chunks, from their shapes (0 when unknown)."""
    if not isinstance(source, list):
        return 0
    try:
        return sum(int(chunk[0].shape[0]) for chunk in source)
    except (TypeError, AttributeError, IndexError):
        return 0


class _Stats:
    """Passes over the data of one fit (see the module docstring); ``group``: sums over the
    ranks (every rank must make the same calls; errors are raised on every rank)."""

    def __init__(self, fn: str, source: Source, check_probabilities: bool, group: Any = None
                 ) -> None:
        self.fn = fn
        self.group = group
        self.source = source
        self.check_probabilities = check_probabilities
        self.rows = 0                      # this rank's rows (after the first pass)
        self.total_rows = 0                # every rank's rows
        self.classes: Optional[int] = None
        self.passes = 0                    # full passes with statistics
        self.check_passes = 0              # full passes that only check values
        self.sample_passes = 0.0           # a pass over the sub-sample counts 1/8
        self.sample_rows = 0               # every rank's sample rows (0: no sample phase)
        self.sub_rows = 0                  # every rank's sub-sample rows
        self._k: Optional[int] = None      # exponent of the rows kept so far (first pass)
        self._rows_hint = _rows_of(source)  # this rank's rows when known before reading
        self._kept: list = []              # (logits, labels, indices) of the kept rows
        self._sample: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._sub: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._reg: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # the regression rows
        self._single = isinstance(source, list) and len(source) == 1
        self._low = False                  # this rank read logits in a dtype below float64
        self._sample_cache: dict = {}      # (beta, sub) -> the sample's sums
        self._row_cache: dict = {}         # beta -> the sub-sample's per-row statistics
        self.low_precision = False         # some rank did: the statistics are float32 per row

    # ------------------------------------------------------------------ reading
    def _where(self, i: int) -> str:
        return "" if i == 0 and self._single else f" (chunk {i})"

    def _prepare(self, i: int, chunk: Any, first: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        if first:
            logits, labels = check_chunk(self.fn, i, chunk, self.classes, self._where(i))
            if self.classes is None:
                self.classes = int(logits.shape[1])
            self._low = self._low or logits.dtype != torch.float64
            if self.check_probabilities and self.rows == 0 and logits.shape[0]:
                warn_if_probabilities(self.fn, logits[:4096], stacklevel=9)
            return logits, labels
        if not isinstance(chunk, (list, tuple)) or len(chunk) != 2:
            raise TypeError(f"{self.fn}: chunk {i} must be a pair (logits, labels), got "
                            f"{type(chunk).__name__}")
        logits, labels = as_tensor(chunk[0]), as_tensor(chunk[1])
        if labels.dim() == 2:
            labels = labels.reshape(-1)
        return logits, labels.to(logits.device)

    def _keep(self, logits: torch.Tensor, labels: torch.Tensor, start: int) -> None:
        """Keep the rows of this chunk that are in the sample of exponent self._k (first pass);
        thin the kept rows (k + 1) when they pass 2 x SAMPLE_ELEMENTS logits."""
        n = logits.shape[0]
        if self._k is None:  # the final k if the rows are known (a list), else the smallest
            c = int(logits.shape[1])
            self._k = _sample_exponent(self._rows_hint, c) if self._rows_hint else 2
            if self.group is None and self._rows_hint and not _use_sample(self._rows_hint,
                                                                          self._k):
                self._k = -1                   # too few rows for a sample phase: keep none
        if self._k < 0:
            return
        idx = torch.arange(start, start + n, dtype=torch.int64, device=logits.device)
        idx = idx[_in_sample(idx, self._k)]
        if idx.numel():
            rows = idx - start
            self._kept.append((logits.index_select(0, rows), labels.index_select(0, rows), idx))
        cap = max(1, SAMPLE_ELEMENTS // max(self.classes or 1, 1))
        while sum(k[0].shape[0] for k in self._kept) > 2 * cap:
            self._k += 1
            self._kept = self._thin(self._kept, self._k)

    @staticmethod
    def _thin(kept: list, k: int) -> list:
        out = []
        for x, y, i in kept:
            rows = _in_sample(i, k).nonzero().reshape(-1)
            if rows.numel():
                out.append((x.index_select(0, rows), y.index_select(0, rows),
                            i.index_select(0, rows)))
        return out

    def _pass(self, beta: float, first: bool) -> Tuple[torch.Tensor, int]:
        total: Optional[torch.Tensor] = None
        rows_seen = 0
        for i, chunk in enumerate(chunks(self.source)):
            logits, labels = self._prepare(i, chunk, first)
            n = logits.shape[0]
            if n == 0:
                continue
            s = F.temperature_stats(logits, labels, beta)
            total = s if total is None else total + s.to(total.device)
            if first:
                self._keep(logits, labels, rows_seen)
                self.rows += n
            rows_seen += n
        sums = total.double().cpu() if total is not None else torch.zeros(4, dtype=torch.float64)
        return sums, rows_seen

    # ------------------------------------------------------------------ reductions
    def _sum(self, values: torch.Tensor, error: Optional[BaseException]) -> torch.Tensor:
        """values summed over the ranks (this rank's error raised on every rank)."""
        if self.group is None:
            if error is not None:
                raise error
            return values
        return all_reduce_checked(self.fn, self.group, values, error)

    def _guard(self, work):
        """(work(), None), or (None, the exception) in a distributed fit."""
        try:
            return work(), None
        except Exception as exc:
            if self.group is None:
                raise
            return None, exc

    # ------------------------------------------------------------------ full passes
    def full(self, beta: float) -> Tuple[float, float, float, int]:
        """[sum NLL, f', f'', N] at beta over every row (of every rank)."""
        fn = self.fn
        first = self.passes == 0
        out, error = self._guard(lambda: self._pass(beta, first))
        sums, rows_seen = out if out is not None else (torch.zeros(4, dtype=torch.float64), 0)
        self.passes += 1
        c = float(self.classes) if self.classes is not None else 0.0
        changed = 0.0
        if not first and error is None and rows_seen != self.rows:
            if self.group is None:
                if rows_seen == 0:
                    raise ValueError(f"{fn}: the chunks yielded no rows on a later pass (is the "
                                     "iterable re-iterable?)")
                raise ValueError(f"{fn}: the chunks gave {rows_seen} rows on a later pass but "
                                 f"{self.rows} on the first; they must be the same on every pass")
            changed = 1.0
        # the summed flags: rows changed; ranks that saw logits, sum of their C and of C^2
        # (all equal iff k sum C^2 == (sum C)^2, exact in float64); logits not in float64
        flags = torch.tensor([changed, 1.0 if self.classes is not None else 0.0, c, c * c,
                              1.0 if self._low else 0.0], dtype=torch.float64)
        packed = self._sum(torch.cat([sums, flags]), error)
        sums, flags = packed[:4], packed[4:]
        if flags[0] > 0:
            raise ValueError(f"{fn}: the chunks of a rank gave a different number of rows on a "
                             "later pass than on the first; they must be the same on every pass")
        if flags[1] * flags[3] != flags[2] * flags[2]:
            raise ValueError(f"{fn}: the ranks' logits have different numbers of classes "
                             f"(this rank: {self.classes})")
        f, g, h, n = sums.tolist()
        if first:
            if n == 0:
                raise ValueError(f"{fn}: empty input (0 rows)" if self.group is None else
                                 f"{fn}: empty input (0 rows on every rank of the group)")
            self.total_rows = int(n)
            self.low_precision = bool(flags[4] > 0)
            classes = int(round(float(flags[2] / flags[1])))
            if not all(math.isfinite(v) for v in (f, g, h)):
                self._diagnose()
            self._finish_sample(int(n), classes)
        return f, g, h, int(n)

    def _diagnose(self) -> None:
        """Non-finite sums: find the bad logits (one more read) and raise, naming the row."""
        def work():
            self.check_passes += 1
            for i, chunk in enumerate(chunks(self.source)):
                logits, labels = self._prepare(i, chunk, False)
                if logits.shape[0]:
                    check_values(self.fn, logits, labels, self._where(i))
        _, error = self._guard(work)
        self._sum(torch.zeros(1, dtype=torch.float64), error)

    def _finish_sample(self, total_rows: int, classes: int) -> None:
        k = _sample_exponent(total_rows, classes)
        if not _use_sample(total_rows, k):
            self._kept = []
            return
        kept = self._thin(self._kept, k) if k > (self._k or 0) else self._kept
        self._kept = []
        if kept:
            x, y, i = (torch.cat(v) if len(kept) > 1 else v[0] for v in zip(*kept))
            self._sample = (x, y)
            rows = _in_sample(i, k + SUB_BITS).nonzero().reshape(-1)
            self._sub = (x.index_select(0, rows), y.index_select(0, rows))
            rows = _in_sample(i, k + REG_BITS).nonzero().reshape(-1)
            self._reg = (x.index_select(0, rows), y.index_select(0, rows))
        local = [float(v[0].shape[0]) if v is not None else 0.0 for v in (self._sample, self._sub)]
        counts = self._sum(torch.tensor(local, dtype=torch.float64), None)
        self.sample_rows, self.sub_rows = int(counts[0]), int(counts[1])

    def sample(self, beta: float, sub: bool = False) -> Tuple[float, float, float, int]:
        """[sum NLL, f', f'', m] at beta over the sample rows (of every rank); ``sub``: over
        the sub-sample (1/8 of the sample). Each (beta, sub) is evaluated once."""
        key = (beta, sub)
        if key in self._sample_cache:
            return self._sample_cache[key]
        rows = self._sub if sub else self._sample

        def work():
            if rows is None or rows[0].shape[0] == 0:
                return torch.zeros(4, dtype=torch.float64)
            return F.temperature_stats(rows[0], rows[1], beta).double().cpu()
        sums, error = self._guard(work)
        self.sample_passes += 1.0 / (1 << SUB_BITS) if sub else 1.0
        sums = self._sum(sums if sums is not None else torch.zeros(4, dtype=torch.float64), error)
        f, g, h, m = sums.tolist()
        self._sample_cache[key] = (f, g, h, int(m))
        return self._sample_cache[key]

    def sub_row_stats(self, beta: float) -> torch.Tensor:
        """This rank's regression rows' (1/2^REG_BITS of the sample) NLL and first four
        derivatives at beta, (m_reg, 5) float64 on the CPU
        (:func:`softcal._temperature_sample.row_stats`); counted as 4 passes over those rows
        (PyTorch, not the fused kernel). Each beta is evaluated once."""
        if beta not in self._row_cache:
            def work():
                if self._reg is None or self._reg[0].shape[0] == 0:
                    return torch.zeros(0, 5, dtype=torch.float64)
                return row_stats(self._reg[0], self._reg[1], beta).cpu()
            out, error = self._guard(work)
            self._sum(torch.zeros(1, dtype=torch.float64), error)  # raise on every rank
            self.sample_passes += 4.0 / (1 << REG_BITS)
            self._row_cache[beta] = out
        return self._row_cache[beta]

    def reduce(self, values: torch.Tensor) -> torch.Tensor:
        """A float64 vector summed over the ranks."""
        return self._sum(values, None)

    # ------------------------------------------------------------------ degenerate data
    def all_correct(self) -> bool:
        """Whether every row's label holds the row's largest logit (separable data). A sample
        row that does not decides it at once; else one more read of every row."""
        if self.sample_rows:
            def on_sample():
                if self._sample is None:
                    return 0.0
                ok = check_values(self.fn, self._sample[0], self._sample[1], " (in the sample)")
                return 0.0 if bool(ok.all()) else 1.0
            wrong, error = self._guard(on_sample)
            wrong = self._sum(torch.tensor([wrong or 0.0], dtype=torch.float64), error)
            if float(wrong[0]) > 0:
                return False

        def on_all():
            self.check_passes += 1
            for i, chunk in enumerate(chunks(self.source)):
                logits, labels = self._prepare(i, chunk, False)
                if logits.shape[0] and not bool(check_values(self.fn, logits, labels,
                                                             self._where(i)).all()):
                    return 1.0
            return 0.0
        wrong, error = self._guard(on_all)
        wrong = self._sum(torch.tensor([wrong or 0.0], dtype=torch.float64), error)
        return float(wrong[0]) == 0.0

    def all_rows_constant(self) -> bool:
        """Whether every row's finite logits are all equal (one extra pass; degenerate cases only;
        on every rank of the group)."""
        def work():
            self.check_passes += 1
            for i, chunk in enumerate(chunks(self.source)):
                logits, _ = self._prepare(i, chunk, False)
                if logits.shape[0] == 0:
                    continue
                x = logits.float().masked_fill(torch.isneginf(logits), float("nan"))
                spread = torch.nan_to_num(x.nan_to_num(float("-inf")).amax(1) -
                                          x.nan_to_num(float("inf")).amin(1), nan=0.0)
                if bool((spread != 0).any()):
                    return 1.0
            return 0.0
        varying, error = self._guard(work)
        varying = self._sum(torch.tensor([varying or 0.0], dtype=torch.float64), error)
        return float(varying[0]) == 0.0


# ---------------------------------------------------------------------- the iteration
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


def _log_newton(beta: float, g: float, h: float, lo: float, hi: float) -> Optional[float]:
    """Newton's step for the root of d f / d log beta = beta f' (slope beta^2 f'' + beta f'),
    capped at a factor of 4; None unless the slope is positive and the point inside (lo, hi)."""
    slope = beta * h + g
    if not slope > 0:
        return None
    cand = beta * math.exp(max(-math.log(4.0), min(math.log(4.0), -g / slope)))
    return cand if lo < cand < hi else None


def _quartic_step(g: float, h: float, t: float, q: float, s: float) -> Optional[float]:
    """The root near s (Halley's step) of g + h s + t s^2 / 2 + q s^3 / 6 (Newton on the
    polynomial; None when it does not settle)."""
    ds = math.inf
    for _ in range(8):
        d = h + t * s + q * s * s / 2.0
        if not d > 0:
            return None
        ds = (g + h * s + t * s * s / 2.0 + q * s ** 3 / 6.0) / d
        s -= ds
        if abs(ds) <= 1e-15 * abs(s):
            return s
    return s if abs(ds) <= 1e-12 * abs(s) else None


def fit_temperature(stats: _Stats, start_t: float, tol: float, max_iter: int,
                    bounds: Tuple[float, float]):
    """Safeguarded Newton/Halley on beta = 1/T for the root of f'(beta) (see the module
    docstrings); returns a :class:`softcal.calibration.FitResult`."""
    from .calibration import FitResult

    fn = stats.fn
    b_min, b_max = 1.0 / bounds[1], 1.0 / bounds[0]

    def result(beta: float, nll: float, its: int, converged: bool, at_bound: Optional[str]):
        t = min(max(1.0 / beta, bounds[0]), bounds[1]) if at_bound != "keep" else 1.0 / beta
        if not (math.isfinite(t) and t > 0):  # cannot happen: beta stays in [b_min, b_max]
            raise RuntimeError(f"{fn}: internal error, T = {t}")
        return FitResult(temperature=t, nll_before=nll_before, nll_after=nll, iterations=its,
                         converged=converged, at_bound=None if at_bound == "keep" else at_bound,
                         rows=n, time_s=0.0, sample_rows=stats.sample_rows,
                         sample_passes=stats.sample_passes, check_passes=stats.check_passes)

    beta = 1.0 / start_t
    f, g, h, n = stats.full(beta)  # the first pass also checks the input and keeps the sample
    its = 1
    nll_before = f / n

    if h == 0.0 and g == 0.0 and stats.all_rows_constant():
        warnings.warn(
            f"{fn}: the NLL does not depend on the temperature (within every row all logits are "
            f"equal); keeping T = {start_t:.6g}.", RuntimeWarning, stacklevel=3)
        return result(beta, f / n, its + 1, True, "keep")

    # f' > 0 somewhere (here) proves a row whose label does not hold its maximum: no check
    if g <= 0 and stats.all_correct():
        # Every label holds its row's maximum: f' < 0 for every beta, the NLL falls as T -> 0.
        if beta != b_max:
            f, g, h, _ = stats.full(b_max)
            its += 1
        warnings.warn(
            f"{fn}: every row's label has the largest logit (the data are separable), so the NLL "
            f"keeps decreasing as T -> 0; stopped at the lower bound T = {bounds[0]:g}. Fit on "
            "held-out data the model has not memorised, or widen bounds=.", RuntimeWarning,
            stacklevel=3)
        return result(b_max, f / n, its, False, "lower")
    if not b_min <= beta <= b_max:  # start outside the bounds: restart at the nearest bound
        beta = min(max(beta, b_min), b_max)
        f, g, h, _ = stats.full(beta)
        its += 1

    lo, hi = b_min, b_max           # bracket of the root of f'
    lo_known = hi_known = False     # whether f' was evaluated at lo / hi
    g_lo = h_lo = g_hi = h_hi = 0.0
    best_nll, best_beta = f / n, beta
    t_est: Optional[float] = None   # f''' (a sum over rows), where, and its relative error
    t_at, t_err = 0.0, 1.0
    q_est: Optional[float] = None   # f'''' (a sum over rows) at t_at, and its relative error
    q_err = 1.0
    far = not (h > 0 and abs(g / h) <= 0.05 * beta)  # Newton's step from here is long
    if stats.sample_rows and far and g != 0.0 and its < max_iter:
        beta0, full0 = beta, torch.tensor([f, g, h], dtype=torch.float64) / n
        b, gs, hs, ts = sample_optimum(stats, beta, g / n, h / n, b_min, b_max)
        b_s = corrected_optimum(stats, beta0, full0, b, gs, hs, ts, b_min, b_max)
        if abs(b_s - beta) > tol * beta:
            if g < 0:
                lo, lo_known, g_lo, h_lo = beta, True, g, h
            else:
                hi, hi_known, g_hi, h_hi = beta, True, g, h
            beta = b_s
            f, g, h, _ = stats.full(beta)
            its += 1
            (t_row, se), (q_row, se_q) = third_derivative(
                stats, beta0, full0, b, beta, torch.tensor([f, g, h], dtype=torch.float64) / n)
            # the errors of f''' and f'''' are taken as 3 standard errors of their estimates
            t_est, t_at = t_row * n, beta
            t_err = min(1.0, 3.0 * se / abs(t_row)) if t_row != 0 else 1.0
            q_est = q_row * n
            q_err = min(1.0, 3.0 * se_q / abs(q_row)) if q_row != 0 else 1.0
    # Below the rounding of the statistics (float32 per row for float16/bfloat16/float32
    # logits: the fitted T is only defined to about 1e-7 there) no step is worth a pass.
    floor = 0.1 * torch.finfo(torch.float32).eps if stats.low_precision else 0.0
    prev: Optional[Tuple[float, float]] = None  # (beta, f'') of the previous full pass
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
        if prev is not None and abs(beta - prev[0]) <= 0.05 * beta and beta != prev[0]:
            # f''' at the midpoint; its error at beta is about f'''' (beta - prev) / 2
            t_est, t_at = (h - prev[1]) / (beta - prev[0]), beta
            t_err = min(1.0, abs(beta - prev[0]) / beta)
        prev = (beta, h)
        if t_est is not None and abs(beta - t_at) > 0.05 * beta:
            t_est = None                       # estimated too far from here

        step = -g / h if h > 0 else math.copysign(math.inf, -g)
        cand = beta + step
        newton_ok = lo < cand < hi
        s_h = halley(g, h, t_est) if (t_est is not None and newton_ok) else None
        if s_h is not None and not lo < beta + s_h < hi:
            s_h = None
        if newton_ok and abs(step) <= tol * beta:
            # Converged: take the last step without another pass; the NLL there is the Taylor
            # value (error O(step^3)).
            s = s_h if s_h is not None else step
            tt = t_est if s_h is not None else 0.0
            nll = (f + g * s + 0.5 * h * s * s + tt * s * s * s / 6.0) / n
            return result(beta + s, nll, its, True, None)
        if s_h is not None:
            kk = max(1.0, abs(t_est) * beta / h)
            q = q_est if (q_est is not None and t_at == beta) else None
            s_c = _quartic_step(g, h, t_est, q, s_h) if q is not None else None
            if q is not None and s_c is not None and lo < beta + s_c < hi:
                # the error left: f''' and f'''' within their estimated errors, f''''' within
                # the scale K^3 f'' / beta^3
                left = ((abs(t_est) * s_c * s_c / 2.0 * t_err + abs(q) * abs(s_c) ** 3 / 6.0
                         * q_err) / h + s_c ** 4 * kk ** 3 / beta ** 3)
            else:
                s_c, q = s_h, 0.0
                left = abs(s_h - step) * t_err + abs(step) ** 3 * kk * kk / (beta * beta)
            if left <= max(tol * tol, floor) * beta:
                nll = (f + g * s_c + 0.5 * h * s_c ** 2 + t_est * s_c ** 3 / 6.0
                       + q * s_c ** 4 / 24.0) / n
                return result(beta + s_c, nll, its, True, None)
            cand = beta + s_c
        elif lo_known and hi_known:
            # Closed bracket: the root of the cubic Hermite interpolant of f' (values and slopes
            # at both ends) models f' better than the tangent at one end (saves about one pass).
            cand = _hermite_root(lo, g_lo, h_lo, hi, g_hi, h_hi)
            if not lo < cand < hi:
                cand = beta + step if newton_ok else math.sqrt(lo * hi)
        elif newton_ok:
            pass
        else:
            # Newton's step leaves the open bracket: Newton's step on log beta when it stays
            # inside (a factor e at most towards a root below; 4 above), else a factor of 4
            cand = _log_newton(beta, g, h, lo, hi)
            if cand is None:
                cand = min(beta * 4.0, b_max) if g < 0 else max(beta / 4.0, b_min)
        if lo_known and hi_known and hi - lo <= tol * lo:
            return result(math.sqrt(lo * hi), best_nll, its, True, None)
        if its >= max_iter:
            warnings.warn(
                f"{fn}: no convergence in max_iter={max_iter} passes; returning the best T seen "
                f"({1.0 / best_beta:.6g})", RuntimeWarning, stacklevel=3)
            return result(best_beta, best_nll, its, False, None)
        beta = cand
        f, g, h, _ = stats.full(beta)
        its += 1
