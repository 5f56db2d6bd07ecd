// softcal: argument checks of the class-probability-target ops (tsce_soft_fwd, tsce_soft_bwd),
// shared by the CPU kernels (csrc/cpu/soft_target_cpu.cpp, which has the maths at its top) and
// the CUDA kernels (csrc/cuda/tsce_soft.cu).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

#include "common.h"

namespace softcal {

// Checks of the soft-target inputs shared by the forward and the backward.
inline void check_soft_inputs(const at::Tensor& logits, const at::Tensor& target,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& temperature_t, double temperature,
                              double label_smoothing, int64_t reduction, const char* op) {
  check_logits(logits, op);
  check_reduction(reduction, op);
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) <= 1, op,
              ": logits must have unit stride along classes, got strides ", logits.strides());
  TORCH_CHECK(target.sizes() == logits.sizes(), op, ": target has shape ", target.sizes(),
              " but logits has shape ", logits.sizes(), " (class-probability targets)");
  TORCH_CHECK(target.scalar_type() == logits.scalar_type(), op, ": target has dtype ",
              target.scalar_type(), " but logits has ", logits.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), op, ": target is on ", target.device(),
              " but logits is on ", logits.device());
  TORCH_CHECK(target.stride(1) == 1 || target.size(1) <= 1, op,
              ": target must have unit stride along classes, got strides ", target.strides());
  if (weight.has_value()) {
    const auto& w = *weight;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == logits.size(1), op, ": weight has shape ",
                w.sizes(), " but logits has ", logits.size(1), " classes");
    TORCH_CHECK(w.scalar_type() == logits.scalar_type(), op, ": weight has dtype ",
                w.scalar_type(), " but logits has ", logits.scalar_type());
    TORCH_CHECK(w.device() == logits.device(), op, ": weight is on ", w.device(),
                " but logits is on ", logits.device());
  }
  if (temperature_t.has_value()) {
    const auto& t = *temperature_t;
    TORCH_CHECK(t.numel() == 1 && t.dim() == 0, op,
                ": temperature tensor must be 0-dim, got shape ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op,
                ": temperature tensor must be floating, got ", t.scalar_type());
    TORCH_CHECK(t.device() == logits.device(), op, ": temperature is on ", t.device(),
                " but logits is on ", logits.device());
    check_float_scalars(1.0, label_smoothing, op);
  } else {
    check_float_scalars(temperature, label_smoothing, op);
  }
}

}  // namespace softcal
