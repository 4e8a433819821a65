"""The import graph of `dskd/` points downward: no cycles, and nothing below the stages imports a stage.

Layers, top to bottom: `dskd.cli` -> `dskd.stages.*` (teacher/distill, generate, evaluate, demo) -> components
(trainer, teachers, joint_teaching, student, objectives, engines, losses, data, ...). Imports under
`if TYPE_CHECKING:` are annotations only and do not count. Run `python tests/test_architecture.py` to print the
graph's layers and the longest functions. A training process does not load the scoring and plotting libraries
(they are imported where something is scored or drawn): they are resident memory for the whole run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dskd"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """dskd modules imported anywhere in `tree` (module level or inside functions), TYPE_CHECKING excluded."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dskd"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dskd"):
            for alias in node.names:  # `from dskd import checkpoint` imports the submodule
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        targets = _imports(ast.parse(path.read_text()), modules)
        # importing dskd.a.b also runs dskd.a/__init__; count only the module named
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def _is_stage(module: str) -> bool:
    return module == "dskd.cli" or module == "dskd.__main__" or module.startswith("dskd.stages")


def test_the_import_graph_has_no_cycles():
    assert cycles(import_graph()) == []


def test_components_never_import_a_stage_or_the_cli():
    graph = import_graph()
    upward = {m: sorted(t for t in targets if _is_stage(t)) for m, targets in graph.items() if not _is_stage(m)}
    assert {m: t for m, t in upward.items() if t} == {}


def test_the_cli_is_the_only_importer_of_the_cli():
    graph = import_graph()
    assert sorted(m for m, targets in graph.items() if "dskd.cli" in targets) == ["dskd.__main__"]


def test_a_training_process_does_not_load_the_scoring_and_plotting_stack():
    heavy = ("rouge_score", "nltk", "sacrebleu", "matplotlib", "scipy.stats", "sklearn")
    code = ("import sys; import dskd.cli, dskd.stages.train, dskd.trainer, dskd.teachers; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_the_readme_layout_names_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("```", layout.index("```") + 3)]
    missing = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        top = rel.parts[0]
        if rel == Path("__init__.py"):
            continue
        named = f"dskd/{top}/" in layout if len(rel.parts) > 1 else (path.name in layout)
        nested = len(rel.parts) == 2 and rel.name != "__init__.py" and rel.parent.name == "stages"
        if not named or (nested and rel.name not in layout):
            missing.append(str(rel))
    assert missing == [], f"README.md's layout section does not name {missing}"


def layers(graph: dict[str, set[str]]) -> list[list[str]]:
    """Modules grouped by height: layer 0 imports no dskd module, layer n only modules of lower layers."""
    height: dict[str, int] = {}

    def h(m: str) -> int:
        if m not in height:
            height[m] = 1 + max((h(t) for t in graph[m]), default=-1)
        return height[m]

    for m in graph:
        h(m)
    return [sorted(m for m in graph if height[m] == level) for level in range(max(height.values()) + 1)]


def longest_functions(count: int = 10) -> list[tuple[int, str]]:
    """(lines from `def` to the end of the body, where) of the longest functions in dskd/."""
    rows = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"
                rows.append((node.end_lineno - node.lineno + 1, where))
    return sorted(rows, reverse=True)[:count]


if __name__ == "__main__":
    g = import_graph()
    print("cycles:", cycles(g) or "none")
    print("layers (each module imports only modules of lower layers):")
    for level, mods in enumerate(layers(g)):
        print(f"{level:2d}  {' '.join(m.removeprefix('dskd.') for m in mods)}")
    print("longest functions:")
    for lines, where in longest_functions():
        print(f"{lines:4d}  {where}")


# Where the teacher's signal comes from is read in one place per concern: the recipe schema (its keys and the
# two properties the CLI's light preflight asks), `teacher_for` and the Teacher classes, and the endpoint's own
# modules; and the planner, which prices every mode from configs alone (no Teacher object exists there). Anywhere
# else, a mode check is a new flag checked in a sixth place.
MODE_READERS = {"dskd.config", "dskd.teachers", "dskd.study", "dskd.stages.demo", "dskd.plan"}


def _mode_reads(tree: ast.AST) -> list[int]:
    """Lines that read `.endpoint` (generate.endpoint) or `.signal` (teacher.signal) as a value: not a call
    (`Teacher.signal(batch)`, `signal.signal(...)` of the signal module)."""
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in ("endpoint", "signal") and id(node) not in called]


def test_the_teacher_mode_is_read_only_behind_the_seam():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name in MODE_READERS or name.startswith(("dskd.blackbox", "dskd.serve")):
            continue
        lines = _mode_reads(ast.parse(path.read_text()))
        offenders += [f"{name}:{line}" for line in lines]
    assert not offenders, ("these read generate.endpoint / teacher.signal outside the teacher seam; ask the Teacher "
                           f"(dskd.teachers) or Recipe.teacher_in_process / pts_from_server instead: {offenders}")
