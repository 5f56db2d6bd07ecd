"""Benchmark softcal.cross_entropy against PyTorch eager, torch.compile and Liger-Kernel.

Reached as ``softcal bench`` (quick by default) and as ``python benchmarks/bench_loss.py`` (full by
default): one implementation, the same options and outputs.

Times the forward and the forward+backward of a temperature-scaled, label-smoothed cross-entropy
at a set of (N, C) shapes and dtypes, and reports for each case:

* the time of one call: the minimum (the default of --quick) or the median (the default of full
  runs; --stat chooses) over the reps, and the spread of the reps (interquartile range over the
  median). CPU: time.perf_counter around each rep, or the process's CPU time with --clock cpu
  (the default of single-threaded runs such as --quick), which other work on a busy or shared
  machine does not inflate; CUDA: CUDA events around each rep, with the L2 cache flushed and the
  GPU queue pre-filled before each rep, so that the events time the kernels and not the Python
  launch overhead. Each case is warmed up (at least 2 calls and 50 ms), then repeated until both
  --reps reps and --min-time seconds of measured time are reached, so that a short case gets
  hundreds of reps. On a busy machine the minimum is the stable figure (noise only adds time),
* the speed-up of softcal over each baseline,
* the achieved GB/s against the bytes that must move (forward: N*C*bytes read once; autograd
  forward+backward: 3*N*C*bytes, i.e. forward read + backward read + gradient write; fused:
  2*N*C*bytes, one read and one write), and the % of --bandwidth when given,
* the peak extra memory of one call (CUDA: torch.cuda.max_memory_allocated minus what was
  allocated before; CPU: growth of the peak RSS, VmHWM reset through /proc/self/clear_refs),
  in MB and in logits-sized buffers.

Implementations ("impl"):
  softcal                softcal.cross_entropy, autograd mode (forward saves the per-row lse)
  softcal-fused          fused=True: gradient computed in the forward, backward only rescales
  softcal-fused-inplace  fused=True, inplace=True: gradient written into the logits buffer
                         (the logits are refilled from a source copy before each rep, untimed)
  eager                  F.cross_entropy(x / T, y, label_smoothing=eps)
  compile                torch.compile of that same function (dynamic=False: one graph per shape)
  liger                  Liger-Kernel's cross entropy on x / T (CUDA only, when importable); the
                         division is timed, Liger overwrites the x / T temporary, not x
  liger-prescaled        Liger-Kernel on logits already divided by T, refilled from a source copy
                         before each rep (untimed): Liger's kernel alone, a lower bound

The fused modes only differ from autograd mode when a gradient is wanted, so they appear in the
fwd+bwd rows only. Forward rows run under torch.no_grad().

On CPU, PyTorch's time is dominated by page faults of fresh allocations unless transparent huge
pages are enabled for its allocator (THP_MEM_ALLOC_ENABLE=1, read when torch is imported).
--thp both (the CPU default) runs the benchmark twice in subprocesses, without and with that
variable, and merges the results.

Examples:
  softcal bench                                         # quick run: small shapes, 1 thread
  softcal bench --full --out results                    # full CPU run, both THP settings
  python benchmarks/bench_loss.py --quick               # the same quick run from a checkout
  python benchmarks/bench_loss.py --device cuda --bandwidth 4000

Writes <out>/<device>_<tag>.csv, .png and .md (tag: "bench", or "quick" with --quick) and prints
where they went. <out> defaults to a folder outside the source tree: $SOFTCAL_BENCH_OUT, else
$XDG_CACHE_HOME/softcal/bench (~/.cache/softcal/bench).
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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THP_VAR = "THP_MEM_ALLOC_ENABLE"

DEFAULT_SHAPES = {
    "cpu": [(4096, 32000), (8192, 50257), (512, 128256), (65536, 1000), (1_000_000, 10)],
    "cuda": [(4096, 32000), (8192, 50257), (16384, 131072), (4096, 256000), (1_000_000, 10)],
}
QUICK_SHAPES = [(256, 1000), (64, 32000), (20000, 10)]
MIN_TIME = {"quick": 0.5, "cpu": 2.0, "cuda": 1.0}  # seconds of measured time per case
WARMUP_S = 0.05

SOFTCAL_IMPLS = ("softcal", "softcal-fused", "softcal-fused-inplace")
BASELINES = ("eager", "compile", "liger", "liger-prescaled")
BYTES_PER_PASS = {"fwd": 1, "fwd+bwd": 3}
FIELDS = [
    "device", "thp", "dtype", "N", "C", "pass", "impl", "status", "stat", "ms", "median_ms", "min_ms", "p25_ms",
    "p75_ms", "spread_pct", "reps", "measured_s",
    "bound_bytes", "GBps", "pct_of_bandwidth", "peak_extra_MB", "peak_extra_logits",
    "speedup_vs_eager", "speedup_vs_compile", "speedup_vs_liger", "speedup_vs_liger-prescaled",
    "softcal_backend",
]


# --------------------------------------------------------------------------- arguments
class UsageError(Exception):
    """A bad option or a device that is not there: one line, exit status 2."""


def default_out() -> Path:
    """Where the outputs go without --out: outside the source tree."""
    env = os.environ.get("SOFTCAL_BENCH_OUT")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "softcal" / "bench"


def parser(prog=None, quick_default=False):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    p.add_argument("--shapes", default=None,
                   help="comma-separated NxC, e.g. 4096x32000,1000000x10 (default: per device)")
    p.add_argument("--temperature", type=float, default=1.5)
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--reps", type=int, default=5,
                   help="at least this many timed reps per case (default: 5; 3 when one call "
                        "takes over a second)")
    p.add_argument("--min-time", "--budget", dest="min_time", type=float, default=None,
                   help="and at least this many seconds of measured time per case (default: "
                        f"{MIN_TIME['quick']} with --quick, else CPU {MIN_TIME['cpu']}, "
                        f"CUDA {MIN_TIME['cuda']})")
    p.add_argument("--out", default=None,
                   help=f"output folder (default: {default_out()}, outside the source tree)")
    p.add_argument("--tag", default=None, help="file name tag (default: bench, or quick)")
    p.add_argument("--quick", action="store_true", default=quick_default,
                   help="small shapes, one THP setting, torch.compile skipped: a minute or two"
                        + (" (the default here)" if quick_default else ""))
    p.add_argument("--full", dest="quick", action="store_false",
                   help="the full benchmark (large shapes per device)"
                        + ("" if quick_default else " (the default here)"))
    p.add_argument("--bandwidth", type=float, default=None,
                   help="measured copy bandwidth in GB/s, to report %% of the bound")
    p.add_argument("--thp", choices=["inherit", "0", "1", "both"], default=None,
                   help=f"{THP_VAR} for the run: inherit the environment, unset (0), set to 1, "
                        "or both in two subprocesses (default: both for a full CPU run, else inherit)")
    p.add_argument("--impls", default=None,
                   help="comma-separated subset of: " + ",".join(SOFTCAL_IMPLS + BASELINES))
    p.add_argument("--compile", dest="no_compile", action="store_false", default=None,
                   help="include torch.compile (the default except with --quick)")
    p.add_argument("--no-compile", dest="no_compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads on CPU (default: 1 with --quick, where a shared or busy "
                        "machine makes multi-threaded timings of small shapes swing by 100x; "
                        "else torch's default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default=None,
                   help="CPU timing: wall time, or the process's CPU time, which other work on a "
                        "busy machine does not inflate (default: cpu when single-threaded, else wall)")
    p.add_argument("--stat", choices=["min", "median"], default=None,
                   help="the figure reported per case, from which the speed-ups and GB/s follow "
                        "(default: min with --quick, else median); both are in the CSV")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-json", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None, prog=None, quick_default=False):
    p = parser(prog, quick_default)
    a = p.parse_args(argv)
    if a.device not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda, got {a.device!r}")
    if a.thp is None:
        a.thp = "both" if a.device == "cpu" and not a.quick else "inherit"
    if a.no_compile is None:
        a.no_compile = a.quick
    if a.threads is None and a.quick and a.device == "cpu":
        a.threads = 1
    if a.threads is not None and a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if a.stat is None:
        a.stat = "min" if a.quick else "median"
    if a.clock is None:
        a.clock = "cpu" if a.threads == 1 else "wall"
    if a.reps < 1:
        p.error(f"--reps must be >= 1, got {a.reps}")
    if a.min_time is None:
        a.min_time = MIN_TIME["quick"] if a.quick else MIN_TIME[a.device]
    if not a.min_time >= 0:
        p.error(f"--min-time must be >= 0, got {a.min_time}")
    if a.out is None:
        a.out = str(default_out())
    if a.tag is None:
        a.tag = "quick" if a.quick else "bench"
    if a.shapes:
        try:
            a.shape_list = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",")]
        except ValueError:
            p.error(f"--shapes must be NxC[,NxC...], got {a.shapes!r}")
        if any(len(s) != 2 or min(s) < 1 for s in a.shape_list):
            p.error(f"--shapes must be NxC with N, C >= 1, got {a.shapes!r}")
    else:
        a.shape_list = QUICK_SHAPES if a.quick else DEFAULT_SHAPES[a.device]
    a.dtype_list = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    bad = [d for d in a.dtype_list if d not in ("float16", "bfloat16", "float32", "float64")]
    if bad or not a.dtype_list:
        p.error(f"--dtypes must name float16, bfloat16, float32 or float64, got {a.dtypes!r}")
    a.impl_list = list(SOFTCAL_IMPLS + BASELINES)
    if a.impls:
        a.impl_list = [i.strip() for i in a.impls.split(",")]
        bad = set(a.impl_list) - set(SOFTCAL_IMPLS + BASELINES)
        if bad:
            p.error(f"unknown --impls {sorted(bad)}")
    if a.no_compile and "compile" in a.impl_list:
        a.impl_list.remove("compile")
    return a


# --------------------------------------------------------------------------- machine facts
def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "")
    except OSError:
        pass
    return ""


def mem_available_bytes():
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_peak_supported():
    """True when writing 5 to /proc/self/clear_refs resets VmHWM (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") <= _status_kb("VmRSS") + 4096
    except OSError:
        return False


def machine_info(args):
    import torch

    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host_cpu": f"{cpu_model()} {cpu_flags()}".strip(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        THP_VAR: os.environ.get(THP_VAR, "unset"),
        "thp_sys": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "loadavg_start": _loadavg(),
    }
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["L2_MB"] = round(getattr(props, "L2_cache_size", 0) / 2**20, 1)
    return info


