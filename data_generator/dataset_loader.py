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
  Every image goes through PIL: :func:`to_rgb` -> resize the shorter side to ``stored_size`` (bilinear, the
  long side as ``int(stored_size * long / short)``, as torchvision ``Resize``) -> center crop
  ``stored_size x stored_size`` (offsets ``int(round((n - stored_size) / 2))``, as torchvision ``CenterCrop``).
  With the "pytorch" preprocessing ``stored_size`` is 92 and this is the official ``Resize(92)`` step; the crop to
  92 x 92 is exact for the later ``CenterCrop(80)`` and loses only pixels that the official ``RandomResizedCrop``
  could reach on non-square images.
* a pack ``<file>.npz#<split>`` holding ``<split>_images`` uint8 (N, h, w) or (N, h, w, 3), ``<split>_labels`` int
  (N,) and ``<split>_classes`` str (C,). Grey images are repeated to 3 channels; images whose size is not
  ``stored_size x stored_size`` go through the same resize + center crop as folder images.

Every image goes through :func:`to_rgb` first, which maps every Pillow mode to 8-bit RGB (16-bit and 32-bit integer
images scaled by 1/257, floats from [0, 1], transparency composited over white, CMYK / YCbCr / HSV / LAB converted;
docs/DATA.md has the table).

