"""Isotonic regression by pool adjacent violators: the compiled op ``softcal::isotonic_fit``
(csrc/cpu/isotonic.cpp; contract in csrc/schemas.h) with its fake kernel, and the pure-Python
fallback used when the extension is not built (the same blocks, much slower: a Python loop).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _ops

__all__ = ["HAVE_KERNEL", "isotonic_knots", "pav_python"]

#: whether the compiled CPU kernel of ``softcal::isotonic_fit`` is registered
HAVE_KERNEL = _ops.HAVE_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(
    "softcal::isotonic_fit", "CPU")

if HAVE_KERNEL:
    @torch.library.register_fake("softcal::isotonic_fit")
    def _isotonic_fit_fake(x, y, w):
        k, n = x.shape
        return (x.new_empty((k, n)), x.new_empty((k, n)), x.new_empty((k,), dtype=torch.int64),
                x.new_empty((k, n)))


def pav_python(x: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One problem, in Python: knots (x, v) of the isotonic (non-decreasing) least-squares fit
    of y on x (float64 1-D CPU tensors; ties in x pooled first, adjacent blocks with equal
    means merged). Each block gives (smallest x, mean) and, when it spans more than one x,
    (largest x, mean): interpolating linearly between the knots gives every point its block's
    value (scikit-learn's convention)."""
    order = torch.argsort(x, stable=True)
    xs, ys = x[order], y[order]
    ws = torch.ones_like(xs) if w is None else w[order]
    ux, inv = torch.unique_consecutive(xs, return_inverse=True)
    m = ux.shape[0]
    sw = torch.zeros(m, dtype=torch.float64).index_add_(0, inv, ws)
    sy = torch.zeros(m, dtype=torch.float64).index_add_(0, inv, ws * ys)
    W, Y, X = sw.tolist(), sy.tolist(), ux.tolist()
    bw: list = []
    by: list = []
    blo: list = []
    bhi: list = []
    for i in range(m):
        cw, cy, lo, hi = W[i], Y[i], X[i], X[i]
        while bw and by[-1] / bw[-1] >= cy / cw:
            cw += bw.pop()
            cy += by.pop()
            lo = blo.pop()
            bhi.pop()
        bw.append(cw)
        by.append(cy)
        blo.append(lo)
        bhi.append(hi)
    kx: list = []
    kv: list = []
    for cw, cy, lo, hi in zip(bw, by, blo, bhi):
        v = cy / cw
        kx.append(lo)
        kv.append(v)
        if hi > lo:
            kx.append(hi)
            kv.append(v)
    return torch.tensor(kx, dtype=torch.float64), torch.tensor(kv, dtype=torch.float64)


def isotonic_knots(x: torch.Tensor, y: torch.Tensor, w: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """K problems at once: x, y (and w) float64 (K, n) CPU -> (knots_x (K, M), knots_v (K, M),
    counts (K,) int64, fitted (K, n)), M = the largest count, each row padded with its last
    knot, fitted the fit's value at every point (the contract of ``softcal::isotonic_fit``,
    knots trimmed to M columns). The compiled kernel when it is built, else
    :func:`pav_python` problem by problem."""
    if HAVE_KERNEL:
        kx, kv, kn, fitted = torch.ops.softcal.isotonic_fit(x, y, w)
        m = max(int(kn.max()), 1) if kn.numel() else 1
        return kx[:, :m].contiguous(), kv[:, :m].contiguous(), kn, fitted
    knots = [pav_python(x[k], y[k], None if w is None else w[k]) for k in range(x.shape[0])]
    m = max([a.numel() for a, _ in knots] + [1])
    kx = torch.stack([torch.cat([a, a[-1:].expand(m - a.numel())]) for a, _ in knots])
    kv = torch.stack([torch.cat([b, b[-1:].expand(m - b.numel())]) for _, b in knots])
    fitted = torch.empty_like(x)
    for k, (a, b) in enumerate(knots):  # a point lies on its block's first knot or after it
        if a.numel():
            fitted[k] = b[(torch.searchsorted(a, x[k], right=True) - 1).clamp_min(0)]
    return kx, kv, torch.tensor([a.numel() for a, _ in knots], dtype=torch.int64), fitted
