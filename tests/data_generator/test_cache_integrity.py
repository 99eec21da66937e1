"""The decoded-image cache is verified when it is opened (data_generator/image_cache.py): every way an entry can be
damaged gives one ``cache entry …: <why>; rebuilding`` line and the correct images; orphaned temporary files of dead
processes are removed; a read-only or full cache folder is one line naming it.

The error rows (read-only folder that must take an entry, a full disk) are also in docs/ERRORS.md (E76-E78) and
tests/test_errors.py; here are the cases that are not errors.
"""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import main
from data_generator import image_cache as ic
from data_generator.dataset_loader import load_split, split_spec
from tests import format_fakes as F
from tests.helpers import make_folders
from utils.errors import UserError
from utils.misc import host_tag

ROOT = Path(__file__).resolve().parents[2]
SIZE = 16


@pytest.fixture()
def folder(tmp_path):
    return Path(make_folders(str(tmp_path / "data"), size=SIZE, per_class=4, classes=(3, 3, 3))) / "train"


def _entry(cache: Path, source_suffix: str | None = None) -> tuple[Path, Path]:
    """The (npy, json) of the single entry in ``cache`` (or the one whose source ends with ``source_suffix``)."""
    metas = sorted(cache.glob("*.json"))
    if source_suffix is not None:
        metas = [m for m in metas if json.loads(m.read_text())["source"].endswith(source_suffix)]
    assert len(metas) == 1, metas
    return metas[0].with_suffix(".npy"), metas[0]


def _reload(capsys, spec, cache, size=SIZE):
    capsys.readouterr()
    s = load_split(str(spec), size, cache_dir=str(cache))
    return s, [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("cache entry")]


