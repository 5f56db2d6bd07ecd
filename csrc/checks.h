// softcal: every op's argument checks, for every backend, and the one table of op names used in
// messages. Each op's entry point (csrc/cpu/*.cpp, csrc/cuda/*.cu) calls its check first:
//
//   checks::cross_entropy(backend, op, ...)       cross_entropy_fwd / _fused / _fused_
//   checks::cross_entropy_bwd(backend, ...)       cross_entropy_bwd
//   checks::soft_target_fwd / soft_target_bwd     class-probability targets
//   checks::shard_stats / shard_grad              vocabulary-parallel pieces
//   checks::softmax_fwd / softmax_bwd             return the wrapped dim
//   checks::temperature_stats, checks::scale_rows
//
// The contracts (shapes, dtypes) are in csrc/schemas.h. What a backend alone needs (CUDA's 32-bit
// class count) is switched on `Backend`, never on the tensors' device: the CUDA emulator of the
// tests runs the CUDA kernels on CPU tensors. A user error names the op (op_name), the argument
// and the bad value.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "common.h"

namespace softcal {

enum class Backend { kCpu, kCuda };

// The ops as users meet them: the names in every message (the same on every backend).
enum class Op : int {
  kCrossEntropy,              // cross_entropy_fwd
  kCrossEntropyBwd,           // cross_entropy_bwd
  kCrossEntropyFused,         // cross_entropy_fused
  kCrossEntropyFusedInplace,  // cross_entropy_fused_
  kSoftTarget,                // soft_target_fwd
  kSoftTargetBwd,             // soft_target_bwd
  kShardStats,                // shard_stats
  kShardGrad,                 // shard_grad
  kShardGradInplace,          // shard_grad_
  kSoftmax,                   // softmax_fwd, log = false
  kLogSoftmax,                // softmax_fwd, log = true
  kSoftmaxBwd,                // softmax_bwd, log = false
  kLogSoftmaxBwd,             // softmax_bwd, log = true
  kTemperatureStats,          // temperature_stats
  kScaleRows,                 // scale_rows_
  kCount
};

inline constexpr const char* kOpNames[] = {
    "softcal.cross_entropy",
    "softcal.cross_entropy (backward)",
    "softcal.cross_entropy (fused)",
    "softcal.cross_entropy (fused, in place)",
    "softcal.cross_entropy (class-probability targets)",
    "softcal.cross_entropy (class-probability targets, backward)",
    "softcal.shard_stats",
    "softcal.shard_grad",
    "softcal.shard_grad_",
    "softcal.softmax",
    "softcal.log_softmax",
    "softcal.softmax (backward)",
    "softcal.log_softmax (backward)",
    "softcal.temperature_stats",
    "softcal.scale_rows_",
};
static_assert(sizeof(kOpNames) / sizeof(kOpNames[0]) == static_cast<size_t>(Op::kCount),
              "one name per Op");

inline constexpr const char* op_name(Op op) { return kOpNames[static_cast<int>(op)]; }

inline constexpr Op softmax_op(bool log, bool backward) {
  return backward ? (log ? Op::kLogSoftmaxBwd : Op::kSoftmaxBwd)
                  : (log ? Op::kLogSoftmax : Op::kSoftmax);
}

namespace checks {

// ------------------------------------------------------------------ pieces shared by the ops

inline void floating_tensor(Op op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op_name(op), ": ", name,
              " must be a floating tensor (float16, bfloat16, float32 or float64), got ",
              t.scalar_type());
}

inline void same_device(Op op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                        const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op_name(op), ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
}

// A 2-D (rows, classes) tensor read with the classes contiguous (the kernels' layout).
inline void class_stride(Op op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1, op_name(op), ": ", name,
              " must have unit stride along classes, got strides ", t.strides());
}

// CUDA kernels index a row with 32-bit integers.
inline void class_count(Backend backend, Op op, int64_t C, const char* what = "classes") {
  if (backend != Backend::kCuda) return;
  TORCH_CHECK(C < std::numeric_limits<int>::max(), op_name(op), ": at most 2^31 - 1 ", what,
              " on CUDA, got ", C);
}

// logits: floating, 2-D (rows, classes), unit class stride.
inline void logits_2d(Backend backend, Op op, const at::Tensor& logits) {
  floating_tensor(op, logits, "logits");
  TORCH_CHECK(logits.dim() == 2, op_name(op),
              ": logits must be 2-D (rows, classes) here, got shape ", logits.sizes());
  class_stride(op, logits, "logits");
  class_count(backend, op, logits.size(1));
}

inline void reduction_arg(Op op, int64_t reduction) {
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum, op_name(op),
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

inline void temperature_value(Op op, double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op_name(op),
              ": temperature must be a finite number > 0, got ", temperature);
}

