// softcal CPU kernels: vector helpers shared by every op of csrc/cpu: exp and exp2 on vectors
// (AVX-512 intrinsics where built for it), conversions to the accumulation type, masked tails,
// maxima and sums of chunks, and sums in double lanes (the precision policy, docs/design.md §2).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <type_traits>

namespace softcal {
namespace cpu {

constexpr int64_t kChunk = 2048;  // elements of a row processed together (a chunk of float fits L1)

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

template <typename acc_t>
constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();

// A kernel's hot helper inlined into each caller (a row's statistics, a tile's load), as GCC
// did when one translation unit held every kernel; left to itself it now calls them (2 ms of
// the 13 ms bfloat16 forward at 1e6 x 10, benchmarks/NOTES.md).
#define SOFTCAL_ALWAYS_INLINE inline __attribute__((always_inline))

// The float32 AVX-512 routines below are used where the build targets AVX-512 (setup.py);
// -DSOFTCAL_EXP_U20 forces ATen's exp_u20 instead (for comparisons).
#if defined(CPU_CAPABILITY_AVX512) && !defined(SOFTCAL_EXP_U20)
#define SOFTCAL_AVX512_EXP 1
#else
#define SOFTCAL_AVX512_EXP 0
#endif

#if SOFTCAL_AVX512_EXP
// exp(x) for float32 lanes in 11 AVX-512 instructions: x = n ln2 + r with |r| <= ln2/2
// (Cody-Waite split of ln2), e^r by a degree-5 polynomial fitted on that interval with its
// constant term 1 (max relative error 1.05e-7 in exact arithmetic; exp(0) == 1 exactly), then
// scaled by 2^n with vscalefps, which also handles overflow. Inputs below log(FLT_MIN) give exactly
// 0 (so -inf gives 0 and no denormal is ever produced); NaN stays NaN.
inline __m512 exp_avx512(__m512 x) {
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33654f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(0.0082615288f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.041898742f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.16668114f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.49999142f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.99999952f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));  // exp(0) == 1 exactly
  return _mm512_maskz_scalef_ps(keep, p, n);
}
#endif


#if SOFTCAL_AVX512_EXP
// 2^t for float32 lanes (the polynomial of exp_avx512 above, rescaled to base 2:
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

#if SOFTCAL_AVX512_EXP
// exp(x) for float64 lanes: x clamped to [-760, 710] (NaN kept), x = n ln2 + r with |r| <= ln2/2
// (fdlibm's two-part ln2, both products exact under fma), e^r = 1 + r q(r) with q of degree 10
// fitted on that interval (Chebyshev, relative error 6e-18 in exact arithmetic; exp(0) == 1
// exactly), then scaled by 2^n with vscalefpd: one rounding, so results in the denormal range
// are rounded, not flushed, x < -745.2 gives 0 (-inf gives 0) and x > 709.8 gives inf. About
// 1 ulp at most against a float128 reference (tests/loss/test_exp_double.py), as Sleef's u10
// exp of ATen; 17 instructions.
inline __m512d exp_pd_avx512(__m512d x) {
  x = _mm512_min_pd(_mm512_set1_pd(710.0), _mm512_max_pd(_mm512_set1_pd(-760.0), x));
  const __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(1.4426950408889634)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(6.93147180369123816490e-01), x);
  r = _mm512_fnmadd_pd(n, _mm512_set1_pd(1.90821492927058770002e-10), r);
  __m512d q = _mm512_set1_pd(2.5105217004720745163e-8);
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(2.7626371065696356075e-7));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(2.755725540020642443e-6));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(0.000024801504313785540166));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(0.00019841269874820625271));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(0.0013888888932514779355));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(0.0083333333333261351258));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(0.041666666666573067732));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(0.16666666666666670991));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(0.50000000000000056225));
  q = _mm512_fmadd_pd(q, r, _mm512_set1_pd(1.0));
  return _mm512_scalef_pd(_mm512_fmadd_pd(q, r, _mm512_set1_pd(1.0)), n);
}
#endif

// exp on a vector. float: the AVX-512 routine above where built for AVX-512, else ATen's
// polynomial exp_u20 (inputs below log(FLT_MIN) give exactly 0, so -inf gives 0); double: the
// AVX-512 routine above, else Sleef's 1-ulp exp.
template <typename acc_t>
inline Vec<acc_t> vexp(const Vec<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, float>) {
#if SOFTCAL_AVX512_EXP
    return Vec<float>(exp_avx512(v));
#else
    return v.exp_u20();
#endif
  } else {
#if SOFTCAL_AVX512_EXP
    return Vec<double>(exp_pd_avx512(v));
#else
    return v.exp();
#endif
  }
}


