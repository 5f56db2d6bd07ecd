// softcal CPU kernels: temperature-scaled, label-smoothed cross-entropy (forward, backward,
// fused), row scaling, softmax / log_softmax along any dim, and temperature statistics.
//
// The maths (loss, gradients with respect to the logits and the temperature, edge cases) is
// written out in csrc/common.h; read it first.
//
// Numerics: exact at the row maximum. Every exponent is formed as beta (x - m) (minus ls), with
// m the row maximum of the RAW logits, so it is exactly 0 at the maximum whatever |x| and T
// (never beta x - beta m from two rounded products). The saved per-row lse is [m, ls],
// ls = log sum exp(beta (x - m)) = log1p(count of maxima - 1 + sum of the other exps): the ones of
// the maxima are never rounded into the sum. The loss and the T-gradient are sums of
// non-negative or shifted terms (row_loss, row_grad), and p_y - 1 is expm1(log p_y).
//
// Passes over memory
//   forward   one read of the logits. A row is walked in chunks of kChunk elements: the chunk's
//             max is taken first (the chunk then sits in L1), the running state is rescaled when
//             the max grows, and the chunk's exps and (for smoothing) D = sum w (m - x) are added.
//             float32 on AVX-512: a long row's later chunks are walked online (exps relative to
//             the running max, walked again from L1 only when the chunk holds a larger logit),
//             and the next row's first-chunk max is taken inside the last chunk's exp loop, so
//             each logit is read from memory once, its loads beside the exps.
//             One exp per element; nothing of size N x C is written or kept.
//   backward  one read of the logits and one write of the gradient; p = exp(beta (x - m) - ls)
//             from the saved [m, ls]. One exp per element.
//   fused     the forward's read, then the gradient is written while the row is still in the
//             core's cache (a row of C float32 fits in L2 up to C ~ 250k); otherwise the second
//             walk re-reads it from L3/DRAM.
// Small C (<= kTileMaxC, float accumulation): tiles of R rows, one row per vector lane (see
// "Small class counts" below).
// Parallelism: at::parallel_for over blocks of rows (reduce_block_rows: a function of the row
// count only); inner loops on at::vec::Vectorized (AVX2/AVX-512 as built, see setup.py). The
// per-row losses and T-gradients are summed per block in double, in row order, then over the
// blocks in order: results are bitwise identical for any thread count, and no per-row buffer is
// allocated (except the outputs of reduction "none").
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

#include "checks.h"
#include "cpu/cpu_common.h"

namespace softcal {
namespace {

using namespace ::softcal::cpu;

// Per-row state of the forward, in units of the raw logits (common.h, schemas.h):
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
// run as vector code over the group, not as scalar libm calls (glibc's log1pf and expm1f cost
// 10-12 ns each: 15-30 % of a row of 100 classes) in each row's dependency chain.
constexpr int64_t kGroup = 16;

// a[j] = log1p(a[j]) for j < n (SLEEF's vector log1p, 1 ulp)
template <typename acc_t>
inline void log1p_n(acc_t* a, int64_t n) {
  constexpr int64_t V = Vec<acc_t>::size();
  for (int64_t j = 0; j < n; j += V) {
    const int64_t k = std::min(V, n - j);
    Vec<acc_t>::loadu(a + j, k).log1p().store(a + j, k);
  }
}

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
      d[k] = at::vec::fmadd(wv, vm - xz, d[k]);
      if (w != nullptr) ws[k] = ws[k] + wv;
    }
  };
  auto wload = [&](int64_t i) {
    return kDot && w != nullptr ? Vec<acc_t>::loadu(w + i) : one;
  };
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
    const Vec<acc_t> wv = !kDot ? one
                          : w != nullptr ? Vec<acc_t>::loadu(w + i, n - i)
                                         : Vec<acc_t>::blendv(zero, one, t.lanes);
    step(1, t.masked, Vec<acc_t>::blendv(vm, t.loaded, t.lanes), wv);
  }
  auto sum = [](const Vec<acc_t>& v) {
    return at::vec::vec_reduce_all<acc_t>(std::plus<Vec<acc_t>>(), v);
  };
  st.rest += sum(r[0] + r[1]);
  st.n1 += sum(c[0] + c[1]);
  if constexpr (kDot) {
    st.D += sum(d[0] + d[1]);
    Wseen += w != nullptr ? sum(ws[0] + ws[1]) : static_cast<acc_t>(n);
  }
}

#if defined(CPU_CAPABILITY_AVX512) && !defined(SOFTCAL_EXP_U20)
// 2^t for float32 lanes (the polynomial of exp_avx512 in cpu_common.h, rescaled to base 2:
// coefficient k times ln2^k, the same function on |f| <= 1/2): n = round(t), f = t - n (exact),
// 2^f by the polynomial (exactly 1 at f = 0), scaled by 2^n. t < -126 gives exactly 0 (so
// -inf gives 0, no denormals); NaN stays NaN. 9 instructions.
inline __m512 exp2_avx512(__m512 t) {
  constexpr double l = 0.6931471805599453;
  const __mmask16 keep = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(static_cast<float>(0.0082615288 * l * l * l * l * l));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(static_cast<float>(0.041898742 * l * l * l * l)));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(static_cast<float>(0.16668114 * l * l * l)));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(static_cast<float>(0.49999142 * l * l)));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(static_cast<float>(0.99999952 * l)));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}

#endif

// exp(d * beta + c) on a vector: for float32 on AVX-512 as 2^(d * beta log2 e + c log2 e) with
// one fma (k = beta log2 e, kc = c log2 e precomputed), else exp of the fma.
template <typename acc_t>
struct ScaledExp {
  Vec<acc_t> beta, c, k, kc;
  ScaledExp(acc_t beta_, acc_t c_)
      : beta(beta_), c(c_), k(static_cast<acc_t>(beta_ * 1.4426950408889634)),
        kc(static_cast<acc_t>(c_ * 1.4426950408889634)) {}
  inline Vec<acc_t> operator()(const Vec<acc_t>& d) const {
#if defined(CPU_CAPABILITY_AVX512) && !defined(SOFTCAL_EXP_U20)
    if constexpr (std::is_same_v<acc_t, float>) {
      return Vec<acc_t>(exp2_avx512(_mm512_fmadd_ps(d, k, kc)));
    }
#endif
    return vexp(at::vec::fmadd(d, beta, c));
  }
};

