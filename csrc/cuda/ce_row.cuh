// softcal CUDA: one row of the cross-entropy: its running state (phase 1: loss and log-sum-exp),
// its loss, its gradient coefficients and the gradient of each element (phase 2). The maths is
// docs/design.md; how the kernels use this is docs/kernels-cuda.md.
//
// Where a new loss term goes (each once, here):
//  * a per-row term (z-loss: + z lse^2 on the loss, + 2 z lse on the softmax coefficient):
//    ce_row_loss and ce_coef;
//  * a per-element map of the logits (soft-capping: x -> c tanh(x / c), the gradient times its
//    derivative): ce_logit, read by phase 1, phase 2 and the tile path, and the element's dz in
//    CEGrad::element;
//  * the per-row lse returned: ce_row_loss computes it.
// The variants are common.h's enums (Smoothing, ClassWeights, Softcap), template parameters
// switched once on the host by ce_switch (ce_switch_cap with the soft-cap); the z-loss is a row
// term (its coefficient zl, 0 without), never read per element.
#pragma once

#include "cuda/reduce.cuh"
#include "cuda/rows.cuh"

namespace softcal {
namespace cuda {

// f(Smoothing constant, ClassWeights constant) for the kernel variant of (eps, weights given):
// without smoothing the class weights are read once per row (w_y), never per element, so the
// kernels have three variants, not four: (kOff, kNone), (kOn, kNone), (kOn, kPerClass).
template <typename F>
inline void ce_switch(double eps, bool weighted, F&& f) {
  using Off = std::integral_constant<Smoothing, Smoothing::kOff>;
  using On = std::integral_constant<Smoothing, Smoothing::kOn>;
  using None = std::integral_constant<ClassWeights, ClassWeights::kNone>;
  using PerClass = std::integral_constant<ClassWeights, ClassWeights::kPerClass>;
  if (smoothing_of(eps) == Smoothing::kOff)
    f(Off{}, None{});
  else if (!weighted)
    f(On{}, None{});
  else
    f(On{}, PerClass{});
}

// Whether a variant reads w_c per element (the smoothing sum with class weights).
template <Smoothing S, ClassWeights W>
constexpr bool kPerElementWeights = S == Smoothing::kOn && W == ClassWeights::kPerClass;

// f(Smoothing, ClassWeights, Softcap constants): ce_switch's variants, each with and without the
// soft-cap (the kernels without it are unchanged).
template <typename F>
inline void ce_switch_cap(double eps, bool weighted, double softcap, F&& f) {
  ce_switch(eps, weighted, [&](auto sc, auto wc) {
    if (softcap_of(softcap) == Softcap::kOn)
      f(sc, wc, std::integral_constant<Softcap, Softcap::kOn>{});
    else
      f(sc, wc, std::integral_constant<Softcap, Softcap::kOff>{});
  });
}

// A logit as the loss sees it: x, or c tanh(x / c) with the soft-cap (-inf becomes -c).
template <typename acc_t, Softcap P = Softcap::kOff, typename T>
__device__ __forceinline__ acc_t ce_logit(T x, acc_t cap = acc_t(0)) {
  const acc_t v = static_cast<acc_t>(x);
  if constexpr (P == Softcap::kOn) return cap * ::tanh(v / cap);
  return v;
}

// The soft-cap's derivative at a capped logit xc: 1 - (xc / c)^2 (1 without the cap).
template <typename acc_t, Softcap P>
__device__ __forceinline__ acc_t ce_logit_grad(acc_t xc, acc_t cap) {
  if constexpr (P == Softcap::kOn) {
    const acc_t t = xc / cap;
    return acc_t(1) - t * t;
  }
  return acc_t(1);
}

// A kernel's constants: beta = 1/T, beta log2(e) and eps / C (0 without smoothing).
template <typename acc_t, Smoothing S>
struct CEConsts {
  acc_t beta, beta_log2e, smooth_coef;
  __device__ __forceinline__ CEConsts(const Temperature& t, acc_t eps, int C)
      : beta(load_beta<acc_t>(t)),
        beta_log2e(beta * static_cast<acc_t>(kLog2e)),
        smooth_coef(S == Smoothing::kOn ? eps / static_cast<acc_t>(C) : acc_t(0)) {}
};

// The target of a row; asserts on targets outside [0, C); -1 for ignored and out-of-range rows
// (then nothing of the row is read).
__device__ __forceinline__ int load_target(const int64_t* target, int64_t row, int64_t ignore_index,
                                           int C) {
  const int64_t y = target[row];
  if (y == ignore_index) return -1;
  CUDA_KERNEL_ASSERT(y >= 0 && y < C && "softcal.cross_entropy: target out of range");
  if (y < 0 || y >= C) return -1;
  return static_cast<int>(y);
}

// ------------------------------------------------------------------ phase 1: the row's state
// LseState (reduce.cuh, with u_c = w_c, the smoothing sum's weights) and the target's logit xy,
// in the one thread that sees it (0 elsewhere: merged by a sum).
template <typename acc_t>
struct CEState : LseState<acc_t> {
  acc_t xy;
};

template <typename acc_t>
__device__ __forceinline__ CEState<acc_t> ce_init() {
  return CEState<acc_t>{{neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0)}, acc_t(0)};
}

template <typename acc_t>
struct CEMerge {
  acc_t beta_log2e;
  __device__ __forceinline__ CEState<acc_t> operator()(const CEState<acc_t>& a,
                                                       const CEState<acc_t>& b) const {
    CEState<acc_t> r;
    lse_merge<acc_t>(r, a, b, beta_log2e);
    r.xy = a.xy + b.xy;
    return r;
  }
};

// Consumes a thread's elements of a row into its state: the max is updated once per vector, one
// exp2 per element.
template <typename T, typename acc_t, Smoothing S, ClassWeights W, Softcap P = Softcap::kOff>
struct CEAccum {
  CEState<acc_t> st;
  acc_t beta_log2e;
  const acc_t* w;  // class weights (read per element: kPerElementWeights)
  int y;           // target (-1: none)
  acc_t cap = 0;   // the soft-cap c (Softcap::kOn)

