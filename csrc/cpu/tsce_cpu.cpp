// softcal CPU kernels: temperature-scaled, label-smoothed cross-entropy (forward, backward,
// fused), row scaling, softmax / log_softmax along any dim, and temperature statistics.
//
// The maths (loss, gradients with respect to the logits and the temperature, edge cases) is
// written out in csrc/common.h; read it first.
//
// Passes over memory
//   forward   one read of the logits. A row is walked in chunks of kChunk elements: the chunk's
//             max is taken (the chunk then sits in L1), the running sum of exp is rescaled when
//             the max grows, and the chunk's exps and (for smoothing) its weighted sum are added.
//             One exp per element; nothing of size N x C is written or kept.
//   backward  one read of the logits and one write of the gradient; p = exp(z - lse) from the
//             saved per-row lse. One exp per element.
//   fused     the forward's read, then the gradient is written while the row is still in the
//             core's cache (a row of C float32 fits in L2 up to C ~ 250k); otherwise the second
//             walk re-reads it from L3/DRAM.
// Parallelism: at::parallel_for over rows; inner loops on at::vec::Vectorized (AVX2/AVX-512 as
// built, see setup.py). Reductions over rows are done in fixed blocks of kReduceBlock rows in
// double, then summed in block order: results are bitwise identical for any thread count.
// Offsets are int64 throughout.
//
// Fresh gradient buffers are advised to use transparent huge pages (madvise) before their first
// touch: on Linux the page faults of a fresh logits-sized buffer otherwise dominate the backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/cpu_common.h"

namespace softcal {
namespace {

using namespace ::softcal::cpu;

template <typename acc_t>
struct RowStats {
  acc_t max;     // max_c x_c (raw logits); NaN if any is NaN
  acc_t sumexp;  // sum_c exp(beta * (x_c - max))
  acc_t dot;     // sum_c w_c x_c (only when requested)
};

template <typename acc_t>
struct ChunkSums {
  acc_t max, sumexp, dot;
};

// One walk over x[0:n]: its max, sum_i exp(beta * x_i - shift) and (when kDot) sum w_i x_i.
template <typename acc_t, bool kDot>
inline ChunkSums<acc_t> chunk_exp_max_dot(const acc_t* x, const acc_t* w, int64_t n, acc_t beta,
                                          acc_t shift) {
  constexpr int64_t V = Vec<acc_t>::size();
  const Vec<acc_t> vb(beta), vs(-shift);
  Vec<acc_t> m0(kNegInf<acc_t>), m1(kNegInf<acc_t>), s0(0), s1(0), d0(0), d1(0);
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    const Vec<acc_t> a = Vec<acc_t>::loadu(x + i), b = Vec<acc_t>::loadu(x + i + V);
    m0 = at::vec::maximum(m0, a);
    m1 = at::vec::maximum(m1, b);
    s0 = s0 + vexp(at::vec::fmadd(a, vb, vs));
    s1 = s1 + vexp(at::vec::fmadd(b, vb, vs));
    if constexpr (kDot) {
      if (w == nullptr) {
        d0 = d0 + a;
        d1 = d1 + b;
      } else {
        d0 = at::vec::fmadd(a, Vec<acc_t>::loadu(w + i), d0);
        d1 = at::vec::fmadd(b, Vec<acc_t>::loadu(w + i + V), d1);
      }
    }
  }
  // the rest: whole vectors, then one masked vector (small C lives entirely here)
  for (; i < n; i += V) {
    Vec<acc_t> a, az, wv(1);
    if (i + V <= n) {
      a = az = Vec<acc_t>::loadu(x + i);
      if (kDot && w != nullptr) wv = Vec<acc_t>::loadu(w + i);
    } else {
      const Tail<acc_t> t = load_tail(x + i, n - i);
      a = t.masked;
      az = t.loaded;
      if (kDot && w != nullptr) wv = Vec<acc_t>::loadu(w + i, n - i);
    }
    m0 = at::vec::maximum(m0, a);
    s0 = s0 + vexp(at::vec::fmadd(a, vb, vs));
    if constexpr (kDot) d0 = w == nullptr ? d0 + az : at::vec::fmadd(az, wv, d0);
  }
  auto add = std::plus<Vec<acc_t>>();
  ChunkSums<acc_t> r;
  r.max = at::vec::vec_reduce_all<acc_t>(
      [](Vec<acc_t>& a, Vec<acc_t>& b) { return at::vec::maximum(a, b); }, at::vec::maximum(m0, m1));
  r.sumexp = at::vec::vec_reduce_all<acc_t>(add, s0 + s1);
  r.dot = kDot ? at::vec::vec_reduce_all<acc_t>(add, d0 + d1) : acc_t(0);
  return r;
}

// One read of a row: the online max and sum of exps, and optionally sum w_c x_c.
// Each chunk is walked once: its exps are taken relative to the running max, which starts at
// the row's first logit (exact in floating point as long as they cannot overflow), and the sum
// is rescaled when the chunk's max is larger. A chunk whose max exceeds the running max by more
// than 80 / beta (its exps could overflow), or the first chunk with a finite value when the
// first logit is -inf, is walked a second time while in L1.
template <typename scalar_t, typename acc_t>
inline RowStats<acc_t> row_stats(const scalar_t* x, int64_t C, acc_t beta, const acc_t* w,
                                 bool need_dot, acc_t* buf) {
  RowStats<acc_t> st{kNegInf<acc_t>, 0, 0};
  // Start the running max at the first logit (when finite): most rows are then walked once.
  // Short rows instead take their max first (a second walk of a few vectors costs less than
  // the scalar exp that rescaling would take).
  if (C <= 4 * Vec<acc_t>::size()) {
    const acc_t* xa = as_acc(x, C, buf);
    st.max = chunk_max(xa, C);
    if (std::isfinite(st.max)) st.sumexp = chunk_sum_exp(xa, C, beta, beta * st.max);
    if (need_dot) st.dot = chunk_dot(xa, w, C);
    return st;
  }
  if (C > 0) {
    const acc_t x0 = static_cast<acc_t>(x[0]);
    if (std::isfinite(x0)) st.max = x0;
  }
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    const acc_t* xa = as_acc(x + c0, n, buf);
    const acc_t* wc = w == nullptr ? nullptr : w + c0;
    const bool have_shift = st.max > kNegInf<acc_t>;
    const acc_t shift = have_shift ? beta * st.max : acc_t(0);
    const ChunkSums<acc_t> cs = need_dot ? chunk_exp_max_dot<acc_t, true>(xa, wc, n, beta, shift)
                                         : chunk_exp_max_dot<acc_t, false>(xa, wc, n, beta, shift);
    st.dot += cs.dot;
    if (std::isnan(cs.max) || cs.max == std::numeric_limits<acc_t>::infinity()) {
      st.max = cs.max;  // NaN or +inf: no softmax; the caller turns this into NaN
      return st;
    }
    if (cs.max == kNegInf<acc_t>) continue;  // all masked so far
    if (have_shift && !(beta * (cs.max - st.max) > acc_t(80))) {
      st.sumexp += cs.sumexp;  // exps relative to the old max
      if (cs.max > st.max) {
        st.sumexp *= std::exp(beta * (st.max - cs.max));
        st.max = cs.max;
      }
    } else {  // no shift yet, or one far too small: walk the chunk again with its own max
      st.sumexp = have_shift ? st.sumexp * std::exp(beta * (st.max - cs.max)) : acc_t(0);
      st.max = cs.max;
      st.sumexp += chunk_sum_exp(xa, n, beta, beta * st.max);
    }
  }
  return st;
}