// exp(d * beta + c) on a vector: for float32 on AVX-512 as 2^(d * beta log2 e + c log2 e) with
// one fma (k = beta log2 e, kc = c log2 e precomputed), else exp of the fma.
template <typename acc_t>
struct ScaledExp {
  Vec<acc_t> beta, c, k, kc;
  ScaledExp(acc_t beta_, acc_t c_)
      : beta(beta_),
        c(c_),
        k(static_cast<acc_t>(beta_ * 1.4426950408889634)),
        kc(static_cast<acc_t>(c_ * 1.4426950408889634)) {}
  inline Vec<acc_t> operator()(const Vec<acc_t>& d) const {
#if SOFTCAL_AVX512_EXP
    if constexpr (std::is_same_v<acc_t, float>) {
      return Vec<acc_t>(exp2_avx512(_mm512_fmadd_ps(d, k, kc)));
    }
#endif
    return vexp(at::vec::fmadd(d, beta, c));
  }
};

// x[0:n] as acc_t: the pointer itself for float/double, else converted into buf.
template <typename scalar_t, typename acc_t>
inline const acc_t* as_acc(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    at::vec::convert(src, buf, n);
    return buf;
  }
}

// Writes acc values to dst (rounding to scalar_t); src may alias dst only when the types match.
template <typename scalar_t, typename acc_t>
inline void store_from_acc(const acc_t* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (src != dst) std::copy(src, src + n, dst);
  } else {
    at::vec::convert(src, dst, n);
  }
}

// The last n < V elements as a vector: `loaded` zero-filled, `masked` with the unused lanes set
// to -inf (so that they drop out of maxima and exps), `lanes` true on the used lanes.
template <typename acc_t>
struct Tail {
  Vec<acc_t> loaded, masked, lanes;
};

template <typename acc_t>
inline Tail<acc_t> load_tail(const acc_t* x, int64_t n) {
  Tail<acc_t> t;
  t.loaded = Vec<acc_t>::loadu(x, n);
  t.lanes = Vec<acc_t>::arange(acc_t(0), acc_t(1)) < Vec<acc_t>(static_cast<acc_t>(n));
  t.masked = Vec<acc_t>::blendv(Vec<acc_t>(kNegInf<acc_t>), t.loaded, t.lanes);
  return t;
}

// NaN-propagating max of x[0:n]. AVX-512: vmax (which drops a NaN of x) and a mask of the NaN
// lanes seen, two instructions a vector; else ATen's NaN-propagating maximum.
template <typename acc_t>
inline acc_t chunk_max(const acc_t* x, int64_t n) {
  constexpr int64_t V = Vec<acc_t>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, double> || std::is_same_v<acc_t, float>) {
    constexpr bool kD = std::is_same_v<acc_t, double>;
    using M = std::conditional_t<kD, __mmask8, __mmask16>;
    auto vmax = [](const Vec<acc_t>& a, const Vec<acc_t>& m) __attribute__((always_inline)) {
      if constexpr (kD)
        return Vec<acc_t>(_mm512_max_pd(a, m));  // m where a is NaN
      else
        return Vec<acc_t>(_mm512_max_ps(a, m));
    };
    auto nan_lanes = [](const Vec<acc_t>& a) __attribute__((always_inline)) {
      if constexpr (kD)
        return _mm512_cmp_pd_mask(a, a, _CMP_UNORD_Q);
      else
        return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    };
    Vec<acc_t> m0(kNegInf<acc_t>), m1(kNegInf<acc_t>);
    M nan0 = 0, nan1 = 0;
    int64_t i = 0;
    for (; i + 2 * V <= n; i += 2 * V) {
      const Vec<acc_t> a = Vec<acc_t>::loadu(x + i), b = Vec<acc_t>::loadu(x + i + V);
      m0 = vmax(a, m0);
      m1 = vmax(b, m1);
      nan0 |= nan_lanes(a);
      nan1 |= nan_lanes(b);
    }
    for (; i < n; i += V) {
      const Vec<acc_t> a = i + V <= n ? Vec<acc_t>::loadu(x + i) : load_tail(x + i, n - i).masked;
      m0 = vmax(a, m0);
      nan0 |= nan_lanes(a);
    }
    if (nan0 | nan1) return kNaN<acc_t>;
    if constexpr (kD)
      return _mm512_reduce_max_pd(vmax(m0, m1));
    else
      return _mm512_reduce_max_ps(vmax(m0, m1));
  }
