"""One dataset split, fully decoded to uint8, from class folders or an ``.npz`` pack (and, through
:mod:`data_generator.formats`, from the benchmark files of other few-shot code: ``"<dir>#<kind>:<benchmark>:<split>"``,
which :func:`split_spec` writes when it detects them in a folder).

Two kinds of *spec* are read here:

* a folder ``<root>/<split>`` laid out as ``<root>/<split>/<class>/<image>`` (the official layout, reference section 8).
  Classes are sorted by name, so labels are stable across machines (the official code used unsorted
  ``os.listdir``); images are sorted by file name. Hidden entries (names starting with ``.``) and files whose
  extension is not an image's (:data:`IMAGE_EXTENSIONS`, torchvision ``ImageFolder``'s list: a stray ``readme.txt``,
  ``Thumbs.db``, ``.DS_Store``) are skipped, and one line says how many were skipped and where; a file with an
  image extension that does not decode is still an error.
  Every image goes through PIL: ``convert("RGB")`` -> resize the shorter side to ``stored_size`` (bilinear, the
  long side as ``int(stored_size * long / short)``, as torchvision ``Resize``) -> center crop
  ``stored_size x stored_size`` (offsets ``int(round((n - stored_size) / 2))``, as torchvision ``CenterCrop``).
  With the "pytorch" preprocessing ``stored_size`` is 92 and this is the official ``Resize(92)`` step; the crop to
  92 x 92 is exact for the later ``CenterCrop(80)`` and loses only pixels that the official ``RandomResizedCrop``
  could reach on non-square images.
* a pack ``<file>.npz#<split>`` holding ``<split>_images`` uint8 (N, h, w) or (N, h, w, 3), ``<split>_labels`` int
  (N,) and ``<split>_classes`` str (C,). Grey images are repeated to 3 channels; images whose size is not
  ``stored_size x stored_size`` go through the same resize + center crop as folder images.

Folder splits can be cached: with ``cache_dir`` the decoded array is stored as ``<cache_dir>/<key>.npy`` plus
``<cache_dir>/<key>.json`` (class names, labels, file list) and later loaded with ``np.load(mmap_mode="r")``.
``key`` is the sha1 of the stored size and of every image's relative path, byte size and ``mtime_ns``, so any
change to the files gives a new key. Both files are written to a temporary name and moved into place with
``os.replace``; the json is written last and marks the entry as complete.

Every problem caused by the data (missing folder/pack/split, no class folders, an empty class folder, a
subfolder inside a class folder, a file PIL cannot decode) raises :class:`utils.errors.UserError` with a
one-line message that names the path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import uuid
import zipfile
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from utils.errors import UserError

__all__ = [
    "ImageSet",
    "load_split",
    "check_episode_fit",
    "split_spec",
    "decode_image",
    "CACHE_VERSION",
    "IMAGE_EXTENSIONS",
    "lookup_cache",
    "write_cache",
    "fit_square",
]

log = logging.getLogger(__name__)

#: Bumped whenever the decoding pipeline changes, so old cache entries are not reused.
CACHE_VERSION = "mtl-imagecache-v1"

FOLDER_LAYOUT = "<root>/{train,val,test}/<class>/<image>"

#: File extensions read as images in class folders (torchvision ``datasets.folder.IMG_EXTENSIONS``); others are skipped.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ---------------------------------------------------------------------------------------------------------------------
# ImageSet
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ImageSet:
    """One split, fully decoded.

    Attributes:
        images: uint8 (N, H, W, 3) with H == W == stored size; an ``np.memmap`` when it came from the cache.
        labels: int64 (N,), values 0..C-1 (class index in ``class_names``).
        class_names: (C,) class names, sorted by name for folder splits, in pack order for ``.npz`` splits.
        source: the spec the split was loaded from.
        files: (N,) image paths relative to the split folder (folder splits), else ``None``.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    source: str
    files: list[str] | None = None
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


# ---------------------------------------------------------------------------------------------------------------------
# Specs and episode checks
# ---------------------------------------------------------------------------------------------------------------------
def split_spec(dataset_dir: str, split: str, dataset: str | None = None) -> str:
    """The spec of one split: ``"<x.npz>#<split>"`` for a pack; for a folder, ``"<dir>/<split>"`` when it holds
    class folders (or is missing), else ``"<dir>#<split>"`` (or ``"<dir>#<benchmark>:<split>"`` for CIFAR-100,
    which holds two benchmarks) naming the benchmark files detected in it (:mod:`data_generator.formats`)."""
    if str(dataset_dir).lower().endswith(".npz"):
        return f"{dataset_dir}#{split}"
    if os.path.isdir(dataset_dir):
        from data_generator.formats import format_split_spec
        spec = format_split_spec(dataset_dir, split, dataset)
        if spec is not None:
            return spec
    return os.path.join(dataset_dir, split)


