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

__all__ = ["SafeUnpickler", "load_pickle", "loads_pickle", "load_object_npy", "stream_pickle_list", "ALLOWED_GLOBALS"]

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
        return super().find_class(*_checked_global(self.source, module, name))


def _checked_global(source: str, module: str, name: str) -> tuple[str, str]:
    """``(module, name)`` to import when the pair is admitted (numpy 1 names mapped to numpy 2's), else UserError."""
    if (module, name) not in ALLOWED_GLOBALS:
        raise UserError(f"{source}: refused to unpickle {module}.{name} (only arrays, numbers, strings "
                        f"and containers are read from outside files; this file would run code)")
    # numpy >= 2 keeps numpy.core as an alias that warns on import; map the old name to the new one.
    if module.startswith("numpy.core") and hasattr(np, "_core"):
        module = "numpy._core" + module[len("numpy.core"):]
    if module == "__builtin__":
        module = "builtins"
    return module, name


def loads_pickle(data: bytes, source: str, encoding: str = "latin1") -> Any:
    """Unpickle ``data`` (bytes) with :class:`SafeUnpickler`; any failure is a one-line ``UserError`` naming ``source``."""
    return _unpickle(io.BytesIO(data), source, encoding)


def _open(path: str) -> BinaryIO:
    """``open(path, "rb")``; a file that is missing or cannot be read is a one-line ``UserError`` naming it."""
    if not os.path.isfile(path):
        raise UserError(f"file not found: {path}")
    try:
        return open(path, "rb")
    except PermissionError:
        raise UserError(f"cannot read {path}: permission denied (make it readable for this user, e.g. "
                        "chmod a+r)") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def load_pickle(path: str, encoding: str = "latin1") -> Any:
    """Load the pickle file ``path`` safely (see the module docstring) or raise a one-line ``UserError``."""
    with _open(path) as f:
        return _unpickle(f, path, encoding)


def _unpickle(f: BinaryIO, source: str, encoding: str) -> Any:
    return _load_reporting(SafeUnpickler(f, source, encoding=encoding), source)


def _load_reporting(unpickler: pickle.Unpickler, source: str) -> Any:
    """``unpickler.load()``; a truncated or corrupt file is a one-line ``UserError`` naming ``source`` (a refused
    global already is one)."""
    try:
        return unpickler.load()
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
    with _open(path) as f:
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


# ---------------------------------------------------------------------------------------------------------------------
# Streaming a pickled list (tieredImageNet ``*_images_png.pkl``: a list of 448,695 PNG byte arrays for train)
# ---------------------------------------------------------------------------------------------------------------------
#: Memo entries larger than this (arrays, byte strings, long strings) are dropped once their list item is handed on.
_STREAM_KEEP_BYTES = 256


def _is_bulky(v: Any) -> bool:
    if isinstance(v, np.ndarray):
        return True
    if isinstance(v, (bytes, bytearray, str)):
        return len(v) > _STREAM_KEEP_BYTES
    return isinstance(v, (tuple, list, dict))


class _ListStreamer(pickle._Unpickler):  # the pure-Python unpickler: its opcode table can be overridden
    """Unpickles a file whose top-level object is a list, handing each item to ``on_item(index, item)`` as soon
    as it is appended instead of keeping it: the memory held is one ``APPENDS`` batch (pickle writes 1,000 items
    per batch), not the whole list. Globals are admitted exactly as by :class:`SafeUnpickler`."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: BinaryIO, source: str, on_item, encoding: str = "latin1") -> None:
        super().__init__(file, encoding=encoding)
        self.source = source
        self.on_item = on_item
        self.root: list | None = None
        self.count = 0

    def find_class(self, module: str, name: str) -> Any:
        return pickle._Unpickler.find_class(self, *_checked_global(self.source, module, name))

    def _hand_on(self, items) -> None:
        for item in items:
            self.on_item(self.count, item)
            self.count += 1
        # the pickler memoised every array / byte string it wrote; forget them, keep the shared small objects
        # (globals, the dtype, short strings) that later items refer back to
        for k in [k for k, v in self.memo.items() if _is_bulky(v)]:
            del self.memo[k]

    def load_empty_list(self) -> None:
        lst: list = []
        if self.root is None and not self.stack and not self.metastack:
            self.root = lst
        self.append(lst)

    dispatch[pickle.EMPTY_LIST[0]] = load_empty_list

    def load_appends(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        if target is self.root:
            self._hand_on(items)
        elif isinstance(target, list):
            target.extend(items)
        else:
            raise pickle.UnpicklingError("APPENDS to a non-list")

    dispatch[pickle.APPENDS[0]] = load_appends

    def load_append(self) -> None:
        value = self.stack.pop()
        target = self.stack[-1]
        if target is self.root:
            self._hand_on([value])
        elif isinstance(target, list):
            target.append(value)
        else:
            raise pickle.UnpicklingError("APPEND to a non-list")

    dispatch[pickle.APPEND[0]] = load_append


def stream_pickle_list(path: str, on_item, encoding: str = "latin1") -> int:
    """Read the pickle file ``path``, whose top-level object is a list, item by item: ``on_item(i, item)`` is called
    for each item in order and the item is then dropped. Returns the number of items. Same admission rules and
    errors as :func:`load_pickle` (a refused global stops it before it runs; a ``UserError`` raised by ``on_item``
    passes through); a file whose top level is not a list is a ``UserError``."""
    with _open(path) as f:
        streamer = _ListStreamer(f, path, on_item, encoding)
        top = _load_reporting(streamer, path)
    if top is not streamer.root:
        raise UserError(f"{path}: expected a pickled list, found {type(top).__name__}")
    return streamer.count
