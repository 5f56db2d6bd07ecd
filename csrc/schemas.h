// softcal: the op schemas, defined once. csrc/softcal.cpp defines them in the `softcal`
// namespace; the CUDA emulator of the tests (tests/cuda_emu) defines the same schemas in its own
// namespace, `softcal_emu`, so that the two can never drift apart.
//
// Conventions shared by all ops:
//   * logits is 2-D (rows, C) with a unit stride along C; the row stride may be anything.
//     The Python layer reshapes (C,), (N, C) and (N, C, d1, ...) inputs into that form.
//   * target is int64 of shape (rows,).
//   * temperature: when temperature_t (a 0-dim floating tensor on the logits' device) is given,
//     its value is used and the float `temperature` is ignored; otherwise the float is used.
//     Reading the tensor never synchronises the host on CUDA (the kernel loads it).
//   * reduction follows at::Reduction: 0 = none, 1 = mean, 2 = sum.
//   * "acc" is the accumulation type: float for float16/bfloat16/float32, double for float64.
//     Every loss, lse and denom are returned in acc (the Python layer rounds the loss to the
//     logits' dtype, once); a backward takes grad_loss of any floating dtype.
//   * weight (C,) may have any floating dtype, on the logits' device: the host converts it once
//     to acc and the kernels read acc weights.
//   * The argument checks of every op are in csrc/checks.h.
//   * The per-row log-sum-exp is kept in two parts, lse: (rows, 2) acc, row i = [m_i, ls_i]:
//       m_i  = max_c x_ic         (the raw logits, before any scaling)
//       ls_i = log sum_c exp(beta (x_ic - m_i))
//     so that lse_i = beta m_i + ls_i, and log p_ic = beta (x_ic - m_i) - ls_i is exact at the
//     row maximum (x_ic - m_i = 0) whatever the magnitude of the logits. Rows with ignore_index
//     hold [0, 0]; rows without a softmax (every logit -inf, or a NaN/+inf) hold NaN.
#pragma once

#include <torch/library.h>

