// softcal CPU kernels: cross-entropy against class-probability (soft) targets, forward and
// backward (ops soft_target_fwd / soft_target_bwd, schemas in csrc/schemas.h). The CUDA kernels in
// csrc/cuda/tsce_soft.cu implement the same maths.
//
// ============================ The maths ============================
// One row: logits x_c (c = 0..C-1), floating target t_c, temperature T > 0, beta = 1/T,
// smoothing eps, class weights w_c (all 1 without weights), upstream gradient g of the row
// (already divided by the number of rows for "mean").
//
//   z_c = beta x_c,   q_c = (1 - eps) t_c + eps / C,   u_c = w_c q_c,   U = sum_c u_c
//   lse = log sum_c exp(z_c),   log p_c = z_c - lse
//   loss = sum_c u_c (lse - z_c) = -sum_c w_c q_c log p_c
//
// which is F.cross_entropy with probability targets (LossNLL.cpp: the smoothed target, times the
// weight, times -log_softmax, summed over classes); "mean" divides the sum of the row losses by
// the number of rows (not by a sum of weights), as PyTorch does for probability targets.
//
// Evaluated with an online max in units of the raw logits: m = max_c x_c,
// ls = log sum_c exp(beta (x_c - m)), so that lse = beta m + ls and
//   sum_c u_c (lse - z_c) = beta sum_c u_c (m - x_c) + U ls
// (terms of one sign when u >= 0, never the difference of two large numbers; |x| ~ 1e4 keeps its
// digits), and log p_c = beta (x_c - m) - ls, which is exactly -ls at the row maximum (never
// formed as beta x - lse).
//
// Gradients:
//   dL/dz_c = U p_c - u_c,       dL/dx_c = beta g (U p_c - u_c)
//   dL/dt_c = g (1 - eps) w_c (lse - z_c) = -g (1 - eps) w_c log p_c        (as PyTorch)
//   dL/dT   = -(g / T) sum_c dL/dz_c z_c
//           = -(g / T) ( sum_{c unmasked} dz_c (z_c - lse) - lse sum_{c masked} dz_c )
// using sum_c dz_c = U sum_c p_c - U = 0; masked logits (x_c = -inf) have a z that does not
// depend on T and contribute nothing (as in csrc/common.h), which the second form keeps exact.
//
// ====================== Edge cases (decided here) ======================
// * 0 log 0: a class with u_c == 0 contributes 0 to the loss, also at a masked logit
//   (x_c = -inf), where PyTorch computes 0 * -inf = NaN. 0 is the limit of u log p as u -> 0
//   (torch.special.xlogy's and KL divergence's convention), and it is what a user who masks a
//   vocabulary expects of a target that puts no mass there. Its logit gradient is 0
//   (p_c = 0, u_c = 0). The target gradient there is +inf times sign((1 - eps) w_c g), as
//   PyTorch (moving mass onto an impossible class makes the loss infinite); it is 0 where
//   (1 - eps) w_c == 0 (the loss does not depend on t_c; PyTorch gives NaN).
// * Mass on a masked logit (u_c > 0, x_c = -inf): loss +inf (as PyTorch); finite logit
//   gradients. With eps > 0 every class has mass, so any masked logit gives +inf.
// * A row without a softmax (every logit -inf, or a NaN / +inf logit): loss, gradients and lse
//   are NaN (PyTorch gives NaN).
// * Targets are used as given: not checked to be >= 0 or to sum to 1 (as PyTorch); the
//   formulas hold for any real t. A NaN target gives a NaN loss.
// * C == 0: every row loss is 0 (an empty sum).
//
// Passes over memory: forward one read of the logits and one of the target; backward one read of
// each and one write of each requested gradient. Per row the forward keeps [m, ls] (as cross_entropy_fwd)
// and U (the backward needs U before it writes the row's first gradient). Nothing of size N x C
// is allocated besides the gradients. at::parallel_for over rows; vector inner loops on
// at::vec::Vectorized; per-row results summed in fixed blocks (deterministic_sum): bitwise the
// same for any thread count. Offsets in int64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/cpu_common.h"

