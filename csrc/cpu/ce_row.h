// softcal CPU kernels: the cross-entropy ROW TERMS (docs/design.md §1, §2); the row path that
// evaluates them for rows of any length is cpu/ce_row_path.h.
//
// The row terms (row_coef, row_loss, true_class_dz, t_row_sum) are the one CPU place of the
// cross-entropy's maths: the row path below and the tile path (cpu/ce_tile.h) both call them, with
// one row (acc_t) or a vector of rows (Vec<float>). A new loss term goes here (docs/design.md §0):
// the z-loss is a row term (row_loss, row_coef), the soft-cap an element map (softcap_vec,
// softcap_slope) applied as the logits are read. Both are compile-time variants (common.h's
// ZLoss and Softcap, switched once per call by llm_switch): the kernels of a call without them
// hold no trace of them.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/host.h"
#include "cpu/rows.h"
#include "cpu/vec.h"

namespace softcal {
namespace cpu {

// Per-call constants of the cross-entropy.
template <typename acc_t>
struct CEParams {
  int64_t C;
  int64_t ignore_index;
  acc_t beta;           // 1 / T
  acc_t eps;            // label smoothing
  acc_t eps_c;          // eps / C
  acc_t W;              // sum of the class weights (C without weights)
  Smoothing smoothing;  // kOff for eps == 0: the smoothing terms are absent, not times 0
  const acc_t* w;       // class weights in acc, or nullptr
  const int64_t* target;
  // the LLM terms (common.h): zl, the z-loss's coefficient of a row's lse^2 (for mean, z_loss
  // denom / count: the loss's sum is divided by denom, the z-loss's by the count of rows); cap,
  // the soft-cap c; lse_all: ignored rows' [m, ls] are written too
  acc_t zl = 0;
  acc_t cap = 0;
  ZLoss zloss = ZLoss::kOff;
  Softcap softcap = Softcap::kOff;
  bool lse_all = false;
  inline acc_t weight_of(int64_t c) const { return w == nullptr ? acc_t(1) : w[c]; }
  // whether the true class's gradient needs p_y beside p_y - 1 (true_class_dz)
  template <ZLoss kZ>
  inline bool needs_p_y() const {
    return kZ == ZLoss::kOn || smoothing == Smoothing::kOn;
  }
  // The weights of the smoothing terms (eps / C) w_c: none without smoothing, so that a weight
  // of inf (1 / bincount of a class absent from the batch) never meets a 0 (§1).
  inline const acc_t* smoothing_weights() const {
    return smoothing == Smoothing::kOn ? w : nullptr;
  }
};

// The constants of a call; the class weights converted once into wbuf (kernel contract).
template <typename acc_t>
CEParams<acc_t> make_params(int64_t C, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, std::vector<acc_t>& wbuf,
                            double temperature, double eps, int64_t ignore_index,
                            double z_loss = 0.0, double softcap = 0.0) {
  CEParams<acc_t> p;
  p.zl = static_cast<acc_t>(z_loss);
  p.zloss = zloss_of(z_loss);
  p.cap = static_cast<acc_t>(softcap);
  p.softcap = softcap_of(softcap);
  p.C = C;
  p.ignore_index = ignore_index;
  p.beta = static_cast<acc_t>(1.0 / temperature);
  p.eps = static_cast<acc_t>(eps);
  p.eps_c = C > 0 ? static_cast<acc_t>(eps / static_cast<double>(C)) : acc_t(0);
  p.smoothing = eps > 0 ? Smoothing::kOn : Smoothing::kOff;
  p.target = target.data_ptr<int64_t>();
  wbuf = weights_in_acc<acc_t>(weight);
  p.w = wbuf.empty() ? nullptr : wbuf.data();
  double W = static_cast<double>(C);
  if (p.w != nullptr) {
    W = 0;
    for (int64_t c = 0; c < C; ++c) W += static_cast<double>(wbuf[c]);
  }
  p.W = static_cast<acc_t>(W);
  return p;
}

// ------------------------------------------------------------------------------------------
// The row terms (docs/design.md §1). T is acc_t for one row, Vec<float> for the 16 rows of a tile.
// ------------------------------------------------------------------------------------------

// The coefficients of dL/dz_c = A p_c - cw w_c - ty [c == y] for a row whose target has weight
// w_y and whose log-sum-exp is lse: ty = (1 - eps) w_y, a_rest = eps W / C + 2 zl lse (the
// smoothing's and the z-loss's shares of A), A = ty + a_rest, cw = eps / C; without smoothing
// and z-loss A = ty = w_y and the other two are absent (W may be inf: §1).
template <typename acc_t>
struct RowCoef {
  acc_t A, ty, a_rest, cw;
  acc_t a_z;  // the z-loss's share of A, 2 zl lse (= sum_c dL/dz_c; 0 without)
};

template <ZLoss kZ, typename acc_t>
inline RowCoef<acc_t> row_coef(const CEParams<acc_t>& p, acc_t w_y, acc_t lse) {
  const acc_t a_z = kZ == ZLoss::kOn ? acc_t(2) * p.zl * lse : acc_t(0);
  if (p.smoothing == Smoothing::kOff) {
    if constexpr (kZ == ZLoss::kOff) return {w_y, w_y, acc_t(0), acc_t(0), acc_t(0)};
    return {w_y + a_z, w_y, a_z, acc_t(0), a_z};
  }
  const acc_t ty = (acc_t(1) - p.eps) * w_y;
  const acc_t a_rest = p.eps * p.W / static_cast<acc_t>(p.C) + a_z;
  return {ty + a_rest, ty, a_rest, p.eps_c, a_z};
}

// The loss of a row that has a softmax, from nll = lse - z_y = beta (m - x_y) + ls, the
// smoothing sum D = sum_c w_c (m - x_c) >= 0, ls and lse = beta m + ls (§2: sums of terms of one
// sign):
//   loss = (1 - eps) w_y nll + (eps / C) (beta D + W ls) + zl lse^2
template <ZLoss kZ, typename T, typename acc_t>
inline T row_loss(const CEParams<acc_t>& p, const T& w_y, const T& nll, const T& D, const T& ls,
                  const T& lse) {
  T loss = T(acc_t(1) - p.eps) * w_y * nll;
  if (p.smoothing == Smoothing::kOn) loss = loss + T(p.eps_c) * (T(p.beta) * D + T(p.W) * ls);
  if constexpr (kZ == ZLoss::kOn) loss = loss + T(p.zl) * (lse * lse);
  return loss;
}

// The true class's dL/dz_y = ty (p_y - 1) + a_rest p_y - cw w_y, from em1 = p_y - 1 =
// expm1(log p_y) and e = p_y (§2: p_y - 1 keeps its digits), in acc before one rounding.
template <ZLoss kZ, typename T, typename acc_t>
inline T true_class_dz(const CEParams<acc_t>& p, const T& ty, const T& a_rest, const T& cw_wy,
                       const T& em1, const T& e) {
  const T dz = ty * em1;
  if (!p.template needs_p_y<kZ>()) return dz;
  return dz + (a_rest * e - cw_wy);
}

// The soft-cap (an element map, Softcap::kOn): c tanh(x / c) on a vector. -inf becomes -c (as
// the composition: the capped row has a softmax), NaN stays.
template <typename acc_t>
inline Vec<acc_t> softcap_vec(const Vec<acc_t>& x, const Vec<acc_t>& vc) {
  return vc * (x / vc).tanh();
}

// Its derivative from the capped value x': 1 - (x' / c)^2.
template <typename acc_t>
inline Vec<acc_t> softcap_slope(const Vec<acc_t>& xc, const Vec<acc_t>& vc) {
  const Vec<acc_t> t = xc / vc;
  return Vec<acc_t>(1) - t * t;
}

// The row x[0:n] as the loss sees it, capped, into out (acc).
template <typename scalar_t, typename acc_t>
inline void softcap_row(const scalar_t* x, int64_t n, acc_t cap, acc_t* out) {
  constexpr int64_t V = Vec<acc_t>::size();
  if constexpr (std::is_same_v<scalar_t, acc_t>)
    std::copy(x, x + n, out);
  else
    at::vec::convert(x, out, n);
  const Vec<acc_t> vc(cap);
  int64_t i = 0;
  for (; i + V <= n; i += V) softcap_vec(Vec<acc_t>::loadu(out + i), vc).store(out + i);
  if (i < n) softcap_vec(Vec<acc_t>::loadu(out + i, n - i), vc).store(out + i, n - i);
}

// The cap's derivative on a row's gradient: out_c = g_c (1 - (x'_c / c)^2), x' the capped logits,
// rounded once to the logits' dtype.
template <typename scalar_t, typename acc_t>
inline void softcap_grad_row(const acc_t* xc, acc_t* g, int64_t n, acc_t cap, scalar_t* out) {
  constexpr int64_t V = Vec<acc_t>::size();
  const Vec<acc_t> vc(cap);
  auto step = [&](int64_t i, int64_t k) {
    (Vec<acc_t>::loadu(g + i, k) * softcap_slope(Vec<acc_t>::loadu(xc + i, k), vc)).store(g + i, k);
  };
  int64_t i = 0;
  for (; i + V <= n; i += V) step(i, V);
  if (i < n) step(i, n - i);
  store_from_acc(g, out, n);
}

// Calls f(z, c) with the call's variants as constants (std::integral_constant of ZLoss and
// Softcap): the one place where the LLM terms are tested at run time (common.h).
template <typename acc_t, typename F>
inline void llm_switch(const CEParams<acc_t>& p, F&& f) {
  auto with_cap = [&](auto z) {
    if (p.softcap == Softcap::kOn)
      f(z, std::integral_constant<Softcap, Softcap::kOn>{});
    else
      f(z, std::integral_constant<Softcap, Softcap::kOff>{});
  };
  if (p.zloss == ZLoss::kOn)
    with_cap(std::integral_constant<ZLoss, ZLoss::kOn>{});
  else
    with_cap(std::integral_constant<ZLoss, ZLoss::kOff>{});
}

// The row's sum for dL/dT = -(g / T) S, S = sum_c dz_c z_c shifted by beta m (§2), from the
// element loops' sums (in double) over the live classes (s_live = sum dz_c beta (x_c - m), the
// true class taken as A p_y - cw w_y) and over the masked ones (s_masked = sum dz_c): the true
// class's -ty term is added here. The shift uses sum_c dz_c = a_z, the z-loss's 2 zl lse (0
// without it): S = s_live + beta m (sum over the live classes of dz_c) = s_live - beta m
// (s_masked - a_z).
template <ZLoss kZ, typename acc_t>
inline double t_row_sum(double s_live, double s_masked, double ty, acc_t beta, acc_t x_y, acc_t m,
                        acc_t a_z) {
  if (x_y > kNegInf<acc_t>)
    s_live -= ty * static_cast<double>(beta * (x_y - m));
  else
    s_masked -= ty;
  if constexpr (kZ == ZLoss::kOn) s_masked -= static_cast<double>(a_z);
  if (s_masked != 0) s_live -= static_cast<double>(beta) * static_cast<double>(m) * s_masked;
  return s_live;
}

}  // namespace cpu
}  // namespace softcal
