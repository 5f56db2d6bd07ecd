"""CPU timing of cross-entropy with class-probability targets: softcal's kernels against PyTorch
eager (F.cross_entropy with probability targets), forward + backward of logits and target.

    python benchmarks/bench_soft_targets.py [--threads N] [--reps R]

Prints the minimum and median over R repetitions (after 3 warm-ups) per shape and dtype. Not part
of the test suite; figures depend on the machine and its load.
"""
import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import softcal


def bench(fn, reps):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, softcal {softcal.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, {args.reps} reps")
    print(f"{'shape':>14} {'dtype':>9} {'softcal min/med ms':>20} {'torch min/med ms':>18} {'speed-up (min)':>15}")
    for shape in ((4096, 1000), (256, 32000)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, dtype=dtype, requires_grad=True)
            t = torch.softmax(torch.randn(shape), 1).to(dtype).requires_grad_()

            def ours():
                loss = softcal.cross_entropy(x, t, label_smoothing=0.1)
                torch.autograd.grad(loss, (x, t))

            def theirs():
                loss = F.cross_entropy(x, t, label_smoothing=0.1)
                torch.autograd.grad(loss, (x, t))

            a, b = bench(ours, args.reps), bench(theirs, args.reps)
            print(f"{str(shape):>14} {str(dtype)[6:]:>9} {a[0]*1e3:9.2f}/{a[1]*1e3:<9.2f} "
                  f"{b[0]*1e3:8.2f}/{b[1]*1e3:<8.2f} {b[0]/a[0]:14.2f}x")


if __name__ == "__main__":
    main()
