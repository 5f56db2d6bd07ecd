// softcal CUDA: softmax / log_softmax of x / T along any dim (softmax_fwd, softmax_bwd).
// Implements docs/design.md's y = softmax(z), z = beta x; backward dL/dz = y (g - sum g y)
// (softmax) or g - y sum g (log_softmax), dL/dx = beta dL/dz, dL/dT = -beta sum dL/dz log y.
// Unit stride along dim: the row kernels (TPR threads per row; the row held in registers when it
// fits, read twice otherwise). Any other dim: x as (outer, C, inner), a thread per column,
// consecutive threads along inner. docs/kernels-cuda.md, "Softmax".
#include <torch/library.h>

#include "checks.h"
#include "cuda/launch.cuh"
#include "cuda/reduce.cuh"
#include "cuda/rows.cuh"

namespace softcal {
namespace cuda {
namespace {

// The online softmax state: m = max of the raw logits (beta > 0: the max of z is beta m) and
// s = sum exp(beta (x - m)), the max subtracted before scaling (exactly 0 there).
template <typename acc_t>
struct MaxSum {
  acc_t m, s;
};

template <typename acc_t>
struct MaxSumMerge {
  acc_t beta;
  __device__ __forceinline__ MaxSum<acc_t> operator()(const MaxSum<acc_t>& a,
                                                      const MaxSum<acc_t>& b) const {
    MaxSum<acc_t> r;
    r.m = a.m > b.m ? a.m : b.m;
    const acc_t ea = a.m > neg_inf<acc_t>() ? fexp((a.m - r.m) * beta) : acc_t(0);
    const acc_t eb = b.m > neg_inf<acc_t>() ? fexp((b.m - r.m) * beta) : acc_t(0);
    r.s = a.s * ea + b.s * eb;
    return r;
  }
};

// log s of a row, or NaN when its max is not finite (+inf too, as the CPU op). log y = beta (x -
// m) - ls.
template <typename acc_t>
__device__ __forceinline__ acc_t ls_of(const MaxSum<acc_t>& st) {
  return (st.m > neg_inf<acc_t>() && st.m < std::numeric_limits<acc_t>::infinity())
             ? flog_sum(st.s)
             : std::numeric_limits<acc_t>::quiet_NaN();
}

template <typename T, typename acc_t>
struct MaxSumAccum {
  MaxSum<acc_t> st;
  acc_t beta;
  __device__ __forceinline__ void operator()(int, const Vec16<T>& v, int count) {
    constexpr int V = vec_size<T>();
    acc_t x[V];
    acc_t vmax = neg_inf<acc_t>();
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < count) {
        x[k] = static_cast<acc_t>(v.v[k]);
        vmax = x[k] > vmax ? x[k] : vmax;
      }
    }
    if (vmax > st.m) {
      if (st.m > neg_inf<acc_t>()) st.s *= fexp((st.m - vmax) * beta);
      st.m = vmax;
    }
    const acc_t mref = st.m > neg_inf<acc_t>() ? st.m : acc_t(0);
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (k < count) st.s += fexp((x[k] - mref) * beta);
  }
};

template <typename T, typename acc_t>
struct SoftmaxOut {
  acc_t beta, m, ls;
  bool log;
  T* out;
  bool vec_ok;
  __device__ __forceinline__ void operator()(int idx, const Vec16<T>& v, int count) {
    constexpr int V = vec_size<T>();
    acc_t o[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < count) {
        const acc_t log_y = (static_cast<acc_t>(v.v[k]) - m) * beta - ls;
        o[k] = log ? log_y : fexp(log_y);
      }
    }
    store_vals<T, V>(out, idx, o, count, vec_ok);
  }
};

// Per row y = softmax(beta x), or log y = beta (x - m) - ls. RESIDENT: the row in registers (MAXV
// vectors per thread), else read twice.
template <typename T, int TPR, int MAXV, bool RESIDENT>
__global__ void __launch_bounds__(kBlock<TPR>, kMinBlocks<TPR>)
    softmax_fwd_rows_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int C,
                            Temperature temp, bool log) {
  using acc_t = at::opmath_type<T>;
  __shared__ MaxSum<acc_t> sred[kWarps<TPR>];
  const acc_t beta = load_beta<acc_t>(temp);
  for_each_row<TPR>(rows, [&](int64_t row, bool active, int tid) {
    const int n = active ? C : 0;
    const T* xr = x + row * static_cast<int64_t>(C);
    T* orow = out + row * static_cast<int64_t>(C);
    MaxSumAccum<T, acc_t> acc{MaxSum<acc_t>{neg_inf<acc_t>(), acc_t(0)}, beta};
    auto finish = [&](auto&& walk) {
      walk(acc);
      const MaxSum<acc_t> st = group_allreduce<TPR>(acc.st, MaxSumMerge<acc_t>{beta}, sred);
      SoftmaxOut<T, acc_t> f{beta, st.m, ls_of(st), log, orow, aligned_like(xr, orow)};
      walk(f);
    };
    if constexpr (RESIDENT) {
      const RowRegs<T, TPR, MAXV> regs(xr, n, tid);
      finish([&](auto& f) { regs.apply(n, f); });
    } else {
      finish([&](auto& f) { for_each_vec<TPR>(xr, n, tid, f); });
    }
  });
}

