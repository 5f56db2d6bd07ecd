#!/usr/bin/env python
"""Benchmarks of softcal.distributed on the CPU (gloo). Not part of the test suite.

Two parts (both by default; ``--part loss`` or ``--part fit-stream`` for one):

loss        For 2 and 4 gloo ranks (``--world``), each holding an (N, C / world) slice of
            float32 logits (the vocabulary split evenly; the last rank takes the remainder),
            time per call of forward + backward (label smoothing 0.1, temperature 1.5, mean):
              softcal          vocab_parallel_cross_entropy(slice, target, ...)
              softcal-fused    the same with fused=True
              gather+torch     all-gather the slices (differentiably for this rank's slice),
                               torch.nn.functional.cross_entropy(full / T, ...) on every rank
            and the bytes each rank hands to collectives per row (all-reduce: the tensor; all-gather:
            the gathered output), counted by wrapping torch.distributed's collectives.
            Time: median over --repeats calls after 2 warm-up calls, each call between barriers,
            the slowest rank's time per call.

fit-stream  One process: TemperatureScaler().fit over a stream of --rows x --classes float32
            logits made chunk by chunk (--chunk rows; a seeded synthetic overconfident
            classifier, the same chunk content on every pass), so that memory is bounded by two
            chunks (the random base the chunks are made from, and the chunk being read)
            whatever --rows is. Reports rows per second of the whole fit (passes x
            rows / time) with the time split between making the chunks and the statistics, the
            peak resident memory above the start, and the size of one chunk.

Usage:
  python benchmarks/bench_distributed.py                                  # both parts, short
  python benchmarks/bench_distributed.py --part loss --rows 2048 --classes 32000
  python benchmarks/bench_distributed.py --part fit-stream --rows 10000000 --classes 1000
  --out DIR writes bench_distributed_loss.csv / bench_distributed_fit.csv there (default: no file).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import softcal  # noqa: E402


def header(args) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    kernels = {op: softcal._ops.has_kernel("cpu", op)
               for op in ("shard_stats", "shard_grad")}
    return "\n".join([
        f"command: python {shlex.join(sys.argv)}",
        f"date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"machine: {cpu}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f}",
        f"versions: python {platform.python_version()}, torch {torch.__version__}, softcal "
        f"{softcal.__version__}",
        "local work of the vocabulary-parallel loss: "
        + ", ".join(f"{k} {'compiled kernel' if v else 'pure-PyTorch reference'}"
                    for k, v in kernels.items()),
    ])


# ---------------------------------------------------------------------- loss
def _loss_worker(rank, world, args, init_file, out_file):
    import torch.distributed as dist
    import torch.nn.functional as F

    from softcal.distributed import vocab_parallel_cross_entropy

    torch.set_num_threads(max(1, args.threads))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    n, c = args.rows, args.classes
    cuts = [c * r // world for r in range(world + 1)]
    width = cuts[rank + 1] - cuts[rank]
    g = torch.Generator().manual_seed(rank)
    local = torch.randn(n, width, generator=g) * 3
    target = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(123))
    widths = [cuts[r + 1] - cuts[r] for r in range(world)]

    sent = [0]
    real_ar, real_ag = dist.all_reduce, dist.all_gather

    def ar(t, *a, **k):
        sent[0] += t.numel() * t.element_size()
        return real_ar(t, *a, **k)

    def ag(outs, t, *a, **k):
        sent[0] += sum(o.numel() * o.element_size() for o in outs)
        return real_ag(outs, t, *a, **k)

    dist.all_reduce, dist.all_gather = ar, ag

    def softcal_call(fused):
        def call():
            x = local.clone().requires_grad_()
            loss = vocab_parallel_cross_entropy(x, target, label_smoothing=0.1, temperature=1.5,
                                                fused=fused, class_offset=cuts[rank],
                                                num_classes=c)
            loss.backward()
            return loss
        return call

    def gather_call():
        x = local.clone().requires_grad_()
        parts = [torch.empty(n, w) for w in widths]
        dist.all_gather(parts, x.detach())
        parts[rank] = x
        full = torch.cat(parts, 1)
        loss = F.cross_entropy(full / 1.5, target, label_smoothing=0.1)
        loss.backward()
        return loss

    rows = []
    for name, fn in (("softcal", softcal_call(False)), ("softcal-fused", softcal_call(True)),
                     ("gather+torch", gather_call)):
        losses = []
        for _ in range(2):
            losses.append(float(fn().detach()))
        times = []
        sent[0] = 0
        for _ in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            real_ar(t, op=dist.ReduceOp.MAX)   # the slowest rank's time
            times.append(float(t))
        rows.append(dict(world=world, rows=n, classes=c, method=name,
                         ms_per_call=1e3 * statistics.median(times),
                         ms_min=1e3 * min(times), ms_max=1e3 * max(times),
                         bytes_per_row=sent[0] / args.repeats / n, loss=losses[-1]))
    dist.all_reduce, dist.all_gather = real_ar, real_ag
    if rank == 0:
        torch.save(rows, out_file)
    dist.destroy_process_group()


def bench_loss(args):
    import torch.multiprocessing as mp

    results = []
    for world in args.world:
        with tempfile.TemporaryDirectory() as tmp:
            out_file = os.path.join(tmp, "rows.pt")
            mp.spawn(_loss_worker, args=(world, args, os.path.join(tmp, "init"), out_file),
                     nprocs=world, join=True)
            results += torch.load(out_file)
    print(f"\nvocabulary-parallel loss, float32 logits {args.rows} x {args.classes} split over "
          f"the ranks, forward + backward, eps 0.1, T 1.5, mean ({args.repeats} calls, median)")
    print(f"{'ranks':>5} {'method':<14} {'ms/call':>9} {'min':>8} {'max':>8} "
          f"{'bytes/row/rank':>15} {'loss':>10}")
    for r in results:
        print(f"{r['world']:>5} {r['method']:<14} {r['ms_per_call']:>9.2f} {r['ms_min']:>8.2f} "
              f"{r['ms_max']:>8.2f} {r['bytes_per_row']:>15.1f} {r['loss']:>10.6f}")
    return results


# ---------------------------------------------------------------------- streamed fit
def bench_fit_stream(args):
    from softcal.nn import TemperatureScaler

    torch.set_num_threads(max(1, args.threads))
    n, c, chunk = args.rows, args.classes, args.chunk
    n_chunks = (n + chunk - 1) // chunk
    make_time = [0.0]
    passes = [0]

    # The chunks are made cheaply from one random base chunk (a new row order, new labels and
    # the label's margin per chunk), so that the time goes to the fit, not to the random numbers;
    # memory: the base and the chunk being read, two chunks in all.
    base = torch.randn(chunk, c, generator=torch.Generator().manual_seed(0)).mul_(4.0)

    def chunks():
        passes[0] += 1
        for k in range(n_chunks):
            t0 = time.perf_counter()
            rows = min(chunk, n - k * chunk)
            g = torch.Generator().manual_seed(k)
            y = torch.randint(0, c, (rows,), generator=g)
            x = base[:rows].roll(k % rows, 0)
            x[torch.arange(rows), y] += 8.0    # the label's score is higher; scores x4 (T > 1)
            make_time[0] += time.perf_counter() - t0
            yield x, y
            del x, y

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = TemperatureScaler().fit(chunks, progress=False)
    wall = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row_passes = passes[0] * n
    out = dict(rows=n, classes=c, chunk_rows=chunk, chunk_mb=chunk * c * 4 / 2**20,
               passes=passes[0], temperature=r.temperature, converged=r.converged,
               wall_s=wall, make_s=make_time[0], stats_s=wall - make_time[0],
               rows_per_s=row_passes / wall, stats_rows_per_s=row_passes / (wall - make_time[0]),
               peak_rss_above_start_mb=rss1 - rss0, threads=torch.get_num_threads())
    print(f"\nstreamed fit: {n} x {c} float32 logits in chunks of {chunk} rows "
          f"({out['chunk_mb']:.1f} MiB each), {torch.get_num_threads()} threads")
    print(f"  T = {r.temperature:.6f}, {passes[0]} passes, converged {r.converged}")
    print(f"  wall {wall:.1f} s = making chunks {make_time[0]:.1f} s + statistics "
          f"{wall - make_time[0]:.1f} s")
    print(f"  rows/s (all passes, whole fit): {out['rows_per_s']:.3g};  statistics only: "
          f"{out['stats_rows_per_s']:.3g}")
    print(f"  peak resident memory above the start: {out['peak_rss_above_start_mb']:.0f} MiB "
          f"(one chunk: {out['chunk_mb']:.0f} MiB, two are held; data streamed: {n * c * 4 / 2**30:.1f} GiB "
          f"per pass)")
    return [out]


def write_csv(rows, path):
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["all", "loss", "fit-stream"], default="all")
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--rows", type=int, default=None,
                   help="loss: rows per call (default 1024); fit-stream: rows in the stream "
                        "(default 1,000,000; the issue's size is 10,000,000)")
    p.add_argument("--classes", type=int, default=None,
                   help="loss: the global vocabulary (default 32000); fit-stream: default 1000")
    p.add_argument("--chunk", type=int, default=16384, help="fit-stream: rows per chunk")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", default=None, help="directory for the CSV files (default: none)")
    args = p.parse_args()
    print(header(args))
    parts = ["loss", "fit-stream"] if args.part == "all" else [args.part]
    for part in parts:
        a = argparse.Namespace(**vars(args))
        if part == "loss":
            a.rows = args.rows or 1024
            a.classes = args.classes or 32000
            rows = bench_loss(a)
            name = "bench_distributed_loss.csv"
        else:
            a.rows = args.rows or 1_000_000
            a.classes = args.classes or 1000
            rows = bench_fit_stream(a)
            name = "bench_distributed_fit.csv"
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            write_csv(rows, os.path.join(args.out, name))


if __name__ == "__main__":
    main()
