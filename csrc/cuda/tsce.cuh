// softcal CUDA: temperature-scaled, label-smoothed cross-entropy. The kernels and their host
// helpers; the ops are in cross_entropy_fwd.cu (cross_entropy_fwd), cross_entropy_bwd.cu (cross_entropy_bwd, scale_rows_) and
// cross_entropy_fused.cu (cross_entropy_fused, cross_entropy_fused_), split so that they compile in parallel.
//
// ============================ The maths ============================
// Written out in csrc/common.h (read it first). Per row, z_c = beta x_c, beta = 1/T:
//   lse   = m + log sum_c exp(z_c - m)
//   loss  = (1 - eps) w_y (lse - z_y) + (eps / C) sum_c w_c (lse - z_c)      [eps == 0: no 2nd term]
//   dL/dz_c = A p_c - (eps / C) w_c - (1 - eps) w_y [c == y],   A = (1 - eps) w_y + eps W / C
//   dL/dx_c = beta g dL/dz_c,    dL/dT = -beta g sum_{c: x_c != -inf} dL/dz_c z_c
//
// How these kernels evaluate it (numerics):
//  * One read of the row computes everything the loss needs. Each thread keeps a running state
//    in units of the raw logits (beta > 0, so max z = beta max x): m = max x, s = sum
//    exp(beta (x - m)), d = sum w_c (m - x_c) (>= 0; grows by wc (m' - m) when m grows),
//    wc = sum w_c, and xy = x_y (in the one thread that sees the target, 0 elsewhere). Two states
//    merge exactly (s = s_a e^{beta (m_a - M)} + s_b e^{beta (m_b - M)}, d = d_a + d_b +
//    wc_a (M - m_a) + wc_b (M - m_b)): first across the threads of a group by shuffles, then
//    across warps through shared memory, always in the same order. With ls = log s:
//      lse = beta m + ls,   lse - z_y = beta (m - x_y) + ls,   sum_c w_c (lse - z_c) = beta d + wc ls
//    so no result is the difference of two large numbers (|x| ~ 1e4 keeps its digits). The max
//    is updated once per 16-byte vector; one exp2 per element (exp2(beta log2(e) (x - m))).
//  * Phase 2 (gradient): p = exp2(beta log2(e) (x - m) - ls log2(e)), with m and ls of the row
//    at hand (fused kernel) or saved by the forward as the pair [m, ls] (backward). The row max is
//    subtracted before any scaling, so the exponent at the maximum is exactly -ls (0 when one
//    class dominates, p = 1 exactly for C = 1); the target's term is formed as
//    ty expm1(log p_y) + ..., so that p_y - 1 keeps its relative accuracy. The loss variant is a template parameter (KIND: no smoothing / smoothing / smoothing
//    with class weights), so that the element loops carry no dead work: the kernels must stay
//    under ~10 instructions per element to keep up with HBM at 8 bf16 per 16-byte load.
//  * The T-gradient sum is shifted by lse: sum_nm dz_c z_c = sum_nm dz_c (z_c - lse)
//    - lse sum_{masked} dz_c (sum_c dz_c = 0), which keeps large logits accurate.
//  * Accumulation in acc = at::opmath_type (float for half/bf16/float, double for double);
//    per-row results are summed into per-block partials in double, then one block sums the
//    partials in a fixed order (finalize_kernel): no float atomics, bitwise reproducible.
//  * Rows whose target is ignore_index are not read at all: loss 0, gradient 0, [m, ls] = [0, 0].
//  * Fully masked rows: m = -inf is detected (no exp(-inf - -inf)); [m, ls] is NaN, hence the loss
//    and gradient of a non-ignored row (common.h).
//  * Targets outside [0, C): CUDA_KERNEL_ASSERT (device-side assert, as PyTorch), and the row is
//    then treated as ignored so that nothing is read out of bounds.
//
// ============================ Kernel design ============================
// Bytes (N rows, C classes, b bytes per element): the logits dominate; the target (8 N), the
// saved [m, ls] (8 N) and per-row losses are small next to them unless C is tiny.
//   cross_entropy_fwd     1 read of the logits                       N C b
//   cross_entropy_bwd     1 read of the logits, 1 write of the grad  2 N C b
//   cross_entropy_fused   1 read, 1 write when the row fits on chip  2 N C b
//                (held in registers, <= 4 vectors of 16 B per thread, <= 512 threads per row:
//                C <= 16384 bf16/fp16, 8192 fp32, 4096 fp64). Longer rows: two reads and one
//                write; the second read of a row should come from L2: one row per SM at a time
//                (512 threads, 4 loads of 16 B in flight each, a grid of one block per SM), so
//                132 rows are in flight: 33 MiB for C = 131072 bf16 against 50 MiB of L2 (66 MiB
//                for C = 256000: partly HBM again): between 2 and 3 N C b of traffic.
//   mean in the fused kernel needs denom before the gradient is written: a small grid-stride
//   kernel sums w_y over the target first (8 N bytes), then one block finalises it.
//   scale_rows_  1 read + 1 write, and nothing at all for a 0-dim scale of 1 (each block reads
//                *scale and returns).
// Launch shapes, chosen by C (and N for long rows):
//  * C * b <= 128 bytes, contiguous rows (tsce_tile_kernel): a block of 256 threads stages 256
//    consecutive rows (one contiguous range) in shared memory with 16-byte loads coalesced across
//    the block; each thread then handles one row alone; the gradient goes back out through the
//    same tile. (1e6, 10) then moves as many bytes per load instruction as a long row.
//  * streaming kernels (fwd, bwd, the two-read fused path): TPR threads per row
//    (pick_stream_tpr in common.cuh), about 16 vectors of 16 B per thread, at most 256 threads
//    per row unless the rows are too few to fill the device (then up to 512). TPR in
//    {4, 8, 16, 32} puts 256 / TPR rows in a block of 256 threads (reductions by shuffles only);
//    TPR in {128, 256, 512} gives a row to that many threads (shuffles + one shared-memory step).
//    No blocks of 1024 threads: at 64 registers a thread they spilled (ptxas, sm_90), and one
//    such block per SM left half of it idle (the 2026-12-04 H200 run: 50 % occupancy, one 16-byte
//    load in flight per thread, 21-56 % of the bandwidth in bf16).
//  * the register-resident fused path: TPR = pick_tpr(C, V, 4) <= 512, 4 vectors per thread.
//  * Streaming loops issue 4 (blocks of 512 threads: 2) vector loads per thread before the
//    first use. The grid is a grid-stride loop of at most 4 waves of resident blocks (grid_for),
//    so the per-block partials are few. The launch shape depends only on the shape and the
//    device (its SM count): results are bitwise reproducible on a given device.
//  * The element loops are kept short: the max of a vector as a tree (bf16/fp16 as packed pairs,
//    HMNMX2), the exps and differences summed as trees before joining the running sums.
// Every row is read with 16-byte loads: a misaligned head and a tail of < 16 bytes are read as
// scalars (RowSplit), so odd C (50257) and row offsets still stream at full width.
// No host synchronisation anywhere: the temperature, denom and grad_loss are read by the
// kernels from device memory. Every op is CUDA-graph capturable.
#pragma once

