"""Reading pickles from outside without running their code.

A pickle is a program: ``pickle.load`` calls whatever global the file names (``os.system`` included). The benchmark
pickles researchers hold (MetaOptNet / RFS ``*.pickle``, learn2learn ``*.pkl`` caches, tieredImageNet ``*_labels.pkl``,
the CIFAR-100 python release) and the official TensorFlow MTL weights (``weights.npy``: an object array, i.e. a
pickle behind an ``.npy`` header) only ever hold containers, strings, numbers and numpy arrays. :class:`SafeUnpickler`
admits exactly the globals needed to rebuild those and refuses every other one *before* it is called, so a crafted
file raises a one-line :class:`utils.errors.UserError` naming the file and the refused global, and nothing of it runs.

Admitted globals (each only rebuilds data):

* numpy's array and scalar reconstructors, under numpy 1 names (``numpy.core.*``, what Python 2 and older numpy
  wrote) and numpy 2 names (``numpy._core.*``): ``multiarray._reconstruct``, ``multiarray.scalar``, ``numpy.ndarray``,
  ``numpy.dtype``;
* ``_codecs.encode`` (Python 3 protocol-2 pickles store ``bytes`` as ``_codecs.encode(str, "latin1")``) and the
  builtin containers ``bytearray``, ``set``, ``frozenset``, ``complex``, ``slice``, ``range``;
* ``collections.OrderedDict`` and ``collections.defaultdict`` (the latter only with ``list``/``dict``/``int``
  factories, which are also admitted as globals).

Python 2 pickles hold byte strings; they are decoded with ``encoding="latin1"`` (the only encoding that maps every
byte and that numpy's array reconstructor expects for Python-2 array data), as every public loader of these files
does.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Any, BinaryIO

import numpy as np

from utils.errors import UserError

__all__ = ["SafeUnpickler", "load_pickle", "loads_pickle", "load_object_npy", "ALLOWED_GLOBALS"]

_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")

#: (module, name) pairs a pickle may reference. Everything else is refused.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [(m, n) for m in _NUMPY_CORE for n in ("_reconstruct", "scalar")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
       ("numpy._core.numeric", "_frombuffer")]
    + [("_codecs", "encode")]
    + [(b, n) for b in ("builtins", "__builtin__")
       for n in ("bytearray", "set", "frozenset", "complex", "slice", "range", "list", "dict", "int", "float",
                 "str", "bytes", "tuple", "bool")]
    + [("collections", "OrderedDict"), ("collections", "defaultdict")]
)


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose :meth:`find_class` admits only :data:`ALLOWED_GLOBALS`.

    ``find_class`` runs when the pickle *names* a global, before anything is called, so a refused file stops with
    nothing executed. ``source`` names the file in the error message.
    """

    def __init__(self, file: BinaryIO, source: str, encoding: str = "latin1") -> None:
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        # numpy >= 2 keeps numpy.core as an alias that warns on import; map the old name to the new one.
        if (module, name) not in ALLOWED_GLOBALS:
            raise UserError(f"{self.source}: refused to unpickle {module}.{name} (only arrays, numbers, strings "
                            f"and containers are read from outside files; this file would run code)")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]
        if module == "__builtin__":
            module = "builtins"
        return super().find_class(module, name)


def loads_pickle(data: bytes, source: str, encoding: str = "latin1") -> Any:
    """Unpickle ``data`` (bytes) with :class:`SafeUnpickler`; any failure is a one-line ``UserError`` naming ``source``."""
    return _unpickle(io.BytesIO(data), source, encoding)


def load_pickle(path: str, encoding: str = "latin1") -> Any:
    """Load the pickle file ``path`` safely (see the module docstring) or raise a one-line ``UserError``."""
    if not os.path.isfile(path):
        raise UserError(f"file not found: {path}")
    with open(path, "rb") as f:
        return _unpickle(f, path, encoding)


def _unpickle(f: BinaryIO, source: str, encoding: str) -> Any:
    try:
        return SafeUnpickler(f, source, encoding=encoding).load()
    except UserError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, UnicodeDecodeError, MemoryError) as e:
        raise UserError(f"{source} is not a readable pickle (truncated or corrupt?): {type(e).__name__}: "
                        f"{str(e)[:120]}")


def load_object_npy(path: str) -> Any:
    """Read an ``.npy`` file that holds a pickled object (what ``np.save`` writes for a dict, e.g. the official
    TensorFlow MTL ``weights.npy``) without running code; returns the object (``.tolist()`` of a 0-d object array,
    the array itself otherwise).

    This is ``np.load(path, allow_pickle=True, encoding="latin1").tolist()`` with :class:`SafeUnpickler` in place
    of numpy's unrestricted unpickling. A plain numeric ``.npy`` is returned as its array.
    """
    if not os.path.isfile(path):
        raise UserError(f"file not found: {path}")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except ValueError as e:
            raise UserError(f"{path} is not a readable .npy file: {str(e)[:120]}")
        if not dtype.hasobject:
            f.seek(0)
            try:
                return np.load(f, allow_pickle=False)
            except ValueError as e:
                raise UserError(f"{path} is not a readable .npy file: {str(e)[:120]}")
        obj = _unpickle(f, path, "latin1")
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == ():
        return obj.item()
    return obj
