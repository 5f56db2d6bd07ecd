// softcal CUDA: cross_entropy_bwd (one read of the logits, one write of the gradient) and scale_rows_.
// The maths, the numerics and the kernel design are written at the top of csrc/cuda/tsce.cuh
// (and the maths in full in csrc/common.h).
#include "cuda/tsce.cuh"

namespace softcal {
namespace cuda {
std::tuple<at::Tensor, at::Tensor> tsce_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& denom,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_logits_grad, bool need_temperature_grad) {
  const char* op = "softcal.cross_entropy_bwd";
  check_tsce_inputs(logits, target, weight, temperature_t, temperature, label_smoothing, reduction, op);
  const int64_t rows = logits.size(0);
  const at::ScalarType acc = acc_type(logits.scalar_type());
  if (reduction == kNone) {
    TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == rows, op, ": grad_loss has shape ",
                grad_loss.sizes(), " but reduction 'none' needs (", rows, ",)");
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must have one element for reduction ",
                reduction, ", got shape ", grad_loss.sizes());
  }
  TORCH_CHECK(at::isFloatingType(grad_loss.scalar_type()), op, ": grad_loss must be floating, got ",
              grad_loss.scalar_type());
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == rows && lse.size(1) == 2 && lse.scalar_type() == acc,
              op, ": lse must be (", rows, ", 2) ", acc, " ([row max, log sum] as cross_entropy_fwd gives), got ",
              lse.sizes(), " ", lse.scalar_type());
  TORCH_CHECK(denom.numel() == 1 && denom.scalar_type() == acc, op, ": denom must be a 0-dim ", acc,
              " tensor, got ", denom.sizes(), " ", denom.scalar_type());
  TORCH_CHECK(grad_loss.device() == logits.device() && lse.device() == logits.device() &&
                  denom.device() == logits.device(),
              op, ": grad_loss, lse and denom must be on ", logits.device());
  c10::cuda::CUDAGuard guard(logits.device());
  const Prepared p = prepare(logits, target, weight);
  // As the CPU op: no temperature tensor, no T-gradient (grad_temperature stays 0).
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  at::Tensor grad = need_logits_grad
                        ? at::empty({rows, logits.size(1)}, logits.options())
                        : at::empty({0}, logits.options());
  const at::ScalarType gt_type = temp_grad_type(temperature_t, logits.scalar_type());
  // empty only when the kernels below write it (the early return for C == 0 must give 0)
  at::Tensor grad_t = (need_t && rows > 0 && logits.size(1) > 0)
                          ? at::empty({}, logits.options().dtype(gt_type))
                          : at::zeros({}, logits.options().dtype(gt_type));
  if (rows == 0 || (!need_logits_grad && !need_t) || logits.size(1) == 0) {
    return {grad, grad_t};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor denom_c = denom.reshape({});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tsce_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = base_args<scalar_t>(logits, p, temperature_t, temperature, label_smoothing,
                                 ignore_index, reduction);
    const bool tile = use_tile<scalar_t>(logits);
    const int tpr = pick_stream_tpr(a.C, vec_size<scalar_t>(), rows);
    const int grid = tile ? tile_grid(rows) : grid_for(rows, tpr);
    at::Tensor parts = need_t ? at::empty({3 * grid}, logits.options().dtype(at::kDouble)) : at::Tensor();
    at::Tensor wsum;
    if (a.weight && label_smoothing > 0) {
      wsum = at::empty({}, logits.options().dtype(acc));
      weight_sum_kernel<scalar_t><<<1, 1024, 0, stream>>>(a.weight, a.C, wsum.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      a.wsum = wsum.data_ptr<acc_t>();
    }
    a.grad_loss = grad_loss.data_ptr();
    a.gl_code = dcode(grad_loss.scalar_type());
    a.gl_stride = reduction == kNone ? grad_loss.stride(0) : 0;
    a.lse_in = lse_c.data_ptr<acc_t>();
    a.denom = denom_c.data_ptr<acc_t>();
    a.grad = need_logits_grad ? grad.data_ptr<scalar_t>() : nullptr;
    a.need_t = need_t;
    a.parts = need_t ? parts.data_ptr<double>() : nullptr;
    dispatch_kind(kind_of(label_smoothing, a.weight != nullptr), [&](auto kc) {
      constexpr int KIND = decltype(kc)::value;
      if (tile) {
        tsce_tile_kernel<scalar_t, 1, KIND><<<grid, kTileRows, tile_smem<scalar_t>(a.C), stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        dispatch_tpr(tpr, [&](auto tc) {
          constexpr int TPR = decltype(tc)::value;
          tsce_bwd_kernel<scalar_t, TPR, KIND><<<grid, block_for(TPR), 0, stream>>>(a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
    });
    if (need_t) {
      TsceWriter<acc_t> w{nullptr, 0, 0, nullptr, nullptr, grad_t.data_ptr(), dcode(gt_type)};
      launch_finalize3(parts, grid, w, stream);
    }
  });
  return {grad, grad_t};
}

void scale_rows_inplace_cuda(const at::Tensor& grad, const at::Tensor& scale) {
  const char* op = "softcal.scale_rows_";
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), op, ": grad must be floating, got ", grad.scalar_type());
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()), op, ": scale must be floating, got ", scale.scalar_type());
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), op, ": grad must be 2-D contiguous, got shape ",
              grad.sizes(), " and strides ", grad.strides());  // as the CPU op
  TORCH_CHECK(scale.device() == grad.device(), op, ": scale is on ", scale.device(), " but grad is on ",
              grad.device());
  const bool per_row = scale.dim() > 0;
  if (per_row) {
    TORCH_CHECK(scale.dim() == 1 && grad.dim() >= 1 && scale.size(0) == grad.size(0), op,
                ": scale has shape ", scale.sizes(), " but grad has shape ", grad.sizes(),
                " (expected a 0-dim scale or one value per row)");
  }
  const int64_t numel = grad.numel();
  if (numel == 0) return;
  c10::cuda::CUDAGuard guard(grad.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t inner = per_row ? numel / grad.size(0) : numel;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_rows_cuda", [&] {
    constexpr int V = vec_size<scalar_t>();
    const int64_t work = ceil_div(numel, V) + V;
    const int64_t cap = static_cast<int64_t>(sm_count()) * 8 * 4;
    const int grid = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, 256), cap)));
    scale_rows_kernel<scalar_t><<<grid, 256, 0, stream>>>(grad.data_ptr<scalar_t>(), numel, inner,
                                                           scale.data_ptr(), dcode(scale.scalar_type()),
                                                           per_row ? scale.stride(0) : 0, per_row);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace softcal
