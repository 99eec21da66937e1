"""Fonts and scripts of the glyph datasets: the characters of each script, the class names, and the font faces
found under the Debian font directories with their cmap coverage (see ``tools/glyphs/__init__.py`` for the method).
"""

from __future__ import annotations

import logging
import os
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from PIL import ImageFont

SPLITS = ("train", "val", "test")
DEFAULT_FONT_DIRS = ("/usr/share/fonts",)
FONT_EXTENSIONS = (".ttf", ".otf", ".ttc")
RENDER_PT = 64            # pixels per em when drawing a glyph

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



@dataclass(frozen=True)
class GlyphClass:
    """One class: a character of a script."""

    script: str
    char: str

    @property
    def name(self) -> str:
        return class_name(self.script, self.char)


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
