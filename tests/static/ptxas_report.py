"""Registers and spills of every CUDA kernel, from ptxas's -v output (no GPU needed).

    python tests/static/ptxas_report.py PTXAS_LOG [--fail-on-spill]

Reads the log that `nvcc -Xptxas -v` writes (the CUDA compile check, `make cuda-check`, builds the
extension with SOFTCAL_PTXAS_VERBOSE=1 and keeps the log), prints one line per kernel and sm
architecture that spills, and a summary. With --fail-on-spill it exits 1 when any float32,
bfloat16 or float16 kernel spills registers to local memory. float64 kernels may spill: they keep
the same row state in twice the registers, their element loops are bound by the FP64 pipe rather
than by memory, and nothing of the training path runs in float64 on a GPU; they are listed, not
failed. With --csv PATH it writes one row per (kernel, arch): the kernel, its canonical key
(tests/static/static_compare.py), arch, dtype, registers and spill bytes.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import List

_ENTRY = re.compile(r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+a?)'")
_PROPS = re.compile(r"Function properties for (?P<name>\S+)\s*\n\s*(?P<stack>\d+) bytes stack frame, "
                    r"(?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads")
_REGS = re.compile(r"Used (?P<regs>\d+) registers")


@dataclass
class Kernel:
    name: str
    arch: str
    regs: int
    spill_stores: int
    spill_loads: int

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    @property
    def dtype(self) -> str:
        """float64, float16, bfloat16 or float32 (or 'other'), from the mangled name."""
        n = self.name
        if "BFloat16" in n:
            return "bfloat16"
        if "4Half" in n:
            return "float16"
        # template arguments: d = double, f = float (Itanium mangling) after the kernel name
        if re.search(r"I(d|Nd)|Id[EL]|IdE", n) or "IdLi" in n:
            return "float64"
        if re.search(r"If[EfL]|IfLi", n):
            return "float32"
        return "other"


def parse(text: str) -> List[Kernel]:
    """Every (kernel, arch) of a ptxas -v log, in order."""
    out: List[Kernel] = []
    arch_of = {}
    for m in _ENTRY.finditer(text):
        arch_of.setdefault(m["name"], []).append(m["arch"])
    seen = {}
    for m in _PROPS.finditer(text):
        rest = text[m.end(): m.end() + 400]
        r = _REGS.search(rest)
        name = m["name"]
        k = seen.get(name, 0)
        archs = arch_of.get(name, ["?"])
        arch = archs[k] if k < len(archs) else archs[-1]
        seen[name] = k + 1
        out.append(Kernel(name, arch, int(r["regs"]) if r else -1, int(m["st"]), int(m["ld"])))
    return out


def demangle(name: str) -> str:
    try:
        s = subprocess.run(["c++filt"], input=name, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name
    s = re.sub(r"softcal::cuda::\(anonymous namespace\)::", "", s)
    return s.replace("c10::", "").replace("at::OpMathType<", "OpMath<")


def demangle_all(names: List[str]) -> dict:
    """Demangled names of many kernels in one c++filt call."""
    uniq = sorted(set(names))
    try:
        out = subprocess.run(["c++filt"], input="\n".join(uniq), capture_output=True, text=True,
                             check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        out = uniq
    clean = [re.sub(r"softcal::cuda::\(anonymous namespace\)::", "", s).replace("c10::", "") for s in out]
    return dict(zip(uniq, clean))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log")
    ap.add_argument("--fail-on-spill", action="store_true")
    ap.add_argument("--min-kernels", type=int, default=1,
                    help="fail when the log holds fewer kernels than this (a log that lost its -v lines)")
    ap.add_argument("--csv", help="write one row per kernel and arch to this CSV file")
    args = ap.parse_args(argv)
    kernels = parse(open(args.log, encoding="utf-8", errors="replace").read())
    if args.csv:
        import csv

        from static_compare import canonical

        names = demangle_all([k.name for k in kernels])
        with open(args.csv, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["kernel", "key", "arch", "dtype", "regs", "spill_stores", "spill_loads"])
            for k in kernels:
                dn = names.get(k.name, k.name)
                w.writerow([dn, canonical(dn), k.arch, k.dtype, k.regs, k.spill_stores, k.spill_loads])
    spilling = [k for k in kernels if k.spills]
    bad = [k for k in spilling if k.dtype != "float64"]
    for k in spilling:
        tag = "allowed (float64)" if k.dtype == "float64" else "SPILL"
        print(f"{tag:18s} {k.arch} regs={k.regs:3d} stores={k.spill_stores:4d} B loads={k.spill_loads:4d} B  "
              f"{demangle(k.name)[:150]}")
    by_dtype = {}
    for k in kernels:
        by_dtype.setdefault(k.dtype, [0, 0])
        by_dtype[k.dtype][0] += 1
        by_dtype[k.dtype][1] += k.spills
    summary = ", ".join(f"{d}: {n} kernels, {s} spilling" for d, (n, s) in sorted(by_dtype.items()))
    print(f"ptxas: {len(kernels)} kernels ({summary}); "
          f"{len(bad)} float32/bfloat16/float16 kernels spill")
    if len(kernels) < args.min_kernels:
        print(f"ptxas: expected at least {args.min_kernels} kernels in {args.log}, found {len(kernels)}")
        return 1
    if args.fail_on_spill and bad:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