#if defined(CPU_CAPABILITY_AVX512) && !defined(SOFTCAL_EXP_U20)
// Max of x[0:n] ignoring NaN (-inf for none): one vmaxps a vector, four independent chains
// (the NaN-propagating chunk_max takes four instructions a vector). Its callers detect NaN
// through the exps: a NaN logit makes the sum of exps NaN (chunk_accumulate_f32 adds every lane
// that is not at the maximum, and NaN never compares equal to it).
inline float max_ignoring_nan_f32(const float* x, int64_t n) {
  const __m512 ninf = _mm512_set1_ps(kNegInf<float>);
  __m512 m[4] = {ninf, ninf, ninf, ninf};
  int64_t i = 0;
  // _mm512_max_ps(a, b) returns b where either is NaN: the accumulator is never NaN
  for (; i + 64 <= n; i += 64)
    for (int k = 0; k < 4; ++k) m[k] = _mm512_max_ps(_mm512_loadu_ps(x + i + 16 * k), m[k]);
  for (int k = 0; i < n; i += 16, k = (k + 1) & 3) {
    const __mmask16 lanes = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    m[k] = _mm512_max_ps(_mm512_mask_loadu_ps(ninf, lanes, x + i), m[k]);
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m[0], m[1]), _mm512_max_ps(m[2], m[3])));
}

