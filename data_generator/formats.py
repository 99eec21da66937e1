"""The benchmark files researchers hold: one :class:`~data_generator.reader.Reader` per kind, read into the same
:class:`~data_generator.image_cache.ImageSet` as the class-folder reader, through the same decoded-image cache.

The format is detected from the files in ``--dataset_dir`` (no flag); docs/DATA.md has the table of benchmarks,
files and split sizes, and what each public loader was checked against.

======================  ====================================================================================
kind                    files in ``--dataset_dir`` (per split ``s`` in train, val, test)
======================  ====================================================================================
``csv``                 ``images/`` with every image, ``s.csv`` with the header ``filename,label`` (Ravi & Larochelle)
``metaoptnet``          ``miniImageNet_category_split_train_phase_train.pickle``, ``..._val.pickle``,
                        ``..._test.pickle``; ``FC100_s.pickle``; ``CIFAR_FS_s.pickle``: a dict with ``data`` uint8
                        (N, h, w, 3), ``labels`` (N ints) and (miniImageNet) ``catname2label`` (MetaOptNet / RFS)
``learn2learn``         ``mini-imagenet-cache-{train,validation,test}.pkl`` (``-val.pkl`` accepted): a dict with
                        ``image_data`` uint8 (N, 84, 84, 3) and ``class_dict`` (class name -> list of indices)
``tiered``              ``s_labels.pkl`` (a dict whose ``label_specific`` gives each image's class, and
                        ``label_specific_str`` the class names; or, as MetaOptNet's loader reads it, ``labels``) beside ``s_images_png.pkl`` (a list of PNG-encoded
                        images) or ``s_images.npz`` (``images`` uint8 (N, 84, 84, 3))
``cifar100``            ``cifar-100-python/`` (or its content ``train``, ``test``, ``meta``): FC100 or CIFAR-FS,
                        chosen with ``--dataset``, with the published class splits (``splits/cifar100.json``)
======================  ====================================================================================

Every reader gives images grouped by class, classes sorted by name (labels ``0..C-1`` in that order), and within a
class the images in the source's order (file-name order for csv, as for class folders), each converted like a
folder image (RGB, shorter side to the stored size, centre crop; an image already at the stored size is copied
as is). So the same images stored as folders, csv, MetaOptNet pickle or learn2learn cache give identical arrays.
Class names: the csv labels, ``catname2label``'s names, ``class_dict``'s keys, ``label_specific_str``, the
CIFAR-100 fine label names; where a file has no names (FC100 / CIFAR-FS pickles, tiered labels without
``label_specific_str``) the label number, zero-padded so that sorting by name keeps the number order.

A split's spec is ``<root>#<kind>:<benchmark>:<split>`` (:class:`~data_generator.reader.SplitSpec`). Each split is
cached as ``<cache_dir>/<key>.npy`` + ``.json`` like a folder split; ``key`` is the sha1 of the kind, benchmark,
split, stored size and every file read (path, byte size, ``mtime_ns``; for csv every image it lists), so a cache hit
reads no pickle.
Large sources stream: the tieredImageNet PNG list is unpickled item by item
(:func:`utils.safe_pickle.stream_pickle_list`) and its ``images.npz`` is read in blocks of rows, each image
written into the output memmap as it is decoded. Every pickle goes through :mod:`utils.safe_pickle` (nothing in a
file can run code). Problems with the files raise :class:`utils.errors.UserError` naming the file.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import zipfile
from typing import Any, Callable, Sequence

import numpy as np

from data_generator.decoding import decode_all, decode_bytes, fit_array
from data_generator.image_cache import Prepared
from data_generator.reader import SPLITS, Reader, SplitSpec
from utils.errors import UserError
from utils.safe_pickle import load_pickle, stream_pickle_list

__all__ = ["CsvFiles", "MetaOptNetPickles", "Learn2LearnCache", "TieredImageNet", "Cifar100", "BENCHMARKS",
           "METAOPTNET_FILES", "CIFAR100_SPLITS"]

#: The benchmarks a --dataset preset names (and that a format can hold).
BENCHMARKS = ("miniImageNet", "tieredImageNet", "FC100", "CIFAR-FS")

METAOPTNET_FILES = {
    "miniImageNet": {"train": "miniImageNet_category_split_train_phase_train.pickle",
                     "val": "miniImageNet_category_split_val.pickle",
                     "test": "miniImageNet_category_split_test.pickle"},
    "FC100": {s: f"FC100_{s}.pickle" for s in SPLITS},
    "CIFAR-FS": {s: f"CIFAR_FS_{s}.pickle" for s in SPLITS},
}
L2L_FILES = {"train": ("mini-imagenet-cache-train.pkl",),
             "val": ("mini-imagenet-cache-validation.pkl", "mini-imagenet-cache-val.pkl"),
             "test": ("mini-imagenet-cache-test.pkl",)}
CIFAR_DIR = "cifar-100-python"
CIFAR_FILES = ("train", "test", "meta")

with open(os.path.join(os.path.dirname(__file__), "splits", "cifar100.json"), encoding="utf-8") as _fh:
    #: {"CIFAR-FS": {"train": [fine class names], ...}, "FC100": {"train": [superclass names], ...}} (with sources)
    CIFAR100_SPLITS: dict[str, Any] = json.load(_fh)


# ---------------------------------------------------------------------------------------------------------------------
# Detection and the split files
# ---------------------------------------------------------------------------------------------------------------------
def _cifar_root(root: str) -> str | None:
    """The folder holding the CIFAR-100 python release's ``train``, ``test``, ``meta`` files, if ``root`` is it or
    holds it as ``cifar-100-python/``."""
    for d in (os.path.join(root, CIFAR_DIR), root):
        if os.path.isfile(os.path.join(d, "meta")) and (os.path.isfile(os.path.join(d, "train"))
                                                        or os.path.isfile(os.path.join(d, "test"))):
            return d
    return None


def _names(root: str) -> set[str]:
    """The names in the folder ``root`` (empty when it is not a listable folder: detection never raises)."""
    try:
        return set(os.listdir(root))
    except OSError:
        return set()


def _need(root: str, rel: str, split: str, kind: str, expected: str) -> str:
    """``rel`` (a split file, relative to ``root``) when it is a file; else the UserError naming it (missing, a broken
    or looping symbolic link)."""
    path = os.path.join(root, rel)
    if os.path.islink(path) and not os.path.exists(path):
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UserError(f"{path} is a symbolic link loop; remove it or point it at the {split} split file "
                                "of the benchmark") from None
        raise UserError(f"{path} is a broken symbolic link (its target {os.readlink(path)} does not exist); remove "
                        "it or restore the target") from None
    if not os.path.isfile(path):
        raise UserError(f"dataset folder {root} ({kind}): the {split} split file {os.path.basename(path)} is missing "
                        f"(expected {expected})")
    return rel


def _csv_images(path: str, root: str) -> list[str]:
    """The existing images a csv lists, relative to ``root`` (for the cache key; missing ones are reported by the
    reader)."""
    out = []
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            next(reader, None)
            for row in reader:
                if row and row[0].strip():
                    p = os.path.join(root, "images", row[0].strip())
                    if os.path.isfile(p):
                        out.append(p)
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    return [os.path.relpath(p, root) for p in sorted(set(out))]


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------
def _get(d: Any, key: str, path: str) -> Any:
    """``d[key]`` of an unpickled dict (str or, from ``encoding="bytes"`` files, bytes keys); UserError if absent."""
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a pickled dict with the key '{key}', found {type(d).__name__}")
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    keys = ", ".join(sorted(k.decode("latin1") if isinstance(k, bytes) else str(k) for k in d)) or "none"
    raise UserError(f"{path}: no key '{key}' (keys present: {keys})")


def _name(x: Any) -> str:
    return x.decode("latin1") if isinstance(x, bytes) else str(x)


def _int_labels(labels: Any, path: str, key: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise UserError(f"{path}: '{key}' must be a list of N integers, not {arr.dtype} {tuple(arr.shape)}")
    return arr.astype(np.int64)


def _image_array(data: Any, path: str, key: str) -> np.ndarray:
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 4 or data.shape[-1] != 3:
        what = f"{data.dtype} {tuple(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path}: '{key}' must be uint8 (N, h, w, 3), not {what}")
    return data


def _same_length(n_images: int, n_labels: int, path: str, what_images: str, what_labels: str) -> None:
    if n_images != n_labels:
        raise UserError(f"{path}: {what_labels} has {n_labels} entries but {what_images} has {n_images} images")


def _numbered(labels: np.ndarray) -> dict[int, str]:
    width = max(3, len(str(int(labels.max())))) if labels.size else 3
    return {int(v): f"{int(v):0{width}d}" for v in np.unique(labels)}


def _group(per_image_names: Sequence[str] | np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """-> (class names sorted (C,), labels int64 (N,) in output order, order int64 (N,): the source index of each
    output image; classes by name, the source order kept within a class)."""
    names = np.asarray(per_image_names, dtype=object)
    classes = sorted(set(names.tolist()))
    index = {c: i for i, c in enumerate(classes)}
    src_labels = np.fromiter((index[n] for n in names), dtype=np.int64, count=len(names))
    order = np.argsort(src_labels, kind="stable").astype(np.int64)
    return classes, src_labels[order], order


def _fill_from_array(data: np.ndarray, order: np.ndarray, size: int) -> Callable[[np.ndarray], None]:
    def fill(out: np.ndarray) -> None:
        if data.shape[1] == data.shape[2] == size:
            for s in range(0, len(order), 4096):
                out[s:s + 4096] = data[order[s:s + 4096]]
        else:
            for k, src in enumerate(order):
                out[k] = fit_array(data[src], size)
    return fill


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy version {version}")


def _npz_images_header(path: str) -> tuple[int, tuple[int, ...]]:
    """(N, shape) of ``images`` in the npz at ``path``, without reading the array."""
    try:
        with zipfile.ZipFile(path) as z, z.open("images.npy") as f:
            shape, fortran, dtype = _read_header(f)
    except KeyError:
        raise UserError(f"{path}: no array 'images' in the npz") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{path} is not a readable .npz file ({str(exc).splitlines()[0]})") from None
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[-1] != 3:
        raise UserError(f"{path}: 'images' must be uint8 (N, h, w, 3) in C order, not {dtype} {tuple(shape)}")
    return int(shape[0]), tuple(int(s) for s in shape)


def _stream_npz(path: str, pos: np.ndarray, size: int, out: np.ndarray, block: int = 128) -> None:
    """Copy ``images`` of the npz into ``out[pos[i]]``, ``block`` rows at a time (nothing else held)."""
    with zipfile.ZipFile(path) as z, z.open("images.npy") as f:
        shape, _, _ = _read_header(f)
        row = int(np.prod(shape[1:]))
        for s in range(0, shape[0], block):
            k = min(block, shape[0] - s)
            buf = f.read(k * row)
            if len(buf) != k * row:
                raise UserError(f"{path}: 'images' is truncated (row {s + len(buf) // row} of {shape[0]})")
            rows = np.frombuffer(buf, dtype=np.uint8).reshape((k,) + tuple(shape[1:]))
            for j in range(k):
                out[pos[s + j]] = fit_array(rows[j], size)


# ---------------------------------------------------------------------------------------------------------------------
# The readers (registered in data_generator/dataset_loader.py READERS)
# ---------------------------------------------------------------------------------------------------------------------
class CsvFiles(Reader):
    """Ravi & Larochelle's split: ``images/`` with every image, ``<split>.csv`` with the header ``filename,label``."""

    kind = "csv"
    title = "miniImageNet csv files"
    expected = "images/ + train.csv val.csv test.csv"
    benchmarks = ("miniImageNet",)

    def detect(self, root: str) -> list[tuple[str, ...]]:
        names = _names(root)
        found = os.path.isdir(os.path.join(root, "images")) and any(f"{s}.csv" in names for s in SPLITS)
        return [self.benchmarks] if found else []

    def files(self, spec: SplitSpec, quiet: bool = False) -> list[str]:
        root, split = spec.path, spec.split
        table = _need(root, f"{split}.csv", split, self.kind, self.expected)
        # every image the csv lists is part of the key (a replaced image gives a new entry)
        return [table] + _csv_images(os.path.join(root, table), root)

    def prepare(self, spec: SplitSpec, files: list[str], stored_size: int, num_workers: int) -> Prepared:
        root, size, workers = spec.path, stored_size, num_workers
        path = os.path.join(root, files[0])  # the csv (the rest of files: the images it lists, for the key)
        rows: list[tuple[str, str]] = []
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.reader(fh)
                header = [c.strip() for c in next(reader, [])]
                if header[:2] != ["filename", "label"]:
                    raise UserError(f"{path}: the first line must be the header 'filename,label', "
                                    f"not '{','.join(header)}'")
                for line, row in enumerate(reader, start=2):
                    if not row or not "".join(row).strip():
                        continue
                    if len(row) < 2:
                        raise UserError(f"{path} line {line}: expected 'filename,label', got '{','.join(row)}'")
                    fname, label = row[0].strip(), row[1].strip()
                    if not os.path.isfile(os.path.join(root, "images", fname)):
                        img = os.path.join(root, "images", fname)
                        if os.path.islink(img):
                            raise UserError(f"{path} line {line}: the image {img} is a broken symbolic link (its "
                                            f"target {os.readlink(img)} does not exist or loops); remove it or "
                                            "restore the target")
                        raise UserError(f"{path} line {line}: the image images/{fname} is missing")
                    rows.append((fname, label))
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {path}: {exc}") from None
        if not rows:
            raise UserError(f"{path} lists no images")
        rows.sort(key=lambda r: (r[1], r[0]))  # by class, then file name (as the folder reader)
        classes, labels, _ = _group([r[1] for r in rows])
        rel = [f"images/{r[0]}" for r in rows]
        paths = [os.path.join(root, r) for r in rel]
        return Prepared(classes, labels, lambda out: decode_all(paths, size, out, workers), rel)


