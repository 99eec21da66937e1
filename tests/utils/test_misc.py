import math
import os
import random

import numpy as np
import pytest
import torch

from utils.misc import get_rng_state, mean_ci, resolve_seed, set_rng_state, write_json_atomic


def test_mean_ci_is_official_formula():
    acc = np.array([0.2, 0.4, 0.6, 0.8, 1.0])
    mean, ci = mean_ci(acc)
    assert mean == pytest.approx(0.6)
    # population std (np.std, ddof=0): sqrt(0.08) ; 1.96 * std / sqrt(5)
    assert ci == pytest.approx(1.96 * math.sqrt(0.08) / math.sqrt(5))


def test_mean_ci_of_constant_is_zero_and_empty_raises():
    assert mean_ci([0.5] * 600) == (0.5, 0.0)
    with pytest.raises(ValueError):
        mean_ci([])


def test_rng_state_roundtrip_restores_every_generator():
    state = get_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b


def test_rng_state_survives_weights_only_load(tmp_path):
    state = get_rng_state()
    torch.save(state, tmp_path / "s.pth")
    loaded = torch.load(tmp_path / "s.pth", weights_only=True)
    x = (np.random.rand(), torch.rand(1).item())
    set_rng_state(loaded)
    assert (np.random.rand(), torch.rand(1).item()) == x


def test_resolve_seed_keeps_nonzero_and_draws_for_zero():
    assert resolve_seed(7) == 7
    s = resolve_seed(0)
    assert isinstance(s, int) and s > 0


def test_write_json_atomic(tmp_path):
    p = tmp_path / "sub" / "x.json"
    write_json_atomic(str(p), {"a": 1})
    assert p.read_text().strip().startswith("{")
    assert not [f for f in p.parent.iterdir() if f.name.startswith(".tmp_")]


# ---------------------------------------------------------------- issue 20: write faults and orphaned temporaries
def _dead_pid() -> int:
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_atomic_write_names_its_temporary_after_its_process(tmp_path, monkeypatch):
    import os

    from utils import misc
    seen = []
    real = misc.tempfile.mkstemp
    monkeypatch.setattr(misc.tempfile, "mkstemp", lambda **kw: seen.append(real(**kw)) or seen[-1])
    write_json_atomic(str(tmp_path / "x.json"), [1])
    name = os.path.basename(seen[0][1])
    assert name.startswith(f".tmp_{os.getpid()}@") and name.endswith(".json")
    assert misc._TMP_OWNER.match(name).groups() == (str(os.getpid()), misc.host_tag())


def test_a_full_disk_is_one_write_error_naming_the_file_and_the_old_file_stays(tmp_path, monkeypatch):
    """torch.save over a full disk raises a RuntimeError without the errno; atomic_write reports the OSError it
    recorded, removes its temporary file and leaves the previous checkpoint whole."""
    import errno
    import os

    from utils import misc
    from utils.checkpoint import save_atomic
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    path = tmp_path / "ck.pth"
    save_atomic({"w": torch.arange(5)}, str(path))
    before = path.read_bytes()
    real = misc.tempfile.mkstemp

    def full(**kw):
        fd, p = real(**kw)
        os.dup2(os.open("/dev/full", os.O_WRONLY), fd)
        return fd, p
    monkeypatch.setattr(misc.tempfile, "mkstemp", full)
    for write in (lambda: save_atomic({"w": torch.zeros(10000)}, str(path)),
                  lambda: write_json_atomic(str(tmp_path / "t.json"), list(range(10000)))):
        with pytest.raises(misc.WriteError) as e:
            write()
        assert e.value.reason == os.strerror(errno.ENOSPC) and e.value.fix == "free space on its disk"
        assert str(e.value).startswith(f"cannot write {tmp_path}{os.sep}")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pth"]


@pytest.mark.parametrize("code,fix", [("EACCES", "make {d} writable"), ("EROFS", "make {d} writable"),
                                      ("EDQUOT", "free space on its disk"), ("EIO", "check {d} and its disk")])
def test_write_error_says_what_to_do_for_each_errno(tmp_path, code, fix):
    import errno
    import os

    from utils.misc import write_error
    e = write_error(str(tmp_path / "a.json"), OSError(getattr(errno, code), os.strerror(getattr(errno, code))))
    assert e.fix == fix.format(d=tmp_path) and e.reason == os.strerror(getattr(errno, code))


def test_a_file_in_the_way_is_named(tmp_path):
    from utils.misc import WriteError
    (tmp_path / "sub").write_text("a file, not a folder")
    with pytest.raises(WriteError, match=r"\(move .*sub out of the way, or write somewhere else\)"):
        write_json_atomic(str(tmp_path / "sub" / "x.json"), 1)


