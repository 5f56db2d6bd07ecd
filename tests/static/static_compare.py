"""Before/after comparison of the static gates' figures (no GPU needed).

    python tests/static/static_compare.py --sass BEFORE.csv AFTER.csv [--ptxas BEFORE.csv AFTER.csv]
                                          [--arch sm_90] [--markdown OUT.md] [--check] [--matched]

Reads the CSV files that `sass_report.py --csv` and `ptxas_report.py --csv` write for two builds
(for example main and a branch), matches kernels by a canonical key that survives renames (the
kernels of csrc/cuda before issue 20 were tsce_*; the loss variant was an integer KIND, the tile
pass an integer MODE), and prints per kernel family and dtype: the largest hot-loop instructions
per element, the largest register count and the spill bytes, before and after. With --check it
exits 1 when any kernel present in both builds has more instructions per element after than
before, or when a float32/bfloat16/float16 kernel spills after.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

# old kernel name -> new
_FAMILY = {
    "tsce_fwd_kernel": "cross_entropy_fwd_kernel",
    "tsce_bwd_kernel": "cross_entropy_bwd_kernel",
    "tsce_fused_kernel": "cross_entropy_fused_kernel",
    "tsce_tile_kernel": "ce_tile_kernel",
    "tsce_soft_fwd_kernel": "soft_target_fwd_kernel",
    "tsce_soft_bwd_kernel": "soft_target_bwd_kernel",
}
# today's enums (common.h) as the integers the old names used; the old loss variant KIND (0 no
# smoothing, 1 smoothing, 2 smoothing with class weights) is two of them now (Smoothing, ClassWeights)
_ENUMS = {"Smoothing::kOff": "0", "Smoothing::kOn": "1", "ClassWeights::kNone": "0", "ClassWeights::kPerClass": "1",
          "Pass::kForward": "0", "Pass::kBackward": "1", "Pass::kFused": "2"}
_KIND = {"0": ["0", "0"], "1": ["1", "0"], "2": ["1", "1"]}
_WITH_KIND = ("cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel", "cross_entropy_fused_kernel", "ce_tile_kernel",
              "shard_stats_kernel", "shard_grad_kernel")
_KIND_ARGS = {"cross_entropy_fwd_kernel": 3, "cross_entropy_bwd_kernel": 3, "cross_entropy_fused_kernel": 5,
              "ce_tile_kernel": 3, "shard_stats_kernel": 3, "shard_grad_kernel": 3}  # with KIND last


def _split_args(s: str) -> List[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def canonical(name: str) -> str:
    """'family<args>' of a demangled kernel name, the same before and after the renames."""
    s = re.sub(r"^void\s+", "", name.strip())
    s = s.replace("(anonymous namespace)::", "").replace("softcal::cuda::", "").replace("c10::", "")
    depth = 0
    for i, ch in enumerate(s):  # drop the parameter list: the first "(" outside template arguments
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            s = s[:i]
            break
    s = s.replace("at::OpMathType<", "OpMath<")
    m = re.match(r"([\w:]+)<(.*)>$", s)
    if not m:
        return s
    family, args = m.group(1), _split_args(m.group(2))
    family = _FAMILY.get(family, family)
    # the soft-cap variant (added after the baseline): its kOff kernels are the kernels before it
    if args and re.fullmatch(r"(softcal::)?(Softcap::kOff|\((softcal::)?Softcap\)0)", args[-1]):
        args = args[:-1]
    args = [_ENUMS.get(re.sub(r"^(softcal::)?(cuda::)?", "", a), a) for a in args]
    args = [re.sub(r"^\((?:softcal::)?(?:cuda::)?\w+\)(\d+)$", r"\1", a) for a in args]  # (Enum)1 -> 1
    if family in _WITH_KIND and len(args) == _KIND_ARGS[family] and args[-1] in _KIND:  # KIND -> S, W
        args = args[:-1] + _KIND[args[-1]]
    if family.startswith("soft_target_") and len(args) == 3:  # before: the target had the logits' dtype
        args = [args[0], args[0]] + args[1:]
    if family.startswith("soft_target_"):  # the class weights were a bool
        args = args[:-1] + [{"false": "0", "true": "1"}.get(args[-1], args[-1])]
    return f"{family}<{', '.join(args)}>"


def _dtype(key: str) -> str:
    first = key.split("<", 1)[1].split(",")[0].strip(" >") if "<" in key else ""
    return {"BFloat16": "bfloat16", "Half": "float16", "float": "float32", "double": "float64"}.get(first, "other")


def _family(key: str) -> str:
    return key.split("<", 1)[0]


def _read(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _num(x: str) -> Optional[float]:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def compare(sass: Tuple[str, str], ptxas: Optional[Tuple[str, str]], arch: str,
            markdown: Optional[str], check: bool, matched: bool = False) -> int:
    before = {r["key"]: r for r in _read(sass[0])}
    after = {r["key"]: r for r in _read(sass[1])}
    if matched:  # the table of the kernels in both builds only (not the new variants')
        common = set(before) & set(after)
        before = {k: r for k, r in before.items() if k in common}
        after = {k: r for k, r in after.items() if k in common}
    regs: Dict[str, Dict[str, Tuple[int, int]]] = {"before": {}, "after": {}}
    if ptxas:
        for tag, path in zip(("before", "after"), ptxas):
            for r in _read(path):
                if r["arch"] != arch:
                    continue
                k = r["key"]
                spill = int(r["spill_stores"]) + int(r["spill_loads"])
                old = regs[tag].get(k, (0, 0))
                regs[tag][k] = (max(old[0], int(r["regs"])), max(old[1], spill))
    worse = []
    for k in sorted(set(before) & set(after)):
        b, a = _num(before[k]["ins_per_elem"]), _num(after[k]["ins_per_elem"])
        if b is not None and a is not None and a > b + 1e-9:
            worse.append((k, b, a))
    spilling = [k for k, (_, sp) in regs["after"].items() if sp and _dtype(k) in ("float32", "bfloat16", "float16")]
    # per family and dtype: the largest ins/elem, registers, spills
    agg: Dict[Tuple[str, str], Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
    for tag, rows in (("before", before), ("after", after)):
        for k, r in rows.items():
            v = _num(r["ins_per_elem"])
            if v is not None:
                agg[(_family(k), _dtype(k))][f"ipe_{tag}"].append(v)
        for k, (rg, sp) in regs[tag].items():
            if k in rows:
                agg[(_family(k), _dtype(k))][f"regs_{tag}"].append(rg)
                agg[(_family(k), _dtype(k))][f"spill_{tag}"].append(sp)

    def mx(v: List[float], fmt: str) -> str:
        return format(max(v), fmt) if v else "-"

    lines = ["| kernel | dtype | ins/elem before | ins/elem after | regs before | regs after | spill B before | spill B after |",
             "|---|---|---|---|---|---|---|---|"]
    for (fam, dt), d in sorted(agg.items()):
        lines.append(f"| {fam} | {dt} | {mx(d['ipe_before'], '.1f')} | {mx(d['ipe_after'], '.1f')} | "
                     f"{mx(d['regs_before'], '.0f')} | {mx(d['regs_after'], '.0f')} | "
                     f"{mx(d['spill_before'], '.0f')} | {mx(d['spill_after'], '.0f')} |")
    text = "\n".join(lines)
    print(text)
    only_b, only_a = sorted(set(before) - set(after)), sorted(set(after) - set(before))
    print(f"\n{len(set(before) & set(after))} kernels in both builds; {len(only_b)} only before, "
          f"{len(only_a)} only after; {len(worse)} with more instructions per element after")
    for k, b, a in worse:
        print(f"  MORE: {k}: {b:.2f} -> {a:.2f}")
    for k in spilling:
        print(f"  SPILL: {k}")
    if markdown:
        with open(markdown, "w") as fh:
            fh.write(text + "\n")
    return 1 if check and (worse or spilling) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sass", nargs=2, required=True, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--ptxas", nargs=2, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--markdown")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--matched", action="store_true", help="the table of the kernels in both builds only")
    args = ap.parse_args(argv)
    return compare(tuple(args.sass), tuple(args.ptxas) if args.ptxas else None, args.arch, args.markdown,
                   args.check, args.matched)


if __name__ == "__main__":
    sys.exit(main())
