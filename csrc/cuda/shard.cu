// softcal CUDA: the vocabulary-parallel pieces, shard_stats and shard_grad(_). A rank holds the
// logits of the classes [off, off + C_local); softcal.distributed combines the per-row statistics
// of every slice into the loss and hands each rank the global [M, LS] and the row's coefficients
// for its slice of the gradient (contracts: csrc/schemas.h; maths: docs/design.md).
// Both reuse the cross-entropy row (ce_row.cuh): phase 1's state written as [m, log s, d, xy];
// phase 2 with the caller's coefficients. One read of the slice for the stats, one read and one
// write for the gradient; the streaming launch of the policy.
#include <torch/library.h>

#include "checks.h"
#include "cuda/cross_entropy.cuh"

namespace softcal {
namespace cuda {
namespace {

// The local target of a row: its index in the slice, -1 when it is in another slice, -2 when
// the row is ignored.
__device__ __forceinline__ int local_target(const int64_t* target, int64_t row,
                                            int64_t ignore_index, int64_t off, int C) {
  const int64_t y = target[row];
  if (y == ignore_index) return -2;
  const int64_t l = y - off;
  return (l >= 0 && l < C) ? static_cast<int>(l) : -1;
}

template <typename T>
struct ShardArgs : CERows<T> {
  using acc_t = at::opmath_type<T>;
  int64_t off;        // the slice's first class
  acc_t* stats;       // (rows, 4)
  const acc_t* lse;   // (rows, 2): M, LS
  const acc_t* coef;  // (rows, 3): g, A, ty
  acc_t smooth_coef;
  T* grad;        // (rows, C) contiguous, or nullptr
  acc_t* t_rows;  // (rows, 2), or nullptr
};

// Per row of the slice [m, log s, d, x_y] (phase 1 of the cross-entropy, csrc/schemas.h's
// contract).
template <typename T, int TPR, Smoothing S, ClassWeights W>
__global__ void __launch_bounds__(kBlock<TPR>, kMinBlocks<TPR>)
    shard_stats_kernel(const ShardArgs<T> a) {
  using acc_t = at::opmath_type<T>;
  __shared__ CEState<acc_t> sred[kWarps<TPR>];
  const acc_t beta_log2e = load_beta<acc_t>(a.temp) * static_cast<acc_t>(kLog2e);
  for_each_row<TPR>(a.rows, [&](int64_t row, bool active, int tid) {
    const int y = active ? local_target(a.target, row, a.ignore_index, a.off, a.C) : -2;
    const T* xr = a.logits + row * a.row_stride;
    CEAccum<T, acc_t, S, W> acc{ce_init<acc_t>(), beta_log2e, a.weight, y};
    for_each_vec<TPR>(xr, y > -2 ? a.C : 0, tid, acc);
    const CEState<acc_t> st = group_allreduce<TPR>(acc.st, CEMerge<acc_t>{beta_log2e}, sred);
    if (active && tid == 0) {
      acc_t* o = a.stats + 4 * row;
      if (y == -2) {
        o[0] = o[1] = o[2] = o[3] = acc_t(0);
      } else {
        const bool any = st.m > neg_inf<acc_t>() || st.s != st.s;  // a NaN sum propagates
        o[0] = st.m;
        o[1] = any ? flog_sum(st.s) : neg_inf<acc_t>();
        // an all -inf slice row: no softmax mass, an infinite smoothing sum (as PyTorch's loss); an
        // empty slice (C_local = 0): nothing to smooth over
        const acc_t none = a.C > 0 ? std::numeric_limits<acc_t>::infinity() : acc_t(0);
        o[2] = S == Smoothing::kOn ? (any ? st.d : none) : acc_t(0);
        o[3] = y >= 0 ? st.xy : acc_t(0);
      }
    }
  });
}

// Per row of the slice beta g dz_c (phase 2 of the cross-entropy with the caller's global [M, LS]
// and [g, A, ty]) and the T-gradient's two sums.
template <typename T, int TPR, Smoothing S, ClassWeights W>
__global__ void __launch_bounds__(kBlock<TPR>, kMinBlocks<TPR>)
    shard_grad_kernel(const ShardArgs<T> a) {
  using acc_t = at::opmath_type<T>;
  __shared__ Pair<double> sred[kWarps<TPR>];
  const acc_t beta = load_beta<acc_t>(a.temp);
  const bool need_t = a.t_rows != nullptr;
  for_each_row<TPR>(a.rows, [&](int64_t row, bool active, int tid) {
    const int y = active ? local_target(a.target, row, a.ignore_index, a.off, a.C) : -2;
    const T* xr = a.logits + row * a.row_stride;
    T* gr = a.grad ? a.grad + row * static_cast<int64_t>(a.C) : nullptr;
    CEGrad<T, acc_t, S, W> f;
    f.need_t = need_t;
    if (y > -2) {
      const acc_t* cf = a.coef + 3 * row;  // g, A, ty
      const acc_t ls = a.lse[2 * row + 1];
      f.setup(beta, a.lse[2 * row], ls,
              CECoef<acc_t>{cf[1], cf[2], cf[1] - cf[2], a.smooth_coef, beta * cf[0]}, a.weight, y,
              xr, gr);
      f.t_shift = ls;  // the contract: sums of dz (beta (x - M) - LS)
      f.template walk<TPR>(xr, a.C, tid);
    } else if (active && gr) {
      fill_row<TPR>(gr, a.C, tid, T(0));
    }
    if (need_t) {
      const Pair<double> t = group_allreduce<TPR>(Pair<double>{f.t1, f.t0}, Plus(), sred);
      if (active && tid == 0) {
        a.t_rows[2 * row] = y > -2 ? static_cast<acc_t>(t.a) : acc_t(0);
        a.t_rows[2 * row + 1] = y > -2 ? static_cast<acc_t>(t.b) : acc_t(0);
      }
    }
  });
}

template <typename T>
ShardArgs<T> shard_args(const at::Tensor& logits, const CEInputs& in,
                        const std::optional<at::Tensor>& temperature_t, double temperature,
                        int64_t class_offset, int64_t ignore_index) {
  ShardArgs<T> a{};
  set_rows(a, logits, in, temperature_t, temperature, ignore_index);
  a.off = class_offset;
  return a;
}

// Launches shard_stats_kernel or (GRAD) shard_grad_kernel on the streaming shape.
template <typename T, bool GRAD>
void launch_shard(const ShardArgs<T>& a, bool smoothing, cudaStream_t stream) {
  const Launch l = plan(Walk::kStream, a.rows, a.C, vec_size<T>());
  ce_switch(smoothing ? 1.0 : 0.0, a.weight != nullptr, [&](auto sc, auto wc) {
    launch_rows(
        l, stream,
        [](auto tpr) {
          constexpr int TPR = decltype(tpr)::value;
          constexpr Smoothing S = decltype(sc)::value;
          constexpr ClassWeights W = decltype(wc)::value;
          if constexpr (GRAD)
            return KernelRef<&shard_grad_kernel<T, TPR, S, W>>{};
          else
            return KernelRef<&shard_stats_kernel<T, TPR, S, W>>{};
        },
        a);
  });
}

at::Tensor shard_grad_impl(const at::Tensor& logits, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                           const at::Tensor& coef, const std::optional<at::Tensor>& temperature_t,
                           double temperature, double smooth_coef, int64_t class_offset,
                           int64_t ignore_index, at::Tensor* grad, bool need_t) {
  const int64_t rows = logits.size(0);
  const at::ScalarType acc = acc_type(logits.scalar_type());
  c10::cuda::CUDAGuard guard(logits.device());
  const CEInputs in = ce_inputs(logits, target, weight);
  // written by the kernel only when it runs: zeros for an empty slice (C_local = 0) or no request
  const bool runs = rows > 0 && logits.size(1) > 0 && (grad != nullptr || need_t);
  at::Tensor t_rows = (need_t && runs) ? at::empty({rows, 2}, logits.options().dtype(acc))
                                       : at::zeros({rows, 2}, logits.options().dtype(acc));
  if (!runs) return t_rows;
  const at::Tensor lse_c = lse.contiguous(), coef_c = coef.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "shard_grad_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto a = shard_args<scalar_t>(logits, in, temperature_t, temperature, class_offset,
                                      ignore_index);
        a.lse = lse_c.data_ptr<acc_t>();
        a.coef = coef_c.data_ptr<acc_t>();
        a.smooth_coef = static_cast<acc_t>(smooth_coef);
        a.grad = grad ? grad->data_ptr<scalar_t>() : nullptr;
        a.t_rows = need_t ? t_rows.data_ptr<acc_t>() : nullptr;
        launch_shard<scalar_t, true>(a, smooth_coef > 0, stream);
      });
  return t_rows;
}