// log-sum-exp of z = beta * x from the row stats; NaN when the row has no softmax (a NaN or
// +inf logit, or every logit -inf), as torch.softmax and common.h.
template <typename acc_t>
inline acc_t row_lse(const RowStats<acc_t>& st, acc_t beta) {
  if (!std::isfinite(st.max)) return kNaN<acc_t>;
  return beta * st.max + std::log(st.sumexp);
}

// Per-call constants of the cross-entropy.
template <typename acc_t>
struct CEParams {
  int64_t C;
  int64_t ignore_index;
  acc_t beta;       // 1 / T
  acc_t eps;        // label smoothing
  acc_t eps_c;      // eps / C
  acc_t W;          // sum of the class weights (C without weights)
  const acc_t* w;   // class weights in acc, or nullptr
  const int64_t* target;
  inline acc_t weight_of(int64_t c) const { return w == nullptr ? acc_t(1) : w[c]; }
};

template <typename acc_t>
CEParams<acc_t> make_params(int64_t C, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, std::vector<acc_t>& wbuf,
                            double temperature, double eps, int64_t ignore_index) {
  CEParams<acc_t> p;
  p.C = C;
  p.ignore_index = ignore_index;
  p.beta = static_cast<acc_t>(1.0 / temperature);
  p.eps = static_cast<acc_t>(eps);
  p.eps_c = C > 0 ? static_cast<acc_t>(eps / static_cast<double>(C)) : acc_t(0);
  p.target = target.data_ptr<int64_t>();
  p.w = nullptr;
  p.W = static_cast<acc_t>(C);
  if (weight.has_value()) {
    const at::Tensor w = weight->contiguous();
    wbuf.resize(C);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "softcal_weight", [&] {
      const scalar_t* wp = w.data_ptr<scalar_t>();
      double W = 0;
      for (int64_t c = 0; c < C; ++c) {
        wbuf[c] = static_cast<acc_t>(to_double(wp[c]));
        W += static_cast<double>(wbuf[c]);
      }
      p.W = static_cast<acc_t>(W);
    });
    p.w = wbuf.data();
  }
  return p;
}

// Checks every target (the error names the row and the value) and returns
// denom = sum over non-ignored rows of w[target], summed in row order in double.
template <typename acc_t>
double check_targets_and_denom(const CEParams<acc_t>& p, int64_t rows, const char* op) {
  double denom = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t t = p.target[i];
    if (t == p.ignore_index) continue;
    TORCH_CHECK(t >= 0 && t < p.C, op, ": target[", i, "] = ", t, " is out of range for ", p.C,
                " classes (ignore_index = ", p.ignore_index, ")");
    denom += static_cast<double>(p.weight_of(t));
  }
  return denom;
}

