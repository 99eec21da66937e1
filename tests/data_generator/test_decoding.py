"""Every Pillow mode decodes to the documented 8-bit RGB (docs/DATA.md, "Decoding"): each test writes a small image
in that mode to disk (PNG or TIFF, whichever Pillow writes the mode to), decodes it with ``decode_image`` (the
path class folders, the csv reader and the cache take) and compares with values computed by hand in the test.
Modes no file format stores (HSV, La, RGBa) are converted from memory through ``to_rgb``, the same function.

The images are 2 x 2, decoded at size 2, so no resize is involved: what is compared is the mode conversion.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from data_generator.dataset_loader import load_split
from data_generator.decoding import ALPHA_BACKGROUND, decode_image, to_rgb
from utils.errors import UserError

W = ALPHA_BACKGROUND  # 255: transparent pixels become white


def _save(tmp_path, im: Image.Image, ext: str, **kw) -> str:
    path = str(tmp_path / f"img_{im.mode.replace(';', '_')}.{ext}")
    im.save(path, **kw)
    return path


def _decode(path: str) -> np.ndarray:
    out = decode_image(path, 2)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    return out


def _grid(mode: str, values) -> Image.Image:
    """A 2 x 2 image of ``mode``; ``values`` row-major (4 pixels)."""
    im = Image.new(mode, (2, 2))
    im.putdata(list(values))
    return im


def _grey(out: np.ndarray) -> list[int]:
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    return out[..., 0].reshape(-1).tolist()


def _over_white(c: int, a: int) -> int:
    """c composited over white with alpha a (0..255): c*a/255 + 255*(1 - a/255), rounded."""
    return round(c * a / 255 + 255 * (255 - a) / 255)


# --------------------------------------------------------------------------------------------------- 16 / 32 bit
def test_16_bit_png_is_scaled_by_1_over_257_not_clipped(tmp_path):
    """I;16 (16-bit grey PNG): round(x / 257). Pillow's convert("RGB") would give 255 for every x >= 255."""
    path = _save(tmp_path, _grid("I;16", [0, 128, 3000, 65535]), "png")
    assert Image.open(path).mode == "I;16"
    # 128/257 = 0.498 -> 0; 3000/257 = 11.67 -> 12; 65535/257 = 255
    assert _grey(_decode(path)) == [0, 0, 12, 255]
    assert Image.open(path).convert("RGB").getpixel((0, 1)) == (255, 255, 255)  # what plain Pillow gives


def test_16_bit_big_endian_tiff(tmp_path):
    path = _save(tmp_path, _grid("I;16B", [129, 257, 32896, 65534]), "tiff")
    assert Image.open(path).mode == "I;16B"
    # 129/257 = 0.502 -> 1; 257/257 = 1; 32896/257 = 128; 65534/257 = 254.996 -> 255
    assert _grey(_decode(path)) == [1, 1, 128, 255]


def test_16_bit_pgm_opens_as_I_and_is_scaled(tmp_path):
    path = tmp_path / "deep.pgm"
    path.write_bytes(b"P5\n2 2\n65535\n" + np.array([0, 1000, 40000, 65535], dtype=">u2").tobytes())
    assert Image.open(path).mode == "I"
    # 1000/257 = 3.89 -> 4; 40000/257 = 155.64 -> 156
    assert _grey(_decode(str(path))) == [0, 4, 156, 255]


def test_32_bit_integer_tiff_in_16_bit_range(tmp_path):
    path = _save(tmp_path, _grid("I", [0, 514, 20000, 65535]), "tiff")
    assert Image.open(path).mode == "I"
    # 514/257 = 2; 20000/257 = 77.82 -> 78
    assert _grey(_decode(path)) == [0, 2, 78, 255]


@pytest.mark.parametrize("values", [[0, 1, 70000, 5], [-3, 0, 10, 20]])
def test_32_bit_integer_tiff_outside_16_bits_is_an_error(tmp_path, values):
    path = _save(tmp_path, _grid("I", values), "tiff")
    with pytest.raises(UserError, match=r"32-bit integer image with values .*outside the 16-bit range") as e:
        _decode(path)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_float_tiff_is_read_as_0_to_1(tmp_path):
    path = _save(tmp_path, _grid("F", [0.0, 0.25, 0.75, 1.0]), "tiff")
    assert Image.open(path).mode == "F"
    # 0.25*255 = 63.75 -> 64; 0.75*255 = 191.25 -> 191 (Pillow's convert would give 0, 0, 1, 1: near black)
    assert _grey(_decode(path)) == [0, 64, 191, 255]


@pytest.mark.parametrize("values", [[0.0, 0.5, 2.0, 1.0], [0.0, float("nan"), 0.5, 1.0], [-0.1, 0, 0, 0]])
def test_float_tiff_outside_0_1_is_an_error(tmp_path, values):
    path = _save(tmp_path, _grid("F", values), "tiff")
    with pytest.raises(UserError, match=r"floating-point image with .*outside \[0, 1\]") as e:
        _decode(path)
    assert path in str(e.value)


