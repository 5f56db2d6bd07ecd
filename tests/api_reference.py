"""docs/api.md: the API reference of softcal.metrics and softcal.plots, generated from the docstrings.

    python tests/api_reference.py           # print the section
    python tests/api_reference.py --write   # replace it in docs/api.md, between the markers

tests/project/test_readme.py checks that docs/api.md holds exactly what this script generates, so a changed
docstring or signature fails the tests until the reference is regenerated with --write.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import List

BEGIN = ("<!-- api-reference: generated from the docstrings by `python tests/api_reference.py "
         "--write`; do not edit by hand -->")
END = "<!-- api-reference: end -->"
TARGET = Path(__file__).resolve().parents[1] / "docs" / "api.md"
MODULES = ("softcal.metrics", "softcal.plots")


def _signature(obj) -> str:
    """name(a, b=1, *, c=None): parameters and defaults, without the annotations."""
    parts: List[str] = []
    star_done = False
    for p in inspect.signature(obj).parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star_done = True
            continue
        if p.kind == p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
            continue
        if p.kind == p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return f"({', '.join(parts)})"


def _fenced(doc: str) -> List[str]:
    return ["```text", *doc.rstrip().splitlines(), "```", ""]


def generate() -> str:
    """The whole section, markers included."""
    import importlib

    lines = [BEGIN, "## API reference: `softcal.metrics` and `softcal.plots`", ""]
    for modname in MODULES:
        mod = importlib.import_module(modname)
        lines += [f"### `{modname}`", ""]
        lines += _fenced(inspect.getdoc(mod) or "")
        seen = {}
        for name in mod.__all__:
            obj = getattr(mod, name)
            if id(obj) in seen:  # an alias: documented once, under its own name
                lines += [f"#### `{modname}.{name}`", "",
                          f"The same function as `{modname}.{seen[id(obj)]}`.", ""]
                continue
            seen[id(obj)] = name
            if inspect.isclass(obj):
                fields = getattr(obj, "_fields", None) or getattr(obj, "__dataclass_fields__", None)
                head = f"#### class `{modname}.{name}`"
                if fields:
                    head += f" (fields: {', '.join(f'`{f}`' for f in fields)})"
                lines += [head, ""]
            else:
                lines += [f"#### `{modname}.{name}{_signature(obj)}`", ""]
            lines += _fenced(inspect.getdoc(obj) or "(no docstring)")
    lines.append(END)
    return "\n".join(lines) + "\n"


def current(readme: str) -> str:
    """The section now in docs/api.md, markers included ("" when absent)."""
    if BEGIN not in readme or END not in readme:
        return ""
    start = readme.index(BEGIN)
    stop = readme.index(END) + len(END)
    return readme[start:stop] + "\n"


def write() -> None:
    text = TARGET.read_text(encoding="utf-8")
    section = generate()
    old = current(text)
    if old:
        text = text.replace(old, section)
    else:
        raise SystemExit(f"{TARGET}: the markers are missing; add the lines\n{BEGIN}\n{END}\n"
                         "where the section belongs")
    TARGET.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    elif sys.argv[1:]:
        raise SystemExit("usage: python tests/api_reference.py [--write]")
    else:
        sys.stdout.write(generate())
