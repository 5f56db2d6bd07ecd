"""The sample phase of the temperature fit (:mod:`softcal._temperature_fit`): Newton on the row
sample, and the regression (control-variate) estimators that turn the sample's statistics into
estimates for all the rows.

Why a regression. The sample's optimum differs from the data's by the sampling error of the
sample's mean f' (about 2e-3 relatively on 3,125 rows of 50,000 x 1,000; up to 1e-2), and the
sample's f''' by a few percent. Both are means over rows of quantities that are correlated with
per-row quantities whose means over *all* rows a full pass has already given exactly: the NLL,
f' and f'' of every row at the starting beta (pass 1), and at the point of pass 2. With per-row
values on the sub-sample (1/8 of the sample, computed here in float64 with PyTorch) a linear
regression of the target (f' near the optimum; f''') on those features gives the coefficients
``a`` of the regression estimator

    mean over all rows of y  ~  mean over the sample of y + a . (mean over all rows of X
                                                                 - mean over the sample of X),

whose error is the residual's: sd(residual) / sqrt(sample rows) (Cochran, Sampling Techniques,
ch. 7). On the benchmark's problem this moves the start of the first full Newton step from about
2e-3 to about 4e-4 of the optimum, and that step's Halley correction (f''' s^2 / 2) is then known
well enough to stop after the second full pass. In a distributed fit the regression's moment
matrix is all-reduced (every rank solves the same small system).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import torch

#: Fewest sub-sample rows (over every rank) for a regression estimate.
MIN_REGRESSION_ROWS = 64


def row_stats(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row statistics at beta: (m, 5) float64 [NLL_i, f'_i = E_p[x] - x_y, f''_i = Var_p[x],
    f'''_i and f''''_i: the third and fourth cumulants of x under p], p = softmax(beta x),
    computed in float32 for float16/bfloat16/float32 logits (they feed regression coefficients
    and standard errors, not the fitted value), float64 for float64.
    logits: (m, C) any float dtype; labels: (m,) int. Masked logits (-inf) have p = 0."""
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    zy = z.gather(1, labels.reshape(-1, 1).long()).reshape(-1).double()
    p = z * beta
    lse = torch.logsumexp(p, 1, keepdim=True)
    p.sub_(lse).exp_()
    m1 = torch.linalg.vecdot(p, z)
    if not bool(torch.isfinite(m1).all()):     # -inf logits (p = 0): 0 * -inf
        z = torch.where(p > 0, z, torch.zeros_like(z))
        m1 = torch.linalg.vecdot(p, z)
    d = z - m1[:, None]
    if z is not logits and logits.dtype in (torch.float32, torch.float64):
        d.masked_fill_(p == 0, 0.0)
    p.mul_(d).mul_(d)                          # p d^2
    k2 = p.sum(1, dtype=torch.float64)
    p.mul_(d)                                  # p d^3
    k3 = p.sum(1, dtype=torch.float64)
    k4 = torch.linalg.vecdot(p, d).double() - 3.0 * k2 * k2
    return torch.stack([lse.reshape(-1).double() - beta * zy, m1.double() - zy, k2, k3, k4], 1)


