// softcal CPU kernel: isotonic regression by pool adjacent violators (isotonic_fit), the fit of
// softcal.nn.IsotonicCalibrator (one-vs-rest: one problem per class; shared: one problem over
// every (row, class) pair). The contract is in csrc/schemas.h.
//
// One problem, row k of the inputs: points (x_i, y_i, w_i), i < n. The points are sorted by x
// (std::sort of (key, index) pairs below kRadixMin points, an LSD radix sort of the keys above:
// 11-bit digits, a digit that every key shares is skipped, so probabilities in [0, 1] take 3-4
// passes), points with equal x are pooled (weights summed, w y summed), then the pools are
// merged left to right on a stack: a new pool is merged into the top of the stack while the
// top's mean is >= the new one's (ties merged, as the Python fallback in
// softcal/calibrators/_binning.py, so that both give the same blocks). Each block gives the knot
// (smallest x, mean) and, when it spans more than one x, the knot (largest x, mean): linear
// interpolation through the knots is the least-squares fit at every point (scikit-learn's
// IsotonicRegression convention). The means are sums divided once per block; the sums are in
// the sorted order, in double. O(n log n) (or O(n) with the radix sort) per problem; the
// problems run in parallel (at::parallel_for).
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
constexpr int kDigits = (64 + kDigitBits - 1) / kDigitBits;  // 6 digits of a 64-bit key

// The bits of a double as an unsigned key with the same order (-0.0 before +0.0; no NaN here).
inline uint64_t order_key(double v) {
  uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u >> 63) ? ~u : (u | (uint64_t{1} << 63));
}

// order[0..n) = the indices of x in ascending order of x. The counts of every digit are taken
// in one read of the keys; a digit that every key shares is skipped (no pass).
void sort_indices(const double* x, int64_t n, std::vector<uint32_t>& order,
                  std::vector<uint64_t>& keys, std::vector<uint64_t>& keys2,
                  std::vector<uint32_t>& order2, std::vector<int64_t>& count) {
  order.resize(n);
  if (n < kRadixMin) {
    std::vector<std::pair<double, uint32_t>> pairs(n);
    for (int64_t i = 0; i < n; ++i) pairs[i] = {x[i], static_cast<uint32_t>(i)};
    std::sort(pairs.begin(), pairs.end());
    for (int64_t i = 0; i < n; ++i) order[i] = pairs[i].second;
    return;
  }
  keys.resize(n);
  keys2.resize(n);
  order2.resize(n);
  count.assign(static_cast<size_t>(kDigits) * kBuckets, 0);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t k = order_key(x[i]);
    keys[i] = k;
    order[i] = static_cast<uint32_t>(i);
    for (int d = 0; d < kDigits; ++d)
      ++count[d * kBuckets + ((k >> (d * kDigitBits)) & (kBuckets - 1))];
  }
  for (int d = 0; d < kDigits; ++d) {
    const int shift = d * kDigitBits;
    int64_t* cnt = count.data() + static_cast<size_t>(d) * kBuckets;
    if (cnt[(keys[0] >> shift) & (kBuckets - 1)] == n) continue;  // every key has this digit
    int64_t sum = 0;
    for (int b = 0; b < kBuckets; ++b) {
      const int64_t c = cnt[b];
      cnt[b] = sum;
      sum += c;
    }
    const uint64_t* kin = keys.data();
    const uint32_t* oin = order.data();
    uint64_t* kout = keys2.data();
    uint32_t* oout = order2.data();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t dst = cnt[(kin[i] >> shift) & (kBuckets - 1)]++;
      kout[dst] = kin[i];
      oout[dst] = oin[i];
    }
    keys.swap(keys2);
    order.swap(order2);
  }
}

struct Scratch {
  std::vector<uint32_t> order, order2;
  std::vector<uint64_t> keys, keys2;
  std::vector<int64_t> count;  // the radix sort's counts, kDigits x kBuckets
  std::vector<double> bw, bwy, blo, bhi;
  std::vector<int64_t> bend;  // a block's end in the sorted order (one past its last point)
};

// One problem; writes its knots into kx, kv (n each, padded with the last knot) and the fit's
// value at every point into fit (n, the input's order); returns the number of knots (>= 1 for
// n >= 1; 0 for n = 0).
int64_t pav_one(const double* x, const double* y, const double* w, int64_t n, double* kx,
                double* kv, double* fit, Scratch& s) {
  if (n == 0) return 0;
  sort_indices(x, n, s.order, s.keys, s.keys2, s.order2, s.count);
  s.bw.resize(n);
  s.bwy.resize(n);
  s.blo.resize(n);
  s.bhi.resize(n);
  s.bend.resize(n);
  double* bw = s.bw.data();
  double* bwy = s.bwy.data();
  double* blo = s.blo.data();
  double* bhi = s.bhi.data();
  int64_t* bend = s.bend.data();
  const uint32_t* ord = s.order.data();
  int64_t top = 0;  // blocks on the stack
  int64_t i = 0;
  while (i < n) {
    const double xi = x[ord[i]];
    double cw = 0.0, cwy = 0.0;
    while (i < n && x[ord[i]] == xi) {  // pool the ties of x
      const double wi = w ? w[ord[i]] : 1.0;
      cw += wi;
      cwy += wi * y[ord[i]];
      ++i;
    }
    double lo = xi;
    while (top > 0 && bwy[top - 1] / bw[top - 1] >= cwy / cw) {
      --top;
      cw += bw[top];
      cwy += bwy[top];
      lo = blo[top];
    }
    bw[top] = cw;
    bwy[top] = cwy;
    blo[top] = lo;
    bhi[top] = xi;
    bend[top] = i;
    ++top;
  }
  int64_t m = 0;
  for (int64_t b = 0, j = 0; b < top; ++b) {
    const double v = bwy[b] / bw[b];
    for (; j < bend[b]; ++j) fit[ord[j]] = v;
    kx[m] = blo[b];
    kv[m] = v;
    ++m;
    if (bhi[b] > blo[b]) {
      kx[m] = bhi[b];
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
  TORCH_CHECK(x.size(1) < (int64_t{1} << 32), op, ": at most 2^32 - 1 points per problem, got ",
              x.size(1));
  const at::Tensor xc = x.contiguous(), yc = y.contiguous();
  TORCH_CHECK(!at::isnan(xc).any().item<bool>(), op, ": x holds NaN");
  TORCH_CHECK(at::isfinite(yc).all().item<bool>(), op, ": y holds NaN or infinity");
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
  const double* xp = xc.const_data_ptr<double>();
  const double* yp = yc.const_data_ptr<double>();
  const double* wp = wc.defined() ? wc.const_data_ptr<double>() : nullptr;
  double* kxp = kx.mutable_data_ptr<double>();
  double* kvp = kv.mutable_data_ptr<double>();
  int64_t* cp = counts.mutable_data_ptr<int64_t>();
  double* fp = fitted.mutable_data_ptr<double>();
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    for (int64_t k = begin; k < end; ++k) {
      cp[k] = pav_one(xp + k * n, yp + k * n, wp ? wp + k * n : nullptr, n, kxp + k * n,
                      kvp + k * n, fp + k * n, s);
    }
  });
  return {kx, kv, counts, fitted};
}

}  // namespace

TORCH_LIBRARY_IMPL(softcal, CPU, m) { m.impl("isotonic_fit", &isotonic_fit_cpu); }

}  // namespace softcal