class MetaOptNetPickles(Reader):
    """MetaOptNet / RFS pickles: a dict with ``data`` uint8 (N, h, w, 3), ``labels`` and (miniImageNet)
    ``catname2label``; one file per benchmark and split (:data:`METAOPTNET_FILES`)."""

    kind = "metaoptnet"
    title = "MetaOptNet/RFS pickles"
    expected = "MetaOptNet/RFS pickles (miniImageNet_category_split_*.pickle, FC100_*.pickle, CIFAR_FS_*.pickle)"
    benchmarks = tuple(METAOPTNET_FILES)

    def detect(self, root: str) -> list[tuple[str, ...]]:
        names = _names(root)
        return [(bench,) for bench, files in METAOPTNET_FILES.items() if any(f in names for f in files.values())]

    def files(self, spec: SplitSpec, quiet: bool = False) -> list[str]:
        root, split = spec.path, spec.split
        files = METAOPTNET_FILES[spec.benchmark]
        return [_need(root, files[split], split, self.kind, ", ".join(files.values()))]

    def prepare(self, spec: SplitSpec, files: list[str], stored_size: int, num_workers: int) -> Prepared:
        path, size = os.path.join(spec.path, files[0]), stored_size
        d = load_pickle(path)
        data = _image_array(_get(d, "data", path), path, "data")
        labels = _int_labels(_get(d, "labels", path), path, "labels")
        _same_length(len(data), len(labels), path, "'data'", "'labels'")
        names = _numbered(labels)
        cat = None
        for k in ("catname2label", b"catname2label"):
            if isinstance(d, dict) and k in d:
                cat = d[k]
        numbered = True
        if isinstance(cat, dict):
            by_label = {int(v): _name(k) for k, v in cat.items()}
            if all(int(v) in by_label for v in names):
                names, numbered = by_label, False
        classes, out_labels, order = _group([names[int(v)] for v in labels])
        return Prepared(classes, out_labels, _fill_from_array(data, order, size), numbered_names=numbered)


