"""The package's layout: library modules below the commands, data flowing one way.

The import graph is read with ``ast`` from every file of tagjax/ (imports at module level and inside
functions alike), so an import hidden in a function body cannot hide a cycle.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tagjax"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The tagjax module an import of ``name`` loads (a name inside a module -> the module)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    """tagjax modules that ``module`` imports anywhere in its file (the package itself excluded)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from tagjax import vocab` imports the module tagjax.vocab; `from tagjax.x import f`, tagjax.x
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target and target != "tagjax" and target != module:
                out.add(target)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (depth-first search with colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if colour[nxt] == 0 and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if colour[node] == 0 and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_imports_inside_functions_and_the_cycle_finder_finds_cycles():
    assert "tagjax.commands.vocab" in MODULES and "tagjax.vocab" in GRAPH["tagjax.commands.vocab"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_in_the_package():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_library_never_imports_the_commands_or_the_cli():
    library = [m for m in MODULES if not m.startswith("tagjax.commands") and m != "tagjax.cli"]
    offending = {
        m: sorted(t for t in GRAPH[m] if t.startswith("tagjax.commands") or t == "tagjax.cli")
        for m in library
    }
    offending = {m: t for m, t in offending.items() if t}
    assert not offending, f"library modules importing the command layer: {offending}"


def test_library_modules_import_tagjax_modules_at_the_top():
    """Only command modules import tagjax modules inside functions (lazily, in ``run``)."""
    inside = []
    for module, path in MODULES.items():
        if module.startswith("tagjax.commands"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top:
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                if getattr(node, "level", 0) or any(n.split(".")[0] == "tagjax" for n in names):
                    inside.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not inside, f"function-level imports of tagjax modules: {inside}"


def test_every_registered_command_is_a_command_module():
    from tagjax import cli

    for name, command in cli.COMMANDS.items():
        assert command.module.startswith("tagjax.commands."), name
        assert command.help, name


def _registered_commands() -> list[str]:
    from tagjax import cli

    return list(cli.COMMANDS)


@pytest.mark.parametrize(
    "argv", [["--help"], *([name, "--help"] for name in _registered_commands())], ids=" ".join
)
def test_help_does_not_import_jax(argv):
    """`tagjax --help` and `tagjax X --help` stay fast: no JAX, Flax, grain, Orbax or TFDS import."""
    code = (
        "import contextlib, io, json, sys\n"
        "from tagjax import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        cli.main({argv!r})\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('jax', 'flax', 'grain', 'tensorflow_datasets', 'orbax'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert heavy == [], f"`tagjax {' '.join(argv)}` imported {heavy[:5]}"
