"""Small fakes of the benchmark files in exactly their on-disk formats (file names, keys, dtypes; Python-2-style
pickles where the originals are), written from one set of images so the readers can be compared.

``make_images(classes, per_class, size)`` gives ``{split: (images uint8 (N, size, size, 3), names (N,))}``, class-
major, with synset-like names; each writer stores the same images in its format. The pickle writers store the
images of a split in a shuffled order across classes (the relative order within a class kept), so the readers'
grouping by class is exercised.
"""
from __future__ import annotations

import csv
import io
import os
import pickle

import numpy as np
from PIL import Image

from data_generator.formats import CIFAR100_SPLITS, METAOPTNET_FILES
from tests.helpers import make_split, py2_pickle_dumps

SPLITS = ("train", "val", "test")


def make_images(classes=(8, 5, 5), per_class: int = 20, size: int = 84, seed: int = 0) -> dict:
    out = {}
    first = 0
    for i, split in enumerate(SPLITS):
        imgs, labels = make_split(classes[i], per_class, size, seed + 101 * i)
        names = np.array([f"n{first + int(c):08d}" for c in labels])
        out[split] = (imgs, names)
        first += classes[i]
    return out


def _shuffled(names: np.ndarray, seed: int) -> np.ndarray:
    """A permutation of 0..N-1 that mixes the classes but keeps each class's images in their order."""
    rng = np.random.default_rng(seed)
    keys = rng.permutation(len(names))
    order = np.argsort(keys, kind="stable")
    # order mixes everything; restore the within-class order by assigning each class's slots in sequence
    result = np.empty_like(order)
    for c in np.unique(names):
        slots = np.sort(np.flatnonzero(names[order] == c))
        result[slots] = np.flatnonzero(names == c)
    return result


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_folders(root: str, data: dict) -> str:
    for split, (imgs, names) in data.items():
        for j, (img, name) in enumerate(zip(imgs, names)):
            d = os.path.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            Image.fromarray(img).save(os.path.join(d, f"{name}{j:08d}.png"))
    return root


