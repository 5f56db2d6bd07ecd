// softcal: TRANSITIONAL (see csrc/legacy_checks.h). The argument checks of the class-probability-target ops as
// they were before csrc/checks.h, still included by csrc/cuda; the CPU calls csrc/checks.h.
// Delete with their last caller.
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
