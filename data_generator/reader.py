"""The reader interface: one :class:`Reader` per data format, and :class:`SplitSpec`, the typed name of one split.

Every format this program reads (class folders, ``.npz`` packs, each kind of benchmark file in
:mod:`data_generator.formats`) is one subclass of :class:`Reader`, registered once in
``data_generator.dataset_loader.READERS``. Detecting the format of a ``--dataset_dir``, the "holds no dataset" and
"holds several datasets" messages, turning ``--meta_test_dir``-style flags and printed specs back into a
:class:`SplitSpec`, loading (through the one cached build, :func:`data_generator.image_cache.cached`) and the
no-decoding look at a split for split hygiene all iterate that registry: adding a format is one subclass and its
registry line (docs/ARCHITECTURE.md, "Add a dataset format").

A reader answers, for a folder or file ``root`` and a :class:`SplitSpec`:

* :meth:`Reader.detect`: which datasets of this format ``root`` holds (cheap: names only, no file is read);
* :meth:`Reader.files`: the files one split is read from, relative to ``spec.path`` (the cache key covers each
  one's path, byte size and ``mtime_ns``, so a changed file gives a new entry); a missing file is a UserError;
* :meth:`Reader.prepare`: the split's class names (sorted), labels (grouped by class) and the ``fill`` that
  converts its images into the cache's array (:class:`data_generator.image_cache.Prepared`). Called only when
  the cache has no valid entry.

This module imports only :mod:`data_generator.image_cache` (for ``Prepared``): no reader, no registry.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from data_generator.image_cache import Prepared

__all__ = ["SplitSpec", "Reader", "SPLITS", "FOLDERS"]

#: The split names a dataset folder holds (class folders ``<root>/<split>``, benchmark files per split).
SPLITS = ("train", "val", "test")
#: The kind of the class-folder reader (a split folder ``<root>/<split>/<class>/<image>``).
FOLDERS = "folders"


@dataclass(frozen=True)
class SplitSpec:
    """One split of one dataset, as the reader of ``kind`` reads it.

    Attributes:
        path: what the reader opens: the split's folder of class folders (kind ``folders``), the pack file
            (``npz``), the folder that holds a benchmark's files (the kinds of :mod:`data_generator.formats`).
        kind: the reader's name in the registry (``folders``, ``npz``, ``csv``, ``metaoptnet``, ...).
        split: ``train``, ``val`` or ``test`` (for a class-folder split named by its path: the folder's name).
        benchmark: the benchmark the files hold (``miniImageNet``, ``FC100``, ...) where the format names one.

    ``str(spec)`` is its printable form, what messages and ``ImageSet.source`` show and what
    ``dataset_loader.parse_spec`` reads back (so ``--meta_test_dir`` may be given one): the folder itself for class
    folders, ``<path>#<split>`` for a format with no benchmark name (``data/glyphs100.npz#test``), else
    ``<path>#<kind>:<benchmark>:<split>`` (``data/fc100#metaoptnet:FC100:test``).
    """

    path: str
    kind: str
    split: str
    benchmark: str | None = None

    def __str__(self) -> str:
        if self.kind == FOLDERS:
            return self.path
        if self.benchmark is None:
            return f"{self.path}#{self.split}"
        return f"{self.path}#{self.kind}:{self.benchmark}:{self.split}"


class Reader:
    """One data format. Subclasses set the class attributes and implement :meth:`detect`, :meth:`files` and
    :meth:`prepare`; the other methods have the defaults of a format whose files sit in one folder.

    Attributes:
        kind: its name in the registry and in printed specs.
        title: what its files are, in words, for messages ("dataset pack", "CIFAR-100 (cifar-100-python)").
        expected: its files as the "holds no dataset this program reads (expected one of: ...)" line lists them
            ("" for a format that is a file, not a folder's content).
        benchmarks: the benchmarks its files can hold (``--dataset`` picks among several in one folder, and must name
            one of them in a printed spec); ``()`` for a format with no benchmark name (specs ``<path>#<split>``).
        fallback: detected only when no other reader detects anything (class folders, the official layout).
        cached: whether its splits go into the decoded-image cache (``.npz`` packs are small: loaded each time).
        lists_classes: :meth:`files` alone gives the class names (:meth:`classes`), so split hygiene can compare
            names of a split that has no cache entry.
    """

    kind: str = ""
    title: str = ""
    expected: str = ""
    benchmarks: tuple[str, ...] = ()
    fallback: bool = False
    cached: bool = True
    lists_classes: bool = False

    def detect(self, root: str) -> list[tuple[str, ...]]:
        """The datasets of this format in ``root`` (a folder, or a file for a format that is one): one entry each,
        the benchmarks it can give (one; several where ``--dataset`` chooses, as CIFAR-100; ``()`` when the format
        names none). ``[]``: none. Reads names only; never raises."""
        raise NotImplementedError

    def spec(self, root: str, split: str, benchmark: str | None = None) -> SplitSpec:
        """The spec of ``split`` of the dataset detected in ``root``."""
        return SplitSpec(root, self.kind, split, benchmark)

    def exists(self, spec: SplitSpec) -> bool:
        """Whether the split's source is there at all (split hygiene skips a split that does not exist)."""
        return os.path.isdir(spec.path)

    def files(self, spec: SplitSpec, quiet: bool = False) -> list[str]:
        """The files the split is read from, relative to ``spec.path`` with ``/`` separators, in a fixed order;
        UserError naming what is missing. ``quiet``: print nothing (split hygiene's look at a split)."""
        raise NotImplementedError

    def prepare(self, spec: SplitSpec, files: list[str], stored_size: int, num_workers: int) -> Prepared:
        """Read the split (``files`` as :meth:`files` gave them): class names sorted, labels int64 (N,) grouped by
        class, and ``fill(out)`` writing the images into uint8 (N, S, S, 3), S = ``stored_size``, each converted
        like a folder image (:mod:`data_generator.decoding`). ``num_workers``: decoding processes (0: this one)."""
        raise NotImplementedError

    def count(self, files: list[str]) -> int | None:
        """N when ``files`` alone tell it (one image per file), checked against a cache entry; else None."""
        return None

    def identity(self, spec: SplitSpec) -> str | None:
        """The line of the cache key that names the reader and the split (``None``: no such line)."""
        return f"format {self.kind} {spec.benchmark} {spec.split}"

    def record(self, spec: SplitSpec, prepared: Prepared) -> dict:
        """The reader's fields of a cache entry's record (beside ``source``, class names, labels, files)."""
        return {"format": self.kind, "benchmark": spec.benchmark, "split": spec.split,
                "image_files": prepared.files, "numbered_names": prepared.numbered_names}

    def classes(self, spec: SplitSpec, files: list[str]) -> tuple[list[str], np.ndarray] | None:
        """(class names (C,), labels int64 (N,)) from the listing alone, where :attr:`lists_classes`; else None."""
        return None
