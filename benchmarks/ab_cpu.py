#!/usr/bin/env python
"""A/B timing of softcal.cross_entropy on the CPU: two builds of the extension, alternating runs.

Times the forward (under no_grad), autograd forward+backward and fused=True forward+backward of
softcal.cross_entropy(x, t, temperature=1.5, label_smoothing=0.1) (mean) at the given shapes,
bfloat16 and float32 (and, with --temperature-grad, a temperature tensor that requires grad,
with --weights, class weights). Two builds cannot be loaded in one process (they define the same
ops), so each round runs one worker process per build, alternately (A, B, A, B, ...), each
importing softcal from its build's directory (PYTHONPATH; the directory holds softcal/ with its
compiled _C*.so). Per case: the best and the median over the rounds of each round's minimum
of --reps timed calls (after one warm-up), in ms, and B / A. On a loaded machine wall times
vary 2x between rounds: there, time one thread's CPU time (--threads 1 --clock cpu), which other
processes do not inflate, and read the ratio of the medians of alternating runs; the load
average is printed per round.

    python benchmarks/ab_cpu.py --a /tmp/main_copy --b . --rounds 5 1000000x10,1000000x100
    python benchmarks/ab_cpu.py --a /tmp/main_copy --b . --threads 1 --clock cpu 1000000x100
    python benchmarks/ab_cpu.py --worker 1000000x10     # one build, as imported (old usage)

Writes a CSV (--csv) with the command, machine, versions and every round's minima.
Not part of the test suite.
"""

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def _cases(shapes):
    for shape in shapes.split(","):
        for dt in ("bfloat16", "float32"):
            for name in ("fwd", "fwd+bwd", "fused"):
                yield shape, dt, name


def worker(a) -> None:
    """Times every case with the softcal that this process imports; one JSON line per case."""
    import torch

    import softcal

    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.thread_time if a.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    for shape in a.shapes.split(","):
        n, c = map(int, shape.split("x"))
        for dt_name in ("bfloat16", "float32"):
            dt = getattr(torch, dt_name)
            x0 = torch.randn(n, c, dtype=dt)
            t = torch.randint(0, c, (n,))
            w = torch.rand(c, dtype=dt) + 0.5 if a.weights else None
            T0 = torch.tensor(1.5, requires_grad=True) if a.temperature_grad else 1.5

            def fwd():
                with torch.no_grad():
                    softcal.cross_entropy(x0, t, temperature=T0, label_smoothing=0.1, weight=w)

            def fwd_bwd(fused=False):
                x = x0.detach().requires_grad_()
                softcal.cross_entropy(x, t, temperature=T0, label_smoothing=0.1, weight=w,
                                      fused=fused).backward()

            for name, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd), ("fused", lambda: fwd_bwd(True))):
                f()
                ts = []
                for _ in range(a.reps):
                    s = clock()
                    f()
                    ts.append(clock() - s)
                print(json.dumps({"case": [shape, dt_name, name], "min_ms": min(ts) * 1e3,
                                  "softcal": os.path.dirname(softcal.__file__)}), flush=True)


def _run_worker(path, a):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--reps", str(a.reps),
           "--threads", str(a.threads), "--clock", a.clock, a.shapes]
    if a.temperature_grad:
        cmd.append("--temperature-grad")
    if a.weights:
        cmd.append("--weights")
    out = subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    where = {r["softcal"] for r in rows}
    if where != {os.path.join(os.path.abspath(path), "softcal")}:
        raise SystemExit(f"ab_cpu: the worker for {path} imported softcal from {where}")
    return {tuple(r["case"]): r["min_ms"] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shapes", help="comma-separated NxC, e.g. 1000000x10,65536x1000")
    ap.add_argument("--reps", type=int, default=7, help="timed calls per case and round")
    ap.add_argument("--a", help="directory of build A (the baseline): holds softcal/")
    ap.add_argument("--b", help="directory of build B")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (A then B)")
    ap.add_argument("--temperature-grad", action="store_true",
                    help="a temperature tensor that requires grad (the dL/dT paths)")
    ap.add_argument("--weights", action="store_true", help="class weights")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: time.perf_counter; cpu: the calling thread's CPU time (with "
                         "--threads 1 the kernels run on it: robust on a loaded machine)")
    ap.add_argument("--csv", default=None, help="write the rounds' minima here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker or not (a.a and a.b):
        if not a.worker:
            import softcal
            print(f"softcal from {os.path.dirname(softcal.__file__)}, load {os.getloadavg()}")
        worker(a)
        return
    runs = {"A": [], "B": []}
    for r in range(a.rounds):
        for key, path in (("A", a.a), ("B", a.b)):
            load = os.getloadavg()[0]
            runs[key].append(_run_worker(path, a))
            print(f"round {r + 1}/{a.rounds} {key} done (load average {load:.1f})", flush=True)
    print(f"\nA = {os.path.abspath(a.a)}\nB = {os.path.abspath(a.b)}\n"
          f"{a.rounds} alternating rounds, best of {a.reps} per round, ms; "
          f"{platform.processor() or platform.machine()}, load average now {os.getloadavg()}")
    print(f"{'case':32s} {'A best':>9s} {'B best':>9s} {'A median':>9s} {'B median':>9s} "
          f"{'B/A med':>8s}")
    table = []
    for case in _cases(a.shapes):
        ra = [run[case] for run in runs["A"]]
        rb = [run[case] for run in runs["B"]]
        ratio = statistics.median(rb) / statistics.median(ra)
        table.append((case, ra, rb))
        print(f"{' '.join(case):32s} {min(ra):9.2f} {min(rb):9.2f} {statistics.median(ra):9.2f} "
              f"{statistics.median(rb):9.2f} {ratio:8.3f}")
    if a.csv:
        import torch
        with open(a.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([f"# {' '.join(sys.argv)}"])
            w.writerow([f"# {platform.node()} {platform.processor() or platform.machine()} "
                        f"{os.cpu_count()} CPUs, torch {torch.__version__}, python "
                        f"{platform.python_version()}"])
            w.writerow(["shape", "dtype", "pass", "build", "round", "min_ms"])
            for case, ra, rb in table:
                for key, vals in (("A", ra), ("B", rb)):
                    for i, v in enumerate(vals):
                        w.writerow(list(case) + [key, i + 1, f"{v:.3f}"])
        print(f"wrote {a.csv}")


if __name__ == "__main__":
    main()