def _loadavg():
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _read(path):
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "n/a"


# --------------------------------------------------------------------------- timing
class Timing:
    """The measured times of one case (seconds)."""

    def __init__(self, times, peak):
        times = sorted(times)
        self.reps = len(times)
        self.total = sum(times)
        self.median = statistics.median(times)
        self.min = times[0]
        q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
        self.p25, self.p75 = q[0], q[2]
        self.spread = (self.p75 - self.p25) / self.median if self.median > 0 else 0.0
        self.peak = peak


def _enough(times, min_reps, min_time, cap=100_000):
    """Whether the reps so far reach both --reps and --min-time (or a hard cap of reps)."""
    return len(times) >= cap or (len(times) >= min_reps and sum(times) >= min_time)


def _warm_up(call, sync):
    """At least 2 calls and WARMUP_S seconds (compiles, first-touches, wakes the threads);
    returns the time of the last call."""
    t_start = time.perf_counter()
    n = 0
    while True:
        t0 = time.perf_counter()
        call()
        sync()
        dt = time.perf_counter() - t0
        n += 1
        if n >= 2 and time.perf_counter() - t_start >= WARMUP_S:
            return dt


class CpuTimer:
    device = "cpu"

    def __init__(self, clock="wall"):
        # "cpu": the process's CPU time (user + system), which a busy or shared machine does not
        # inflate when it schedules other work; equal to the wall time of a single-threaded run
        # on an idle machine. "wall": time.perf_counter (multi-threaded runs).
        self.clock = time.process_time if clock == "cpu" else time.perf_counter
        self.rss_ok = rss_peak_supported()
        try:
            import ctypes

            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.malloc_trim(0)
        except (OSError, AttributeError):
            self.libc = None

    def sync(self):
        pass

    def time(self, fn, prep, min_reps, min_time):
        """Timing of fn(); prep() runs untimed before each call.

        Warm-up (at least 2 calls and WARMUP_S), then one call outside the statistics measures the
        peak memory, then reps until both ``min_reps`` (3 when one call takes over a second) and
        ``min_time`` seconds of measured time are reached.
        """
        def call():
            prep()
            fn()

        _warm_up(call, self.sync)
        peak, t_one = self.peak_extra(fn, prep)
        if t_one > 1.0:
            min_reps = min(min_reps, 3)
        times = []
        clock = self.clock
        while not _enough(times, min_reps, min_time):
            prep()
            t0 = clock()
            fn()
            times.append(clock() - t0)
        return Timing(times, peak)

    def peak_extra(self, fn, prep):
        """(peak RSS growth in bytes or None, seconds) of one call of fn, after prep()."""
        prep()
        gc.collect()
        if self.rss_ok:
            # Return freed heap memory to the kernel, so that buffers below glibc's mmap
            # threshold (up to 32 MB) fault in again and show in the peak RSS.
            if self.libc is not None:
                self.libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _status_kb("VmRSS")
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if not self.rss_ok:
            return None, dt
        return max(0, _status_kb("VmHWM") - base) * 1024, dt


