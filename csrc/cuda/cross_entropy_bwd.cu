// softcal CUDA: cross_entropy_bwd. One read of the logits, one write of the gradient, from the
// forward's [m, ls]. Implements docs/design.md's dL/dx_c = beta g (A p_c - (eps / C) w_c -
// (1 - eps) w_y [c == y]) and dL/dT = -beta g sum_c dL/dz_c z_c.
#include <torch/library.h>

#include "checks.h"
#include "cuda/ce_tile.cuh"

namespace softcal {
namespace cuda {
namespace {

// Per row dL/dx_c = beta g (A p_c - (eps / C) w_c - (1 - eps) w_y [c == y]) from the saved [m, ls];
// per block the sum of dL/dT = -beta g sum_c dL/dz_c z_c.
template <typename T, int TPR, Smoothing S, ClassWeights W, Softcap P>
__global__ void __launch_bounds__(kBlock<TPR>, kMinBlocks<TPR>)
    cross_entropy_bwd_kernel(const CEArgs<T> a) {
  using acc_t = at::opmath_type<T>;
  __shared__ Pair<double> sred[kWarps<TPR>];
  const CEConsts<acc_t, S> k(a.temp, a.eps, a.C);
  const acc_t zl = ce_zl(a);
  const acc_t weight_total = a.weight_total ? *a.weight_total : static_cast<acc_t>(a.C);
  const acc_t g0 = a.reduction != kNone ? ce_grad_loss(a, 0) : acc_t(0);
  const TGradScale t_scale =
      a.need_t ? ce_t_grad_scale<Pass::kBackward>(a, k.beta) : TGradScale{0.0, 0.0};
  double t_sum = 0.0;
  for_each_row<TPR>(a.rows, [&](int64_t row, bool active, int tid) {
    const int y = active ? load_target(a.target, row, a.ignore_index, a.C) : -1;
    const bool valid = y >= 0;
    const T* xr = a.logits + row * a.row_stride;
    T* gr = a.grad ? a.grad + row * static_cast<int64_t>(a.C) : nullptr;
    CEGrad<T, acc_t, S, W, P> f;
    f.cap = a.cap;
    f.need_t = a.need_t;
    f.row_max = 0;
    f.t_shift = 0;
    f.c.grad_scale = 0;
    if (valid) {
      const acc_t g = a.reduction == kNone ? ce_grad_loss(a, row) : g0;
      const acc_t w_y = a.weight ? a.weight[y] : acc_t(1);
      const acc_t m = a.lse_in[2 * row], ls = a.lse_in[2 * row + 1];
      f.setup(
          k.beta, m, ls,
          ce_coef<acc_t, S>(k.beta, a.eps, k.smooth_coef, weight_total, static_cast<acc_t>(a.C),
                            w_y, g, zl != acc_t(0) ? acc_t(2) * zl * (k.beta * m + ls) : acc_t(0)),
          a.weight, y, xr, gr);
      f.template walk<TPR>(xr, a.C, tid);
    } else if (active && gr) {
      fill_row<TPR>(gr, a.C, tid, T(0));
    }
    if (a.need_t) {
      const Pair<double> t = group_allreduce<TPR>(Pair<double>{f.t1, f.t0}, Plus(), sred);
      if (valid && tid == 0)
        t_sum += f.temperature_grad(t, t_scale, ce_t_grad_row<Pass::kBackward>(a, row));
    }
  });
  if (a.need_t) store_block_sums<kBlock<TPR>, 3>(a.parts, {0.0, 0.0, t_sum});
}

struct BwdRows {
  template <typename T, int TPR, Smoothing S, ClassWeights W, Softcap P>
  using kernel = KernelRef<&cross_entropy_bwd_kernel<T, TPR, S, W, P>>;
};

std::tuple<at::Tensor, at::Tensor> cross_entropy_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& denom,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_logits_grad, bool need_temperature_grad,
    double z_loss, double softcap) {
  checks::cross_entropy_bwd(Backend::kCuda, grad_loss, logits, target, weight, lse, denom,
                            temperature_t, temperature, label_smoothing, reduction);
  checks::llm_terms(Op::kCrossEntropyBwd, logits, z_loss, softcap);
  const int64_t rows = logits.size(0);
  c10::cuda::CUDAGuard guard(logits.device());
  const CEInputs in = ce_inputs(logits, target, weight);
  // As the CPU op: no temperature tensor, no T-gradient (grad_temperature stays 0).
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  at::Tensor grad = need_logits_grad ? at::empty({rows, logits.size(1)}, logits.options())
                                     : at::empty({0}, logits.options());
  const at::ScalarType gt_type = temp_grad_type(temperature_t, logits.scalar_type());
  // empty only when the kernels below write it (the early return for C == 0 must give 0)
  at::Tensor grad_t = (need_t && rows > 0 && logits.size(1) > 0)
                          ? at::empty({}, logits.options().dtype(gt_type))
                          : at::zeros({}, logits.options().dtype(gt_type));
  if (rows == 0 || (!need_logits_grad && !need_t) || logits.size(1) == 0) return {grad, grad_t};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor denom_c = denom.reshape({});
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_bwd_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto a = ce_args<scalar_t>(logits, in, temperature_t, temperature, label_smoothing,
                                   ignore_index, reduction);
        std::vector<at::Tensor> keep;
        set_llm_terms(a, logits, z_loss, softcap, false, reduction, &denom_c, keep, stream);
        const bool tile = use_tile<scalar_t>(logits);
        const Launch l = tile ? tile_launch<scalar_t>(rows, a.C)
                              : plan(Walk::kStream, rows, a.C, vec_size<scalar_t>());
        at::Tensor parts =
            need_t ? at::empty({3 * l.grid}, logits.options().dtype(at::kDouble)) : at::Tensor();
        at::Tensor weight_total;
        if (a.weight && label_smoothing > 0) {
          weight_total = ce_weight_total(logits, a, stream);
          a.weight_total = weight_total.data_ptr<acc_t>();
        }
        a.grad_loss = any_in(grad_loss, reduction == kNone ? grad_loss.stride(0) : 0);
        a.lse_in = lse_c.data_ptr<acc_t>();
        a.denom = denom_c.data_ptr<acc_t>();
        a.grad = need_logits_grad ? grad.data_ptr<scalar_t>() : nullptr;
        a.need_t = need_t;
        a.parts = need_t ? parts.data_ptr<double>() : nullptr;
        launch_ce<scalar_t, Pass::kBackward, BwdRows>(a, l, tile, label_smoothing, softcap, stream);
        if (need_t) {
          launch_ce_final(parts, l.grid,
                          CEFinal<acc_t>{AnyOut{}, 0, nullptr, nullptr, any_out(grad_t)}, stream);
        }
      });
  return {grad, grad_t};
}

}  // namespace
}  // namespace cuda
}  // namespace softcal

TORCH_LIBRARY_IMPL(softcal, CUDA, m) {
  m.impl("cross_entropy_bwd", &softcal::cuda::cross_entropy_bwd_cuda);
}
