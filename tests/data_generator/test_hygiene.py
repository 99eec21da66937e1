"""Split hygiene (data_generator/hygiene.py, trainer/base.py DataBundle): the rules on small hand-made summaries,
the warnings and notes through the real command line, and that the data this project ships and the tests' fakes
have no overlap (so the check is not weakened to let them pass). The errors are rows E79-E82 of docs/ERRORS.md."""
from __future__ import annotations

import os
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

import main
from config.options import resume_may_differ
from data_generator.dataset_loader import load_split, split_spec
from data_generator.hygiene import SplitSummary, duplicate_classes, split_overlap
from tests import format_fakes as F
from tests.helpers import make_folders, make_npz
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def _summary(split, classes, digests_per_class, files=None, numbered=False):
    labels = np.repeat(np.arange(len(classes)), [len(d) for d in digests_per_class]).astype(np.int64)
    digests = np.array([x for d in digests_per_class for x in d], dtype=np.uint64)
    return SplitSummary(split, f"data/{split}", list(classes), labels, digests, files, numbered)


# ------------------------------------------------------------------------------------------------ the rules
def test_no_overlap_no_line():
    a = _summary("train", ["a", "b"], [[1, 2], [3, 4]])
    b = _summary("val", ["c"], [[5, 6]])
    assert duplicate_classes(a) is None and split_overlap(a, b) is None


def test_a_class_twice_within_a_split_is_one_warning():
    s = _summary("train", ["a", "b", "c"], [[1, 2, 3], [4, 5], [3, 2, 1]])
    assert duplicate_classes(s) == ("warning: the train split (data/train): classes 'a' and 'c' hold the same 3 "
                                    "image(s) (the same class twice, e.g. a class folder linked or copied to another "
                                    "name)")


def test_some_shared_images_within_a_split_name_the_files():
    files = ["a/1.png", "a/2.png", "b/1.png", "b/2.png", "c/1.png"]
    s = _summary("val", ["a", "b", "c"], [[1, 2], [2, 7], [1]], files)
    assert duplicate_classes(s) == ("warning: the val split (data/val): classes 'a' and 'b' share 1 identical "
                                    "image(s) (e.g. a/2.png = b/1.png); 1 more pair(s) of classes share images")


def test_an_image_twice_in_one_class_is_not_a_duplicate_class():
    assert duplicate_classes(_summary("train", ["a", "b"], [[1, 1, 2], [3]])) is None


def test_shared_names_and_shared_images_across_splits():
    tr = _summary("train", ["a", "b", "x"], [[1, 2], [3], [9]])
    with pytest.raises(UserError, match=r"share 1 class name\(s\): 'x'; a class in two splits leaks") as e:
        split_overlap(tr, _summary("test", ["x", "y"], [[10], [11]]))
    assert str(e.value).endswith("fix the splits, or pass --allow_split_overlap to run anyway")
    with pytest.raises(UserError) as e:
        split_overlap(tr, _summary("test", ["p", "q"], [[20, 3], [1, 2]]))
    assert ("the train split (data/train) and the test split (data/test) share 3 identical image(s) in 2 class(es) of "
            "train and 2 of test, e.g. image 0 (class 'a') = image 2 (class 'q')") in str(e.value)


def test_allowed_overlap_is_a_warning_line():
    line = split_overlap(_summary("train", ["a"], [[1]]), _summary("val", ["a"], [[2]]), allow=True)
    assert line.startswith("warning: the train split (data/train) and the val split (data/val) share 1 class name")
    assert line.endswith("(allowed by --allow_split_overlap)")
    assert "allow_split_overlap" in resume_may_differ()  # a resumed run may switch it (it changes no number)


def test_names_made_up_from_label_numbers_are_not_compared():
    """FC100 / CIFAR-FS pickles hold no names: "000" in two files means nothing; their images still count."""
    a = _summary("train", ["000", "001"], [[1], [2]], numbered=True)
    assert split_overlap(a, _summary("val", ["000"], [[5]], numbered=True)) is None
    with pytest.raises(UserError, match="identical image"):
        split_overlap(a, _summary("val", ["000"], [[2]], numbered=True))


# ------------------------------------------------------------------------------------------------ through main.py
COMMON = ["--dataset", "custom", "--backbone", "conv4", "--image_size", "16", "--preprocess", "paper", "--quiet",
          "--device", "cpu", "--seed", "1", "--num_val_episodes", "4", "--pre_val_update_step", "2",
          "--val_query", "2"]
PRE = ["--phase", "pre_train", "--pre_max_epoch", "1", "--pre_batch_size", "24", "--pre_head", "linear",
       "--pre_optimizer", "adam", "--pre_lr", "0.001"]