class Learn2LearnCache(Reader):
    """learn2learn's ``mini-imagenet-cache-<mode>.pkl``: a dict with ``image_data`` uint8 (N, 84, 84, 3) and
    ``class_dict`` (class name -> list of indices)."""

    kind = "learn2learn"
    title = "learn2learn miniImageNet cache files"
    expected = "learn2learn mini-imagenet-cache-*.pkl"
    benchmarks = ("miniImageNet",)

    def detect(self, root: str) -> list[tuple[str, ...]]:
        return [self.benchmarks] if _names(root) & {f for fs in L2L_FILES.values() for f in fs} else []

    def files(self, spec: SplitSpec, quiet: bool = False) -> list[str]:
        root, split = spec.path, spec.split
        for name in L2L_FILES[split]:
            if os.path.isfile(os.path.join(root, name)):
                return [name]
        return [_need(root, L2L_FILES[split][0], split, self.kind, ", ".join(fs[0] for fs in L2L_FILES.values()))]

    def prepare(self, spec: SplitSpec, files: list[str], stored_size: int, num_workers: int) -> Prepared:
        path, size = os.path.join(spec.path, files[0]), stored_size
        d = load_pickle(path)
        data = _image_array(_get(d, "image_data", path), path, "image_data")
        class_dict = _get(d, "class_dict", path)
        if not isinstance(class_dict, dict) or not class_dict:
            raise UserError(f"{path}: 'class_dict' must map class names to lists of image indices")
        owner = np.full(len(data), -1, dtype=np.int64)
        names = sorted((_name(k), k) for k in class_dict)
        for c, (name, key) in enumerate(names):
            idx = np.asarray(class_dict[key]).astype(np.int64).ravel()
            bad = idx[(idx < 0) | (idx >= len(data))]
            if bad.size:
                raise UserError(f"{path}: class_dict['{name}'] names image {int(bad[0])}, but image_data holds "
                                f"{len(data)} images")
            owner[idx] = c
        order = np.flatnonzero(owner >= 0)
        order = order[np.argsort(owner[order], kind="stable")]
        return Prepared([n for n, _ in names], owner[order], _fill_from_array(data, order, size))


