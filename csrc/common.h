// softcal: shared argument checks and the maths every kernel implements.
//
// ============================ The maths ============================
// One row: logits x_c (c = 0..C-1), target y, temperature T > 0, beta = 1/T, smoothing eps,
// class weights w_c (all 1 without weights), W = sum_c w_c.
//
//   z_c   = beta * x_c
//   m     = max_c z_c                       (the max trick: exp never overflows)
//   lse   = m + log sum_c exp(z_c - m)
//   p_c   = exp(z_c - lse)
//   Sw    = sum_c w_c z_c
//   loss  = (1 - eps) * w_y * (lse - z_y)  +  (eps / C) * (W * lse - Sw)
//
// This is PyTorch's (LossNLL.cpp, cross_entropy_loss_label_smoothing): the nll term is
// w_y * (-log p_y), the smoothing term is -sum_c w_c log p_c, both are 0 for rows whose target is
// ignore_index. Reduction "mean" divides the sum of the row losses by
//   denom = sum over non-ignored rows of w_y      (the count of such rows without weights),
// so a batch whose rows are all ignored gives 0/0 = NaN, as in PyTorch.
//
// Gradient with respect to z (g is the upstream gradient of the row, already divided by denom
// for "mean"):
//   A       = (1 - eps) * w_y + eps * W / C
//   dL/dz_c = A * p_c - (eps / C) * w_c - (1 - eps) * w_y * [c == y]
//   dL/dx_c = beta * g * dL/dz_c
// The true-class term A * p_y - (eps/C) w_y - (1 - eps) w_y is formed in acc precision before
// the result is rounded to the logits' dtype.
//
// Gradient with respect to T (dz_c/dT = -z_c / T):
//   dL/dT = -(g / T) * sum_c dL/dz_c * z_c
//         = -(g / T) * ( A * E_p[z] - (1 - eps) * w_y * z_y - (eps / C) * Sw )
// with E_p[z] = sum_c p_c z_c, where a class with p_c == 0 contributes 0 (so a masked logit,
// x_c = -inf, adds nothing; its limit is 0).
//
// softmax / log_softmax of x / T along a dim: y = softmax(z), o = log y. Backward, upstream g:
//   softmax:      dL/dz = y * (g - sum(g * y))
//   log_softmax:  dL/dz = g - y * sum(g)
//   dL/dx = beta * dL/dz;  dL/dT = -(1/T) * sum dL/dz * z = -(1/T) * sum dL/dz * log y
// (sum dL/dz = 0, so z may be replaced by log y = z - lse; a class with y == 0 has
// dL/dz == 0 for softmax and contributes 0).
//
// Temperature fitting, at beta = 1/T, per row with target y (no smoothing, no weights):
//   NLL(beta)    = lse(beta x) - beta x_y
//   dNLL/dbeta   = E_p[x] - x_y
//   d2NLL/dbeta2 = Var_p[x] >= 0            (convex in beta)
//
// ====================== Numerics and edge cases ======================
// * Accumulation is in "acc": float for float16/bfloat16/float32, double for float64.
// * Masked logits (-inf) get p = 0 and gradient beta*g*(-(eps/C) w_c). A row whose target
//   logit is -inf has loss +inf (as PyTorch). With eps > 0 any -inf logit makes the smoothing
//   term, hence the loss, +inf (as PyTorch).
// * A row that is entirely -inf has no softmax: if its target is ignore_index its loss and
//   gradient are 0; otherwise its loss, its gradient and lse are NaN (PyTorch gives NaN too).
//   The max trick itself never makes a NaN: m = -inf is detected and handled.
// * Logits of magnitude 1e4 at any T: exponents are <= 0 after subtracting the max.
// * ignore_index rows: loss 0, gradient 0, not counted in denom.
// * Targets outside [0, C) other than ignore_index are an error (CPU: TORCH_CHECK naming the
//   row and the value; CUDA: a device-side assert, as PyTorch's own kernels).
// * A temperature tensor is validated (finite, > 0) on the CPU; on CUDA its value is read by the
//   kernel without a host synchronisation, and a value that is not finite and > 0 makes the
//   outputs NaN.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

namespace softcal {

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Output dtype of grad_temperature.
inline at::ScalarType temp_grad_type(const std::optional<at::Tensor>& temperature_t,
                                     at::ScalarType logits_type) {
  return temperature_t.has_value() ? temperature_t->scalar_type() : acc_type(logits_type);
}

}  // namespace softcal

// TRANSITIONAL: the argument checks as they were before csrc/checks.h, still called by csrc/cuda
// (until it calls checks.h). Remove this include and the file with their last caller.
#include "legacy_checks.h"
