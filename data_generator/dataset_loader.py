"""The registry of data readers and the one entry point the trainers call: a split spec -> :class:`ImageSet`.

:data:`READERS` lists every format this program reads, one :class:`~data_generator.reader.Reader` each: ``.npz``
packs (:mod:`data_generator.packs`), class folders ``<root>/<split>/<class>/<image>`` (:mod:`data_generator.folders`,
the official layout and the fallback) and the benchmark files of other few-shot code (:mod:`data_generator.formats`:
csv, MetaOptNet/RFS pickles, learn2learn, tieredImageNet, cifar-100-python). Everything that depends on the format
iterates it:

* :func:`split_spec` detects what ``--dataset_dir`` holds and returns the typed :class:`SplitSpec` of one split; a
  folder with no known format, several benchmarks that ``--dataset`` does not decide between, or CIFAR-100 without
  ``--dataset`` is one UserError line (docs/ERRORS.md E36, E47, E37);
* :func:`role_spec` does the same for a role flag (``--meta_test_dir`` etc.): a folder or pack a reader detects
  gives the role's split, anything else is read as the printable form of one split (:func:`parse_spec`:
  ``<root>/<split>``, ``<file>.npz#<split>``, ``<root>#<kind>:<benchmark>:<split>``);
* :func:`load_split` reads a split through the one cached build (:func:`data_generator.image_cache.cached`): the
  reader lists the files (the key), the cache is looked up and verified, and only on a miss does the reader
  prepare and convert the images;
* :func:`peek_split` gives split hygiene (:mod:`data_generator.hygiene`) what it needs of a split without decoding
  it (its cache record).

Every split is the same :class:`ImageSet` (images uint8 (N, S, S, 3), labels int64 (N,), class names sorted, the
per-image names and content digests), whatever its format. Every problem caused by the data raises
:class:`utils.errors.UserError` with a one-line message that names the path.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from data_generator.folders import ClassFolders
from data_generator.formats import BENCHMARKS, Cifar100, CsvFiles, Learn2LearnCache, MetaOptNetPickles, TieredImageNet
from data_generator.hygiene import SplitSummary
from data_generator.image_cache import ImageSet, cache_key, cached, peek_record, record_summary
from data_generator.packs import NpzPack
from data_generator.reader import FOLDERS, SPLITS, Reader, SplitSpec
from utils.errors import UserError

__all__ = ["READERS", "ImageSet", "SplitSpec", "FOLDERS", "load_split", "peek_split", "split_spec", "role_spec",
           "parse_spec", "detect_formats", "check_episode_fit", "check_counts"]

#: Every format this program reads, in the order detection tries them and the "expected one of" line lists them.
#: Adding a format: one Reader subclass and its line here (docs/ARCHITECTURE.md, "Add a dataset format").
READERS: list[Reader] = [
    NpzPack(),
    ClassFolders(),
    CsvFiles(),
    MetaOptNetPickles(),
    Learn2LearnCache(),
    TieredImageNet(),
    Cifar100(),
]

_WARNED: set[tuple[str, str]] = set()
_COUNT_WORDS = {2: "two", 3: "three", 4: "four"}


# ---------------------------------------------------------------------------------------------------------------------
# Specs: detection, role flags, the printable form
# ---------------------------------------------------------------------------------------------------------------------
def reader_of(kind: str) -> Reader:
    """The registered reader of ``kind`` (ValueError for a kind no reader has: a spec built by hand)."""
    for r in READERS:
        if r.kind == kind:
            return r
    raise ValueError(f"no reader of kind {kind!r} in data_generator.dataset_loader.READERS")


def _detected(root: str, fallback: bool = False) -> list[tuple[Reader, tuple[str, ...]]]:
    """(reader, benchmarks) per dataset found in ``root``, in registry order; the fallback readers only if asked."""
    return [(r, found) for r in READERS if r.fallback == fallback for found in r.detect(root)]


def detect_formats(root: str) -> list[tuple[str, str]]:
    """The (kind, benchmark) pairs a reader other than class folders detects in ``root`` (a file of any one split is
    enough); several benchmarks a folder can give are joined by ``|`` (CIFAR-100: ``"FC100|CIFAR-FS"``)."""
    return [(r.kind, "|".join(found)) for r, found in _detected(root)]


def split_spec(dataset_dir: str, split: str, dataset: str | None = None) -> SplitSpec:
    """The spec of ``split`` of what ``dataset_dir`` holds (the format is detected by :data:`READERS`; class folders
    when nothing else is found, and for a folder that does not exist, whose reader then names it).

    ``dataset`` (the ``--dataset`` preset) picks among several benchmarks in one folder and chooses FC100 or
    CIFAR-FS for ``cifar-100-python``. Raises UserError when ``dataset_dir`` holds no known format, or several that
    ``dataset`` does not decide between.
    """
    root = os.fspath(dataset_dir)
    found = _detected(root) or _detected(root, fallback=True)
    if not found:
        if os.path.isdir(root):
            expected = "; ".join(r.expected for r in READERS if r.expected)
            raise UserError(f"dataset folder {root} holds no dataset this program reads (expected one of: "
                            f"{expected}; see docs/DATA.md)")
        found = [(next(r for r in READERS if r.fallback), ())]
    bench = dataset if dataset in BENCHMARKS else None
    if len(found) > 1:
        chosen = [f for f in found if bench and bench in f[1]]
        if len(chosen) != 1:
            what = ", ".join(f"{r.kind} ({'|'.join(b)})" if b else r.kind for r, b in found)
            raise UserError(f"dataset folder {root} holds several datasets: {what}; pick one with --dataset "
                            f"({', '.join(BENCHMARKS)}) or point --dataset_dir at a folder with one")
        found = chosen
    reader, choices = found[0]
    if len(choices) > 1:
        if bench not in choices:
            raise UserError(f"dataset folder {root} holds {reader.title}, which gives "
                            f"{_COUNT_WORDS.get(len(choices), len(choices))} benchmarks: pass "
                            + " or ".join(f"--dataset {c}" for c in choices))
        have = bench
    else:
        have = choices[0] if choices else None
        if bench is not None and have is not None and bench != have and (root, bench) not in _WARNED:
            _WARNED.add((root, bench))
            print(f"warning: --dataset {bench}, but {root} holds {have} ({reader.kind} files); reading those (log "
                  "folders are named by --dataset)", flush=True)
    return reader.spec(root, split, have)


def role_spec(location: str, split: str, dataset: str | None = None) -> SplitSpec:
    """The spec of a role flag (``--pre_train_dir``, ``--meta_train_dir``, ``--meta_val_dir``, ``--meta_test_dir``):
    a folder or pack that a reader other than class folders detects gives the role's ``split`` of it (as
    ``--dataset_dir`` would: ``--meta_test_dir`` at FC100 pickles reads ``FC100_test.pickle``, at a pack its test
    split); anything else names one split (:func:`parse_spec`: a class-folder split, ``x.npz#test``, ...)."""
    location = os.fspath(location)
    if _detected(location):
        return split_spec(location, split, dataset)
    return parse_spec(location)


def _plain(path: str) -> Reader | None:
    """The reader of a format with no benchmark name (specs ``<path>#<split>``) that detects ``path``, if any."""
    return next((r for r in READERS if not r.fallback and not r.benchmarks and r.detect(path)), None)


def _tagged(text: str, path: str, tag: str) -> SplitSpec:
    """``<path>#<kind>:<benchmark>:<split>`` -> its spec; UserError when malformed."""
    parts = tag.split(":")
    by_kind = {r.kind: r for r in READERS if r.benchmarks}
    reader = by_kind.get(parts[0]) if len(parts) == 3 else None
    if reader is None or parts[2] not in SPLITS:
        raise UserError(f"dataset spec {text}: expected <folder>#<kind>:<benchmark>:<split> with kind one of "
                        f"{', '.join(by_kind)} and split one of {', '.join(SPLITS)}")
    if parts[1] not in reader.benchmarks:
        raise UserError(f"dataset spec {text}: benchmark must be one of {', '.join(reader.benchmarks)} for "
                        f"{reader.kind}")
    return reader.spec(path, parts[2], parts[1])


def parse_spec(text: str) -> SplitSpec:
    """The spec a printable form names (``str(SplitSpec)``, or what a user wrote): ``<file>.npz#<split>`` (or another
    format whose reader detects ``<file>``), ``<folder>#<kind>:<benchmark>:<split>``, else a class-folder split
    ``<root>/<split>`` (a folder name may hold ``#``). UserError for a malformed ``#`` part of an existing folder, and
    for a pack named without its split."""
    text = os.fspath(text)
    path, sep, tag = text.rpartition("#")
    if sep:
        if tag.count(":") == 2 and os.path.isdir(path):
            return _tagged(text, path, tag)
        plain = _plain(path)
        if plain is not None:
            return plain.spec(path, tag)
        if os.path.isdir(path):
            return _tagged(text, path, tag)
    plain = _plain(text)
    if plain is not None:
        raise UserError(f"{plain.title} spec {text} needs a split: write {text}#train, {text}#val or {text}#test")
    return SplitSpec(text, FOLDERS, os.path.basename(os.path.normpath(text)))


def _as_spec(spec: SplitSpec | str | os.PathLike) -> SplitSpec:
    return spec if isinstance(spec, SplitSpec) else parse_spec(os.fspath(spec))


# ---------------------------------------------------------------------------------------------------------------------
# Episode checks
# ---------------------------------------------------------------------------------------------------------------------
def check_counts(
    counts: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    way: int,
    n_per_class: int,
    where: str,
    source: str,
) -> None:
    """Raise UserError unless ``way`` classes with ``n_per_class`` images each can be drawn.

    Args:
        counts: (C,) images per class.
        class_names: (C,) names used in the message.
        way: classes per episode.
        n_per_class: images needed per class (shot + query).
        where: message prefix, e.g. ``"meta-train split data/mini/train"``.
        source: the dataset named in the "way is larger" message.
    """
    counts = np.asarray(counts)
    if way < 1:
        raise UserError(f"{where}: way = {way} must be at least 1")
    if n_per_class < 1:
        raise UserError(f"{where}: shot + query = {n_per_class} must be at least 1")
    if way > len(counts):
        raise UserError(f"{where}: way = {way} is larger than the {len(counts)} classes in {source}")
    if len(counts) and counts.min() < n_per_class:
        c = int(np.argmin(counts))
        raise UserError(
            f"{where}: class '{class_names[c]}' has {int(counts[c])} images, "
            f"but shot + query = {n_per_class} are needed"
        )


def check_episode_fit(imageset: ImageSet, way: int, n_per_class: int, role: str) -> None:
    """Raise UserError unless every episode of ``way`` classes x ``n_per_class`` images fits in ``imageset``.

    ``role`` names the use (``"meta-train"``, ``"meta-val"``, ``"meta-test"``, ``"pre-val"``). All classes must hold
    at least ``n_per_class`` images (as the official sampler, which stacks per-class draws). Messages look like
    ``meta-train split <source>: class 'n0123' has 7 images, but shot + query = 16 are needed`` or
    ``meta-train split <source>: way = 10 is larger than the 5 classes in <source>``.
    """
    check_counts(
        imageset.class_counts(), imageset.class_names, way, n_per_class, f"{role} split {imageset.source}",
        imageset.source,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------------
def load_split(spec: SplitSpec | str, stored_size: int, cache_dir: str | None = None, num_workers: int = 0) -> ImageSet:
    """Load one split as an :class:`ImageSet` of uint8 (N, stored_size, stored_size, 3) images.

    Args:
        spec: a :class:`SplitSpec` (:func:`split_spec`, :func:`role_spec`) or its printable form (:func:`parse_spec`).
        stored_size: side of the stored square images (``BatchTransform.stored_size``).
        cache_dir: where decoded splits are cached (``None``: no cache; ``.npz`` packs are never cached).
        num_workers: class folders and csv: decode in a pool of this many processes (0: in this process).

    Raises:
        UserError: a missing folder / pack / split file, no class folders, an empty class folder, a subfolder inside a
            class folder, a file that is not a readable image, a benchmark file without its keys; one line naming the
            path.
    """
    if stored_size < 1:
        raise ValueError(f"stored_size must be positive, got {stored_size}")
    spec = _as_spec(spec)
    reader = reader_of(spec.kind)
    files = reader.files(spec)
    return cached(cache_dir if reader.cached else None, stored_size, spec.path, files, reader.identity(spec),
                  lambda: reader.prepare(spec, files, stored_size, num_workers), str(spec),
                  lambda p: {"source": os.path.abspath(spec.path), **reader.record(spec, p)}, reader.count(files))


def peek_split(spec: SplitSpec | str, stored_size: int, cache_dir: str | None,
               split: str) -> tuple[SplitSummary | None, str]:
    """What :mod:`data_generator.hygiene` needs of a split, without decoding it: ``(summary, why)``.

    A split of a reader that does not cache (``.npz``; packs are small) is loaded. Otherwise the split's cache entry is
    read, its record only (verified by its own digest; the images are not opened): the class names, labels and
    per-image digests. Without an entry: for class folders the class names alone (``summary.digests`` None), for
    benchmark files nothing (their names are inside the files). ``why`` says what could not be compared ("" when
    everything could); ``(None, "")`` when the split does not exist (nothing to compare with)."""
    spec = _as_spec(spec)
    reader = reader_of(spec.kind)
    if not reader.exists(spec):
        return None, ""
    if not reader.cached:
        return load_split(spec, stored_size).summary(split), ""
    no_entry = ("--cache_dir none" if cache_dir is None else
                f"no cache entry of it in {cache_dir} at this --image_size / --preprocess")
    if cache_dir is None and not reader.lists_classes:
        return None, no_entry
    files = reader.files(spec, quiet=True)
    if cache_dir is not None:
        record = peek_record(cache_dir, cache_key(spec.path, files, stored_size, reader.identity(spec)), files)
        if record is not None:
            return record_summary(record, split, str(spec)), ""
    listed = reader.classes(spec, files)
    if listed is None:
        return None, no_entry
    return SplitSummary(split, str(spec), listed[0], listed[1], None, files), no_entry