inline void smoothing_arg(Op op, double label_smoothing) {
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op_name(op),
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
}

// The temperature: a 0-dim floating tensor on `ref`'s device (its value is checked where it is
// read: checks::host_temperature on the CPU; on CUDA a value that is not finite and > 0 makes
// the outputs NaN), or else the float, a finite number > 0.
inline void temperature_arg(Op op, const std::optional<at::Tensor>& temperature_t,
                            double temperature, const at::Tensor& ref, const char* ref_name) {
  if (!temperature_t.has_value()) {
    temperature_value(op, temperature);
    return;
  }
  const at::Tensor& t = *temperature_t;
  TORCH_CHECK(t.numel() == 1 && t.dim() == 0, op_name(op),
              ": temperature tensor must be 0-dim, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op_name(op),
              ": temperature tensor must be floating, got ", t.scalar_type());
  same_device(op, t, "temperature", ref, ref_name);
}

// Class weights: 1-D, one per class, any floating dtype (the host converts them once to the
// accumulation type: kernel contract), on the logits' device.
inline void weight_arg(Op op, const std::optional<at::Tensor>& weight, const at::Tensor& logits) {
  if (!weight.has_value()) return;
  const at::Tensor& w = *weight;
  TORCH_CHECK(w.dim() == 1 && w.size(0) == logits.size(1), op_name(op), ": weight has shape ",
              w.sizes(), " but logits has ", logits.size(1), " classes");
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), op_name(op),
              ": weight must be floating (any floating dtype), got ", w.scalar_type());
  same_device(op, w, "weight", logits, "logits");
}

// Class-index targets: int64 (rows,) on the logits' device (their values are checked by the
// kernels: an error naming the row on the CPU, a device-side assert on CUDA).
inline void index_target(Op op, const at::Tensor& target, const at::Tensor& logits) {
  TORCH_CHECK(target.scalar_type() == at::kLong, op_name(op), ": target must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op_name(op),
              ": target has shape ", target.sizes(), " but logits has ", logits.size(0), " rows");
  same_device(op, target, "target", logits, "logits");
}

// A per-row tensor saved by a forward, (rows, k) in the accumulation type, or (rows,) for k == 0,
// on the logits' device.
inline void saved_rows(Op op, const at::Tensor& t, const at::Tensor& logits, int64_t k,
                       const char* name, const char* what = "") {
  const int64_t rows = logits.size(0);
  const at::ScalarType acc = acc_type(logits.scalar_type());
  const bool shape = k == 0 ? (t.dim() == 1 && t.size(0) == rows)
                            : (t.dim() == 2 && t.size(0) == rows && t.size(1) == k);
  if (k == 0) {
    TORCH_CHECK(shape && t.scalar_type() == acc, op_name(op), ": ", name, " must be (", rows, ",) ",
                acc, what, ", got ", t.sizes(), " ", t.scalar_type());
  } else {
    TORCH_CHECK(shape && t.scalar_type() == acc, op_name(op), ": ", name, " must be (", rows, ", ",
                k, ") ", acc, what, ", got ", t.sizes(), " ", t.scalar_type());
  }
  same_device(op, t, name, logits, "logits");
}

// The upstream gradient of a loss: any floating dtype (kernel contract), (rows,) with any stride
// for reduction none, one element otherwise, on the logits' device.
inline void grad_loss_arg(Op op, const at::Tensor& grad_loss, const at::Tensor& logits,
                          int64_t reduction) {
  TORCH_CHECK(at::isFloatingType(grad_loss.scalar_type()), op_name(op),
              ": grad_loss must be floating, got ", grad_loss.scalar_type());
  if (reduction == kNone) {
    TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == logits.size(0), op_name(op),
                ": grad_loss must be (", logits.size(0), ",) for reduction none, got ",
                grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, op_name(op), ": grad_loss must be 0-dim, got ",
                grad_loss.sizes());
  }
  same_device(op, grad_loss, "grad_loss", logits, "logits");
}

// A kernel that writes into the logits' own buffer.
inline void inplace_logits(Op op, const at::Tensor& logits) {
  TORCH_CHECK(logits.is_contiguous(), op_name(op),
              ": logits must be contiguous (the gradient is written into its buffer), got strides ",
              logits.strides());
}

// -------------------------------------------------------------------------------- the ops

