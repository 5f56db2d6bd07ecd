"""The repository itself: test data with checksums and licences, the Makefile's rebuild rule."""

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import TEST_DATA

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(TEST_DATA)


def test_test_data_is_in_the_repository_with_checksums_and_licences():
    sums = (DATA / "SHA256SUMS").read_text().split("\n")
    entries = [line.split() for line in sums if line.strip()]
    assert len(entries) == 4
    for digest, rel in entries:
        path = DATA / rel
        assert path.is_file(), rel
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, rel
    total = sum((DATA / rel).stat().st_size for _, rel in entries)
    assert total < 6_000_000, f"tests/data grew to {total} bytes: keep the repository small"
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for _, rel in entries:
        assert Path(rel).name in readme, f"{rel} has no attribution in tests/data/logits/README.md"
    assert "Copyright (c) 2018 Markus Kängsepp" in (DATA / "markus93_NN_calibration" / "LICENSE-MIT.txt").read_text(encoding="utf-8")
    assert "Apache License" in (DATA / "netcal" / "LICENSE-Apache-2.0.txt").read_text(encoding="utf-8")


def test_no_test_reads_outside_the_repository():
    for path in (ROOT / "tests").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r'"\.\."\s*[,/]\s*"shared"|\.\./shared/', text), path.name


needs_source_tree = pytest.mark.skipif(
    not (ROOT / "Makefile").is_file() or not (ROOT / "setup.py").is_file() or shutil.which("make") is None,
    reason="the Makefile rule is checked in the source tree (not in an installed-wheel run)")


# What a parent make (`make test VENV=...`, `make -B test`) or the shell passes down: make's own
# flags and the Makefile's variables. The dry runs must see the Makefile's rule as written, so
# they run without them (a VENV from outside made `$(VENV)/.ready` a prerequisite that -o
# does not cover, and its `pip install` recipe looked like a rebuild).
_MAKE_ENV = ("MAKEFLAGS", "MFLAGS", "GNUMAKEFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "MAKEFILES",
             "VENV", "VPY", "PYTHON", "BUILD_STAMP", "EXT_SOURCES", "TORCH_SPEC", "DEPS")


def _dry_run(stamp, *extra):
    env = {k: v for k, v in os.environ.items() if k not in _MAKE_ENV}
    p = subprocess.run(["make", "-n", "VENV=.venv", f"BUILD_STAMP={stamp}", "-o", ".venv/.ready", *extra,
                        str(stamp)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return "pip install" in p.stdout


def _newest_source_ns():
    files = [p for p in (ROOT / "csrc").rglob("*") if p.is_file()] + [ROOT / "setup.py", ROOT / "pyproject.toml"]
    return max(p.stat().st_mtime_ns for p in files)


@needs_source_tree
def test_make_rebuilds_the_extension_only_when_a_source_changed(tmp_path):
    stamp = tmp_path / "stamp"
    assert _dry_run(stamp), "no stamp yet: the extension must be built"
    stamp.touch()
    t = _newest_source_ns() + 1_000_000_000  # made after the last change (not "now": a clock
    os.utime(stamp, ns=(t, t))                # behind the sources' file system is no change)
    assert not _dry_run(stamp), "nothing changed since the stamp: no rebuild"
    for changed in ("csrc/common.h", "csrc/cpu/cross_entropy.cpp", "setup.py", "pyproject.toml"):
        assert _dry_run(stamp, "-W", changed), f"{changed} changed: the extension must be rebuilt"
