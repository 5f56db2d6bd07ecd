// softcal CPU: shard_stats, shard_grad and shard_grad_, the vocabulary-parallel pieces (schemas
// and contracts in csrc/schemas.h, checks in csrc/checks.h). A rank holds the logits of the
// classes [off, off + C_local); softcal.distributed merges the per-row statistics of every slice
// into the loss (one all-reduce of the row maxima, one of the packed sums), then each rank writes
// its slice of the gradient from the global [M, LS]: O(rows) communication (docs/design.md §1).
//   stats  [m, ls, d, xy]: m = max x, ls = log sum exp(beta (x - m)), d = sum w_c (m - x_c)
//   grad   beta g (A p_c - cw w_c - ty [c == y]),  p_c = exp(beta (x_c - M) - LS)
// Numerics as the cross-entropy's (§2): the max before any scaling, d >= 0, expm1 at the target,
// the T-gradient's sums in double. Passes: stats reads a row twice (its max, then the sums; the
// second read from L1/L2, in chunks of kChunk); grad reads it once and writes it once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/host.h"
#include "cpu/vec.h"

namespace softcal {
namespace cpu {
namespace {

constexpr int64_t kIgnored = -2;    // local target of an ignored row
constexpr int64_t kElsewhere = -1;  // the target is in another rank's slice

inline int64_t local_target(int64_t y, int64_t ignore_index, int64_t off, int64_t C) {
  if (y == ignore_index) return kIgnored;
  const int64_t l = y - off;
  return (l >= 0 && l < C) ? l : kElsewhere;
}

at::Tensor shard_stats_cpu(const at::Tensor& logits, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& temperature_t, double temperature,
                           int64_t class_offset, int64_t ignore_index, bool smoothing) {
  checks::shard_stats(Backend::kCpu, logits, target, weight, temperature_t, temperature,
                      class_offset);
  const double T = checks::host_temperature(Op::kShardStats, temperature_t, temperature);
  const int64_t rows = logits.size(0), C = logits.size(1);
  const at::ScalarType acc_st = acc_type(logits.scalar_type());
  at::Tensor stats = at::empty({rows, 4}, logits.options().dtype(acc_st));
  const at::Tensor tgt = target.contiguous();
  const int64_t* tp = tgt.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "shard_stats_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        constexpr int64_t V = Vec<acc_t>::size();
        const std::vector<acc_t> w = weights_in_acc<acc_t>(weight);
        const acc_t* wp = w.empty() ? nullptr : w.data();
        const acc_t beta = static_cast<acc_t>(1.0 / T);
        const scalar_t* x = logits.const_data_ptr<scalar_t>();
        const int64_t rs = logits.stride(0);
        acc_t* out = stats.data_ptr<acc_t>();
        at::parallel_for(0, rows, row_grain(C), [&](int64_t r0, int64_t r1) {
          std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk);
          for (int64_t i = r0; i < r1; ++i) {
            acc_t* o = out + 4 * i;
            const int64_t y = local_target(tp[i], ignore_index, class_offset, C);
            if (y == kIgnored) {
              o[0] = o[1] = o[2] = o[3] = acc_t(0);
              continue;
            }
            const scalar_t* xr = x + i * rs;
            o[3] = y >= 0 ? static_cast<acc_t>(xr[y]) : acc_t(0);
            acc_t m = kNegInf<acc_t>;
            for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
              const int64_t n = std::min(kChunk, C - c0);
              const acc_t cm = chunk_max(as_acc(xr + c0, n, buf.data()), n);
              m = (std::isnan(cm) || cm > m) ? cm : m;
            }
            if (std::isnan(m)) {
              o[0] = o[1] = o[2] = m;
              continue;
            }
            if (m == kNegInf<acc_t>) {  // no softmax mass in this slice; an infinite smoothing sum
              o[0] = o[1] = kNegInf<acc_t>;
              o[2] = smoothing && C > 0 ? std::numeric_limits<acc_t>::infinity() : acc_t(0);
              continue;
            }
            const Vec<acc_t> vm(m), vb(beta);
            Vec<acc_t> vs(0), vd(0);
            acc_t ss = 0, sd = 0;
            for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
              const int64_t n = std::min(kChunk, C - c0);
              const acc_t* xa = as_acc(xr + c0, n, buf.data());
              const acc_t* wc = wp ? wp + c0 : nullptr;
              int64_t k = 0;
              for (; k + V <= n; k += V) {
                const Vec<acc_t> xv = Vec<acc_t>::loadu(xa + k);
                vs = vs + vexp((xv - vm) * vb);
                if (smoothing) vd = vd + (wc ? (vm - xv) * Vec<acc_t>::loadu(wc + k) : vm - xv);
              }
              for (; k < n; ++k) {
                ss += std::exp((xa[k] - m) * beta);
                if (smoothing) sd += wc ? (m - xa[k]) * wc[k] : m - xa[k];
              }
            }
            o[0] = m;
            o[1] = std::log(hsum(vs) + ss);
            o[2] = smoothing ? hsum(vd) + sd : acc_t(0);
          }
        });
      });
  return stats;
}

