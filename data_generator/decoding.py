"""Decoding: an image file (or the bytes of one, or an array) -> uint8 (S, S, 3) RGB, the one conversion every reader
uses (docs/DATA.md, "Decoding").

:func:`to_rgb` maps every Pillow mode to 8-bit RGB (16-bit and 32-bit integer images scaled by 1/257, floats from
[0, 1], transparency composited over white, CMYK / YCbCr / HSV / LAB converted); :func:`fit_square` resizes the
shorter side to ``S`` (bilinear, the long side as ``int(S * long / short)``, as torchvision ``Resize``) and crops the
centre ``S x S`` (offsets ``int(round((n - S) / 2))``, as torchvision ``CenterCrop``). With the "pytorch"
preprocessing ``S`` is 92 and this is the official ``Resize(92)`` step; the crop to 92 x 92 is exact for the later
``CenterCrop(80)`` and loses only pixels that the official ``RandomResizedCrop`` could reach on non-square images.

A file that cannot be read or decoded, or an image whose values have no 8-bit meaning, raises
:class:`utils.errors.UserError` with one line naming it. Nothing here knows about splits, readers or the cache.
"""

from __future__ import annotations

import errno
import io
import math
import multiprocessing
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from utils.errors import UserError

__all__ = ["ALPHA_BACKGROUND", "to_rgb", "fit_square", "fit_array", "decode_image", "decode_bytes", "decode_all",
           "read_failure"]

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


def read_failure(path: str, exc: BaseException) -> UserError:
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
        raise read_failure(path, exc) from None
    return arr


def _decode_chunk(job: tuple[int, list[str], int]) -> tuple[int, np.ndarray]:
    """Pool worker: (start, paths, size) -> (start, uint8 (len(paths), size, size, 3))."""
    start, paths, size = job
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for k, p in enumerate(paths):
        out[k] = decode_image(p, size)
    return start, out


def decode_all(paths: Sequence[str], size: int, out: np.ndarray, num_workers: int) -> None:
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


def fit_array(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (size, size, 3): copied when already that size, else the folder conversion."""
    if img.shape[0] == img.shape[1] == size:
        return img
    return fit_square(Image.fromarray(np.ascontiguousarray(img), mode="RGB"), size)


def decode_bytes(blob: Any, size: int, where: str) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (size, size, 3) RGB. ``blob``: a uint8 1-D array (what ``cv2.imencode`` gives),
    bytes, or a str (a Python 2 byte string read with ``encoding="latin1"``)."""
    try:
        if isinstance(blob, np.ndarray):
            raw = blob.tobytes()
        elif isinstance(blob, str):
            raw = blob.encode("latin1")
        else:
            raw = bytes(blob)
        with Image.open(io.BytesIO(raw)) as im:
            rgb = to_rgb(im, where)
        return fit_square(rgb, size)
    except UserError:
        raise
    except Image.UnidentifiedImageError:
        raise UserError(f"{where}: not a readable image (neither PNG nor JPEG nor another format PIL reads)") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...; bytes() a TypeError
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{where}: not a readable image ({detail})") from None
