"""No run destroys another (issue #15): the run-folder lock, the refusal to overwrite, ``--overwrite``, stale locks,
Ctrl-C, and ``meta_eval`` beside a training."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import main
from tests.helpers import make_npz
from tests.trainer.test_resume import assert_same_run, hashes
from utils.run_lock import RunLock

ROOT = Path(__file__).resolve().parents[1]
RUN = "pre/custom_conv4"


def command(npz: str, log_root: Path, epochs: int = 3) -> list[str]:
    return ["--phase", "pre_train", "--dataset", "custom", "--dataset_dir", npz, "--backbone", "conv4",
            "--image_size", "16", "--preprocess", "paper", "--pre_max_epoch", str(epochs), "--pre_batch_size", "32",
            "--pre_head", "linear", "--pre_optimizer", "adam", "--pre_lr", "0.002", "--num_val_episodes", "10",
            "--pre_val_update_step", "5", "--seed", "5", "--quiet", "--device", "cpu", "--log_root", str(log_root)]


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> str:
    return make_npz(str(tmp_path_factory.mktemp("lock") / "d.npz"), per_class=20, classes=(10, 6, 6))


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "the run ended before it took its lock"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.01)


def test_second_concurrent_run_is_refused_and_the_first_is_intact(npz, tmp_path):
    """The first run is held still (SIGSTOP) from the moment its lock holds its process id until the second run has
    been refused, so it cannot end first however loaded the machine is (it used to run 40 epochs for that); a lone
    run of the same command, started beside it, is what its files must equal."""
    def main_py(root: Path) -> list[str]:
        return [sys.executable, str(ROOT / "main.py")] + command(npz, root, epochs=4)
    lone = subprocess.Popen(main_py(tmp_path / "lone"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # the same thread count as the first
    first = subprocess.Popen(main_py(tmp_path / "a"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    lock = tmp_path / "a" / RUN / ".lock"
    _wait_for(lock, first)
    while not lock.read_text():  # created, its content not yet written
        time.sleep(0.001)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = subprocess.run(main_py(tmp_path / "a"), env=_env(), capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run ended before it could be held"
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: the run folder {tmp_path / 'a' / RUN} is in use by "
                                                   f"process {first.pid} on {socket.gethostname()}"), second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert not lock.exists()  # released at the end
    assert lone.wait(timeout=300) == 0, lone.stderr.read()
    assert_same_run(tmp_path / "lone" / RUN, tmp_path / "a" / RUN)  # the first run's files are a lone run's


def test_rerun_is_refused_then_overwrite_moves_the_old_run_aside(npz, tmp_path, capsys):
    assert main.cli(command(npz, tmp_path, epochs=1)) == 0
    run_dir = tmp_path / RUN
    before = hashes(run_dir)
    capsys.readouterr()
    assert main.cli(command(npz, tmp_path, epochs=2)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {run_dir} already holds a run (finished or interrupted); continue it with --resume, or "
                   f"start afresh with --overwrite (the earlier run is moved to {run_dir}.old-<time>, nothing is "
                   "deleted)")
    assert hashes(run_dir) == before
    assert main.cli(command(npz, tmp_path, epochs=2) + ["--overwrite"]) == 0
    out = capsys.readouterr().out
    aside = [p for p in (tmp_path / "pre").iterdir() if p.name.startswith("custom_conv4.old-")]
    assert len(aside) == 1 and f"was moved to {aside[0]}" in out
    assert hashes(aside[0]) == before                                  # the old run, byte for byte
    assert [r["epoch"] for r in json.loads((run_dir / "trlog.json").read_text())] == [1, 2]
    assert main.cli(command(npz, tmp_path, epochs=2) + ["--resume"]) == 0  # --resume is never refused


def test_stale_lock_of_a_dead_process_is_taken_over(npz, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / RUN / ".lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}))
    assert main.cli(command(npz, tmp_path, epochs=1)) == 0
    out = capsys.readouterr().out
    assert f"taking over the stale lock of process {dead.pid} on {socket.gethostname()}" in out
    assert not lock.exists()


def test_lock_of_another_host_is_respected(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "?"}))
    with pytest.raises(Exception, match="in use by process 1 on elsewhere"):
        RunLock(str(tmp_path)).acquire()


def test_ctrl_c_releases_the_lock(npz, tmp_path):
    """Ctrl-C in a first epoch too long to finish first: the lock is released, and the line says that nothing was
    saved (not --resume, which would fail with E26); tests/test_faults.py has SIGTERM after a saved epoch."""
    argv = command(npz, tmp_path, epochs=2) + ["--pre_iters_per_epoch", "1000000"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py")] + argv,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / RUN / ".lock"
    _wait_for(lock, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "interrupted by SIGINT (Ctrl-C); nothing of this run was saved: run the same command again"
    assert not lock.exists()


def test_meta_eval_runs_beside_a_locked_training(npz, tmp_path, capsys):
    """meta_eval only reads: a held lock on the pre-train folder does not stop testing its checkpoint."""
    assert main.cli(command(npz, tmp_path, epochs=1)) == 0
    with RunLock(str(tmp_path / RUN)):
        argv = command(npz, tmp_path)[2:] + ["--phase", "meta_eval", "--eval_weights",
                                              str(tmp_path / RUN / "max_acc.pth"), "--num_test_episodes", "10"]
        assert main.cli(argv) == 0
    assert "test accuracy:" in capsys.readouterr().out


def test_a_signal_while_the_lock_is_taken_leaves_no_lock(npz, tmp_path, monkeypatch, capsys):
    """SIGTERM can arrive while the lock file is being written, or just after it was taken and before the run has
    registered its release (seen as a flaky tests/test_faults.py on a loaded machine: the lock stayed): either way
    the lock is gone afterwards, and main.py says nothing was saved."""
    import utils.run_lock as run_lock

    def interrupted(*a, **k):
        raise main.Interrupted(signal.SIGTERM)
    with monkeypatch.context() as m:
        m.setattr(run_lock.json, "dump", interrupted)  # while the file is being written
        with pytest.raises(main.Interrupted):
            RunLock(str(tmp_path / "x")).acquire()
    assert os.listdir(tmp_path / "x") == []

    acquire = RunLock.acquire

    def then_interrupted(self):  # the signal right after acquire() returned
        acquire(self)
        raise main.Interrupted(signal.SIGTERM)
    monkeypatch.setattr(RunLock, "acquire", then_interrupted)
    assert main.cli(command(npz, tmp_path, epochs=1)) == 143
    assert capsys.readouterr().err.strip() == ("interrupted by SIGTERM; nothing of this run was saved: run the same "
                                               "command again")
    assert not (tmp_path / RUN / ".lock").exists()
