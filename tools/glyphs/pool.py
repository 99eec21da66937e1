"""Face selection and the class pool (steps 1 and 3 of the method in ``tools/glyphs/__init__.py``): the faces
kept for each script, and the classes kept after the lookalike filter.
"""

from __future__ import annotations

import multiprocessing
import os
import zlib
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from tools.glyphs.fonts import SCRIPT_ORDER, SCRIPTS, Face, GlyphClass, load_font
from tools.glyphs.render import CHECK_SIZE, check_render, render_glyph

FACE_MAD = 0.02           # faces closer than this (mean abs. difference, [0, 1]) are merged
CLASS_MAD = 0.045         # a class closer than this to an earlier class of its script is dropped
CROSS_SCRIPT_MAD = 0.055  # ... or closer than this to an earlier class of another script
ALIKE_MAD = 0.02          # a face whose glyphs are all within this of their mean is dropped (tofu)
SCREEN_CHARS = 48         # faces are compared on at most this many characters of a script


# --------------------------------------------------------------------------------------------------
# Face selection and the class pool
# --------------------------------------------------------------------------------------------------

def _round_robin(groups: list[list[Face]]) -> list[Face]:
    order: list[Face] = []
    for i in range(max((len(g) for g in groups), default=0)):
        order.extend(g[i] for g in groups if i < len(g))
    return order


def _family_groups(faces: Sequence[Face]) -> list[list[Face]]:
    """Faces grouped by family (families sorted by name; faces in the given order)."""
    groups: dict[str, list[Face]] = {}
    for face in faces:
        groups.setdefault(face.family, []).append(face)
    return [groups[name] for name in sorted(groups)]


def _mad(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean absolute difference over the last two axes, in [0, 1] for uint8 or [0, 1] floats."""
    return np.abs(a - b).mean(axis=(-2, -1))


@dataclass
class ScriptFaces:
    """The faces kept for a script (canonical order) and the mean clean render of each character."""

    script: str
    chars: str
    faces: list[Face]
    means: np.ndarray            # float32 (C, CHECK_SIZE, CHECK_SIZE), mean clean ink in [0, 1]
    candidates: int              # faces whose cmap covered the script



def _screen_indices(n: int) -> np.ndarray:
    """At most ``SCREEN_CHARS`` evenly spaced character indices used to compare faces."""
    return np.unique(np.linspace(0, n - 1, min(n, SCREEN_CHARS)).round().astype(int))


def screen_faces(script: str, chars: str, covering: Sequence[Face]) -> ScriptFaces:
    """Drop empty / alike / duplicate faces among ``covering`` and average the clean renders.

    Faces are visited in the canonical round-robin order.  A face is dropped when its family and style
    names repeat a kept face's (the same design in two formats), when a glyph has an empty box or (among
    the screening characters, at most ``SCREEN_CHARS`` evenly spaced ones) renders no ink, when its
    screening glyphs all look alike (tofu), or when they are within ``FACE_MAD`` of a kept face's.  The
    class means are the average clean renders over all kept faces.
    """
    ordered = _round_robin(_family_groups(sorted(covering, key=lambda f: (f.family, f.style, f.key))))
    screen = _screen_indices(len(chars))
    kept: list[Face] = []
    names: set[tuple[str, str]] = set()
    renders = np.empty((len(ordered), len(screen), CHECK_SIZE, CHECK_SIZE), np.float32)
    for face in ordered:
        if (face.family, face.style) in names:
            continue
        try:
            font = load_font(face)
            boxes = [font.getbbox(c) for c in chars]
        except Exception:
            continue
        if any(r <= l or b <= t for l, t, r, b in boxes):
            continue
        ink = renders[len(kept)]
        ok = True
        for i, k in enumerate(screen):
            glyph = render_glyph(font, chars[k])
            if glyph is None:
                ok = False
                break
            ink[i] = check_render(glyph)
        if not ok:
            continue
        if len(screen) > 1 and _mad(ink, ink.mean(0, keepdims=True)).mean() < ALIKE_MAD:
            continue
        if kept and (_mad(renders[:len(kept)], ink[None]).mean(axis=1) < FACE_MAD).any():
            continue
        kept.append(face)
        names.add((face.family, face.style))
    means = np.zeros((len(chars), CHECK_SIZE, CHECK_SIZE), np.float32)
    counts = np.zeros(len(chars), np.float32)
    for face in kept:
        font = load_font(face)
        for i, char in enumerate(chars):
            glyph = render_glyph(font, char)
            if glyph is not None:
                means[i] += check_render(glyph)
                counts[i] += 1
    means /= np.maximum(counts, 1)[:, None, None]
    return ScriptFaces(script, chars, kept, means, len(covering))


def sampling_order(faces: Sequence[Face], seed: int, script: str) -> list[Face]:
    """The order in which samples use the faces: families shuffled by the seed, then round-robin."""
    groups = _family_groups(faces)
    rng = np.random.default_rng([int(seed), zlib.crc32(b"faces"), zlib.crc32(script.encode("utf-8"))])
    return _round_robin([groups[i] for i in rng.permutation(len(groups))])



def default_workers() -> int:
    """Worker processes used by default: the CPUs this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def parallel_map(fn, items: list, workers: int, chunksize: int = 1) -> list:
    """``[fn(x) for x in items]``, in ``workers`` forked processes when more than one (same results)."""
    if workers <= 1 or len(items) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [fn(x) for x in items]
    with multiprocessing.get_context("fork").Pool(min(workers, len(items))) as pool:
        return pool.map(fn, items, chunksize=chunksize)