def _parse_npz_spec(spec: str) -> tuple[str, str] | None:
    """``(path, split)`` when spec names an ``.npz`` pack, else ``None`` (a folder)."""
    path, sep, split = spec.rpartition("#")
    if sep and path.lower().endswith(".npz"):
        return path, split
    if spec.lower().endswith(".npz"):
        raise UserError(f"dataset pack spec {spec} needs a split: write {spec}#train, {spec}#val or {spec}#test")
    return None


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
# Decoding
# ---------------------------------------------------------------------------------------------------------------------
def fit_square(img: Image.Image, size: int) -> np.ndarray:
    """PIL image -> uint8 (size, size, C): resize the shorter side to size (bilinear), center crop (torchvision)."""
    w, h = img.size
    if (w, h) != (size, size):
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.BILINEAR)
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        if (new_w, new_h) != (size, size):
            img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def decode_image(path: str, size: int) -> np.ndarray:
    """Decode one image file to uint8 (size, size, 3): PIL -> RGB -> shorter side to size -> center crop.

    Raises UserError ``<path>: not a readable image (...)`` for a corrupt image or a non-image file.
    """
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        arr = fit_square(rgb, size)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable image ({detail})") from None
    return arr


def _decode_chunk(job: tuple[int, list[str], int]) -> tuple[int, np.ndarray]:
    """Pool worker: (start, paths, size) -> (start, uint8 (len(paths), size, size, 3))."""
    start, paths, size = job
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for k, p in enumerate(paths):
        out[k] = decode_image(p, size)
    return start, out


def _decode_all(paths: Sequence[str], size: int, out: np.ndarray, num_workers: int) -> None:
    """Decode ``paths`` into ``out`` (uint8 (N, size, size, 3)), in a process pool when ``num_workers > 0``."""
    n = len(paths)
    if num_workers <= 0 or n < 2:
        for k, p in enumerate(paths):
            out[k] = decode_image(p, size)
        return
    chunk = max(1, min(256, math.ceil(n / (num_workers * 4))))
    jobs = [(s, list(paths[s:s + chunk]), size) for s in range(0, n, chunk)]
    with multiprocessing.get_context().Pool(processes=min(num_workers, len(jobs))) as pool:
        for start, arr in pool.imap_unordered(_decode_chunk, jobs):
            out[start:start + len(arr)] = arr


