"""The compiled ops: loading, fake kernels, autograd registration and thin wrappers.

Data flows one way: softcal.nn -> softcal.functional -> this module -> torch.ops.softcal.* ->
the C++ (csrc/cpu) or CUDA (csrc/cuda) kernel. The schemas are defined once, in csrc/softcal.cpp.
"""

from __future__ import annotations

import warnings
from typing import List, Optional

import torch

__all__ = ["HAVE_EXTENSION", "IMPORT_ERROR", "OPS", "has_kernel", "kernel_devices"]

OPS = (
    "cross_entropy_fwd",
    "cross_entropy_bwd",
    "cross_entropy_fused",
    "cross_entropy_fused_",
    "scale_rows_",
    "softmax_fwd",
    "softmax_bwd",
    "temperature_stats",
    "shard_stats",
    "shard_grad",
    "shard_grad_",
    "soft_target_fwd",
    "soft_target_bwd",
)

try:
    from . import _C  # noqa: F401  (importing it registers torch.ops.softcal.*)

    HAVE_EXTENSION = True
    IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # the pure-PyTorch reference takes over
    HAVE_EXTENSION = False
    IMPORT_ERROR = exc
    warnings.warn(
        f"softcal: the compiled extension could not be loaded ({exc}); using the pure-PyTorch "
        "reference implementation (slower). Build it with: pip install --no-build-isolation -e .",
        RuntimeWarning,
        stacklevel=2,
    )

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _registered(device_type: str, op: str) -> bool:
    if not HAVE_EXTENSION or device_type not in _DISPATCH_KEYS:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"softcal::{op}", _DISPATCH_KEYS[device_type])


# Registrations are static once the extension is imported: look them up once (this also keeps
# the lookup out of torch.compile's traced code).
_KERNELS = {(d, op): _registered(d, op) for d in _DISPATCH_KEYS for op in OPS}


def has_kernel(device_type: str, op: str = "cross_entropy_fwd") -> bool:
    """True when the compiled extension registered a kernel of `op` for this device type."""
    return _KERNELS.get((device_type, op), False)


