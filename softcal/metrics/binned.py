"""Binned calibration metrics (ECE, adaptive and classwise ECE, MCE, RMS calibration error),
Brier score, NLL and accuracy, as functions and accumulated over batches and ranks
(:class:`CalibrationMetrics`); the conventions are in the docstring of :mod:`softcal.metrics`.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch

from ._inputs import Temperature, _check_bins, _check_ignore_index, _prepare, _top_label

__all__ = [
    "AdaptiveECE",
    "Brier",
    "CalibrationMetrics",
    "CalibrationReport",
    "ClasswiseECE",
    "ECE",
    "MCE",
    "NLL",
    "RMSCE",
    "ReliabilityBins",
    "accuracy",
    "adaptive_ece",
    "brier_score",
    "calibration_report",
    "classwise_ece",
    "ece",
    "expected_calibration_error",
    "maximum_calibration_error",
    "mce",
    "nll",
    "reliability_bins",
    "rms_calibration_error",
]

def _bin_index(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin of each confidence: bin k is (k/n, (k+1)/n]; 0 -> bin 0, 1.0 -> bin n-1."""
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=conf.device)[1:]
    edges[-1] = 1.0
    # bucketize(right=False): index i with edges[i-1] < conf <= edges[i].
    return torch.bucketize(conf, edges, right=False).clamp_(0, n_bins - 1)


@dataclass
class ReliabilityBins:
    """Per-bin statistics of top-label confidence (tensors of shape (n_bins,), float64).

    edges: (n_bins + 1,) bin edges; count: rows per bin; confidence: mean confidence per bin
    (NaN where empty); accuracy: accuracy per bin (NaN where empty).
    """

    edges: torch.Tensor
    count: torch.Tensor
    confidence: torch.Tensor
    accuracy: torch.Tensor


def _binned(conf: torch.Tensor, hit: torch.Tensor, idx: torch.Tensor, n_bins: int):
    count = torch.bincount(idx, minlength=n_bins).to(torch.float64)
    sum_conf = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).scatter_add_(0, idx, conf)
    sum_hit = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).scatter_add_(0, idx, hit)
    return count, sum_conf, sum_hit


def reliability_bins(scores, labels, n_bins: int = 15, *, temperature: Temperature = None,
                     probs: bool = False, ignore_index: Optional[int] = -100) -> ReliabilityBins:
    """Equal-width reliability bins of top-label confidence (what a reliability diagram plots)."""
    fn = "softcal.metrics.reliability_bins"
    n_bins = _check_bins(fn, n_bins)
    p, _, y = _prepare(fn, scores, labels, temperature, probs, ignore_index)
    conf, hit = _top_label(p, y)
    count, sc, sh = _binned(conf, hit, _bin_index(conf, n_bins), n_bins)
    safe = count.clamp_min(1)
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=count.device)
    return ReliabilityBins(
        edges=torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64),
        count=count.cpu(),
        confidence=torch.where(count > 0, sc / safe, nan).cpu(),
        accuracy=torch.where(count > 0, sh / safe, nan).cpu(),
    )


def _gaps(count: torch.Tensor, sum_conf: torch.Tensor, sum_hit: torch.Tensor, n: int):
    """|acc_b - conf_b| per bin (0 for empty bins) and bin weights n_b / N."""
    gap = (sum_hit - sum_conf).abs() / count.clamp_min(1)
    return gap, count / n


def _ece_terms(p, y, n_bins):
    conf, hit = _top_label(p, y)
    count, sc, sh = _binned(conf, hit, _bin_index(conf, n_bins), n_bins)
    return _gaps(count, sc, sh, conf.shape[0]), count


def expected_calibration_error(scores, labels, n_bins: int = 15, *, temperature: Temperature = None,
                               probs: bool = False, ignore_index: Optional[int] = -100) -> float:
    """Top-label ECE with ``n_bins`` equal-width bins, in [0, 1] (multiply by 100 for %).

    scores: (N, C) logits (or probabilities with probs=True); labels: (N,) integers in [0, C).
    """
    fn = "softcal.metrics.ece"
    n_bins = _check_bins(fn, n_bins)
    p, _, y = _prepare(fn, scores, labels, temperature, probs, ignore_index)
    (gap, w), _ = _ece_terms(p, y, n_bins)
    return float((gap * w).sum())