def _screen_task(task: tuple[str, str, list[Face]]) -> ScriptFaces:
    return screen_faces(*task)


def build_pool(faces: Sequence[Face], scripts: Sequence[str] = SCRIPT_ORDER, min_faces: int = 1,
               log=None, workers: int = 1) -> tuple[list[GlyphClass], dict[str, ScriptFaces], dict[str, str]]:
    """Select faces per script and drop lookalike classes, walking ``scripts`` in order.

    Returns the kept classes, the per-script faces and, for every dropped class, the class it looks like.
    Scripts with fewer than ``min_faces`` faces are skipped.  The scripts are screened in ``workers``
    processes; the result does not depend on ``workers``.
    """
    # Coverage is decided here; the workers get the covering faces without their (large) cmaps.
    tasks = [(s, SCRIPTS[s], [replace(f, codepoints=frozenset()) for f in faces if f.covers(SCRIPTS[s])])
             for s in scripts]
    by_cost = sorted(range(len(tasks)), key=lambda i: -len(tasks[i][1]) * len(tasks[i][2]))
    results = parallel_map(_screen_task, [tasks[i] for i in by_cost], workers)
    screened = {tasks[i][0]: r for i, r in zip(by_cost, results)}
    kept: list[GlyphClass] = []
    total = sum(len(SCRIPTS[s]) for s in scripts)
    kept_means = np.empty((total, CHECK_SIZE, CHECK_SIZE), np.float32)
    kept_script = np.empty(total, object)
    per_script: dict[str, ScriptFaces] = {}
    dropped: dict[str, str] = {}
    for script in scripts:
        chars = SCRIPTS[script]
        sf = screened[script]
        per_script[script] = sf
        if log:
            log(f"  {script:9s} {len(chars):4d} characters, {sf.candidates:3d} covering faces, {len(sf.faces):3d} kept")
        if len(sf.faces) < min_faces:
            continue
        for char, mean in zip(chars, sf.means):
            cls = GlyphClass(script, char)
            if kept:
                n = len(kept)
                dist = _mad(kept_means[:n], mean[None])
                bound = np.where(kept_script[:n] == script, CLASS_MAD, CROSS_SCRIPT_MAD)
                close = np.flatnonzero(dist < bound)
                if close.size:
                    dropped[cls.name] = kept[int(close[dist[close].argmin()])].name
                    continue
            kept_means[len(kept)] = mean
            kept_script[len(kept)] = script
            kept.append(cls)
    return kept, per_script, dropped

