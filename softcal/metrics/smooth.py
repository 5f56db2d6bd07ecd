"""Smooth ECE (Blasiok and Nakkiran 2023, "Smooth ECE: principled reliability diagrams via kernel
smoothing"), computed as relplot's ``smECE`` computes it, in float64 torch."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._inputs import Temperature, _prepare, _top_label

__all__ = ["smooth_ece"]

# relplot's constants (relplot.config.smECE_mesh_pts, kernels.BaseKernelMixin.smooth's eps,
# metrics.smECE's eps and its bisection depth).
_MESH = 200
_DENSITY_EPS = 1e-4
_SIGMA_EPS = 1e-3
_REFINE = 10


def _grid_points(sigma: float) -> int:
    """Points of the grid that the rows are deposited on (relplot's GaussianKernel.apply)."""
    return max(2000, round(20 / sigma)) // 2 + 1


def _deposit(f: torch.Tensor, w: torch.Tensor, m: int) -> torch.Tensor:
    """Each weight w_i split linearly between the two grid points (of m on [0, 1]) around f_i."""
    pos = f * (m - 1)
    lo = pos.to(torch.int64).clamp_(0, m - 2)   # truncation, as numpy's astype(int)
    frac = pos - lo
    out = torch.zeros(m, dtype=torch.float64, device=f.device)
    out.index_add_(0, lo, (1 - frac) * w)
    out.index_add_(0, lo + 1, frac * w)
    return out


def _reflected_gaussian(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """Convolution of the grid values with a Gaussian of width sigma, reflected at 0 and 1
    (relplot's ReflectedGaussianKernel.convolve): the grid is [0, 1] with m points, the kernel
    sampled on the same spacing and normalised as a density. By FFT (numpy's is direct: the
    two differ by float64 rounding, ~1e-14 relative)."""
    m = values.shape[0]
    t = torch.linspace(0, 1, m, dtype=torch.float64, device=values.device)
    ker = torch.exp(-(t - 0.5) * (t - 0.5) / (2 * sigma * sigma)) / (math.sqrt(2 * math.pi) * sigma)
    ext = torch.cat([values.flip(0)[:-1], values, values.flip(0)[1:]])      # 3m - 2
    size = ext.shape[0] + m - 1
    full = torch.fft.irfft(torch.fft.rfft(ext, size) * torch.fft.rfft(ker, size), size)
    # numpy's convolve(ext, ker, "valid") starts at index m - 1 of the full convolution;
    # relplot keeps [m // 2, m // 2 + m) of it
    start = m - 1 + m // 2
    return full[start:start + m]


def _interpolate(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of grid values y (on [0, 1]) at t (relplot.kernels.interpolate)."""
    m = y.shape[0]
    step = 1 / (m - 1)
    idx = (t * (m - 1)).to(torch.int64).clamp_(0, m - 2)
    frac = (t - idx.to(torch.float64) * step) / step   # an int64 tensor * float is float32
    return y[idx] * (1 - frac) + y[idx + 1] * frac


def _smooth_ece_at(f: torch.Tensor, r: torch.Tensor, sigma: float) -> torch.Tensor:
    """Smooth ECE of confidences f with residuals r = f - y at bandwidth sigma (0-dim tensor)."""
    m = _grid_points(sigma)
    t = torch.linspace(0, 1, max(round(10 / sigma), _MESH), dtype=torch.float64, device=f.device)
    both = torch.stack([_deposit(f, r, m), _deposit(f, torch.ones_like(r), m)])
    smoothed = torch.stack([_reflected_gaussian(v, sigma) for v in both])
    num, dens = _interpolate(t, smoothed[0]), _interpolate(t, smoothed[1]) + _DENSITY_EPS
    return ((num / dens).abs() * dens).sum() / dens.sum()


def _bandwidth(f: torch.Tensor, r: torch.Tensor) -> float:
    """relplot's search for the bandwidth: the fixed point sigma = smECE_sigma, by bisection
    on [0, 1] (10 halvings), keeping the side where sigma > smECE_sigma (or sigma < 1e-3)."""
    def ok(sigma: float) -> bool:
        return sigma < _SIGMA_EPS or sigma < float(_smooth_ece_at(f, r, sigma))

    if ok(1.0):
        return 1.0
    start, end = 1.0, 0.0
    for _ in range(_REFINE):
        mid = (start + end) / 2
        if ok(mid):
            end = mid
        else:
            start = mid
    return start


def smooth_ece(scores, labels, *, sigma: Optional[float] = None, temperature: Temperature = None,
               probs: bool = False, ignore_index: Optional[int] = -100) -> float:
    """Smooth ECE of the top-label confidence (Blasiok and Nakkiran 2023), in [0, 1].

    The kernel-smoothed residual confidence - accuracy, with a Gaussian kernel reflected at 0
    and 1, integrated against the smoothed density of the confidences. With ``sigma=None`` the
    bandwidth is the paper's fixed point sigma* = smECE_sigma*, found by relplot's bisection.
    Equal to ``relplot.smECE(confidence, correct)`` (relplot 1.0.3; ``relplot.smECE_sigma``
    for a given sigma) up to float64 rounding: the same discretisation (rows deposited
    linearly on a grid of max(2000, 20/sigma) // 2 + 1 points, evaluated on max(200, 10/sigma)
    points, density + 1e-4), the convolution by FFT (numpy's is direct).

    scores: (N, C), (N, C, d1, ...) or binary (see :mod:`softcal.metrics`), any float dtype;
    labels: integer; sigma: a bandwidth in (0, 1] or None. Returns a Python float.
    """
    fn = "softcal.metrics.smooth_ece"
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float))
                              or not 0 < sigma <= 1):
        raise ValueError(f"{fn}: sigma must be a number in (0, 1] or None, got {sigma!r}")
    p, _, y = _prepare(fn, scores, labels, temperature, probs, ignore_index)
    conf, hit = _top_label(p, y)
    r = conf - hit
    s = _bandwidth(conf, r) if sigma is None else float(sigma)
    return float(_smooth_ece_at(conf, r, s))