// Loss of one non-ignored row from its stats; writes its lse.
template <typename scalar_t, typename acc_t>
inline acc_t row_loss(const CEParams<acc_t>& p, const scalar_t* x, const RowStats<acc_t>& st,
                      int64_t y, acc_t& lse_out) {
  if (!std::isfinite(st.max)) {  // NaN / +inf logits, or entirely -inf: NaN lse and loss
    lse_out = kNaN<acc_t>;
    return kNaN<acc_t>;
  }
  const acc_t log_s = std::log(st.sumexp);
  const acc_t lse = p.beta * st.max + log_s;
  lse_out = lse;
  const acc_t w_y = p.weight_of(y);
  // lse - z_y = beta * (max - x_y) + log(sumexp): no cancellation between two large numbers
  const acc_t nll = p.beta * (st.max - static_cast<acc_t>(x[y])) + log_s;
  acc_t loss = (acc_t(1) - p.eps) * w_y * nll;
  if (p.eps > 0) loss += p.eps_c * (p.W * lse - p.beta * st.dot);
  return loss;
}

// Gradient of one non-ignored row: grad_c = g * beta * dL/dz_c (written when grad != nullptr).
// Returns S = sum over non-masked c of dL/dz_c * z_c (when need_t), for dL/dT = -(g/T) * S.
template <typename scalar_t, typename acc_t>
inline acc_t row_grad(const CEParams<acc_t>& p, const scalar_t* x, scalar_t* grad, acc_t lse,
                      int64_t y, acc_t g, bool need_t, acc_t* xbuf, acc_t* gbuf) {
  constexpr int64_t V = Vec<acc_t>::size();
  const int64_t C = p.C;
  const acc_t w_y = p.weight_of(y);
  const acc_t A = (acc_t(1) - p.eps) * w_y + p.eps * p.W / static_cast<acc_t>(C);
  const acc_t gb = g * p.beta;
  if (!std::isfinite(lse)) {  // a row with NaN/+inf logits, or fully masked: NaN gradient
    if (grad != nullptr) std::fill(grad, grad + C, static_cast<scalar_t>(kNaN<acc_t>));
    return kNaN<acc_t>;
  }
  const Vec<acc_t> vbeta(p.beta), vnlse(-lse), vcoef(gb * A), vcw(gb * p.eps_c), vA(A),
      veps_c(p.eps_c), vninf(kNegInf<acc_t>), vzero(0);
  Vec<acc_t> vS(0);
  acc_t S = 0;
  const acc_t x_y = static_cast<acc_t>(x[y]);  // read before the row is overwritten (in place)
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    const acc_t* xa = as_acc(x + c0, n, xbuf);
    acc_t* out = std::is_same_v<scalar_t, acc_t> && grad != nullptr
                     ? reinterpret_cast<acc_t*>(grad + c0)
                     : gbuf;
    const acc_t* wc = p.w == nullptr ? nullptr : p.w + c0;
    int64_t i = 0;
    for (; i + V <= n; i += V) {
      const Vec<acc_t> xv = Vec<acc_t>::loadu(xa + i);
      const Vec<acc_t> e = vexp(at::vec::fmadd(xv, vbeta, vnlse));
      const Vec<acc_t> wv = wc == nullptr ? Vec<acc_t>(1) : Vec<acc_t>::loadu(wc + i);
      if (grad != nullptr) (vcoef * e - vcw * wv).store(out + i);
      if (need_t) {
        const Vec<acc_t> d = vA * e - veps_c * wv;
        const Vec<acc_t> contrib = d * (xv * vbeta);
        vS = vS + Vec<acc_t>::blendv(vzero, contrib, xv > vninf);
      }
    }
    if (i < n) {  // one masked vector for the rest
      const int64_t k = n - i;
      const Tail<acc_t> t = load_tail(xa + i, k);
      const Vec<acc_t> e = vexp(at::vec::fmadd(t.masked, vbeta, vnlse));
      const Vec<acc_t> wv = wc == nullptr ? Vec<acc_t>(1) : Vec<acc_t>::loadu(wc + i, k);
      if (grad != nullptr) (vcoef * e - vcw * wv).store(out + i, k);
      if (need_t) {
        const Vec<acc_t> contrib = (vA * e - veps_c * wv) * (t.loaded * vbeta);
        vS = vS + Vec<acc_t>::blendv(vzero, contrib, t.masked > vninf);
      }
    }
    if (grad != nullptr) store_from_acc(out, grad + c0, n);
  }
  const acc_t p_y = std::exp(p.beta * x_y - lse);
  if (grad != nullptr) {
    // The true-class term in acc precision, then one rounding.
    const acc_t gy = gb * (A * p_y - p.eps_c * w_y - (acc_t(1) - p.eps) * w_y);
    grad[y] = static_cast<scalar_t>(gy);
  }
  if (!need_t) return 0;
  S += at::vec::vec_reduce_all<acc_t>(std::plus<Vec<acc_t>>(), vS);
  if (x_y > kNegInf<acc_t>) S -= (acc_t(1) - p.eps) * w_y * (p.beta * x_y);
  return S;
}

