"""A real ``kill -9`` (issue #4, "Done when"): ``main.py --phase pre_train`` is killed with SIGKILL as soon as
the ``resume.pth`` of its first epoch exists, then the same command plus ``--resume`` finishes the run. Its
per-epoch log (timings aside), TensorBoard curves and final weights equal those of an uninterrupted run of the
same seed, which runs in parallel. Both runs are separate processes with one thread each.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.helpers import make_npz
from tests.trainer.test_resume import assert_same_run, tb_scalars

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4


def command(npz: str, log_root: Path) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), "--phase", "pre_train", "--dataset", "custom",
            "--dataset_dir", npz, "--backbone", "conv4", "--image_size", "16", "--preprocess", "paper",
            "--pre_max_epoch", str(EPOCHS), "--pre_step_size", "3", "--pre_batch_size", "32",
            "--pre_head", "linear", "--pre_optimizer", "adam", "--pre_lr", "0.002", "--num_val_episodes", "10",
            "--pre_val_update_step", "5", "--seed", "5", "--quiet", "--device", "cpu", "--log_root", str(log_root)]


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    npz = make_npz(str(tmp_path / "d.npz"), per_class=20, classes=(10, 6, 6))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run_dir = "pre/custom_conv4"
    ref = subprocess.Popen(command(npz, tmp_path / "ref"), cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(command(npz, tmp_path / "killed"), cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume_pth = tmp_path / "killed" / run_dir / "resume.pth"
    deadline = time.monotonic() + 120
    while not resume_pth.exists():
        assert victim.poll() is None, "the run ended before its first epoch was saved"
        assert time.monotonic() < deadline, "no resume.pth after 120 s"
        time.sleep(0.01)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    killed_at = torch.load(resume_pth, weights_only=True)["epoch"]
    assert 1 <= killed_at < EPOCHS

    resumed = subprocess.run(command(npz, tmp_path / "killed") + ["--resume"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {tmp_path / 'killed' / run_dir} after epoch {killed_at}" in resumed.stdout
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    a, b = tmp_path / "ref" / run_dir, tmp_path / "killed" / run_dir
    assert [r["epoch"] for r in json.loads((b / "trlog.json").read_text())] == list(range(1, EPOCHS + 1))
    assert_same_run(a, b)
    tb_a, tb_b = tb_scalars(a), tb_scalars(b)
    assert tb_b.keys() == tb_a.keys()
    for tag in tb_b:
        assert [s for s, _ in tb_b[tag]] == list(range(1, EPOCHS + 1)), tag
        assert tb_b[tag] == tb_a[tag], tag
    assert not [p for p in b.iterdir() if p.name.startswith(".tmp")]  # no temp file left by the kill
