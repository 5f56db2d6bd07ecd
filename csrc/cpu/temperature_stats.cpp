// softcal CPU: temperature_stats, the statistics for fitting a temperature (docs/design.md §1:
// at beta = 1/T, summed over rows in float64, [sum NLL, sum (E_p[x] - x_y), sum Var_p[x], rows]),
// and scale_rows_ (the fused backward's rescaling of a stored gradient). Checks in csrc/checks.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "common.h"
#include "cpu/host.h"
#include "cpu/vec.h"

namespace softcal {
namespace cpu {
namespace {

void scale_rows_cpu(const at::Tensor& grad, const at::Tensor& scale) {
  checks::scale_rows(Backend::kCpu, grad, scale);
  const int64_t rows = grad.size(0), C = grad.size(1);
  if (scale.dim() == 0) {
    const double s = scale.item<double>();
    if (s == 1.0) return;
    grad.mul_(s);
    return;
  }
  const at::Tensor s = scale.to(at::kDouble);
  const double* sp = s.const_data_ptr<double>();
  const int64_t ss = s.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_rows_cpu", [&] {
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
              acc_t* a =
                  const_cast<acc_t*>(as_acc(gr, n, buf.data()));  // gr itself for float/double
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
// Temperature statistics: [sum NLL, sum (E_p[x] - x_y), sum Var_p[x], rows] at beta, float64.
// Per row: the max is found first (the row then sits in cache), then one walk accumulates
// sum e, sum e d, sum e d^2 with d = x - max (centred, so the variance does not cancel).
// ------------------------------------------------------------------------------------------

at::Tensor temperature_stats_cpu(const at::Tensor& logits, const at::Tensor& target,
                                 double beta_d) {
  const char* op = op_name(Op::kTemperatureStats);
  checks::temperature_stats(Backend::kCpu, logits, target, beta_d);
  const int64_t rows = logits.size(0), C = logits.size(1);
  const at::Tensor tgt = target.contiguous();
  const int64_t* tp = tgt.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < C, op, ": target[", i, "] = ", tp[i], " is out of range for ",
                C, " classes");
  at::Tensor per_row = at::empty({3, rows}, logits.options().dtype(at::kDouble));
  const int64_t row_stride = logits.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "temperature_stats_cpu", [&] {
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
            const Vec<acc_t> vm(mx), vb(beta), vninf(kNegInf<acc_t>), vzero(0), vone(1);
            Vec<acc_t> v0(0), v1(0), v2(0), vn(0);
            // one vector of the row: -inf lanes (masked tail lanes among them) add nothing
            auto add = [&](const Vec<acc_t>& xv) __attribute__((always_inline)) {
              const Vec<acc_t> live = xv != vninf;
              const Vec<acc_t> d = Vec<acc_t>::blendv(vzero, xv - vm, live);
              const Vec<acc_t> e = vexp(Vec<acc_t>::blendv(vninf, d * vb, live));
              const Vec<acc_t> ed = e * d;
              const Vec<acc_t> at_max = d == vzero;  // e == 1 exactly: counted apart (§2)
              v0 = v0 + Vec<acc_t>::blendv(e, vzero, at_max);
              vn = vn + Vec<acc_t>::blendv(vzero, vone, at_max & live);
              v1 = v1 + ed;
              v2 = at::vec::fmadd(ed, d, v2);
            };
            for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
              const int64_t n = std::min(kChunk, C - c0);
              const acc_t* xa = as_acc(xr + c0, n, buf.data());
              int64_t c = 0;
              for (; c + V <= n; c += V) add(Vec<acc_t>::loadu(xa + c));
              if (c < n) add(load_tail(xa + c, n - c).masked);
            }
            // S0 = n1 + rest: log S0 = log1p(n1 - 1 + rest) keeps the digits of a confident row
            const double rest = static_cast<double>(hsum(v0));
            const double N1 = static_cast<double>(hsum(vn));
            const double S0 = N1 + rest;
            const double S1 = static_cast<double>(hsum(v1));
            const double S2 = static_cast<double>(hsum(v2));
            const double mean_d = S1 / S0;
            const double x_y = to_double(xr[tp[i]]);
            // NLL = lse(beta x) - beta x_y = beta*mx + log S0 - beta x_y
            nll_p[i] = beta_d * (static_cast<double>(mx) - x_y) + std::log1p((N1 - 1) + rest);
            d1_p[i] = static_cast<double>(mx) + mean_d - x_y;
            const double var = S2 / S0 - mean_d * mean_d;
            d2_p[i] = var < 0 ? 0.0 : var;  // NaN stays NaN
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
  m.impl("scale_rows_", &scale_rows_cpu);
  m.impl("temperature_stats", &temperature_stats_cpu);
}

}  // namespace cpu
}  // namespace softcal
