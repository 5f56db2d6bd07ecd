"""Calibrators beyond temperature scaling, each with TemperatureScaler's interface (re-exported
in :mod:`softcal.calibration` and :mod:`softcal.nn`).

* :class:`VectorScaler`, :class:`MatrixScaler`, :class:`DirichletCalibrator`: linear maps of the
  logits (log-probabilities for Dirichlet) fitted exactly by Newton's method in float64, ODIR
  regularisation chosen by k-fold cross-validation (:mod:`._linear`, :mod:`._newton`);
* :class:`EnsembleTemperatureScaler` (:mod:`._ets`);
* :class:`HistogramBinning`, :class:`IsotonicCalibrator`, :class:`ScalingBinningCalibrator`
  (:mod:`._binning`).

:data:`CALIBRATORS` maps the command line's method names to the classes.
"""

from ._base import Calibrator, CalibratorFitResult
from ._binning import HistogramBinning, IsotonicCalibrator, ScalingBinningCalibrator
from ._ets import EnsembleTemperatureScaler
from ._linear import DirichletCalibrator, MatrixScaler, VectorScaler

__all__ = ["CALIBRATORS", "Calibrator", "CalibratorFitResult", "DirichletCalibrator",
           "EnsembleTemperatureScaler", "HistogramBinning", "IsotonicCalibrator", "MatrixScaler",
           "ScalingBinningCalibrator", "VectorScaler"]

#: method name (``softcal calibrate --method``) -> class
CALIBRATORS = {
    "vector": VectorScaler,
    "matrix": MatrixScaler,
    "dirichlet": DirichletCalibrator,
    "ets": EnsembleTemperatureScaler,
    "histogram": HistogramBinning,
    "isotonic": IsotonicCalibrator,
    "scaling-binning": ScalingBinningCalibrator,
}
