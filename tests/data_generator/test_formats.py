"""The benchmark-file readers (data_generator/formats.py) on fakes written in exactly each on-disk format."""
from __future__ import annotations

import os

import numpy as np
import pytest

import data_generator.formats as formats
from data_generator.dataset_loader import detect_formats, load_split, split_spec
from data_generator.formats import CIFAR100_SPLITS
from data_generator.meta_data_generator import fixed_episodes
from tests import format_fakes as F
from tests.helpers import py2_pickle_dumps
from utils.errors import UserError
from utils.safe_pickle import load_pickle, stream_pickle_list

WRITERS = {
    "folders": F.write_folders,
    "csv": F.write_csv,
    "metaoptnet": F.write_metaoptnet,
    "learn2learn": F.write_learn2learn,
    "tiered-png": lambda root, data: F.write_tiered(root, data, "png"),
    "tiered-npz": lambda root, data: F.write_tiered(root, data, "npz"),
}


@pytest.fixture(scope="module")
def same_images(tmp_path_factory):
    """The same 18 classes x 20 images (84 x 84) in every format."""
    base = tmp_path_factory.mktemp("formats")
    data = F.make_images(classes=(8, 5, 5), per_class=20, size=84)
    return data, {name: w(str(base / name), data) for name, w in WRITERS.items()}


def _load(root, split, size, cache=None, dataset=None):
    return load_split(split_spec(root, split, dataset), size, cache)


def test_detected_kind(same_images):
    _, roots = same_images
    assert detect_formats(roots["folders"]) == []
    assert detect_formats(roots["csv"]) == [("csv", "miniImageNet")]
    assert detect_formats(roots["metaoptnet"]) == [("metaoptnet", "miniImageNet")]
    assert detect_formats(roots["learn2learn"]) == [("learn2learn", "miniImageNet")]
    assert detect_formats(roots["tiered-png"]) == [("tiered", "tieredImageNet")]
    assert str(split_spec(roots["metaoptnet"], "val")) == f"{roots['metaoptnet']}#metaoptnet:miniImageNet:val"
    assert str(split_spec(roots["folders"], "val")) == os.path.join(roots["folders"], "val")


@pytest.mark.parametrize("size", [84, 92])  # stored as is (paper), resized like a folder image (pytorch 92)
def test_every_format_gives_identical_arrays_and_episodes(same_images, size):
    data, roots = same_images
    for split in ("train", "val", "test"):
        imgs, names = data[split]
        ref = _load(roots["folders"], split, size)
        assert ref.images.shape == (len(imgs), size, size, 3) and ref.images.dtype == np.uint8
        assert ref.class_names == sorted(set(names.tolist()))
        if size == 84:
            assert np.array_equal(ref.images, imgs)  # class-major, file-name order = the written order
        ref_eps = fixed_episodes(ref.labels, 20, 5, 1, 15, seed=1)
        for name, root in roots.items():
            got = _load(root, split, size)
            assert got.class_names == ref.class_names, name
            assert got.labels.dtype == np.int64 and np.array_equal(got.labels, ref.labels), name
            assert np.array_equal(np.asarray(got.images), ref.images), f"{name} {split} {size}"
            assert np.array_equal(fixed_episodes(got.labels, 20, 5, 1, 15, seed=1), ref_eps), name


def test_cache_hit_reads_no_pickle_and_matches(same_images, tmp_path, monkeypatch):
    data, roots = same_images
    cache = str(tmp_path / "cache")
    first = {k: _load(roots[k], "val", 92, cache) for k in ("metaoptnet", "learn2learn", "tiered-png", "csv")}
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 4
    assert len([f for f in os.listdir(cache) if f.endswith(".json")]) == 4

    def no_pickle(*a, **k):
        raise AssertionError("a cache hit must not unpickle the source")
    monkeypatch.setattr(formats, "load_pickle", no_pickle)
    monkeypatch.setattr(formats, "stream_pickle_list", no_pickle)
    for k, ref in first.items():
        again = _load(roots[k], "val", 92, cache)
        assert isinstance(again.images, np.memmap), k
        assert np.array_equal(np.asarray(again.images), np.asarray(ref.images)), k
        assert again.class_names == ref.class_names and np.array_equal(again.labels, ref.labels), k


