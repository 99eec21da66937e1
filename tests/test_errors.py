"""Every row of docs/ERRORS.md, run through ``main.py``: one ``error: ...`` line on stderr, the documented exit
code, no traceback, and nothing already saved in the log folder changed.

The table is the source of truth: each row's ID must have a case here (and vice versa), and the row's message
(``…`` = a part that varies: paths, numbers) must match what ``main.cli`` printed. Most rows run in-process
(``main.cli(argv)``); the rows in ``SUBPROCESS`` also run as ``python main.py ...`` to prove that no traceback
reaches stderr.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from tests.helpers import make_folders, make_npz, py2_object_npy
from tests.tf_files import SLIM, official_files

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ERRORS.md"
SUBPROCESS = ("E01", "E11", "E16", "E43", "E71", "E72", "E80", "E110")

COMMON = ["--dataset", "custom", "--backbone", "conv4", "--image_size", "16", "--preprocess", "paper",
          "--num_val_episodes", "10", "--num_test_episodes", "10", "--seed", "1", "--quiet", "--device", "cpu",
          "--update_step", "3", "--base_lr", "0.1", "--pre_val_update_step", "5"]
PRE = ["--phase", "pre_train", "--pre_max_epoch", "2", "--pre_batch_size", "48", "--pre_head", "linear",
       "--pre_optimizer", "adam", "--pre_lr", "0.001"]
META = ["--phase", "meta_train", "--max_epoch", "1", "--num_batch", "3"]
EVAL = ["--phase", "meta_eval"]
PRE_DIR = "pre/custom_conv4"
META_DIR = "meta/custom_conv4_5way1shot_exp1"


# --------------------------------------------------------------------------------------------- the catalogue
def doc_rows() -> dict[str, tuple[str, int]]:
    """ID -> (message pattern, exit code) from the table in docs/ERRORS.md."""
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*(E\d+)\s*\|", line)
        if not m:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        msg, code = cells[-2], cells[-1]
        assert msg.startswith("`") and msg.endswith("`"), line
        rows[m.group(1)] = (msg[1:-1], int(code))
    return rows


def pattern(msg: str) -> re.Pattern:
    return re.compile(".*?".join(re.escape(part) for part in msg.split("…")))


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small pack and a log root holding a finished pre-train (2 epochs) and meta-train (1 epoch) run."""
    base = tmp_path_factory.mktemp("errors")
    npz = make_npz(str(base / "d.npz"), per_class=20, classes=(10, 6, 6))
    golden = base / "golden"
    for phase in (PRE, META):
        assert main.cli(COMMON + phase + ["--dataset_dir", npz, "--log_root", str(golden)]) == 0
    return {"base": base, "npz": npz, "golden": golden}


def tree_hashes(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class Case:
    """The argv of one row, built in a fresh copy of the finished runs (``self.logs``)."""

    def __init__(self, world, tmp: Path):
        self.w, self.tmp = world, tmp
        self.logs = tmp / "logs"
        shutil.copytree(world["golden"], self.logs)
        self.npz = world["npz"]

    def argv(self, *extra, data=None) -> list[str]:
        return COMMON + ["--dataset_dir", str(data or self.npz), "--log_root", str(self.logs)] + list(extra)

    def folders(self, **kw) -> Path:
        return Path(make_folders(str(self.tmp / "imgs"), size=16, per_class=kw.get("per_class", 4),
                                 classes=kw.get("classes", (6, 6, 6))))

    def pack_without(self, split: str) -> str:
        with np.load(self.npz) as z:
            arrays = {k: z[k] for k in z.files if not k.startswith(split + "_")}
        path = str(self.tmp / "partial.npz")
        np.savez(path, **arrays)
        return path

    def edited_checkpoint(self, edit) -> str:
        ck = torch.load(self.logs / META_DIR / "max_acc.pth", weights_only=True)
        edit(ck)
        path = self.tmp / "edited.pth"
        torch.save(ck, path)
        return str(path)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('MTL_EVIL_MARKER', '/tmp/mtl_evil_marker')}",))