class Regression:
    """Coefficients of a regression of y on the columns of X (with an intercept) over rows that
    may be split across ranks: ``reduce`` sums a float64 vector over the ranks (the identity in
    a single process)."""

    def __init__(self, y: torch.Tensor, x: torch.Tensor, reduce: Callable[[torch.Tensor],
                 torch.Tensor]) -> None:
        k = x.shape[1]
        a = torch.cat([torch.ones(x.shape[0], 1, dtype=torch.float64), x.double().cpu(),
                       y.double().cpu().reshape(-1, 1)], 1)
        moments = reduce((a.T @ a).reshape(-1)).reshape(k + 2, k + 2)
        self.rows = int(moments[0, 0])
        self.coef = torch.zeros(k, dtype=torch.float64)
        self.resid_var = math.inf
        if self.rows < MIN_REGRESSION_ROWS:
            return
        mean = moments[0] / self.rows
        cov = moments[1:, 1:] / self.rows - torch.outer(mean[1:], mean[1:])
        cxx, cxy, cyy = cov[:k, :k], cov[:k, k], float(cov[k, k])
        scale = cxx.diagonal().clamp_min(0).sqrt()
        keep = scale > 1e-12 * max(float(scale.max()), 1e-300)
        if not bool(keep.any()):
            self.resid_var = max(cyy, 0.0)
            return
        s = scale[keep]
        c = cxx[keep][:, keep] / torch.outer(s, s)
        coef_s = torch.linalg.pinv(c, rtol=1e-10, hermitian=True) @ (cxy[keep] / s)
        self.coef[keep] = coef_s / s
        self.resid_var = max(cyy - float(self.coef @ cxy), 0.0) * self.rows / max(
            self.rows - k - 1, 1)

    def correction(self, full_mean: torch.Tensor, sample_mean: torch.Tensor) -> float:
        """a . (mean over all rows of X - mean over the sample of X): what to add to the
        sample's mean of y."""
        return float(self.coef @ (full_mean - sample_mean))

    def std_error(self, sample_rows: int, total_rows: int) -> float:
        """Standard error of the estimated mean of y over all rows (per row)."""
        if not math.isfinite(self.resid_var) or sample_rows <= 0:
            return math.inf
        fpc = max(0.0, 1.0 / sample_rows - 1.0 / max(total_rows, 1))
        return math.sqrt(self.resid_var * fpc)


def halley(g: float, h: float, t: float) -> Optional[float]:
    """The root nearest 0 of g + h s + t s^2 / 2 (None when it has none)."""
    disc = h * h - 2.0 * t * g
    if not (h > 0 and disc >= 0):
        return None
    return -2.0 * g / (h + math.sqrt(disc))


def sample_optimum(stats: Any, beta: float, g: float, h: float, b_min: float, b_max: float
                   ) -> Tuple[float, float, float, float]:
    """From the full data's Newton step at beta (g, h per row): Newton (Halley once f''' is known
    from two iterates) on the sub-sample while the steps are longer than 3 % (when it has at
    least 64 rows), then on the sample until the step is below 1e-2 beta. Returns (b, g_s, h_s,
    t_s): the last point evaluated on the sample, the sample's f', f'' there and its f''' (all
    per row; f''' from the last finite difference when its spacing was within [1e-4, 0.05] b,
    else from one more sample pass at b (1 + 2e-3)). The sample's optimum is then about
    b + halley(g_s, h_s, t_s)."""
    lo, hi = b_min, b_max
    step = -g / h if h > 0 else math.copysign(math.inf, -g)
    cand = beta + step
    if not lo < cand < hi:
        cand = min(beta * 4.0, b_max) if g < 0 else max(beta / 4.0, b_min)
    sub = stats.sub_rows >= 64
    prev: Optional[Tuple[float, float]] = None      # (beta, f'' per row) of the last pass
    t_row: Optional[float] = None
    t_spacing = math.inf
    b = gs = hs = 0.0
    for _ in range(60):
        b = cand
        _, gs, hs, m = stats.sample(b, sub)
        if m == 0:
            return b, 0.0, 0.0, 0.0
        gs, hs = gs / m, hs / m
        if gs == 0.0 and not sub:
            break
        if gs < 0:
            lo = b
        elif gs > 0:
            hi = b
        if prev is not None and 0 < abs(b - prev[0]) <= 0.5 * b:
            t_row, t_spacing = (hs - prev[1]) / (b - prev[0]), abs(b - prev[0]) / b
        prev = (b, hs)
        step = -gs / hs if hs > 0 else math.copysign(math.inf, -gs)
        s_h = halley(gs, hs, t_row) if t_row is not None else None
        if s_h is not None and lo < b + s_h < hi:
            step = s_h
        cand = b + step
        if not lo < cand < hi:
            cand = math.sqrt(lo * hi) if lo > b_min and hi < b_max else (
                min(b * 4.0, b_max) if gs < 0 else max(b / 4.0, b_min))
            if cand == b:
                break
        elif sub and abs(step) <= 0.03 * b:
            sub, prev, t_row, lo, hi = False, None, None, b_min, b_max  # on to the sample
        elif not sub and abs(step) <= 1e-2 * b:
            break
    if t_row is None or not 1e-4 <= t_spacing <= 0.05:
        b2 = b * (1.0 + 2e-3)
        _, _, h2, m = stats.sample(b2)
        t_row = (h2 / m - hs) / (b2 - b)
    return b, gs, hs, t_row