#include "cuda/common.cuh"
#include "cuda/ops.cuh"

namespace softcal {
namespace cuda {
namespace {

// ------------------------------------------------------------------ loss variants
// KIND (a template parameter, so that the element loops carry no dead work):
//   0  no smoothing (eps == 0): the smoothing sum is never formed (no 0 * inf)
//   1  smoothing, no class weights
//   2  smoothing with class weights (w_c read per element)
// Class weights without smoothing only need w_y, read once per row.
template <typename F>
inline void dispatch_kind(int kind, F&& f) {
  switch (kind) {
    case 0: f(std::integral_constant<int, 0>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    default: f(std::integral_constant<int, 2>{}); break;
  }
}

inline int kind_of(double eps, bool weighted) { return eps > 0 ? (weighted ? 2 : 1) : 0; }

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// ------------------------------------------------------------------ per-thread row state
// In units of the raw logits x (beta > 0, so the max of z = beta x is beta max x):
//   m  = max x,   s = sum exp(beta (x - m)),   d = sum w_c (m - x_c) >= 0,   wc = sum w_c,
//   xy = x_y in the thread that sees the target (0 elsewhere: merged by a sum).
// Then, with ls = log s:  lse = beta m + ls,  lse - z_y = beta (m - x_y) + ls  (no difference of
// two large numbers) and  sum_c w_c (lse - z_c) = beta d + wc ls  (a sum of terms >= 0).
template <typename acc_t>
struct CEState {
  acc_t m, s, d, wc, xy;
};

template <typename acc_t>
__device__ __forceinline__ CEState<acc_t> shfl_xor(CEState<acc_t> v, int mask) {
  CEState<acc_t> r;
  r.m = __shfl_xor_sync(0xffffffffu, v.m, mask);
  r.s = __shfl_xor_sync(0xffffffffu, v.s, mask);
  r.d = __shfl_xor_sync(0xffffffffu, v.d, mask);
  r.wc = __shfl_xor_sync(0xffffffffu, v.wc, mask);
  r.xy = __shfl_xor_sync(0xffffffffu, v.xy, mask);
  return r;
}

template <typename acc_t>
__device__ __forceinline__ CEState<acc_t> ce_init() {
  return CEState<acc_t>{neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
}

// The log-sum-exp merge of two states (lse_merge of common.cuh), plus the target's logit.
template <typename acc_t>
struct CEMerge {
  acc_t bl2;
  __device__ __forceinline__ CEState<acc_t> operator()(const CEState<acc_t>& a,
                                                       const CEState<acc_t>& b) const {
    CEState<acc_t> r;
    lse_merge(r, a, b, bl2);
    r.xy = a.xy + b.xy;
    return r;
  }
};

template <int N, typename acc_t>
__device__ __forceinline__ acc_t tree_sum(const acc_t* v) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    return tree_sum<N / 2>(v) + tree_sum<N - N / 2>(v + N / 2);
  }
}

// Phase 1: consumes the elements of a row into the thread's state. The max is updated once per
// 16-byte vector; one exp per element.
template <typename T, typename acc_t, int KIND>
struct CEAccum {
  CEState<acc_t> st;
  acc_t bl2;
  const T* w;  // class weights (KIND 2)
  int y;       // target (-1: none)

