"""Shared by the LM-head tests: the issue's composition (the oracle) and the test problems."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def composition(x, W, t, *, b=None, w=None, reduction="mean", ignore_index=-100, eps=0.0,
                T=1.0, z_loss=0.0, softcap=None):
    """Issue 19's definition in PyTorch operations: (loss, lse per row).

    z = F.linear(x, W, b); z <- c tanh(z / c); s = z / T;
    loss = F.cross_entropy(s, ...) + z_loss lse(s)^2 per non-ignored row (summed, averaged over
    the non-ignored rows, or per row).
    """
    z = F.linear(x, W, b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    s = z / T
    n_classes = W.shape[0]
    s2, t2 = s.reshape(-1, n_classes), t.reshape(-1)
    loss = F.cross_entropy(s2, t2, weight=w, ignore_index=ignore_index, label_smoothing=eps,
                           reduction=reduction)
    lse = torch.logsumexp(s2, -1)
    valid = t2 != ignore_index
    if z_loss:
        zl = torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))
        if reduction == "mean":
            loss = loss + zl.sum() / valid.sum()
        elif reduction == "sum":
            loss = loss + zl.sum()
        else:
            loss = loss + zl
    if reduction == "none":
        loss = loss.reshape(t.shape)
    return loss, lse.reshape(t.shape)


# name -> options; "T": "tensor" makes a 0-dim temperature tensor that requires grad
OPTIONS = {
    "plain": {},
    "smooth_weight_bias": dict(eps=0.1, weighted=True, bias=True),
    "temperature_tensor": dict(eps=0.05, T="tensor", bias=True),
    "z_loss": dict(z_loss=1e-2, weighted=True, eps=0.1),
    "softcap": dict(softcap=2.5, T=1.3),
    "everything": dict(eps=0.2, weighted=True, bias=True, T="tensor", z_loss=3e-3, softcap=4.0),
}


def make_problem(batch_shape, H, V, dtype, *, opts, seed=0, ignore_first=0, ignore_every=5,
                 scale=2.0, ignore_index=-100):
    """Inputs of one test problem (float64 masters; cast by the caller).

    Returns a dict: x (*batch, H), W (V, H), b (V,) or None, w (V,) or None, t (*batch),
    T (float or 0-dim tensor), and the loss options eps, z_loss, softcap.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch_shape, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * (scale / H ** 0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.3 if opts.get("bias") else None
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.2 if opts.get("weighted") else None
    t = torch.randint(0, V, batch_shape, generator=g)
    flat = t.view(-1)
    if ignore_every:
        flat[::ignore_every] = ignore_index
    flat[:ignore_first] = ignore_index
    T = opts.get("T", 1.0)
    if T == "tensor":
        T = torch.tensor(1.4, dtype=torch.float64)
    return dict(x=x, W=W, b=b, w=w, t=t, T=T, eps=opts.get("eps", 0.0),
                z_loss=opts.get("z_loss", 0.0), softcap=opts.get("softcap"))


def leaves(prob, dtype):
    """Fresh leaf tensors of the problem in dtype (the temperature tensor in float64 for
    float64, float32 otherwise), all requiring grad; returns (inputs dict, list of leaves)."""
    x = prob["x"].to(dtype).requires_grad_()
    W = prob["W"].to(dtype).requires_grad_()
    b = prob["b"].to(dtype).requires_grad_() if prob["b"] is not None else None
    w = prob["w"].to(dtype) if prob["w"] is not None else None
    T = prob["T"]
    if isinstance(T, torch.Tensor):
        T = T.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    out = dict(x=x, W=W, b=b, w=w, T=T)
    grads = [v for v in (x, W, b, T) if isinstance(v, torch.Tensor) and v.requires_grad]
    return out, grads