// (outer, C, inner) with inner > 1: one thread per column.
template <typename T>
__global__ void __launch_bounds__(256, 2)
    softmax_fwd_strided_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t outer,
                               int64_t C, int64_t inner, Temperature temp, bool log) {
  using acc_t = at::opmath_type<T>;
  const acc_t beta = load_beta<acc_t>(temp);
  const int64_t cols = outer * inner;
  for (int64_t col = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; col < cols;
       col += static_cast<int64_t>(gridDim.x) * 256) {
    const int64_t base = (col / inner) * C * inner + col % inner;
    acc_t m = neg_inf<acc_t>(), s = 0;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(x[base + c * inner]);
      if (v > m) {
        s = (m > neg_inf<acc_t>() ? s * fexp((m - v) * beta) : acc_t(0)) + acc_t(1);
        m = v;
      } else {
        s += fexp((v - (m > neg_inf<acc_t>() ? m : acc_t(0))) * beta);
      }
    }
    const acc_t ls = ls_of(MaxSum<acc_t>{m, s});
    for (int64_t c = 0; c < C; ++c) {
      const acc_t log_y = (static_cast<acc_t>(x[base + c * inner]) - m) * beta - ls;
      out[base + c * inner] = static_cast<T>(log ? log_y : fexp(log_y));
    }
  }
}

// ------------------------------------------------------------------ backward
// Phase 1: sum g y (softmax) or sum g (log_softmax); phase 2: dz, and its T-gradient term.
template <typename acc_t>
__device__ __forceinline__ acc_t bwd_partial(acc_t g, acc_t o, bool log) {
  return log ? g : g * o;
}

template <typename acc_t>
__device__ __forceinline__ acc_t bwd_dz(acc_t g, acc_t o, acc_t S, bool log, bool need_t,
                                        acc_t& t) {
  if (log) {
    const acc_t dz = g - fexp(o) * S;
    if (need_t && o != neg_inf<acc_t>()) t += dz * o;
    return dz;
  }
  const acc_t dz = o * (g - S);
  if (need_t && o > acc_t(0)) t += dz * flog(o);
  return dz;
}

template <typename T, typename acc_t>
struct BwdSum {
  acc_t s;
  bool log;
  __device__ __forceinline__ void operator()(int, const Vec16<T>& g, const Vec16<T>& o, int count) {
    constexpr int V = vec_size<T>();
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (k < count) s += bwd_partial(static_cast<acc_t>(g.v[k]), static_cast<acc_t>(o.v[k]), log);
  }
};

template <typename T, typename acc_t>
struct BwdOut {
  acc_t beta, S;
  bool log;
  T* gx;
  bool vec_ok;
  bool need_t;
  acc_t t;
  __device__ __forceinline__ void operator()(int idx, const Vec16<T>& g, const Vec16<T>& o,
                                             int count) {
    constexpr int V = vec_size<T>();
    acc_t r[V];
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (k < count)
        r[k] = beta *
               bwd_dz(static_cast<acc_t>(g.v[k]), static_cast<acc_t>(o.v[k]), S, log, need_t, t);
    store_vals<T, V>(gx, idx, r, count, vec_ok);
  }
};

