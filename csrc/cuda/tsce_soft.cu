// softcal CUDA: cross-entropy against class-probability (soft) targets, forward and backward
// (ops soft_target_fwd / soft_target_bwd, schemas in csrc/schemas.h; the CPU kernels are in
// csrc/cpu/soft_target_cpu.cpp, whose header has the full derivation and the edge cases).
//
// ============================ The maths ============================
// Per row, z_c = beta x_c (beta = 1/T), q_c = (1 - eps) t_c + eps / C, u_c = w_c q_c,
// U = sum_c u_c, m = max_c x_c, ls = log sum_c exp(beta (x_c - m)), lse = beta m + ls:
//   loss    = sum_c u_c (lse - z_c) = beta sum_c u_c (m - x_c) + U ls   (u_c == 0: term 0)
//   log p_c = beta (x_c - m) - ls                                        (exact at the max)
//   dL/dx_c = beta g (U p_c - u_c)
//   dL/dt_c = -g (1 - eps) w_c log p_c          (0 where (1 - eps) w_c == 0)
//   dL/dT   = -beta g ( sum_{x_c > -inf} dz_c log p_c - lse sum_{x_c = -inf} dz_c ),
//             dz_c = U p_c - u_c                (masked logits contribute nothing)
//
// ============================ Kernel design ============================
// Bytes (N rows, C classes, b bytes per element):
//   soft_target_fwd  1 read of the logits + 1 read of the target        2 N C b
//   soft_target_bwd  1 read of each + 1 write of each requested gradient 3-4 N C b
// Per row the forward keeps [m, ls] and U (12 or 24 bytes); the backward needs U before it
// writes the first gradient of a row, which is why it is saved rather than recomputed.
// TPR threads per row (pick_tpr in common.cuh, capped at 512: see soft_tpr), 2 blocks of 256
// threads per SM at least for 16/32-bit types (soft_min_blocks); each thread walks its share
// of the row with 16-byte loads of the logits and, when the target row has the same alignment
// (the usual case: both contiguous with the same C), 16-byte loads of the target at the same
// positions, two pairs in flight before the first use (for_each_pair below); otherwise the
// target is read by scalars. The per-thread state (m, s, d, wc = U) is exact to merge:
//   s = s_a e^{beta (m_a - M)} + s_b e^{beta (m_b - M)},   d = d_a + U_a (M - m_a) + d_b + U_b (M - m_b)
// first across the group by shuffles, then through shared memory (group_allreduce), in a fixed
// order. The max is updated once per vector, one exp2 per element. Per-row losses and
// T-gradients go to per-block partials in double, summed by one block in a fixed order
// (finalize_kernel): deterministic, no atomics. "mean" divides by the row count (a host
// integer): no host synchronisation anywhere (the temperature tensor and grad_loss are read by
// the kernels). Row offsets are int64.
// Not done: the tiny-row tile path of tsce.cuh (C b <= 128 bytes runs at TPR = 4).
#include <torch/library.h>

#include "cuda/common.cuh"
#include "soft_target.h"