  __device__ __forceinline__ void operator()(int idx, const Vec16<T>& v, int count) {
    constexpr int V = vec_size<T>();
    acc_t x[V];
#pragma unroll
    for (int k = 0; k < V; ++k)
      x[k] = k < count ? ce_logit<acc_t, P>(v.v[k], cap) : neg_inf<acc_t>();
    const acc_t vm = vec_max<T, acc_t>(v, x, count);
    if (vm > st.m) {
      if (st.m > neg_inf<acc_t>()) {
        st.s *= fexp2((st.m - vm) * beta_log2e);
        if (S == Smoothing::kOn) st.d += st.wc * (vm - st.m);
      }
      st.m = vm;
    }
    const acc_t mref = st.m > neg_inf<acc_t>() ? st.m : acc_t(0);
    acc_t e[V], dd[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      e[k] = acc_t(0);
      dd[k] = acc_t(0);
      if (k < count) {
        const acc_t dx = x[k] - mref;
        e[k] = fexp2(dx * beta_log2e);
        if (S == Smoothing::kOn && !kPerElementWeights<S, W>) dd[k] = dx;
        if (kPerElementWeights<S, W>) {
          const acc_t wk = w[idx + k];
          dd[k] = wk * dx;  // NaN for a weight of inf at the maximum: ce_row_loss
          st.wc += wk;
        }
      }
    }
    st.s += tree_sum<V>(e);
    if (S == Smoothing::kOn) st.d -= tree_sum<V>(dd);
    if (S == Smoothing::kOn && !kPerElementWeights<S, W>) st.wc += static_cast<acc_t>(count);
    if (static_cast<unsigned>(y - idx) < static_cast<unsigned>(count)) {
#pragma unroll
      for (int k = 0; k < V; ++k)  // no runtime index into v: it would go to local memory
        if (idx + k == y) st.xy = x[k];
    }
  }
};

// The loss of a non-ignored row from its merged state, and ls = log sum exp(beta (x - m)), lse =
// beta m + ls. No result is the difference of two large numbers: lse - z_y = beta (m - x_y) + ls
// and sum_c w_c (lse - z_c) = beta d + W ls. The z-loss (zl != 0): + zl lse^2.
template <typename acc_t, Smoothing S>
__device__ __forceinline__ acc_t ce_row_loss(const CEState<acc_t>& st, acc_t beta, acc_t eps,
                                             acc_t smooth_coef, acc_t w_y, acc_t& lse, acc_t& ls,
                                             acc_t zl = acc_t(0)) {
  if (!(st.m > neg_inf<acc_t>())) {  // fully masked row (or NaN logits)
    lse = ls = std::numeric_limits<acc_t>::quiet_NaN();
    return lse;
  }
  ls = flog_sum(st.s);
  lse = beta * st.m + ls;
  acc_t loss = (acc_t(1) - eps) * w_y * (beta * (st.m - st.xy) + ls);
  if (S == Smoothing::kOn) {
    // A class weight of inf makes W = inf and the smoothing term inf (as PyTorch's), whatever d;
    // d itself may then be NaN (inf * 0 at the maximum: the element loop has no test for it), so
    // it is left out here, once per row (docs/design.md §1).
    const acc_t d = st.wc != std::numeric_limits<acc_t>::infinity() ? st.d : acc_t(0);
    loss += smooth_coef * (beta * d + st.wc * ls);
  }
  if (zl != acc_t(0)) loss += zl * (lse * lse);
  return loss;
}

// [m, ls] of a row from its merged state (NaN without a softmax): the lse of an ignored row.
template <typename acc_t>
__device__ __forceinline__ void ce_row_lse(const CEState<acc_t>& st, acc_t& m, acc_t& ls) {
  if (!(st.m > neg_inf<acc_t>())) {
    m = ls = std::numeric_limits<acc_t>::quiet_NaN();
    return;
  }
  ls = flog_sum(st.s);
  m = ls == ls ? st.m : ls;
}

// ------------------------------------------------------------------ phase 2: the gradient
// The coefficients of dL/dz_c = p_coef p_c - smooth_coef w_c - target_coef [c == y]:
template <typename acc_t>
struct CECoef {
  acc_t p_coef;       // A = (1 - eps) w_y + eps W / C + 2 zl lse
  acc_t target_coef;  // (1 - eps) w_y
  acc_t smooth_mass;  // eps W / C + 2 zl lse = A - (1 - eps) w_y
  acc_t smooth_coef;  // eps / C
  acc_t grad_scale;   // beta g: dL/dx_c = beta g dL/dz_c
  acc_t dz_total;     // sum_c dL/dz_c: the z-loss's 2 zl lse (0 without; temperature_grad's shift)
};

// weight_total = W (sum of the class weights; C without them); g = the row's upstream gradient;
// zl2_lse = 2 zl lse, the z-loss's share of A (0 without).
template <typename acc_t, Smoothing S>
__device__ __forceinline__ CECoef<acc_t> ce_coef(acc_t beta, acc_t eps, acc_t smooth_coef,
                                                 acc_t weight_total, acc_t classes, acc_t w_y,
                                                 acc_t g, acc_t zl2_lse = acc_t(0)) {
  const acc_t target_coef = (acc_t(1) - eps) * w_y;
  acc_t smooth_mass = S == Smoothing::kOn ? eps * weight_total / classes : acc_t(0);
  if (zl2_lse != acc_t(0)) smooth_mass += zl2_lse;
  return CECoef<acc_t>{
      target_coef + smooth_mass, target_coef, smooth_mass, smooth_coef, beta * g, zl2_lse};
}

// The target's dL/dz in acc precision: target_coef expm1(log p_y) + smooth_mass p_y - smooth w_y,
// so that p_y - 1 keeps its relative accuracy in confident rows (p_y -> 1), where
// A p_y - target_coef would cancel.
template <typename acc_t>
__device__ __forceinline__ acc_t ce_target_dz(acc_t log_p, const CECoef<acc_t>& c, acc_t w_y) {
  return c.target_coef * ::expm1(log_p) + c.smooth_mass * ::exp(log_p) - c.smooth_coef * w_y;
}

// The T-gradient's scale, in double, once per kernel: k1 = beta g beta / beta_f (t1 was summed
// with z = beta_f (x - m)) and k2 = beta^2 g, for g the upstream gradient shared by every row (1
// when it is per row) and beta_f the float beta of the element loop. A float beta or beta g would
// be the same rounding in every row, a bias of the sum over rows (3e-8 to 5e-8 of dL/dT) that no
// double partial sum removes.
struct TGradScale {
  double k1, k2;
};

template <typename acc_t>
__device__ __forceinline__ TGradScale t_grad_scale(double beta, acc_t beta_f, double g) {
  const double bg = beta * g;
  return TGradScale{beta_f > acc_t(0) ? bg * (beta / static_cast<double>(beta_f)) : 0.0, bg * beta};
}

// Writes the gradient of each element of a row (out, or nowhere) and sums the T-gradient's two
// partial sums. p = exp2(beta log2(e) (x - row_max) - ls log2(e)), from the row at hand (fused)
// or the forward's saved [m, ls] (backward): exact at the row maximum whatever the logits'
// magnitude. The T-gradient sums dz_c (beta (x_c - row_max) - t_shift) over unmasked classes
// (t1) and dz_c over masked ones (t0), in double (docs/design.md: precision policy).
template <typename T, typename acc_t, Smoothing S, ClassWeights W, Softcap P = Softcap::kOff>
struct CEGrad {
  acc_t beta, beta_log2e;
  acc_t row_max;   // m
  acc_t ls;        // log sum exp(beta (x - m)): log p = beta (x - m) - ls
  acc_t ls_log2e;  // ls log2(e)
  acc_t t_shift;   // 0 (cross-entropy) or ls (shard_grad's contract)
  CECoef<acc_t> c;
  acc_t scaled_p_coef, scaled_smooth;  // grad_scale * p_coef, grad_scale * smooth_coef
  const acc_t* w;
  int y;
  T* out;  // the gradient row, or nullptr
  bool vec_ok;
  bool need_t;
  double t1 = 0, t0 = 0;
  acc_t xy = 0;  // x_y, in the thread whose elements hold the target
  bool have_y = false;
  acc_t cap = 0;  // the soft-cap c (Softcap::kOn): logits capped as read, the gradient times
                  // the cap's derivative

