// softcal CUDA: shared device helpers (vector loads, group reductions, launch shapes, the
// deterministic final reduction). The maths is in csrc/common.h; the kernel design is written
// at the top of csrc/cuda/tsce.cuh.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstdint>
#include <limits>
#include <type_traits>

#include "common.h"

namespace softcal {
namespace cuda {

// ------------------------------------------------------------------ constants and types

constexpr int kWarp = 32;
// Vectors in flight per thread in the streaming loops (16 bytes each).
constexpr int kUnroll = 4;

template <typename T>
struct alignas(16) Vec16 {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename T>
constexpr int vec_size() {
  return 16 / sizeof(T);
}

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

__device__ __forceinline__ float fexp(float x) { return __expf(x); }
__device__ __forceinline__ double fexp(double x) { return ::exp(x); }
__device__ __forceinline__ float fexp2(float x) { return exp2f(x); }  // ex2.approx with fast math
__device__ __forceinline__ double fexp2(double x) { return ::exp2(x); }
__device__ __forceinline__ float flog(float x) { return __logf(x); }
__device__ __forceinline__ double flog(double x) { return ::log(x); }
// log of a row's sum of exps s = sum exp(beta (x - m)) >= 1 (the max contributes exactly 1):
// log1p(s - 1), with s - 1 exact for s <= 2. --use_fast_math turns logf into __logf, whose
// absolute error near 1 (~2^-21) would dominate log p of confident rows (PyTorch's log is
// accurate); log1pf is not replaced. Once per row, so its cost does not matter.
__device__ __forceinline__ float flog_sum(float s) { return ::log1pf(s - 1.0f); }
__device__ __forceinline__ double flog_sum(double s) { return ::log1p(s - 1.0); }

// Runtime dtype codes for scalars read or written by the kernels (temperature, grad_loss,
// grad_temperature) whose dtype is not the kernel's template type.
enum DCode : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

inline int dcode(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "softcal (CUDA): unsupported dtype ", t);
  }
  return kF32;
}

__device__ __forceinline__ double load_as_double(const void* p, int code, int64_t i = 0) {
  switch (code) {
    case kF32: return static_cast<double>(static_cast<const float*>(p)[i]);
    case kF64: return static_cast<const double*>(p)[i];
    case kF16: return static_cast<double>(static_cast<float>(static_cast<const c10::Half*>(p)[i]));
    default:
      return static_cast<double>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]));
  }
}

__device__ __forceinline__ void store_from_double(void* p, int code, int64_t i, double v) {
  switch (code) {
    case kF32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case kF64: static_cast<double*>(p)[i] = v; break;
    case kF16: static_cast<c10::Half*>(p)[i] = c10::Half(static_cast<float>(v)); break;
    default: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(static_cast<float>(v)); break;
  }
}

// The temperature: a device pointer (read by the kernel; never on the host) or a float.
struct TempArg {
  const void* ptr;
  int code;
  double value;
};

inline TempArg make_temp(const std::optional<at::Tensor>& temperature_t, double temperature) {
  if (temperature_t.has_value()) {
    return TempArg{temperature_t->data_ptr(), dcode(temperature_t->scalar_type()), 1.0};
  }
  return TempArg{nullptr, 0, temperature};
}

// beta = 1/T; a temperature that is not finite and > 0 gives NaN outputs (common.h).
template <typename acc_t>
__device__ __forceinline__ acc_t load_beta(const TempArg& t) {
  const double T = t.ptr ? load_as_double(t.ptr, t.code) : t.value;
  if (!(T > 0.0 && T < std::numeric_limits<double>::infinity())) {
    return std::numeric_limits<acc_t>::quiet_NaN();
  }
  return static_cast<acc_t>(1.0 / T);
}