def test_orphaned_temporaries_of_dead_processes_are_removed_and_no_others(tmp_path):
    import os

    from utils.misc import host_tag, remove_orphaned_temporaries
    dead, host = _dead_pid(), host_tag()
    names = {"dead": f".tmp_{dead}@{host}+abc_12.pth", "live": f".tmp_{os.getpid()}@{host}+def.json",
             "elsewhere": f".tmp_{dead}@other-host+ghi.pth", "legacy": ".tmp_k2j_3hx.pth", "keep": "last.pth"}
    for n in names.values():
        (tmp_path / n).write_text("x")
    assert remove_orphaned_temporaries(str(tmp_path)) == [names["dead"]]
    assert remove_orphaned_temporaries(str(tmp_path), legacy=True) == [names["legacy"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["live"], names["elsewhere"], "last.pth"])
    assert remove_orphaned_temporaries(str(tmp_path / "missing")) == []


def test_torch_save_over_a_disk_that_fills_midway_is_a_write_error(tmp_path, monkeypatch):
    """A real disk takes the first bytes, then refuses (``ENOSPC``) with nothing left to flush on close: torch.save
    then raises ``RuntimeError: ... unexpected pos ...`` (the errno lost); atomic_write names the recorded OSError."""
    import errno
    import os
    import types

    from utils import misc
    from utils.checkpoint import save_atomic

    class FillsUp:
        def __init__(self, fd, mode):
            self.f, self.room = open(fd, mode, buffering=0), 1000

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(misc, "os", types.SimpleNamespace(**{**vars(os), "fdopen": FillsUp}))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # what torch.save alone makes of it
        with FillsUp(os.open(tmp_path / "plain.pth", os.O_WRONLY | os.O_CREAT), "wb") as f:
            torch.save({"w": torch.zeros(10000)}, f)
    with pytest.raises(misc.WriteError, match=r"^cannot write .*ck\.pth: No space left on device \(free space"):
        save_atomic({"w": torch.zeros(10000)}, str(tmp_path / "ck.pth"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.pth"]


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    """Not mkstemp's 0600: a checkpoint in a shared folder is readable by whom a plain open() would allow."""
    from utils.misc import atomic_write
    old = os.umask(0o027)
    try:
        atomic_write(str(tmp_path / "a.json"), lambda f: f.write("{}"))
        with open(tmp_path / "b.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.json") == 0o640


# ------------------------------------------------------------------ issue 22: the predictions' files and interval
def test_atomic_write_many_writes_all_files_or_none(tmp_path, monkeypatch):
    """A failure at the second file (its temporary cannot be written) leaves the first file as it was, the second
    not created, and no temporary behind; without a failure all of them are replaced."""
    import errno
    import tempfile

    from utils.misc import WriteError, atomic_write_many
    a, b = tmp_path / "a.csv", tmp_path / "b.json"
    a.write_text("old\n")
    real, seen = tempfile.mkstemp, [0]

    def mkstemp(*args, **kw):
        seen[0] += 1
        if seen[0] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kw)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(WriteError, match=f"cannot write {b}: No space left on device"):
        atomic_write_many([(str(a), lambda f: f.write("new\n"), False), (str(b), lambda f: f.write("{}"), False)])
    assert a.read_text() == "old\n" and not b.exists() and sorted(os.listdir(tmp_path)) == ["a.csv"]
    monkeypatch.setattr(tempfile, "mkstemp", real)
    atomic_write_many([(str(a), lambda f: f.write("new\n"), False), (str(b), lambda f: f.write(b"{}"), True)])
    assert a.read_text() == "new\n" and b.read_bytes() == b"{}" and sorted(os.listdir(tmp_path)) == ["a.csv", "b.json"]


@pytest.mark.parametrize("correct,n", [(0, 15), (10, 15), (15, 15), (1, 2), (597, 600)])
def test_wilson_interval_solves_its_quadratic(correct, n):
    """The Wilson bounds are the p with (phat - p)^2 = z^2 p (1 - p) / n (float64), inside [0, 1], around phat."""
    from utils.misc import wilson_interval
    z, phat = 1.96, correct / n
    lo, hi = wilson_interval(correct, n)
    assert 0 <= lo <= phat <= hi <= 1 and hi - lo > 0
    for p in (lo, hi):
        assert abs((phat - p) ** 2 - z * z * p * (1 - p) / n) <= 1e-12
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
