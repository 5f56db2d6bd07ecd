// softcal CUDA emulator: the few CUDA runtime calls the host code of csrc/cuda makes.
// The emulated device's SM count is its index + 1 (softcal_emu::set_sm_count selects the device),
// so that the kernels' cached SM count (common.cuh) follows the setting.
#pragma once
#include "../emu.h"

typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr cudaError_t cudaSuccess = 0;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace emu {
inline int g_device = 0;
}

inline cudaError_t cudaGetDevice(int* dev) {
  *dev = ::emu::g_device;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int dev) {
  TORCH_CHECK(attr == cudaDevAttrMultiProcessorCount, "emu: unsupported attribute ", static_cast<int>(attr));
  *v = dev + 1;
  return cudaSuccess;
}
