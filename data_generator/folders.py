"""The class-folder reader: ``<root>/<split>/<class>/<image>``, the official layout (reference section 8).

Classes are sorted by name, so labels are stable across machines (the official code used unsorted
``os.listdir``); images are sorted by file name. Hidden entries (names starting with ``.``) and files whose extension
is not an image's (:data:`IMAGE_EXTENSIONS`, torchvision ``ImageFolder``'s list: a stray ``readme.txt``,
``Thumbs.db``, ``.DS_Store``) are skipped, and one line says how many were skipped and where; a file with an image
extension that does not decode is still an error. Every image is decoded by
:func:`data_generator.decoding.decode_image` (to 8-bit RGB, shorter side to the stored size, centre crop), in a pool
of ``--num_workers`` processes.

The cache key covers every image (its path relative to the split folder, byte size, ``mtime_ns``), and the record's
``files`` lists them, so the class names and labels (which follow from the paths) are known without decoding. Every
problem with the folders (missing, no class folders, an empty class folder, a subfolder inside a class folder, a
broken or looping symbolic link, a folder that cannot be listed) is a UserError with one line naming the path.
"""
from __future__ import annotations

import errno
import os
from typing import Iterable

import numpy as np

from data_generator.decoding import decode_all, read_failure
from data_generator.image_cache import Prepared
from data_generator.reader import FOLDERS, SPLITS, Reader, SplitSpec
from utils.errors import UserError

__all__ = ["ClassFolders", "FOLDER_LAYOUT", "IMAGE_EXTENSIONS", "scan_class_folders", "scan_images", "class_labels",
           "is_image_name"]

FOLDER_LAYOUT = "<root>/{train,val,test}/<class>/<image>"

#: File extensions read as images in class folders (torchvision ``datasets.folder.IMAGE_EXTENSIONS``); others are
#: skipped.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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
        raise read_failure(entry.path, exc) from None
    return entry.is_dir()


def _scan_folder(root: str, quiet: bool = False) -> list[str]:
    """A dataset split folder: :func:`scan_class_folders` with the dataset layout in its messages."""
    return scan_class_folders(root, quiet)


def scan_class_folders(root: str, quiet: bool = False, layout: str = FOLDER_LAYOUT,
                       what: str = "dataset split folder") -> list[str]:
    """-> files (N,) relative to ``root`` with "/" separators, ``<class>/<image>``, classes and images sorted by name.

    Hidden entries and files that are not images by extension are skipped, with one printed line (unless ``quiet``)
    that counts them and names the folder and the first one skipped. Broken or looping symbolic links and
    folders that cannot be listed are UserErrors naming the path. ``layout`` and ``what`` name the folder in the
    messages (a dataset split by default; the support folder of ``--phase predict`` passes its own).
    """
    if not os.path.isdir(root):
        state = "is not a folder" if os.path.exists(root) else "not found"
        if os.path.islink(root) and not os.path.exists(root):
            state = f"is a broken symbolic link (its target {os.readlink(root)} does not exist)"
        raise UserError(f"{what} {root} {state} (expected layout {layout})")
    all_entries = _list(root, what)
    skipped = [e.name for e in all_entries if e.name.startswith(".")]
    entries = [e for e in all_entries if not e.name.startswith(".")]
    classes = [e.name for e in entries if _is_dir(e)]
    skipped += [e.name for e in entries if e.name not in classes]  # stray files beside the class folders
    if not classes:
        raise UserError(f"{what} {root} has no class folders (expected layout {layout})")
    files: list[str] = []
    for name in classes:
        cdir = os.path.join(root, name)
        listed = _list(cdir, "class folder")
        if not _visible(e.name for e in listed):
            raise UserError(f"class folder {cdir} is empty (expected layout {layout})")
        kept = 0
        for entry in listed:
            fname = entry.name
            if fname.startswith("."):
                skipped.append(f"{name}/{fname}")
                continue
            if _is_dir(entry):
                raise UserError(
                    f"class folder {cdir} contains the subfolder {fname}; class folders must hold images only "
                    f"(expected layout {layout})"
                )
            if not _is_image_name(fname):
                skipped.append(f"{name}/{fname}")
                continue
            files.append(f"{name}/{fname}")
            kept += 1
        if not kept:
            raise UserError(f"class folder {cdir} has no images (extensions {', '.join(IMAGE_EXTENSIONS)}; "
                            f"expected layout {layout})")
    _say_skipped(skipped, root, quiet)
    return files


