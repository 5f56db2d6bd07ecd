// softcal CUDA emulator: C10_CUDA_CHECK and the launch check (emu.h raises errors there).
#pragma once
#include <cuda_runtime.h>

#define C10_CUDA_CHECK(expr)                                                         \
  do {                                                                               \
    const cudaError_t emu_err = (expr);                                              \
    TORCH_CHECK(emu_err == cudaSuccess, "emu: CUDA call failed: ", #expr);           \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::emu::launch_check()
