// softcal CUDA: softmax / log_softmax of x / T along any dim (softmax_fwd, softmax_bwd).
//
// Maths (csrc/common.h): y = softmax(z), z = x / T, o = log y. Backward with upstream g:
//   softmax:      dL/dz = y (g - sum g y)        log_softmax:  dL/dz = g - y sum g
//   dL/dx = dL/dz / T,   dL/dT = -(1/T) sum dL/dz log y
// (classes with y == 0, i.e. o == -inf, contribute 0 to dL/dT: for softmax dL/dz is 0 there;
// for log_softmax they are treated as masked classes, whose z is a constant).
//
// Design:
//  * Unit stride along dim (inner == 1): the row machinery of csrc/cuda/common.cuh (TPR threads
//    per row, 16-byte loads with a scalar head/tail). Forward: online max / sum-exp, one group
//    reduction, then the output; rows of up to TPR * 4 vectors (C <= 32768 bf16 at 1024
//    threads) stay in registers: 1 read + 1 write. Longer rows read
//    twice (the second time mostly from L2). Backward: one reduction (sum g y, or sum g), then
//    the gradient; rows of up to 512 threads * 4 vectors stay in registers (2 reads + 1 write),
//    longer rows are read twice.
//  * Other dims: x is viewed as (outer, C, inner), one thread per (outer, inner) column,
//    consecutive threads along inner (coalesced), two passes over C.
//  * The T-gradient: per-block partial sums in double, then one block sums them in a fixed
//    order: deterministic, no host synchronisation.
#include "cuda/common.cuh"
#include "cuda/ops.cuh"

namespace softcal {
namespace cuda {
namespace {

template <typename acc_t>
struct MS {
  acc_t m, s;
};

template <typename acc_t>
__device__ __forceinline__ MS<acc_t> shfl_xor(MS<acc_t> v, int mask) {
  return MS<acc_t>{__shfl_xor_sync(0xffffffffu, v.m, mask), __shfl_xor_sync(0xffffffffu, v.s, mask)};
}

// m: the max of the raw logits x (beta > 0, so the max of z = beta x is beta m); s: sum of
// exp(beta (x - m)). Subtracting the max before scaling makes the exponent exactly 0 there.
template <typename acc_t>
struct MSMerge {
  acc_t beta;
  __device__ __forceinline__ MS<acc_t> operator()(const MS<acc_t>& a, const MS<acc_t>& b) const {
    MS<acc_t> r;
    r.m = a.m > b.m ? a.m : b.m;
    const acc_t ea = a.m > neg_inf<acc_t>() ? fexp((a.m - r.m) * beta) : acc_t(0);
    const acc_t eb = b.m > neg_inf<acc_t>() ? fexp((b.m - r.m) * beta) : acc_t(0);
    r.s = a.s * ea + b.s * eb;
    return r;
  }
};

template <typename acc_t>
struct Sum {
  __device__ __forceinline__ acc_t operator()(acc_t a, acc_t b) const { return a + b; }
};

// log s of a row, or NaN when its max is not finite (+inf too, as the CPU op: the strided
// kernel's running sum stays finite with a single +inf, which would otherwise give +inf, not NaN).
// log y = beta (x - m) - ls.
template <typename acc_t>
__device__ __forceinline__ acc_t ls_of(const MS<acc_t>& st) {
  return (st.m > neg_inf<acc_t>() && st.m < std::numeric_limits<acc_t>::infinity())
             ? flog_sum(st.s)
             : std::numeric_limits<acc_t>::quiet_NaN();
}

template <typename T, typename acc_t>
struct MSAccum {
  MS<acc_t> st;
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
        const acc_t zl = (static_cast<acc_t>(v.v[k]) - m) * beta - ls;
        o[k] = log ? zl : fexp(zl);
      }
    }
    store_vals<T, acc_t>(out, idx, o, count, vec_ok);
  }
};

