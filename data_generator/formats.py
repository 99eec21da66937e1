"""The benchmark files researchers hold, read into the same :class:`~data_generator.dataset_loader.ImageSet` as the
class-folder reader, through the same decoded-image cache.

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

Each split is cached as ``<cache_dir>/<key>.npy`` + ``.json`` like a folder split; ``key`` is the sha1 of the kind,
benchmark, split, stored size and every file read (path, byte size, ``mtime_ns``), so a cache hit reads no pickle.
Large sources stream: the tieredImageNet PNG list is unpickled item by item
(:func:`utils.safe_pickle.stream_pickle_list`) and its ``images.npz`` is read in blocks of rows, each image
written into the output memmap as it is decoded. Every pickle goes through :mod:`utils.safe_pickle` (nothing in a
file can run code). Problems with the files raise :class:`utils.errors.UserError` naming the file.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from data_generator.dataset_loader import ImageSet, _decode_all, fit_square, stat_key, to_rgb
from data_generator.image_cache import KEY_SCHEME, image_digests, lookup_cache, write_cache
from utils.errors import UserError
from utils.safe_pickle import load_pickle, stream_pickle_list

__all__ = ["detect_formats", "format_split_spec", "load_format_split", "format_cache_key", "split_files",
           "BENCHMARKS", "KINDS", "CIFAR100_SPLITS"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: The benchmarks a --dataset preset names (and that a format can hold).
BENCHMARKS = ("miniImageNet", "tieredImageNet", "FC100", "CIFAR-FS")
KINDS = ("csv", "metaoptnet", "learn2learn", "tiered", "cifar100")

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

_EXPECTED = ("class folders train/ val/ test/; images/ + train.csv val.csv test.csv; MetaOptNet/RFS pickles "
             "(miniImageNet_category_split_*.pickle, FC100_*.pickle, CIFAR_FS_*.pickle); learn2learn "
             "mini-imagenet-cache-*.pkl; tieredImageNet *_labels.pkl with *_images_png.pkl or *_images.npz; "
             "cifar-100-python/; see docs/DATA.md")


# ---------------------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------------------
def _cifar_root(root: str) -> str | None:
    """The folder holding the CIFAR-100 python release's ``train``, ``test``, ``meta`` files, if ``root`` is it or
    holds it as ``cifar-100-python/``."""
    for d in (os.path.join(root, CIFAR_DIR), root):
        if os.path.isfile(os.path.join(d, "meta")) and (os.path.isfile(os.path.join(d, "train"))
                                                        or os.path.isfile(os.path.join(d, "test"))):
            return d
    return None


def detect_formats(root: str) -> list[tuple[str, str]]:
    """The (kind, benchmark) pairs whose files are in ``root`` (a file of any one split is enough); class folders
    are not listed (they are the fallback). For ``cifar100`` the benchmark is ``"FC100|CIFAR-FS"``."""
    try:
        names = set(os.listdir(root))
    except OSError:
        return []
    found: list[tuple[str, str]] = []
    if os.path.isdir(os.path.join(root, "images")) and any(f"{s}.csv" in names for s in SPLITS):
        found.append(("csv", "miniImageNet"))
    for bench, files in METAOPTNET_FILES.items():
        if any(f in names for f in files.values()):
            found.append(("metaoptnet", bench))
    if any(f in names for fs in L2L_FILES.values() for f in fs):
        found.append(("learn2learn", "miniImageNet"))
    if any(f"{s}_labels.pkl" in names for s in SPLITS) or any(
            f"{s}_images_png.pkl" in names or f"{s}_images.npz" in names for s in SPLITS):
        found.append(("tiered", "tieredImageNet"))
    if _cifar_root(root) is not None:
        found.append(("cifar100", "FC100|CIFAR-FS"))
    return found


_WARNED: set[tuple[str, str]] = set()


def _has_class_folders(root: str) -> bool:
    return any(os.path.isdir(os.path.join(root, s)) for s in SPLITS)


def format_split_spec(root: str, split: str, dataset: str | None = None) -> str | None:
    """The spec ``"<root>#<kind>:<benchmark>:<split>"`` of one split of the benchmark files in ``root``, or None
    when ``root`` holds class folders (``<root>/<split>`` then applies).

    ``dataset`` (the ``--dataset`` preset) picks among several benchmarks in one folder and chooses FC100 or
    CIFAR-FS for ``cifar-100-python``. Raises UserError when ``root`` holds no known format, or several that
    ``dataset`` does not decide between.
    """
    found = detect_formats(root)
    if not found:
        if _has_class_folders(root):
            return None
        raise UserError(f"dataset folder {root} holds no dataset this program reads (expected one of: {_EXPECTED})")
    bench = dataset if dataset in BENCHMARKS else None
    if len(found) > 1:
        chosen = [f for f in found if bench and bench in f[1].split("|")]
        if len(chosen) != 1:
            what = ", ".join(f"{k} ({b})" for k, b in found)
            raise UserError(f"dataset folder {root} holds several datasets: {what}; pick one with --dataset "
                            f"({', '.join(BENCHMARKS)}) or point --dataset_dir at a folder with one")
        found = chosen
    kind, have = found[0]
    if kind == "cifar100":
        if bench not in ("FC100", "CIFAR-FS"):
            raise UserError(f"dataset folder {root} holds CIFAR-100 ({CIFAR_DIR}), which gives two benchmarks: "
                            f"pass --dataset FC100 or --dataset CIFAR-FS")
        have = bench
    elif bench is not None and bench != have and (root, bench) not in _WARNED:
        _WARNED.add((root, bench))
        print(f"warning: --dataset {bench}, but {root} holds {have} ({kind} files); reading those (log folders "
              f"are named by --dataset)", flush=True)
    return f"{root}#{kind}:{have}:{split}"


# ---------------------------------------------------------------------------------------------------------------------
# Per-split sources
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """What a reader found, before any image is converted: class names (C,) sorted, labels int64 (N,) in output
    order (grouped by class), and ``fill(out)`` that writes the N converted images into ``out`` uint8
    (N, S, S, 3)."""

    class_names: list[str]
    labels: np.ndarray
    fill: Callable[[np.ndarray], None]
    files: list[str] | None = None
    numbered_names: bool = False  # the names are label numbers (the file holds none): not compared across splits


def _need(path: str, root: str, split: str, kind: str, expected: str) -> str:
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
    return path


def split_files(root: str, kind: str, bench: str, split: str) -> list[str]:
    """The files one split is read from (absolute or relative to the cwd as ``root`` is); UserError if missing."""
    if kind == "csv":
        return [_need(os.path.join(root, f"{split}.csv"), root, split, kind, "images/ + train.csv val.csv test.csv")]
    if kind == "metaoptnet":
        files = METAOPTNET_FILES[bench]
        return [_need(os.path.join(root, files[split]), root, split, kind, ", ".join(files.values()))]
    if kind == "learn2learn":
        for name in L2L_FILES[split]:
            if os.path.isfile(os.path.join(root, name)):
                return [os.path.join(root, name)]
        return [_need(os.path.join(root, L2L_FILES[split][0]), root, split, kind,
                      ", ".join(fs[0] for fs in L2L_FILES.values()))]
    if kind == "tiered":
        labels = _need(os.path.join(root, f"{split}_labels.pkl"), root, split, kind,
                       f"{split}_labels.pkl with {split}_images_png.pkl or {split}_images.npz")
        for name in (f"{split}_images_png.pkl", f"{split}_images.npz"):
            if os.path.isfile(os.path.join(root, name)):
                return [os.path.join(root, name), labels]
        return [_need(os.path.join(root, f"{split}_images_png.pkl"), root, split, kind,
                      f"{split}_images_png.pkl or {split}_images.npz beside {split}_labels.pkl"), labels]
    if kind == "cifar100":
        d = _cifar_root(root) or os.path.join(root, CIFAR_DIR)
        return [_need(os.path.join(d, f), root, split, kind, f"{CIFAR_DIR}/train, test and meta") for f in CIFAR_FILES]
    raise ValueError(f"unknown format kind {kind!r}")


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


def _fit(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (size, size, 3): copied when already that size, else the folder conversion."""
    if img.shape[0] == img.shape[1] == size:
        return img
    return fit_square(Image.fromarray(np.ascontiguousarray(img), mode="RGB"), size)