# --------------------------------------------------------------------------------------------------- 1, L, P
def test_one_bit_png(tmp_path):
    path = _save(tmp_path, _grid("1", [0, 1, 1, 0]), "png")
    assert Image.open(path).mode == "1"
    assert _grey(_decode(path)) == [0, 255, 255, 0]


def test_grey_png(tmp_path):
    path = _save(tmp_path, _grid("L", [0, 77, 200, 255]), "png")
    assert _grey(_decode(path)) == [0, 77, 200, 255]


def _palette_image() -> Image.Image:
    im = _grid("P", [0, 1, 2, 1])
    im.putpalette([200, 10, 30, 0, 90, 250, 40, 40, 40] + [0] * (768 - 9))
    return im


def test_palette_png_without_transparency(tmp_path):
    path = _save(tmp_path, _palette_image(), "png")
    assert Image.open(path).mode == "P" and "transparency" not in Image.open(path).info
    assert _decode(path).reshape(4, 3).tolist() == [[200, 10, 30], [0, 90, 250], [40, 40, 40], [0, 90, 250]]


def test_palette_png_with_a_transparent_index(tmp_path):
    path = _save(tmp_path, _palette_image(), "png", transparency=1)
    assert Image.open(path).info["transparency"] == 1
    assert _decode(path).reshape(4, 3).tolist() == [[200, 10, 30], [W, W, W], [40, 40, 40], [W, W, W]]


def test_palette_png_with_partial_alpha(tmp_path):
    path = _save(tmp_path, _palette_image(), "png", transparency=bytes([255, 128, 0]))
    half = [_over_white(c, 128) for c in (0, 90, 250)]  # 0*128/255 + 127 = 127, 45.2 + 127 = 172.2, 125.5 + 127
    assert half == [127, 172, 252]
    assert _decode(path).reshape(4, 3).tolist() == [[200, 10, 30], half, [W, W, W], half]


def test_palette_with_alpha_PA_tiff(tmp_path):
    im = Image.new("PA", (2, 2))
    im.putpalette([10, 20, 30, 240, 100, 0] + [0] * (768 - 6))
    im.putdata([(0, 255), (1, 64), (0, 0), (1, 255)])
    path = _save(tmp_path, im, "tiff")
    assert Image.open(path).mode == "PA"
    q = [_over_white(c, 64) for c in (240, 100, 0)]  # 60.2+191 = 251.2, 25.1+191 = 216.1, 191
    assert q == [251, 216, 191]
    assert _decode(path).reshape(4, 3).tolist() == [[10, 20, 30], q, [W, W, W], [240, 100, 0]]


def test_grey_and_rgb_png_with_a_transparent_colour(tmp_path):
    p = _save(tmp_path, _grid("L", [7, 100, 7, 9]), "png", transparency=7)
    assert _grey(_decode(p)) == [W, 100, W, 9]
    p = _save(tmp_path, _grid("RGB", [(1, 2, 3), (9, 9, 9), (1, 2, 3), (1, 2, 4)]), "png", transparency=(1, 2, 3))
    assert _decode(p).reshape(4, 3).tolist() == [[W, W, W], [9, 9, 9], [W, W, W], [1, 2, 4]]


def test_16_bit_png_with_a_transparent_value(tmp_path):
    p = _save(tmp_path, _grid("I;16", [3000, 3000, 514, 65535]), "png", transparency=3000)
    assert Image.open(p).info["transparency"] == 3000
    assert _grey(_decode(p)) == [W, W, 2, 255]


# --------------------------------------------------------------------------------------------------- alpha
def test_grey_alpha_LA_png(tmp_path):
    path = _save(tmp_path, _grid("LA", [(200, 128), (0, 0), (0, 255), (100, 1)]), "png")
    assert Image.open(path).mode == "LA"
    # 200*128/255 + 127 = 227.4; transparent -> 255; opaque black -> 0; 100/255 + 254 = 254.4
    assert _grey(_decode(path)) == [227, 255, 0, 254]


def test_rgba_png(tmp_path):
    path = _save(tmp_path, _grid("RGBA", [(10, 200, 40, 64), (1, 2, 3, 0), (9, 8, 7, 255), (255, 0, 0, 191)]),
                 "png")
    px = _decode(path).reshape(4, 3).tolist()
    # alpha 64: 10*64/255 + 191 = 193.5 -> 194 (2.51 + 191 = 193.51), 200*64/255 + 191 = 241.2, 40*64/255 + 191 = 201.0
    assert px[0] == [194, 241, 201] == [_over_white(c, 64) for c in (10, 200, 40)]
    # alpha 191: 255 -> 255; 0*191/255 + 255*64/255 = 64
    assert px[1:] == [[W, W, W], [9, 8, 7], [255, 64, 64]]


