"""The harness of the agreement tests (test_distributed_agreement.py, test_calibrators_agreement.py):
one spawn of ``world`` gloo ranks runs the named cases of a test module's ``CASES`` in turn. A
case is ``(fn, exception type or None, pattern)``: each rank calls ``fn(rank, world)``; then the
ranks compare the messages they raised (all_gather_object) and all-reduce a tensor of ones (the
group must still work). The whole spawn runs under a deadline, so a hang fails the test instead
of blocking the suite."""

from __future__ import annotations

import datetime
import importlib
import os
import re
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, init_file, module, names, out_dir, gloo_seconds, case_seconds):
    torch.set_num_threads(1)
    if os.environ.get("SOFTCAL_EMULATE_CUDA", "0") == "1":  # as tests/conftest.py does
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda_emu"))
        import emulator

        emulator.install()
    from softcal._teardown import release_group_references

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=gloo_seconds))
    cases = {fn.__name__: (fn, exc, pattern) for fn, exc, pattern in importlib.import_module(module).CASES}
    report = []
    try:
        for name in names:
            fn, exc_type, pattern = cases[name]
            t0 = time.perf_counter()
            try:
                fn(rank, world)
                outcome = "no error"
            except Exception as exc:  # noqa: BLE001 (compared below)
                outcome = f"{type(exc).__name__}: {exc}"
            seconds = time.perf_counter() - t0
            msgs = [None] * world
            dist.all_gather_object(msgs, outcome)        # the group still works ...
            ones = torch.ones(3)
            dist.all_reduce(ones)                        # ... and sums right
            problems = []
            want = "" if exc_type is None else exc_type.__name__ + ": "
            if not outcome.startswith(want) or not re.search(pattern, outcome):
                problems.append(f"expected {want or 'no error'} matching {pattern!r}, got {outcome!r}")
            if len(set(msgs)) != 1:
                problems.append(f"the ranks raised different errors: {msgs}")
            if seconds > case_seconds:
                problems.append(f"took {seconds:.1f} s")
            if ones.tolist() != [float(world)] * 3:
                problems.append(f"a later all_reduce gave {ones.tolist()}")
            report.append(f"{name}: " + ("ok" if not problems else "; ".join(problems)))
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(report))
        release_group_references()  # (no reference left to the group: softcal/_teardown.py)
        dist.destroy_process_group()


def run_cases(module, world, names, *, gloo_seconds, case_seconds, spawn_deadline):
    """Spawn ``world`` gloo ranks running the named cases of ``module``'s CASES; return each rank's
    report lines (``"<case>: ok"`` or what went wrong)."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.spawn(_entry, args=(world, os.path.join(tmp, "init"), module, names, tmp, gloo_seconds,
                                     case_seconds), nprocs=world, join=False)
        deadline = time.monotonic() + spawn_deadline
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                path = os.path.join(tmp, "rank0.txt")
                done = open(path).read() if os.path.exists(path) else "(no report)"
                pytest.fail(f"{world} ranks hung (deadline {spawn_deadline} s); report: {done}")
        return [open(os.path.join(tmp, f"rank{r}.txt")).read().splitlines() for r in range(world)]
