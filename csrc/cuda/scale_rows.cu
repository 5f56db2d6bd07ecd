// softcal CUDA: scale_rows_ (grad[i, :] *= scale, or scale[i]): one read and one write of grad,
// 16-byte accesses, and nothing at all for a 0-dim scale equal to 1 (each block reads it and
// returns).
#include <torch/library.h>

#include "checks.h"
#include "cuda/launch.cuh"
#include "cuda/rows.cuh"

namespace softcal {
namespace cuda {
namespace {

// grad has numel elements, `inner` per row; scale[(e / inner)] (per_row) or scale[0].
template <typename T>
__global__ void __launch_bounds__(256, 2)
    scale_rows_kernel(T* __restrict__ grad, int64_t numel, int64_t inner, AnyIn scale,
                      bool per_row) {
  constexpr int V = vec_size<T>();
  using acc_t = at::opmath_type<T>;
  acc_t s0 = 0;
  if (!per_row) {
    s0 = static_cast<acc_t>(scale[0]);
    if (s0 == acc_t(1)) return;
  }
  const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(grad) & 15) / sizeof(T));
  const int64_t head = mis ? (V - mis < numel ? V - mis : numel) : 0;
  const int64_t nvec = (numel - head) / V;
  const int64_t tail0 = head + nvec * V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * 256;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  auto sc = [&](int64_t e) -> acc_t { return per_row ? static_cast<acc_t>(scale[e / inner]) : s0; };
  if (t0 < head) grad[t0] = static_cast<T>(static_cast<acc_t>(grad[t0]) * sc(t0));
  Vec16<T>* vg = reinterpret_cast<Vec16<T>*>(grad + head);
  for (int64_t j = t0; j < nvec; j += stride) {
    Vec16<T> v = vg[j];
    const int64_t e0 = head + j * V;
    if (!per_row || (e0 / inner) == ((e0 + V - 1) / inner)) {
      const acc_t s = sc(e0);
#pragma unroll
      for (int k = 0; k < V; ++k) v.v[k] = static_cast<T>(static_cast<acc_t>(v.v[k]) * s);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) v.v[k] = static_cast<T>(static_cast<acc_t>(v.v[k]) * sc(e0 + k));
    }
    vg[j] = v;
  }
  if (t0 < numel - tail0) {
    const int64_t e = tail0 + t0;
    grad[e] = static_cast<T>(static_cast<acc_t>(grad[e]) * sc(e));
  }
}

void scale_rows_inplace_cuda(const at::Tensor& grad, const at::Tensor& scale) {
  checks::scale_rows(Backend::kCuda, grad, scale);
  const bool per_row = scale.dim() > 0;
  const int64_t numel = grad.numel();
  if (numel == 0) return;
  c10::cuda::CUDAGuard guard(grad.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t inner = per_row ? numel / grad.size(0) : numel;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_rows_cuda", [&] {
        constexpr int V = vec_size<scalar_t>();
        // a thread per 16-byte vector, and one for the head and the tail
        const Launch l = plan(Walk::kFlat, ceil_div(numel, V) + V);
        launch(KernelRef<&scale_rows_kernel<scalar_t>>{}, l, stream, grad.data_ptr<scalar_t>(),
               numel, inner, any_in(scale, per_row ? scale.stride(0) : 0), per_row);
      });
}

}  // namespace
}  // namespace cuda
}  // namespace softcal

TORCH_LIBRARY_IMPL(softcal, CUDA, m) {
  m.impl("scale_rows_", &softcal::cuda::scale_rows_inplace_cuda);
}
