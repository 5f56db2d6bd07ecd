// softcal CUDA: the vocabulary-parallel pieces, shard_stats and shard_grad(_).
//
// A rank holds the logits of a slice of the classes, [off, off + C_local). softcal.distributed
// computes the loss of the whole vocabulary from per-row statistics of each slice (one all-reduce
// of the row maxima, one of the packed per-row sums), then each rank computes its own slice of the
// gradient from the global [M, LS]: O(rows) communication, never the logits. The schemas and the
// exact contracts are in csrc/schemas.h; the maths of the loss in csrc/common.h.
//
// Both kernels reuse the row machinery of the cross-entropy (csrc/cuda/tsce.cuh):
//  * stats: the forward's per-thread state (CEAccum: m, s, d, wc, xy in units of the raw logits,
//    merged exactly across the group), written per row as [m, log s, d, xy];
//  * grad: the backward's element functor (CEGrad) with the row's coefficients given by the
//    caller: p = exp2(beta log2(e) (x - M) - LS log2(e)), exact at the row maximum; the target's
//    element (when it is in the slice) is formed with expm1 as in the backward.
// One read of the slice for the stats; one read and one write for the gradient. Launch shapes:
// the streaming shape of common.cuh (pick_stream_tpr), no host synchronisation.
#include <torch/library.h>

#include "cuda/tsce.cuh"
#include "shard.h"

