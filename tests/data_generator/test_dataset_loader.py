"""Tests for data_generator.dataset_loader: folder and npz splits, the decoded-image cache, episode-fit checks."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from data_generator import decoding
from data_generator.dataset_loader import ImageSet, check_episode_fit, load_split, split_spec
from utils.errors import UserError

SIZE = 8


def _img(seed: int, w: int = 12, h: int = 10) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_split(root, classes=("b_cls", "a_cls", "c_cls"), per_class=3, ext="png"):
    """<root>/<class>/<i>.<ext> with small random images of varying sizes; returns root as str."""
    for ci, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            im = _img(100 * ci + i, w=10 + i + ci, h=9 + 2 * i)
            im.save(d / f"img_{per_class - i:02d}.{ext}")
    return str(root)


def _reference(path: str, size: int) -> np.ndarray:
    """The documented pipeline, written out: RGB -> shorter side to size (bilinear) -> center crop."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    im = im.resize((nw, nh), Image.BILINEAR)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    return np.asarray(im.crop((left, top, left + size, top + size)))


# --------------------------------------------------------------------------------------------------------------------
# folders
# --------------------------------------------------------------------------------------------------------------------
def test_folder_split_layout_labels_and_pixels(tmp_path):
    root = make_split(tmp_path / "train")
    (tmp_path / "train" / ".hidden_dir").mkdir()
    (tmp_path / "train" / "a_cls" / ".DS_Store").write_bytes(b"junk")
    s = load_split(root, SIZE)
    assert isinstance(s, ImageSet)
    assert s.images.dtype == np.uint8 and s.images.shape == (9, SIZE, SIZE, 3)
    assert s.labels.dtype == np.int64 and s.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert s.class_names == ["a_cls", "b_cls", "c_cls"]
    assert s.num_classes == 3 and len(s) == 9 and s.source == root
    # images sorted by file name inside a class
    assert s.files[:3] == ["a_cls/img_01.png", "a_cls/img_02.png", "a_cls/img_03.png"]
    for k in (0, 4, 8):
        np.testing.assert_array_equal(s.images[k], _reference(os.path.join(root, s.files[k]), SIZE))
    idx = s.class_indices()
    assert [i.tolist() for i in idx] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert s.class_counts().tolist() == [3, 3, 3]


def test_grey_and_jpeg_images_become_rgb(tmp_path):
    d = tmp_path / "val" / "x"
    d.mkdir(parents=True)
    Image.fromarray(np.full((SIZE, SIZE), 77, np.uint8), mode="L").save(d / "g.png")
    _img(1, SIZE, SIZE).save(d / "c.jpg", quality=95)
    s = load_split(str(tmp_path / "val"), SIZE)
    assert s.images.shape == (2, SIZE, SIZE, 3)
    assert (s.images[1] == 77).all()  # g.png sorts after c.jpg


def test_missing_folder_mentions_layout(tmp_path):
    with pytest.raises(UserError, match=r"not found.*<root>/\{train,val,test\}/<class>/<image>") as e:
        load_split(str(tmp_path / "nope"), SIZE)
    assert "\n" not in str(e.value) and str(tmp_path / "nope") in str(e.value)


def test_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    _img(0).save(tmp_path / "train" / "flat.png")
    with pytest.raises(UserError, match="no class folders"):
        load_split(str(tmp_path / "train"), SIZE)


def test_empty_class_folder(tmp_path):
    root = make_split(tmp_path / "train")
    (tmp_path / "train" / "d_empty").mkdir()
    with pytest.raises(UserError, match="d_empty is empty"):
        load_split(root, SIZE)


def test_subfolder_in_class_folder(tmp_path):
    root = make_split(tmp_path / "train")
    (tmp_path / "train" / "a_cls" / "nested").mkdir()
    with pytest.raises(UserError, match="subfolder nested"):
        load_split(root, SIZE)


