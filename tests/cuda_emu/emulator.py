"""Builds the softcal CUDA emulator: csrc/cuda compiled as C++ for the CPU (tests/cuda_emu/emu.h).

The sources are rewritten into build/cuda-emu/src (never edited in place):

* ``kernel<<<grid, block, smem, stream>>>(args)`` ->
  ``::emu::launch(kernel, ::emu::kernel_name<kernel>(), grid, block, smem, stream)(args)``
* ``__shared__ T name[N];`` -> ``static T name[N];`` poisoned (0xff) once per block
* ``extern __shared__ ... name[];`` -> a pointer to the block's dynamic shared memory
* ``.is_cuda()`` -> ``.is_cpu()`` (the emulated device's memory is host memory)
* ``TORCH_LIBRARY_IMPL(softcal, CUDA, m)`` -> ``TORCH_LIBRARY_IMPL(softcal_emu, CPU, m)``

and compiled with torch.utils.cpp_extension.load into the ``softcal_emu`` op namespace, whose
schemas are the extension's own (csrc/schemas.h). ``python tests/cuda_emu/emulator.py`` builds it
alone; the tests build it on first use.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CUDA_SRC = ROOT / "csrc" / "cuda"

_LAUNCH = re.compile(
    r"(?P<k>[A-Za-z_][\w:]*(?:<[^;(){}]*?>)?)\s*<<<(?P<cfg>.*?)>>>\s*\(", re.DOTALL)
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(?P<t>[\w:]+(?:\s+[\w:]+)*)\s+(?P<n>\w+)\[\];")
_SHARED = re.compile(r"__shared__\s+(?P<t>[\w:<>, ]+?)\s+(?P<n>\w+)\[(?P<d>[^\]]+)\];")


def rewrite(text: str) -> tuple[str, dict[str, int]]:
    """The C++ text of one CUDA source, and how many of each construct were rewritten."""
    counts = {}
    text, counts["launch"] = _LAUNCH.subn(
        lambda m: f"::emu::launch({m['k']}, ::emu::kernel_name<{m['k']}>(), {' '.join(m['cfg'].split())})(",
        text)
    text, counts["extern_shared"] = _EXTERN_SHARED.subn(
        lambda m: f"{m['t']}* {m['n']} = reinterpret_cast<{m['t']}*>(::emu::dynamic_smem());", text)
    text, counts["shared"] = _SHARED.subn(
        lambda m: f"static {m['t']} {m['n']}[{m['d']}]; ::emu::poison_shared({m['n']}, sizeof({m['n']}));",
        text)
    text, counts["is_cuda"] = re.subn(r"\.is_cuda\(\)", ".is_cpu()", text)
    text, counts["register"] = re.subn(r"TORCH_LIBRARY_IMPL\(softcal,\s*CUDA,", "TORCH_LIBRARY_IMPL(softcal_emu, CPU,", text)
    for left in ("<<<", "__shared__"):
        if left in re.sub(r"//[^\n]*", "", text):
            raise RuntimeError(f"emu: a {left} construct that emulator.py cannot rewrite is left")
    return text, counts


def write_sources(out: Path) -> list[Path]:
    """Rewrites csrc/cuda (and the emulator's own selftest.cu) into out/cuda; returns the
    translation units (.cu -> .cpp)."""
    (out / "cuda").mkdir(parents=True, exist_ok=True)
    units = []
    for src in sorted(CUDA_SRC.iterdir()) + [HERE / "selftest.cu"]:
        if src.suffix not in (".cu", ".cuh"):
            continue
        text, _ = rewrite(src.read_text())
        dst = out / "cuda" / (src.stem + (".cpp" if src.suffix == ".cu" else ".cuh"))
        if not dst.exists() or dst.read_text() != text:  # keep timestamps: ninja rebuilds less
            dst.write_text(text)
        if src.suffix == ".cu":
            units.append(dst)
    return units


def build(verbose: bool = False):
    """Builds (or reuses) the emulator library and loads it: torch.ops.softcal_emu.*"""
    import torch
    from torch.utils.cpp_extension import load

    asan = os.environ.get("SOFTCAL_EMU_ASAN", "0") == "1"
    out = ROOT / "build" / ("cuda-emu-asan" if asan else "cuda-emu")
    src = out / "src"
    units = write_sources(src)
    flags = ["-O2", "-g0", "-Wno-unknown-pragmas", "-include", str(HERE / "emu.h")]
    if asan:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    load(
        name="softcal_emu_asan" if asan else "softcal_emu",
        sources=[str(u) for u in units] + [str(HERE / "emu_ops.cpp")],
        extra_include_paths=[str(src), str(HERE / "shim"), str(HERE), str(ROOT / "csrc")],
        extra_cflags=flags,
        extra_ldflags=["-fsanitize=address"] if asan else [],
        build_directory=str(out),
        is_python_module=False,
        verbose=verbose,
    )
    return torch.ops.softcal_emu


def configure(ops) -> None:
    """Sets the emulator as the environment says (install() does; the tests that change a setting
    call it to put it back):
    SOFTCAL_EMU_SMS, the emulated device's SM count (grids follow it; default 3, a few, so that
    grid-stride loops turn); SOFTCAL_EMU_SCHEDULE, the order of threads between barriers
    (forward, the default, reverse or random) and SOFTCAL_EMU_SEED, the random order's seed."""
    ops.emu_set_sm_count(int(os.environ.get("SOFTCAL_EMU_SMS", "3")))
    ops.emu_set_schedule(os.environ.get("SOFTCAL_EMU_SCHEDULE", "forward"),
                         int(os.environ.get("SOFTCAL_EMU_SEED", "0")))


_LIB = None


def install():
    """Builds the emulator and puts its kernels in place of the extension's CPU kernels, so that
    every softcal op called on CPU tensors (the functional API, the modules, the calibration)
    runs the CUDA kernels under emulation. Returns torch.ops.softcal_emu."""
    global _LIB
    import torch
    import warnings

    import softcal  # noqa: F401  (loads the extension and its op schemas)
    from softcal import _ops

    ops = build()
    configure(ops)
    if _LIB is None:
        lib = torch.library.Library("softcal", "IMPL")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
            for name in _ops.OPS:
                lib.impl(name, getattr(ops, name).default, "CPU")
        _LIB = lib
    return ops


if __name__ == "__main__":
    ops = build(verbose="-v" in sys.argv)
    print("softcal_emu built:", ops.emu_stats())
