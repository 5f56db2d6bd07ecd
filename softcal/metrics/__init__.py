"""Calibration metrics for classifiers: ECE (equal-width, adaptive, classwise), MCE, RMS
calibration error, Brier score, NLL and accuracy; the debiased L2 calibration error (Kumar et
al. 2019), the Kolmogorov-Smirnov calibration error (Gupta et al. 2021), MMCE (Kumar et al.
2018), smooth ECE (Blasiok and Nakkiran 2023); bootstrap confidence intervals for any of them.

Every function takes ``scores`` and integer ``labels`` of one of these shapes:

* (N, C) with labels (N,) (or (N, 1));
* (N, C, d1, ..., dk) with labels (N, d1, ..., dk), as ``torch.nn.functional.cross_entropy``
  (segmentation maps, sequences): every element is a row;
* a binary problem as one score per element (scores of the labels' shape, or a class
  dimension of size 1; 2-D labels of the scores' shape (N, C), C > 1, are refused: one-hot
  labels are not accepted): the logit of class 1 (or, with probs=True, its probability p), read as
  the two classes [0, logit] ([1 - p, p]), so that it gives what two columns give; labels 0/1.

Values and options:

* by default ``scores`` are logits (float16/bfloat16/float32/float64, any device); an optional
  ``temperature`` T > 0 (a float or a one-element tensor, checked: finite and > 0) divides them
  first;
* with ``probs=True`` they are probabilities (checked: entries in [0, 1], rows summing to 1
  within 1e-3, 2e-2 for float16/bfloat16); ``temperature`` is then applied as
  softmax(log(p) / T);
* rows whose label is ``ignore_index`` (default -100, as in ``cross_entropy``; None: none) are
  left out; all ignored is an error for a function, nothing added for an ``update``.

Computation is in float64 on the scores' device, vectorised with bincount/scatter_add (no Python
loop over bins); each metric returns a Python float (one device synchronisation at the end).

Binning (as in Guo et al. 2017 and gpleiss/temperature_scaling): with ``n_bins`` equal-width bins
the k-th bin is (k/n, (k+1)/n]; a confidence of exactly 0 belongs to the first bin and exactly
1.0 to the last. netcal (``netcal.metrics.ECE``, numpy's histogram) uses [k/n, (k+1)/n) and
closes the last bin: the two differ only for a confidence exactly on an inner edge k/n.

Definitions (acc_b, conf_b: accuracy and mean confidence of the rows in bin b; n_b its size):

* ECE  = sum_b (n_b / N) |acc_b - conf_b|  (top label: confidence = max_k p_k)
* MCE  = max over non-empty bins of |acc_b - conf_b|
* RMSCE = sqrt(sum_b (n_b / N) (acc_b - conf_b)^2)
* adaptive ECE: as ECE, but the bins hold equal numbers of rows (sorted by confidence)
* classwise ECE (Kull et al. 2019): for each class k, ECE of p_k against 1[y = k] over all rows,
  averaged over classes
* Brier = mean_i sum_k (p_ik - 1[y_i = k])^2  (in [0, 2])
* NLL = mean_i -log p_i,y_i (from log_softmax when given logits)
* debiased calibration error: sqrt(sum_b (n_b / N) [(acc_b - conf_b)^2 - acc_b (1 - acc_b) /
  (n_b - 1)]), equal-mass bins, top-label or marginal (:func:`debiased_calibration_error`)
* KS error = max_i |sum_{j <= i} (conf_j - hit_j)| / N over the rows sorted by confidence
* MMCE = sqrt(sum_ij (hit_i - conf_i)(hit_j - conf_j) exp(-|conf_i - conf_j| / 0.4)) / N
* smooth ECE: the kernel-smoothed |conf - acc| integrated against the smoothed density of the
  confidences, at the fixed-point bandwidth (:func:`smooth_ece`)

Each equals its peer's own code on the files of tests/data/logits (tests/metrics/test_metrics_peers.py):
smooth ECE relplot's ``smECE``, the debiased error uncertainty-calibration's
``get_calibration_error(p=2, debias=True)``, MMCE and ECE / MCE netcal's ``MMCE`` / ``ECE`` /
``MCE``, the KS error Gupta et al.'s ``ks_error`` (written out in the test: not packaged).

Accumulating over batches and ranks (:class:`CalibrationMetrics` and one class per metric,
``update`` / ``compute`` / ``reset`` like torchmetrics): each ``update`` adds the batch's bin
statistics (per-bin counts, confidence sums and hit sums; per class and bin for classwise ECE;
sums of NLL, Brier and hits), and ``compute`` (with ``group=``, after one all-reduce of them over
the ranks) gives the same values as the functions above on the concatenation of every batch of
every rank (equal up to float64 summation order, ~1e-15 relative). Adaptive ECE needs the global
order of the confidences: each update keeps the batch's top-label confidences and hits (9 bytes
per row, never the scores), and ``compute`` all-gathers them (rank 0's rows first, then rank 1's,
...) and forms the bins exactly as :func:`adaptive_ece` does on the concatenated data (ties are
broken by that order). ``adaptive=False`` keeps nothing per row and leaves adaptive ECE out (NaN).
Memory O(bins x classes), whatever the rows: :class:`CalibrationMetrics` with adaptive=False,
:class:`ECE`, :class:`MCE`, :class:`RMSCE`, :class:`ClasswiseECE`, :class:`Brier`,
:class:`NLL`, :class:`DebiasedCalibrationError` with equal-width bins. Per row, because the
value depends on all rows at once: :class:`AdaptiveECE`, :class:`KSCalibrationError` (the
global order of the confidences), :class:`MMCE` (every pair of rows), :class:`SmoothECE` (a
bandwidth chosen from all rows, and a grid that depends on it), the debiased error with
equal-mass bins (the global order; all C probabilities per row for the "auto" choice).
"""

from __future__ import annotations

from ._inputs import _check_bins, _prepare, _top_label  # noqa: F401  (used by tests and plots)
from .binned import (AdaptiveECE, Brier, CalibrationMetrics, CalibrationReport, ClasswiseECE, ECE,
                     MCE, NLL, RMSCE, ReliabilityBins, _bin_index, accuracy, adaptive_ece,  # noqa: F401
                     brier_score, calibration_report, classwise_ece, ece,
                     expected_calibration_error, maximum_calibration_error, mce, nll,
                     reliability_bins, rms_calibration_error)
from .bootstrap import BootstrapResult, bootstrap
from .debiased import debiased_calibration_error
from .ks import ks_calibration_error
from .mmce import mmce
from .smooth import smooth_ece
from .streaming import MMCE, DebiasedCalibrationError, KSCalibrationError, SmoothECE

__all__ = [
    "AdaptiveECE",
    "BootstrapResult",
    "Brier",
    "CalibrationMetrics",
    "CalibrationReport",
    "ClasswiseECE",
    "DebiasedCalibrationError",
    "ECE",
    "KSCalibrationError",
    "MCE",
    "MMCE",
    "NLL",
    "RMSCE",
    "ReliabilityBins",
    "SmoothECE",
    "accuracy",
    "adaptive_ece",
    "bootstrap",
    "brier_score",
    "calibration_report",
    "classwise_ece",
    "debiased_calibration_error",
    "ece",
    "expected_calibration_error",
    "ks_calibration_error",
    "maximum_calibration_error",
    "mce",
    "mmce",
    "nll",
    "reliability_bins",
    "rms_calibration_error",
    "smooth_ece",
]
