// softcal CUDA emulator: the op schemas in the `softcal_emu` namespace (the same text as the
// extension's, csrc/schemas.h) and the ops that set and read the emulator. The kernels are registered
// for CPU tensors by the rewritten registration blocks of csrc/cuda/*.cu (tests/cuda_emu/emulator.py).
#include <torch/library.h>

#include <cuda_runtime.h>

#include "emu.h"
#include "schemas.h"

namespace {

// Selects the emulated device: the kernels see n SMs (grids, hence partial sums, follow).
void set_sm_count(int64_t n) {
  TORCH_CHECK(n >= 1 && n <= 1024, "emu_set_sm_count: n must be in [1, 1024], got ", n);
  ::emu::g_device = static_cast<int>(n - 1);
}

// The scheduler's order of threads between barriers (emu.h, g_schedule).
void set_schedule(const std::string& mode, int64_t seed) {
  if (mode == "forward") {
    ::emu::g_schedule = 0;
  } else if (mode == "reverse") {
    ::emu::g_schedule = 1;
  } else if (mode == "random") {
    ::emu::g_schedule = 2;
  } else {
    TORCH_CHECK(false, "emu_set_schedule: mode must be 'forward', 'reverse' or 'random', got '", mode, "'");
  }
  ::emu::g_seed = static_cast<uint64_t>(seed);
}

// [kernels launched, blocks run, largest dynamic shared memory] since the library was loaded.
std::vector<int64_t> stats() {
  return {::emu::g_state.launches, ::emu::g_state.blocks, ::emu::g_state.max_smem};
}

// The kernel instantiations launched since load, "name=count".
std::vector<std::string> kernels() {
  std::vector<std::string> out;
  for (const auto& [name, n] : ::emu::g_state.kernels) out.push_back(name + "=" + std::to_string(n));
  return out;
}

}  // namespace

TORCH_LIBRARY(softcal_emu, m) {
  softcal::define_ops(m);
  m.def("emu_set_sm_count(int n) -> ()", &set_sm_count);
  m.def("emu_set_schedule(str mode, int seed=0) -> ()", &set_schedule);
  m.def("emu_stats() -> int[]", &stats);
  m.def("emu_kernels() -> str[]", &kernels);
}
