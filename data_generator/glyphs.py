"""Few-shot glyph datasets rendered offline from Debian font packages.

The public few-shot benchmarks (miniImageNet, Omniglot, ...) cannot be downloaded on the machines this
project runs on, so this module builds an Omniglot-like substitute from the fonts that Debian packages ship
(see docs/DATA.md for the exact ``apt-get`` line):

* a **class** is one character of one script (``"Latin_a"``, ``"Hangul_U+AC00"``);
* a **sample** is that character drawn by one font face and then given one fixed random "handwriting"
  distortion.

Method (every step is deterministic given the seed and the installed font set):

1. **Faces.**  The font files under the font directories are enumerated in sorted order (``.ttf``,
   ``.otf``, ``.ttc``; symlinks resolved, duplicates removed).  For each script, a face is a candidate only
   if its fontTools ``cmap`` covers every character of the script and it has outlines.  Candidates are put
   in a canonical round-robin order over font families (sorted by family name, then by face).  A face is
   dropped when its family and style names repeat those of a face kept before it (one design shipped as
   both ``.otf`` and ``.ttf``), when one of its glyphs has an empty box or renders no ink, when its glyphs
   all look alike (tofu boxes), or when it renders nearly the same as a face kept before it (mean absolute
   difference of the clean 32x32 renders below ``FACE_MAD`` = 0.02, on at most ``SCREEN_CHARS`` evenly
   spaced characters of the script).
2. **Rendering.**  A glyph is drawn at ``RENDER_PT`` pixels per em with Pillow's basic layout (isolated
   letters need no shaping), cropped to its ink box and padded to a square.
3. **Lookalike classes.**  Only one Latin case is used (lower case), Cherokee is left out, and the
   Katakana that copy a Kanji or Hiragana shape (ka, ro, e, ta, ni, ha, he) are not candidates.  For every
   class the mean of its clean renders over the kept faces is computed; walking the classes in a fixed
   script order, a class is dropped when its mean render is within ``CLASS_MAD`` (mean absolute
   difference, 0.045) of a class of the same script kept earlier, or within ``CROSS_SCRIPT_MAD`` (0.055)
   of a class of another script (a borrowed shape: Latin ``o`` / Cyrillic ``o`` / Greek omicron, ``i`` /
   Arabic alef, ``h`` / Armenian ho, Hiragana / Katakana ``ri``, ...).
4. **Distortion.**  The square glyph is scaled to ``GLYPH_FILL`` of a canvas ``SUPERSAMPLE`` times the
   target size and transformed by one random affine map (rotation +-15 degrees, horizontal shear +-0.3,
   anisotropic scale 0.75-1.05 per axis, shift +-10 % of the image per axis); its strokes are then thinned
   (3x3 minimum filter on the ink; skipped when that would erase more than half of the ink, as for
   hairline faces), kept, or thickened (5x5 maximum filter), one of the three with equal probability;
   finally the canvas is downsampled to the target size with Lanczos and the ink is stretched so that
   the darkest pixel is black (light faces would otherwise give faint grey glyphs).  The parameters of one
   sample come from a numpy ``Generator`` seeded by ``(seed, crc32(class name), sample index)``.
   Sample ``i`` of a class uses face ``i mod F`` of the script's face list, whose order is a seeded shuffle
   of the font families followed by a round-robin, so a class gets as many different families as
   possible; when a script has fewer faces than samples, a face is reused with a different distortion.
5. **Images** are stored as ``uint8`` grey, **dark ink on a white background** (255 = paper), like
   Omniglot.

Two datasets are built from this:

* ``embedded`` -- the pack committed to the repository (``data/glyphs100.npz``): 100 classes drawn
  round-robin over all scripts and split 64 / 16 / 20 *by class* with a seeded random assignment (like
  miniImageNet), 32x32, 60 images per class.
* ``benchmark`` -- about 1,000 classes split *by script* (like Omniglot's background / evaluation split,
  see ``BENCHMARK_SPLITS``), 32x32, 20 images per class, built on demand (``ensure_benchmark``) with a
  manifest of checksums next to it.

File format (one ``.npz``, read by ``data_generator.dataset_loader``): for each split ``s`` in
``train, val, test``: ``s_images`` uint8 ``(N, H, W)``, ``s_labels`` int64 ``(N,)`` in ``0..C_s-1``,
``s_classes`` unicode ``(C_s,)`` sorted by name, with ``s_classes[label]`` the class of an image; plus
``meta_json``, a 0-d unicode array holding a JSON object (seed, image size, generator version, per-split
counts, faces used, sha256 of every array).  The archive is written with a fixed zip timestamp and
compression level, so the same seed and the same fonts give a byte-identical file.

Command line::

    python -m data_generator.glyphs embedded --out data/glyphs100.npz --seed 0 --baseline
    python -m data_generator.glyphs benchmark --out data/glyphs1k --seed 0 --baseline
    python -m data_generator.glyphs baseline data/glyphs100.npz
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import sys
import time
import unicodedata
import zipfile
import zlib
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GENERATOR_VERSION = "1.0"
SPLITS = ("train", "val", "test")
DEFAULT_FONT_DIRS = ("/usr/share/fonts",)
FONT_EXTENSIONS = (".ttf", ".otf", ".ttc")

RENDER_PT = 64            # pixels per em when drawing a glyph
SUPERSAMPLE = 3           # distortions are drawn at this multiple of the target size
GLYPH_FILL = 0.80         # the square glyph box spans this fraction of the canvas before distortion
CHECK_SIZE = 32           # size of the clean renders used to compare faces and classes
FACE_MAD = 0.02           # faces closer than this (mean abs. difference, [0, 1]) are merged
CLASS_MAD = 0.045         # a class closer than this to an earlier class of its script is dropped
CROSS_SCRIPT_MAD = 0.055  # ... or closer than this to an earlier class of another script
ALIKE_MAD = 0.02          # a face whose glyphs are all within this of their mean is dropped (tofu)
SCREEN_CHARS = 48         # faces are compared on at most this many characters of a script

# Distortion ranges (see the module docstring).
ROTATION_DEG = 15.0
SHEAR = 0.3
SCALE_RANGE = (0.75, 1.05)
SHIFT = 0.10
THIN_FILTER = 3           # MinFilter size on the ink (thinner strokes)
THICK_FILTER = 5          # MaxFilter size on the ink (thicker strokes)
THIN_KEEP = 0.5           # thinning is skipped when it would remove more than half of the ink

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_ZIP_LEVEL = 6

logging.getLogger("fontTools").setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------------------
# Scripts and their characters
# --------------------------------------------------------------------------------------------------

_KANJI_GRADE1 = (
    "一右雨円王音下火花貝学気九休玉金空月犬見五口校左三山子四糸字耳七車手十出女小上森人水正生青夕石赤千"
    "川先早草足村大男竹中虫町天田土二日入年白八百文木本名目立力林六"
)
_KANJI_GRADE2 = (
    "引羽雲園遠何科夏家歌画回会海絵外角楽活間丸岩顔汽記帰弓牛魚京強教近兄形計元言原戸古午後語工公広交光"
    "考行高黄合谷国黒今才細作算止市矢姉思紙寺自時室社弱首秋週春書少場色食心新親図数西声星晴切雪船線前組"
    "走多太体台地池知茶昼長鳥朝直通弟店点電刀冬当東答頭同道読内南肉馬売買麦半番父風分聞米歩母方北毎妹万"
    "明鳴毛門夜野友用曜来里理話"
)
_HIRAGANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"
# Katakana without the lookalikes of Kanji (ka/power, ro/mouth, e/work, ta/evening, ni/two, ha/eight) and
# of Hiragana (he/he): カ ロ エ タ ニ ハ ヘ.
_KATAKANA = "アイウオキクケコサシスセソチツテトナヌネノヒフホマミムメモヤユヨラリルレワヲン"
_LAO = "ກຂຄງຈຊຍດຕຖທນບປຜຝພຟມຢຣລວສຫອຮ"
_ARABIC = "ابتثجحخدذرزسشصضطظعغفقكلمنهوي"
HANGUL_STEP = 5           # every 5th syllable of the 2,350 KS X 1001 syllables -> 470 candidates


def _char_range(first: int, last: int) -> str:
    """The assigned letters (category L*) from ``first`` to ``last`` inclusive."""
    return "".join(chr(c) for c in range(first, last + 1) if unicodedata.category(chr(c)).startswith("L"))


def _hangul_subset(step: int = HANGUL_STEP) -> str:
    """A fixed subset of the 2,350 common Hangul syllables of KS X 1001 (every ``step``-th one)."""
    syllables = [bytes([hi, lo]).decode("euc-kr") for hi in range(0xB0, 0xC9) for lo in range(0xA1, 0xFF)]
    return "".join(syllables[::step])


def _script_table() -> dict[str, str]:
    """Script name -> candidate characters (before lookalike removal), in the canonical order."""
    return {
        "Latin": "abcdefghijklmnopqrstuvwxyz",
        "Greek": _char_range(0x03B1, 0x03C1) + _char_range(0x03C3, 0x03C9),   # no final sigma
        "Cyrillic": _char_range(0x0430, 0x044F),
        "Hebrew": _char_range(0x05D0, 0x05EA),
        "Arabic": _ARABIC,
        "Thai": _char_range(0x0E01, 0x0E2E),
        "Hiragana": _HIRAGANA,
        "Hangul": _hangul_subset(),
        "Kanji1": _KANJI_GRADE1,
        "Georgian": _char_range(0x10D0, 0x10F0),
        "Lao": _LAO,
        "Myanmar": _char_range(0x1000, 0x1021),
        "Armenian": _char_range(0x0561, 0x0586),
        "Khmer": _char_range(0x1780, 0x17A2),
        "Katakana": _KATAKANA,
        "Kanji2": _KANJI_GRADE2,
    }


SCRIPTS: dict[str, str] = _script_table()

# The benchmark's split by script: the test scripts are never seen in training, and the lookalike
# filter walks the scripts in this order, so a val/test class that looks like a train class is dropped.
BENCHMARK_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("Latin", "Greek", "Cyrillic", "Hebrew", "Arabic", "Thai", "Hiragana", "Hangul", "Kanji1"),
    "val": ("Georgian", "Lao", "Myanmar"),
    "test": ("Armenian", "Khmer", "Katakana", "Kanji2"),
}
SCRIPT_ORDER: tuple[str, ...] = tuple(s for split in SPLITS for s in BENCHMARK_SPLITS[split])


def class_name(script: str, char: str) -> str:
    """Readable, unique class name: ``Latin_a`` for ASCII letters, else ``<Script>_U+XXXX``."""
    if char.isascii() and char.isalnum():
        return f"{script}_{char}"
    return f"{script}_U+{ord(char):04X}"


# --------------------------------------------------------------------------------------------------
# Fonts
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Face:
    """One font face: a file (and a face index inside a collection) with its names and coverage."""

    path: str
    index: int
    family: str
    style: str
    root: str
    codepoints: frozenset = field(default=frozenset(), compare=False, repr=False)

    @property
    def file(self) -> str:
        """The file name, relative to the font directory it was found in."""
        return os.path.relpath(self.path, self.root) if self.path.startswith(self.root) else self.path

    @property
    def key(self) -> str:
        """``file`` or ``file#index`` for a face of a collection."""
        return self.file if self.index == 0 and not self.path.lower().endswith(".ttc") else f"{self.file}#{self.index}"

    def covers(self, chars: Iterable[str]) -> bool:
        """Whether the cmap maps every character of ``chars``."""
        return all(ord(c) in self.codepoints for c in chars)

    def describe(self) -> dict:
        """JSON-friendly description for the manifest."""
        return {"file": self.key, "family": self.family, "style": self.style}