namespace softcal {
namespace {

using namespace ::softcal::cpu;

// Per-call constants.
template <typename acc_t>
struct SoftParams {
  int64_t C;
  acc_t beta;  // 1 / T
  acc_t a;     // 1 - eps
  acc_t b;     // eps / C
  const acc_t* w;  // class weights in acc, or nullptr
};

template <typename acc_t>
SoftParams<acc_t> soft_params(int64_t C, const std::optional<at::Tensor>& weight,
                              std::vector<acc_t>& wbuf, double T, double eps) {
  SoftParams<acc_t> p;
  p.C = C;
  p.beta = static_cast<acc_t>(1.0 / T);
  p.a = static_cast<acc_t>(1.0 - eps);
  p.b = C > 0 ? static_cast<acc_t>(eps / static_cast<double>(C)) : acc_t(0);
  p.w = nullptr;
  if (weight.has_value()) {
    const at::Tensor w = weight->contiguous();
    wbuf.resize(C);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "softcal_soft_weight", [&] {
      const scalar_t* wp = w.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) wbuf[c] = static_cast<acc_t>(to_double(wp[c]));
    });
    p.w = wbuf.data();
  }
  return p;
}

// Calls f(target_t{}) with target_t the target's element type: the logits' scalar_t, or float
// with float16/bfloat16 logits (checks::soft_target_fwd admits only these).
template <typename scalar_t, typename F>
inline void dispatch_target(at::ScalarType target_type, F&& f) {
  if constexpr (!std::is_same_v<scalar_t, float> &&
                std::is_same_v<at::opmath_type<scalar_t>, float>) {
    if (target_type == at::kFloat) return f(float{});
  }
  f(scalar_t{});
}

// u = w (a t + b) on the used lanes, 0 on the others.
template <typename acc_t>
inline Vec<acc_t> mass_of(const Vec<acc_t>& t, const acc_t* wc, int64_t k, const Vec<acc_t>& va,
                          const Vec<acc_t>& vb) {
  constexpr int64_t V = Vec<acc_t>::size();
  Vec<acc_t> u = at::vec::fmadd(t, va, vb);
  if (wc != nullptr) {
    u = u * (k == V ? Vec<acc_t>::loadu(wc) : Vec<acc_t>::loadu(wc, k));  // zero-filled past k
  } else if (k < V) {
    u = Vec<acc_t>::blendv(Vec<acc_t>(0), u,
                           Vec<acc_t>::arange(acc_t(0), acc_t(1)) < Vec<acc_t>(static_cast<acc_t>(k)));
  }
  return u;
}

// The row state of the forward (see the maths above).
template <typename acc_t>
struct SoftRow {
  acc_t m;   // max_c x_c (NaN / +inf: no softmax)
  acc_t s;   // sum_c exp(beta (x_c - m))
  acc_t d;   // sum_{c: u_c != 0} u_c (m - x_c)
  acc_t U;   // sum_c u_c
};