// ------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> tsce_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction) {
  const char* op = "softcal.cross_entropy";
  check_tsce_inputs(logits, target, weight, temperature_t, temperature, label_smoothing,
                    reduction, op);
  const double T = host_temperature(temperature_t, temperature, op);
  const int64_t rows = logits.size(0), C = logits.size(1);
  const auto acc_st = acc_type(logits.scalar_type());
  at::Tensor lse = at::empty({rows}, logits.options().dtype(acc_st));
  at::Tensor loss_rows = at::empty({rows}, logits.options().dtype(acc_st));
  at::Tensor denom_t = at::empty({}, logits.options().dtype(acc_st));
  const at::Tensor tgt = target.contiguous();
  const int64_t row_stride = logits.stride(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tsce_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> wbuf;
    const auto p = make_params<acc_t>(C, tgt, weight, wbuf, T, label_smoothing, ignore_index);
    const double denom = check_targets_and_denom(p, rows, op);
    denom_t.fill_(denom);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    acc_t* lse_p = lse.data_ptr<acc_t>();
    acc_t* loss_p = loss_rows.data_ptr<acc_t>();
    at::parallel_for(0, rows, row_grain(C), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk);
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t y = p.target[i];
        if (y == ignore_index) {
          loss_p[i] = 0;
          lse_p[i] = 0;  // unused: ignored rows have no gradient
          continue;
        }
        const scalar_t* xr = x + i * row_stride;
        const auto st = row_stats(xr, C, p.beta, p.w, p.eps > 0, buf.data());
        loss_p[i] = row_loss(p, xr, st, y, lse_p[i]);
      }
    });
  });

  at::Tensor loss;
  if (reduction == kNone) {
    loss = loss_rows.to(logits.scalar_type());
  } else {
    double total = deterministic_sum(loss_rows);
    if (reduction == kMean) total /= denom_t.item<double>();  // 0/0 = NaN when all are ignored
    loss = at::scalar_tensor(total, logits.options().dtype(acc_st)).to(logits.scalar_type());
  }
  return {loss, lse, denom_t};
}

// Upstream gradient of row i (already divided by denom for mean).
struct GradScale {
  const void* ptr = nullptr;
  int64_t stride = 0;
  double scalar = 0;
  bool per_row = false;
};

template <typename acc_t>
inline acc_t grad_of_row(const GradScale& gs, int64_t i) {
  if (!gs.per_row) return static_cast<acc_t>(gs.scalar);
  return static_cast<const acc_t*>(gs.ptr)[i * gs.stride];
}

std::tuple<at::Tensor, at::Tensor> tsce_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& denom,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_logits_grad, bool need_temperature_grad) {
  const char* op = "softcal.cross_entropy (backward)";
  check_tsce_inputs(logits, target, weight, temperature_t, temperature, label_smoothing,
                    reduction, op);
  const double T = host_temperature(temperature_t, temperature, op);
  const int64_t rows = logits.size(0), C = logits.size(1);
  const auto acc_st = acc_type(logits.scalar_type());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == rows && lse.scalar_type() == acc_st, op,
              ": lse must be (", rows, ",) ", acc_st, ", got ", lse.sizes(), " ", lse.scalar_type());
  if (reduction == kNone) {
    TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == rows, op, ": grad_loss must be (",
                rows, ",) for reduction none, got ", grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must be 0-dim, got ", grad_loss.sizes());
  }
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  at::Tensor grad = need_logits_grad ? new_grad_buffer(logits) : logits.new_empty({0});
  at::Tensor grad_t_rows = need_t ? at::empty({rows}, logits.options().dtype(acc_st))
                                  : at::Tensor();
  GradScale gs;
  at::Tensor g_acc;  // upstream gradient in acc dtype
  if (reduction == kNone) {
    g_acc = grad_loss.to(acc_st);
    gs.per_row = true;
    gs.ptr = g_acc.const_data_ptr();
    gs.stride = g_acc.stride(0);
  } else {
    gs.scalar = grad_loss.item<double>();
    if (reduction == kMean) gs.scalar /= denom.item<double>();
  }
  const at::Tensor tgt = target.contiguous();
  const int64_t row_stride = logits.stride(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tsce_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> wbuf;
    const auto p = make_params<acc_t>(C, tgt, weight, wbuf, T, label_smoothing, ignore_index);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* gx = need_logits_grad ? grad.data_ptr<scalar_t>() : nullptr;
    const acc_t* lse_p = lse.const_data_ptr<acc_t>();
    acc_t* gt_p = need_t ? grad_t_rows.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, rows, row_grain(C), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> xbuf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk);
      std::vector<acc_t> gbuf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk);
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t y = p.target[i];
        scalar_t* gr = gx == nullptr ? nullptr : gx + i * C;
        if (y == ignore_index) {
          if (gr != nullptr) std::fill(gr, gr + C, scalar_t(0));
          if (gt_p != nullptr) gt_p[i] = 0;
          continue;
        }
        TORCH_CHECK(y >= 0 && y < C, op, ": target[", i, "] = ", y, " is out of range for ", C,
                    " classes");
        const acc_t g = grad_of_row<acc_t>(gs, i);
        const acc_t S = row_grad(p, x + i * row_stride, gr, lse_p[i], y, g, gt_p != nullptr,
                                 xbuf.data(), gbuf.data());
        if (gt_p != nullptr) gt_p[i] = -g * S * static_cast<acc_t>(1.0 / T);
      }
    });
  });

  const auto t_dtype = temp_grad_type(temperature_t, logits.scalar_type());
  at::Tensor grad_t = at::zeros({}, logits.options().dtype(t_dtype));
  if (need_t) {
    grad_t.fill_(deterministic_sum(grad_t_rows));
  }
  return {grad, grad_t};
}

