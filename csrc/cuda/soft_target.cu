// softcal CUDA: cross-entropy against class-probability targets, soft_target_fwd and
// soft_target_bwd (schemas: csrc/schemas.h; maths: docs/design.md, "Class-probability targets").
// Per row, with u_c = w_c ((1 - eps) t_c + eps / C) and U = sum_c u_c:
//   forward   loss = beta sum_c u_c (m - x_c) + U ls       (one read of the logits and the target)
//   backward  dL/dx_c = beta g (U p_c - u_c),  dL/dt_c = -g (1 - eps) w_c log p_c,
//             dL/dT = -beta g sum_c dz_c log p_c           (one read of each, one write of each
//                                                          gradient asked for)
// The row state is reduce.cuh's LseState (u_c the weights of the d sum); the two rows are walked
// together (rows.cuh, for_each_pair). The target's dtype is the logits' or, for float16 and
// bfloat16 logits, float32. docs/kernels-cuda.md, "Soft targets".
#include <torch/library.h>

#include "checks.h"
#include "cuda/launch.cuh"
#include "cuda/reduce.cuh"
#include "cuda/rows.cuh"

namespace softcal {
namespace cuda {
namespace {

// T: the logits' dtype; Q: the target's (probabilities).
template <typename T, typename Q>
struct SoftArgs {
  using logits_t = T;
  using target_t = Q;
  using acc_t = at::opmath_type<T>;
  const T* logits;
  int64_t logits_stride;  // row strides
  const Q* target;
  int64_t target_stride;
  int64_t rows;
  int C;
  const acc_t* weight;  // in acc (converted once on the host), or nullptr
  Temperature temp;
  acc_t keep, spread;  // 1 - eps, eps / C: q_c = keep t_c + spread
  int reduction;
  // forward outputs
  loss_t<T>* loss_rows;  // reduction none
  acc_t* lse;            // (rows, 2)
  acc_t* mass;           // (rows,): U
  double* parts;         // [gridDim.x]: loss (forward) or dL/dT (backward)
  // backward inputs and outputs
  AnyIn grad_loss;
  const acc_t* lse_in;
  const acc_t* mass_in;
  T* grad_x;  // (rows, C) contiguous or nullptr
  Q* grad_t;  // (rows, C) contiguous or nullptr
  bool need_t;
};

// Blocks of <= 256 threads: at least 2 per SM (<= 128 registers) for 16- and 32-bit logits.
// float64 gets 1: with 2 ptxas (CUDA 13.0, sm_90) held its kernels to 64 registers and spilled.
template <typename T, int TPR>
constexpr int kSoftMinBlocks = (kBlock<TPR> <= 256 && sizeof(T) < 8) ? 2 : 1;

// Pairs of 16-byte loads in flight per thread: 2, or 1 with 512 threads per row.
template <int TPR>
constexpr int soft_unroll() {
  return TPR >= 512 ? 1 : kUnroll / 2;
}

template <typename T, typename Q, typename acc_t, ClassWeights W>
struct SoftAccum {
  LseState<acc_t> st;
  acc_t beta_log2e, keep, spread;
  const acc_t* w;

  __device__ __forceinline__ void operator()(int idx, const Vec16<T>& xv,
                                             const Vec<Q, vec_size<T>()>& tv, int count) {
    constexpr int V = vec_size<T>();
    acc_t x[V];
    acc_t vm = neg_inf<acc_t>();
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < count) {
        x[k] = static_cast<acc_t>(xv.v[k]);
        vm = x[k] > vm ? x[k] : vm;
      }
    }
    if (vm > st.m) {
      if (st.m > neg_inf<acc_t>()) {
        st.s *= fexp2((st.m - vm) * beta_log2e);
        st.d += st.wc * (vm - st.m);
      }
      st.m = vm;
    }
    // relative to 0 while every logit so far is -inf: a mass there makes d = +inf
    const acc_t mref = st.m > neg_inf<acc_t>() ? st.m : acc_t(0);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (k < count) {
        const acc_t dx = x[k] - mref;
        st.s += fexp2(dx * beta_log2e);
        acc_t u = keep * static_cast<acc_t>(tv.v[k]) + spread;
        if (W == ClassWeights::kPerClass) u *= w[idx + k];
        st.d -= u != acc_t(0) ? u * dx : acc_t(0);  // 0 log 0 = 0
        st.wc += u;
      }
    }
  }
};

