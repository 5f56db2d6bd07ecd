"""``softcal bench``: softcal.cross_entropy against PyTorch eager, torch.compile and Liger-Kernel.

Times the forward and the forward + backward of a temperature-scaled, label-smoothed
cross-entropy at a set of (N, C) shapes and dtypes with ``torch.utils.benchmark`` (its Timer
synchronises the GPU around each measurement), and reports per case the median or minimum time
and the spread (interquartile range / median), the achieved GB/s against the bytes that must move
(forward N*C*bytes; autograd forward+backward 3*N*C*bytes; the fused modes 2*N*C*bytes), the peak
extra memory of one call (CUDA: max_memory_allocated; CPU: growth of the peak RSS) and the
speed-up of softcal over each baseline.

Implementations: softcal (autograd mode), softcal-fused (gradient in the forward),
softcal-fused-inplace (gradient written into the logits; the logits are refilled, untimed, before
each call), eager (F.cross_entropy(x / T, ...)), compile (torch.compile of eager), liger and
liger-prescaled (Liger-Kernel on CUDA, when importable).

On the CPU, PyTorch's time depends on whether its allocator uses transparent huge pages
(THP_MEM_ALLOC_ENABLE=1, read when torch is imported): --thp both runs the benchmark in two
subprocesses, without and with it. ``python benchmarks/bench_loss.py`` runs this same benchmark,
full by default, and adds a plot.

Examples:
  softcal bench                              # quick: small shapes, 1 thread, minimum times
  softcal bench --full --out results         # the full CPU run, both THP settings
  python benchmarks/bench_loss.py --device cuda --bandwidth 4000

Writes <out>/<device>_<tag>.csv and .md (tag "quick" or "bench"); <out> defaults to
$SOFTCAL_BENCH_OUT, else $XDG_CACHE_HOME/softcal/bench (outside the source tree).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

THP_VAR = "THP_MEM_ALLOC_ENABLE"
DEFAULT_SHAPES = {
    "cpu": [(4096, 32000), (8192, 50257), (512, 128256), (65536, 1000), (1_000_000, 10)],
    "cuda": [(4096, 32000), (8192, 50257), (16384, 131072), (4096, 256000), (1_000_000, 10)],
}
QUICK_SHAPES = [(256, 1000), (64, 32000), (20000, 10)]
MIN_TIME = {"quick": 0.5, "cpu": 2.0, "cuda": 1.0}  # seconds of measured time per case
SOFTCAL_IMPLS = ("softcal", "softcal-fused", "softcal-fused-inplace")
BASELINES = ("eager", "compile", "liger", "liger-prescaled")
FIELDS = ["device", "thp", "dtype", "N", "C", "pass", "impl", "status", "stat", "ms", "median_ms",
          "min_ms", "spread_pct", "reps", "measured_s", "bound_bytes", "GBps", "pct_of_bandwidth",
          "peak_extra_MB", "peak_extra_logits"] + [f"speedup_vs_{b}" for b in BASELINES] + [
          "softcal_backend"]


def default_out() -> Path:
    """Where the outputs go without --out: outside the source tree."""
    if os.environ.get("SOFTCAL_BENCH_OUT"):
        return Path(os.environ["SOFTCAL_BENCH_OUT"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "softcal" / "bench"


def _parser(prog: Optional[str], quick_default: bool) -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog=prog, description=doc[0], epilog="\n\n".join(doc[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--device", default="cpu", help="cpu or cuda (default: cpu)")
    add("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    add("--shapes", default=None, help="comma-separated NxC, e.g. 4096x32000 (default: per device)")
    add("--temperature", type=float, default=1.5)
    add("--smoothing", type=float, default=0.1)
    add("--min-time", "--budget", dest="min_time", type=float, default=None,
        help=f"seconds of measured time per case (default: {MIN_TIME['quick']} with --quick, "
             f"else CPU {MIN_TIME['cpu']}, CUDA {MIN_TIME['cuda']})")
    add("--out", default=None, help=f"output folder (default: {default_out()})")
    add("--tag", default=None, help="file name tag (default: quick with --quick, else bench)")
    add("--quick", action="store_true", default=quick_default,
        help="small shapes, one THP setting, no torch.compile" + (" (default)" if quick_default else ""))
    add("--full", dest="quick", action="store_false",
        help="the full benchmark" + ("" if quick_default else " (default)"))
    add("--bandwidth", type=float, default=None, help="copy bandwidth in GB/s, for %% of the bound")
    add("--thp", choices=["inherit", "0", "1", "both"], default=None,
        help=f"{THP_VAR}: inherit the environment, unset (0), 1, or both in two subprocesses "
             "(default: both for a full CPU run; inherit with --quick or on CUDA)")
    add("--impls", default=None, help="subset of: " + ",".join(SOFTCAL_IMPLS + BASELINES))
    add("--compile", dest="no_compile", action="store_false", default=None,
        help="include torch.compile (default except with --quick)")
    add("--no-compile", dest="no_compile", action="store_true", help="skip torch.compile")
    add("--no-plot", action="store_true", help="no PNG (benchmarks/bench_loss.py draws it)")
    add("--threads", type=int, default=None, help="torch threads on CPU (default: 1 with --quick)")
    add("--clock", choices=["wall", "cpu"], default=None,
        help="CPU timer: wall time or process CPU time (default: cpu when single-threaded)")
    add("--stat", choices=["min", "median"], default=None,
        help="the figure reported (default: min with --quick, else median)")
    add("--seed", type=int, default=0)
    add("--worker-json", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None, prog=None, quick_default=False) -> argparse.Namespace:
    p = _parser(prog, quick_default)
    a = p.parse_args(argv)
    if a.device not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {a.device!r}")
    a.thp = a.thp or ("both" if a.device == "cpu" and not a.quick else "inherit")
    a.no_compile = a.quick if a.no_compile is None else a.no_compile
    if a.threads is None and a.quick and a.device == "cpu":
        a.threads = 1
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    a.stat = a.stat or ("min" if a.quick else "median")
    a.clock = a.clock or ("cpu" if a.threads == 1 else "wall")
    a.min_time = MIN_TIME["quick" if a.quick else a.device] if a.min_time is None else a.min_time
    if not a.min_time >= 0:
        p.error(f"--min-time must be >= 0, got {a.min_time}")
    a.out = a.out or str(default_out())
    a.tag = a.tag or ("quick" if a.quick else "bench")
    a.shape_list = QUICK_SHAPES if a.quick else DEFAULT_SHAPES[a.device]
    if a.shapes:
        try:
            a.shape_list = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",")]
        except ValueError:
            p.error(f"--shapes must be NxC[,NxC...], got {a.shapes!r}")
        if any(len(s) != 2 or min(s) < 1 for s in a.shape_list):
            p.error(f"--shapes must be NxC with N, C >= 1, got {a.shapes!r}")
    a.dtype_list = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    if not a.dtype_list or set(a.dtype_list) - {"float16", "bfloat16", "float32", "float64"}:
        p.error(f"--dtypes must name float16, bfloat16, float32 or float64, got {a.dtypes!r}")
    a.impl_list = [i.strip() for i in a.impls.split(",")] if a.impls else list(SOFTCAL_IMPLS + BASELINES)
    if set(a.impl_list) - set(SOFTCAL_IMPLS + BASELINES):
        p.error(f"unknown --impls {sorted(set(a.impl_list) - set(SOFTCAL_IMPLS + BASELINES))}")
    if a.no_compile and "compile" in a.impl_list:
        a.impl_list.remove("compile")
    return a


# --------------------------------------------------------------------------- measuring
def _proc_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_extra_bytes(fn, prep, device: str) -> Optional[int]:
    """Peak memory one call of fn() adds (CUDA allocator, or the CPU's resident set); None
    where the CPU's peak cannot be reset (not Linux)."""
    import torch

    prep()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - base)
    try:  # writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        base = _proc_kb("VmRSS")
    except OSError:
        fn()
        return None
    fn()
    return max(0, _proc_kb("VmHWM") - base) * 1024