// Gradient of the slice's rows; grad may alias the logits (in-place: each element is read
// before it is written, the target's value is read before the row).
template <typename scalar_t>
void shard_grad_rows(const at::Tensor& logits, scalar_t* grad, const int64_t* tp,
                     const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                     const at::Tensor& coef, double T, double smooth_coef, int64_t off,
                     int64_t ignore_index, at::opmath_type<scalar_t>* t_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t V = Vec<acc_t>::size();
  const int64_t rows = logits.size(0), C = logits.size(1);
  const std::vector<acc_t> w = weights_in_acc<acc_t>(weight);
  const acc_t* wp = w.empty() ? nullptr : w.data();
  const acc_t beta = static_cast<acc_t>(1.0 / T);
  const acc_t cw = static_cast<acc_t>(smooth_coef);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const int64_t rs = logits.stride(0);
  const acc_t* L = lse.const_data_ptr<acc_t>();
  const acc_t* K = coef.const_data_ptr<acc_t>();
  at::parallel_for(0, rows, row_grain(C), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> xbuf(kChunk), gbuf(kChunk);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t y = local_target(tp[i], ignore_index, off, C);
      scalar_t* gr = grad ? grad + i * C : nullptr;
      if (y == kIgnored) {
        if (gr) std::fill(gr, gr + C, scalar_t(0));
        if (t_rows) t_rows[2 * i] = t_rows[2 * i + 1] = acc_t(0);
        continue;
      }
      const scalar_t* xr = x + i * rs;
      const acc_t M = L[2 * i], LS = L[2 * i + 1];
      const acc_t g = K[3 * i], A = K[3 * i + 1], ty = K[3 * i + 2];
      const acc_t bg = beta * g;
      const acc_t x_y = y >= 0 ? static_cast<acc_t>(xr[y]) : acc_t(0);
      const Vec<acc_t> vM(M), vb(beta), vLS(LS), vA(A), vcw(cw), vbg(bg), vninf(kNegInf<acc_t>),
          vzero(0);
      DoubleSum<acc_t> va, vbm;  // the T-gradient's sums, in double
      double sa = 0, sb = 0;     // and those of the scalar tails
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int64_t n = std::min(kChunk, C - c0);
        const acc_t* xa = as_acc(xr + c0, n, xbuf.data());
        acc_t* ga = gbuf.data();
        const acc_t* wc = wp ? wp + c0 : nullptr;
        int64_t k = 0;
        for (; k + V <= n; k += V) {
          const Vec<acc_t> xv = Vec<acc_t>::loadu(xa + k);
          const Vec<acc_t> lp = (xv - vM) * vb - vLS;
          const Vec<acc_t> dz =
              wc ? vA * vexp(lp) - vcw * Vec<acc_t>::loadu(wc + k) : vA * vexp(lp) - vcw;
          (vbg * dz).store(ga + k);
          if (t_rows) {
            va.add(Vec<acc_t>::blendv(vzero, dz * lp, xv > vninf));
            vbm.add(Vec<acc_t>::blendv(vzero, dz, xv == vninf));
          }
        }
        for (; k < n; ++k) {
          const acc_t lp = (xa[k] - M) * beta - LS;
          const acc_t dz = A * std::exp(lp) - cw * (wc ? wc[k] : acc_t(1));
          ga[k] = bg * dz;
          if (xa[k] > kNegInf<acc_t>)
            sa += dz * lp;
          else
            sb += dz;
        }
        if (gr) store_from_acc(ga, gr + c0, n);
      }
      double ta = 0, tb = 0;
      if (t_rows) {
        ta = va.sum() + sa;
        tb = vbm.sum() + sb;
      }
      if (y >= 0) {  // the target's element, in acc precision (replaces the generic one)
        const acc_t lp = (x_y - M) * beta - LS;
        const acc_t wy = wp ? wp[y] : acc_t(1);
        const acc_t generic = A * std::exp(lp) - cw * wy;
        const acc_t dz = ty * std::expm1(lp) + (A - ty) * std::exp(lp) - cw * wy;
        if (gr) gr[y] = static_cast<scalar_t>(bg * dz);
        if (t_rows) {
          if (x_y > kNegInf<acc_t>)
            ta += (dz - generic) * lp;
          else
            tb += dz - generic;
        }
      }
      if (t_rows) {
        t_rows[2 * i] = static_cast<acc_t>(ta);
        t_rows[2 * i + 1] = static_cast<acc_t>(tb);
      }
    }
  });
}

