"""Small learnable datasets that the tests make themselves (no download, no fonts).

Each class is a random smooth colour pattern; its images are the pattern under random shifts and noise, so
a few-shot learner can beat chance on classes it has never seen while a broken pipeline cannot.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def make_split(n_classes: int, per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``images`` uint8 (N, size, size, 3) and ``labels`` int64 (N,), class-major."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n_classes, 4, 4, 3)).astype(np.uint8)
    imgs = []
    for c in range(n_classes):
        base = np.asarray(Image.fromarray(coarse[c]).resize((size + 4, size + 4), Image.BILINEAR), dtype=np.float32)
        for _ in range(per_class):
            dy, dx = rng.integers(0, 5, 2)
            crop = base[dy:dy + size, dx:dx + size] + rng.normal(0, 25, (size, size, 3))
            imgs.append(np.clip(crop, 0, 255).astype(np.uint8))
    labels = np.repeat(np.arange(n_classes), per_class).astype(np.int64)
    return np.stack(imgs), labels


def make_npz(path: str, size: int = 16, per_class: int = 20, classes=(12, 6, 6), seed: int = 0) -> str:
    """An ``.npz`` pack in the embedded-data format with train/val/test splits."""
    arrays = {}
    for i, split in enumerate(("train", "val", "test")):
        imgs, labels = make_split(classes[i], per_class, size, seed + 101 * i)
        arrays[f"{split}_images"] = imgs
        arrays[f"{split}_labels"] = labels
        arrays[f"{split}_classes"] = np.array([f"{split}_{c:02d}" for c in range(classes[i])])
    np.savez_compressed(path, **arrays)
    return path


def make_folders(root: str, size: int = 16, per_class: int = 20, classes=(12, 6, 6), seed: int = 0,
                 ext: str = "png") -> str:
    """The official layout ``root/{train,val,test}/<class>/<image>``."""
    for i, split in enumerate(("train", "val", "test")):
        imgs, labels = make_split(classes[i], per_class, size, seed + 101 * i)
        for j, (img, lab) in enumerate(zip(imgs, labels)):
            d = os.path.join(root, split, f"n{lab:04d}")
            os.makedirs(d, exist_ok=True)
            Image.fromarray(img).save(os.path.join(d, f"{j:05d}.{ext}"))
    return root
