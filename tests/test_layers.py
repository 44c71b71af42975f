"""The architecture, checked from the imports: each layer imports only from itself and the layers below it,
siblings of one layer do not import each other, and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("loong_jax", "pallas_kernels", "checkpoints", "serving")

# Lowest first. A unit is a subpackage or a top-level module; it may import its own modules and any unit of
# a lower layer, nothing of its own layer's other units or above.
LAYERS: list[tuple[str, ...]] = [
    ("loong_jax.model", "pallas_kernels"),  # the network and the attention kernels
    ("loong_jax.runtime",),  # instances, pools, programs, executors
    ("loong_jax.scheduling", "loong_jax.prefix", "loong_jax.multihost", "loong_jax.structured", "checkpoints"),
    ("loong_jax.engine",),  # the engine loop
    ("loong_jax.outputs", "loong_jax.profiling", "loong_jax.simulation"),  # what drives or reads the engine
    ("loong_jax.api",),  # the Python API (LLM)
    ("loong_jax", "serving"),  # the package's public names; the HTTP server
    ("loong_jax.cli",),  # the `loong` command
]


def _modules() -> dict[str, Path]:
    """Every module of the project's packages by dotted name (a package by its __init__)."""
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules a file imports anywhere in it (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def _unit(module: str) -> str:
    units = [u for layer in LAYERS for u in layer]
    return max((u for u in units if module == u or module.startswith(u + ".")), key=len)


def _layer(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_every_module_has_a_layer():
    for module in _modules():
        assert _unit(module), module


def test_layers_import_only_downwards():
    wrong = []
    for module, imported in sorted(_graph().items()):
        unit = _unit(module)
        for other in sorted(imported):
            there = _unit(other)
            if there != unit and _layer(there) >= _layer(unit):
                wrong.append(f"{module} imports {other} ({unit} is layer {_layer(unit)}, {there} {_layer(there)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(path[path.index(n) :] + [n]) if n in path else f"{m} -> {n}")
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)