class CudaTimer:
    device = "cuda"

    def __init__(self):
        import torch

        self.torch = torch
        props = torch.cuda.get_device_properties(0)
        l2 = getattr(props, "L2_cache_size", 0) or 64 * 2**20
        # Writing twice the L2 size evicts the inputs of the previous rep.
        self.flush_buf = torch.empty(2 * l2 // 4 + 1024, dtype=torch.float32, device="cuda")

    def sync(self):
        self.torch.cuda.synchronize()

    def time(self, fn, prep, min_reps, min_time):
        """As CpuTimer.time, with CUDA events, in rounds of reps between synchronisations."""
        torch = self.torch

        def call():
            prep()
            fn()

        t_one = _warm_up(call, self.sync)
        if t_one > 1.0:
            min_reps = min(min_reps, 3)
        times = []
        while not _enough(times, min_reps, min_time):
            left = max(min_reps - len(times), int((min_time - sum(times)) / max(t_one, 1e-6)) + 1)
            k = max(1, min(left, 200))
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(k)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(k)]
            for i in range(k):
                prep()
                self.flush_buf.zero_()
                # Keep the GPU busy while Python enqueues the op, so that the events time the
                # kernels back to back (an op with a host sync still pays for it).
                torch.cuda._sleep(1_000_000)
                starts[i].record()
                fn()
                ends[i].record()
            torch.cuda.synchronize()
            times += [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
        return Timing(times, self.peak_extra(fn, prep))

    def peak_extra(self, fn, prep):
        torch = self.torch
        prep()
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - base)