def case_argv(cid: str, c: Case, monkeypatch) -> list[str]:
    """The command line of row ``cid`` (setting up its bad input first)."""
    if cid == "E01":  # missing dataset folder
        return c.argv(*PRE, data=c.tmp / "no_such_dataset")
    if cid == "E02":  # missing split folder
        root = c.folders()
        shutil.rmtree(root / "val")
        return c.argv(*PRE, data=root)
    if cid == "E03":  # missing split in a pack
        return c.argv(*PRE, data=c.pack_without("val"))
    if cid == "E04":  # missing pack
        return c.argv(*PRE, data=c.tmp / "missing.npz")
    if cid == "E05":  # empty class folder
        root = c.folders()
        os.makedirs(root / "val" / "n9999")
        return c.argv(*PRE, data=root)
    if cid == "E06":  # a class with fewer images than shot + query
        return c.argv(*PRE, "--val_query", "25")
    if cid == "E07":  # way larger than the number of classes
        return c.argv(*PRE, "--way", "7")
    if cid == "E08":  # corrupt image file
        root = c.folders()
        img = root / "train" / "n0002" / "00009.png"
        img.write_bytes(img.read_bytes()[:60])
        return c.argv(*PRE, data=root)
    if cid == "E09":  # a file with an image extension that is not an image
        root = c.folders()
        (root / "train" / "n0001" / "notes.png").write_text("not an image\n")
        return c.argv(*PRE, data=root)
    if cid == "E10":  # truncated checkpoint
        src = (c.logs / META_DIR / "max_acc.pth").read_bytes()
        (c.tmp / "cut.pth").write_bytes(src[: len(src) // 2])
        return c.argv(*EVAL, "--eval_weights", str(c.tmp / "cut.pth"))
    if cid == "E11":  # checkpoint of another backbone
        return c.argv(*EVAL, "--backbone", "resnet12", "--eval_weights", str(c.logs / META_DIR / "max_acc.pth"))
    if cid == "E12":  # missing keys
        return c.argv(*EVAL, "--eval_weights",
                      c.edited_checkpoint(lambda ck: ck["encoder"].pop(sorted(ck["encoder"])[0])))
    if cid == "E13":  # unexpected keys
        return c.argv(*EVAL, "--eval_weights",
                      c.edited_checkpoint(lambda ck: ck["encoder"].__setitem__("extra.weight", torch.zeros(3))))
    if cid == "E14":  # a pickle that would run code
        marker = c.tmp / "pwned"
        monkeypatch.setenv("MTL_EVIL_MARKER", str(marker))
        torch.save({"params": _Evil()}, c.tmp / "evil.pth")
        c.after = lambda: not marker.exists()
        return c.argv(*EVAL, "--eval_weights", str(c.tmp / "evil.pth"))
    if cid == "E15":  # zero shot
        return c.argv(*META, "--shot", "0")
    if cid == "E16":  # negative way
        return c.argv(*META, "--way", "-5")
    if cid == "E17":  # zero query
        return c.argv(*META, "--train_query", "0")
    if cid == "E18":  # zero epochs
        return c.argv(*PRE[:2], "--pre_max_epoch", "0")
    if cid == "E19":  # negative epochs
        return c.argv(*META[:2], "--max_epoch", "-3")
    if cid == "E20":  # image size too small for the backbone
        return c.argv(*PRE, "--image_size", "8")
    if cid == "E21":  # unwritable log folder
        (c.tmp / "a_file").write_text("x")
        return COMMON + PRE + ["--dataset_dir", c.npz, "--log_root", str(c.tmp / "a_file" / "logs")]
    if cid == "E22":  # CUDA requested where there is none
        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present")
        return [a if a != "cpu" else "cuda" for a in c.argv(*PRE)]
    if cid == "E23":  # loss NaN in epoch 2, after a good epoch 1: resumed run so that epoch 1 was saved before
        blowup = c.argv(*PRE, "--pre_max_epoch", "3", "--pre_step_size", "1", "--pre_gamma", "1e10",
                        "--pre_lr", "1e-12", "--pre_optimizer", "sgd", "--pre_label", "blowup")
        assert main.cli(blowup + ["--stop_after_epoch", "1"]) == 0  # epoch 1 at lr 0.01: fine
        return blowup + ["--resume"]                                  # epoch 2 at lr 1e8: NaN
    if cid == "E24":  # loss NaN in the first epoch (no checkpoint of this run yet)
        return c.argv(*PRE, "--pre_lr", "1e8", "--pre_optimizer", "sgd", "--pre_label", "nan")
    if cid == "E25":  # loss NaN in meta-train (inner loop diverges)
        return c.argv(*META, "--meta_lr1", "1e30", "--meta_label", "nan")
    if cid == "E26":  # --resume without a resume checkpoint
        return c.argv(*PRE, "--resume", "--pre_label", "never_ran")
    if cid == "E27":  # --resume with a contradicting setting
        return c.argv(*PRE, "--resume", "--pre_head", "mlp")
    if cid == "E28":  # truncated resume checkpoint
        p = c.logs / PRE_DIR / "resume.pth"
        p.write_bytes(p.read_bytes()[:1000])
        return c.argv(*PRE, "--resume", "--pre_max_epoch", "3")
    if cid == "E29":  # meta-train before pre-train
        return c.argv(*META, "--pre_label", "never_ran")
    if cid == "E30":  # meta-test before meta-train
        return c.argv(*EVAL, "--meta_label", "never_ran")
    if cid == "E31":  # meta checkpoint of another way
        return c.argv(*EVAL, "--way", "3", "--eval_weights", str(c.logs / META_DIR / "max_acc.pth"))
    if cid == "E32":  # unknown flag
        return c.argv(*PRE, "--epochs", "3")
    if cid == "E33":  # CUDA out of memory (simulated: no GPU here)
        import trainer.pre

        def oom(self, epoch):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        monkeypatch.setattr(trainer.pre.PreTrainer, "train_epoch", oom)
        return c.argv(*PRE, "--pre_label", "oom")
    if cid == "E34":  # the folder is locked by a live process (this one stands in for the first run)
        (c.logs / PRE_DIR / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                             "started": "2026-12-01T10:00:00"}))
        return c.argv(*PRE)
    if cid == "E35":  # the same pre-train again into the finished run's folder
        return c.argv(*PRE)
    if cid == "E70":  # --amp_dtype without --amp
        return c.argv(*PRE, "--pre_label", "amp", "--amp_dtype", "bfloat16")
    if cid in ("E63", "E64", "E65", "E66", "E67"):
        return distributed_case(cid, c, monkeypatch)
    if cid in RUN_CASES:
        return RUN_CASES[cid](c, monkeypatch)
    if cid in MODEL_CASES:
        return MODEL_CASES[cid](c, monkeypatch)
    if cid in COMPARE_CASES:
        return COMPARE_CASES[cid](c, monkeypatch)
    if cid in FORMAT_CASES:
        return FORMAT_CASES[cid](c, monkeypatch)
    if cid in DATA_CASES:
        return DATA_CASES[cid](c, monkeypatch)
    if cid in TF_ROWS:
        return tf_case_argv(cid, c, monkeypatch)
    if cid in SEED_ROWS:
        return seed_case_argv(cid, c, monkeypatch)
    if cid in PREDICT_CASES:  # issue 22
        return PREDICT_CASES[cid](c, monkeypatch)
    raise KeyError(cid)


# ------------------------------------------------------------------ issue 11: the benchmark files (E36-E48)
def _fake(c: Case, kind: str, per_class: int = 16, bench: str = "FC100") -> str:
    from tests import format_fakes as F
    data = F.make_images(classes=(6, 6, 6), per_class=per_class, size=16)
    root = str(c.tmp / kind)
    {"metaoptnet": lambda: F.write_metaoptnet(root, data, bench), "csv": lambda: F.write_csv(root, data),
     "learn2learn": lambda: F.write_learn2learn(root, data), "tiered": lambda: F.write_tiered(root, data, "png")}[kind]()
    return root


def _edit_pickle(path: str, edit) -> None:
    from tests.helpers import py2_pickle_dumps
    from utils.safe_pickle import load_pickle
    d = load_pickle(path)
    edit(d)
    with open(path, "wb") as f:
        f.write(py2_pickle_dumps(d))


def _e36(c, mp):
    (c.tmp / "junk").mkdir()
    (c.tmp / "junk" / "readme.txt").write_text("x\n")
    return c.argv(*PRE, data=c.tmp / "junk")


def _e37(c, mp):
    from tests import format_fakes as F
    return c.argv(*PRE, data=F.write_cifar100(str(c.tmp / "cifar"), per_class=(2, 1))[0])


def _e38(c, mp):
    root = _fake(c, "metaoptnet")
    os.remove(os.path.join(root, "FC100_val.pickle"))
    return c.argv(*PRE, data=root)


def _e39(c, mp):
    root = _fake(c, "metaoptnet")
    _edit_pickle(os.path.join(root, "FC100_train.pickle"), lambda d: d.pop("labels"))
    return c.argv(*PRE, data=root)


def _e40(c, mp):
    root = _fake(c, "metaoptnet")
    _edit_pickle(os.path.join(root, "FC100_train.pickle"), lambda d: d["labels"].pop())
    return c.argv(*PRE, data=root)


def _e41(c, mp):
    root = _fake(c, "csv")
    os.remove(os.path.join(root, "images", sorted(os.listdir(os.path.join(root, "images")))[3]))
    return c.argv(*PRE, data=root)


def _e42(c, mp):
    root = _fake(c, "csv")
    (Path(root) / "train.csv").write_text("image,class\nn0.png,n0\n")
    return c.argv(*PRE, data=root)


def _e43(c, mp):
    from tests import format_fakes as F
    marker = c.tmp / "pwned"
    root = _fake(c, "metaoptnet")
    F.write_evil_metaoptnet(root, str(marker))
    c.after = lambda: not marker.exists()
    return c.argv(*PRE, data=root)


def _e44(c, mp):
    return c.argv(*PRE, data=_fake(c, "metaoptnet", per_class=10))


def _e45(c, mp):
    root = _fake(c, "tiered")
    path = os.path.join(root, "train_images_png.pkl")
    from tests.helpers import py2_pickle_dumps
    from utils.safe_pickle import load_pickle
    items = load_pickle(path)
    items[50] = np.frombuffer(items[50].tobytes()[:40], dtype=np.uint8)  # a truncated PNG halfway through
    Path(path).write_bytes(py2_pickle_dumps(items))
    return c.argv(*PRE, data=root)


def _e46(c, mp):
    root = _fake(c, "learn2learn")
    _edit_pickle(os.path.join(root, "mini-imagenet-cache-train.pkl"),
                 lambda d: d["class_dict"][sorted(d["class_dict"])[2]].append(500))
    return c.argv(*PRE, data=root)


def _e47(c, mp):
    root = _fake(c, "metaoptnet")
    _fake(c, "metaoptnet", bench="CIFAR-FS")
    return c.argv(*PRE, data=root)


