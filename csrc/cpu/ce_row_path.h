// softcal CPU kernels: the cross-entropy ROW PATH (docs/design.md §4): rows of any length in
// groups, the forward's statistics, the loss and the gradient of each row from the row terms of
// cpu/ce_row.h, with the call's compile-time variants (ZLoss, Softcap: common.h).
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
#include "cpu/ce_row.h"
#include "cpu/host.h"
#include "cpu/rows.h"
#include "cpu/vec.h"

namespace softcal {
namespace cpu {

// ------------------------------------------------------------------------------------------
// The row path (docs/design.md §4)
// ------------------------------------------------------------------------------------------

// Checks every target (the error names the first bad row and its value) and returns
// denom = sum over non-ignored rows of w[target]: in double, in row order within blocks of
// kReduceBlock rows, then over the blocks in order (the same bits for any thread count).
template <typename acc_t>
double check_targets_and_denom(const CEParams<acc_t>& p, int64_t rows, const char* op) {
  const int64_t blocks = (rows + kReduceBlock - 1) / kReduceBlock;
  std::vector<double> part(blocks, 0.0);
  std::vector<int64_t> bad(blocks, -1);
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double s = 0;
      const int64_t end = std::min(rows, (b + 1) * kReduceBlock);
      for (int64_t i = b * kReduceBlock; i < end; ++i) {
        const int64_t t = p.target[i];
        if (t == p.ignore_index) continue;
        if (t < 0 || t >= p.C) {
          bad[b] = i;
          break;
        }
        s += static_cast<double>(p.weight_of(t));
      }
      part[b] = s;
    }
  });
  double denom = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    if (bad[b] >= 0) {
      const int64_t i = bad[b], t = p.target[i];
      TORCH_CHECK(false, op, ": target[", i, "] = ", t, " is out of range for ", p.C,
                  " classes (ignore_index = ", p.ignore_index, ")");
    }
    denom += part[b];
  }
  return denom;
}

// The loss of a non-ignored row from its statistics and ls = log1p(st.arg()), and its [m, ls]
// (NaN without a softmax: a NaN or +inf logit, or every logit -inf).
template <ZLoss kZ, typename scalar_t, typename acc_t>
inline acc_t row_loss_of_stats(const CEParams<acc_t>& p, const scalar_t* x,
                               const RowStats<acc_t>& st, acc_t ls, int64_t y, acc_t* lse_out) {
  if (!st.has_softmax()) {
    lse_out[0] = lse_out[1] = kNaN<acc_t>;
    return kNaN<acc_t>;
  }
  lse_out[0] = st.m;
  lse_out[1] = ls;
  const acc_t nll = p.beta * (st.m - static_cast<acc_t>(x[y])) + ls;
  return row_loss<kZ, acc_t>(p, p.weight_of(y), nll, st.D, ls, p.beta * st.m + ls);
}

// [m, ls] of a row from its statistics (NaN without a softmax).
template <typename acc_t>
inline void row_lse_of_stats(const RowStats<acc_t>& st, acc_t ls, acc_t* lse_out) {
  const bool ok = st.has_softmax();
  lse_out[0] = ok ? st.m : kNaN<acc_t>;
  lse_out[1] = ok ? ls : kNaN<acc_t>;
}

// The true-class elements of a group of n rows (kGroup): grad[j][y[j]] = gb[j] * dL/dz_y from
// lp[j] = log p_y and the row's lse[j] (rows with grad[j] == nullptr skipped), the group's expm1
// and exp as vector code. lp is overwritten.
template <ZLoss kZ, typename scalar_t, typename acc_t>
inline void write_true_class(const CEParams<acc_t>& p, scalar_t* const* grad, const int64_t* y,
                             const acc_t* gb, acc_t* lp, const acc_t* lse, int64_t n) {
  constexpr int64_t V = Vec<acc_t>::size();
  alignas(64) acc_t em1[kGroup], e[kGroup];
  for (int64_t j = 0; j < n; ++j)
    if (grad[j] == nullptr) lp[j] = 0;
  for (int64_t j = 0; j < n; j += V) {
    const int64_t k = std::min(V, n - j);
    const Vec<acc_t> v = Vec<acc_t>::loadu(lp + j, k);
    v.expm1().store(em1 + j, k);
    if (p.template needs_p_y<kZ>()) v.exp().store(e + j, k);
  }
  for (int64_t j = 0; j < n; ++j) {
    if (grad[j] == nullptr) continue;
    const acc_t w_y = p.weight_of(y[j]);
    const RowCoef<acc_t> k = row_coef<kZ>(p, w_y, lse[j]);
    const acc_t dz = true_class_dz<kZ, acc_t>(p, k.ty, k.a_rest, k.cw * w_y, em1[j], e[j]);
    grad[j][y[j]] = static_cast<scalar_t>(gb[j] * dz);
  }
}