// One vector of chunk_accumulate_f32 (lanes: the valid ones): exponent t = (x - m) beta log2(e),
// exactly 0 at the maximum; the exps of the other lanes added (one masked add), the maxima
// counted per lane, D from the same x - m. Accumulators are passed by reference to distinct
// locals and the weights are a template parameter: GCC kept indexed accumulator arrays on the
// stack (a store per update) and the weight test inside the loop.
template <bool kDot, bool kW>
__attribute__((always_inline)) inline __m512 f32_step(const float* x, const float* w, int64_t i,
                                                    __mmask16 lanes, __m512 vm, __m512 vk,
                                                    __m512& r, __m512& d, __m512& ws, __m512i& cnt) {
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
      d = _mm512_fmadd_ps(wv, dx, d);  // unused lanes: weight 0, dx finite
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
inline float chunk_accumulate_f32_impl(const float* x, const float* w, int64_t n, float beta,
                                       RowStats<float>& st, float& Wseen, const float* nx,
                                       int64_t nn, const char* pf, int64_t pf_bytes) {
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
inline float chunk_accumulate_f32(const float* x, const float* w, int64_t n, float beta,
                                  RowStats<float>& st, float& Wseen, const float* nx = nullptr,
                                  int64_t nn = 0, const char* pf = nullptr, int64_t pf_bytes = 0) {
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
inline RowStats<acc_t> row_stats(const scalar_t* x, int64_t C, acc_t beta, const acc_t* w,
                                 bool need_dot, acc_t* buf, const scalar_t* next_row = nullptr,
                                 NextMax* carry = nullptr) {
#if defined(CPU_CAPABILITY_AVX512) && !defined(SOFTCAL_EXP_U20)
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
#if defined(CPU_CAPABILITY_AVX512) && !defined(SOFTCAL_EXP_U20)
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
    const acc_t cm = have_next ? next_max
                     : std::is_same_v<acc_t, float>
                         ? static_cast<acc_t>(max_ignoring_nan_f32(
                               reinterpret_cast<const float*>(xa), n))
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
#if defined(CPU_CAPABILITY_AVX512) && !defined(SOFTCAL_EXP_U20)
      if constexpr (std::is_same_v<acc_t, float>) {
        const bool last = c0 + kChunk >= C;
        // kPipe: the later chunks of this row are walked online; the next row's first chunk's
        // max is taken here
        const scalar_t* nx = !last ? (kPipe ? nullptr : x + c0 + kChunk) : next_row;
        const int64_t nn = nx == nullptr ? 0 : !last ? std::min(kChunk, C - c0 - kChunk)
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
          if (need_dot) chunk_accumulate_f32<true>(xa, wc, n, beta, st, Wseen, nullptr, 0, pf, pfb);
          else chunk_accumulate_f32<false>(xa, wc, n, beta, st, Wseen, nullptr, 0, pf, pfb);
        }
        continue;
      }
#endif
      if (need_dot) chunk_accumulate<acc_t, true>(xa, wc, n, beta, st, Wseen);
      else chunk_accumulate<acc_t, false>(xa, wc, n, beta, st, Wseen);
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
  // The weights of the smoothing terms (eps / C) w_c: none without smoothing, so that a weight
  // of inf (1 / bincount of a class absent from the batch) never meets a 0 (0 * inf = NaN);
  // PyTorch's gradient is finite there.
  inline const acc_t* smoothing_weights() const { return eps > 0 ? w : nullptr; }
  // A = (1 - eps) w_y + eps W / C, the coefficient of p_c in dL/dz_c
  inline acc_t A_of(acc_t w_y) const {
    return eps > 0 ? (acc_t(1) - eps) * w_y + eps * W / static_cast<acc_t>(C) : w_y;
  }
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

// Rows per block of the per-block sums (loss, dL/dT) and of the parallel work: kReduceBlock, or
// fewer (a multiple of 16, the tile height) so that short batches still make >= 64 blocks. A
// function of the row count only: the summation order, hence the result's bits, does not
// depend on the number of threads.
inline int64_t reduce_block_rows(int64_t rows) {
  const int64_t want = (rows + 63) / 64;
  return std::min<int64_t>(kReduceBlock, std::max<int64_t>(16, (want + 15) / 16 * 16));
}

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

// Loss of one non-ignored row from its stats and ls = log1p(st.arg()); writes its [m, ls] (NaN
// without a softmax).
//   lse - z_y = beta (m - x_y) + ls,   W lse - sum_c w_c z_c = beta D + W ls:
// sums of non-negative terms, no difference of two large numbers.
template <typename scalar_t, typename acc_t>
inline acc_t row_loss(const CEParams<acc_t>& p, const scalar_t* x, const RowStats<acc_t>& st,
                      acc_t ls, int64_t y, acc_t* lse_out) {
  if (!st.has_softmax()) {  // NaN / +inf logits, or entirely -inf: NaN lse and loss
    lse_out[0] = lse_out[1] = kNaN<acc_t>;
    return kNaN<acc_t>;
  }
  lse_out[0] = st.m;
  lse_out[1] = ls;
  const acc_t w_y = p.weight_of(y);
  const acc_t nll = p.beta * (st.m - static_cast<acc_t>(x[y])) + ls;
  acc_t loss = (acc_t(1) - p.eps) * w_y * nll;
  if (p.eps > 0) loss += p.eps_c * (p.beta * st.D + p.W * ls);
  return loss;
}

// The true-class gradient dL/dz_y = A p_y - (eps/C) w_y - (1 - eps) w_y, written as
//   (1 - eps) w_y (p_y - 1) + (eps/C) (W p_y - w_y)
// with p_y - 1 = expm1(log p_y), log p_y = beta (x_y - m) - ls: a confident row (p_y near 1)
// keeps the relative accuracy of p_y - 1. For a group of n rows (see kGroup): row j's element
// grad[j][y[j]] = gb[j] * dL/dz_y from lp[j] = log p_y (rows with grad[j] == nullptr skipped),
// in acc precision, then one rounding. lp is overwritten.
template <typename scalar_t, typename acc_t>
inline void write_true_class(const CEParams<acc_t>& p, scalar_t* const* grad, const int64_t* y,
                             const acc_t* gb, acc_t* lp, int64_t n) {
  constexpr int64_t V = Vec<acc_t>::size();
  alignas(64) acc_t em1[kGroup], e[kGroup];
  for (int64_t j = 0; j < n; ++j)
    if (grad[j] == nullptr) lp[j] = 0;
  for (int64_t j = 0; j < n; j += V) {
    const int64_t k = std::min(V, n - j);
    const Vec<acc_t> v = Vec<acc_t>::loadu(lp + j, k);
    v.expm1().store(em1 + j, k);
    if (p.eps > 0) v.exp().store(e + j, k);
  }
  for (int64_t j = 0; j < n; ++j) {
    if (grad[j] == nullptr) continue;
    const acc_t w_y = p.weight_of(y[j]);
    acc_t dz = (acc_t(1) - p.eps) * w_y * em1[j];
    if (p.eps > 0) dz += p.eps_c * (p.W * e[j] - w_y);
    grad[j][y[j]] = static_cast<scalar_t>(gb[j] * dz);
  }
}

// Gradient of one non-ignored row: grad_c = g * beta * dL/dz_c (written when grad != nullptr),
// with p_c = exp(beta (x_c - m) - ls) (exactly exp(-ls) at the maximum), except the true
// class's element: its log p_y goes to *lp_y, for write_true_class over the row's group
// (a row without a softmax is all NaN, its *lp_y NaN).
// Returns S = sum over non-masked c of dL/dz_c * z_c (when need_t), for dL/dT = -(g/T) * S,
// computed shifted by beta m (sum_c dL/dz_c = 0): sum_{non-masked} dz_c beta (x_c - m)
// - beta m sum_{masked} dz_c, so that large logits keep their digits; summed in double.
template <typename scalar_t, typename acc_t>
inline double row_grad(const CEParams<acc_t>& p, const scalar_t* x, scalar_t* grad, acc_t m,
                      acc_t ls, int64_t y, acc_t g, bool need_t, acc_t* xbuf, acc_t* gbuf,
                      acc_t* lp_y) {
  constexpr int64_t V = Vec<acc_t>::size();
  const int64_t C = p.C;
  const acc_t w_y = p.weight_of(y);
  const acc_t A = p.A_of(w_y);
  const acc_t gb = g * p.beta;
  if (!(std::isfinite(m) && std::isfinite(ls))) {  // no softmax: NaN gradient
    if (grad != nullptr) std::fill(grad, grad + C, static_cast<scalar_t>(kNaN<acc_t>));
    *lp_y = kNaN<acc_t>;
    return std::numeric_limits<double>::quiet_NaN();
  }
  const Vec<acc_t> vbeta(p.beta), vm(m), vnls(-ls), vcoef(gb * A), vcw(gb * p.eps_c), vA(A),
      veps_c(p.eps_c), vninf(kNegInf<acc_t>), vzero(0), vone(1);
  DoubleSum<acc_t> vS, vM;
  const acc_t x_y = static_cast<acc_t>(x[y]);  // read before the row is overwritten (in place)
  *lp_y = p.beta * (x_y - m) - ls;
  const ScaledExp<acc_t> pexp(p.beta, -ls);  // p = exp(beta (x - m) - ls)
  auto step = [&](const Vec<acc_t>& xv, const Vec<acc_t>& wv, acc_t* o, int64_t k) {
    const Vec<acc_t> d = xv - vm;
    const Vec<acc_t> e = pexp(d);
    if (grad != nullptr) {
      const Vec<acc_t> gv = vcoef * e - vcw * wv;
      if (k == V) gv.store(o); else gv.store(o, k);
    }
    if (need_t) {
      const Vec<acc_t> dz = vA * e - veps_c * wv;
      const Vec<acc_t> live = xv > vninf;
      vS.add(Vec<acc_t>::blendv(vzero, dz * (d * vbeta), live));
      vM.add(Vec<acc_t>::blendv(dz, vzero, live));
    }
  };
  for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
    const int64_t n = std::min(kChunk, C - c0);
    const acc_t* xa = as_acc(x + c0, n, xbuf);
    acc_t* out = std::is_same_v<scalar_t, acc_t> && grad != nullptr
                     ? reinterpret_cast<acc_t*>(grad + c0)
                     : gbuf;
    const acc_t* wc = p.smoothing_weights() == nullptr ? nullptr : p.w + c0;
    int64_t i = 0;
    for (; i + V <= n; i += V)
      step(Vec<acc_t>::loadu(xa + i), wc == nullptr ? vone : Vec<acc_t>::loadu(wc + i), out + i, V);
    if (i < n) {  // one masked vector for the rest; unused lanes: x = -inf, weight 0
      const int64_t k = n - i;
      const Tail<acc_t> t = load_tail(xa + i, k);
      const Vec<acc_t> wv = wc == nullptr ? Vec<acc_t>::blendv(vzero, vone, t.lanes)
                                          : Vec<acc_t>::loadu(wc + i, k);
      step(t.masked, wv, out + i, k);
    }
    if (grad != nullptr) store_from_acc(out, grad + c0, n);
  }
  if (!need_t) return 0;
  double S = vS.sum(), masked = vM.sum();
  const double ty = -(acc_t(1) - p.eps) * w_y;  // the rest of dz_y
  if (x_y > kNegInf<acc_t>) S += ty * static_cast<double>(p.beta * (x_y - m));
  else masked += ty;
  if (masked != 0) S -= static_cast<double>(p.beta) * static_cast<double>(m) * masked;
  return S;
}

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
  alignas(64) int32_t col[R];            // l * C: the first class of row l in a row-major tile
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
  alignas(64) double S[R];  // the row's sum for dL/dT (row_grad), in double
  alignas(64) int32_t yidx[R];  // l * C + y (y = 0 for ignored rows)
  int64_t y[R];
  bool valid[R];  // not ignored
  bool ok[R];     // has a softmax
};

struct TileBuffers {
  static constexpr int64_t R = Vec<float>::size();
  alignas(64) float tb[kTileMaxC * R];   // row-major tile in float
  alignas(64) float tT[kTileMaxC * R];   // transposed: class c of the R rows at tT + c R
  alignas(64) float gT[kTileMaxC * R];   // transposed gradient
  alignas(64) float ob[kTileMaxC * R];   // row-major gradient in float
};

// Loads rows [i0, i0 + nr) into the tile, reads the targets (checked: an error names the row)
// and gathers the classes into tT. Returns the row-major tile (tb, or the logits themselves).
template <typename scalar_t>
inline const float* tile_load(const TileShape& ts, const scalar_t* x, int64_t row_stride,
                              const int64_t* target, int64_t ignore_index, int64_t i0, int64_t nr,
                              TileBuffers& b, TileRows& t, const char* op) {
  constexpr int64_t R = TileShape::R;
  const int64_t C = ts.C;
  const float* tile;
  if (row_stride == C) {
    // The tile 4 tiles ahead (<= 2 KB) prefetched into L1: the gathers below (float32, read in
    // place) or the conversion stall on each line's miss otherwise (the hardware prefetcher
    // alone left 1e6 x 10 float32 forward at 19.4 ms, 15.1 with this; fwd+bwd 46.6 -> 37.1).
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
      TORCH_CHECK(y >= 0 && y < C, op, ": target[", i0 + l, "] = ", y, " is out of range for ",
                  C, " classes (ignore_index = ", ignore_index, ")");
    } else {
      y = 0;
    }
    t.y[l] = y;
    t.valid[l] = valid;
    t.yidx[l] = static_cast<int32_t>(l * C + y);
  }
  const at::vec::Vectorized<int32_t> vcol = at::vec::Vectorized<int32_t>::loadu(ts.col);
  for (int64_t c = 0; c < C; ++c) at::vec::gather<4>(tile + c, vcol).store(b.tT + c * R);
  return tile;
}

