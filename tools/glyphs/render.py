"""Rendering and "handwriting" distortion of the glyphs (steps 2 and 4 of the method in
``tools/glyphs/__init__.py``): a glyph drawn, cropped to a square, laid out, distorted and downsampled.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tools.glyphs.fonts import Face, GlyphClass, load_font

SUPERSAMPLE = 3           # distortions are drawn at this multiple of the target size
GLYPH_FILL = 0.80         # the square glyph box spans this fraction of the canvas before distortion
CHECK_SIZE = 32           # size of the clean renders used to compare faces and classes

# Distortion ranges (see the package docstring, tools/glyphs/__init__.py).
ROTATION_DEG = 15.0
SHEAR = 0.3
SCALE_RANGE = (0.75, 1.05)
SHIFT = 0.10
THIN_FILTER = 3           # MinFilter size on the ink (thinner strokes)
THICK_FILTER = 5          # MaxFilter size on the ink (thicker strokes)
THIN_KEEP = 0.5           # thinning is skipped when it would remove more than half of the ink


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
    """Draw one distortion from the ranges of the package docstring."""
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
