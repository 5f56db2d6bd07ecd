// softcal CUDA: temperature_stats(logits, target, beta) -> float64 [sum NLL, sum (E_p[x] - x_y),
// sum Var_p[x], rows], p = softmax(beta x) (maths in csrc/common.h).
//
// One read of the logits. Per row, in double: each thread keeps (m, s0, s1, s2) with
// m = max x (the raw logits), s0 = sum e, s1 = sum e d, s2 = sum e d^2, e = exp(beta (x - m))
// (the max subtracted before scaling: exact at the maximum) and d = x - x_y
// (shifted by the target logit, so that E_p[x] - x_y = s1 / s0 has no cancellation); states
// merge by the log-sum-exp rescaling. Masked logits (-inf) are skipped (p = 0). Per-row results
// are summed into per-block partials in double, then one block sums them in a fixed order:
// deterministic, no host synchronisation. Launch shapes as the cross-entropy (tsce.cuh).
#include "cuda/common.cuh"
#include "cuda/ops.cuh"

namespace softcal {
namespace cuda {
namespace {

struct St4 {
  double m, s0, s1, s2;
};

__device__ __forceinline__ St4 shfl_xor(St4 v, int mask) {
  return St4{__shfl_xor_sync(0xffffffffu, v.m, mask), __shfl_xor_sync(0xffffffffu, v.s0, mask),
             __shfl_xor_sync(0xffffffffu, v.s1, mask), __shfl_xor_sync(0xffffffffu, v.s2, mask)};
}

struct St4Merge {
  double beta;
  __device__ __forceinline__ St4 operator()(const St4& a, const St4& b) const {
    const double M = a.m > b.m ? a.m : b.m;
    const double ninf = neg_inf<double>();
    const double ea = a.m > ninf ? ::exp(beta * (a.m - M)) : 0.0;
    const double eb = b.m > ninf ? ::exp(beta * (b.m - M)) : 0.0;
    return St4{M, a.s0 * ea + b.s0 * eb, a.s1 * ea + b.s1 * eb, a.s2 * ea + b.s2 * eb};
  }
};

template <typename T>
struct StatsAccum {
  St4 st;
  double beta, shift;
  __device__ __forceinline__ void operator()(int, const Vec16<T>& v, int count) {
    constexpr int V = vec_size<T>();
    const double ninf = neg_inf<double>();
    double x[V];
    double vmax = ninf;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < count) {
        x[k] = static_cast<double>(static_cast<at::opmath_type<T>>(v.v[k]));
        vmax = x[k] > vmax ? x[k] : vmax;
      }
    }
    if (vmax > st.m) {
      if (st.m > ninf) {
        const double r = ::exp(beta * (st.m - vmax));
        st.s0 *= r;
        st.s1 *= r;
        st.s2 *= r;
      }
      st.m = vmax;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < count && x[k] != ninf) {
        const double e = ::exp(beta * (x[k] - st.m));
        const double d = x[k] - shift;
        st.s0 += e;
        st.s1 += e * d;
        st.s2 += e * d * d;
      }
    }
  }
};