// Forward of a loaded tile: per lane m, ls, x_y and the loss (see RowStats and row_loss).
template <bool kDot>
inline void tile_forward(const TileShape& ts, const CEParams<float>& p, const float* tile,
                         TileBuffers& b, TileRows& t) {
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
    if constexpr (kDot) D = at::vec::fmadd(V(p.weight_of(c)), vm - xv, D);
  }
  const V ls = ((n1 - one) + rest).log1p();
  const V xy = at::vec::gather<4>(tile, at::vec::Vectorized<int32_t>::loadu(t.yidx));
  V wy = one;
  if (p.w != nullptr) {
    alignas(64) float wyl[R];
    for (int64_t l = 0; l < R; ++l) wyl[l] = p.w[t.y[l]];
    wy = V::loadu(wyl);
  }
  V loss = V(1 - p.eps) * wy * (vb * (vm - xy) + ls);
  if constexpr (kDot) loss = loss + V(p.eps_c) * (vb * D + V(p.W) * ls);
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
// sum for dL/dT (see row_grad).
template <typename scalar_t>
inline void tile_grad(const TileShape& ts, const CEParams<float>& p, TileBuffers& b, TileRows& t,
                      int64_t nr, bool need_t, scalar_t* out) {
  constexpr int64_t R = TileShape::R;
  using V = Vec<float>;
  const int64_t C = ts.C;
  alignas(64) float ml[R], lsl[R], coefl[R], cwl[R], Al[R], wyl[R];
  for (int64_t l = 0; l < R; ++l) {
    const bool live = t.valid[l] && t.ok[l];
    const float w_y = p.weight_of(t.y[l]);
    const float A = p.A_of(w_y);
    const float gb = live ? t.g[l] * p.beta : 0.0f;
    ml[l] = live ? t.m[l] : 0.0f;
    lsl[l] = live ? t.ls[l] : 0.0f;
    coefl[l] = gb * A;
    cwl[l] = gb * p.eps_c;
    Al[l] = A;
    wyl[l] = w_y;
  }
  const V vm = V::loadu(ml), vnls = V(0) - V::loadu(lsl), vcoef = V::loadu(coefl),
          vcw = V::loadu(cwl), vA = V::loadu(Al), vb(p.beta), veps_c(p.eps_c),
          vninf(kNegInf<float>), zero(0);
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
      const V dz = vA * e - veps_c * wc;
      const V live = xv > vninf;
      vS.add(V::blendv(zero, dz * (dd * vb), live));
      vM.add(V::blendv(dz, zero, live));
    }
  }
  // the true class: (1 - eps) w_y expm1(log p_y) + (eps/C) (W p_y - w_y)  (write_true_class)
  const V vwy = V::loadu(wyl);
  const V lp = vb * (V::loadu(t.xy) - vm) + vnls;
  V dzy = V(1 - p.eps) * vwy * lp.expm1();
  if (p.eps > 0) dzy = dzy + veps_c * (V(p.W) * lp.exp() - vwy);
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
    if (need_t) {
      double S = Sl[l], masked = Ml[l];
      const double ty = -(1 - p.eps) * wyl[l];
      if (t.xy[l] > kNegInf<float>) S += ty * static_cast<double>(p.beta * (t.xy[l] - t.m[l]));
      else masked += ty;
      if (masked != 0) S -= static_cast<double>(p.beta) * static_cast<double>(t.m[l]) * masked;
      t.S[l] = S;
    }
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