def _no_temporaries(cache: Path) -> None:
    assert not [p.name for p in cache.iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------------------------------------ damaged entries
def _damage_cases():
    def zero_data(npy, meta, n):  # the example of the issue: header and size kept, the data zeroed
        arr = np.load(npy, mmap_mode="r+")
        arr[:] = 0
        arr.flush()
        return r"image 0 \(n0000/00000.png\) does not match its checksum \(and 11 more\)"

    def one_byte(npy, meta, n):
        arr = np.load(npy, mmap_mode="r+")
        arr[5, 3, 2, 1] ^= 1
        arr.flush()
        return r"image 5 \(n0001/00005.png\) does not match its checksum$"

    def truncate(npy, meta, n):
        data = npy.read_bytes()
        npy.write_bytes(data[:-100])
        return rf"its image file has {len(data) - 100} bytes, {len(data)} expected \(truncated or padded\)"

    def pad(npy, meta, n):
        with open(npy, "ab") as fh:
            fh.write(b"\0" * 10)
        return r"bytes, .* expected \(truncated or padded\)"

    def wrong_header(npy, meta, n):  # the same bytes under a header of another shape
        arr = np.load(npy)
        np.save(npy, arr.reshape(n * 3, SIZE, SIZE, 1))
        return r"header says uint8 \(36, 16, 16, 1\), the record uint8 \(12, 16, 16, 3\)"

    def not_npy(npy, meta, n):
        npy.write_bytes(b"garbage")
        return r"its image file is not a readable .npy file"

    def json_garbled(npy, meta, n):
        meta.write_text(meta.read_text()[:-20])
        return r"its record .*\.json does not parse"

    def json_labels_edited(npy, meta, n):
        r = json.loads(meta.read_text())
        r["labels"][0] = 2
        meta.write_text(json.dumps(r))
        return r"its record .*\.json does not match its checksum \(edited or corrupt\)"

    def json_missing(npy, meta, n):
        meta.unlink()
        return r"its record .*\.json is missing \(a build that was interrupted\)"

    def npy_missing(npy, meta, n):
        npy.unlink()
        return r"its image file is missing"

    def old_version(npy, meta, n):  # what version 1 wrote: no digests, its own version string
        r = json.loads(meta.read_text())
        for k in ("image_digests", "record_digest", "digest", "shape", "written"):
            r.pop(k)
        r["version"] = "mtl-imagecache-v1"
        meta.write_text(json.dumps(r))
        return r"it was written by mtl-imagecache-v1 \(this program reads mtl-imagecache-v2\)"

    return {f.__name__: f for f in (zero_data, one_byte, truncate, pad, wrong_header, not_npy, json_garbled,
                                    json_labels_edited, json_missing, npy_missing, old_version)}


DAMAGE = _damage_cases()


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_entry_is_rebuilt_with_one_line(case, folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    first = load_split(str(folder), SIZE, cache_dir=str(cache))
    ref = np.array(first.images)
    del first
    npy, meta = _entry(cache)
    why = DAMAGE[case](npy, meta, len(ref))
    s, lines = _reload(capsys, folder, cache)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"cache entry {npy}: ") and lines[0].endswith("; rebuilding")
    assert re.search(why, lines[0][len(f"cache entry {npy}: "):-len("; rebuilding")]), lines[0]
    np.testing.assert_array_equal(s.images, ref)                  # the correct images again
    assert sorted(p.name for p in cache.iterdir()) == sorted([npy.name, meta.name])  # rebuilt in place
    _no_temporaries(cache)
    s2, lines = _reload(capsys, folder, cache)                   # and now the entry is good: no line
    assert lines == [] and isinstance(s2.images, np.memmap)
    np.testing.assert_array_equal(s2.digests, s.digests)


def test_benchmark_file_labels_and_class_names_are_verified(tmp_path, capsys):
    """A format entry's labels and class names come from the record: an edit is caught, not trusted."""
    data = F.make_images(classes=(4, 3, 3), per_class=5, size=SIZE)
    root = F.write_metaoptnet(str(tmp_path / "mo"), data, "miniImageNet")
    cache = tmp_path / "cache"
    spec = split_spec(root, "train")
    first = load_split(spec, SIZE, cache_dir=str(cache))
    npy, meta = _entry(cache)
    for edit in (lambda r: r["class_names"].reverse(), lambda r: r["labels"].reverse()):
        r = json.loads(meta.read_text())
        edit(r)
        meta.write_text(json.dumps(r))
        s, lines = _reload(capsys, spec, cache)
        assert len(lines) == 1 and "does not match its checksum (edited or corrupt); rebuilding" in lines[0]
        assert s.class_names == first.class_names and s.labels.tolist() == first.labels.tolist()


def test_a_record_of_the_wrong_shape_is_rebuilt(folder, tmp_path, capsys):
    """A record whose digest was recomputed after an edit (a hand-made or buggy entry) is still checked against
    the image file and the dataset."""
    cache = tmp_path / "cache"
    load_split(str(folder), SIZE, cache_dir=str(cache))
    npy, meta = _entry(cache)
    r = json.loads(meta.read_text())
    r["labels"] = r["labels"][:-1]
    r["record_digest"] = ic._record_digest(r)
    meta.write_text(json.dumps(r))
    _, lines = _reload(capsys, folder, cache)
    assert len(lines) == 1 and "labels, class names or digests do not fit 12 images; rebuilding" in lines[0]


def test_zeroed_cache_gives_the_correct_accuracy_again(tmp_path, capsys):
    """The issue's example end to end: zero the data part of the test split's cache entry (size and header kept);
    meta_eval says so in one line, rebuilds, and prints the first run's accuracy (exit 0)."""
    data = make_folders(str(tmp_path / "data"), size=SIZE, per_class=10, classes=(8, 6, 6))
    logs = tmp_path / "logs"
    base = ["--dataset", "custom", "--backbone", "conv4", "--image_size", str(SIZE), "--preprocess", "paper",
            "--quiet", "--device", "cpu", "--seed", "1", "--dataset_dir", data, "--log_root", str(logs),
            "--num_val_episodes", "5", "--pre_val_update_step", "3", "--val_query", "5"]
    assert main.cli(base + ["--phase", "pre_train", "--pre_max_epoch", "1", "--pre_batch_size", "40",
                            "--pre_head", "linear", "--pre_optimizer", "adam", "--pre_lr", "0.001"]) == 0
    ev = base + ["--phase", "meta_eval", "--eval_weights", str(logs / "pre" / "custom_conv4" / "max_acc.pth"),
                 "--num_test_episodes", "20", "--update_step", "5", "--test_query", "5"]
    capsys.readouterr()

    def accuracy():
        assert main.cli(ev) == 0
        out = capsys.readouterr().out
        line = [ln for ln in out.splitlines() if ln.startswith("test accuracy:")]
        assert len(line) == 1
        return line[0], [ln for ln in out.splitlines() if ln.startswith("cache entry")]

    good, lines = accuracy()
    assert lines == []
    result = logs / "pre" / "custom_conv4" / "results_pretrained_5way1shot.json"
    first_json = result.read_bytes()
    npy, _ = _entry(logs / "cache", os.sep + "test")
    arr = np.load(npy, mmap_mode="r+")
    arr[:] = 0
    arr.flush()
    del arr
    again, lines = accuracy()
    assert len(lines) == 1 and lines[0].startswith(f"cache entry {npy}: image 0 ") and \
        "does not match its checksum (and 59 more); rebuilding" in lines[0]
    assert again == good and "20.00 ± 0.00" not in again
    assert result.read_bytes() == first_json


# ------------------------------------------------------------------------------------------------ orphaned files
def _orphan(cache: Path, pid: int, host: str | None = "mine", size: int = 4096) -> Path:
    host = host_tag() if host == "mine" else host
    name = f".0123abcd.npy.tmp-{pid}-deadbeef" + (f"@{host}" if host is not None else "")
    p = cache / name
    p.write_bytes(b"\1" * size)
    return p


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_build_killed_with_sigkill_leaves_a_file_that_the_next_use_removes(folder, tmp_path, capsys):
    """A real ``kill -9`` of a process in the middle of filling an entry; the next load removes its file (one line
    with the name and size) and builds the entry."""
    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from data_generator.image_cache import write_cache
        def fill(out):
            out[: len(out) // 2] = 7
            print("filling", flush=True)
            time.sleep(60)
        write_cache({str(cache)!r}, "k" * 40, 3000, 16, fill, {{}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "filling"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    left = [p for p in cache.iterdir() if ".tmp-" in p.name]
    assert len(left) == 1 and f".tmp-{proc.pid}-" in left[0].name
    capsys.readouterr()
    load_split(str(folder), SIZE, cache_dir=str(cache))
    out = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("removed")]
    assert len(out) == 1 and left[0].name in out[0] and str(cache) in out[0]
    assert "orphaned temporary file(s) of processes that no longer exist" in out[0] and " MB on disk)" in out[0]
    assert not left[0].exists()
    _no_temporaries(cache)


def test_only_the_files_of_dead_processes_on_this_host_are_removed(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        dead = _dead_pid()
        keep = [_orphan(cache, live.pid), _orphan(cache, os.getpid()), _orphan(cache, dead, host="other-node"),
                cache / ".unrelated.tmp", cache / "0123.npy"]
        for k in keep[3:]:
            k.write_bytes(b"x")
        gone = [_orphan(cache, dead), _orphan(cache, dead, host=None, size=10 * 2 ** 20)]  # v1 names had no host
        # a file older than a live process with that pid cannot be its (the pid was reused)
        reused = _orphan(cache, live.pid, host=None)
        old = time.time() - 3600
        os.utime(reused, (old, old))
        gone.append(reused)
        capsys.readouterr()
        removed = ic.remove_orphans(str(cache))
        out = capsys.readouterr().out.strip().splitlines()
    finally:
        live.kill()
        live.wait()
    assert sorted(p for p, _ in removed) == sorted(str(p) for p in gone)
    assert all(k.exists() for k in keep) and not any(g.exists() for g in gone)
    assert len(out) == 1 and out[0].startswith(f"removed 3 orphaned temporary file(s) of processes that no longer "
                                               f"exist from the image cache {cache} (10.0 MB on disk): ")


# ------------------------------------------------------------------------------------------------ read-only and full
class ReadOnly:
    """Make a cache folder read-only in a way that binds this process: ``chmod a-w`` for a normal user; as root
    (which chmod does not stop) a tmpfs mounted on the folder and remounted read-only (``EROFS``), where the
    platform allows it (else the test is skipped)."""

    def __init__(self, folder: Path):
        self.folder, self.mounted = folder, False
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                              capture_output=True).returncode != 0:
                pytest.skip("as root, a read-only folder needs a mount, which this platform refuses")
            self.mounted = True

    def freeze(self) -> None:
        if self.mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(self.folder)], check=True)
        else:
            for p in self.folder.iterdir():
                os.chmod(p, 0o444)
            os.chmod(self.folder, 0o555)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)  # lazy: memmaps may be open
        else:
            os.chmod(self.folder, 0o755)