class TieredImageNet(Reader):
    """tieredImageNet: ``<split>_labels.pkl`` beside Ren et al.'s ``<split>_images_png.pkl`` (a list of PNGs) or
    MetaOptNet's ``<split>_images.npz``; both stream."""

    kind = "tiered"
    title = "tieredImageNet files"
    expected = "tieredImageNet *_labels.pkl with *_images_png.pkl or *_images.npz"
    benchmarks = ("tieredImageNet",)

    def detect(self, root: str) -> list[tuple[str, ...]]:
        markers = {f"{s}{end}" for s in SPLITS for end in ("_labels.pkl", "_images_png.pkl", "_images.npz")}
        return [self.benchmarks] if _names(root) & markers else []

    def files(self, spec: SplitSpec, quiet: bool = False) -> list[str]:
        root, split = spec.path, spec.split
        labels = _need(root, f"{split}_labels.pkl", split, self.kind,
                       f"{split}_labels.pkl with {split}_images_png.pkl or {split}_images.npz")
        for name in (f"{split}_images_png.pkl", f"{split}_images.npz"):
            if os.path.isfile(os.path.join(root, name)):
                return [name, labels]
        return [_need(root, f"{split}_images_png.pkl", split, self.kind,
                      f"{split}_images_png.pkl or {split}_images.npz beside {split}_labels.pkl"), labels]

    def prepare(self, spec: SplitSpec, files: list[str], stored_size: int, num_workers: int) -> Prepared:
        images_path, labels_path = (os.path.join(spec.path, f) for f in files)
        size = stored_size
        d = load_pickle(labels_path)
        # Ren et al.'s files: label_specific (+ label_specific_str); MetaOptNet's tiered loader reads 'labels'
        key = "labels" if isinstance(d, dict) and ("labels" in d or b"labels" in d) and not (
            "label_specific" in d or b"label_specific" in d) else "label_specific"
        labels = _int_labels(_get(d, key, labels_path), labels_path, key)
        names = _numbered(labels)
        strs = None
        for k in ("label_specific_str", b"label_specific_str"):
            if isinstance(d, dict) and k in d:
                strs = [_name(x) for x in d[k]]
        numbered = True
        if strs is not None and labels.size and labels.min() >= 0 and labels.max() < len(strs):
            names, numbered = {v: strs[v] for v in names}, False
        classes, out_labels, order = _group([names[int(v)] for v in labels])
        n = len(labels)
        pos = np.empty(n, dtype=np.int64)
        pos[order] = np.arange(n)  # source image i goes to output row pos[i]

        if images_path.endswith(".npz"):
            n_img, _ = _npz_images_header(images_path)
            _same_length(n_img, n, labels_path, f"{os.path.basename(images_path)} 'images'", f"'{key}'")
            return Prepared(classes, out_labels, lambda out: _stream_npz(images_path, pos, size, out),
                            numbered_names=numbered)

        def fill(out: np.ndarray) -> None:
            def put(i: int, blob: Any) -> None:
                if i >= n:
                    raise UserError(f"{labels_path}: '{key}' has {n} entries but {images_path} has more images")
                out[pos[i]] = decode_bytes(blob, size, f"{images_path} image {i}")
            count = stream_pickle_list(images_path, put)
            _same_length(count, n, labels_path, os.path.basename(images_path), f"'{key}'")
        return Prepared(classes, out_labels, fill, numbered_names=numbered)