// The tile path over blocks [b0, b1) of reduce_block_rows(rows) rows; false (nothing done) where it does
// not apply (float64, or C > kTileMaxC). Per-row outputs go through `emit`, as in the row path.
template <typename scalar_t, typename Emit>
bool fwd_tile_blocks(const CEParams<at::opmath_type<scalar_t>>& p, const scalar_t* x,
                     int64_t row_stride, int64_t rows, int64_t b0, int64_t b1, const char* op,
                     Emit& emit, std::vector<double>& part) {
  if constexpr (!std::is_same_v<at::opmath_type<scalar_t>, float>) {
    return false;
  } else {
    if (!use_tiles<scalar_t>(p.C)) return false;
    const int64_t bs = reduce_block_rows(rows);
    constexpr int64_t R = TileShape::R;
    const TileShape ts(p.C);
    TileBuffers bufs;
    TileRows t;
    for (int64_t b = b0; b < b1; ++b) {
      double sum = 0;
      const int64_t end = std::min(rows, (b + 1) * bs);
      for (int64_t i0 = b * bs; i0 < end; i0 += R) {
        const int64_t nr = std::min(R, end - i0);
        const float* tile = tile_load(ts, x, row_stride, p.target, p.ignore_index, i0, nr, bufs,
                                      t, op);
        if (p.eps > 0) tile_forward<true>(ts, p, tile, bufs, t);
        else tile_forward<false>(ts, p, tile, bufs, t);
        for (int64_t l = 0; l < nr; ++l) emit(i0 + l, t.valid[l], t.m[l], t.ls[l], t.loss[l], sum);
      }
      part[b] = sum;
    }
    return true;
  }
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

template <typename scalar_t>
bool bwd_tile_blocks(const CEParams<at::opmath_type<scalar_t>>& p, const scalar_t* x,
                     int64_t row_stride, int64_t rows, int64_t b0, int64_t b1, const char* op,
                     const at::opmath_type<scalar_t>* lse_p, const GradScale& gs, bool need_t,
                     at::opmath_type<scalar_t> invT, scalar_t* gx, std::vector<double>& part) {
  if constexpr (!std::is_same_v<at::opmath_type<scalar_t>, float>) {
    return false;
  } else {
    if (!use_tiles<scalar_t>(p.C)) return false;
    const int64_t bs = reduce_block_rows(rows);
    const int64_t C = p.C;
    constexpr int64_t R = TileShape::R;
    const TileShape ts(C);
    TileBuffers bufs;
    TileRows t;
    for (int64_t b = b0; b < b1; ++b) {
      double sum_t = 0;
      const int64_t end = std::min(rows, (b + 1) * bs);
      for (int64_t i0 = b * bs; i0 < end; i0 += R) {
        const int64_t nr = std::min(R, end - i0);
        const float* tile = tile_load(ts, x, row_stride, p.target, p.ignore_index, i0, nr, bufs,
                                      t, op);
        for (int64_t l = 0; l < R; ++l) {
          const bool in = l < nr;
          t.m[l] = in ? lse_p[2 * (i0 + l)] : 0.0f;
          t.ls[l] = in ? lse_p[2 * (i0 + l) + 1] : 0.0f;
          t.ok[l] = std::isfinite(t.m[l]) && std::isfinite(t.ls[l]);
          t.xy[l] = tile[t.yidx[l]];
          t.g[l] = in && t.valid[l] ? grad_of_row<float>(gs, i0 + l) : 0.0f;
        }
        tile_grad(ts, p, bufs, t, nr, need_t, gx + i0 * C);
        if (need_t)
          for (int64_t l = 0; l < nr; ++l)
            if (t.valid[l]) sum_t += -static_cast<double>(t.g[l]) * t.S[l] * invT;
      }
      part[b] = sum_t;
    }
    return true;
  }
}

template <typename scalar_t, typename Emit>
bool fused_tile_blocks(const CEParams<at::opmath_type<scalar_t>>& p, const scalar_t* x,
                       int64_t row_stride, int64_t rows, int64_t b0, int64_t b1, const char* op,
                       at::opmath_type<scalar_t> g, bool need_t, scalar_t* grad_out, Emit& emit,
                       std::vector<double>& part_loss, std::vector<double>& part_t) {
  if constexpr (!std::is_same_v<at::opmath_type<scalar_t>, float>) {
    return false;
  } else {
    if (!use_tiles<scalar_t>(p.C)) return false;
    const int64_t bs = reduce_block_rows(rows);
    const int64_t C = p.C;
    constexpr int64_t R = TileShape::R;
    const TileShape ts(C);
    TileBuffers bufs;
    TileRows t;
    for (int64_t b = b0; b < b1; ++b) {
      double sl = 0, st = 0;
      const int64_t end = std::min(rows, (b + 1) * bs);
      for (int64_t i0 = b * bs; i0 < end; i0 += R) {
        const int64_t nr = std::min(R, end - i0);
        const float* tile = tile_load(ts, x, row_stride, p.target, p.ignore_index, i0, nr, bufs,
                                      t, op);
        if (p.eps > 0) tile_forward<true>(ts, p, tile, bufs, t);
        else tile_forward<false>(ts, p, tile, bufs, t);
        for (int64_t l = 0; l < R; ++l) t.g[l] = g;
        tile_grad(ts, p, bufs, t, nr, need_t, grad_out + i0 * C);
        for (int64_t l = 0; l < nr; ++l) {
          const bool v = t.valid[l];
          emit(i0 + l, v ? t.loss[l] : 0.0f,
               v && need_t ? static_cast<float>(-static_cast<double>(g) * t.S[l] * p.beta) : 0.0f,
               sl, st);
        }
      }
      part_loss[b] = sl;
      part_t[b] = st;
    }
    return true;
  }
}

// ------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> tsce_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction) {
  const char* op = op_name(Op::kCrossEntropy);
  checks::cross_entropy(Backend::kCpu, Op::kCrossEntropy, logits, target, weight, temperature_t,
                        temperature, label_smoothing, reduction);
  const double T = checks::host_temperature(Op::kCrossEntropy, temperature_t, temperature);
  const int64_t rows = logits.size(0), C = logits.size(1);
  const auto acc_st = acc_type(logits.scalar_type());
  at::Tensor lse = at::empty({rows, 2}, logits.options().dtype(acc_st));
  // reduction none: the per-row losses are written (acc); otherwise they are summed per block of
  // reduce_block_rows(rows) rows (no per-row buffer)
  at::Tensor loss = reduction == kNone ? at::empty({rows}, logits.options().dtype(acc_st))
                                       : at::Tensor();
  at::Tensor denom_t = at::empty({}, logits.options().dtype(acc_st));
  const at::Tensor tgt = target.contiguous();
  const int64_t row_stride = logits.stride(0);
  const int64_t bs = reduce_block_rows(rows);
  const int64_t blocks = (rows + bs - 1) / bs;
  std::vector<double> part(blocks, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tsce_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> wbuf;
    const auto p = make_params<acc_t>(C, tgt, weight, wbuf, T, label_smoothing, ignore_index);
    const double denom = check_targets_and_denom(p, rows, op);
    denom_t.fill_(denom);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    acc_t* lse_p = lse.data_ptr<acc_t>();
    acc_t* loss_p = reduction == kNone ? loss.data_ptr<acc_t>() : nullptr;
    // one row's results: lse, and its loss written or added to the block's sum
    auto emit = [&](int64_t i, bool valid, acc_t m, acc_t ls, acc_t l, double& sum) {
      lse_p[2 * i] = valid ? m : acc_t(0);  // ignored rows: [0, 0], loss 0
      lse_p[2 * i + 1] = valid ? ls : acc_t(0);
      const acc_t li = valid ? l : acc_t(0);
      if (loss_p != nullptr) loss_p[i] = li;
      else sum += static_cast<double>(li);
    };
    const int64_t grain = std::max<int64_t>(1, row_grain(C) / bs);
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      if (fwd_tile_blocks(p, x, row_stride, rows, b0, b1, op, emit, part)) return;
      std::vector<acc_t> buf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk);
      RowStats<acc_t> st[kGroup];
      alignas(64) acc_t ls[kGroup];
      NextMax carry;
      for (int64_t b = b0; b < b1; ++b) {
        double sum = 0;
        const int64_t end = std::min(rows, (b + 1) * bs);
        for (int64_t i0 = b * bs; i0 < end; i0 += kGroup) {
          const int64_t ng = std::min(kGroup, end - i0);
          for (int64_t j = 0; j < ng; ++j) {
            const int64_t i = i0 + j;
            ls[j] = 0;
            if (p.target[i] == ignore_index) continue;
            const scalar_t* xr = x + i * row_stride;
            st[j] = row_stats(xr, C, p.beta, p.w, p.eps > 0, buf.data(),
                              i + 1 < end ? xr + row_stride : nullptr, &carry);
            ls[j] = st[j].arg();
          }
          log1p_n(ls, ng);
          for (int64_t j = 0; j < ng; ++j) {
            const int64_t i = i0 + j, y = p.target[i];
            if (y == ignore_index) {
              emit(i, false, 0, 0, 0, sum);
              continue;
            }
            acc_t lse_r[2];
            const acc_t l = row_loss(p, x + i * row_stride, st[j], ls[j], y, lse_r);
            emit(i, true, lse_r[0], lse_r[1], l, sum);
          }
        }
        part[b] = sum;
      }
    });
  });

  if (reduction != kNone) {
    double total = 0;
    for (double v : part) total += v;
    if (reduction == kMean) total /= denom_t.item<double>();  // 0/0 = NaN when all are ignored
    loss = at::scalar_tensor(total, logits.options().dtype(acc_st));
  }
  return {loss, lse, denom_t};
}

