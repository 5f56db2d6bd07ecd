// softcal CUDA: cross_entropy_fwd (one read of the logits: per-row lse and loss, deterministic reduction).
// The maths, the numerics and the kernel design are written at the top of csrc/cuda/tsce.cuh
// (and the maths in full in csrc/common.h).
#include "cuda/tsce.cuh"

namespace softcal {
namespace cuda {
// ================================================================== ops
std::tuple<at::Tensor, at::Tensor, at::Tensor> tsce_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction) {
  const char* op = "softcal.cross_entropy_fwd";
  check_tsce_inputs(logits, target, weight, temperature_t, temperature, label_smoothing, reduction, op);
  c10::cuda::CUDAGuard guard(logits.device());
  const Prepared p = prepare(logits, target, weight);
  const at::ScalarType acc = acc_type(logits.scalar_type());
  at::Tensor loss = empty_loss(logits, reduction);
  at::Tensor lse = at::empty({logits.size(0), 2}, logits.options().dtype(acc));
  at::Tensor denom = at::empty({}, logits.options().dtype(acc));
  const int64_t rows = logits.size(0);
  if (rows == 0) {
    fill_empty_loss(loss, reduction);
    denom.zero_();
    return {loss, lse, denom};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tsce_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = base_args<scalar_t>(logits, p, temperature_t, temperature, label_smoothing,
                                 ignore_index, reduction);
    const bool tile = use_tile<scalar_t>(logits);
    const int tpr = pick_stream_tpr(a.C, vec_size<scalar_t>(), rows);
    const int grid = tile ? tile_grid(rows) : grid_for(rows, tpr);
    at::Tensor parts = at::empty({3 * grid}, logits.options().dtype(at::kDouble));
    a.loss_rows = reduction == kNone ? loss.data_ptr<scalar_t>() : nullptr;
    a.lse = lse.data_ptr<acc_t>();
    a.parts = parts.data_ptr<double>();
    dispatch_kind(kind_of(label_smoothing, a.weight != nullptr), [&](auto kc) {
      constexpr int KIND = decltype(kc)::value;
      if (tile) {
        tsce_tile_kernel<scalar_t, 0, KIND><<<grid, kTileRows, tile_smem<scalar_t>(a.C), stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        dispatch_tpr(tpr, [&](auto tc) {
          constexpr int TPR = decltype(tc)::value;
          tsce_fwd_kernel<scalar_t, TPR, KIND><<<grid, block_for(TPR), 0, stream>>>(a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
    });
    TsceWriter<acc_t> w{reduction == kNone ? nullptr : loss.data_ptr(), dcode(logits.scalar_type()),
                        static_cast<int>(reduction), denom.data_ptr<acc_t>(), nullptr, nullptr, 0};
    launch_finalize3(parts, grid, w, stream);
  });
  return {loss, lse, denom};
}

}  // namespace cuda
}  // namespace softcal
