"""utils/safe_pickle.py: outside pickles are read without running code, Python-2 pickles load, bad files are one line."""
from __future__ import annotations

import collections
import os
import pickle

import numpy as np
import pytest

from tests.helpers import py2_object_npy, py2_pickle_dumps
from utils.errors import UserError
from utils.safe_pickle import load_object_npy, load_pickle, loads_pickle


class _RunsCode:
    """Pickles to a call of ``os.system`` that would create ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Touch:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # a global that is not os.system but still runs code (builtins.open + a write)
        return (open, (self.marker, "w"))


def _images(n=6, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_python2_pickle_needs_latin1_and_loads_identically():
    data = {"data": _images(), "labels": [0, 0, 1, 1, 2, 2], "catname2label": {"n01532829": 0, "n01558993": 1,
                                                                                 "n01704323": 2}}
    blob = py2_pickle_dumps(data)
    with pytest.raises(UnicodeDecodeError):  # as the real MetaOptNet files: plain pickle.load fails on them
        pickle.loads(blob)
    out = loads_pickle(blob, "x.pickle")
    assert out["data"].dtype == np.uint8 and out["data"].shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(out["data"], data["data"])
    assert out["labels"] == data["labels"] and out["catname2label"] == data["catname2label"]
    # and exactly what the public loaders' pickle.load(f, encoding="latin1") gives
    np.testing.assert_array_equal(pickle.loads(blob, encoding="latin1")["data"], out["data"])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python3_pickles_of_data_load(tmp_path, protocol):
    obj = {"image_data": _images(), "class_dict": {"a": [0, 1, 2], "b": [3, 4, 5]}, "x": np.float32(1.5),
           "o": collections.OrderedDict(k=(1, 2.0, None, True)), "s": {1, 2}, "b": b"\x00\xff"}
    path = tmp_path / "c.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    out = load_pickle(str(path))
    np.testing.assert_array_equal(out["image_data"], obj["image_data"])
    assert out["class_dict"] == obj["class_dict"] and out["x"] == np.float32(1.5) and out["o"] == obj["o"]
    assert out["s"] == {1, 2} and out["b"] == b"\x00\xff"


@pytest.mark.parametrize("payload", [_RunsCode, _Touch])
def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / "ran"
    path = tmp_path / "miniImageNet_category_split_train_phase_train.pickle"
    path.write_bytes(pickle.dumps({"data": _images(), "labels": payload(str(marker))}, protocol=2))
    with pytest.raises(UserError) as err:
        load_pickle(str(path))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "refused" in msg
    assert not marker.exists()


def test_object_npy_reads_like_numpy_and_refuses_code(tmp_path):
    weights = {"block1_conv1": np.random.default_rng(1).normal(size=(3, 3, 3, 64)).astype(np.float32),
               "block1_bias1": np.zeros(64, np.float32)}
    path = py2_object_npy(str(tmp_path / "weights.npy"), weights)
    ref = np.load(path, allow_pickle=True, encoding="latin1").tolist()  # what the official TF code does
    out = load_object_npy(path)
    assert sorted(out) == sorted(ref) == sorted(weights)
    for k in weights:
        assert out[k].dtype == np.float32
        np.testing.assert_array_equal(out[k], ref[k])
    # np.save of a Python 3 dict reads the same way
    p3 = str(tmp_path / "p3.npy")
    np.save(p3, weights)
    assert np.array_equal(load_object_npy(p3)["block1_conv1"], weights["block1_conv1"])
    # a plain numeric .npy comes back as its array
    p4 = str(tmp_path / "plain.npy")
    np.save(p4, weights["block1_conv1"])
    np.testing.assert_array_equal(load_object_npy(p4), weights["block1_conv1"])
    # an .npy whose pickle would run code
    marker = tmp_path / "ran"
    evil = str(tmp_path / "ss_weights.npy")
    np.save(evil, np.array({"block1_conv1": _RunsCode(str(marker))}, dtype=object), allow_pickle=True)
    with pytest.raises(UserError) as err:
        load_object_npy(evil)
    assert evil in str(err.value) and not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x02}q\x00(U\x04data", b"not a pickle at all"])
def test_truncated_or_corrupt_pickle_is_one_line(tmp_path, content):
    path = tmp_path / "broken.pkl"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_pickle(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_and_non_npy_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_pickle(str(tmp_path / "nope.pkl"))
    with pytest.raises(UserError, match="not found"):
        load_object_npy(str(tmp_path / "nope.npy"))
    bad = tmp_path / "weights.npy"
    bad.write_bytes(b"garbage that is not an npy file")
    with pytest.raises(UserError, match="not a readable .npy"):
        load_object_npy(str(bad))