def _run(argv, capsys):
    capsys.readouterr()
    rc = main.cli(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_symlinked_class_folder_warns_once_and_the_run_goes_on(tmp_path, capsys):
    data = Path(make_folders(str(tmp_path / "d"), size=16, per_class=4, classes=(6, 6, 6)))
    os.symlink(data / "train" / "n0001", data / "train" / "n0050")
    rc, out, err = _run(COMMON + PRE + ["--dataset_dir", str(data), "--log_root", str(tmp_path / "logs")], capsys)
    assert rc == 0, err
    warn = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert warn == [f"warning: the train split ({data / 'train'}): classes 'n0001' and 'n0050' hold the same 4 "
                    "image(s) (the same class twice, e.g. a class folder linked or copied to another name)"]


def test_allow_split_overlap_runs_with_one_warning(tmp_path, capsys):
    data = Path(make_folders(str(tmp_path / "d"), size=16, per_class=4, classes=(6, 6, 6)))
    os.rename(data / "val" / "n0007", data / "val" / "n0001")
    argv = COMMON + PRE + ["--dataset_dir", str(data), "--log_root", str(tmp_path / "logs")]
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and "--allow_split_overlap" in err
    rc, out, err = _run(argv + ["--allow_split_overlap"], capsys)
    assert rc == 0, err
    warn = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "share 1 class name(s): 'n0001'" in warn[0] and \
        warn[0].endswith("(allowed by --allow_split_overlap)")


def test_validating_or_testing_on_the_train_folder_is_refused(tmp_path, capsys):
    """The same folder as train and as val (or test) is the fullest overlap; refused, unless allowed."""
    data = Path(make_folders(str(tmp_path / "d"), size=16, per_class=4, classes=(6, 6, 6)))
    argv = COMMON + PRE + ["--dataset_dir", str(data), "--log_root", str(tmp_path / "logs"),
                           "--meta_val_dir", str(data / "train")]
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and err.startswith(f"error: the train split ({data / 'train'}) and the val split "
                                      f"({data / 'train'}) share 6 class name(s)")
    assert _run(argv + ["--allow_split_overlap"], capsys)[0] == 0
    ev = COMMON + ["--dataset_dir", str(data), "--log_root", str(tmp_path / "logs"), "--phase", "meta_eval",
                   "--eval_weights", str(tmp_path / "logs" / "pre" / "custom_conv4" / "max_acc.pth"),
                   "--meta_test_dir", str(data / "train"), "--num_test_episodes", "5", "--test_query", "2"]
    rc, _, err = _run(ev, capsys)
    assert rc == 2 and err.startswith(f"error: the train split ({data / 'train'}) and the test split "
                                      f"({data / 'train'}) share 6 class name(s)")


def test_meta_eval_compares_test_with_the_cached_train_split_without_decoding_it(tmp_path, capsys, monkeypatch):
    data = Path(make_folders(str(tmp_path / "d"), size=16, per_class=4, classes=(6, 6, 6)))
    logs = tmp_path / "logs"
    base = COMMON + ["--dataset_dir", str(data), "--log_root", str(logs)]
    assert _run(base + PRE, capsys)[0] == 0  # writes the train and val cache entries
    ev = base + ["--phase", "meta_eval", "--eval_weights", str(logs / "pre" / "custom_conv4" / "max_acc.pth"),
                 "--num_test_episodes", "5", "--test_query", "2", "--update_step", "2"]
    import data_generator.folders as folders
    decoded = []
    real = folders.decode_all
    monkeypatch.setattr(folders, "decode_all", lambda paths, *a: (decoded.extend(paths), real(paths, *a))[1])
    rc, out, err = _run(ev, capsys)
    assert rc == 0, err and "note:" not in out
    assert decoded and all(os.sep + "test" + os.sep in p for p in decoded)  # train and val: records only
    # the same without a cache: names only, and one note says the images were not compared
    rc, out, err = _run(ev + ["--cache_dir", "none"], capsys)
    notes = [ln for ln in out.splitlines() if ln.startswith("note:")]
    assert rc == 0 and len(notes) == 1, out
    assert notes[0].startswith("note: the test images were not compared with the images of the train "
                               f"({data / 'train'}: --cache_dir none); val ({data / 'val'}: --cache_dir none)")


# ------------------------------------------------------------------------------------------------ the data we ship
def _all_disjoint(summaries):
    for s in summaries:
        assert duplicate_classes(s) is None, duplicate_classes(s)
    for a, b in combinations(summaries, 2):
        assert split_overlap(a, b) is None


@pytest.mark.parametrize("stored", [32, 36])  # the DEMO's stored size (paper, 32 px) and the pytorch resize of 32
def test_the_embedded_pack_has_no_overlap(stored):
    pack = str(ROOT / "data" / "glyphs100.npz")
    _all_disjoint([load_split(f"{pack}#{s}", stored).summary(s) for s in ("train", "val", "test")])


def test_the_test_fakes_have_no_overlap(tmp_path):
    folders = make_folders(str(tmp_path / "f"), size=16, per_class=4, classes=(6, 6, 6))
    _all_disjoint([load_split(os.path.join(folders, s), 16).summary(s) for s in ("train", "val", "test")])
    npz = make_npz(str(tmp_path / "p.npz"), per_class=20, classes=(10, 6, 6))
    _all_disjoint([load_split(f"{npz}#{s}", 16).summary(s) for s in ("train", "val", "test")])
    data = F.make_images(classes=(6, 6, 6), per_class=16, size=16)
    for kind, write in (("metaoptnet", lambda r: F.write_metaoptnet(r, data, "FC100")),
                        ("csv", lambda r: F.write_csv(r, data)), ("tiered", lambda r: F.write_tiered(r, data))):
        root = write(str(tmp_path / kind))
        _all_disjoint([load_split(split_spec(root, s, "FC100"), 16).summary(s) for s in ("train", "val", "test")])