# --------------------------------------------------------------------------- cases
def load_liger():
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy

        return liger_cross_entropy
    except Exception:  # noqa: BLE001  (any import failure means: not available)
        pass
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception:  # noqa: BLE001
        return None

    def liger_cross_entropy(x, y, label_smoothing=0.0):
        return LigerCrossEntropyLoss(label_smoothing=label_smoothing)(x, y)

    return liger_cross_entropy


def build_case(impl, pas, x_src, y, T, eps, ctx):
    """Returns (fn, prep, bound_factor) or a string saying why the case is skipped."""
    import torch
    import torch.nn.functional as F

    softcal = ctx["softcal"]
    grad = pas == "fwd+bwd"
    factor = BYTES_PER_PASS[pas]
    holder = {}

    if impl.startswith("softcal"):
        fused = impl != "softcal"
        inplace = impl == "softcal-fused-inplace"
        if fused and not grad:
            return "fused modes only differ from autograd mode with a gradient"
        if fused and ctx["backend"] != "extension":
            return "fused modes need the compiled extension (backend is the reference)"
        if fused:
            factor = 2

        def call(x):
            return softcal.cross_entropy(x, y, temperature=T, label_smoothing=eps, fused=fused,
                                         inplace=inplace)
    elif impl == "eager":
        def call(x):
            return F.cross_entropy(x / T, y, label_smoothing=eps)
    elif impl == "compile":
        if ctx["compiled"] is None:
            return "torch.compile disabled"
        compiled = ctx["compiled"]

        def call(x):
            return compiled(x, y)
    elif impl in ("liger", "liger-prescaled"):
        liger = ctx["liger"]
        if liger is None:
            return "liger_kernel not importable"
        if x_src.device.type != "cuda":
            return "Liger-Kernel runs on CUDA only"
        if impl == "liger":
            def call(x):
                return liger(x / T, y, label_smoothing=eps)
        else:
            x_src = x_src / T

            def call(x):
                return liger(x, y, label_smoothing=eps)
    else:
        raise ValueError(impl)

    # Inputs that the op overwrites get a fresh copy before each rep (untimed).
    refill = impl in ("softcal-fused-inplace", "liger-prescaled")
    x = x_src.clone() if refill else x_src
    if grad:
        x = x.detach().requires_grad_(True)
    holder["x"] = x

    def prep():
        if grad:
            x.grad = None
        if refill:
            with torch.no_grad():
                x.copy_(x_src)

    if grad:
        # The logits enter as a non-leaf, as the output of a last linear layer would: with a leaf,
        # AccumulateGrad copies a gradient that aliases its input (the in-place mode's).
        def fn():
            call(x.view_as(x)).backward()
    else:
        def fn():
            with torch.no_grad():
                call(x)
    return fn, prep, factor