def _e48(c, mp):
    root = _fake(c, "metaoptnet")
    p = Path(root) / "FC100_train.pickle"
    p.write_bytes(p.read_bytes()[:500])
    return c.argv(*PRE, data=root)


FORMAT_CASES = {"E36": _e36, "E37": _e37, "E38": _e38, "E39": _e39, "E40": _e40, "E41": _e41, "E42": _e42,
                "E43": _e43, "E44": _e44, "E45": _e45, "E46": _e46, "E47": _e47, "E48": _e48}


# ------------------------------------------------------------------ issue 20, part DATA: faults while reading data,
# the image cache, split hygiene, decoding (E71-E89)
def _folders(c: Case, **kw) -> Path:
    return c.folders(**kw)


def _deny(monkeypatch, path: Path, kind: str) -> None:
    """Make ``path`` unreadable: chmod for a normal user; as root (which reads everything) the refusal is injected
    at the call that would fail (tests/data_generator/test_cache_integrity.py has the real read-only folder)."""
    os.chmod(path, 0)
    if os.geteuid() != 0:
        return
    import errno as _errno
    if kind == "file":
        from PIL import Image as _Image
        real_open = _Image.open

        def fake_open(fp, *a, **kw):
            if str(fp) == str(path):
                raise PermissionError(_errno.EACCES, "Permission denied", str(path))
            return real_open(fp, *a, **kw)
        monkeypatch.setattr(_Image, "open", fake_open)
    elif kind == "dir":
        real_scandir = os.scandir

        def fake_scandir(p="."):
            if str(p) == str(path):
                raise PermissionError(_errno.EACCES, "Permission denied", str(path))
            return real_scandir(p)
        monkeypatch.setattr(os, "scandir", fake_scandir)
    else:  # a folder that takes no new file
        real = np.lib.format.open_memmap

        def fake_memmap(filename, *a, **kw):
            if str(filename).startswith(str(path)):
                raise PermissionError(_errno.EACCES, "Permission denied", str(filename))
            return real(filename, *a, **kw)
        monkeypatch.setattr(np.lib.format, "open_memmap", fake_memmap)


def _restore(path: Path):
    def after() -> bool:
        os.chmod(path, 0o755)
        return True
    return after


def _e71(c, mp):  # a broken symbolic link in a class folder
    root = _folders(c)
    os.symlink(c.tmp / "gone.png", root / "train" / "n0001" / "00099.png")
    return c.argv(*PRE, data=root)


def _e72(c, mp):  # a symbolic link loop in a class folder
    root = _folders(c)
    os.symlink("loop.png", root / "train" / "n0001" / "loop.png")
    return c.argv(*PRE, data=root)


def _e73(c, mp):  # a class folder that is a broken symbolic link
    root = _folders(c)
    os.symlink(c.tmp / "unmounted" / "n0077", root / "val" / "n0077")
    return c.argv(*PRE, data=root)


def _e74(c, mp):  # an image that cannot be read
    root = _folders(c)
    img = root / "train" / "n0002" / "00009.png"
    _deny(mp, img, "file")
    c.after = lambda: os.chmod(img, 0o644) or True
    return c.argv(*PRE, data=root)


def _e75(c, mp):  # a class folder that cannot be listed
    root = _folders(c)
    d = root / "val" / "n0007"
    _deny(mp, d, "dir")
    c.after = _restore(d)
    return c.argv(*PRE, data=root)


def _cached_train(c: Case, root: Path, cache: Path) -> dict:
    from data_generator.dataset_loader import load_split
    load_split(str(root / "train"), 16, cache_dir=str(cache))
    return tree_hashes(cache)


def _e76(c, mp):  # a read-only cache folder that must take a new entry (train is cached, val is not)
    root, cache = _folders(c), c.tmp / "rocache"
    before = _cached_train(c, root, cache)
    _deny(mp, cache, "folder")
    os.chmod(cache, 0o555)
    c.after = lambda: os.chmod(cache, 0o755) or tree_hashes(cache) == before
    return c.argv(*PRE, "--cache_dir", str(cache), data=root)


def _e77(c, mp):  # the disk of the cache folder is full
    import errno as _errno

    def full(fd, offset, length):
        raise OSError(_errno.ENOSPC, "No space left on device")
    mp.setattr(os, "posix_fallocate", full)
    cache = c.tmp / "fullcache"
    c.after = lambda: os.listdir(cache) == []  # nothing half-written stays
    return c.argv(*PRE, "--cache_dir", str(cache), data=_folders(c))


def _e78(c, mp):  # --cache_dir names a file
    (c.tmp / "cachefile").write_text("x")
    return c.argv(*PRE, "--cache_dir", str(c.tmp / "cachefile"), data=_folders(c))


def _e79(c, mp):  # a class name in both train and val
    root = _folders(c)
    os.rename(root / "val" / "n0007", root / "val" / "n0001")
    return c.argv(*PRE, data=root)


def _e80(c, mp):  # a val class folder that links to a train class (another name, the same images); no cache:
    root = _folders(c)  # the digests computed at load are compared (and the subprocess run leaves no file)
    os.symlink(root / "train" / "n0003", root / "val" / "n0099")
    return c.argv(*PRE, "--cache_dir", "none", data=root)


def _e81(c, mp):  # meta_eval: a test image that is also a train image, found in the train split's cache entry
    root = _folders(c)
    shutil.copy(root / "train" / "n0002" / "00010.png", root / "test" / "n0014" / "00099.png")
    _cached_train(c, root, c.logs / "cache")
    return c.argv(*EVAL, "--eval_weights", str(c.logs / META_DIR / "max_acc.pth"), data=root)


def _e82(c, mp):  # meta_eval without a cache: a test class named like a train class
    root = _folders(c)
    os.rename(root / "test" / "n0013", root / "test" / "n0004")
    return c.argv(*EVAL, "--cache_dir", "none", "--eval_weights", str(c.logs / META_DIR / "max_acc.pth"), data=root)


def _e83(c, mp):  # a 32-bit integer image beyond 16 bits
    from PIL import Image as _Image
    root = _folders(c)
    _Image.fromarray(np.full((16, 16), 70000, np.int32), mode="I").save(root / "train" / "n0001" / "deep.tif")
    return c.argv(*PRE, data=root)


def _e84(c, mp):  # a float image in 0..255 instead of [0, 1]
    from PIL import Image as _Image
    root = _folders(c)
    _Image.fromarray(np.full((16, 16), 200.0, np.float32), mode="F").save(root / "train" / "n0001" / "float.tif")
    return c.argv(*PRE, data=root)


def _e85(c, mp):  # a benchmark split file that is a broken symbolic link
    root = _fake(c, "metaoptnet")
    os.remove(os.path.join(root, "FC100_val.pickle"))
    os.symlink("/nowhere/FC100_val.pickle", os.path.join(root, "FC100_val.pickle"))
    return c.argv(*PRE, data=root)


def _e86(c, mp):  # an image a csv lists that is a broken symbolic link
    root = Path(_fake(c, "csv"))
    img = sorted((root / "images").iterdir())[3]
    img.unlink()
    os.symlink(c.tmp / "gone.png", img)
    return c.argv(*PRE, data=root)


