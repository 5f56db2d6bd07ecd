// softcal CPU kernels: host-side helpers shared by the ops of csrc/cpu: the class weights in the
// accumulation type, the upstream gradient of a row, blocks of rows and their deterministic sums,
// fresh gradient buffers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/vec.h"

namespace softcal {
namespace cpu {

constexpr int64_t kReduceBlock = 1024;  // rows per block of the deterministic reductions

// The class weights in acc (kernel contract: any floating dtype, converted here once), or an
// empty vector without weights.
template <typename acc_t>
std::vector<acc_t> weights_in_acc(const std::optional<at::Tensor>& weight) {
  std::vector<acc_t> w;
  if (!weight.has_value()) return w;
  const at::Tensor wc = weight->contiguous();
  w.resize(wc.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "softcal_weights",
                                  [&] {
                                    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
                                    for (size_t c = 0; c < w.size(); ++c)
                                      w[c] = static_cast<acc_t>(to_double(wp[c]));
                                  });
  return w;
}

// The upstream gradient of row i (already divided by denom for mean): one value, or one per row
// (any stride) in acc.
template <typename acc_t>
struct UpstreamGrad {
  const acc_t* per_row = nullptr;
  int64_t stride = 0;
  acc_t scalar = 0;
  inline acc_t of(int64_t i) const { return per_row == nullptr ? scalar : per_row[i * stride]; }
};


// Rows per block of the per-block sums (loss, dL/dT) and of the parallel work: kReduceBlock, or
// fewer (a multiple of 16, the tile height) so that short batches still make >= 64 blocks. A
// function of the row count only: the summation order, hence the result's bits, does not
// depend on the number of threads.
inline int64_t reduce_block_rows(int64_t rows) {
  const int64_t want = (rows + 63) / 64;
  return std::min<int64_t>(kReduceBlock, std::max<int64_t>(16, (want + 15) / 16 * 16));
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
inline int64_t row_grain(int64_t C) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
}


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
  at::Tensor g =
      at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(g.data_ptr(), g.numel() * g.element_size());
  return g;
}


}  // namespace cpu
}  // namespace softcal