std::tuple<at::Tensor, at::Tensor> tsce_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& denom,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_logits_grad, bool need_temperature_grad) {
  const char* op = op_name(Op::kCrossEntropyBwd);
  checks::cross_entropy_bwd(Backend::kCpu, grad_loss, logits, target, weight, lse, denom,
                            temperature_t, temperature, label_smoothing, reduction);
  const double T = checks::host_temperature(Op::kCrossEntropyBwd, temperature_t, temperature);
  const int64_t rows = logits.size(0), C = logits.size(1);
  const auto acc_st = acc_type(logits.scalar_type());
  const at::Tensor lse_c = lse.contiguous();
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  at::Tensor grad = need_logits_grad ? new_grad_buffer(logits) : logits.new_empty({0});
  const int64_t bs = reduce_block_rows(rows);
  const int64_t blocks = (rows + bs - 1) / bs;
  std::vector<double> part(blocks, 0.0);  // per block of rows: sum of dL_i/dT
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
    const acc_t* lse_p = lse_c.const_data_ptr<acc_t>();
    const acc_t invT = static_cast<acc_t>(1.0 / T);
    const int64_t grain = std::max<int64_t>(1, row_grain(C) / bs);
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      if (gx != nullptr &&
          bwd_tile_blocks(p, x, row_stride, rows, b0, b1, op, lse_p, gs, need_t, invT, gx, part))
        return;
      std::vector<acc_t> xbuf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk);
      std::vector<acc_t> gbuf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk);
      scalar_t* grs[kGroup];
      int64_t ys[kGroup];
      alignas(64) acc_t gbs[kGroup], lps[kGroup];
      for (int64_t b = b0; b < b1; ++b) {
        double sum_t = 0;
        const int64_t end = std::min(rows, (b + 1) * bs);
        for (int64_t i0 = b * bs; i0 < end; i0 += kGroup) {
          const int64_t ng = std::min(kGroup, end - i0);
          for (int64_t j = 0; j < ng; ++j) {
            const int64_t i = i0 + j, y = p.target[i];
            scalar_t* gr = gx == nullptr ? nullptr : gx + i * C;
            grs[j] = nullptr;
            ys[j] = 0;
            if (y == ignore_index) {
              if (gr != nullptr) std::fill(gr, gr + C, scalar_t(0));
              continue;
            }
            TORCH_CHECK(y >= 0 && y < C, op, ": target[", i, "] = ", y, " is out of range for ",
                        C, " classes");
            const acc_t g = grad_of_row<acc_t>(gs, i);
            const double S = row_grad(p, x + i * row_stride, gr, lse_p[2 * i], lse_p[2 * i + 1],
                                      y, g, need_t, xbuf.data(), gbuf.data(), &lps[j]);
            if (need_t) sum_t += -static_cast<double>(g) * S * invT;
            if (gr != nullptr && !std::isnan(lps[j])) grs[j] = gr;
            ys[j] = y;
            gbs[j] = g * p.beta;
          }
          if (gx != nullptr) write_true_class(p, grs, ys, gbs, lps, ng);
        }
        part[b] = sum_t;
      }
    });
  });

  const auto t_dtype = temp_grad_type(temperature_t, logits.scalar_type());
  at::Tensor grad_t = at::zeros({}, logits.options().dtype(t_dtype));
  if (need_t) {
    double total = 0;
    for (double v : part) total += v;
    grad_t.fill_(total);
  }
  return {grad, grad_t};
}

