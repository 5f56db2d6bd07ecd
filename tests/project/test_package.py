"""The package namespace: softcal.distributed and softcal.plots load on first access (without
being imported by `import softcal`), and only softcal's own names are public."""

import subprocess
import sys
import types

import softcal


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_submodules_load_on_first_access():
    """After a plain `import softcal`, softcal.distributed and softcal.plots work (they raised
    AttributeError until imported by hand), and neither they nor matplotlib were imported by
    `import softcal` itself."""
    out = _run(
        "import sys, softcal\n"
        "before = sorted(m for m in ('softcal.distributed', 'softcal.plots', 'matplotlib') if m in sys.modules)\n"
        "print('before', before)\n"
        "print('distributed', softcal.distributed.vocab_parallel_cross_entropy.__module__)\n"
        "print('plots', softcal.plots.reliability_diagram.__module__)\n"
        "print('same', softcal.plots is sys.modules['softcal.plots'])\n"
    )
    assert "before []" in out
    assert "distributed softcal.distributed" in out
    assert "plots softcal.plots" in out
    assert "same True" in out


def test_from_softcal_import_the_submodules():
    out = _run("from softcal import distributed, plots; print(distributed.__name__, plots.__name__)")
    assert out.split() == ["softcal.distributed", "softcal.plots"]


def test_public_namespace_is_softcals_own():
    """softcal.Union and softcal.torch were public names; every public name is now in __all__
    or a submodule of softcal, and every name of __all__ resolves."""
    assert not hasattr(softcal, "Union")
    assert not hasattr(softcal, "torch")
    public = [n for n in dir(softcal) if not n.startswith("_")]
    for name in public:
        obj = getattr(softcal, name)
        is_submodule = isinstance(obj, types.ModuleType) and obj.__name__.startswith("softcal.")
        assert name in softcal.__all__ or is_submodule, name
    for name in softcal.__all__:
        assert getattr(softcal, name) is not None, name
    assert {"distributed", "plots"} <= set(dir(softcal))


def test_unknown_attribute_still_raises():
    try:
        softcal.no_such_thing
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("softcal.no_such_thing did not raise AttributeError")
