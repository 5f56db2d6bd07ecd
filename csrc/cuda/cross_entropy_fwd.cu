// softcal CUDA: cross_entropy_fwd. One read of the logits: per row the loss and [m, ls], per block
// the partial sums of the loss and of w_y, then one block reduces them in a fixed order.
// Implements docs/design.md's loss_i = (1 - eps) w_y (lse - z_y) + (eps / C) sum_c w_c (lse - z_c).
#include <torch/library.h>

#include "checks.h"
#include "cuda/ce_tile.cuh"

namespace softcal {
namespace cuda {
namespace {

// Per row the loss and [m, ls], per block the sums of the loss and of w_y. Implements
// docs/design.md's loss = (1 - eps) w_y (lse - z_y) + (eps / C) sum_c w_c (lse - z_c) with phase 1
// of ce_row.cuh.
template <typename T, int TPR, Smoothing S, ClassWeights W, Softcap P>
__global__ void __launch_bounds__(kBlock<TPR>, kMinBlocks<TPR>)
    cross_entropy_fwd_kernel(const CEArgs<T> a) {
  using acc_t = at::opmath_type<T>;
  __shared__ CEState<acc_t> sred[kWarps<TPR>];
  const CEConsts<acc_t, S> k(a.temp, a.eps, a.C);
  const acc_t zl = ce_zl(a);
  double loss_sum = 0.0, w_sum = 0.0;
  for_each_row<TPR>(a.rows, [&](int64_t row, bool active, int tid) {
    const int y = active ? load_target(a.target, row, a.ignore_index, a.C) : -1;
    const bool valid = y >= 0;
    const bool read = valid || (a.lse_all && active && a.target[row] == a.ignore_index);
    const T* xr = a.logits + row * a.row_stride;
    CEAccum<T, acc_t, S, W, P> acc{ce_init<acc_t>(), k.beta_log2e, a.weight, y, a.cap};
    if (read) for_each_vec<TPR>(xr, a.C, tid, acc);
    const CEState<acc_t> st = group_allreduce<TPR>(acc.st, CEMerge<acc_t>{k.beta_log2e}, sred);
    if (active && tid == 0) {
      acc_t loss = 0, lse, ls = 0, m = 0;
      if (valid) {
        const acc_t w_y = a.weight ? a.weight[y] : acc_t(1);
        loss = ce_row_loss<acc_t, S>(st, k.beta, a.eps, k.smooth_coef, w_y, lse, ls, zl);
        m = ls == ls ? st.m : ls;  // NaN for rows without a softmax
        loss_sum += static_cast<double>(loss);
        w_sum += static_cast<double>(w_y);
      } else if (read) {  // an ignored row's [m, ls] (lse_all)
        ce_row_lse(st, m, ls);
      }
      a.lse[2 * row] = m;
      a.lse[2 * row + 1] = ls;
      if (a.loss_rows) a.loss_rows[row] = static_cast<loss_t<T>>(loss);
    }
  });
  store_block_sums<kBlock<TPR>, 3>(a.parts, {loss_sum, w_sum, 0.0});
}

struct FwdRows {
  template <typename T, int TPR, Smoothing S, ClassWeights W, Softcap P>
  using kernel = KernelRef<&cross_entropy_fwd_kernel<T, TPR, S, W, P>>;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, double z_loss, double softcap, bool lse_all_rows) {
  checks::cross_entropy(Backend::kCuda, Op::kCrossEntropy, logits, target, weight, temperature_t,
                        temperature, label_smoothing, reduction);
  checks::llm_terms(Op::kCrossEntropy, logits, z_loss, softcap);
  c10::cuda::CUDAGuard guard(logits.device());
  const CEInputs in = ce_inputs(logits, target, weight);
  const at::ScalarType acc = acc_type(logits.scalar_type());
  at::Tensor loss = ce_loss_tensor(logits, reduction);
  at::Tensor lse = at::empty({logits.size(0), 2}, logits.options().dtype(acc));
  at::Tensor denom = at::empty({}, logits.options().dtype(acc));
  const int64_t rows = logits.size(0);
  if (rows == 0) {
    denom.zero_();
    return {loss, lse, denom};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_fwd_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto a = ce_args<scalar_t>(logits, in, temperature_t, temperature, label_smoothing,
                                   ignore_index, reduction);
        std::vector<at::Tensor> keep;
        set_llm_terms(a, logits, z_loss, softcap, lse_all_rows, reduction, nullptr, keep, stream);
        const bool tile = use_tile<scalar_t>(logits);
        const Launch l = tile ? tile_launch<scalar_t>(rows, a.C)
                              : plan(Walk::kStream, rows, a.C, vec_size<scalar_t>());
        at::Tensor parts = at::empty({3 * l.grid}, logits.options().dtype(at::kDouble));
        a.loss_rows = reduction == kNone ? loss.data_ptr<loss_t<scalar_t>>() : nullptr;
        a.lse = lse.data_ptr<acc_t>();
        a.parts = parts.data_ptr<double>();
        launch_ce<scalar_t, Pass::kForward, FwdRows>(a, l, tile, label_smoothing, softcap, stream);
        const CEFinal<acc_t> w{reduction == kNone ? AnyOut{} : any_out(loss),
                               static_cast<int>(reduction), denom.data_ptr<acc_t>(), nullptr,
                               AnyOut{}};
        launch_ce_final(parts, l.grid, w, stream);
      });
  return {loss, lse, denom};
}

}  // namespace
}  // namespace cuda
}  // namespace softcal

TORCH_LIBRARY_IMPL(softcal, CUDA, m) {
  m.impl("cross_entropy_fwd", &softcal::cuda::cross_entropy_fwd_cuda);
}