// Per row loss = beta sum_c u_c (m - x_c) + U ls, [m, ls] and U; per block the sum of the loss.
template <typename T, typename Q, int TPR, ClassWeights W>
__global__ void __launch_bounds__(kBlock<TPR>, kSoftMinBlocks<T, TPR>)
    soft_target_fwd_kernel(const SoftArgs<T, Q> a) {
  using acc_t = at::opmath_type<T>;
  __shared__ LseState<acc_t> sred[kWarps<TPR>];
  const acc_t beta = load_beta<acc_t>(a.temp);
  const acc_t beta_log2e = beta * static_cast<acc_t>(kLog2e);
  auto merge = [beta_log2e](const LseState<acc_t>& x, const LseState<acc_t>& y) {
    LseState<acc_t> r;
    lse_merge(r, x, y, beta_log2e);
    return r;
  };
  double loss_sum = 0.0;
  for_each_row<TPR>(a.rows, [&](int64_t row, bool active, int tid) {
    const T* xr = a.logits + row * a.logits_stride;
    const Q* tr = a.target + row * a.target_stride;
    SoftAccum<T, Q, acc_t, W> acc{LseState<acc_t>{neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0)},
                                  beta_log2e, a.keep, a.spread, a.weight};
    for_each_pair<TPR, soft_unroll<TPR>()>(xr, tr, active ? a.C : 0, tid, acc);
    const LseState<acc_t> st = group_allreduce<TPR>(acc.st, merge, sred);
    if (active && tid == 0) {
      const acc_t ls = flog(st.s);
      acc_t loss;
      if (st.m > neg_inf<acc_t>() && st.m < -neg_inf<acc_t>() && ls == ls) {
        loss = beta * st.d + st.wc * ls;
        a.lse[2 * row] = st.m;
        a.lse[2 * row + 1] = ls;
      } else {  // no softmax (every logit -inf, or a NaN / +inf logit): NaN
        loss = std::numeric_limits<acc_t>::quiet_NaN();
        a.lse[2 * row] = a.lse[2 * row + 1] = loss;
      }
      a.mass[row] = st.wc;
      if (a.loss_rows) a.loss_rows[row] = static_cast<loss_t<T>>(loss);
      loss_sum += static_cast<double>(loss);
    }
  });
  store_block_sums<kBlock<TPR>, 1>(a.parts, {loss_sum});
}

// The gradients of a row (into gx and gt when asked for) and its T-gradient sums, in double
// (docs/design.md, precision policy), shifted by beta m as the cross-entropy's (ce_row.cuh):
// t1 = sum over unmasked classes of dz_c beta (x_c - m), t0 = sum over masked ones of dz_c; then
// sum_c dz_c log p_c - lse t0 = t1 - beta m t0 (sum_c dz_c = 0), and the rounding noise of
// sum_c dz_c is not multiplied by ls.
template <typename T, typename Q, typename acc_t, ClassWeights W>
struct SoftGrad {
  acc_t row_max, ls, ls_log2e;  // log p = beta (x - row_max) - ls
  acc_t beta, beta_log2e;
  acc_t mass, keep, spread;        // U, 1 - eps, eps / C
  acc_t grad_scale, target_scale;  // beta g, g (1 - eps)
  const acc_t* w;
  T* gx;
  Q* gt;
  bool gx_vec, gt_vec;  // 16-byte stores possible
  bool need_t;
  double t1 = 0, t0 = 0;