def measure(fn, prep, min_time: float, clock: str = "wall", refill: bool = False):
    """torch.utils.benchmark Measurement of fn() (seconds per call).

    Two warm-up calls (compiles, first touches), then Timer.blocked_autorange for at least
    ``min_time`` seconds, with prep() (which only drops the last gradient) inside the timed block.
    With ``refill`` (prep() restores an input that fn() overwrites, a copy as long as the call),
    prep() is the untimed setup of Timer.timeit(1) instead, repeated until ``min_time`` seconds
    are measured (at least 3 calls).
    """
    from torch.utils.benchmark import Measurement, Timer

    kw = {"timer": time.process_time} if clock == "cpu" else {}
    for _ in range(2):
        prep()
        fn()
    scope = {"fn": fn, "prep": prep}
    if not refill:
        return Timer("prep(); fn()", globals=scope, **kw).blocked_autorange(min_run_time=min_time)
    t = Timer("fn()", setup="prep()", globals=scope, **kw)
    runs = [t.timeit(1)]
    while len(runs) < 3 or sum(m.median for m in runs) < min_time:
        runs.append(t.timeit(1))
    return Measurement.merge(runs)[0]


# --------------------------------------------------------------------------- cases
def _liger():
    """Liger-Kernel's cross-entropy (x, y, label_smoothing) -> loss, or None."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception:  # noqa: BLE001  (any import failure: not available)
        return None
    return lambda x, y, label_smoothing=0.0: LigerCrossEntropyLoss(label_smoothing=label_smoothing)(x, y)


def build_case(impl: str, pas: str, x_src, y, T: float, eps: float, ctx: dict):
    """(fn, prep, refill, bytes per logit) of one case, or a string saying why it is skipped."""
    import torch
    import torch.nn.functional as F

    grad = pas == "fwd+bwd"
    fused = impl.startswith("softcal-fused")
    if fused and not grad:
        return "fused modes only differ from autograd mode with a gradient"
    if fused and ctx["backend"] != "extension":
        return "fused modes need the compiled extension"
    if impl == "compile" and ctx["compiled"] is None:
        return "torch.compile disabled"
    if impl.startswith("liger") and (ctx["liger"] is None or x_src.device.type != "cuda"):
        return "Liger-Kernel runs on CUDA only, when liger_kernel is importable"
    softcal, liger = ctx["softcal"], ctx["liger"]
    if impl == "liger-prescaled":
        x_src = x_src / T
    calls = {
        "softcal": lambda x: softcal.cross_entropy(x, y, temperature=T, label_smoothing=eps),
        "softcal-fused": lambda x: softcal.cross_entropy(x, y, temperature=T, label_smoothing=eps,
                                                         fused=True),
        "softcal-fused-inplace": lambda x: softcal.cross_entropy(
            x, y, temperature=T, label_smoothing=eps, fused=True, inplace=True),
        "eager": lambda x: F.cross_entropy(x / T, y, label_smoothing=eps),
        "compile": lambda x: ctx["compiled"](x, y),
        "liger": lambda x: liger(x / T, y, label_smoothing=eps),
        "liger-prescaled": lambda x: liger(x, y, label_smoothing=eps),
    }
    call = calls[impl]
    refill = impl in ("softcal-fused-inplace", "liger-prescaled")  # they overwrite their input
    x = x_src.clone() if refill else x_src
    if grad:
        x = x.detach().requires_grad_(True)

    def prep():
        if grad:
            x.grad = None
        if refill:
            with torch.no_grad():
                x.copy_(x_src)

    if grad:  # a non-leaf view of the logits, as a last layer's output would be
        def fn():
            call(x.view_as(x)).backward()
    else:
        def fn():
            with torch.no_grad():
                call(x)
    return fn, prep, refill, (2 if fused else 3) if grad else 1


def machine_info(args) -> dict:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host_cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), THP_VAR: os.environ.get(THP_VAR, "unset"),
            "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg()),
            "clock": "process CPU time" if args.clock == "cpu" and args.device == "cpu" else "wall time"}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, cuda=torch.version.cuda,
                    gpu_memory_GiB=round(props.total_memory / 2**30, 1))
    return info


def run_benchmark(args) -> tuple:
    """Every case in this process: (rows, machine info)."""
    import torch

    import softcal

    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    T, eps, device = args.temperature, args.smoothing, args.device
    info = machine_info(args)
    backend = info["softcal_backend"] = softcal.backend(device)
    ctx = {"softcal": softcal, "backend": backend, "compiled": None,
           "liger": _liger() if device == "cuda" else None}
    if "compile" in args.impl_list:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        ctx["compiled"] = torch.compile(
            lambda x, y: torch.nn.functional.cross_entropy(x / T, y, label_smoothing=eps), dynamic=False)
    if backend != "extension":
        print(f"NOTE: softcal.backend({device!r}) is {backend!r}: the softcal rows time the "
              "pure-PyTorch reference", flush=True)
    rows = []
    for dtype_name in args.dtype_list:
        dtype = getattr(torch, dtype_name)
        for N, C in args.shape_list:
            nbytes = N * C * dtype.itemsize
            x_src = (torch.randn(N, C, device=device) * 3).to(dtype)
            y = torch.randint(0, C, (N,), device=device)
            for pas in ("fwd", "fwd+bwd"):
                for impl in args.impl_list:
                    row = {"device": device, "thp": info[THP_VAR], "dtype": dtype_name, "N": N, "C": C,
                           "pass": pas, "impl": impl, "softcal_backend": backend}
                    case = build_case(impl, pas, x_src, y, T, eps, ctx)
                    if isinstance(case, str):
                        continue
                    fn, prep, refill, factor = case
                    try:
                        m = measure(fn, prep, args.min_time, args.clock, refill)
                        peak = peak_extra_bytes(fn, prep, device)
                        prep()
                    except Exception as exc:  # noqa: BLE001  (reported in the table; keep going)
                        row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                        rows.append(row)
                        print(f"{dtype_name} {N}x{C} {pas} {impl}: {row['status']}", flush=True)
                        continue
                    head = min(m.times) if args.stat == "min" else m.median
                    row.update(status="ok", stat=args.stat, ms=head * 1e3, median_ms=m.median * 1e3,
                               min_ms=min(m.times) * 1e3, spread_pct=100 * m.iqr / m.median,
                               reps=len(m.times) * m.number_per_run, measured_s=sum(m.raw_times),
                               bound_bytes=factor * nbytes, GBps=factor * nbytes / head / 1e9)
                    if args.bandwidth:
                        row["pct_of_bandwidth"] = 100 * row["GBps"] / args.bandwidth
                    if peak is not None:
                        row.update(peak_extra_MB=peak / 1e6, peak_extra_logits=peak / nbytes)
                    rows.append(row)
                    print(f"{dtype_name} {N}x{C} {pas:7s} {impl:22s} {args.stat} {row['ms']:9.3f} ms "
                          f"±{row['spread_pct']:4.1f}%  {row['GBps']:6.1f} GB/s", flush=True)
            del x_src, y
            gc.collect()
    for case in _by_case(rows).values():
        for impl, r in case.items():
            if impl.startswith("softcal"):
                for b in BASELINES:
                    if b in case:
                        r[f"speedup_vs_{b}"] = case[b]["ms"] / r["ms"]
    return rows, info


def _by_case(rows, passes=("fwd", "fwd+bwd")) -> dict:
    out = {}
    for r in rows:
        if r["status"] == "ok" and r["pass"] in passes:
            out.setdefault((r["thp"], r["dtype"], r["N"], r["C"], r["pass"]), {})[r["impl"]] = r
    return out


# --------------------------------------------------------------------------- outputs
def header_lines(infos: List[dict], command: str) -> List[str]:
    i = infos[0]
    machine = (f"{i['gpu']} ({i['gpu_memory_GiB']} GiB), CUDA {i['cuda']}, host " if "gpu" in i else "")
    return [f"command: `{command}`",
            f"machine: {machine}{i['host_cpu']}, {i['cores']} cores ({i['torch_threads']} torch threads), "
            f"{i['platform']}",
            f"versions: torch {i['torch']}, python {i['python']}, softcal backend {i['softcal_backend']}",
            f"date: {i['date']}; timing: torch.utils.benchmark, {i['clock']}",
            "runs: " + "; ".join(f"{THP_VAR}={j[THP_VAR]} (load average {j['loadavg']} at start)"
                                 for j in infos)]


def markdown(rows: List[dict], infos: List[dict], command: str) -> str:
    stat = next((r["stat"] for r in rows if r.get("stat")), "median")
    cols = ["shape", "dtype", "pass", "impl", THP_VAR, f"{stat} ms", "spread", "GB/s",
            "peak extra MB (x logits)", "vs eager", "vs compile"]
    lines = ["### softcal.cross_entropy benchmark", ""] + [f"- {l}" for l in header_lines(infos, command)]
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r['N']}x{r['C']}", r["dtype"], r["pass"], r["impl"], r["thp"]]
        if r["status"] != "ok":
            cells += [r["status"]] + [""] * (len(cols) - 6)
        else:
            mem = "-" if r.get("peak_extra_MB") is None else f"{r['peak_extra_MB']:.0f} ({r['peak_extra_logits']:.2f})"
            cells += [f"{r['ms']:.3g}", f"±{r['spread_pct']:.1f}%", f"{r['GBps']:.1f}", mem] + [
                f"{r[f'speedup_vs_{b}']:.2f}x" if r.get(f"speedup_vs_{b}") else "" for b in ("eager", "compile")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "GB/s counts the bytes that must move (fwd N*C*bytes, autograd fwd+bwd 3*N*C*bytes, "
              "fused 2*N*C*bytes); speed-ups are baseline / softcal in the same pass; spread is the "
              "interquartile range over the median."]
    return "\n".join(lines) + "\n"


def write_outputs(args, rows: List[dict], infos: List[dict], command: str) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{args.device}_{args.tag}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        f.writelines(f"# {l}\n" for l in header_lines(infos, command))
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    md = markdown(rows, infos, command)
    stem.with_suffix(".md").write_text(md)
    print("\n" + md + f"\nwrote {stem}.csv, {stem}.md", flush=True)
    return stem


# --------------------------------------------------------------------------- main
def main(argv=None, prog=None, quick_default=False) -> int:
    """Runs the benchmark; returns the exit status: 0, 2 for a bad option or device, 1 when a
    softcal case failed (the table says which)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "python -m softcal.bench"
    try:
        args = parse_args(argv, prog=prog, quick_default=quick_default)
    except SystemExit as e:  # --help (0) or a usage error (2, printed by argparse)
        return e.code if isinstance(e.code, int) else 2
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: error: --device cuda: no CUDA GPU is visible to torch {torch.__version__}",
              file=sys.stderr)
        return 2
    command = prog + ("" if not argv else " " + shlex.join(argv))
    if args.worker_json:  # a subprocess of --thp both / 0 / 1
        rows, info = run_benchmark(args)
        Path(args.worker_json).write_text(json.dumps({"rows": rows, "info": info}))
        return 0
    if args.thp == "inherit":
        rows, info = run_benchmark(args)
        infos = [info]
    else:
        import softcal

        rows, infos = [], []
        root = str(Path(softcal.__file__).resolve().parent.parent)  # the same softcal in the worker
        for s in (["0", "1"] if args.thp == "both" else [args.thp]):
            env = {k: v for k, v in os.environ.items() if k != THP_VAR}
            env.update({THP_VAR: "1"} if s == "1" else {})
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
            with tempfile.TemporaryDirectory() as tmp:
                js = os.path.join(tmp, "rows.json")
                cmd = [sys.executable, "-m", "softcal.bench", *argv, "--quick" if args.quick else "--full",
                       "--thp", "inherit", "--worker-json", js]
                print(f"=== {THP_VAR}={'1' if s == '1' else 'unset'}: {shlex.join(cmd)}", flush=True)
                rc = subprocess.call(cmd, env=env)
                if rc != 0:
                    print(f"{prog}: the worker for {THP_VAR}={s} failed (exit {rc})", file=sys.stderr)
                    return rc
                data = json.loads(Path(js).read_text())
            rows += data["rows"]
            infos.append(data["info"])
    write_outputs(args, rows, infos, command)
    failed = [r for r in rows if r["impl"].startswith("softcal") and r["status"] != "ok"]
    if failed:
        print(f"{prog}: {len(failed)} softcal case(s) failed (see the table)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
