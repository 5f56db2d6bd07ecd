// softcal CUDA: what every kernel uses: 16-byte vectors, exponentials and logs, scalars read and
// written in any floating dtype, the temperature. docs/kernels-cuda.md has the kernel design.
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
#include <optional>
#include <type_traits>

#include "common.h"

namespace softcal {
namespace cuda {

constexpr int kWarp = 32;
// 16-byte vectors in flight per thread in the streaming loops.
constexpr int kUnroll = 4;

// N elements read or written as one unit: 16 bytes (one LDG.E.128) for the default N; a target
// of float32 beside bfloat16 logits is 8 floats, two 16-byte accesses.
template <typename T, int N = 16 / static_cast<int>(sizeof(T))>
struct alignas(16) Vec {
  static constexpr int kSize = N;
  T v[N];
};

template <typename T>
using Vec16 = Vec<T>;

template <typename T>
constexpr int vec_size() {
  return 16 / static_cast<int>(sizeof(T));
}

// The dtype of the losses an op returns, per row and reduced: the accumulation dtype (the Python
// layer rounds it to the logits' dtype once).
template <typename T>
using loss_t = at::opmath_type<T>;

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
// log of a row's sum of exps s >= 1 (the max contributes exactly 1) as log1p(s - 1): s - 1 is
// exact for s <= 2, and --use_fast_math does not replace log1pf (it does logf, whose error near 1
// would dominate log p of confident rows). Once per row.
__device__ __forceinline__ float flog_sum(float s) { return ::log1pf(s - 1.0f); }
__device__ __forceinline__ double flog_sum(double s) { return ::log1p(s - 1.0); }

__device__ __forceinline__ float fmax_nn(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double fmax_nn(double a, double b) { return fmax(a, b); }

// The max of the `count` values of a vector, already converted to acc_t in x (x[k] = -inf for
// k >= count). NaN is ignored (a NaN row is caught by its sum). A full vector is reduced as a
// tree; bfloat16/half vectors as packed pairs (HMNMX2, exact for a max) on sm_80+.
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

// A sum of N values as a balanced tree: short dependency chains, the same number of additions.
template <int N, typename acc_t>
__device__ __forceinline__ acc_t tree_sum(const acc_t* v) {
  if constexpr (N == 1) {
    return v[0];
  } else {
    return tree_sum<N / 2>(v) + tree_sum<N - N / 2>(v + N / 2);
  }
}

// ------------------------------------------------------------------ scalars of any dtype
// The temperature, grad_loss and grad_temperature have their own dtype, not the kernel's.
enum class Dtype : int { kFloat, kDouble, kHalf, kBFloat16 };

inline Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return Dtype::kFloat;
    case at::kDouble:
      return Dtype::kDouble;
    case at::kHalf:
      return Dtype::kHalf;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, "softcal (CUDA): unsupported dtype ", t);
  }
  return Dtype::kFloat;
}

// Values read from device memory: p[i * stride], converted to double.
struct AnyIn {
  const void* p = nullptr;
  Dtype dtype = Dtype::kFloat;
  int64_t stride = 0;

  __device__ __forceinline__ double operator[](int64_t i) const {
    const int64_t j = i * stride;
    switch (dtype) {
      case Dtype::kFloat:
        return static_cast<double>(static_cast<const float*>(p)[j]);
      case Dtype::kDouble:
        return static_cast<const double*>(p)[j];
      case Dtype::kHalf:
        return static_cast<double>(static_cast<float>(static_cast<const c10::Half*>(p)[j]));
      default:
        return static_cast<double>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[j]));
    }
  }
};

// Values written to device memory: p[i] = v, rounded to the tensor's dtype (nullptr: not written).
struct AnyOut {
  void* p = nullptr;
  Dtype dtype = Dtype::kFloat;

  __device__ __forceinline__ void store(int64_t i, double v) const {
    switch (dtype) {
      case Dtype::kFloat:
        static_cast<float*>(p)[i] = static_cast<float>(v);
        break;
      case Dtype::kDouble:
        static_cast<double*>(p)[i] = v;
        break;
      case Dtype::kHalf:
        static_cast<c10::Half*>(p)[i] = c10::Half(static_cast<float>(v));
        break;
      default:
        static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(static_cast<float>(v));
        break;
    }
  }
};

inline AnyIn any_in(const at::Tensor& t, int64_t stride = 0) {
  return AnyIn{t.data_ptr(), dtype_of(t.scalar_type()), stride};
}

inline AnyOut any_out(const at::Tensor& t) {
  return AnyOut{t.data_ptr(), dtype_of(t.scalar_type())};
}

// The temperature: a 0-dim tensor read by the kernel (never on the host), or a float.
struct Temperature {
  AnyIn tensor;
  double value;
};

inline Temperature make_temperature(const std::optional<at::Tensor>& temperature_t,
                                    double temperature) {
  if (temperature_t.has_value()) return Temperature{any_in(*temperature_t), 1.0};
  return Temperature{AnyIn{}, temperature};
}

// beta = 1/T; a temperature that is not finite and > 0 gives NaN outputs (docs/design.md).
template <typename acc_t>
__device__ __forceinline__ acc_t load_beta(const Temperature& t) {
  const double T = t.tensor.p ? t.tensor[0] : t.value;
  if (!(T > 0.0 && T < std::numeric_limits<double>::infinity())) {
    return std::numeric_limits<acc_t>::quiet_NaN();
  }
  return static_cast<acc_t>(1.0 / T);
}

}  // namespace cuda
}  // namespace softcal