namespace softcal {
namespace cuda {
namespace {

// The local target of a row: its index in the slice, -1 when it is in another slice, -2 when
// the row is ignored.
__device__ __forceinline__ int local_target(const int64_t* target, int64_t row, int64_t ignore_index,
                                            int64_t off, int C) {
  const int64_t y = target[row];
  if (y == ignore_index) return -2;
  const int64_t l = y - off;
  return (l >= 0 && l < C) ? static_cast<int>(l) : -1;
}

template <typename T>
struct ShardArgs {
  const T* logits;
  int64_t row_stride;
  int64_t rows;
  int C;
  const int64_t* target;
  const T* weight;
  int64_t ignore_index;
  int64_t off;
  TempArg temp;
  bool smoothing;
  at::opmath_type<T>* stats;       // (rows, 4)
  const at::opmath_type<T>* lse;   // (rows, 2): M, LS
  const at::opmath_type<T>* coef;  // (rows, 3): g, A, ty
  at::opmath_type<T> smooth_coef;
  T* grad;                         // (rows, C) contiguous, or nullptr
  at::opmath_type<T>* t_rows;      // (rows, 2), or nullptr
};

template <typename T, int TPR, int KIND>
__global__ void __launch_bounds__(block_for(TPR), min_blocks_for(block_for(TPR))) shard_stats_kernel(const ShardArgs<T> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int BLOCK = block_for(TPR);
  constexpr int RPB = BLOCK / TPR;
  __shared__ CEState<acc_t> sred[BLOCK / kWarp];
  const int tid = threadIdx.x % TPR;
  const int grp = threadIdx.x / TPR;
  const acc_t beta = load_beta<acc_t>(a.temp);
  const acc_t bl2 = beta * static_cast<acc_t>(kLog2e);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * RPB; base < a.rows;
       base += static_cast<int64_t>(gridDim.x) * RPB) {
    const int64_t row = base + grp;
    const bool active = row < a.rows;
    const int y = active ? local_target(a.target, row, a.ignore_index, a.off, a.C) : -2;
    const T* xr = a.logits + row * a.row_stride;
    CEAccum<T, acc_t, KIND> acc{ce_init<acc_t>(), bl2, a.weight, y};
    for_each_vec<TPR>(xr, y > -2 ? a.C : 0, tid, acc);
    const CEState<acc_t> st = group_allreduce<TPR>(acc.st, CEMerge<acc_t>{bl2}, sred);
    if (active && tid == 0) {
      acc_t* o = a.stats + 4 * row;
      if (y == -2) {
        o[0] = o[1] = o[2] = o[3] = acc_t(0);
      } else {
        const bool any = st.m > neg_inf<acc_t>() || st.s != st.s;  // a NaN sum propagates
        o[0] = st.m;
        o[1] = any ? flog_sum(st.s) : neg_inf<acc_t>();
        // an all -inf slice row: no softmax mass, an infinite smoothing sum (as PyTorch's loss)
        o[2] = KIND > 0 ? (any ? st.d : std::numeric_limits<acc_t>::infinity()) : acc_t(0);
        o[3] = y >= 0 ? st.xy : acc_t(0);
      }
    }
  }
}

template <typename T, int TPR, int KIND>
__global__ void __launch_bounds__(block_for(TPR), min_blocks_for(block_for(TPR)))
    shard_grad_kernel(const ShardArgs<T> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int BLOCK = block_for(TPR);
  constexpr int RPB = BLOCK / TPR;
  __shared__ Pair<double> sred[BLOCK / kWarp];
  const int tid = threadIdx.x % TPR;
  const int grp = threadIdx.x / TPR;
  const acc_t beta = load_beta<acc_t>(a.temp);
  const acc_t l2e = static_cast<acc_t>(kLog2e);
  const bool need_t = a.t_rows != nullptr;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * RPB; base < a.rows;
       base += static_cast<int64_t>(gridDim.x) * RPB) {
    const int64_t row = base + grp;
    const bool active = row < a.rows;
    const int y = active ? local_target(a.target, row, a.ignore_index, a.off, a.C) : -2;
    const T* xr = a.logits + row * a.row_stride;
    T* gr = a.grad ? a.grad + row * static_cast<int64_t>(a.C) : nullptr;
    CEGrad<T, acc_t, KIND> f;
    f.t1 = 0;
    f.t0 = 0;
    f.need_t = need_t;
    if (y > -2) {
      const acc_t g = a.coef[3 * row], A = a.coef[3 * row + 1], ty = a.coef[3 * row + 2];
      f.beta = beta;
      f.bl2 = beta * l2e;
      f.sh = a.lse[2 * row];
      f.off = a.lse[2 * row + 1];
      f.toff = f.off;  // the contract: sums of dz (beta (x - M) - LS)
      f.off2 = f.off * l2e;
      f.A = A;
      f.As = A - ty;
      f.ty = ty;
      f.cw = a.smooth_coef;
      f.bg = beta * g;
      f.bgA = f.bg * A;
      f.bgcw = f.bg * a.smooth_coef;
      f.w = a.weight;
      f.y = y;
      f.out = gr;
      f.vec_ok = gr ? same_misalignment<T>(gr, xr) : false;
      for_each_vec<TPR>(xr, a.C, tid, f);
      f.finish();
    } else if (active && gr) {
      fill_row<TPR>(gr, a.C, tid, T(0));
    }
    if (need_t) {
      const Pair<double> t = group_allreduce<TPR>(Pair<double>{f.t1, f.t0}, PairSum<double>(), sred);
      if (active && tid == 0) {
        a.t_rows[2 * row] = y > -2 ? static_cast<acc_t>(t.a) : acc_t(0);
        a.t_rows[2 * row + 1] = y > -2 ? static_cast<acc_t>(t.b) : acc_t(0);
      }
    }
  }
}

// KIND of the kernels: 0 without smoothing, 1 smoothing without weights, 2 with weights.
inline int shard_kind(bool smoothing, bool weighted) { return smoothing ? (weighted ? 2 : 1) : 0; }

template <typename scalar_t>
ShardArgs<scalar_t> shard_args(const at::Tensor& logits, const Prepared& p,
                               const std::optional<at::Tensor>& temperature_t, double temperature,
                               int64_t class_offset, int64_t ignore_index) {
  ShardArgs<scalar_t> a{};
  a.logits = logits.data_ptr<scalar_t>();
  a.row_stride = logits.stride(0);
  a.rows = logits.size(0);
  a.C = static_cast<int>(logits.size(1));
  a.target = p.target.data_ptr<int64_t>();
  a.weight = p.weight.has_value() ? p.weight->data_ptr<scalar_t>() : nullptr;
  a.ignore_index = ignore_index;
  a.off = class_offset;
  a.temp = make_temp(temperature_t, temperature);
  return a;
}

at::Tensor shard_grad_impl(const at::Tensor& logits, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                           const at::Tensor& coef, const std::optional<at::Tensor>& temperature_t,
                           double temperature, double smooth_coef, int64_t class_offset,
                           int64_t ignore_index, at::Tensor* grad, bool need_t, const char* op) {
  const int64_t rows = logits.size(0);
  const at::ScalarType acc = acc_type(logits.scalar_type());
  check_shard_grad_inputs(logits, lse, coef, smooth_coef, op);
  c10::cuda::CUDAGuard guard(logits.device());
  const Prepared p = prepare(logits, target, weight);
  // written by the kernel only when it runs: zeros for an empty slice (C_local = 0) or no request
  const bool runs = rows > 0 && logits.size(1) > 0 && (grad != nullptr || need_t);
  at::Tensor t_rows = (need_t && runs) ? at::empty({rows, 2}, logits.options().dtype(acc))
                                       : at::zeros({rows, 2}, logits.options().dtype(acc));
  if (!runs) return t_rows;
  const at::Tensor lse_c = lse.contiguous(), coef_c = coef.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tsce_shard_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = shard_args<scalar_t>(logits, p, temperature_t, temperature, class_offset, ignore_index);
    a.lse = lse_c.data_ptr<acc_t>();
    a.coef = coef_c.data_ptr<acc_t>();
    a.smooth_coef = static_cast<acc_t>(smooth_coef);
    a.grad = grad ? grad->data_ptr<scalar_t>() : nullptr;
    a.t_rows = need_t ? t_rows.data_ptr<acc_t>() : nullptr;
    const int tpr = pick_stream_tpr(a.C, vec_size<scalar_t>(), rows);
    const int grid = grid_for(rows, tpr);
    dispatch_kind(shard_kind(smooth_coef > 0, a.weight != nullptr), [&](auto kc) {
      constexpr int KIND = decltype(kc)::value;
      dispatch_tpr(tpr, [&](auto tc) {
        constexpr int TPR = decltype(tc)::value;
        shard_grad_kernel<scalar_t, TPR, KIND><<<grid, block_for(TPR), 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return t_rows;
}

}  // namespace

at::Tensor tsce_shard_stats_cuda(const at::Tensor& logits, const at::Tensor& target,
                                 const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& temperature_t, double temperature,
                                 int64_t class_offset, int64_t ignore_index, bool smoothing) {
  const char* op = "softcal.shard_stats";
  check_shard_inputs(logits, target, weight, temperature_t, temperature, class_offset, op);
  c10::cuda::CUDAGuard guard(logits.device());
  const Prepared p = prepare(logits, target, weight);
  const int64_t rows = logits.size(0);
  const at::ScalarType acc = acc_type(logits.scalar_type());
  at::Tensor stats = at::empty({rows, 4}, logits.options().dtype(acc));
  if (rows == 0) return stats;
  if (logits.size(1) == 0) {  // an empty slice: no softmax mass here
    stats.select(1, 0).fill_(-std::numeric_limits<double>::infinity());
    stats.select(1, 1).fill_(-std::numeric_limits<double>::infinity());
    stats.select(1, 2).zero_();  // no classes: nothing to smooth over
    stats.select(1, 3).zero_();
    stats.masked_fill_((p.target == ignore_index).unsqueeze(1), 0.0);
    return stats;
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tsce_shard_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = shard_args<scalar_t>(logits, p, temperature_t, temperature, class_offset, ignore_index);
    a.smoothing = smoothing;
    a.stats = stats.data_ptr<acc_t>();
    const int tpr = pick_stream_tpr(a.C, vec_size<scalar_t>(), rows);
    const int grid = grid_for(rows, tpr);
    dispatch_kind(shard_kind(smoothing, a.weight != nullptr), [&](auto kc) {
      constexpr int KIND = decltype(kc)::value;
      dispatch_tpr(tpr, [&](auto tc) {
        constexpr int TPR = decltype(tc)::value;
        shard_stats_kernel<scalar_t, TPR, KIND><<<grid, block_for(TPR), 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return stats;
}

std::tuple<at::Tensor, at::Tensor> tsce_shard_grad_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& lse, const at::Tensor& coef, const std::optional<at::Tensor>& temperature_t,
    double temperature, double smooth_coef, int64_t class_offset, int64_t ignore_index,
    bool need_logits_grad, bool need_temperature_grad) {
  const char* op = "softcal.shard_grad";
  check_shard_inputs(logits, target, weight, temperature_t, temperature, class_offset, op);
  at::Tensor grad = need_logits_grad ? at::empty({logits.size(0), logits.size(1)}, logits.options())
                                     : at::empty({0}, logits.options());
  at::Tensor t_rows = shard_grad_impl(logits, target, weight, lse, coef, temperature_t, temperature,
                                      smooth_coef, class_offset, ignore_index,
                                      need_logits_grad ? &grad : nullptr, need_temperature_grad, op);
  return {grad, t_rows};
}

at::Tensor tsce_shard_grad_inplace_cuda(const at::Tensor& logits, const at::Tensor& target,
                                        const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                        const at::Tensor& coef,
                                        const std::optional<at::Tensor>& temperature_t,
                                        double temperature, double smooth_coef, int64_t class_offset,
                                        int64_t ignore_index, bool need_temperature_grad) {
  const char* op = "softcal.shard_grad_";
  check_shard_inputs(logits, target, weight, temperature_t, temperature, class_offset, op);
  check_shard_inplace(logits, op);
  at::Tensor grad = logits;
  return shard_grad_impl(logits, target, weight, lse, coef, temperature_t, temperature, smooth_coef,
                         class_offset, ignore_index, &grad, need_temperature_grad, op);
}

}  // namespace cuda
}  // namespace softcal

TORCH_LIBRARY_IMPL(softcal, CUDA, m) {
  m.impl("shard_stats", &softcal::cuda::tsce_shard_stats_cuda);
  m.impl("shard_grad", &softcal::cuda::tsce_shard_grad_cuda);
  m.impl("shard_grad_", &softcal::cuda::tsce_shard_grad_inplace_cuda);
}
