// softcal CPU: softmax_fwd and softmax_bwd, softmax / log_softmax of x / T along any dim
// (docs/design.md §1; checks in csrc/checks.h). x is viewed as (outer, C, inner), contiguous:
//   forward   y = softmax(beta x) = exp(beta (x - m) - ls), exact at the maximum (§2); float64
//             rows of C <= 2048: exp(beta (x - m)) / S (double_softmax_row)
//   backward  softmax: dz = y (g - sum g y);  log_softmax: dz = g - y sum g;  dx = beta dz,
//             dL/dT = -(1/T) sum dz log y, summed in double (§2)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "common.h"
#include "cpu/host.h"
#include "cpu/rows.h"
#include "cpu/vec.h"

namespace softcal {
namespace cpu {
namespace {

// softmax(beta x) of one float64 row of C <= kChunk elements: e = exp(beta (x - m)) written to
// out with its sum S, then out = e / S (two roundings after the exp; the form exp(beta (x - m)
// - ls) of the other dtypes adds the rounding of (beta (x - m) - ls), large where p is tiny).
// NaN for a row with NaN/+inf or entirely -inf (as torch.softmax).
inline void double_softmax_row(const double* x, double* out, int64_t C, double beta) {
  constexpr int64_t V = Vec<double>::size();
  const double m = chunk_max(x, C);
  if (!std::isfinite(m)) {
    std::fill(out, out + C, kNaN<double>);
    return;
  }
  const Vec<double> vm(m), vb(beta);
  Vec<double> s(0.0);
  int64_t c = 0;
  for (; c + V <= C; c += V) {
    const Vec<double> e = vexp((Vec<double>::loadu(x + c) - vm) * vb);
    e.store(out + c);
    s = s + e;
  }
  if (c < C) {
    const Vec<double> e = vexp((load_tail(x + c, C - c).masked - vm) * vb);  // 0 past C
    e.store(out + c, C - c);
    s = s + e;
  }
  const Vec<double> vs(hsum(s));
  for (c = 0; c + V <= C; c += V) (Vec<double>::loadu(out + c) / vs).store(out + c);
  if (c < C) (Vec<double>::loadu(out + c, C - c) / vs).store(out + c, C - c);
}

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
      if constexpr (std::is_same_v<scalar_t, double>) {
        if (!log && C <= kChunk) {  // float64 softmax of a row that fits a chunk: one exp each
          double_softmax_row(xr, orow, C, beta_d);
          continue;
        }
      }
      const auto st = row_stats<scalar_t, acc_t>(xr, C, beta, nullptr, false, xbuf.data());
      // NaN for a row with NaN/+inf or entirely -inf (as torch.softmax)
      const bool ok = st.has_softmax();
      // z - lse = beta (x - m) - ls: exactly -ls at the maximum
      const Vec<acc_t> vb(beta), vm(ok ? st.m : acc_t(0)), vl(ok ? -st.ls() : acc_t(0));
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int64_t n = std::min(kChunk, C - c0);
        const acc_t* xa = as_acc(xr + c0, n, xbuf.data());
        // float/double: written in place (store_from_acc then copies nothing)
        acc_t* oa;
        if constexpr (std::is_same_v<scalar_t, acc_t>)
          oa = orow + c0;
        else
          oa = obuf.data();
        int64_t c = 0;
        for (; c + V <= n; c += V) {
          const Vec<acc_t> z = at::vec::fmadd(Vec<acc_t>::loadu(xa + c) - vm, vb, vl);
          (log ? z : vexp(z)).store(oa + c);
        }
        if (c < n) {
          const Vec<acc_t> z = at::vec::fmadd(Vec<acc_t>::loadu(xa + c, n - c) - vm, vb, vl);
          (log ? z : vexp(z)).store(oa + c, n - c);
        }
        if (!ok) std::fill(oa, oa + n, kNaN<acc_t>);
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
    acc_t m[J], s[J], n1[J], ls[J];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o = b / jblocks, j0 = (b % jblocks) * J, nj = std::min(J, inner - j0);
      const scalar_t* xb = x + o * C * inner + j0;
      scalar_t* ob = out + o * C * inner + j0;
      for (int64_t j = 0; j < nj; ++j) {
        m[j] = kNegInf<acc_t>;
        s[j] = 0;
        n1[j] = 0;
      }
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = 0; j < nj; ++j) {
          const acc_t v = static_cast<acc_t>(xb[c * inner + j]);
          m[j] = (std::isnan(v) || v > m[j]) ? v : m[j];
        }
      // exps relative to the max, the exact ones (at the max) counted apart (see RowStats)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = 0; j < nj; ++j) {
          const acc_t d = beta * (static_cast<acc_t>(xb[c * inner + j]) - m[j]);
          if (d == 0)
            n1[j] += 1;
          else
            s[j] += std::exp(d);
        }
      for (int64_t j = 0; j < nj; ++j) {
        const bool bad = std::isnan(m[j]) || std::isinf(m[j]);
        ls[j] = bad ? kNaN<acc_t> : std::log1p((n1[j] - 1) + s[j]);
      }
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = 0; j < nj; ++j) {
          const acc_t z = beta * (static_cast<acc_t>(xb[c * inner + j]) - m[j]) - ls[j];
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
  dim = checks::softmax_fwd(Backend::kCpu, log, x_in, temperature_t, temperature, dim);
  const double T = checks::host_temperature(softmax_op(log, false), temperature_t, temperature);
  const at::Tensor x = (x_in.dim() == 0 ? x_in.reshape({1}) : x_in).contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x_in.dim() == 0) out = out.reshape({});
  if (x.numel() == 0) return out;
  int64_t outer, C, inner;
  dims_of(x, dim, outer, C, inner);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_fwd_cpu", [&] {
        if (inner == 1) {
          softmax_rows(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), outer, C, 1.0 / T,
                       log);
        } else {
          softmax_strided(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), outer, C, inner,
                          1.0 / T, log);
        }
      });
  return out;
}

