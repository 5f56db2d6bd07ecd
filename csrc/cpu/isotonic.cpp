// softcal CPU kernel: isotonic regression by pool adjacent violators (isotonic_fit), the fit of
// softcal.nn.IsotonicCalibrator (one-vs-rest: one problem per class; shared: one problem over
// every (row, class) pair). The contract is in csrc/schemas.h.
//
// One problem, row k of the inputs: points (x_i, y_i, w_i), i < n. The points are sorted by x
// (sort_words: std::sort below kRadixMin points, above it a radix sort of the keys' top 32
// bits, then each run of equal cut keys by the exact x), points with equal x are pooled
// (weights summed, w y summed), then the pools are merged left to right on a stack: a new pool
// is merged into the top of the stack while the top's mean is >= the new one's (ties merged, as
// the Python fallback in softcal/calibrators/_pav.py, so that both give the same blocks). Each
// block gives the knot (smallest x, mean) and, when it spans more than one x, the knot (largest
// x, mean): linear interpolation through the knots is the least-squares fit at every point
// (scikit-learn's IsotonicRegression convention). The means are sums divided once per block;
// the sums are in the sorted order, in double. O(n) per problem with the radix sort (plus the
// runs of near ties); the problems run in parallel (at::parallel_for).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace softcal {
namespace {

constexpr int64_t kRadixMin = 512;  // from this many points a problem is radix-sorted
constexpr int kDigitBits = 11;
constexpr int kBuckets = 1 << kDigitBits;
constexpr int kDigits = 3;  // of the key's top 32 bits: bits 32-42, 43-53, 54-63

// The bits of a double as an unsigned key with the same order (-0.0 as +0.0: the same x, pooled;
// a NaN above +inf or below -inf).
inline uint64_t order_key(double v) {
  v += 0.0;  // -0.0 + 0.0 = +0.0
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u >> 63) ? ~u : (u | (uint64_t{1} << 63));
}

// A problem's x: n values at a stride (a row of a (K, n) tensor of any strides: x = p.T, a view
// of the (n, K) probabilities, is read in place instead of copied).
struct Points {
  const double* p;
  int64_t stride;
  double operator[](int64_t i) const { return p[i * stride]; }
};

// A word: the cut key (bits 32-63), a label bit (bit 31: y of a problem whose y are all 0 or 1,
// the one-vs-rest fits; else 0) and the point's index (bits 0-30).
inline uint32_t cut_key(uint64_t word) { return static_cast<uint32_t>(word >> 32); }
inline uint32_t index_of(uint64_t word) { return static_cast<uint32_t>(word) & 0x7FFFFFFFu; }
inline double label_of(uint64_t word) { return static_cast<double>((word >> 31) & 1u); }

// The points' (cut key, index) words in ascending order of x: the key of x cut to its top 32
// bits (sign, exponent, 20 bits of mantissa; the same order, coarser) above the index. Below
// kRadixMin points: std::sort by x. From kRadixMin: an LSD radix sort of the words on the cut
// key (3 passes at most; the counts of every digit taken in one read, a digit that every key
// shares skipped), then each run of equal cut keys (points within 2^-20 of each other) sorted
// by the exact x. Returns false when x holds NaN.
bool sort_words(Points x, const double* labels, int64_t n, std::vector<uint64_t>& words,
                std::vector<uint64_t>& words2, std::vector<uint32_t>& count) {
  words.resize(n);
  for (int64_t i = 0; i < n; ++i)
    words[i] = (order_key(x[i]) & ~uint64_t{0xFFFFFFFF}) |
               (labels != nullptr && labels[i] != 0.0 ? uint64_t{1} << 31 : 0) |
               static_cast<uint64_t>(i);
  auto by_x = [x](uint64_t a, uint64_t b) { return x[index_of(a)] < x[index_of(b)]; };
  if (n < kRadixMin) {
    for (int64_t i = 0; i < n; ++i)
      if (std::isnan(x[i])) return false;
    std::sort(words.begin(), words.end(), by_x);
    return true;
  }
  words2.resize(n);
  count.assign(static_cast<size_t>(kDigits) * kBuckets, 0);
  for (int64_t i = 0; i < n; ++i)
    for (int d = 0; d < kDigits; ++d)
      ++count[d * kBuckets + ((words[i] >> (32 + d * kDigitBits)) & (kBuckets - 1))];
  for (int d = 0; d < kDigits; ++d) {
    const int shift = 32 + d * kDigitBits;
    uint32_t* cnt = count.data() + static_cast<size_t>(d) * kBuckets;
    if (cnt[(words[0] >> shift) & (kBuckets - 1)] == n) continue;  // every key has this digit
    uint32_t sum = 0;
    for (int b = 0; b < kBuckets; ++b) {
      const uint32_t c = cnt[b];
      cnt[b] = sum;
      sum += c;
    }
    const uint64_t* in = words.data();
    uint64_t* out = words2.data();
    for (int64_t i = 0; i < n; ++i) out[cnt[(in[i] >> shift) & (kBuckets - 1)]++] = in[i];
    words.swap(words2);
  }
  // a NaN's key is above +inf's (sign clear) or below -inf's (sign set): first or last
  if (std::isnan(x[index_of(words[0])]) || std::isnan(x[index_of(words[n - 1])])) return false;
  for (int64_t i = 0; i < n;) {  // the runs of equal cut keys, by the exact x
    int64_t j = i + 1;
    while (j < n && cut_key(words[j]) == cut_key(words[i])) ++j;
    if (j - i > 1) std::sort(words.begin() + i, words.begin() + j, by_x);
    i = j;
  }
  return true;
}