def test_a_read_only_cache_folder_with_a_valid_entry_is_read(tmp_path, capsys):
    data = Path(make_folders(str(tmp_path / "data"), size=SIZE, per_class=4, classes=(3, 3, 3)))
    cache = tmp_path / "cache"
    ro = ReadOnly(cache)
    try:
        ref = np.array(load_split(str(data / "train"), SIZE, cache_dir=str(cache)).images)
        orphan = _orphan(cache, _dead_pid())  # cannot be removed from a read-only folder: left, silently
        ro.freeze()
        with pytest.raises(OSError):
            (cache / "probe").write_text("x")
        capsys.readouterr()
        s = load_split(str(data / "train"), SIZE, cache_dir=str(cache))
        assert isinstance(s.images, np.memmap)
        np.testing.assert_array_equal(s.images, ref)
        assert capsys.readouterr().out == "" and orphan.exists()
        with pytest.raises(UserError) as e:  # an entry that must be written: one line, naming the folder
            load_split(str(data / "val"), SIZE, cache_dir=str(cache))
        why = "Read-only file system" if ro.mounted else "Permission denied"
        assert str(e.value) == (f"cannot write the image cache in {cache}: {why}; make it writable, or pass "
                                "--cache_dir none (decode without a cache) or --cache_dir <another folder>")
    finally:
        ro.close()


