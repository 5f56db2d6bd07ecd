// softcal CUDA emulator: small kernels with known defects (and one without), so that the tests can
// show that the emulator reports each class of error it claims to catch (tests/cuda/test_cuda_emu.py).
// Rewritten by emulator.py like csrc/cuda, then compiled into the emulator library.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace {

// Correct: a warp + block sum of threadIdx.x over 256 threads (shuffles, shared memory, barriers).
__global__ void __launch_bounds__(256) block_sum_kernel(float* out) {
  __shared__ float part[8];
  float v = static_cast<float>(threadIdx.x);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0;
    for (int i = 0; i < 8; ++i) s += part[i];
    out[blockIdx.x] = s;
  }
}

// Threads of one block at two different __syncthreads.
__global__ void divergent_sync_kernel(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[0] = 1;
}

// A lane leaves while the others of its warp shuffle.
__global__ void shuffle_exit_kernel(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Reads shared memory that no thread wrote (the emulator fills it with NaN bytes).
__global__ void uninit_shared_kernel(float* out) {
  __shared__ float buf[64];
  if (threadIdx.x < 32) buf[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x];  // threads 32..63 read unwritten words
}

// A missing barrier: each thread reads the word that the thread before it wrote, with no
// __syncthreads between. Right when threads run in index order, wrong (NaN) in reverse order.
__global__ void missing_sync_kernel(float* out) {
  __shared__ float buf[64];
  buf[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = threadIdx.x == 0 ? 0.0f : buf[threadIdx.x - 1] + 1.0f;
}

// A failed device assert.
__global__ void assert_kernel(const float* in) {
  CUDA_KERNEL_ASSERT(in[threadIdx.x] >= 0 && "selftest: negative input");
}

// Reads one element past the end of its input (AddressSanitizer, SOFTCAL_EMU_ASAN=1, reports it).
__global__ void oob_read_kernel(const float* in, float* out) { out[threadIdx.x] = in[threadIdx.x + 1]; }

// Runs one selftest kernel on 64-float buffers (`in` all ones but in[40] = -1) and returns `out`,
// or its first three words for block_sum (one per block).
at::Tensor selftest(const std::string& name) {
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::zeros({64}, opts);
  at::Tensor in = at::ones({64}, opts);
  in[40] = -1.0f;
  float* o = out.data_ptr<float>();
  const float* i = in.data_ptr<float>();
  cudaStream_t stream = nullptr;
  if (name == "block_sum") {
    block_sum_kernel<<<3, 256, 0, stream>>>(o);
  } else if (name == "divergent_sync") {
    divergent_sync_kernel<<<1, 64, 0, stream>>>(o);
  } else if (name == "shuffle_exit") {
    shuffle_exit_kernel<<<1, 32, 0, stream>>>(o);
  } else if (name == "uninit_shared") {
    uninit_shared_kernel<<<1, 64, 0, stream>>>(o);
  } else if (name == "missing_sync") {
    missing_sync_kernel<<<1, 64, 0, stream>>>(o);
  } else if (name == "assert") {
    assert_kernel<<<1, 64, 0, stream>>>(i);
  } else if (name == "bad_launch") {
    block_sum_kernel<<<1, 2048, 0, stream>>>(o);
  } else if (name == "big_smem") {
    block_sum_kernel<<<1, 256, 64 * 1024, stream>>>(o);
  } else if (name == "oob_read") {
    oob_read_kernel<<<1, 64, 0, stream>>>(i, o);
  } else {
    TORCH_CHECK(false, "emu_selftest: unknown case '", name, "'");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return name == "block_sum" ? out.narrow(0, 0, 3) : out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(softcal_emu, m) { m.def("emu_selftest(str name) -> Tensor", &selftest); }
