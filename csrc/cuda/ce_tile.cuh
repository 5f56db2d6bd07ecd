// softcal CUDA: the cross-entropy of tiny rows (C * sizeof(T) <= 128 bytes, contiguous rows). A
// block stages a tile of 256 consecutive rows (one contiguous range of memory) in shared memory
// with 16-byte loads coalesced across the block; each thread then handles one row alone (no
// shuffles); the gradient goes back out through the same tile. docs/kernels-cuda.md, "Tiles".
#pragma once

#include "cuda/cross_entropy.cuh"

namespace softcal {
namespace cuda {

template <typename T>
constexpr int tile_max_c() {
  return 128 / static_cast<int>(sizeof(T));
}

// Copies E elements from src into the tile so that src's aligned vectors land on 16-byte
// boundaries (the tile starts `shift` elements into dst_base).
template <typename T>
__device__ __forceinline__ void tile_copy_in(const T* src, int E, T* dst_base, int& shift) {
  constexpr int V = vec_size<T>();
  const RowSplit<T> sp(src, E);
  shift = (V - sp.head) % V;
  T* dst = dst_base + shift;
  for (int i = threadIdx.x; i < sp.head; i += kTileRows) dst[i] = src[i];
  const Vec16<T>* vs = reinterpret_cast<const Vec16<T>*>(src + sp.head);
  Vec16<T>* vd = reinterpret_cast<Vec16<T>*>(dst + sp.head);
  for (int j0 = threadIdx.x; j0 < sp.nvec; j0 += kUnroll * kTileRows) {
    Vec16<T> b[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (j0 + u * kTileRows < sp.nvec) b[u] = vs[j0 + u * kTileRows];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (j0 + u * kTileRows < sp.nvec) vd[j0 + u * kTileRows] = b[u];
  }
  for (int i = sp.tail0 + threadIdx.x; i < E; i += kTileRows) dst[i] = src[i];
}

// Copies E elements from the tile (laid out for the source's alignment) to out: 16-byte stores
// when out is aligned like the source, scalar stores otherwise.
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

// One thread's row of the tile, xs[0..C): its loss (forward, fused) and its gradient written over
// it (backward, fused); returns dL/dT of the row in double (0 unless asked for). The row is visited
// from a thread-dependent column c0, which spreads the shared-memory banks. y = -1: an ignored row
// whose [m, ls] only are wanted (lse_all; forward and fused passes).
template <typename T, Pass P, Smoothing S, ClassWeights W, Softcap Q,
          typename acc_t = at::opmath_type<T>>
__device__ __forceinline__ double tile_row(const CEArgs<T>& a, T* xs, int64_t row, int y,
                                           const CEConsts<acc_t, S>& k, acc_t g, acc_t zl,
                                           const TGradScale& t_scale, acc_t& loss) {
  const int C = a.C;
  const int c0 = static_cast<int>(threadIdx.x % C);
  auto each = [&](auto&& f) {
    for (int i = 0, c = c0; i < C; ++i, c = (c + 1 == C) ? 0 : c + 1) f(c);
  };
  const acc_t cap = a.cap;
  const acc_t w_y = a.weight && y >= 0 ? a.weight[y] : acc_t(1);
  acc_t weight_total =
      (P == Pass::kBackward && a.weight_total) ? *a.weight_total : static_cast<acc_t>(C);
  acc_t row_max = 0, ls, lse = 0;
  if (P == Pass::kBackward) {
    row_max = a.lse_in[2 * row];
    ls = a.lse_in[2 * row + 1];
    lse = k.beta * row_max + ls;
  } else {  // two passes over the row in shared memory: its max, then the sums
    CEState<acc_t> st = ce_init<acc_t>();
    each([&](int c) {
      const acc_t x = ce_logit<acc_t, Q>(xs[c], cap);
      st.m = x > st.m ? x : st.m;
    });
    const acc_t mref = st.m > neg_inf<acc_t>() ? st.m : acc_t(0);
    each([&](int c) {
      const acc_t dx = ce_logit<acc_t, Q>(xs[c], cap) - mref;
      st.s += fexp2(dx * k.beta_log2e);
      if (S == Smoothing::kOn && !kPerElementWeights<S, W>) st.d -= dx;
      if (kPerElementWeights<S, W>) {
        st.d -= a.weight[c] * dx;  // NaN for a weight of inf at the maximum: ce_row_loss
        st.wc += a.weight[c];
      }
    });
    if (S == Smoothing::kOn && !kPerElementWeights<S, W>) st.wc = static_cast<acc_t>(C);
    if (y < 0) {  // an ignored row: its [m, ls] only
      acc_t m;
      ce_row_lse(st, m, ls);
      a.lse[2 * row] = m;
      a.lse[2 * row + 1] = ls;
      return 0.0;
    }
    st.xy = ce_logit<acc_t, Q>(xs[y], cap);
    loss = ce_row_loss<acc_t, S>(st, k.beta, a.eps, k.smooth_coef, w_y, lse, ls, zl);
    if (a.lse) {                              // (the fused pass writes it only when asked)
      a.lse[2 * row] = ls == ls ? st.m : ls;  // NaN for rows without a softmax
      a.lse[2 * row + 1] = ls;
    }
    if (P == Pass::kForward) return 0.0;
    weight_total = st.wc;
    row_max = st.m;
  }
  // the gradient, written over the row
  const CECoef<acc_t> cf =
      ce_coef<acc_t, S>(k.beta, a.eps, k.smooth_coef, weight_total, static_cast<acc_t>(C), w_y, g,
                        zl != acc_t(0) ? acc_t(2) * zl * lse : acc_t(0));
  CEGrad<T, acc_t, S, W, Q> f;
  f.cap = cap;
  f.setup(k.beta, row_max, ls, cf, a.weight, y, xs,
          xs);  // finish() writes the target's element in xs
  f.need_t = a.need_t;
  const acc_t x_y = ce_logit<acc_t, Q>(xs[y], cap);  // read before the row is overwritten
  each([&](int c) {
    const acc_t x = ce_logit<acc_t, Q>(xs[c], cap);
    const acc_t w_c = kPerElementWeights<S, W> ? a.weight[c] : acc_t(1);
    const acc_t dz = f.element(x, w_c) - (c == y ? cf.target_coef : acc_t(0));
    if (a.need_t) f.sum_t(dz, x);
    xs[c] = static_cast<T>(cf.grad_scale * dz * ce_logit_grad<acc_t, Q>(x, cap));
  });
  f.xy = x_y;  // the target's element in acc precision
  f.have_y = true;
  f.finish();
  return a.need_t ? f.temperature_grad(Pair<double>{f.t1, f.t0}, t_scale, ce_t_grad_row<P>(a, row))
                  : 0.0;
}

template <typename T, Pass P, Smoothing S, ClassWeights W, Softcap Q>
__global__ void __launch_bounds__(kTileRows, 2) ce_tile_kernel(const CEArgs<T> a) {
  using acc_t = at::opmath_type<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const sm = reinterpret_cast<T*>(smem_raw);
  const int C = a.C;
  const CEConsts<acc_t, S> k(a.temp, a.eps, a.C);
  acc_t g0 = 1;
  if (P == Pass::kBackward && a.reduction != kNone) g0 = ce_grad_loss(a, 0);
  if (P == Pass::kFused && a.reduction == kMean) g0 = acc_t(1) / *a.denom;
  const acc_t zl = ce_zl(a);
  const TGradScale t_scale =
      (P != Pass::kForward && a.need_t) ? ce_t_grad_scale<P>(a, k.beta) : TGradScale{0.0, 0.0};
  double loss_sum = 0.0, w_sum = 0.0, t_sum = 0.0;
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
    acc_t loss = 0;
    double t_grad = 0;
    if (valid) {
      const acc_t g = (P == Pass::kBackward && a.reduction == kNone) ? ce_grad_loss(a, row) : g0;
      t_grad = tile_row<T, P, S, W, Q>(a, xs, row, y, k, g, zl, t_scale, loss);
    } else if (active) {
      if (P != Pass::kBackward && a.lse) {
        if (a.lse_all && a.target[row] == a.ignore_index)
          tile_row<T, P, S, W, Q>(a, xs, row, -1, k, g0, zl, t_scale, loss);
        else
          a.lse[2 * row] = a.lse[2 * row + 1] = acc_t(0);
      }
      if (P != Pass::kForward)
        for (int c = 0; c < C; ++c) xs[c] = T(0);
    }
    if (active) {
      if (P != Pass::kBackward) {
        if (a.loss_rows) a.loss_rows[row] = static_cast<loss_t<T>>(loss);
        if (valid) {
          loss_sum += static_cast<double>(loss);
          w_sum += static_cast<double>(a.weight ? a.weight[y] : acc_t(1));
        }
      }
      if (P != Pass::kForward && valid) t_sum += t_grad;
      if (P == Pass::kFused && a.t_rows.p) a.t_rows.store(row, t_grad);
    }
    if (P != Pass::kForward && a.grad) {
      __syncthreads();
      T* out = a.grad + row0 * static_cast<int64_t>(C);
      tile_copy_out(ts, E, out, aligned_like(src, out));
    }
    __syncthreads();  // the next tile overwrites shared memory
  }
  if (a.parts) store_block_sums<kTileRows, 3>(a.parts, {loss_sum, w_sum, t_sum});
}

template <typename T>
inline bool use_tile(const at::Tensor& logits) {
  const int64_t C = logits.size(1);
  return C >= 1 && C <= tile_max_c<T>() && (logits.stride(0) == C || logits.size(0) == 1);
}

// The launch of the tile kernel: the tile's shared memory, plus a vector for the alignment shift.
template <typename T>
inline Launch tile_launch(int64_t rows, int64_t C) {
  Launch l = plan(Walk::kTile, rows);
  l.smem = static_cast<size_t>(kTileRows * C + vec_size<T>()) * sizeof(T);
  return l;
}

// Launches pass P of the cross-entropy in the logits' loss variant (ce_switch_cap): the tile
// kernel when `tile`, else the row kernel that Rows names for the launch's TPR, e.g.
//   struct FwdRows {
//     template <typename T, int TPR, Smoothing S, ClassWeights W, Softcap P>
//     using kernel = KernelRef<&cross_entropy_fwd_kernel<T, TPR, S, W, P>>;
//   };
template <typename T, Pass P, typename Rows>
inline void launch_ce(const CEArgs<T>& a, const Launch& l, bool tile, double eps, double softcap,
                      cudaStream_t stream) {
  ce_switch_cap(eps, a.weight != nullptr, softcap, [&](auto sc, auto wc, auto pc) {
    using S = decltype(sc);
    using W = decltype(wc);
    using Q = decltype(pc);
    if (tile) {
      launch(KernelRef<&ce_tile_kernel<T, P, S::value, W::value, Q::value>>{}, l, stream, a);
    } else {
      launch_rows(
          l, stream,
          [](auto tpr) {
            return typename Rows::template kernel<T, decltype(tpr)::value, S::value, W::value,
                                                  Q::value>{};
          },
          a);
    }
  });
}

}  // namespace cuda
}  // namespace softcal