// Fused forward: loss and gradient (upstream gradient 1) in one call. `grad_out` may alias the
// logits (in-place mode): each row is read completely before its gradient is written.
template <typename scalar_t>
void tsce_fused_impl(const at::Tensor& logits, scalar_t* grad_out, const at::Tensor& target,
                     const std::optional<at::Tensor>& weight, double T, double label_smoothing,
                     int64_t ignore_index, int64_t reduction, bool need_t, at::Tensor& loss_rows,
                     at::Tensor& grad_t_rows, double& denom, const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = logits.size(0), C = logits.size(1);
  std::vector<acc_t> wbuf;
  const auto p = make_params<acc_t>(C, target, weight, wbuf, T, label_smoothing, ignore_index);
  denom = check_targets_and_denom(p, rows, op);
  const acc_t g = reduction == kMean ? static_cast<acc_t>(1.0 / denom) : acc_t(1);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const int64_t row_stride = logits.stride(0);
  acc_t* loss_p = loss_rows.data_ptr<acc_t>();
  acc_t* gt_p = need_t ? grad_t_rows.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, rows, row_grain(C), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> xbuf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk);
    std::vector<acc_t> gbuf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t y = p.target[i];
      scalar_t* gr = grad_out + i * C;
      if (y == ignore_index) {
        loss_p[i] = 0;
        std::fill(gr, gr + C, scalar_t(0));
        if (gt_p != nullptr) gt_p[i] = 0;
        continue;
      }
      const scalar_t* xr = x + i * row_stride;
      const auto st = row_stats(xr, C, p.beta, p.w, p.eps > 0, xbuf.data());
      acc_t lse;
      loss_p[i] = row_loss(p, xr, st, y, lse);
      // A fully masked row has lse = -inf: row_grad gives NaN there, like its loss.
      const acc_t S = row_grad(p, xr, gr, lse, y, g,
                               gt_p != nullptr, xbuf.data(), gbuf.data());
      if (gt_p != nullptr) gt_p[i] = -g * S * p.beta;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> finish_fused(const at::Tensor& logits, at::Tensor& loss_rows,
                                                at::Tensor& grad_t_rows, double denom,
                                                int64_t reduction, bool need_t,
                                                const std::optional<at::Tensor>& temperature_t) {
  const auto t_dtype = temp_grad_type(temperature_t, logits.scalar_type());
  const auto acc_st = acc_type(logits.scalar_type());
  at::Tensor loss, grad_t;
  if (reduction == kNone) {
    loss = loss_rows.to(logits.scalar_type());
    grad_t = need_t ? grad_t_rows.to(t_dtype) : at::zeros({logits.size(0)}, logits.options().dtype(t_dtype));
  } else {
    double total = deterministic_sum(loss_rows);
    const double total_t = need_t ? deterministic_sum(grad_t_rows) : 0.0;
    if (reduction == kMean) total /= denom;
    loss = at::scalar_tensor(total, logits.options().dtype(acc_st)).to(logits.scalar_type());
    grad_t = at::scalar_tensor(total_t, logits.options().dtype(t_dtype));
  }
  return {loss, grad_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tsce_fused_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_temperature_grad) {
  const char* op = "softcal.cross_entropy (fused)";
  check_tsce_inputs(logits, target, weight, temperature_t, temperature, label_smoothing,
                    reduction, op);
  const double T = host_temperature(temperature_t, temperature, op);
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  const auto acc_st = acc_type(logits.scalar_type());
  const int64_t rows = logits.size(0);
  at::Tensor grad = new_grad_buffer(logits);
  at::Tensor loss_rows = at::empty({rows}, logits.options().dtype(acc_st));
  at::Tensor grad_t_rows = at::empty({need_t ? rows : 0}, logits.options().dtype(acc_st));
  double denom = 0;
  const at::Tensor tgt = target.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tsce_fused_cpu", [&] {
    tsce_fused_impl<scalar_t>(logits, grad.data_ptr<scalar_t>(), tgt, weight, T, label_smoothing,
                              ignore_index, reduction, need_t, loss_rows, grad_t_rows, denom, op);
  });
  auto [loss, grad_t] = finish_fused(logits, loss_rows, grad_t_rows, denom, reduction, need_t, temperature_t);
  return {loss, grad, grad_t};
}