namespace softcal {
namespace cuda {
namespace {

constexpr double kSoftLog2e = 1.4426950408889634;

// ------------------------------------------------------------------ per-thread row state
template <typename acc_t>
struct SoftState {
  acc_t m, s, d, wc;  // max x, sum exp(beta (x - m)), sum_{u != 0} u (m - x), wc = sum u
};

template <typename acc_t>
__device__ __forceinline__ SoftState<acc_t> shfl_xor(SoftState<acc_t> v, int mask) {
  SoftState<acc_t> r;
  r.m = __shfl_xor_sync(0xffffffffu, v.m, mask);
  r.s = __shfl_xor_sync(0xffffffffu, v.s, mask);
  r.d = __shfl_xor_sync(0xffffffffu, v.d, mask);
  r.wc = __shfl_xor_sync(0xffffffffu, v.wc, mask);
  return r;
}

// The log-sum-exp merge of two states: lse_merge of common.cuh (wc = U, no target logit).
template <typename acc_t>
struct SoftMerge {
  acc_t bl2;  // beta log2(e)
  __device__ __forceinline__ SoftState<acc_t> operator()(const SoftState<acc_t>& a,
                                                         const SoftState<acc_t>& b) const {
    SoftState<acc_t> r;
    lse_merge(r, a, b, bl2);
    return r;
  }
};

// ------------------------------------------------------------------ the walk over a row pair
// Calls f(first_index, x_vec, t_vec, count) over the elements this thread owns, in the layout of
// the logits row (RowSplit): count == VEC for its aligned vectors, 1 for the head and tail
// scalars (v[0]). The target row is read with 16-byte loads at the same positions when it has
// the logits' misalignment (tvec), by scalars otherwise. kUnroll / 2 pairs of 16-byte loads are
// issued before the first use (1 pair with >= 512 threads per row): as many bytes in flight as
// for_each_vec's single stream, at half the registers that 4 pairs would hold.
template <int TPR, typename T, typename F>
__device__ __forceinline__ void for_each_pair(const T* x, const T* t, int n, int tid, bool tvec,
                                              F&& f) {
  constexpr int V = vec_size<T>();
  constexpr int U = TPR >= 512 ? 1 : ::softcal::cuda::kUnroll / 2;
  const RowSplit<T> sp(x, n);
  for (int i = tid; i < sp.head; i += TPR) {
    Vec16<T> a, b;
    a.v[0] = x[i];
    b.v[0] = t[i];
    f(i, a, b, 1);
  }
  const Vec16<T>* vx = reinterpret_cast<const Vec16<T>*>(x + sp.head);
  const Vec16<T>* vt = reinterpret_cast<const Vec16<T>*>(t + sp.head);
  for (int j0 = tid; j0 < sp.nvec; j0 += U * TPR) {
    Vec16<T> bx[U], bt[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * TPR;
      if (j < sp.nvec) {
        bx[u] = vx[j];
        if (tvec) {
          bt[u] = vt[j];
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) bt[u].v[k] = t[sp.head + j * V + k];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * TPR;
      if (j < sp.nvec) f(sp.head + j * V, bx[u], bt[u], V);
    }
  }
  for (int i = sp.tail0 + tid; i < n; i += TPR) {
    Vec16<T> a, b;
    a.v[0] = x[i];
    b.v[0] = t[i];
    f(i, a, b, 1);
  }
}

template <int TPR, typename T>
__device__ __forceinline__ void soft_fill_row(T* row, int n, int tid, T value) {
  for (int i = tid; i < n; i += TPR) row[i] = value;
}

// ------------------------------------------------------------------ arguments
template <typename T, typename acc_t>
struct SoftArgs {
  const T* logits;
  int64_t xs;  // row stride of the logits
  const T* target;
  int64_t ts;  // row stride of the target
  int64_t rows;
  int C;
  const T* weight;
  TempArg temp;
  acc_t a, b;  // 1 - eps, eps / C
  int reduction;
  // forward outputs
  T* loss_rows;  // reduction none
  acc_t* lse;    // (rows, 2)
  acc_t* mass;   // (rows,)
  double* parts;  // [gridDim.x]: loss (forward) or dL/dT (backward)
  // backward inputs and outputs
  const void* grad_loss;
  int gl_code;
  int64_t gl_stride;
  const acc_t* lse_in;
  const acc_t* mass_in;
  T* grad_x;  // (rows, C) contiguous or nullptr
  T* grad_t;  // (rows, C) contiguous or nullptr
  bool need_t;
};

// ------------------------------------------------------------------ forward
template <typename T, typename acc_t, bool WEIGHTED>
struct SoftAccum {
  SoftState<acc_t> st;
  acc_t bl2, a, b;
  const T* w;

  __device__ __forceinline__ void operator()(int idx, const Vec16<T>& xv, const Vec16<T>& tv,
                                             int count) {
    constexpr int V = vec_size<T>();
    acc_t x[V];
    acc_t vm = neg_inf<acc_t>();
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < count) {
        x[k] = static_cast<acc_t>(xv.v[k]);
        vm = x[k] > vm ? x[k] : vm;
      }
    }
    if (vm > st.m) {
      if (st.m > neg_inf<acc_t>()) {
        st.s *= fexp2((st.m - vm) * bl2);
        st.d += st.wc * (vm - st.m);
      }
      st.m = vm;
    }
    // relative to 0 while every logit so far is -inf: a mass there makes d = +inf
    const acc_t mref = st.m > neg_inf<acc_t>() ? st.m : acc_t(0);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < count) {
        const acc_t dx = x[k] - mref;
        st.s += fexp2(dx * bl2);
        acc_t u = a * static_cast<acc_t>(tv.v[k]) + b;
        if (WEIGHTED) u *= static_cast<acc_t>(w[idx + k]);
        st.d -= u != acc_t(0) ? u * dx : acc_t(0);  // 0 log 0 = 0
        st.wc += u;
      }
    }
  }
};

