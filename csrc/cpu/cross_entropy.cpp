// softcal CPU: cross_entropy_fwd, cross_entropy_bwd, cross_entropy_fused, cross_entropy_fused_
// (schemas and contracts in csrc/schemas.h, checks in csrc/checks.h). Each op is one pass over
// blocks of rows (docs/design.md §4): the tile path for C <= 32 with float accumulation
// (cpu/ce_tile.h), else the row path (cpu/ce_row.h); both evaluate the row terms of ce_row.h:
//   forward   loss_i = (1 - eps) w_y (lse - z_y) + (eps / C) sum_c w_c (lse - z_c)       (§1)
//   backward  dL/dx_c = beta g (A p_c - (eps / C) w_c - (1 - eps) w_y [c == y]), and dL/dT
//   fused     both in one read of the logits, the gradient for g = 1 (1 / denom for mean)
// with the LLM terms (schemas.h): + zl lse^2 on the loss and 2 zl lse on A (z-loss, a row term),
// the logits capped c tanh(x / c) as they are read (soft-cap, an element map); each a
// compile-time variant of both paths (run_pass switches once).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "common.h"
#include "cpu/ce_row_path.h"
#include "cpu/ce_tile.h"
#include "cpu/host.h"
#include "cpu/rows.h"

namespace softcal {
namespace cpu {
namespace {

// Runs pass kPass over every row, the call's variants (ZLoss, Softcap) switched once
// (llm_switch); returns the sums of each block of reduce_block_rows(rows) rows (a function of the
// row count only: the same bits for any thread count).
template <Pass kPass, typename scalar_t>
std::vector<BlockSums> run_pass(const CEParams<at::opmath_type<scalar_t>>& p,
                                const CEIo<scalar_t, at::opmath_type<scalar_t>>& io) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bs = reduce_block_rows(io.rows);
  const int64_t blocks = (io.rows + bs - 1) / bs;
  std::vector<BlockSums> parts(blocks);
  const int64_t grain = std::max<int64_t>(1, row_grain(p.C) / bs);
  // the backward of dL/dT alone (no logits gradient) takes the row path
  const bool tiles = use_tiles<scalar_t>(p.C) && (kPass != Pass::kBackward || io.grad != nullptr);
  llm_switch(p, [&](auto z, auto cap) {
    constexpr ZLoss kZ = decltype(z)::value;
    constexpr Softcap kCap = decltype(cap)::value;
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      if constexpr (std::is_same_v<acc_t, float>) {
        if (tiles) {
          ce_tile_blocks<kPass, kZ, kCap>(p, io, bs, b0, b1, parts.data());
          return;
        }
      }
      RowScratch<scalar_t, acc_t> scratch(p.C, kCap);
      for_block_groups(io.rows, bs, b0, b1, row_group_size<kPass, kCap, scalar_t>(p.C),
                       parts.data(), [&](int64_t i0, int64_t ng, int64_t end, BlockSums& sums) {
                         ce_row_group<kPass, kZ, kCap>(p, io, i0, ng, end, scratch, sums);
                       });
    });
  });
  return parts;
}

// The LLM terms of a call (schemas.h).
struct LlmTerms {
  double z_loss = 0;
  double softcap = 0;
  bool lse_all = false;
  int64_t reduction = kNone;
};

// The number of non-ignored rows (the z-loss's divisor for mean).
inline double count_rows(const int64_t* target, int64_t rows, int64_t ignore_index) {
  int64_t n = 0;
  for (int64_t i = 0; i < rows; ++i) n += target[i] != ignore_index;
  return static_cast<double>(n);
}

// Dispatches on the logits' dtype and runs pass kPass: the call's constants (the class weights
// converted once), for the forward and fused passes the targets checked and denom summed (into
// *denom; the backward reads it), the z-loss's coefficient (for mean: z_loss denom / count, so
// that the loss's division by denom leaves the z-loss divided by the count of rows), then
// set_io(io, denom) sets the pass's inputs and outputs (a generic lambda: io is a
// CEIo<scalar_t, acc_t>). Returns the blocks' sums.
template <Pass kPass, typename SetIo>
std::vector<BlockSums> dispatch_pass(Op op, const at::Tensor& logits, const at::Tensor& target,
                                     const std::optional<at::Tensor>& weight, double T, double eps,
                                     int64_t ignore_index, double* denom, SetIo&& set_io,
                                     const LlmTerms& llm = {}) {
  const at::Tensor tgt = target.contiguous();
  std::vector<BlockSums> parts;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "softcal_cross_entropy_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        std::vector<acc_t> wbuf;
        auto p = make_params<acc_t>(logits.size(1), tgt, weight, wbuf, T, eps, ignore_index,
                                    llm.z_loss, llm.softcap);
        p.lse_all = llm.lse_all;
        if constexpr (kPass != Pass::kBackward) {
          *denom = check_targets_and_denom(p, logits.size(0), op_name(op));
        }
        if (p.zloss == ZLoss::kOn && llm.reduction == kMean && p.w != nullptr) {
          // (without weights denom is the count itself)
          const double count = count_rows(p.target, logits.size(0), ignore_index);
          const double den =
              static_cast<double>(static_cast<acc_t>(*denom));  // as the loss divides
          p.zl = count > 0 ? static_cast<acc_t>(llm.z_loss * den / count) : acc_t(0);
        }
        CEIo<scalar_t, acc_t> io;
        io.x = logits.const_data_ptr<scalar_t>();
        io.row_stride = logits.stride(0);
        io.rows = logits.size(0);
        io.op = op_name(op);
        set_io(io, *denom);
        parts = run_pass<kPass>(p, io);
      });
  return parts;
}