def _e87(c, mp):  # a benchmark pickle that cannot be read
    root = Path(_fake(c, "metaoptnet"))
    p = root / "FC100_train.pickle"
    os.chmod(p, 0)
    c.after = lambda: os.chmod(p, 0o644) or True
    if os.geteuid() == 0:  # root reads everything: the refusal is injected at the open
        import builtins
        import errno as _errno
        real = builtins.open

        def fake_open(f, *a, **kw):
            if str(f) == str(p):
                raise PermissionError(_errno.EACCES, "Permission denied", str(p))
            return real(f, *a, **kw)
        mp.setattr(builtins, "open", fake_open)
    return c.argv(*PRE, data=root)


def _e88(c, mp):  # a run killed after its epoch's first files, before resume.pth (its commit point)
    (c.logs / PRE_DIR / "resume.pth").unlink()
    return c.argv(*PRE)


def _e89(c, mp):  # a text file given as a checkpoint (it said "cannot be loaded safely", as for a malicious one)
    p = c.tmp / "notes.pth"
    p.write_text("learning rate 0.1, 5 epochs\n")
    return c.argv(*EVAL, "--eval_weights", str(p))


DATA_CASES = {"E71": _e71, "E72": _e72, "E73": _e73, "E74": _e74, "E75": _e75, "E76": _e76, "E77": _e77,
              "E78": _e78, "E79": _e79, "E80": _e80, "E81": _e81, "E82": _e82, "E83": _e83, "E84": _e84,
              "E85": _e85, "E86": _e86, "E87": _e87, "E88": _e88, "E89": _e89}


# ------------------------------------- issue 20, Part RUN: non-finite values, write faults, signals (E90-E109)
def _results_first(c: Case) -> None:
    """A good meta_eval first, so that the row checks that a failing one leaves results.json as it was."""
    assert main.cli(c.argv(*EVAL)) == 0


def _scaled_checkpoint(c: Case, keys: tuple[str, ...], factor: float) -> str:
    """The meta checkpoint with these encoder weights multiplied by ``factor`` (finite, but overflowing)."""
    def edit(ck):
        for k in keys:
            ck["encoder"][k] = ck["encoder"][k] * factor
    return c.edited_checkpoint(edit)


def _nan_first_weight(sd: dict) -> None:
    k = sorted(k for k, v in sd.items() if v.is_floating_point())[0]
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] = float("nan")


def _fail_writes(monkeypatch, folder: Path, after: int, code: int = errno.ENOSPC) -> None:
    """From the (``after`` + 1)-th temporary file that ``utils.misc.atomic_write`` opens in ``folder`` on: with
    ENOSPC its writes go to ``/dev/full`` (the kernel's own "No space left on device", so ``torch.save`` fails as
    it does on a full disk); with another code (EACCES, EROFS: a folder that became read-only) it cannot be
    created. The tests run as root in some places, where a chmod would not stop a write."""
    import tempfile
    real, seen = tempfile.mkstemp, [0]

    def mkstemp(*a, dir=None, **kw):
        if dir is None or os.path.abspath(dir) != os.path.abspath(folder):
            return real(*a, dir=dir, **kw)
        seen[0] += 1
        if seen[0] <= after:
            return real(*a, dir=dir, **kw)
        if code != errno.ENOSPC:
            raise OSError(code, os.strerror(code), os.path.join(dir, ".tmp_"))
        fd, path = real(*a, dir=dir, **kw)  # a real temporary file, which must be removed again
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        os.close(full)
        return fd, path
    if code == errno.ENOSPC and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this platform")
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def _signal_at(monkeypatch, cls, name: str, signum: int, epoch: int | None = None) -> None:
    """Send ``signum`` to this process (a real signal, handled by main.cli's handlers) when ``cls.name`` runs
    (at ``epoch``, if given)."""
    import time
    orig = getattr(cls, name)

    def hit(self, *a, **kw):
        if epoch is None or a[0] == epoch:
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises here, at once
        return orig(self, *a, **kw)
    monkeypatch.setattr(cls, name, hit)


def _holds_nothing(folder: Path) -> bool:
    """No run files, no lock and no TensorBoard file: the same command starts afresh (no E35)."""
    from utils.run_lock import RUN_FILES
    tb = list((folder / "tb").iterdir()) if (folder / "tb").is_dir() else []
    return not any((folder / f).exists() for f in RUN_FILES + (".lock",)) and not tb


def _e90(c, mp):  # meta-test: the inner loop overflows (bank path)
    _results_first(c)
    return c.argv(*EVAL, "--base_lr", "1e38")


def _e91(c, mp):  # the same on the episodic path
    _results_first(c)
    return c.argv(*EVAL, "--base_lr", "1e38", "--eval_mode", "episodic")


def _e92(c, mp):  # centroid: features so large that their squared distances overflow
    return c.argv(*EVAL, "--eval_classifier", "centroid",
                  "--eval_weights", _scaled_checkpoint(c, ("layers.0.0.weight",), 1e30))


def _e93(c, mp):  # features that overflow (two layers scaled: 1e60 is past float32)
    weights = _scaled_checkpoint(c, ("layers.0.0.weight", "layers.1.0.weight"), 1e30)
    return c.argv(*EVAL, "--eval_weights", weights)


def _e94(c, mp):  # a checkpoint holding a NaN
    return c.argv(*EVAL, "--eval_weights", c.edited_checkpoint(lambda ck: _nan_first_weight(ck["encoder"])))


def _e95(c, mp):  # pre-train validation: the head's inner loop overflows
    return c.argv(*PRE, "--pre_val_base_lr", "1e38", "--pre_label", "val_nan")


def _e96(c, mp):  # meta-train: Adam's first step at lr / (1 - beta1) does not fit float32
    return c.argv(*META, "--meta_lr2", "1e38", "--meta_label", "adam")


def _e97(c, mp):  # pre-train: a finite loss, then SGD steps to inf weights on the epoch's last iteration
    return c.argv(*PRE, "--pre_optimizer", "sgd", "--pre_iters_per_epoch", "1", "--pre_lr", "3e38",
                  "--pre_label", "sgd_inf")


def _e98(c, mp):  # a resume.pth holding a NaN weight
    p = c.logs / PRE_DIR / "resume.pth"
    st = torch.load(p, weights_only=True)
    _nan_first_weight(st["model"])
    torch.save(st, p)
    return c.argv(*PRE, "--resume", "--pre_max_epoch", "3")


def _e99(c, mp):  # the disk fills up while epoch 2 writes its checkpoint (epoch 1 wrote 5 files)
    _fail_writes(mp, c.logs / "pre" / "custom_conv4_full2", after=5)
    run = c.logs / "pre" / "custom_conv4_full2"
    c.after = lambda: all(torch.load(run / f, weights_only=True)["epoch"] == 1 for f in ("resume.pth", "last.pth"))
    return c.argv(*PRE, "--pre_label", "full2")


def _e100(c, mp):  # the disk fills up in the first epoch's commit: what it wrote is removed again
    run = c.logs / "pre" / "custom_conv4_full1"
    _fail_writes(mp, run, after=1)
    c.after = lambda: _holds_nothing(run)
    return c.argv(*PRE, "--pre_label", "full1")


def _e101(c, mp):  # the log folder becomes read-only after epoch 1
    _fail_writes(mp, c.logs / "pre" / "custom_conv4_ro", after=5, code=errno.EACCES)
    return c.argv(*PRE, "--pre_label", "ro")


def _e102(c, mp):  # a file named tb where the TensorBoard folder goes
    run = c.logs / "pre" / "custom_conv4_tbfile"
    run.mkdir(parents=True)
    (run / "tb").write_text("not a folder\n")
    c.after = lambda: not any((run / f).exists() for f in ("max_acc.pth", "last.pth", "resume.pth", ".lock"))
    return c.argv(*PRE, "--pre_label", "tbfile")


