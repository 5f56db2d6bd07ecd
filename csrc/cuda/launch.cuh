// softcal CUDA: the launch policy (one table) and the launcher every op uses. A new launch shape
// is a row of kPolicy; a new kernel variant is a value of its enum, switched once by
// static_switch. docs/kernels-cuda.md, "Launch policy", explains each choice.
#pragma once

#include <type_traits>
#include <utility>

#include "cuda/device.cuh"

namespace softcal {
namespace cuda {

// How a kernel walks its rows. Row kernels give a row to TPR consecutive threads (a power of
// two: 4..32 share a warp, 256 / TPR rows to a block of 256 threads; 128..512 give the row a
// block of max(TPR, 256)); tiles and flat kernels give one row, column or element to a thread.
enum class Walk : int {
  kStream,        // one read of a row (or two, the second from L2), nothing of it kept
  kResident,      // the row held in registers between two passes
  kResidentPair,  // two rows held in registers (softmax backward)
  kPairs,         // two rows streamed together (soft targets), or double state (temperature stats)
  kTwoRead,       // one long row per SM at a time, read twice (the second read from L2)
  kTile,          // 256 short rows staged in shared memory, a row per thread
  kFlat,          // an element or a column per thread (scale_rows_, softmax along another dim)
  kCount,         // a value per row summed once (the mean's denominator)
};

struct Policy {
  int vectors_per_thread;  // 16-byte vectors per thread: TPR = next_pow2(row vectors / this); 0:
                           // TPR 1
  int max_tpr;             // TPR at most this ...
  int fill_tpr;            // ... then doubled up to this while the rows leave SMs idle (0: never)
  int blocks_per_sm;       // grid cap, in blocks per SM (0: 4 waves of resident blocks)
};

constexpr Policy kPolicy[] = {
    //                vectors  max TPR  fill TPR  blocks/SM
    /* kStream       */ {16, 256, 512, 0},
    /* kResident     */ {4, 512, 0, 0},
    /* kResidentPair */ {4, 256, 0, 0},
    /* kPairs        */ {4, 512, 0, 0},
    /* kTwoRead      */ {1, 512, 0, 1},
    /* kTile         */ {0, 1, 0, 0},
    /* kFlat         */ {0, 1, 0, 0},
    /* kCount        */ {0, 1, 0, 8},
};

constexpr int kTileRows = 256;              // rows of a tile: one per thread of a block of 256
constexpr int kResidentBlocksPerSM = 2048;  // threads resident per SM (sm_80, sm_90)

constexpr int block_for(int tpr) { return tpr < 256 ? 256 : tpr; }

// __launch_bounds__'s minimum of resident blocks: 2 of 256 threads or 1 of 512, a cap of 128
// registers per thread. With the block size alone, ptxas held the row kernels to 64-80
// registers and they spilled.
constexpr int min_blocks_for(int block) { return block >= 512 ? 1 : 2; }

inline int sm_count() {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  static int cached[64] = {0};
  if (dev < 64 && cached[dev]) return cached[dev];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  if (dev < 64) cached[dev] = n;
  return n;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_pow2(int64_t x) {
  int p = 1;
  while (p < x && p < (1 << 30)) p <<= 1;
  return p;
}

// A launch: TPR threads per row, the block, the grid and the dynamic shared memory.
struct Launch {
  int tpr;
  int block;
  int grid;
  size_t smem = 0;
};

// The launch of `walk` over `items` rows (of C elements of `vec` per 16-byte vector) or items.
// It depends only on the shape and the device (its SM count), so the order of every reduction,
// hence every result, is fixed for a given device.
inline Launch plan(Walk walk, int64_t items, int64_t C = 1, int vec = 1) {
  const Policy& p = kPolicy[static_cast<int>(walk)];
  int tpr = 1;
  if (p.vectors_per_thread > 0) {
    const int64_t nv = ceil_div(C, vec);
    tpr = next_pow2(ceil_div(nv, p.vectors_per_thread));
    if (tpr < 4) tpr = 4;
    if (tpr == 64) tpr = 128;  // a warp's rows share shuffles only; 64 would need shared memory too
    if (tpr > p.max_tpr) tpr = p.max_tpr;
    const int64_t slots = static_cast<int64_t>(sm_count()) * kResidentBlocksPerSM;
    while (tpr >= 128 && tpr < p.fill_tpr && items * tpr < slots && nv >= 8LL * tpr) tpr <<= 1;
  }
  const int block = block_for(tpr);
  const int64_t groups = ceil_div(items, block / tpr);
  const int64_t per_sm = p.blocks_per_sm > 0 ? p.blocks_per_sm : (kResidentBlocksPerSM / block) * 4;
  const int64_t cap = static_cast<int64_t>(sm_count()) * per_sm;
  return Launch{tpr, block, static_cast<int>(std::max<int64_t>(1, std::min(groups, cap)))};
}

// Whether a kResident or kResidentPair launch holds a row of nv 16-byte vectors in registers.
inline bool holds_row(const Launch& l, Walk walk, int64_t nv) {
  return nv <= static_cast<int64_t>(l.tpr) * kPolicy[static_cast<int>(walk)].vectors_per_thread;
}

// A row kernel's block (TPR threads per row), its warps, and __launch_bounds__'s minimum of
// resident blocks (min_blocks_for).
template <int TPR>
constexpr int kBlock = block_for(TPR);
template <int TPR>
constexpr int kWarps = kBlock<TPR> / kWarp;
template <int TPR>
constexpr int kMinBlocks = min_blocks_for(kBlock<TPR>);

// f(row, active, tid) for the rows of this thread's group of TPR consecutive threads (tid: the
// thread's index in it), the grid striding over the rows. Every thread runs every iteration (the
// reductions in f need the whole block); active is false for a row past the end.
template <int TPR, typename F>
__device__ __forceinline__ void for_each_row(int64_t rows, F&& f) {
  constexpr int kRowsPerBlock = kBlock<TPR> / TPR;
  const int tid = threadIdx.x % TPR;
  const int64_t grp = threadIdx.x / TPR;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; base < rows;
       base += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = base + grp;
    f(row, row < rows, tid);
  }
}

// ------------------------------------------------------------------ switches and the launcher
// Calls f(std::integral_constant<type, value>) for the one of Values equal to v (flash-attention's
// static_switch): a runtime variant becomes a template parameter, once, in host code.
template <auto... Values, typename F>
inline void static_switch(std::common_type_t<decltype(Values)...> v, F&& f) {
  const bool found =
      ((v == Values && (f(std::integral_constant<decltype(Values), Values>{}), true)) || ...);
  TORCH_INTERNAL_ASSERT(found, "softcal (CUDA): no kernel for the variant ",
                        static_cast<int64_t>(v));
}

// A kernel instantiation as a type, so that pick functions can name it for the launcher.
template <auto K>
struct KernelRef {};
struct NoKernel {};  // a (TPR, variant) that the policy never asks for

template <auto K, typename... Args>
inline void launch(KernelRef<K>, const Launch& l, cudaStream_t stream, const Args&... args) {
  K<<<l.grid, l.block, l.smem, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename... Args>
inline void launch(NoKernel, const Launch& l, cudaStream_t, const Args&...) {
  TORCH_INTERNAL_ASSERT(false, "softcal (CUDA): no kernel with ", l.tpr, " threads per row here");
}

// Every row kernel: pick(TPR) names the instantiation for the launch's TPR, e.g.
//   launch_rows(l, stream, [](auto tpr) { return KernelRef<&my_kernel<T, tpr()>>{}; }, args);
template <typename Pick, typename... Args>
inline void launch_rows(const Launch& l, cudaStream_t stream, Pick&& pick, const Args&... args) {
  static_switch<4, 8, 16, 32, 128, 256, 512>(
      l.tpr, [&](auto tpr) { launch(pick(tpr), l, stream, args...); });
}

}  // namespace cuda
}  // namespace softcal