template <typename T, int TPR>
__global__ void __launch_bounds__(block_for(TPR), min_blocks_for(block_for(TPR)))
    temperature_stats_kernel(const T* __restrict__ x, int64_t row_stride, int64_t rows, int C,
                             const int64_t* __restrict__ target, double beta,
                             double* __restrict__ parts) {
  constexpr int BLOCK = block_for(TPR);
  constexpr int RPB = BLOCK / TPR;
  __shared__ St4 sred[BLOCK / kWarp];
  __shared__ double sd[BLOCK / kWarp];
  const int tid = threadIdx.x % TPR;
  const int grp = threadIdx.x / TPR;
  double nll = 0.0, dnll = 0.0, var = 0.0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * RPB; base < rows;
       base += static_cast<int64_t>(gridDim.x) * RPB) {
    const int64_t row = base + grp;
    const bool active = row < rows;
    int y = -1;
    if (active) {
      const int64_t t = target[row];
      CUDA_KERNEL_ASSERT(t >= 0 && t < C && "softcal.temperature_stats: target out of range");
      y = (t >= 0 && t < C) ? static_cast<int>(t) : -1;
    }
    const T* xr = x + row * row_stride;
    const double xy = y >= 0 ? static_cast<double>(static_cast<at::opmath_type<T>>(xr[y]))
                             : std::numeric_limits<double>::quiet_NaN();
    const double shift = (xy > neg_inf<double>() && xy < std::numeric_limits<double>::infinity()) ? xy : 0.0;
    StatsAccum<T> acc{St4{neg_inf<double>(), 0.0, 0.0, 0.0}, beta, shift};
    for_each_vec<TPR>(xr, y >= 0 ? C : 0, tid, acc);
    const St4 st = group_allreduce<TPR>(acc.st, St4Merge{beta}, sred);
    if (active && tid == 0) {
      const double mean = st.s1 / st.s0;
      const double v = st.s2 / st.s0 - mean * mean;
      // lse - beta x_y = beta (m - x_y) + log s0: no difference of two large numbers
      nll += beta * (st.m - xy) + ::log1p(st.s0 - 1.0);
      dnll += mean + (shift - xy);
      var += v > 0.0 ? v : (v == v ? 0.0 : v);
    }
  }
  nll = block_sum<BLOCK>(nll, sd);
  dnll = block_sum<BLOCK>(dnll, sd);
  var = block_sum<BLOCK>(var, sd);
  if (threadIdx.x == 0) {
    parts[blockIdx.x] = nll;
    parts[gridDim.x + blockIdx.x] = dnll;
    parts[2 * gridDim.x + blockIdx.x] = var;
  }
}

struct StatsWriter {
  double* out;
  double rows;
  __device__ void operator()(const double* s) const {
    out[0] = s[0];
    out[1] = s[1];
    out[2] = s[2];
    out[3] = rows;
  }
};

}  // namespace

at::Tensor temperature_stats_cuda(const at::Tensor& logits, const at::Tensor& target, double beta) {
  const char* op = "softcal.temperature_stats";
  check_logits(logits, op);
  check_class_stride(logits, "logits", op);
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op, ": target has shape ",
              target.sizes(), " but logits has ", logits.size(0), " rows");
  TORCH_CHECK(target.device() == logits.device(), op, ": target is on ", target.device(),
              " but logits is on ", logits.device());
  TORCH_CHECK(std::isfinite(beta) && beta > 0, op, ": beta must be a finite number > 0, got ", beta);
  TORCH_CHECK(logits.size(1) < std::numeric_limits<int>::max(), op, ": at most 2^31 - 1 classes");
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  at::Tensor out = at::empty({4}, logits.options().dtype(at::kDouble));
  if (rows == 0) {
    out.zero_();
    return out;
  }
  const at::Tensor t = target.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "temperature_stats_cuda", [&] {
    const int C = static_cast<int>(logits.size(1));
    const int tpr = pick_tpr(C, vec_size<scalar_t>(), kUnroll);
    const int grid = grid_for(rows, tpr);
    at::Tensor parts = at::empty({3 * grid}, logits.options().dtype(at::kDouble));
    dispatch_tpr(tpr, [&](auto tc) {
      constexpr int TPR = decltype(tc)::value;
      temperature_stats_kernel<scalar_t, TPR><<<grid, block_for(TPR), 0, stream>>>(
          logits.data_ptr<scalar_t>(), logits.stride(0), rows, C, t.data_ptr<int64_t>(), beta,
          parts.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    finalize_kernel<3, StatsWriter><<<1, 1024, 0, stream>>>(parts.data_ptr<double>(), grid,
                                                            StatsWriter{out.data_ptr<double>(), static_cast<double>(rows)});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace cuda
}  // namespace softcal