#endif
  Vec<acc_t> m0(kNegInf<acc_t>), m1(kNegInf<acc_t>);
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    m0 = at::vec::maximum(m0, Vec<acc_t>::loadu(x + i));
    m1 = at::vec::maximum(m1, Vec<acc_t>::loadu(x + i + V));
  }
  for (; i + V <= n; i += V) m0 = at::vec::maximum(m0, Vec<acc_t>::loadu(x + i));
  if (i < n) m1 = at::vec::maximum(m1, load_tail(x + i, n - i).masked);
  return at::vec::vec_reduce_all<acc_t>(
      [](Vec<acc_t>& a, Vec<acc_t>& b) { return at::vec::maximum(a, b); },
      at::vec::maximum(m0, m1));
}

// The sum of a vector's lanes: one AVX-512 reduction where built for it (ATen's generic
// vec_reduce_all goes through the stack), else vec_reduce_all.
template <typename acc_t>
SOFTCAL_ALWAYS_INLINE acc_t hsum(const Vec<acc_t>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, double>) {
    return _mm512_reduce_add_pd(v);
  } else if constexpr (std::is_same_v<acc_t, float>) {
    return _mm512_reduce_add_ps(v);
  }
#endif
  return at::vec::vec_reduce_all<acc_t>(std::plus<Vec<acc_t>>(), v);
}

// sum_i x_i, or sum_i w_i x_i when w is given.
template <typename acc_t>
inline acc_t chunk_dot(const acc_t* x, const acc_t* w, int64_t n) {
  constexpr int64_t V = Vec<acc_t>::size();
  Vec<acc_t> s0(0);
  for (int64_t i = 0; i < n; i += V) {
    const int64_t k = std::min(V, n - i);
    const Vec<acc_t> xv = Vec<acc_t>::loadu(x + i, k);  // zero-filled past n
    s0 = w == nullptr ? s0 + xv : at::vec::fmadd(xv, Vec<acc_t>::loadu(w + i, k), s0);
  }
  return hsum(s0);
}


#if SOFTCAL_AVX512_EXP
// Max of x[0:n] ignoring NaN (-inf for none): one vmaxps a vector, four independent chains
// (the NaN-propagating chunk_max takes four instructions a vector). Its callers detect NaN
// through the exps: a NaN logit makes the sum of exps NaN (chunk_accumulate_f32 adds every lane
// that is not at the maximum, and NaN never compares equal to it).
SOFTCAL_ALWAYS_INLINE
float max_ignoring_nan_f32(const float* x, int64_t n) {
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
#endif

// a[j] = log1p(a[j]) for j < n (SLEEF's vector log1p, 1 ulp)
template <typename acc_t>
inline void log1p_n(acc_t* a, int64_t n) {
  constexpr int64_t V = Vec<acc_t>::size();
  for (int64_t j = 0; j < n; j += V) {
    const int64_t k = std::min(V, n - j);
    Vec<acc_t>::loadu(a + j, k).log1p().store(a + j, k);
  }
}

// A sum of acc vectors kept in double lanes: the precision policy of every reduction that feeds
// a gradient (the temperature gradient's sums over a row's classes; docs/design.md). A float
// vector is split into two double vectors (lanes [0, V/2) into lo, [V/2, V) into hi).
template <typename acc_t>
struct DoubleSum {
  Vec<double> lo = Vec<double>(0.0), hi = Vec<double>(0.0);
  inline void add(const Vec<acc_t>& v) {
    if constexpr (std::is_same_v<acc_t, double>) {
      lo = lo + v;
    } else {
      static_assert(Vec<float>::size() == 2 * Vec<double>::size(), "float = two double halves");
#if defined(CPU_CAPABILITY_AVX512)
      const __m512 f = v;
      lo = lo + Vec<double>(_mm512_cvtps_pd(_mm512_castps512_ps256(f)));
      hi = hi + Vec<double>(_mm512_cvtps_pd(
                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1))));
#elif defined(CPU_CAPABILITY_AVX2)
      const __m256 f = v;
      lo = lo + Vec<double>(_mm256_cvtps_pd(_mm256_castps256_ps128(f)));
      hi = hi + Vec<double>(_mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
#else
      constexpr int64_t H = Vec<double>::size();
      alignas(64) float a[2 * H];
      alignas(64) double d[2 * H];
      v.store(a);
      for (int64_t k = 0; k < 2 * H; ++k) d[k] = a[k];
      lo = lo + Vec<double>::loadu(d);
      hi = hi + Vec<double>::loadu(d + H);
#endif
    }
  }
  // the lanes' values in lane order (V of them)
  inline void store(double* out) const {
    lo.store(out);
    if constexpr (!std::is_same_v<acc_t, double>) hi.store(out + Vec<double>::size());
  }
  inline double sum() const { return hsum(lo + hi); }
};

template <typename scalar_t>
inline double to_double(scalar_t v) {
  return static_cast<double>(static_cast<at::opmath_type<scalar_t>>(v));
}


}  // namespace cpu
}  // namespace softcal