// Blocks of <= 256 threads: at least 2 per SM (<= 128 registers) for 16- and 32-bit types.
// float64 gets 1: with the block size alone ptxas (CUDA 13.0, sm_90) caps its kernels at 64
// registers and spills; the explicit minimum lets it use the 72-80 it needs.
template <typename T>
constexpr int soft_min_blocks(int block) {
  return (block <= 256 && sizeof(T) < 8) ? 2 : 1;
}

// Launch bounds: see soft_min_blocks (-Xptxas -v: no spills in any instantiation).
template <typename T, int TPR, bool WEIGHTED>
__global__ void __launch_bounds__(block_for(TPR), soft_min_blocks<T>(block_for(TPR)))
    tsce_soft_fwd_kernel(const SoftArgs<T, at::opmath_type<T>> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int BLOCK = block_for(TPR);
  constexpr int RPB = BLOCK / TPR;
  __shared__ SoftState<acc_t> sred[BLOCK / kWarp];
  __shared__ double sd[BLOCK / kWarp];
  const int tid = threadIdx.x % TPR;
  const int grp = threadIdx.x / TPR;
  const acc_t beta = load_beta<acc_t>(a.temp);
  const acc_t bl2 = beta * static_cast<acc_t>(kSoftLog2e);
  double lsum = 0.0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * RPB; base < a.rows;
       base += static_cast<int64_t>(gridDim.x) * RPB) {
    const int64_t row = base + grp;
    const bool active = row < a.rows;
    const T* xr = a.logits + row * a.xs;
    const T* tr = a.target + row * a.ts;
    SoftAccum<T, acc_t, WEIGHTED> acc{
        SoftState<acc_t>{neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0)}, bl2, a.a, a.b, a.weight};
    for_each_pair<TPR>(xr, tr, active ? a.C : 0, tid, same_misalignment<T>(xr, tr), acc);
    const SoftState<acc_t> st = group_allreduce<TPR>(acc.st, SoftMerge<acc_t>{bl2}, sred);
    if (active && tid == 0) {
      const acc_t ls = flog(st.s);
      acc_t loss;
      const bool ok = st.m > neg_inf<acc_t>() && st.m < -neg_inf<acc_t>() && ls == ls;
      if (ok) {
        loss = beta * st.d + st.wc * ls;
        a.lse[2 * row] = st.m;
        a.lse[2 * row + 1] = ls;
      } else {  // no softmax (every logit -inf, or a NaN / +inf logit): NaN
        loss = std::numeric_limits<acc_t>::quiet_NaN();
        a.lse[2 * row] = a.lse[2 * row + 1] = loss;
      }
      a.mass[row] = st.wc;
      if (a.loss_rows) a.loss_rows[row] = static_cast<T>(loss);
      lsum += static_cast<double>(loss);
    }
  }
  lsum = block_sum<BLOCK>(lsum, sd);
  if (threadIdx.x == 0) a.parts[blockIdx.x] = lsum;
}