  __device__ __forceinline__ void operator()(int idx, const Vec16<T>& v, int count) {
    constexpr int V = vec_size<T>();
    acc_t x[V];
#pragma unroll
    for (int k = 0; k < V; ++k) x[k] = k < count ? static_cast<acc_t>(v.v[k]) : neg_inf<acc_t>();
    const acc_t vm = vec_max<T, acc_t>(v, x, count);
    if (vm > st.m) {
      if (st.m > neg_inf<acc_t>()) {
        st.s *= fexp2((st.m - vm) * bl2);
        if (KIND > 0) st.d += st.wc * (vm - st.m);
      }
      st.m = vm;
    }
    const acc_t mref = st.m > neg_inf<acc_t>() ? st.m : acc_t(0);
    // The exps and (for smoothing) the differences are summed as a tree, then added to the
    // running sums: short dependency chains, the same number of additions.
    acc_t e[V], dd[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      e[k] = acc_t(0);
      dd[k] = acc_t(0);
      if (k < count) {
        const acc_t dx = x[k] - mref;
        e[k] = fexp2(dx * bl2);
        if (KIND == 1) dd[k] = dx;
        if (KIND == 2) {
          const acc_t wk = static_cast<acc_t>(w[idx + k]);
          dd[k] = wk * dx;
          st.wc += wk;
        }
      }
    }
    st.s += tree_sum<V>(e);
    if (KIND > 0) st.d -= tree_sum<V>(dd);
    if (KIND == 1) st.wc += static_cast<acc_t>(count);
    if (static_cast<unsigned>(y - idx) < static_cast<unsigned>(count)) {
#pragma unroll
      for (int k = 0; k < V; ++k)  // no runtime index into v: it would go to local memory
        if (idx + k == y) st.xy = x[k];
    }
  }
};

// Loss and lse of a non-ignored row from its merged state.
template <typename acc_t, int KIND>
__device__ __forceinline__ acc_t row_loss(const CEState<acc_t>& st, acc_t beta, acc_t eps, acc_t cw,
                                          acc_t wy, acc_t& lse, acc_t& ls) {
  if (!(st.m > neg_inf<acc_t>())) {  // fully masked row (or NaN logits)
    lse = ls = std::numeric_limits<acc_t>::quiet_NaN();
    return lse;
  }
  ls = flog_sum(st.s);
  lse = beta * st.m + ls;
  acc_t loss = (acc_t(1) - eps) * wy * (beta * (st.m - st.xy) + ls);
  if (KIND > 0) loss += cw * (beta * st.d + st.wc * ls);
  return loss;
}

// Phase 2: the gradient of each element, stored to out, and the T-gradient sums. With the row's
// m (max of the raw logits) and ls = log sum exp(beta (x - m)), from the row at hand (fused) or
// saved by the forward (backward):  log p = z - lse = beta (x - m) - ls,  exactly 0 - ls at the
// row maximum whatever the magnitude of the logits.
// dL/dx_c = bg (A p_c - cw w_c - ty [c == y]). The target's element is formed in acc precision
// as bg (ty expm1(log p_y) + As p_y - cw w_y), As = A - ty = eps W / C: p_y - 1 keeps its relative
// accuracy in confident rows (p_y -> 1), where A p_y - ty would cancel.
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t target_dz(acc_t lp, acc_t ty, acc_t As, acc_t cw, acc_t wk) {
  return ty * ::expm1(lp) + As * ::exp(lp) - cw * wk;
}

template <typename T, typename acc_t, int KIND>
struct CEGrad {
  acc_t bl2;     // beta log2(e)
  acc_t sh;      // m
  acc_t off2;    // ls * log2(e)
  acc_t beta, off;  // z - lse = beta (x - sh) - off
  // The T-gradient sums dz_c (beta (x_c - sh) - toff): toff = 0 in the cross-entropy kernels
  // (shifted by beta m: the rounding noise of sum_c dz_c = 0 is then not multiplied by ls, which
  // cost 4x PyTorch's error at T = 2.5), toff = off for shard_grad (its contract).
  acc_t toff;
  acc_t A, As, cw, ty, bg, bgA, bgcw;
  const T* w;
  int y;
  T* out;  // gradient row or nullptr
  bool vec_ok;
  bool need_t;
  // The T-gradient sums, in double: a sum over every element of a row of terms that cancel
  // (sum_c dz_c = 0); in float its error exceeded PyTorch's own (2.5e-6 against 6e-7). Only
  // kernels that compute dL/dT (a temperature tensor that requires grad) pay for it.
  double t1, t0;
  acc_t xy = 0;        // x_y, seen by the thread whose elements hold the target
  bool have_y = false;

  // dL/dz of an element in the hot loop (the target's generic form is corrected by finish()).
  __device__ __forceinline__ acc_t p_of(acc_t x) const { return fexp2((x - sh) * bl2 - off2); }

  __device__ __forceinline__ void operator()(int idx, const Vec16<T>& v, int count) {
    constexpr int V = vec_size<T>();
    acc_t g[V];
    if (!need_t) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (k < count) {
          const acc_t p = p_of(static_cast<acc_t>(v.v[k]));
          if (KIND == 0) g[k] = p * bgA;
          else if (KIND == 1) g[k] = p * bgA - bgcw;
          else g[k] = p * bgA - bgcw * static_cast<acc_t>(w[idx + k]);
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (k < count) {
          const acc_t x = static_cast<acc_t>(v.v[k]);
          const acc_t zt = (x - sh) * beta - toff;
          const acc_t wk = KIND == 2 ? static_cast<acc_t>(w[idx + k]) : acc_t(1);
          const acc_t dz = A * p_of(x) - (KIND > 0 ? cw * wk : acc_t(0));
          g[k] = bg * dz;
          if (x != neg_inf<acc_t>()) t1 += static_cast<double>(dz) * static_cast<double>(zt);
          else t0 += static_cast<double>(dz);
        }
      }
    }
    if (static_cast<unsigned>(y - idx) < static_cast<unsigned>(count)) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (idx + k == y) {  // the generic form of the target's element: finish() refines it
          xy = static_cast<acc_t>(v.v[k]);
          have_y = true;
          g[k] -= bg * ty;
          if (need_t) {
            if (xy != neg_inf<acc_t>()) t1 -= static_cast<double>(ty) * static_cast<double>((xy - sh) * beta - toff);
            else t0 -= static_cast<double>(ty);
          }
        }
      }
    }
    if (out) store_vals<T, acc_t>(out, idx, g, count, vec_ok);
  }

  // After the row's loop, in the thread that saw the target: its element in acc precision,
  // bg (ty expm1(log p_y) + As p_y - cw w_y), written over the generic one (same thread, later in
  // program order), and the T-gradient sums corrected by the difference. Kept out of the hot loop:
  // expm1 there made ptxas spill.
  __device__ __forceinline__ void finish() {
    if (!have_y) return;
    const acc_t wk = KIND == 2 ? static_cast<acc_t>(w[y]) : acc_t(1);
    const acc_t zl = (xy - sh) * beta - off;
    const acc_t generic = A * p_of(xy) - (KIND > 0 ? cw * wk : acc_t(0)) - ty;
    const acc_t dz = target_dz<T, acc_t>(zl, ty, As, cw, wk);
    if (out) out[y] = static_cast<T>(bg * dz);
    if (need_t) {
      if (xy != neg_inf<acc_t>()) t1 += static_cast<double>(dz - generic) * static_cast<double>((xy - sh) * beta - toff);
      else t0 += static_cast<double>(dz - generic);
    }
  }
};

template <int TPR, typename T>
__device__ __forceinline__ void fill_row(T* row, int n, int tid, T value) {
  constexpr int V = vec_size<T>();
  const RowSplit<T> sp(row, n);
  for (int i = tid; i < sp.head; i += TPR) row[i] = value;
  Vec16<T> o;
#pragma unroll
  for (int k = 0; k < V; ++k) o.v[k] = value;
  Vec16<T>* vrow = reinterpret_cast<Vec16<T>*>(row + sp.head);
  for (int j = tid; j < sp.nvec; j += TPR) vrow[j] = o;
  for (int i = sp.tail0 + tid; i < n; i += TPR) row[i] = value;
}