@pytest.mark.parametrize("payload", [b"this is not an image", b"\x89PNG\r\n\x1a\nbroken"])
def test_unreadable_file_with_image_extension_is_named(tmp_path, payload):
    root = make_split(tmp_path / "train")
    bad = tmp_path / "train" / "b_cls" / "notes.png"
    bad.write_bytes(payload)
    with pytest.raises(UserError, match="not a readable image") as e:
        load_split(root, SIZE)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_non_image_and_hidden_files_are_skipped_with_one_line(tmp_path, capsys):
    """As torchvision's ImageFolder: files whose extension is not an image's, and hidden files, are skipped."""
    root = make_split(tmp_path / "train")
    clean = load_split(root, SIZE)
    capsys.readouterr()
    (tmp_path / "train" / "b_cls" / "readme.txt").write_text("about these images\n")
    (tmp_path / "train" / "a_cls" / ".DS_Store").write_bytes(b"\x00\x01")
    (tmp_path / "train" / "a_cls" / "Thumbs.db").write_bytes(b"\x00\x01")
    (tmp_path / "train" / "LICENSE").write_text("beside the class folders\n")
    (tmp_path / "train" / "c_cls" / "UPPER.PNG").write_bytes((tmp_path / "train" / "c_cls" / "img_01.png").read_bytes())
    got = load_split(root, SIZE)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("skipped")]
    assert len(lines) == 1 and lines[0].startswith(f"skipped 4 file(s) in {root} ") and "first:" in lines[0]
    assert got.class_names == clean.class_names
    assert len(got) == len(clean) + 1 and "c_cls/UPPER.PNG" in got.files  # extensions match case-insensitively
    assert not any(f.endswith((".txt", ".db", ".DS_Store")) for f in got.files)
    np.testing.assert_array_equal(got.images[[got.files.index(f) for f in clean.files]], clean.images)


def test_class_folder_without_images_is_named(tmp_path):
    root = make_split(tmp_path / "train")
    d = tmp_path / "train" / "d_docs"
    d.mkdir()
    (d / "readme.txt").write_text("no images here\n")
    with pytest.raises(UserError, match="d_docs has no images") as e:
        load_split(root, SIZE)
    assert "\n" not in str(e.value)


def test_truncated_jpeg_is_named(tmp_path):
    root = make_split(tmp_path / "train")
    good = tmp_path / "good.jpg"
    _img(5, 64, 64).save(good, quality=90)
    bad = tmp_path / "train" / "c_cls" / "trunc.jpg"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserError, match="trunc.jpg: not a readable image"):
        load_split(root, SIZE)


def test_pool_decoding_matches_serial(tmp_path):
    root = make_split(tmp_path / "train", per_class=4)
    a = load_split(root, SIZE, num_workers=0)
    b = load_split(root, SIZE, num_workers=2)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_pool_decoding_reports_bad_file(tmp_path):
    root = make_split(tmp_path / "train", per_class=4)
    (tmp_path / "train" / "a_cls" / "zz.png").write_bytes(b"nope")
    with pytest.raises(UserError, match="zz.png: not a readable image"):
        load_split(root, SIZE, num_workers=2)


# --------------------------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------------------------
def _count_decodes(monkeypatch):
    calls = []
    real = decoding.decode_image

    def counting(path, size):
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(decoding, "decode_image", counting)
    return calls


def test_cache_roundtrip_without_decoding(tmp_path, monkeypatch):
    root = make_split(tmp_path / "data" / "train")
    cache = tmp_path / "cache"
    calls = _count_decodes(monkeypatch)
    first = load_split(root, SIZE, cache_dir=str(cache))
    assert len(calls) == 9
    npys = list(cache.glob("*.npy"))
    metas = list(cache.glob("*.json"))
    assert len(npys) == 1 and len(metas) == 1 and not list(cache.glob(".*"))  # no temporary files left
    assert json.loads(metas[0].read_text())["class_names"] == ["a_cls", "b_cls", "c_cls"]

    def boom(path, size):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(decoding, "decode_image", boom)
    second = load_split(root, SIZE, cache_dir=str(cache))
    assert isinstance(second.images, np.memmap)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert second.class_names == first.class_names and second.files == first.files