  // The row's coefficients and where its gradient goes (out: the gradient row or nullptr; vec_ok:
  // out is aligned like the logits' row x).
  __device__ __forceinline__ void setup(acc_t beta_, acc_t row_max_, acc_t ls_,
                                        const CECoef<acc_t>& c_, const acc_t* w_, int y_,
                                        const T* x, T* out_) {
    const acc_t l2e = static_cast<acc_t>(kLog2e);
    w = w_;
    y = y_;
    out = out_;
    vec_ok = out_ ? aligned_like(x, out_) : false;
    beta = beta_;
    beta_log2e = beta_ * l2e;
    row_max = row_max_;
    ls = ls_;
    ls_log2e = ls_ * l2e;
    t_shift = acc_t(0);
    c = c_;
    scaled_p_coef = c.grad_scale * c.p_coef;
    scaled_smooth = c.grad_scale * c.smooth_coef;
  }

  __device__ __forceinline__ acc_t p_of(acc_t x) const {
    return fexp2((x - row_max) * beta_log2e - ls_log2e);
  }

  // One element's dL/dz in the generic form (the target's is corrected by finish()).
  __device__ __forceinline__ acc_t element(acc_t x, acc_t wk) const {
    return c.p_coef * p_of(x) - (S == Smoothing::kOn ? c.smooth_coef * wk : acc_t(0));
  }

