"""The one-way flow of docs/architecture.md, enforced: every `aimri` import (module-level, inside functions
and under TYPE_CHECKING alike) goes to the importing module's own layer or one below it, and no modules import
each other in a circle. A failure names the file and line of each offending import."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "aimri"

# bottom to top, as in docs/architecture.md; a module may import its own layer and those below it
LAYERS: list[set[str]] = [
    {"errors", "paths", "progress", "lazy", "plots", "run", "distributed", "devices"},
    {"subject", ""},  # "" = the package root, `aimri`: its exports are the subject's (and the Run)
    {"data"},
    {"dictionaries"},
    {"atlas", "autointerp", "features"},
    {"steering"},
    {"circuits"},
    {"diagnostics", "treatment"},
    {"report"},
    {"console"},
    {"cli", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(root: Path, path: Path) -> list[tuple[str, int]]:
    """(imported aimri module, line) for every import in the file, resolved to modules where a name is one."""
    package = _module_name(root, path) if path.name == "__init__.py" else _module_name(root, path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "aimri"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.split(".")[0] != "aimri":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = (root.parent / Path(*sub.split("."))).with_suffix(".py").exists() or (
                    root.parent / Path(*sub.split(".")) / "__init__.py"
                ).exists()
                found.append((sub if is_module else base, node.lineno))
    return found


def _layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def check(root: Path) -> tuple[list[str], list[str]]:
    """(imports against the layer order, import circles) in the package at `root`, each as text naming
    files and lines."""
    graph: dict[str, dict[str, tuple[str, int]]] = {}
    back: list[str] = []
    for path in sorted(root.rglob("*.py")):
        module, rel = _module_name(root, path), path.relative_to(root.parent)
        layer = _layer_of(module)
        if layer not in RANK:
            back.append(f"{rel}: {layer!r} is in no layer; add it to the layer order (docs/architecture.md)")
            continue
        for target, line in _imports(root, path):
            graph.setdefault(module, {})[target] = (str(rel), line)
            other = _layer_of(target)
            if other in RANK and RANK[other] > RANK[layer]:
                back.append(f"{rel}:{line}: {module} ({layer or 'aimri'}) imports {target} ({other}), a higher layer")
    return back, [" -> ".join(c) for c in _circles(graph)]


def _circles(graph: dict[str, dict[str, tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected groups of modules (Tarjan), each written as one circle with the import lines."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w == v or (v.startswith(w + ".") and w in graph):  # a module's own package is not a circle
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in list(graph):
        if v not in index:
            visit(v)
    out = []
    for group in groups:
        members = set(group)
        out.append(
            [
                f"{graph[a][b][0]}:{graph[a][b][1]} ({a} imports {b})"
                for a in sorted(members)
                for b in graph.get(a, {})
                if b in members
            ]
        )
    return out


def test_imports_follow_the_layer_order_and_make_no_circles() -> None:
    back, circles = check(SRC)
    assert not back, "imports against the layer order:\n" + "\n".join(back)
    assert not circles, "import circles:\n" + "\n".join(circles)


@pytest.mark.parametrize(
    ("file", "planted", "expect"),
    [
        ("subject/sites.py", "from aimri.cli import app\n", "subject/sites.py:{line}: aimri.subject.sites (subject) imports aimri.cli"),
        ("dictionaries/base.py", "def f():\n    from aimri.atlas.db import Atlas\n", "dictionaries/base.py:{line}"),
        ("steering/specs.py", "import aimri.report.pipeline\n", "steering/specs.py:{line}"),
    ],
    ids=["module-level", "inside-a-function", "plain-import"],
)  # fmt: skip
def test_a_planted_back_import_fails_naming_file_and_line(tmp_path: Path, file: str, planted: str, expect: str) -> None:
    root = tmp_path / "aimri"
    shutil.copytree(SRC, root, ignore=shutil.ignore_patterns("__pycache__", "static", "data"))
    target = root / file
    text = target.read_text()
    target.write_text(text + "\n" + planted)
    line = len((text + "\n").splitlines()) + planted.count("\n")
    back, _ = check(root)
    assert any(expect.format(line=line) in b for b in back), back


def test_a_planted_circle_is_named(tmp_path: Path) -> None:
    root = tmp_path / "aimri"
    shutil.copytree(SRC, root, ignore=shutil.ignore_patterns("__pycache__", "static", "data"))
    (root / "atlas" / "db.py").write_text(
        (root / "atlas" / "db.py").read_text() + "\nfrom aimri.atlas.build import build_atlas\n"
    )
    _, circles = check(root)
    assert any("aimri.atlas.db imports aimri.atlas.build" in c for c in circles), circles


def test_package_exports_resolve_and_shadow_no_submodule() -> None:
    """Each package's lazily exported names resolve to what they name, and none is also a submodule's name (a
    submodule, once imported, would replace the export on the package: `from pkg import f` would give a module)."""
    import importlib
    import types

    for init in sorted(SRC.glob("*/__init__.py")):
        package = importlib.import_module(f"aimri.{init.parent.name}")
        submodules = {p.stem for p in init.parent.glob("*.py")} | {
            p.parent.name for p in init.parent.glob("*/__init__.py")
        }
        for name in getattr(package, "__all__", []):
            assert name not in submodules, f"aimri.{init.parent.name} exports {name!r}, also a submodule's name"
            value = getattr(package, name)
            assert not isinstance(value, types.ModuleType), f"aimri.{init.parent.name}.{name} is a module"