__device__ __forceinline__ float fmax_nn(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double fmax_nn(double a, double b) { return fmax(a, b); }

// The max of the `count` values of a 16-byte vector, already converted to acc_t in x (x[k] = -inf
// for k >= count). NaN is ignored (as `a > b ? a : b` from -inf: a NaN row is caught by its sum).
// A full vector is reduced as a tree of FMNMX; bfloat16/half vectors as packed pairs (HMNMX2) on
// sm_80+, exact for a max, which halves the instructions.
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t vec_max(const Vec16<T>& v, const acc_t* x, int count) {
  constexpr int V = vec_size<T>();
  if (count == V) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(v.v);
      const __nv_bfloat162 a = __hmax2(__hmax2(h[0], h[1]), __hmax2(h[2], h[3]));
      return fmax_nn(__low2float(a), __high2float(a));
    } else if constexpr (std::is_same_v<T, c10::Half>) {
      const __half2* h = reinterpret_cast<const __half2*>(v.v);
      const __half2 a = __hmax2(__hmax2(h[0], h[1]), __hmax2(h[2], h[3]));
      return fmax_nn(__low2float(a), __high2float(a));
    }
#endif
    acc_t m[V];
#pragma unroll
    for (int k = 0; k < V; ++k) m[k] = x[k];
#pragma unroll
    for (int w = V / 2; w > 0; w /= 2)
#pragma unroll
      for (int k = 0; k < w; ++k) m[k] = fmax_nn(m[k], m[k + w]);
    return m[0];
  }
  acc_t r = x[0];
#pragma unroll
  for (int k = 1; k < V; ++k) r = fmax_nn(r, x[k]);
  return r;
}

// ------------------------------------------------------------------ row layout
// A row of n elements at p is split into a misaligned head (< VEC scalars), nvec aligned 16-byte
// vectors and a tail (< VEC scalars). Every row of every tensor gets 16-byte loads this way,
// whatever its length or offset (C = 50257 included).
template <typename T>
struct RowSplit {
  int head;
  int nvec;
  int tail0;  // first tail index
  __device__ __forceinline__ RowSplit(const T* p, int n) {
    constexpr int V = vec_size<T>();
    const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(p) & 15) / sizeof(T));
    head = mis ? min(n, V - mis) : 0;
    nvec = (n - head) / V;
    tail0 = head + nvec * V;
  }
};

template <typename T>
__device__ __forceinline__ bool same_misalignment(const void* a, const void* b) {
  return ((reinterpret_cast<uintptr_t>(a) ^ reinterpret_cast<uintptr_t>(b)) & 15) == 0;
}

// Calls f(first_index, vec, count) over the elements this thread owns in a row: count == VEC
// for the aligned vectors, 1 for the head and tail scalars (vec.v[0]). kUnroll vector loads are
// issued before the first is used: 4, or 2 with 512 threads per row, 1 with 1024 (two blocks of
// 1024 threads per SM keep 32 KiB in flight, and stay within the 64 registers per thread such a
// block allows).
template <int TPR, int UNROLL = 0, typename T, typename F>
__device__ __forceinline__ void for_each_vec(const T* row, int n, int tid, F&& f) {
  constexpr int V = vec_size<T>();
  constexpr int kUnroll = UNROLL > 0 ? UNROLL : (TPR >= 512 ? 2 : ::softcal::cuda::kUnroll);
  const RowSplit<T> sp(row, n);
  for (int i = tid; i < sp.head; i += TPR) {
    Vec16<T> v;
    v.v[0] = row[i];
    f(i, v, 1);
  }
  const Vec16<T>* vrow = reinterpret_cast<const Vec16<T>*>(row + sp.head);
  for (int j0 = tid; j0 < sp.nvec; j0 += kUnroll * TPR) {
    Vec16<T> buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * TPR;
      if (j < sp.nvec) buf[u] = vrow[j];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * TPR;
      if (j < sp.nvec) f(sp.head + j * V, buf[u], V);
    }
  }
  for (int i = sp.tail0 + tid; i < n; i += TPR) {
    Vec16<T> v;
    v.v[0] = row[i];
    f(i, v, 1);
  }
}

// A whole row held in registers: each thread owns up to MAXV vectors plus at most
// HT head and HT tail scalars. The host guarantees ceil(n / VEC) <= TPR * MAXV.
template <typename T, int TPR, int MAXV>
struct RowRegs {
  static constexpr int V = vec_size<T>();
  static constexpr int HT = (V - 1 + TPR - 1) / TPR > 0 ? (V - 1 + TPR - 1) / TPR : 1;
  Vec16<T> body[MAXV];
  T ht[2 * HT];
  RowSplit<T> sp;
  int tid;

