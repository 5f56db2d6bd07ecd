// softcal CUDA: reductions. Within a group of threads that share a row (shuffles, then shared
// memory), over a block, and the deterministic final sum of the per-block partials. Every
// combination runs in a fixed order: results are bitwise reproducible on a given device.
#pragma once

#include <cstring>

#include "cuda/device.cuh"
#include "cuda/launch.cuh"

namespace softcal {
namespace cuda {

// Exchanges any trivially copyable value (a scalar or a row state) with the lane `mask` away,
// one 32-bit word at a time.
template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int mask) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) % 4 == 0, "shfl_xor: 32-bit words");
  if constexpr (std::is_arithmetic_v<T>) {
    return __shfl_xor_sync(0xffffffffu, v, mask);
  } else {
    constexpr int kWords = sizeof(T) / 4;
    unsigned w[kWords];
    std::memcpy(w, &v, sizeof(T));
#pragma unroll
    for (int k = 0; k < kWords; ++k) w[k] = __shfl_xor_sync(0xffffffffu, w[k], mask);
    std::memcpy(&v, w, sizeof(T));
    return v;
  }
}

// All-reduce within a group of TPR consecutive threads (TPR a power of two, <= the block).
// Every thread of the block must call it (it uses __syncthreads when TPR > 32). smem: at least
// block / 32 elements of T.
template <int TPR, typename T, typename Op>
__device__ __forceinline__ T group_allreduce(T v, Op op, T* smem) {
  constexpr int W = TPR < kWarp ? TPR : kWarp;
  // The lower lane's value always goes first, so that both partners of an exchange compute the
  // same bits (the merges are commutative only up to rounding).
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int o = W / 2; o > 0; o >>= 1) {
    const T other = shfl_xor(v, o);
    v = (lane & o) ? op(other, v) : op(v, other);
  }
  if constexpr (TPR > kWarp) {
    constexpr int NW = TPR / kWarp;
    const int warp = threadIdx.x / kWarp;
    __syncthreads();  // smem may still be read by the previous call
    if ((threadIdx.x % kWarp) == 0) smem[warp] = v;
    __syncthreads();
    const int g0 = (warp / NW) * NW;
    T r = smem[g0];
#pragma unroll
    for (int i = 1; i < NW; ++i) r = op(r, smem[g0 + i]);
    v = r;
  }
  return v;
}

// Two sums reduced together (the T-gradient's two partial sums).
template <typename acc_t>
struct Pair {
  acc_t a, b;
  __device__ __forceinline__ Pair operator+(const Pair& o) const { return Pair{a + o.a, b + o.b}; }
};

struct Plus {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& x, const T& y) const {
    return x + y;
  }
};

// The online log-sum-exp state of (part of) a row, in units of the raw logits x (beta > 0):
//   m = max x,  s = sum exp(beta (x - m)),  d = sum u_c (m - x_c) >= 0,  wc = sum u_c
// (u_c: the weights of the smoothing or soft-target sum). docs/design.md derives the merge.
template <typename acc_t>
struct LseState {
  acc_t m, s, d, wc;
};

// r = the merge of a and b, exact up to rounding.
template <typename acc_t>
__device__ __forceinline__ void lse_merge(LseState<acc_t>& r, const LseState<acc_t>& a,
                                          const LseState<acc_t>& b, acc_t beta_log2e) {
  r.m = a.m > b.m ? a.m : b.m;
  const bool af = a.m > neg_inf<acc_t>();
  const bool bf = b.m > neg_inf<acc_t>();
  const acc_t ea = af ? fexp2((a.m - r.m) * beta_log2e) : acc_t(0);
  const acc_t eb = bf ? fexp2((b.m - r.m) * beta_log2e) : acc_t(0);
  r.s = a.s * ea + b.s * eb;
  // (a weight of inf in a part at the maximum: wc * 0 = NaN, left out by the reader of d)
  r.d = (a.d + (af ? a.wc * (r.m - a.m) : acc_t(0))) + (b.d + (bf ? b.wc * (r.m - b.m) : acc_t(0)));
  r.wc = a.wc + b.wc;
}

// Sum over the whole block, valid in thread 0 (a shared double per warp, its own).
template <int BLOCK>
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double smem[BLOCK / kWarp];
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if constexpr (BLOCK > kWarp) {
    __syncthreads();
    if ((threadIdx.x % kWarp) == 0) smem[threadIdx.x / kWarp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
      double r = smem[0];
      for (int i = 1; i < BLOCK / kWarp; ++i) r += smem[i];
      v = r;
    }
  }
  return v;
}

// The block's partial sums: parts[k * gridDim.x + blockIdx.x] = the block's sum of sums[k].
template <int BLOCK, int K>
__device__ __forceinline__ void store_block_sums(double* parts, const double (&sums)[K]) {
  double r[K];
#pragma unroll
  for (int k = 0; k < K; ++k) r[k] = block_sum<BLOCK>(sums[k]);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) parts[static_cast<int64_t>(k) * gridDim.x + blockIdx.x] = r[k];
  }
}

// The final, deterministic reduction: one block sums K arrays of P doubles (parts[k * P + i]) in
// a fixed order and thread 0 calls w(sums).
template <int K, typename Writer>
__global__ void __launch_bounds__(1024)
    finalize_kernel(const double* __restrict__ parts, int P, Writer w) {
  __shared__ double sums[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    double a = 0.0;
    for (int i = threadIdx.x; i < P; i += 1024) a += parts[static_cast<int64_t>(k) * P + i];
    a = block_sum<1024>(a);
    if (threadIdx.x == 0) sums[k] = a;
  }
  if (threadIdx.x == 0) w(sums);
}

// A Writer of finalize_kernel: out[k] = sums[k] / divisor[k] (out[k].p == nullptr: not written).
template <int K>
struct StoreSums {
  AnyOut out[K];
  double divisor[K];
  __device__ void operator()(const double* s) const {
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (out[k].p) out[k].store(0, s[k] / divisor[k]);
  }
};

// out (0-dim, any floating dtype) = the sum of the P partials / divisor, in one block.
inline void launch_sum(const at::Tensor& parts, int P, const at::Tensor& out, double divisor,
                       cudaStream_t stream) {
  const StoreSums<1> w{{any_out(out)}, {divisor}};
  launch(KernelRef<&finalize_kernel<1, StoreSums<1>>>{}, Launch{1, 1024, 1}, stream,
         parts.data_ptr<double>(), P, w);
}

}  // namespace cuda
}  // namespace softcal
