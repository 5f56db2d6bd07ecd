import os

import pytest
import torch

import softcal

# SOFTCAL_EMULATE_CUDA=1: the CUDA kernels (csrc/cuda), compiled for the CPU by the emulator in
# tests/cuda_emu, replace the extension's CPU kernels, so that every "cpu" case of the suite runs
# the CUDA kernels' code (launch paths, reductions, barriers) on this machine. It says nothing of
# speed, and CUDA-only behaviour (graphs, streams, memory) still needs a GPU (tests/cuda/test_cuda.py).
EMULATE_CUDA = os.environ.get("SOFTCAL_EMULATE_CUDA", "0") == "1"
if EMULATE_CUDA:
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cuda_emu"))
    import emulator as _emu_build

    EMU_OPS = _emu_build.install()

# The core tests run on CUDA only where the extension has CUDA kernels: otherwise CUDA tensors
# would go to the pure-PyTorch fallback and the tests would not test the kernels.
CUDA = torch.cuda.is_available() and softcal.backend("cuda") == "extension"
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])

# Tolerances travel with the dtype: (rtol on values, relative-norm tolerance on gradients).
# The kernels accumulate in float32 for half types, so the error of a half/bfloat16 result is
# one rounding of the output; float32 sees a ~1e-6 relative exp error.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12, grad=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-6, grad=2e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-3, grad=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=8e-3, grad=1.6e-2),
}

# Saved classifier outputs the tests read (in the repository, with their licences and
# attribution: tests/data/logits/README.md). Nothing outside the repository is read.
TEST_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "logits")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 on the CPU (0 when both are 0)."""
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff if denom == 0 else diff / denom