// Reads the target of a row; asserts on out-of-range targets; -1 for ignored/out-of-range rows.
__device__ __forceinline__ int load_target(const int64_t* target, int64_t row, int64_t ignore_index,
                                           int C) {
  const int64_t y = target[row];
  if (y == ignore_index) return -1;
  CUDA_KERNEL_ASSERT(y >= 0 && y < C && "softcal.cross_entropy: target out of range");
  if (y < 0 || y >= C) return -1;
  return static_cast<int>(y);
}

// ------------------------------------------------------------------ argument blocks
template <typename T, typename acc_t>
struct CEArgs {
  const T* logits;
  int64_t row_stride;
  int64_t rows;
  int C;
  const int64_t* target;
  const T* weight;
  int64_t ignore_index;
  TempArg temp;
  acc_t eps;
  int reduction;
  // fwd outputs
  T* loss_rows;  // reduction none
  acc_t* lse;
  double* parts;  // [3][gridDim.x]: loss, w_y of valid rows, T-gradient
  // bwd inputs
  const void* grad_loss;
  int gl_code;
  int64_t gl_stride;
  const acc_t* lse_in;
  const acc_t* denom;  // bwd (mean), fused (mean)
  const acc_t* wsum;   // W, or nullptr (then W = C)
  // gradient outputs
  T* grad;  // row stride C
  bool need_t;
  void* gt_rows;  // fused, reduction none: per-row dL_i/dT
  int gt_code;
};

template <int BLOCK>
__device__ __forceinline__ void write_parts(double* parts, double l, double w, double t,
                                            double* smem) {
  l = block_sum<BLOCK>(l, smem);
  w = block_sum<BLOCK>(w, smem);
  t = block_sum<BLOCK>(t, smem);
  if (threadIdx.x == 0) {
    parts[blockIdx.x] = l;
    parts[gridDim.x + blockIdx.x] = w;
    parts[2 * gridDim.x + blockIdx.x] = t;
  }
}

// Sets the phase-2 coefficients of a non-ignored row.
template <typename T, typename acc_t, int KIND>
__device__ __forceinline__ void grad_setup(CEGrad<T, acc_t, KIND>& f, acc_t beta, acc_t eps,
                                           acc_t cw, acc_t W, acc_t C, acc_t wy, acc_t g, acc_t sh,
                                           acc_t off) {
  const acc_t l2e = static_cast<acc_t>(kLog2e);
  f.beta = beta;
  f.bl2 = beta * l2e;
  f.sh = sh;
  f.off = off;
  f.toff = acc_t(0);
  f.off2 = off * l2e;
  f.ty = (acc_t(1) - eps) * wy;
  f.As = KIND > 0 ? eps * W / C : acc_t(0);
  f.A = f.ty + f.As;
  f.cw = cw;
  f.bg = beta * g;
  f.bgA = f.bg * f.A;
  f.bgcw = f.bg * cw;
}

// ------------------------------------------------------------------ forward
template <typename T, int TPR, int KIND>
__global__ void __launch_bounds__(block_for(TPR), min_blocks_for(block_for(TPR)))
    tsce_fwd_kernel(const CEArgs<T, at::opmath_type<T>> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int BLOCK = block_for(TPR);
  constexpr int RPB = BLOCK / TPR;
  __shared__ CEState<acc_t> sred[BLOCK / kWarp];
  __shared__ double sd[BLOCK / kWarp];
  const int tid = threadIdx.x % TPR;
  const int grp = threadIdx.x / TPR;
  const acc_t beta = load_beta<acc_t>(a.temp);
  const acc_t bl2 = beta * static_cast<acc_t>(kLog2e);
  const acc_t cw = KIND > 0 ? a.eps / static_cast<acc_t>(a.C) : acc_t(0);
  double lsum = 0.0, wsum = 0.0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * RPB; base < a.rows;
       base += static_cast<int64_t>(gridDim.x) * RPB) {
    const int64_t row = base + grp;
    const bool active = row < a.rows;
    const int y = active ? load_target(a.target, row, a.ignore_index, a.C) : -1;
    const bool valid = y >= 0;
    const T* xr = a.logits + row * a.row_stride;
    CEAccum<T, acc_t, KIND> acc{ce_init<acc_t>(), bl2, a.weight, y};
    for_each_vec<TPR>(xr, valid ? a.C : 0, tid, acc);
    const CEState<acc_t> st = group_allreduce<TPR>(acc.st, CEMerge<acc_t>{bl2}, sred);
    if (active && tid == 0) {
      acc_t loss = 0, lse, ls = 0, m = 0;
      if (valid) {
        const acc_t wy = a.weight ? static_cast<acc_t>(a.weight[y]) : acc_t(1);
        loss = row_loss<acc_t, KIND>(st, beta, a.eps, cw, wy, lse, ls);
        m = ls == ls ? st.m : ls;  // NaN for rows without a softmax
        lsum += static_cast<double>(loss);
        wsum += static_cast<double>(wy);
      }
      a.lse[2 * row] = m;
      a.lse[2 * row + 1] = ls;
      if (a.loss_rows) a.loss_rows[row] = static_cast<T>(loss);
    }
  }
  write_parts<BLOCK>(a.parts, lsum, wsum, 0.0, sd);
}