Splits can be cached (:mod:`data_generator.image_cache`): with ``cache_dir`` the decoded array is stored as
``<cache_dir>/<key>.npy`` plus its record ``<cache_dir>/<key>.json`` (class names, labels, file list, one content
digest per image, the record's own digest) and later loaded with ``np.load(mmap_mode="r")`` after every image's
digest is checked (a mismatch rebuilds the entry, with one line). ``key`` is the sha1 of the stored size and of
every image's relative path, byte size and ``mtime_ns``, so any change to the files gives a new key.

Every split carries its per-image digests (:attr:`ImageSet.digests`: from the cache, or computed when it is loaded
without one), which :mod:`data_generator.hygiene` uses to find the same images in two splits.

Every problem caused by the data (missing folder/pack/split, no class folders, an empty class folder, a
subfolder inside a class folder, a broken or looping symbolic link, a file or folder that cannot be read, a file PIL
cannot decode, an image whose values have no 8-bit meaning) raises :class:`utils.errors.UserError` with a
one-line message that names the path.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import multiprocessing
import os
import zipfile
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from data_generator.hygiene import SplitSummary
from data_generator.image_cache import (CACHE_VERSION, KEY_SCHEME, cache_paths, image_digests, lookup_cache,
                                        read_record, write_cache, digests_from_hex)
from utils.errors import UserError

__all__ = [
    "ImageSet",
    "load_split",
    "check_episode_fit",
    "split_spec",
    "decode_image",
    "to_rgb",
    "ALPHA_BACKGROUND",
    "peek_split",
    "CACHE_VERSION",
    "IMAGE_EXTENSIONS",
    "lookup_cache",
    "write_cache",
    "fit_square",
]

log = logging.getLogger(__name__)

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


#: The background that transparent pixels are composited over (white, 255): the page a transparent PNG is shown on,
#: and the paper of scanned characters and of the glyph packs. Used for every mode with alpha (LA, La, PA, RGBA,
#: RGBa) and for P / L / RGB / I;16 images with a ``transparency`` entry, so one image in two modes decodes alike.
ALPHA_BACKGROUND = 255

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 (h, w, 3) colour, uint8-valued (h, w) alpha -> uint8 (h, w, 3): round((c*a + B*(255-a)) / 255),
    B = :data:`ALPHA_BACKGROUND` (exact integer rounding: 255 is odd, so no value is half way)."""
    c = rgb.astype(np.uint32)
    a = alpha.astype(np.uint32)[..., None]
    return ((c * a + ALPHA_BACKGROUND * (255 - a) + 127) // 255).astype(np.uint8)


# CIE L*a*b* (D50, the ICC profile connection space) -> sRGB: XYZ(D50) -> Bradford to D65 -> linear sRGB (IEC 61966-2-1)
_D50 = np.array([0.96422, 1.0, 0.82521])
_BRADFORD_D50_TO_D65 = np.array([[0.9555766, -0.0230393, 0.0631636],
                                 [-0.0282895, 1.0099416, 0.0210077],
                                 [0.0122982, -0.0204830, 1.3299098]])
_XYZ_D65_TO_SRGB = np.array([[3.2404542, -1.5371385, -0.4985314],
                             [-0.9692660, 1.8760108, 0.0415560],
                             [0.0556434, -0.2040259, 1.0572252]])


def _lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """uint8 (h, w, 3) in Pillow's LAB encoding (L* = byte * 100 / 255, a* = byte - 128, b* = byte - 128) -> uint8
    (h, w, 3) sRGB, rounded; colours outside the sRGB gamut are clipped to it (they have no sRGB value)."""
    lab = lab.astype(np.float64)
    L, a, b = lab[..., 0] * (100.0 / 255.0), lab[..., 1] - 128.0, lab[..., 2] - 128.0
    fy = (L + 16.0) / 116.0
    f = np.stack([fy + a / 500.0, fy, fy - b / 200.0], axis=-1)
    d = 6.0 / 29.0
    xyz = np.where(f > d, f ** 3, 3 * d * d * (f - 4.0 / 29.0)) * _D50
    rgb = xyz @ (_XYZ_D65_TO_SRGB @ _BRADFORD_D50_TO_D65).T
    rgb = np.clip(rgb, 0.0, 1.0)
    rgb = np.where(rgb <= 0.0031308, 12.92 * rgb, 1.055 * rgb ** (1 / 2.4) - 0.055)
    return np.floor(rgb * 255.0 + 0.5).astype(np.uint8)


def _ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """uint8 (h, w, 3) YCbCr (JFIF, full range) -> uint8 RGB, rounded (Pillow's own conversion truncates, up to 1
    lower); values outside 0..255 (colours the YCbCr cube holds and RGB does not) are clipped."""
    y, cb, cr = (ycc[..., k].astype(np.float64) for k in range(3))
    rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                    y + 1.772 * (cb - 128)], axis=-1)
    return np.clip(np.floor(rgb + 0.5), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image, where: str) -> Image.Image:
    """Any Pillow image -> an 8-bit ``RGB`` image, scaled and never clipped (docs/DATA.md, "Decoding").

    * ``1``, ``L``, ``P``, ``RGB``, ``RGBX``, ``CMYK``, ``HSV``: Pillow's conversion (``1``: 0 / 255; CMYK:
      ``R = round((255 - C)(255 - K) / 255)``, no ICC profile; HSV: Pillow's hsv2rgb, rounded);
    * ``YCbCr``: the JFIF full-range equations, rounded (:func:`_ycbcr_to_rgb`);
    * ``I;16`` (any byte order) and ``I``: 16-bit values 0..65535 (Pillow reads 16-bit PNG / PGM / TIFF grey so)
      -> ``round(x / 257)``, so 65535 is 255 and 257 is 1 (Pillow's own conversion clips everything above 255 to
      white). An ``I`` image with values outside 0..65535 has no such meaning: UserError naming ``where``;
    * ``F``: the float-image convention of numpy / scikit-image / torchvision, [0, 1] -> ``round(255 x)``; values
      outside [0, 1] or not finite: UserError (Pillow's own conversion reads floats as 0..255 and would make every
      [0, 1] image black);
    * ``LAB``: CIE L*a*b* (D50, Pillow's 8-bit encoding) -> sRGB by the CIE / IEC equations (:func:`_lab_to_srgb`);
      Pillow's plain conversion copies the bytes as if they were RGB;
    * alpha (``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, or a ``transparency`` entry): composited over
      :data:`ALPHA_BACKGROUND` (Pillow's conversion drops alpha and shows whatever colour transparent pixels hold).
    """
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        a = np.asarray(im)
        a = a.astype(np.int64) if a.dtype.kind in "iu" else a
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise UserError(f"{where}: a 32-bit integer image with values {lo}..{hi}, outside the 16-bit range "
                            "0..65535 that is scaled to 8 bits; save it as an 8- or 16-bit image")
        v = ((a + 128) // 257).astype(np.uint8)
        rgb = np.repeat(v[..., None], 3, axis=2)
        t = im.info.get("transparency")
        if isinstance(t, int):
            rgb = _composite(rgb, np.where(a == t, 0, 255))
        return Image.fromarray(rgb, mode="RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        finite = bool(np.isfinite(a).all())
        lo, hi = (float(np.nanmin(a)), float(np.nanmax(a))) if a.size and not np.isnan(a).all() else (0.0, 0.0)
        if not finite or lo < 0.0 or hi > 1.0:
            what = "non-finite values" if not finite else f"values {lo:g}..{hi:g}"
            raise UserError(f"{where}: a floating-point image with {what}, outside [0, 1], the range that is "
                            "scaled to 8 bits; save it scaled to [0, 1], or as an 8-bit image")
        v = np.floor(a * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(np.repeat(v[..., None], 3, axis=2), mode="RGB")
    if mode == "LAB":
        # the bands, not np.asarray(im): Pillow stores a* and b* as signed bytes inside; split() gives the 128-offset
        return Image.fromarray(_lab_to_srgb(np.stack([np.asarray(b) for b in im.split()], axis=-1)), mode="RGB")
    if mode == "YCbCr":
        return Image.fromarray(_ycbcr_to_rgb(np.asarray(im)), mode="RGB")
    if mode in ("La", "RGBa"):  # premultiplied: c' = c a / 255, so over the background it is c' + B (255 - a) / 255
        arr = np.asarray(im).astype(np.uint32)
        c, a = (arr[..., :1], arr[..., 1:]) if mode == "La" else (arr[..., :3], arr[..., 3:])
        out = np.minimum(c + (ALPHA_BACKGROUND * (255 - a) + 127) // 255, 255).astype(np.uint8)
        return Image.fromarray(np.broadcast_to(out, arr.shape[:2] + (3,)).copy(), mode="RGB")
    if "A" in im.getbands() or im.has_transparency_data:
        rgba = np.asarray(im.convert("RGBA"))
        return Image.fromarray(_composite(rgba[..., :3], rgba[..., 3]), mode="RGB")
    return im.convert("RGB")


def _read_failure(path: str, exc: BaseException) -> UserError:
    """The one line for an image file that cannot be opened or decoded."""
    if isinstance(exc, PermissionError):
        return UserError(f"cannot read the image {path}: permission denied (make it readable for this user, "
                         "e.g. chmod a+r)")
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return UserError(f"{path} is a symbolic link loop; remove it or point it at an image")
    if isinstance(exc, FileNotFoundError) and os.path.islink(path):
        return UserError(f"{path} is a broken symbolic link (its target {os.readlink(path)} does not exist); "
                         "remove it or restore the target")
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserError(f"{path}: not a readable image ({detail})")


def decode_image(path: str, size: int) -> np.ndarray:
    """Decode one image file to uint8 (size, size, 3): PIL -> :func:`to_rgb` -> shorter side to size -> center crop.

    Raises UserError ``<path>: not a readable image (...)`` for a corrupt image or a non-image file, and one line
    for an unreadable file or an image whose values have no 8-bit meaning (:func:`to_rgb`).
    """
    try:
        with Image.open(path) as im:
            rgb = to_rgb(im, path)
        arr = fit_square(rgb, size)
    except UserError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise _read_failure(path, exc) from None
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


def _list(folder: str, what: str) -> list[os.DirEntry]:
    """The entries of ``folder``, sorted by name; UserError naming it when it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except PermissionError:
        raise UserError(f"cannot list {what} {folder}: permission denied (make it readable for this user, "
                        "e.g. chmod a+rx)") from None
    except OSError as exc:
        raise UserError(f"cannot list {what} {folder}: {exc.strerror or exc}") from None


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is (or links to) a folder; a symbolic link that is broken or loops is a UserError naming it
    (a plain ``isdir`` would call it "not a folder" and a later ``stat`` would be a traceback)."""
    if not entry.is_symlink():
        return entry.is_dir(follow_symlinks=False)
    try:
        os.stat(entry.path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{entry.path} is a symbolic link loop; remove it or point it at a real "
                            f"{'folder' if not _is_image_name(entry.name) else 'image'}") from None
        if isinstance(exc, FileNotFoundError):
            raise UserError(f"{entry.path} is a broken symbolic link (its target {os.readlink(entry.path)} does not "
                            "exist); remove it or restore the target") from None
        raise _read_failure(entry.path, exc) from None
    return entry.is_dir()


def _scan_folder(root: str, quiet: bool = False) -> tuple[list[str], list[str], np.ndarray]:
    """-> (class_names (C,), files (N,) relative to root with "/" separators, labels int64 (N,)).

    Hidden entries and files that are not images by extension are skipped, with one printed line (unless ``quiet``)
    that counts them and names the split folder and the first one skipped. Broken or looping symbolic links and
    folders that cannot be listed are UserErrors naming the path.
    """
    if not os.path.isdir(root):
        what = "is not a folder" if os.path.exists(root) else "not found"
        if os.path.islink(root) and not os.path.exists(root):
            what = f"is a broken symbolic link (its target {os.readlink(root)} does not exist)"
        raise UserError(f"dataset split folder {root} {what} (expected layout {FOLDER_LAYOUT})")
    all_entries = _list(root, "dataset split folder")
    skipped = [e.name for e in all_entries if e.name.startswith(".")]
    entries = [e for e in all_entries if not e.name.startswith(".")]
    classes = [e.name for e in entries if _is_dir(e)]
    skipped += [e.name for e in entries if e.name not in classes]  # stray files beside the class folders
    if not classes:
        raise UserError(f"dataset split folder {root} has no class folders (expected layout {FOLDER_LAYOUT})")
    files: list[str] = []
    labels: list[int] = []
    for c, name in enumerate(classes):
        cdir = os.path.join(root, name)
        listed = _list(cdir, "class folder")
        if not _visible(e.name for e in listed):
            raise UserError(f"class folder {cdir} is empty (expected layout {FOLDER_LAYOUT})")
        kept = 0
        for entry in listed:
            fname = entry.name
            if fname.startswith("."):
                skipped.append(f"{name}/{fname}")
                continue
            if _is_dir(entry):
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
    if skipped and not quiet:
        print(f"skipped {len(skipped)} file(s) in {root} that are hidden or not images by extension "
              f"(first: {skipped[0]})", flush=True)
    return classes, files, np.asarray(labels, dtype=np.int64)


def stat_key(h: "hashlib._Hash", path: str, rel: str) -> None:
    """Add ``rel``, the byte size and the ``mtime_ns`` of ``path`` to the cache key ``h``; UserError naming the
    path when it cannot be read (a link that broke since the scan, no permission)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _read_failure(path, exc) from None
    h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))


def _cache_key(root: str, files: Sequence[str], stored_size: int) -> str:
    """sha1 over (:data:`KEY_SCHEME`, stored_size, each relative path with its byte size and mtime_ns)."""
    h = hashlib.sha1()
    h.update(f"{KEY_SCHEME}\n{int(stored_size)}\n".encode())
    for rel in files:
        stat_key(h, os.path.join(root, rel), rel)
    return h.hexdigest()


def _load_folder(root: str, stored_size: int, cache_dir: str | None, num_workers: int) -> ImageSet:
    classes, files, labels = _scan_folder(root)
    n = len(files)
    paths = [os.path.join(root, rel) for rel in files]
    if cache_dir is None:
        log.info("decoding %d images from %s", n, root)
        images = np.empty((n, stored_size, stored_size, 3), dtype=np.uint8)
        _decode_all(paths, stored_size, images, num_workers)
        return ImageSet(images, labels, classes, root, files, image_digests(images))

    key = _cache_key(root, files, stored_size)
    hit = lookup_cache(cache_dir, key, stored_size, files, n)
    if hit is not None and hit.record.get("class_names") == classes and hit.record.get("labels") == labels.tolist():
        log.info("loaded %d decoded images of %s from the cache %s", n, root, cache_paths(cache_dir, key)[0])
        return ImageSet(hit.images, labels, classes, root, files, hit.digests)

    log.info("decoding %d images from %s into the cache %s", n, root, cache_dir)
    info = {"source": os.path.abspath(root), "class_names": classes, "labels": labels.tolist(), "files": files}
    entry = write_cache(cache_dir, key, n, stored_size,
                        lambda out: _decode_all(paths, stored_size, out, num_workers), info)
    return ImageSet(entry.images, labels, classes, root, files, entry.digests)


def _summary_from_record(record: dict, split: str, spec: str) -> SplitSummary:
    files = record.get("image_files") if "format" in record else record.get("files")
    return SplitSummary(split, spec, list(record["class_names"]), np.asarray(record["labels"], dtype=np.int64),
                        digests_from_hex(record["image_digests"]), files, bool(record.get("numbered_names")))


def peek_split(spec: str, stored_size: int, cache_dir: str | None, split: str) -> tuple[SplitSummary | None, str]:
    """What :mod:`data_generator.hygiene` needs of a split, without decoding it: ``(summary, why)``.

    A pack (``.npz``; packs are small) is loaded. For class folders and benchmark files the split's cache entry is
    read, its record only (verified by its own digest; the images are not opened): the class names, labels and
    per-image digests. Without an entry: for class folders the class names alone (``summary.digests`` None), for
    benchmark files nothing (their names are inside the files). ``why`` says what could not be compared ("" when
    everything could); ``(None, "")`` when the split does not exist (nothing to compare with)."""
    npz = _parse_npz_spec(spec)
    if npz is not None:
        if not os.path.isfile(npz[0]):
            return None, ""
        return load_split(spec, stored_size).summary(split), ""
    root, sep, rest = spec.rpartition("#")
    no_entry = ("--cache_dir none" if cache_dir is None else
                f"no cache entry of it in {cache_dir} at this --image_size / --preprocess")
    if sep and os.path.isdir(root):
        from data_generator.formats import format_cache_key
        if cache_dir is None:
            return None, no_entry
        key, rel = format_cache_key(root, rest, stored_size)
        record, _ = read_record(cache_paths(cache_dir, key)[1])
        if record is None or record.get("files") != rel:
            return None, no_entry
        return _summary_from_record(record, split, spec), ""
    if not os.path.isdir(spec):
        return None, ""
    classes, files, labels = _scan_folder(spec, quiet=True)
    if cache_dir is not None:
        record, _ = read_record(cache_paths(cache_dir, _cache_key(spec, files, stored_size))[1])
        if record is not None and record.get("files") == files:
            return _summary_from_record(record, split, spec), ""
    return SplitSummary(split, spec, classes, labels, None, files), no_entry


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
    images = np.ascontiguousarray(images)
    return ImageSet(images, labels, class_names, spec, None, image_digests(images))


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