std::tuple<at::Tensor, at::Tensor> tsce_fused_inplace_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_temperature_grad) {
  const char* op = "softcal.cross_entropy (fused, in place)";
  check_tsce_inputs(logits, target, weight, temperature_t, temperature, label_smoothing,
                    reduction, op);
  TORCH_CHECK(logits.is_contiguous(), op, ": in-place mode needs contiguous logits, got strides ",
              logits.strides());
  const double T = host_temperature(temperature_t, temperature, op);
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  const auto acc_st = acc_type(logits.scalar_type());
  const int64_t rows = logits.size(0);
  at::Tensor loss_rows = at::empty({rows}, logits.options().dtype(acc_st));
  at::Tensor grad_t_rows = at::empty({need_t ? rows : 0}, logits.options().dtype(acc_st));
  double denom = 0;
  const at::Tensor tgt = target.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tsce_fused_inplace_cpu", [&] {
    tsce_fused_impl<scalar_t>(logits, const_cast<scalar_t*>(logits.const_data_ptr<scalar_t>()),
                              tgt, weight, T, label_smoothing, ignore_index, reduction, need_t,
                              loss_rows, grad_t_rows, denom, op);
  });
  return finish_fused(logits, loss_rows, grad_t_rows, denom, reduction, need_t, temperature_t);
}

void scale_rows_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  const char* op = "softcal.scale_rows_";
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), op, ": grad must be 2-D contiguous, got ",
              grad.sizes());
  const int64_t rows = grad.size(0), C = grad.size(1);
  if (scale.dim() == 0) {
    const double s = scale.item<double>();
    if (s == 1.0) return;
    grad.mul_(s);
    return;
  }
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == rows, op, ": scale must be 0-dim or (", rows,
              ",), got ", scale.sizes());
  const at::Tensor s = scale.to(at::kDouble);
  const double* sp = s.const_data_ptr<double>();
  const int64_t ss = s.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int64_t V = Vec<acc_t>::size();
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(C), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk);
      for (int64_t i = r0; i < r1; ++i) {
        const acc_t f = static_cast<acc_t>(sp[i * ss]);
        const Vec<acc_t> vf(f);
        for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
          const int64_t n = std::min(kChunk, C - c0);
          scalar_t* gr = g + i * C + c0;
          acc_t* a = const_cast<acc_t*>(as_acc(gr, n, buf.data()));  // gr itself for float/double
          int64_t c = 0;
          for (; c + V <= n; c += V) (Vec<acc_t>::loadu(a + c) * vf).store(a + c);
          for (; c < n; ++c) a[c] *= f;
          store_from_acc(a, gr, n);
        }
      }
    });
  });
}

// ------------------------------------------------------------------------------------------
// softmax / log_softmax along any dim. x is viewed as (outer, C, inner) (contiguous).
// ------------------------------------------------------------------------------------------

template <typename scalar_t>
void softmax_rows(const scalar_t* x, scalar_t* out, int64_t rows, int64_t C, double beta_d,
                  bool log) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t V = Vec<acc_t>::size();
  const acc_t beta = static_cast<acc_t>(beta_d);
  at::parallel_for(0, rows, row_grain(C), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> xbuf(kChunk), obuf(kChunk);
    for (int64_t i = r0; i < r1; ++i) {
      const scalar_t* xr = x + i * C;
      scalar_t* orow = out + i * C;
      const auto st = row_stats<scalar_t, acc_t>(xr, C, beta, nullptr, false, xbuf.data());
      // NaN for a row with NaN/+inf or entirely -inf (as torch.softmax)
      const acc_t lse = row_lse(st, beta);
      const Vec<acc_t> vb(beta), vl(-lse);
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int64_t n = std::min(kChunk, C - c0);
        const acc_t* xa = as_acc(xr + c0, n, xbuf.data());
        acc_t* oa = obuf.data();
        int64_t c = 0;
        for (; c + V <= n; c += V) {
          const Vec<acc_t> z = at::vec::fmadd(Vec<acc_t>::loadu(xa + c), vb, vl);
          (log ? z : vexp(z)).store(oa + c);
        }
        if (c < n) {
          const Vec<acc_t> z = at::vec::fmadd(Vec<acc_t>::loadu(xa + c, n - c), vb, vl);
          (log ? z : vexp(z)).store(oa + c, n - c);
        }
        if (std::isnan(lse)) std::fill(oa, oa + n, kNaN<acc_t>);
        store_from_acc(oa, orow + c0, n);
      }
    }
  });
}

template <typename scalar_t>
void softmax_strided(const scalar_t* x, scalar_t* out, int64_t outer, int64_t C, int64_t inner,
                     double beta_d, bool log) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t beta = static_cast<acc_t>(beta_d);
  constexpr int64_t J = 64;  // columns of `inner` handled together (contiguous loads)
  const int64_t jblocks = (inner + J - 1) / J;
  at::parallel_for(0, outer * jblocks, 1, [&](int64_t b0, int64_t b1) {
    acc_t m[J], s[J];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b / jblocks, j0 = (b % jblocks) * J, nj = std::min(J, inner - j0);
      const scalar_t* xb = x + o * C * inner + j0;
      scalar_t* ob = out + o * C * inner + j0;
      for (int64_t j = 0; j < nj; ++j) { m[j] = kNegInf<acc_t>; s[j] = 0; }
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = 0; j < nj; ++j) {
          const acc_t v = static_cast<acc_t>(xb[c * inner + j]);
          m[j] = (std::isnan(v) || v > m[j]) ? v : m[j];
        }
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = 0; j < nj; ++j)
          s[j] += std::exp(beta * (static_cast<acc_t>(xb[c * inner + j]) - m[j]));
      for (int64_t j = 0; j < nj; ++j) {
        const bool bad = std::isnan(m[j]) || std::isinf(m[j]);
        m[j] = bad ? kNaN<acc_t> : beta * m[j] + std::log(s[j]);  // m now holds lse
      }
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = 0; j < nj; ++j) {
          const acc_t z = beta * static_cast<acc_t>(xb[c * inner + j]) - m[j];
          ob[c * inner + j] = static_cast<scalar_t>(log ? z : std::exp(z));
        }
    }
  });
}