def maximum_calibration_error(scores, labels, n_bins: int = 15, *, temperature: Temperature = None,
                              probs: bool = False, ignore_index: Optional[int] = -100) -> float:
    """Largest |accuracy - confidence| over the non-empty equal-width bins, in [0, 1]."""
    fn = "softcal.metrics.mce"
    n_bins = _check_bins(fn, n_bins)
    p, _, y = _prepare(fn, scores, labels, temperature, probs, ignore_index)
    (gap, _w), count = _ece_terms(p, y, n_bins)
    return float(torch.where(count > 0, gap, torch.zeros_like(gap)).max())


def rms_calibration_error(scores, labels, n_bins: int = 15, *, temperature: Temperature = None,
                          probs: bool = False, ignore_index: Optional[int] = -100) -> float:
    """Root-mean-square calibration error over equal-width bins, in [0, 1]."""
    fn = "softcal.metrics.rms_calibration_error"
    n_bins = _check_bins(fn, n_bins)
    p, _, y = _prepare(fn, scores, labels, temperature, probs, ignore_index)
    (gap, w), _ = _ece_terms(p, y, n_bins)
    return float((w * gap * gap).sum().sqrt())


def adaptive_ece(scores, labels, n_bins: int = 15, *, temperature: Temperature = None,
                 probs: bool = False, ignore_index: Optional[int] = -100) -> float:
    """Top-label ECE with equal-mass bins: rows sorted by confidence, split into ``n_bins``
    groups whose sizes differ by at most one (row r of N goes to bin floor(r * n_bins / N))."""
    fn = "softcal.metrics.adaptive_ece"
    n_bins = _check_bins(fn, n_bins)
    p, _, y = _prepare(fn, scores, labels, temperature, probs, ignore_index)
    return float(_adaptive(p, y, n_bins))


def _adaptive(p, y, n_bins):
    conf, hit = _top_label(p, y)
    n = conf.shape[0]
    order = torch.argsort(conf, stable=True)
    idx = torch.empty_like(order)
    idx[order] = torch.arange(n, device=conf.device) * n_bins // n
    count, sc, sh = _binned(conf, hit, idx, n_bins)
    gap, w = _gaps(count, sc, sh, n)
    return (gap * w).sum()


def classwise_ece(scores, labels, n_bins: int = 15, *, temperature: Temperature = None,
                  probs: bool = False, ignore_index: Optional[int] = -100) -> float:
    """Classwise ECE (Kull et al. 2019): mean over classes k of the equal-width-binned ECE of
    p_k against 1[y = k], over all N rows."""
    fn = "softcal.metrics.classwise_ece"
    n_bins = _check_bins(fn, n_bins)
    p, _, y = _prepare(fn, scores, labels, temperature, probs, ignore_index)
    return float(_classwise(p, y, n_bins))


def _classwise(p, y, n_bins):
    n, c = p.shape
    target = torch.zeros_like(p).scatter_(1, y[:, None], 1.0)
    flat = (_bin_index(p, n_bins) + n_bins * torch.arange(c, device=p.device)[None, :]).reshape(-1)
    count, sc, sh = _binned(p.reshape(-1), target.reshape(-1), flat, n_bins * c)
    gap = (sh - sc).abs()  # n_b |acc_b - conf_b|
    return gap.sum() / (n * c)


def brier_score(scores, labels, *, temperature: Temperature = None, probs: bool = False,
                ignore_index: Optional[int] = -100) -> float:
    """Multi-class Brier score: mean over rows of sum_k (p_k - 1[y = k])^2, in [0, 2]."""
    p, _, y = _prepare("softcal.metrics.brier_score", scores, labels, temperature, probs, ignore_index)
    sq = (p * p).sum(1) - 2 * p.gather(1, y[:, None]).squeeze(1) + 1
    return float(sq.mean())


def nll(scores, labels, *, temperature: Temperature = None, probs: bool = False,
        ignore_index: Optional[int] = -100) -> float:
    """Mean negative log-likelihood of the labels (natural log). With probs=True and no
    temperature, a probability of 0 is clamped to the smallest float64 (NLL about 708)."""
    _, logp, y = _prepare("softcal.metrics.nll", scores, labels, temperature, probs, ignore_index)
    return float(-logp.gather(1, y[:, None]).mean())


def accuracy(scores, labels, *, probs: bool = False, ignore_index: Optional[int] = -100) -> float:
    """Fraction of rows whose arg-max class is the label (ties: the first maximum)."""
    p, _, y = _prepare("softcal.metrics.accuracy", scores, labels, None, probs, ignore_index)
    return float((p.argmax(1) == y).to(torch.float64).mean())


ece = expected_calibration_error
mce = maximum_calibration_error