// ------------------------------------------------------------------ backward
template <typename T, typename acc_t, bool WEIGHTED>
struct SoftGrad {
  acc_t m, ls, ls2;   // row max, log sum, ls log2(e)
  acc_t beta, bl2;
  acc_t U, a, b;
  acc_t bg, ga;       // beta g, g (1 - eps)
  const T* w;
  T* gx;
  T* gt;
  bool vx_ok, vt_ok;  // 16-byte stores possible
  bool need_t;
  acc_t t1, t0;

  __device__ __forceinline__ void operator()(int idx, const Vec16<T>& xv, const Vec16<T>& tv,
                                             int count) {
    constexpr int V = vec_size<T>();
    acc_t o[V];  // one output vector at a time: the logits' gradient, then the target's
    if (gx || need_t) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (k < count) {
          const acc_t x = static_cast<acc_t>(xv.v[k]);
          const acc_t dxm = x - m;
          const acc_t p = fexp2(dxm * bl2 - ls2);
          acc_t u = a * static_cast<acc_t>(tv.v[k]) + b;
          if (WEIGHTED) u *= static_cast<acc_t>(w[idx + k]);
          const acc_t dz = U * p - u;
          o[k] = bg * dz;
          if (need_t) {
            if (x != neg_inf<acc_t>()) t1 += dz * (dxm * beta - ls);  // dz log p
            else t0 += dz;
          }
        }
      }
      if (gx) store_vals<T, acc_t>(gx, idx, o, count, vx_ok);
    }
    if (gt) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (k < count) {
          const acc_t logp = (static_cast<acc_t>(xv.v[k]) - m) * beta - ls;  // exact at the max
          const acc_t coef = WEIGHTED ? ga * static_cast<acc_t>(w[idx + k]) : ga;
          o[k] = coef != acc_t(0) ? -coef * logp : acc_t(0);
        }
      }
      store_vals<T, acc_t>(gt, idx, o, count, vt_ok);
    }
  }
};