  __device__ __forceinline__ void operator()(int idx, const Vec16<T>& xv,
                                             const Vec<Q, vec_size<T>()>& tv, int count) {
    constexpr int V = vec_size<T>();
    acc_t o[V];  // one output vector at a time: the logits' gradient, then the target's
    if (gx || need_t) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (k < count) {
          const acc_t x = static_cast<acc_t>(xv.v[k]);
          const acc_t dxm = x - row_max;
          const acc_t p = fexp2(dxm * beta_log2e - ls_log2e);
          acc_t u = keep * static_cast<acc_t>(tv.v[k]) + spread;
          if (W == ClassWeights::kPerClass) u *= w[idx + k];
          const acc_t dz = mass * p - u;
          o[k] = grad_scale * dz;
          if (need_t) {
            if (x != neg_inf<acc_t>())
              t1 += static_cast<double>(dz) * static_cast<double>(dxm * beta);
            else
              t0 += static_cast<double>(dz);
          }
        }
      }
      if (gx) store_vals<T, V>(gx, idx, o, count, gx_vec);
    }
    if (gt) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (k < count) {
          const acc_t log_p =
              (static_cast<acc_t>(xv.v[k]) - row_max) * beta - ls;  // exact at the max
          const acc_t coef =
              W == ClassWeights::kPerClass ? target_scale * w[idx + k] : target_scale;
          o[k] = coef != acc_t(0) ? -coef * log_p : acc_t(0);
        }
      }
      store_vals<Q, V>(gt, idx, o, count, gt_vec);
    }
  }
};

// Per row dL/dx_c = beta g (U p_c - u_c) and dL/dt_c = -g (1 - eps) w_c log p_c; per block the sum
// of dL/dT = -beta g sum_c dz_c log p_c.
template <typename T, typename Q, int TPR, ClassWeights W>
__global__ void __launch_bounds__(kBlock<TPR>, kSoftMinBlocks<T, TPR>)
    soft_target_bwd_kernel(const SoftArgs<T, Q> a) {
  using acc_t = at::opmath_type<T>;
  __shared__ Pair<double> sred[kWarps<TPR>];
  const acc_t beta = load_beta<acc_t>(a.temp);
  const acc_t l2e = static_cast<acc_t>(kLog2e);
  acc_t g0 = 0;
  if (a.reduction != kNone) {
    double g = a.grad_loss[0];
    if (a.reduction == kMean) g /= static_cast<double>(a.rows);
    g0 = static_cast<acc_t>(g);
  }
  double t_sum = 0.0;
  for_each_row<TPR>(a.rows, [&](int64_t row, bool active, int tid) {
    const T* xr = a.logits + row * a.logits_stride;
    const Q* tr = a.target + row * a.target_stride;
    T* gxr = a.grad_x ? a.grad_x + row * static_cast<int64_t>(a.C) : nullptr;
    Q* gtr = a.grad_t ? a.grad_t + row * static_cast<int64_t>(a.C) : nullptr;
    SoftGrad<T, Q, acc_t, W> f;
    f.grad_scale = 0;
    f.row_max = 0;
    f.ls = 0;
    f.need_t = a.need_t;
    bool ok = false;
    if (active) {
      const acc_t g = a.reduction == kNone ? static_cast<acc_t>(a.grad_loss[row]) : g0;
      f.row_max = a.lse_in[2 * row];
      f.ls = a.lse_in[2 * row + 1];
      ok = f.row_max > neg_inf<acc_t>() && f.row_max < -neg_inf<acc_t>() && f.ls == f.ls &&
           f.ls < -neg_inf<acc_t>() && beta == beta;
      f.ls_log2e = f.ls * l2e;
      f.beta = beta;
      f.beta_log2e = beta * l2e;
      f.mass = a.mass_in[row];
      f.keep = a.keep;
      f.spread = a.spread;
      f.grad_scale = beta * g;
      f.target_scale = g * a.keep;
      f.w = a.weight;
      f.gx = gxr;
      f.gt = gtr;
      f.gx_vec = gxr ? aligned_like(xr, gxr) : false;
      f.gt_vec = gtr ? aligned_like(xr, gtr) : false;
      if (ok) {
        for_each_pair<TPR, soft_unroll<TPR>()>(xr, tr, a.C, tid, f);
      } else {  // no softmax: NaN gradients
        const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
        if (gxr) fill_row<TPR>(gxr, a.C, tid, static_cast<T>(nan));
        if (gtr) fill_row<TPR>(gtr, a.C, tid, static_cast<Q>(nan));
      }
    }
    if (a.need_t) {
      const Pair<double> t = group_allreduce<TPR>(Pair<double>{f.t1, f.t0}, Plus(), sred);
      if (active && tid == 0) {
        const double shift = static_cast<double>(beta * f.row_max);
        t_sum += ok ? -static_cast<double>(f.grad_scale) * (t.a - shift * t.b)
                    : std::numeric_limits<double>::quiet_NaN();
      }
    }
  });
  if (a.need_t) store_block_sums<kBlock<TPR>, 1>(a.parts, {t_sum});
}

