"""torchrun on CPU (gloo): 2 processes against 1 on the same seed and data (issue 13).

Every run is a real ``python -m torch.distributed.run --standalone --nproc_per_node=2 main.py ...`` or ``main.py``
(in this process) on a tiny ``.npz`` (10/6/6 classes of 20 images, 16 px; meta-train and meta-test resnet12_slim
with its recipe, paper: second order; pre-train conv4), one thread per process. Each launch starts 2-3 interpreters
that import torch (a few seconds each), so every test that launches is ``slow`` (``python -m pytest -m slow``, run
by CI); the README's command runs the sharding test here and ``tests/utils/test_collectives.py``'s 2 processes.

Tolerances, and why. The two runs compute the same sums in another order (a meta-batch's task gradients summed
per rank and then across ranks; BN running statistics composed rank by rank, ``utils.distributed``; pre-train:
the BN statistics and the weight gradients of the global batch as sums of per-rank sums), so every step agrees to
float32 rounding, and the optimizer turns that into:

* **Weights**: Adam moves an element by at most ``c * lr`` per step, ``c = (1 - beta1) / sqrt(1 - beta2) = 3.16``
  for the default betas (Kingma & Ba 2015, Sec. 2.1), so any two runs with the same schedule are within
  ``B = 2 c * sum of the step sizes`` of each other. We require ``B / 100``: a real error (a task dropped or
  weighted twice, a shard's gradient lost) changes each step's update by O(lr), i.e. O(B / 6), and fails it, while
  rounding stays far inside (measured, ``pytest -n 0 -m slow -s`` prints it: meta-train 12 steps, B = 0.076, largest
  difference 2.4e-6; pre-train 14 steps, B = 0.177, 1.7e-6). A conv bias ahead of BN (conv4, resnet25's stem;
  resnet12_slim has none) has a true gradient of exactly zero, so its float32 gradient is rounding noise that
  Adam turns into lr-sized steps, in one process too: for those, and the BN running means that follow them, only
  ``B`` holds (pre-train conv4: measured 1.3e-3).
* **Logged losses**: ``rtol 1e-5`` (measured <= 2.5e-7); accuracies (training, validation, best epoch) equal: a
  count changes only if two logits tie to within rounding.
* **Meta-test**: the same checkpoint, the same episodes; each rank encodes whole batches of the single-process run
  and scores a block of the episodes: the accuracies are identical, bit for bit.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import make_npz
from tests.trainer.test_resume import assert_same_checkpoint, tb_scalars

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
ADAM_C = 0.1 / 0.001 ** 0.5  # (1 - beta1) / sqrt(1 - beta2), torch's default betas
EPOCHS, NUM_BATCH, META_LR1 = 2, 3, 1e-3
BACKBONE = "resnet12_slim"  # no conv bias ahead of BN (see the docstring)
META_DIR = f"meta/custom_{BACKBONE}_3way1shot_HT_exp1"
PRE_DIR = "pre/custom_conv4"
PRE_LR = "0.002"


def meta_flags(npz: str, root: Path) -> list[str]:
    return ["--phase", "meta_train", "--dataset", "custom", "--dataset_dir", npz, "--backbone", BACKBONE,
            "--image_size", "16", "--preprocess", "paper", "--init_weights", "scratch", "--max_epoch", str(EPOCHS),
            "--num_batch", str(NUM_BATCH), "--meta_batch_size", "3", "--way", "3", "--shot", "1",
            "--train_query", "3", "--val_query", "3", "--num_val_episodes", "10", "--update_step", "3",
            "--meta_lr1", str(META_LR1), "--meta_lr2", str(META_LR1), "--hard_task", "--seed", "5", "--quiet",
            "--device", "cpu",
            "--cache_dir", "none", "--log_root", str(root)]


def launch(flags: list[str], nproc: int, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return subprocess.Popen(cmd + [str(ROOT / "main.py")] + flags, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def finish(p: subprocess.Popen, timeout: float = 240) -> str:
    out, err = p.communicate(timeout=timeout)
    if p.returncode != 0:  # the workers' own lines first (torchrun's summary comes last)
        worker = [line for line in err.splitlines() if not line.startswith(("E", "W", "  ", "[", "=", "Traceback"))]
        raise AssertionError(f"exit {p.returncode}\n" + "\n".join(worker[-40:]) + "\n" + err[-1500:])
    return out


def in_process(flags: list[str]) -> str:
    """One process, in this one (no interpreter start-up; the torchrun runs go on meanwhile). Returns stdout."""
    import contextlib
    import io

    import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main.cli(flags) == 0
    return buf.getvalue()


def trlog(d: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if "time" not in k} for r in json.loads((d / "trlog.json").read_text())]


def assert_logs_agree(a: list[dict], b: list[dict]) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    print("\nlosses rel. difference " + " ".join(f"{abs(rb['train_loss'] / ra['train_loss'] - 1):.2g}"
                                              for ra, rb in zip(a, b)) + "; val_acc "
          + " ".join(f"{ra['val_acc']:.4f}/{rb['val_acc']:.4f}" for ra, rb in zip(a, b)), file=sys.__stdout__)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if "loss" in k:
                assert rb[k] == pytest.approx(ra[k], rel=1e-5), k
            else:
                assert rb[k] == ra[k], k


def assert_weights_agree(p1: Path, p2: Path, parts: tuple[str, ...], adam_steps_lr: float,
                         noise_driven: tuple[str, ...] = ()) -> None:
    """Every float tensor of ``parts`` (parameters and BN buffers) within ``B / 100``; those whose names end with
    one of ``noise_driven`` (conv biases ahead of BN, and the BN running means that follow them) within ``B``
    (module docstring)."""
    bound = 2 * ADAM_C * adam_steps_lr
    a, b = torch.load(p1, weights_only=True), torch.load(p2, weights_only=True)
    worst, worst_noise = 0.0, 0.0
    for part in parts:
        assert a[part].keys() == b[part].keys()
        for k, v in a[part].items():
            if not v.is_floating_point():
                assert torch.equal(v, b[part][k]), k
                continue
            d = (v - b[part][k]).abs().max().item()
            if k.endswith(noise_driven) and noise_driven:
                assert d <= bound, (k, d, bound)
                worst_noise = max(worst_noise, d)
                continue
            assert d <= bound / 100, (k, d, bound)
            worst = max(worst, d)
    print(f"\n{p1.parent.name}: max |weight difference| {worst:.3g} (required <= B/100, B = {bound:.3g}); "
          f"noise-driven {worst_noise:.3g} (required <= B)", file=sys.__stdout__)


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (from /proc), children first."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        top = todo.pop()
        kids = [c for c, p in parent.items() if p == top]
        out += kids
        todo += kids
    return out


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> str:
    return make_npz(str(tmp_path_factory.mktemp("data") / "d.npz"), per_class=20, classes=(10, 6, 6))


@pytest.fixture(scope="module")
def meta_runs(npz, tmp_path_factory):
    """Meta-train: 1 process, 2 processes, and 2 processes killed (SIGKILL to the whole torchrun group) after
    epoch 1 and resumed under torchrun."""
    base = tmp_path_factory.mktemp("meta")
    two = launch(meta_flags(npz, base / "two"), 2)
    victim = launch(meta_flags(npz, base / "killed"), 2)
    resume_pth = base / "killed" / META_DIR / "resume.pth"
    deadline = time.monotonic() + 180
    while not resume_pth.exists():
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no resume.pth after 180 s"
        time.sleep(0.01)
    for pid in descendants(victim.pid) + [victim.pid]:  # the workers and the torchrun agent, all at once
        os.kill(pid, signal.SIGKILL)
    victim.communicate(timeout=60)
    killed_at = torch.load(resume_pth, weights_only=True)["epoch"]
    (base / "killed1" / "meta").mkdir(parents=True)  # the same killed run, to resume on 1 process
    shutil.copytree(base / "killed" / META_DIR, base / "killed1" / META_DIR)
    (base / "killed1" / META_DIR / ".lock").unlink(missing_ok=True)
    resumed = launch(meta_flags(npz, base / "killed") + ["--resume"], 2)
    out = {"one": in_process(meta_flags(npz, base / "one")), "two": finish(two), "resumed": finish(resumed)}
    out["resumed1"] = in_process(meta_flags(npz, base / "killed1") + ["--resume"])
    return base, out, killed_at


@pytest.mark.slow
def test_meta_train_two_processes_agree_with_one(meta_runs):
    base, out, _ = meta_runs
    one, two = base / "one" / META_DIR, base / "two" / META_DIR
    assert "torchrun: 2 processes (gloo" in out["two"] and "torchrun" not in out["one"]
    assert_logs_agree(trlog(one), trlog(two))
    steps = EPOCHS * NUM_BATCH * 2  # one update per meta-batch and one per hard task (--ht_update separate)
    assert_weights_agree(one / "last.pth", two / "last.pth", ("encoder", "base_learner"), steps * META_LR1)
    # the hard tasks: the same failure classes gathered from both ranks, the same hard tasks drawn
    assert (one / "hard_tasks.jsonl").read_text() == (two / "hard_tasks.jsonl").read_text()
    assert len((two / "hard_tasks.jsonl").read_text().splitlines()) == EPOCHS * NUM_BATCH
    args = json.loads((two / "args.json").read_text())
    assert args["world_size"] == 2 and json.loads((one / "args.json").read_text())["world_size"] == 1


@pytest.mark.slow
def test_rank_0_alone_writes_one_copy_of_each_file(meta_runs):
    base, _, _ = meta_runs
    two = base / "two" / META_DIR
    names = sorted(p.name for p in two.iterdir())
    assert names == ["args.json", "hard_tasks.jsonl", "last.pth", "max_acc.pth", "report.md", "resume.pth", "tb",
                     "trlog.json"], names
    assert len(list((two / "tb").iterdir())) == 1  # one TensorBoard file, from rank 0
    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root).parent / ("events" if "tfevents" in p.name else p.name))
                      for p in root.rglob("*") if p.is_file())
    assert files(base / "two") == files(base / "one")


@pytest.mark.slow
def test_killed_torchrun_run_resumes_to_the_uninterrupted_one(meta_runs):
    base, out, killed_at = meta_runs
    assert 1 <= killed_at < EPOCHS
    a, b = base / "two" / META_DIR, base / "killed" / META_DIR
    assert f"resuming {b} after epoch {killed_at}" in out["resumed"]
    assert trlog(a) == trlog(b)
    for f in ("last.pth", "max_acc.pth"):
        assert_same_checkpoint(a / f, b / f)
    assert (a / "hard_tasks.jsonl").read_text() == (b / "hard_tasks.jsonl").read_text()
    assert [s for s, _ in tb_scalars(b)["meta/val_acc"]] == list(range(1, EPOCHS + 1))


@pytest.mark.slow
def test_meta_train_resumes_on_another_number_of_processes(meta_runs):
    """Killed on 2 processes, resumed on 1: ends as the uninterrupted 2-process run, to the tolerances above."""
    base, out, killed_at = meta_runs
    a, b = base / "two" / META_DIR, base / "killed1" / META_DIR
    assert f"resuming {b} after epoch {killed_at}" in out["resumed1"]
    assert_logs_agree(trlog(a), trlog(b))
    assert_weights_agree(a / "last.pth", b / "last.pth", ("encoder", "base_learner"),
                         EPOCHS * NUM_BATCH * 2 * META_LR1)
    assert json.loads((b / "args.json").read_text())["world_size"] == 1


@pytest.mark.slow
def test_meta_test_accuracies_identical(npz, meta_runs):
    """Both evaluation paths (bank, episodic), 1 process against 2, on the meta-trained checkpoint."""
    base, _, _ = meta_runs
    ck = (base / "one" / META_DIR / "max_acc.pth").read_bytes()

    def flags(n: int, mode: str) -> list[str]:
        d = base / f"eval{n}{mode}"
        d.mkdir()
        (d / "max_acc.pth").write_bytes(ck)  # results.json is written next to the checkpoint
        f = meta_flags(npz, d)
        f[f.index("--phase") + 1] = "meta_eval"
        return f + ["--eval_weights", str(d / "max_acc.pth"), "--num_test_episodes", "25", "--eval_mode", mode]

    two = {mode: launch(flags(2, mode), 2) for mode in ("bank", "episodic")}
    for mode in two:
        assert in_process(flags(1, mode)).count("test accuracy:") == 1
    for mode, p in two.items():
        assert finish(p).count("test accuracy:") == 1
        res = [json.loads((base / f"eval{n}{mode}" / "results.json").read_text()) for n in (1, 2)]
        assert res[0]["episodes"] == res[1]["episodes"] == 25
        assert (res[0]["mean"], res[0]["ci95"]) == (res[1]["mean"], res[1]["ci95"]), mode
        assert res[1]["settings"]["world_size"] == 2
        assert sorted(p.name for p in (base / f"eval2{mode}").iterdir()) == ["max_acc.pth", "report.md",
                                                                             "results.json"]


def pre_flags(npz: str, root: Path, batch: int) -> list[str]:
    return ["--phase", "pre_train", "--recipe", "pytorch", "--dataset", "custom", "--dataset_dir", npz,
            "--backbone", "conv4", "--image_size", "16", "--preprocess", "paper", "--pre_max_epoch", "2",
            "--pre_batch_size", str(batch),
            "--pre_head", "linear", "--pre_optimizer", "adam", "--pre_lr", PRE_LR, "--pre_augment", "off",
            "--sync_bn", "--num_val_episodes", "10", "--pre_val_update_step", "5", "--seed", "5", "--quiet",
            "--device", "cpu", "--cache_dir", "none", "--log_root", str(root)]


@pytest.mark.slow
def test_pre_train_same_global_batch_agrees(npz, tmp_path, capsys):
    """Global batch 32: 1 process x 32 against 2 x 16 (200 images: 7 steps an epoch, the last one of 8 images),
    with --sync_bn (BN statistics of the global batch) and no augmentation (its draws are per shard).

    conv4 here: resnet12_slim fits these 200 images within 14 steps (loss 3.8 -> 0.16), and that fast fit
    amplifies rounding (measured: the 2-process loss 2.6e-8 from the 1-process one in epoch 1, 1.3e-4 in epoch 2),
    while the float64 gradient of one DDP + --sync_bn step of resnet12_slim equals one process's to 1e-12
    (tests/utils/test_collectives.py); conv4 learns slowly enough to compare whole runs. Its conv biases ahead of BN
    are noise-driven (module docstring): they get the bound ``B``."""
    two = launch(pre_flags(npz, tmp_path / "two", 16), 2)
    in_process(pre_flags(npz, tmp_path / "one", 32))
    out_two = finish(two)
    assert "pre-train global batch 32 = --pre_batch_size 16 x 2" in out_two
    a, b = tmp_path / "one" / PRE_DIR, tmp_path / "two" / PRE_DIR
    assert_logs_agree(trlog(a), trlog(b))
    assert json.loads((b / "args.json").read_text())["pre_global_batch"] == 32
    conv_biases = tuple(f"layers.{i}.{j}" for i in range(4) for j in ("0.bias", "1.running_mean"))
    assert_weights_agree(a / "last.pth", b / "last.pth", ("encoder", "pre_fc"), 2 * 7 * float(PRE_LR), conv_biases)

    # pre-train resumes on the same number of processes only (E63)
    import main
    assert main.cli(pre_flags(npz, tmp_path / "two", 16) + ["--resume", "--pre_max_epoch", "3"]) == 2
    err = capsys.readouterr().err
    assert f"error: --resume: the pre-train run in {b} ran on 2 process(es) (global batch 32), not 1; resume it " \
           "with torchrun --nproc_per_node=2 (or python main.py for 1)" in err


@pytest.mark.slow
def test_pre_train_stopped_and_resumed_under_torchrun_equals_uninterrupted(npz, tmp_path):
    """Pre-train on 2 processes with augmentation (each rank draws its own shard's crops and flips): stopped after
    epoch 1 and resumed on 2 processes, it ends bit-identical to the uninterrupted run (``resume.pth`` keeps every
    rank's random state)."""
    def aug(root: Path) -> list[str]:
        f = [x for x in pre_flags(npz, root, 16) if x != "--sync_bn"]
        f[f.index("--pre_augment") + 1] = "on"
        return f
    full = launch(aug(tmp_path / "full"), 2)
    finish(launch(aug(tmp_path / "stopped") + ["--stop_after_epoch", "1"], 2))
    finish(launch(aug(tmp_path / "stopped") + ["--resume"], 2))
    finish(full)
    a, b = tmp_path / "full" / PRE_DIR, tmp_path / "stopped" / PRE_DIR
    assert [r["epoch"] for r in trlog(b)] == [1, 2]
    assert trlog(a) == trlog(b)
    assert_same_checkpoint(a / "last.pth", b / "last.pth")
    st = torch.load(b / "resume.pth", weights_only=True)
    assert len(st["rank_states"]) == 2
    assert not torch.equal(st["rank_states"][0]["aug_gen"], st["rank_states"][1]["aug_gen"])


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_dying_or_hanging_rank_ends_the_run_with_a_message(npz, tmp_path, fault):
    """Two ranks started by hand (no torchrun agent to clean up); mid-run rank 1 is killed (SIGKILL) or frozen
    (SIGSTOP: alive, sockets open, silent): rank 0 stops with one error line and status 4, at once for the dead peer,
    after ``--dist_timeout`` for the frozen one, instead of waiting forever."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    timeout = 30 if fault == "kill" else 10
    flags = meta_flags(npz, tmp_path) + ["--max_epoch", "50", "--dist_timeout", str(timeout)]
    procs = []
    for r in (0, 1):
        env = dict(ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "main.py")] + flags, cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / META_DIR / ".lock").exists():  # both ranks joined and built; rank 0 holds the run
            assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)  # into the first epoch
        t0 = time.monotonic()
        os.kill(procs[1].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        _, err = procs[0].communicate(timeout=timeout + 60)
        waited = time.monotonic() - t0
    finally:
        procs[1].kill()
        procs[1].communicate(timeout=30)
    assert waited < (30 if fault == "kill" else timeout + 30), waited
    if fault == "hang":  # the timeout, not some other failure, ended it
        assert waited >= timeout - 1, waited
    assert procs[0].returncode == 4, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: rank 0/2: "), err[-3000:]
    assert f"another rank died, hung for more than --dist_timeout {timeout} s" in lines[0]
    assert not (tmp_path / META_DIR / ".lock").exists()  # rank 0 released the run lock


def test_shard_range_covers_in_order():
    from utils.distributed import shard_range
    for n in (0, 1, 5, 7, 600):
        for w in (1, 2, 3, 4):
            blocks = [shard_range(n, r, w) for r in range(w)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(blocks[i][1] == blocks[i + 1][0] for i in range(w - 1))
            assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1
    assert np.array_equal(np.arange(7)[slice(*shard_range(7, 1, 2))], [4, 5, 6])