// Per row dL/dx = beta y (g - sum g y) (softmax) or beta (g - y sum g) (log_softmax); per block the
// sum of dL/dT = -beta sum dL/dz log y. grad_out and out have the same alignment (the host ensures
// it).
template <typename T, int TPR, int MAXV, bool RESIDENT>
__global__ void __launch_bounds__(kBlock<TPR>, kMinBlocks<TPR>)
    softmax_bwd_rows_kernel(const T* __restrict__ go, const T* __restrict__ out, T* __restrict__ gx,
                            int64_t rows, int C, Temperature temp, bool log,
                            double* __restrict__ parts) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t sred[kWarps<TPR>];
  const acc_t beta = load_beta<acc_t>(temp);
  double t_sum = 0.0;
  for_each_row<TPR>(rows, [&](int64_t row, bool active, int tid) {
    const int n = active ? C : 0;
    const int64_t off = row * static_cast<int64_t>(C);
    BwdSum<T, acc_t> s1{acc_t(0), log};
    BwdOut<T, acc_t> f{
        beta,    acc_t(0), log, gx + off, aligned_like(out + off, gx + off), parts != nullptr,
        acc_t(0)};
    auto finish = [&](auto&& walk) {
      walk(s1);
      f.S = group_allreduce<TPR>(s1.s, Plus(), sred);
      walk(f);
    };
    if constexpr (RESIDENT) {
      const RowRegs<T, TPR, MAXV> rg(go + off, n, tid);
      const RowRegs<T, TPR, MAXV> ro(out + off, n, tid);
      finish([&](auto& g) { rg.apply_pair(ro, n, g); });
    } else {
      finish([&](auto& g) { for_each_pair<TPR, kUnroll / 2>(go + off, out + off, n, tid, g); });
    }
    if (parts) t_sum += static_cast<double>(f.t);
  });
  if (parts) store_block_sums<kBlock<TPR>, 1>(parts, {-static_cast<double>(beta) * t_sum});
}

template <typename T>
__global__ void __launch_bounds__(256, 2)
    softmax_bwd_strided_kernel(const T* __restrict__ go, const T* __restrict__ out,
                               T* __restrict__ gx, int64_t outer, int64_t C, int64_t inner,
                               Temperature temp, bool log, double* __restrict__ parts) {
  using acc_t = at::opmath_type<T>;
  const acc_t beta = load_beta<acc_t>(temp);
  const int64_t cols = outer * inner;
  double t_sum = 0.0;
  for (int64_t col = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; col < cols;
       col += static_cast<int64_t>(gridDim.x) * 256) {
    const int64_t base = (col / inner) * C * inner + col % inner;
    acc_t S = 0;
    for (int64_t c = 0; c < C; ++c)
      S += bwd_partial(static_cast<acc_t>(go[base + c * inner]),
                       static_cast<acc_t>(out[base + c * inner]), log);
    acc_t t = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t e = base + c * inner;
      gx[e] = static_cast<T>(beta * bwd_dz(static_cast<acc_t>(go[e]), static_cast<acc_t>(out[e]), S,
                                           log, parts != nullptr, t));
    }
    t_sum += static_cast<double>(t);
  }
  if (parts) store_block_sums<256, 1>(parts, {-static_cast<double>(beta) * t_sum});
}

// ------------------------------------------------------------------ host side
struct Dims {
  int64_t outer, C, inner;
};

Dims split_dims(const at::Tensor& x, int64_t dim) {
  Dims d{1, x.size(dim), 1};
  for (int64_t i = 0; i < dim; ++i) d.outer *= x.size(i);
  for (int64_t i = dim + 1; i < x.dim(); ++i) d.inner *= x.size(i);
  return d;
}

// The launch of a row kernel: the row in registers when the walk holds it, else read twice on
// the streaming shape (rows of > 2048 vectors: 128 threads per row or more).
struct RowsPlan {
  Launch l;
  bool resident;
};

RowsPlan rows_plan(Walk resident_walk, const Dims& d, int vec) {
  const Launch r = plan(resident_walk, d.outer, d.C, vec);
  if (holds_row(r, resident_walk, ceil_div(d.C, vec))) return {r, true};
  return {plan(Walk::kStream, d.outer, d.C, vec), false};
}

at::Tensor softmax_fwd_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& temperature_t,
                            double temperature, int64_t dim_in, bool log) {
  const int64_t dim =
      checks::softmax_fwd(Backend::kCuda, log, x_in, temperature_t, temperature, dim_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = (x_in.dim() == 0 ? x_in.reshape({1}) : x_in).contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return x_in.dim() == 0 ? out.reshape({}) : out;
  const Dims d = split_dims(x, dim);
  const Temperature temp = make_temperature(temperature_t, temperature);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_fwd_cuda", [&] {
        const scalar_t* xp = x.data_ptr<scalar_t>();
        scalar_t* op_ = out.data_ptr<scalar_t>();
        if (d.inner == 1) {
          const RowsPlan p = rows_plan(Walk::kResident, d, vec_size<scalar_t>());
          const bool resident = p.resident;
          static_switch<false, true>(resident, [&](auto rc) {
            launch_rows(
                p.l, stream,
                [](auto tpr) {
                  constexpr int TPR = decltype(tpr)::value;
                  constexpr bool R = decltype(rc)::value;
                  if constexpr (R)
                    return KernelRef<&softmax_fwd_rows_kernel<scalar_t, TPR, 4, true>>{};
                  else if constexpr (TPR >= 128)
                    return KernelRef<&softmax_fwd_rows_kernel<scalar_t, TPR, 1, false>>{};
                  else
                    return NoKernel{};
                },
                xp, op_, d.outer, static_cast<int>(d.C), temp, log);
          });
        } else {
          launch(KernelRef<&softmax_fwd_strided_kernel<scalar_t>>{},
                 plan(Walk::kFlat, d.outer * d.inner), stream, xp, op_, d.outer, d.C, d.inner, temp,
                 log);
        }
      });
  return x_in.dim() == 0 ? out.reshape({}) : out;
}