void dims_of(const at::Tensor& x, int64_t dim, int64_t& outer, int64_t& C, int64_t& inner) {
  outer = 1;
  inner = 1;
  for (int64_t d = 0; d < dim; ++d) outer *= x.size(d);
  for (int64_t d = dim + 1; d < x.dim(); ++d) inner *= x.size(d);
  C = x.size(dim);
}

at::Tensor softmax_fwd_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& temperature_t,
                           double temperature, int64_t dim, bool log) {
  const char* op = log ? "softcal.log_softmax" : "softcal.softmax";
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), op,
              ": input must be floating, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() >= 1, op, ": input must have at least one dimension");
  dim = c10::maybe_wrap_dim(dim, x_in.dim());
  if (!temperature_t.has_value()) check_float_scalars(temperature, 0.0, op);
  const double T = host_temperature(temperature_t, temperature, op);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return out;
  int64_t outer, C, inner;
  dims_of(x, dim, outer, C, inner);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_fwd_cpu", [&] {
    if (inner == 1) {
      softmax_rows(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), outer, C, 1.0 / T, log);
    } else {
      softmax_strided(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), outer, C, inner,
                      1.0 / T, log);
    }
  });
  return out;
}

// Backward of softmax / log_softmax, per slice (see common.h):
//   softmax:     dz = y * (g - sum(g y));     log_softmax: dz = g - y * sum(g), y = exp(o)
//   dx = beta * dz;  dT contribution -(1/T) * sum dz * log y  (terms with y == 0 skipped).
std::tuple<at::Tensor, at::Tensor> softmax_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& out_in,
    const std::optional<at::Tensor>& temperature_t, double temperature, int64_t dim, bool log,
    bool need_temperature_grad) {
  const char* op = log ? "softcal.log_softmax (backward)" : "softcal.softmax (backward)";
  TORCH_CHECK(grad_out_in.sizes() == out_in.sizes(), op, ": grad has shape ", grad_out_in.sizes(),
              " but the output has ", out_in.sizes());
  dim = c10::maybe_wrap_dim(dim, out_in.dim());
  const double T = host_temperature(temperature_t, temperature, op);
  const at::Tensor out = out_in.contiguous();
  const at::Tensor g = grad_out_in.to(out.scalar_type()).contiguous();
  at::Tensor grad_x = at::empty_like(out, at::MemoryFormat::Contiguous);
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  const auto t_dtype = temp_grad_type(temperature_t, out.scalar_type());
  int64_t outer, C, inner;
  dims_of(out, dim, outer, C, inner);
  const int64_t slices = outer * inner;
  const auto acc_st = acc_type(out.scalar_type());
  at::Tensor t_rows = at::zeros({need_t ? slices : 0}, out.options().dtype(acc_st));
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "softmax_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t beta = static_cast<acc_t>(1.0 / T);
      const scalar_t* op_ = out.const_data_ptr<scalar_t>();
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      scalar_t* dx = grad_x.data_ptr<scalar_t>();
      acc_t* tr = need_t ? t_rows.data_ptr<acc_t>() : nullptr;
      at::parallel_for(0, slices, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t s0, int64_t s1) {
        for (int64_t sl = s0; sl < s1; ++sl) {
          const int64_t o = sl / inner, j = sl % inner;
          const int64_t base = o * C * inner + j;
          acc_t dot = 0;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t gv = static_cast<acc_t>(gp[base + c * inner]);
            const acc_t ov = static_cast<acc_t>(op_[base + c * inner]);
            dot += log ? gv : gv * ov;
          }
          acc_t S = 0;
          for (int64_t c = 0; c < C; ++c) {
            const int64_t k = base + c * inner;
            const acc_t gv = static_cast<acc_t>(gp[k]);
            const acc_t ov = static_cast<acc_t>(op_[k]);
            const acc_t y = log ? std::exp(ov) : ov;
            const acc_t dz = log ? gv - y * dot : y * (gv - dot);
            dx[k] = static_cast<scalar_t>(beta * dz);
            if (tr != nullptr && y > 0) S += dz * (log ? ov : std::log(y));
          }
          if (tr != nullptr) tr[sl] = -S * static_cast<acc_t>(1.0 / T);
        }
      });
    });
  }
  at::Tensor grad_t = at::zeros({}, out.options().dtype(t_dtype));
  if (need_t) {
    grad_t.fill_(deterministic_sum(t_rows));
  }
  return {grad_x, grad_t};
}