@dataclass
class CalibrationReport:
    """All metrics at once (fractions in [0, 1], not percentages; NLL in nats)."""

    n: int
    classes: int
    n_bins: int
    accuracy: float
    nll: float
    ece: float
    adaptive_ece: float
    classwise_ece: float
    mce: float
    rmsce: float
    brier: float

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def calibration_report(scores, labels, n_bins: int = 15, *, temperature: Temperature = None,
                       probs: bool = False, ignore_index: Optional[int] = -100) -> CalibrationReport:
    """Every metric in this module on (scores, labels), computing the probabilities once."""
    fn = "softcal.metrics.calibration_report"
    n_bins = _check_bins(fn, n_bins)
    p, logp, y = _prepare(fn, scores, labels, temperature, probs, ignore_index)
    n, c = p.shape
    (gap, w), count = _ece_terms(p, y, n_bins)
    nonempty = torch.where(count > 0, gap, torch.zeros_like(gap))
    sq = (p * p).sum(1) - 2 * p.gather(1, y[:, None]).squeeze(1) + 1
    vals = torch.stack([
        (p.argmax(1) == y).to(torch.float64).mean(),
        -logp.gather(1, y[:, None]).mean(),
        (gap * w).sum(),
        nonempty.max(),
        (w * gap * gap).sum().sqrt(),
        sq.mean(),
        _adaptive(p, y, n_bins),
        _classwise(p, y, n_bins),
    ]).cpu().tolist()
    return CalibrationReport(
        n=n, classes=c, n_bins=n_bins,
        accuracy=vals[0], nll=vals[1], ece=vals[2],
        adaptive_ece=vals[6],
        classwise_ece=vals[7],
        mce=vals[3], rmsce=vals[4], brier=vals[5],
    )


