// softcal: what every backend shares besides the checks (csrc/checks.h): the variants of the
// kernels as enums, the accumulation types, constants. The maths of every op, the numerics and
// the kernel design are in docs/design.md; where a new loss term, launch shape or op goes is its
// first section.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <optional>

namespace softcal {

// The schemas' `int reduction` (at::Reduction): none, mean, sum.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// The variants of a cross-entropy row (docs/design.md §1), switched once at the top of a kernel:
// a template parameter below that point, never a test inside an element loop.
//   Smoothing::kOff   eps == 0: the smoothing terms are absent (not multiplied by 0: a class
//                     weight of inf must never meet a 0)
//   Smoothing::kOn    eps > 0: (eps / C) sum_c w_c (lse - z_c) in the loss, -(eps / C) w_c and
//                     eps W / C in dL/dz
//   ClassWeights      without / with per-class weights w_c (1 without)
//   ZLoss::kOn        z_loss > 0: + z lse^2 on the row's loss, + 2 z lse on the softmax
//                     coefficient A (a row term)
//   Softcap::kOn      softcap c > 0: each logit x -> c tanh(x / c) as it is read, the element's
//                     gradient times 1 - (x' / c)^2 (an element map; switched once per call, the
//                     kOff kernels are the ones without it)
// A new row term is a new enum here and one term in cpu/ce_row.h and cuda/ce_row.cuh.
enum class Smoothing : int { kOff = 0, kOn = 1 };
enum class ClassWeights : int { kNone = 0, kPerClass = 1 };
enum class ZLoss : int { kOff = 0, kOn = 1 };
enum class Softcap : int { kOff = 0, kOn = 1 };

inline Smoothing smoothing_of(double label_smoothing) {
  return label_smoothing > 0 ? Smoothing::kOn : Smoothing::kOff;
}
inline ZLoss zloss_of(double z_loss) { return z_loss > 0 ? ZLoss::kOn : ZLoss::kOff; }
inline Softcap softcap_of(double softcap) { return softcap > 0 ? Softcap::kOn : Softcap::kOff; }

// The pass a cross-entropy kernel makes (docs/design.md §4: what each reads, writes and saves):
//   kForward   loss and the per-row [m, ls]                   (cross_entropy_fwd)
//   kBackward  the gradient from the saved [m, ls]            (cross_entropy_bwd)
//   kFused     loss and gradient in one read of the logits    (cross_entropy_fused, _fused_)
enum class Pass : int { kForward = 0, kBackward = 1, kFused = 2 };

// The accumulation dtype: float for float16/bfloat16/float32, double for float64
// (at::opmath_type<scalar_t> in kernels).
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The dtype of grad_temperature: the temperature tensor's, acc without one.
inline at::ScalarType temp_grad_type(const std::optional<at::Tensor>& temperature_t,
                                     at::ScalarType logits_type) {
  return temperature_t.has_value() ? temperature_t->scalar_type() : acc_type(logits_type);
}

constexpr double kLog2e = 1.4426950408889634;  // log2(e): exp(x) = exp2(x log2 e)

}  // namespace softcal
