"""Kull et al. 2019 ("Beyond temperature scaling", NeurIPS), "Final Results", DenseNet-40 /
CIFAR-10: test log-loss of temperature scaling .225, Dirichlet-ODIR .224, matrix scaling-ODIR
.222. softcal's calibrators with their DEFAULT options (ODIR lambda, mu chosen by 5-fold
cross-validation on the calibration rows), fitted on the file's 5000 validation rows and
scored on its 10000 test rows (the split the logits come with, tests/data/logits/README.md),
are each within 0.003 of the published figure."""

from __future__ import annotations

import pytest
import torch

import softcal
from softcal import _io
from softcal.calibrators import DirichletCalibrator, MatrixScaler

PUBLISHED = {"ts": 0.225, "dirichlet": 0.224, "matrix": 0.222}


@pytest.mark.parametrize("method", ["ts", "dirichlet", "matrix"])
def test_kull_et_al_log_loss_densenet40_cifar10(method):
    d = _io.load_embedded()
    (xv, yv), (xt, yt) = d["val"], d["test"]
    xv, yv = torch.from_numpy(xv), torch.from_numpy(yv).reshape(-1)
    xt, yt = torch.from_numpy(xt), torch.from_numpy(yt).reshape(-1)
    assert xv.shape == (5000, 10) and xt.shape == (10000, 10)
    cal = {"ts": softcal.nn.TemperatureScaler, "dirichlet": DirichletCalibrator,
           "matrix": MatrixScaler}[method]()
    res = cal.fit(xv, yv, progress=False)
    with torch.no_grad():
        loss = softcal.metrics.nll(cal(xt.double()), yt)
    assert abs(loss - PUBLISHED[method]) <= 0.003, (method, loss)
    if method != "ts":  # the default hyper-parameters came from the CV on the validation rows
        assert res.cv is not None and res.cv["folds"] == 5
        assert res.hyperparameters == res.cv["chosen"]
