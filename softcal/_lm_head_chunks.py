"""The LM head's chunk loop: linear + cross-entropy without the N x V logits.

The rows of the hidden states are taken in chunks sized to a workspace budget. For each chunk:

1. one GEMM writes the chunk's logits z = x_c W^T + b into the workspace (the input's dtype);
2. the loss terms of its rows are computed, and the workspace is overwritten by dL/dz of those rows
   (the in-place fused kernel ``cross_entropy_fused_``, z-loss, soft-cap and lse included, else
   :func:`_chunk_terms_torch`, exact PyTorch operations on the chunk: without the compiled
   kernels, and when a gradient reaches the returned lse);
3. GEMMs: dX rows = G W, dW += G^T x_c (float32 accumulator when the weight is bfloat16/float16),
   db += the column sums of G.

The maths (docs/lm_head.md): with s = z' / T, z' = c tanh(z / c) when softcap = c (else z),
lse = log sum_c exp(s_c), a row's loss is

    ce_i = (1 - eps) w_y (lse - s_y) + (eps / C) (W lse - sum_c w_c s_c)    (W = sum_c w_c)
    z_i  = z_loss lse^2,

both 0 for ignored rows; "mean" divides the sum of ce by sum_i w_y (non-ignored rows) and the sum
of z by the number of non-ignored rows. With a_i, b_i the derivatives of the reduced loss with
respect to ce_i and z_i, and l_i the upstream gradient of a returned lse_i,

    dL/ds_c = (a_i ((1 - eps) w_y + eps W / C) + 2 z_loss b_i lse_i + l_i) p_c
              - a_i (eps / C) w_c - a_i (1 - eps) w_y [c == y],
    dL/dz_c = dL/ds_c / T  (times 1 - tanh^2(z_c / c) with a softcap),
    dL/dT   = -(1 / T) sum_ic dL/ds_ic s_ic.

Nothing here is differentiable: softcal.lm_head wraps it in custom ops with an autograd formula.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _ops

__all__ = ["DEFAULT_WORKSPACE_BYTES", "Problem", "chunk_rows", "lm_head_loop", "target_range_check"]

# 128 MiB: the logits chunk of (8192, 256) x 32000 float32 is 1048 rows (0.125 x the logits).
DEFAULT_WORKSPACE_BYTES = 128 * 2**20


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Whether the kernels of a device type have the LLM terms (z_loss, softcap, the lse of every row):
# found once per device type by a call on a tiny input (the CUDA kernels raise
# NotImplementedError until they have them).
_LLM_TERMS = {}


def kernels_have_llm_terms(device: torch.device) -> bool:
    dev = device.type
    if dev not in _LLM_TERMS:
        x = torch.zeros((1, 2), device=device)
        t = torch.zeros((1,), dtype=torch.long, device=device)
        try:
            torch.ops.softcal.cross_entropy_fwd(x, t, None, None, 1.0, 0.0, -100, 0, 0.5, 1.0, True)
            _LLM_TERMS[dev] = True
        except NotImplementedError:
            _LLM_TERMS[dev] = False
    return _LLM_TERMS[dev]


def use_kernel(device: torch.device, softcap: float, z_loss: float, want_lse: bool,
               grad_lse: bool = False) -> bool:
    """Whether a chunk goes through the compiled in-place kernel: always where the device has
    the kernels (the LLM terms included where its kernels have them), except when a gradient
    reaches the returned lse (the kernels' lse is not differentiable: the exact PyTorch path)."""
    if grad_lse or not (_ops.has_kernel(device.type, "cross_entropy_fused_")
                        and _ops.has_kernel(device.type, "scale_rows_")):
        return False
    extras = softcap != 0.0 or z_loss != 0.0 or want_lse
    return not extras or kernels_have_llm_terms(device)


def bytes_per_logit(dtype: torch.dtype, kernel: bool) -> int:
    """Workspace bytes per element of a logits chunk (every chunk-sized buffer counted)."""
    item = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    n = item
    if not kernel:
        n += acc * 4  # za (or z itself), s, x then exp(x) then dL/ds, one product
    return n


def chunk_rows(rows: int, n_classes: int, bytes_per_element: int, workspace_bytes: int) -> int:
    """Rows per chunk: as many as the budget holds, at least 1, at most all."""
    per_row = max(1, n_classes * bytes_per_element)
    return max(1, min(max(rows, 1), workspace_bytes // per_row))


def target_range_check(fn: str, target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """ValueError naming the first target outside [0, C) that is not ignore_index (on the CPU;
    on CUDA the kernels assert on the device, as PyTorch's)."""
    if target.device.type != "cpu" or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{fn}: target[{i}] = {int(target[i])} is out of range for {n_classes} "
                         f"classes (ignore_index = {ignore_index})")


# Whether torch.addmm(..., out_dtype=torch.float32) runs on a device type (CUDA: cuBLAS writes
# the half-type GEMM's float32 result itself); found on the first call.
_OUT_DTYPE_GEMM = {}


def _accumulate_dw(gw: torch.Tensor, g: torch.Tensor, xc: torch.Tensor, alpha: float,
                   beta: float, block_bytes: int) -> None:
    """gw = beta gw + alpha g^T xc (beta 0: gw's old values, even NaN, are ignored).

    gw is float32 when g and xc are half types: the sum over the chunks is never rounded to
    them. Each chunk's product is either written in float32 by the GEMM (CUDA) or computed in
    the half type with float32 accumulation inside the GEMM, rounded once, and added to gw in
    float32, by blocks of rows of gw of at most block_bytes (the CPU: no float32 GEMM of half
    types there, and a float32 GEMM of upcast copies costs twice the time).
    """
    if g.dtype == gw.dtype:
        gw.addmm_(g.t(), xc, beta=beta, alpha=alpha)
        return
    dev = gw.device.type
    if _OUT_DTYPE_GEMM.get(dev, dev == "cuda"):
        try:
            torch.addmm(gw, g.t(), xc, out_dtype=gw.dtype, beta=beta, alpha=alpha, out=gw)
            _OUT_DTYPE_GEMM[dev] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE_GEMM[dev] = False
    n_classes, hidden = gw.shape
    step = max(1, min(n_classes, block_bytes // max(1, hidden * g.element_size())))
    for v0 in range(0, n_classes, step):
        v1 = min(n_classes, v0 + step)
        part = torch.mm(g[:, v0:v1].t(), xc)
        if beta == 0.0:
            gw[v0:v1].copy_(part).mul_(alpha)
        else:
            gw[v0:v1].add_(part, alpha=alpha)


class Problem:
    """The arguments of one call, checked and flattened: input (N, H), linear_weight (V, H)."""

    __slots__ = ("input", "linear_weight", "linear_bias", "target", "weight", "temperature_t",
                 "temperature", "eps", "ignore_index", "z_loss", "softcap", "workspace_bytes")

    def __init__(self, input, linear_weight, linear_bias, target, weight, temperature_t,
                 temperature, eps, ignore_index, z_loss, softcap, workspace_bytes):
        self.input, self.linear_weight, self.linear_bias = input, linear_weight, linear_bias
        self.target, self.weight = target, weight
        self.temperature_t, self.temperature = temperature_t, temperature
        self.eps, self.ignore_index = eps, ignore_index
        self.z_loss, self.softcap, self.workspace_bytes = z_loss, softcap, workspace_bytes


def _row_stats(p: Problem, acc: torch.dtype):
    """valid (N,) bool, w_y (N,) acc (0 for ignored rows), W = sum of the class weights."""
    t = p.target
    valid = t != p.ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    n_classes = p.linear_weight.shape[0]
    if p.weight is not None:
        w = p.weight.to(acc)
        wy = torch.where(valid, w[safe], torch.zeros((), dtype=acc, device=t.device))
        big_w = w.sum()
    else:
        wy = valid.to(acc)
        big_w = torch.tensor(float(n_classes), dtype=acc, device=t.device)
    return valid, safe, wy, big_w


def _temperature(p: Problem, acc: torch.dtype):
    """T as a float or a 0-dim acc tensor. The PyTorch path divides by T element by element, as
    the composition does: a product with a rounded 1/T would scale every s by the same
    (1 + delta), an error that does not average out of the temperature's gradient."""
    if p.temperature_t is not None:
        return p.temperature_t.detach().to(acc)
    return p.temperature


def _chunk_terms_torch(z: torch.Tensor, p: Problem, sl: slice, valid, safe, wy, big_w, temp,
                       a, b, l, want_grad: bool, need_t: bool):
    """Loss terms of a chunk's rows and, when want_grad, dL/dz written over z (exact PyTorch).

    z: (rows, V) logits in the input's dtype. a, b: (rows,) acc derivatives of the reduced loss
    with respect to ce_i and z_i (0 at ignored rows); l: (rows,) acc upstream gradient of lse_i or
    None. Returns (ce (rows,), zl (rows,), lse (rows,), dT (0-dim) or None), all acc.
    """
    acc = _acc(z.dtype)
    eps, n_classes, cap, zl = p.eps, z.shape[1], p.softcap, p.z_loss
    v, t, w_y = valid[sl], safe[sl], wy[sl]
    w = p.weight.to(acc) if p.weight is not None else None
    # za: the logits in acc (z itself when z is acc); zc = c tanh(za / c) or za; s = zc / T and
    # x = s - m (m the row max) in two more buffers. The loss is formed in x, free of the row's
    # offset (which would cancel in float32), the temperature's gradient from zc, as autograd
    # forms both from the composition.
    za = z.to(acc)
    if cap:
        th = za.div_(cap).tanh_()
        s = (th * cap).div_(temp)
    else:
        th = None
        s = za / temp
    m = s.amax(1, keepdim=True)
    x = torch.sub(s, m)
    m = m.squeeze(1)
    x_y = x.gather(1, t[:, None]).squeeze(1)
    sum_wx = None
    if eps > 0:
        sum_wx = torch.mv(x, w) if w is not None else x.sum(1)
    e = x.exp_()
    sum_e = e.sum(1, keepdim=True)
    log_se = sum_e.log().squeeze(1)  # lse - m
    lse = m + log_se
    zero = torch.zeros((), dtype=acc, device=z.device)
    ce = (1.0 - eps) * w_y * (log_se - x_y)
    if eps > 0:
        ce = ce + (eps / n_classes) * (big_w * log_se - sum_wx)
    ce = torch.where(v, ce, zero)
    zrow = torch.where(v, zl * lse * lse, zero) if zl else torch.zeros_like(lse)
    if not want_grad:
        return ce, zrow, lse, None
    coef_p = a * ((1.0 - eps) * w_y + (eps / n_classes) * big_w)
    if zl:
        coef_p = coef_p + 2.0 * zl * b * lse
    if l is not None:
        coef_p = coef_p + l
    g = e.div_(sum_e).mul_(coef_p[:, None])  # p_c times the row's coefficient
    if eps > 0:
        if w is not None:
            g.addr_(a * (eps / n_classes), w, alpha=-1.0)
        else:
            g.sub_((a * (eps / n_classes))[:, None])
    g.scatter_add_(1, t[:, None], (-(a * (1.0 - eps) * w_y))[:, None])
    dt = None
    if need_t:
        # dL/dT = -(1/T^2) sum_ic dL/ds_ic zc_ic, over the finished dL/ds
        zc = th if cap else za
        dt = -(g * zc).sum() * (cap if cap else 1.0)
        dt = dt / (temp * temp)
    g.div_(temp)
    if cap:
        g.mul_(th.square_().neg_().add_(1.0))
    z.copy_(g)
    return ce, zrow, lse, dt


def _lse_rows(lse2: torch.Tensor, p: Problem) -> torch.Tensor:
    """lse = m / T + ls from the kernels' per-row [m, ls]."""
    t = p.temperature_t.detach().to(lse2.dtype) if p.temperature_t is not None else p.temperature
    return lse2[:, 0] / t + lse2[:, 1]


def _chunk_terms_kernel(z: torch.Tensor, p: Problem, sl: slice, valid, a, a_scale, zl_grad: float,
                        want_grad: bool, need_t: bool, want_lse: bool):
    """As :func:`_chunk_terms_torch` through the compiled kernels. Forward only:
    cross_entropy_fwd, the z-loss formed from its lse; with the gradient: the in-place
    cross_entropy_fused_ with the z-loss coefficient zl_grad (z_loss times the ratio of the
    z-loss's unit to the cross-entropy's: the row's loss term is then ce_i + zl_grad lse_i^2, whose
    sum times a is the reduced loss), then the rows scaled by a_scale (a 0-dim unit, or a:
    (rows,); None: left to the GEMMs). Returns (ce, zrow, lse, dT), as _chunk_terms_torch."""
    acc = _acc(z.dtype)
    t = p.target[sl]
    ops = torch.ops.softcal
    cap = p.softcap
    if not want_grad:
        loss, lse2, _ = ops.cross_entropy_fwd(z, t, p.weight, p.temperature_t, p.temperature, p.eps,
                                              p.ignore_index, 0, 0.0, cap, want_lse or p.z_loss != 0)
        lse = _lse_rows(lse2, p) if want_lse or p.z_loss else None
        zrow = torch.where(valid[sl], p.z_loss * lse * lse, torch.zeros((), dtype=acc,
                                                                          device=z.device)) \
            if p.z_loss else None
        return loss.to(acc), zrow, lse, None
    lse2 = z.new_empty((z.shape[0], 2), dtype=acc) if want_lse else None
    # a float64 temperature tensor (the same value) makes the kernel return the rows' dL/dT in
    # float64 (grad_temperature has the temperature's dtype): no rounding before their sum
    temp_t = p.temperature_t.to(torch.float64) if need_t else p.temperature_t
    loss, grad_t = ops.cross_entropy_fused_(z, t, p.weight, temp_t, p.temperature,
                                            p.eps, p.ignore_index, 0, need_t, zl_grad, cap, lse2)
    if a_scale is not None:
        ops.scale_rows_(z, a_scale)
    # the rows' dL/dT summed in float64 (the kernels' precision policy for the T-gradient)
    dt = (grad_t.to(torch.float64) * a.to(torch.float64)).sum() if need_t else None
    return loss.to(acc), None, _lse_rows(lse2, p) if want_lse else None, dt


def lm_head_loop(p: Problem, *, want_grad: bool, a_unit, b_unit, grad_lse: Optional[torch.Tensor],
                 want_lse: bool, need_input_grad: bool, need_weight_grad: bool,
                 need_bias_grad: bool, need_temperature_grad: bool):
    """One pass over the rows in chunks.

    a_unit, b_unit: the derivatives of the reduced loss with respect to each row's ce_i and z_i:
    0-dim or (N,) acc tensors (ignored rows are masked here), or None when not want_grad.
    grad_lse: (N,) upstream gradient of the returned lse, or None.

    Returns (ce (N,), zrow (N,), lse (N,) or None, grad_input, grad_weight (acc for half
    weights: the caller rounds), grad_bias (acc), grad_t (acc 0-dim)); the gradients are None
    when not wanted.
    """
    x, wt, bias = p.input, p.linear_weight, p.linear_bias
    n_rows, _ = x.shape
    n_classes = wt.shape[0]
    dtype, device = x.dtype, x.device
    acc = _acc(dtype)
    need_t = want_grad and need_temperature_grad and p.temperature_t is not None
    # A tensor temperature's gradient with a soft-cap below float64 keeps the exact path: through
    # the kernel (x' scaled by a rounded 1/T, the same relative error for every element: it does
    # not average out of dL/dT) it measured up to 1.4 x eager's error (tests/lm_head/test_lm_head.py).
    exact_t = need_t and p.softcap != 0.0 and dtype != torch.float64
    kernel = use_kernel(device, p.softcap, p.z_loss, want_lse, grad_lse is not None or exact_t)
    need_w = want_grad and need_weight_grad
    per = bytes_per_logit(dtype, kernel)
    step = chunk_rows(n_rows, n_classes, per, p.workspace_bytes)
    valid, safe, wy, big_w = _row_stats(p, acc)
    temp = _temperature(p, acc)

    ce = torch.empty(n_rows, dtype=acc, device=device)
    zrow = torch.zeros(n_rows, dtype=acc, device=device)
    lse = torch.empty(n_rows, dtype=acc, device=device) if want_lse else None
    gx = gw = gb = gt = a_all = b_all = None
    if want_grad:
        zero = torch.zeros((), dtype=acc, device=device)
        a_all = torch.where(valid, a_unit.to(acc).expand(n_rows), zero)
        b_all = torch.where(valid, b_unit.to(acc).expand(n_rows), zero) if p.z_loss else None
        if need_input_grad:
            gx = torch.empty_like(x, memory_format=torch.contiguous_format)
        # dW and db: written by the first chunk (beta = 0), accumulated by the others
        if need_w:
            gw = torch.empty(wt.shape, dtype=acc if dtype in (torch.float16, torch.bfloat16)
                             else dtype, device=device)
            if n_rows == 0:
                gw.zero_()
        if need_bias_grad and bias is not None:
            gb = torch.zeros(n_classes, dtype=acc, device=device)
        if need_t:
            gt = torch.zeros((), dtype=torch.float64, device=device)  # (the caller rounds)
    ws = torch.empty((min(step, max(n_rows, 1)), n_classes), dtype=dtype, device=device)
    wt_t = wt.t()
    alpha = 1.0
    if kernel and want_grad and a_unit.dim() == 0 and device.type == "cpu":
        alpha = float(a_unit)
    # The kernel's z-loss coefficient when it writes the gradient: z_loss b / a ("mean" with
    # class weights: z_loss denom / count; else z_loss), see _chunk_terms_kernel.
    zl_grad = p.z_loss
    if kernel and want_grad and p.z_loss and a_unit.dim() == 0:
        ratio = float(b_unit) / float(a_unit) if float(a_unit) != 0 else 1.0
        zl_grad = p.z_loss * ratio
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        sl = slice(r0, r1)
        xc = x[sl]
        z = ws[: r1 - r0]
        if bias is not None:
            torch.addmm(bias, xc, wt_t, out=z)
        else:
            torch.mm(xc, wt_t, out=z)
        a = a_all[sl] if want_grad else None
        if kernel:
            # A uniform unit on the CPU goes into the GEMMs' alpha (no pass over the chunk);
            # per-row units (and CUDA, where reading the unit would synchronise) scale the rows.
            a_scale = None if alpha != 1.0 else (a_unit if a_unit.dim() == 0 else a)
            ce[sl], zrow_c, lse_c, dt = _chunk_terms_kernel(z, p, sl, valid, a, a_scale, zl_grad,
                                                            want_grad, need_t, want_lse)
            if zrow_c is not None:
                zrow[sl] = zrow_c
            if lse is not None:
                lse[sl] = lse_c
        else:
            ce[sl], zrow[sl], lse_c, dt = _chunk_terms_torch(
                z, p, sl, valid, safe, wy, big_w, temp, a,
                b_all[sl] if b_all is not None else None,
                grad_lse[sl].to(acc) if grad_lse is not None else None, want_grad, need_t)
            if lse is not None:
                lse[sl] = lse_c
        if not want_grad:
            continue
        if gx is not None:
            if alpha == 1.0:
                torch.mm(z, wt, out=gx[sl])
            else:
                torch.addmm(gx[sl], z, wt, beta=0.0, alpha=alpha, out=gx[sl])
        if gw is not None:
            _accumulate_dw(gw, z, xc, alpha, 0.0 if r0 == 0 else 1.0, p.workspace_bytes)
        if gb is not None:
            gb.add_(z.sum(0, dtype=acc), alpha=alpha)
        if gt is not None and dt is not None:
            gt.add_(dt)
    return ce, zrow, lse, gx, gw, gb, gt