def test_cache_key_changes_with_the_file(tmp_path):
    data = F.make_images(classes=(5, 5, 5), per_class=4, size=84)
    root = F.write_metaoptnet(str(tmp_path / "mo"), data, "FC100")
    cache = str(tmp_path / "cache")
    a = _load(root, "test", 84, cache, "FC100")
    path = os.path.join(root, "FC100_test.pickle")
    d = load_pickle(path)
    d["data"] = 255 - d["data"]
    with open(path, "wb") as f:
        f.write(py2_pickle_dumps(d))
    b = _load(root, "test", 84, cache, "FC100")
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 2
    assert np.array_equal(np.asarray(b.images), 255 - np.asarray(a.images))
    assert a.class_names == ["010", "011", "012", "013", "014"]  # FC100 pickles have no names: the label numbers


def test_failure_leaves_nothing_in_the_cache(tmp_path):
    data = F.make_images(classes=(5, 5, 5), per_class=4, size=84)
    root = F.write_tiered(str(tmp_path / "t"), data, "png")
    path = os.path.join(root, "val_images_png.pkl")
    items = load_pickle(path)
    items[7] = np.frombuffer(b"\x89PNG\r\n\x1a\n broken", dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(py2_pickle_dumps(items))
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"val_images_png.pkl image 7: not a readable image"):
        _load(root, "val", 84, str(cache))
    assert os.listdir(cache) == []  # the half-filled array was removed, no json written


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    root = tmp_path / "evil"
    F.write_evil_metaoptnet(str(root), str(marker))
    with pytest.raises(UserError, match=r"FC100_train.pickle: refused to unpickle posix.system"):
        _load(str(root), "train", 84, str(tmp_path / "cache"), "FC100")
    assert not marker.exists()
    assert not (tmp_path / "cache").exists() or os.listdir(tmp_path / "cache") == []


