// softcal CUDA emulator: one stream; kernels run to completion at their launch.
#pragma once
#include <cuda_runtime.h>

namespace c10 {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return CUDAStream{}; }
}  // namespace cuda
}  // namespace c10