def _say_skipped(skipped: list[str], root: str, quiet: bool) -> None:
    if skipped and not quiet:
        print(f"skipped {len(skipped)} file(s) in {root} that are hidden or not images by extension "
              f"(first: {skipped[0]})", flush=True)


def scan_images(root: str, quiet: bool = False, what: str = "folder") -> list[str]:
    """Every image under ``root``, at any depth: paths relative to ``root`` with "/" separators, sorted (folders and
    files by name, depth first). The skip rules of :func:`scan_class_folders`: hidden entries (and everything under a
    hidden folder) and files that are not images by extension are skipped with one printed line; a broken or looping
    symbolic link, or a folder that cannot be listed, is a UserError naming it. A folder without images gives ``[]``
    (the caller says what that means). ``root`` must be a folder (``what`` names it in the message otherwise)."""
    if not os.path.isdir(root):
        state = "is not a folder" if os.path.exists(root) else "not found"
        raise UserError(f"{what} {root} {state}")
    files: list[str] = []
    skipped: list[str] = []

    def walk(folder: str, prefix: str) -> None:
        for entry in _list(folder, what if not prefix else "folder"):
            rel = prefix + entry.name
            if entry.name.startswith("."):
                skipped.append(rel)
            elif _is_dir(entry):
                walk(entry.path, rel + "/")
            elif _is_image_name(entry.name):
                files.append(rel)
            else:
                skipped.append(rel)

    walk(root, "")
    _say_skipped(skipped, root, quiet)
    return files


def is_image_name(name: str) -> bool:
    """Whether ``name`` has an image extension (:data:`IMAGE_EXTENSIONS`, any case)."""
    return _is_image_name(name)


def class_labels(files: list[str]) -> tuple[list[str], np.ndarray]:
    """``<class>/<image>`` paths -> (class names (C,) sorted, labels int64 (N,)), as the class-folder reader labels
    a split."""
    return _classes(files)


def _classes(files: list[str]) -> tuple[list[str], np.ndarray]:
    """``<class>/<image>`` paths (classes sorted, as :func:`_scan_folder` lists them) -> (class names (C,), labels
    int64 (N,))."""
    names = [f.split("/", 1)[0] for f in files]
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.fromiter((index[n] for n in names), dtype=np.int64, count=len(names))


class ClassFolders(Reader):
    """``<root>/<split>/<class>/<image>``: the spec's path is the split folder itself."""

    kind = FOLDERS
    title = "class folders"
    expected = "class folders train/ val/ test/"
    fallback = True  # the official layout: what a folder holds when no benchmark file is found in it
    lists_classes = True

    def detect(self, root: str) -> list[tuple[str, ...]]:
        return [()] if any(os.path.isdir(os.path.join(root, s)) for s in SPLITS) else []

    def spec(self, root: str, split: str, benchmark: str | None = None) -> SplitSpec:
        return SplitSpec(os.path.join(root, split), FOLDERS, split)

    def files(self, spec: SplitSpec, quiet: bool = False) -> list[str]:
        return _scan_folder(spec.path, quiet)

    def classes(self, spec: SplitSpec, files: list[str]) -> tuple[list[str], np.ndarray]:
        return _classes(files)

    def prepare(self, spec: SplitSpec, files: list[str], stored_size: int, num_workers: int) -> Prepared:
        classes, labels = _classes(files)
        paths = [os.path.join(spec.path, rel) for rel in files]
        return Prepared(classes, labels, lambda out: decode_all(paths, stored_size, out, num_workers), files)

    def count(self, files: list[str]) -> int:
        return len(files)

    def identity(self, spec: SplitSpec) -> None:
        return None  # the key of version 1: the stored size and the images (existing entries stay valid)

    def record(self, spec: SplitSpec, prepared: Prepared) -> dict:
        return {}  # the per-image names are the record's ``files``
