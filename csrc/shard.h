// softcal: TRANSITIONAL (see csrc/legacy_checks.h). The argument checks of the vocabulary-parallel ops as
// they were before csrc/checks.h, still included by csrc/cuda; the CPU calls csrc/checks.h.
// Delete with their last caller.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "common.h"

namespace softcal {

// Every shard op: the shape, dtype and device checks of the cross-entropy (no smoothing,
// reduction none: the shard ops take their own smoothing arguments) and the class offset.
inline void check_shard_inputs(const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& temperature_t, double temperature,
                               int64_t class_offset, const char* op) {
  check_tsce_inputs(logits, target, weight, temperature_t, temperature, 0.0, kNone, op);
  TORCH_CHECK(class_offset >= 0, op, ": class_offset must be >= 0, got ", class_offset);
}

// A per-row input of the gradient (lse: (rows, 2), coef: (rows, 3)) in the accumulation dtype,
// on the logits' device.
inline void check_shard_rows(const at::Tensor& t, const at::Tensor& logits, int64_t k,
                             const char* name, const char* op) {
  const int64_t rows = logits.size(0);
  const at::ScalarType acc = acc_type(logits.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == k && t.scalar_type() == acc, op, ": ",
              name, " must be (", rows, ", ", k, ") ", acc, ", got ", t.sizes(), " ", t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " is on ", t.device(),
              " but logits is on ", logits.device());
}

// The gradient ops: their per-row inputs and the smoothing coefficient.
inline void check_shard_grad_inputs(const at::Tensor& logits, const at::Tensor& lse,
                                    const at::Tensor& coef, double smooth_coef, const char* op) {
  check_shard_rows(lse, logits, 2, "lse", op);
  check_shard_rows(coef, logits, 3, "coef", op);
  TORCH_CHECK(std::isfinite(smooth_coef) && smooth_coef >= 0, op,
              ": smooth_coef must be a finite number >= 0, got ", smooth_coef);
}

// shard_grad_ writes the gradient into the logits' buffer.
inline void check_shard_inplace(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous (the gradient is written "
              "into its buffer), got strides ", logits.strides());
}

}  // namespace softcal