template <typename T, int TPR, int MAXV, bool RESIDENT>
__global__ void __launch_bounds__(block_for(TPR), min_blocks_for(block_for(TPR)))
    softmax_fwd_rows_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int C,
                            TempArg temp, bool log) {
  using acc_t = at::opmath_type<T>;
  constexpr int BLOCK = block_for(TPR);
  constexpr int RPB = BLOCK / TPR;
  __shared__ MS<acc_t> sred[BLOCK / kWarp];
  const int tid = threadIdx.x % TPR;
  const int grp = threadIdx.x / TPR;
  const acc_t beta = load_beta<acc_t>(temp);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * RPB; base < rows;
       base += static_cast<int64_t>(gridDim.x) * RPB) {
    const int64_t row = base + grp;
    const bool active = row < rows;
    const int n = active ? C : 0;
    const T* xr = x + row * static_cast<int64_t>(C);
    T* orow = out + row * static_cast<int64_t>(C);
    MSAccum<T, acc_t> acc{MS<acc_t>{neg_inf<acc_t>(), acc_t(0)}, beta};
    if constexpr (RESIDENT) {
      const RowRegs<T, TPR, MAXV> regs(xr, n, tid);
      regs.apply(n, acc);
      const MS<acc_t> st = group_allreduce<TPR>(acc.st, MSMerge<acc_t>{beta}, sred);
      SoftmaxOut<T, acc_t> f{beta, st.m, ls_of(st), log, orow, same_misalignment<T>(orow, xr)};
      regs.apply(n, f);
    } else {
      for_each_vec<TPR>(xr, n, tid, acc);
      const MS<acc_t> st = group_allreduce<TPR>(acc.st, MSMerge<acc_t>{beta}, sred);
      SoftmaxOut<T, acc_t> f{beta, st.m, ls_of(st), log, orow, same_misalignment<T>(orow, xr)};
      for_each_vec<TPR>(xr, n, tid, f);
    }
  }
}

// (outer, C, inner) with inner > 1: one thread per column.
template <typename T>
__global__ void __launch_bounds__(256, 2)
    softmax_fwd_strided_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t outer, int64_t C,
                               int64_t inner, TempArg temp, bool log) {
  using acc_t = at::opmath_type<T>;
  const acc_t beta = load_beta<acc_t>(temp);
  const int64_t cols = outer * inner;
  for (int64_t col = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; col < cols;
       col += static_cast<int64_t>(gridDim.x) * 256) {
    const int64_t o = col / inner, i = col % inner;
    const int64_t base = o * C * inner + i;
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
    const acc_t ls = ls_of(MS<acc_t>{m, s});
    for (int64_t c = 0; c < C; ++c) {
      const acc_t zl = (static_cast<acc_t>(x[base + c * inner]) - m) * beta - ls;
      out[base + c * inner] = static_cast<T>(log ? zl : fexp(zl));
    }
  }
}

// ------------------------------------------------------------------ backward
// Phase 1 of the backward: sum g y (softmax) or sum g (log_softmax).
template <typename acc_t>
__device__ __forceinline__ acc_t bwd_partial(acc_t g, acc_t o, bool log) {
  return log ? g : g * o;
}

// Phase 2: dz, the stored gradient and the T-gradient term.
template <typename acc_t>
__device__ __forceinline__ acc_t bwd_dz(acc_t g, acc_t o, acc_t S, bool log, bool need_t, acc_t& t) {
  if (log) {
    const acc_t dz = g - fexp(o) * S;
    if (need_t && o != neg_inf<acc_t>()) t += dz * o;
    return dz;
  }
  const acc_t dz = o * (g - S);
  if (need_t && o > acc_t(0)) t += dz * flog(o);
  return dz;
}