# ---------------------------------------------------------------------------------------------------------------------
# Folder splits
# ---------------------------------------------------------------------------------------------------------------------
def _visible(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_folder(root: str) -> tuple[list[str], list[str], np.ndarray]:
    """-> (class_names (C,), files (N,) relative to root with "/" separators, labels int64 (N,)).

    Hidden entries and files that are not images by extension are skipped, with one printed line that counts them
    and names the split folder and the first one skipped.
    """
    if not os.path.isdir(root):
        what = "is not a folder" if os.path.exists(root) else "not found"
        raise UserError(f"dataset split folder {root} {what} (expected layout {FOLDER_LAYOUT})")
    try:
        all_entries = sorted(os.listdir(root))
    except OSError as exc:
        raise UserError(f"cannot list dataset split folder {root}: {exc.strerror}") from None
    entries = _visible(all_entries)
    skipped = [e for e in all_entries if e.startswith(".")]
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    skipped += [e for e in entries if e not in classes]  # stray files beside the class folders
    if not classes:
        raise UserError(f"dataset split folder {root} has no class folders (expected layout {FOLDER_LAYOUT})")
    files: list[str] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        cdir = os.path.join(root, name)
        try:
            names = sorted(os.listdir(cdir))
        except OSError as exc:
            raise UserError(f"cannot list class folder {cdir}: {exc.strerror}") from None
        if not _visible(names):
            raise UserError(f"class folder {cdir} is empty (expected layout {FOLDER_LAYOUT})")
        kept = 0
        for fname in names:
            if fname.startswith("."):
                skipped.append(f"{name}/{fname}")
                continue
            if os.path.isdir(os.path.join(cdir, fname)):
                raise UserError(
                    f"class folder {cdir} contains the subfolder {fname}; class folders must hold images only "
                    f"(expected layout {FOLDER_LAYOUT})"
                )
            if not _is_image_name(fname):
                skipped.append(f"{name}/{fname}")
                continue
            files.append(f"{name}/{fname}")
            labels.append(c)
            kept += 1
        if not kept:
            raise UserError(f"class folder {cdir} has no images (extensions {', '.join(IMAGE_EXTENSIONS)}; "
                            f"expected layout {FOLDER_LAYOUT})")
    if skipped:
        print(f"skipped {len(skipped)} file(s) in {root} that are hidden or not images by extension "
              f"(first: {skipped[0]})", flush=True)
    return classes, files, np.asarray(labels, dtype=np.int64)


def _cache_key(root: str, files: Sequence[str], stored_size: int) -> str:
    """sha1 over (version, stored_size, each relative path with its byte size and mtime_ns)."""
    h = hashlib.sha1()
    h.update(f"{CACHE_VERSION}\n{int(stored_size)}\n".encode())
    for rel in files:
        st = os.stat(os.path.join(root, rel))
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _tmp_name(path: str) -> str:
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _load_cached(npy: str, meta: str, n: int | None, size: int, files: list[str]) -> tuple[np.ndarray, dict] | None:
    """The cached (images memmap, meta) when both files exist and agree with the scan (``n`` images, or as many as
    the entry's labels when ``n`` is None; the same ``files``), else None."""
    if not (os.path.isfile(npy) and os.path.isfile(meta)):
        return None
    try:
        with open(meta, encoding="utf-8") as fh:
            info = json.load(fh)
        images = np.load(npy, mmap_mode="r")
    except (OSError, ValueError) as exc:
        log.warning("ignoring the broken image cache entry %s (%s)", npy, exc)
        return None
    if n is None:
        n = len(info.get("labels", ()))
    if images.dtype != np.uint8 or images.shape != (n, size, size, 3) or info.get("files") != files:
        log.warning("ignoring the inconsistent image cache entry %s", npy)
        return None
    return images, info


def cache_paths(cache_dir: str, key: str) -> tuple[str, str]:
    """``(<cache_dir>/<key>.npy, <cache_dir>/<key>.json)``: the image array and its meta (written last)."""
    return os.path.join(cache_dir, f"{key}.npy"), os.path.join(cache_dir, f"{key}.json")


def lookup_cache(cache_dir: str, key: str, stored_size: int, files: list[str]) -> tuple[np.ndarray, dict] | None:
    """A complete cache entry (images memmap uint8 (N, S, S, 3), its meta dict) for ``key``, or None."""
    npy, meta = cache_paths(cache_dir, key)
    return _load_cached(npy, meta, None, stored_size, files)


def write_cache(cache_dir: str, key: str, n: int, stored_size: int, fill, info: dict) -> np.ndarray:
    """Create the entry ``key``: ``fill(out)`` writes the uint8 (n, S, S, 3) images into a memmap under a temporary
    name; then the array and ``info`` (json, with ``version`` and ``stored_size`` added) are moved into place, the
    json last (it marks the entry complete). On any failure (a UserError from ``fill`` included) both temporary
    files are removed, so nothing half-written stays. Returns the entry's images as a read-only memmap."""
    npy, meta = cache_paths(cache_dir, key)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = _tmp_name(npy)
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, stored_size, stored_size, 3))
    except OSError as exc:
        raise UserError(f"cannot write the image cache in {cache_dir}: {exc.strerror or exc}") from None
    tmp_meta = None
    try:
        fill(arr)
        arr.flush()
        del arr
        os.replace(tmp, npy)
        info = {"version": CACHE_VERSION, "stored_size": int(stored_size), **info}
        tmp_meta = _tmp_name(meta)
        with open(tmp_meta, "w", encoding="utf-8") as fh:
            json.dump(info, fh)
        os.replace(tmp_meta, meta)
    except BaseException:
        for p in (tmp, tmp_meta):
            if p and os.path.exists(p):
                try:
                    os.remove(p)
                except OSError:
                    pass
        raise
    return np.load(npy, mmap_mode="r")


