"""The package's import structure: dependencies point down, no cycles, no private names across modules.

The checker reads the source with :mod:`ast` (nothing is imported), builds the graph of imports
between the package's modules (``onnxq/`` and ``passes/``, which installs as ``onnxq.passes``) and
reports each violation with its file and line:

1. import cycles among module-level imports (``if TYPE_CHECKING:`` blocks excluded, they never run);
2. underscore-private names taken from another module (``from m import _x`` or ``m._x``);
3. analyses (sensitivity, search, calibration, graph, cost) importing the faces (``onnxq.cli``,
   ``onnxq.api``), anywhere in the module;
4. function-local imports of anything but an optional dependency or a library deferred for
   start-up time (scipy: most of a second that only ranking, LAPQ and the ILP need; every
   command would pay it, ``onnxq --help`` included).

The checker itself is tested on a small synthetic package, so it can fail.
"""

from __future__ import annotations

import ast
import configparser
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

import onnxq
from onnxq.version import __version__

ROOT = Path(__file__).resolve().parent.parent
#: Package name -> folder, as setup.cfg's package_dir maps them.
PACKAGE_DIRS: dict[str, Path] = {"onnxq": ROOT / "onnxq", "onnxq.passes": ROOT / "passes"}
ANALYSES: tuple[str, ...] = ("onnxq.sensitivity", "onnxq.search", "onnxq.calibration", "onnxq.graph", "onnxq.cost")
FACES: tuple[str, ...] = ("onnxq.cli", "onnxq.api")
#: Optional dependencies, and scipy (deferred for start-up time): the only ones a function may import lazily.
OPTIONAL_DEPS: frozenset[str] = frozenset({"ray", "matplotlib", "nncf", "psutil", "scipy"})


@dataclass(frozen=True)
class ImportEdge:
    """One imported module (and the names taken from it) at one place in the source."""

    importer: str
    target: str
    names: tuple[str, ...]
    path: Path
    line: int
    module_level: bool
    type_checking: bool

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line}"


@dataclass(frozen=True)
class PrivateUse:
    importer: str
    target: str
    name: str
    path: Path
    line: int