template <int TPR, typename T, typename F>
__device__ __forceinline__ void for_each_vec2(const T* a, const T* b, int n, int tid, F&& f) {
  constexpr int V = vec_size<T>();
  const RowSplit<T> sp(a, n);  // b has the same alignment (ensured by the host)
  for (int i = tid; i < sp.head; i += TPR) {
    Vec16<T> va, vb;
    va.v[0] = a[i];
    vb.v[0] = b[i];
    f(i, va, vb, 1);
  }
  const Vec16<T>* va_ = reinterpret_cast<const Vec16<T>*>(a + sp.head);
  const Vec16<T>* vb_ = reinterpret_cast<const Vec16<T>*>(b + sp.head);
  constexpr int U = kUnroll / 2;
  for (int j0 = tid; j0 < sp.nvec; j0 += U * TPR) {
    Vec16<T> ba[U], bb[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * TPR;
      if (j < sp.nvec) {
        ba[u] = va_[j];
        bb[u] = vb_[j];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * TPR;
      if (j < sp.nvec) f(sp.head + j * V, ba[u], bb[u], V);
    }
  }
  for (int i = sp.tail0 + tid; i < n; i += TPR) {
    Vec16<T> va, vb;
    va.v[0] = a[i];
    vb.v[0] = b[i];
    f(i, va, vb, 1);
  }
}

template <typename T, int TPR, int MAXV, typename F>
__device__ __forceinline__ void apply2(const RowRegs<T, TPR, MAXV>& a, const RowRegs<T, TPR, MAXV>& b,
                                       int n, F&& f) {
  constexpr int V = vec_size<T>();
  constexpr int HT = RowRegs<T, TPR, MAXV>::HT;
  const int tid = a.tid;
#pragma unroll
  for (int k = 0; k < HT; ++k) {
    const int i = tid + k * TPR;
    if (i < a.sp.head) {
      Vec16<T> va, vb;
      va.v[0] = a.ht[k];
      vb.v[0] = b.ht[k];
      f(i, va, vb, 1);
    }
  }
#pragma unroll
  for (int k = 0; k < MAXV; ++k) {
    const int j = tid + k * TPR;
    if (j < a.sp.nvec) f(a.sp.head + j * V, a.body[k], b.body[k], V);
  }
#pragma unroll
  for (int k = 0; k < HT; ++k) {
    const int t = a.sp.tail0 + tid + k * TPR;
    if (t < n) {
      Vec16<T> va, vb;
      va.v[0] = a.ht[HT + k];
      vb.v[0] = b.ht[HT + k];
      f(t, va, vb, 1);
    }
  }
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
  __device__ __forceinline__ void operator()(int idx, const Vec16<T>& g, const Vec16<T>& o, int count) {
    constexpr int V = vec_size<T>();
    acc_t r[V];
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (k < count)
        r[k] = beta * bwd_dz(static_cast<acc_t>(g.v[k]), static_cast<acc_t>(o.v[k]), S, log, need_t, t);
    store_vals<T, acc_t>(gx, idx, r, count, vec_ok);
  }
};

template <typename T, int TPR, int MAXV, bool RESIDENT>
__global__ void __launch_bounds__(block_for(TPR), min_blocks_for(block_for(TPR)))
    softmax_bwd_rows_kernel(const T* __restrict__ go, const T* __restrict__ out, T* __restrict__ gx,
                            int64_t rows, int C, TempArg temp, bool log, double* __restrict__ parts) {
  using acc_t = at::opmath_type<T>;
  constexpr int BLOCK = block_for(TPR);
  constexpr int RPB = BLOCK / TPR;
  __shared__ acc_t sred[BLOCK / kWarp];
  __shared__ double sd[BLOCK / kWarp];
  const int tid = threadIdx.x % TPR;
  const int grp = threadIdx.x / TPR;
  const acc_t beta = load_beta<acc_t>(temp);
  double tsum = 0.0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * RPB; base < rows;
       base += static_cast<int64_t>(gridDim.x) * RPB) {
    const int64_t row = base + grp;
    const bool active = row < rows;
    const int n = active ? C : 0;
    const int64_t off = row * static_cast<int64_t>(C);
    BwdSum<T, acc_t> s1{acc_t(0), log};
    BwdOut<T, acc_t> f{beta, acc_t(0), log, gx + off, same_misalignment<T>(gx + off, out + off),
                       parts != nullptr, acc_t(0)};
    if constexpr (RESIDENT) {
      const RowRegs<T, TPR, MAXV> rg(go + off, n, tid);
      const RowRegs<T, TPR, MAXV> ro(out + off, n, tid);
      apply2(rg, ro, n, s1);
      f.S = group_allreduce<TPR>(s1.s, Sum<acc_t>(), sred);
      apply2(rg, ro, n, f);
    } else {
      for_each_vec2<TPR>(go + off, out + off, n, tid, s1);
      f.S = group_allreduce<TPR>(s1.s, Sum<acc_t>(), sred);
      for_each_vec2<TPR>(go + off, out + off, n, tid, f);
    }
    if (parts) tsum += static_cast<double>(f.t);
  }
  if (parts) {
    tsum = block_sum<BLOCK>(-static_cast<double>(beta) * tsum, sd);
    if (threadIdx.x == 0) parts[blockIdx.x] = tsum;
  }
}

