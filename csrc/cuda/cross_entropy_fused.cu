// softcal CUDA: cross_entropy_fused and cross_entropy_fused_ (the loss and its gradient for an
// upstream gradient of 1 in one kernel; fused_ writes the gradient over the logits). Phase 1 of
// cross_entropy_fwd, then phase 2 of cross_entropy_bwd with the row's own [m, ls]: the row is read
// once when it fits in registers, twice otherwise (the second read from L2).
// docs/kernels-cuda.md, "Cross-entropy".
#include <torch/library.h>

#include "checks.h"
#include "cuda/ce_tile.cuh"

namespace softcal {
namespace cuda {
namespace {

// RESIDENT: the row is held in registers between the two phases (MAXV vectors per thread);
// otherwise the second phase reads the row again.
template <typename T>
struct NoRegs {
  __device__ __forceinline__ NoRegs(const T*, int, int) {}
};

// Per row phase 1 (the loss, as cross_entropy_fwd_kernel) then phase 2 (the gradient, as
// cross_entropy_bwd_kernel with g = 1, or 1 / denom for mean, and the row's own [m, ls]).
template <typename T, int TPR, int MAXV, bool RESIDENT, Smoothing S, ClassWeights W, Softcap P>
__global__ void __launch_bounds__(kBlock<TPR>, kMinBlocks<TPR>)
    cross_entropy_fused_kernel(const CEArgs<T> a) {
  using acc_t = at::opmath_type<T>;
  using Regs = std::conditional_t<RESIDENT, RowRegs<T, TPR, MAXV>, NoRegs<T>>;
  __shared__ CEState<acc_t> sred[kWarps<TPR>];
  __shared__ Pair<double> sred2[kWarps<TPR>];
  const CEConsts<acc_t, S> k(a.temp, a.eps, a.C);
  const acc_t g = a.reduction == kMean ? acc_t(1) / *a.denom : acc_t(1);
  const acc_t zl = ce_zl(a);
  const TGradScale t_scale =
      a.need_t ? ce_t_grad_scale<Pass::kFused>(a, k.beta) : TGradScale{0.0, 0.0};
  double loss_sum = 0.0, w_sum = 0.0, t_sum = 0.0;
  for_each_row<TPR>(a.rows, [&](int64_t row, bool active, int tid) {
    const int y = active ? load_target(a.target, row, a.ignore_index, a.C) : -1;
    const bool valid = y >= 0;
    const bool read = valid || (a.lse_all && active && a.target[row] == a.ignore_index);
    const int n = read ? a.C : 0;
    const T* xr = a.logits + row * a.row_stride;
    T* gr = a.grad + row * static_cast<int64_t>(a.C);
    const Regs regs(xr, n, tid);
    auto pass = [&](auto& f) {
      if constexpr (RESIDENT)
        regs.apply(n, f);
      else
        for_each_vec<TPR, kUnroll>(xr, n, tid, f);  // two-read path: 4 loads in flight
    };
    // phase 1: the row's state, merged over the group
    CEAccum<T, acc_t, S, W, P> acc{ce_init<acc_t>(), k.beta_log2e, a.weight, y, a.cap};
    pass(acc);
    const CEState<acc_t> st = group_allreduce<TPR>(acc.st, CEMerge<acc_t>{k.beta_log2e}, sred);
    CEGrad<T, acc_t, S, W, P> f;
    f.cap = a.cap;
    f.row_max = 0;
    f.t_shift = 0;
    f.c.grad_scale = 0;
    f.need_t = a.need_t;
    if (valid) {
      const acc_t w_y = a.weight ? a.weight[y] : acc_t(1);
      acc_t lse, ls;
      const acc_t loss = ce_row_loss<acc_t, S>(st, k.beta, a.eps, k.smooth_coef, w_y, lse, ls, zl);
      if (tid == 0) {  // the row's loss is done: book it before phase 2 (fewer live registers)
        loss_sum += static_cast<double>(loss);
        w_sum += static_cast<double>(w_y);
        if (a.loss_rows) a.loss_rows[row] = static_cast<loss_t<T>>(loss);
        if (a.lse) {
          a.lse[2 * row] = ls == ls ? st.m : ls;
          a.lse[2 * row + 1] = ls;
        }
      }
      // phase 2: the gradient (z - lse = beta (x - m) - ls)
      f.setup(k.beta, st.m, ls,
              ce_coef<acc_t, S>(k.beta, a.eps, k.smooth_coef, st.wc, static_cast<acc_t>(a.C), w_y,
                                g, zl != acc_t(0) ? acc_t(2) * zl * lse : acc_t(0)),
              a.weight, y, xr, gr);
      pass(f);
      f.finish();
    } else if (active) {
      fill_row<TPR>(gr, a.C, tid, T(0));
      if (tid == 0 && a.loss_rows) a.loss_rows[row] = loss_t<T>(0);
      if (tid == 0 && a.lse) {  // an ignored row: its [m, ls] (read: lse_all), else [0, 0]
        acc_t m = 0, ls = 0;
        if (read) ce_row_lse(st, m, ls);
        a.lse[2 * row] = m;
        a.lse[2 * row + 1] = ls;
      }
    }
    double t_grad = 0;  // the row's dL/dT, in double up to the block sums
    if (a.need_t) {
      const Pair<double> t = group_allreduce<TPR>(Pair<double>{f.t1, f.t0}, Plus(), sred2);
      if (valid) t_grad = f.temperature_grad(t, t_scale);
    }
    if (active && tid == 0) {
      if (valid) t_sum += t_grad;
      if (a.t_rows.p) a.t_rows.store(row, t_grad);
    }
  });
  store_block_sums<kBlock<TPR>, 3>(a.parts, {loss_sum, w_sum, t_sum});
}

// The fused kernel with the row in registers (<= 4 vectors per thread), for launch_ce.
struct ResidentRows {
  template <typename T, int TPR, Smoothing S, ClassWeights W, Softcap P>
  using kernel = KernelRef<&cross_entropy_fused_kernel<T, TPR, 4, true, S, W, P>>;
};

// The shared body of both ops (grad may be the logits themselves). Three launches by row length:
// tiles (C * b <= 128 bytes), the row in registers (<= 4 vectors per thread, <= 512 threads), or
// one row per SM read twice (the policy's kTwoRead, docs/kernels-cuda.md).
template <typename scalar_t>
void fused(const at::Tensor& logits, const CEInputs& in,
           const std::optional<at::Tensor>& temperature_t, double temperature, double eps,
           int64_t ignore_index, int64_t reduction, bool need_t, at::Tensor& loss, at::Tensor& grad,
           at::Tensor& grad_t, double z_loss, double softcap,
           const std::optional<at::Tensor>& lse_out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = vec_size<scalar_t>();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = logits.size(0);
  auto a = ce_args<scalar_t>(logits, in, temperature_t, temperature, eps, ignore_index, reduction);
  at::Tensor denom;
  if (reduction == kMean) {
    denom = ce_denom<scalar_t>(logits, a, stream);
    a.denom = denom.data_ptr<acc_t>();
  }
  std::vector<at::Tensor> keep;
  set_llm_terms(a, logits, z_loss, softcap, lse_out.has_value(), reduction,
                denom.defined() ? &denom : nullptr, keep, stream);
  a.lse = lse_out.has_value() ? lse_out->data_ptr<acc_t>() : nullptr;
  const int64_t nv = ceil_div(a.C, V);
  const bool tile = use_tile<scalar_t>(logits);
  const Launch resident = plan(Walk::kResident, rows, a.C, V);
  const bool holds = holds_row(resident, Walk::kResident, nv);
  const Launch l = tile ? tile_launch<scalar_t>(rows, a.C)
                        : (holds ? resident : plan(Walk::kTwoRead, rows, a.C, V));
  at::Tensor parts = at::empty({3 * l.grid}, logits.options().dtype(at::kDouble));
  a.loss_rows = reduction == kNone ? loss.data_ptr<loss_t<scalar_t>>() : nullptr;
  a.grad = grad.data_ptr<scalar_t>();
  a.need_t = need_t;
  a.parts = parts.data_ptr<double>();
  if (need_t && reduction == kNone) a.t_rows = any_out(grad_t);
  if (tile || holds) {
    launch_ce<scalar_t, Pass::kFused, ResidentRows>(a, l, tile, eps, softcap, stream);
  } else {
    ce_switch_cap(eps, a.weight != nullptr, softcap, [&](auto sc, auto wc, auto pc) {
      launch(KernelRef<&cross_entropy_fused_kernel<scalar_t, 512, 1, false, decltype(sc)::value,
                                                   decltype(wc)::value, decltype(pc)::value>>{},
             l, stream, a);
    });
  }
  const bool want_loss = reduction != kNone;
  const bool want_t = need_t && reduction != kNone;
  if (want_loss || want_t) {
    const CEFinal<acc_t> w{want_loss ? any_out(loss) : AnyOut{}, static_cast<int>(reduction),
                           nullptr, reduction == kMean ? a.denom : nullptr,
                           want_t ? any_out(grad_t) : AnyOut{}};
    launch_ce_final(parts, l.grid, w, stream);
  }
}

// grad_temperature: () for mean and sum, (rows,) per row for none; zeros unless a kernel writes it.
at::Tensor fused_grad_t(const at::Tensor& logits, const std::optional<at::Tensor>& temperature_t,
                        int64_t reduction, bool need_t) {
  auto opts = logits.options().dtype(temp_grad_type(temperature_t, logits.scalar_type()));
  if (reduction == kNone)
    return need_t ? at::empty({logits.size(0)}, opts) : at::zeros({logits.size(0)}, opts);
  return (need_t && logits.size(0) > 0) ? at::empty({}, opts) : at::zeros({}, opts);
}

// Both ops: the gradient in a new tensor, or (in place) in the logits' own buffer.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_op(
    Op op, const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& temperature_t,
    double temperature, double label_smoothing, int64_t ignore_index, int64_t reduction,
    bool need_temperature_grad, double z_loss, double softcap,
    const std::optional<at::Tensor>& lse_out) {
  checks::cross_entropy(Backend::kCuda, op, logits, target, weight, temperature_t, temperature,
                        label_smoothing, reduction);
  checks::llm_terms(op, logits, z_loss, softcap, lse_out);
  c10::cuda::CUDAGuard guard(logits.device());
  const CEInputs in = ce_inputs(logits, target, weight);
  at::Tensor loss = ce_loss_tensor(logits, reduction);
  at::Tensor grad = op == Op::kCrossEntropyFusedInplace
                        ? logits
                        : at::empty_like(logits, at::MemoryFormat::Contiguous);
  // As the CPU op: no temperature tensor, no T-gradient (grad_temperature stays 0).
  const bool need_t = need_temperature_grad && temperature_t.has_value();
  at::Tensor grad_t = fused_grad_t(logits, temperature_t, reduction, need_t);
  if (logits.size(0) == 0) return {loss, grad, grad_t};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_fused_cuda", [&] {
        fused<scalar_t>(logits, in, temperature_t, temperature, label_smoothing, ignore_index,
                        reduction, need_t, loss, grad, grad_t, z_loss, softcap, lse_out);
      });
  return {loss, grad, grad_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fused_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_temperature_grad, double z_loss,
    double softcap) {
  return fused_op(Op::kCrossEntropyFused, logits, target, weight, temperature_t, temperature,
                  label_smoothing, ignore_index, reduction, need_temperature_grad, z_loss, softcap,
                  std::nullopt);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fused_inplace_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& temperature_t, double temperature, double label_smoothing,
    int64_t ignore_index, int64_t reduction, bool need_temperature_grad, double z_loss,
    double softcap, const std::optional<at::Tensor>& lse_out) {
  auto [loss, grad, grad_t] = fused_op(Op::kCrossEntropyFusedInplace, logits, target, weight,
                                       temperature_t, temperature, label_smoothing, ignore_index,
                                       reduction, need_temperature_grad, z_loss, softcap, lse_out);
  return {loss, grad_t};
}

}  // namespace
}  // namespace cuda
}  // namespace softcal

TORCH_LIBRARY_IMPL(softcal, CUDA, m) {
  m.impl("cross_entropy_fused", &softcal::cuda::cross_entropy_fused_cuda);
  m.impl("cross_entropy_fused_", &softcal::cuda::cross_entropy_fused_inplace_cuda);
}