namespace softcal {

inline void define_ops(torch::Library& m) {
  // Forward of the temperature-scaled, label-smoothed cross-entropy.
  //   loss:  (rows,) for reduction none, () otherwise; acc.
  //   lse:   (rows, 2) acc; [m, ls] per row (see above; saved for backward).
  //   denom: () acc; sum over non-ignored rows of weight[target] (the count without weights).
  // The LLM terms (issue 19; docs/design.md §1), defaults off so that older callers are unchanged:
  //   softcap c > 0: each logit x -> c tanh(x / c) before the temperature (0: none); [m, ls] are
  //     those of the capped logits.
  //   z_loss z >= 0: + z lse^2 per non-ignored row (lse = beta m + ls); mean divides these terms
  //     by the number of non-ignored rows (the cross-entropy's terms by denom).
  //   lse_all_rows: ignored rows get their [m, ls] too (else [0, 0]); their loss stays 0.
  // Every op below that takes z_loss and softcap means the same.
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, Tensor? temperature_t, "
      "float temperature, float label_smoothing, int ignore_index, int reduction, "
      "float z_loss=0., float softcap=0., bool lse_all_rows=False) "
      "-> (Tensor loss, Tensor lse, Tensor denom)");
  // Backward: one read of the logits, one write of the gradient. lse: (rows, 2), as
  // cross_entropy_fwd's.
  //   grad_loss: (rows,) (any stride, stride 0 allowed) for none, () otherwise.
  //   grad_logits: like logits (contiguous), or an empty (0,) tensor when not requested.
  //   grad_temperature: () in temperature_t's dtype (acc when temperature_t is absent);
  //   zero when not requested.
  m.def(
      "cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor "
      "lse, "
      "Tensor denom, Tensor? temperature_t, float temperature, float label_smoothing, "
      "int ignore_index, int reduction, bool need_logits_grad, bool need_temperature_grad, "
      "float z_loss=0., float softcap=0.) -> (Tensor grad_logits, Tensor grad_temperature)");
  // Fused forward: loss and the gradient for an upstream gradient of 1, in one call.
  //   grad_temperature: () for mean/sum; (rows,) per-row dL_i/dT for none.
  m.def(
      "cross_entropy_fused(Tensor logits, Tensor target, Tensor? weight, Tensor? temperature_t, "
      "float temperature, float label_smoothing, int ignore_index, int reduction, "
      "bool need_temperature_grad, float z_loss=0., float softcap=0.) "
      "-> (Tensor loss, Tensor grad_logits, Tensor grad_temperature)");
  // The same, writing the gradient into the logits' own buffer (logits must be contiguous).
  //   lse_out: when given, (rows, 2) acc contiguous, written with every row's [m, ls] (ignored
  //   rows' too), as cross_entropy_fwd's with lse_all_rows.
  m.def(
      "cross_entropy_fused_(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor? "
      "temperature_t, "
      "float temperature, float label_smoothing, int ignore_index, int reduction, "
      "bool need_temperature_grad, float z_loss=0., float softcap=0., Tensor(b!)? lse_out=None) "
      "-> (Tensor loss, Tensor grad_temperature)");
  // grad[i, :] *= scale (scale 0-dim) or scale[i] (scale (rows,), any stride). A 0-dim scale
  // equal to 1 leaves grad untouched (checked on the device, no host synchronisation).
  m.def("scale_rows_(Tensor(a!) grad, Tensor scale) -> ()");
  // softmax / log_softmax of x / T along dim (any dim; unit stride along dim is fastest).
  m.def(
      "softmax_fwd(Tensor x, Tensor? temperature_t, float temperature, int dim, bool log) "
      "-> Tensor");
  m.def(
      "softmax_bwd(Tensor grad_out, Tensor out, Tensor? temperature_t, float temperature, "
      "int dim, bool log, bool need_temperature_grad) -> (Tensor grad_x, Tensor grad_temperature)");
  // Statistics for fitting a temperature: at beta = 1/T, summed over rows, in float64:
  //   [ sum_i NLL_i(beta), sum_i (E_p[x_i] - x_i,y), sum_i Var_p[x_i], rows ]
  // which are the NLL and its first and second derivatives with respect to beta.
  m.def("temperature_stats(Tensor logits, Tensor target, float beta) -> Tensor");
  // Vocabulary-parallel pieces (softcal.distributed): logits is this rank's slice of the classes,
  // [class_offset, class_offset + C_local); target holds GLOBAL class indices (a target outside
  // the slice is another rank's); weight is this slice's (C_local,) or None. Rows whose target is
  // ignore_index give zeros everywhere.
  //   shard_stats -> (rows, 4) acc per row [m, ls, d, xy]: m = max of the raw logits of the
  //     slice (-inf when all are -inf), ls = log sum exp(beta (x - m)) (-inf when m = -inf),
  //     d = sum w_c (m - x_c) when `smoothing` else 0 (+inf when m = -inf: the smoothing sum over
  //     masked logits is infinite, as PyTorch's loss), xy = x[target - offset]
  //     when the target is in the slice else 0.
  m.def(
      "shard_stats(Tensor logits, Tensor target, Tensor? weight, Tensor? temperature_t, "
      "float temperature, int class_offset, int ignore_index, bool smoothing) -> Tensor");
  //   shard_grad: lse (rows, 2) acc is the GLOBAL [M, LS] of each row; coef (rows, 3) acc is
  //     [g, A, ty] per row (g: upstream gradient of the row, 1/denom included; A = (1 - eps) w_y +
  //     eps W / C_total; ty = (1 - eps) w_y); smooth_coef = eps / C_total. With
  //     p_c = exp(beta (x_c - M) - LS) and dz_c = A p_c - smooth_coef w_c - ty [c == target -
  //     offset]: grad_logits = beta g dz (contiguous (rows, C_local); empty (0,) when not
  //     requested), t_rows (rows, 2) acc = [sum over x_c != -inf of dz_c (beta (x_c - M) - LS),
  //                             sum over x_c == -inf of dz_c]  (zeros when not requested).
  m.def(
      "shard_grad(Tensor logits, Tensor target, Tensor? weight, Tensor lse, Tensor coef, "
      "Tensor? temperature_t, float temperature, float smooth_coef, int class_offset, "
      "int ignore_index, bool need_logits_grad, bool need_temperature_grad) "
      "-> (Tensor grad_logits, Tensor t_rows)");
  //   shard_grad_: the same, the gradient written into the logits' buffer (contiguous).
  m.def(
      "shard_grad_(Tensor(a!) logits, Tensor target, Tensor? weight, Tensor lse, Tensor coef, "
      "Tensor? temperature_t, float temperature, float smooth_coef, int class_offset, "
      "int ignore_index, bool need_temperature_grad) -> Tensor t_rows");
  // ---------------------------------------------------------------- class-probability targets
  // Cross-entropy against floating targets t of the logits' shape, as F.cross_entropy with
  // class probabilities (docs/design.md §1 has the maths). logits (rows, C) with a
  // unit stride along C; target (rows, C) of the logits' dtype, or float32 with float16/bfloat16
  // logits (read in its own dtype, accumulated in float), on the logits' device, unit stride
  // along C (any row stride). Per row, q_c = (1 - eps) t_c + eps / C, u_c = w_c q_c, U = sum_c u_c:
  //   loss_i = sum_c u_c (lse_i - z_ic),   z = x / T,   a term with u_c == 0 is 0 (also at a
  //   masked logit, x = -inf: the limit of u log p, where PyTorch gives NaN).
  // No ignore_index. reduction mean divides by rows (as PyTorch for probability targets).
  //   loss: (rows,) for none, () otherwise; acc.
  //   lse:  (rows, 2) acc, [m, ls] as cross_entropy_fwd's (NaN for a row without a softmax).
  //   mass: (rows,) acc, U_i (saved for the backward, which needs it before the row's gradient).
  m.def(
      "soft_target_fwd(Tensor logits, Tensor target, Tensor? weight, Tensor? temperature_t, "
      "float temperature, float label_smoothing, int reduction) "
      "-> (Tensor loss, Tensor lse, Tensor mass)");
  // Backward: one read of the logits and of the target, one write of each requested gradient.
  //   grad_loss: (rows,) (any stride) for none, () otherwise.
  //   grad_logits: (rows, C) contiguous, logits' dtype, or (0,) when need_logits_grad is false.
  //   grad_target: (rows, C) contiguous, target's dtype, dL/dt_c = -(1 - eps) w_c log p_c times
  //     the upstream gradient (0 where (1 - eps) w_c == 0), or (0,) when not requested.
  //   grad_temperature: () in temperature_t's dtype (acc without it); zero when not requested.
  m.def(
      "soft_target_bwd(Tensor grad_loss, Tensor logits, Tensor target, Tensor? weight, Tensor lse, "
      "Tensor mass, Tensor? temperature_t, float temperature, float label_smoothing, "
      "int reduction, bool need_logits_grad, bool need_target_grad, bool need_temperature_grad) "
      "-> (Tensor grad_logits, Tensor grad_target, Tensor grad_temperature)");
  // ---------------------------------------------------------------- calibrators (CPU only)
  // Isotonic regression, one problem per row (softcal.nn.IsotonicCalibrator's fit; no CUDA
  // kernel: the calibrator fits on the CPU). x, y: (K, n) float64 CPU (x read at its strides),
  // x without NaN, y finite;
  // w: (K, n) float64 > 0, or None for weights 1. Row k: the non-decreasing least-squares fit of
  // y_k on x_k with weights w_k (points with equal x pooled; adjacent blocks with equal means
  // merged), as knots: each block gives (its smallest x, its mean) and, when it spans more than
  // one x, (its largest x, its mean); linear interpolation through them is the fit.
  //   knots_x, knots_v: (K, n) float64, row k's first counts[k] entries are its knots (x strictly
  //     increasing), the rest repeat the last knot; counts: (K,) int64 (0 only when n = 0);
  //   fitted: (K, n) float64, the fit's value at each point (its block's mean), x's order.
  m.def(
      "isotonic_fit(Tensor x, Tensor y, Tensor? w) -> (Tensor knots_x, Tensor knots_v, Tensor "
      "counts, Tensor fitted)");
}

}  // namespace softcal
