"""The package import graph of rayrlhf, read from the source with `ast` (nothing is imported).

    python scripts/import_graph.py          # prints each layer's imports; exit 1 on a cycle, an upward import or
                                            # an import of a folder by its bare name (`core.x`, not `rayrlhf.core.x`)
                                            # or a circle between two modules

Everything installs under the one import name `rayrlhf` (`rayrlhf.core`, ...: pyproject.toml maps the repository's
top-level folders into it), so a bare `import core` works only from the repository root and would break an install.

Layers, bottom to top; a package may import only from layers below it (and itself):
  core           the foundation: config, RL math, token rows and forwards, messages, data, models, checkpoints (no Ray, no vLLM)
  roles          the plain role classes: rollout (+ vLLM backend), reference, reward, PPO learner, SFT, RM, eval
  serving        the HTTP reward service and its client
  actors         every @ray.remote: the thin actors around the role classes
  pipeline       orchestration: driver, rollout pool, launch, workflow, CLI, jobs
Outside the layers, `tools` (k8s validator, config reference generator) may import them; nothing imports it.
Function-level imports count like module-level ones.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "rayrlhf"
LAYERS = tuple(f"{PACKAGE}.{layer}" for layer in ("core", "roles", "serving", "actors", "pipeline"))
FOLDERS = ("core", "roles", "actors", "serving", "pipeline", "configs", "tools")  # the repository's folders in the package
TOOLS = f"{PACKAGE}.tools"  # outside the layers: it may import them, none of them may import it


def package_of(module: str) -> str | None:
    """The innermost layer package holding `module` (None: not ours)."""
    for layer in sorted(LAYERS, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def modules() -> dict[str, Path]:
    out = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer.removeprefix(PACKAGE + ".").replace(".", "/")).glob("*.py")):
            name = layer if path.name == "__init__.py" else f"{layer}.{path.stem}"
            out[name] = path
    return out


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def package_graph() -> dict[str, set[str]]:
    """layer -> the other layers it imports from."""
    graph: dict[str, set[str]] = {layer: set() for layer in LAYERS}
    for name, path in modules().items():
        src = package_of(name)
        for imported in imports(path):
            dst = package_of(imported)
            if dst is not None and dst != src:
                graph[src].add(dst)
    return graph


def module_graph() -> dict[str, set[str]]:
    """module -> the other modules of ours it imports (a circle between two modules of one layer counts too)."""
    mods = modules()
    return {name: {m for m in imports(path) if m in mods and m != name} for name, path in mods.items()}


def bare_imports() -> list[tuple[str, str]]:
    """(module, imported) for every import of one of our folders by its bare name."""
    return sorted((name, imported) for name, path in modules().items() for imported in imports(path)
                  if imported.split(".")[0] in FOLDERS)


def tool_imports() -> list[tuple[str, str]]:
    """(module, imported) for every runtime module that imports the tools."""
    return sorted((name, imported) for name, path in modules().items() for imported in imports(path)
                  if imported == TOOLS or imported.startswith(TOOLS + "."))


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    return sorted((a, b) for a, deps in graph.items() for b in deps if rank[b] > rank[a])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path of layers, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def main() -> int:
    graph = package_graph()
    for layer in reversed(LAYERS):
        print(f"{layer:22s} -> {', '.join(sorted(graph[layer], key=LAYERS.index)) or '(nothing of ours)'}")
    cycle, upward, bare = find_cycle(graph), upward_imports(graph), bare_imports()
    circle = find_cycle(module_graph())
    if cycle:
        print(f"import cycle: {' -> '.join(cycle)}")
    if circle:
        print(f"module circle: {' -> '.join(circle)}")
    for a, b in upward:
        print(f"upward import: {a} imports {b}")
    for a, b in bare:
        print(f"bare import: {a} imports {b} (write {PACKAGE}.{b})")
    tools = tool_imports()
    for a, b in tools:
        print(f"runtime imports a tool: {a} imports {b}")
    print(f"{len(modules())} modules: {'no circle' if not circle else 'a circle'}, {len(bare)} bare imports")
    return 1 if cycle or circle or upward or bare or tools else 0


if __name__ == "__main__":
    sys.exit(main())