template <typename T, int TPR, bool WEIGHTED>
__global__ void __launch_bounds__(block_for(TPR), soft_min_blocks<T>(block_for(TPR)))
    tsce_soft_bwd_kernel(const SoftArgs<T, at::opmath_type<T>> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int BLOCK = block_for(TPR);
  constexpr int RPB = BLOCK / TPR;
  __shared__ Pair<acc_t> sred[BLOCK / kWarp];
  __shared__ double sd[BLOCK / kWarp];
  const int tid = threadIdx.x % TPR;
  const int grp = threadIdx.x / TPR;
  const acc_t beta = load_beta<acc_t>(a.temp);
  const acc_t l2e = static_cast<acc_t>(kSoftLog2e);
  acc_t g0 = 0;
  if (a.reduction != kNone) {
    double g = load_as_double(a.grad_loss, a.gl_code);
    if (a.reduction == kMean) g /= static_cast<double>(a.rows);
    g0 = static_cast<acc_t>(g);
  }
  double tsum = 0.0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * RPB; base < a.rows;
       base += static_cast<int64_t>(gridDim.x) * RPB) {
    const int64_t row = base + grp;
    const bool active = row < a.rows;
    const T* xr = a.logits + row * a.xs;
    const T* tr = a.target + row * a.ts;
    T* gxr = a.grad_x ? a.grad_x + row * static_cast<int64_t>(a.C) : nullptr;
    T* gtr = a.grad_t ? a.grad_t + row * static_cast<int64_t>(a.C) : nullptr;
    SoftGrad<T, acc_t, WEIGHTED> f;
    f.t1 = 0;
    f.t0 = 0;
    f.bg = 0;
    f.m = 0;
    f.ls = 0;
    f.need_t = a.need_t;
    bool ok = false;
    if (active) {
      const acc_t g = a.reduction == kNone
                          ? static_cast<acc_t>(load_as_double(a.grad_loss, a.gl_code, row * a.gl_stride))
                          : g0;
      f.m = a.lse_in[2 * row];
      f.ls = a.lse_in[2 * row + 1];
      ok = f.m > neg_inf<acc_t>() && f.m < -neg_inf<acc_t>() && f.ls == f.ls &&
           f.ls < -neg_inf<acc_t>() && beta == beta;
      f.ls2 = f.ls * l2e;
      f.beta = beta;
      f.bl2 = beta * l2e;
      f.U = a.mass_in[row];
      f.a = a.a;
      f.b = a.b;
      f.bg = beta * g;
      f.ga = g * a.a;
      f.w = a.weight;
      f.gx = gxr;
      f.gt = gtr;
      f.vx_ok = gxr ? same_misalignment<T>(gxr, xr) : false;
      f.vt_ok = gtr ? same_misalignment<T>(gtr, xr) : false;
      if (ok) {
        for_each_pair<TPR>(xr, tr, a.C, tid, same_misalignment<T>(xr, tr), f);
      } else {  // no softmax: NaN gradients
        const T nan = static_cast<T>(std::numeric_limits<acc_t>::quiet_NaN());
        if (gxr) soft_fill_row<TPR>(gxr, a.C, tid, nan);
        if (gtr) soft_fill_row<TPR>(gtr, a.C, tid, nan);
      }
    }
    if (a.need_t) {
      const Pair<acc_t> t =
          group_allreduce<TPR>(Pair<acc_t>{f.t1, f.t0}, PairSum<acc_t>(), sred);
      if (active && tid == 0) {
        const acc_t lse = beta * f.m + f.ls;
        const acc_t tg = ok ? -f.bg * (t.a - lse * t.b) : std::numeric_limits<acc_t>::quiet_NaN();
        tsum += static_cast<double>(tg);
      }
    }
  }
  if (a.need_t) {
    tsum = block_sum<BLOCK>(tsum, sd);
    if (threadIdx.x == 0) a.parts[blockIdx.x] = tsum;
  }
}

// ------------------------------------------------------------------ final reductions
struct SoftLossWriter {
  void* loss;
  int code;
  int reduction;
  double rows;
  __device__ void operator()(const double* s) const {
    store_from_double(loss, code, 0, reduction == kMean ? s[0] / rows : s[0]);
  }
};

struct SoftTempWriter {
  void* gt;
  int code;
  __device__ void operator()(const double* s) const { store_from_double(gt, code, 0, s[0]); }
};

template <typename T>
SoftArgs<T, at::opmath_type<T>> soft_args(const at::Tensor& logits, const at::Tensor& target,
                                          const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& temperature_t,
                                          double temperature, double eps, int64_t reduction) {
  using acc_t = at::opmath_type<T>;
  SoftArgs<T, acc_t> a{};
  a.logits = logits.data_ptr<T>();
  a.xs = logits.stride(0);
  a.target = target.data_ptr<T>();
  a.ts = target.stride(0);
  a.rows = logits.size(0);
  a.C = static_cast<int>(logits.size(1));
  a.weight = weight.has_value() ? weight->data_ptr<T>() : nullptr;
  a.temp = make_temp(temperature_t, temperature);
  a.a = static_cast<acc_t>(1.0 - eps);
  a.b = static_cast<acc_t>(eps / static_cast<double>(logits.size(1)));
  a.reduction = static_cast<int>(reduction);
  return a;
}

// Threads per row: pick_tpr's choice, capped at 512. A row pair holds twice the registers of a
// single stream, and blocks of 1024 threads (64 registers per thread at most) spill; 512 threads
// then walk the longest rows with more vectors each.
inline int soft_tpr(int64_t C, int vec) {
  const int t = pick_tpr(C, vec, kUnroll);
  return t > 512 ? 512 : t;
}