// Backward of softmax / log_softmax, per slice (docs/design.md §1):
//   softmax:     dz = y * (g - sum(g y));     log_softmax: dz = g - y * sum(g), y = exp(o)
//   dx = beta * dz;  dT contribution -(1/T) * sum dz * log y  (terms with y == 0 skipped).
std::tuple<at::Tensor, at::Tensor> softmax_bwd_cpu(const at::Tensor& grad_out_in,
                                                   const at::Tensor& out_in,
                                                   const std::optional<at::Tensor>& temperature_t,
                                                   double temperature, int64_t dim, bool log,
                                                   bool need_temperature_grad) {
  dim =
      checks::softmax_bwd(Backend::kCpu, log, grad_out_in, out_in, temperature_t, temperature, dim);
  const double T = checks::host_temperature(softmax_op(log, true), temperature_t, temperature);
  const at::Tensor out = (out_in.dim() == 0 ? out_in.reshape({1}) : out_in).contiguous();
  const at::Tensor g = grad_out_in.reshape(out.sizes()).to(out.scalar_type()).contiguous();
  at::Tensor grad_x = at::empty_like(out, at::MemoryFormat::Contiguous);
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  const auto t_dtype = temp_grad_type(temperature_t, out.scalar_type());
  int64_t outer, C, inner;
  dims_of(out, dim, outer, C, inner);
  const int64_t slices = outer * inner;
  const auto acc_st = acc_type(out.scalar_type());
  at::Tensor t_rows = at::zeros({need_t ? slices : 0}, out.options().dtype(acc_st));
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, out.scalar_type(), "softmax_bwd_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const acc_t beta = static_cast<acc_t>(1.0 / T);
          const scalar_t* op_ = out.const_data_ptr<scalar_t>();
          const scalar_t* gp = g.const_data_ptr<scalar_t>();
          scalar_t* dx = grad_x.data_ptr<scalar_t>();
          acc_t* tr = need_t ? t_rows.data_ptr<acc_t>() : nullptr;
          at::parallel_for(0, slices, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)),
                           [&](int64_t s0, int64_t s1) {
                             for (int64_t sl = s0; sl < s1; ++sl) {
                               const int64_t o = sl / inner, j = sl % inner;
                               const int64_t base = o * C * inner + j;
                               acc_t dot = 0;
                               double r =
                                   0;  // E_y[log y], the centre of the T-gradient sum (need_t only)
                               for (int64_t c = 0; c < C; ++c) {
                                 const acc_t gv = static_cast<acc_t>(gp[base + c * inner]);
                                 const acc_t ov = static_cast<acc_t>(op_[base + c * inner]);
                                 dot += log ? gv : gv * ov;
                                 if (tr != nullptr && (log ? ov > kNegInf<acc_t> : ov > 0)) {
                                   const double yd = log ? std::exp(double(ov)) : double(ov);
                                   r += yd * (log ? double(ov) : std::log(yd));
                                 }
                               }
                               // S = sum_c dz_c log y_c over the classes with y > 0 (finite log y),
                               // summed in double and centred on r (sum_c dz_c = 0): the rounding
                               // of dz then meets |log y - r|, the spread of the logits, not |log
                               // y|. Where classes are skipped (y == 0), their sum_c dz_c is not 0
                               // and the centring is undone exactly.
                               double S = 0, Snm = 0;
                               bool skipped = false;
                               for (int64_t c = 0; c < C; ++c) {
                                 const int64_t k = base + c * inner;
                                 const acc_t gv = static_cast<acc_t>(gp[k]);
                                 const acc_t ov = static_cast<acc_t>(op_[k]);
                                 const acc_t y = log ? std::exp(ov) : ov;
                                 const acc_t dz = log ? gv - y * dot : y * (gv - dot);
                                 dx[k] = static_cast<scalar_t>(beta * dz);
                                 if (tr == nullptr) continue;
                                 // log_softmax: every class with a finite output contributes (dz =
                                 // g there, not 0, however small y is); softmax: y == 0 gives dz ==
                                 // 0
                                 if (log ? ov > kNegInf<acc_t> : y > 0) {
                                   const double yd = log ? std::exp(double(ov)) : double(y);
                                   const double dzd = log ? double(gv) - yd * double(dot)
                                                          : yd * (double(gv) - double(dot));
                                   S += dzd * ((log ? double(ov) : std::log(yd)) - r);
                                   Snm += dzd;
                                 } else {
                                   skipped = true;
                                 }
                               }
                               if (skipped) S += r * Snm;
                               if (tr != nullptr) tr[sl] = static_cast<acc_t>(-S / T);
                             }
                           });
        });
  }
  at::Tensor grad_t = at::zeros({}, out.options().dtype(t_dtype));
  if (need_t) {
    grad_t.fill_(deterministic_sum(t_rows));
  }
  return {out_in.dim() == 0 ? grad_x.reshape({}) : grad_x, grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(softcal, CPU, m) {
  m.impl("softmax_fwd", &softmax_fwd_cpu);
  m.impl("softmax_bwd", &softmax_bwd_cpu);
}

}  // namespace cpu
}  // namespace softcal