// Fused forward: loss and gradient (upstream gradient 1) in one call. `grad_out` may alias the
// logits (in-place mode): each row (each tile) is read completely before its gradient is
// written. reduction none: per-row loss and dL_i/dT into loss_rows / grad_t_rows; otherwise
// their sums per block of reduce_block_rows(rows) rows into part_loss / part_t (no per-row buffers).
template <typename scalar_t>
void tsce_fused_impl(const at::Tensor& logits, scalar_t* grad_out, const at::Tensor& target,
                     const std::optional<at::Tensor>& weight, double T, double label_smoothing,
                     int64_t ignore_index, int64_t reduction, bool need_t, at::Tensor& loss_rows,
                     at::Tensor& grad_t_rows, std::vector<double>& part_loss,
                     std::vector<double>& part_t, double& denom, const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = logits.size(0), C = logits.size(1);
  std::vector<acc_t> wbuf;
  const auto p = make_params<acc_t>(C, target, weight, wbuf, T, label_smoothing, ignore_index);
  denom = check_targets_and_denom(p, rows, op);
  const acc_t g = reduction == kMean ? static_cast<acc_t>(1.0 / denom) : acc_t(1);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const int64_t row_stride = logits.stride(0);
  const bool per_row = reduction == kNone;
  acc_t* loss_p = per_row ? loss_rows.data_ptr<acc_t>() : nullptr;
  acc_t* gt_p = per_row && need_t ? grad_t_rows.data_ptr<acc_t>() : nullptr;
  const int64_t bs = reduce_block_rows(rows);
  const int64_t blocks = (rows + bs - 1) / bs;
  part_loss.assign(blocks, 0.0);
  part_t.assign(blocks, 0.0);
  auto emit = [&](int64_t i, acc_t l, acc_t gt, double& sl, double& st) {
    if (per_row) {
      loss_p[i] = l;
      if (gt_p != nullptr) gt_p[i] = gt;
    } else {
      sl += static_cast<double>(l);
      st += static_cast<double>(gt);
    }
  };
  const int64_t grain = std::max<int64_t>(1, row_grain(C) / bs);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    if (fused_tile_blocks(p, x, row_stride, rows, b0, b1, op, g, need_t, grad_out, emit, part_loss,
                          part_t))
      return;
    std::vector<acc_t> xbuf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk);
    std::vector<acc_t> gbuf(std::is_same_v<scalar_t, acc_t> ? 0 : kChunk);
    // Rows per group: their stats are taken first, then their gradients written while the
    // group (<= kFusedGroupBytes of logits) is still in L1/L2.
    constexpr int64_t kFusedGroupBytes = 32768;
    const int64_t G = std::clamp<int64_t>(
        kFusedGroupBytes / std::max<int64_t>(1, C * static_cast<int64_t>(sizeof(scalar_t))), 1,
        kGroup);
    RowStats<acc_t> rs[kGroup];
    alignas(64) acc_t ls[kGroup], gbs[kGroup], lps[kGroup];
    scalar_t* grs[kGroup];
    int64_t ys[kGroup];
    NextMax carry;
    for (int64_t b = b0; b < b1; ++b) {
      double sl = 0, st = 0;
      const int64_t end = std::min(rows, (b + 1) * bs);
      for (int64_t i0 = b * bs; i0 < end; i0 += G) {
        const int64_t ng = std::min(G, end - i0);
        for (int64_t j = 0; j < ng; ++j) {
          const int64_t i = i0 + j;
          ls[j] = 0;
          if (p.target[i] == ignore_index) continue;
          const scalar_t* xr = x + i * row_stride;
          rs[j] = row_stats(xr, C, p.beta, p.w, p.eps > 0, xbuf.data(),
                            i + 1 < end ? xr + row_stride : nullptr, &carry);
          ls[j] = rs[j].arg();
        }
        log1p_n(ls, ng);
        for (int64_t j = 0; j < ng; ++j) {
          const int64_t i = i0 + j, y = p.target[i];
          scalar_t* gr = grad_out + i * C;
          grs[j] = nullptr;
          ys[j] = 0;
          if (y == ignore_index) {
            std::fill(gr, gr + C, scalar_t(0));
            emit(i, 0, 0, sl, st);
            continue;
          }
          const scalar_t* xr = x + i * row_stride;
          acc_t lse[2];
          const acc_t l = row_loss(p, xr, rs[j], ls[j], y, lse);
          // A row without a softmax has lse = NaN: row_grad gives NaN there, like its loss.
          const double S = row_grad(p, xr, gr, lse[0], lse[1], y, g, need_t, xbuf.data(),
                                    gbuf.data(), &lps[j]);
          if (!std::isnan(lps[j])) grs[j] = gr;
          ys[j] = y;
          gbs[j] = g * p.beta;
          emit(i, l, need_t ? static_cast<acc_t>(-static_cast<double>(g) * S * p.beta) : acc_t(0),
               sl, st);
        }
        write_true_class(p, grs, ys, gbs, lps, ng);
      }
      part_loss[b] = sl;
      part_t[b] = st;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> finish_fused(const at::Tensor& logits, at::Tensor& loss_rows,
                                                at::Tensor& grad_t_rows,
                                                const std::vector<double>& part_loss,
                                                const std::vector<double>& part_t, double denom,
                                                int64_t reduction, bool need_t,
                                                const std::optional<at::Tensor>& temperature_t) {
  const auto t_dtype = temp_grad_type(temperature_t, logits.scalar_type());
  const auto acc_st = acc_type(logits.scalar_type());
  at::Tensor loss, grad_t;
  if (reduction == kNone) {
    loss = loss_rows;
    grad_t = need_t ? grad_t_rows.to(t_dtype) : at::zeros({logits.size(0)}, logits.options().dtype(t_dtype));
  } else {
    double total = 0, total_t = 0;
    for (double v : part_loss) total += v;
    if (need_t)
      for (double v : part_t) total_t += v;
    if (reduction == kMean) total /= denom;
    loss = at::scalar_tensor(total, logits.options().dtype(acc_st));
    grad_t = at::scalar_tensor(total_t, logits.options().dtype(t_dtype));
  }
  return {loss, grad_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tsce_fused_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_temperature_grad) {
  const char* op = op_name(Op::kCrossEntropyFused);
  checks::cross_entropy(Backend::kCpu, Op::kCrossEntropyFused, logits, target, weight,
                        temperature_t, temperature, label_smoothing, reduction);
  const double T = checks::host_temperature(Op::kCrossEntropyFused, temperature_t, temperature);
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  const auto acc_st = acc_type(logits.scalar_type());
  const int64_t rows = logits.size(0);
  at::Tensor grad = new_grad_buffer(logits);
  const bool per_row = reduction == kNone;
  at::Tensor loss_rows = at::empty({per_row ? rows : 0}, logits.options().dtype(acc_st));
  at::Tensor grad_t_rows = at::empty({per_row && need_t ? rows : 0}, logits.options().dtype(acc_st));
  std::vector<double> part_loss, part_t;
  double denom = 0;
  const at::Tensor tgt = target.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tsce_fused_cpu", [&] {
    tsce_fused_impl<scalar_t>(logits, grad.data_ptr<scalar_t>(), tgt, weight, T, label_smoothing,
                              ignore_index, reduction, need_t, loss_rows, grad_t_rows, part_loss, part_t,
                              denom, op);
  });
  auto [loss, grad_t] = finish_fused(logits, loss_rows, grad_t_rows, part_loss, part_t, denom, reduction, need_t,
                      temperature_t);
  return {loss, grad, grad_t};
}