template <typename F>
inline void dispatch_soft_tpr(int tpr, F&& f) {
  switch (tpr) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    case 256: f(std::integral_constant<int, 256>{}); break;
    default: f(std::integral_constant<int, 512>{}); break;
  }
}

template <typename F>
inline void dispatch_weighted(bool weighted, F&& f) {
  if (weighted) f(std::integral_constant<bool, true>{});
  else f(std::integral_constant<bool, false>{});
}

// ================================================================== ops
std::tuple<at::Tensor, at::Tensor, at::Tensor> tsce_soft_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t reduction) {
  const char* op = "softcal.cross_entropy (class-probability targets)";
  check_soft_inputs(logits, target, weight_in, temperature_t, temperature, label_smoothing,
                    reduction, op);
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor");
  TORCH_CHECK(logits.size(1) < std::numeric_limits<int>::max(), op,
              ": at most 2^31 - 1 classes, got ", logits.size(1));
  c10::cuda::CUDAGuard guard(logits.device());
  const at::ScalarType acc = acc_type(logits.scalar_type());
  const int64_t rows = logits.size(0), C = logits.size(1);
  at::Tensor loss = reduction == kNone ? at::empty({rows}, logits.options())
                                       : at::empty({}, logits.options());
  at::Tensor lse = at::empty({rows, 2}, logits.options().dtype(acc));
  at::Tensor mass = at::empty({rows}, logits.options().dtype(acc));
  if (rows == 0 || C == 0) {  // no rows: mean NaN, sum 0; no classes: empty sums, loss 0
    lse.fill_(-std::numeric_limits<double>::infinity());
    mass.zero_();
    if (reduction == kMean && rows == 0) loss.fill_(std::numeric_limits<double>::quiet_NaN());
    else loss.zero_();
    return {loss, lse, mass};
  }
  std::optional<at::Tensor> weight;
  if (weight_in.has_value()) weight = weight_in->contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tsce_soft_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = soft_args<scalar_t>(logits, target, weight, temperature_t, temperature,
                                 label_smoothing, reduction);
    const int tpr = soft_tpr(C, vec_size<scalar_t>());
    const int grid = grid_for(rows, tpr);
    at::Tensor parts = at::empty({grid}, logits.options().dtype(at::kDouble));
    a.loss_rows = reduction == kNone ? loss.data_ptr<scalar_t>() : nullptr;
    a.lse = lse.data_ptr<acc_t>();
    a.mass = mass.data_ptr<acc_t>();
    a.parts = parts.data_ptr<double>();
    dispatch_weighted(a.weight != nullptr, [&](auto wc) {
      constexpr bool W = decltype(wc)::value;
      dispatch_soft_tpr(tpr, [&](auto tc) {
        constexpr int TPR = decltype(tc)::value;
        tsce_soft_fwd_kernel<scalar_t, TPR, W><<<grid, block_for(TPR), 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    if (reduction != kNone) {
      const SoftLossWriter w{loss.data_ptr(), dcode(logits.scalar_type()),
                             static_cast<int>(reduction), static_cast<double>(rows)};
      finalize_kernel<1, SoftLossWriter><<<1, 1024, 0, stream>>>(parts.data_ptr<double>(), grid, w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, lse, mass};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tsce_soft_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& weight_in, const at::Tensor& lse, const at::Tensor& mass,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t reduction, bool need_logits_grad, bool need_target_grad, bool need_temperature_grad) {
  const char* op = "softcal.cross_entropy (class-probability targets, backward)";
  check_soft_inputs(logits, target, weight_in, temperature_t, temperature, label_smoothing,
                    reduction, op);
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor");
  TORCH_CHECK(logits.size(1) < std::numeric_limits<int>::max(), op,
              ": at most 2^31 - 1 classes, got ", logits.size(1));
  const int64_t rows = logits.size(0), C = logits.size(1);
  const at::ScalarType acc = acc_type(logits.scalar_type());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == rows && lse.size(1) == 2 && lse.scalar_type() == acc,
              op, ": lse must be (", rows, ", 2) ", acc, ", got ", lse.sizes(), " ", lse.scalar_type());
  TORCH_CHECK(mass.dim() == 1 && mass.size(0) == rows && mass.scalar_type() == acc, op,
              ": mass must be (", rows, ",) ", acc, ", got ", mass.sizes(), " ", mass.scalar_type());
  TORCH_CHECK(at::isFloatingType(grad_loss.scalar_type()), op, ": grad_loss must be floating, got ",
              grad_loss.scalar_type());
  if (reduction == kNone) {
    TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == rows, op, ": grad_loss must be (",
                rows, ",) for reduction none, got ", grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must be 0-dim, got ", grad_loss.sizes());
  }
  TORCH_CHECK(grad_loss.device() == logits.device() && lse.device() == logits.device() &&
                  mass.device() == logits.device(),
              op, ": grad_loss, lse and mass must be on ", logits.device());
  c10::cuda::CUDAGuard guard(logits.device());
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  at::Tensor grad_x = need_logits_grad ? at::empty({rows, C}, logits.options())
                                       : at::empty({0}, logits.options());
  at::Tensor grad_tg = need_target_grad ? at::empty({rows, C}, target.options())
                                        : at::empty({0}, target.options());
  const at::ScalarType gt_type = temp_grad_type(temperature_t, logits.scalar_type());
  at::Tensor grad_temp = at::zeros({}, logits.options().dtype(gt_type));
  if (rows == 0 || C == 0 || (!need_logits_grad && !need_target_grad && !need_t)) {
    return {grad_x, grad_tg, grad_temp};
  }
  std::optional<at::Tensor> weight;
  if (weight_in.has_value()) weight = weight_in->contiguous();
  const at::Tensor lse_c = lse.contiguous(), mass_c = mass.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tsce_soft_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = soft_args<scalar_t>(logits, target, weight, temperature_t, temperature,
                                 label_smoothing, reduction);
    const int tpr = soft_tpr(C, vec_size<scalar_t>());
    const int grid = grid_for(rows, tpr);
    at::Tensor parts = need_t ? at::empty({grid}, logits.options().dtype(at::kDouble)) : at::Tensor();
    a.grad_loss = grad_loss.data_ptr();
    a.gl_code = dcode(grad_loss.scalar_type());
    a.gl_stride = reduction == kNone ? grad_loss.stride(0) : 0;
    a.lse_in = lse_c.data_ptr<acc_t>();
    a.mass_in = mass_c.data_ptr<acc_t>();
    a.grad_x = need_logits_grad ? grad_x.data_ptr<scalar_t>() : nullptr;
    a.grad_t = need_target_grad ? grad_tg.data_ptr<scalar_t>() : nullptr;
    a.need_t = need_t;
    a.parts = need_t ? parts.data_ptr<double>() : nullptr;
    dispatch_weighted(a.weight != nullptr, [&](auto wc) {
      constexpr bool W = decltype(wc)::value;
      dispatch_soft_tpr(tpr, [&](auto tc) {
        constexpr int TPR = decltype(tc)::value;
        tsce_soft_bwd_kernel<scalar_t, TPR, W><<<grid, block_for(TPR), 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    if (need_t) {
      const SoftTempWriter w{grad_temp.data_ptr(), dcode(gt_type)};
      finalize_kernel<1, SoftTempWriter><<<1, 1024, 0, stream>>>(parts.data_ptr<double>(), grid, w);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_x, grad_tg, grad_temp};
}

}  // namespace
}  // namespace cuda
}  // namespace softcal

TORCH_LIBRARY_IMPL(softcal, CUDA, m) {
  m.impl("soft_target_fwd", &softcal::cuda::tsce_soft_fwd_cuda);
  m.impl("soft_target_bwd", &softcal::cuda::tsce_soft_bwd_cuda);
}
