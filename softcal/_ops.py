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
    "tsce_fwd",
    "tsce_bwd",
    "tsce_fused",
    "tsce_fused_",
    "scale_rows_",
    "softmax_fwd",
    "softmax_bwd",
    "temperature_stats",
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


def has_kernel(device_type: str, op: str = "tsce_fwd") -> bool:
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
    @torch.library.register_fake("softcal::tsce_fwd")
    def _tsce_fwd_fake(logits, target, weight, temperature_t, temperature, label_smoothing,
                       ignore_index, reduction):
        rows = logits.shape[0]
        loss = logits.new_empty((rows,) if reduction == 0 else ())
        lse = logits.new_empty((rows, 2), dtype=_acc(logits.dtype))  # [row max, log sum exp]
        denom = logits.new_empty((), dtype=_acc(logits.dtype))
        return loss, lse, denom

    def _grad_t_dtype(temperature_t, logits):
        return temperature_t.dtype if temperature_t is not None else _acc(logits.dtype)

    @torch.library.register_fake("softcal::tsce_bwd")
    def _tsce_bwd_fake(grad_loss, logits, target, weight, lse, denom, temperature_t, temperature,
                       label_smoothing, ignore_index, reduction, need_logits_grad,
                       need_temperature_grad):
        if need_logits_grad:
            grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        else:
            grad = logits.new_empty((0,))
        return grad, logits.new_empty((), dtype=_grad_t_dtype(temperature_t, logits))

    def _fused_grad_t_fake(logits, temperature_t, reduction):
        shape = (logits.shape[0],) if reduction == 0 else ()
        return logits.new_empty(shape, dtype=_grad_t_dtype(temperature_t, logits))

    @torch.library.register_fake("softcal::tsce_fused")
    def _tsce_fused_fake(logits, target, weight, temperature_t, temperature, label_smoothing,
                         ignore_index, reduction, need_temperature_grad):
        loss = logits.new_empty((logits.shape[0],) if reduction == 0 else ())
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        return loss, grad, _fused_grad_t_fake(logits, temperature_t, reduction)

    @torch.library.register_fake("softcal::tsce_fused_")
    def _tsce_fused_inplace_fake(logits, target, weight, temperature_t, temperature,
                                 label_smoothing, ignore_index, reduction, need_temperature_grad):
        loss = logits.new_empty((logits.shape[0],) if reduction == 0 else ())
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

    # ------------------------------------------------------------------ autograd
    def _tsce_setup_context(ctx, inputs, output):
        logits, target, weight, temperature_t, temperature, eps, ignore_index, reduction = inputs
        _, lse, denom = output
        ctx.save_for_backward(logits, target, weight, temperature_t, lse, denom)
        ctx.scalars = (temperature, eps, ignore_index, reduction)
        ctx.mark_non_differentiable(lse, denom)
        # lse and denom never get a gradient: do not let autograd fill (rows, 2) zeros for them
        # (a fresh lse-sized buffer per backward: ~10 % of the (1e6, 10) backward, and its memory)
        ctx.set_materialize_grads(False)

    def _tsce_backward(ctx, grad_loss, grad_lse, grad_denom):
        logits, target, weight, temperature_t, lse, denom = ctx.saved_tensors
        if grad_loss is None:  # only reachable without materialized gradients
            return (None,) * 8
        temperature, eps, ignore_index, reduction = ctx.scalars
        need_x = ctx.needs_input_grad[0]
        need_t = temperature_t is not None and ctx.needs_input_grad[3]
        grad_x, grad_t = ops.tsce_bwd(grad_loss, logits, target, weight, lse, denom, temperature_t,
                                      temperature, eps, ignore_index, reduction, need_x, need_t)
        return (grad_x if need_x else None, None, None, grad_t if need_t else None,
                None, None, None, None)

    torch.library.register_autograd("softcal::tsce_fwd", _tsce_backward,
                                    setup_context=_tsce_setup_context)

    def _softmax_setup_context(ctx, inputs, output):
        x, temperature_t, temperature, dim, log = inputs
        ctx.save_for_backward(output, temperature_t)
        ctx.scalars = (temperature, dim, log)

    def _softmax_backward(ctx, grad_out):
        out, temperature_t = ctx.saved_tensors
        temperature, dim, log = ctx.scalars
        need_t = temperature_t is not None and ctx.needs_input_grad[1]
        grad_x, grad_t = ops.softmax_bwd(grad_out, out, temperature_t, temperature, dim, log,
                                         need_t)
        return (grad_x if ctx.needs_input_grad[0] else None, grad_t if need_t else None,
                None, None, None)

    torch.library.register_autograd("softcal::softmax_fwd", _softmax_backward,
                                    setup_context=_softmax_setup_context)