def run_benchmark(args):
    """Runs every case in this process; returns (rows, info)."""
    import torch

    import softcal

    torch.manual_seed(args.seed)
    device = args.device
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    timer = CudaTimer() if device == "cuda" else CpuTimer(args.clock)
    info = machine_info(args)
    info["clock"] = ("CUDA events" if device == "cuda" else
                     "process CPU time" if args.clock == "cpu" else "wall time (perf_counter)")
    backend = softcal.backend(device)
    info["softcal_backend"] = backend
    info["rss_peak"] = "VmHWM via clear_refs" if device == "cpu" and timer.rss_ok else "n/a"
    T, eps = args.temperature, args.smoothing

    ctx = {"softcal": softcal, "backend": backend, "compiled": None, "liger": None}
    if "compile" in args.impl_list:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)

        def ref_fn(x, y):
            return torch.nn.functional.cross_entropy(x / T, y, label_smoothing=eps)

        ctx["compiled"] = torch.compile(ref_fn, dynamic=False)
    ligers = [i for i in args.impl_list if i.startswith("liger")]
    if ligers and device == "cuda":
        ctx["liger"] = load_liger()
        info["liger"] = _liger_version() if ctx["liger"] else "not installed"
    if ligers and ctx["liger"] is None:
        print(f"skip {', '.join(ligers)}: "
              + ("Liger-Kernel runs on CUDA only" if device != "cuda"
                 else "liger_kernel is not importable"), flush=True)
        args.impl_list = [i for i in args.impl_list if not i.startswith("liger")]
    if backend != "extension":
        print(f"NOTE: softcal.backend({device!r}) is {backend!r}: softcal rows time the pure-PyTorch "
              "reference, not the kernels", flush=True)

    rows = []
    for dtype_name in args.dtype_list:
        dtype = getattr(torch, dtype_name)
        elem = torch.empty((), dtype=dtype).element_size()
        for (N, C) in args.shape_list:
            nbytes = N * C * elem
            why = _no_room(device, nbytes, args)
            if why:
                print(f"skip {dtype_name} {N}x{C}: {why}", flush=True)
                for pas in ("fwd", "fwd+bwd"):
                    rows.append(_row(info, device, dtype_name, N, C, pas, "*", f"skipped: {why}",
                                     backend))
                continue
            x_src = (torch.randn(N, C, device=device, dtype=torch.float32) * 3).to(dtype)
            y = torch.randint(0, C, (N,), device=device)
            for pas in ("fwd", "fwd+bwd"):
                for impl in args.impl_list:
                    label = f"{dtype_name} {N}x{C} {pas:7s} {impl:22s}"
                    case = build_case(impl, pas, x_src, y, T, eps, ctx)
                    if isinstance(case, str):
                        if not (impl.startswith("softcal-fused") and pas == "fwd"):
                            print(f"{label} skipped: {case}", flush=True)
                        continue
                    fn, prep, factor = case
                    try:
                        tm = timer.time(fn, prep, args.reps, args.min_time)
                        prep()  # drop the last gradient
                    except Exception as exc:  # noqa: BLE001  (report, keep going)
                        msg = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                        print(f"{label} {msg}", flush=True)
                        rows.append(_row(info, device, dtype_name, N, C, pas, impl, msg, backend))
                        continue
                    finally:
                        del case
                    bound = factor * nbytes
                    r = _row(info, device, dtype_name, N, C, pas, impl, "ok", backend)
                    head = tm.min if args.stat == "min" else tm.median
                    r.update(stat=args.stat, ms=head * 1e3, median_ms=tm.median * 1e3,
                             min_ms=tm.min * 1e3, p25_ms=tm.p25 * 1e3, p75_ms=tm.p75 * 1e3,
                             spread_pct=100 * tm.spread, reps=tm.reps, measured_s=tm.total,
                             bound_bytes=bound, GBps=bound / head / 1e9)
                    if args.bandwidth:
                        r["pct_of_bandwidth"] = 100 * r["GBps"] / args.bandwidth
                    if tm.peak is not None:
                        r["peak_extra_MB"] = tm.peak / 1e6
                        r["peak_extra_logits"] = tm.peak / nbytes
                    rows.append(r)
                    print(f"{label} {args.stat} {head * 1e3:10.3f} ms (spread ±{100 * tm.spread:4.1f}%)  "
                          f"{r['GBps']:7.1f} GB/s  "
                          f"peak extra {_fmt(r.get('peak_extra_MB'), '.0f')} MB "
                          f"({_fmt(r.get('peak_extra_logits'), '.2f')} x logits)  reps {tm.reps}",
                          flush=True)
            del x_src, y
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    info["loadavg_end"] = _loadavg()
    return rows, info