struct Scratch {
  std::vector<uint64_t> words, words2;  // (cut key, index) words of the sort
  std::vector<uint32_t> count;          // the radix sort's counts, kDigits x kBuckets
  std::vector<double> wys, ws;          // the points' w y and w in sorted order
  std::vector<double> bw, bwy, bmean;   // a block's weight, weighted sum and mean
  std::vector<int64_t> blo, bhi, bend;  // sorted positions: a block's first point, its last
                                        // pool's first point, one past its last point
};

// One problem; writes its knots into kx, kv (n each, padded with the last knot) and the fit's
// value at every point into fit (n, the input's order); returns the number of knots (>= 1 for
// n >= 1; 0 for n = 0), or -1 when x holds NaN, -2 when y holds NaN or infinity (nothing
// written). x is read again only where the cut keys tie and at the blocks' ends.
int64_t pav_one(Points x, const double* y, const double* w, int64_t n, double* kx, double* kv,
                double* fit, Scratch& s) {
  if (n == 0) return 0;
  // y all 0 or 1 without weights (the one-vs-rest fits): the labels travel in the words; else
  // w y and w are gathered in sorted order (independent loads) for the walk below
  const bool binary = w == nullptr && n < (int64_t{1} << 26) &&
                      std::all_of(y, y + n, [](double v) { return v == 0.0 || v == 1.0; });
  if (!sort_words(x, binary ? y : nullptr, n, s.words, s.words2, s.count)) return -1;
  const uint64_t* words = s.words.data();
  s.wys.resize(binary ? 0 : n);
  s.ws.resize(w ? n : 0);
  double* wys = binary ? nullptr : s.wys.data();
  double* ws = w ? s.ws.data() : nullptr;
  if (!binary) {
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t o = index_of(words[j]);
      wys[j] = w ? w[o] * y[o] : y[o];
      if (w) ws[j] = w[o];
    }
  }
  for (auto* v : {&s.bw, &s.bwy, &s.bmean}) v->resize(n);
  for (auto* v : {&s.blo, &s.bhi, &s.bend}) v->resize(n);
  double* bw = s.bw.data();
  double* bwy = s.bwy.data();
  double* bmean = s.bmean.data();  // bwy / bw, divided once per block
  int64_t* blo = s.blo.data();
  int64_t* bhi = s.bhi.data();
  int64_t* bend = s.bend.data();
  int64_t top = 0;  // blocks on the stack
  int64_t i = 0;
  while (i < n) {
    const int64_t first = i;
    const uint32_t key = cut_key(words[i]);
    const double xi_if_tied =
        (i + 1 < n && cut_key(words[i + 1]) == key) ? x[index_of(words[i])] : 0.0;
    double cw = 0.0, cwy = 0.0;
    do {  // pool the ties of x: equal cut keys, then equal x
      cw += ws ? ws[i] : 1.0;
      cwy += binary ? label_of(words[i]) : wys[i];
      ++i;
    } while (i < n && cut_key(words[i]) == key && x[index_of(words[i])] == xi_if_tied);
    if (!std::isfinite(cwy)) {  // y holds NaN or infinity (finite weights)
      for (int64_t j = 0; j < n; ++j)
        if (!std::isfinite(y[j])) return -2;
    }
    int64_t lo = first;
    if (binary) {
      // integer sums below 2^26: the products are exact, so this is the comparison of the
      // exact means, which the rounded means of the general branch make too (distinct ratios
      // of such integers differ by far more than a rounding); no division on the loop's path
      while (top > 0 && bwy[top - 1] * cw >= cwy * bw[top - 1]) {
        --top;
        cw += bw[top];
        cwy += bwy[top];
        lo = blo[top];
      }
    } else {
      double m = cwy / cw;
      while (top > 0 && bmean[top - 1] >= m) {
        --top;
        cw += bw[top];
        cwy += bwy[top];
        lo = blo[top];
        m = cwy / cw;
      }
    }
    const double mean = cwy / cw;
    bw[top] = cw;
    bwy[top] = cwy;
    bmean[top] = mean;
    blo[top] = lo;
    bhi[top] = first;
    bend[top] = i;
    ++top;
  }
  int64_t m = 0;
  for (int64_t b = 0, j = 0; b < top; ++b) {
    const double v = bmean[b];
    for (; j < bend[b]; ++j) fit[index_of(words[j])] = v;
    kx[m] = x[index_of(words[blo[b]])];
    kv[m] = v;
    ++m;
    if (bhi[b] != blo[b]) {  // more than one pool: more than one x
      kx[m] = x[index_of(words[bhi[b]])];
      kv[m] = v;
      ++m;
    }
  }
  for (int64_t j = m; j < n; ++j) {
    kx[j] = kx[m - 1];
    kv[j] = kv[m - 1];
  }
  return m;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> isotonic_fit_cpu(
    const at::Tensor& x, const at::Tensor& y, const std::optional<at::Tensor>& w) {
  const char* op = "softcal.isotonic_fit";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (problems, points), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kDouble, op, ": x must be float64, got ", x.scalar_type());
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == at::kDouble, op,
              ": y must be float64 of x's shape ", x.sizes(), ", got ", y.scalar_type(), " ",
              y.sizes());
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), op, ": x and y must be CPU tensors");
  TORCH_CHECK(x.size(1) < (int64_t{1} << 31), op, ": at most 2^31 - 1 points per problem, got ",
              x.size(1));
  const at::Tensor yc = y.contiguous();  // x is read at its strides
  at::Tensor wc;
  if (w.has_value()) {
    TORCH_CHECK(w->sizes() == x.sizes() && w->scalar_type() == at::kDouble && w->device().is_cpu(),
                op, ": w must be a float64 CPU tensor of x's shape ", x.sizes());
    wc = w->contiguous();
    TORCH_CHECK(at::isfinite(wc).all().item<bool>() && (wc > 0).all().item<bool>(), op,
                ": the weights w must be finite and > 0");
  }
  const int64_t K = x.size(0), n = x.size(1);
  at::Tensor kx = at::empty({K, n}, x.options());
  at::Tensor kv = at::empty({K, n}, x.options());
  at::Tensor counts = at::empty({K}, x.options().dtype(at::kLong));
  at::Tensor fitted = at::empty({K, n}, x.options());
  const double* xp = x.const_data_ptr<double>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  const double* yp = yc.const_data_ptr<double>();
  const double* wp = wc.defined() ? wc.const_data_ptr<double>() : nullptr;
  double* kxp = kx.mutable_data_ptr<double>();
  double* kvp = kv.mutable_data_ptr<double>();
  int64_t* cp = counts.mutable_data_ptr<int64_t>();
  double* fp = fitted.mutable_data_ptr<double>();
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    for (int64_t k = begin; k < end; ++k) {
      cp[k] = pav_one(Points{xp + k * xs0, xs1}, yp + k * n, wp ? wp + k * n : nullptr, n,
                      kxp + k * n, kvp + k * n, fp + k * n, s);
    }
  });
  // the input checks, from the problems' codes (x's NaN first, as a check before the fit would)
  TORCH_CHECK(std::none_of(cp, cp + K, [](int64_t c) { return c == -1; }), op, ": x holds NaN");
  TORCH_CHECK(std::none_of(cp, cp + K, [](int64_t c) { return c == -2; }), op,
              ": y holds NaN or infinity");
  return {kx, kv, counts, fitted};
}

}  // namespace

TORCH_LIBRARY_IMPL(softcal, CPU, m) { m.impl("isotonic_fit", &isotonic_fit_cpu); }

}  // namespace softcal
