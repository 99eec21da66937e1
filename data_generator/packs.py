"""The ``.npz`` pack reader: this project's own format (the glyph packs, data/glyphs100.npz; tools/glyphs).

A pack ``<file>.npz`` holds, per split ``s``, ``s_images`` uint8 (N, h, w) or (N, h, w, 3), ``s_labels`` int (N,)
and ``s_classes`` str (C,); its spec is ``<file>.npz#<split>``. Grey images are repeated to 3 channels; images
whose size is not the stored size go through the folder conversion (:func:`data_generator.decoding.fit_square`).
Packs are small and read whole, so they have no cache entry (``cached = False``). Every problem with the file is a
UserError naming it.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np
from PIL import Image

from data_generator.decoding import fit_square
from data_generator.image_cache import Prepared
from data_generator.reader import Reader, SplitSpec
from utils.errors import UserError

__all__ = ["NpzPack"]


class NpzPack(Reader):
    """``<file>.npz#<split>``: the spec's path is the pack."""

    kind = "npz"
    title = "dataset pack"
    cached = False

    def detect(self, root: str) -> list[tuple[str, ...]]:
        return [()] if str(root).lower().endswith(".npz") else []

    def exists(self, spec: SplitSpec) -> bool:
        return os.path.isfile(spec.path)

    def files(self, spec: SplitSpec, quiet: bool = False) -> list[str]:
        return []  # read whole every time: nothing to key

    def prepare(self, spec: SplitSpec, files: list[str], stored_size: int, num_workers: int) -> Prepared:
        path, split = spec.path, spec.split
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

        def fill(out: np.ndarray) -> None:
            if (h, w) == (stored_size, stored_size):
                out[...] = images[..., None] if images.ndim == 3 else images  # grey: repeated to 3 channels
                return
            mode = "L" if images.ndim == 3 else "RGB"
            for k in range(n):
                fitted = fit_square(Image.fromarray(images[k], mode=mode), stored_size)
                out[k] = fitted[..., None] if fitted.ndim == 2 else fitted
        return Prepared(class_names, labels, fill)
