"""Accumulating (streaming) versions of the metrics of Kumar et al. 2019, Gupta et al. 2021,
Kumar et al. 2018 and Blasiok and Nakkiran 2023: ``update`` per batch, ``compute`` (a collective
with ``group=``), ``reset``, like :class:`softcal.metrics.CalibrationMetrics`.

Memory: :class:`DebiasedCalibrationError` with equal-width bins keeps 3 x K x n_bins float64
sums (K = 1 top-label, C marginal), whatever the number of rows. The others must keep rows,
because their value depends on every row at once: the KS error and the equal-mass bins on the
global order of the confidences, MMCE on every pair of rows (its kernel has no finite
expansion), smooth ECE on a bandwidth chosen from all rows and on a grid whose size depends on
that bandwidth. They keep 9 bytes per row (the top-label confidence in float64 and the hit);
the debiased error with equal-mass or "auto" bins keeps the (rows x C) probabilities.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ._inputs import Temperature, _check_bins, _check_ignore_index, _prepare, _top_label
from .binned import CalibrationMetrics, _bin_index
from .debiased import (_bin_stats, _check_options, _columns, _debiased_from_columns, _is_discrete,
                       _l2_from_stats)
from .ks import _ks
from .mmce import _mmce_rows
from .smooth import _bandwidth, _smooth_ece_at

__all__ = ["DebiasedCalibrationError", "KSCalibrationError", "MMCE", "SmoothECE"]


def _gather_rows(rows: torch.Tensor, group) -> torch.Tensor:
    """All-gather float64 rows (n_local, W) of every rank, concatenated in rank order."""
    from ..distributed import _dist, comm_device

    dist = _dist()
    dev = comm_device(group)
    local = rows.to(dev, torch.float64)
    world = dist.get_world_size(group)
    n_local = torch.tensor([local.shape[0], local.shape[1]], dtype=torch.int64, device=dev)
    sizes = [torch.empty_like(n_local) for _ in range(world)]
    dist.all_gather(sizes, n_local, group=group)
    sizes = torch.stack(sizes).cpu().tolist()
    width = max(s[1] for s in sizes)
    if any(s[0] and s[1] != width for s in sizes):
        raise ValueError(f"the ranks' scores have different numbers of classes "
                         f"({sorted({s[1] for s in sizes if s[0]})})")
    most = max(s[0] for s in sizes)
    buf = torch.zeros(most, width, dtype=torch.float64, device=dev)
    buf[:local.shape[0], :local.shape[1]] = local
    out = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(out, buf, group=group)
    return torch.cat([o[:s[0]] for o, s in zip(out, sizes)]).to(rows.device)


class _Accumulator:
    """update / compute / reset, the group held as CalibrationMetrics holds it."""

    group = CalibrationMetrics.group   # the same weak-reference property

    def __init__(self, *, probs: bool, group, ignore_index: Optional[int]) -> None:
        name = f"softcal.metrics.{type(self).__name__}"
        self.probs = bool(probs)
        self.ignore_index = _check_ignore_index(name, ignore_index)
        self.group = group
        self.reset()

    def reset(self) -> None:
        """Forget every batch."""
        self.classes: Optional[int] = None
        self._rows: List[torch.Tensor] = []

    def _batch(self, scores, labels, temperature: Temperature):
        fn = f"softcal.metrics.{type(self).__name__}.update"
        p, _, y = _prepare(fn, scores, labels, temperature, self.probs, self.ignore_index,
                           allow_empty=True)
        if self.classes is None:
            self.classes = p.shape[1]
        elif p.shape[1] != self.classes:
            raise ValueError(f"{fn}: this batch has {p.shape[1]} classes but the earlier ones had "
                             f"{self.classes}")
        return p, y

    def _all_rows(self, width: int) -> torch.Tensor:
        """Every kept row of this process (or of the group's ranks), (n, width) float64."""
        fn = f"softcal.metrics.{type(self).__name__}.compute"
        local = torch.cat(self._rows) if self._rows else torch.zeros(0, width, dtype=torch.float64)
        rows = local if self._group_ref is None else _gather_rows(local, self.group)
        if rows.shape[0] == 0:
            raise ValueError(f"{fn}: no rows were added (call update first)")
        return rows


class _TopLabelRows(_Accumulator):
    """Keeps (confidence, hit) per row: 16 bytes a row in float64 (9 of information)."""

    def update(self, scores, labels, *, temperature: Temperature = None) -> None:
        """Add a batch (shapes as in the functions); an empty batch adds nothing."""
        p, y = self._batch(scores, labels, temperature)
        if y.shape[0]:
            conf, hit = _top_label(p, y)
            self._rows.append(torch.stack([conf, hit], 1))

    def _conf_hit(self):
        rows = self._all_rows(2)
        return rows[:, 0].contiguous(), rows[:, 1].contiguous()


class KSCalibrationError(_TopLabelRows):
    """Accumulating :func:`ks_calibration_error` (keeps the rows' confidences and hits).

    ``m = KSCalibrationError(probs=False, group=None, ignore_index=-100)``;
    ``m.update(scores, labels, temperature=None)`` per batch; ``m.compute()`` equals the
    function on the concatenated batches (of every rank with ``group=``, a collective).
    """

    def __init__(self, *, probs: bool = False, group=None, ignore_index: Optional[int] = -100) -> None:
        super().__init__(probs=probs, group=group, ignore_index=ignore_index)

    def compute(self) -> float:
        """The KS calibration error over every row added since the last reset."""
        return float(_ks(*self._conf_hit()))


class MMCE(_TopLabelRows):
    """Accumulating :func:`mmce` (keeps the rows' confidences and hits); arguments as
    :class:`KSCalibrationError` plus ``kernel_width``."""

    def __init__(self, *, kernel_width: float = 0.4, probs: bool = False, group=None,
                 ignore_index: Optional[int] = -100) -> None:
        if isinstance(kernel_width, bool) or not isinstance(kernel_width, (int, float)) \
                or not 0 < kernel_width < float("inf"):
            raise ValueError(f"softcal.metrics.MMCE: kernel_width must be a finite number > 0, "
                             f"got {kernel_width!r}")
        self.kernel_width = float(kernel_width)
        super().__init__(probs=probs, group=group, ignore_index=ignore_index)

    def compute(self) -> float:
        """MMCE over every row added since the last reset."""
        conf, hit = self._conf_hit()
        return _mmce_rows(conf, hit, self.kernel_width)


class SmoothECE(_TopLabelRows):
    """Accumulating :func:`smooth_ece` (keeps the rows' confidences and hits); arguments as
    :class:`KSCalibrationError` plus ``sigma`` (None: the fixed-point bandwidth)."""

    def __init__(self, *, sigma: Optional[float] = None, probs: bool = False, group=None,
                 ignore_index: Optional[int] = -100) -> None:
        if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float))
                                  or not 0 < sigma <= 1):
            raise ValueError(f"softcal.metrics.SmoothECE: sigma must be a number in (0, 1] or "
                             f"None, got {sigma!r}")
        self.sigma = sigma
        super().__init__(probs=probs, group=group, ignore_index=ignore_index)

    def compute(self) -> float:
        """Smooth ECE over every row added since the last reset."""
        conf, hit = self._conf_hit()
        r = conf - hit
        s = _bandwidth(conf, r) if self.sigma is None else float(self.sigma)
        return float(_smooth_ece_at(conf, r, s))


