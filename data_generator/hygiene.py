"""Split hygiene: the same class, or the same images, in two splits (leakage between training and evaluation), and
the same images under two class names within one split (a duplicated class).

Everything here works on :class:`SplitSummary` (class names, labels, and the per-image content digests that the
decoded-image cache computes anyway, :func:`data_generator.image_cache.image_digests`): no image is decoded or
hashed a second time. The rules (docs/DATA.md, "Split hygiene"):

* **class names** shared by two splits stop the run (names a reader made up from label numbers, e.g. the FC100 /
  CIFAR-FS pickles, which hold none, are not compared: two files may both count from 0);
* **images**: one identical image (same stored pixels, by digest) in two splits stops the run, naming the number of
  shared images, the classes involved and the first pair of files. Even one is reported: a test image seen in
  training is leakage, and a real benchmark has none (checked for the embedded pack);
* within a split, two classes that hold identical images give one warning line (all of both: "the same class
  twice", e.g. a class folder that is a symbolic link to another; some: label noise). The run goes on: the
  numbers are still the split's, only the classes are not what their names say.

``--allow_split_overlap`` turns the two errors into one warning line each (a deliberate experiment, e.g. validating
on training classes). Which splits a phase compares is decided by ``trainer.base.DataBundle``.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from utils.errors import UserError

__all__ = ["SplitSummary", "duplicate_classes", "split_overlap", "OVERLAP_FLAG"]

OVERLAP_FLAG = "--allow_split_overlap"


@dataclass
class SplitSummary:
    """What hygiene needs of one split.

    Attributes:
        split: ``"train"``, ``"val"`` or ``"test"`` (the role's split), used in messages.
        source: the spec it was read from.
        class_names: (C,).
        labels: int64 (N,), or None when only the names are known.
        digests: uint64 (N,) per-image content digests, or None when only the names are known.
        files: (N,) per-image names for messages (relative paths), or None (then ``image k``).
        numbered_names: True when the reader made the names up from label numbers (not compared across splits).
    """

    split: str
    source: str
    class_names: list[str]
    labels: np.ndarray | None = None
    digests: np.ndarray | None = None
    files: list[str] | None = None
    numbered_names: bool = False

    def image_name(self, k: int) -> str:
        """The file of image ``k``, or ``image k`` (its index in the split) where there are no files."""
        if self.files is not None and len(self.files) == len(self.labels):
            return self.files[k]
        return f"image {k}"

    def where(self) -> str:
        return f"the {self.split} split ({self.source})"


def _quote(names: list[str], shown: int = 3) -> str:
    text = ", ".join(f"'{n}'" for n in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _first(s: SplitSummary, digest: np.uint64, label: int | None = None) -> int:
    hit = s.digests == digest
    if label is not None:
        hit &= s.labels == label
    return int(np.flatnonzero(hit)[0])


def duplicate_classes(s: SplitSummary) -> str | None:
    """One warning line when two classes of ``s`` hold identical images, else None.

    ``classes 'a' and 'b' hold the same k images`` when each holds exactly the images of the other (the same class
    twice), else ``classes 'a' and 'b' share k identical images (e.g. a/1.png = b/7.png)``; the pair sharing the most
    images is named, and how many further pairs share any."""
    if s.digests is None or s.labels is None or len(s.digests) < 2:
        return None
    order = np.lexsort((s.labels, s.digests))
    d, lab = s.digests[order], s.labels[order]
    keep = np.ones(len(d), dtype=bool)
    keep[1:] = (d[1:] != d[:-1]) | (lab[1:] != lab[:-1])  # one row per (digest, class)
    d, lab = d[keep], lab[keep]
    starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
    ends = np.r_[starts[1:], len(d)]
    multi = np.flatnonzero(ends - starts > 1)
    if not multi.size:
        return None
    shared: dict[tuple[int, int], int] = {}
    example: dict[tuple[int, int], np.uint64] = {}
    for j in multi:
        classes = sorted(int(c) for c in lab[starts[j]:ends[j]])
        for pair in combinations(classes, 2):
            shared[pair] = shared.get(pair, 0) + 1
            example.setdefault(pair, d[starts[j]])
    (a, b), k = max(shared.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))
    distinct = np.bincount(lab, minlength=len(s.class_names))  # distinct images per class
    na, nb = s.class_names[a], s.class_names[b]
    if k == distinct[a] == distinct[b]:
        what = (f"classes '{na}' and '{nb}' hold the same {k} image(s) (the same class twice, e.g. a class folder "
                f"linked or copied to another name)")
    else:
        dig = example[(a, b)]
        what = (f"classes '{na}' and '{nb}' share {k} identical image(s) (e.g. {s.image_name(_first(s, dig, a))} = "
                f"{s.image_name(_first(s, dig, b))})")
    more = f"; {len(shared) - 1} more pair(s) of classes share images" if len(shared) > 1 else ""
    return f"warning: {s.where()}: {what}{more}"


def split_overlap(a: SplitSummary, b: SplitSummary, allow: bool = False) -> str | None:
    """Raise UserError when ``a`` and ``b`` (two different splits) share class names or identical images; with
    ``allow``, return that as one warning line instead. None when they are disjoint."""
    problem = None
    if not (a.numbered_names or b.numbered_names):
        names = sorted(set(a.class_names) & set(b.class_names))
        if names:
            problem = (f"{a.where()} and {b.where()} share {len(names)} class name(s): {_quote(names)}; "
                       "a class in two splits leaks between training and evaluation")
    if problem is None and a.digests is not None and b.digests is not None:
        common, ia, ib = np.intersect1d(a.digests, b.digests, return_indices=True)
        if common.size:
            ca = np.unique(a.labels[np.isin(a.digests, common)])
            cb = np.unique(b.labels[np.isin(b.digests, common)])
            k = int(np.argmin(ia))  # the first shared image in a's order
            i, j = int(ia[k]), int(ib[k])
            problem = (f"{a.where()} and {b.where()} share {common.size} identical image(s) in {ca.size} class(es) of "
                       f"{a.split} and {cb.size} of {b.split}, e.g. {a.image_name(i)} (class "
                       f"'{a.class_names[int(a.labels[i])]}') = {b.image_name(j)} (class "
                       f"'{b.class_names[int(b.labels[j])]}'); images in two splits leak between training and "
                       "evaluation")
    if problem is None:
        return None
    if allow:
        return f"warning: {problem} (allowed by {OVERLAP_FLAG})"
    raise UserError(f"{problem}: fix the splits, or pass {OVERLAP_FLAG} to run anyway")
