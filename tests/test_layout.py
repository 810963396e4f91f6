"""The library's shape: each layer imports only the layers below it, no import cycles, no Kedro in the library."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lora_pipeline"
# Lower number = lower layer. diffusion and llm sit side by side and must not import each other. Every module of
# the package has a layer; the package root holds only Kedro's own entry files.
LAYERS = {"core": 2, "prep": 3, "diffusion": 4, "llm": 4, "demo": 5, "datasets": 5, "pipelines": 6,
          "project": 7, "ui": 8, "pipeline_registry": 8, "settings": 9, "cli": 9, "__main__": 10}
KEDRO_ENTRY_FILES = {"__init__.py", "__main__.py", "settings.py", "pipeline_registry.py"}
LIBRARY = ("core", "prep", "diffusion", "llm")


def _modules() -> dict[str, set[str]]:
    """``{module: {imported lora_pipeline modules}}``, function-level imports included."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_pipeline"):
                base = node.module.removeprefix("lora_pipeline").lstrip(".")
                for alias in node.names:
                    candidate = f"{base}.{alias.name}".lstrip(".")
                    imported.add(candidate if (PACKAGE / Path(*candidate.split("."))).with_suffix(".py").exists()
                                 or (PACKAGE / Path(*candidate.split("."))).is_dir() else base)
            elif isinstance(node, ast.Import):
                imported |= {a.name.removeprefix("lora_pipeline.") for a in node.names
                             if a.name.startswith("lora_pipeline.")}
        graph[name] = {m for m in imported if m and m != name}
    return graph


def _layer(module: str) -> int | None:
    return LAYERS.get(module.split(".")[0])


def test_every_module_has_a_layer_and_the_root_holds_only_kedros_entry_files():
    assert {p.name for p in PACKAGE.glob("*.py")} == KEDRO_ENTRY_FILES
    unplaced = [module for module in _modules() if module and _layer(module) is None]
    assert not unplaced, unplaced


def test_lower_layers_never_import_higher_ones():
    wrong = []
    for module, imports in _modules().items():
        own = _layer(module)
        if own is None:
            continue
        for target in imports:
            other = _layer(target)
            if other is None:
                continue
            sideways = own == other and module.split(".")[0] != target.split(".")[0]
            if other > own or sideways:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_no_import_cycles():
    graph = _modules()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_library_has_no_kedro_imports():
    offenders = [str(p.relative_to(PACKAGE)) for folder in LIBRARY for p in (PACKAGE / folder).rglob("*.py")
                 if "import kedro" in p.read_text() or "from kedro" in p.read_text()]
    assert not offenders, offenders
