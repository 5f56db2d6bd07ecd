// softcal CUDA: what the cross-entropy ops share (cross_entropy_fwd.cu, cross_entropy_bwd.cu,
// cross_entropy_fused.cu): the kernels' arguments, the small kernels of the mean's denominator
// and of sum_c w_c, the final reduction and the host-side preparation of the inputs.
// docs/kernels-cuda.md, "Cross-entropy".
#pragma once

#include "cuda/ce_row.cuh"
#include "cuda/launch.cuh"

namespace softcal {
namespace cuda {

// The rows that every cross-entropy kernel reads (the ops here and the shard ops).
template <typename T>
struct CERows {
  using acc_t = at::opmath_type<T>;
  const T* logits;
  int64_t row_stride;
  int64_t rows;
  int C;
  const int64_t* target;
  const acc_t* weight;  // class weights in acc (converted once on the host), or nullptr
  int64_t ignore_index;
  Temperature temp;
};

template <typename T>
struct CEArgs : CERows<T> {
  using acc_t = at::opmath_type<T>;
  acc_t eps;
  int reduction;
  // forward outputs
  loss_t<T>* loss_rows;  // reduction none
  acc_t* lse;            // (rows, 2): [m, ls]
  double* parts;         // [3][gridDim.x]: loss, w_y of the rows counted, T-gradient
  // backward inputs
  AnyIn grad_loss;            // (rows,) with its stride, or 0-dim
  const acc_t* lse_in;        // the forward's [m, ls]
  const acc_t* denom;         // mean: sum of w_y over the rows counted
  const acc_t* weight_total;  // W = sum_c w_c, or nullptr (then W = C)
  // gradient outputs
  T* grad;  // (rows, C) contiguous, or nullptr
  bool need_t;
  AnyOut t_rows;  // fused, reduction none: per-row dL_i/dT
  // the LLM terms (schemas.h): zl the z-loss (0: none), for mean with class weights scaled by
  // *zl_den / *zl_cnt on the device (denom / the count of rows: ce_zl); cap the soft-cap (the
  // kernels' Softcap variant); lse_all: ignored rows' [m, ls] written too (into lse, which the
  // fused kernels write only when it is given)
  acc_t zl;
  const acc_t* zl_den;
  const acc_t* zl_cnt;
  acc_t cap;
  bool lse_all;
};

// The z-loss's coefficient of a row's lse^2 (docs/design.md §1; the CPU's dispatch_pass).
template <typename T>
__device__ __forceinline__ at::opmath_type<T> ce_zl(const CEArgs<T>& a) {
  using acc_t = at::opmath_type<T>;
  if (a.zl == acc_t(0) || a.zl_cnt == nullptr) return a.zl;
  const acc_t cnt = *a.zl_cnt;
  return cnt > acc_t(0) ? a.zl * *a.zl_den / cnt : acc_t(0);
}

// The row's upstream gradient, 1/denom included for mean (backward), or 1 (fused).
template <typename T>
__device__ __forceinline__ at::opmath_type<T> ce_grad_loss(const CEArgs<T>& a, int64_t row) {
  using acc_t = at::opmath_type<T>;
  if (a.reduction == kNone) return static_cast<acc_t>(a.grad_loss[row]);
  const acc_t g = static_cast<acc_t>(a.grad_loss[0]);
  return a.reduction == kMean ? g / *a.denom : g;
}

// The T-gradient's scale of pass P (t_grad_scale): beta in double and g, the upstream gradient
// shared by every row (backward: grad_loss / denom, 1 for reduction none; fused: 1 / denom).
template <Pass P, typename T>
__device__ __forceinline__ TGradScale ce_t_grad_scale(const CEArgs<T>& a,
                                                      at::opmath_type<T> beta_f) {
  double g = 1.0;
  if (P == Pass::kBackward && a.reduction != kNone) g = a.grad_loss[0];
  if (a.reduction == kMean) g /= static_cast<double>(*a.denom);
  return t_grad_scale(load_beta<double>(a.temp), beta_f, g);
}

// A row's own upstream gradient for the T-gradient (backward, reduction none), else 1.
template <Pass P, typename T>
__device__ __forceinline__ double ce_t_grad_row(const CEArgs<T>& a, int64_t row) {
  return (P == Pass::kBackward && a.reduction == kNone) ? a.grad_loss[row] : 1.0;
}

// The final reduction's writer: the loss (mean: divided by denom, given or summed here), denom
// and dL/dT, each when asked for.
template <typename acc_t>
struct CEFinal {
  AnyOut loss;
  int reduction;
  acc_t* denom_out;
  const acc_t* denom_in;
  AnyOut grad_t;
  __device__ void operator()(const double* s) const {
    if (loss.p) {
      const double den =
          denom_in ? static_cast<double>(*denom_in) : static_cast<double>(static_cast<acc_t>(s[1]));
      loss.store(0, reduction == kMean ? s[0] / den : s[0]);
    }
    if (denom_out) *denom_out = static_cast<acc_t>(s[1]);
    if (grad_t.p) grad_t.store(0, s[2]);
  }
};

template <typename acc_t>
inline void launch_ce_final(const at::Tensor& parts, int P, const CEFinal<acc_t>& w,
                            cudaStream_t stream) {
  launch(KernelRef<&finalize_kernel<3, CEFinal<acc_t>>>{}, Launch{1, 1024, 1}, stream,
         parts.data_ptr<double>(), P, w);
}

// Per-block sums of w_y over the rows counted by mean (the denominator).
template <typename acc_t>
__global__ void __launch_bounds__(256, 2)
    denom_parts_kernel(const int64_t* __restrict__ target, const acc_t* __restrict__ weight,
                       int64_t rows, int C, int64_t ignore_index, double* __restrict__ parts) {
  double s = 0.0;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * 256) {
    const int64_t y = target[r];
    if (y != ignore_index && y >= 0 && y < C) s += weight ? static_cast<double>(weight[y]) : 1.0;
  }
  store_block_sums<256, 1>(parts, {s});
}

// W = sum_c w_c (one block).
template <typename acc_t>
__global__ void __launch_bounds__(1024)
    weight_total_kernel(const acc_t* __restrict__ w, int C, acc_t* __restrict__ out) {
  double s = 0.0;
  for (int c = threadIdx.x; c < C; c += 1024) s += static_cast<double>(w[c]);
  s = block_sum<1024>(s);
  if (threadIdx.x == 0) *out = static_cast<acc_t>(s);
}

// ------------------------------------------------------------------ host side
// The inputs as the kernels read them: the target contiguous, the class weights contiguous in
// the accumulation dtype (converted once here, whatever their dtype).
struct CEInputs {
  at::Tensor target;
  std::optional<at::Tensor> weight;
};

inline CEInputs ce_inputs(const at::Tensor& logits, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight) {
  CEInputs in;
  in.target = target.contiguous();
  if (weight.has_value()) in.weight = weight->to(acc_type(logits.scalar_type())).contiguous();
  return in;
}

// Fills the CERows part of a kernel's arguments.
template <typename T>
inline void set_rows(CERows<T>& a, const at::Tensor& logits, const CEInputs& in,
                     const std::optional<at::Tensor>& temperature_t, double temperature,
                     int64_t ignore_index) {
  a.logits = logits.data_ptr<T>();
  a.row_stride = logits.stride(0);
  a.rows = logits.size(0);
  a.C = static_cast<int>(logits.size(1));
  a.target = in.target.data_ptr<int64_t>();
  a.weight = in.weight.has_value() ? in.weight->data_ptr<at::opmath_type<T>>() : nullptr;
  a.ignore_index = ignore_index;
  a.temp = make_temperature(temperature_t, temperature);
}

template <typename T>
inline CEArgs<T> ce_args(const at::Tensor& logits, const CEInputs& in,
                         const std::optional<at::Tensor>& temperature_t, double temperature,
                         double eps, int64_t ignore_index, int64_t reduction) {
  CEArgs<T> a{};
  set_rows(a, logits, in, temperature_t, temperature, ignore_index);
  a.eps = static_cast<at::opmath_type<T>>(eps);
  a.reduction = static_cast<int>(reduction);
  return a;
}

// The loss: (rows,) for none, () otherwise, in acc. An empty batch's is PyTorch's: mean NaN, sum 0.
inline at::Tensor ce_loss_tensor(const at::Tensor& logits, int64_t reduction) {
  auto opts = logits.options().dtype(acc_type(logits.scalar_type()));
  at::Tensor loss = reduction == kNone ? at::empty({logits.size(0)}, opts) : at::empty({}, opts);
  if (logits.size(0) == 0) {
    if (reduction == kMean)
      loss.fill_(std::numeric_limits<double>::quiet_NaN());
    else if (reduction == kSum)
      loss.zero_();
  }
  return loss;
}

// denom (acc, 0-dim) computed on the device from the target alone (counted without weights
// when `counted`: the number of non-ignored rows).
template <typename T>
inline at::Tensor ce_denom(const at::Tensor& logits, const CEArgs<T>& a, cudaStream_t stream,
                           bool counted = false) {
  using acc_t = at::opmath_type<T>;
  at::Tensor denom = at::empty({}, logits.options().dtype(acc_type(logits.scalar_type())));
  const Launch l = plan(Walk::kCount, a.rows);
  at::Tensor parts = at::empty({l.grid}, logits.options().dtype(at::kDouble));
  launch(KernelRef<&denom_parts_kernel<acc_t>>{}, l, stream, a.target,
         counted ? static_cast<const acc_t*>(nullptr) : a.weight, a.rows, a.C, a.ignore_index,
         parts.data_ptr<double>());
  launch_sum(parts, l.grid, denom, 1.0, stream);
  return denom;
}

// The LLM terms into a kernel's arguments; for the z-loss with mean and class weights, denom
// (given, else computed here) and the count of rows, kept alive in `keep`.
template <typename T>
inline void set_llm_terms(CEArgs<T>& a, const at::Tensor& logits, double z_loss, double softcap,
                          bool lse_all, int64_t reduction, const at::Tensor* denom,
                          std::vector<at::Tensor>& keep, cudaStream_t stream) {
  using acc_t = at::opmath_type<T>;
  a.zl = static_cast<acc_t>(z_loss);
  a.cap = static_cast<acc_t>(softcap);
  a.lse_all = lse_all;
  a.zl_den = a.zl_cnt = nullptr;
  if (z_loss > 0 && reduction == kMean && a.weight != nullptr) {
    keep.push_back(denom != nullptr ? *denom : ce_denom<T>(logits, a, stream));
    keep.push_back(ce_denom<T>(logits, a, stream, true));
    a.zl_den = keep[keep.size() - 2].data_ptr<acc_t>();
    a.zl_cnt = keep.back().data_ptr<acc_t>();
  }
}

// W = sum_c w_c (acc, 0-dim), when smoothing needs it.
template <typename T>
inline at::Tensor ce_weight_total(const at::Tensor& logits, const CEArgs<T>& a,
                                  cudaStream_t stream) {
  using acc_t = at::opmath_type<T>;
  at::Tensor total = at::empty({}, logits.options().dtype(acc_type(logits.scalar_type())));
  launch(KernelRef<&weight_total_kernel<acc_t>>{}, Launch{1, 1024, 1}, stream, a.weight, a.C,
         total.data_ptr<acc_t>());
  return total;
}

}  // namespace cuda
}  // namespace softcal
