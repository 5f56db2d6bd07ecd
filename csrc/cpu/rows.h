// softcal CPU kernels: the statistics of a row (its max, its sum of exps relative to the max,
// the smoothing sum D) read in one pass, and the loop over blocks of rows in groups, written once
// for every pass of the cross-entropy (row path and tile path). docs/design.md §2 (numerics), §4.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/host.h"
#include "cpu/vec.h"

namespace softcal {
namespace cpu {

// Per-row state of the forward, in units of the raw logits (docs/design.md §2):
//   m    = max_c x_c
//   n1   = number of classes with x_c == m (their exps are exactly 1)
//   rest = sum over the other classes of exp(beta (x_c - m))
//   D    = sum_c w_c (m - x_c) >= 0            (only with smoothing)
// so that ls = log sum_c exp(beta (x_c - m)) = log1p((n1 - 1) + rest): the 1 of the maximum is
// never rounded into the sum, and ls keeps its relative accuracy for confident rows.
template <typename acc_t>
struct RowStats {
  acc_t m = kNegInf<acc_t>;
  acc_t n1 = 0;
  acc_t rest = 0;
  acc_t D = 0;
  bool bad = false;  // a NaN or +inf logit: no softmax
  // false also for a row that is entirely -inf
  bool has_softmax() const { return !bad && m > kNegInf<acc_t>; }
  // the argument of log1p: ls = log1p(arg())
  acc_t arg() const { return (n1 - acc_t(1)) + rest; }
  acc_t ls() const { return std::log1p(arg()); }
};

// Rows of the row path taken together (forward, backward, fused) so that the per-row
// transcendental functions (log1p of the forward, expm1 and exp of the true class's gradient)
// run as vector code over the group, not as scalar libm calls in each row's dependency chain
// (benchmarks/NOTES.md: their cost).
constexpr int64_t kGroup = 16;

// Walks x[0:n] (acc, a chunk in L1) relative to the state's max m (finite), adding the exps
// (split into exact ones and the rest) and, with kDot, D += sum w (m - x), Wseen += sum w.
template <typename acc_t, bool kDot>
inline void chunk_accumulate(const acc_t* x, const acc_t* w, int64_t n, acc_t beta,
                             RowStats<acc_t>& st, acc_t& Wseen) {
  constexpr int64_t V = Vec<acc_t>::size();
  const Vec<acc_t> vb(beta), vm(st.m), zero(0), one(1);
  // two independent sets of accumulators (the loop is bound by the exp's latency chain)
  Vec<acc_t> r[2] = {zero, zero}, c[2] = {zero, zero}, d[2] = {zero, zero}, ws[2] = {zero, zero};
  auto step = [&](int k, const Vec<acc_t>& xv, const Vec<acc_t>& xz, const Vec<acc_t>& wv) {
    const Vec<acc_t> z = (xv - vm) * vb;  // exactly 0 at the maximum
    const Vec<acc_t> e = vexp(z);
    const Vec<acc_t> at_max = z == zero;
    r[k] = r[k] + Vec<acc_t>::blendv(e, zero, at_max);
    c[k] = c[k] + (at_max & one);
    if constexpr (kDot) {
      // the classes at the maximum add nothing (not w * 0: a weight of inf there, §1)
      d[k] = w == nullptr ? at::vec::fmadd(wv, vm - xz, d[k])
                          : Vec<acc_t>::blendv(at::vec::fmadd(wv, vm - xz, d[k]), d[k], at_max);
      if (w != nullptr) ws[k] = ws[k] + wv;
    }
  };
  auto wload = [&](int64_t i) { return kDot && w != nullptr ? Vec<acc_t>::loadu(w + i) : one; };
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    const Vec<acc_t> a = Vec<acc_t>::loadu(x + i), b = Vec<acc_t>::loadu(x + i + V);
    step(0, a, a, wload(i));
    step(1, b, b, wload(i + V));
  }
  if (i + V <= n) {
    const Vec<acc_t> a = Vec<acc_t>::loadu(x + i);
    step(0, a, a, wload(i));
    i += V;
  }
  if (i < n) {
    const Tail<acc_t> t = load_tail(x + i, n - i);
    // unused lanes: x = -inf for the exps; x = m and weight 0 for D
    const Vec<acc_t> wv = !kDot          ? one
                          : w != nullptr ? Vec<acc_t>::loadu(w + i, n - i)
                                         : Vec<acc_t>::blendv(zero, one, t.lanes);
    step(1, t.masked, Vec<acc_t>::blendv(vm, t.loaded, t.lanes), wv);
  }
  st.rest += hsum(r[0] + r[1]);
  st.n1 += hsum(c[0] + c[1]);
  if constexpr (kDot) {
    st.D += hsum(d[0] + d[1]);
    Wseen += w != nullptr ? hsum(ws[0] + ws[1]) : static_cast<acc_t>(n);
  }
}

#if SOFTCAL_AVX512_EXP
// One vector of chunk_accumulate_f32 (lanes: the valid ones): exponent t = (x - m) beta log2(e),
// exactly 0 at the maximum; the exps of the other lanes added (one masked add), the maxima
// counted per lane, D from the same x - m. Accumulators are passed by reference to distinct
// locals and the weights are a template parameter: GCC kept indexed accumulator arrays on the
// stack (a store per update) and the weight test inside the loop.
template <bool kDot, bool kW>
__attribute__((always_inline)) inline __m512 f32_step(const float* x, const float* w, int64_t i,
                                                      __mmask16 lanes, __m512 vm, __m512 vk,
                                                      __m512& r, __m512& d, __m512& ws,
                                                      __m512i& cnt) {
  const __m512 xv = _mm512_maskz_loadu_ps(lanes, x + i);
  const __m512 dx = _mm512_sub_ps(xv, vm);
  const __m512 t = _mm512_mul_ps(dx, vk);
  const __m512 e = exp2_avx512(t);
  const __mmask16 at_max = _mm512_mask_cmp_ps_mask(lanes, t, _mm512_setzero_ps(), _CMP_EQ_OQ);
  r = _mm512_mask_add_ps(r, lanes & ~at_max, r, e);
  cnt = _mm512_mask_add_epi32(cnt, at_max, cnt, _mm512_set1_epi32(1));
  if constexpr (kDot) {
    if constexpr (kW) {
      const __m512 wv = _mm512_maskz_loadu_ps(lanes, w + i);
      // unused lanes: weight 0, dx finite; the lanes at the maximum add nothing (not w * 0: a
      // weight of inf there, §1)
      d = _mm512_mask3_fmadd_ps(wv, dx, d, lanes & ~at_max);
      ws = _mm512_add_ps(ws, wv);
    } else {
      d = _mm512_mask_add_ps(d, lanes, d, dx);
    }
  }
  return xv;
}

// chunk_accumulate for float32 with AVX-512 masks (f32_step). Returns a max ignoring NaN (-inf
// if none), the caller's max for the next step:
//  * kSelf = false: software-pipelined with the max pass of the next chunk (or of the next row's
//    first chunk): nx[0:nn] is read by the same loop, so that its loads from memory overlap this
//    chunk's exps; returns max nx[0:nn].
//  * kSelf = true (the online walk of a long row's later chunks): the chunk is read once from
//    memory, its exps taken relative to the running max st.m and its own max taken beside them;
//    returns max x[0:n]. The sums are valid only if that max is <= st.m (row_stats checks, and
//    otherwise walks the chunk again from L1 relative to its max: the exponent at the maximum
//    must be exactly 0).
// bfloat16/float16 rows (x: a chunk converted to float in L1) have no float chunk to take the
// max of: pf, pf_bytes is the memory that the next conversion will read, prefetched into L1
// instead (2 lines an iteration of a full chunk).
template <bool kDot, bool kW, bool kSelf>
SOFTCAL_ALWAYS_INLINE float chunk_accumulate_f32_impl(const float* x, const float* w, int64_t n,
                                                      float beta, RowStats<float>& st, float& Wseen,
                                                      const float* nx, int64_t nn, const char* pf,
                                                      int64_t pf_bytes) {
  const __m512 vm = _mm512_set1_ps(st.m);
  const __m512 vk = _mm512_set1_ps(static_cast<float>(beta * 1.4426950408889634));
  const __m512 zero = _mm512_setzero_ps();
  const __m512 ninf = _mm512_set1_ps(kNegInf<float>);
  __m512 r0 = zero, r1 = zero, d0 = zero, d1 = zero, w0 = zero, w1 = zero;
  __m512 mx0 = ninf, mx1 = ninf;
  __m512i c0 = _mm512_setzero_si512(), c1 = _mm512_setzero_si512();
  const int64_t n32 = n & ~int64_t(31);
  // elements of nx taken by the first loop (kSelf: all of x's full iterations)
  const int64_t j32 = kSelf ? n32 : std::min(n32, nn & ~int64_t(31));
  int64_t i = 0;
  // _mm512_max_ps(a, b) returns b where either is NaN: the max accumulators are never NaN
  for (; i < j32; i += 32) {
    const __m512 a = f32_step<kDot, kW>(x, w, i, 0xFFFF, vm, vk, r0, d0, w0, c0);
    const __m512 b = f32_step<kDot, kW>(x, w, i + 16, 0xFFFF, vm, vk, r1, d1, w1, c1);
    mx0 = _mm512_max_ps(kSelf ? a : _mm512_loadu_ps(nx + i), mx0);
    mx1 = _mm512_max_ps(kSelf ? b : _mm512_loadu_ps(nx + i + 16), mx1);
  }
  const int64_t lines = n == kChunk ? (pf_bytes + 63) / 64 : 0;
  static_assert(kChunk * sizeof(float) <= 2 * 64 * (kChunk / 32), "2 lines an iteration");
  for (int64_t line = 0; i < n32; i += 32) {
    for (int k = 0; k < 2 && line < lines; ++k, ++line) _mm_prefetch(pf + line * 64, _MM_HINT_T0);
    f32_step<kDot, kW>(x, w, i, 0xFFFF, vm, vk, r0, d0, w0, c0);
    f32_step<kDot, kW>(x, w, i + 16, 0xFFFF, vm, vk, r1, d1, w1, c1);
  }
  for (; i < n; i += 16) {
    const __mmask16 lanes = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 a = f32_step<kDot, kW>(x, w, i, lanes, vm, vk, r0, d0, w0, c0);
    if constexpr (kSelf) mx0 = _mm512_mask_max_ps(mx0, lanes, a, mx0);
  }
  st.rest += _mm512_reduce_add_ps(_mm512_add_ps(r0, r1));
  st.n1 += static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1)));
  if constexpr (kDot) {
    st.D -= _mm512_reduce_add_ps(_mm512_add_ps(d0, d1));  // D = sum w (m - x)
    Wseen += kW ? _mm512_reduce_add_ps(_mm512_add_ps(w0, w1)) : static_cast<float>(n);
  }
  if (!kSelf && nn == 0) return kNegInf<float>;  // (short rows: no reduction to pay for)
  float next = _mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1));
  if (!kSelf && j32 < nn) next = std::max(next, max_ignoring_nan_f32(nx + j32, nn - j32));
  return next;
}