// One read of a row of the logits and of the target. A chunk of kChunk elements is walked twice
// while it sits in L1: its max first (the running state is rescaled when it grows), then the
// exps and the target sums relative to the running max.
template <typename scalar_t, typename target_t, typename acc_t>
inline SoftRow<acc_t> soft_row(const SoftParams<acc_t>& p, const scalar_t* x, const target_t* t,
                               acc_t* xbuf, acc_t* tbuf) {
  constexpr int64_t V = Vec<acc_t>::size();
  SoftRow<acc_t> r{kNegInf<acc_t>, 0, 0, 0};
  const Vec<acc_t> vbeta(p.beta), va(p.a), vb(p.b), vzero(0);
  for (int64_t c0 = 0; c0 < p.C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, p.C - c0);
    const acc_t* xa = as_acc(x + c0, n, xbuf);
    const acc_t* ta = as_acc(t + c0, n, tbuf);
    const acc_t* wc = p.w == nullptr ? nullptr : p.w + c0;
    const acc_t cm = chunk_max(xa, n);
    if (std::isnan(cm) || cm == std::numeric_limits<acc_t>::infinity()) {
      r.m = cm;  // no softmax: the caller gives NaN
      return r;
    }
    if (cm > r.m) {
      if (r.m > kNegInf<acc_t>) {
        r.s *= std::exp(p.beta * (r.m - cm));
        r.d += r.U * (cm - r.m);
      }
      r.m = cm;
    }
    // Relative to 0 while every logit so far is -inf: a mass there then makes d = +inf.
    const Vec<acc_t> vm(r.m > kNegInf<acc_t> ? r.m : acc_t(0));
    Vec<acc_t> vs(0), vd(0), vU(0);
    for (int64_t i = 0; i < n; i += V) {
      const int64_t k = std::min(V, n - i);
      Vec<acc_t> xv, tv;
      if (k == V) {
        xv = Vec<acc_t>::loadu(xa + i);
        tv = Vec<acc_t>::loadu(ta + i);
      } else {
        xv = load_tail(xa + i, k).masked;
        tv = Vec<acc_t>::loadu(ta + i, k);
      }
      const Vec<acc_t> u = mass_of(tv, wc == nullptr ? nullptr : wc + i, k, va, vb);
      const Vec<acc_t> dx = xv - vm;
      vs = vs + vexp(dx * vbeta);
      vd = vd - Vec<acc_t>::blendv(vzero, u * dx, u != vzero);  // 0 log 0 = 0
      vU = vU + u;
    }
    auto sum = [](const Vec<acc_t>& v) {
      return at::vec::vec_reduce_all<acc_t>(std::plus<Vec<acc_t>>(), v);
    };
    r.s += sum(vs);
    r.d += sum(vd);
    r.U += sum(vU);
  }
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tsce_soft_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t reduction) {
  checks::soft_target_fwd(Backend::kCpu, logits, target, weight, temperature_t, temperature,
                          label_smoothing, reduction);
  const double T = checks::host_temperature(Op::kSoftTarget, temperature_t, temperature);
  const int64_t rows = logits.size(0), C = logits.size(1);
  const auto acc_st = acc_type(logits.scalar_type());
  at::Tensor lse = at::empty({rows, 2}, logits.options().dtype(acc_st));
  at::Tensor mass = at::empty({rows}, logits.options().dtype(acc_st));
  at::Tensor loss_rows = at::empty({rows}, logits.options().dtype(acc_st));
  const int64_t xs = logits.stride(0), ts = target.stride(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tsce_soft_fwd_cpu", [&] {
   dispatch_target<scalar_t>(target.scalar_type(), [&](auto target_tag) {
    using target_t = decltype(target_tag);
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> wbuf;
    const auto p = soft_params<acc_t>(C, weight, wbuf, T, label_smoothing);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const target_t* t = target.const_data_ptr<target_t>();
    acc_t* lse_p = lse.data_ptr<acc_t>();
    acc_t* mass_p = mass.data_ptr<acc_t>();
    acc_t* loss_p = loss_rows.data_ptr<acc_t>();
    at::parallel_for(0, rows, row_grain(2 * C), [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> xbuf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk);
      std::vector<acc_t> tbuf(std::is_same_v<target_t, acc_t> ? 0 : kChunk);
      for (int64_t i = r0; i < r1; ++i) {
        if (C == 0) {  // an empty sum
          lse_p[2 * i] = lse_p[2 * i + 1] = kNegInf<acc_t>;
          mass_p[i] = 0;
          loss_p[i] = 0;
          continue;
        }
        const SoftRow<acc_t> r = soft_row(p, x + i * xs, t + i * ts, xbuf.data(), tbuf.data());
        if (!std::isfinite(r.m)) {  // no softmax
          lse_p[2 * i] = lse_p[2 * i + 1] = kNaN<acc_t>;
          mass_p[i] = r.U;
          loss_p[i] = kNaN<acc_t>;
          continue;
        }
        const acc_t ls = std::log(r.s);
        lse_p[2 * i] = r.m;
        lse_p[2 * i + 1] = ls;
        mass_p[i] = r.U;
        loss_p[i] = p.beta * r.d + r.U * ls;
      }
    });
   });
  });

  at::Tensor loss;
  if (reduction == kNone) {
    loss = loss_rows;
  } else {
    double total = deterministic_sum(loss_rows);
    if (reduction == kMean) total /= static_cast<double>(rows);  // 0 / 0 = NaN for no rows
    loss = at::scalar_tensor(total, logits.options().dtype(acc_st));
  }
  return {loss, lse, mass};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tsce_soft_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& mass,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t reduction, bool need_logits_grad, bool need_target_grad, bool need_temperature_grad) {
  checks::soft_target_bwd(Backend::kCpu, grad_loss, logits, target, weight, lse, mass,
                          temperature_t, temperature, label_smoothing, reduction);
  const double T = checks::host_temperature(Op::kSoftTargetBwd, temperature_t, temperature);
  const int64_t rows = logits.size(0), C = logits.size(1);
  const auto acc_st = acc_type(logits.scalar_type());
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  at::Tensor grad_x = need_logits_grad ? new_grad_buffer(logits) : logits.new_empty({0});
  at::Tensor grad_tg = need_target_grad ? new_grad_buffer(target) : target.new_empty({0});
  at::Tensor gt_rows = at::zeros({need_t ? rows : 0}, logits.options().dtype(acc_st));
  // Upstream gradient per row, in acc.
  at::Tensor g_rows;
  double g_scalar = 0;
  if (reduction == kNone) {
    g_rows = grad_loss.to(acc_st);
  } else {
    g_scalar = grad_loss.item<double>();
    if (reduction == kMean) g_scalar /= static_cast<double>(rows);
  }
  const at::Tensor lse_c = lse.contiguous(), mass_c = mass.contiguous();
  const int64_t xs = logits.stride(0), ts = target.stride(0);

  if (rows > 0 && C > 0 && (need_logits_grad || need_target_grad || need_t)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tsce_soft_bwd_cpu", [&] {
     dispatch_target<scalar_t>(target.scalar_type(), [&](auto target_tag) {
      using target_t = decltype(target_tag);
      using acc_t = at::opmath_type<scalar_t>;
      constexpr int64_t V = Vec<acc_t>::size();
      std::vector<acc_t> wbuf;
      const auto p = soft_params<acc_t>(C, weight, wbuf, T, label_smoothing);
      const scalar_t* x = logits.const_data_ptr<scalar_t>();
      const target_t* t = target.const_data_ptr<target_t>();
      scalar_t* gx = need_logits_grad ? grad_x.data_ptr<scalar_t>() : nullptr;
      target_t* gtg = need_target_grad ? grad_tg.data_ptr<target_t>() : nullptr;
      const acc_t* lse_p = lse_c.const_data_ptr<acc_t>();
      const acc_t* mass_p = mass_c.const_data_ptr<acc_t>();
      acc_t* gt_p = need_t ? gt_rows.data_ptr<acc_t>() : nullptr;
      const acc_t* g_p = reduction == kNone ? g_rows.const_data_ptr<acc_t>() : nullptr;
      const int64_t g_stride = reduction == kNone ? g_rows.stride(0) : 0;
      at::parallel_for(0, rows, row_grain(2 * C), [&](int64_t r0, int64_t r1) {
        std::vector<acc_t> xbuf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk);
        std::vector<acc_t> tbuf(std::is_same_v<target_t, acc_t> ? 0 : kChunk);
        std::vector<acc_t> gxbuf(kChunk), gtbuf(kChunk);
        for (int64_t i = r0; i < r1; ++i) {
          const scalar_t* xr = x + i * xs;
          const target_t* tr = t + i * ts;
          scalar_t* gxr = gx == nullptr ? nullptr : gx + i * C;
          target_t* gtr = gtg == nullptr ? nullptr : gtg + i * C;
          const acc_t g = g_p == nullptr ? static_cast<acc_t>(g_scalar) : g_p[i * g_stride];
          const acc_t m = lse_p[2 * i], ls = lse_p[2 * i + 1], U = mass_p[i];
          if (!std::isfinite(m) || !std::isfinite(ls)) {  // no softmax: NaN
            if (gxr != nullptr) std::fill(gxr, gxr + C, static_cast<scalar_t>(kNaN<acc_t>));
            if (gtr != nullptr) std::fill(gtr, gtr + C, static_cast<target_t>(kNaN<acc_t>));
            if (gt_p != nullptr) gt_p[i] = kNaN<acc_t>;
            continue;
          }
          const acc_t bg = p.beta * g;
          const Vec<acc_t> vbeta(p.beta), vm(m), vls(ls), vU(U), va(p.a), vb(p.b), vbg(bg),
              vga(g * p.a), vzero(0), vninf(kNegInf<acc_t>);
          DoubleSum<acc_t> t1, t0;  // the T-gradient's sums, in double
          for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
            const int64_t n = std::min(kChunk, C - c0);
            const acc_t* xa = as_acc(xr + c0, n, xbuf.data());
            const acc_t* ta = as_acc(tr + c0, n, tbuf.data());
            const acc_t* wc = p.w == nullptr ? nullptr : p.w + c0;
            for (int64_t j = 0; j < n; j += V) {
              const int64_t k = std::min(V, n - j);
              Vec<acc_t> xv, tv;
              if (k == V) {
                xv = Vec<acc_t>::loadu(xa + j);
                tv = Vec<acc_t>::loadu(ta + j);
              } else {
                xv = load_tail(xa + j, k).masked;
                tv = Vec<acc_t>::loadu(ta + j, k);
              }
              const Vec<acc_t> logp = (xv - vm) * vbeta - vls;  // exact at the row max
              const Vec<acc_t> pr = vexp(logp);
              if (gxr != nullptr || gt_p != nullptr) {
                const Vec<acc_t> u = mass_of(tv, wc == nullptr ? nullptr : wc + j, k, va, vb);
                const Vec<acc_t> dz = vU * pr - u;
                if (gxr != nullptr) {
                  const Vec<acc_t> gv = vbg * dz;
                  if (k == V) gv.store(gxbuf.data() + j);
                  else gv.store(gxbuf.data() + j, k);
                }
                if (gt_p != nullptr) {
                  const Vec<acc_t> live = xv > vninf;  // masked (and unused) lanes: into t0
                  t1.add(Vec<acc_t>::blendv(vzero, dz * logp, live));
                  t0.add(Vec<acc_t>::blendv(dz, vzero, live));
                }
              }
              if (gtr != nullptr) {
                Vec<acc_t> coef = vga;  // g (1 - eps) w_c
                if (wc != nullptr) coef = coef * (k == V ? Vec<acc_t>::loadu(wc + j) : Vec<acc_t>::loadu(wc + j, k));
                const Vec<acc_t> gv = Vec<acc_t>::blendv(vzero, vzero - coef * logp, coef != vzero);
                if (k == V) gv.store(gtbuf.data() + j);
                else gv.store(gtbuf.data() + j, k);
              }
            }
            if (gxr != nullptr) store_from_acc(gxbuf.data(), gxr + c0, n);
            if (gtr != nullptr) store_from_acc(gtbuf.data(), gtr + c0, n);
          }
          if (gt_p != nullptr) {
            const double lse_v = static_cast<double>(p.beta) * m + ls;
            gt_p[i] = static_cast<acc_t>(-static_cast<double>(bg) * (t1.sum() - lse_v * t0.sum()));
          }
        }
      });
     });
    });
  }

  const auto t_dtype = temp_grad_type(temperature_t, logits.scalar_type());
  at::Tensor grad_temp = at::zeros({}, logits.options().dtype(t_dtype));
  if (need_t) grad_temp.fill_(deterministic_sum(gt_rows));
  return {grad_x, grad_tg, grad_temp};
}

}  // namespace

TORCH_LIBRARY_IMPL(softcal, CPU, m) {
  m.impl("soft_target_fwd", &tsce_soft_fwd_cpu);
  m.impl("soft_target_bwd", &tsce_soft_bwd_cpu);
}

}  // namespace softcal
