"""The library is the bottom shelf: nothing under ``utils/``, ``models/`` or ``data_generator/`` imports the trainer,
the entry points (``main``, ``run_experiment``) or the applications in ``tools/``, at module level or inside a
function. Checked by parsing every file with ``ast``, so a lazy import counts as much as a top-level one."""
from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ("utils", "models", "data_generator")
FORBIDDEN = ("trainer", "run_experiment", "tools", "main")


def library_files() -> list[str]:
    """Every .py file under the library packages, relative to the repository."""
    out = []
    for pkg in LIBRARY:
        for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, pkg)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            out += [os.path.relpath(os.path.join(dirpath, f), REPO) for f in sorted(filenames) if f.endswith(".py")]
    return out


def forbidden_imports(source: str, filename: str = "<string>") -> list[str]:
    """``"line N: import X"`` for every import of a forbidden top-level package anywhere in ``source``.

    Relative imports (``from . import x``, ``from .mod import y``) stay inside the library and are allowed.
    """
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in FORBIDDEN:
                found.append(f"line {node.lineno}: import {name}")
    return found


def test_the_library_files_are_found():
    files = library_files()
    assert {"utils/misc.py", "models/mtl.py", "data_generator/dataset_loader.py"} <= set(files)


@pytest.mark.parametrize("path", library_files())
def test_library_does_not_import_applications(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        bad = forbidden_imports(f.read(), path)
    assert not bad, f"{path} imports code above the library: {'; '.join(bad)}"


@pytest.mark.parametrize("source", [
    "import trainer.meta",
    "from trainer.evaluate import encode_split",
    "import run_experiment as rx",
    "from tools import glyphs",
    "from tools.glyphs.pack import ensure_benchmark",
    "import os, main",
    "def f():\n    if True:\n        from trainer import pre\n    return pre",
    "class C:\n    def m(self):\n        import tools.benchmark\n",
])
def test_a_bad_import_is_caught(source):
    assert forbidden_imports(source)


@pytest.mark.parametrize("source", [
    "import os\nimport torch\nfrom utils.misc import mean_ci",
    "from . import dataset_loader\nfrom .conv2d_mtl import Conv2dMtl",
    "import trainers\nfrom toolsx import y\nimport mainframe\nfrom data_generator.main_split import z",
    "x = 'import trainer'  # a string, not an import",
])
def test_allowed_imports_pass(source):
    assert not forbidden_imports(source)