template <bool kDot, bool kSelf = false>
SOFTCAL_ALWAYS_INLINE float chunk_accumulate_f32(const float* x, const float* w, int64_t n,
                                                 float beta, RowStats<float>& st, float& Wseen,
                                                 const float* nx = nullptr, int64_t nn = 0,
                                                 const char* pf = nullptr, int64_t pf_bytes = 0) {
  return w != nullptr ? chunk_accumulate_f32_impl<kDot, true, kSelf>(x, w, n, beta, st, Wseen, nx,
                                                                     nn, pf, pf_bytes)
                      : chunk_accumulate_f32_impl<kDot, false, kSelf>(x, w, n, beta, st, Wseen, nx,
                                                                      nn, pf, pf_bytes);
}

#endif

// The max of a row's first chunk, taken by the row_stats call of the row before it (float32
// logits on AVX-512, whose exp loop reads the next row's first chunk): valid for the call whose
// x is `row` (a row skipped in between leaves it unused).
struct NextMax {
  const void* row = nullptr;
  float m = 0;
};

// One read of a row (bf16/half converted chunk by chunk into buf): per chunk of kChunk elements
// its max is taken first; when it exceeds the running max, the state is rescaled to the new max;
// then the chunk's exps are taken relative to the max, so that the exponent at the maximum is
// exactly 0. With need_dot, D = sum w_c (m - x_c) as well (a sum of non-negative terms: no
// difference of large numbers). float32 on AVX-512, so that each logit is read from memory once
// with its loads beside the exps: the chunks after the first are walked online (exps relative to
// the running max, kept when the chunk holds no larger logit, else walked again from L1), and
// the max of the next row's first chunk is taken inside the exp loop of this row's last chunk
// and handed over through `carry`.
template <typename scalar_t, typename acc_t>
SOFTCAL_ALWAYS_INLINE RowStats<acc_t> row_stats(const scalar_t* x, int64_t C, acc_t beta,
                                                const acc_t* w, bool need_dot, acc_t* buf,
                                                const scalar_t* next_row = nullptr,
                                                NextMax* carry = nullptr) {
#if SOFTCAL_AVX512_EXP
  constexpr bool kPipe = std::is_same_v<scalar_t, float>;
#else
  constexpr bool kPipe = false;
#endif
  RowStats<acc_t> st;
  acc_t Wseen = 0;  // sum of the weights of the classes seen (with need_dot)
  acc_t next_max = 0;
  bool have_next = false;  // next_max is the max of the chunk at c0 (ignoring NaN)
  if (carry != nullptr) {
    if (kPipe && carry->row == x) {
      next_max = static_cast<acc_t>(carry->m);
      have_next = true;
    }
    carry->row = nullptr;
  }
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    const acc_t* xa = as_acc(x + c0, n, buf);
    const acc_t* wc = w == nullptr ? nullptr : w + c0;
#if SOFTCAL_AVX512_EXP
    if constexpr (kPipe) {
      // A later chunk of a long row: one online walk from memory (exps relative to the running
      // max, the chunk's max beside them), kept if the chunk has no larger logit (the usual
      // case once the first chunks are seen); otherwise the chunk is walked again below, from
      // L1, relative to its max.
      if (c0 > 0 && st.m > kNegInf<acc_t>) {
        RowStats<acc_t> t = st;
        acc_t Wt = Wseen;
        const acc_t cmx = need_dot ? chunk_accumulate_f32<true, true>(xa, wc, n, beta, t, Wt)
                                   : chunk_accumulate_f32<false, true>(xa, wc, n, beta, t, Wt);
        if (cmx <= st.m) {
          st = t;
          Wseen = Wt;
          continue;
        }
        next_max = cmx;
        have_next = true;
      }
    }
    // float32: NaN is found through the exps (max_ignoring_nan_f32), or below while every
    // logit so far is -inf
    const acc_t cm =
        have_next ? next_max
        : std::is_same_v<acc_t, float>
            ? static_cast<acc_t>(max_ignoring_nan_f32(reinterpret_cast<const float*>(xa), n))
            : chunk_max(xa, n);
#else
    const acc_t cm = chunk_max(xa, n);
#endif
    have_next = false;
    if (std::isnan(cm) || cm == std::numeric_limits<acc_t>::infinity()) {
      st.bad = true;  // NaN or +inf: no softmax; the caller turns this into NaN
      return st;
    }
    if (cm > st.m) {
      if (st.m > kNegInf<acc_t>) {
        st.rest = (st.n1 + st.rest) * std::exp(beta * (st.m - cm));
        st.n1 = 0;
        if (need_dot) st.D += (cm - st.m) * Wseen;
      }
      st.m = cm;
    }
    if (st.m > kNegInf<acc_t>) {
#if SOFTCAL_AVX512_EXP
      if constexpr (std::is_same_v<acc_t, float>) {
        const bool last = c0 + kChunk >= C;
        // kPipe: the later chunks of this row are walked online; the next row's first chunk's
        // max is taken here
        const scalar_t* nx = !last ? (kPipe ? nullptr : x + c0 + kChunk) : next_row;
        const int64_t nn = nx == nullptr ? 0
                           : !last       ? std::min(kChunk, C - c0 - kChunk)
                                         : std::min(kChunk, C);
        if constexpr (kPipe) {
          const float* nf = reinterpret_cast<const float*>(nx);
          next_max = need_dot ? chunk_accumulate_f32<true>(xa, wc, n, beta, st, Wseen, nf, nn)
                              : chunk_accumulate_f32<false>(xa, wc, n, beta, st, Wseen, nf, nn);
          if (last && carry != nullptr && nx != nullptr) {
            carry->row = nx;
            carry->m = next_max;
          }
        } else {
          const char* pf = reinterpret_cast<const char*>(nx);
          const int64_t pfb = nn * static_cast<int64_t>(sizeof(scalar_t));
          if (need_dot)
            chunk_accumulate_f32<true>(xa, wc, n, beta, st, Wseen, nullptr, 0, pf, pfb);
          else
            chunk_accumulate_f32<false>(xa, wc, n, beta, st, Wseen, nullptr, 0, pf, pfb);
        }
        continue;
      }
#endif
      if (need_dot)
        chunk_accumulate<acc_t, true>(xa, wc, n, beta, st, Wseen);
      else
        chunk_accumulate<acc_t, false>(xa, wc, n, beta, st, Wseen);
    } else {  // every logit so far is -inf (or NaN)
      if (std::isnan(chunk_max(xa, n))) {
        st.bad = true;
        return st;
      }
      if (need_dot) {  // D is +inf (NaN where a weight is 0)
        st.D += chunk_dot(xa, wc, n) * acc_t(-1);
        Wseen += wc == nullptr ? acc_t(n) : chunk_dot<acc_t>(wc, nullptr, n);
      }
    }
  }
  if (std::isnan(st.rest)) st.bad = true;  // a NaN logit (the exps of every path propagate it)
  return st;
}

// The sums of a block of rows, in double, in row order (docs/design.md §2: deterministic).
struct BlockSums {
  double loss = 0;    // the row losses
  double grad_t = 0;  // the rows' dL/dT
};

// Blocks [b0, b1) of `bs` rows each (the last one shorter), each walked in groups of `group`
// rows: group_fn(i0, ng, end, sums) for the rows [i0, i0 + ng) of the block that ends at `end`,
// adding to the block's sums; then parts[b] = the block's sums. The row path (groups of rows
// whose transcendental functions run together) and the tile path (tiles of 16 rows) of every pass.
template <typename GroupFn>
inline void for_block_groups(int64_t rows, int64_t bs, int64_t b0, int64_t b1, int64_t group,
                             BlockSums* parts, GroupFn&& group_fn) {
  for (int64_t b = b0; b < b1; ++b) {
    BlockSums sums;
    const int64_t end = std::min(rows, (b + 1) * bs);
    for (int64_t i0 = b * bs; i0 < end; i0 += group)
      group_fn(i0, std::min(group, end - i0), end, sums);
    parts[b] = sums;
  }
}

}  // namespace cpu
}  // namespace softcal