// cross_entropy_fwd, cross_entropy_fused (op kCrossEntropyFused) and cross_entropy_fused_
// (kCrossEntropyFusedInplace: contiguous logits as well).
inline void cross_entropy(Backend backend, Op op, const at::Tensor& logits,
                          const at::Tensor& target, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& temperature_t, double temperature,
                          double label_smoothing, int64_t reduction) {
  logits_2d(backend, op, logits);
  reduction_arg(op, reduction);
  index_target(op, target, logits);
  weight_arg(op, weight, logits);
  temperature_arg(op, temperature_t, temperature, logits, "logits");
  smoothing_arg(op, label_smoothing);
  if (op == Op::kCrossEntropyFusedInplace) inplace_logits(op, logits);
}

// The LLM terms of the cross-entropy ops (schemas.h): z_loss a finite number >= 0, softcap a
// finite number >= 0 (0: none), lse_out (the fused ops) (rows, 2) acc contiguous on the logits'
// device.
inline void llm_terms(Op op, const at::Tensor& logits, double z_loss, double softcap,
                      const std::optional<at::Tensor>& lse_out = std::nullopt) {
  TORCH_CHECK(std::isfinite(z_loss) && z_loss >= 0, op_name(op),
              ": z_loss must be a finite number >= 0, got ", z_loss);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op_name(op),
              ": softcap must be a finite number > 0 (0: none), got ", softcap);
  if (!lse_out.has_value()) return;
  saved_rows(op, *lse_out, logits, 2, "lse_out");
  TORCH_CHECK(lse_out->is_contiguous(), op_name(op), ": lse_out must be contiguous, got strides ",
              lse_out->strides());
}

inline void cross_entropy_bwd(Backend backend, const at::Tensor& grad_loss,
                              const at::Tensor& logits, const at::Tensor& target,
                              const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                              const at::Tensor& denom,
                              const std::optional<at::Tensor>& temperature_t, double temperature,
                              double label_smoothing, int64_t reduction) {
  constexpr Op op = Op::kCrossEntropyBwd;
  cross_entropy(backend, op, logits, target, weight, temperature_t, temperature, label_smoothing,
                reduction);
  grad_loss_arg(op, grad_loss, logits, reduction);
  saved_rows(op, lse, logits, 2, "lse", " (row max, log sum exp, as cross_entropy_fwd gives)");
  const at::ScalarType acc = acc_type(logits.scalar_type());
  TORCH_CHECK(denom.numel() == 1 && denom.scalar_type() == acc, op_name(op),
              ": denom must be a 0-dim ", acc, " tensor, got ", denom.sizes(), " ",
              denom.scalar_type());
  same_device(op, denom, "denom", logits, "logits");
}

// Class-probability targets: the logits' shape, unit class stride, on the logits' device; dtype
// the logits', or float32 with float16/bfloat16 logits (kernel contract).
inline void soft_target_fwd(Backend backend, const at::Tensor& logits, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& temperature_t, double temperature,
                            double label_smoothing, int64_t reduction, Op op = Op::kSoftTarget) {
  logits_2d(backend, op, logits);
  reduction_arg(op, reduction);
  TORCH_CHECK(target.sizes() == logits.sizes(), op_name(op), ": target has shape ", target.sizes(),
              " but logits has shape ", logits.sizes(), " (class-probability targets)");
  const at::ScalarType lt = logits.scalar_type(), tt = target.scalar_type();
  const bool reduced = lt == at::kHalf || lt == at::kBFloat16;
  TORCH_CHECK(tt == lt || (reduced && tt == at::kFloat), op_name(op), ": target has dtype ", tt,
              " but logits has ", lt,
              " (class-probability targets: the logits' dtype, or "
              "float32 with float16/bfloat16 logits)");
  same_device(op, target, "target", logits, "logits");
  class_stride(op, target, "target");
  weight_arg(op, weight, logits);
  temperature_arg(op, temperature_t, temperature, logits, "logits");
  smoothing_arg(op, label_smoothing);
}

inline void soft_target_bwd(Backend backend, const at::Tensor& grad_loss, const at::Tensor& logits,
                            const at::Tensor& target, const std::optional<at::Tensor>& weight,
                            const at::Tensor& lse, const at::Tensor& mass,
                            const std::optional<at::Tensor>& temperature_t, double temperature,
                            double label_smoothing, int64_t reduction) {
  constexpr Op op = Op::kSoftTargetBwd;
  soft_target_fwd(backend, logits, target, weight, temperature_t, temperature, label_smoothing,
                  reduction, op);
  grad_loss_arg(op, grad_loss, logits, reduction);
  saved_rows(op, lse, logits, 2, "lse", " (row max, log sum exp, as soft_target_fwd gives)");
  saved_rows(op, mass, logits, 0, "mass");
}

