// softcal CUDA: walking a row with 16-byte accesses (the layout of a row, the streaming walks, a
// row held in registers, vector stores). docs/kernels-cuda.md, "Rows".
#pragma once

#include "cuda/device.cuh"

namespace softcal {
namespace cuda {

// A row of n elements at p: a misaligned head (< V scalars), nvec aligned 16-byte vectors and a
// tail (< V scalars). Every row gets 16-byte loads this way, whatever its length or offset.
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

// True when y can be accessed 16 bytes at a time at the positions where x's 16-byte vectors begin
// (y[i] 16-byte aligned for the first aligned x[i]): the same misalignment when the dtypes match.
template <typename T, typename U>
__device__ __forceinline__ bool aligned_like(const T* x, const U* y) {
  const int first =
      static_cast<int>(((16 - (reinterpret_cast<uintptr_t>(x) & 15)) & 15) / sizeof(T));
  return (reinterpret_cast<uintptr_t>(y + first) & 15) == 0;
}

// Calls f(first_index, vec, count) over the elements a thread owns in a row: count == V for the
// aligned vectors, 1 for the head and tail scalars (vec.v[0]). UNROLL vector loads are issued
// before the first is used (default: kUnroll, 2 with 512 threads per row).
template <int TPR, int UNROLL = 0, typename T, typename F>
__device__ __forceinline__ void for_each_vec(const T* row, int n, int tid, F&& f) {
  constexpr int V = vec_size<T>();
  constexpr int U = UNROLL > 0 ? UNROLL : (TPR >= 512 ? 2 : kUnroll);
  const RowSplit<T> sp(row, n);
  for (int i = tid; i < sp.head; i += TPR) {
    Vec16<T> v;
    v.v[0] = row[i];
    f(i, v, 1);
  }
  const Vec16<T>* vrow = reinterpret_cast<const Vec16<T>*>(row + sp.head);
  for (int j0 = tid; j0 < sp.nvec; j0 += U * TPR) {
    Vec16<T> buf[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * TPR;
      if (j < sp.nvec) buf[u] = vrow[j];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
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

// The vectors of a pair walk: the second row's elements at the first row's positions.
template <int TPR, int U, bool WIDE, typename T, typename S, typename F>
__device__ __forceinline__ void pair_vectors(const T* x, const S* y, const RowSplit<T>& sp, int tid,
                                             F& f) {
  constexpr int V = vec_size<T>();
  using VY = Vec<S, V>;
  const Vec16<T>* vx = reinterpret_cast<const Vec16<T>*>(x + sp.head);
  const VY* vy = reinterpret_cast<const VY*>(y + sp.head);
  for (int j0 = tid; j0 < sp.nvec; j0 += U * TPR) {
    Vec16<T> bx[U];
    VY by[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * TPR;
      if (j < sp.nvec) {
        bx[u] = vx[j];
        if constexpr (WIDE) {
          by[u] = vy[j];
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) by[u].v[k] = y[sp.head + j * V + k];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u * TPR;
      if (j < sp.nvec) f(sp.head + j * V, bx[u], by[u], V);
    }
  }
}

// Two rows walked together in the first one's layout: f(first_index, x_vec, y_vec, count), with
// y's elements at x's positions. y (any dtype) is read with 16-byte accesses when aligned_like(x,
// y), by scalars otherwise. U pairs of loads are in flight before the first use.
template <int TPR, int U, typename T, typename S, typename F>
__device__ __forceinline__ void for_each_pair(const T* x, const S* y, int n, int tid, F&& f) {
  constexpr int V = vec_size<T>();
  const RowSplit<T> sp(x, n);
  for (int i = tid; i < sp.head; i += TPR) {
    Vec16<T> a;
    Vec<S, V> b;
    a.v[0] = x[i];
    b.v[0] = y[i];
    f(i, a, b, 1);
  }
  if (aligned_like(x, y)) {
    pair_vectors<TPR, U, true>(x, y, sp, tid, f);
  } else {
    pair_vectors<TPR, U, false>(x, y, sp, tid, f);
  }
  for (int i = sp.tail0 + tid; i < n; i += TPR) {
    Vec16<T> a;
    Vec<S, V> b;
    a.v[0] = x[i];
    b.v[0] = y[i];
    f(i, a, b, 1);
  }
}

// A whole row held in registers: each thread owns up to MAXV vectors plus at most HT head and HT
// tail scalars. The host guarantees ceil(n / V) <= TPR * MAXV.
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

  // f(first_index, vec, count) over the row, as for_each_vec.
  template <typename F>
  __device__ __forceinline__ void apply(int n, F&& f) const {
    visit(
        n, [&](int i, int k) { f(i, body[k], V); },
        [&](int i, int s) {
          Vec16<T> v;
          v.v[0] = ht[s];
          f(i, v, 1);
        });
  }

  // f(first_index, vec, other_vec, count) over this row and `other` (a row of the same layout).
  template <typename F>
  __device__ __forceinline__ void apply_pair(const RowRegs& other, int n, F&& f) const {
    visit(
        n, [&](int i, int k) { f(i, body[k], other.body[k], V); },
        [&](int i, int s) {
          Vec16<T> a, b;
          a.v[0] = ht[s];
          b.v[0] = other.ht[s];
          f(i, a, b, 1);
        });
  }

 private:
  // on_vector(first_index, k) for body[k], on_scalar(index, s) for ht[s], in the row's order.
  template <typename FV, typename FS>
  __device__ __forceinline__ void visit(int n, FV&& on_vector, FS&& on_scalar) const {
#pragma unroll
    for (int k = 0; k < HT; ++k) {
      const int i = tid + k * TPR;
      if (i < sp.head) on_scalar(i, k);
    }
#pragma unroll
    for (int k = 0; k < MAXV; ++k) {
      const int j = tid + k * TPR;
      if (j < sp.nvec) on_vector(sp.head + j * V, k);
    }
#pragma unroll
    for (int k = 0; k < HT; ++k) {
      const int t = sp.tail0 + tid + k * TPR;
      if (t < n) on_scalar(t, HT + k);
    }
  }
};

// Stores count values at dst[idx..]: count == N and vec_ok (dst aligned like the row read) as one
// vector store, else by scalars.
template <typename T, int N, typename acc_t>
__device__ __forceinline__ void store_vals(T* dst, int idx, const acc_t* vals, int count,
                                           bool vec_ok) {
  if (count == N && vec_ok) {
    Vec<T, N> o;
#pragma unroll
    for (int k = 0; k < N; ++k) o.v[k] = static_cast<T>(vals[k]);
    *reinterpret_cast<Vec<T, N>*>(dst + idx) = o;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (k < count) dst[idx + k] = static_cast<T>(vals[k]);
  }
}

template <int TPR, typename T>
__device__ __forceinline__ void fill_row(T* row, int n, int tid, T value) {
  constexpr int V = vec_size<T>();
  const RowSplit<T> sp(row, n);
  for (int i = tid; i < sp.head; i += TPR) row[i] = value;
  Vec16<T> o;
#pragma unroll
  for (int k = 0; k < V; ++k) o.v[k] = value;
  Vec16<T>* vrow = reinterpret_cast<Vec16<T>*>(row + sp.head);
  for (int j = tid; j < sp.nvec; j += TPR) vrow[j] = o;
  for (int i = sp.tail0 + tid; i < n; i += TPR) row[i] = value;
}

}  // namespace cuda
}  // namespace softcal