template <typename T>
__global__ void __launch_bounds__(256, 2)
    softmax_bwd_strided_kernel(const T* __restrict__ go, const T* __restrict__ out, T* __restrict__ gx,
                               int64_t outer, int64_t C, int64_t inner, TempArg temp, bool log,
                               double* __restrict__ parts) {
  using acc_t = at::opmath_type<T>;
  __shared__ double sd[256 / kWarp];
  const acc_t beta = load_beta<acc_t>(temp);
  const int64_t cols = outer * inner;
  double tsum = 0.0;
  for (int64_t col = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; col < cols;
       col += static_cast<int64_t>(gridDim.x) * 256) {
    const int64_t o = col / inner, i = col % inner;
    const int64_t base = o * C * inner + i;
    acc_t S = 0;
    for (int64_t c = 0; c < C; ++c)
      S += bwd_partial(static_cast<acc_t>(go[base + c * inner]), static_cast<acc_t>(out[base + c * inner]), log);
    acc_t t = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t e = base + c * inner;
      gx[e] = static_cast<T>(beta * bwd_dz(static_cast<acc_t>(go[e]), static_cast<acc_t>(out[e]), S, log, parts != nullptr, t));
    }
    tsum += static_cast<double>(t);
  }
  if (parts) {
    tsum = block_sum<256>(-static_cast<double>(beta) * tsum, sd);
    if (threadIdx.x == 0) parts[blockIdx.x] = tsum;
  }
}

struct StoreCode {
  void* out;
  int code;
  __device__ void operator()(const double* s) const { store_from_double(out, code, 0, s[0]); }
};

void check_temperature(const std::optional<at::Tensor>& temperature_t, double temperature,
                       const at::Tensor& x, const char* op) {
  if (temperature_t.has_value()) {
    const auto& t = *temperature_t;
    TORCH_CHECK(t.numel() == 1 && t.dim() == 0, op, ": temperature tensor must be 0-dim, got shape ",
                t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": temperature tensor must be floating, got ",
                t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), op, ": temperature is on ", t.device(), " but input is on ",
                x.device());
  } else {
    check_float_scalars(temperature, 0.0, op);
  }
}

struct Dims {
  int64_t outer, C, inner;
};

Dims split_dims(const at::Tensor& x, int64_t dim) {
  Dims d{1, x.size(dim), 1};
  for (int64_t i = 0; i < dim; ++i) d.outer *= x.size(i);
  for (int64_t i = dim + 1; i < x.dim(); ++i) d.inner *= x.size(i);
  return d;
}

int64_t wrap_dim(int64_t dim, int64_t ndim, const char* op) {
  const int64_t n = ndim > 0 ? ndim : 1;
  TORCH_CHECK(dim >= -n && dim < n, op, ": dim ", dim, " is out of range for a tensor of ", ndim,
              " dimensions");
  return dim < 0 ? dim + n : dim;
}

int strided_grid(int64_t cols) {
  const int64_t cap = static_cast<int64_t>(sm_count()) * 8 * 4;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(cols, 256), cap)));
}

}  // namespace