def kernel_devices() -> List[str]:
    """Device types for which every softcal op has a compiled kernel."""
    return [d for d in _DISPATCH_KEYS if all(has_kernel(d, op) for op in OPS)]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if HAVE_EXTENSION:
    ops = torch.ops.softcal

    # ------------------------------------------------------------------ fake kernels
    @torch.library.register_fake("softcal::cross_entropy_fwd")
    def _tsce_fwd_fake(logits, target, weight, temperature_t, temperature, label_smoothing,
                       ignore_index, reduction, z_loss=0.0, softcap=0.0, lse_all_rows=False):
        rows = logits.shape[0]
        loss = logits.new_empty((rows,) if reduction == 0 else (), dtype=_acc(logits.dtype))
        lse = logits.new_empty((rows, 2), dtype=_acc(logits.dtype))  # [row max, log sum exp]
        denom = logits.new_empty((), dtype=_acc(logits.dtype))
        return loss, lse, denom

    def _grad_t_dtype(temperature_t, logits):
        return temperature_t.dtype if temperature_t is not None else _acc(logits.dtype)

    @torch.library.register_fake("softcal::cross_entropy_bwd")
    def _tsce_bwd_fake(grad_loss, logits, target, weight, lse, denom, temperature_t, temperature,
                       label_smoothing, ignore_index, reduction, need_logits_grad,
                       need_temperature_grad, z_loss=0.0, softcap=0.0):
        if need_logits_grad:
            grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        else:
            grad = logits.new_empty((0,))
        return grad, logits.new_empty((), dtype=_grad_t_dtype(temperature_t, logits))

    def _fused_grad_t_fake(logits, temperature_t, reduction):
        shape = (logits.shape[0],) if reduction == 0 else ()
        return logits.new_empty(shape, dtype=_grad_t_dtype(temperature_t, logits))

    @torch.library.register_fake("softcal::cross_entropy_fused")
    def _tsce_fused_fake(logits, target, weight, temperature_t, temperature, label_smoothing,
                         ignore_index, reduction, need_temperature_grad, z_loss=0.0, softcap=0.0):
        loss = logits.new_empty((logits.shape[0],) if reduction == 0 else (), dtype=_acc(logits.dtype))
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        return loss, grad, _fused_grad_t_fake(logits, temperature_t, reduction)

    @torch.library.register_fake("softcal::cross_entropy_fused_")
    def _tsce_fused_inplace_fake(logits, target, weight, temperature_t, temperature,
                                 label_smoothing, ignore_index, reduction, need_temperature_grad,
                                 z_loss=0.0, softcap=0.0, lse_out=None):
        loss = logits.new_empty((logits.shape[0],) if reduction == 0 else (), dtype=_acc(logits.dtype))
        return loss, _fused_grad_t_fake(logits, temperature_t, reduction)

    @torch.library.register_fake("softcal::scale_rows_")
    def _scale_rows_fake(grad, scale):
        return None

    @torch.library.register_fake("softcal::softmax_fwd")
    def _softmax_fwd_fake(x, temperature_t, temperature, dim, log):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("softcal::softmax_bwd")
    def _softmax_bwd_fake(grad_out, out, temperature_t, temperature, dim, log,
                          need_temperature_grad):
        grad = torch.empty_like(out, memory_format=torch.contiguous_format)
        return grad, out.new_empty((), dtype=_grad_t_dtype(temperature_t, out))

    @torch.library.register_fake("softcal::temperature_stats")
    def _temperature_stats_fake(logits, target, beta):
        return logits.new_empty((4,), dtype=torch.float64)

    @torch.library.register_fake("softcal::shard_stats")
    def _tsce_shard_stats_fake(logits, target, weight, temperature_t, temperature, class_offset,
                               ignore_index, smoothing):
        return logits.new_empty((logits.shape[0], 4), dtype=_acc(logits.dtype))

    @torch.library.register_fake("softcal::shard_grad")
    def _tsce_shard_grad_fake(logits, target, weight, lse, coef, temperature_t, temperature,
                              smooth_coef, class_offset, ignore_index, need_logits_grad,
                              need_temperature_grad):
        if need_logits_grad:
            grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        else:
            grad = logits.new_empty((0,))
        return grad, logits.new_empty((logits.shape[0], 2), dtype=_acc(logits.dtype))

    @torch.library.register_fake("softcal::shard_grad_")
    def _tsce_shard_grad_inplace_fake(logits, target, weight, lse, coef, temperature_t, temperature,
                                      smooth_coef, class_offset, ignore_index, need_temperature_grad):
        return logits.new_empty((logits.shape[0], 2), dtype=_acc(logits.dtype))

    # ------------------------------------------------------------------ version counters
    # The ops that write into an argument (schema `Tensor(a!)`, the first argument of each)
    # move its version counter, as PyTorch's own in-place ops do: an autograd node that saved
    # that tensor then raises "modified by an inplace operation" at backward instead of
    # reading the new values. (The dispatcher does not do it for C++-defined custom ops.)
    _MUTABLE = tuple(op for op in OPS if op.endswith("_"))
    _after_inplace_keys = torch._C._after_ADInplaceOrView_keyset
    _impl_lib = torch.library.Library("softcal", "IMPL")  # noqa: TOR901  (kept for the process)

    def _version_bumping(name):
        op = getattr(ops, name).default

        def kernel(keyset, written, *args):
            torch.autograd.graph.increment_version(written)
            return op.redispatch(keyset & _after_inplace_keys, written, *args)

        return kernel

    for _name in _MUTABLE:
        _impl_lib.impl(_name, _version_bumping(_name), "ADInplaceOrView", with_keyset=True)

    # ------------------------------------------------------------------ autograd
    def _tsce_setup_context(ctx, inputs, output):
        logits, target, weight, temperature_t, temperature, eps, ignore_index, reduction = inputs[:8]
        z_loss, softcap = (tuple(inputs[8:10]) + (0.0, 0.0))[:2]  # schema defaults
        _, lse, denom = output
        ctx.save_for_backward(logits, target, weight, temperature_t, lse, denom)
        ctx.scalars = (temperature, eps, ignore_index, reduction, z_loss, softcap)
        ctx.n_inputs = len(inputs)
        ctx.mark_non_differentiable(lse, denom)
        # lse and denom never get a gradient: do not let autograd fill (rows, 2) zeros for them
        # (a fresh lse-sized buffer per backward: ~10 % of the (1e6, 10) backward, and its memory)
        ctx.set_materialize_grads(False)

    _REDUCTION_NAMES = ("none", "mean", "sum")

    def _tsce_backward_differentiable(grad_loss, logits, target, weight, temperature_t,
                                      temperature, eps, ignore_index, reduction, need_x, need_t,
                                      z_loss=0.0, softcap=0.0):
        """The backward as a graph of PyTorch operations (create_graph=True).

        The loss is recomputed by softcal.reference (the same maths as the kernels, the oracle
        of the tests) and differentiated by autograd with create_graph=True, so that the
        returned gradients are themselves differentiable with respect to the logits, the
        temperature tensor and grad_loss (double backward, Hessian-vector products, gradient
        penalties). Only this path costs the reference's N x C intermediates.
        """
        from . import reference  # imported here: reference imports _validation, not _ops

        inputs = []
        if need_x:
            inputs.append(logits)
        if need_t:
            inputs.append(temperature_t)
        with torch.enable_grad():
            loss = reference.cross_entropy(
                logits, target, temperature=temperature_t if temperature_t is not None else temperature,
                label_smoothing=eps, weight=weight, ignore_index=ignore_index,
                reduction=_REDUCTION_NAMES[reduction], z_loss=z_loss, softcap=softcap or None)
            # grad_loss comes in the op's loss dtype (the accumulation dtype), the reference's
            # loss in the logits' dtype
            grads = torch.autograd.grad(loss, inputs, grad_loss.to(loss.dtype), create_graph=True,
                                        allow_unused=True)
        grads = list(grads)
        grad_x = grads.pop(0) if need_x else None
        grad_t = grads.pop(0) if need_t else None
        if grad_x is None and need_x:
            grad_x = torch.zeros_like(logits)
        if grad_t is None and need_t:
            grad_t = torch.zeros_like(temperature_t)
        return grad_x, grad_t

    def _tsce_backward(ctx, grad_loss, grad_lse, grad_denom):
        logits, target, weight, temperature_t, lse, denom = ctx.saved_tensors
        rest = (None,) * (ctx.n_inputs - 4)
        if grad_loss is None:  # only reachable without materialized gradients
            return (None,) * 4 + rest
        temperature, eps, ignore_index, reduction, z_loss, softcap = ctx.scalars
        need_x = ctx.needs_input_grad[0]
        need_t = temperature_t is not None and ctx.needs_input_grad[3]
        if torch.is_grad_enabled():  # backward(create_graph=True): the graph of the backward is wanted
            grad_x, grad_t = _tsce_backward_differentiable(
                grad_loss, logits, target, weight, temperature_t, temperature, eps, ignore_index,
                reduction, need_x, need_t, z_loss, softcap)
        else:
            grad_x, grad_t = ops.cross_entropy_bwd(grad_loss, logits, target, weight, lse, denom,
                                                   temperature_t, temperature, eps, ignore_index,
                                                   reduction, need_x, need_t, z_loss, softcap)
        return (grad_x if need_x else None, None, None, grad_t if need_t else None) + rest

    torch.library.register_autograd("softcal::cross_entropy_fwd", _tsce_backward,
                                    setup_context=_tsce_setup_context)

    # ------------------------------------------------------------------ fused modes
    # fused=True: cross_entropy_fused returns the loss and the gradient for an upstream gradient
    # of 1; its backward scales that saved gradient by the upstream one, in place (scale_rows_:
    # no pass at all for a 0-dim 1), and returns it. inplace=True: cross_entropy_fused_ writes
    # the gradient into the logits' own buffer (a mutable op: no autograd formula can be
    # registered on it), and cross_entropy_inplace_loss (below) carries the autograd: its input
    # is the logits after the write and its backward scales and returns that buffer. In eager
    # mode both backwards scale the saved buffer in place, so they run once per forward; traced
    # (torch.compile), the backward scales out of place and the forward's write is
    # functionalized (Inductor writes into the logits' buffer when nothing else reads it).
    _FUSED_ONCE = ("softcal.cross_entropy(fused=True): the backward scales the stored gradient in "
                   "place and can run only once per forward; use fused=False to call backward "
                   "twice (retain_graph=True, gradcheck)")
    _FUSED_NO_DOUBLE = ("softcal.cross_entropy(fused=True): double backward (backward with "
                        "create_graph=True) is not supported, because the gradient was computed in "
                        "the forward; use fused=False for second derivatives")

    def _fused_grads(ctx, grad_loss, need_x, need_t):
        """(dL/dlogits, dL/dT) from the saved (gradient, per-row or total dL/dT) and grad_loss."""
        if torch.is_grad_enabled():
            raise RuntimeError(_FUSED_NO_DOUBLE)
        if need_x and ctx.used:
            raise RuntimeError(_FUSED_ONCE)
        grad, grad_t = ctx.saved_tensors
        gx = gt = None
        if need_x:
            ctx.used = True
            if type(grad) is torch.Tensor:
                # eager: the buffer is scaled in place (a 0-dim 1 costs no pass, checked on
                # the device) and handed on as the gradient
                ops.scale_rows_(grad, grad_loss)
                gx = grad
            else:
                # traced (torch.compile, export, opcheck: functional/fake tensors): out of place,
                # so that the traced backward mutates no tensor of the forward
                scale = grad_loss.reshape(-1, 1) if grad_loss.dim() else grad_loss
                gx = torch.mul(grad, scale).to(grad.dtype)
        if need_t:  # grad_t: (rows,) for "none", () otherwise; the sum of a 0-dim is itself
            gt = (grad_t * grad_loss).sum()
        return gx, gt

    def _fused_setup_context(ctx, inputs, output):
        _, grad, grad_t = output
        ctx.n_inputs = len(inputs)
        ctx.save_for_backward(grad, grad_t)
        ctx.used = False
        ctx.mark_non_differentiable(grad, grad_t)
        ctx.set_materialize_grads(False)

    def _fused_backward(ctx, grad_loss, grad_grad, grad_grad_t):
        if grad_loss is None:
            return (None,) * ctx.n_inputs
        need_t = ctx.needs_input_grad[3]
        gx, gt = _fused_grads(ctx, grad_loss, ctx.needs_input_grad[0], need_t)
        return (gx, None, None, gt) + (None,) * (ctx.n_inputs - 4)

    torch.library.register_autograd("softcal::cross_entropy_fused", _fused_backward,
                                    setup_context=_fused_setup_context)

    @torch.library.custom_op("softcal::cross_entropy_inplace_loss", mutates_args=())
    def cross_entropy_inplace_loss(logits: torch.Tensor, loss: torch.Tensor,
                                   temperature_t: Optional[torch.Tensor],
                                   grad_temperature: torch.Tensor) -> torch.Tensor:
        """The loss of cross_entropy_fused_ (a copy of `loss`), differentiable: `logits` is the
        buffer that cross_entropy_fused_ wrote the gradient into (its values are not read here);
        the backward returns that buffer scaled by the upstream gradient as dL/dlogits, and
        sum(grad_temperature * upstream) as dL/dT."""
        return loss.clone()

    @cross_entropy_inplace_loss.register_fake
    def _inplace_loss_fake(logits, loss, temperature_t, grad_temperature):
        return torch.empty_like(loss)

    def _inplace_setup_context(ctx, inputs, output):
        logits, _, _, grad_t = inputs
        ctx.save_for_backward(logits, grad_t)  # saved after the write: at the bumped version
        ctx.used = False
        ctx.set_materialize_grads(False)

    def _inplace_backward(ctx, grad_loss):
        if grad_loss is None:
            return None, None, None, None
        gx, gt = _fused_grads(ctx, grad_loss, ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        return gx, None, gt, None

    cross_entropy_inplace_loss.register_autograd(_inplace_backward,
                                                 setup_context=_inplace_setup_context)

    def _softmax_setup_context(ctx, inputs, output):
        x, temperature_t, temperature, dim, log = inputs
        ctx.save_for_backward(output, temperature_t)
        ctx.scalars = (temperature, dim, log)

    def _softmax_backward_differentiable(grad_out, out, temperature_t, temperature, dim, log,
                                         need_x, need_t):
        """The backward of (log_)softmax(x / T) as PyTorch operations of (grad_out, out, T).

        out is the forward's saved output; under create_graph=True it carries this op's own
        graph, so the result is differentiable with respect to x, T and grad_out. The formulas
        are the kernels' (csrc/common.h), with y = softmax(x / T) along dim:
            softmax:      dL/dz = y (g - sum g y)
            log_softmax:  dL/dz = g - y sum g
            dL/dx = dL/dz / T,   dL/dT = -(1/T) sum_{y > 0} dL/dz log y
        (a class with y == 0, a masked logit, contributes 0 to dL/dT).
        """
        acc = _acc(out.dtype)
        g = grad_out.to(acc)
        o = out.to(acc)
        T = temperature_t.to(acc) if temperature_t is not None else temperature
        y = o.exp() if log else o
        if log:
            gz = g - y * g.sum(dim, keepdim=True)
        else:
            gz = y * (g - (g * y).sum(dim, keepdim=True))
        grad_x = (gz / T).to(out.dtype) if need_x else None
        grad_t = None
        if need_t:
            live = y > 0
            zero = torch.zeros_like(o)
            log_y = torch.where(live, o, zero) if log else torch.log(torch.where(live, y, zero + 1))
            grad_t = (-torch.where(live, gz * log_y, zero).sum() / T).to(temperature_t.dtype)
        return grad_x, grad_t

    def _softmax_backward(ctx, grad_out):
        out, temperature_t = ctx.saved_tensors
        temperature, dim, log = ctx.scalars
        need_x = ctx.needs_input_grad[0]
        need_t = temperature_t is not None and ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # backward(create_graph=True)
            grad_x, grad_t = _softmax_backward_differentiable(grad_out, out, temperature_t,
                                                              temperature, dim, log, need_x, need_t)
        else:
            grad_x, grad_t = ops.softmax_bwd(grad_out, out, temperature_t, temperature, dim, log,
                                             need_t)
        return (grad_x if need_x else None, grad_t if need_t else None, None, None, None)

    torch.library.register_autograd("softcal::softmax_fwd", _softmax_backward,
                                    setup_context=_softmax_setup_context)


# ---------------------------------------------------------------------- class-probability targets
# soft_target_fwd / soft_target_bwd (schemas in csrc/schemas.h; maths at the top of
# csrc/cpu/soft_target_cpu.cpp). The forward saves the per-row [m, ls] and U = sum_c w_c q_c;
# the backward returns the gradients of the logits, the target and a tensor temperature. When
# the graph of the backward is wanted (create_graph=True: double backward, gradient penalties),
# the backward is computed by the differentiable reference instead, so that the second
# derivative is right rather than silently missing.
_REDUCTION_NAMES = {0: "none", 1: "mean", 2: "sum"}

if HAVE_EXTENSION:

    @torch.library.register_fake("softcal::soft_target_fwd")
    def _tsce_soft_fwd_fake(logits, target, weight, temperature_t, temperature, label_smoothing,
                            reduction):
        rows = logits.shape[0]
        loss = logits.new_empty((rows,) if reduction == 0 else (), dtype=_acc(logits.dtype))
        lse = logits.new_empty((rows, 2), dtype=_acc(logits.dtype))  # [row max, log sum exp]
        mass = logits.new_empty((rows,), dtype=_acc(logits.dtype))   # sum_c w_c q_c
        return loss, lse, mass

    @torch.library.register_fake("softcal::soft_target_bwd")
    def _tsce_soft_bwd_fake(grad_loss, logits, target, weight, lse, mass, temperature_t,
                            temperature, label_smoothing, reduction, need_logits_grad,
                            need_target_grad, need_temperature_grad):
        gx = logits.new_empty(tuple(logits.shape)) if need_logits_grad else logits.new_empty((0,))
        gt = target.new_empty(tuple(target.shape)) if need_target_grad else target.new_empty((0,))
        return gx, gt, logits.new_empty((), dtype=_grad_t_dtype(temperature_t, logits))

    def _soft_setup_context(ctx, inputs, output):
        logits, target, weight, temperature_t, temperature, eps, reduction = inputs
        _, lse, mass = output
        ctx.save_for_backward(logits, target, weight, temperature_t, lse, mass)
        ctx.scalars = (temperature, eps, reduction)
        ctx.mark_non_differentiable(lse, mass)

    def _soft_backward(ctx, grad_loss, grad_lse, grad_mass):
        logits, target, weight, temperature_t, lse, mass = ctx.saved_tensors
        temperature, eps, reduction = ctx.scalars
        need_x, need_tg = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_t = temperature_t is not None and ctx.needs_input_grad[3]
        if torch.is_grad_enabled():
            # create_graph=True: a backward whose own graph is recorded
            from .reference import soft_cross_entropy

            wanted = [(0, logits, need_x), (1, target, need_tg), (3, temperature_t, need_t)]
            inputs = [t for _, t, need in wanted if need]
            loss = soft_cross_entropy(
                logits, target, temperature=temperature_t if temperature_t is not None else temperature,
                label_smoothing=eps, weight=weight, reduction=_REDUCTION_NAMES[reduction])
            grads = iter(torch.autograd.grad(loss, inputs, grad_loss.to(loss.dtype), create_graph=True,
                                             allow_unused=True)) if inputs else iter(())
            out = [None] * 7
            for i, t, need in wanted:
                if need:
                    g = next(grads)
                    out[i] = torch.zeros_like(t) if g is None else g
            return tuple(out)
        gx, gtg, gT = ops.soft_target_bwd(grad_loss, logits, target, weight, lse, mass, temperature_t,
                                        temperature, eps, reduction, need_x, need_tg, need_t)
        return (gx if need_x else None, gtg if need_tg else None, None, gT if need_t else None,
                None, None, None)

    torch.library.register_autograd("softcal::soft_target_fwd", _soft_backward,
                                    setup_context=_soft_setup_context)
