"""Layers that point one way (docs/design.md, "Layers"), read from the source with ``ast``, never imported.

Every module of ``difflab/`` is checked for:

1. imports of difflab modules only from its own top-level package or from a package that
   :data:`LAYERS` allows (``difflab`` alone, the root ``__init__`` with ``__version__``, anyone may import);
2. no import of a difflab module inside a function, a method or a class body;
3. no private name (``_x``, not ``__dunder__``) of another package, imported (``from m import _x``)
   or reached through an imported module (``m._x``);
4. no import cycle between modules (strongly connected components of the module graph; an edge
   goes to the module named, or to the package ``__init__`` for ``from pkg import name``).

There are no exemptions. The tests at the end run the checker on small fake trees to show that
it finds each kind of violation.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "difflab"
DESIGN = ROOT / "docs" / "design.md"

_ALL = ("config", "progress", "core", "samplers", "nn", "data", "io", "adapters", "perf", "guidance", "pipelines", "train", "eval",
        "oracle", "demos", "studio")
# package -> the packages its modules may import (besides itself and the root ``difflab``); the same
# table is in docs/design.md, "## Layers" (test_the_design_doc_has_the_same_table).
LAYERS = {
    "config": (),
    "progress": (),
    "core": ("config", "progress"),
    "samplers": ("core", "config", "progress"),
    "nn": ("core", "config", "progress"),
    "data": ("core", "config", "progress"),
    "io": ("core", "nn", "data", "config", "progress"),
    "adapters": ("core", "nn", "io", "config", "progress"),
    "perf": ("core", "nn", "io", "config", "progress"),
    "guidance": ("core", "samplers", "nn", "adapters", "config", "progress"),
    "pipelines": ("core", "samplers", "guidance", "nn", "adapters", "io", "data", "config", "progress"),
    "train": ("core", "samplers", "guidance", "nn", "io", "adapters", "data", "perf", "pipelines", "config", "progress"),
    "eval": ("core", "samplers", "nn", "io", "data", "train", "config", "progress"),
    "oracle": ("core", "samplers", "eval", "config", "progress"),
    "demos": tuple(p for p in _ALL if p not in ("demos", "studio")),
    "studio": tuple(p for p in _ALL if p != "studio"),
    "cli": _ALL,
}


# ----------------------------------------------------------------------------------------------
# Reading the tree


@dataclass
class Import:
    """One difflab module named by an import statement of ``module``."""

    module: str        # the importing module
    target: str        # the difflab module imported (a package means its __init__)
    names: tuple       # the names taken from it (``from target import names``), () for ``import target``
    line: int
    nested: str | None  # the innermost enclosing function or class body, None at module level


@dataclass
class Tree:
    root: str                                   # the top package's name ("difflab")
    files: dict = field(default_factory=dict)   # module -> path
    imports: list = field(default_factory=list)
    attributes: list = field(default_factory=list)  # (module, line, target module, attribute name)


def module_name(path: Path, package_dir: Path) -> str:
    parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """The top-level package of a module: ``difflab.io.spec`` -> ``io``, ``difflab.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _scopes(tree: ast.AST):
    """(node, name of the innermost enclosing function or class, or None) for every node."""
    stack = [(tree, None)]
    while stack:
        node, scope = stack.pop()
        yield node, scope
        inner = scope
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner = f"function {node.name}()"
        elif isinstance(node, ast.ClassDef):
            inner = f"class {node.name}"
        elif isinstance(node, ast.Lambda):
            inner = "a lambda"
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def _read_module(tree: Tree, module: str, path: Path) -> None:
    """Add the difflab imports of one file, and the attributes it reads from imported modules."""
    source = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    bound = {}  # local name -> difflab module it is bound to
    for node, scope in _scopes(source):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == tree.root or alias.name.startswith(tree.root + "."):
                    tree.imports.append(Import(module, alias.name, (), node.lineno, scope))
                    bound[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else tree.root
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, is_package)
            if base != tree.root and not base.startswith(tree.root + "."):
                continue
            plain = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in tree.files:  # ``from pkg import module``: an edge to that module
                    tree.imports.append(Import(module, sub, (), node.lineno, scope))
                    bound[alias.asname or alias.name] = sub
                else:
                    plain.append(alias.name)
            if plain:
                tree.imports.append(Import(module, base, tuple(plain), node.lineno, scope))
    for node in ast.walk(source):
        if isinstance(node, ast.Attribute):
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.insert(0, value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in bound:
                target, rest = bound[value.id], chain
                while len(rest) > 1 and f"{target}.{rest[0]}" in tree.files:
                    target, rest = f"{target}.{rest[0]}", rest[1:]
                tree.attributes.append((module, node.lineno, target, rest[0]))


def read_tree(package_dir: Path) -> Tree:
    """Every module under ``package_dir`` and the difflab modules each one imports."""
    tree = Tree(package_dir.name)
    for path in sorted(package_dir.rglob("*.py")):
        tree.files[module_name(path, package_dir)] = path
    for module, path in tree.files.items():
        _read_module(tree, module, path)
    return tree


# ----------------------------------------------------------------------------------------------
# The checks


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _where(tree: Tree, module: str, line: int) -> str:
    return f"{tree.files[module].relative_to(tree.files[tree.root].parents[1]).as_posix()}:{line}"


def layer_violations(tree: Tree, layers: dict) -> list[str]:
    out = []
    for imp in tree.imports:
        src, dst = package_of(imp.module), package_of(imp.target)
        if src not in layers and src != tree.root:
            out.append(f"{_where(tree, imp.module, imp.line)}: package {src!r} is not in the layers table")
        elif dst not in (src, tree.root) and dst not in layers.get(src, ()):
            out.append(f"{_where(tree, imp.module, imp.line)}: {src} -> {dst} ({imp.module} imports {imp.target}); "
                       f"{src} may import only {', '.join(layers.get(src, ())) or 'nothing'}")
    return out


def nested_violations(tree: Tree) -> list[str]:
    return [f"{_where(tree, imp.module, imp.line)}: {imp.module} imports {imp.target} inside {imp.nested} "
            f"(import difflab modules at the top of the module)" for imp in tree.imports if imp.nested is not None]


def private_violations(tree: Tree) -> list[str]:
    out = []
    for imp in tree.imports:
        if package_of(imp.module) != package_of(imp.target):
            out += [f"{_where(tree, imp.module, imp.line)}: {imp.module} imports the private {imp.target}.{name}"
                    for name in imp.names if _private(name)]
    for module, line, target, name in tree.attributes:
        if package_of(module) != package_of(target) and _private(name):
            out.append(f"{_where(tree, module, line)}: {module} uses the private {target}.{name}")
    return out


def cycles(edges: dict) -> list[list[str]]:
    """The strongly connected components with more than one node, or a self-loop (Tarjan 1972)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
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
            if len(component) > 1 or v in edges.get(v, ()):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def cycle_violations(tree: Tree) -> list[str]:
    edges: dict[str, set] = {}
    lines = {}
    for imp in tree.imports:
        edges.setdefault(imp.module, set()).add(imp.target)
        lines.setdefault((imp.module, imp.target), imp.line)
    out = []
    for component in cycles(edges):
        inside = [f"{_where(tree, a, lines[a, b])} ({a} -> {b})" for a in component for b in sorted(edges.get(a, ()))
                  if b in component]
        out.append(f"import cycle between {', '.join(component)}: " + "; ".join(inside))
    return out


def _by_place(found: list[str]) -> list[str]:
    """Sorted by file, then line number."""
    def key(v):
        place = re.match(r"([^:]+):(\d+):", v)
        return (place.group(1), int(place.group(2))) if place else (v, 0)
    return sorted(found, key=key)


def violations(package_dir: Path, layers: dict) -> list[str]:
    """Every violation under ``package_dir``, one line each: layers, nested imports, private names, then cycles."""
    tree = read_tree(package_dir)
    return (_by_place(layer_violations(tree, layers)) + _by_place(nested_violations(tree))
            + _by_place(private_violations(tree)) + cycle_violations(tree))


# ----------------------------------------------------------------------------------------------
# difflab itself


def test_difflab_respects_the_layers():
    found = violations(PACKAGE, LAYERS)
    if found:
        pytest.fail(f"{len(found)} layering violations (docs/design.md, 'Layers'):\n  " + "\n  ".join(found), pytrace=False)


def read_doc_table(text: str) -> dict:
    """The ``| package | may import |`` table of the "## Layers" section as {package: (packages...)}."""
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # header and rule first
    table = {}
    for row in rows:
        package, allowed = (cell.strip() for cell in row.strip().strip("|").split("|"))
        table[re.sub(r"[`*]", "", package).split()[0]] = tuple(re.findall(r"[a-z_]+", allowed))
    return table


def test_the_design_doc_has_the_same_table():
    text = DESIGN.read_text(encoding="utf-8")
    assert "\n## Layers" in text, "docs/design.md has no '## Layers' section"
    assert read_doc_table(text) == LAYERS


def test_the_table_points_one_way():
    edges = {p: set(allowed) for p, allowed in LAYERS.items()}
    assert not cycles(edges)
    assert all(q in LAYERS for allowed in LAYERS.values() for q in allowed)
    assert set(LAYERS) == {package_of(m) for m in read_tree(PACKAGE).files if m != "difflab"}


# ----------------------------------------------------------------------------------------------
# The checker finds what it should: a fake tree with one violation of each kind


def _write(root: Path, files: dict) -> Path:
    for name, text in files.items():
        path = root / "difflab" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "difflab"


CLEAN = {
    "__init__.py": "__version__ = '0'\n",
    "config.py": "",
    "core/__init__.py": "from .grids import karras\n",
    "core/grids.py": "from ..config import x\n\ndef karras():\n    return 1\n",
    "train/__init__.py": "from .loop import fit\n",
    "train/loop.py": "import difflab.core.grids\nfrom difflab import __version__\nfrom ..core import karras\n",
}


def test_a_clean_fake_tree_passes(tmp_path):
    assert violations(_write(tmp_path, CLEAN), LAYERS) == []


def test_a_back_edge_is_reported(tmp_path):
    found = violations(_write(tmp_path, {**CLEAN, "core/bad.py": "from ..train.loop import fit\n"}), LAYERS)
    assert len(found) == 1 and "difflab/core/bad.py:1: core -> train" in found[0], found
    found = violations(_write(tmp_path, {**CLEAN, "core/bad.py": "import difflab.train\n"}), LAYERS)
    assert len(found) == 1 and "core -> train" in found[0], found


def test_an_unknown_package_is_reported(tmp_path):
    found = violations(_write(tmp_path, {**CLEAN, "video/net.py": "from ..core import karras\n"}), LAYERS)
    assert found == ["difflab/video/net.py:1: package 'video' is not in the layers table"], found


def test_function_and_class_level_imports_are_reported(tmp_path):
    files = {**CLEAN, "core/lazy.py": "import math\n\ndef f():\n    import json\n    from . import grids\n    return grids\n",
             "core/body.py": "class A:\n    from .grids import karras\n\n    def m(self):\n        import difflab.config\n"}
    found = violations(_write(tmp_path, files), LAYERS)
    assert sorted(found) == sorted([
        "difflab/core/lazy.py:5: difflab.core.lazy imports difflab.core.grids inside function f() "
        "(import difflab modules at the top of the module)",
        "difflab/core/body.py:2: difflab.core.body imports difflab.core.grids inside class A "
        "(import difflab modules at the top of the module)",
        "difflab/core/body.py:5: difflab.core.body imports difflab.config inside function m() "
        "(import difflab modules at the top of the module)"]), found


def test_private_names_across_packages_are_reported(tmp_path):
    files = {**CLEAN, "core/grids.py": "def _check():\n    pass\n\ndef karras():\n    return 1\n",
             "core/ok.py": "from .grids import _check\n",  # same package: allowed
             "train/peek.py": "from ..core.grids import _check, karras\n",
             "train/reach.py": "from ..core import grids\nimport difflab.core.grids as g\n\ngrids._check()\ng._check()\n"}
    found = violations(_write(tmp_path, files), LAYERS)
    assert sorted(found) == sorted([
        "difflab/train/peek.py:1: difflab.train.peek imports the private difflab.core.grids._check",
        "difflab/train/reach.py:4: difflab.train.reach uses the private difflab.core.grids._check",
        "difflab/train/reach.py:5: difflab.train.reach uses the private difflab.core.grids._check"]), found


def test_a_cycle_is_reported(tmp_path):
    files = {**CLEAN, "core/a.py": "from .b import y\nx = 1\n", "core/b.py": "from . import c\ny = 2\n",
             "core/c.py": "from .a import x\n"}
    found = violations(_write(tmp_path, files), LAYERS)
    assert len(found) == 1 and found[0].startswith("import cycle between difflab.core.a, difflab.core.b, difflab.core.c"), found
    assert "difflab/core/b.py:1 (difflab.core.b -> difflab.core.c)" in found[0]


def test_an_edge_injected_into_the_real_tree_is_reported():
    tree = read_tree(PACKAGE)
    tree.imports.append(Import("difflab.core.grids", "difflab.train.loop", ("fit",), 1, None))
    found = layer_violations(tree, LAYERS)
    assert any(v.startswith("difflab/core/grids.py:1: core -> train") for v in found), found
    tree.imports.append(Import("difflab.core.grids", "difflab.samplers.common", (), 1, None))  # samplers.common imports core.grids
    assert any("difflab.core.grids" in v and "difflab.samplers.common" in v for v in cycle_violations(tree))