  __device__ __forceinline__ void sum_t(acc_t dz, acc_t x) {
    if (x != neg_inf<acc_t>())
      t1 += static_cast<double>(dz) * static_cast<double>((x - row_max) * beta - t_shift);
    else
      t0 += static_cast<double>(dz);
  }

  __device__ __forceinline__ void operator()(int idx, const Vec16<T>& v, int count) {
    constexpr int V = vec_size<T>();
    acc_t g[V];
    if (!need_t) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (k < count) {
          const acc_t p = p_of(ce_logit<acc_t, P>(v.v[k], cap));
          if (S == Smoothing::kOff)
            g[k] = p * scaled_p_coef;
          else if (!kPerElementWeights<S, W>)
            g[k] = p * scaled_p_coef - scaled_smooth;
          else
            g[k] = p * scaled_p_coef - scaled_smooth * w[idx + k];
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (k < count) {
          const acc_t x = ce_logit<acc_t, P>(v.v[k], cap);
          const acc_t dz = element(x, kPerElementWeights<S, W> ? w[idx + k] : acc_t(1));
          g[k] = c.grad_scale * dz;
          sum_t(dz, x);
        }
      }
    }
    if (static_cast<unsigned>(y - idx) < static_cast<unsigned>(count)) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (idx + k == y) {  // the generic form of the target's element: finish() refines it
          xy = ce_logit<acc_t, P>(v.v[k], cap);
          have_y = true;
          g[k] -= c.grad_scale * c.target_coef;
          if (need_t) sum_t(-c.target_coef, xy);
        }
      }
    }
    if constexpr (P == Softcap::kOn) {
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (k < count) g[k] *= ce_logit_grad<acc_t, P>(ce_logit<acc_t, P>(v.v[k], cap), cap);
    }
    if (out) store_vals<T, V>(out, idx, g, count, vec_ok);
  }

  // Phase 2 over a row streamed from memory.
  template <int TPR>
  __device__ __forceinline__ void walk(const T* x, int n, int tid) {
    for_each_vec<TPR>(x, n, tid, *this);
    finish();
  }

  // After the row's loop, in the thread that saw the target: its element in acc precision
  // (ce_target_dz), written over the generic one (same thread, later in program order), and the
  // T-gradient sums corrected by the difference. Out of the hot loop: expm1 there made ptxas spill.
  __device__ __forceinline__ void finish() {
    if (!have_y) return;
    const acc_t w_y = kPerElementWeights<S, W> ? w[y] : acc_t(1);
    const acc_t generic = element(xy, w_y) - c.target_coef;
    const acc_t dz = ce_target_dz((xy - row_max) * beta - ls, c, w_y);
    if (out) out[y] = static_cast<T>(c.grad_scale * dz * ce_logit_grad<acc_t, P>(xy, cap));
    if (need_t) sum_t(dz - generic, xy);
  }

  // dL/dT of the row from the group-reduced sums (t1, t0), valid for a non-ignored row of the
  // cross-entropy (t_shift = 0): -beta g (sum dz (z - lse) + ...) as docs/design.md, shifted by
  // beta m (the live classes' sum of dz is c.dz_total - t.b), with beta and g in double from
  // TGradScale and the row's g_row (docs/design.md: precision policy).
  __device__ __forceinline__ double temperature_grad(const Pair<double>& t, const TGradScale& s,
                                                     double g_row = 1.0) const {
    return -g_row * (s.k1 * t.a -
                     s.k2 * static_cast<double>(row_max) * (t.b - static_cast<double>(c.dz_total)));
  }
};

}  // namespace cuda
}  // namespace softcal