at::Tensor shard_grad_impl(const at::Tensor& logits, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                           const at::Tensor& coef, const std::optional<at::Tensor>& temperature_t,
                           double temperature, double smooth_coef, int64_t class_offset,
                           int64_t ignore_index, at::Tensor* grad, bool need_t, Op op) {
  checks::shard_grad(Backend::kCpu, op, logits, target, weight, lse, coef, temperature_t,
                     temperature, smooth_coef, class_offset);
  const double T = checks::host_temperature(op, temperature_t, temperature);
  const int64_t rows = logits.size(0);
  const at::ScalarType acc_st = acc_type(logits.scalar_type());
  at::Tensor t_rows = at::zeros({rows, 2}, logits.options().dtype(acc_st));
  if (rows == 0 || logits.size(1) == 0 || (grad == nullptr && !need_t)) return t_rows;
  const at::Tensor tgt = target.contiguous(), lse_c = lse.contiguous(), coef_c = coef.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "shard_grad_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        shard_grad_rows<scalar_t>(logits, grad ? grad->data_ptr<scalar_t>() : nullptr,
                                  tgt.const_data_ptr<int64_t>(), weight, lse_c, coef_c, T,
                                  smooth_coef, class_offset, ignore_index,
                                  need_t ? t_rows.data_ptr<acc_t>() : nullptr);
      });
  return t_rows;
}

std::tuple<at::Tensor, at::Tensor> shard_grad_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const at::Tensor& lse, const at::Tensor& coef, const std::optional<at::Tensor>& temperature_t,
    double temperature, double smooth_coef, int64_t class_offset, int64_t ignore_index,
    bool need_logits_grad, bool need_temperature_grad) {
  at::Tensor grad = need_logits_grad ? new_grad_buffer(logits) : logits.new_empty({0});
  at::Tensor t_rows = shard_grad_impl(
      logits, target, weight, lse, coef, temperature_t, temperature, smooth_coef, class_offset,
      ignore_index, need_logits_grad ? &grad : nullptr, need_temperature_grad, Op::kShardGrad);
  return {grad, t_rows};
}

at::Tensor shard_grad_inplace_cpu(const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& lse,
                                  const at::Tensor& coef,
                                  const std::optional<at::Tensor>& temperature_t,
                                  double temperature, double smooth_coef, int64_t class_offset,
                                  int64_t ignore_index, bool need_temperature_grad) {
  at::Tensor grad = logits;
  return shard_grad_impl(logits, target, weight, lse, coef, temperature_t, temperature, smooth_coef,
                         class_offset, ignore_index, &grad, need_temperature_grad,
                         Op::kShardGradInplace);
}

}  // namespace

TORCH_LIBRARY_IMPL(softcal, CPU, m) {
  m.impl("shard_stats", &shard_stats_cpu);
  m.impl("shard_grad", &shard_grad_cpu);
  m.impl("shard_grad_", &shard_grad_inplace_cpu);
}

}  // namespace cpu
}  // namespace softcal
