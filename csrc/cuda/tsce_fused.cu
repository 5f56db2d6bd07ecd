// softcal CUDA: cross_entropy_fused and cross_entropy_fused_ (loss and gradient in one kernel).
// The maths, the numerics and the kernel design are written at the top of csrc/cuda/tsce.cuh
// (and the maths in full in csrc/common.h).
#include "cuda/tsce.cuh"

namespace softcal {
namespace cuda {
namespace {

// Shared body of cross_entropy_fused and cross_entropy_fused_: grad may be logits itself.
template <typename scalar_t>
void fused_impl(const at::Tensor& logits, const Prepared& p, const std::optional<at::Tensor>& temperature_t,
                double temperature, double eps, int64_t ignore_index, int64_t reduction, bool need_t,
                at::Tensor& loss, at::Tensor& grad, at::Tensor& grad_t) {
  using acc_t = at::opmath_type<scalar_t>;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = logits.size(0);
  auto a = base_args<scalar_t>(logits, p, temperature_t, temperature, eps, ignore_index, reduction);
  at::Tensor denom;
  if (reduction == kMean) {
    denom = compute_denom<scalar_t>(logits, a, stream);
    a.denom = denom.data_ptr<acc_t>();
  }
  constexpr int V = vec_size<scalar_t>();
  const int64_t nv = ceil_div(a.C, V);
  const int rtpr = pick_tpr(a.C, V, 4);
  // 0: tiny rows through shared memory; 1: the row in registers (<= 4 vectors per thread, <= 512
  // threads: C <= 16384 bf16/fp16, 8192 fp32, 4096 fp64); 2: two reads of the row (the second
  // mostly from L2, see below)
  const int mode = use_tile<scalar_t>(logits) ? 0 : (nv <= static_cast<int64_t>(rtpr) * 4 ? 1 : 2);
  // The two-read path reads each row a second time right after the first: for that read to hit
  // L2, few rows may be in flight, so one row per SM at a time (512 threads, 4 loads of 16 B in
  // flight each: 32 KiB per SM), on a grid of one block per SM. 132 rows of C = 131072 bf16 are
  // 33 MiB, within the H200's 50 MiB of L2.
  const int tpr = mode == 2 ? 512 : rtpr;
  const int grid = mode == 0 ? tile_grid(rows)
                             : (mode == 2 ? static_cast<int>(std::min<int64_t>(rows, sm_count())) : grid_for(rows, tpr));
  at::Tensor parts = at::empty({3 * grid}, logits.options().dtype(at::kDouble));
  a.loss_rows = reduction == kNone ? loss.data_ptr<scalar_t>() : nullptr;
  a.grad = grad.data_ptr<scalar_t>();
  a.need_t = need_t;
  a.parts = parts.data_ptr<double>();
  if (need_t && reduction == kNone) {
    a.gt_rows = grad_t.data_ptr();
    a.gt_code = dcode(grad_t.scalar_type());
  }
  dispatch_kind(kind_of(eps, a.weight != nullptr), [&](auto kc) {
    constexpr int KIND = decltype(kc)::value;
    if (mode == 0) {
      tsce_tile_kernel<scalar_t, 2, KIND><<<grid, kTileRows, tile_smem<scalar_t>(a.C), stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (mode == 1) {
      dispatch_tpr(tpr, [&](auto tc) {
        constexpr int TPR = decltype(tc)::value;
        tsce_fused_kernel<scalar_t, TPR, 4, true, KIND><<<grid, block_for(TPR), 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      tsce_fused_kernel<scalar_t, 512, 1, false, KIND><<<grid, 512, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  const bool want_loss = reduction != kNone;
  const bool want_gt = need_t && reduction != kNone;
  if (want_loss || want_gt) {
    TsceWriter<acc_t> w{want_loss ? loss.data_ptr() : nullptr, dcode(logits.scalar_type()),
                        static_cast<int>(reduction), nullptr,
                        reduction == kMean ? a.denom : nullptr,
                        want_gt ? grad_t.data_ptr() : nullptr,
                        want_gt ? dcode(grad_t.scalar_type()) : 0};
    launch_finalize3(parts, grid, w, stream);
  }
}

at::Tensor fused_grad_t(const at::Tensor& logits, const std::optional<at::Tensor>& temperature_t,
                        int64_t reduction, bool need_t) {
  const at::ScalarType gt_type = temp_grad_type(temperature_t, logits.scalar_type());
  auto opts = logits.options().dtype(gt_type);
  if (reduction == kNone) {
    return need_t ? at::empty({logits.size(0)}, opts) : at::zeros({logits.size(0)}, opts);
  }
  return (need_t && logits.size(0) > 0) ? at::empty({}, opts) : at::zeros({}, opts);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> tsce_fused_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_temperature_grad) {
  const char* op = "softcal.cross_entropy_fused";
  check_tsce_inputs(logits, target, weight, temperature_t, temperature, label_smoothing, reduction, op);
  c10::cuda::CUDAGuard guard(logits.device());
  const Prepared p = prepare(logits, target, weight);
  at::Tensor loss = empty_loss(logits, reduction);
  at::Tensor grad = at::empty({logits.size(0), logits.size(1)}, logits.options());
  // As the CPU op: no temperature tensor, no T-gradient (grad_temperature stays 0).
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  at::Tensor grad_t = fused_grad_t(logits, temperature_t, reduction, need_t);
  if (logits.size(0) == 0) {
    fill_empty_loss(loss, reduction);
    return {loss, grad, grad_t};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tsce_fused_cuda", [&] {
    fused_impl<scalar_t>(logits, p, temperature_t, temperature, label_smoothing, ignore_index,
                         reduction, need_t, loss, grad, grad_t);
  });
  return {loss, grad, grad_t};
}

std::tuple<at::Tensor, at::Tensor> tsce_fused_inplace_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_temperature_grad) {
  const char* op = "softcal.cross_entropy_fused_";
  check_tsce_inputs(logits, target, weight, temperature_t, temperature, label_smoothing, reduction, op);
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous (the gradient is written "
              "into its buffer), got strides ", logits.strides());
  c10::cuda::CUDAGuard guard(logits.device());
  const Prepared p = prepare(logits, target, weight);
  at::Tensor loss = empty_loss(logits, reduction);
  // As the CPU op: no temperature tensor, no T-gradient (grad_temperature stays 0).
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  at::Tensor grad_t = fused_grad_t(logits, temperature_t, reduction, need_t);
  if (logits.size(0) == 0) {
    fill_empty_loss(loss, reduction);
    return {loss, grad_t};
  }
  at::Tensor grad = logits;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "tsce_fused_inplace_cuda", [&] {
    fused_impl<scalar_t>(logits, p, temperature_t, temperature, label_smoothing, ignore_index,
                         reduction, need_t, loss, grad, grad_t);
  });
  return {loss, grad_t};
}

}  // namespace cuda
}  // namespace softcal
