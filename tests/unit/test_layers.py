"""The import graph (read with `ast`, nothing imported): no cycle among the project's modules,
nothing imports the CLI, no command imports another command, models/ imports no Ray."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "actors", "models")
COMMANDS = {"pipeline.synth", "pipeline.preprocess", "pipeline.train", "pipeline.train_vae",
            "pipeline.eval_vae"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file, lazy imports too)."""
    paths = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    modules = {module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from pkg import mod` imports pkg.mod when that is a module
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps - {n for n in deps if name.startswith(n + ".")}  # own package
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    graph = project_imports()
    assert "pipeline.cli" in graph and "models.dit" in graph  # the walk found the tree
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_imports_the_cli_and_no_command_imports_another():
    graph = project_imports()
    for name, deps in graph.items():
        if name != "pipeline.__main__":  # `python -m pipeline`: the CLI's other entry point
            assert "pipeline.cli" not in deps, f"{name} imports pipeline.cli"
        if name in COMMANDS:
            assert not deps & COMMANDS, f"command {name} imports {sorted(deps & COMMANDS)}"


def test_layers_import_only_downwards():
    """docs/design.md: models <- actors <- pipeline; models/ is plain PyTorch (no Ray)."""
    graph = project_imports()
    for path in (ROOT / "models").rglob("*.py"):
        text = path.read_text()
        assert "import ray" not in text and "from ray" not in text, path
    for name, deps in graph.items():
        if name.startswith("models"):
            assert not {d for d in deps if not d.startswith("models")}, name
        if name.startswith("actors"):
            assert not {d for d in deps if d.startswith("pipeline")}, name