def _load_folder(root: str, stored_size: int, cache_dir: str | None, num_workers: int) -> ImageSet:
    classes, files, labels = _scan_folder(root)
    n = len(files)
    paths = [os.path.join(root, rel) for rel in files]
    if cache_dir is None:
        log.info("decoding %d images from %s", n, root)
        images = np.empty((n, stored_size, stored_size, 3), dtype=np.uint8)
        _decode_all(paths, stored_size, images, num_workers)
        return ImageSet(images, labels, classes, root, files)

    key = _cache_key(root, files, stored_size)
    npy, meta = cache_paths(cache_dir, key)
    cached = _load_cached(npy, meta, n, stored_size, files)
    if cached is not None:
        log.info("loaded %d decoded images of %s from the cache %s", n, root, npy)
        return ImageSet(cached[0], labels, classes, root, files)

    log.info("decoding %d images from %s into the cache %s", n, root, npy)
    info = {"source": os.path.abspath(root), "class_names": classes, "labels": labels.tolist(), "files": files}
    images = write_cache(cache_dir, key, n, stored_size,
                         lambda out: _decode_all(paths, stored_size, out, num_workers), info)
    return ImageSet(images, labels, classes, root, files)


# ---------------------------------------------------------------------------------------------------------------------
# npz packs
# ---------------------------------------------------------------------------------------------------------------------
def _load_npz(path: str, split: str, stored_size: int, spec: str) -> ImageSet:
    if not os.path.isfile(path):
        raise UserError(f"dataset pack {path} not found")
    try:
        with np.load(path, allow_pickle=False) as pack:
            keys = set(pack.files)
            needed = [f"{split}_images", f"{split}_labels", f"{split}_classes"]
            missing = [k for k in needed if k not in keys]
            if missing:
                splits = sorted({k[: -len("_images")] for k in keys if k.endswith("_images")})
                raise UserError(
                    f"dataset pack {path} has no split '{split}' (missing {', '.join(missing)}; "
                    f"splits present: {', '.join(splits) or 'none'})"
                )
            images = pack[needed[0]]
            labels = pack[needed[1]]
            class_names = [str(c) for c in pack[needed[2]].tolist()]
    except UserError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"dataset pack {path} is not a readable .npz pack ({str(exc).splitlines()[0]})") from None

    where = f"dataset pack {path} split '{split}'"
    if images.dtype != np.uint8:
        raise UserError(f"{where}: {split}_images must be uint8, not {images.dtype}")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise UserError(f"{where}: {split}_images must be (N, h, w) or (N, h, w, 3), not {tuple(images.shape)}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"{where}: {split}_labels must be int (N,) with N = {images.shape[0]}, "
            f"not {labels.dtype} {tuple(labels.shape)}"
        )
    n_classes = len(class_names)
    if n_classes == 0:
        raise UserError(f"{where}: {split}_classes is empty")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise UserError(f"{where}: labels must lie in 0..{n_classes - 1}, found {labels.min()}..{labels.max()}")
    labels = labels.astype(np.int64)
    counts = np.bincount(labels, minlength=n_classes)
    if counts.min() == 0:
        raise UserError(f"{where}: class '{class_names[int(np.argmin(counts))]}' has no images")

    n, h, w = images.shape[:3]
    if (h, w) != (stored_size, stored_size):
        mode = "L" if images.ndim == 3 else "RGB"
        out = np.empty((n, stored_size, stored_size) + images.shape[3:], dtype=np.uint8)
        for k in range(n):
            out[k] = fit_square(Image.fromarray(images[k], mode=mode), stored_size)
        images = out
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=3)
    return ImageSet(np.ascontiguousarray(images), labels, class_names, spec)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------
def load_split(spec: str, stored_size: int, cache_dir: str | None = None, num_workers: int = 0) -> ImageSet:
    """Load one split as an :class:`ImageSet` of uint8 (N, stored_size, stored_size, 3) images.

    Args:
        spec: a folder ``<root>/<split>`` (``<root>/<split>/<class>/<image>``) or ``<file>.npz#<split>``.
        stored_size: side of the stored square images (``BatchTransform.stored_size``).
        cache_dir: folder splits only: where decoded arrays are cached (``None``: no cache).
        num_workers: folder splits only: decode in a pool of this many processes (0: in this process).

    Raises:
        UserError: missing folder/pack/split, no class folders, an empty class folder, a subfolder inside a class
            folder, a file that is not a readable image; one line naming the path.
    """
    spec = os.fspath(spec)
    if stored_size < 1:
        raise ValueError(f"stored_size must be positive, got {stored_size}")
    npz = _parse_npz_spec(spec)
    if npz is not None:
        return _load_npz(npz[0], npz[1], stored_size, spec)
    root, sep, split = spec.rpartition("#")
    if sep and os.path.isdir(root):
        from data_generator.formats import load_format_split  # the benchmark files' readers
        return load_format_split(root, split, stored_size, cache_dir, num_workers)
    return _load_folder(spec, stored_size, cache_dir, num_workers)