def _liger_version():
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:  # noqa: BLE001
        return "installed"


def _no_room(device, nbytes, args):
    # Eager holds about three logits-sized buffers plus the gradient; the refilled cases hold a
    # source and a working copy. Ask for six logits-sized buffers of headroom.
    need = 6 * nbytes
    if device == "cpu":
        avail = mem_available_bytes()
    else:
        import torch

        avail = torch.cuda.mem_get_info()[0]
    if avail is not None and need > 0.9 * avail:
        return (f"needs about {need / 1e9:.1f} GB (6 logits-sized buffers), "
                f"{avail / 1e9:.1f} GB available")
    return None


def _row(info, device, dtype, N, C, pas, impl, status, backend):
    return {"device": device, "thp": info[THP_VAR], "dtype": dtype, "N": N, "C": C, "pass": pas,
            "impl": impl, "status": status, "softcal_backend": backend}


def add_speedups(rows):
    by_case = {}
    for r in rows:
        if r["status"] == "ok":
            by_case.setdefault((r["thp"], r["dtype"], r["N"], r["C"], r["pass"]), {})[r["impl"]] = r
    for case in by_case.values():
        for impl, r in case.items():
            if not impl.startswith("softcal"):
                continue
            for base in BASELINES:
                if base in case:
                    r[f"speedup_vs_{base}"] = case[base]["ms"] / r["ms"]


# --------------------------------------------------------------------------- output
def _fmt(v, spec):
    if v is None or v == "":
        return "-"
    return format(v, spec)


def header_lines(infos, command):
    info = infos[0]
    lines = [f"command: `{command}`"]
    if "gpu" in info:
        lines.append(f"machine: {info['gpu']} ({info['gpu_memory_GiB']} GiB, L2 {info['L2_MB']} MB), "
                     f"host {info['host_cpu']}, {info['cores']} cores; CUDA {info['cuda']}")
    else:
        lines.append(f"machine: {info['host_cpu']}, {info['cores']} cores "
                     f"({info['torch_threads']} torch threads), {info['platform']}")
    backends = sorted({i["softcal_backend"] for i in infos})
    lines.append(f"versions: torch {info['torch']}, python {info['python']}, softcal backend "
                 f"{' / '.join(backends)}"
                 + (f", liger-kernel {info['liger']}" if "liger" in info else ""))
    lines.append(f"date: {info['date']}")
    lines.append("env: " + "; ".join(
        f"{THP_VAR}={i[THP_VAR]} (softcal backend {i['softcal_backend']}, load average "
        f"{i['loadavg_start']} at start, {i.get('loadavg_end', '?')} at end)" for i in infos)
        + f"; kernel THP: {info['thp_sys']}")
    lines.append(f"peak memory: {'CUDA max_memory_allocated' if 'gpu' in info else 'RSS VmHWM growth'}")
    lines.append(f"timing: {info.get('clock', 'wall time')}")
    return lines


def summary_lines(rows):
    """softcal's forward+backward against PyTorch eager (and torch.compile), per case."""
    by = {}
    for r in rows:
        if r["status"] == "ok" and r["pass"] == "fwd+bwd":
            by.setdefault((r["thp"], r["dtype"], r["N"], r["C"]), {})[r["impl"]] = r
    out = []
    for (thp, dtype, n, c), case in by.items():
        base = case.get("eager")
        for impl in SOFTCAL_IMPLS:
            r = case.get(impl)
            if r is None:
                continue
            parts = [f"{impl} {_ms(r)}"]
            for b in ("eager", "compile"):
                if b in case and r.get(f"speedup_vs_{b}"):
                    parts.append(f"{r[f'speedup_vs_{b}']:.2f}x {b} ({_ms(case[b])})")
            if r.get("peak_extra_logits") is not None:
                mem = f"peak extra memory {r['peak_extra_logits']:.2f} x logits"
                if base is not None and base.get("peak_extra_logits") is not None:
                    mem += f" (eager {base['peak_extra_logits']:.2f})"
                parts.append(mem)
            thp_txt = f", {THP_VAR}={thp}" if len({k[0] for k in by}) > 1 else ""
            out.append(f"- {n}x{c} {dtype}{thp_txt}: " + ", ".join(parts))
    return out