def discover_modules(package_dirs: Mapping[str, Path]) -> dict[str, Path]:
    """Every module name -> its file, for packages mapped to folders."""
    modules: dict[str, Path] = {}
    for package, folder in package_dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _ImportCollector(ast.NodeVisitor):
    """Collects the imports of one module, noting whether each runs at import time."""

    def __init__(self, module: str, path: Path, modules: Mapping[str, Path]) -> None:
        self.module, self.path, self.modules = module, path, modules
        self.is_package = path.name == "__init__.py"
        self.depth = 0
        self.type_checking = 0
        self.edges: list[ImportEdge] = []
        self.aliases: dict[str, str] = {}  # local name -> module it is bound to
        self.private_uses: list[PrivateUse] = []

    def _scope(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scope

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.type_checking += 1
            for child in node.body:
                self.visit(child)
            self.type_checking -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def _add(self, target: str, names: tuple[str, ...], line: int) -> None:
        self.edges.append(ImportEdge(self.module, target, names, self.path, line, self.depth == 0,
                                     self.type_checking > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, (), node.lineno)
            if alias.asname:
                self.aliases[alias.asname] = alias.name
            else:
                root = alias.name.split(".")[0]
                self.aliases[root] = root

    def _resolve(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.module.split(".")
        if not self.is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, node.module] if node.module else base)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = self._resolve(node)
        plain: list[str] = []
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in self.modules:
                self._add(submodule, (), node.lineno)
                self.aliases[alias.asname or alias.name] = submodule
            else:
                plain.append(alias.name)
        if plain or not node.names:
            self._add(source, tuple(plain), node.lineno)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain: list[str] = []
        current: ast.expr = node
        while isinstance(current, ast.Attribute):
            chain.append(current.attr)
            current = current.value
        if isinstance(current, ast.Name) and current.id in self.aliases:
            dotted = [*self.aliases[current.id].split("."), *reversed(chain)]
            for cut in range(len(dotted) - 1, 0, -1):
                prefix = ".".join(dotted[:cut])
                if prefix in self.modules:
                    name = dotted[cut]
                    if _is_private(name) and prefix != self.module and cut == len(dotted) - 1:
                        self.private_uses.append(PrivateUse(self.module, prefix, name, self.path, node.lineno))
                    break
        self.generic_visit(node)


@dataclass(frozen=True)
class ImportScan:
    root: Path
    modules: dict[str, Path]
    edges: tuple[ImportEdge, ...]
    private_attribute_uses: tuple[PrivateUse, ...]

    def internal(self) -> Iterator[ImportEdge]:
        return (e for e in self.edges if e.target in self.modules)


def scan(package_dirs: Mapping[str, Path], root: Path) -> ImportScan:
    modules = discover_modules(package_dirs)
    edges: list[ImportEdge] = []
    private: list[PrivateUse] = []
    for module, path in modules.items():
        collector = _ImportCollector(module, path, modules)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        edges += collector.edges
        private += collector.private_uses
    return ImportScan(root, modules, tuple(edges), tuple(private))


# -- the four rules -----------------------------------------------------------------------------------

def import_cycles(result: ImportScan, function_local: bool = False) -> list[str]:
    """One line per cycle of module-level imports (and function-local ones if asked), each edge with its file:line."""
    graph = nx.DiGraph()
    for edge in result.internal():
        if (edge.module_level or function_local) and not edge.type_checking and edge.importer != edge.target:
            if not graph.has_edge(edge.importer, edge.target):
                graph.add_edge(edge.importer, edge.target, where=edge.where(result.root))
    problems = []
    for component in sorted(sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1):
        inside = graph.subgraph(component)
        edges = "; ".join(f"{a} -> {b} ({inside.edges[a, b]['where']})" for a, b in sorted(inside.edges))
        problems.append(f"cycle among {len(component)} modules {component}, edges: {edges}")
    return problems


def private_imports(result: ImportScan) -> list[str]:
    """Underscore names taken from another module of the package."""
    problems = []
    for edge in result.internal():
        for name in edge.names:
            if _is_private(name) and edge.target != edge.importer:
                problems.append(f"{edge.where(result.root)}: {edge.importer} imports {edge.target}.{name}")
        last = edge.target.rsplit(".", 1)[-1]
        if not edge.names and _is_private(last):
            problems.append(f"{edge.where(result.root)}: {edge.importer} imports private module {edge.target}")
    for use in result.private_attribute_uses:
        problems.append(f"{use.path.relative_to(result.root)}:{use.line}: {use.importer} uses {use.target}.{use.name}")
    return sorted(set(problems), key=_by_place)


def _by_place(problem: str) -> tuple[str, int]:
    path, line = problem.split(":")[:2]
    return path, int(line)


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def analyses_importing_faces(result: ImportScan, analyses: tuple[str, ...] = ANALYSES,
                             faces: tuple[str, ...] = FACES) -> list[str]:
    edges = sorted((e for e in result.internal() if _within(e.importer, analyses) and _within(e.target, faces)),
                   key=lambda e: (e.path, e.line))
    return [f"{e.where(result.root)}: {e.importer} imports {e.target}" for e in edges]


def function_local_imports(result: ImportScan, optional: frozenset[str] = OPTIONAL_DEPS) -> list[str]:
    edges = sorted((e for e in result.edges if not e.module_level and e.target.split(".")[0] not in optional),
                   key=lambda e: (e.path, e.line))
    return [f"{e.where(result.root)}: {e.importer} imports {e.target} inside a function" for e in edges]


@pytest.fixture(scope="module")
def package() -> ImportScan:
    return scan(PACKAGE_DIRS, ROOT)


def _fail(problems: list[str], what: str) -> None:
    if problems:
        pytest.fail(f"{len(problems)} {what}:\n" + "\n".join(problems), pytrace=False)


def test_no_import_cycles(package: ImportScan) -> None:
    _fail(import_cycles(package), "import cycles")


def test_no_import_cycles_once_function_local_imports_are_hoisted(package: ImportScan) -> None:
    """The cycles that function-local imports hide today (rule 4 would turn them into real ones)."""
    _fail(import_cycles(package, function_local=True), "import cycles counting function-local imports")


def test_no_private_names_across_modules(package: ImportScan) -> None:
    _fail(private_imports(package), "private cross-module imports")


def test_analyses_do_not_import_the_cli_or_api(package: ImportScan) -> None:
    _fail(analyses_importing_faces(package), "analysis imports of the CLI/API")


def test_function_local_imports_only_for_optional_dependencies(package: ImportScan) -> None:
    _fail(function_local_imports(package), "function-local imports of required modules")


def test_scan_sees_the_whole_package(package: ImportScan) -> None:
    assert {"onnxq.cli", "onnxq.api", "onnxq.passes", "onnxq.passes.rewrite", "onnxq.sensitivity.analyze"} <= set(
        package.modules)
    assert any(e.importer == "onnxq.passes" and e.target == "onnxq.passes.rewrite" for e in package.edges)


def _write(folder: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_each_kind_of_violation(tmp_path: Path) -> None:
    _write(tmp_path / "pkg", {
        "__init__.py": "",
        "cli.py": "from pkg.core import helper\n",
        "core.py": "from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                   "from pkg import ring\nif TYPE_CHECKING:\n    from pkg.cli import x\n"
                   "def helper():\n    import json\n    import ray\n    return json\n_secret = 1\n",
        "ring.py": "from . import core\nfrom .core import _secret\nimport pkg.core\nvalue = pkg.core._secret\n",
        "sub/__init__.py": "",
        "sub/analysis.py": "def f():\n    from ..cli import main\n    from pkg.sub import _hidden\n",
        "sub/_hidden.py": "",
        "lazy.py": "def f():\n    from pkg import eager\n",
        "eager.py": "import pkg.lazy\n",
    })
    result = scan({"pkg": tmp_path / "pkg"}, tmp_path)
    cycles = import_cycles(result)
    assert len(cycles) == 1 and "pkg.core" in cycles[0] and "pkg.ring" in cycles[0]
    assert "pkg.cli" not in cycles[0]  # the TYPE_CHECKING import does not run
    lazy_cycles = import_cycles(result, function_local=True)
    assert len(lazy_cycles) == 2 and any("pkg.lazy" in line and "pkg.eager" in line for line in lazy_cycles)
    assert private_imports(result) == [
        "pkg/ring.py:2: pkg.ring imports pkg.core._secret",
        "pkg/ring.py:4: pkg.ring uses pkg.core._secret",
        "pkg/sub/analysis.py:3: pkg.sub.analysis imports private module pkg.sub._hidden",
    ]
    assert analyses_importing_faces(result, ("pkg.sub",), ("pkg.cli",)) == [
        "pkg/sub/analysis.py:2: pkg.sub.analysis imports pkg.cli"]
    local = function_local_imports(result)
    assert "pkg/core.py:7: pkg.core imports json inside a function" in local
    assert not any(" ray " in line for line in local)


def test_version_lives_in_a_leaf_module_that_setup_cfg_reads(package: ImportScan) -> None:
    """setup.cfg reads the version without importing the API, and ``onnxq.__version__`` still names it."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["metadata"]["version"].strip() == "attr: onnxq.version.__version__"
    assert not [e for e in package.edges if e.importer == "onnxq.version" and e.target.startswith("onnxq")]
    assert onnxq.__version__ == __version__


def test_the_cli_starts_without_scipy() -> None:
    """Every command, ``--help`` included, paid most of a second for scipy.stats before it was deferred."""
    probe = "import sys, onnxq.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy'))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
