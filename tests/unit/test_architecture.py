"""docs/architecture.md's "what may import what" is the rule: every import of the project's own modules (at any
depth, function-level ones included) goes to a floor its row allows. No import circle, no sys.path edit, no
module over 650 lines. The README and docs name only files that exist in the repository."""

from __future__ import annotations

import ast
import re
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
FLOORS = ("orchestration", "assets", "resources", "core", "workloads")


def allowed_imports() -> dict[str, set[str]]:
    """floor -> the floors it may import, read from the table under "Floors" in docs/architecture.md."""
    section = DOC.read_text().split("## Floors", 1)[1].split("\n## ", 1)[0]
    rules = {}
    for line in section.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] in FLOORS:
            rules[cells[0]] = {c.strip() for c in cells[1].split(",")}
    return rules


MAX_LINES = 650


def modules() -> dict[str, Path]:
    out = {}
    for floor in FLOORS:
        for path in sorted((REPO / floor).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def module_edges(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (the longest known prefix of each imported name)."""
    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            hit = resolve(t)
            if hit and hit != name and not name.startswith(hit + "."):
                edges.add(hit)
    return edges


def project_imports(path: Path) -> set[str]:
    """The top-level project packages a module imports, relative imports resolved."""
    tree = ast.parse(path.read_text())
    own = path.relative_to(REPO).parts[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(own if node.level else (node.module or "").split(".")[0])
    return found & set(FLOORS)


def test_the_table_names_every_floor_and_each_may_import_itself() -> None:
    rules = allowed_imports()
    assert set(rules) == set(FLOORS), f"docs/architecture.md's table names {sorted(rules)}"
    assert all(floor in allowed for floor, allowed in rules.items())
    assert "workloads" not in rules["orchestration"] | rules["assets"] | rules["resources"] | rules["core"]


def test_every_import_goes_to_a_floor_its_row_allows() -> None:
    rules = allowed_imports()
    wrong = []
    for floor in FLOORS:
        for path in sorted((REPO / floor).rglob("*.py")):
            for target in sorted(project_imports(path) - rules[floor]):
                wrong.append(f"{path.relative_to(REPO)} imports {target}, which {floor} may not import")
    assert not wrong, "\n".join(wrong)


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The check itself can fail: a core module importing assets is named."""
    bad = REPO / "core" / "_architecture_probe.py"
    bad.write_text("def f():\n    from assets import naming\n    return naming\n")
    try:
        assert "assets" in project_imports(bad) - allowed_imports()["core"]
    finally:
        bad.unlink()


def test_no_import_circle_no_sys_path_edit_no_oversized_module() -> None:
    known = modules()
    graph = {name: module_edges(name, path, known) for name, path in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"
    edits = [str(p.relative_to(REPO)) for p in known.values() if "sys.path" in p.read_text()]
    assert not edits, f"sys.path edited in {edits}"
    big = {str(p.relative_to(REPO)): n for p in known.values() if (n := p.read_text().count("\n")) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_the_modules_a_model_version_ships_import_nothing_of_ours() -> None:
    """A registered version carries these files and nothing else of the project (assets/training.py model_code):
    an import of a project module in them works beside the repository and fails wherever the version is served."""
    from assets.training import model_code

    shipped = {"assets/features.py", "workloads/tabular_mlp.py", "core/onnx_runtime.py", "workloads/model_code.py"}
    own = {"intelligentops_features", "tabular_mlp", "intelligentops_onnx"}
    with tempfile.TemporaryDirectory() as tmp:
        names = {Path(c).stem for c in model_code(Path(tmp))["code_paths"]}
    assert names == own, f"model_code ships {sorted(names)}: update this test's list"
    found = []
    for rel in sorted(shipped):
        for node in ast.walk(ast.parse((REPO / rel).read_text())):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            found += [f"{rel}: {t}" for t in targets if t.split(".")[0] in FLOORS]
    assert not found, f"shipped with a version, these import the project: {found}"


def test_readme_and_docs_name_only_files_in_the_repository() -> None:
    texts = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    missing = []
    for doc in texts:
        text = doc.read_text()
        assert "](http" not in text and "../shared" not in text, f"{doc.name} links outside the repository"
        for ref in re.findall(r"`((?:docs|benchmarks|deploy|tests|pipelines|assets|core|resources|workloads|"
                              r"orchestration)/[\w./-]+\.(?:md|py|yaml|json|png))`", text):
            if not (REPO / ref).exists():
                missing.append(f"{doc.name}: {ref}")
    assert not missing, f"named but not in the repository: {missing}"