def _ms(r):
    return f"{r['ms']:.3g} ms ±{r.get('spread_pct', 0):.0f}%"


def markdown(rows, infos, command, have_bw):
    stat = next((r["stat"] for r in rows if r.get("stat")), "median")
    lines = ["### softcal.cross_entropy benchmark", ""]
    lines += [f"- {l}" for l in header_lines(infos, command)]
    sl = summary_lines(rows)
    if sl:
        lines += ["", f"Forward + backward, {stat} time ± spread (interquartile range / median), "
                  "speed-up of softcal over each baseline:"] + sl
    for thp in sorted({r["thp"] for r in rows}, key=lambda t: (t != "unset", t)):
        lines += ["", f"#### {THP_VAR}={thp}" if len(infos) > 1 or thp != "unset" else "#### results", ""]
        cols = ["shape", "dtype", "pass", "impl", f"{stat} ms", "spread", "reps", "GB/s"]
        if have_bw:
            cols.append("% bw")
        cols += ["peak extra MB (x logits)", "vs eager", "vs compile"]
        has_liger = any(r.get("speedup_vs_liger") for r in rows)
        if has_liger:
            cols += ["vs liger", "vs liger-prescaled"]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
        for r in rows:
            if r["thp"] != thp:
                continue
            shape = f"{r['N']}x{r['C']}"
            if r["status"] != "ok":
                cells = [shape, r["dtype"], r["pass"], r["impl"], r["status"]] + [""] * (len(cols) - 5)
            else:
                cells = [shape, r["dtype"], r["pass"], r["impl"], _fmt(r["ms"], ".3g"),
                         f"±{r['spread_pct']:.1f}%", str(r["reps"]), _fmt(r["GBps"], ".1f")]
                if have_bw:
                    cells.append(_fmt(r.get("pct_of_bandwidth"), ".0f"))
                pm = r.get("peak_extra_MB")
                cells.append("-" if pm is None else f"{pm:.0f} ({r['peak_extra_logits']:.2f})")
                for b in ["eager", "compile"] + (["liger", "liger-prescaled"] if has_liger else []):
                    v = r.get(f"speedup_vs_{b}")
                    cells.append(f"{v:.2f}x" if v else "")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "GB/s counts the bytes that must move: fwd N*C*bytes, autograd fwd+bwd 3*N*C*bytes, "
              "fused modes 2*N*C*bytes; baselines are measured against the same autograd bound. "
              f"Speed-ups are baseline {stat} / softcal {stat} in the same pass. fwd+bwd passes a non-leaf "
              "view of the logits (as a last layer's output) and clears the gradient between reps. "
              "Each case is repeated until both the minimum number of reps and the minimum measured "
              "time are reached; spread is the interquartile range of the reps over their median. The minimum is the figure "
              "that a busy machine disturbs least (its noise only adds time); the median includes "
              "that noise."]
    return "\n".join(lines) + "\n"