def _fill_from_array(data: np.ndarray, order: np.ndarray, size: int) -> Callable[[np.ndarray], None]:
    def fill(out: np.ndarray) -> None:
        if data.shape[1] == data.shape[2] == size:
            for s in range(0, len(order), 4096):
                out[s:s + 4096] = data[order[s:s + 4096]]
        else:
            for k, src in enumerate(order):
                out[k] = _fit(data[src], size)
    return fill


def _decode_bytes(blob: Any, size: int, where: str) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (size, size, 3) RGB. ``blob``: a uint8 1-D array (what ``cv2.imencode`` gives),
    bytes, or a str (a Python 2 byte string read with ``encoding="latin1"``)."""
    try:
        if isinstance(blob, np.ndarray):
            raw = blob.tobytes()
        elif isinstance(blob, str):
            raw = blob.encode("latin1")
        else:
            raw = bytes(blob)
        with Image.open(io.BytesIO(raw)) as im:
            rgb = to_rgb(im, where)
        return fit_square(rgb, size)
    except UserError:
        raise
    except Image.UnidentifiedImageError:
        raise UserError(f"{where}: not a readable image (neither PNG nor JPEG nor another format PIL reads)") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...; bytes() a TypeError
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{where}: not a readable image ({detail})") from None


# ---------------------------------------------------------------------------------------------------------------------
# Readers: (root, bench, split, files, stored size, workers) -> Prepared
# ---------------------------------------------------------------------------------------------------------------------
def _read_csv(root: str, bench: str, split: str, files: list[str], size: int, workers: int) -> Prepared:
    path = files[0]
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
                        raise UserError(f"{path} line {line}: the image {img} is a broken symbolic link (its target "
                                        f"{os.readlink(img)} does not exist or loops); remove it or restore the "
                                        "target")
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
    return Prepared(classes, labels, lambda out: _decode_all(paths, size, out, workers), rel)


def _read_metaoptnet(root: str, bench: str, split: str, files: list[str], size: int, workers: int) -> Prepared:
    path = files[0]
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


def _read_learn2learn(root: str, bench: str, split: str, files: list[str], size: int, workers: int) -> Prepared:
    path = files[0]
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
                out[pos[s + j]] = _fit(rows[j], size)


def _read_tiered(root: str, bench: str, split: str, files: list[str], size: int, workers: int) -> Prepared:
    images_path, labels_path = files
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
            out[pos[i]] = _decode_bytes(blob, size, f"{images_path} image {i}")
        count = stream_pickle_list(images_path, put)
        _same_length(count, n, labels_path, os.path.basename(images_path), f"'{key}'")
    return Prepared(classes, out_labels, fill, numbered_names=numbered)


def _read_cifar100(root: str, bench: str, split: str, files: list[str], size: int, workers: int) -> Prepared:
    train_path, test_path, meta_path = files
    meta = load_pickle(meta_path)
    fine_names = [_name(x) for x in _get(meta, "fine_label_names", meta_path)]
    coarse_names = [_name(x) for x in _get(meta, "coarse_label_names", meta_path)]
    spec = CIFAR100_SPLITS[bench]
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
            raise UserError(f"{path}: labels outside the {len(fine_names)} fine / {len(coarse_names)} coarse names of "
                            f"{meta_path}")
        parts.append(data)
        fine_all.append(fine)
        coarse_all.append(coarse)
    fine = np.concatenate(fine_all)
    coarse = np.concatenate(coarse_all)
    if spec["unit"] == "superclass":
        wanted = set(spec[split])
        keep = np.array([coarse_names[c] in wanted for c in coarse], dtype=bool)
    else:
        wanted = set(spec[split])
        keep = np.array([fine_names[f] in wanted for f in fine], dtype=bool)
    missing = sorted(wanted - ({coarse_names[c] for c in coarse} if spec["unit"] == "superclass"
                               else {fine_names[f] for f in fine}))
    if missing:
        raise UserError(f"{meta_path}: the {bench} {split} {spec['unit']}(es) {', '.join(missing[:3])} have no images")
    idx = np.flatnonzero(keep)
    classes, out_labels, order = _group([fine_names[f] for f in fine[idx]])
    src = idx[order]
    counts = np.cumsum([0] + [len(p) for p in parts])

    def fill(out: np.ndarray) -> None:
        for k, i in enumerate(src):
            part = int(np.searchsorted(counts, i, side="right") - 1)
            flat = parts[part][i - counts[part]]
            out[k] = _fit(flat.reshape(3, 32, 32).transpose(1, 2, 0), size)
    return Prepared(classes, out_labels, fill)


READERS: dict[str, Callable[..., Prepared]] = {
    "csv": _read_csv, "metaoptnet": _read_metaoptnet, "learn2learn": _read_learn2learn, "tiered": _read_tiered,
    "cifar100": _read_cifar100,
}


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------
def _key(kind: str, bench: str, split: str, size: int, root: str, files: Sequence[str]) -> str:
    h = hashlib.sha1()
    h.update(f"{KEY_SCHEME}\nformat {kind} {bench} {split}\n{int(size)}\n".encode())
    for p in files:
        stat_key(h, p, os.path.relpath(p, root))
    return h.hexdigest()


def _parse(root: str, rest: str) -> tuple[str, str, str, list[str]]:
    """``"<kind>:<benchmark>:<split>"`` -> (kind, benchmark, split, the split's files); UserError if malformed."""
    spec = f"{root}#{rest}"
    parts = rest.split(":")
    if len(parts) != 3 or parts[0] not in READERS or parts[2] not in SPLITS:
        raise UserError(f"dataset spec {spec}: expected <folder>#<kind>:<benchmark>:<split> with kind one of "
                        f"{', '.join(KINDS)} and split one of {', '.join(SPLITS)}")
    kind, bench, split = parts
    if kind in ("metaoptnet", "cifar100"):
        allowed = list(METAOPTNET_FILES) if kind == "metaoptnet" else ["FC100", "CIFAR-FS"]
        if bench not in allowed:
            raise UserError(f"dataset spec {spec}: benchmark must be one of {', '.join(allowed)} for {kind}")
    return kind, bench, split, split_files(root, kind, bench, split)


def format_cache_key(root: str, rest: str, stored_size: int) -> tuple[str, list[str]]:
    """(the cache key of one split of the benchmark files, the files it was made from relative to ``root``), from
    file names, sizes and times only (no pickle is read; a csv's image list is)."""
    kind, bench, split, files = _parse(root, rest)
    # every image a csv lists is part of the key (a replaced image gives a new entry)
    key_files = files + _csv_images(files[0], root) if kind == "csv" else files
    return _key(kind, bench, split, stored_size, root, key_files), [os.path.relpath(p, root) for p in key_files]


def load_format_split(root: str, rest: str, stored_size: int, cache_dir: str | None = None,
                      num_workers: int = 0) -> ImageSet:
    """One split of the benchmark files in ``root``: ``rest`` is ``"<kind>:<benchmark>:<split>"`` (what
    :func:`format_split_spec` wrote after the ``#``). Returns an ImageSet of uint8 (N, S, S, 3) images, S =
    ``stored_size``, from the cache when ``cache_dir`` holds a valid entry for these files (labels, class names and
    every image verified against their checksums, :mod:`data_generator.image_cache`)."""
    spec = f"{root}#{rest}"
    kind, bench, split, files = _parse(root, rest)

    def prepare() -> Prepared:
        return READERS[kind](root, bench, split, files, stored_size, num_workers)

    if cache_dir is None:
        log.info("reading %s (%s %s) without a cache", spec, kind, bench)
        p = prepare()
        images = np.empty((len(p.labels), stored_size, stored_size, 3), dtype=np.uint8)
        p.fill(images)
        return ImageSet(images, p.labels, p.class_names, spec, p.files, image_digests(images), p.numbered_names)

    key, rel = format_cache_key(root, rest, stored_size)
    hit = lookup_cache(cache_dir, key, stored_size, rel)
    if hit is not None:
        r = hit.record
        log.info("loaded %d decoded images of %s from the cache", len(hit.images), spec)
        return ImageSet(hit.images, np.asarray(r["labels"], dtype=np.int64), list(r["class_names"]), spec,
                        r.get("image_files"), hit.digests, bool(r.get("numbered_names")))
    p = prepare()
    log.info("converting %d images of %s into the cache %s", len(p.labels), spec, cache_dir)
    info = {"source": os.path.abspath(root), "format": kind, "benchmark": bench, "split": split,
            "class_names": p.class_names, "labels": p.labels.tolist(), "files": rel, "image_files": p.files,
            "numbered_names": p.numbered_names}
    entry = write_cache(cache_dir, key, len(p.labels), stored_size, p.fill, info)
    return ImageSet(entry.images, p.labels, p.class_names, spec, p.files, entry.digests, p.numbered_names)


def _csv_images(path: str, root: str) -> list[str]:
    """The existing image paths a csv lists (for the cache key; missing ones are reported by the reader)."""
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
    return sorted(set(out))
