"""The package's shape: imports between its modules form no cycle, and no module uses another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "cnt"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(f.read_text(), str(f))
    return out


def _package_of(name: str, tree_is_package: bool) -> str:
    return name if tree_is_package else name.rpartition(".")[0]


def _imports(name: str, tree: ast.Module, modules: dict) -> dict[str, list[str]]:
    """The kit's modules ``name`` imports (anywhere in it, function-local imports included) -> names taken from each."""
    is_pkg = (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()
    here = _package_of(name, is_pkg)
    out: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if not base.startswith("cnt"):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:
                    out.setdefault(sub, [])
                else:
                    out.setdefault(base, []).append(a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("cnt"):
                    out.setdefault(a.name, [])
    out.pop(name, None)
    return out


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {d for d in _imports(m, t, modules) if d in modules and not m.startswith(d + ".") and d != "cnt"}
             for m, t in modules.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])


def test_no_private_names_across_modules():
    modules = _modules()
    used = []
    for m, tree in modules.items():
        for dep, names in _imports(m, tree, modules).items():
            used += [f"{m} imports {dep}.{n}" for n in names if n.startswith("_")]
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                for a in node.names:
                    aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                used.append(f"{m} uses {node.value.id}.{node.attr}")
    assert not used, used


def test_readme_layout_names_every_module():
    """README's layout block shows every module of the package, one line each."""
    text = (PACKAGE.parent / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("```", layout.index("```") + 3)]
    missing = [str(f.relative_to(PACKAGE)) for f in sorted(PACKAGE.rglob("*.py"))
               if f.name != "__init__.py" and f" {f.name} " not in layout]
    assert not missing, f"README's layout misses {missing}"


def test_long_modules_say_why_at_their_top():
    """A module over ~400 lines states at its top why it is one module."""
    long = [f for f in sorted(PACKAGE.rglob("*.py")) if len(f.read_text().splitlines()) > 420]
    silent = [str(f.relative_to(PACKAGE)) for f in long
              if "400 lines" not in (ast.get_docstring(ast.parse(f.read_text())) or "")]
    assert not silent, f"over 400 lines without a reason at the top: {silent}"


def test_lines_fit_120_columns():
    """Every line of the package fits 120 characters (the width its code and docstrings are wrapped to)."""
    long = [f"{f.relative_to(PACKAGE.parent)}:{i} ({len(line)})" for f in sorted(PACKAGE.rglob("*.py"))
            for i, line in enumerate(f.read_text().splitlines(), 1) if len(line) > 120]
    assert not long, f"lines over 120 characters: {', '.join(long)}"
