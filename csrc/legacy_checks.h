// softcal: TRANSITIONAL. The argument checks as they were before csrc/checks.h (same code, same
// semantics: weights of the logits' dtype, soft targets of the logits' dtype), kept only so that
// csrc/cuda, which still calls them, builds unchanged until it calls csrc/checks.h. Delete this
// file, csrc/shard.h, csrc/soft_target.h and the include at the end of csrc/common.h with their
// last caller. New code calls csrc/checks.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "common.h"

namespace softcal {

inline void check_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum, op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

inline void check_float_scalars(double temperature, double label_smoothing, const char* op) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op,
              ": temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
}

inline void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op,
              ": logits must be a floating tensor (float16, bfloat16, float32 or float64), got ",
              logits.scalar_type());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D (rows, classes) here, got shape ",
              logits.sizes());
}

// A 2-D (rows, classes) tensor read with the classes contiguous (the kernels' layout).
inline void check_class_stride(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1, op, ": ", name,
              " must have unit stride along classes, got strides ", t.strides());
}

// The class weights (1-D, one per class, the logits' dtype and device), the temperature (a 0-dim
// floating tensor on the logits' device, or a finite number > 0) and label_smoothing in [0, 1]:
// checks shared by the cross-entropy ops (check_tsce_inputs) and the class-probability-target
// ops (soft_target.h).
inline void check_weight_and_temperature(const at::Tensor& logits,
                                         const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& temperature_t,
                                         double temperature, double label_smoothing,
                                         const char* op) {
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

// Shape, dtype and device checks of the cross-entropy inputs, shared by every backend.
inline void check_tsce_inputs(const at::Tensor& logits, const at::Tensor& target,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& temperature_t, double temperature,
                              double label_smoothing, int64_t reduction, const char* op) {
  check_logits(logits, op);
  check_reduction(reduction, op);
  check_class_stride(logits, "logits", op);
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op, ": target has shape ",
              target.sizes(), " but logits has ", logits.size(0), " rows");
  TORCH_CHECK(target.device() == logits.device(), op, ": target is on ", target.device(),
              " but logits is on ", logits.device());
  check_weight_and_temperature(logits, weight, temperature_t, temperature, label_smoothing, op);
}

// The value of the temperature on the host (CPU tensors only: no synchronisation).
inline double host_temperature(const std::optional<at::Tensor>& temperature_t,
                               double temperature, const char* op) {
  if (!temperature_t.has_value()) return temperature;
  const double t = temperature_t->item<double>();
  TORCH_CHECK(std::isfinite(t) && t > 0, op, ": temperature must be a finite number > 0, got ",
              t);
  return t;
}

}  // namespace softcal