# ---------------------------------------------------------------------- accumulating metrics
class CalibrationMetrics:
    """Every metric of this module, accumulated batch by batch (and across ranks).

    ``m = CalibrationMetrics(n_bins=15, group=None)``; ``m.update(scores, labels)`` per batch
    (scores (B, C) logits, or probabilities with ``probs=True``; labels (B,); ``temperature``
    as in the functions); ``m.compute()`` returns a :class:`CalibrationReport` equal to
    ``calibration_report`` on the concatenated batches; ``m.reset()`` starts again.

    Args:
        n_bins: equal-width bins (and adaptive bins).
        probs: the scores are probabilities.
        group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD`` for all
            ranks) whose ranks each update with their own rows; ``compute`` is then a collective
            (every rank must call it) and returns the same report on every rank, for the rows
            of all ranks. A rank may have no rows. None: this process only.
        adaptive: keep the per-row confidences that adaptive ECE needs (9 bytes per row;
            gathered by ``compute``); False leaves adaptive ECE as NaN.
        ignore_index: rows whose label is this value are left out (None: none is).

    State (float64, on the device of the first batch): top-label bins 3 x n_bins, classwise
    bins 2 x C x n_bins, [rows, sum NLL, sum Brier, hits].
    """

    def __init__(self, n_bins: int = 15, *, probs: bool = False, group=None,
                 adaptive: bool = True, ignore_index: Optional[int] = -100) -> None:
        self.n_bins = _check_bins("softcal.metrics.CalibrationMetrics", n_bins)
        self.probs = bool(probs)
        self.ignore_index = _check_ignore_index("softcal.metrics.CalibrationMetrics", ignore_index)
        self.group = group
        self.adaptive = bool(adaptive)
        self.reset()

    # The group is held by a weak reference. torch.distributed itself holds every group that can
    # still communicate, so nothing usable is lost; but a strong reference here kept a group that
    # destroy_process_group() had released alive until the interpreter exited, with its gloo
    # worker threads: a worker that still had to drop its last all_gather (whose tensors are
    # Python objects, so the drop takes the GIL) was then killed by the interpreter's
    # finalisation inside a noexcept destructor, and the process aborted ("terminate called
    # without an active exception") after a correct run.
    @property
    def group(self):
        """The process group given to the constructor (None: this process only)."""
        ref = self._group_ref
        if ref is None:
            return None
        g = ref()
        if g is None:
            raise RuntimeError(
                f"softcal.metrics.{type(self).__name__}: its process group was destroyed "
                "(torch.distributed.destroy_process_group); give a live group")
        return g

    @group.setter
    def group(self, group) -> None:
        if group is None:
            self._group_ref = None
            return
        try:
            self._group_ref = weakref.ref(group)
        except TypeError:      # not weak-referenceable: validated (and refused) by the collectives
            self._group_ref = lambda: group

    def reset(self) -> None:
        """Forget every batch."""
        self.classes: Optional[int] = None
        self._top: Optional[torch.Tensor] = None     # (3, n_bins): count, sum conf, sum hit
        self._cls: Optional[torch.Tensor] = None     # (2, C * n_bins): sum p, sum target
        self._sums: Optional[torch.Tensor] = None    # [rows, sum nll, sum brier, hits]
        self._conf: list = []
        self._hit: list = []

    def update(self, scores, labels, *, temperature: Temperature = None) -> None:
        """Add a batch: scores (B, C) or (B, C, d1, ...) or binary, labels (B,) or (B, d1, ...),
        as in the functions. B = 0 (or every label ignored) is allowed (nothing is added)."""
        fn = f"softcal.metrics.{type(self).__name__}.update"
        p, logp, y = _prepare(fn, scores, labels, temperature, self.probs, self.ignore_index,
                              allow_empty=True)
        n, c = p.shape
        self._init_state(fn, c, p.device)
        if n == 0:
            return
        nb = self.n_bins
        conf, hit = _top_label(p, y)
        count, sc, sh = _binned(conf, hit, _bin_index(conf, nb), nb)
        self._top += torch.stack([count, sc, sh])
        target = torch.zeros_like(p).scatter_(1, y[:, None], 1.0)
        flat = (_bin_index(p, nb) + nb * torch.arange(c, device=p.device)[None, :]).reshape(-1)
        self._cls[0].scatter_add_(0, flat, p.reshape(-1))
        self._cls[1].scatter_add_(0, flat, target.reshape(-1))
        sq = (p * p).sum(1) - 2 * p.gather(1, y[:, None]).squeeze(1) + 1
        self._sums += torch.stack([
            torch.tensor(float(n), dtype=torch.float64, device=p.device),
            -logp.gather(1, y[:, None]).sum(), sq.sum(), (p.argmax(1) == y).to(torch.float64).sum()])
        if self.adaptive:
            self._conf.append(conf)
            self._hit.append(hit.to(torch.bool))

    def _init_state(self, fn: str, c: int, device: torch.device) -> None:
        if self.classes is None:
            self.classes = c
            nb = self.n_bins
            self._top = torch.zeros(3, nb, dtype=torch.float64, device=device)
            self._cls = torch.zeros(2, c * nb, dtype=torch.float64, device=device)
            self._sums = torch.zeros(4, dtype=torch.float64, device=device)
        elif c != self.classes:
            raise ValueError(f"{fn}: this batch has {c} classes but the earlier ones had "
                             f"{self.classes}")

    # ------------------------------------------------------------------ reduction
    def _global_state(self):
        """(top bins, classwise bins, sums, confidences, hits), summed over the group."""
        fn = f"softcal.metrics.{type(self).__name__}.compute"
        group = self.group
        if group is None:
            if self.classes is None or float(self._sums[0]) == 0:
                raise ValueError(f"{fn}: no rows were added (call update first)")
            conf = torch.cat(self._conf) if self._conf else None
            hit = torch.cat(self._hit) if self._hit else None
            return self._top, self._cls, self._sums, conf, hit
        from .._agree import agree_on
        from ..distributed import all_reduce, comm_device, _dist

        dist = _dist()
        # One small collective first: every rank must use the same bins and options (else the
        # sums below would have different sizes: gloo aborts the process, NCCL hangs), and the
        # ranks' numbers of classes and rows are gathered (every rank then raises alike).
        n_rows = sum(int(v.shape[0]) for v in self._conf)

        def checks(sig):
            sig.same("n_bins", self.n_bins)
            sig.same("probs", self.probs)
            sig.same("adaptive", self.adaptive)
            sig.each("classes", self.classes, kind="int")
            sig.each("rows", n_rows)

        _, agreed = agree_on(fn, group, checks)
        seen = [c for c in agreed.each("classes") if c is not None]
        if not seen:
            raise ValueError(f"{fn}: no rows were added on any rank (call update first)")
        c_max = max(seen)
        if min(seen) != c_max:
            raise ValueError(f"{fn}: the ranks' scores have different numbers of classes (from "
                             f"{min(seen)} to {c_max})")
        nb = self.n_bins
        if self.classes is None:
            self._init_state(fn, c_max, torch.device("cpu"))
        packed = torch.cat([self._top.reshape(-1), self._cls.reshape(-1), self._sums])
        packed = all_reduce(packed, "sum", group)
        top = packed[:3 * nb].reshape(3, nb)
        cls = packed[3 * nb:3 * nb + 2 * c_max * nb].reshape(2, -1)
        sums = packed[-4:]
        if float(sums[0]) == 0:
            raise ValueError(f"{fn}: no rows were added on any rank (call update first)")
        conf = hit = None
        if self.adaptive:
            dev = comm_device(group)
            local_c = torch.cat(self._conf).to(dev) if self._conf else torch.zeros(0, dtype=torch.float64, device=dev)
            local_h = torch.cat(self._hit).to(dev) if self._hit else torch.zeros(0, dtype=torch.bool, device=dev)
            world = agreed.world
            sizes = agreed.each("rows")
            most = max(sizes)
            buf = torch.zeros(2, most, dtype=torch.float64, device=dev)
            buf[0, :local_c.shape[0]] = local_c
            buf[1, :local_c.shape[0]] = local_h.to(torch.float64)
            out = [torch.empty_like(buf) for _ in range(world)]
            dist.all_gather(out, buf, group=group)
            conf = torch.cat([o[0, :k] for o, k in zip(out, sizes)])
            hit = torch.cat([o[1, :k] for o, k in zip(out, sizes)]).to(torch.bool)
        return top, cls, sums, conf, hit

    def compute(self) -> CalibrationReport:
        """The report over every row added since the last reset (of every rank with group=)."""
        top, cls, sums, conf, hit = self._global_state()
        nb = self.n_bins
        n = float(sums[0])
        count, sc, sh = top[0], top[1], top[2]
        gap, w = _gaps(count, sc, sh, n)
        nonempty = torch.where(count > 0, gap, torch.zeros_like(gap))
        c = cls.shape[1] // nb
        if conf is not None:
            order = torch.argsort(conf, stable=True)
            idx = torch.empty_like(order)
            idx[order] = torch.arange(conf.shape[0], device=conf.device) * nb // conf.shape[0]
            a_count, a_sc, a_sh = _binned(conf, hit.to(torch.float64), idx, nb)
            a_gap, a_w = _gaps(a_count, a_sc, a_sh, conf.shape[0])
            adaptive = float((a_gap * a_w).sum())
        else:
            adaptive = float("nan")
        vals = torch.stack([
            sums[3] / n, sums[1] / n, (gap * w).sum(), nonempty.max(), (w * gap * gap).sum().sqrt(),
            sums[2] / n, (cls[1] - cls[0]).abs().sum() / (n * c),
        ]).cpu().tolist()
        return CalibrationReport(
            n=int(n), classes=c, n_bins=nb, accuracy=vals[0], nll=vals[1], ece=vals[2],
            adaptive_ece=adaptive, classwise_ece=vals[6], mce=vals[3], rmsce=vals[4],
            brier=vals[5])