// The acc element type of a CEIo (in the generic lambdas of dispatch_pass).
template <typename Io>
using io_acc_t = std::remove_pointer_t<decltype(std::declval<Io>().loss_rows)>;
template <typename Io>
using io_scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(std::declval<Io>().x)>>;

// The loss (acc): the per-row losses for reduction none, else the sum of the blocks' sums in
// order, divided by denom for mean (0/0 = NaN when every row is ignored, as PyTorch).
at::Tensor loss_output(const at::Tensor& loss_rows, const std::vector<BlockSums>& parts,
                       int64_t reduction, double denom) {
  if (reduction == kNone) return loss_rows;
  double total = 0;
  for (const BlockSums& s : parts) total += s.loss;
  if (reduction == kMean) total /= denom;
  return at::scalar_tensor(total, loss_rows.options());
}

// The T-gradient in t_dtype: the blocks' sums in order (zero when not requested).
at::Tensor grad_t_output(const std::vector<BlockSums>& parts, bool need_t,
                         const at::TensorOptions& options) {
  double total = 0;
  if (need_t)
    for (const BlockSums& s : parts) total += s.grad_t;
  return at::scalar_tensor(total, options);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, double z_loss, double softcap, bool lse_all_rows) {
  constexpr Op op = Op::kCrossEntropy;
  checks::cross_entropy(Backend::kCpu, op, logits, target, weight, temperature_t, temperature,
                        label_smoothing, reduction);
  checks::llm_terms(op, logits, z_loss, softcap);
  const double T = checks::host_temperature(op, temperature_t, temperature);
  const int64_t rows = logits.size(0);
  const auto acc_options = logits.options().dtype(acc_type(logits.scalar_type()));
  at::Tensor lse = at::empty({rows, 2}, acc_options);
  at::Tensor loss_rows = at::empty({reduction == kNone ? rows : 0}, acc_options);
  double denom = 0;
  const auto parts = dispatch_pass<Pass::kForward>(
      op, logits, target, weight, T, label_smoothing, ignore_index, &denom,
      [&](auto& io, double) {
        using acc_t = io_acc_t<decltype(io)>;
        io.lse_out = lse.data_ptr<acc_t>();
        io.loss_rows = reduction == kNone ? loss_rows.data_ptr<acc_t>() : nullptr;
      },
      LlmTerms{z_loss, softcap, lse_all_rows, reduction});
  // mean divides by denom in acc, the value the backward reads back
  const at::Tensor denom_t = at::scalar_tensor(denom, acc_options);
  return {loss_output(loss_rows, parts, reduction, denom_t.item<double>()), lse, denom_t};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& denom,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_logits_grad, bool need_temperature_grad,
    double z_loss, double softcap) {
  constexpr Op op = Op::kCrossEntropyBwd;
  checks::cross_entropy_bwd(Backend::kCpu, grad_loss, logits, target, weight, lse, denom,
                            temperature_t, temperature, label_smoothing, reduction);
  checks::llm_terms(op, logits, z_loss, softcap);
  const double T = checks::host_temperature(op, temperature_t, temperature);
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  at::Tensor grad = need_logits_grad ? new_grad_buffer(logits) : logits.new_empty({0});
  // the upstream gradient in acc: per row for reduction none, else one value (/ denom for mean)
  const at::Tensor g_rows =
      reduction == kNone ? grad_loss.to(acc_type(logits.scalar_type())) : at::Tensor();
  double g_scalar = 0;
  if (reduction != kNone) {
    g_scalar = grad_loss.item<double>();
    if (reduction == kMean) g_scalar /= denom.item<double>();
  }
  const at::Tensor lse_c = lse.contiguous();
  double denom_v = denom.item<double>();  // the z-loss's coefficient for mean (dispatch_pass)
  const auto parts = dispatch_pass<Pass::kBackward>(
      op, logits, target, weight, T, label_smoothing, ignore_index, &denom_v,
      [&](auto& io, double) {
        using acc_t = io_acc_t<decltype(io)>;
        using scalar_t = io_scalar_t<decltype(io)>;
        io.lse_in = lse_c.const_data_ptr<acc_t>();
        if (g_rows.defined()) {
          io.g.per_row = g_rows.const_data_ptr<acc_t>();
          io.g.stride = g_rows.stride(0);
        } else {
          io.g.scalar = static_cast<acc_t>(g_scalar);
        }
        io.need_t = need_t;
        io.grad = need_logits_grad ? grad.data_ptr<scalar_t>() : nullptr;
      },
      LlmTerms{z_loss, softcap, false, reduction});
  const auto t_dtype = temp_grad_type(temperature_t, logits.scalar_type());
  return {grad, grad_t_output(parts, need_t, logits.options().dtype(t_dtype))};
}