// ------------------------------------------------------------------ backward
template <typename T, int TPR, int KIND>
__global__ void __launch_bounds__(block_for(TPR), min_blocks_for(block_for(TPR)))
    tsce_bwd_kernel(const CEArgs<T, at::opmath_type<T>> a) {
  using acc_t = at::opmath_type<T>;
  constexpr int BLOCK = block_for(TPR);
  constexpr int RPB = BLOCK / TPR;
  __shared__ Pair<double> sred[BLOCK / kWarp];
  __shared__ double sd[BLOCK / kWarp];
  const int tid = threadIdx.x % TPR;
  const int grp = threadIdx.x / TPR;
  const acc_t beta = load_beta<acc_t>(a.temp);
  const acc_t cw = KIND > 0 ? a.eps / static_cast<acc_t>(a.C) : acc_t(0);
  const acc_t W = a.wsum ? *a.wsum : static_cast<acc_t>(a.C);
  acc_t g0 = 0;
  if (a.reduction != kNone) {
    g0 = static_cast<acc_t>(load_as_double(a.grad_loss, a.gl_code));
    if (a.reduction == kMean) g0 = g0 / *a.denom;
  }
  double tsum = 0.0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * RPB; base < a.rows;
       base += static_cast<int64_t>(gridDim.x) * RPB) {
    const int64_t row = base + grp;
    const bool active = row < a.rows;
    const int y = active ? load_target(a.target, row, a.ignore_index, a.C) : -1;
    const bool valid = y >= 0;
    const T* xr = a.logits + row * a.row_stride;
    T* gr = a.grad ? a.grad + row * static_cast<int64_t>(a.C) : nullptr;
    CEGrad<T, acc_t, KIND> f;
    f.t1 = 0;
    f.t0 = 0;
    f.need_t = a.need_t;
    f.off = 0;
    f.sh = 0;
    f.bg = 0;
    if (valid) {
      const acc_t g = a.reduction == kNone
                          ? static_cast<acc_t>(load_as_double(a.grad_loss, a.gl_code, row * a.gl_stride))
                          : g0;
      const acc_t wy = a.weight ? static_cast<acc_t>(a.weight[y]) : acc_t(1);
      grad_setup(f, beta, a.eps, cw, W, static_cast<acc_t>(a.C), wy, g, a.lse_in[2 * row],
                 a.lse_in[2 * row + 1]);
      f.w = a.weight;
      f.y = y;
      f.out = gr;
      f.vec_ok = gr ? same_misalignment<T>(gr, xr) : false;
      for_each_vec<TPR>(xr, a.C, tid, f);
      f.finish();
    } else if (active && gr) {
      fill_row<TPR>(gr, a.C, tid, T(0));
    }
    if (a.need_t) {
      const Pair<double> t = group_allreduce<TPR>(Pair<double>{f.t1, f.t0}, PairSum<double>(), sred);
      // sum_nm dz z = sum_nm dz (z - lse) + lse sum_nm dz, and sum_nm dz = -sum_masked dz
      if (valid && tid == 0)
        tsum += -static_cast<double>(f.bg) * (t.a - static_cast<double>(beta * f.sh + f.toff) * t.b);
    }
  }
  if (a.need_t) write_parts<BLOCK>(a.parts, 0.0, 0.0, tsum, sd);
}

// ------------------------------------------------------------------ fused forward + gradient
// RESIDENT: the row is held in registers between the two phases (MAXV vectors per thread);
// otherwise the second phase reads the row again (from L2 for the most part).
template <typename T>
struct NoRegs {
  __device__ __forceinline__ NoRegs(const T*, int, int) {}
};

template <typename T, int TPR, int MAXV, bool RESIDENT, int KIND>
__global__ void __launch_bounds__(block_for(TPR), min_blocks_for(block_for(TPR)))
    tsce_fused_kernel(const CEArgs<T, at::opmath_type<T>> a) {
  using acc_t = at::opmath_type<T>;
  using Regs = std::conditional_t<RESIDENT, RowRegs<T, TPR, MAXV>, NoRegs<T>>;
  constexpr int BLOCK = block_for(TPR);
  constexpr int RPB = BLOCK / TPR;
  __shared__ CEState<acc_t> sred[BLOCK / kWarp];
  __shared__ Pair<double> sred2[BLOCK / kWarp];
  __shared__ double sd[BLOCK / kWarp];
  const int tid = threadIdx.x % TPR;
  const int grp = threadIdx.x / TPR;
  const acc_t beta = load_beta<acc_t>(a.temp);
  const acc_t bl2 = beta * static_cast<acc_t>(kLog2e);
  const acc_t cw = KIND > 0 ? a.eps / static_cast<acc_t>(a.C) : acc_t(0);
  const acc_t g = a.reduction == kMean ? acc_t(1) / *a.denom : acc_t(1);
  double lsum = 0.0, wsum = 0.0, tsum = 0.0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * RPB; base < a.rows;
       base += static_cast<int64_t>(gridDim.x) * RPB) {
    const int64_t row = base + grp;
    const bool active = row < a.rows;
    const int y = active ? load_target(a.target, row, a.ignore_index, a.C) : -1;
    const bool valid = y >= 0;
    const int n = valid ? a.C : 0;
    const T* xr = a.logits + row * a.row_stride;
    T* gr = a.grad + row * static_cast<int64_t>(a.C);
    const Regs regs(xr, n, tid);
    auto pass = [&](auto& f) {
      if constexpr (RESIDENT) regs.apply(n, f);
      else for_each_vec<TPR, 4>(xr, n, tid, f);  // two-read path: 4 loads in flight per thread
    };
    // phase 1: the row's state, merged over the group
    CEAccum<T, acc_t, KIND> acc{ce_init<acc_t>(), bl2, a.weight, y};
    pass(acc);
    const CEState<acc_t> st = group_allreduce<TPR>(acc.st, CEMerge<acc_t>{bl2}, sred);
    CEGrad<T, acc_t, KIND> f;
    f.t1 = 0;
    f.t0 = 0;
    f.off = 0;
    f.sh = 0;
    f.bg = 0;
    f.need_t = a.need_t;
    if (valid) {
      const acc_t wy = a.weight ? static_cast<acc_t>(a.weight[y]) : acc_t(1);
      acc_t lse, ls;
      const acc_t loss = row_loss<acc_t, KIND>(st, beta, a.eps, cw, wy, lse, ls);
      if (tid == 0) {  // the row's loss is done: book it before phase 2 (fewer live registers)
        lsum += static_cast<double>(loss);
        wsum += static_cast<double>(wy);
        if (a.loss_rows) a.loss_rows[row] = static_cast<T>(loss);
      }
      // phase 2: the gradient (z - lse = beta (x - m) - ls)
      grad_setup(f, beta, a.eps, cw, st.wc, static_cast<acc_t>(a.C), wy, g, st.m, ls);
      f.w = a.weight;
      f.y = y;
      f.out = gr;
      f.vec_ok = same_misalignment<T>(gr, xr);
      pass(f);
      f.finish();
    } else if (active) {
      fill_row<TPR>(gr, a.C, tid, T(0));
      if (tid == 0 && a.loss_rows) a.loss_rows[row] = T(0);
    }
    acc_t tg = 0;
    if (a.need_t) {
      const Pair<double> t = group_allreduce<TPR>(Pair<double>{f.t1, f.t0}, PairSum<double>(), sred2);
      if (valid)  // lse = beta m + ls
        tg = static_cast<acc_t>(-static_cast<double>(f.bg) * (t.a - static_cast<double>(beta * f.sh + f.toff) * t.b));
    }
    if (active && tid == 0) {
      if (valid) tsum += static_cast<double>(tg);
      if (a.gt_rows) store_from_double(a.gt_rows, a.gt_code, row, static_cast<double>(tg));
    }
  }
  write_parts<BLOCK>(a.parts, lsum, wsum, tsum, sd);
}