class DebiasedCalibrationError(_Accumulator):
    """Accumulating :func:`debiased_calibration_error`.

    ``m = DebiasedCalibrationError(n_bins=15, mode="top-label", binning="width", debias=True,
    probs=False, group=None, ignore_index=-100)``; ``update`` / ``compute`` / ``reset`` as
    :class:`CalibrationMetrics`. With ``binning="width"`` (this class's default: equal-width
    bins, as :func:`ece`) the state is 3 x K x n_bins float64 sums (K = 1 top-label, C
    marginal), all-reduced by ``compute``. "mass", "discrete" and "auto" (the function's
    default, equal to uncertainty-calibration) need the global order or the distinct values of
    every row: the class then keeps the rows' probabilities (8 x C bytes a row) and gathers them.
    """

    def __init__(self, n_bins: int = 15, *, mode: str = "top-label", binning: str = "width",
                 debias: bool = True, probs: bool = False, group=None,
                 ignore_index: Optional[int] = -100) -> None:
        fn = "softcal.metrics.DebiasedCalibrationError"
        self.n_bins = _check_bins(fn, n_bins)
        _check_options(fn, mode, binning)
        self.mode, self.binning, self.debias = mode, binning, bool(debias)
        super().__init__(probs=probs, group=group, ignore_index=ignore_index)

    def reset(self) -> None:
        """Forget every batch."""
        super().reset()
        self._stats: Optional[torch.Tensor] = None

    def update(self, scores, labels, *, temperature: Temperature = None) -> None:
        """Add a batch (shapes as in the functions); an empty batch adds nothing."""
        p, y = self._batch(scores, labels, temperature)
        if self.binning != "width":
            if y.shape[0]:
                self._rows.append(torch.cat([p, y[:, None].to(torch.float64)], 1))
            return
        x, o = _columns(p, y, self.mode)
        stats = _bin_stats(x, o, _bin_index(x, self.n_bins), self.n_bins)
        self._stats = stats if self._stats is None else self._stats + stats

    def compute(self) -> float:
        """The debiased (or plug-in) L2 calibration error over every row added since the last
        reset (of every rank with group=)."""
        fn = "softcal.metrics.DebiasedCalibrationError.compute"
        if self.binning == "width":
            return self._compute_width(fn)
        rows = self._all_rows((self.classes or 0) + 1)
        p, y = rows[:, :-1], rows[:, -1].to(torch.int64)
        binning = self.binning
        if binning == "auto":
            binning = "discrete" if _is_discrete(p) else "mass"
        x, o = _columns(p, y, self.mode)
        return _debiased_from_columns(x, o, self.n_bins, binning, self.debias)

    def _compute_width(self, fn: str) -> float:
        stats = self._stats
        if self._group_ref is not None:
            from ..distributed import all_reduce

            k = 1 if self.mode == "top-label" else (self.classes or 0)
            kk = all_reduce(torch.tensor([float(k), -float(k) if k else -1e300],
                                         dtype=torch.float64), "max", self.group)
            if kk[0] == 0:
                raise ValueError(f"{fn}: no rows were added on any rank (call update first)")
            if (k and k != kk[0]) or -kk[1] != kk[0]:
                raise ValueError(f"{fn}: the ranks' scores have different numbers of classes")
            k = int(kk[0])
            if stats is None:
                stats = torch.zeros(3, k, self.n_bins, dtype=torch.float64)
            stats = all_reduce(stats, "sum", self.group)
        if stats is None or float(stats[0].sum()) == 0:
            raise ValueError(f"{fn}: no rows were added (call update first)")
        return float(_l2_from_stats(stats, self.debias))
