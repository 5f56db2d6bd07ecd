"""Static checks of the CUDA kernels' machine code (SASS, sm_90), no GPU needed.

    python tests/static/sass_report.py EXTENSION_SO [--arch sm_90] [--check]

Disassembles the extension with cuobjdump (PyPI: nvidia-cuda-cuobjdump, which needs nvdisasm from
nvidia-cuda-nvdisasm), finds every loop of the row kernels (a backward branch), and for each
streaming kernel (the forward, the backward, the two-read fused path, softmax, the
vocabulary-parallel ops) takes its hot loop: the loop with global loads that does the most
exponentials. It prints, per kernel, the hot loop's instructions, its 16-byte loads (LDG.E.128),
its narrower loads (class weights read per element), and the instructions per element (loop
instructions / elements loaded per iteration). The hot loop is the innermost loop with a 16-byte
load. With --check it exits 1 when a streaming float32/bfloat16/float16 kernel has no loop of
16-byte loads, when a register-resident kernel has no 16-byte load at all, or when a kernel uses
local memory (LDL/STL: spills). With --csv PATH it also writes one row per kernel (the kernel, its
canonical key of tests/static/static_compare.py, dtype, hot-loop instructions, 16-byte loads, other
loads, instructions per element).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

_FUNC = re.compile(r"^\s*Function : (\S+)")
_INS = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")
_LDG = re.compile(r"\bLDG\.E(\.[A-Z0-9.]+)?\b")

def _wide(load: str) -> bool:
    """A 16-byte global load: LDG.E.128, or LDG.E.128.CONSTANT through the read-only path."""
    return ".128" in load


# Streaming kernels must stream in a loop of 16-byte loads (their names before the CUDA refactor of
# issue 20 too, so that the baseline's SASS can be read by the same script).
STREAMING = ("cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel", "softmax_fwd_rows_kernel",
             "softmax_bwd_rows_kernel", "shard_stats_kernel", "shard_grad_kernel", "temperature_stats_kernel",
             "soft_target_fwd_kernel", "soft_target_bwd_kernel",
             "tsce_fwd_kernel", "tsce_bwd_kernel", "tsce_soft_fwd_kernel", "tsce_soft_bwd_kernel")
# Kernels that may hold the row in registers (no loop) or stage rows in shared memory.
RESIDENT_OR_TILE = ("cross_entropy_fused_kernel", "ce_tile_kernel", "tsce_fused_kernel", "tsce_tile_kernel")
# (T, TPR, MAXV, true): a fused or softmax kernel that holds the row in registers
_RESIDENT = re.compile(r"<[^,<>]+, \d+, \d+, true")


@dataclass
class Loop:
    start: int
    end: int
    ins: List[str] = field(default_factory=list)

    @property
    def ex2(self) -> int:
        return sum("MUFU.EX2" in i for i in self.ins)

    def loads(self) -> List[str]:
        return [m.group(0) for i in self.ins for m in [_LDG.search(i)] if m]


@dataclass
class Func:
    name: str
    ins: List[Tuple[int, str]]

    def loops(self) -> List[Loop]:
        index = {a: k for k, (a, _) in enumerate(self.ins)}
        out = []
        for k, (a, t) in enumerate(self.ins):
            m = _BRA.search(t)
            if m:
                tgt = int(m.group(1), 16)
                if tgt < a and tgt in index:
                    j = index[tgt]
                    out.append(Loop(tgt, a, [x for _, x in self.ins[j:k + 1]]))
        return out


def disassemble(path: str, arch: str) -> str:
    exe = shutil.which("cuobjdump")
    if exe is None:
        raise SystemExit("sass_report: cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm, "
                         "and put their bin folders on PATH)")
    r = subprocess.run([exe, "-sass", "-arch", arch, path], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"sass_report: cuobjdump failed: {r.stderr.strip()[:500]}")
    return r.stdout


def parse(text: str) -> List[Func]:
    funcs: List[Func] = []
    cur: Optional[Func] = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = Func(m.group(1), [])
            funcs.append(cur)
            continue
        if cur is not None:
            mi = _INS.match(line)
            if mi:
                cur.ins.append((int(mi.group(1), 16), mi.group(2)))
    return funcs


def demangle(names: List[str]) -> Dict[str, str]:
    try:
        r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        out = r.stdout.strip().split("\n")
    except (OSError, subprocess.CalledProcessError):
        out = names
    clean = [re.sub(r"softcal::cuda::\(anonymous namespace\)::", "", s).replace("c10::", "") for s in out]
    return dict(zip(names, clean))


def dtype_of(name: str) -> str:
    for key, dt in (("<BFloat16", "bfloat16"), ("<Half", "float16"), ("<float", "float32"), ("<double", "float64")):
        if key in name:
            return dt
    return "other"


def elem_bytes(dt: str) -> int:
    return {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}.get(dt, 4)


def report(funcs: List[Func], check: bool, csv_path: Optional[str] = None) -> int:
    names = demangle([f.name for f in funcs])
    failures = []
    rows = []
    for f in funcs:
        dn = names[f.name]
        if not any(k in dn for k in STREAMING + RESIDENT_OR_TILE):
            continue
        dt = dtype_of(dn)
        local = sum(bool(re.search(r"\b(LDL|STL)\b", t)) for _, t in f.ins)
        wide_any = sum(_wide(m) for _, t in f.ins for m in [(_LDG.search(t) or [""])[0]] if m)
        if local and dt != "float64":
            failures.append(f"{dn}: {local} local-memory instructions (spills)")
        resident = bool(_RESIDENT.search(dn))
        # the hot loop: the innermost loop that streams the row, i.e. the smallest loop with a
        # 16-byte load (the grid-stride loop over rows encloses it)
        loops = [lp for lp in f.loops() if any(_wide(l) for l in lp.loads())]
        if not loops:
            if "tile_kernel" not in dn and not resident and dt != "float64":
                failures.append(f"{dn}: no loop with 16-byte global loads")
            if resident and wide_any == 0 and dt != "float64":
                failures.append(f"{dn}: no 16-byte global load")
            rows.append((dn, dt, "-", wide_any, "-", "-"))
            continue
        hot = min(loops, key=lambda lp: len(lp.ins))
        loads = hot.loads()
        wide = sum(_wide(l) for l in loads)
        narrow = [l for l in loads if not _wide(l)]
        per_iter_elems = wide * 16 // elem_bytes(dt)
        ipe = f"{len(hot.ins) / per_iter_elems:.1f}" if per_iter_elems else "-"
        rows.append((dn, dt, len(hot.ins), wide, len(narrow), ipe))
    print(f"{'kernel':<100} {'dtype':<9} {'loop':>5} {'ld128':>6} {'narrow':>6} {'ins/elem':>8}")
    for dn, dt, n, w, nw, ipe in rows:
        print(f"{dn[:100]:<100} {dt:<9} {n!s:>5} {w!s:>6} {nw!s:>6} {ipe:>8}")
    print(f"sass: {len(rows)} row kernels; {len(failures)} problems")
    if csv_path:
        import csv

        from static_compare import canonical

        with open(csv_path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["kernel", "key", "dtype", "loop", "ld128", "narrow", "ins_per_elem"])
            for dn, dt, n, wd, nw, ipe in rows:
                w.writerow([dn, canonical(dn), dt, n, wd, nw, ipe])
    for msg in failures:
        print("  " + msg)
    return 1 if (check and failures) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("so")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--csv", help="write one row per kernel to this CSV file")
    args = ap.parse_args(argv)
    if not os.path.exists(args.so):
        raise SystemExit(f"sass_report: {args.so} does not exist")
    funcs = parse(disassemble(args.so, args.arch))
    if not funcs:
        raise SystemExit("sass_report: no sm_90 function found in " + args.so)
    return report(funcs, args.check, args.csv)


if __name__ == "__main__":
    sys.exit(main())
