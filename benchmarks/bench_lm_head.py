#!/usr/bin/env python
"""Benchmark the LM head (issue 19): forward + backward of a linear layer and its cross-entropy.

Implementations (--impls, in this order by default):
  eager         F.cross_entropy(F.linear(x, W), t): the N x V logits, their gradient
  torch         F.linear_cross_entropy(x, W, t) (torch >= 2.12), options=None (unchunked)
  torch-chunked F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())
  compile       torch.compile of the eager composition (inductor)
  softcal       softcal.linear_cross_entropy (chunks of 128 MiB by default)
  softcal@MIB   the same with workspace_bytes = MIB MiB (not run unless named)
  liger         Liger-Kernel's LigerFusedLinearCrossEntropyLoss (CUDA, when installed)

  python benchmarks/bench_lm_head.py                   # CPU: the issue's shapes, float32 + bfloat16
  python benchmarks/bench_lm_head.py --device cuda     # GPU: (8192, 4096) x 128256 and
                                                       # (4096, 2048) x 256000, bfloat16
  python benchmarks/bench_lm_head.py --shapes 1024,256,8000 --dtypes float32 --rounds 2

Timing: the implementations run in turn, one call each per round, in a rotated order (so that a
machine whose load changes penalises all alike); each call is forward + backward with fresh
gradients (x.grad = W.grad = None). Reported: the minimum and median wall time over the rounds,
and on the CPU the minimum process CPU time. Peak memory of each call: CUDA max_memory_allocated
growth, CPU peak RSS growth (VmHWM reset through /proc/self/clear_refs); "beyond grads" subtracts
the gradients x.grad and W.grad that the call leaves (the issue's measure), and is given as a
fraction of the logits' size N x V x itemsize. The GEMM bound is 6 N H V flops at the rate of the
forward GEMM (N, H) x (H, V) measured here in the same dtype.

Writes lm_head_<device>.csv and .md (command, machine, versions in the header) into --out.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    import softcal
except ImportError:  # not installed: use the checkout this script lives in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import softcal

import torch
import torch.nn.functional as F

CPU_SHAPES = [(4096, 512, 32000), (8192, 256, 32000), (2048, 1024, 128256)]
GPU_SHAPES = [(8192, 4096, 128256), (4096, 2048, 256000)]
IMPLS = ["eager", "torch", "torch-chunked", "compile", "softcal", "liger"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/bench_lm_head.py",
                                description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", default=None,
                   help="N,H,V;N,H,V;... (default: the issue's shapes for the device)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated (default: float32,bfloat16 on the CPU, bfloat16 on CUDA)")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--rounds", type=int, default=None,
                   help="calls per implementation (default: 3 on the CPU, 10 on CUDA)")
    p.add_argument("--workspace-mib", type=float, default=None,
                   help="softcal's workspace_bytes in MiB (default: its default, 128 MiB)")
    p.add_argument("--out", default="benchmarks/results", help="folder of the CSV and markdown")
    p.add_argument("--tag", default=None, help="file name suffix (default: the device)")
    p.add_argument("--note", default="", help="a line for the header (e.g. 'measured under load')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render", default=None, metavar="CSV",
                   help="only write the markdown table of a CSV written by this script")
    return p.parse_args(argv)


# ---------------------------------------------------------------------- machine and versions
def _cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _loadavg():
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _git():
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _liger_version():
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:  # noqa: BLE001  (not installed)
        return None


def machine(args):
    info = dict(date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                python=platform.python_version(), torch=torch.__version__,
                softcal=f"{softcal.__version__} (git {_git()})", threads=torch.get_num_threads(),
                loadavg_start=_loadavg(), liger=_liger_version() or "not installed")
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["machine"] = (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
                           f"CUDA {torch.version.cuda}")
    else:
        info["machine"] = f"{_cpu_model()}, {os.cpu_count()} cores"
    return info


# ---------------------------------------------------------------------- memory
def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class CpuMeter:
    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.ok = _status_kb("VmHWM") <= _status_kb("VmRSS") + 4096
        except OSError:
            self.ok = False
        try:
            import ctypes

            self.libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self.libc = None

    def sync(self):
        pass

    def start(self):
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)
        if not self.ok:
            return None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS")

    def peak(self, base):
        if base is None:
            return None
        return max(0, _status_kb("VmHWM") - base) * 1024


class CudaMeter:
    def sync(self):
        torch.cuda.synchronize()

    def start(self):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak(self, base):
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - base)


# ---------------------------------------------------------------------- implementations
def make_impls(names, device, workspace_bytes):
    impls = {}

    def eager(x, W, t):
        return F.cross_entropy(F.linear(x, W), t)

    for name in names:
        if name == "eager":
            impls[name] = eager
        elif name == "torch":
            if hasattr(F, "linear_cross_entropy"):
                impls[name] = lambda x, W, t: F.linear_cross_entropy(x, W, t)
        elif name == "torch-chunked":
            if hasattr(F, "linear_cross_entropy"):
                from torch.nn import LinearCrossEntropyOptions

                opts = LinearCrossEntropyOptions()
                impls[name] = lambda x, W, t, o=opts: F.linear_cross_entropy(x, W, t, options=o)
        elif name == "compile":
            impls[name] = torch.compile(eager)
        elif name == "softcal":
            kw = {} if workspace_bytes is None else dict(workspace_bytes=workspace_bytes)
            impls[name] = lambda x, W, t, kw=kw: softcal.linear_cross_entropy(x, W, t, **kw)
        elif name.startswith("softcal@"):  # softcal@MIB: another workspace size
            kw = dict(workspace_bytes=int(float(name[8:]) * 2**20))
            impls[name] = lambda x, W, t, kw=kw: softcal.linear_cross_entropy(x, W, t, **kw)
        elif name == "liger" and device == "cuda":
            try:
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            except ImportError:
                continue
            mod = LigerFusedLinearCrossEntropyLoss()
            impls[name] = lambda x, W, t, m=mod: m(W, x, t)
    return impls


def gemm_seconds(x, W, meter, reps):
    """Median time of the forward GEMM (N, H) x (H, V) in the inputs' dtype."""
    with torch.no_grad():
        y = torch.mm(x, W.t())
        ts = []
        for _ in range(reps):
            meter.sync()
            t0 = time.perf_counter()
            torch.mm(x, W.t(), out=y)
            meter.sync()
            ts.append(time.perf_counter() - t0)
    del y
    return statistics.median(ts)