def test_premultiplied_modes_from_memory():
    """La and RGBa (premultiplied, c' = c a / 255; no format stores them): over white, c' + 255 - a."""
    la = _grid("La", [(0, 0), (100, 200), (40, 255), (0, 100)])
    assert _grey(np.asarray(to_rgb(la, "la"))) == [255, 155, 40, 155]
    rgba = _grid("RGBa", [(51, 102, 0, 255), (0, 0, 0, 0), (30, 60, 90, 128), (0, 0, 0, 255)])
    assert np.asarray(to_rgb(rgba, "rgba")).reshape(4, 3).tolist() == [[51, 102, 0], [W, W, W], [157, 187, 217],
                                                                      [0, 0, 0]]


# --------------------------------------------------------------------------------------------------- colour spaces
def test_cmyk_tiff(tmp_path):
    path = _save(tmp_path, _grid("CMYK", [(100, 50, 0, 20), (0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]), "tiff")
    assert Image.open(path).mode == "CMYK"
    # R = (255 - C)(255 - K)/255: 155*235/255 = 142.8 -> 143, 205*235/255 = 188.9 -> 189, 235
    assert _decode(path).reshape(4, 3).tolist() == [[143, 189, 235], [255, 255, 255], [0, 255, 255], [0, 0, 0]]


def test_ycbcr_tiff(tmp_path):
    path = _save(tmp_path, _grid("YCbCr", [(100, 50, 200), (128, 128, 128), (200, 90, 60), (30, 200, 40)]), "tiff")
    assert Image.open(path).mode == "YCbCr"

    def jfif(y, cb, cr):  # R = Y + 1.402 Cr', G = Y - 0.344136 Cb' - 0.714136 Cr', B = Y + 1.772 Cb', rounded
        v = (y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128))
        return [min(255, max(0, math.floor(x + 0.5))) for x in v]
    # (100, 50, 200): 200.94 -> 201, 75.42 -> 75, -38.2 -> 0 (Pillow's own conversion truncates: 200)
    assert jfif(100, 50, 200) == [201, 75, 0]
    assert _decode(path).reshape(4, 3).tolist() == [jfif(*p) for p in
                                                    [(100, 50, 200), (128, 128, 128), (200, 90, 60), (30, 200, 40)]]


def test_lab_tiff(tmp_path):
    """Neutral L*a*b* (a* = b* = 0) is grey in sRGB: Y = ((L* + 16) / 116)^3, then the sRGB curve."""
    path = _save(tmp_path, _grid("LAB", [(255, 128, 128), (128, 128, 128), (0, 128, 128), (200, 128, 128)]), "tiff")
    assert Image.open(path).mode == "LAB"

    def grey(byte):
        L = byte * 100 / 255
        f = (L + 16) / 116
        y = f ** 3 if f > 6 / 29 else 3 * (6 / 29) ** 2 * (f - 4 / 29)
        c = 12.92 * y if y <= 0.0031308 else 1.055 * y ** (1 / 2.4) - 0.055
        return math.floor(255 * c + 0.5)
    # L* 50.2 -> Y 0.1857 -> 0.4674 -> 119; L* 78.4 -> 194 (Pillow's convert("RGB") copies the bytes: (128, 128, 128))
    assert [grey(b) for b in (255, 128, 0, 200)] == [255, 119, 0, 194]
    assert _grey(_decode(path)) == [255, 119, 0, 194]


def test_hsv_from_memory():
    """HSV (no file format stores it): Pillow's hsv2rgb. H = 43/255 * 360 = 60.7 deg (just past yellow):
    R = V (1 - S f), f = 43 * 6 / 255 - 1 = 0.0118 -> 200 * 0.988 = 197.6 -> 198; G = V; B = 0."""
    im = _grid("HSV", [(0, 255, 255), (85, 255, 255), (0, 0, 128), (43, 255, 200)])
    assert np.asarray(to_rgb(im, "hsv")).reshape(4, 3).tolist() == [[255, 0, 0], [0, 255, 0], [128, 128, 128],
                                                                    [198, 200, 0]]


def test_plain_rgb_png(tmp_path):
    p = _save(tmp_path, _grid("RGB", [(1, 2, 3), (4, 5, 6), (7, 8, 9), (250, 251, 252)]), "png")
    assert _decode(p).reshape(4, 3).tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [250, 251, 252]]


# --------------------------------------------------------------------------------------------------- through the loader
def test_class_folder_of_16_bit_pngs_is_decoded_scaled_into_the_cache(tmp_path):
    d = tmp_path / "train" / "deep"
    d.mkdir(parents=True)
    _grid("I;16", [3000] * 4).save(d / "a.png")
    _grid("RGBA", [(0, 0, 0, 0)] * 4).save(d / "b.png")
    s = load_split(str(tmp_path / "train"), 2, cache_dir=str(tmp_path / "cache"))
    assert _grey(np.asarray(s.images[0])) == [12] * 4 and _grey(np.asarray(s.images[1])) == [W] * 4
    again = load_split(str(tmp_path / "train"), 2, cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(again.images, s.images)