// The gradient of one non-ignored row: grad_c = g beta dL/dz_c (written when grad != nullptr),
// p_c = exp(beta (x_c - m) - ls) (exactly exp(-ls) at the maximum), except the true class's
// element: its log p_y goes to *lp_y, for write_true_class over the row's group (a row without
// a softmax is all NaN, its *lp_y NaN). Returns S of dL/dT = -(g / T) S (t_row_sum) when need_t,
// its sums over the classes in double (the precision policy, §2).
template <ZLoss kZ, typename scalar_t, typename acc_t>
inline double row_grad(const CEParams<acc_t>& p, const scalar_t* x, scalar_t* grad, acc_t m,
                       acc_t ls, int64_t y, acc_t g, bool need_t, acc_t* xbuf, acc_t* gbuf,
                       acc_t* lp_y) {
  constexpr int64_t V = Vec<acc_t>::size();
  const int64_t C = p.C;
  const RowCoef<acc_t> k = row_coef<kZ>(p, p.weight_of(y), p.beta * m + ls);
  const acc_t gb = g * p.beta;
  if (!(std::isfinite(m) && std::isfinite(ls))) {  // no softmax: NaN gradient
    if (grad != nullptr) std::fill(grad, grad + C, static_cast<scalar_t>(kNaN<acc_t>));
    *lp_y = kNaN<acc_t>;
    return std::numeric_limits<double>::quiet_NaN();
  }
  const Vec<acc_t> vbeta(p.beta), vm(m), vcoef(gb * k.A), vcw(gb * k.cw), vA(k.A), vk_cw(k.cw),
      vninf(kNegInf<acc_t>), vzero(0), vone(1);
  DoubleSum<acc_t> s_live, s_masked;
  const acc_t x_y = static_cast<acc_t>(x[y]);  // read before the row is overwritten (in place)
  *lp_y = p.beta * (x_y - m) - ls;
  const ScaledExp<acc_t> pexp(p.beta, -ls);  // p = exp(beta (x - m) - ls)
  auto step = [&](const Vec<acc_t>& xv, const Vec<acc_t>& wv, acc_t* o, int64_t n) {
    const Vec<acc_t> d = xv - vm;
    const Vec<acc_t> e = pexp(d);
    if (grad != nullptr) {
      const Vec<acc_t> gv = vcoef * e - vcw * wv;  // g beta (A p_c - cw w_c)
      if (n == V)
        gv.store(o);
      else
        gv.store(o, n);
    }
    if (need_t) {
      const Vec<acc_t> dz = vA * e - vk_cw * wv;
      const Vec<acc_t> live = xv > vninf;
      s_live.add(Vec<acc_t>::blendv(vzero, dz * (d * vbeta), live));
      s_masked.add(Vec<acc_t>::blendv(dz, vzero, live));
    }
  };
  const acc_t* w = p.smoothing_weights();
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    const acc_t* xa = as_acc(x + c0, n, xbuf);
    acc_t* out = std::is_same_v<scalar_t, acc_t> && grad != nullptr
                     ? reinterpret_cast<acc_t*>(grad + c0)
                     : gbuf;
    const acc_t* wc = w == nullptr ? nullptr : w + c0;
    int64_t i = 0;
    for (; i + V <= n; i += V)
      step(Vec<acc_t>::loadu(xa + i), wc == nullptr ? vone : Vec<acc_t>::loadu(wc + i), out + i, V);
    if (i < n) {  // one masked vector for the rest; unused lanes: x = -inf, weight 0
      const Tail<acc_t> t = load_tail(xa + i, n - i);
      const Vec<acc_t> wv = wc == nullptr ? Vec<acc_t>::blendv(vzero, vone, t.lanes)
                                          : Vec<acc_t>::loadu(wc + i, n - i);
      step(t.masked, wv, out + i, n - i);
    }
    if (grad != nullptr) store_from_acc(out, grad + c0, n);
  }
  if (!need_t) return 0;
  return t_row_sum<kZ>(s_live.sum(), s_masked.sum(), static_cast<double>(k.ty), p.beta, x_y, m,
                       k.a_z);
}