def run_case(N, H, V, dtype, args, meter, info_rows):
    device = args.device
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    x0 = (torch.randn(N, H, generator=g) * 0.5).to(device=device, dtype=dtype)
    W0 = (torch.randn(V, H, generator=g) * H ** -0.5).to(device=device, dtype=dtype)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    x = x0.clone().requires_grad_()
    W = W0.clone().requires_grad_()
    item = x.element_size()
    logits_bytes = N * V * item
    grads_bytes = (N * H + V * H) * item
    names = [n for n in args.impls.split(",") if n]
    ws = int(args.workspace_mib * 2**20) if args.workspace_mib else None
    impls = make_impls(names, device, ws)
    rounds = args.rounds or (3 if device == "cpu" else 10)
    rate_s = gemm_seconds(x0, W0, meter, 3 if device == "cpu" else 10)
    bound = 3 * rate_s  # 6 N H V flops at the forward GEMM's 2 N H V / rate_s
    print(f"\n== ({N}, {H}) x {V} {str(dtype)[6:]}: logits {logits_bytes / 1e6:.0f} MB, forward "
          f"GEMM {rate_s * 1e3:.1f} ms ({2 * N * H * V / rate_s / 1e9:.0f} GFLOP/s), GEMM bound "
          f"{bound * 1e3:.1f} ms", flush=True)
    status = {n: "ok" for n in impls}
    walls = {n: [] for n in impls}
    cpus = {n: [] for n in impls}
    peaks = {n: [] for n in impls}

    def call(fn):
        x.grad = None
        W.grad = None
        loss = fn(x, W, t)
        loss.backward()
        return loss

    for n in impls:  # first calls (imports, op registration, lazy inits) on 2 rows, untimed
        if n != "compile":
            try:
                xs = x0[:2].clone().requires_grad_()
                impls[n](xs, W, t[:2]).backward()
            except Exception:  # noqa: BLE001  (reported by the timed calls)
                pass
    W.grad = None
    if "compile" in impls:  # compile once, untimed
        try:
            call(impls["compile"])
            meter.sync()
        except Exception as e:  # noqa: BLE001
            status["compile"] = f"failed: {type(e).__name__}: {str(e)[:80]}"
    order = list(impls)
    for r in range(rounds):
        rot = order[r % len(order):] + order[: r % len(order)]
        for n in rot:
            if status[n] != "ok":
                continue
            try:
                x.grad = None
                W.grad = None
                base = meter.start()
                c0, w0 = time.process_time(), time.perf_counter()
                call(impls[n])
                meter.sync()
                w1, c1 = time.perf_counter(), time.process_time()
                peaks[n].append(meter.peak(base))
            except Exception as e:  # noqa: BLE001  (out of memory, unsupported dtype, ...)
                status[n] = f"failed: {type(e).__name__}: {str(e)[:80]}"
                x.grad = None
                W.grad = None
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            walls[n].append(w1 - w0)
            cpus[n].append(c1 - c0)
            print(f"   round {r}: {n:<14} {w1 - w0:8.3f} s wall {c1 - c0:8.3f} s cpu", flush=True)
    rows = []
    for n in impls:
        row = dict(device=device, dtype=str(dtype)[6:], N=N, H=H, V=V, impl=n, status=status[n],
                   rounds=len(walls[n]), logits_MB=logits_bytes / 1e6,
                   gemm_bound_ms=bound * 1e3)
        if walls[n]:
            wmin, wmed = min(walls[n]), statistics.median(walls[n])
            row.update(wall_min_ms=wmin * 1e3, wall_median_ms=wmed * 1e3,
                       cpu_min_ms=min(cpus[n]) * 1e3 if device == "cpu" else None,
                       pct_of_gemm_bound=100 * bound / wmin)
            pk = [p for p in peaks[n] if p is not None]
            if pk:
                peak = min(pk)
                row.update(peak_extra_MB=peak / 1e6,
                           beyond_grads_MB=(peak - grads_bytes) / 1e6,
                           beyond_grads_x_logits=(peak - grads_bytes) / logits_bytes)
        rows.append(row)
    base = next((r for r in rows if r["impl"] == "eager" and "wall_min_ms" in r), None)
    chunked = next((r for r in rows if r["impl"] == "torch-chunked" and "wall_min_ms" in r), None)
    comp = next((r for r in rows if r["impl"] == "compile" and "wall_min_ms" in r), None)
    for r in rows:
        if "wall_min_ms" not in r:
            continue
        if base:
            r["x_eager_time"] = r["wall_min_ms"] / base["wall_min_ms"]
        if chunked:
            r["speedup_vs_torch_chunked"] = chunked["wall_min_ms"] / r["wall_min_ms"]
        if comp:
            r["speedup_vs_compile"] = comp["wall_min_ms"] / r["wall_min_ms"]
    info_rows.extend(rows)
    for r in rows:
        print("   " + _line(r), flush=True)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def _line(r):
    if "wall_min_ms" not in r:
        return f"{r['impl']:<14} {r['status']}"
    return (f"{r['impl']:<14} min {r['wall_min_ms']:9.1f} ms  median {r['wall_median_ms']:9.1f} ms"
            f"  x eager {_fmt(r.get('x_eager_time'), '.2f')}  vs chunked "
            f"{_fmt(r.get('speedup_vs_torch_chunked'), '.2f')}x  GEMM bound "
            f"{_fmt(r.get('pct_of_gemm_bound'), '.0f')} %  peak extra "
            f"{_fmt(r.get('peak_extra_MB'), '.0f')} MB, beyond grads "
            f"{_fmt(r.get('beyond_grads_x_logits'), '.3f')} x logits")