std::tuple<at::Tensor, at::Tensor> softmax_bwd_cuda(const at::Tensor& grad_out_in,
                                                    const at::Tensor& out_in,
                                                    const std::optional<at::Tensor>& temperature_t,
                                                    double temperature, int64_t dim_in, bool log,
                                                    bool need_temperature_grad) {
  const int64_t dim = checks::softmax_bwd(Backend::kCuda, log, grad_out_in, out_in, temperature_t,
                                          temperature, dim_in);
  c10::cuda::CUDAGuard guard(out_in.device());
  at::Tensor o = (out_in.dim() == 0 ? out_in.reshape({1}) : out_in).contiguous();
  at::Tensor g = (grad_out_in.dim() == 0 ? grad_out_in.reshape({1}) : grad_out_in)
                     .to(o.scalar_type())
                     .contiguous();
  const at::ScalarType gt_type = temp_grad_type(temperature_t, out_in.scalar_type());
  // As the CPU op: no temperature tensor, no T-gradient (grad_temperature stays 0).
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  at::Tensor grad_t = need_t && o.numel() > 0 ? at::empty({}, o.options().dtype(gt_type))
                                              : at::zeros({}, o.options().dtype(gt_type));
  at::Tensor gx = at::empty_like(o, at::MemoryFormat::Contiguous);
  auto shape_back = [&](at::Tensor t) { return out_in.dim() == 0 ? t.reshape({}) : t; };
  if (o.numel() == 0) return {shape_back(gx), grad_t};
  if (((reinterpret_cast<uintptr_t>(g.data_ptr()) ^ reinterpret_cast<uintptr_t>(o.data_ptr())) &
       15) != 0) {
    // The row kernels read both rows with the same 16-byte split: give them fresh (aligned) copies.
    g = g.clone();
    if ((reinterpret_cast<uintptr_t>(o.data_ptr()) & 15) != 0) o = o.clone();
  }
  const Dims d = split_dims(o, dim);
  const Temperature temp = make_temperature(temperature_t, temperature);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, o.scalar_type(), "softmax_bwd_cuda", [&] {
        const scalar_t* gp = g.data_ptr<scalar_t>();
        const scalar_t* opp = o.data_ptr<scalar_t>();
        scalar_t* gxp = gx.data_ptr<scalar_t>();
        const bool rows = d.inner == 1;
        const RowsPlan p = rows ? rows_plan(Walk::kResidentPair, d, vec_size<scalar_t>())
                                : RowsPlan{plan(Walk::kFlat, d.outer * d.inner), false};
        at::Tensor parts =
            need_t ? at::empty({p.l.grid}, o.options().dtype(at::kDouble)) : at::Tensor();
        double* pp = need_t ? parts.data_ptr<double>() : nullptr;
        if (rows) {
          static_switch<false, true>(p.resident, [&](auto rc) {
            launch_rows(
                p.l, stream,
                [](auto tpr) {
                  constexpr int TPR = decltype(tpr)::value;
                  constexpr bool R = decltype(rc)::value;
                  if constexpr (R && TPR <= 256)
                    return KernelRef<&softmax_bwd_rows_kernel<scalar_t, TPR, 4, true>>{};
                  else if constexpr (!R)
                    return KernelRef<&softmax_bwd_rows_kernel<scalar_t, TPR, 1, false>>{};
                  else
                    return NoKernel{};
                },
                gp, opp, gxp, d.outer, static_cast<int>(d.C), temp, log, pp);
          });
        } else {
          launch(KernelRef<&softmax_bwd_strided_kernel<scalar_t>>{}, p.l, stream, gp, opp, gxp,
                 d.outer, d.C, d.inner, temp, log, pp);
        }
        if (need_t) launch_sum(parts, p.l.grid, grad_t, 1.0, stream);
      });
  return {shape_back(gx), grad_t};
}

}  // namespace
}  // namespace cuda
}  // namespace softcal

TORCH_LIBRARY_IMPL(softcal, CUDA, m) {
  m.impl("softmax_fwd", &softcal::cuda::softmax_fwd_cuda);
  m.impl("softmax_bwd", &softcal::cuda::softmax_bwd_cuda);
}