def write_csv(root: str, data: dict) -> str:
    """Ravi & Larochelle: ``images/<synset><number>.jpg`` (here lossless .png) and ``{split}.csv``."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for split, (imgs, names) in data.items():
        with open(os.path.join(root, f"{split}.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["filename", "label"])
            for j, (img, name) in enumerate(zip(imgs, names)):
                fname = f"{name}{j:08d}.png"
                Image.fromarray(img).save(os.path.join(root, "images", fname))
                w.writerow([fname, name])
    return root


def write_metaoptnet(root: str, data: dict, bench: str = "miniImageNet") -> str:
    """MetaOptNet / RFS pickles (Python 2, protocol 2): ``data`` uint8 (N, h, w, 3), ``labels`` (a list of ints,
    global class numbers as in the originals: val / test continue after train) and, for miniImageNet,
    ``catname2label``."""
    os.makedirs(root, exist_ok=True)
    offset = 0
    for i, (split, (imgs, names)) in enumerate(data.items()):
        classes = sorted(set(names.tolist()))
        num = {c: offset + k for k, c in enumerate(classes)}
        order = _shuffled(names, i)
        obj = {"data": imgs[order], "labels": [num[n] for n in names[order]]}
        if bench == "miniImageNet":
            obj["catname2label"] = num
        with open(os.path.join(root, METAOPTNET_FILES[bench][split]), "wb") as f:
            f.write(py2_pickle_dumps(obj))
        offset += len(classes)
    return root


def write_learn2learn(root: str, data: dict) -> str:
    """learn2learn: ``mini-imagenet-cache-{train,validation,test}.pkl``, ``image_data`` + ``class_dict``."""
    os.makedirs(root, exist_ok=True)
    for i, (split, (imgs, names)) in enumerate(data.items()):
        order = _shuffled(names, 10 + i)
        shuffled = names[order]
        class_dict = {c: [int(k) for k in np.flatnonzero(shuffled == c)] for c in sorted(set(names.tolist()))}
        name = {"train": "train", "val": "validation", "test": "test"}[split]
        with open(os.path.join(root, f"mini-imagenet-cache-{name}.pkl"), "wb") as f:
            f.write(py2_pickle_dumps({"image_data": imgs[order], "class_dict": class_dict}))
    return root


def write_tiered(root: str, data: dict, variant: str = "png") -> str:
    """tieredImageNet as MetaOptNet / RFS distribute it: ``{split}_labels.pkl`` (``label_specific``,
    ``label_specific_str``, ``label_general``, ``label_general_str``) beside ``{split}_images_png.pkl`` (a list of
    PNG-encoded images, each a uint8 1-D array as ``cv2.imencode`` returns) or ``{split}_images.npz``."""
    os.makedirs(root, exist_ok=True)
    for i, (split, (imgs, names)) in enumerate(data.items()):
        classes = sorted(set(names.tolist()))
        num = {c: k for k, c in enumerate(classes)}
        order = _shuffled(names, 20 + i)
        labels = {"label_specific": np.array([num[n] for n in names[order]], dtype=np.int64),
                  "label_specific_str": classes,
                  "label_general": np.zeros(len(order), dtype=np.int64), "label_general_str": ["all"]}
        with open(os.path.join(root, f"{split}_labels.pkl"), "wb") as f:
            f.write(py2_pickle_dumps(labels))
        if variant == "png":
            items = [np.frombuffer(_png(imgs[k]), dtype=np.uint8) for k in order]
            with open(os.path.join(root, f"{split}_images_png.pkl"), "wb") as f:
                f.write(py2_pickle_dumps(items))
        else:
            np.savez(os.path.join(root, f"{split}_images.npz"), images=imgs[order])
    return root


def write_cifar100(root: str, per_class=(16, 4), seed: int = 0) -> tuple[str, dict]:
    """A fake ``cifar-100-python/`` (``train``, ``test``, ``meta``; Python 2 protocol-2 pickles with ``data`` uint8
    (N, 3072) channel-major rows, ``fine_labels``, ``coarse_labels``, ``filenames``). The 100 fine names and their
    superclasses are CIFAR-100's. Returns (root, {fine name: uint8 (per_class sum, 32, 32, 3)}: train then test)."""
    f2c = CIFAR100_SPLITS["fine_to_coarse"]
    fine = sorted(f2c)
    coarse = sorted(set(f2c.values()))
    d = os.path.join(root, "cifar-100-python")
    os.makedirs(d, exist_ok=True)
    imgs, _ = make_split(100, sum(per_class), 32, seed)
    imgs = imgs.reshape(100, sum(per_class), 32, 32, 3)
    by_name = {name: imgs[k] for k, name in enumerate(fine)}
    for part, (lo, hi) in (("train", (0, per_class[0])), ("test", (per_class[0], sum(per_class)))):
        rows, fl, cl = [], [], []
        for j in range(lo, hi):  # interleaved by class, as the release
            for k, name in enumerate(fine):
                rows.append(imgs[k, j].transpose(2, 0, 1).reshape(-1))
                fl.append(k)
                cl.append(coarse.index(f2c[name]))
        obj = {"data": np.stack(rows), "fine_labels": fl, "coarse_labels": cl,
               "filenames": [f"img_{i}.png" for i in range(len(rows))], "batch_label": f"{part} batch"}
        with open(os.path.join(d, part), "wb") as f:
            f.write(py2_pickle_dumps(obj))
    with open(os.path.join(d, "meta"), "wb") as f:
        f.write(py2_pickle_dumps({"fine_label_names": fine, "coarse_label_names": coarse}))
    return root, by_name


class Evil:
    """Pickles to ``os.system("touch <marker>")``: what a malicious benchmark file would hold."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_evil_metaoptnet(root: str, marker: str, split: str = "train") -> str:
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, METAOPTNET_FILES["FC100"][split])
    with open(path, "wb") as f:
        pickle.dump({"data": Evil(marker), "labels": [0]}, f, protocol=2)
    return path


__all__ = ["make_images", "write_folders", "write_csv", "write_metaoptnet", "write_learn2learn", "write_tiered",
           "write_cifar100", "write_evil_metaoptnet", "Evil"]
