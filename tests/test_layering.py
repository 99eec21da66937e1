"""The layers of the code, bottom to top, and the three rules of the import graph (docs/ARCHITECTURE.md, "Layers").

1. **Layers.** Every top-level package or module of the repository has a place in :data:`LAYERS`, and imports only
   from its own layer or a layer below it: ``utils`` (the bottom shelf) < ``data_generator`` < ``models`` <
   ``config`` (the flags and the typed settings) < ``trainer`` < ``main`` < ``run_experiment`` < ``tools``.
   ``tests`` may import anything and is not checked.
2. **No import cycle** between the modules of the non-test code.
3. **No private name imported across modules**: ``from x import _y`` (a leading underscore, not a dunder) or
   ``import a._b``: what another module uses is part of its public interface, and named so.

Every file is parsed with ``ast``: an import inside a function counts as much as one at the top of a module (a lazy
import of a higher layer is still a dependency on it), and a relative import is resolved to its module.
"""
from __future__ import annotations

import ast
import os
from functools import lru_cache

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("utils", "data_generator", "models", "config", "trainer", "main", "run_experiment", "tools")
"""Bottom to top; each name is a top-level package (folder with ``__init__.py``) or module (``name.py``)."""
NOT_CODE = {"tests", "conftest", "data", "docs", "logs"}  # tests may import anything; the rest holds no module


def top_level_names() -> set[str]:
    """The top-level packages (a folder holding ``.py`` files; ``trainer/`` is a namespace package, without
    ``__init__.py``) and modules of the repository (``tests``, ``conftest`` and hidden folders left out)."""
    names = set()
    for entry in os.listdir(REPO):
        path = os.path.join(REPO, entry)
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isdir(path) and not entry.startswith(".") and any(f.endswith(".py") for f in os.listdir(path)):
            names.add(entry)
    return names - NOT_CODE


@lru_cache(maxsize=None)
def modules() -> dict[str, str]:
    """Every non-test module: its dotted name -> its path relative to the repository."""
    out = {}
    for top in sorted(top_level_names()):
        if os.path.isfile(os.path.join(REPO, f"{top}.py")):
            out[top] = f"{top}.py"
            continue
        for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, top)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for f in sorted(filenames):
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), REPO)
                    name = rel[:-3].replace(os.sep, ".")
                    out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = rel
    return out


def imports(source: str, module: str = "m", is_package: bool = False) -> list[tuple[int, str, list[str]]]:
    """``(line, module imported, names imported from it)`` for every import anywhere in ``source`` (inside functions
    and classes too). ``from .x import y`` is resolved against ``module`` (a package's ``__init__`` resolves against
    itself); ``import a.b`` gives ``("a.b", [])``."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name, [alias.name for alias in node.names]))
    return found


def layer_of(module: str) -> int | None:
    """The index of ``module``'s layer in :data:`LAYERS`; None for anything outside the repository (torch, os)."""
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else None


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """``"line N: import X (layer L)"`` for every import of ``source`` (the code of ``module``) from a layer above
    ``module``'s own."""
    own = layer_of(module)
    bad = []
    for line, name, _ in imports(source, module, is_package):
        layer = layer_of(name)
        if own is not None and layer is not None and layer > own:
            bad.append(f"line {line}: import {name} (layer {LAYERS[layer]}, above {LAYERS[own]})")
    return bad


def private_imports(source: str, module: str = "m", is_package: bool = False) -> list[str]:
    """``"line N: _name from X"`` for every private name (one leading underscore, not a dunder) that ``source``
    imports from another module, or a private module it imports (``import a._b``, ``from a import _b``)."""
    def private(n: str) -> bool:
        return n.startswith("_") and not n.startswith("__")

    bad = []
    for line, name, names in imports(source, module, is_package):
        if name == "__future__":
            continue
        bad += [f"line {line}: {name} is a private module" for part in name.split(".") if private(part)][:1]
        bad += [f"line {line}: {n} from {name}" for n in names if private(n)]
    return bad


def read(module: str) -> tuple[str, bool]:
    path = modules()[module]
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read(), path.endswith("__init__.py")


