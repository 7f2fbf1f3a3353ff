"""The package's shape, read statically (ast, no imports run): no import cycle among mfim's modules, and no long
function without a reason written beside it (docs/CONVENTIONS.md, "Code shape")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mfim"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(body: list[ast.stmt]):
    """Every import statement of a module: at the top level, and inside functions and classes too -- an import
    moved into a function to dodge a cycle is still a dependency (it only fails later, at call time) -- except the
    blocks of `if TYPE_CHECKING:`, which never run."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                for child in getattr(node, field, ()) or ():
                    yield from _imports(child.body if isinstance(child, (ast.ExceptHandler, ast.match_case))
                                        else [child])


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of the package's modules."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: modules of the package it imports, anywhere in its code}. `from pkg import name` points at pkg.name when
    that is a module, else at pkg (conventional direct-import edges, as pylint's cyclic-import counts them)."""
    modules = package_modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in _imports(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            edges.update(t for t in (_resolve(t, modules) for t in targets) if t is not None and t != name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted: every import cycle is inside one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_cycle_finder_sees_a_cycle_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "mfim"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from mfim.sub import b\n")
    (pkg / "sub" / "b.py").write_text("import mfim.c\n")
    (pkg / "c.py").write_text("try:\n    from mfim.a import thing\nexcept ImportError:\n    pass\n")
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mfim.e import X\n"
        "def f():\n    if TYPE_CHECKING:\n        from mfim.e import Z\n"
    )
    (pkg / "e.py").write_text("from .d import f\n")
    (pkg / "f.py").write_text("class K:\n    def m(self):\n        with open('x'):\n            import mfim.g\n")
    (pkg / "g.py").write_text("def h():\n    from mfim import f\n")
    graph = import_graph(pkg)
    assert graph["mfim.sub.b"] == {"mfim.c"} and graph["mfim.e"] == {"mfim.d"} and graph["mfim.d"] == set()
    assert find_cycles(graph) == [["mfim.a", "mfim.c", "mfim.sub.b"], ["mfim.f", "mfim.g"]]


def test_no_import_cycle_in_mfim():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles among mfim's modules (move the shared piece down, or invert): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


# --- function length -----------------------------------------------------------------------------------------------

MAX_LINES = 80
REASON = "# long:"
# Long functions in directories other helpers own at the time of writing; each needs a `# long:` reason or a split.
ALLOWLIST: dict[str, str] = {}


def long_functions(root: Path = PACKAGE, max_lines: int = MAX_LINES) -> dict[str, int]:
    """{'path::Qual.name': lines} of the functions longer than ``max_lines`` (the def line to the body's last line)
    with no ``# long:`` comment in the comment block right above the def (or its decorators), between the def and its
    first statement, or on that statement's line."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines), str(path))

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                name = f"{prefix}{child.name}" if hasattr(child, "name") and isinstance(child.name, str) else prefix
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    top = min([d.lineno for d in child.decorator_list] + [child.lineno])
                    n = child.end_lineno - child.lineno + 1
                    above = top - 1  # 1-based line numbers: the comment block right above the def / decorators
                    while above >= 1 and lines[above - 1].lstrip().startswith("#"):
                        above -= 1
                    near = lines[above : child.body[0].lineno]  # that block .. the first statement's line
                    if n > max_lines and not any(REASON in line for line in near):
                        found[f"{path.relative_to(root.parent).as_posix()}::{name}"] = n
                visit(child, f"{name}." if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      else prefix)

        visit(tree, "")
    return found


def test_long_function_finder(tmp_path):
    pkg = tmp_path / "mfim"
    pkg.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(85))
    method = body.replace("    x", "        x")
    (pkg / "m.py").write_text(
        f"def plain():\n{body}\n"
        f"# long: a reason\n# on two lines\ndef above():\n{body}\n"
        f"class K:\n    @staticmethod\n    def inside():  # long: on the def line\n{method}\n"
        f"    def bare(self):\n{method}\n"
        f"def outer():\n    def nested():\n{method}\n    return nested\n"
        "def short():\n    return 1\n"
    )
    assert long_functions(pkg) == {"mfim/m.py::plain": 86, "mfim/m.py::K.bare": 86, "mfim/m.py::outer": 89,
                                   "mfim/m.py::outer.nested": 86}


def test_no_long_function_without_a_reason():
    found = long_functions()
    unexplained = sorted(set(found) - set(ALLOWLIST))
    listing = ", ".join(f"{k} ({found[k]})" for k in unexplained)
    assert not unexplained, (f"functions over {MAX_LINES} lines in mfim/ with no `{REASON} <why>` comment beside "
                             f"them (split them, or say why not): {listing}")
    fixed = sorted(set(ALLOWLIST) - set(found))
    assert not fixed, f"no longer long (or now explained): remove from ALLOWLIST in tests/test_structure.py: {fixed}"