template <typename U>
struct Tag {
  using type = U;
};

// f(Tag<Q>) for the target's dtype Q: the logits' dtype, or float32 beside float16/bfloat16.
template <typename T, typename F>
void switch_target_dtype(const at::Tensor& target, F&& f) {
  if constexpr (sizeof(T) == 2) {
    if (target.scalar_type() == at::kFloat) return f(Tag<float>{});
  }
  TORCH_INTERNAL_ASSERT(target.scalar_type() == c10::CppTypeToScalarType<T>::value);
  f(Tag<T>{});
}

// f(args, launch): the kernels' arguments for the logits' and the target's dtypes (the class
// weights converted once to acc), and the kPairs launch.
template <typename F>
void with_soft_args(const at::Tensor& logits, const at::Tensor& target,
                    const std::optional<at::Tensor>& weight_in,
                    const std::optional<at::Tensor>& temperature_t, double temperature, double eps,
                    int64_t reduction, F&& f) {
  std::optional<at::Tensor> weight;
  if (weight_in.has_value()) weight = weight_in->to(acc_type(logits.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "soft_target_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        switch_target_dtype<scalar_t>(target, [&](auto tag) {
          using Q = typename decltype(tag)::type;
          SoftArgs<scalar_t, Q> a{};
          a.logits = logits.data_ptr<scalar_t>();
          a.logits_stride = logits.stride(0);
          a.target = target.data_ptr<Q>();
          a.target_stride = target.stride(0);
          a.rows = logits.size(0);
          a.C = static_cast<int>(logits.size(1));
          a.weight = weight.has_value() ? weight->data_ptr<acc_t>() : nullptr;
          a.temp = make_temperature(temperature_t, temperature);
          a.keep = static_cast<acc_t>(1.0 - eps);
          a.spread = static_cast<acc_t>(eps / static_cast<double>(logits.size(1)));
          a.reduction = static_cast<int>(reduction);
          f(a, plan(Walk::kPairs, a.rows, a.C, vec_size<scalar_t>()));
        });
      });
}

