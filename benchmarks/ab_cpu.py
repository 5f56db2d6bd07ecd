#!/usr/bin/env python
"""A/B timing of softcal.cross_entropy on the CPU, for comparing two builds of the extension.

Times the forward (under no_grad), autograd forward+backward and fused=True forward+backward of
softcal.cross_entropy(x, t, temperature=1.5, label_smoothing=0.1) (mean) at the given shapes,
bfloat16 and float32: best and median of --reps after one warm-up, in ms. Two builds cannot be
loaded in one process (they define the same ops), so run it alternately, e.g. with an older
build's package directory first on PYTHONPATH (run from outside the repository, so that the
current directory does not shadow it):

    cd /tmp && PYTHONPATH=/path/to/old_copy python /path/to/ab_cpu.py 1000000x10,1000000x100
    cd /tmp && python /path/to/ab_cpu.py 1000000x10,1000000x100

Prints the softcal package path and the load average, so that each run says what it measured.
Not part of the test suite.
"""

import argparse
import os
import time

import torch

import softcal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shapes", help="comma-separated NxC, e.g. 1000000x10,65536x1000")
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    print(f"softcal from {os.path.dirname(softcal.__file__)}, load average {os.getloadavg()}")
    torch.manual_seed(0)
    for shape in a.shapes.split(","):
        n, c = map(int, shape.split("x"))
        for dt in (torch.bfloat16, torch.float32):
            x0 = torch.randn(n, c, dtype=dt)
            t = torch.randint(0, c, (n,))

            def fwd():
                with torch.no_grad():
                    softcal.cross_entropy(x0, t, temperature=1.5, label_smoothing=0.1)

            def fwd_bwd(fused=False):
                x = x0.detach().requires_grad_()
                softcal.cross_entropy(x, t, temperature=1.5, label_smoothing=0.1,
                                      fused=fused).backward()

            for name, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd),
                            ("fused", lambda: fwd_bwd(True))):
                f()
                ts = []
                for _ in range(a.reps):
                    s = time.perf_counter()
                    f()
                    ts.append(time.perf_counter() - s)
                ts.sort()
                print(f"{shape} {str(dt)[6:]:9s} {name:8s} min {ts[0] * 1e3:8.2f} "
                      f"median {ts[len(ts) // 2] * 1e3:8.2f} ms", flush=True)


if __name__ == "__main__":
    main()