// ------------------------------------------------------------------------------------------
// Temperature statistics: [sum NLL, sum (E_p[x] - x_y), sum Var_p[x], rows] at beta, float64.
// Per row: the max is found first (the row then sits in cache), then one walk accumulates
// sum e, sum e d, sum e d^2 with d = x - max (centred, so the variance does not cancel).
// ------------------------------------------------------------------------------------------

at::Tensor temperature_stats_cpu(const at::Tensor& logits, const at::Tensor& target, double beta_d) {
  const char* op = "softcal.temperature_stats";
  check_logits(logits, op);
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) <= 1, op,
              ": logits must have unit stride along classes, got strides ", logits.strides());
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 &&
                  target.size(0) == logits.size(0),
              op, ": target must be int64 of shape (", logits.size(0), ",), got ",
              target.scalar_type(), " ", target.sizes());
  TORCH_CHECK(std::isfinite(beta_d) && beta_d > 0, op, ": beta must be finite and > 0, got ", beta_d);
  const int64_t rows = logits.size(0), C = logits.size(1);
  const at::Tensor tgt = target.contiguous();
  const int64_t* tp = tgt.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < C, op, ": target[", i, "] = ", tp[i],
                " is out of range for ", C, " classes");
  at::Tensor per_row = at::empty({3, rows}, logits.options().dtype(at::kDouble));
  const int64_t row_stride = logits.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "temperature_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int64_t V = Vec<acc_t>::size();
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    double* nll_p = per_row.data_ptr<double>();
    double* d1_p = nll_p + rows;
    double* d2_p = nll_p + 2 * rows;
    const acc_t beta = static_cast<acc_t>(beta_d);
    at::parallel_for(0, rows, row_grain(C), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk);
      for (int64_t i = r0; i < r1; ++i) {
        const scalar_t* xr = x + i * row_stride;
        acc_t mx = kNegInf<acc_t>;
        for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
          const int64_t n = std::min(kChunk, C - c0);
          const acc_t cm = chunk_max(as_acc(xr + c0, n, buf.data()), n);
          mx = (std::isnan(cm) || cm > mx) ? cm : mx;
        }
        if (!std::isfinite(mx)) {
          nll_p[i] = d1_p[i] = d2_p[i] = std::numeric_limits<double>::quiet_NaN();
          continue;
        }
        const Vec<acc_t> vm(mx), vb(beta), vninf(kNegInf<acc_t>), vzero(0);
        Vec<acc_t> v0(0), v1(0), v2(0);
        acc_t s0 = 0, s1 = 0, s2 = 0;
        for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
          const int64_t n = std::min(kChunk, C - c0);
          const acc_t* xa = as_acc(xr + c0, n, buf.data());
          int64_t c = 0;
          for (; c + V <= n; c += V) {
            const Vec<acc_t> xv = Vec<acc_t>::loadu(xa + c);
            const Vec<acc_t> d = Vec<acc_t>::blendv(vzero, xv - vm, xv > vninf);
            const Vec<acc_t> e = vexp(Vec<acc_t>::blendv(vninf, d * vb, xv > vninf));
            const Vec<acc_t> ed = e * d;
            v0 = v0 + e;
            v1 = v1 + ed;
            v2 = at::vec::fmadd(ed, d, v2);
          }
          for (; c < n; ++c) {
            const acc_t xv = xa[c];
            if (!(xv > kNegInf<acc_t>)) continue;
            const acc_t d = xv - mx, e = std::exp(beta * d);
            s0 += e;
            s1 += e * d;
            s2 += e * d * d;
          }
        }
        auto sum = [](const Vec<acc_t>& v) {
          return at::vec::vec_reduce_all<acc_t>(std::plus<Vec<acc_t>>(), v);
        };
        const double S0 = static_cast<double>(s0 + sum(v0));
        const double S1 = static_cast<double>(s1 + sum(v1));
        const double S2 = static_cast<double>(s2 + sum(v2));
        const double mean_d = S1 / S0;
        const double x_y = to_double(xr[tp[i]]);
        // NLL = lse(beta x) - beta x_y = beta*mx + log S0 - beta x_y
        nll_p[i] = beta_d * (static_cast<double>(mx) - x_y) + std::log(S0);
        d1_p[i] = static_cast<double>(mx) + mean_d - x_y;
        d2_p[i] = std::max(0.0, S2 / S0 - mean_d * mean_d);
      }
    });
  });
  at::Tensor result = at::empty({4}, logits.options().dtype(at::kDouble));
  double* r = result.data_ptr<double>();
  const double* pr = per_row.const_data_ptr<double>();
  for (int k = 0; k < 3; ++k) r[k] = deterministic_sum(pr + k * rows, rows);
  r[3] = static_cast<double>(rows);
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(softcal, CPU, m) {
  m.impl("tsce_fwd", &tsce_fwd_cpu);
  m.impl("tsce_bwd", &tsce_bwd_cpu);
  m.impl("tsce_fused", &tsce_fused_cpu);
  m.impl("tsce_fused_", &tsce_fused_inplace_cpu);
  m.impl("scale_rows_", &scale_rows_cpu);
  m.impl("softmax_fwd", &softmax_fwd_cpu);
  m.impl("softmax_bwd", &softmax_bwd_cpu);
  m.impl("temperature_stats", &temperature_stats_cpu);
}

}  // namespace softcal