class _OneMetric(CalibrationMetrics):
    _field = ""

    def __init__(self, n_bins: int = 15, *, probs: bool = False, group=None,
                 ignore_index: Optional[int] = -100) -> None:
        super().__init__(n_bins, probs=probs, group=group, adaptive=self._field == "adaptive_ece",
                         ignore_index=ignore_index)

    def compute(self) -> float:  # type: ignore[override]
        """The metric over every row added since the last reset (of every rank with group=)."""
        return getattr(super().compute(), self._field)


class ECE(_OneMetric):
    """Accumulating top-label ECE (see :class:`CalibrationMetrics`); compute() returns a float."""
    _field = "ece"


class AdaptiveECE(_OneMetric):
    """Accumulating adaptive (equal-mass) ECE; the bins are those of :func:`adaptive_ece` on the
    concatenated rows of every batch and rank (see :class:`CalibrationMetrics`)."""
    _field = "adaptive_ece"


class ClasswiseECE(_OneMetric):
    """Accumulating classwise ECE (see :class:`CalibrationMetrics`)."""
    _field = "classwise_ece"


class MCE(_OneMetric):
    """Accumulating maximum calibration error (see :class:`CalibrationMetrics`)."""
    _field = "mce"


class RMSCE(_OneMetric):
    """Accumulating RMS calibration error (see :class:`CalibrationMetrics`)."""
    _field = "rmsce"


class Brier(_OneMetric):
    """Accumulating multi-class Brier score (see :class:`CalibrationMetrics`)."""
    _field = "brier"


class NLL(_OneMetric):
    """Accumulating mean NLL (see :class:`CalibrationMetrics`)."""
    _field = "nll"
