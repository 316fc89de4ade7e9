"""Stage modules under assets/ import libraries (non-stage modules of assets/, resources, core), never each other.

A stage module is one with a top-level `definitions(...)`: the stage's part of the graph. Imports are read with
`ast`, so one written inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGES = {"assets.data", "assets.embeddings", "assets.training", "assets.evaluation", "assets.notices",
          "assets.compliance", "assets.deployment", "assets.monitoring", "assets.rollout"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, module: str, known: set[str]) -> set[str]:
    """The modules of `known` that `source` (the text of `module`) imports anywhere, function bodies included."""
    found: set[str] = set()

    def resolve(name: str) -> None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")[:-node.level]
                base = ".".join([*package, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                resolve(full if full in known else base)
    found.discard(module)
    return found


def test_the_scanner_sees_imports_inside_functions_and_every_spelling() -> None:
    source = ("from assets import naming\n"
              "def f():\n    from assets.monitoring import x\n"
              "def g():\n    import assets.data\n"
              "class C:\n    def h(self):\n        from assets import deployment\n"
              "from . import training\n")
    assert imported(source, "assets.evaluation", STAGES | {"assets.naming"}) == {
        "assets.naming", "assets.monitoring", "assets.data", "assets.deployment", "assets.training"}


def test_stage_modules_never_import_each_other() -> None:
    paths = sorted((REPO / "assets").rglob("*.py"))
    modules = {module_name(p): p for p in paths}
    sources = {m: p.read_text() for m, p in modules.items()}
    stages = {m for m, s in sources.items()
              if any(isinstance(n, ast.FunctionDef) and n.name == "definitions" for n in ast.parse(s).body)}
    # Every module that gives the graph a stage is one of the eight, and all eight are there.
    assert stages == STAGES
    crossings = sorted(f"{m} imports {other}" for m in stages
                       for other in imported(sources[m], m, set(modules)) if other in stages)
    assert crossings == [], "a helper two stages share belongs in a module below them: " + "; ".join(crossings)