std::tuple<at::Tensor, at::Tensor> tsce_fused_inplace_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_temperature_grad) {
  const char* op = op_name(Op::kCrossEntropyFusedInplace);
  checks::cross_entropy(Backend::kCpu, Op::kCrossEntropyFusedInplace, logits, target, weight,
                        temperature_t, temperature, label_smoothing, reduction);
  const double T =
      checks::host_temperature(Op::kCrossEntropyFusedInplace, temperature_t, temperature);
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  const auto acc_st = acc_type(logits.scalar_type());
  const int64_t rows = logits.size(0);
  const bool per_row = reduction == kNone;
  at::Tensor loss_rows = at::empty({per_row ? rows : 0}, logits.options().dtype(acc_st));
  at::Tensor grad_t_rows = at::empty({per_row && need_t ? rows : 0}, logits.options().dtype(acc_st));
  std::vector<double> part_loss, part_t;
  double denom = 0;
  const at::Tensor tgt = target.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tsce_fused_inplace_cpu", [&] {
    tsce_fused_impl<scalar_t>(logits, const_cast<scalar_t*>(logits.const_data_ptr<scalar_t>()),
                              tgt, weight, T, label_smoothing, ignore_index, reduction, need_t,
                              loss_rows, grad_t_rows, part_loss, part_t, denom, op);
  });
  return finish_fused(logits, loss_rows, grad_t_rows, part_loss, part_t, denom, reduction, need_t,
                      temperature_t);
}

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
      const bool ok = st.has_softmax();
      // z - lse = beta (x - m) - ls: exactly -ls at the maximum
      const Vec<acc_t> vb(beta), vm(ok ? st.m : acc_t(0)), vl(ok ? -st.ls() : acc_t(0));
      for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
        const int64_t n = std::min(kChunk, C - c0);
        const acc_t* xa = as_acc(xr + c0, n, xbuf.data());
        acc_t* oa = obuf.data();
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
      for (int64_t j = 0; j < nj; ++j) { m[j] = kNegInf<acc_t>; s[j] = 0; n1[j] = 0; }
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = 0; j < nj; ++j) {
          const acc_t v = static_cast<acc_t>(xb[c * inner + j]);
          m[j] = (std::isnan(v) || v > m[j]) ? v : m[j];
        }
      // exps relative to the max, the exact ones (at the max) counted apart (see RowStats)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = 0; j < nj; ++j) {
          const acc_t d = beta * (static_cast<acc_t>(xb[c * inner + j]) - m[j]);
          if (d == 0) n1[j] += 1;
          else s[j] += std::exp(d);
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
  dim = checks::softmax_bwd(Backend::kCpu, log, grad_out_in, out_in, temperature_t, temperature,
                            dim);
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
          double r = 0;  // E_y[log y], the centre of the T-gradient sum (need_t only)
          for (int64_t c = 0; c < C; ++c) {
            const acc_t gv = static_cast<acc_t>(gp[base + c * inner]);
            const acc_t ov = static_cast<acc_t>(op_[base + c * inner]);
            dot += log ? gv : gv * ov;
            if (tr != nullptr && (log ? ov > kNegInf<acc_t> : ov > 0)) {
              const double yd = log ? std::exp(double(ov)) : double(ov);
              r += yd * (log ? double(ov) : std::log(yd));
            }
          }
          // S = sum_c dz_c log y_c over the classes with y > 0 (finite log y), summed in double
          // and centred on r (sum_c dz_c = 0): the rounding of dz then meets |log y - r|, the
          // spread of the logits, not |log y|. Where classes are skipped (y == 0), their
          // sum_c dz_c is not 0 and the centring is undone exactly.
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
            // log_softmax: every class with a finite output contributes (dz = g there, not 0,
            // however small y is); softmax: y == 0 gives dz == 0
            if (log ? ov > kNegInf<acc_t> : y > 0) {
              const double yd = log ? std::exp(double(ov)) : double(y);
              const double dzd = log ? double(gv) - yd * double(dot) : yd * (double(gv) - double(dot));
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

// ------------------------------------------------------------------------------------------
// Temperature statistics: [sum NLL, sum (E_p[x] - x_y), sum Var_p[x], rows] at beta, float64.
// Per row: the max is found first (the row then sits in cache), then one walk accumulates
// sum e, sum e d, sum e d^2 with d = x - max (centred, so the variance does not cancel).
// ------------------------------------------------------------------------------------------

at::Tensor temperature_stats_cpu(const at::Tensor& logits, const at::Tensor& target, double beta_d) {
  const char* op = op_name(Op::kTemperatureStats);
  checks::temperature_stats(Backend::kCpu, logits, target, beta_d);
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
        Vec<acc_t> v0(0), v1(0), v2(0), vn(0);
        acc_t s0 = 0, s1 = 0, s2 = 0, n1 = 0;
        for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
          const int64_t n = std::min(kChunk, C - c0);
          const acc_t* xa = as_acc(xr + c0, n, buf.data());
          int64_t c = 0;
          for (; c + V <= n; c += V) {
            const Vec<acc_t> xv = Vec<acc_t>::loadu(xa + c);
            const Vec<acc_t> d = Vec<acc_t>::blendv(vzero, xv - vm, xv > vninf);
            const Vec<acc_t> e = vexp(Vec<acc_t>::blendv(vninf, d * vb, xv > vninf));
            const Vec<acc_t> ed = e * d;
            const Vec<acc_t> at_max = d == vzero;  // e == 1 exactly: counted apart (RowStats)
            v0 = v0 + Vec<acc_t>::blendv(e, vzero, at_max);
            vn = vn + Vec<acc_t>::blendv(vzero, Vec<acc_t>(1), at_max & (xv > vninf));
            v1 = v1 + ed;
            v2 = at::vec::fmadd(ed, d, v2);
          }
          for (; c < n; ++c) {
            const acc_t xv = xa[c];
            if (!(xv > kNegInf<acc_t>)) continue;
            const acc_t d = xv - mx, e = std::exp(beta * d);
            if (d == 0) n1 += 1;
            else s0 += e;
            s1 += e * d;
            s2 += e * d * d;
          }
        }
        auto sum = [](const Vec<acc_t>& v) {
          return at::vec::vec_reduce_all<acc_t>(std::plus<Vec<acc_t>>(), v);
        };
        // S0 = n1 + rest: log S0 = log1p(n1 - 1 + rest) keeps the digits of a confident row
        const double rest = static_cast<double>(s0 + sum(v0));
        const double N1 = static_cast<double>(n1 + sum(vn));
        const double S0 = N1 + rest;
        const double S1 = static_cast<double>(s1 + sum(v1));
        const double S2 = static_cast<double>(s2 + sum(v2));
        const double mean_d = S1 / S0;
        const double x_y = to_double(xr[tp[i]]);
        // NLL = lse(beta x) - beta x_y = beta*mx + log S0 - beta x_y
        nll_p[i] = beta_d * (static_cast<double>(mx) - x_y) + std::log1p((N1 - 1) + rest);
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
  m.impl("cross_entropy_fwd", &tsce_fwd_cpu);
  m.impl("cross_entropy_bwd", &tsce_bwd_cpu);
  m.impl("cross_entropy_fused", &tsce_fused_cpu);
  m.impl("cross_entropy_fused_", &tsce_fused_inplace_cpu);
  m.impl("scale_rows_", &scale_rows_cpu);
  m.impl("softmax_fwd", &softmax_fwd_cpu);
  m.impl("softmax_bwd", &softmax_bwd_cpu);
  m.impl("temperature_stats", &temperature_stats_cpu);
}

}  // namespace softcal
