// softcal: argument checks of the class-probability-target ops (soft_target_fwd, soft_target_bwd),
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
  check_class_stride(logits, "logits", op);
  TORCH_CHECK(target.sizes() == logits.sizes(), op, ": target has shape ", target.sizes(),
              " but logits has shape ", logits.sizes(), " (class-probability targets)");
  TORCH_CHECK(target.scalar_type() == logits.scalar_type(), op, ": target has dtype ",
              target.scalar_type(), " but logits has ", logits.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), op, ": target is on ", target.device(),
              " but logits is on ", logits.device());
  check_class_stride(target, "target", op);
  check_weight_and_temperature(logits, weight, temperature_t, temperature, label_smoothing, op);
}

}  // namespace softcal