def test_cache_invalidation(tmp_path, monkeypatch):
    root = make_split(tmp_path / "train")
    cache = str(tmp_path / "cache")
    calls = _count_decodes(monkeypatch)
    load_split(root, SIZE, cache_dir=cache)
    load_split(root, SIZE, cache_dir=cache)
    assert len(calls) == 9
    # touching one file (new mtime) gives a new key
    f = tmp_path / "train" / "a_cls" / "img_01.png"
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_split(root, SIZE, cache_dir=cache)
    assert len(calls) == 18
    # another stored size is another entry
    load_split(root, SIZE + 2, cache_dir=cache)
    assert len(calls) == 27
    # a new image changes the content
    _img(9).save(tmp_path / "train" / "a_cls" / "img_99.png")
    s = load_split(root, SIZE, cache_dir=cache)
    assert len(calls) == 37 and len(s) == 10
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 4


def test_cache_ignores_broken_entry(tmp_path, monkeypatch):
    root = make_split(tmp_path / "train")
    cache = tmp_path / "cache"
    ref = np.array(load_split(root, SIZE, cache_dir=str(cache)).images)  # copy: the memmap's file gets clobbered
    next(cache.glob("*.npy")).write_bytes(b"garbage")
    calls = _count_decodes(monkeypatch)
    again = load_split(root, SIZE, cache_dir=str(cache))
    assert len(calls) == 9
    np.testing.assert_array_equal(ref, again.images)


# --------------------------------------------------------------------------------------------------------------------
# npz packs
# --------------------------------------------------------------------------------------------------------------------
def _pack(path, split="train", grey=False, side=SIZE, n_per=3, classes=("u", "v")):
    rng = np.random.default_rng(0)
    n = n_per * len(classes)
    shape = (n, side, side) if grey else (n, side, side, 3)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = np.repeat(np.arange(len(classes)), n_per)
    np.savez(path, **{f"{split}_images": images, f"{split}_labels": labels,
                      f"{split}_classes": np.array(classes)})
    return images, labels


def test_npz_rgb(tmp_path):
    p = tmp_path / "pack.npz"
    images, labels = _pack(p)
    s = load_split(f"{p}#train", SIZE)
    np.testing.assert_array_equal(s.images, images)
    assert s.labels.dtype == np.int64 and s.labels.tolist() == labels.tolist()
    assert s.class_names == ["u", "v"] and s.source == f"{p}#train"


def test_npz_grey_resized(tmp_path):
    p = tmp_path / "pack.npz"
    images, _ = _pack(p, split="val", grey=True, side=12)
    s = load_split(f"{p}#val", SIZE)
    assert s.images.shape == (6, SIZE, SIZE, 3) and s.images.dtype == np.uint8
    np.testing.assert_array_equal(s.images[..., 0], s.images[..., 2])
    ref = np.asarray(Image.fromarray(images[1]).resize((SIZE, SIZE), Image.BILINEAR))
    np.testing.assert_array_equal(s.images[1, ..., 1], ref)


def test_npz_errors(tmp_path):
    p = tmp_path / "pack.npz"
    _pack(p)
    with pytest.raises(UserError, match="not found"):
        load_split(f"{tmp_path / 'missing.npz'}#train", SIZE)
    with pytest.raises(UserError, match="no split 'test'.*splits present: train"):
        load_split(f"{p}#test", SIZE)
    with pytest.raises(UserError, match="needs a split"):
        load_split(str(p), SIZE)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable .npz"):
        load_split(f"{tmp_path / 'bad.npz'}#train", SIZE)


def test_split_spec():
    assert str(split_spec("data/mini", "train")) == os.path.join("data/mini", "train")
    assert str(split_spec("glyphs.npz", "val")) == "glyphs.npz#val"


# --------------------------------------------------------------------------------------------------------------------
# check_episode_fit
# --------------------------------------------------------------------------------------------------------------------
def _set(counts, names=None):
    labels = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    names = names or [f"n{i:04d}" for i in range(len(counts))]
    return ImageSet(np.zeros((len(labels), 2, 2, 3), np.uint8), labels, names, "data/x/train")


def test_check_episode_fit():
    check_episode_fit(_set([16, 20, 16]), 3, 16, "meta-train")
    with pytest.raises(UserError) as e:
        check_episode_fit(_set([16, 7, 20]), 3, 16, "meta-train")
    assert str(e.value) == ("meta-train split data/x/train: class 'n0001' has 7 images, "
                            "but shot + query = 16 are needed")
    with pytest.raises(UserError, match=r"way = 10 is larger than the 3 classes in data/x/train"):
        check_episode_fit(_set([16, 16, 16]), 10, 1, "meta-val")
