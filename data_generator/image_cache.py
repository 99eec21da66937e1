"""The decoded-image cache, and what every reader builds into it: :class:`ImageSet` (one split, decoded),
:class:`Prepared` (what a reader found, with the ``fill`` that writes the images), the cache key, and
:func:`cached`, the one lookup -> verify -> build -> write flow that every split of every reader goes through.

One entry per split, written once, verified every time it is opened: two files in the cache folder
(``<log_root>/cache`` by default, ``--cache_dir``):

* ``<key>.npy``: the images, uint8 (N, S, S, 3), S = the stored size, read back with ``np.load(mmap_mode="r")``;
* ``<key>.json``: its record, written last (it marks the entry complete): ``version`` (:data:`CACHE_VERSION`),
  ``stored_size``, ``shape``, ``class_names`` (C,), ``labels`` (N,), ``files`` (what the key was computed from),
  what the reader adds (``source``, ``format``, ...), ``image_digests`` (one 64-bit content digest per image,
  :func:`image_digests`, as 16 hex digits each, concatenated) and ``record_digest`` (the sha1 of the canonical
  json of everything else in the record, so the labels, class names and digests are checked too).

``key`` (:func:`cache_key`) is the sha1 of the reader's identity line and of every source file's relative path,
byte size and ``mtime_ns``, so a changed file gives a new key. Its first line is :data:`KEY_SCHEME`, which does not
change with :data:`CACHE_VERSION`: an entry an older version wrote is found under the same key, refused by its
version, and rebuilt in place (rather than left on disk under a key nothing looks up).

Opening an entry (:func:`lookup_cache`) checks the record (parses, same version, ``record_digest`` matches), the
``.npy`` header (uint8, the record's shape), its length (header + N*S*S*3 bytes exactly), the labels (N of
them, in 0..C-1) and then recomputes every image's digest over the memory map and compares. Any failure prints
one line ``cache entry <key>.npy: <why>; rebuilding`` and the caller rebuilds the entry. The cost of the
recomputation is measured in docs/BENCHMARKS.md ("Cache checksum"): about half a second for a miniImageNet-sized
train split.

Writing (:func:`write_cache`): the array is filled under a temporary name ``.<key>.npy.tmp-<pid>-<hex>@<host>``
whose disk space is reserved first (``posix_fallocate``: a full disk is one line before anything is decoded, not a
``SIGBUS`` in the middle of a memory map); then the digests are computed, the array is moved into place and the
record written (temporary name, ``os.replace``). A failure removes the temporary files. Temporary files of
processes that no longer exist on this host (a ``kill -9``, a crash, a power loss) are removed the next time the
folder is used (:func:`remove_orphans`), with one line saying what and how large; a live process's file, and a
file of another host (a cache folder on a shared file system), are left alone.

A read-only cache folder is fine as long as its entries are valid (nothing is written when an entry is found);
when one must be written, the run stops with one line naming the folder and the way out (``--cache_dir none`` or
another folder). This module imports no reader: the readers (``folders``, ``packs``, ``formats``) hand
:func:`cached` a ``prepare`` callback, and ``dataset_loader.load_split`` calls it for them.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from data_generator.decoding import read_failure
from data_generator.hygiene import SplitSummary
from utils.errors import UserError
from utils.misc import host_tag, listing, remove_orphaned_files

__all__ = ["CACHE_VERSION", "KEY_SCHEME", "ImageSet", "Prepared", "cached", "cache_key", "stat_key", "peek_record",
           "record_summary", "CacheEntry", "image_digests", "digests_hex", "digests_from_hex", "lookup_cache",
           "read_record", "write_cache", "cache_paths", "remove_orphans", "cache_write_error"]

log = logging.getLogger(__name__)

#: Written into every record; an entry of another version is rebuilt (with a line). v2: per-image checksums and the
#: record digest; every Pillow mode decoded to 8-bit RGB by ``decoding.to_rgb`` (v1: Pillow's ``convert``).
CACHE_VERSION = "mtl-imagecache-v2"
#: The first line of every cache key (unchanged since v1, so older entries are found and replaced in place).
KEY_SCHEME = "mtl-imagecache-v1"
#: How an image's digest is made (stored in the record): the first 8 bytes of the sha1 of its S*S*3 bytes.
DIGEST = "sha1-64"

_TMP = re.compile(r"^\.(?P<base>.+)\.tmp-(?P<pid>\d+)-(?P<hex>[0-9a-f]{8})(?:@(?P<host>[^/]*))?$")


# ---------------------------------------------------------------------------------------------------------------------
# ImageSet and Prepared: what a split is, and what a reader hands the cache
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ImageSet:
    """One split, fully decoded.

    Attributes:
        images: uint8 (N, H, W, 3) with H == W == stored size; an ``np.memmap`` when it came from the cache.
        labels: int64 (N,), values 0..C-1 (class index in ``class_names``).
        class_names: (C,) class names, sorted by name (every reader but ``.npz`` packs, whose order is the pack's).
        source: the printable form of the spec the split was loaded from (``str(SplitSpec)``), as messages name it.
        files: (N,) per-image names for messages: paths relative to the split folder (folder splits, csv), else
            ``None``.
        digests: uint64 (N,) per-image content digests (:func:`data_generator.image_cache.image_digests`): verified
            against the cache, or computed at load; ``None`` only for an ImageSet built by hand.
        numbered_names: True when the reader made the class names up from label numbers (the file holds none).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str
    files: list[str] | None = None
    digests: np.ndarray | None = None
    numbered_names: bool = False
    _class_indices: list[np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        """C, the number of classes."""
        return len(self.class_names)

    @property
    def stored_size(self) -> int:
        """H (== W) of the stored images."""
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_indices(self) -> list[np.ndarray]:
        """Per class c (0..C-1), the sorted int64 indices of its images: a list of C arrays of shape (n_c,)."""
        if self._class_indices is None:
            order = np.argsort(self.labels, kind="stable")
            counts = np.bincount(self.labels, minlength=self.num_classes)
            bounds = np.cumsum(counts)[:-1]
            self._class_indices = [part.astype(np.int64) for part in np.split(order, bounds)]
        return self._class_indices

    def class_counts(self) -> np.ndarray:
        """int64 (C,): the number of images of each class."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def summary(self, split: str) -> SplitSummary:
        """What :mod:`data_generator.hygiene` compares (names, labels, digests; no pixels)."""
        digests = self.digests if self.digests is not None else image_digests(self.images)
        return SplitSummary(split, self.source, list(self.class_names), self.labels, digests, self.files,
                            self.numbered_names)


@dataclass
class Prepared:
    """What a reader found, before any image is converted: class names (C,) sorted, labels int64 (N,) in output
    order (grouped by class), and ``fill(out)`` that writes the N converted images into ``out`` uint8
    (N, S, S, 3) (a memory map of the cache entry being written, or an array when there is no cache)."""

    class_names: list[str]
    labels: np.ndarray
    fill: Callable[[np.ndarray], None]
    files: list[str] | None = None  # (N,) per-image names (ImageSet.files)
    numbered_names: bool = False  # the names are label numbers (the file holds none): not compared across splits


@dataclass
class CacheEntry:
    """An open, verified entry: ``images`` uint8 (N, S, S, 3) read-only memmap, its ``record`` (the json dict) and
    ``digests`` uint64 (N,), the verified per-image digests."""

    images: np.ndarray
    record: dict
    digests: np.ndarray


# ---------------------------------------------------------------------------------------------------------------------
# Digests
# ---------------------------------------------------------------------------------------------------------------------
def _digest_threads() -> int:
    try:
        return max(1, min(4, len(os.sched_getaffinity(0))))
    except (AttributeError, OSError):
        return max(1, min(4, os.cpu_count() or 1))


def image_digests(images: np.ndarray) -> np.ndarray:
    """uint8 (N, ...) -> uint64 (N,): per image, the first 8 bytes (big-endian) of the sha1 of its C-order bytes.

    sha1 because it is the fastest hash of ``hashlib`` on CPUs with the SHA extensions (1.45 GB/s on one core here;
    blake2b 0.92, sha256 1.49 but 3x slower without them; measured in docs/BENCHMARKS.md), 64 bits because the
    digests also find identical images across splits (``data_generator.hygiene``): among a million images the chance
    of any two distinct ones sharing a digest is ~3e-8. Computed in up to 4 threads (hashlib releases the GIL for
    buffers over 2 KiB); the result does not depend on the number of threads.
    """
    n = int(images.shape[0]) if images.ndim else 0
    out = np.empty(n, dtype=np.uint64)
    if n == 0:
        return out
    flat = images.reshape(n, -1)
    if not flat.flags.c_contiguous:
        flat = np.ascontiguousarray(flat)

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            out[i] = int.from_bytes(hashlib.sha1(flat[i]).digest()[:8], "big")

    threads = _digest_threads() if flat.shape[1] > 2048 and n >= 64 else 1
    step = max(1, math.ceil(n / (threads * 8)))
    if threads == 1:
        work(0, n)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for f in [pool.submit(work, lo, min(n, lo + step)) for lo in range(0, n, step)]:
                f.result()
    return out


def digests_hex(d: np.ndarray) -> str:
    """uint64 (N,) -> 16 hex digits per digest, concatenated (the record's ``image_digests``)."""
    return np.asarray(d, dtype=">u8").tobytes().hex()


def digests_from_hex(s: str) -> np.ndarray:
    """The inverse of :func:`digests_hex`; ValueError when ``s`` is not such a string."""
    if not isinstance(s, str) or len(s) % 16:
        raise ValueError("image_digests is not a string of 16-digit digests")
    return np.frombuffer(bytes.fromhex(s), dtype=">u8").astype(np.uint64)


def _record_digest(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "record_digest"}
    return hashlib.sha1(json.dumps(body, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Paths, temporary files, orphans
# ---------------------------------------------------------------------------------------------------------------------
def cache_paths(cache_dir: str, key: str) -> tuple[str, str]:
    """``(<cache_dir>/<key>.npy, <cache_dir>/<key>.json)``: the image array and its record (written last)."""
    return os.path.join(cache_dir, f"{key}.npy"), os.path.join(cache_dir, f"{key}.json")


def _tmp_name(path: str) -> str:
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}@{host_tag()}")


def _tmp_owner(name: str) -> tuple[int, str | None] | None:
    """The writer a cache temporary names: ``(pid, host)`` (host None: a version-1 name, which named none)."""
    m = _TMP.match(name)
    return (int(m.group("pid")), m.group("host")) if m else None


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} GB"


def remove_orphans(cache_dir: str) -> list[tuple[str, int]]:
    """Remove the temporary files of dead processes from ``cache_dir``; return ``[(path, bytes)]`` removed.

    A temporary file ``.<name>.tmp-<pid>-<hex>[@<host>]`` is orphaned by the one rule of every temporary file
    (:func:`utils.misc.orphaned`): made on this host (or naming no host: the names of version 1) by a process that
    no longer exists, or whose pid was reused since. Removing them prints one line with their names and total size.
    Files of live processes and of other hosts stay; a folder that cannot be listed or written is left as it is
    (silently: the caller reports what it cannot do).
    """
    removed = remove_orphaned_files(cache_dir, _tmp_owner)
    if removed:
        total = sum(b for _, b in removed)
        shown = listing([os.path.basename(p) for p, _ in removed], 2)
        print(f"removed {len(removed)} orphaned temporary file(s) of processes that no longer exist from the image "
              f"cache {cache_dir} ({_size(total)} on disk): {shown}", flush=True)
    return removed


def cache_write_error(cache_dir: str, exc: OSError | str, fix: str | None = None) -> UserError:
    """The one line for a cache folder that cannot take an entry (read-only, full, not a folder, no permission):
    what failed, what to do about the folder (``fix``, by default from the error), and the two ways around it."""
    why = exc if isinstance(exc, str) else (exc.strerror or str(exc))
    if fix is None:
        code = getattr(exc, "errno", None)
        fix = {errno.EACCES: "make it writable", errno.EPERM: "make it writable", errno.EROFS: "make it writable",
               errno.ENOSPC: "free space on it", errno.EDQUOT: "free space on it"}.get(code, "fix that folder")
    return UserError(f"cannot write the image cache in {cache_dir}: {why}; {fix}, or pass --cache_dir none "
                     f"(decode without a cache) or --cache_dir <another folder>")


def _check_folder(cache_dir: str) -> None:
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise cache_write_error(cache_dir, "it is a file, not a folder", "remove or rename that file")


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------
def read_record(meta: str) -> tuple[dict | None, str | None]:
    """``(record, None)`` when ``meta`` parses, is of :data:`CACHE_VERSION` and matches its ``record_digest``;
    else ``(None, why)`` (``why`` None when the file does not exist)."""
    name = os.path.basename(meta)
    try:
        with open(meta, encoding="utf-8") as fh:
            record = json.load(fh)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"its record {name} cannot be read ({exc.strerror or exc})"
    except ValueError as exc:
        return None, f"its record {name} does not parse ({str(exc).splitlines()[0]})"
    if not isinstance(record, dict):
        return None, f"its record {name} does not parse (not a json object)"
    version = record.get("version")
    if version != CACHE_VERSION:
        return None, f"it was written by {version or 'an unknown version'} (this program reads {CACHE_VERSION})"
    if record.get("record_digest") != _record_digest(record):
        return None, f"its record {name} does not match its checksum (edited or corrupt)"
    return record, None


def _open(npy: str, meta: str, stored_size: int, files: list[str] | None,
          n: int | None) -> tuple[CacheEntry | None, str | None]:
    record, why = read_record(meta)
    if record is None:
        if why is None and os.path.exists(npy):
            why = f"its record {os.path.basename(meta)} is missing (a build that was interrupted)"
        return None, why
    try:
        labels = np.asarray(record["labels"], dtype=np.int64)
        classes = record["class_names"]
        digests = digests_from_hex(record["image_digests"])
        shape = tuple(int(s) for s in record["shape"])
    except (KeyError, TypeError, ValueError, OverflowError):
        return None, "its record lacks or garbles labels, class_names, image_digests or shape"
    count = shape[0] if shape else -1
    if (shape != (count, stored_size, stored_size, 3) or int(record.get("stored_size", -1)) != stored_size
            or (n is not None and count != n)):
        return None, f"its record describes {shape}, not ({n if n is not None else 'N'}, {stored_size}, " \
                     f"{stored_size}, 3) images"
    if files is not None and record.get("files") != files:
        return None, "its record lists other source files than the dataset holds"
    if labels.shape != (count,) or len(digests) != count or not isinstance(classes, list) or (
            count and (labels.min() < 0 or labels.max() >= len(classes))):
        return None, f"its record's labels, class names or digests do not fit {count} images"
    try:
        with open(npy, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy version {version}")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            hshape, fortran, dtype = read(fh)
            offset = fh.tell()
    except FileNotFoundError:
        return None, "its image file is missing"
    except (OSError, ValueError, EOFError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"its image file is not a readable .npy file ({detail})"
    if dtype != np.uint8 or tuple(hshape) != shape or fortran:
        return None, f"its image file's header says {dtype} {tuple(hshape)}, the record uint8 {shape}"
    expected = offset + int(np.prod(shape))
    actual = os.path.getsize(npy)
    if actual != expected:
        return None, f"its image file has {actual} bytes, {expected} expected (truncated or padded)"
    try:
        images = np.memmap(npy, dtype=np.uint8, mode="r", shape=shape, offset=offset)
    except (OSError, ValueError) as exc:
        return None, f"its image file cannot be mapped ({exc})"
    got = image_digests(images)
    bad = np.flatnonzero(got != digests)
    if bad.size:
        k = int(bad[0])
        what = image_names(record)
        name = f" ({what[k]})" if isinstance(what, list) and len(what) == count else ""
        more = f" (and {bad.size - 1} more)" if bad.size > 1 else ""
        return None, f"image {k}{name} does not match its checksum{more}"
    return CacheEntry(images, record, got), None


def lookup_cache(cache_dir: str, key: str, stored_size: int, files: list[str] | None,
                 n: int | None = None) -> CacheEntry | None:
    """The verified entry ``key`` (see the module docstring), or None: nothing there (silently), or an entry that
    fails a check (one printed line ``cache entry …: <why>; rebuilding``). ``files``: the source files the key was
    made from (checked against the record); ``n``: the number of images expected, when known. Removes orphaned
    temporary files first."""
    _check_folder(cache_dir)
    remove_orphans(cache_dir)
    npy, meta = cache_paths(cache_dir, key)
    entry, why = _open(npy, meta, stored_size, files, n)
    if why is not None:
        print(f"cache entry {npy}: {why}; rebuilding", flush=True)
    return entry


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------
def _reserve(path: str, cache_dir: str) -> None:
    """Reserve the disk blocks of the (sparse) file ``path`` now, so a full disk is an error here, not a SIGBUS while
    the memory map is written. File systems without ``fallocate`` are left as they are."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            try:
                free = os.statvfs(cache_dir).f_bavail * os.statvfs(cache_dir).f_frsize
                detail = f"no space left on the device (the entry needs {_size(size)}, {_size(free)} free)"
            except OSError:
                detail = f"no space left on the device (the entry needs {_size(size)})"
            raise cache_write_error(cache_dir, detail, "free space on it") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", -1)):
            raise
    except AttributeError:  # no posix_fallocate on this platform
        pass
    finally:
        os.close(fd)


def _remove(*paths: str | None) -> None:
    for p in paths:
        if p and os.path.lexists(p):
            try:
                os.remove(p)
            except OSError:
                pass


def write_cache(cache_dir: str, key: str, n: int, stored_size: int, fill: Callable[[np.ndarray], None],
                info: dict) -> CacheEntry:
    """Create the entry ``key``: ``fill(out)`` writes the uint8 (n, S, S, 3) images into a memmap under a temporary
    name (its space reserved first); then their digests are computed, the array is moved into place and the record
    (``info`` with ``version``, ``stored_size``, ``shape``, the digests and the record digest added) is written
    last. On any failure (a UserError from ``fill`` included) the temporary files are removed, so nothing
    half-written stays; an OSError of the cache folder (read-only, full, ...) is one UserError line naming it.
    Returns the new entry (images as a read-only memmap)."""
    npy, meta = cache_paths(cache_dir, key)
    shape = (int(n), int(stored_size), int(stored_size), 3)
    tmp = tmp_meta = None
    _check_folder(cache_dir)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        remove_orphans(cache_dir)
        tmp = _tmp_name(npy)
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        _reserve(tmp, cache_dir)
    except OSError as exc:
        _remove(tmp)
        raise cache_write_error(cache_dir, exc) from None
    except BaseException:
        _remove(tmp)
        raise
    try:
        fill(arr)
        try:
            arr.flush()
            digests = image_digests(arr)
            del arr
            record = {"version": CACHE_VERSION, "stored_size": int(stored_size), "shape": list(shape), **info,
                      "digest": DIGEST, "image_digests": digests_hex(digests), "written": time.time()}
            record["record_digest"] = _record_digest(record)
            _remove(meta)  # an old record never describes the new array, even for a moment
            os.replace(tmp, npy)
            tmp_meta = _tmp_name(meta)
            with open(tmp_meta, "w", encoding="utf-8") as fh:
                json.dump(record, fh)
            os.replace(tmp_meta, meta)
        except OSError as exc:
            raise cache_write_error(cache_dir, exc) from None
    except BaseException:
        _remove(tmp, tmp_meta)
        raise
    return CacheEntry(np.load(npy, mmap_mode="r"), record, digests)


# ---------------------------------------------------------------------------------------------------------------------
# The key, and the one cached build
# ---------------------------------------------------------------------------------------------------------------------
def stat_key(h: "hashlib._Hash", path: str, rel: str) -> None:
    """Add ``rel``, the byte size and the ``mtime_ns`` of ``path`` to the cache key ``h``; UserError naming the
    path when it cannot be read (a link that broke since the scan, no permission)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise read_failure(path, exc) from None
    h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))


def cache_key(root: str, files: Sequence[str], stored_size: int, identity: str | None) -> str:
    """The key of one split: sha1 over :data:`KEY_SCHEME`, the reader's ``identity`` line (class folders: none),
    ``stored_size`` and, per file (``files`` relative to ``root``), its path, byte size and ``mtime_ns``."""
    lines = [KEY_SCHEME] + ([] if identity is None else [identity]) + [str(int(stored_size))]
    h = hashlib.sha1()
    h.update(("\n".join(lines) + "\n").encode())
    for rel in files:
        stat_key(h, os.path.join(root, rel), rel)
    return h.hexdigest()


def image_names(record: dict) -> list[str] | None:
    """The per-image names of an entry (class folders: ``files``; benchmark files: ``image_files``, or None)."""
    return record.get("image_files") if "format" in record else record.get("files")


def record_summary(record: dict, split: str, source: str) -> SplitSummary:
    """What split hygiene needs, from an entry's (verified) record alone: names, labels, per-image digests."""
    return SplitSummary(split, source, list(record["class_names"]), np.asarray(record["labels"], dtype=np.int64),
                        digests_from_hex(record["image_digests"]), image_names(record),
                        bool(record.get("numbered_names")))


def peek_record(cache_dir: str, key: str, files: list[str]) -> dict | None:
    """The record of entry ``key`` when it is valid (:func:`read_record`) and made from ``files``; the images are not
    opened (split hygiene before a meta-test)."""
    record, _ = read_record(cache_paths(cache_dir, key)[1])
    return record if record is not None and record.get("files") == files else None


def cached(cache_dir: str | None, stored_size: int, root: str, files: list[str], identity: str | None,
           prepare: Callable[[], Prepared], source: str, info: Callable[[Prepared], dict],
           count: int | None = None) -> ImageSet:
    """One split through the cache: lookup -> verify -> (on a miss) build -> write, for every reader.

    Args:
        cache_dir: the cache folder; ``None``: no cache (``prepare`` and fill an array in memory).
        stored_size: S, the side of the stored square images.
        root, files, identity: what the key is made of (:func:`cache_key`); ``files`` relative to ``root``, as the
            record's ``files`` stores them.
        prepare: reads the source (class names, labels, ``fill``); called only when the entry must be built.
        source: ``ImageSet.source`` (the spec's printable form).
        info: the reader's fields for the record (``source``, ``format``, ...), given what ``prepare`` found.
        count: N when the files alone tell it (one image per file), checked against the record.

    Returns:
        An ImageSet of uint8 (N, S, S, 3): on a hit a read-only memory map with the labels, class names and
        per-image names of the verified record; else the freshly converted images (from the new entry).
    """
    if cache_dir is None:
        p = prepare()
        log.info("converting %d images of %s without a cache", len(p.labels), source)
        images = np.empty((len(p.labels), stored_size, stored_size, 3), dtype=np.uint8)
        p.fill(images)
        return ImageSet(images, p.labels, p.class_names, source, p.files, image_digests(images), p.numbered_names)
    key = cache_key(root, files, stored_size, identity)
    hit = lookup_cache(cache_dir, key, stored_size, files, count)
    if hit is not None:
        r = hit.record
        log.info("loaded %d decoded images of %s from the cache %s", len(hit.images), source, cache_dir)
        return ImageSet(hit.images, np.asarray(r["labels"], dtype=np.int64), list(r["class_names"]), source,
                        image_names(r), hit.digests, bool(r.get("numbered_names")))
    p = prepare()
    log.info("converting %d images of %s into the cache %s", len(p.labels), source, cache_dir)
    record = {"class_names": p.class_names, "labels": p.labels.tolist(), "files": files, **info(p)}
    entry = write_cache(cache_dir, key, len(p.labels), stored_size, p.fill, record)
    return ImageSet(entry.images, p.labels, p.class_names, source, p.files, entry.digests, p.numbered_names)
