"""Every module the code, configs and docs name exists: each dotted ``pipeline.a.b`` imports (or is an attribute
of a module that does, ``pipeline.a.b.func``) and each ``pipeline/a/b.py`` or ``pipeline/a/`` is in the tree, so
that a renamed or moved module leaves no comment pointing at nothing."""
from __future__ import annotations

import importlib
import re
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = [*sorted((REPO / "pipeline").rglob("*.py")), *sorted((REPO / "configs").rglob("*.yaml")),
           REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
DOTTED = re.compile(r"(?<![\w./-])pipeline(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"(?<![\w./-])pipeline/(?:[\w/]*\w\.py\b|(?:\w+/)+)")


@lru_cache(maxsize=None)
def dotted_problem(name: str) -> str | None:
    """Why ``name`` resolves to nothing (None when it does): its longest importable prefix, then attributes."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        module = ".".join(parts[:end])
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and (module == err.name or module.startswith(err.name + ".")):
                continue  # this module is not there: try its parent
            return f"{module} does not import ({err})"
        except Exception as err:  # a module that is there but broken is named, not raised
            return f"{module} does not import ({type(err).__name__}: {err})"
        for attr in parts[end:]:
            if not hasattr(found, attr):
                return f"no module or attribute {attr!r} in {getattr(found, '__name__', module)}"
            found = getattr(found, attr)
        return None
    return "no such module"


def named(path: Path) -> list[tuple[int, str, str]]:
    """(line, name, why it resolves to nothing) for each bad module name or path in ``path``."""
    bad = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for name in DOTTED.findall(line):
            why = dotted_problem(name)
            if why:
                bad.append((number, name, why))
        for name in PATH.findall(line):
            if not (REPO / name).exists():
                bad.append((number, name, "no such file"))
    return bad


def test_every_named_module_exists():
    bad = [f"{path.relative_to(REPO)}:{line}: {name} ({why})" for path in SCANNED
           for line, name, why in named(path)]
    assert not bad, f"{len(bad)} name(s) of modules that do not exist:\n" + "\n".join(bad)


def test_the_scan_tells_good_names_from_bad():
    assert dotted_problem("pipeline.rundir.RunDir") is None and dotted_problem("pipeline.eda.stage") is None
    assert dotted_problem("pipeline.nowhere") == "no module or attribute 'nowhere' in pipeline"
    assert dotted_problem("pipeline.rundir.nothing") == "no module or attribute 'nothing' in pipeline.rundir"
    assert DOTTED.findall("see :mod:`pipeline.eda.stage`.") == ["pipeline.eda.stage"]
    assert PATH.findall("(pipeline/plan/planner.py), pipeline/eda/ and pipeline/x.py") == [
        "pipeline/plan/planner.py", "pipeline/eda/", "pipeline/x.py"]