  __device__ __forceinline__ RowRegs(const T* row, int n, int tid_) : sp(row, n), tid(tid_) {
    const Vec16<T>* vrow = reinterpret_cast<const Vec16<T>*>(row + sp.head);
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int j = tid + k * TPR;
      if (j < sp.nvec) body[k] = vrow[j];
    }
#pragma unroll
    for (int k = 0; k < HT; ++k) {
      const int i = tid + k * TPR;
      if (i < sp.head) ht[k] = row[i];
      const int t = sp.tail0 + i;
      if (t < n) ht[HT + k] = row[t];
    }
  }

  template <typename F>
  __device__ __forceinline__ void apply(int n, F&& f) const {
    constexpr int VV = V;
#pragma unroll
    for (int k = 0; k < HT; ++k) {
      const int i = tid + k * TPR;
      if (i < sp.head) {
        Vec16<T> v;
        v.v[0] = ht[k];
        f(i, v, 1);
      }
    }
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int j = tid + k * TPR;
      if (j < sp.nvec) f(sp.head + j * VV, body[k], VV);
    }
#pragma unroll
    for (int k = 0; k < HT; ++k) {
      const int t = sp.tail0 + tid + k * TPR;
      if (t < n) {
        Vec16<T> v;
        v.v[0] = ht[HT + k];
        f(t, v, 1);
      }
    }
  }
};

// Stores count values (count == VEC: one 16-byte store when dst shares the source's alignment).
template <typename T, typename acc_t>
__device__ __forceinline__ void store_vals(T* dst, int idx, const acc_t* vals, int count,
                                           bool vec_ok) {
  constexpr int V = vec_size<T>();
  if (count == V && vec_ok) {
    Vec16<T> o;
#pragma unroll
    for (int k = 0; k < V; ++k) o.v[k] = static_cast<T>(vals[k]);
    *reinterpret_cast<Vec16<T>*>(dst + idx) = o;
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (k < count) dst[idx + k] = static_cast<T>(vals[k]);
  }
}

// ------------------------------------------------------------------ reductions
template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

// All-reduce within a group of TPR consecutive threads (TPR a power of two, <= BLOCK).
// Every thread of the block must call it (it may use __syncthreads when TPR > 32).
// smem: at least BLOCK / 32 elements of T. The order of the combination is fixed: the result is
// bitwise reproducible.
template <int TPR, typename T, typename Op>
__device__ __forceinline__ T group_allreduce(T v, Op op, T* smem) {
  constexpr int W = TPR < kWarp ? TPR : kWarp;
  // The lower lane's value always goes first, so that both partners of an exchange compute
  // the same bits (the merge ops are commutative only up to rounding).
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
};
template <typename acc_t>
__device__ __forceinline__ Pair<acc_t> shfl_xor(Pair<acc_t> v, int mask) {
  return Pair<acc_t>{__shfl_xor_sync(0xffffffffu, v.a, mask), __shfl_xor_sync(0xffffffffu, v.b, mask)};
}
template <typename acc_t>
struct PairSum {
  __device__ __forceinline__ Pair<acc_t> operator()(const Pair<acc_t>& x, const Pair<acc_t>& y) const {
    return Pair<acc_t>{x.a + y.a, x.b + y.b};
  }
};

// The log-sum-exp merge of two per-thread row states (exact up to rounding), for any state with
// the fields m (max x), s (sum exp(beta (x - m))), d (sum w (m - x) >= 0) and wc (sum w), in
// units of the raw logits; bl2 = beta * log2(e). Sets r.m, r.s, r.d and r.wc; the caller merges
// any other field (CEMerge in tsce.cuh: the target's logit; SoftMerge in tsce_soft.cu: none).
template <typename State, typename acc_t>
__device__ __forceinline__ void lse_merge(State& r, const State& a, const State& b, acc_t bl2) {
  r.m = a.m > b.m ? a.m : b.m;
  const bool af = a.m > neg_inf<acc_t>();
  const bool bf = b.m > neg_inf<acc_t>();
  const acc_t ea = af ? fexp2((a.m - r.m) * bl2) : acc_t(0);
  const acc_t eb = bf ? fexp2((b.m - r.m) * bl2) : acc_t(0);
  r.s = a.s * ea + b.s * eb;
  r.d = (a.d + (af ? a.wc * (r.m - a.m) : acc_t(0))) + (b.d + (bf ? b.wc * (r.m - b.m) : acc_t(0)));
  r.wc = a.wc + b.wc;
}