def _e103(c, mp):  # the disk fills up while the hard-task log is appended to
    import builtins

    import data_generator.hard_tasks
    real = builtins.open

    def fake_open(path, mode="r", *a, **kw):
        if str(path).endswith("hard_tasks.jsonl") and "a" in mode:
            return real("/dev/full", mode, *a, **kw)
        return real(path, mode, *a, **kw)
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this platform")
    mp.setattr(data_generator.hard_tasks, "open", fake_open, raising=False)
    return c.argv(*META, "--hard_task", "--meta_label", "htfull")


def _e104(c, mp):  # meta_eval on a read-only run folder: the accuracy is printed, then exit 5
    _results_first(c)
    _fail_writes(mp, c.logs / META_DIR, after=0, code=errno.EACCES)
    return c.argv(*EVAL)


def _e105(c, mp):  # --eval_weights on a read-only file system
    ro = c.tmp / "ro"
    ro.mkdir()
    shutil.copy(c.logs / META_DIR / "max_acc.pth", ro / "meta.pth")
    _fail_writes(mp, ro, after=0, code=errno.EROFS)
    c.after = lambda: sorted(os.listdir(ro)) == ["meta.pth"]
    return c.argv(*EVAL, "--eval_weights", str(ro / "meta.pth"))


def _e106(c, mp):  # SIGTERM during epoch 2: epoch 1 is saved
    import trainer.pre
    _signal_at(mp, trainer.pre.PreTrainer, "train_epoch", signal.SIGTERM, epoch=2)
    run = c.logs / "pre" / "custom_conv4_term"
    c.after = lambda: not (run / ".lock").exists() and torch.load(run / "resume.pth", weights_only=True)["epoch"] == 1
    return c.argv(*PRE, "--pre_label", "term")


def _e107(c, mp):  # Ctrl-C in the first epoch: nothing saved, so no --resume
    import trainer.pre
    _signal_at(mp, trainer.pre.PreTrainer, "train_epoch", signal.SIGINT, epoch=1)
    c.after = lambda: _holds_nothing(c.logs / "pre" / "custom_conv4_int")
    return c.argv(*PRE, "--pre_label", "int")


def _e108(c, mp):  # SIGTERM in a resumed run before its next epoch ended: --resume is right again
    import trainer.pre
    argv = c.argv(*PRE, "--pre_max_epoch", "3", "--pre_label", "term2")
    assert main.cli(argv + ["--stop_after_epoch", "1"]) == 0
    _signal_at(mp, trainer.pre.PreTrainer, "train_epoch", signal.SIGTERM, epoch=2)
    return argv + ["--resume"]


def _e109(c, mp):  # SIGHUP (the terminal closed) during meta_eval
    import trainer.meta
    orig = trainer.meta.evaluate

    def hup(*a, **kw):
        import time
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(5)
        return orig(*a, **kw)
    mp.setattr(trainer.meta, "evaluate", hup)
    return c.argv(*EVAL)


RUN_CASES = {f"E{i}": globals()[f"_e{i}"] for i in range(90, 110)}


# ------------------------------------- issue 21, the model spec and the one loader (E140-E141; models/loading.py)
def _e140(c, mp):  # the official {'params': ...} of a resnet12_slim, --backbone conv4 given
    from models.resnet_mtl import build_backbone
    torch.manual_seed(0)
    enc = build_backbone("resnet12_slim", mtl=True)
    sd = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    sd.update({"base_learner.fc1_w": torch.zeros(5, 256), "base_learner.fc1_b": torch.zeros(5)})
    torch.save({"params": sd}, c.tmp / "official_meta.pth")
    return c.argv(*EVAL, "--eval_weights", str(c.tmp / "official_meta.pth"))


def _e141(c, mp):  # a checkpoint whose model spec is of a newer version of this program
    return c.argv(*EVAL, "--eval_weights", c.edited_checkpoint(lambda ck: ck["spec"].update(version=2)))


MODEL_CASES = {"E140": _e140, "E141": _e141}


# ------------------------------ issue 22, predict and embed: your own images (E160-E174; trainer/predict.py)
PREDICT = ["--phase", "predict"]


def _glyph_folders(c: Case, classes: int = 3) -> dict:
    """3 glyph classes, 1 support and 1 query image each, written once per case (``c.glyphs``)."""
    from tools.predict_bench import write_glyph_folders
    if not getattr(c, "glyphs", None):
        c.glyphs = write_glyph_folders(str(c.tmp / "glyphs"), classes, 1, 1)
    return c.glyphs


def _predict(c: Case, *extra, support=None, query=None, weights=True) -> list[str]:
    g = _glyph_folders(c)
    ck = ["--eval_weights", str(c.logs / META_DIR / "max_acc.pth")] if weights else []
    return c.argv(*PREDICT, *ck, "--support", str(support or g["support"]), "--query", str(query or g["query"]),
                  *extra)


def _e160(c, mp):  # predict without --eval_weights
    return _predict(c, weights=False)


def _e161(c, mp):  # predict without --support
    argv = _predict(c)
    i = argv.index("--support")
    return argv[:i] + argv[i + 2:]


def _e162(c, mp):  # a --support folder that is not there
    return _predict(c, support=c.tmp / "no_support")


def _e163(c, mp):  # a support folder with one class
    g = _glyph_folders(c)
    one = c.tmp / "one" / g["classes"][0]
    one.mkdir(parents=True)
    shutil.copy(g["support_files"][g["classes"][0]][0], one / "a.png")
    return _predict(c, support=one.parent)


def _e164(c, mp):  # a query folder without images (a text file and an empty subfolder)
    empty = c.tmp / "empty_query"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("nothing to see\n")
    return _predict(c, query=empty)


def _e165(c, mp):  # a query image that does not decode
    g = _glyph_folders(c)
    bad = Path(g["query_files"][g["classes"][1]][0])
    bad.write_bytes(bad.read_bytes()[:50])
    return _predict(c)