// shard_stats: the cross-entropy's checks of logits, target, weight and temperature, and the
// class offset of the slice.
inline void shard_stats(Backend backend, const at::Tensor& logits, const at::Tensor& target,
                        const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& temperature_t, double temperature,
                        int64_t class_offset, Op op = Op::kShardStats) {
  cross_entropy(backend, op, logits, target, weight, temperature_t, temperature, 0.0, kNone);
  TORCH_CHECK(class_offset >= 0, op_name(op), ": class_offset must be >= 0, got ", class_offset);
}

// shard_grad (op kShardGrad) and shard_grad_ (kShardGradInplace: contiguous logits as well).
inline void shard_grad(Backend backend, Op op, const at::Tensor& logits, const at::Tensor& target,
                       const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                       const at::Tensor& coef, const std::optional<at::Tensor>& temperature_t,
                       double temperature, double smooth_coef, int64_t class_offset) {
  shard_stats(backend, logits, target, weight, temperature_t, temperature, class_offset, op);
  saved_rows(op, lse, logits, 2, "lse");
  saved_rows(op, coef, logits, 3, "coef");
  TORCH_CHECK(std::isfinite(smooth_coef) && smooth_coef >= 0, op_name(op),
              ": smooth_coef must be a finite number >= 0, got ", smooth_coef);
  if (op == Op::kShardGradInplace) inplace_logits(op, logits);
}

// The dim of a softmax, wrapped into [0, ndim) (a 0-dim input counts as 1-D); IndexError.
inline int64_t softmax_dim(Op op, int64_t dim, int64_t ndim) {
  const int64_t n = ndim > 0 ? ndim : 1;
  TORCH_CHECK_INDEX(dim >= -n && dim < n, op_name(op), ": dim ", dim,
                    " is out of range for a tensor of ", ndim, " dimensions");
  return dim < 0 ? dim + n : dim;
}

// softmax_fwd: returns the wrapped dim.
inline int64_t softmax_fwd(Backend backend, bool log, const at::Tensor& x,
                           const std::optional<at::Tensor>& temperature_t, double temperature,
                           int64_t dim) {
  const Op op = softmax_op(log, false);
  floating_tensor(op, x, "input");
  temperature_arg(op, temperature_t, temperature, x, "input");
  const int64_t d = softmax_dim(op, dim, x.dim());
  if (x.dim() > 0) class_count(backend, op, x.size(d), "elements along dim");
  return d;
}

// softmax_bwd: returns the wrapped dim.
inline int64_t softmax_bwd(Backend backend, bool log, const at::Tensor& grad_out,
                           const at::Tensor& out, const std::optional<at::Tensor>& temperature_t,
                           double temperature, int64_t dim) {
  const Op op = softmax_op(log, true);
  floating_tensor(op, out, "out");
  floating_tensor(op, grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == out.sizes(), op_name(op), ": grad_out has shape ",
              grad_out.sizes(), " but out has shape ", out.sizes());
  same_device(op, grad_out, "grad_out", out, "out");
  temperature_arg(op, temperature_t, temperature, out, "out");
  const int64_t d = softmax_dim(op, dim, out.dim());
  if (out.dim() > 0) class_count(backend, op, out.size(d), "elements along dim");
  return d;
}

inline void temperature_stats(Backend backend, const at::Tensor& logits, const at::Tensor& target,
                              double beta) {
  constexpr Op op = Op::kTemperatureStats;
  logits_2d(backend, op, logits);
  index_target(op, target, logits);
  TORCH_CHECK(std::isfinite(beta) && beta > 0, op_name(op),
              ": beta must be a finite number > 0, got ", beta);
}

// scale_rows_: grad (rows, C) contiguous; scale 0-dim or (rows,) with any stride.
inline void scale_rows(Backend backend, const at::Tensor& grad, const at::Tensor& scale) {
  (void)backend;
  constexpr Op op = Op::kScaleRows;
  floating_tensor(op, grad, "grad");
  floating_tensor(op, scale, "scale");
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), op_name(op),
              ": grad must be 2-D contiguous, got shape ", grad.sizes(), " and strides ",
              grad.strides());
  TORCH_CHECK(scale.dim() == 0 || (scale.dim() == 1 && scale.size(0) == grad.size(0)), op_name(op),
              ": scale must be 0-dim or (", grad.size(0), ",), got ", scale.sizes());
  same_device(op, scale, "scale", grad, "grad");
}

// The value of the temperature on the host, checked (CPU tensors only: no synchronisation).
inline double host_temperature(Op op, const std::optional<at::Tensor>& temperature_t,
                               double temperature) {
  if (!temperature_t.has_value()) return temperature;
  const double t = temperature_t->item<double>();
  temperature_value(op, t);
  return t;
}

}  // namespace checks
}  // namespace softcal
