// softcal CPU kernels: shared vector helpers (exp on vectors, masked tails, conversions to the
// accumulation type, deterministic reductions, gradient buffers). Used by every file of csrc/cpu.
// The maths of the ops is in csrc/common.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"

namespace softcal {
namespace cpu {

constexpr int64_t kChunk = 2048;        // elements of a row processed together (fits L1)
constexpr int64_t kReduceBlock = 1024;  // rows per block of the deterministic reductions

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

template <typename acc_t>
constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();

#if defined(CPU_CAPABILITY_AVX512) && !defined(SOFTCAL_EXP_U20)
// exp(x) for float32 lanes in 11 AVX-512 instructions: x = n ln2 + r with |r| <= ln2/2
// (Cody-Waite split of ln2), e^r by a degree-5 polynomial fitted on that interval with its
// constant term 1 (max relative error 1.05e-7 in exact arithmetic; exp(0) == 1 exactly), then
// scaled by 2^n with vscalefps, which also handles overflow. Inputs below log(FLT_MIN) give exactly 0 (so -inf gives 0 and no denormal
// is ever produced); NaN stays NaN.
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

// exp on a vector. float: the AVX-512 routine above where built for AVX-512, else ATen's
// polynomial exp_u20 (inputs below log(FLT_MIN) give exactly 0, so -inf gives 0); double:
// Sleef's 1-ulp exp.
template <typename acc_t>
inline Vec<acc_t> vexp(const Vec<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, float>) {
#if defined(CPU_CAPABILITY_AVX512) && !defined(SOFTCAL_EXP_U20)
    return Vec<float>(exp_avx512(v));
#else
    return v.exp_u20();
#endif
  } else {
    return v.exp();
  }
}

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

// NaN-propagating max of x[0:n].
template <typename acc_t>
inline acc_t chunk_max(const acc_t* x, int64_t n) {
  constexpr int64_t V = Vec<acc_t>::size();
  Vec<acc_t> m0(kNegInf<acc_t>), m1(kNegInf<acc_t>);
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    m0 = at::vec::maximum(m0, Vec<acc_t>::loadu(x + i));
    m1 = at::vec::maximum(m1, Vec<acc_t>::loadu(x + i + V));
  }
  for (; i + V <= n; i += V) m0 = at::vec::maximum(m0, Vec<acc_t>::loadu(x + i));
  if (i < n) m1 = at::vec::maximum(m1, load_tail(x + i, n - i).masked);
  return at::vec::vec_reduce_all<acc_t>(
      [](Vec<acc_t>& a, Vec<acc_t>& b) { return at::vec::maximum(a, b); }, at::vec::maximum(m0, m1));
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
  return at::vec::vec_reduce_all<acc_t>(std::plus<Vec<acc_t>>(), s0);
}

// sum_i exp(beta * x_i - shift)
template <typename acc_t>
inline acc_t chunk_sum_exp(const acc_t* x, int64_t n, acc_t beta, acc_t shift) {
  constexpr int64_t V = Vec<acc_t>::size();
  const Vec<acc_t> vb(beta), vs(-shift);
  Vec<acc_t> s0(0), s1(0);
  int64_t i = 0;
  for (; i + 2 * V <= n; i += 2 * V) {
    s0 = s0 + vexp(at::vec::fmadd(Vec<acc_t>::loadu(x + i), vb, vs));
    s1 = s1 + vexp(at::vec::fmadd(Vec<acc_t>::loadu(x + i + V), vb, vs));
  }
  for (; i + V <= n; i += V) s0 = s0 + vexp(at::vec::fmadd(Vec<acc_t>::loadu(x + i), vb, vs));
  if (i < n) s1 = s1 + vexp(at::vec::fmadd(load_tail(x + i, n - i).masked, vb, vs));
  return at::vec::vec_reduce_all<acc_t>(std::plus<Vec<acc_t>>(), s0 + s1);
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
  inline double sum() const {
    return at::vec::vec_reduce_all<double>(std::plus<Vec<double>>(), lo + hi);
  }
};

template <typename scalar_t>
inline double to_double(scalar_t v) {
  return static_cast<double>(static_cast<at::opmath_type<scalar_t>>(v));
}


// Deterministic sum of v[0:n] (any thread count gives the same bits).
template <typename T>
inline double deterministic_sum(const T* v, int64_t n) {
  if (n <= 0) return 0.0;
  const int64_t blocks = (n + kReduceBlock - 1) / kReduceBlock;
  std::vector<double> part(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double s = 0;
      const int64_t end = std::min(n, (b + 1) * kReduceBlock);
      for (int64_t i = b * kReduceBlock; i < end; ++i) s += static_cast<double>(v[i]);
      part[b] = s;
    }
  });
  double total = 0;
  for (double s : part) total += s;
  return total;
}

// The same for a contiguous 1-D float or double tensor of per-row values.
inline double deterministic_sum(const at::Tensor& v) {
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "softcal_deterministic_sum", [&] {
    total = deterministic_sum(v.const_data_ptr<scalar_t>(), v.numel());
  });
  return total;
}

// Rows per parallel task, so that a task touches at least ~32k elements.
inline int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)); }

// Advise the kernel to back a fresh buffer with transparent huge pages before its first touch.
inline void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

inline at::Tensor new_grad_buffer(const at::Tensor& like) {
  at::Tensor g = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(g.data_ptr(), g.numel() * g.element_size());
  return g;
}

}  // namespace cpu
}  // namespace softcal
