// softcal CUDA: temperature_stats(logits, target, beta) -> float64 [sum NLL, sum (E_p[x] - x_y),
// sum Var_p[x], rows], p = softmax(beta x): the NLL at beta and its first two derivatives in
// beta (docs/design.md, "Temperature fitting"). One read of the logits; per row, in double, the
// state (m, s0, s1, s2) with e = exp(beta (x - m)), s0 = sum e, s1 = sum e d, s2 = sum e d^2 and
// d = x - x_y (shifted by the target's logit: E_p[x] - x_y = s1 / s0 has no cancellation);
// masked logits (-inf) are skipped. docs/kernels-cuda.md, "Temperature statistics".
#include <torch/library.h>

#include "checks.h"
#include "cuda/launch.cuh"
#include "cuda/reduce.cuh"
#include "cuda/rows.cuh"

namespace softcal {
namespace cuda {
namespace {

struct MomentState {
  double m, s0, s1, s2;
};

struct MomentMerge {
  double beta;
  __device__ __forceinline__ MomentState operator()(const MomentState& a,
                                                    const MomentState& b) const {
    const double M = a.m > b.m ? a.m : b.m;
    const double ninf = neg_inf<double>();
    const double ea = a.m > ninf ? ::exp(beta * (a.m - M)) : 0.0;
    const double eb = b.m > ninf ? ::exp(beta * (b.m - M)) : 0.0;
    return MomentState{M, a.s0 * ea + b.s0 * eb, a.s1 * ea + b.s1 * eb, a.s2 * ea + b.s2 * eb};
  }
};

template <typename T>
struct MomentAccum {
  MomentState st;
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

// Per row NLL, E_p[x] - x_y and Var_p[x] at beta, in double; per block their sums and the row
// count.
template <typename T, int TPR>
__global__ void __launch_bounds__(kBlock<TPR>, kMinBlocks<TPR>)
    temperature_stats_kernel(const T* __restrict__ x, int64_t row_stride, int64_t rows, int C,
                             const int64_t* __restrict__ target, double beta,
                             double* __restrict__ parts) {
  __shared__ MomentState sred[kWarps<TPR>];
  double nll = 0.0, dnll = 0.0, var = 0.0, count = 0.0;
  for_each_row<TPR>(rows, [&](int64_t row, bool active, int tid) {
    int y = -1;
    if (active) {
      const int64_t t = target[row];
      CUDA_KERNEL_ASSERT(t >= 0 && t < C && "softcal.temperature_stats: target out of range");
      y = (t >= 0 && t < C) ? static_cast<int>(t) : -1;
    }
    const T* xr = x + row * row_stride;
    const double xy = y >= 0 ? static_cast<double>(static_cast<at::opmath_type<T>>(xr[y]))
                             : std::numeric_limits<double>::quiet_NaN();
    const double shift =
        (xy > neg_inf<double>() && xy < std::numeric_limits<double>::infinity()) ? xy : 0.0;
    MomentAccum<T> acc{MomentState{neg_inf<double>(), 0.0, 0.0, 0.0}, beta, shift};
    for_each_vec<TPR>(xr, y >= 0 ? C : 0, tid, acc);
    const MomentState st = group_allreduce<TPR>(acc.st, MomentMerge{beta}, sred);
    if (active && tid == 0) {
      const double mean = st.s1 / st.s0;
      const double v = st.s2 / st.s0 - mean * mean;
      // lse - beta x_y = beta (m - x_y) + log s0: no difference of two large numbers
      nll += beta * (st.m - xy) + ::log1p(st.s0 - 1.0);
      dnll += mean + (shift - xy);
      var += v > 0.0 ? v : (v == v ? 0.0 : v);
      count += 1.0;
    }
  });
  store_block_sums<kBlock<TPR>, 4>(parts, {nll, dnll, var, count});
}

at::Tensor temperature_stats_cuda(const at::Tensor& logits, const at::Tensor& target, double beta) {
  checks::temperature_stats(Backend::kCuda, logits, target, beta);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  at::Tensor out = at::empty({4}, logits.options().dtype(at::kDouble));
  if (rows == 0) return out.zero_();
  const at::Tensor t = target.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "temperature_stats_cuda", [&] {
        const int C = static_cast<int>(logits.size(1));
        const Launch l = plan(Walk::kPairs, rows, C, vec_size<scalar_t>());
        at::Tensor parts = at::empty({4 * l.grid}, logits.options().dtype(at::kDouble));
        launch_rows(
            l, stream,
            [](auto tpr) {
              return KernelRef<&temperature_stats_kernel<scalar_t, decltype(tpr)::value>>{};
            },
            logits.data_ptr<scalar_t>(), logits.stride(0), rows, C, t.data_ptr<int64_t>(), beta,
            parts.data_ptr<double>());
        StoreSums<4> w{};  // out[k] = sums[k]: NLL, dNLL/dbeta, d2NLL/dbeta2, rows
        for (int k = 0; k < 4; ++k) {
          w.out[k] = AnyOut{out.data_ptr<double>() + k, Dtype::kDouble};
          w.divisor[k] = 1.0;
        }
        launch(KernelRef<&finalize_kernel<4, StoreSums<4>>>{}, Launch{1, 1024, 1}, stream,
               parts.data_ptr<double>(), l.grid, w);
      });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace softcal

TORCH_LIBRARY_IMPL(softcal, CUDA, m) {
  m.impl("temperature_stats", &softcal::cuda::temperature_stats_cuda);
}