// What a pass of the cross-entropy reads and writes (docs/design.md §4: what each pass saves).
// nullptr: not read / not wanted.
template <typename scalar_t, typename acc_t>
struct CEIo {
  const scalar_t* x = nullptr;  // logits (rows, C), unit class stride
  int64_t row_stride = 0;
  int64_t rows = 0;
  const char* op = nullptr;       // for messages
  const acc_t* lse_in = nullptr;  // backward: the forward's [m, ls] per row
  UpstreamGrad<acc_t> g;          // backward, fused: dL/dloss_i (1 / denom included for mean)
  bool need_t = false;            // backward, fused: dL/dT wanted
  acc_t* lse_out = nullptr;       // forward, fused: [m, ls] per row ([0, 0] for ignored rows
                                  // unless p.lse_all), or nullptr (fused: not wanted)
  acc_t* loss_rows = nullptr;     // reduction none: the row losses (else summed per block)
  acc_t* grad_t_rows = nullptr;   // fused, reduction none: the rows' dL/dT (else summed)
  scalar_t* grad = nullptr;       // backward, fused: (rows, C) contiguous, may alias x (in place)

  // One row's results: its loss (forward, fused) and dL/dT (backward, fused), written per row
  // or added to the block's sums.
  template <Pass kPass>
  inline void emit(int64_t i, acc_t loss, double grad_t, BlockSums& sums) const {
    if constexpr (kPass != Pass::kBackward) {
      if (loss_rows != nullptr)
        loss_rows[i] = loss;
      else
        sums.loss += static_cast<double>(loss);
    }
    if constexpr (kPass != Pass::kForward) {
      if (grad_t_rows != nullptr)
        grad_t_rows[i] = static_cast<acc_t>(grad_t);
      else if (need_t)
        sums.grad_t += grad_t;
    }
  }
};

// Per-task buffers of the row path; with a soft-cap, a row capped into xc (acc) and its gradient in
// acc (gc).
template <typename scalar_t, typename acc_t>
struct RowScratch {
  std::vector<acc_t> xbuf, gbuf;  // a chunk of logits in acc, a chunk of gradient (bf16/half)
  std::vector<acc_t> xc, gc;      // Softcap::kOn: the row's capped logits, its gradient
  RowStats<acc_t> st[kGroup];
  alignas(64) acc_t ls[kGroup], gb[kGroup], lp[kGroup], lse[kGroup];
  int64_t y[kGroup];
  NextMax carry;
  RowScratch(int64_t C, Softcap cap)
      : xbuf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk),
        gbuf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk),
        xc(cap == Softcap::kOn ? C : 0),
        gc(cap == Softcap::kOn ? C : 0) {}
};

// Rows per group: kGroup; the fused pass takes a group's statistics, then writes its gradients
// while its logits (<= 32 KB) are still in L1/L2. With a soft-cap one row (capped into the
// scratch's row buffer).
template <Pass kPass, Softcap kCap, typename scalar_t>
inline int64_t row_group_size(int64_t C) {
  if constexpr (kCap == Softcap::kOn) return 1;
  if constexpr (kPass != Pass::kFused) return kGroup;
  constexpr int64_t kFusedGroupBytes = 32768;
  return std::clamp<int64_t>(
      kFusedGroupBytes / std::max<int64_t>(1, C * static_cast<int64_t>(sizeof(scalar_t))), 1,
      kGroup);
}

