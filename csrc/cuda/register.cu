// softcal CUDA: registration of every op's CUDA kernel (the schemas are in csrc/softcal.cpp).
#include <torch/library.h>

#include "cuda/ops.cuh"

TORCH_LIBRARY_IMPL(softcal, CUDA, m) {
  m.impl("cross_entropy_fwd", &softcal::cuda::tsce_fwd_cuda);
  m.impl("cross_entropy_bwd", &softcal::cuda::tsce_bwd_cuda);
  m.impl("cross_entropy_fused", &softcal::cuda::tsce_fused_cuda);
  m.impl("cross_entropy_fused_", &softcal::cuda::tsce_fused_inplace_cuda);
  m.impl("scale_rows_", &softcal::cuda::scale_rows_inplace_cuda);
  m.impl("softmax_fwd", &softcal::cuda::softmax_fwd_cuda);
  m.impl("softmax_bwd", &softcal::cuda::softmax_bwd_cuda);
  m.impl("temperature_stats", &softcal::cuda::temperature_stats_cuda);
}
