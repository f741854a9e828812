"""The package's shape: no import cycles, no reaching into another module's private names, no function
hiding a module of the same name, every exception in errors.py.

The import graph is built from the source (every ``import`` and ``from ... import``, lazy imports inside
functions included) with networkx; a package's ``__init__`` may import its own submodules.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import fxlora
import fxlora.errors
import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"fxlora": ROOT / "fxlora", "fxlora.passes": ROOT / "passes", "fxlora.tools": ROOT / "tools"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if _modules()[module].stem == "__init__" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(modules: dict[str, Path]):
    """(importer, imported fxlora module, names taken from it, line) for every import in the package."""
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        yield module, alias.name, (), node.lineno
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, node)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:  # `from fxlora import provenance`: the submodule itself
                        yield module, sub, (), node.lineno
                    elif target in modules:
                        yield module, target, (alias.name,), node.lineno


def test_the_import_graph_has_no_cycles():
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for importer, imported, _, _ in _imports(modules):
        if importer != imported:
            graph.add_edge(importer, imported)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles}"
    assert len(graph) > 20 and graph.number_of_edges() > 40  # the graph was really built


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    offences = [
        f"{importer}:{line} takes {name} from {imported}"
        for importer, imported, names, line in _imports(modules)
        for name in names
        if name.startswith("_") and not name.startswith("__") and importer != imported
    ]
    assert not offences, offences


def test_no_public_function_hides_a_module_of_the_same_name():
    for name in _modules():
        package, _, leaf = name.rpartition(".")
        if not package:
            continue
        attribute = getattr(importlib.import_module(package), leaf, None)
        assert attribute is None or inspect.ismodule(attribute), f"{package}.{leaf} is a {type(attribute).__name__}"
    for name in ("plan", "capture", "report", "rewrite", "fold"):
        assert callable(getattr(fxlora, name)) and not inspect.ismodule(getattr(fxlora, name))


def test_every_exception_lives_in_errors_and_derives_from_its_builtin():
    modules = _modules()
    for module, path in modules.items():
        if module == "fxlora.errors":
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:  # fxlora.triton_lora where triton is not installed
            assert e.name == "triton", e
            assert "class " not in path.read_text().replace("class Config", "")  # defines no exception
            continue
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == module:
                # only private, locally caught signals may live elsewhere
                assert obj.__name__.startswith("_"), f"{obj.__name__} is defined in {module}, not fxlora.errors"
            if isinstance(obj, type) and issubclass(obj, fxlora.FxLoraError):
                assert obj.__module__ == "fxlora.errors", f"{obj.__name__} is defined in {obj.__module__}"
    builtins = {
        "ArgumentError": ValueError,
        "RuleError": ValueError,
        "CheckpointError": ValueError,
        "FoldError": ValueError,
        "TraceError": RuntimeError,
        "ExportError": RuntimeError,
        "NotRewrittenError": TypeError,
        "LoraOpError": ValueError,
        "PassContractError": AssertionError,
        "UsageError": ValueError,
    }
    for name in fxlora.errors.__all__:
        if name == "FxLoraError":
            continue
        cls = getattr(fxlora.errors, name)
        assert issubclass(cls, fxlora.FxLoraError) and issubclass(cls, builtins[name]), name
        assert builtins[name].__name__ in fxlora.errors.__doc__.split(name, 1)[1].splitlines()[0]