// Launches the forward (BWD false) or backward kernel on the kPairs shape.
template <bool BWD, typename T, typename Q>
void launch_soft(const SoftArgs<T, Q>& a, const Launch& l, cudaStream_t stream) {
  static_switch<ClassWeights::kNone, ClassWeights::kPerClass>(
      a.weight ? ClassWeights::kPerClass : ClassWeights::kNone, [&](auto wc) {
        launch_rows(
            l, stream,
            [](auto tpr) {
              constexpr int TPR = decltype(tpr)::value;
              constexpr ClassWeights W = decltype(wc)::value;
              if constexpr (BWD)
                return KernelRef<&soft_target_bwd_kernel<T, Q, TPR, W>>{};
              else
                return KernelRef<&soft_target_fwd_kernel<T, Q, TPR, W>>{};
            },
            a);
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_target_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t reduction) {
  checks::soft_target_fwd(Backend::kCuda, logits, target, weight, temperature_t, temperature,
                          label_smoothing, reduction);
  c10::cuda::CUDAGuard guard(logits.device());
  const at::ScalarType acc = acc_type(logits.scalar_type());
  const int64_t rows = logits.size(0), C = logits.size(1);
  at::Tensor loss = reduction == kNone ? at::empty({rows}, logits.options().dtype(acc))
                                       : at::empty({}, logits.options().dtype(acc));
  at::Tensor lse = at::empty({rows, 2}, logits.options().dtype(acc));
  at::Tensor mass = at::empty({rows}, logits.options().dtype(acc));
  if (rows == 0 || C == 0) {  // no rows: mean NaN, sum 0; no classes: empty sums, loss 0
    lse.fill_(-std::numeric_limits<double>::infinity());
    mass.zero_();
    if (reduction == kMean && rows == 0)
      loss.fill_(std::numeric_limits<double>::quiet_NaN());
    else
      loss.zero_();
    return {loss, lse, mass};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_soft_args(logits, target, weight, temperature_t, temperature, label_smoothing, reduction,
                 [&](auto& a, const Launch& l) {
                   using A = std::decay_t<decltype(a)>;
                   at::Tensor parts = at::empty({l.grid}, logits.options().dtype(at::kDouble));
                   a.loss_rows =
                       reduction == kNone ? loss.data_ptr<loss_t<typename A::logits_t>>() : nullptr;
                   a.lse = lse.data_ptr<typename A::acc_t>();
                   a.mass = mass.data_ptr<typename A::acc_t>();
                   a.parts = parts.data_ptr<double>();
                   launch_soft<false>(a, l, stream);
                   if (reduction != kNone) {
                     launch_sum(parts, l.grid, loss,
                                reduction == kMean ? static_cast<double>(rows) : 1.0, stream);
                   }
                 });
  return {loss, lse, mass};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_target_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse, const at::Tensor& mass,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t reduction, bool need_logits_grad, bool need_target_grad, bool need_temperature_grad) {
  checks::soft_target_bwd(Backend::kCuda, grad_loss, logits, target, weight, lse, mass,
                          temperature_t, temperature, label_smoothing, reduction);
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), C = logits.size(1);
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  at::Tensor grad_x =
      need_logits_grad ? at::empty({rows, C}, logits.options()) : at::empty({0}, logits.options());
  at::Tensor grad_tg =
      need_target_grad ? at::empty({rows, C}, target.options()) : at::empty({0}, target.options());
  at::Tensor grad_temp =
      at::zeros({}, logits.options().dtype(temp_grad_type(temperature_t, logits.scalar_type())));
  if (rows == 0 || C == 0 || (!need_logits_grad && !need_target_grad && !need_t)) {
    return {grad_x, grad_tg, grad_temp};
  }
  const at::Tensor lse_c = lse.contiguous(), mass_c = mass.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_soft_args(logits, target, weight, temperature_t, temperature, label_smoothing, reduction,
                 [&](auto& a, const Launch& l) {
                   using A = std::decay_t<decltype(a)>;
                   at::Tensor parts = need_t
                                          ? at::empty({l.grid}, logits.options().dtype(at::kDouble))
                                          : at::Tensor();
                   a.grad_loss = any_in(grad_loss, reduction == kNone ? grad_loss.stride(0) : 0);
                   a.lse_in = lse_c.data_ptr<typename A::acc_t>();
                   a.mass_in = mass_c.data_ptr<typename A::acc_t>();
                   a.grad_x = need_logits_grad ? grad_x.data_ptr<typename A::logits_t>() : nullptr;
                   a.grad_t = need_target_grad ? grad_tg.data_ptr<typename A::target_t>() : nullptr;
                   a.need_t = need_t;
                   a.parts = need_t ? parts.data_ptr<double>() : nullptr;
                   launch_soft<true>(a, l, stream);
                   if (need_t) launch_sum(parts, l.grid, grad_temp, 1.0, stream);
                 });
  return {grad_x, grad_tg, grad_temp};
}

}  // namespace
}  // namespace cuda
}  // namespace softcal

TORCH_LIBRARY_IMPL(softcal, CUDA, m) {
  m.impl("soft_target_fwd", &softcal::cuda::soft_target_fwd_cuda);
  m.impl("soft_target_bwd", &softcal::cuda::soft_target_bwd_cuda);
}