// ------------------------------------------------------------------ tiny rows
// C * sizeof(T) <= 128 bytes and contiguous rows: a block stages a tile of 256 consecutive rows
// (one contiguous range of memory) in shared memory with 16-byte loads, coalesced across the
// block, then each thread handles one row alone (no shuffles); the gradient goes back through
// the same tile with 16-byte stores. Bytes in flight per SM do not depend on C, so (1e6, 10)
// streams like a large row does. MODE: 0 forward, 1 backward, 2 fused.
constexpr int kTileRows = 256;

template <typename T>
constexpr int tile_max_c() {
  return 128 / static_cast<int>(sizeof(T));
}

template <typename T>
__device__ __forceinline__ void tile_copy_in(const T* src, int E, T* dst_base, int& shift) {
  constexpr int V = vec_size<T>();
  const RowSplit<T> sp(src, E);
  shift = (V - sp.head) % V;  // aligned vectors of src land on 16-byte boundaries of dst
  T* dst = dst_base + shift;
  for (int i = threadIdx.x; i < sp.head; i += kTileRows) dst[i] = src[i];
  const Vec16<T>* vs = reinterpret_cast<const Vec16<T>*>(src + sp.head);
  Vec16<T>* vd = reinterpret_cast<Vec16<T>*>(dst + sp.head);
  for (int j0 = threadIdx.x; j0 < sp.nvec; j0 += 4 * kTileRows) {
    Vec16<T> b[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (j0 + u * kTileRows < sp.nvec) b[u] = vs[j0 + u * kTileRows];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (j0 + u * kTileRows < sp.nvec) vd[j0 + u * kTileRows] = b[u];
  }
  for (int i = sp.tail0 + threadIdx.x; i < E; i += kTileRows) dst[i] = src[i];
}

// Copies E elements from the tile (laid out for the source's alignment) to out: 16-byte stores
// when out has the source's alignment, scalar stores otherwise.
template <typename T>
__device__ __forceinline__ void tile_copy_out(const T* tile, int E, T* out, bool vec_ok) {
  if (!vec_ok) {
    for (int i = threadIdx.x; i < E; i += kTileRows) out[i] = tile[i];
    return;
  }
  const RowSplit<T> sp(out, E);
  for (int i = threadIdx.x; i < sp.head; i += kTileRows) out[i] = tile[i];
  const Vec16<T>* vs = reinterpret_cast<const Vec16<T>*>(tile + sp.head);
  Vec16<T>* vd = reinterpret_cast<Vec16<T>*>(out + sp.head);
  for (int j = threadIdx.x; j < sp.nvec; j += kTileRows) vd[j] = vs[j];
  for (int i = sp.tail0 + threadIdx.x; i < E; i += kTileRows) out[i] = tile[i];
}

template <typename T, int MODE, int KIND>
__global__ void __launch_bounds__(kTileRows, 2)
    tsce_tile_kernel(const CEArgs<T, at::opmath_type<T>> a) {
  using acc_t = at::opmath_type<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const sm = reinterpret_cast<T*>(smem_raw);
  __shared__ double sd[kTileRows / kWarp];
  const int C = a.C;
  const acc_t beta = load_beta<acc_t>(a.temp);
  const acc_t bl2 = beta * static_cast<acc_t>(kLog2e);
  const acc_t cw = KIND > 0 ? a.eps / static_cast<acc_t>(C) : acc_t(0);
  acc_t g0 = 1;
  if (MODE == 1 && a.reduction != kNone) {
    g0 = static_cast<acc_t>(load_as_double(a.grad_loss, a.gl_code));
    if (a.reduction == kMean) g0 = g0 / *a.denom;
  }
  if (MODE == 2 && a.reduction == kMean) g0 = acc_t(1) / *a.denom;
  const acc_t Wb = (MODE == 1 && a.wsum) ? *a.wsum : static_cast<acc_t>(C);
  double lsum = 0.0, wsum = 0.0, tsum = 0.0;
  const int64_t ntiles = (a.rows + kTileRows - 1) / kTileRows;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t row0 = tile * kTileRows;
    const int nr = static_cast<int>(min(static_cast<int64_t>(kTileRows), a.rows - row0));
    const int E = nr * C;
    const T* src = a.logits + row0 * static_cast<int64_t>(C);
    const int64_t row = row0 + threadIdx.x;
    const bool active = static_cast<int>(threadIdx.x) < nr;
    const int y = active ? load_target(a.target, row, a.ignore_index, C) : -1;
    const bool valid = y >= 0;
    int shift;
    tile_copy_in(src, E, sm, shift);
    T* const ts = sm + shift;
    __syncthreads();
    T* xs = ts + threadIdx.x * C;  // this thread's row
    // Visit the row from a thread-dependent column: spreads the shared-memory banks.
    const int c0 = static_cast<int>(threadIdx.x % C);
    acc_t loss = 0, wy = 0, tg = 0;
    if (valid) {
      wy = a.weight ? static_cast<acc_t>(a.weight[y]) : acc_t(1);
      acc_t W = Wb, sh = 0, off;
      if (MODE == 1) {
        sh = a.lse_in[2 * row];
        off = a.lse_in[2 * row + 1];
      } else {
        CEState<acc_t> st = ce_init<acc_t>();
        for (int k = 0, c = c0; k < C; ++k, c = (c + 1 == C) ? 0 : c + 1) {
          const acc_t x = static_cast<acc_t>(xs[c]);
          st.m = x > st.m ? x : st.m;
        }
        const acc_t mref = st.m > neg_inf<acc_t>() ? st.m : acc_t(0);
        for (int k = 0, c = c0; k < C; ++k, c = (c + 1 == C) ? 0 : c + 1) {
          const acc_t dx = static_cast<acc_t>(xs[c]) - mref;
          st.s += fexp2(dx * bl2);
          if (KIND == 1) st.d -= dx;
          if (KIND == 2) {
            const acc_t wk = static_cast<acc_t>(a.weight[c]);
            st.d -= wk * dx;
            st.wc += wk;
          }
        }
        if (KIND == 1) st.wc = static_cast<acc_t>(C);
        st.xy = static_cast<acc_t>(xs[y]);
        acc_t lse, ls;
        loss = row_loss<acc_t, KIND>(st, beta, a.eps, cw, wy, lse, ls);
        if (MODE == 0) {
          a.lse[2 * row] = ls == ls ? st.m : ls;  // NaN for rows without a softmax
          a.lse[2 * row + 1] = ls;
        }
        W = st.wc;
        sh = st.m;
        off = ls;
      }
      if (MODE != 0) {
        const acc_t g = (MODE == 1 && a.reduction == kNone)
                            ? static_cast<acc_t>(load_as_double(a.grad_loss, a.gl_code, row * a.gl_stride))
                            : g0;
        const acc_t l2e = static_cast<acc_t>(kLog2e);
        const acc_t off2 = off * l2e;
        const acc_t ty = (acc_t(1) - a.eps) * wy;
        const acc_t As = KIND > 0 ? a.eps * W / static_cast<acc_t>(C) : acc_t(0);
        const acc_t A = ty + As;
        const acc_t bg = beta * g;
        const acc_t x_y = static_cast<acc_t>(xs[y]);  // read before the row is overwritten
        double t1 = 0, t0 = 0;
        for (int k = 0, c = c0; k < C; ++k, c = (c + 1 == C) ? 0 : c + 1) {
          const acc_t x = static_cast<acc_t>(xs[c]);
          const acc_t p = fexp2((x - sh) * bl2 - off2);
          const acc_t wk = KIND == 2 ? static_cast<acc_t>(a.weight[c]) : acc_t(1);
          const acc_t zt = (x - sh) * beta;  // shifted by beta m (see CEGrad::toff)
          const acc_t dz = A * p - (KIND > 0 ? cw * wk : acc_t(0)) - (c == y ? ty : acc_t(0));
          if (a.need_t) {
            if (x != neg_inf<acc_t>()) t1 += static_cast<double>(dz) * static_cast<double>(zt);
            else t0 += static_cast<double>(dz);
          }
          xs[c] = static_cast<T>(bg * dz);
        }
        {  // the target's element in acc precision, as CEGrad::finish
          const acc_t wk = KIND == 2 ? static_cast<acc_t>(a.weight[y]) : acc_t(1);
          const acc_t zl = (x_y - sh) * beta - off;
          const acc_t generic = A * fexp2((x_y - sh) * bl2 - off2) - (KIND > 0 ? cw * wk : acc_t(0)) - ty;
          const acc_t dz = target_dz<T, acc_t>(zl, ty, As, cw, wk);
          xs[y] = static_cast<T>(bg * dz);
          if (x_y != neg_inf<acc_t>()) t1 += static_cast<double>(dz - generic) * static_cast<double>((x_y - sh) * beta);
          else t0 += static_cast<double>(dz - generic);
        }
        if (a.need_t) tg = static_cast<acc_t>(-static_cast<double>(bg) * (t1 - static_cast<double>(beta * sh) * t0));
      }
    } else if (active) {
      if (MODE == 0) a.lse[2 * row] = a.lse[2 * row + 1] = acc_t(0);
      if (MODE != 0)
        for (int c = 0; c < C; ++c) xs[c] = T(0);
    }
    if (active) {
      if (MODE != 1) {
        if (a.loss_rows) a.loss_rows[row] = static_cast<T>(loss);
        if (valid) {
          lsum += static_cast<double>(loss);
          wsum += static_cast<double>(wy);
        }
      }
      if (MODE != 0 && valid) tsum += static_cast<double>(tg);
      if (MODE == 2 && a.gt_rows) store_from_double(a.gt_rows, a.gt_code, row, static_cast<double>(tg));
    }
    if (MODE != 0 && a.grad) {
      __syncthreads();
      T* out = a.grad + row0 * static_cast<int64_t>(C);
      tile_copy_out(ts, E, out, same_misalignment<T>(out, src));
    }
    __syncthreads();  // the next tile overwrites shared memory
  }
  if (a.parts) write_parts<kTileRows>(a.parts, lsum, wsum, tsum, sd);
}