# ------------------------------------------------------------------------------------------------ CIFAR-100
def test_published_cifar100_splits():
    fs, fc, f2c = CIFAR100_SPLITS["CIFAR-FS"], CIFAR100_SPLITS["FC100"], CIFAR100_SPLITS["fine_to_coarse"]
    assert [len(fs[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    assert [len(fc[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert set(fs["train"]) | set(fs["val"]) | set(fs["test"]) == set(f2c) and len(f2c) == 100
    assert set(fc["train"]) | set(fc["val"]) | set(fc["test"]) == set(f2c.values())
    assert [sum(c in fc[s] for c in f2c.values()) for s in ("train", "val", "test")] == [60, 20, 20]
    assert "whale" in fs["test"] and "people" in fc["test"] and "large_carnivores" in fc["val"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return F.write_cifar100(str(tmp_path_factory.mktemp("cifar")), per_class=(5, 2))


@pytest.mark.parametrize("bench,sizes", [("FC100", (60, 20, 20)), ("CIFAR-FS", (64, 16, 20))])
def test_cifar100_gives_the_published_benchmark(cifar, bench, sizes):
    root, by_name = cifar
    f2c = CIFAR100_SPLITS["fine_to_coarse"]
    seen = set()
    for split, n in zip(("train", "val", "test"), sizes):
        s = _load(root, split, 32, dataset=bench)
        assert s.num_classes == n and s.images.shape == (7 * n, 32, 32, 3)
        assert np.array_equal(s.class_counts(), np.full(n, 7))
        if bench == "CIFAR-FS":
            assert s.class_names == CIFAR100_SPLITS["CIFAR-FS"][split]
        else:
            assert {f2c[c] for c in s.class_names} == set(CIFAR100_SPLITS["FC100"][split])
        for c, name in enumerate(s.class_names):  # each class: its 5 train images, then its 2 test images
            assert np.array_equal(s.images[s.labels == c], by_name[name])
        assert not seen & set(s.class_names)
        seen |= set(s.class_names)
    assert len(seen) == 100
    up = _load(root, "test", 92, dataset=bench)  # 32 px upsampled to 92 (then the centre crop 80)
    assert up.images.shape == (7 * sizes[2], 92, 92, 3)


def test_cifar100_needs_the_benchmark(cifar):
    with pytest.raises(UserError, match=r"gives two benchmarks: pass --dataset FC100 or --dataset CIFAR-FS"):
        split_spec(cifar[0], "train", "miniImageNet")


# ------------------------------------------------------------------------------------------------ bad files
def _bad(tmp_path, kind="metaoptnet"):
    data = F.make_images(classes=(5, 5, 5), per_class=4, size=84)
    root = str(tmp_path / kind)
    {"metaoptnet": lambda: F.write_metaoptnet(root, data), "csv": lambda: F.write_csv(root, data),
     "learn2learn": lambda: F.write_learn2learn(root, data),
     "tiered": lambda: F.write_tiered(root, data, "npz")}[kind]()
    return root


def _rewrite(path, edit):
    d = load_pickle(path)
    edit(d)
    with open(path, "wb") as f:
        f.write(py2_pickle_dumps(d))


def test_bad_files(tmp_path):
    root = _bad(tmp_path)
    os.remove(os.path.join(root, "miniImageNet_category_split_val.pickle"))
    with pytest.raises(UserError, match=r"the val split file miniImageNet_category_split_val.pickle is missing"):
        _load(root, "val", 84)
    p = os.path.join(root, "miniImageNet_category_split_test.pickle")
    _rewrite(p, lambda d: d.pop("labels"))
    with pytest.raises(UserError, match=r"_test.pickle: no key 'labels' \(keys present: catname2label, data\)"):
        _load(root, "test", 84)
    p = os.path.join(root, "miniImageNet_category_split_train_phase_train.pickle")
    _rewrite(p, lambda d: d.__setitem__("labels", d["labels"][:-1]))
    with pytest.raises(UserError, match=r"'labels' has 19 entries but 'data' has 20 images"):
        _load(root, "train", 84)

    root = _bad(tmp_path, "csv")
    os.remove(os.path.join(root, "images", sorted(os.listdir(os.path.join(root, "images")))[0]))
    with pytest.raises(UserError, match=r"train.csv line 2: the image images/n00000000\d+.png is missing"):
        _load(root, "train", 84)
    with open(os.path.join(root, "val.csv"), "w") as fh:
        fh.write("file,class\n")
    with pytest.raises(UserError, match=r"val.csv: the first line must be the header 'filename,label'"):
        _load(root, "val", 84)

    root = _bad(tmp_path, "learn2learn")
    _rewrite(os.path.join(root, "mini-imagenet-cache-test.pkl"),
             lambda d: d["class_dict"][sorted(d["class_dict"])[0]].append(99))
    with pytest.raises(UserError, match=r"class_dict\['n00000010'\] names image 99, but image_data holds 20"):
        _load(root, "test", 84)

    root = _bad(tmp_path, "tiered")
    _rewrite(os.path.join(root, "val_labels.pkl"),
             lambda d: d.__setitem__("label_specific", d["label_specific"][:5]))
    with pytest.raises(UserError, match=r"val_labels.pkl: 'label_specific' has 5 entries but val_images.npz "
                                        r"'images' has 20 images"):
        _load(root, "val", 84)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(UserError, match=r"holds no dataset this program reads"):
        split_spec(str(empty), "train")


def test_several_datasets_in_one_folder(tmp_path):
    data = F.make_images(classes=(5, 5, 5), per_class=4, size=32)
    root = str(tmp_path / "both")
    F.write_metaoptnet(root, data, "FC100")
    F.write_metaoptnet(root, data, "CIFAR-FS")
    with pytest.raises(UserError, match=r"holds several datasets: metaoptnet \(FC100\), metaoptnet \(CIFAR-FS\)"):
        split_spec(root, "train", "miniImageNet")
    assert str(split_spec(root, "train", "CIFAR-FS")).endswith("#metaoptnet:CIFAR-FS:train")
    assert _load(root, "train", 32, dataset="CIFAR-FS").images.shape == (20, 32, 32, 3)


def test_stream_pickle_list_many_batches(tmp_path):
    """More items than one APPENDS batch (1,000): every item arrives once, in order, and is not kept."""
    items = [np.full(300 + i % 7, i % 251, dtype=np.uint8) for i in range(2500)]
    path = tmp_path / "list.pkl"
    path.write_bytes(py2_pickle_dumps(items))
    got = []
    n = stream_pickle_list(str(path), lambda i, x: got.append((i, len(x), int(x[0]))))
    assert n == 2500 and got == [(i, 300 + i % 7, i % 251) for i in range(2500)]
    path.write_bytes(py2_pickle_dumps({"not": "a list"}))
    with pytest.raises(UserError, match=r"expected a pickled list, found dict"):
        stream_pickle_list(str(path), lambda i, x: None)


# ------------------------------------------------------------------------------------------------ main.py end to end
E2E = ["--backbone", "conv4", "--image_size", "16", "--preprocess", "paper", "--seed", "3", "--quiet",
       "--device", "cpu", "--num_val_episodes", "10", "--num_test_episodes", "20", "--update_step", "3",
       "--base_lr", "0.1", "--pre_val_update_step", "5"]
PRE = ["--phase", "pre_train", "--pre_max_epoch", "1", "--pre_batch_size", "40", "--pre_head", "linear",
       "--pre_optimizer", "adam", "--pre_lr", "0.001"]
META = ["--phase", "meta_train", "--max_epoch", "1", "--num_batch", "2"]


@pytest.mark.parametrize("fmt", ["csv", "metaoptnet", "learn2learn", "tiered-png", "tiered-npz", "cifar100"])
def test_main_runs_on_each_format(fmt, same_images, cifar, tmp_path, capsys):
    import json

    import torch

    import main
    if fmt == "cifar100":
        root, extra, n_train, dataset = cifar[0], ["--dataset", "FC100"], 60, "FC100"
    else:
        root, extra, n_train = same_images[1][fmt], [], 8
        dataset = "miniImageNet"  # the default
    logs = str(tmp_path / "logs")
    base = E2E + extra + ["--dataset_dir", root, "--log_root", logs]
    if fmt == "cifar100":
        base += ["--val_query", "6", "--train_query", "6"]  # 7 images per class in the fake
    assert main.cli(PRE + base) == 0
    assert main.cli(META + base) == 0
    assert main.cli(["--phase", "meta_eval"] + base) == 0
    out = capsys.readouterr().out
    assert f"dataset {dataset} preset: " in out
    ck = torch.load(os.path.join(logs, "pre", f"{dataset}_conv4", "max_acc.pth"), weights_only=True)
    assert ck["num_classes"] == n_train  # read from the data
    res = json.load(open(os.path.join(logs, "meta", f"{dataset}_conv4_5way1shot_exp1", "results.json")))
    assert res["episodes"] == 20 and 0.0 <= res["mean"] <= 100.0


def test_tiered_labels_as_metaoptnet_reads_them(same_images, tmp_path):
    """MetaOptNet's data/tiered_imagenet.py reads the labels pickle's 'labels' (a list), not 'label_specific'."""
    import shutil
    data, roots = same_images
    root = str(tmp_path / "tiered")
    shutil.copytree(roots["tiered-npz"], root)
    path = os.path.join(root, "test_labels.pkl")
    d = load_pickle(path)
    with open(path, "wb") as f:
        f.write(py2_pickle_dumps({"labels": [int(v) for v in d["label_specific"]]}))
    ref = _load(roots["folders"], "test", 84)
    got = _load(root, "test", 84)
    assert np.array_equal(got.images, ref.images) and np.array_equal(got.labels, ref.labels)
    assert got.class_names == ["000", "001", "002", "003", "004"]  # no names in that file: the label numbers


def test_tiered_png_list_of_python2_byte_strings(same_images, tmp_path):
    """A PNG list pickled as Python 2 ``str`` items (not arrays) reads the same: latin1 gives back the bytes."""
    data, roots = same_images
    root = str(tmp_path / "tiered")
    import shutil
    shutil.copytree(roots["tiered-png"], root)
    path = os.path.join(root, "val_images_png.pkl")
    items = [bytes(x.tobytes()) for x in load_pickle(path)]
    with open(path, "wb") as f:
        f.write(py2_pickle_dumps(items))  # each item a BINSTRING, as Python 2 wrote str
    assert isinstance(load_pickle(path)[0], str)
    ref = _load(roots["folders"], "val", 92)
    got = _load(root, "val", 92)
    assert np.array_equal(np.asarray(got.images), ref.images) and np.array_equal(got.labels, ref.labels)


def test_role_folder_flags_accept_benchmark_files(same_images, tmp_path):
    """--meta_test_dir (and the other role flags) may point at benchmark files too: the role's split is read."""
    from trainer.base import DataBundle
    from config.settings import DataSettings
    _, roots = same_images
    d = DataSettings(roots["folders"], 16, "paper", False, None, meta_test_dir=roots["learn2learn"],
                     meta_val_dir=os.path.join(roots["folders"], "val"), dataset="miniImageNet")
    bundle = DataBundle(d)
    assert str(bundle.spec("test")) == f"{roots['learn2learn']}#learn2learn:miniImageNet:test"
    assert str(bundle.spec("val")) == os.path.join(roots["folders"], "val")
    assert str(bundle.spec("pre_train")) == os.path.join(roots["folders"], "train")
    assert np.array_equal(np.asarray(bundle.load("test").images), _load(roots["folders"], "test", 16).images)
