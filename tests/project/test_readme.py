"""README.md and docs/: their python examples run as written, the README stays short, and
docs/api.md is in sync with the docstrings of softcal.metrics and softcal.plots
(tests/api_reference.py)."""

import re
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]  # tests/
README = HERE.parent / "README.md"
sys.path.insert(0, str(HERE))
import api_reference  # noqa: E402


def python_blocks(text: str):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """Every ```python block of README.md, in order, in one namespace (as a reader would paste
    them into one session), in an empty directory."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 2, "README.md lost its examples"
    text = "\n".join(blocks)
    for needed in ("opt.step()", "DataLoader", "TemperatureScaler", "metrics.", "reliability_diagram"):
        assert needed in text, f"the README examples no longer show {needed}"
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), ns)
    # what the examples claim
    import softcal
    import torch

    assert softcal.backend("cpu") in ("extension", "reference")
    assert ns["result"].converged and ns["result"].nll_after <= ns["result"].nll_before
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    torch.testing.assert_close(ns["calibrated"], ns["test_logits"] / ns["result"].temperature)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_api_reference_is_in_sync():
    """Regenerate with: python tests/api_reference.py --write"""
    text = api_reference.TARGET.read_text(encoding="utf-8")
    section = api_reference.current(text)
    assert section, "docs/api.md has no API reference markers"
    assert section == api_reference.generate(), (
        "docs/api.md differs from the docstrings: run python tests/api_reference.py --write")


def test_readme_is_short_and_its_links_exist():
    """A newcomer reads the README in ten minutes: at most 350 lines; every relative link in it
    and in docs/ names a file of the repository."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 350, len(text.splitlines())
    for page in [README, *sorted((README.parent / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:\s]+)\)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


DOC_PAGES = sorted(p.name for p in (README.parent / "docs").glob("*.md")
                   if python_blocks(p.read_text(encoding="utf-8")))


def test_docs_with_examples():
    assert "loss.md" in DOC_PAGES, DOC_PAGES   # the class-probability targets' example


@pytest.mark.parametrize("page", DOC_PAGES)
def test_docs_python_examples_run(tmp_path, monkeypatch, page):
    """Every ```python block of a docs/ page, in order, in one namespace."""
    path = README.parent / "docs" / page
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    assert blocks
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/{page} python block {i + 1}", "exec"), ns)


def test_api_reference_covers_every_public_name():
    import softcal.metrics
    import softcal.plots

    section = api_reference.generate()
    for mod in (softcal.metrics, softcal.plots):
        for name in mod.__all__:
            assert f"`{mod.__name__}.{name}" in section, name