// The fused pass: the loss and the gradient (upstream gradient 1) into grad, which may be the
// logits' own buffer (in place: each row, each tile, is read completely before its gradient is
// written). Returns (loss, grad_temperature): per row for reduction none, else summed.
std::tuple<at::Tensor, at::Tensor> fused_pass(
    Op op, const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& temperature_t,
    double temperature, double label_smoothing, int64_t ignore_index, int64_t reduction,
    bool need_temperature_grad, double z_loss, double softcap,
    const std::optional<at::Tensor>& lse_out) {
  checks::llm_terms(op, logits, z_loss, softcap, lse_out);
  const double T = checks::host_temperature(op, temperature_t, temperature);
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  const int64_t rows = logits.size(0);
  const bool per_row = reduction == kNone;
  const auto acc_options = logits.options().dtype(acc_type(logits.scalar_type()));
  const auto t_options =
      logits.options().dtype(temp_grad_type(temperature_t, logits.scalar_type()));
  at::Tensor loss_rows = at::empty({per_row ? rows : 0}, acc_options);
  at::Tensor grad_t_rows = at::empty({per_row && need_t ? rows : 0}, acc_options);
  double denom = 0;
  const auto parts = dispatch_pass<Pass::kFused>(
      op, logits, target, weight, T, label_smoothing, ignore_index, &denom,
      [&](auto& io, double denom_) {
        using acc_t = io_acc_t<decltype(io)>;
        using scalar_t = io_scalar_t<decltype(io)>;
        io.g.scalar = reduction == kMean ? static_cast<acc_t>(1.0 / denom_) : acc_t(1);
        io.need_t = need_t;
        io.grad = const_cast<scalar_t*>(grad.const_data_ptr<scalar_t>());
        io.loss_rows = per_row ? loss_rows.data_ptr<acc_t>() : nullptr;
        io.grad_t_rows = per_row && need_t ? grad_t_rows.data_ptr<acc_t>() : nullptr;
        io.lse_out = lse_out.has_value() ? lse_out->data_ptr<acc_t>() : nullptr;
      },
      LlmTerms{z_loss, softcap, lse_out.has_value(), reduction});
  if (per_row) {
    return {loss_rows, need_t ? grad_t_rows.to(t_options.dtype()) : at::zeros({rows}, t_options)};
  }
  return {loss_output(loss_rows, parts, reduction, denom), grad_t_output(parts, need_t, t_options)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fused_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_temperature_grad, double z_loss,
    double softcap) {
  constexpr Op op = Op::kCrossEntropyFused;
  checks::cross_entropy(Backend::kCpu, op, logits, target, weight, temperature_t, temperature,
                        label_smoothing, reduction);
  at::Tensor grad = new_grad_buffer(logits);
  auto [loss, grad_t] =
      fused_pass(op, logits, grad, target, weight, temperature_t, temperature, label_smoothing,
                 ignore_index, reduction, need_temperature_grad, z_loss, softcap, std::nullopt);
  return {loss, grad, grad_t};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fused_inplace_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_temperature_grad, double z_loss,
    double softcap, const std::optional<at::Tensor>& lse_out) {
  constexpr Op op = Op::kCrossEntropyFusedInplace;
  checks::cross_entropy(Backend::kCpu, op, logits, target, weight, temperature_t, temperature,
                        label_smoothing, reduction);
  return fused_pass(op, logits, logits, target, weight, temperature_t, temperature, label_smoothing,
                    ignore_index, reduction, need_temperature_grad, z_loss, softcap, lse_out);
}

}  // namespace

TORCH_LIBRARY_IMPL(softcal, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd_cpu);
  m.impl("cross_entropy_fused", &cross_entropy_fused_cpu);
  m.impl("cross_entropy_fused_", &cross_entropy_fused_inplace_cpu);
}

}  // namespace cpu
}  // namespace softcal
