// softcal CPU: soft_target_fwd and soft_target_bwd, the cross-entropy against class-probability
// targets (schemas and contract in csrc/schemas.h, checks in csrc/checks.h; the CUDA kernels
// implement the same maths). docs/design.md §1 (maths, edge cases) and §2 (numerics):
//   q_c = (1 - eps) t_c + eps / C,  u_c = w_c q_c,  U = sum_c u_c
//   loss = sum_c u_c (lse - z_c) = beta sum_c u_c (m - x_c) + U ls     (one sign: no cancellation)
//   dL/dz_c = U p_c - u_c,  dL/dt_c = -g (1 - eps) w_c log p_c,  dL/dT = -(g / T) sum_c dz_c z_c
//   (summed shifted by beta m, as the cross-entropy's)
// Passes: the forward reads the logits and the target once and keeps [m, ls] and U per row;
// the backward reads each once and writes each requested gradient once. A chunk of kChunk
// elements is walked twice while it sits in L1 (its max, then the sums). The T-gradient's sums
// are in double (the precision policy). Per-row results summed in fixed blocks: the same bits
// for any thread count.
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
#include "cpu/host.h"
#include "cpu/vec.h"

namespace softcal {
namespace cpu {
namespace {

// Per-call constants.
template <typename acc_t>
struct SoftParams {
  int64_t C;
  acc_t beta;      // 1 / T
  acc_t a;         // 1 - eps
  acc_t b;         // eps / C
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
  wbuf = weights_in_acc<acc_t>(weight);
  p.w = wbuf.empty() ? nullptr : wbuf.data();
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
    u = Vec<acc_t>::blendv(
        Vec<acc_t>(0), u,
        Vec<acc_t>::arange(acc_t(0), acc_t(1)) < Vec<acc_t>(static_cast<acc_t>(k)));
  }
  return u;
}

// k <= V lanes of logits and targets: the logits' unused lanes -inf (out of the exps), the
// targets' zero.
template <typename acc_t>
inline void load_lanes(const acc_t* x, const acc_t* t, int64_t k, Vec<acc_t>& xv, Vec<acc_t>& tv) {
  if (k == Vec<acc_t>::size()) {
    xv = Vec<acc_t>::loadu(x);
    tv = Vec<acc_t>::loadu(t);
  } else {
    xv = load_tail(x, k).masked;
    tv = Vec<acc_t>::loadu(t, k);
  }
}

// The row state of the forward (the maths at the top of this file).
template <typename acc_t>
struct SoftRow {
  acc_t m;  // max_c x_c (NaN / +inf: no softmax)
  acc_t s;  // sum_c exp(beta (x_c - m))
  acc_t d;  // sum_{c: u_c != 0} u_c (m - x_c)
  acc_t U;  // sum_c u_c
};

// One read of a row of the logits and of the target (docs/design.md §2). A chunk of kChunk
// elements is walked twice while it sits in L1: its max first (the running state is rescaled
// when it grows), then the exps and the target sums relative to the running max.
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
      load_lanes(xa + i, ta + i, k, xv, tv);
      const Vec<acc_t> u = mass_of(tv, wc == nullptr ? nullptr : wc + i, k, va, vb);
      const Vec<acc_t> dx = xv - vm;
      vs = vs + vexp(dx * vbeta);
      vd = vd - Vec<acc_t>::blendv(vzero, u * dx, u != vzero);  // 0 log 0 = 0
      vU = vU + u;
    }
    r.s += hsum(vs);
    r.d += hsum(vd);
    r.U += hsum(vU);
  }
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_target_fwd_cpu(
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

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "soft_target_fwd_cpu", [&] {
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
              const SoftRow<acc_t> r =
                  soft_row(p, x + i * xs, t + i * ts, xbuf.data(), tbuf.data());
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_target_bwd_cpu(
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
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, logits.scalar_type(), "soft_target_bwd_cpu", [&] {
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
                // the T-gradient's sums, in double: over the live classes of dz_c (z_c - beta m)
                // (shifted by beta m, not lse: the rounding of sum_c dz_c = 0 is not multiplied by
                // ls), over the masked ones of dz_c
                DoubleSum<acc_t> t_live, t_masked;
                for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
                  const int64_t n = std::min(kChunk, C - c0);
                  const acc_t* xa = as_acc(xr + c0, n, xbuf.data());
                  const acc_t* ta = as_acc(tr + c0, n, tbuf.data());
                  const acc_t* wc = p.w == nullptr ? nullptr : p.w + c0;
                  for (int64_t j = 0; j < n; j += V) {
                    const int64_t k = std::min(V, n - j);
                    Vec<acc_t> xv, tv;
                    load_lanes(xa + j, ta + j, k, xv, tv);
                    const Vec<acc_t> zm =
                        (xv - vm) * vbeta;  // z - beta m: exactly 0 at the row max
                    const Vec<acc_t> logp = zm - vls;
                    const Vec<acc_t> pr = vexp(logp);
                    if (gxr != nullptr || gt_p != nullptr) {
                      const Vec<acc_t> u = mass_of(tv, wc == nullptr ? nullptr : wc + j, k, va, vb);
                      const Vec<acc_t> dz = vU * pr - u;
                      if (gxr != nullptr) {
                        const Vec<acc_t> gv = vbg * dz;
                        if (k == V)
                          gv.store(gxbuf.data() + j);
                        else
                          gv.store(gxbuf.data() + j, k);
                      }
                      if (gt_p != nullptr) {
                        const Vec<acc_t> live = xv > vninf;  // masked (and unused) lanes: t_masked
                        t_live.add(Vec<acc_t>::blendv(vzero, dz * zm, live));
                        t_masked.add(Vec<acc_t>::blendv(dz, vzero, live));
                      }
                    }
                    if (gtr != nullptr) {
                      Vec<acc_t> coef = vga;  // g (1 - eps) w_c
                      if (wc != nullptr)
                        coef = coef *
                               (k == V ? Vec<acc_t>::loadu(wc + j) : Vec<acc_t>::loadu(wc + j, k));
                      const Vec<acc_t> gv =
                          Vec<acc_t>::blendv(vzero, vzero - coef * logp, coef != vzero);
                      if (k == V)
                        gv.store(gtbuf.data() + j);
                      else
                        gv.store(gtbuf.data() + j, k);
                    }
                  }
                  if (gxr != nullptr) store_from_acc(gxbuf.data(), gxr + c0, n);
                  if (gtr != nullptr) store_from_acc(gtbuf.data(), gtr + c0, n);
                }
                if (gt_p != nullptr) {
                  // sum_c dz_c z_c = sum_live dz_c (z_c - beta m) - beta m sum_masked dz_c (§2)
                  const double bm = static_cast<double>(p.beta) * static_cast<double>(m);
                  gt_p[i] = static_cast<acc_t>(-static_cast<double>(bg) *
                                               (t_live.sum() - bm * t_masked.sum()));
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
  m.impl("soft_target_fwd", &soft_target_fwd_cpu);
  m.impl("soft_target_bwd", &soft_target_bwd_cpu);
}

}  // namespace cpu
}  // namespace softcal