at::Tensor shard_stats_cuda(const at::Tensor& logits, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& temperature_t, double temperature,
                            int64_t class_offset, int64_t ignore_index, bool smoothing) {
  checks::shard_stats(Backend::kCuda, logits, target, weight, temperature_t, temperature,
                      class_offset);
  c10::cuda::CUDAGuard guard(logits.device());
  const CEInputs in = ce_inputs(logits, target, weight);
  const int64_t rows = logits.size(0);
  at::Tensor stats = at::empty({rows, 4}, logits.options().dtype(acc_type(logits.scalar_type())));
  if (rows == 0) return stats;  // an empty slice (C_local = 0) runs the kernel: it reads no logit
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "shard_stats_cuda", [&] {
        auto a = shard_args<scalar_t>(logits, in, temperature_t, temperature, class_offset,
                                      ignore_index);
        a.stats = stats.data_ptr<at::opmath_type<scalar_t>>();
        launch_shard<scalar_t, false>(a, smoothing, stream);
      });
  return stats;
}

std::tuple<at::Tensor, at::Tensor> shard_grad_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& lse, const at::Tensor& coef, const std::optional<at::Tensor>& temperature_t,
    double temperature, double smooth_coef, int64_t class_offset, int64_t ignore_index,
    bool need_logits_grad, bool need_temperature_grad) {
  checks::shard_grad(Backend::kCuda, Op::kShardGrad, logits, target, weight, lse, coef,
                     temperature_t, temperature, smooth_coef, class_offset);
  at::Tensor grad = need_logits_grad ? at::empty({logits.size(0), logits.size(1)}, logits.options())
                                     : at::empty({0}, logits.options());
  at::Tensor t_rows = shard_grad_impl(logits, target, weight, lse, coef, temperature_t, temperature,
                                      smooth_coef, class_offset, ignore_index,
                                      need_logits_grad ? &grad : nullptr, need_temperature_grad);
  return {grad, t_rows};
}

at::Tensor shard_grad_inplace_cuda(const at::Tensor& logits, const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                   const at::Tensor& coef,
                                   const std::optional<at::Tensor>& temperature_t,
                                   double temperature, double smooth_coef, int64_t class_offset,
                                   int64_t ignore_index, bool need_temperature_grad) {
  checks::shard_grad(Backend::kCuda, Op::kShardGradInplace, logits, target, weight, lse, coef,
                     temperature_t, temperature, smooth_coef, class_offset);
  at::Tensor grad = logits;
  return shard_grad_impl(logits, target, weight, lse, coef, temperature_t, temperature, smooth_coef,
                         class_offset, ignore_index, &grad, need_temperature_grad);
}

}  // namespace
}  // namespace cuda
}  // namespace softcal

TORCH_LIBRARY_IMPL(softcal, CUDA, m) {
  m.impl("shard_stats", &softcal::cuda::shard_stats_cuda);
  m.impl("shard_grad", &softcal::cuda::shard_grad_cuda);
  m.impl("shard_grad_", &softcal::cuda::shard_grad_inplace_cuda);
}