def import_graph() -> dict[str, set[str]]:
    """module -> the repository's modules it imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    known = modules()
    graph = {}
    for module in known:
        source, is_package = read(module)
        deps = set()
        for _, name, names in imports(source, module, is_package):
            subs = [f"{name}.{n}" for n in names if f"{name}.{n}" in known]
            deps.update(subs or ([name] if name in known else []))
            if subs and len(subs) < len(names) and name in known:  # names that are attributes of the package
                deps.add(name)
        graph[module] = deps - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """The modules of ``graph`` that are on an import cycle (that reach themselves)."""
    def reaches_itself(start: str) -> bool:
        seen, todo = set(), list(graph.get(start, ()))
        while todo:
            m = todo.pop()
            if m == start:
                return True
            if m not in seen:
                seen.add(m)
                todo += graph.get(m, ())
        return False

    return sorted(m for m in graph if reaches_itself(m))


# ----------------------------------------------------------------------------------------------------- the tree
def test_every_top_level_package_has_a_layer():
    """A new top-level package or module must be placed in LAYERS (otherwise nothing checks what it imports)."""
    assert top_level_names() == set(LAYERS), f"not in LAYERS: {sorted(top_level_names() - set(LAYERS))}; " \
                                             f"in LAYERS but absent: {sorted(set(LAYERS) - top_level_names())}"


def test_the_modules_are_found():
    assert {"utils.misc", "models.mtl", "data_generator.dataset_loader", "trainer.base", "main",
            "run_experiment", "tools.glyphs.cli"} <= set(modules())


@pytest.mark.parametrize("module", sorted(modules()))
def test_each_module_imports_only_its_own_layer_or_below(module):
    source, is_package = read(module)
    bad = upward_imports(source, module, is_package)
    assert not bad, f"{modules()[module]} imports from a layer above its own: {'; '.join(bad)}"


def test_no_import_cycle():
    graph = import_graph()
    assert not cycles(graph), f"import cycle among {cycles(graph)}"


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_private_name_is_imported_across_modules(module):
    source, is_package = read(module)
    bad = private_imports(source, module, is_package)
    assert not bad, f"{modules()[module]} imports private names: {'; '.join(bad)}"


# ---------------------------------------------------------------------------------------- the checkers themselves
@pytest.mark.parametrize("module, source", [
    ("utils.options", "from models.heads import HEADS"),
    ("utils.misc", "import os, trainer.meta"),
    ("data_generator.formats", "from models import mtl"),
    ("models.mtl", "from config.settings import Settings"),
    ("models.heads", "def f():\n    if True:\n        from trainer import pre\n    return pre"),
    ("config.options", "class C:\n    def m(self):\n        import trainer.base\n"),
    ("trainer.meta", "import main"),
    ("main", "from run_experiment import demo"),
    ("run_experiment", "from tools.glyphs.pack import ensure_benchmark"),
])
def test_an_upward_import_is_caught(module, source):
    assert upward_imports(source, module)


@pytest.mark.parametrize("module, source", [
    ("utils.misc", "import os\nimport torch\nfrom utils.errors import UserError"),
    ("models.mtl", "from . import heads\nfrom .conv2d_mtl import Conv2dMtl\nfrom data_generator import layout"),
    ("config.options", "from models.heads import HEADS\nfrom utils.gpu_tools import AMP_DTYPES"),
    ("trainer.base", "from config.settings import Settings\nfrom models.evaluate import evaluate"),
    ("tools.benchmark", "import main\nfrom trainer.meta import MetaTrainer\nfrom run_experiment import demo"),
    ("models.mtl", "import trainers\nfrom toolsx import y\nimport mainframe\nfrom data_generator.main_split import z"),
    ("utils.misc", "x = 'import trainer'  # a string, not an import"),
])
def test_an_allowed_import_passes(module, source):
    assert not upward_imports(source, module)


def test_a_relative_import_is_resolved():
    assert imports("from .heads import HEADS", "models.mtl") == [(1, "models.heads", ["HEADS"])]
    assert imports("from . import heads", "models", is_package=True) == [(1, "models", ["heads"])]
    assert imports("from ..misc import x", "utils.sub.mod") == [(1, "utils.misc", ["x"])]
    assert upward_imports("from ..trainer import base", "models.sub.mod") == []  # (models.trainer: not a layer up)


@pytest.mark.parametrize("source, caught", [
    ("from tools.glyphs.cli import _cli", True),
    ("def f():\n    from utils.misc import _host_tag\n", True),
    ("import utils._private", True),
    ("from . import _impl", True),
    ("from __future__ import annotations", False),
    ("from utils.misc import atomic_write, __all__", False),
    ("import os._exit_x", True),
    ("x = obj._attr  # an attribute, not an import", False),
])
def test_a_private_import_is_caught(source, caught):
    assert bool(private_imports(source, "a.b")) is caught


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c"]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