def _e166(c, mp):  # a checkpoint that does not load (half its bytes)
    src = (c.logs / META_DIR / "max_acc.pth").read_bytes()
    (c.tmp / "cut.pth").write_bytes(src[: len(src) // 2])
    return _predict(c, weights=False) + ["--eval_weights", str(c.tmp / "cut.pth")]


def _e167(c, mp):  # a --query that is not there
    return _predict(c, query=c.tmp / "no_query")


def _e168(c, mp):  # --out names a file
    (c.tmp / "out.txt").write_text("x")
    return _predict(c, "--out", str(c.tmp / "out.txt"))


def _e169(c, mp):  # embed --out that is not a .npz file (no --dataset_dir: that would be E170)
    g = _glyph_folders(c)
    return COMMON + ["--log_root", str(c.logs), "--phase", "embed", "--eval_weights",
                     str(c.logs / META_DIR / "max_acc.pth"), "--query", g["query"], "--out", str(c.tmp / "features.txt")]


def _e170(c, mp):  # embed with --query and --dataset_dir (COMMON gives --dataset_dir)
    g = _glyph_folders(c)
    return c.argv("--phase", "embed", "--eval_weights", str(c.logs / META_DIR / "max_acc.pth"), "--query",
                  g["query"])


def _e171(c, mp):  # --support given to a phase that does not read it
    g = _glyph_folders(c)
    return c.argv(*EVAL, "--support", g["support"])


def _e172(c, mp):  # the disk fills up while predict writes: the earlier predictions stay as they were
    out = c.logs / "predictions"
    assert main.cli(_predict(c, "--out", str(out))) == 0
    _fail_writes(mp, out, after=1)  # predictions.csv's temporary is written, predictions.json's fails
    return _predict(c, "--out", str(out))


def _e173(c, mp):  # predict under torchrun
    mp.setenv("WORLD_SIZE", "2")
    return _predict(c)


def _e174(c, mp):  # a --query file that is not an image
    (c.tmp / "list.txt").write_text("a.png\n")
    return _predict(c, query=c.tmp / "list.txt")


PREDICT_CASES = {f"E{i}": globals()[f"_e{i}"] for i in range(160, 175)}
PREDICT_SUBPROCESS = ("E165", "E166")  # also through python main.py (test_bad_input_subprocess): no traceback


# ------------------------------------- issue 23: --phase compare, several --eval_weights, the reports (E180-E192;
# trainer/compare.py, config/compare.py, config/options.py; E189 is run_experiment.py's SEEDS: tests/test_run_experiment.py; E190-E192 are
# python -m tools.report's: test_report_row below)
COMPARE = ["--phase", "compare"]


def _ckpts(c: Case) -> tuple[str, str]:
    return str(c.logs / PRE_DIR / "max_acc.pth"), str(c.logs / META_DIR / "max_acc.pth")


def _e180(c, mp):  # one method only
    return c.argv(*COMPARE, "--eval_weights", _ckpts(c)[1])


def _e181(c, mp):  # an unknown head after ':'
    pre, meta = _ckpts(c)
    return c.argv(*COMPARE, "--eval_weights", meta, f"{pre}:centroidd")


def _e182(c, mp):  # a checkpoint that does not load (the second of two)
    src = (c.logs / META_DIR / "max_acc.pth").read_bytes()
    (c.tmp / "cut.pth").write_bytes(src[: len(src) // 2])
    return c.argv(*COMPARE, "--eval_weights", _ckpts(c)[1], str(c.tmp / "cut.pth"))


def _e183(c, mp):  # two meta checkpoints of different way
    def three_way(ck):
        ck["base_learner"] = {k: v[:3] for k, v in ck["base_learner"].items()}
        ck["spec"]["way"] = 3
    return c.argv(*COMPARE, "--eval_weights", _ckpts(c)[1], c.edited_checkpoint(three_way))


def _e184(c, mp):  # --way given that a meta checkpoint contradicts
    pre, meta = _ckpts(c)
    return c.argv(*COMPARE, "--way", "3", "--eval_weights", pre, meta)


def _e185(c, mp):  # several --eval_weights outside compare
    pre, meta = _ckpts(c)
    return c.argv(*EVAL, "--eval_weights", pre, meta)


def _e186(c, mp):  # the same method twice
    pre, _ = _ckpts(c)
    return c.argv(*COMPARE, "--eval_weights", pre, pre)


def _e187(c, mp):  # a compare method PATH:HEAD given to meta_eval
    return c.argv(*EVAL, "--eval_weights", f"{_ckpts(c)[0]}:centroid")


def _e188(c, mp):  # compare.json cannot be written (a full disk): the tables were printed, exit 5
    folder = c.logs / "compare" / "custom_5way1shot"
    folder.mkdir(parents=True)
    _fail_writes(mp, folder, after=0)
    c.after = lambda: sorted(os.listdir(folder)) == []
    pre, meta = _ckpts(c)
    return c.argv(*COMPARE, "--eval_weights", pre, meta)


COMPARE_CASES = {f"E{i}": globals()[f"_e{i}"] for i in range(180, 189)}
REPORT_ROWS = ("E190", "E191", "E192")


def report_case_argv(cid: str, c: Case) -> list[str]:
    """The argv of ``python -m tools.report`` for rows E190-E192."""
    if cid == "E190":  # a run folder that is not there
        return [str(c.tmp / "no_such_run")]
    if cid == "E191":  # a folder holding nothing a report reads
        (c.tmp / "empty").mkdir()
        return [str(c.tmp / "empty")]
    # E192: --seeds with a run folder whose test was not run (the pre-train folder holds no results*.json)
    return ["--seeds", str(c.logs / META_DIR), str(c.logs / PRE_DIR), "--out", str(c.tmp / "summary")]


@pytest.mark.parametrize("cid", REPORT_ROWS)
def test_report_row(cid, world, tmp_path, capsys):
    """E190-E192: ``python -m tools.report`` (in-process ``tools.report.main``): one line, exit 2, nothing changed."""
    from tools import report
    c = Case(world, tmp_path)
    (c.logs / META_DIR / "results.json").write_text(json.dumps({"mean": 50.0, "ci95": 1.0, "episodes": 10}))
    argv = report_case_argv(cid, c)
    before = tree_hashes(c.logs)
    capsys.readouterr()
    rc = report.main(argv)
    check_output(cid, rc, capsys.readouterr().err)
    assert tree_hashes(c.logs) == before and not (c.tmp / "summary").exists()


TF_ROWS = [f"E{i:02d}" for i in range(50, 60)]
TF = ["--backbone", "resnet12_slim", "--bn_mode", "tf"]


def tf_case_argv(cid: str, c: Case, monkeypatch) -> list[str]:
    """E50-E59: the official TensorFlow .npy weights (models/tf_weights.py), as --eval_weights / --init_weights."""
    dl = c.tmp / "download_weights"
    if cid == "E50":  # a TF folder without weights.npy
        os.makedirs(dl)
        return c.argv(*EVAL, *TF, "--eval_weights", str(dl))
    w, s, fc = official_files(str(dl), widths=SLIM)
    if cid == "E51":  # a missing key
        w.pop("block3_conv2")
        py2_object_npy(str(dl / "weights.npy"), w)
    if cid == "E52":  # an unexpected key
        s["block5_conv1"] = np.zeros((1, 1, 256, 256), np.float32)
        py2_object_npy(str(dl / "ss_weights.npy"), s)
    if cid == "E53":  # a mis-shaped key
        w["block1_conv1"] = np.zeros((3, 3, 3, 9), np.float32)
        py2_object_npy(str(dl / "weights.npy"), w)
    if cid == "E54":  # ss_weights.npy without fc_weights.npy
        os.unlink(dl / "fc_weights.npy")
    if cid == "E55":  # a weights.npy whose pickle would run code
        marker = c.tmp / "pwned"
        monkeypatch.setenv("MTL_EVIL_MARKER", str(marker))
        w["block1_bias1"] = _Evil()
        arr = np.empty((), dtype=object)
        arr[()] = w
        np.save(dl / "weights.npy", arr, allow_pickle=True)
        c.after = lambda: not marker.exists()
    if cid == "E56":  # TF weights with --bn_mode pytorch given (left out, the files' spec sets tf)
        return c.argv(*EVAL, "--backbone", "resnet12_slim", "--bn_mode", "pytorch", "--eval_weights", str(dl))
    if cid == "E57":  # TF weights for another backbone
        return c.argv(*EVAL, "--bn_mode", "tf", "--eval_weights", str(dl))
    if cid == "E58":  # our checkpoint, trained with the other --bn_mode
        return c.argv(*EVAL, "--bn_mode", "tf", "--eval_weights", str(c.logs / META_DIR / "max_acc.pth"))
    if cid == "E59":  # --init_weights names TF weights that are not there
        return c.argv(*META, *TF, "--init_weights", str(c.tmp / "nowhere" / "weights.npy"))
    return c.argv(*EVAL, *TF, "--eval_weights", str(dl))




def distributed_case(cid: str, c: Case, monkeypatch) -> list[str]:
    """The torchrun rows (issue 13); the real 2-process runs are in tests/test_distributed.py."""
    from utils import distributed
    if cid == "E63":  # pre-train resumed on another number of processes (the run was stored as 2 processes)
        p = c.logs / PRE_DIR / "resume.pth"
        st = torch.load(p, weights_only=True)
        st["args"].update(world_size=2, pre_global_batch=96)
        torch.save(st, p)
        return c.argv(*PRE, "--resume", "--pre_max_epoch", "3")
    if cid == "E64":  # another rank dies mid-run (simulated here; for real in tests/test_distributed.py)
        import trainer.pre

        def peer_died(self, epoch):
            monkeypatch.setattr(distributed, "_INFO", distributed.DistInfo(0, 2, 0, "gloo", 600.0))
            distributed._collective(lambda: (_ for _ in ()).throw(RuntimeError(
                "[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500")), "all-reduce")
        monkeypatch.setattr(trainer.pre.PreTrainer, "train_epoch", peer_died)
        return c.argv(*PRE, "--pre_label", "peer")
    for k in distributed.ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    if cid == "E65":  # WORLD_SIZE without the rest of torchrun's environment
        return c.argv(*PRE, "--pre_label", "env")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in dict(RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    if cid == "E66":  # rank 1 cannot reach rank 0's rendezvous within --dist_timeout
        return c.argv(*PRE, "--pre_label", "join", "--dist_timeout", "2")
    if cid == "E67":  # LOCAL_RANK beyond the visible GPUs (a 1-GPU machine simulated)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        return [a if a != "cpu" else "cuda" for a in c.argv(*PRE, "--pre_label", "gpus")]
    raise KeyError(cid)


# ------------------------------------------------------------------ issue 20 (Part SEED): flags (E110-E126)
# Each flag's range at parse time (E110-E117), flags that conflict (E118-E123), messages that pointed the wrong way
# (E124-E126). E127-E129 are run_experiment.py's constants: run by tests/test_run_experiment.py test_catalogue_row.
SEED_ROWS = [f"E{i}" for i in range(110, 127)]
RUN_EXPERIMENT_ROWS = ("E127", "E128", "E129", "E189")


def seed_case_argv(cid: str, c: Case, monkeypatch) -> list[str]:
    pre_ck, meta_ck = str(c.logs / PRE_DIR / "max_acc.pth"), str(c.logs / META_DIR / "max_acc.pth")
    return {
        "E110": lambda: c.argv(*PRE, "--seed", "-1"),
        "E111": lambda: c.argv(*PRE, "--gpu", "-1"),
        "E112": lambda: c.argv(*META, "--base_lr", "nan"),
        "E113": lambda: c.argv(*PRE, "--pre_lr", "1e308"),
        "E114": lambda: c.argv(*PRE, "--pre_custom_weight_decay", "-1"),
        "E115": lambda: c.argv(*META, "--dist_timeout", "inf"),
        "E116": lambda: c.argv(*META, "--num_batch", str(2**64)),
        "E117": lambda: COMMON + PRE + ["--dataset_dir", c.npz, "--log_root", ""],
        "E118": lambda: c.argv(*PRE, "--resume", "--overwrite"),
        "E119": lambda: c.argv(*META, "--first_order", "--second_order"),
        "E120": lambda: c.argv(*META, "--meta_label", "ht", "--ht_hard_tasks", "2"),
        "E121": lambda: c.argv(*META, "--meta_label", "two", "--init_weights", pre_ck, "--pre_init_epoch", "1"),
        "E122": lambda: c.argv(*META, "--meta_label", "ev", "--eval_weights", meta_ck),
        "E123": lambda: c.argv(*META, "--meta_label", "floor", "--meta_lr1", "0.0001", "--meta_lr_min", "0.01"),
        "E124": lambda: c.argv(*EVAL, "--eval_weights", str(c.logs / META_DIR / "max_ac.pth")),
        "E125": lambda: c.argv(*EVAL, "--eval_weights", str(c.logs / META_DIR)),
        "E126": lambda: c.argv(*META, "--meta_label", "snap", "--pre_init_epoch", "1"),
    }[cid]()


def _one_line(rc: int, err: str, *names: str) -> str:
    """The refusal of a flag: exit 2, one ``error:`` line naming each of ``names``, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    assert all(n in lines[0] for n in names), (names, lines[0])
    return lines[0]


@pytest.mark.parametrize("phase", [PRE, META, EVAL], ids=["pre", "meta", "eval"])
@pytest.mark.parametrize("flag,value", [
    ("--seed", str(2**32)), ("--eval_seed", "-1"), ("--eval_seed", str(2**64)), ("--gpu", "0,x"), ("--gpu", "cpu"),
    ("--meta_lr1", "inf"), ("--gamma", "nan"), ("--pre_val_base_lr", "-inf"), ("--pre_custom_momentum", "0"),
    ("--pre_custom_momentum", "1"), ("--meta_lr_min", "-1"), ("--dist_timeout", "0.5"), ("--image_size", "5000"),
    ("--num_val_episodes", str(2**63)), ("--num_workers", "-1"), ("--eval_batch_size", "0"), ("--cache_dir", ""),
    ("--meta_label", "a/b"), ("--pre_label", ".."), ("--shot", "1.5"), ("--test_query", "0")])
def test_every_edge_value_of_a_flag_is_one_line(flag, value, phase, world, tmp_path, capsys):
    """Edge values (negative, zero, inf, nan, past int64 / float32 / the seed range, empty, not a name) of the
    flags of config/options.py, in every phase: one line naming the flag (they were tracebacks or silent)."""
    c = Case(world, tmp_path)
    before = tree_hashes(c.logs)
    rc, err = run_cli(c.argv(*phase, f"{flag}={value}"), capsys)  # (= so that -inf is read as a value)
    _one_line(rc, err, f"argument {flag}: must be")
    assert tree_hashes(c.logs) == before


def test_seed_bounds_are_accepted(world, tmp_path, capsys):
    """The ends of the seed range run (0 = draw one; 2**32 - 1 the largest): the range is not narrower than said."""
    c = Case(world, tmp_path)
    for seed in ("0", str(2**32 - 1)):
        rc, err = run_cli(c.argv(*EVAL, "--seed", seed, "--eval_seed", seed, "--num_test_episodes", "2"), capsys)
        assert rc == 0, err


def test_an_empty_weights_folder_says_weights_npy_is_missing_not_bn_mode(world, tmp_path, capsys):
    """The files are checked before --bn_mode (the message pointed at --bn_mode tf, which then fails the same way)."""
    c = Case(world, tmp_path)
    (c.tmp / "dl").mkdir()
    for argv in (c.argv(*META, "--meta_label", "x", "--init_weights", str(c.tmp / "dl")),
                 c.argv(*EVAL, "--eval_weights", str(c.tmp / "dl"))):
        line = _one_line(*run_cli(argv, capsys), f"no weights.npy in {c.tmp / 'dl'}")
        assert "bn_mode" not in line


def test_a_missing_init_weights_file_is_named_with_what_its_folder_holds(world, tmp_path, capsys):
    c = Case(world, tmp_path)
    gone = c.logs / PRE_DIR / "epoch3.pth"
    line = _one_line(*run_cli(c.argv(*META, "--meta_label", "x", "--init_weights", str(gone)), capsys),
                     f"--init_weights {gone}: no such file; {gone.parent} holds ", "max_acc.pth")
    assert "run --phase pre_train" not in line and "or pass --init_weights" not in line
    line = _one_line(*run_cli(c.argv(*EVAL, "--eval_weights", str(c.tmp / "no" / "x.pth")), capsys),
                     "no such file (the folder", "does not exist either)")
    assert "run --phase meta_train" not in line


@pytest.mark.parametrize("flag,phase", [("--pre_train_dir", PRE), ("--meta_val_dir", META), ("--meta_test_dir", EVAL)])
def test_a_missing_split_folder_names_the_flag_that_gave_it(flag, phase, world, tmp_path, capsys):
    """E01 said "set --dataset_dir" also when the folder came from --pre_train_dir & co. (not read then)."""
    c = Case(world, tmp_path)
    line = _one_line(*run_cli(c.argv(*phase, flag, str(c.tmp / "nowhere")), capsys),
                     f"dataset folder not found: {c.tmp / 'nowhere'} ", f"; set {flag}, or try")
    assert "--dataset_dir" not in line


def test_tf_weights_for_another_backbone_without_bn_mode_name_both_flags(world, tmp_path, capsys):
    """Both flags to change in one line where both are wrong: meta-train checks every model flag against its start
    file, meta-test the ones given (left out, --bn_mode comes from the files: then only --backbone is named)."""
    c = Case(world, tmp_path)
    official_files(str(c.tmp / "dl"), widths=SLIM)
    _one_line(*run_cli(c.argv(*EVAL, "--eval_weights", str(c.tmp / "dl"), "--bn_mode", "pytorch"), capsys),
              "use --backbone resnet12", "not conv4, and pass --bn_mode tf")
    _one_line(*run_cli(c.argv(*META, "--meta_label", "tf", "--init_weights", str(c.tmp / "dl")), capsys),
              "use --backbone resnet12", "not conv4, and pass --bn_mode tf")
    line = _one_line(*run_cli(c.argv(*EVAL, "--eval_weights", str(c.tmp / "dl")), capsys), "use --backbone resnet12")
    assert "bn_mode" not in line


def test_init_weights_at_pre_train_is_refused(world, tmp_path, capsys):
    c = Case(world, tmp_path)
    _one_line(*run_cli(c.argv(*PRE, "--pre_label", "x", "--init_weights", "scratch"), capsys),
              "--init_weights scratch is where --phase meta_train starts; pre_train always")


def test_the_abbreviated_flags_conflict_too(world, tmp_path, capsys):
    """argparse accepts unambiguous prefixes: --first --second is the same conflict as E119."""
    c = Case(world, tmp_path)
    _one_line(*run_cli(c.argv(*META, "--first", "--second"), capsys), "--first_order and --second_order contradict")


@pytest.mark.parametrize("case", ["init_weights_at_eval", "ht_after_last_epoch", "stop_after_last_epoch"])
def test_useless_flags_warn_in_one_line_and_the_run_goes_on(case, world, tmp_path, capsys):
    """Merely useless flags are a one-line warning (stdout), not an error: the command does what it would without
    them (exit 0)."""
    c = Case(world, tmp_path)
    argv, expect = {
        "init_weights_at_eval": (c.argv(*EVAL, "--init_weights", str(c.logs / PRE_DIR / "max_acc.pth")),
                                 f"note: --init_weights is read by meta_train only; meta_eval tests "
                                 f"{c.logs / META_DIR / 'max_acc.pth'} (pass --eval_weights"),
        "ht_after_last_epoch": (c.argv(*META, "--meta_label", "ht", "--hard_task", "--ht_start_epoch", "3"),
                                "warning: --ht_start_epoch 3 is after the last epoch (--max_epoch 1): no hard task"),
        "stop_after_last_epoch": (c.argv(*META, "--meta_label", "st", "--stop_after_epoch", "5"),
                                  "warning: --stop_after_epoch 5 is after the last epoch (1)"),
    }[case]
    capsys.readouterr()
    assert main.cli(argv) == 0
    out = capsys.readouterr().out.splitlines()
    notes = [ln for ln in out if ln.startswith(("warning", "note"))]
    assert len(notes) == 1 and notes[0].startswith(expect), out


# issue 11: E36-E48, 12: E50-E59, 13: E63-E67 (torchrun), 16: E70, 20: E71-E89 (reading data), E90-E109 (run
# faults), E110-E126 (flags; E127-E129 run_experiment), 21: E140-E141 (the model spec), 22: E160-E174 (predict),
# 23: E180-E188 (compare; E189 run_experiment, E190-E192 tools.report)
CASES = ([f"E{i:02d}" for i in range(1, 36)] + sorted(FORMAT_CASES) + TF_ROWS + [f"E{i}" for i in range(63, 68)]
         + ["E70"] + sorted(DATA_CASES) + sorted(RUN_CASES) + SEED_ROWS + sorted(MODEL_CASES)
         + sorted(PREDICT_CASES) + sorted(COMPARE_CASES))


def test_every_row_of_the_catalogue_has_a_case():
    rows = doc_rows()
    assert len(rows) >= 15
    assert sorted(rows) == sorted(CASES + list(RUN_EXPERIMENT_ROWS) + list(REPORT_ROWS))  # (string order: E100 < E11)


def run_cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        rc = main.cli(argv)
    except SystemExit as e:  # argparse errors exit from inside parse_args
        rc = e.code
    return rc, capsys.readouterr().err


def check_output(cid: str, rc: int, err: str) -> None:
    msg, code = doc_rows()[cid]
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("interrupted by " if msg.startswith("interrupted by ") else "error: "), err
    assert rc == code != 0, (rc, err)
    assert pattern(msg).fullmatch(lines[0]), f"\n  doc:    {msg}\n  stderr: {lines[0]}"


@pytest.mark.parametrize("cid", CASES)
def test_bad_input(cid, world, tmp_path, capsys, monkeypatch):
    c = Case(world, tmp_path)
    c.after = lambda: True
    argv = case_argv(cid, c, monkeypatch)
    before = tree_hashes(c.logs)
    rc, err = run_cli(argv, capsys)
    print(f"\n{cid} rc={rc} {err.strip()}", file=sys.__stdout__)
    check_output(cid, rc, err)
    after = tree_hashes(c.logs)
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not changed, f"files already saved were changed: {changed}"
    assert not [k for k in after if os.path.basename(k).startswith(".tmp")], after
    assert c.after()


@pytest.mark.parametrize("cid", SUBPROCESS + PREDICT_SUBPROCESS)
def test_bad_input_subprocess(cid, world, tmp_path, monkeypatch):
    """The same rows through ``python main.py``: stderr holds the one error line and nothing else, and the log
    folder is as it was (predict: no ``predict/`` output folder)."""
    c = Case(world, tmp_path)
    c.after = lambda: True
    argv = case_argv(cid, c, monkeypatch)
    before = tree_hashes(c.logs)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, str(ROOT / "main.py")] + argv, cwd=str(tmp_path), env=env,
                       capture_output=True, text=True, timeout=120)
    check_output(cid, p.returncode, p.stderr)
    assert tree_hashes(c.logs) == before and not (c.logs / "predict").exists()
    assert c.after()  # E43: the command in the pickle did not run


def test_every_checkpoint_load_is_weights_only():
    """No code outside the tests calls ``torch.load`` without ``weights_only=True`` (a pickle cannot run code)."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".git") or "site-packages" in rel.parts:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if re.search(r"\btorch\.load\(", line) and "weights_only=True" not in line and "``" not in line:
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, offenders