def write_csv(path, rows, infos, command):
    with open(path, "w", newline="") as f:
        for l in header_lines(infos, command):
            f.write(f"# {l}\n")
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(path, rows, infos, command):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    panels = sorted(dict.fromkeys((r["thp"], r["dtype"]) for r in ok),
                    key=lambda p: p[0] != "unset")  # stable: dtypes in the order given
    passes = ["fwd", "fwd+bwd"]
    if not panels:
        return
    fig, axes = plt.subplots(len(passes), len(panels), figsize=(5.5 * len(panels), 8),
                             squeeze=False)
    impls = [i for i in SOFTCAL_IMPLS + BASELINES if any(r["impl"] == i for r in ok)]
    colors = dict(zip(SOFTCAL_IMPLS + BASELINES,
                      ["#1f77b4", "#17becf", "#2ca02c", "#d62728", "#ff7f0e", "#9467bd", "#8c564b"]))
    for j, (thp, dtype) in enumerate(panels):
        for i, pas in enumerate(passes):
            ax = axes[i][j]
            sel = [r for r in ok if r["thp"] == thp and r["dtype"] == dtype and r["pass"] == pas]
            shapes = sorted({(r["N"], r["C"]) for r in sel}, key=lambda s: -s[1])
            here = [m for m in impls if any(r["impl"] == m for r in sel)]
            width = 0.8 / max(1, len(here))
            for k, impl in enumerate(here):
                vals = []
                for s in shapes:
                    hit = [r for r in sel if r["impl"] == impl and (r["N"], r["C"]) == s]
                    vals.append(hit[0]["GBps"] if hit else 0)
                ax.bar([x + k * width for x in range(len(shapes))], vals, width, label=impl,
                       color=colors[impl])
            ax.set_xticks([x + width * (len(here) - 1) / 2 for x in range(len(shapes))])
            ax.set_xticklabels([f"{n}x{c}" for n, c in shapes], rotation=20, fontsize=8)
            ax.set_ylabel("GB/s (bytes that must move)")
            ax.set_title(f"{pas}, {dtype}, {THP_VAR}={thp}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    info = infos[0]
    machine = info.get("gpu") or f"{info['host_cpu']}, {info['cores']} cores"
    fig.suptitle(f"softcal.cross_entropy: {machine}; torch {info['torch']}, python "
                 f"{info['python']}; {info['date'][:10]}\n{command}", fontsize=9)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=colors[m], label=m) for m in impls], loc="lower center",
               ncol=len(impls), fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(args, rows, infos, command):
    add_speedups(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{args.device}_{args.tag}"
    md = markdown(rows, infos, command, bool(args.bandwidth))
    write_csv(stem.with_suffix(".csv"), rows, infos, command)
    stem.with_suffix(".md").write_text(md)
    if not args.no_plot:
        plot(stem.with_suffix(".png"), rows, infos, command)
    print()
    print(md)
    print(f"wrote {stem}.csv, {stem}.md" + ("" if args.no_plot else f", {stem}.png"))
    return stem


# --------------------------------------------------------------------------- main
def _check_device(device):
    import torch

    if device == "cuda":
        if torch.version.cuda is None:
            raise UsageError(f"--device cuda: this build of torch ({torch.__version__}) has no CUDA "
                             "support; use --device cpu, or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is "
                             "False); use --device cpu")


def main(argv=None, prog=None, quick_default=False):
    """Run the benchmark; returns the exit status (0 ok, 2 bad option or device, else the
    failing worker's status). ``prog`` names the command in the outputs ("softcal bench" or
    "python benchmarks/bench_loss.py"); ``quick_default`` makes --quick the default."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "python -m softcal.bench"
    try:
        args = parse_args(argv, prog=prog, quick_default=quick_default)
    except SystemExit as e:  # --help (0) or a usage error (2, printed by argparse)
        return e.code if isinstance(e.code, int) else 2
    command = prog + ("" if not argv else " " + shlex.join(argv))
    try:
        _check_device(args.device)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2

    if args.worker_json:  # a subprocess of --thp both / 0 / 1
        rows, info = run_benchmark(args)
        Path(args.worker_json).write_text(json.dumps({"rows": rows, "info": info}))
        return 0

    if args.thp == "inherit":
        rows, info = run_benchmark(args)
        write_outputs(args, rows, [info], command)
        return 0

    import softcal

    settings = ["0", "1"] if args.thp == "both" else [args.thp]
    rows, infos = [], []
    for s in settings:
        env = dict(os.environ)
        env.pop(THP_VAR, None)
        if s == "1":
            env[THP_VAR] = "1"
        # the worker imports the same softcal as this process, installed or not
        pkg_root = str(Path(softcal.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with tempfile.TemporaryDirectory() as tmp:
            js = os.path.join(tmp, "rows.json")
            cmd = [sys.executable, "-m", "softcal.bench", *argv,
                   "--quick" if args.quick else "--full", "--thp", "inherit", "--worker-json", js]
            print(f"=== {THP_VAR}={'1' if s == '1' else 'unset'}: {shlex.join(cmd)}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call(cmd, env=env)
            if rc != 0:
                print(f"{prog}: the worker for {THP_VAR}={s} failed with exit code {rc}",
                      file=sys.stderr)
                return rc
            data = json.loads(Path(js).read_text())
            print(f"=== done in {time.perf_counter() - t0:.0f} s", flush=True)
        rows += data["rows"]
        infos.append(data["info"])
    write_outputs(args, rows, infos, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
