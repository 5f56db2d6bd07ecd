"""Build softcal's compiled kernels.

The CPU extension is always built. The CUDA kernels (csrc/cuda/*.cu) are built into the same
extension when a CUDA toolkit and a CUDA build of torch are present and a GPU is visible, or
when SOFTCAL_FORCE_CUDA=1 (to compile and link without a GPU, as CI does).

Switches (environment):
  SOFTCAL_FORCE_CUDA=1     build the CUDA kernels even without a visible GPU
  SOFTCAL_CPU_ONLY=1       never build the CUDA kernels
  SOFTCAL_CPU_ISA=...      avx512 | avx2 | none: vector ISA of the CPU kernels
                           (default: the best that this machine's CPU supports)
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0")
  MAX_JOBS                 parallel compile jobs (ninja)
  SOFTCAL_DEBUG=1          -O0 -g
  SOFTCAL_PTXAS_VERBOSE=1  pass -Xptxas -v to nvcc: ptxas prints every kernel's registers and spills
                           (make cuda-check fails on a spill, tests/static/ptxas_report.py)
Build with:  pip install --no-build-isolation -e .
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover
    sys.exit(
        "softcal: torch must be installed before building (pip install torch), and the build must "
        "run without isolation: pip install --no-build-isolation -e ."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cpu_isa() -> str:
    forced = os.environ.get("SOFTCAL_CPU_ISA", "").lower()
    if forced:
        if forced not in ("avx512", "avx2", "none"):
            sys.exit(f"softcal: SOFTCAL_CPU_ISA must be avx512, avx2 or none, got {forced!r}")
        return forced
    try:
        with open("/proc/cpuinfo") as f:
            flags = set()
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        return "none"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "none"


def _want_cuda() -> bool:
    if _flag("SOFTCAL_CPU_ONLY"):
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        if _flag("SOFTCAL_FORCE_CUDA"):
            sys.exit(
                "softcal: SOFTCAL_FORCE_CUDA=1 but "
                + ("this torch is a CPU build" if torch.version.cuda is None else "CUDA_HOME is not set")
            )
        return False
    return _flag("SOFTCAL_FORCE_CUDA") or torch.cuda.is_available()


def _extensions():
    debug = _flag("SOFTCAL_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    isa = _cpu_isa()
    isa_flags = {
        "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                   "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
        "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
        "none": ["-DCPU_CAPABILITY=DEFAULT"],
    }[isa]
    cxx = opt + ["-fdiagnostics-color=always", f"-DSOFTCAL_CPU_ISA=\"{isa}\""] + isa_flags
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(HERE, "csrc")]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc = opt + ["--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                      "-DSOFTCAL_WITH_CUDA"]
        if _flag("SOFTCAL_PTXAS_VERBOSE"):
            nvcc += ["-Xptxas", "-v"]
        return [CUDAExtension("softcal._C", sources, include_dirs=include_dirs,
                              extra_compile_args={"cxx": cxx + ["-DSOFTCAL_WITH_CUDA"], "nvcc": nvcc})]
    return [CppExtension("softcal._C", sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx})]


setup(
    packages=find_packages(include=["softcal", "softcal.*"]),
    package_data={"softcal": ["data/*", "data/**/*"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
