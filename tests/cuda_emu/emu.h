// softcal CUDA emulator: runs the kernels of csrc/cuda on the CPU, one block at a time, each
// CUDA thread a fiber of one OS thread (tests/cuda_emu/README.md says what it checks and what it
// cannot). tests/cuda_emu/emulator.py rewrites the .cu/.cuh sources for a C++ compiler:
//   kernel<<<grid, block, smem, stream>>>(args)  ->  ::emu::launch(kernel, name, grid, ...)(args)
//   __shared__ T name[N];                          ->  static T name[N]; ::emu::poison_shared(...)
//   extern __shared__ ... name[];                  ->  a pointer to the block's dynamic shared memory
//   x.is_cuda()                                    ->  x.is_cpu()   (tensors live in host memory)
// and includes this header first. Threads of a block run in turn until they reach a barrier
// (__syncthreads, or a warp shuffle, which is a barrier of the warp's 32 lanes); the scheduler
// then runs the next thread. So the emulator checks, deterministically:
//   * every thread of a block reaches the same __syncthreads (same source line) and every lane of
//     a warp the same shuffle; a block that can never make progress (a divergent barrier) is an
//     error, not a hang;
//   * shared memory starts each block filled with 0xff bytes (NaN), so a read before a write shows;
//   * the order of threads between barriers is a setting (g_schedule: by index, reversed, random),
//     so that a read of another thread's write without a barrier between shows as a difference;
//   * launch configurations (block <= 1024 threads, grid >= 1, dynamic shared memory <= 48 KiB);
//   * CUDA_KERNEL_ASSERT: recorded and raised as "device-side assert triggered" by the launch check.
#pragma once