template <typename T>
inline bool use_tile(const at::Tensor& logits) {
  const int64_t C = logits.size(1);
  return C >= 1 && C <= tile_max_c<T>() && (logits.stride(0) == C || logits.size(0) == 1);
}

template <typename T>
inline size_t tile_smem(int64_t C) {
  return static_cast<size_t>(kTileRows * C + vec_size<T>()) * sizeof(T);
}

inline int tile_grid(int64_t rows) {
  const int64_t tiles = ceil_div(rows, kTileRows);
  const int64_t cap = static_cast<int64_t>(sm_count()) * 8 * 4;
  return static_cast<int>(std::max<int64_t>(1, std::min(tiles, cap)));
}


// ------------------------------------------------------------------ small kernels
// Per-block sums of w_y over non-ignored rows (the denominator of "mean").
template <typename T>
__global__ void __launch_bounds__(256, 2) denom_parts_kernel(const int64_t* __restrict__ target,
                                                          const T* __restrict__ weight, int64_t rows,
                                                          int C, int64_t ignore_index,
                                                          double* __restrict__ parts) {
  __shared__ double sd[256 / kWarp];
  double s = 0.0;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * 256) {
    const int64_t y = target[r];
    if (y != ignore_index && y >= 0 && y < C)
      s += weight ? static_cast<double>(static_cast<at::opmath_type<T>>(weight[y])) : 1.0;
  }
  s = block_sum<256>(s, sd);
  if (threadIdx.x == 0) parts[blockIdx.x] = s;
}

template <typename acc_t>
struct StoreAcc {
  acc_t* out;
  __device__ void operator()(const double* s) const { *out = static_cast<acc_t>(s[0]); }
};

// W = sum_c w_c (one block).
template <typename T>
__global__ void __launch_bounds__(1024) weight_sum_kernel(const T* __restrict__ w, int C,
                                                          at::opmath_type<T>* __restrict__ out) {
  __shared__ double sd[32];
  double s = 0.0;
  for (int c = threadIdx.x; c < C; c += 1024) s += static_cast<double>(static_cast<at::opmath_type<T>>(w[c]));
  s = block_sum<1024>(s, sd);
  if (threadIdx.x == 0) *out = static_cast<at::opmath_type<T>>(s);
}

