"""Tests for data_generator.glyphs: the committed embedded pack, distortions, rendering, packing, checksums.

They need no extra fonts: the pack tests read data/glyphs100.npz; the distortion tests draw a synthetic
glyph; the rendering tests use whatever DejaVu (or other) TTF is installed and skip only when there is none.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from data_generator import glyphs as g

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK = os.path.join(REPO, "data", "glyphs100.npz")
DEJAVU = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf",
          "/usr/share/fonts/dejavu/DejaVuSans.ttf")


def _find_ttf() -> str | None:
    """A TrueType font that renders lower-case Latin: DejaVu Sans at a known path, else any from fc-list."""
    for path in DEJAVU:
        if os.path.isfile(path):
            return path
    try:
        out = subprocess.run(["fc-list", "--format", "%{file}\\n"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    files = sorted(f for f in out.splitlines() if f.lower().endswith(".ttf") and os.path.isfile(f))
    dejavu = [f for f in files if os.path.basename(f).startswith("DejaVuSans")]
    return (dejavu or files or [None])[0]


TTF = _find_ttf()
needs_ttf = pytest.mark.skipif(TTF is None, reason="no TrueType font installed")


@pytest.fixture(scope="module")
def pack():
    with np.load(PACK, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _synthetic_glyph() -> Image.Image:
    """A square ink glyph (255 on 0) without any font: an 'F'-like shape with a dot."""
    im = Image.new("L", (60, 60), 0)
    d = ImageDraw.Draw(im)
    d.rectangle([8, 4, 18, 56], fill=255)
    d.rectangle([8, 4, 50, 13], fill=255)
    d.rectangle([8, 26, 40, 34], fill=255)
    d.ellipse([40, 44, 52, 56], fill=255)
    return im


# ------------------------------------------------------------------------------------------------
# The committed pack
# ------------------------------------------------------------------------------------------------

def test_pack_exists_and_is_small():
    assert os.path.isfile(PACK)
    assert os.path.getsize(PACK) <= 5 * 1024 * 1024


def test_pack_structure(pack):
    expected_classes = {"train": 64, "val": 16, "test": 20}
    names_seen: set[str] = set()
    for split, n_classes in expected_classes.items():
        images, labels, classes = pack[f"{split}_images"], pack[f"{split}_labels"], pack[f"{split}_classes"]
        assert images.dtype == np.uint8 and images.ndim == 3 and images.shape[1:] == (32, 32)
        assert labels.dtype.kind == "i" and labels.shape == (len(images),)
        assert classes.dtype.kind == "U" and classes.shape == (n_classes,)
        assert len(set(classes.tolist())) == n_classes
        assert list(classes) == sorted(classes)
        counts = np.bincount(labels, minlength=n_classes)
        assert len(counts) == n_classes and counts.min() == counts.max() >= 20
        assert set(np.unique(labels)) == set(range(n_classes))
        for name in classes:                               # readable "<Script>_<char or U+XXXX>"
            script, _, char = name.partition("_")
            assert script in g.SCRIPTS and char
        assert not names_seen & set(classes.tolist())       # splits are disjoint by class
        names_seen |= set(classes.tolist())
        # not all alike: images differ within and across classes
        assert images.std(axis=0).mean() > 10
        assert len({images[i].tobytes() for i in range(0, len(images), 7)}) == len(range(0, len(images), 7))
        # white background, dark ink
        border = np.concatenate([images[:, 0, :], images[:, -1, :], images[:, :, 0], images[:, :, -1]], axis=1)
        assert np.median(border) == 255
        assert (images.min(axis=(1, 2)) == 0).all()          # every image has ink, stretched to black


def test_pack_meta_and_checksums(pack):
    meta = json.loads(str(pack["meta_json"]))
    assert meta["seed"] == 0 and meta["image_size"] == 32 and meta["kind"] == "embedded"
    assert meta["generator_version"] == g.GENERATOR_VERSION
    assert {s: meta["splits"][s]["classes"] for s in g.SPLITS} == {"train": 64, "val": 16, "test": 20}
    assert meta["images_per_class"] == len(pack["train_labels"]) // 64
    assert meta["faces"] and all("file" in f and "family" in f for f in meta["faces"])
    assert meta["sha256"] == g.arrays_sha256(pack)
    assert set(meta["sha256"]) == {f"{s}_{k}" for s in g.SPLITS for k in ("images", "labels", "classes")}
    assert g.verify_pack(PACK)


def test_pack_is_a_few_shot_task(pack):
    """Raw pixels beat chance but are far from solving it (docs/DATA.md quotes the 600-episode numbers)."""
    one, _ = g.pixel_baseline(pack["test_images"], pack["test_labels"], shot=1, episodes=100)
    five, _ = g.pixel_baseline(pack["test_images"], pack["test_labels"], shot=5, episodes=100)
    assert 0.25 < one < 0.6 and 0.35 < five < 0.8 and five > one + 0.05


def test_baseline_cli(capsys):
    assert g.main(["baseline", PACK, "--episodes", "10"]) == 0
    out = capsys.readouterr().out
    assert "5way_1shot" in out and "5way_5shot" in out


# ------------------------------------------------------------------------------------------------
# Distortion (no fonts needed)
# ------------------------------------------------------------------------------------------------

def test_distortion_is_deterministic_and_changes_the_image():
    glyph = _synthetic_glyph()
    clean = g.place_glyph(glyph, 32)
    a = g.distort(glyph, 32, g.sample_rng(0, "Latin_a", 3))
    b = g.distort(glyph, 32, g.sample_rng(0, "Latin_a", 3))
    c = g.distort(glyph, 32, g.sample_rng(0, "Latin_a", 4))
    d = g.distort(glyph, 32, g.sample_rng(1, "Latin_a", 3))
    assert a.dtype == np.uint8 and a.shape == (32, 32)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, clean)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert a.min() < 128 and a[0, 0] == 255                   # dark ink on white


def test_distortion_parameters_in_range():
    for i in range(200):
        d = g.sample_distortion(g.sample_rng(7, "x", i))
        assert abs(d.rotation_deg) <= g.ROTATION_DEG and abs(d.shear) <= g.SHEAR
        assert g.SCALE_RANGE[0] <= d.scale_x <= g.SCALE_RANGE[1] and g.SCALE_RANGE[0] <= d.scale_y <= g.SCALE_RANGE[1]
        assert abs(d.shift_x) <= g.SHIFT and abs(d.shift_y) <= g.SHIFT and d.stroke in (-1, 0, 1)


def test_stroke_filters():
    glyph = _synthetic_glyph()
    base = g.Distortion(0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0)
    ink = {s: (255 - g.place_glyph(glyph, 32, g.Distortion(**{**base.__dict__, "stroke": s}))).sum()
           for s in (-1, 0, 1)}
    assert ink[-1] < ink[0] < ink[1]
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 37), dtype=np.uint8)
    pil_min = np.asarray(Image.fromarray(arr).filter(ImageFilter.MinFilter(3)))
    pil_max = np.asarray(Image.fromarray(arr).filter(ImageFilter.MaxFilter(5)))
    assert np.array_equal(g.rank_filter(arr, 3, np.minimum), pil_min)
    assert np.array_equal(g.rank_filter(arr, 5, np.maximum), pil_max)


def test_identity_distortion_matches_clean_layout():
    glyph = _synthetic_glyph()
    ident = g.Distortion(0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0)
    diff = np.abs(g.place_glyph(glyph, 32, ident).astype(int) - g.place_glyph(glyph, 32).astype(int))
    assert diff.mean() < 2


# ------------------------------------------------------------------------------------------------
# Writing, checksums, ensure_benchmark (no fonts needed)
# ------------------------------------------------------------------------------------------------

def _tiny_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, n in (("train", 3), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n * 4, 32, 32), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.repeat(np.arange(n, dtype=np.int64), 4)
        arrays[f"{split}_classes"] = np.array([f"Latin_{c}" for c in "abc"[:n]])
    meta = {"kind": "benchmark", "generator_version": g.GENERATOR_VERSION, "seed": seed, "image_size": 32,
            "images_per_class": 4, "splits": {}, "faces": [], "versions": {}}
    return g.finalize_arrays(arrays, meta)


def test_write_npz_is_byte_reproducible(tmp_path):
    arrays = _tiny_arrays()
    g.write_npz(str(tmp_path / "a.npz"), arrays)
    g.write_npz(str(tmp_path / "b.npz"), arrays)
    assert g.file_sha256(str(tmp_path / "a.npz")) == g.file_sha256(str(tmp_path / "b.npz"))
    with np.load(tmp_path / "a.npz", allow_pickle=False) as data:
        for k, v in arrays.items():
            assert np.array_equal(data[k], v) and data[k].dtype == v.dtype
    assert g.verify_pack(str(tmp_path / "a.npz"))


def test_verify_pack_detects_changes(tmp_path):
    arrays = _tiny_arrays()
    arrays["val_images"] = arrays["val_images"].copy()
    arrays["val_images"][0, 0, 0] ^= 1                       # meta_json still holds the old checksum
    g.write_npz(str(tmp_path / "c.npz"), arrays)
    assert not g.verify_pack(str(tmp_path / "c.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert not g.verify_pack(str(tmp_path / "junk.npz"))


def test_ensure_benchmark_builds_verifies_and_rebuilds(tmp_path, monkeypatch):
    calls = []

    def fake_build(out, seed=0, per_class=20, size=32, font_dirs=(), min_faces=16, workers=None, log=print):
        calls.append(seed)
        return g.save_with_manifest(out, _tiny_arrays(seed))

    monkeypatch.setattr(g, "build_benchmark", fake_build)
    base = str(tmp_path / "bench" / "glyphs1k")
    quiet = lambda *a: None  # noqa: E731
    path = g.ensure_benchmark(base, seed=0, per_class=4, log=quiet)
    assert path == base + ".npz" and calls == [0]
    assert os.path.isfile(base + ".manifest.json")
    manifest = json.load(open(base + ".manifest.json"))
    assert manifest["npz_sha256"] == g.file_sha256(path) and manifest["seed"] == 0
    assert g.ensure_benchmark(base + ".npz", seed=0, per_class=4, log=quiet) == path and calls == [0]
    # a changed array no longer matches the manifest -> rebuilt
    bad = _tiny_arrays(0)
    bad["train_images"] = bad["train_images"][::-1].copy()
    g.write_npz(path, bad)
    g.ensure_benchmark(base, seed=0, per_class=4, log=quiet)
    assert calls == [0, 0] and g.verify_pack(path, json.load(open(base + ".manifest.json"))["arrays_sha256"])
    # another seed, a missing manifest -> rebuilt
    g.ensure_benchmark(base, seed=1, per_class=4, log=quiet)
    os.remove(base + ".manifest.json")
    g.ensure_benchmark(base, seed=1, per_class=4, log=quiet)
    assert calls == [0, 0, 1, 1]


def test_script_tables():
    assert g.SCRIPTS["Latin"] == "abcdefghijklmnopqrstuvwxyz"          # one Latin case
    assert "Cherokee" not in g.SCRIPTS
    assert len(g.SCRIPTS["Kanji1"]) == 80 and len(g.SCRIPTS["Kanji2"]) == 160
    assert not set(g.SCRIPTS["Katakana"]) & set("カロエタニハヘ")
    split_scripts = [s for split in g.SPLITS for s in g.BENCHMARK_SPLITS[split]]
    assert len(split_scripts) == len(set(split_scripts)) and set(split_scripts) == set(g.SCRIPTS)
    names = [g.class_name(s, c) for s, chars in g.SCRIPTS.items() for c in chars]
    assert len(names) == len(set(names))
    assert g.class_name("Latin", "a") == "Latin_a" and g.class_name("Hangul", "\uac00") == "Hangul_U+AC00"


# ------------------------------------------------------------------------------------------------
# Rendering with an installed font (skipped only when no TTF exists)
# ------------------------------------------------------------------------------------------------

@needs_ttf
def test_render_is_deterministic(tmp_path):
    root = tmp_path / "fonts"
    root.mkdir()
    shutil.copy(TTF, root / os.path.basename(TTF))
    faces = g.scan_faces([str(root)])
    assert len(faces) == 1 and faces[0].covers("abc")
    assert faces[0].key == os.path.basename(TTF)
    font = g.load_font(faces[0])
    for char in "abg":
        one, two = g.render_glyph(font, char), g.render_glyph(font, char)
        assert one is not None and one.size[0] == one.size[1] and one.tobytes() == two.tobytes()
    assert g.render_glyph(font, " ") is None                 # no ink
    cls = g.GlyphClass("Latin", "g")
    a = g.render_class(cls, faces, 5, 32, seed=3)
    b = g.render_class(cls, faces, 5, 32, seed=3)
    assert a.shape == (5, 32, 32) and np.array_equal(a, b)
    assert len({im.tobytes() for im in a}) == 5               # one face, five different distortions


@needs_ttf
def test_tiny_pack_end_to_end(tmp_path, monkeypatch):
    """Face screening, lookalike removal, packing and the npz are reproducible (and independent of workers)."""
    root = tmp_path / "fonts"
    root.mkdir()
    shutil.copy(TTF, root / "face.ttf")
    monkeypatch.setitem(g.SCRIPTS, "Latin", "abcdefgo")
    monkeypatch.setitem(g.SCRIPTS, "Cyrillic", "бгдео")                # е, о are Latin lookalikes
    faces = g.scan_faces([str(root)])
    if not faces[0].covers(g.SCRIPTS["Latin"] + g.SCRIPTS["Cyrillic"]):
        pytest.skip("the installed font lacks Cyrillic")
    pool, per_script, dropped = g.build_pool(faces, ("Latin", "Cyrillic"))
    assert len(per_script["Latin"].faces) == 1
    assert dropped.get("Cyrillic_U+043E") == "Latin_o" and dropped.get("Cyrillic_U+0435") == "Latin_e"
    splits = {"train": pool[:4], "val": pool[4:6], "test": pool[6:]}
    one = g._pack("embedded", 5, 32, 3, splits, per_script, dropped, workers=1)
    two = g._pack("embedded", 5, 32, 3, splits, per_script, dropped, workers=2)
    assert one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)
    g.write_npz(str(tmp_path / "x.npz"), one)
    g.write_npz(str(tmp_path / "y.npz"), two)
    assert g.file_sha256(str(tmp_path / "x.npz")) == g.file_sha256(str(tmp_path / "y.npz"))
    meta = json.loads(str(one["meta_json"]))
    assert meta["faces"][0]["file"] == "face.ttf" and meta["splits"]["test"]["classes"] == len(pool) - 6
    assert g.verify_pack(str(tmp_path / "x.npz"))