def corrected_optimum(stats: Any, beta0: float, full0: torch.Tensor, b: float, gs: float,
                      hs: float, ts: float, b_min: float, b_max: float) -> float:
    """The data's optimum as the sample predicts it, corrected by the regression of f'(b) on
    [NLL, f', f''](beta0) (see the module docstring): the Halley step from the sample's last
    point b (gs, hs, ts per row there) with the corrected gradient. ``full0``: the per-row
    means over all rows of [NLL, f', f''] at beta0 (pass 1). Costs a sample pass at beta0 and
    per-row statistics of the sub-sample at beta0 and b."""
    x_sub = stats.sub_row_stats(beta0)[:, :3]
    y_sub = stats.sub_row_stats(b)[:, 1]
    reg = Regression(y_sub, x_sub, stats.reduce)
    corr = 0.0
    if reg.rows >= MIN_REGRESSION_ROWS:
        f0, g0, h0, m = stats.sample(beta0)
        if m:
            corr = reg.correction(full0, torch.tensor([f0, g0, h0], dtype=torch.float64) / m)
    g = gs + corr
    s = halley(g, hs, ts)
    if s is None:
        s = -g / hs if hs > 0 else 0.0
    return min(max(b + s, b_min), b_max)


def third_derivative(stats: Any, beta0: float, full0: torch.Tensor, b_rows: float, b: float,
                     full_b: torch.Tensor) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """((f''', its standard error), (f'''', its standard error)), per row over all rows at b.
    f'''': the regression rows' mean, f''': the sample's (a difference of f'' over sample
    passes at b and b (1 + 1e-3), moved to b with f''''), each corrected by the regression on
    [NLL, f', f''] at b and at beta0 (``full_b``, ``full0``: their exact means over all rows,
    from the full passes there). The coefficients come from the per-row statistics at b_rows
    (the last sample point, within about 1e-2 of b: the coefficients vary slowly)."""
    eps = 1e-3
    at_b = stats.sample(b)
    up = stats.sample(b * (1.0 + eps))
    m = at_b[3]
    if m == 0:
        return (0.0, math.inf), (0.0, math.inf)
    rows_b = stats.sub_row_stats(b_rows)
    x_rows = torch.cat([rows_b[:, :3], stats.sub_row_stats(beta0)[:, :3]], 1)
    f0, g0, h0, m0 = stats.sample(beta0)   # cached: corrected_optimum took it
    full = torch.cat([full_b, full0])
    sample_x = torch.tensor([at_b[0] / m, at_b[1] / m, at_b[2] / m, f0 / m0, g0 / m0, h0 / m0],
                            dtype=torch.float64)
    reg_t = Regression(rows_b[:, 3], x_rows, stats.reduce)
    reg_q = Regression(rows_b[:, 4], x_rows, stats.reduce)
    if reg_t.rows < MIN_REGRESSION_ROWS:
        return (0.0, math.inf), (0.0, math.inf)
    # f'''' over all rows: the regression rows' mean, corrected (their features at b_rows)
    mean_rows = stats.reduce(torch.cat([x_rows.sum(0), rows_b[:, 4].sum().reshape(1)])) / reg_q.rows
    q = float(mean_rows[-1]) + reg_q.correction(full, mean_rows[:-1])
    t_sample = (up[2] - at_b[2]) / (eps * b) / m - q * eps * b / 2.0
    t = t_sample + reg_t.correction(full, sample_x)
    return ((t, reg_t.std_error(int(m), stats.total_rows)),
            (q, reg_q.std_error(reg_q.rows, stats.total_rows)))