at::Tensor softmax_fwd_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& temperature_t,
                            double temperature, int64_t dim_in, bool log) {
  const char* op = log ? "softcal.log_softmax" : "softcal.softmax";
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), op,
              ": input must be float16, bfloat16, float32 or float64, got ", x_in.scalar_type());
  check_temperature(temperature_t, temperature, x_in, op);
  const int64_t dim = wrap_dim(dim_in, x_in.dim(), op);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = (x_in.dim() == 0 ? x_in.reshape({1}) : x_in).contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return x_in.dim() == 0 ? out.reshape({}) : out;
  const Dims d = split_dims(x, dim);
  TORCH_CHECK(d.C < std::numeric_limits<int>::max(), op, ": at most 2^31 - 1 elements along dim");
  const TempArg temp = make_temp(temperature_t, temperature);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_fwd_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    if (d.inner == 1) {
      constexpr int V = vec_size<scalar_t>();
      const int64_t nv = ceil_div(d.C, V);
      const int C = static_cast<int>(d.C);
      // the row in registers up to 512 threads x 4 vectors; longer rows are read twice with the
      // streaming launch shape (common.cuh)
      const int rtpr = pick_tpr(d.C, V, 4);
      if (nv <= static_cast<int64_t>(rtpr) * 4) {
        const int grid = grid_for(d.outer, rtpr);
        dispatch_tpr(rtpr, [&](auto tc) {
          constexpr int TPR = decltype(tc)::value;
          softmax_fwd_rows_kernel<scalar_t, TPR, 4, true><<<grid, block_for(TPR), 0, stream>>>(
              xp, op_, d.outer, C, temp, log);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      } else {
        const int tpr = pick_stream_tpr(d.C, V, d.outer);
        const int grid = grid_for(d.outer, tpr);
        dispatch_tpr(tpr, [&](auto tc) {
          constexpr int TPR = decltype(tc)::value;
          if constexpr (TPR >= 128) {  // rows of > 2048 vectors
            softmax_fwd_rows_kernel<scalar_t, TPR, 1, false><<<grid, block_for(TPR), 0, stream>>>(
                xp, op_, d.outer, C, temp, log);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          } else {
            TORCH_INTERNAL_ASSERT(false, "softcal (CUDA): two-read softmax with ", TPR, " threads per row");
          }
        });
      }
    } else {
      const int grid = strided_grid(d.outer * d.inner);
      softmax_fwd_strided_kernel<scalar_t><<<grid, 256, 0, stream>>>(xp, op_, d.outer, d.C, d.inner,
                                                                     temp, log);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return x_in.dim() == 0 ? out.reshape({}) : out;
}

std::tuple<at::Tensor, at::Tensor> softmax_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& out_in,
    const std::optional<at::Tensor>& temperature_t, double temperature, int64_t dim_in, bool log,
    bool need_temperature_grad) {
  const char* op = log ? "softcal.log_softmax (backward)" : "softcal.softmax (backward)";
  TORCH_CHECK(at::isFloatingType(out_in.scalar_type()), op, ": out must be floating, got ",
              out_in.scalar_type());
  TORCH_CHECK(grad_out_in.sizes() == out_in.sizes(), op, ": grad_out has shape ", grad_out_in.sizes(),
              " but out has shape ", out_in.sizes());
  TORCH_CHECK(grad_out_in.device() == out_in.device(), op, ": grad_out is on ", grad_out_in.device(),
              " but out is on ", out_in.device());
  check_temperature(temperature_t, temperature, out_in, op);
  const int64_t dim = wrap_dim(dim_in, out_in.dim(), op);
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
  if (((reinterpret_cast<uintptr_t>(g.data_ptr()) ^ reinterpret_cast<uintptr_t>(o.data_ptr())) & 15) != 0) {
    // The row kernels read both rows with the same 16-byte split: give them fresh (aligned) copies.
    g = g.clone();
    if ((reinterpret_cast<uintptr_t>(o.data_ptr()) & 15) != 0) o = o.clone();
  }
  const Dims d = split_dims(o, dim);
  TORCH_CHECK(d.C < std::numeric_limits<int>::max(), op, ": at most 2^31 - 1 elements along dim");
  const TempArg temp = make_temp(temperature_t, temperature);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "softmax_bwd_cuda", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* opp = o.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    int grid = 0;
    at::Tensor parts;
    if (d.inner == 1) {
      constexpr int V = vec_size<scalar_t>();
      const int64_t nv = ceil_div(d.C, V);
      const int C = static_cast<int>(d.C);
      const int rtpr = pick_tpr(d.C, V, 4);
      // two rows in registers: only up to 256 threads (at 512 and 1024 threads per block the
      // register cap spills); longer rows are read twice with the streaming launch shape
      const bool resident = nv <= static_cast<int64_t>(rtpr) * 4 && rtpr <= 256;
      const int tpr = resident ? rtpr : pick_stream_tpr(d.C, V, d.outer);
      grid = grid_for(d.outer, tpr);
      if (need_t) parts = at::empty({grid}, o.options().dtype(at::kDouble));
      double* pp = need_t ? parts.data_ptr<double>() : nullptr;
      if (resident) {
        dispatch_tpr(tpr, [&](auto tc) {
          constexpr int TPR = decltype(tc)::value;
          if constexpr (TPR <= 256) {
            softmax_bwd_rows_kernel<scalar_t, TPR, 4, true><<<grid, block_for(TPR), 0, stream>>>(
                gp, opp, gxp, d.outer, C, temp, log, pp);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          } else {
            TORCH_INTERNAL_ASSERT(false, "softcal (CUDA): resident softmax backward with ", TPR, " threads");
          }
        });
      } else {
        dispatch_tpr(tpr, [&](auto tc) {
          constexpr int TPR = decltype(tc)::value;
          softmax_bwd_rows_kernel<scalar_t, TPR, 1, false><<<grid, block_for(TPR), 0, stream>>>(
              gp, opp, gxp, d.outer, C, temp, log, pp);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
    } else {
      grid = strided_grid(d.outer * d.inner);
      if (need_t) parts = at::empty({grid}, o.options().dtype(at::kDouble));
      softmax_bwd_strided_kernel<scalar_t><<<grid, 256, 0, stream>>>(
          gp, opp, gxp, d.outer, d.C, d.inner, temp, log, need_t ? parts.data_ptr<double>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_t) {
      finalize_kernel<1, StoreCode><<<1, 1024, 0, stream>>>(parts.data_ptr<double>(), grid,
                                                            StoreCode{grad_t.data_ptr(), dcode(gt_type)});
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {shape_back(gx), grad_t};
}

}  // namespace cuda
}  // namespace softcal