// Sum over the whole block, result valid in thread 0. smem: BLOCK / 32 doubles.
template <int BLOCK>
__device__ __forceinline__ double block_sum(double v, double* smem) {
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

// Final deterministic reduction: one block sums K arrays of P doubles (parts[k * P + i]) in a
// fixed order and thread 0 calls w(sums).
template <int K, typename Writer>
__global__ void __launch_bounds__(1024) finalize_kernel(const double* __restrict__ parts, int P,
                                                        Writer w) {
  __shared__ double smem[32];
  __shared__ double sums[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    double a = 0.0;
    for (int i = threadIdx.x; i < P; i += 1024) a += parts[static_cast<int64_t>(k) * P + i];
    a = block_sum<1024>(a, smem);
    if (threadIdx.x == 0) sums[k] = a;
  }
  if (threadIdx.x == 0) w(sums);
}

// ------------------------------------------------------------------ launch shapes
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

// Threads per row: enough that each thread owns about `per_thread` 16-byte vectors; one of
// 4, 8, 16, 32 (several rows per 256-thread block) or 128, 256, 512 (one row per group of that
// many threads, groups of >= 128 fill a block of max(TPR, 256)). No kernel runs blocks of 1024
// threads: they get 64 registers per thread, and ptxas spilled the row kernels there.
inline int pick_tpr(int64_t C, int vec, int per_thread) {
  const int64_t nv = ceil_div(C, vec);
  int t = next_pow2(ceil_div(nv, per_thread));
  if (t < 4) t = 4;
  if (t == 64) t = 128;
  if (t > 512) t = 512;
  return t;
}

constexpr int block_for(int tpr) { return tpr < 256 ? 256 : tpr; }

// The minimum number of resident blocks given to __launch_bounds__ for a block of `block` threads:
// 2 blocks of 256 or 1 of 512, a cap of 128 registers per thread (512 threads per SM at least).
// With the block size alone, ptxas held the row kernels to 64-80 registers and spilled (the
// bfloat16 backward keeps 4 vectors loaded ahead and 4 to write; the softmax backward two rows).
constexpr int min_blocks_for(int block) { return block >= 512 ? 1 : 2; }

// Threads per row for the streaming loops (each element read once or twice, nothing of the row
// held on chip): about 16 vectors per thread (4 batches of kUnroll = 4 loads in flight) and at
// most 256 threads per row, so that several rows share an SM with 64 bytes in flight per thread.
// (The 2026-12-04 H200 run used 1024 threads per row at C = 32000 bf16: one block of 1024 threads
// per SM at 50 registers, one load in flight per thread, 16 KiB per SM: 21-56 % of the bandwidth.)
// More threads per row, up to 512, only when the rows are too few to fill the device.
inline int pick_stream_tpr(int64_t C, int vec, int64_t rows) {
  int t = pick_tpr(C, vec, 16);
  if (t > 256) t = 256;
  const int64_t nv = ceil_div(C, vec);
  const int64_t slots = static_cast<int64_t>(sm_count()) * 2048;
  while (t >= 128 && t < 512 && rows * t < slots && nv >= 8LL * t) t <<= 1;
  return t;
}

// Grid of a grid-stride loop over row groups: at most 4 waves of resident blocks. It depends
// only on the shape and the device, so the order of every reduction is fixed for a given device.
inline int grid_for(int64_t rows, int tpr) {
  const int block = block_for(tpr);
  const int64_t groups = ceil_div(rows, block / tpr);
  const int64_t cap = static_cast<int64_t>(sm_count()) * (2048 / block) * 4;
  return static_cast<int>(groups < cap ? (groups > 0 ? groups : 1) : cap);
}

template <typename F>
inline void dispatch_tpr(int tpr, F&& f) {
  switch (tpr) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    case 256: f(std::integral_constant<int, 256>{}); break;
    default: f(std::integral_constant<int, 512>{}); break;
  }
}

}  // namespace cuda
}  // namespace softcal