#undef _FORTIFY_SOURCE
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ------------------------------------------------------------------ CUDA keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The built-in variables: set by the scheduler before it resumes a thread.
inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace emu {

// ------------------------------------------------------------------ errors
struct State {
  std::string error;         // a scheduling error: aborts the launch
  std::string assert_msg;    // the first CUDA_KERNEL_ASSERT that failed (sticky, as on a GPU)
  int64_t launches = 0;      // kernels launched since load
  int64_t blocks = 0;        // blocks run since load
  int64_t max_smem = 0;      // the largest dynamic shared memory asked for
  std::map<std::string, int64_t> kernels;  // launches per kernel instantiation
};
inline State g_state;

// The order in which the scheduler resumes the threads of a block, each round (a round runs every
// runnable thread to its next barrier): 0 = by thread index, 1 = reversed, 2 = a new random
// permutation each round (seeded by g_seed and the block index). A kernel whose result depends on
// it reads memory that another thread writes between the same two barriers: a race.
inline int g_schedule = 0;
inline uint64_t g_seed = 0;

inline void fail(const std::string& msg) {
  if (g_state.error.empty()) g_state.error = msg;
}

// ------------------------------------------------------------------ fibers
constexpr int kMaxThreads = 1024;
constexpr size_t kStack = 128 * 1024;

enum FState : int { kReady = 0, kWaiting = 1, kDone = 2 };

// Switching between fibers: swapcontext saves and restores the signal mask, two system calls per
// switch, and a block switches ~10 times per thread per row. So a fiber is entered once with
// setcontext (on its fresh stack) and then switched with _setjmp/_longjmp, which touch only
// registers (no fiber changes the signal mask). Under AddressSanitizer, which follows stack
// switches made by swapcontext but not by _longjmp, every switch is a swapcontext.
#if defined(__SANITIZE_ADDRESS__)
#define EMU_FAST_SWITCH 0
#else
#define EMU_FAST_SWITCH 1
#endif

struct Barrier {
  int arrived = 0;
  uint64_t gen = 0;
  int line = 0;
  const char* file = nullptr;
};

struct Fiber {
  ucontext_t ctx;
  jmp_buf jb;
  bool started = false;
  int state = kReady;
  const Barrier* wait = nullptr;
  uint64_t wait_gen = 0;
  uint64_t shfl_count = 0;
};

struct Warp {
  Barrier bar;
  uint64_t slots[2][32];
  int lanes = 32;
};

struct Block {
  int live = 0;
  int cur = 0;
  Fiber fibers[kMaxThreads];
  Warp warps[kMaxThreads / 32];
  Barrier bar;
  ucontext_t sched;
  jmp_buf sched_jb;
  std::function<void()> body;
  char* stacks = nullptr;
  std::vector<unsigned char> dyn_smem;
  uint64_t epoch = 0;  // counts blocks: shared-memory poisoning is once per block
};

inline Block& block() {
  static Block* b = [] {
    Block* p = new Block();
    void* mem = mmap(nullptr, kStack * kMaxThreads, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(mem != MAP_FAILED, "emu: cannot map fiber stacks");
    p->stacks = static_cast<char*>(mem);
    return p;
  }();
  return *b;
}

inline void yield() {
  Block& b = block();
#if EMU_FAST_SWITCH
  if (_setjmp(b.fibers[b.cur].jb) == 0) _longjmp(b.sched_jb, 1);
#else
  swapcontext(&b.fibers[b.cur].ctx, &b.sched);
#endif
}

inline void fiber_entry() {
  Block& b = block();
  b.body();
  b.fibers[b.cur].state = kDone;
#if EMU_FAST_SWITCH
  _longjmp(b.sched_jb, 1);
#endif
  // returns to uc_link (the scheduler)
}

// Arrive at a barrier that `expected` threads must reach, from source line file:line.
inline void barrier_wait(Barrier& bar, int expected, const char* what, const char* file, int line) {
  Block& b = block();
  if (bar.arrived == 0) {
    bar.file = file;
    bar.line = line;
  } else if (bar.line != line || bar.file != file) {
    fail(std::string("divergent ") + what + ": thread " + std::to_string(threadIdx.x) + " of block " +
         std::to_string(blockIdx.x) + " is at " + file + ":" + std::to_string(line) +
         " while others wait at " + bar.file + ":" + std::to_string(bar.line));
    yield();  // never resumed: the error ends the block
    return;
  }
  ++bar.arrived;
  const uint64_t g = bar.gen;
  if (bar.arrived == expected) {
    bar.arrived = 0;
    ++bar.gen;
    return;
  }
  Fiber& f = b.fibers[b.cur];
  f.state = kWaiting;
  f.wait = &bar;
  f.wait_gen = g;
  yield();
}

inline void syncthreads(const char* file, int line) {
  Block& b = block();
  barrier_wait(b.bar, b.live, "__syncthreads", file, line);
}

template <typename T>
inline T shfl_xor(unsigned mask, T v, int lane_mask, int width, const char* file, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "emu: shuffle of a type > 8 bytes");
  Block& b = block();
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  Warp& w = b.warps[tid / 32];
  if (mask != 0xffffffffu || width != 32) fail("emu: only full-warp shuffles are emulated");
  const int partner = lane ^ lane_mask;
  if (partner >= w.lanes) {
    fail("shuffle with a lane (" + std::to_string(partner) + ") that the block does not have, at " +
         std::string(file) + ":" + std::to_string(line));
  }
  Fiber& f = b.fibers[tid];
  const int buf = static_cast<int>(f.shfl_count++ & 1);
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  w.slots[buf][lane] = raw;
  barrier_wait(w.bar, w.lanes, "warp shuffle", file, line);
  T r;
  const uint64_t o = w.slots[buf][partner < w.lanes ? partner : lane];
  std::memcpy(&r, &o, sizeof(T));
  return r;
}

inline unsigned char* dynamic_smem() { return block().dyn_smem.data(); }

// Fills a __shared__ array with 0xff bytes the first time a thread of a block declares it.
inline void poison_shared(void* p, size_t bytes) {
  static thread_local std::vector<std::pair<void*, uint64_t>> seen;
  const uint64_t epoch = block().epoch;
  for (auto& s : seen) {
    if (s.first == p) {
      if (s.second != epoch) {
        std::memset(p, 0xff, bytes);
        s.second = epoch;
      }
      return;
    }
  }
  std::memset(p, 0xff, bytes);
  seen.emplace_back(p, epoch);
}

inline void kernel_assert(bool ok, const char* cond, const char* file, int line) {
  if (!ok && g_state.assert_msg.empty()) {
    g_state.assert_msg = std::string(file) + ":" + std::to_string(line) + ": block [" +
                         std::to_string(blockIdx.x) + "], thread [" + std::to_string(threadIdx.x) +
                         "] Assertion `" + cond + "` failed.";
  }
}

// Runs one block of `threads` fibers to completion.
inline void run_block(int threads) {
  Block& b = block();
  b.live = threads;
  b.bar = Barrier{};
  ++b.epoch;
  for (int w = 0; w < (threads + 31) / 32; ++w) {
    b.warps[w].bar = Barrier{};
    b.warps[w].lanes = std::min(32, threads - w * 32);
  }
  std::memset(b.dyn_smem.data(), 0xff, b.dyn_smem.size());
  for (int t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.state = kReady;
    f.wait = nullptr;
    f.shfl_count = 0;
    f.started = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = b.stacks + static_cast<size_t>(t) * kStack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  std::vector<int> order(threads);
  std::iota(order.begin(), order.end(), 0);
  if (g_schedule == 1) std::reverse(order.begin(), order.end());
  std::mt19937_64 rng(g_seed * 1000003u + blockIdx.x);
  while (b.live > 0 && g_state.error.empty()) {
    bool progressed = false;
    if (g_schedule == 2) std::shuffle(order.begin(), order.end(), rng);
    for (int i = 0; i < threads && g_state.error.empty(); ++i) {
      const int t = order[i];
      Fiber& f = b.fibers[t];
      if (f.state == kDone) continue;
      if (f.state == kWaiting) {
        if (f.wait->gen == f.wait_gen) continue;
        f.state = kReady;
      }
      b.cur = t;
      threadIdx.x = static_cast<unsigned>(t);
#if EMU_FAST_SWITCH
      if (_setjmp(b.sched_jb) == 0) {
        if (f.started) _longjmp(f.jb, 1);
        f.started = true;
        setcontext(&f.ctx);
      }
#else
      swapcontext(&b.sched, &f.ctx);
#endif
      progressed = true;
      if (f.state == kDone) {
        --b.live;
        Warp& w = b.warps[t / 32];
        if (w.bar.arrived > 0) {
          fail("thread " + std::to_string(t) + " exited while lanes of its warp wait in a shuffle at " +
               std::string(w.bar.file) + ":" + std::to_string(w.bar.line));
        }
        // __syncthreads counts the threads that have not exited (as the hardware does).
        if (b.bar.arrived > 0 && b.bar.arrived == b.live) {
          b.bar.arrived = 0;
          ++b.bar.gen;
        }
      }
    }
    if (!progressed && b.live > 0 && g_state.error.empty()) {
      std::string where;
      for (int t = 0; t < threads; ++t) {
        const Fiber& f = b.fibers[t];
        if (f.state == kWaiting && where.size() < 400) {
          where += " thread " + std::to_string(t) + " at " + f.wait->file + ":" + std::to_string(f.wait->line) + ";";
        }
      }
      fail("deadlock in block " + std::to_string(blockIdx.x) + " (" + std::to_string(b.live) +
           " threads wait at barriers that cannot complete):" + where);
    }
  }
}

// "softcal::cuda::{anonymous}::cross_entropy_fwd_kernel<float, 4, softcal::cuda::Smoothing::kOff>" for
// K = that kernel (GCC's text).
template <auto K>
inline std::string kernel_name() {
  std::string s = __PRETTY_FUNCTION__;
  const auto a = s.find("K = ");
  const auto b = s.rfind(';') != std::string::npos && s.rfind(';') > a ? s.rfind(';') : s.rfind(']');
  return a == std::string::npos ? s : s.substr(a + 4, b - a - 4);
}

template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  std::string name;
  dim3 grid, blk;
  size_t smem;

  template <typename... A>
  void operator()(A&&... args) const {
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    ++g_state.launches;
    ++g_state.kernels[name];
    if (!g_state.error.empty()) return;
    if (blk.x < 1 || blk.x > 1024 || blk.y != 1 || blk.z != 1 || grid.x < 1 || grid.y != 1 ||
        grid.z != 1 || grid.x > 2147483647u) {
      fail("invalid launch configuration: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) +
           ", " + std::to_string(grid.z) + "), block (" + std::to_string(blk.x) + ", " +
           std::to_string(blk.y) + ", " + std::to_string(blk.z) + ")");
      return;
    }
    if (smem > 48 * 1024) {
      fail("dynamic shared memory of " + std::to_string(smem) + " bytes > 48 KiB without an opt-in");
      return;
    }
    g_state.max_smem = std::max<int64_t>(g_state.max_smem, static_cast<int64_t>(smem));
    Block& b = block();
    b.dyn_smem.assign(smem + 16, 0xff);
    b.body = [this, &params] { std::apply(kernel, params); };
    gridDim = grid;
    blockDim = blk;
    for (unsigned bx = 0; bx < grid.x && g_state.error.empty(); ++bx) {
      blockIdx.x = bx;
      ++g_state.blocks;
      run_block(static_cast<int>(blk.x));
    }
    b.body = nullptr;
  }
};

template <typename... P>
inline Launcher<P...> launch(void (*kernel)(P...), std::string name, dim3 grid, dim3 blk,
                             size_t smem = 0, void* /*stream*/ = nullptr) {
  return Launcher<P...>{kernel, std::move(name), grid, blk, smem};
}

// C10_CUDA_KERNEL_LAUNCH_CHECK: a scheduling error or a failed device assert raises here.
inline void launch_check() {
  if (!g_state.error.empty()) {
    std::string e = g_state.error;
    g_state.error.clear();
    TORCH_CHECK(false, "emu: ", e);
  }
  if (!g_state.assert_msg.empty()) {
    std::string e = g_state.assert_msg;
    g_state.assert_msg.clear();
    TORCH_CHECK(false, "CUDA error: device-side assert triggered (emu: ", e, ")");
  }
}

}  // namespace emu

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, lane_mask) ::emu::shfl_xor((mask), (v), (lane_mask), 32, __FILE__, __LINE__)

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) ::emu::kernel_assert(static_cast<bool>(cond), #cond, __FILE__, __LINE__)

// ------------------------------------------------------------------ device math
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
using std::exp2;
inline float exp2f(float x) { return std::exp2(x); }

template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