template <typename acc_t>
struct TsceWriter {
  void* loss;
  int loss_code;
  int reduction;
  acc_t* denom_out;
  const acc_t* denom_in;
  void* gt;
  int gt_code;
  __device__ void operator()(const double* s) const {
    if (loss) {
      const double den = denom_in ? static_cast<double>(*denom_in) : static_cast<double>(static_cast<acc_t>(s[1]));
      store_from_double(loss, loss_code, 0, reduction == kMean ? s[0] / den : s[0]);
    }
    if (denom_out) *denom_out = static_cast<acc_t>(s[1]);
    if (gt) store_from_double(gt, gt_code, 0, s[2]);
  }
};

// grad[i, :] *= scale (0-dim: returns at once when it is 1) or scale[i * stride].
template <typename T>
__global__ void __launch_bounds__(256, 2) scale_rows_kernel(T* __restrict__ grad, int64_t numel,
                                                         int64_t inner, const void* scale, int code,
                                                         int64_t sstride, bool per_row) {
  constexpr int V = vec_size<T>();
  using acc_t = at::opmath_type<T>;
  acc_t s0 = 0;
  if (!per_row) {
    s0 = static_cast<acc_t>(load_as_double(scale, code));
    if (s0 == acc_t(1)) return;
  }
  const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(grad) & 15) / sizeof(T));
  const int64_t head = mis ? (V - mis < numel ? V - mis : numel) : 0;
  const int64_t nvec = (numel - head) / V;
  const int64_t tail0 = head + nvec * V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * 256;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  auto sc = [&](int64_t e) -> acc_t {
    return per_row ? static_cast<acc_t>(load_as_double(scale, code, (e / inner) * sstride)) : s0;
  };
  if (t0 < head) grad[t0] = static_cast<T>(static_cast<acc_t>(grad[t0]) * sc(t0));
  Vec16<T>* vg = reinterpret_cast<Vec16<T>*>(grad + head);
  for (int64_t j = t0; j < nvec; j += stride) {
    Vec16<T> v = vg[j];
    const int64_t e0 = head + j * V;
    if (!per_row || (e0 / inner) == ((e0 + V - 1) / inner)) {
      const acc_t s = sc(e0);
#pragma unroll
      for (int k = 0; k < V; ++k) v.v[k] = static_cast<T>(static_cast<acc_t>(v.v[k]) * s);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) v.v[k] = static_cast<T>(static_cast<acc_t>(v.v[k]) * sc(e0 + k));
    }
    vg[j] = v;
  }
  if (t0 < numel - tail0) {
    const int64_t e = tail0 + t0;
    grad[e] = static_cast<T>(static_cast<acc_t>(grad[e]) * sc(e));
  }
}

// ------------------------------------------------------------------ host side
struct Prepared {
  at::Tensor target;
  std::optional<at::Tensor> weight;
};

inline Prepared prepare(const at::Tensor& logits, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(logits.is_cuda(), "softcal (CUDA): logits must be a CUDA tensor");
  TORCH_CHECK(logits.size(1) < std::numeric_limits<int>::max(),
              "softcal (CUDA): at most 2^31 - 1 classes, got ", logits.size(1));
  Prepared p;
  p.target = target.contiguous();
  if (weight.has_value()) p.weight = weight->contiguous();
  return p;
}

template <typename T>
inline CEArgs<T, at::opmath_type<T>> base_args(const at::Tensor& logits, const Prepared& p,
                                        const std::optional<at::Tensor>& temperature_t,
                                        double temperature, double eps, int64_t ignore_index,
                                        int64_t reduction) {
  CEArgs<T, at::opmath_type<T>> a{};
  a.logits = logits.data_ptr<T>();
  a.row_stride = logits.stride(0);
  a.rows = logits.size(0);
  a.C = static_cast<int>(logits.size(1));
  a.target = p.target.data_ptr<int64_t>();
  a.weight = p.weight.has_value() ? p.weight->data_ptr<T>() : nullptr;
  a.ignore_index = ignore_index;
  a.temp = make_temp(temperature_t, temperature);
  a.eps = static_cast<at::opmath_type<T>>(eps);
  a.reduction = static_cast<int>(reduction);
  return a;
}

template <typename Writer>
inline void launch_finalize3(const at::Tensor& parts, int P, const Writer& w, cudaStream_t stream) {
  finalize_kernel<3, Writer><<<1, 1024, 0, stream>>>(parts.data_ptr<double>(), P, w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline at::Tensor empty_loss(const at::Tensor& logits, int64_t reduction) {
  return reduction == kNone ? at::empty({logits.size(0)}, logits.options())
                            : at::empty({}, logits.options());
}

// Loss of an empty batch, as PyTorch: mean -> NaN, sum -> 0.
inline void fill_empty_loss(at::Tensor& loss, int64_t reduction) {
  if (reduction == kMean) loss.fill_(std::numeric_limits<double>::quiet_NaN());
  else if (reduction == kSum) loss.zero_();
}

// denom (acc, 0-dim) computed on the device from the target alone.
template <typename T>
inline at::Tensor compute_denom(const at::Tensor& logits, const CEArgs<T, at::opmath_type<T>>& a,
                         cudaStream_t stream) {
  const at::ScalarType acc = acc_type(logits.scalar_type());
  at::Tensor denom = at::empty({}, logits.options().dtype(acc));
  const int64_t cap = static_cast<int64_t>(sm_count()) * 8;
  const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(a.rows, 256), cap)));
  at::Tensor parts = at::empty({grid}, logits.options().dtype(at::kDouble));
  denom_parts_kernel<T><<<grid, 256, 0, stream>>>(a.target, a.weight, a.rows, a.C, a.ignore_index,
                                                  parts.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  using acc_t = at::opmath_type<T>;
  finalize_kernel<1, StoreAcc<acc_t>><<<1, 1024, 0, stream>>>(parts.data_ptr<double>(), grid,
                                                               StoreAcc<acc_t>{denom.data_ptr<acc_t>()});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return denom;
}

}  // namespace
}  // namespace cuda
}  // namespace softcal