class Cifar100(Reader):
    """The CIFAR-100 python release (``cifar-100-python/``: ``train``, ``test``, ``meta``), giving FC100 or CIFAR-FS
    with the published class splits (:data:`CIFAR100_SPLITS`); ``--dataset`` chooses."""

    kind = "cifar100"
    title = f"CIFAR-100 ({CIFAR_DIR})"
    expected = f"{CIFAR_DIR}/"
    benchmarks = ("FC100", "CIFAR-FS")

    def detect(self, root: str) -> list[tuple[str, ...]]:
        return [self.benchmarks] if _cifar_root(root) is not None else []

    def files(self, spec: SplitSpec, quiet: bool = False) -> list[str]:
        root, split = spec.path, spec.split
        d = _cifar_root(root) or os.path.join(root, CIFAR_DIR)
        return [_need(root, os.path.relpath(os.path.join(d, f), root), split, self.kind,
                      f"{CIFAR_DIR}/train, test and meta") for f in CIFAR_FILES]

    def prepare(self, spec: SplitSpec, files: list[str], stored_size: int, num_workers: int) -> Prepared:
        bench, split, size = spec.benchmark, spec.split, stored_size
        train_path, test_path, meta_path = (os.path.join(spec.path, f) for f in files)
        meta = load_pickle(meta_path)
        fine_names = [_name(x) for x in _get(meta, "fine_label_names", meta_path)]
        coarse_names = [_name(x) for x in _get(meta, "coarse_label_names", meta_path)]
        published = CIFAR100_SPLITS[bench]
        parts, fine_all, coarse_all = [], [], []
        for path in (train_path, test_path):  # each class: its 500 train images, then its 100 test images
            d = load_pickle(path)
            data = _get(d, "data", path)
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                what = f"{data.dtype} {tuple(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
                raise UserError(f"{path}: 'data' must be uint8 (N, 3072), not {what}")
            fine = _int_labels(_get(d, "fine_labels", path), path, "fine_labels")
            coarse = _int_labels(_get(d, "coarse_labels", path), path, "coarse_labels")
            _same_length(len(data), len(fine), path, "'data'", "'fine_labels'")
            _same_length(len(data), len(coarse), path, "'data'", "'coarse_labels'")
            if fine.size and (fine.min() < 0 or fine.max() >= len(fine_names) or coarse.min() < 0
                              or coarse.max() >= len(coarse_names)):
                raise UserError(f"{path}: labels outside the {len(fine_names)} fine / {len(coarse_names)} coarse "
                                f"names of {meta_path}")
            parts.append(data)
            fine_all.append(fine)
            coarse_all.append(coarse)
        fine = np.concatenate(fine_all)
        coarse = np.concatenate(coarse_all)
        if published["unit"] == "superclass":
            wanted = set(published[split])
            keep = np.array([coarse_names[c] in wanted for c in coarse], dtype=bool)
        else:
            wanted = set(published[split])
            keep = np.array([fine_names[f] in wanted for f in fine], dtype=bool)
        missing = sorted(wanted - ({coarse_names[c] for c in coarse} if published["unit"] == "superclass"
                                   else {fine_names[f] for f in fine}))
        if missing:
            raise UserError(f"{meta_path}: the {bench} {split} {published['unit']}(es) {', '.join(missing[:3])} have "
                            "no images")
        idx = np.flatnonzero(keep)
        classes, out_labels, order = _group([fine_names[f] for f in fine[idx]])
        src = idx[order]
        counts = np.cumsum([0] + [len(p) for p in parts])

        def fill(out: np.ndarray) -> None:
            for k, i in enumerate(src):
                part = int(np.searchsorted(counts, i, side="right") - 1)
                flat = parts[part][i - counts[part]]
                out[k] = fit_array(flat.reshape(3, 32, 32).transpose(1, 2, 0), size)
        return Prepared(classes, out_labels, fill)
