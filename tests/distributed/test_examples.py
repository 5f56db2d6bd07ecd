"""examples/: the README's two torchrun commands run the example scripts as written (2 gloo ranks on
this CPU), from the repository's root, and the scripts print what docs/distributed.md says."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def _commands(page):
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        commands += [line.split("#")[0].strip() for line in block.splitlines()
                     if line.startswith("torchrun ")]
    return commands


@pytest.mark.parametrize("page", ["README.md", "docs/distributed.md"])
def test_pages_list_both_examples(page):
    commands = _commands(page)
    assert [c.split()[-1] for c in commands] == ["examples/vocab_parallel.py", "examples/calibrate_sharded.py"]
    assert all("--nproc-per-node 2" in c for c in commands)
    for c in commands:
        assert os.path.isfile(os.path.join(ROOT, c.split()[-1])), c


@pytest.mark.parametrize("name", ["vocab_parallel.py", "calibrate_sharded.py"])
def test_readme_torchrun_commands_run(name):
    cmd = next(c for c in _commands("README.md") if c.endswith(name)).split()
    assert cmd[0] == "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("SOFTCAL_EMULATE_CUDA", None)  # the scripts use the installed build as a user would
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run"] + cmd[1:], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout  # the two ranks' lines may interleave
    if name == "vocab_parallel.py":
        vals = re.findall(r"rank (\d): loss ([\d.]+), gathered logits ([\d.]+)", out)
        assert sorted(v[0] for v in vals) == ["0", "1"], out + proc.stderr
        for _, loss, full in vals:
            assert abs(float(loss) - float(full)) <= 2e-5, out
    else:
        found = re.findall(r"rank (\d): T = ([\d.]+) on (\d+) rows, ECE ([\d.]+)%", out)
        assert sorted(v[0] for v in found) == ["0", "1"], out + proc.stderr
        vals = [v[1:] for v in found]
        assert vals[0] == vals[1]          # the same T and ECE on both ranks
        assert vals[0][1] == "1001"        # the sampler's repeated row was dropped
        assert 0.2 < float(vals[0][0]) < 0.5   # the labels were drawn at T = 1/3