COLUMNS = ["device", "dtype", "N", "H", "V", "impl", "status", "rounds", "wall_min_ms",
           "wall_median_ms", "cpu_min_ms", "x_eager_time", "speedup_vs_torch_chunked",
           "speedup_vs_compile", "gemm_bound_ms", "pct_of_gemm_bound", "logits_MB",
           "peak_extra_MB", "beyond_grads_MB", "beyond_grads_x_logits"]


def _num(v):
    if v in (None, ""):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def markdown(rows, header):
    """The table: per shape and dtype, each implementation's wall and CPU times and their ratios
    to eager's, torch-chunked's and torch.compile's, the fraction of the GEMM bound, the memory."""
    md = ["# LM head: forward + backward", ""] + [f"- {h}" for h in header] + [
        "- time: minimum (median) wall time over the rounds, one call of each implementation per "
        "round in a rotated order, and the minimum process CPU time (CPU only: on a machine "
        "shared with other jobs the wall time swings with their load, the CPU time much less); "
        "ratios: this implementation's time over the other's (wall / CPU); peak: extra memory of "
        "one call beyond the gradients of x and W, in MB and as a fraction of the logits' size; "
        "GEMM bound: 6 N H V flops at the measured rate of the forward GEMM", "",
        "| shape | dtype | impl | wall ms | CPU ms | x eager | x torch-chunked | x compile | "
        "% of GEMM bound | peak beyond grads (x logits) |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    rows = [{k: _num(v) for k, v in r.items()} for r in rows]

    def find(r, impl):
        for o in rows:
            if (o["impl"] == impl and o.get("wall_min_ms") is not None
                    and all(o[k] == r[k] for k in ("dtype", "N", "H", "V"))):
                return o
        return None

    def ratio(r, o):
        if o is None:
            return "-"
        w = r["wall_min_ms"] / o["wall_min_ms"]
        if r.get("cpu_min_ms") and o.get("cpu_min_ms"):
            return f"{w:.2f} / {r['cpu_min_ms'] / o['cpu_min_ms']:.2f}"
        return f"{w:.2f}"

    for r in rows:
        shape = f"({r['N']:.0f}, {r['H']:.0f}) x {r['V']:.0f}"
        if r.get("wall_min_ms") is None:
            md.append(f"| {shape} | {r['dtype']} | {r['impl']} | {r['status']} | | | | | | |")
            continue
        mem = "-"
        if r.get("beyond_grads_MB") is not None:
            mem = f"{r['beyond_grads_MB']:.0f} MB ({r['beyond_grads_x_logits']:.3f})"
        md.append(f"| {shape} | {r['dtype']} | {r['impl']} | {r['wall_min_ms']:.0f} "
                  f"({r['wall_median_ms']:.0f}) | {_fmt(r.get('cpu_min_ms'), '.0f')} | "
                  f"{ratio(r, find(r, 'eager'))} | {ratio(r, find(r, 'torch-chunked'))} | "
                  f"{ratio(r, find(r, 'compile'))} | {_fmt(r.get('pct_of_gemm_bound'), '.0f')} "
                  f"| {mem} |")
    return "\n".join(md) + "\n"


def write(rows, info, args, command):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or args.device
    header = [f"command: {command}",
              f"machine: {info['machine']}, torch threads {info['threads']}",
              f"versions: python {info['python']}, torch {info['torch']}, softcal "
              f"{info['softcal']}, liger-kernel {info['liger']}",
              f"date: {info['date']}; load average at start {info['loadavg_start']}, at end "
              f"{_loadavg()}"]
    if args.note:
        header.append(f"note: {args.note}")
    with open(out / f"lm_head_{tag}.csv", "w", newline="") as f:
        for h in header:
            f.write(f"# {h}\n")
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    (out / f"lm_head_{tag}.md").write_text(markdown(rows, header))
    print(f"\nwrote {out / f'lm_head_{tag}.csv'} and .md")


def render(path):
    """--render CSV: the markdown table of a CSV this script wrote, next to it."""
    lines = Path(path).read_text().splitlines()
    header = [ln[2:] for ln in lines if ln.startswith("# ")]
    rows = list(csv.DictReader([ln for ln in lines if not ln.startswith("#")]))
    out = Path(path).with_suffix(".md")
    out.write_text(markdown(rows, header))
    print(f"wrote {out}")


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        render(args.render)
        return 0
    given = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/bench_lm_head.py " + " ".join(given)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";") if s]
    else:
        shapes = CPU_SHAPES if args.device == "cpu" else GPU_SHAPES
    dtypes = args.dtypes or ("float32,bfloat16" if args.device == "cpu" else "bfloat16")
    dtypes = [getattr(torch, d) for d in dtypes.split(",")]
    meter = CpuMeter() if args.device == "cpu" else CudaMeter()
    info = machine(args)
    print("\n".join(f"{k}: {v}" for k, v in info.items()))
    rows = []
    for dtype in dtypes:
        for N, H, V in shapes:
            run_case(N, H, V, dtype, args, meter, rows)
            write(rows, info, args, command)  # after every case: what ran is kept
    return 0


if __name__ == "__main__":
    sys.exit(main())
