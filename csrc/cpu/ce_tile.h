// softcal CPU kernels: the tile path of the cross-entropy for small class counts (C <= 32, float
// accumulation): 16 rows per vector, one skeleton for the forward, backward and fused passes
// (docs/design.md §4). The maths is the row terms of cpu/ce_row.h, with the call's compile-time
// variants (ZLoss, Softcap: common.h): a tile without them holds no trace of them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.h"
#include "cpu/ce_row_path.h"
#include "cpu/host.h"
#include "cpu/rows.h"
#include "cpu/vec.h"

namespace softcal {
namespace cpu {

// ------------------------------------------------------------------------------------------
// Small class counts: tiles of rows (float accumulation only: float32, bfloat16, float16).
//
// For C <= kTileMaxC a row is shorter than a few vectors, and per-row work (horizontal
// reductions, a scalar log and exp per row) would cost more than the exps. Instead R rows
// (R = the lanes of a float vector) are processed together, one row per lane: the tile (R x C,
// converted to float in L1 unless it can be read in place) is transposed by gathers into C
// vectors "class c of R rows", and every reduction over classes becomes vertical vector
// arithmetic (max, exp, sums, log1p, expm1 of R rows at once). The gradient is computed in the
// same transposed layout and gathered back into row-major order for one contiguous store.
// No per-row heap buffers: the tile buffers are on the stack of the task.
// ------------------------------------------------------------------------------------------

// Up to 32 classes the tile path wins; beyond, its 3 C gathers per R rows (forward, backward,
// back to row-major) cost more than the row path's per-row reductions (benchmarks/NOTES.md).
constexpr int64_t kTileMaxC = 32;

struct TileShape {
  static constexpr int64_t R = Vec<float>::size();
  int64_t C = 0;
  alignas(64) int32_t col[R];               // l * C: the first class of row l in a row-major tile
  alignas(64) int32_t back[kTileMaxC * R];  // flat element k*R+l of the tile -> its (c*R + r)
  explicit TileShape(int64_t C_) : C(C_) {
    for (int64_t l = 0; l < R; ++l) col[l] = static_cast<int32_t>(l * C);
    for (int64_t f = 0; f < R * C; ++f) back[f] = static_cast<int32_t>((f % C) * R + f / C);
  }
};

// Per-lane results of a tile.
struct TileRows {
  static constexpr int64_t R = Vec<float>::size();
  alignas(64) float m[R], ls[R], xy[R], loss[R], g[R];
  alignas(64) double S[R];      // the row's sum for dL/dT (row_grad), in double
  alignas(64) int32_t yidx[R];  // l * C + y (y = 0 for ignored rows)
  int64_t y[R];
  bool valid[R];  // not ignored
  bool ok[R];     // has a softmax
};

struct TileBuffers {
  static constexpr int64_t R = Vec<float>::size();
  alignas(64) float tb[kTileMaxC * R];  // row-major tile in float
  alignas(64) float tT[kTileMaxC * R];  // transposed: class c of the R rows at tT + c R
  alignas(64) float gT[kTileMaxC * R];  // transposed gradient
  alignas(64) float ob[kTileMaxC * R];  // row-major gradient in float
};

// Loads rows [i0, i0 + nr) into the tile, reads the targets (checked: an error names the row)
// and gathers the classes into tT (Softcap::kOn: capped there, c tanh(x / c)). Returns the
// row-major tile (tb, or the logits themselves), as read (not capped).
template <Softcap kCap, typename scalar_t>
SOFTCAL_ALWAYS_INLINE const float* tile_load(const TileShape& ts, const scalar_t* x,
                                             int64_t row_stride, const int64_t* target,
                                             int64_t ignore_index, int64_t i0, int64_t nr,
                                             float cap, TileBuffers& b, TileRows& t,
                                             const char* op) {
  constexpr int64_t R = TileShape::R;
  const int64_t C = ts.C;
  const float* tile;
  if (row_stride == C) {
    // The tile 4 tiles ahead (<= 2 KB) prefetched into L1: the gathers below (float32, read in
    // place) or the conversion stall on each line's miss otherwise (benchmarks/NOTES.md).
    // (An address past the logits is harmless: a prefetch never faults.)
    constexpr int64_t kTilesAhead = 4;
    const int64_t bytes = R * C * static_cast<int64_t>(sizeof(scalar_t));
    const uintptr_t ahead = reinterpret_cast<uintptr_t>(x + i0 * C) + kTilesAhead * bytes;
    for (int64_t off = 0; off < bytes; off += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(ahead + off), 0, 3);
  }
  if (std::is_same_v<scalar_t, float> && row_stride == C && nr == R && C <= 16) {
    // read in place (a tile of <= 16 rows x 16 floats: its gathers touch <= 16 cache lines)
    tile = reinterpret_cast<const float*>(x + i0 * C);
  } else {
    if (row_stride == C) {
      at::vec::convert(x + i0 * C, b.tb, nr * C);
    } else {
      for (int64_t l = 0; l < nr; ++l) at::vec::convert(x + (i0 + l) * row_stride, b.tb + l * C, C);
    }
    std::fill(b.tb + nr * C, b.tb + R * C, 0.0f);
    tile = b.tb;
  }
  for (int64_t l = 0; l < R; ++l) {
    int64_t y = l < nr ? target[i0 + l] : ignore_index;
    const bool valid = l < nr && y != ignore_index;
    if (valid) {
      TORCH_CHECK(y >= 0 && y < C, op, ": target[", i0 + l, "] = ", y, " is out of range for ", C,
                  " classes (ignore_index = ", ignore_index, ")");
    } else {
      y = 0;
    }
    t.y[l] = y;
    t.valid[l] = valid;
    t.yidx[l] = static_cast<int32_t>(l * C + y);
  }
  const at::vec::Vectorized<int32_t> vcol = at::vec::Vectorized<int32_t>::loadu(ts.col);
  for (int64_t c = 0; c < C; ++c) {
    const Vec<float> v = at::vec::gather<4>(tile + c, vcol);
    if constexpr (kCap == Softcap::kOn)
      softcap_vec(v, Vec<float>(cap)).store(b.tT + c * R);
    else
      v.store(b.tT + c * R);
  }
  return tile;
}

// x_y of each lane as the loss sees it: from the row-major tile as read, or (Softcap::kOn) the
// capped value in tT.
template <Softcap kCap>
inline Vec<float> tile_true_logit(const float* tile, const TileBuffers& b, const TileRows& t) {
  constexpr int64_t R = TileShape::R;
  if constexpr (kCap == Softcap::kOn) {
    alignas(64) int32_t idx[R];
    for (int64_t l = 0; l < R; ++l) idx[l] = static_cast<int32_t>(t.y[l] * R + l);
    return at::vec::gather<4>(b.tT, at::vec::Vectorized<int32_t>::loadu(idx));
  } else {
    return at::vec::gather<4>(tile, at::vec::Vectorized<int32_t>::loadu(t.yidx));
  }
}

// Forward of a loaded tile: per lane m, ls, x_y and the loss (RowStats; row_loss of ce_row.h).
template <bool kDot, ZLoss kZ, Softcap kCap>
__attribute__((noinline))  // out of line, as before the split: the tile loop around it stays small
void tile_forward(const TileShape& ts, const CEParams<float>& p, const float* tile, TileBuffers& b,
                  TileRows& t) {
  constexpr int64_t R = TileShape::R;
  using V = Vec<float>;
  const int64_t C = ts.C;
  V vm(kNegInf<float>);
  for (int64_t c = 0; c < C; ++c) vm = at::vec::maximum(vm, V::loadu(b.tT + c * R));
  // lanes without a softmax (NaN, +inf, all -inf) are computed with m = 0 and fixed up below
  const V ok = (vm > V(kNegInf<float>)) & (vm < V(std::numeric_limits<float>::infinity()));
  vm = V::blendv(V(0), vm, ok);
  const V vb(p.beta), zero(0), one(1);
  V rest(0), n1(0), D(0);
  const ScaledExp<float> sexp(p.beta, 0.0f);
  for (int64_t c = 0; c < C; ++c) {
    const V xv = V::loadu(b.tT + c * R);
    const V dx = xv - vm;  // exactly 0 at the maximum
    const V e = sexp(dx);
    const V at_max = dx == zero;
    rest = rest + V::blendv(e, zero, at_max);
    n1 = n1 + V::blendv(zero, one, at_max);
    if constexpr (kDot) {
      const float w_c = p.weight_of(c);  // at the maximum not w * 0 for a weight of inf (§1)
      D = std::isinf(w_c) ? V::blendv(at::vec::fmadd(V(w_c), vm - xv, D), D, at_max)
                          : at::vec::fmadd(V(w_c), vm - xv, D);
    }
  }
  const V ls = ((n1 - one) + rest).log1p();
  const V xy = tile_true_logit<kCap>(tile, b, t);
  V wy = one;
  if (p.w != nullptr) {
    alignas(64) float wyl[R];
    for (int64_t l = 0; l < R; ++l) wyl[l] = p.w[t.y[l]];
    wy = V::loadu(wyl);
  }
  const V loss = row_loss<kZ, V>(p, wy, vb * (vm - xy) + ls, D, ls, vb * vm + ls);
  vm.store(t.m);
  ls.store(t.ls);
  xy.store(t.xy);
  loss.store(t.loss);
  alignas(64) float okl[R];
  ok.store(okl);
  for (int64_t l = 0; l < R; ++l) {
    t.ok[l] = okl[l] != 0;  // all bits set where true
    if (!t.ok[l]) t.m[l] = t.ls[l] = t.loss[l] = kNaN<float>;
  }
}

// Gradient of a tile (rows with valid && ok; t.m, t.ls, t.xy, t.g set; t.g = upstream gradient
// of the row), written row-major into out (nr rows, contiguous); with need_t, t.S = the row's
// sum for dL/dT (t_row_sum), its sums over the classes in double (§2). Softcap::kOn: the gradient
// times the cap's derivative (tT holds the capped logits).
template <ZLoss kZ, Softcap kCap, typename scalar_t>
inline void tile_grad(const TileShape& ts, const CEParams<float>& p, TileBuffers& b, TileRows& t,
                      int64_t nr, bool need_t, scalar_t* out) {
  constexpr int64_t R = TileShape::R;
  using V = Vec<float>;
  const int64_t C = ts.C;
  alignas(64) float ml[R], lsl[R], coefl[R], cwl[R], Al[R], tyl[R], wyl[R], arl[R], azl[R];
  float a_rest = 0, cw = 0;
  constexpr bool zl = kZ == ZLoss::kOn;  // (per row only with a z-loss: 2 zl lse)
  for (int64_t l = 0; l < R; ++l) {
    const bool live = t.valid[l] && t.ok[l];
    const float w_y = p.weight_of(t.y[l]);
    const RowCoef<float> k = row_coef<kZ>(p, w_y, zl && live ? p.beta * t.m[l] + t.ls[l] : 0.0f);
    const float gb = live ? t.g[l] * p.beta : 0.0f;
    ml[l] = live ? t.m[l] : 0.0f;
    lsl[l] = live ? t.ls[l] : 0.0f;
    coefl[l] = gb * k.A;
    cwl[l] = gb * k.cw;
    Al[l] = k.A;
    tyl[l] = k.ty;
    wyl[l] = w_y;
    if constexpr (zl) {
      arl[l] = k.a_rest;
      azl[l] = k.a_z;
    }
    a_rest = k.a_rest;  // the same for every row without a z-loss
    cw = k.cw;
  }
  const V vm = V::loadu(ml), vnls = V(0) - V::loadu(lsl), vcoef = V::loadu(coefl),
          vcw = V::loadu(cwl), vA = V::loadu(Al), vb(p.beta), vk_cw(cw), vninf(kNegInf<float>),
          zero(0);
  DoubleSum<float> vS, vM;
  ScaledExp<float> pexp(p.beta, 0.0f);  // per-lane shift -ls:
  pexp.c = vnls;
  pexp.kc = vnls * V(1.4426950408889634f);
  for (int64_t c = 0; c < C; ++c) {
    const V xv = V::loadu(b.tT + c * R);
    const V dd = xv - vm;
    const V e = pexp(dd);
    const V wc(p.smoothing_weights() == nullptr ? 1.0f : p.w[c]);
    (vcoef * e - vcw * wc).store(b.gT + c * R);
    if (need_t) {
      const V dz = vA * e - vk_cw * wc;
      const V live = xv > vninf;
      vS.add(V::blendv(zero, dz * (dd * vb), live));
      vM.add(V::blendv(dz, zero, live));
    }
  }
  // the true class (true_class_dz), for the 16 rows at once
  const V lp = vb * (V::loadu(t.xy) - vm) + vnls;
  const V e_y = p.template needs_p_y<kZ>() ? lp.exp() : zero;
  const V dzy = true_class_dz<kZ, V>(p, V::loadu(tyl), zl ? V::loadu(arl) : V(a_rest),
                                     vk_cw * V::loadu(wyl), lp.expm1(), e_y);
  alignas(64) float dzyl[R];
  alignas(64) double Sl[R], Ml[R];
  dzy.store(dzyl);
  if (need_t) {
    vS.store(Sl);
    vM.store(Ml);
  }
  for (int64_t l = 0; l < nr; ++l) {
    if (!t.valid[l]) {
      for (int64_t c = 0; c < C; ++c) b.gT[c * R + l] = 0;
      t.S[l] = 0;
      continue;
    }
    if (!t.ok[l]) {
      for (int64_t c = 0; c < C; ++c) b.gT[c * R + l] = kNaN<float>;
      t.S[l] = std::numeric_limits<double>::quiet_NaN();
      continue;
    }
    b.gT[t.y[l] * R + l] = t.g[l] * p.beta * dzyl[l];
    if (need_t)
      t.S[l] = t_row_sum<kZ>(Sl[l], Ml[l], static_cast<double>(tyl[l]), p.beta, t.xy[l], t.m[l],
                             zl ? azl[l] : 0.0f);
  }
  if constexpr (kCap == Softcap::kOn) {
    const V vc(p.cap);
    for (int64_t c = 0; c < C; ++c)
      (V::loadu(b.gT + c * R) * softcap_slope(V::loadu(b.tT + c * R), vc)).store(b.gT + c * R);
  }
  // back to row-major: flat vector k of the tile gathers its elements from gT
  float* o = std::is_same_v<scalar_t, float> && nr == R ? reinterpret_cast<float*>(out) : b.ob;
  for (int64_t k = 0; k < C; ++k)
    at::vec::gather<4>(b.gT, at::vec::Vectorized<int32_t>::loadu(ts.back + k * R)).store(o + k * R);
  if (o == b.ob) store_from_acc(b.ob, out, nr * C);
}

// Whether the tile path takes this call.
template <typename scalar_t>
inline bool use_tiles(int64_t C) {
  return std::is_same_v<at::opmath_type<scalar_t>, float> && C >= 1 && C <= kTileMaxC;
}

// One pass of the tile path over blocks [b0, b1) of bs rows (docs/design.md §4): the forward's
// statistics and loss (forward, fused), the gradient (backward, fused), per tile of 16 rows.
template <Pass kPass, ZLoss kZ, Softcap kCap, typename scalar_t>
void ce_tile_blocks(const CEParams<float>& p, const CEIo<scalar_t, float>& io, int64_t bs,
                    int64_t b0, int64_t b1, BlockSums* parts) {
  constexpr bool kStats = kPass != Pass::kBackward;
  constexpr bool kGrad = kPass != Pass::kForward;
  constexpr int64_t R = TileShape::R;
  const TileShape ts(p.C);
  TileBuffers bufs;
  TileRows t;
  for_block_groups(
      io.rows, bs, b0, b1, R, parts, [&](int64_t i0, int64_t nr, int64_t, BlockSums& sums) {
        const float* tile = tile_load<kCap>(ts, io.x, io.row_stride, p.target, p.ignore_index, i0,
                                            nr, p.cap, bufs, t, io.op);
        if constexpr (kStats) {
          if (p.smoothing == Smoothing::kOn)
            tile_forward<true, kZ, kCap>(ts, p, tile, bufs, t);
          else
            tile_forward<false, kZ, kCap>(ts, p, tile, bufs, t);
        } else {  // the forward's [m, ls]
          for (int64_t l = 0; l < R; ++l) {
            const bool in = l < nr;
            t.m[l] = in ? io.lse_in[2 * (i0 + l)] : 0.0f;
            t.ls[l] = in ? io.lse_in[2 * (i0 + l) + 1] : 0.0f;
            t.ok[l] = std::isfinite(t.m[l]) && std::isfinite(t.ls[l]);
          }
          if constexpr (kCap == Softcap::kOn)
            tile_true_logit<kCap>(tile, bufs, t).store(t.xy);
          else
            for (int64_t l = 0; l < R; ++l) t.xy[l] = tile[t.yidx[l]];
        }
        if constexpr (kGrad) {
          for (int64_t l = 0; l < R; ++l) t.g[l] = l < nr && t.valid[l] ? io.g.of(i0 + l) : 0.0f;
          tile_grad<kZ, kCap>(ts, p, bufs, t, nr, io.need_t, io.grad + i0 * p.C);
        }
        // the tile's outputs, per row or added to the block's sums in row order; one loop per
        // output, so that each running sum stays in a register (interleaved with the stores of the
        // other outputs GCC kept it on the stack: benchmarks/NOTES.md, issue 20)
        if (kStats && io.lse_out != nullptr) {
          // ignored rows: [0, 0] (unless p.lse_all: every row's), loss 0
          for (int64_t l = 0; l < nr; ++l) {
            const bool w = t.valid[l] || p.lse_all;
            io.lse_out[2 * (i0 + l)] = w ? t.m[l] : 0.0f;
            io.lse_out[2 * (i0 + l) + 1] = w ? t.ls[l] : 0.0f;
          }
        }
        if constexpr (kStats) {
          if (io.loss_rows != nullptr) {
            for (int64_t l = 0; l < nr; ++l) io.loss_rows[i0 + l] = t.valid[l] ? t.loss[l] : 0.0f;
          } else {
            double sum =
                sums.loss;  // all R lanes: lanes l >= nr are not valid (a loop without exits)
            for (int64_t l = 0; l < R; ++l)
              sum += t.valid[l] ? static_cast<double>(t.loss[l]) : 0.0;
            sums.loss = sum;
          }
        }
        if (kGrad && io.need_t) {  // dL/dT of row l: -(g / T) S
          const double beta = p.beta;
          const auto grad_t = [&](int64_t l) {
            return t.valid[l] ? -static_cast<double>(t.g[l]) * t.S[l] * beta : 0.0;
          };
          if (io.grad_t_rows != nullptr) {
            for (int64_t l = 0; l < nr; ++l) io.grad_t_rows[i0 + l] = static_cast<float>(grad_t(l));
          } else {
            double sum = sums.grad_t;
            for (int64_t l = 0; l < R; ++l) sum += grad_t(l);
            sums.grad_t = sum;
          }
        }
      });
}

}  // namespace cpu
}  // namespace softcal