// One pass over the rows [i0, i0 + ng) of a block that ends at `end` (docs/design.md §4): the
// forward's statistics (forward, fused), the loss, the gradient (backward, fused). With a soft-cap
// (kCap, ng = 1) the row is read capped from the scratch (softcap_row) and its gradient computed
// there in acc, then times the cap's derivative, rounded once into grad (which may alias the
// logits: the row was read whole before).
template <Pass kPass, ZLoss kZ, Softcap kCap, typename scalar_t, typename acc_t>
inline void ce_row_group(const CEParams<acc_t>& p, const CEIo<scalar_t, acc_t>& io, int64_t i0,
                         int64_t ng, int64_t end, RowScratch<scalar_t, acc_t>& s,
                         BlockSums& block_sums) {
  // the block's running sums in a local (registers), written back once at the end, in the same
  // order of additions: updated through the reference, each row's sum was a load-add-store
  // chain (2 % of the bfloat16 forward at 1e6 x 100, benchmarks/NOTES.md)
  BlockSums sums = block_sums;
  constexpr bool kStats = kPass != Pass::kBackward;  // reads the row's statistics
  constexpr bool kGrad = kPass != Pass::kForward;    // writes the row's gradient
  constexpr bool kCapped = kCap == Softcap::kOn;
  using row_t = std::conditional_t<kCapped, acc_t, scalar_t>;  // the row as the kernels read it
  const int64_t C = p.C;
  const auto row = [&](int64_t i) -> const row_t* {
    if constexpr (kCapped)
      return s.xc.data();
    else
      return io.x + i * io.row_stride;
  };
  if constexpr (kCapped) {  // the group's one row, capped, where it is read
    const bool used = p.target[i0] != p.ignore_index || (kStats && p.lse_all && io.lse_out);
    if (used) softcap_row(io.x + i0 * io.row_stride, C, p.cap, s.xc.data());
  }
  if constexpr (kStats) {
    for (int64_t j = 0; j < ng; ++j) {
      const int64_t i = i0 + j;
      s.ls[j] = 0;
      if (p.target[i] == p.ignore_index && !(p.lse_all && io.lse_out != nullptr)) continue;
      const row_t* xr = row(i);
      s.st[j] = row_stats(xr, C, p.beta, p.w, p.smoothing == Smoothing::kOn, s.xbuf.data(),
                          !kCapped && i + 1 < end ? xr + io.row_stride : nullptr, &s.carry);
      s.ls[j] = s.st[j].arg();
    }
    log1p_n(s.ls, ng);
  }
  row_t* grad_row[kGroup];  // the rows whose true class write_true_class writes
  for (int64_t j = 0; j < ng; ++j) {
    const int64_t i = i0 + j, y = p.target[i];
    scalar_t* gr = kGrad && io.grad != nullptr ? io.grad + i * C : nullptr;
    grad_row[j] = nullptr;
    s.y[j] = 0;
    if (y == p.ignore_index) {
      if (gr != nullptr) std::fill(gr, gr + C, scalar_t(0));
      if constexpr (kStats) {
        if (io.lse_out != nullptr) {
          if (p.lse_all)
            row_lse_of_stats(s.st[j], s.ls[j], io.lse_out + 2 * i);
          else
            io.lse_out[2 * i] = io.lse_out[2 * i + 1] = 0;
        }
      }
      io.template emit<kPass>(i, 0, 0, sums);
      continue;
    }
    if constexpr (kPass == Pass::kBackward) {  // the other passes checked every target first
      TORCH_CHECK(y >= 0 && y < C, io.op, ": target[", i, "] = ", y, " is out of range for ", C,
                  " classes");
    }
    const row_t* xr = row(i);
    acc_t lse[2] = {0, 0}, loss = 0;
    if constexpr (kStats) {
      loss = row_loss_of_stats<kZ>(p, xr, s.st[j], s.ls[j], y, lse);
      if (io.lse_out != nullptr) {
        io.lse_out[2 * i] = lse[0];
        io.lse_out[2 * i + 1] = lse[1];
      }
    } else {
      lse[0] = io.lse_in[2 * i];
      lse[1] = io.lse_in[2 * i + 1];
    }
    double grad_t = 0;
    if constexpr (kGrad) {
      const acc_t g = io.g.of(i);
      row_t* go = nullptr;  // where the row's gradient is computed
      if constexpr (kCapped)
        go = gr != nullptr ? s.gc.data() : nullptr;
      else
        go = gr;
      const double S = row_grad<kZ>(p, xr, go, lse[0], lse[1], y, g, io.need_t, s.xbuf.data(),
                                    s.gbuf.data(), &s.lp[j]);
      if (io.need_t) grad_t = -static_cast<double>(g) * S * static_cast<double>(p.beta);
      if (go != nullptr && !std::isnan(s.lp[j])) grad_row[j] = go;
      s.y[j] = y;
      s.gb[j] = g * p.beta;
      s.lse[j] = p.beta * lse[0] + lse[1];
      if constexpr (kCapped) {
        if (gr != nullptr) {
          write_true_class<kZ>(p, grad_row, s.y, s.gb, s.lp, s.lse, 1);
          softcap_grad_row(s.xc.data(), s.gc.data(), C, p.cap, gr);
        }
      }
    }
    io.template emit<kPass>(i, loss, grad_t, sums);
  }
  if constexpr (kGrad && !kCapped) {
    if (io.grad != nullptr) write_true_class<kZ>(p, grad_row, s.y, s.gb, s.lp, s.lse, ng);
  }
  block_sums = sums;
}

}  // namespace cpu
}  // namespace softcal
