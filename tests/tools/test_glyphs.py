"""Tests for tools.glyphs (the glyph dataset builder): the committed embedded pack, distortions, rendering,
packing, checksums.

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

from tools.glyphs import baseline, cli, fonts, pack, pool, render

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
def committed():
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


def test_pack_structure(committed):
    expected_classes = {"train": 64, "val": 16, "test": 20}
    names_seen: set[str] = set()
    for split, n_classes in expected_classes.items():
        images, labels = committed[f"{split}_images"], committed[f"{split}_labels"]
        classes = committed[f"{split}_classes"]
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
            assert script in fonts.SCRIPTS and char
        assert not names_seen & set(classes.tolist())       # splits are disjoint by class
        names_seen |= set(classes.tolist())
        # not all alike: images differ within and across classes
        assert images.std(axis=0).mean() > 10
        assert len({images[i].tobytes() for i in range(0, len(images), 7)}) == len(range(0, len(images), 7))
        # white background, dark ink
        border = np.concatenate([images[:, 0, :], images[:, -1, :], images[:, :, 0], images[:, :, -1]], axis=1)
        assert np.median(border) == 255
        assert (images.min(axis=(1, 2)) == 0).all()          # every image has ink, stretched to black


def test_pack_meta_and_checksums(committed):
    meta = json.loads(str(committed["meta_json"]))
    assert meta["seed"] == 0 and meta["image_size"] == 32 and meta["kind"] == "embedded"
    assert meta["generator_version"] == pack.GENERATOR_VERSION
    assert {s: meta["splits"][s]["classes"] for s in fonts.SPLITS} == {"train": 64, "val": 16, "test": 20}
    assert meta["images_per_class"] == len(committed["train_labels"]) // 64
    assert meta["faces"] and all("file" in f and "family" in f for f in meta["faces"])
    assert meta["sha256"] == pack.arrays_sha256(committed)
    assert set(meta["sha256"]) == {f"{s}_{k}" for s in fonts.SPLITS for k in ("images", "labels", "classes")}
    assert pack.verify_pack(PACK)


def test_pack_is_a_few_shot_task(committed):
    """Raw pixels beat chance but are far from solving it (docs/DATA.md quotes the 600-episode numbers)."""
    one, _ = baseline.pixel_baseline(committed["test_images"], committed["test_labels"], shot=1, episodes=100)
    five, _ = baseline.pixel_baseline(committed["test_images"], committed["test_labels"], shot=5, episodes=100)
    assert 0.25 < one < 0.6 and 0.35 < five < 0.8 and five > one + 0.05


def test_pixel_baseline_is_scored_on_the_models_test_episodes(committed, monkeypatch):
    """The baseline's episodes are ``fixed_episodes(labels, n, way, shot, query, eval_seed)`` with main.py's
    ``--eval_seed`` default: the episodes ``meta_eval`` tests the models on."""
    from data_generator.meta_data_generator import fixed_episodes
    from config.options import parse_args
    assert parse_args([]).eval_seed == baseline.EVAL_SEED
    images, labels = committed["test_images"], committed["test_labels"]
    calls = []
    monkeypatch.setattr(baseline, "fixed_episodes", lambda *a: calls.append(a[1:]) or fixed_episodes(*a))
    mean, _ = baseline.pixel_baseline(images, labels, shot=5, episodes=3)
    assert calls == [(3, 5, 5, 15, baseline.EVAL_SEED)]
    # the same accuracy by hand, reading each image's class from the labels (not from the episode layout)
    x = (1.0 - images.reshape(len(images), -1) / 255.0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    accs = []
    for ep in fixed_episodes(labels, 3, 5, 5, 15, 1):
        support, query = ep[:25], ep[25:]
        classes = sorted(set(labels[support].tolist()))
        protos = np.stack([x[support[labels[support] == c]].mean(0) for c in classes])
        protos /= np.linalg.norm(protos, axis=1, keepdims=True)
        pred = np.array(classes)[(x[query] @ protos.T).argmax(1)]
        accs.append((pred == labels[query]).mean())
    assert abs(mean - np.mean(accs)) < 1e-6


def test_baseline_cli(capsys):
    assert cli.main(["baseline", PACK, "--episodes", "10"]) == 0
    out = capsys.readouterr().out
    assert "5way_1shot" in out and "5way_5shot" in out


# ------------------------------------------------------------------------------------------------
# Distortion (no fonts needed)
# ------------------------------------------------------------------------------------------------

def test_distortion_is_deterministic_and_changes_the_image():
    glyph = _synthetic_glyph()
    clean = render.place_glyph(glyph, 32)
    a = render.distort(glyph, 32, render.sample_rng(0, "Latin_a", 3))
    b = render.distort(glyph, 32, render.sample_rng(0, "Latin_a", 3))
    c = render.distort(glyph, 32, render.sample_rng(0, "Latin_a", 4))
    d = render.distort(glyph, 32, render.sample_rng(1, "Latin_a", 3))
    assert a.dtype == np.uint8 and a.shape == (32, 32)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, clean)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert a.min() < 128 and a[0, 0] == 255                   # dark ink on white


def test_distortion_parameters_in_range():
    for i in range(200):
        d = render.sample_distortion(render.sample_rng(7, "x", i))
        assert abs(d.rotation_deg) <= render.ROTATION_DEG and abs(d.shear) <= render.SHEAR
        lo, hi = render.SCALE_RANGE
        assert lo <= d.scale_x <= hi and lo <= d.scale_y <= hi
        assert abs(d.shift_x) <= render.SHIFT and abs(d.shift_y) <= render.SHIFT and d.stroke in (-1, 0, 1)


def test_stroke_filters():
    glyph = _synthetic_glyph()
    base = render.Distortion(0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0)
    ink = {s: (255 - render.place_glyph(glyph, 32, render.Distortion(**{**base.__dict__, "stroke": s}))).sum()
           for s in (-1, 0, 1)}
    assert ink[-1] < ink[0] < ink[1]
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (40, 37), dtype=np.uint8)
    pil_min = np.asarray(Image.fromarray(arr).filter(ImageFilter.MinFilter(3)))
    pil_max = np.asarray(Image.fromarray(arr).filter(ImageFilter.MaxFilter(5)))
    assert np.array_equal(render.rank_filter(arr, 3, np.minimum), pil_min)
    assert np.array_equal(render.rank_filter(arr, 5, np.maximum), pil_max)


def test_identity_distortion_matches_clean_layout():
    glyph = _synthetic_glyph()
    ident = render.Distortion(0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0)
    diff = np.abs(render.place_glyph(glyph, 32, ident).astype(int) - render.place_glyph(glyph, 32).astype(int))
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
    meta = {"kind": "benchmark", "generator_version": pack.GENERATOR_VERSION, "seed": seed, "image_size": 32,
            "images_per_class": 4, "splits": {}, "faces": [], "versions": {}}
    return pack.finalize_arrays(arrays, meta)


def test_write_npz_is_byte_reproducible(tmp_path):
    arrays = _tiny_arrays()
    pack.write_npz(str(tmp_path / "a.npz"), arrays)
    pack.write_npz(str(tmp_path / "b.npz"), arrays)
    assert pack.file_sha256(str(tmp_path / "a.npz")) == pack.file_sha256(str(tmp_path / "b.npz"))
    with np.load(tmp_path / "a.npz", allow_pickle=False) as data:
        for k, v in arrays.items():
            assert np.array_equal(data[k], v) and data[k].dtype == v.dtype
    assert pack.verify_pack(str(tmp_path / "a.npz"))


def test_verify_pack_detects_changes(tmp_path):
    arrays = _tiny_arrays()
    arrays["val_images"] = arrays["val_images"].copy()
    arrays["val_images"][0, 0, 0] ^= 1                       # meta_json still holds the old checksum
    pack.write_npz(str(tmp_path / "c.npz"), arrays)
    assert not pack.verify_pack(str(tmp_path / "c.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert not pack.verify_pack(str(tmp_path / "junk.npz"))


def test_ensure_benchmark_builds_verifies_and_rebuilds(tmp_path, monkeypatch):
    calls = []

    def fake_build(out, seed=0, per_class=20, size=32, font_dirs=(), min_faces=16, workers=None, log=print):
        calls.append(seed)
        return pack.save_with_manifest(out, _tiny_arrays(seed))

    monkeypatch.setattr(pack, "build_benchmark", fake_build)
    base = str(tmp_path / "bench" / "glyphs1k")
    quiet = lambda *a: None  # noqa: E731
    path = pack.ensure_benchmark(base, seed=0, per_class=4, log=quiet)
    assert path == base + ".npz" and calls == [0]
    assert os.path.isfile(base + ".manifest.json")
    manifest = json.load(open(base + ".manifest.json"))
    assert manifest["npz_sha256"] == pack.file_sha256(path) and manifest["seed"] == 0
    assert pack.ensure_benchmark(base + ".npz", seed=0, per_class=4, log=quiet) == path and calls == [0]
    # a changed array no longer matches the manifest -> rebuilt
    bad = _tiny_arrays(0)
    bad["train_images"] = bad["train_images"][::-1].copy()
    pack.write_npz(path, bad)
    pack.ensure_benchmark(base, seed=0, per_class=4, log=quiet)
    assert calls == [0, 0] and pack.verify_pack(path, json.load(open(base + ".manifest.json"))["arrays_sha256"])
    # another seed, a missing manifest -> rebuilt
    pack.ensure_benchmark(base, seed=1, per_class=4, log=quiet)
    os.remove(base + ".manifest.json")
    pack.ensure_benchmark(base, seed=1, per_class=4, log=quiet)
    assert calls == [0, 0, 1, 1]


def test_script_tables():
    assert fonts.SCRIPTS["Latin"] == "abcdefghijklmnopqrstuvwxyz"          # one Latin case
    assert "Cherokee" not in fonts.SCRIPTS
    assert len(fonts.SCRIPTS["Kanji1"]) == 80 and len(fonts.SCRIPTS["Kanji2"]) == 160
    assert not set(fonts.SCRIPTS["Katakana"]) & set("カロエタニハヘ")
    split_scripts = [s for split in fonts.SPLITS for s in fonts.BENCHMARK_SPLITS[split]]
    assert len(split_scripts) == len(set(split_scripts)) and set(split_scripts) == set(fonts.SCRIPTS)
    names = [fonts.class_name(s, c) for s, chars in fonts.SCRIPTS.items() for c in chars]
    assert len(names) == len(set(names))
    assert fonts.class_name("Latin", "a") == "Latin_a" and fonts.class_name("Hangul", "\uac00") == "Hangul_U+AC00"


# ------------------------------------------------------------------------------------------------
# Rendering with an installed font (skipped only when no TTF exists)
# ------------------------------------------------------------------------------------------------

@needs_ttf
def test_render_is_deterministic(tmp_path):
    root = tmp_path / "fonts"
    root.mkdir()
    shutil.copy(TTF, root / os.path.basename(TTF))
    faces = fonts.scan_faces([str(root)])
    assert len(faces) == 1 and faces[0].covers("abc")
    assert faces[0].key == os.path.basename(TTF)
    font = fonts.load_font(faces[0])
    for char in "abg":
        one, two = render.render_glyph(font, char), render.render_glyph(font, char)
        assert one is not None and one.size[0] == one.size[1] and one.tobytes() == two.tobytes()
    assert render.render_glyph(font, " ") is None                 # no ink
    cls = fonts.GlyphClass("Latin", "g")
    a = render.render_class(cls, faces, 5, 32, seed=3)
    b = render.render_class(cls, faces, 5, 32, seed=3)
    assert a.shape == (5, 32, 32) and np.array_equal(a, b)
    assert len({im.tobytes() for im in a}) == 5               # one face, five different distortions


@needs_ttf
def test_tiny_pack_end_to_end(tmp_path, monkeypatch):
    """Face screening, lookalike removal, packing and the npz are reproducible (and independent of workers)."""
    root = tmp_path / "fonts"
    root.mkdir()
    shutil.copy(TTF, root / "face.ttf")
    monkeypatch.setitem(fonts.SCRIPTS, "Latin", "abcdefgo")
    monkeypatch.setitem(fonts.SCRIPTS, "Cyrillic", "бгдео")                # е, о are Latin lookalikes
    faces = fonts.scan_faces([str(root)])
    if not faces[0].covers(fonts.SCRIPTS["Latin"] + fonts.SCRIPTS["Cyrillic"]):
        pytest.skip("the installed font lacks Cyrillic")
    classes, per_script, dropped = pool.build_pool(faces, ("Latin", "Cyrillic"))
    assert len(per_script["Latin"].faces) == 1
    assert dropped.get("Cyrillic_U+043E") == "Latin_o" and dropped.get("Cyrillic_U+0435") == "Latin_e"
    splits = {"train": classes[:4], "val": classes[4:6], "test": classes[6:]}
    one = pack._pack("embedded", 5, 32, 3, splits, per_script, dropped, workers=1)
    two = pack._pack("embedded", 5, 32, 3, splits, per_script, dropped, workers=2)
    assert one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)
    pack.write_npz(str(tmp_path / "x.npz"), one)
    pack.write_npz(str(tmp_path / "y.npz"), two)
    assert pack.file_sha256(str(tmp_path / "x.npz")) == pack.file_sha256(str(tmp_path / "y.npz"))
    meta = json.loads(str(one["meta_json"]))
    assert meta["faces"][0]["file"] == "face.ttf" and meta["splits"]["test"]["classes"] == len(classes) - 6
    assert pack.verify_pack(str(tmp_path / "x.npz"))