def font_files(font_dirs: Sequence[str] = DEFAULT_FONT_DIRS) -> list[tuple[str, str]]:
    """All font files under ``font_dirs`` as sorted ``(real path, root)`` pairs, symlinks resolved."""
    found: dict[str, str] = {}
    for root in font_dirs:
        root_real = os.path.realpath(root)
        if not os.path.isdir(root_real):
            continue
        for dirpath, dirnames, filenames in os.walk(root_real, followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                if name.lower().endswith(FONT_EXTENSIONS):
                    real = os.path.realpath(os.path.join(dirpath, name))
                    found.setdefault(real, root_real)
    return sorted(found.items())


def _name(font, ids: Sequence[int]) -> str:
    for name_id in ids:
        value = font["name"].getDebugName(name_id) if "name" in font else None
        if value:
            return value.strip()
    return ""


def scan_faces(font_dirs: Sequence[str] = DEFAULT_FONT_DIRS) -> list[Face]:
    """Every outline face in the font files, with its family/style names and cmap coverage."""
    from fontTools.ttLib import TTCollection, TTFont

    faces: list[Face] = []
    for path, root in font_files(font_dirs):
        try:
            fonts = TTCollection(path, lazy=True).fonts if path.lower().endswith(".ttc") else [TTFont(path, lazy=True)]
        except Exception:  # unreadable or unsupported file: not a candidate
            continue
        for index, font in enumerate(fonts):
            try:
                if not any(tag in font for tag in ("glyf", "CFF ", "CFF2")):
                    continue
                # Synthetic glyph names: the cmap then decodes without building the real names (3x faster).
                font.setGlyphOrder([f"g{k}" for k in range(font["maxp"].numGlyphs)])
                cmap = font.getBestCmap() or {}
                faces.append(Face(path=path, index=index, family=_name(font, (16, 1)) or os.path.basename(path),
                                  style=_name(font, (17, 2)), root=root, codepoints=frozenset(cmap)))
            except Exception:
                continue
    return faces


_FONT_CACHE: OrderedDict[tuple[str, int], ImageFont.FreeTypeFont] = OrderedDict()
_FONT_CACHE_SIZE = 96     # open fonts kept (least recently used are closed): bounded file handles


def load_font(face: Face) -> ImageFont.FreeTypeFont:
    """The Pillow font for ``face`` at ``RENDER_PT`` (basic layout; a small LRU cache)."""
    key = (face.path, face.index)
    font = _FONT_CACHE.pop(key, None)
    if font is None:
        font = ImageFont.truetype(face.path, size=RENDER_PT, index=face.index, layout_engine=ImageFont.Layout.BASIC)
    _FONT_CACHE[key] = font
    while len(_FONT_CACHE) > _FONT_CACHE_SIZE:
        _FONT_CACHE.popitem(last=False)
    return font


# --------------------------------------------------------------------------------------------------
# Rendering and distortion
# --------------------------------------------------------------------------------------------------

def render_glyph(font: ImageFont.FreeTypeFont, char: str) -> Image.Image | None:
    """Draw ``char`` (ink 255 on 0), crop to the ink box and pad to a centred square; None if empty."""
    left, top, right, bottom = font.getbbox(char)
    if right <= left or bottom <= top:
        return None
    pad = 4
    canvas = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(canvas).text((pad - left, pad - top), char, fill=255, font=font)
    box = canvas.getbbox()
    if box is None:
        return None
    crop = canvas.crop(box)
    side = max(crop.size)
    square = Image.new("L", (side, side), 0)
    square.paste(crop, ((side - crop.size[0]) // 2, (side - crop.size[1]) // 2))
    return square


@dataclass(frozen=True)
class Distortion:
    """One fixed random "handwriting" distortion."""

    rotation_deg: float
    shear: float
    scale_x: float
    scale_y: float
    shift_x: float      # fraction of the image width
    shift_y: float      # fraction of the image height
    stroke: int         # -1 thinner, 0 unchanged, +1 thicker


def sample_distortion(rng: np.random.Generator) -> Distortion:
    """Draw one distortion from the ranges of the module docstring."""
    rot, shear, sx, sy, dx, dy = rng.uniform(
        [-ROTATION_DEG, -SHEAR, SCALE_RANGE[0], SCALE_RANGE[0], -SHIFT, -SHIFT],
        [ROTATION_DEG, SHEAR, SCALE_RANGE[1], SCALE_RANGE[1], SHIFT, SHIFT])
    stroke = int(rng.integers(-1, 2))
    return Distortion(float(rot), float(shear), float(sx), float(sy), float(dx), float(dy), stroke)


def sample_rng(seed: int, name: str, sample: int) -> np.random.Generator:
    """The generator of one sample, seeded by ``(seed, crc32(class name), sample index)``."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8")), int(sample)])


def rank_filter(image: np.ndarray, size: int, op: np.ufunc) -> np.ndarray:
    """``size`` x ``size`` minimum (``op=np.minimum``) or maximum (``np.maximum``) filter, edges replicated.

    Separable (rows, then columns); the same result as Pillow's ``MinFilter`` / ``MaxFilter``, faster.
    """
    pad = size // 2
    padded = np.pad(image, pad, mode="edge")
    h, w = image.shape
    rows = padded[:, 0:w].copy()
    for k in range(1, size):
        op(rows, padded[:, k:k + w], out=rows)
    out = rows[0:h].copy()
    for k in range(1, size):
        op(out, rows[k:k + h], out=out)
    return out


def place_glyph(glyph: Image.Image, size: int, distortion: Distortion | None = None) -> np.ndarray:
    """Lay out a square ink glyph on a ``size`` x ``size`` image, optionally distorted.

    The glyph is scaled to ``GLYPH_FILL`` of a canvas ``SUPERSAMPLE * size`` wide, transformed (affine map
    about the centre, then the stroke filter) and downsampled with Lanczos; the ink is then stretched so
    the darkest pixel is black (light faces).  Returns uint8 ``(size, size)`` with dark ink on white (255).
    """
    big = SUPERSAMPLE * size
    inner = max(1, round(GLYPH_FILL * big))
    canvas = Image.new("L", (big, big), 0)
    offset = (big - inner) // 2
    canvas.paste(glyph.resize((inner, inner), Image.Resampling.LANCZOS), (offset, offset))
    if distortion is not None:
        d = distortion
        # Forward map about the centre c: output = A (input - c) + c + t, with A = rotation @ shear @ scale.
        # Pillow wants the inverse: input = A^-1 output + b, b = c - A^-1 (c + t).  Plain Python floats
        # (math.sin / cos, a closed-form 2x2 inverse) keep the coefficients identical on every machine.
        theta = math.radians(d.rotation_deg)
        cos, sin = math.cos(theta), math.sin(theta)
        a11, a12 = cos * d.scale_x, (cos * d.shear - sin) * d.scale_y
        a21, a22 = sin * d.scale_x, (sin * d.shear + cos) * d.scale_y
        det = a11 * a22 - a12 * a21
        i11, i12, i21, i22 = a22 / det, -a12 / det, -a21 / det, a11 / det
        c = big / 2.0
        px, py = c + d.shift_x * big, c + d.shift_y * big
        coeffs = (i11, i12, c - (i11 * px + i12 * py), i21, i22, c - (i21 * px + i22 * py))
        canvas = canvas.transform((big, big), Image.Transform.AFFINE, coeffs,
                                  resample=Image.Resampling.BILINEAR, fillcolor=0)
        if d.stroke < 0:
            ink = np.asarray(canvas)
            thin = rank_filter(ink, THIN_FILTER, np.minimum)
            if thin.sum(dtype=np.int64) >= THIN_KEEP * ink.sum(dtype=np.int64):   # hairlines are not thinned
                canvas = Image.fromarray(thin)
        elif d.stroke > 0:
            canvas = Image.fromarray(rank_filter(np.asarray(canvas), THICK_FILTER, np.maximum))
    ink = np.asarray(canvas.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint16)
    peak = int(ink.max())
    if 0 < peak < 255:                          # light faces: stretch so the darkest pixel is black
        ink = (ink * 255 + peak // 2) // peak
    return (255 - ink).astype(np.uint8)


def distort(glyph: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """``place_glyph`` with one distortion drawn from ``rng``."""
    return place_glyph(glyph, size, sample_distortion(rng))


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


def check_render(glyph: Image.Image) -> np.ndarray:
    """Clean ``CHECK_SIZE`` render of a glyph as ink in [0, 1] (float32), for comparing faces and classes.

    The same layout as ``place_glyph`` without distortion, drawn directly at the small size with a box
    (area-average) filter, which is faster than the supersampled Lanczos path.
    """
    inner = max(1, round(GLYPH_FILL * CHECK_SIZE))
    canvas = Image.new("L", (CHECK_SIZE, CHECK_SIZE), 0)
    offset = (CHECK_SIZE - inner) // 2
    canvas.paste(glyph.resize((inner, inner), Image.Resampling.BOX), (offset, offset))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _screen_indices(n: int) -> np.ndarray:
    """At most ``SCREEN_CHARS`` evenly spaced character indices used to compare faces."""
    return np.unique(np.linspace(0, n - 1, min(n, SCREEN_CHARS)).round().astype(int))


def select_faces(script: str, chars: str, faces: Sequence[Face]) -> ScriptFaces:
    """Keep the faces whose cmap covers ``chars`` and screen them with ``screen_faces``."""
    return screen_faces(script, chars, [f for f in faces if f.covers(chars)])


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


@dataclass(frozen=True)
class GlyphClass:
    """One class: a character of a script."""

    script: str
    char: str

    @property
    def name(self) -> str:
        return class_name(self.script, self.char)


def default_workers() -> int:
    """Worker processes used by default: the CPUs this process may use, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _parallel_map(fn, items: list, workers: int, chunksize: int = 1) -> list:
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
    results = _parallel_map(_screen_task, [tasks[i] for i in by_cost], workers)
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


# --------------------------------------------------------------------------------------------------
# Sample rendering, packing and checksums
# --------------------------------------------------------------------------------------------------

def render_class(cls: GlyphClass, faces: Sequence[Face], n: int, size: int, seed: int) -> np.ndarray:
    """``n`` distorted samples of ``cls``: sample ``i`` uses ``faces[i % len(faces)]``. uint8 (n, size, size).

    ``faces`` should hold at most ``n`` faces; each glyph is rendered once.
    """
    glyphs: list[Image.Image] = []
    for face in faces:
        glyph = render_glyph(load_font(face), cls.char)
        if glyph is not None:        # a face whose glyph has no ink is skipped for this class
            glyphs.append(glyph)
    if not glyphs:
        raise RuntimeError(f"no face renders {cls.name}")
    out = np.empty((n, size, size), np.uint8)
    for i in range(n):
        out[i] = distort(glyphs[i % len(glyphs)], size, sample_rng(seed, cls.name, i))
    return out


def array_sha256(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and C-order bytes."""
    array = np.ascontiguousarray(array)
    h = hashlib.sha256()
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())
    return h.hexdigest()


def arrays_sha256(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """sha256 of every data array (everything but ``meta_json``), by name."""
    return {k: array_sha256(v) for k, v in sorted(arrays.items()) if k != "meta_json"}


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` equivalent with a fixed zip date and compression level (byte-reproducible)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=_ZIP_LEVEL) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asanyarray(arrays[name]), allow_pickle=False)
            zf.writestr(info, buffer.getvalue(), compresslevel=_ZIP_LEVEL)
    os.replace(tmp, path)


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import PIL
    from PIL import features
    try:
        import fontTools
        ft_version = fontTools.version
    except Exception:  # pragma: no cover
        ft_version = "?"
    return {"numpy": np.__version__, "pillow": PIL.__version__,
            "freetype": str(features.version("freetype2")), "fonttools": ft_version}


def _render_task(task: tuple[GlyphClass, list[Face], int, int, int]) -> np.ndarray:
    return render_class(*task)


def _pack(kind: str, seed: int, size: int, per_class: int, splits: dict[str, list[GlyphClass]],
          per_script: dict[str, ScriptFaces], dropped: dict[str, str], log=None,
          workers: int = 1) -> dict[str, np.ndarray]:
    """Render every split (classes in ``workers`` processes) and assemble the npz arrays with ``meta_json``."""
    arrays: dict[str, np.ndarray] = {}
    orders = {s: [replace(f, codepoints=frozenset()) for f in sampling_order(sf.faces, seed, s)]
              for s, sf in per_script.items() if sf.faces}
    used_faces: dict[str, set[str]] = {}
    for split in SPLITS:
        classes = sorted(splits[split], key=lambda c: c.name)
        tasks = [(cls, orders[cls.script][:per_class], per_class, size, seed) for cls in classes]
        for cls, faces, *_ in tasks:
            for face in faces:
                used_faces.setdefault(face.key, set()).add(cls.script)
        rendered = _parallel_map(_render_task, tasks, workers, chunksize=8)
        images = np.concatenate(rendered) if rendered else np.empty((0, size, size), np.uint8)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = np.repeat(np.arange(len(classes), dtype=np.int64), per_class)
        arrays[f"{split}_classes"] = np.array([c.name for c in classes], dtype=np.str_)
        if log:
            log(f"  {split}: {len(classes)} classes x {per_class} images")
    all_faces = {f.key: f for sf in per_script.values() for f in sf.faces}
    meta = {
        "kind": kind,
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "image_size": int(size),
        "images_per_class": int(per_class),
        "ink": "dark ink (0) on white background (255), uint8 grey",
        "splits": {s: {"classes": len(splits[s]), "images": len(splits[s]) * per_class,
                       "scripts": sorted({c.script for c in splits[s]}),
                       "classes_per_script": dict(sorted(Counter(c.script for c in splits[s]).items()))}
                   for s in SPLITS},
        "distortion": {"rotation_deg": ROTATION_DEG, "shear": SHEAR, "scale": list(SCALE_RANGE),
                       "shift": SHIFT, "thin_min_filter": THIN_FILTER, "thick_max_filter": THICK_FILTER,
                       "supersample": SUPERSAMPLE, "glyph_fill": GLYPH_FILL, "render_pt": RENDER_PT},
        "faces_per_script": {s: [f.key for f in orders[s][:per_class]] for s in sorted(orders)
                             if any(c.script == s for v in splits.values() for c in v)},
        "faces": [dict(all_faces[k].describe(), scripts=sorted(used_faces[k])) for k in sorted(used_faces)],
        "dropped_lookalikes": dict(sorted(dropped.items())),
        "versions": _versions(),
    }
    return finalize_arrays(arrays, meta)


def finalize_arrays(arrays: dict[str, np.ndarray], meta: dict) -> dict[str, np.ndarray]:
    """Add ``meta["sha256"]`` (the data arrays' checksums) and store ``meta`` as ``arrays["meta_json"]``."""
    meta = dict(meta, sha256=arrays_sha256(arrays))
    arrays = dict(arrays)
    arrays["meta_json"] = np.array(json.dumps(meta, ensure_ascii=False, sort_keys=True))
    return arrays


def read_meta(path: str) -> dict:
    """The ``meta_json`` object of a pack."""
    with np.load(path, allow_pickle=False) as data:
        return json.loads(str(data["meta_json"]))


def verify_pack(path: str, expected: dict[str, str] | None = None) -> bool:
    """Whether the arrays of ``path`` match ``expected`` sha256s (default: the pack's own ``meta_json``)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception:
        return False
    if "meta_json" not in arrays:
        return False
    if expected is None:
        expected = json.loads(str(arrays["meta_json"]))["sha256"]
    return arrays_sha256(arrays) == expected


# --------------------------------------------------------------------------------------------------
# The two datasets
# --------------------------------------------------------------------------------------------------

def _stratified_pick(pool: Sequence[GlyphClass], n: int, rng: np.random.Generator) -> list[GlyphClass]:
    """``n`` classes drawn round-robin over the scripts (script order and classes shuffled by ``rng``)."""
    by_script: dict[str, list[GlyphClass]] = {}
    for cls in pool:
        by_script.setdefault(cls.script, []).append(cls)
    scripts = [sorted(by_script)[i] for i in rng.permutation(len(by_script))]
    queues = {s: [by_script[s][i] for i in rng.permutation(len(by_script[s]))] for s in scripts}
    picked: list[GlyphClass] = []
    depth = 0
    while len(picked) < n:
        progressed = False
        for s in scripts:
            if depth < len(queues[s]) and len(picked) < n:
                picked.append(queues[s][depth])
                progressed = True
        if not progressed:
            raise ValueError(f"only {len(picked)} classes available, {n} asked for")
        depth += 1
    return picked


def _class_pool(font_dirs: Sequence[str], min_faces: int, workers: int, log) -> tuple:
    """Scan the installed faces and build the class pool (lookalikes dropped) shared by both datasets."""
    t0 = time.time()
    faces = scan_faces(font_dirs)
    log(f"scanned {len(faces)} faces in {time.time() - t0:.1f} s")
    pool, per_script, dropped = build_pool(faces, SCRIPT_ORDER, min_faces=min_faces, log=log, workers=workers)
    log(f"class pool: {len(pool)} classes ({len(dropped)} lookalikes dropped)")
    return pool, per_script, dropped


def build_embedded(out: str, seed: int = 0, n_classes: int = 100, split_sizes: Sequence[int] = (64, 16, 20),
                   per_class: int = 60, size: int = 32, font_dirs: Sequence[str] = DEFAULT_FONT_DIRS,
                   min_faces: int = 16, workers: int | None = None, log=print) -> dict:
    """Build the embedded pack: ``n_classes`` classes over all scripts, split by class. Returns meta."""
    if sum(split_sizes) != n_classes:
        raise ValueError(f"split sizes {tuple(split_sizes)} do not add up to {n_classes}")
    t0 = time.time()
    workers = default_workers() if workers is None else workers
    pool, per_script, dropped = _class_pool(font_dirs, min_faces, workers, log)
    rng = np.random.default_rng([int(seed), zlib.crc32(b"embedded")])
    picked = _stratified_pick(pool, n_classes, rng)
    order = rng.permutation(len(picked))
    bounds = np.cumsum([0, *split_sizes])
    splits = {s: [picked[i] for i in order[bounds[k]:bounds[k + 1]]] for k, s in enumerate(SPLITS)}
    picked_names = {c.name for c in picked}
    dropped = {k: v for k, v in dropped.items() if v in picked_names}
    arrays = _pack("embedded", seed, size, per_class, splits, per_script, dropped, log=log, workers=workers)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_npz(out, arrays)
    log(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB) in {time.time() - t0:.1f} s")
    return json.loads(str(arrays["meta_json"]))


def _benchmark_paths(path: str) -> tuple[str, str]:
    base = path[:-4] if path.endswith(".npz") else path
    return base + ".npz", base + ".manifest.json"


def build_benchmark(out: str, seed: int = 0, per_class: int = 20, size: int = 32,
                    font_dirs: Sequence[str] = DEFAULT_FONT_DIRS, min_faces: int = 16,
                    workers: int | None = None, log=print) -> dict:
    """Build the benchmark (split by script) as ``<out>.npz`` + ``<out>.manifest.json``. Returns the manifest."""
    npz_path, manifest_path = _benchmark_paths(out)
    t0 = time.time()
    workers = default_workers() if workers is None else workers
    pool, per_script, dropped = _class_pool(font_dirs, min_faces, workers, log)
    splits = {s: [c for c in pool if c.script in BENCHMARK_SPLITS[s]] for s in SPLITS}
    for s in SPLITS:
        if not splits[s]:
            raise RuntimeError(f"no {s} classes: are the font packages of docs/DATA.md installed?")
    arrays = _pack("benchmark", seed, size, per_class, splits, per_script, dropped, log=log, workers=workers)
    manifest = save_with_manifest(npz_path, arrays, build_seconds=time.time() - t0)
    log(f"wrote {npz_path} ({os.path.getsize(npz_path) / 1e6:.2f} MB) and {manifest_path} "
        f"in {time.time() - t0:.1f} s")
    return manifest


def save_with_manifest(path: str, arrays: dict[str, np.ndarray], build_seconds: float | None = None) -> dict:
    """Write ``<path>.npz`` and ``<path>.manifest.json`` (checksums, seed, counts, fonts) from pack arrays.

    ``arrays`` must hold ``meta_json`` (see ``finalize_arrays``).  Returns the manifest.
    """
    npz_path, manifest_path = _benchmark_paths(path)
    os.makedirs(os.path.dirname(os.path.abspath(npz_path)), exist_ok=True)
    write_npz(npz_path, arrays)
    meta = json.loads(str(arrays["meta_json"]))
    manifest = {
        "kind": meta.get("kind"),
        "generator_version": meta.get("generator_version"),
        "seed": meta.get("seed"),
        "image_size": meta.get("image_size"),
        "images_per_class": meta.get("images_per_class"),
        "npz": os.path.basename(npz_path),
        "npz_sha256": file_sha256(npz_path),
        "arrays_sha256": meta["sha256"],
        "splits": meta.get("splits"),
        "fonts": meta.get("faces", []),
        "versions": meta.get("versions"),
        "build_seconds": None if build_seconds is None else round(build_seconds, 1),
    }
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False, sort_keys=True)
        f.write("\n")
    return manifest


def ensure_benchmark(path: str, seed: int = 0, per_class: int = 20, size: int = 32,
                     font_dirs: Sequence[str] = DEFAULT_FONT_DIRS, min_faces: int = 16,
                     workers: int | None = None, log=print) -> str:
    """Return the benchmark npz at ``path``, building it if missing and rebuilding if it fails its checksum.

    The pack is accepted when its manifest exists, names the same seed, size, images per class and
    generator version, and the sha256 of every array in the npz matches the manifest.
    """
    npz_path, manifest_path = _benchmark_paths(path)
    if os.path.exists(npz_path) and os.path.exists(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
            same = (manifest.get("kind") == "benchmark" and manifest.get("seed") == seed
                    and manifest.get("image_size") == size
                    and manifest.get("images_per_class") == per_class
                    and manifest.get("generator_version") == GENERATOR_VERSION)
            if same and verify_pack(npz_path, manifest.get("arrays_sha256") or {}):
                log(f"{npz_path}: checksums match {manifest_path}")
                return npz_path
            log(f"{npz_path}: does not match {manifest_path}; rebuilding")
        except (OSError, ValueError) as err:
            log(f"{manifest_path}: unreadable ({err}); rebuilding")
    build_benchmark(npz_path, seed=seed, per_class=per_class, size=size, font_dirs=font_dirs,
                    min_faces=min_faces, workers=workers, log=log)
    return npz_path


# --------------------------------------------------------------------------------------------------
# Raw-pixel baseline
# --------------------------------------------------------------------------------------------------

def pixel_baseline(images: np.ndarray, labels: np.ndarray, way: int = 5, shot: int = 1, query: int = 15,
                   episodes: int = 600, seed: int = 0) -> tuple[float, float]:
    """Cosine nearest-centroid accuracy on raw pixels, no training: mean and 95 % half-interval.

    Pixels are taken as ink (``1 - x / 255``), flattened; each episode draws ``way`` classes and
    ``shot + query`` distinct images per class with a numpy Generator seeded by ``seed``.
    """
    x = (1.0 - images.reshape(len(images), -1).astype(np.float32) / 255.0)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-8
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    rng = np.random.default_rng([int(seed), way, shot, query])
    acc = np.empty(episodes)
    for e in range(episodes):
        classes = rng.choice(len(by_class), way, replace=False)
        picks = [rng.choice(by_class[c], shot + query, replace=False) for c in classes]
        support = np.stack([x[p[:shot]].mean(0) for p in picks])
        support /= np.linalg.norm(support, axis=1, keepdims=True) + 1e-8
        q = np.concatenate([p[shot:] for p in picks])
        y = np.repeat(np.arange(way), query)
        acc[e] = ((x[q] @ support.T).argmax(1) == y).mean()
    return float(acc.mean()), float(1.96 * acc.std() / np.sqrt(episodes))


def baseline_report(path: str, split: str = "test", episodes: int = 600,
                    seed: int = 0) -> dict[str, tuple[float, float]]:
    """5-way 1-shot and 5-shot pixel baselines on one split of a pack."""
    with np.load(path, allow_pickle=False) as data:
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
    return {f"5way_{k}shot": pixel_baseline(images, labels, 5, k, 15, episodes, seed) for k in (1, 5)}


def _print_baseline(path: str, split: str, episodes: int) -> None:
    for name, (mean, ci) in baseline_report(path, split, episodes).items():
        print(f"pixel cosine nearest-centroid, {split}, {name}, {episodes} episodes: "
              f"{100 * mean:.2f} +- {100 * ci:.2f} %")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """``python -m data_generator.glyphs {embedded,benchmark,baseline} ...``"""
    parser = argparse.ArgumentParser(prog="python -m data_generator.glyphs", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("embedded", "the small pack split by class (committed as data/glyphs100.npz)"),
                            ("benchmark", "the ~1,000-class pack split by script (<out>.npz + <out>.manifest.json)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--out", required=True, help="output path")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--size", type=int, default=32, help="image side in pixels")
        p.add_argument("--per-class", type=int, default=60 if name == "embedded" else 20,
                       help="images per class")
        p.add_argument("--font-dir", action="append", default=None,
                       help=f"font directory (repeatable; default {DEFAULT_FONT_DIRS[0]})")
        p.add_argument("--min-faces", type=int, default=16, help="skip scripts with fewer distinct faces")
        p.add_argument("--workers", type=int, default=None,
                       help="rendering processes (default: usable CPUs, at most 8); output does not depend on it")
        p.add_argument("--baseline", action="store_true", help="print the raw-pixel test baselines")
        if name == "embedded":
            p.add_argument("--classes", type=int, nargs=3, default=(64, 16, 20), metavar=("TRAIN", "VAL", "TEST"))
        else:
            p.add_argument("--ensure", action="store_true", help="only rebuild if missing or not matching")
    p = sub.add_parser("baseline", help="raw-pixel cosine nearest-centroid accuracy of a pack")
    p.add_argument("path")
    p.add_argument("--split", default="test")
    p.add_argument("--episodes", type=int, default=600)
    args = parser.parse_args(argv)

    if args.command == "baseline":
        _print_baseline(args.path, args.split, args.episodes)
        return 0
    font_dirs = tuple(args.font_dir) if args.font_dir else DEFAULT_FONT_DIRS
    if args.command == "embedded":
        build_embedded(args.out, seed=args.seed, n_classes=sum(args.classes), split_sizes=args.classes,
                       per_class=args.per_class, size=args.size, font_dirs=font_dirs, min_faces=args.min_faces,
                       workers=args.workers)
        path = args.out
    else:
        if args.ensure:
            path = ensure_benchmark(args.out, seed=args.seed, per_class=args.per_class, size=args.size,
                                    font_dirs=font_dirs, min_faces=args.min_faces, workers=args.workers)
        else:
            build_benchmark(args.out, seed=args.seed, per_class=args.per_class, size=args.size,
                            font_dirs=font_dirs, min_faces=args.min_faces, workers=args.workers)
            path = _benchmark_paths(args.out)[0]
    if args.baseline:
        _print_baseline(path, "test", 600)
    return 0


def _cli(argv: Sequence[str] | None = None) -> int:
    """``main`` with one-line errors (exit code 2) instead of tracebacks for expected failures."""
    try:
        return main(argv)
    except (RuntimeError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_cli())
