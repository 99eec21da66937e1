"""Faults of the machine, injected into real runs (issue 20, "What must hold"): a disk that fills up while a
checkpoint of epoch 2 is written, and SIGTERM (what ``timeout``, SLURM and Kubernetes send) to a real
``python main.py``. Each run is then continued with ``--resume`` and must end with the uninterrupted run's per-epoch
log (timings aside), TensorBoard curves and bit-identical weights, as ``tests/test_kill_resume.py`` shows for a
``kill -9``. Also: an interrupt before anything was saved says so (and not ``--resume``), and ``meta_eval`` on a
read-only folder prints its accuracy before it fails to write.

The full disk is the kernel's own: the temporary file of the failing write is redirected to ``/dev/full``
(``tests/test_errors.py`` ``_fail_writes``), and, where this process may mount one (root, Linux), also a real tmpfs
too small for epoch 2.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main
from tests.helpers import make_npz
from tests.test_errors import _fail_writes
from tests.trainer.test_resume import assert_same_run, hashes, tb_scalars, trlog
from utils.run_lock import RUN_FILES

ROOT = Path(__file__).resolve().parents[1]
RUN = "pre/custom_conv4"
EPOCHS = 3


def flags(npz: str, log_root: Path, epochs: int = EPOCHS) -> list[str]:
    return ["--phase", "pre_train", "--dataset", "custom", "--dataset_dir", npz, "--backbone", "conv4",
            "--image_size", "16", "--preprocess", "paper", "--pre_max_epoch", str(epochs), "--pre_step_size", "2",
            "--pre_batch_size", "32", "--pre_head", "linear", "--pre_optimizer", "adam", "--pre_lr", "0.002",
            "--num_val_episodes", "10", "--pre_val_update_step", "5", "--seed", "5", "--quiet", "--device", "cpu",
            "--log_root", str(log_root)]


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> str:
    return make_npz(str(tmp_path_factory.mktemp("faults") / "d.npz"), per_class=20, classes=(10, 6, 6))


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main.cli(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.startswith(".tmp")]


def _same_as_reference(ref: Path, run: Path) -> None:
    assert [r["epoch"] for r in trlog(run)] == list(range(1, EPOCHS + 1))
    assert_same_run(ref, run)
    tb_ref, tb_run = tb_scalars(ref), tb_scalars(run)
    assert tb_run.keys() == tb_ref.keys()
    for tag in tb_run:
        assert tb_run[tag] == tb_ref[tag], tag


# --------------------------------------------------------------------------------------------- disk full
def _check_disk_full_then_resume(npz, tmp_path, capsys, run: Path, ref: Path, fail, free) -> None:
    """``fail()`` makes the disk full for the run's epoch-2 files; the run stops with one line, epoch 1's files are
    intact and loadable; ``free()`` makes room, and ``--resume`` ends where the uninterrupted run ``ref`` ended."""
    argv = flags(npz, run.parents[1])
    fail()
    rc, _, err = _cli(argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: cannot write {run}{os.sep}"), err
    assert lines[0].endswith(f": No space left on device; the run is saved up to epoch 1 in {run} (resume.pth, "
                             "intact): free space on its disk, then continue with the same command plus --resume"), err
    for f in ("resume.pth", "last.pth", "max_acc.pth"):  # the last good checkpoint: whole and loadable
        assert torch.load(run / f, weights_only=True)["epoch"] == 1, f
    assert [r["epoch"] for r in json.loads((run / "trlog.json").read_text())] == [1]
    assert _no_temporaries(run) and not (run / ".lock").exists()
    free()
    rc, out, err = _cli(argv + ["--resume"], capsys)
    assert rc == 0, err
    assert f"resuming {run} after epoch 1" in out
    _same_as_reference(ref, run)


@pytest.fixture(scope="module")
def reference(npz, tmp_path_factory) -> Path:
    """The uninterrupted run, in this process (the fault tests run in-process too: the same threads, the same
    arithmetic)."""
    root = tmp_path_factory.mktemp("reference")
    assert main.cli(flags(npz, root)) == 0
    return root / RUN


def test_disk_full_at_epoch_2_then_resume_equals_uninterrupted(npz, tmp_path, capsys, monkeypatch, reference):
    run = tmp_path / "logs" / RUN
    # epoch 1 writes 5 files through atomic_write (max_acc, last, trlog, args, resume); the 6th, epoch 2's first
    # checkpoint, meets a full disk
    _check_disk_full_then_resume(npz, tmp_path, capsys, run, reference,
                                 fail=lambda: _fail_writes(monkeypatch, run, after=5, code=errno.ENOSPC),
                                 free=monkeypatch.undo)


def _can_mount_tmpfs(where: Path) -> bool:
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True).returncode
    if ok == 0:
        subprocess.run(["umount", str(where)], capture_output=True)
    return ok == 0


def test_real_tmpfs_full_at_epoch_2_then_resume_equals_uninterrupted(npz, tmp_path, capsys, reference):
    """The same on a real file system that fills up: a tmpfs sized to hold epoch 1's files and not epoch 2's
    ``epoch2.pth`` (``--pre_save_every 1``), then enlarged (``mount -o remount``) before ``--resume``."""
    mnt = tmp_path / "mnt"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
    # the reference's epoch-1 footprint with one snapshot per epoch: measured, not assumed
    probe = tmp_path / "probe"
    assert main.cli(flags(npz, probe) + ["--pre_save_every", "1", "--stop_after_epoch", "1",
                                          "--cache_dir", str(tmp_path / "cache")]) == 0
    files = [p for p in (probe / RUN).rglob("*") if p.is_file()]
    pages = sum(-(-p.stat().st_size // 4096) * 4096 for p in files)
    snapshot = (probe / RUN / "epoch1.pth").stat().st_size
    size = pages + snapshot // 2  # room for epoch 1, not for epoch 2's new epoch2.pth
    ref_root = tmp_path / "ref"
    assert main.cli(flags(npz, ref_root) + ["--pre_save_every", "1", "--cache_dir", str(tmp_path / "cache")]) == 0
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    try:
        run = mnt / RUN
        argv = flags(npz, mnt) + ["--pre_save_every", "1", "--cache_dir", str(tmp_path / "cache")]
        rc, _, err = _cli(argv, capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith(f"error: cannot write {run}{os.sep}") and "No space left on device" in lines[0]
        assert "the run is saved up to epoch 1" in lines[0] and lines[0].endswith("plus --resume"), err
        for f in ("resume.pth", "last.pth", "epoch1.pth"):
            assert torch.load(run / f, weights_only=True)["epoch"] == 1, f
        assert _no_temporaries(run)
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        rc, _, err = _cli(argv + ["--resume"], capsys)
        assert rc == 0, err
        _same_as_reference(ref_root / RUN, run)
        for n in range(1, EPOCHS + 1):
            a = torch.load(ref_root / RUN / f"epoch{n}.pth", weights_only=True)["encoder"]
            b = torch.load(run / f"epoch{n}.pth", weights_only=True)["encoder"]
            assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        # (fails if this process still held a file open on it: a run must close its files on every exit path)
        assert subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0


# --------------------------------------------------------------------------------------------- SIGTERM
def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "the run ended too early"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.01)


def test_sigterm_then_resume_equals_uninterrupted(npz, tmp_path):
    cmd = lambda root: [sys.executable, str(ROOT / "main.py")] + flags(npz, root)  # noqa: E731
    ref = subprocess.Popen(cmd(tmp_path / "ref"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    victim = subprocess.Popen(cmd(tmp_path / "term"), env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    run = tmp_path / "term" / RUN
    _wait_for(run / "resume.pth", victim)
    assert victim.poll() is None, "the run finished before it could be stopped"
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=60)
    assert victim.returncode == 143, err
    saved = torch.load(run / "resume.pth", weights_only=True)["epoch"]
    assert 1 <= saved < EPOCHS
    assert err.strip().splitlines() == [f"interrupted by SIGTERM; {run} holds the run up to epoch {saved}: continue "
                                        "it with the same command plus --resume"], err
    assert not (run / ".lock").exists() and _no_temporaries(run)
    resumed = subprocess.run(cmd(tmp_path / "term") + ["--resume"], env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} after epoch {saved}" in resumed.stdout
    _, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err
    _same_as_reference(tmp_path / "ref" / RUN, run)


def test_sigterm_before_the_first_epoch_says_nothing_was_saved(npz, tmp_path, capsys, monkeypatch):
    """SIGTERM right after the run took its folder, in an epoch too long to finish first: no --resume (which would
    fail with E26); the folder holds no run, so the same command starts again (no E35: it gets to its first epoch)."""
    argv = flags(npz, tmp_path, epochs=2) + ["--pre_iters_per_epoch", "1000000"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py")] + argv, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = tmp_path / RUN
    _wait_for(run / ".lock", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == [
        "interrupted by SIGTERM; nothing of this run was saved: run the same command again"]
    assert not [f for f in RUN_FILES + (".lock",) if (run / f).exists()]
    import trainer.pre
    from tests.test_errors import _signal_at
    _signal_at(monkeypatch, trainer.pre.PreTrainer, "train_epoch", signal.SIGTERM, epoch=1)
    rc, _, err = _cli(argv, capsys)  # the same command: past the folder checks, into its first epoch
    assert rc == 143 and "nothing of this run was saved" in err, err


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
def test_sigterm_while_loading_the_data(npz, tmp_path, capsys, monkeypatch, resumed):
    """An interrupt during data loading (or the cache build), before the run folder is claimed."""
    import trainer.base
    argv = flags(npz, tmp_path)
    if resumed:
        assert main.cli(argv + ["--stop_after_epoch", "1"]) == 0
    before = hashes(tmp_path / RUN) if resumed else {}
    load = trainer.base.DataBundle.load

    def interrupted(self, role):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return load(self, role)
    monkeypatch.setattr(trainer.base.DataBundle, "load", interrupted)
    rc, _, err = _cli(argv + (["--resume"] if resumed else []), capsys)
    assert rc == 143
    hint = (f"the run in {tmp_path / RUN} is as it was: run the same command again" if resumed else
            "nothing of this run was saved: run the same command again")
    assert err.strip().splitlines() == [f"interrupted by SIGTERM; {hint}"]
    assert (hashes(tmp_path / RUN) if resumed else {}) == before
    assert resumed or not list((tmp_path / RUN).rglob("*"))  # (the folder itself: ensure_writable made it)


# --------------------------------------------------------------------------------------------- read-only folders
def test_meta_eval_on_a_read_only_folder_prints_the_accuracy_first(npz, tmp_path, capsys, monkeypatch):
    """The results file cannot be written: the accuracy is on stdout before the error line, exit 5, and the
    results.json of an earlier evaluation is unchanged. A real read-only folder where this process can make one
    (chmod for a normal user; root ignores it, so there a read-only bind mount if allowed), else the simulated one."""
    assert main.cli(flags(npz, tmp_path, epochs=1)) == 0
    weights = tmp_path / RUN / "max_acc.pth"
    ev = flags(npz, tmp_path)[2:] + ["--phase", "meta_eval", "--eval_weights", str(weights),
                                     "--num_test_episodes", "10"]
    rc, out, _ = _cli(ev, capsys)
    assert rc == 0
    results = tmp_path / RUN / "results_pretrained_5way1shot.json"
    first = results.read_bytes()
    folder, undo = tmp_path / RUN, None
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = lambda: folder.chmod(0o755)  # noqa: E731
    elif sys.platform == "linux" and subprocess.run(["mount", "--bind", str(folder), str(folder)],
                                                    capture_output=True).returncode == 0:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        undo = lambda: subprocess.run(["umount", str(folder)], check=True)  # noqa: E731
    else:
        _fail_writes(monkeypatch, folder, after=0, code=errno.EROFS)
    try:
        rc, out2, err = _cli(ev, capsys)
    finally:
        if undo:
            undo()
    assert rc == 5
    accuracy = [ln for ln in out.splitlines() if ln.startswith("test accuracy:")]
    assert [ln for ln in out2.splitlines() if ln.startswith("test accuracy:")] == accuracy  # printed, the same
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: the results could not be written to {results}: "), err
    assert "the accuracy above is complete" in lines[0]
    assert results.read_bytes() == first and _no_temporaries(folder)


# --------------------------------------------------------------------------------------------- orphaned temporaries
def test_orphaned_temporaries_are_removed_when_a_run_claims_its_folder(npz, tmp_path, capsys):
    """A killed writer's ``.tmp_<pid>@<host>+...`` is removed when the next run takes the folder (fresh or
    resumed); a live process's is left alone; the unowned names of older versions go on --resume only."""
    from utils.misc import host_tag
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / RUN
    run.mkdir(parents=True)
    names = {"dead": f".tmp_{dead.pid}@{host_tag()}+x1.pth", "live": f".tmp_{os.getpid()}@{host_tag()}+x2.json",
             "legacy": ".tmp_ab12cd.pth"}
    for n in names.values():
        (run / n).write_bytes(b"half a checkpoint")
    rc, out, err = _cli(flags(npz, tmp_path) + ["--stop_after_epoch", "1"], capsys)
    assert rc == 0, err
    assert f"removed 1 temporary file(s) left in {run} by a killed process" in out
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".tmp")) == sorted([names["live"],
                                                                                         names["legacy"]])
    rc, out, err = _cli(flags(npz, tmp_path) + ["--resume", "--stop_after_epoch", "2"], capsys)
    assert rc == 0, err
    assert [p.name for p in run.iterdir() if p.name.startswith(".tmp")] == [names["live"]]
