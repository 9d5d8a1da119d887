"""The code's shape: no import circles among pneumoflag's modules (lazy imports too), and no overlong functions.

A lazy import inside a function hides a circle from the interpreter until the day that function runs first
in a new order; so the graph here counts every import statement wherever it stands.
"""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

#: the top-level folders installed as pneumoflag.<name> (pyproject.toml's package-dir)
PACKAGES = ("device", "station", "convert")
MAX_FUNCTION_LINES = 80


def module_name(root: Path, path: Path) -> str:
    """pneumoflag.<folder>.<module> for a file under ``root`` (a package's __init__ names the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["pneumoflag", *parts])


def module_files(root: Path, folders: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    return {module_name(root, p): p for d in folders for p in sorted((root / d).rglob("*.py"))}


def _imported(node: ast.Import | ast.ImportFrom, here: str, is_package: bool) -> list[str]:
    """The module names one import statement may load: its target and any submodule it names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = here.split(".") if is_package else here.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def import_graph(root: Path, folders: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the pneumoflag modules it imports anywhere in its file (top level, functions, methods)."""
    files = module_files(root, folders)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(d for d in _imported(node, name, path.name == "__init__.py") if d in files)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One closed path (first module repeated at the end) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is a few dozen modules, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_closed_path(graph, set(g), g[0]) for g in groups]


def _closed_path(graph: dict[str, set[str]], group: set[str], start: str) -> list[str]:
    """A shortest path from ``start`` back to itself inside its group (breadth first)."""
    came: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    back = [v]
                    while back[-1] != start:
                        back.append(came[back[-1]])
                    return [*reversed(back), start]
                if w not in came:
                    came[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a group but on no cycle")  # cannot happen for a Tarjan group


def long_functions(root: Path, folders: tuple[str, ...], limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """'folder/file.py::Class.func' -> line count, for every function or method longer than ``limit``."""
    found: dict[str, int] = {}

    def walk(node: ast.AST, prefix: str, rel: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = child.end_lineno - child.lineno + 1
                    if lines > limit:
                        found[f"{rel}::{name}"] = lines
                walk(child, name + ".", rel)
            else:
                walk(child, prefix, rel)

    for d in folders:
        for path in sorted((root / d).rglob("*.py")):
            walk(ast.parse(path.read_text(), str(path)), "", path.relative_to(root).as_posix())
    return found


# ----------------------------------------------------------------------------- the checks themselves

def _toy_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_graph_sees_lazy_relative_and_absolute_imports(tmp_path):
    root = _toy_package(tmp_path, {
        "device/__init__.py": "",
        "device/a.py": "def f():\n    from .b import x\n",
        "device/b.py": "class C:\n    def m(self):\n        import pneumoflag.device.c\n",
        "device/c.py": "from pneumoflag.device import a\n",
        "device/d.py": "from . import c\nimport json\n",
        "device/sub/__init__.py": "from .. import d\n",
    })
    graph = import_graph(root, ("device",))
    assert graph["pneumoflag.device.a"] == {"pneumoflag.device.b"}
    assert graph["pneumoflag.device.b"] == {"pneumoflag.device.c"}
    assert graph["pneumoflag.device.c"] == {"pneumoflag.device", "pneumoflag.device.a"}
    assert graph["pneumoflag.device.d"] == {"pneumoflag.device", "pneumoflag.device.c"}
    assert graph["pneumoflag.device.sub"] == {"pneumoflag.device", "pneumoflag.device.d"}
    assert find_cycles(graph) == [["pneumoflag.device.a", "pneumoflag.device.b", "pneumoflag.device.c",
                                   "pneumoflag.device.a"]]


def test_no_import_circles_counting_lazy_imports():
    graph = import_graph(REPO)
    assert len(graph) > 40 and "pneumoflag.device.samples" in graph  # the walk found the packages
    cycles = find_cycles(graph)
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_long_functions_are_found(tmp_path):
    def body(indent: str, n: int) -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(n))

    root = _toy_package(tmp_path, {"device/m.py": "class K:\n    def ok(self):\n" + body(" " * 8, MAX_FUNCTION_LINES - 1)
                                   + "    def too_long(self):\n" + body(" " * 8, MAX_FUNCTION_LINES)
                                   + "def fits():\n" + body("    ", MAX_FUNCTION_LINES - 1)})
    assert long_functions(root, ("device",)) == {"device/m.py::K.too_long": MAX_FUNCTION_LINES + 1}


def test_no_function_longer_than_80_lines():
    offenders = long_functions(REPO, ("device", "station"))
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(
        f"{k} ({v})" for k, v in sorted(offenders.items()))


def _literal_reasons(tree: ast.AST) -> list[tuple[int, str]]:
    """Reason codes written as text where an error is raised or recorded (not through ``Reason``)."""
    from pneumoflag.device.vocab import REASONS

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        args = list(node.args[:1]) + [k.value for k in node.keywords if k.arg == "reason"]
        for a in args:
            if isinstance(a, ast.Constant) and a.value in REASONS:
                found.append((node.lineno, a.value))
    return found


def test_reason_codes_are_passed_only_through_the_enum():
    """A reason spelled as text is one the README test and a rename cannot see."""
    offenders = []
    for folder in ("device", "station", "convert"):
        for f in sorted((REPO / folder).rglob("*.py")):
            if f.name != "vocab.py":
                offenders += [f"{f.relative_to(REPO)}:{n}: {v!r}" for n, v in _literal_reasons(ast.parse(f.read_text()))]
    assert not offenders, "reason codes as text (use vocab.Reason):\n" + "\n".join(offenders)


def test_the_reason_check_finds_a_literal():
    tree = ast.parse('raise ImageDecodeError("corrupt", "x")\nrecord(p, reason="too-large")\nf(Reason.CORRUPT)')
    assert _literal_reasons(tree) == [(1, "corrupt"), (2, "too-large")]


def test_the_file_signature_exists_once():
    """The watcher, the journal's rules and the reader judge a file by one signature function."""
    defs = []
    for folder in ("device", "station"):
        for f in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") in ("sig", "file_sig", "lstat_sig"):
                    defs.append(f"{f.relative_to(REPO)}:{node.name}")
    assert defs == ["device/reader.py:file_sig"], defs