def test_a_full_cache_folder_is_one_line_before_anything_is_decoded(folder, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    calls = []
    import data_generator.folders as folders
    monkeypatch.setattr(folders, "decode_all", lambda *a: calls.append(a))
    cache = tmp_path / "cache"
    with pytest.raises(UserError) as e:
        load_split(str(folder), SIZE, cache_dir=str(cache))
    assert str(e.value).startswith(f"cannot write the image cache in {cache}: no space left on the device (the "
                                   "entry needs ")
    assert "; free space on it, or pass --cache_dir none" in str(e.value) and not calls and os.listdir(cache) == []


def test_a_real_full_tmpfs(folder, tmp_path):
    """On a real 128 KB tmpfs (root on Linux only; skipped elsewhere): the reservation fails with the line (no SIGBUS
    halfway through the memory map), nothing is left, and a small entry still fits."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root and a platform that allows it")
    try:
        big = Path(make_folders(str(tmp_path / "big"), size=SIZE, per_class=100, classes=(3, 1, 1))) / "train"
        with pytest.raises(UserError, match=r"no space left on the device \(the entry needs 225\.1 KB, .* free\)"):
            load_split(str(big), SIZE, cache_dir=str(mnt / "cache"))
        assert os.listdir(mnt / "cache") == []
        load_split(str(folder), SIZE, cache_dir=str(mnt / "cache"))  # a small entry still fits
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
