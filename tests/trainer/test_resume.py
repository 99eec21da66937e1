"""Reproduce and resume (issue #4): the same seed gives bit-identical runs on CPU, and a run stopped after its
first epoch and continued with ``--resume`` ends with the same per-epoch log (timings aside), the same
TensorBoard curves and bit-identical weights as the run that never stopped; for pre-train, meta-train and
meta-train with hard tasks. Runs in-process through ``main.cli`` on a tiny pack (conv4, 16 px).

``--stop_after_epoch N`` (a hidden flag) ends the run cleanly after epoch N, exactly where a ``kill -9``
after that epoch's ``resume.pth`` leaves it; ``tests/test_kill_resume.py`` does the real kill.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import main
from tests.helpers import make_npz
from tests.tb_events import tb_scalars as read_tb

COMMON = ["--dataset", "custom", "--backbone", "conv4", "--image_size", "16", "--preprocess", "paper",
          "--num_val_episodes", "10", "--seed", "3", "--quiet", "--device", "cpu", "--update_step", "3",
          "--base_lr", "0.1", "--pre_val_update_step", "5"]
# lr steps down after epoch 1 (step_size 2): the resumed run must pick up the schedule too.
PRE = ["--phase", "pre_train", "--pre_max_epoch", "3", "--pre_step_size", "2", "--pre_batch_size", "48",
       "--pre_head", "linear", "--pre_optimizer", "adam", "--pre_lr", "0.002"]
META = ["--phase", "meta_train", "--max_epoch", "3", "--step_size", "2", "--num_batch", "4"]
PRE_DIR = "pre/custom_conv4"


def meta_dir(ht: bool) -> str:
    return f"meta/custom_conv4_5way1shot{'_HT' if ht else ''}_exp1"


# --------------------------------------------------------------------------------------------- helpers
def run(argv) -> None:
    assert main.cli(list(argv)) == 0


def trlog(run_dir: Path) -> list[dict]:
    """trlog.json without the timings (every key containing 'time')."""
    rows = json.loads((run_dir / "trlog.json").read_text())
    return [{k: v for k, v in r.items() if "time" not in k} for r in rows]


def flat(obj, prefix=""):
    """Nested checkpoint -> {path: leaf}; skips what legitimately differs between two log roots."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("args", "best_checkpoint") or "time" in str(k):
                continue
            out.update(flat(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flat(v, f"{prefix}/{i}"))
    else:
        out[prefix] = obj
    return out


def assert_same_checkpoint(p1: Path, p2: Path) -> None:
    a = flat(torch.load(p1, weights_only=True))
    b = flat(torch.load(p2, weights_only=True))
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{p1.name}: {k} differs"
        else:
            assert a[k] == b[k], f"{p1.name}: {k}: {a[k]!r} != {b[k]!r}"


def assert_same_run(d1: Path, d2: Path, files=("last.pth", "max_acc.pth", "resume.pth")) -> None:
    assert trlog(d1) == trlog(d2)
    for f in files:
        assert_same_checkpoint(d1 / f, d2 / f)


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard scalars of a run (read with tensorboardX's protobufs, ``tests/tb_events.py``)."""
    return read_tb(run_dir / "tb")


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> str:
    return make_npz(str(tmp_path_factory.mktemp("data") / "d.npz"), per_class=20, classes=(10, 6, 6))


@pytest.fixture(scope="module")
def pre_runs(npz, tmp_path_factory):
    """Two uninterrupted pre-train runs of the same seed, and one stopped after epoch 1 and resumed."""
    base = tmp_path_factory.mktemp("pre")
    argv = lambda root, *x: COMMON + PRE + ["--dataset_dir", npz, "--log_root", str(base / root)] + list(x)
    run(argv("full1"))
    run(argv("full2"))
    run(argv("resumed", "--stop_after_epoch", "1"))
    assert [r["epoch"] for r in trlog(base / "resumed" / PRE_DIR)] == [1]
    run(argv("resumed", "--resume"))
    return {"base": base, "argv": argv, "dirs": {k: base / k / PRE_DIR for k in ("full1", "full2", "resumed")}}


@pytest.fixture(scope="module", params=[False, True], ids=["meta", "meta_HT"])
def meta_runs(request, npz, pre_runs, tmp_path_factory):
    ht = request.param
    base = tmp_path_factory.mktemp("meta_ht" if ht else "meta")
    init = str(pre_runs["dirs"]["full1"] / "max_acc.pth")
    extra = ["--hard_task"] if ht else []

    def argv(root, *x):
        return (COMMON + META + extra + ["--dataset_dir", npz, "--init_weights", init,
                                         "--log_root", str(base / root)] + list(x))
    run(argv("full1"))
    run(argv("full2"))
    run(argv("resumed", "--stop_after_epoch", "1"))
    run(argv("resumed", "--resume"))
    return {"ht": ht, "argv": argv, "dirs": {k: base / k / meta_dir(ht) for k in ("full1", "full2", "resumed")}}


# --------------------------------------------------------------------------------------------- pre-train
def test_pre_same_seed_is_bit_identical(pre_runs):
    d = pre_runs["dirs"]
    assert len(trlog(d["full1"])) == 3
    assert_same_run(d["full1"], d["full2"])


def test_pre_stop_after_epoch_1_and_resume_equals_uninterrupted(pre_runs):
    d = pre_runs["dirs"]
    assert_same_run(d["full1"], d["resumed"])
    lrs = [r["lr"] for r in trlog(d["resumed"])]
    assert lrs[0] > lrs[1] == lrs[2]  # the schedule continued


def test_pre_resumed_logs_have_no_gaps_or_duplicates(pre_runs):
    d = pre_runs["dirs"]
    assert [r["epoch"] for r in json.loads((d["resumed"] / "trlog.json").read_text())] == [1, 2, 3]
    tb_full, tb_res = tb_scalars(d["full1"]), tb_scalars(d["resumed"])
    assert tb_res and tb_res.keys() == tb_full.keys()
    for tag, points in tb_res.items():
        assert [s for s, _ in points] == [1, 2, 3], tag
        assert points == tb_full[tag], tag


def test_resume_state_holds_everything(pre_runs):
    """resume.pth loads with weights_only=True and holds model, optimizer, schedule position, counters, the best
    so far and its checkpoint, every RNG, the batch stream and the settings."""
    d = pre_runs["dirs"]["resumed"]
    st = torch.load(d / "resume.pth", weights_only=True)
    for key in ("model", "optimizer", "epoch", "iterations_per_epoch", "best_acc", "best_epoch", "best_checkpoint",
                "trlog", "rng", "aug_gen", "extra", "args"):
        assert key in st, key
    assert st["kind"] == "resume-pre" and st["epoch"] == 3 and st["iterations_per_epoch"] == 5
    assert set(st["rng"]) >= {"python", "numpy", "torch"}
    assert "stream" in st["extra"]
    assert os.path.isfile(st["best_checkpoint"]) and st["best_checkpoint"].endswith("max_acc.pth")
    assert st["optimizer"]["param_groups"][0]["lr"] == trlog(d)[-1]["lr"]
    assert st["args"]["seed"] == 3 and st["args"]["backbone"] == "conv4"


def test_kill_between_epoch_files_and_resume_pth(pre_runs, tmp_path):
    """A kill after epoch 2 wrote last.pth, trlog.json and its TensorBoard points but before resume.pth: the
    resumed run redoes epoch 2 and the log and curves still have each epoch once."""
    argv = lambda *x: pre_runs["argv"](str(tmp_path / "k"), *x)
    d = tmp_path / "k" / PRE_DIR
    run(argv("--stop_after_epoch", "1"))
    shutil.copy(d / "resume.pth", tmp_path / "resume_epoch1.pth")
    run(argv("--resume", "--stop_after_epoch", "2"))
    shutil.copy(tmp_path / "resume_epoch1.pth", d / "resume.pth")  # the epoch-2 commit never happened
    assert [r["epoch"] for r in trlog(d)] == [1, 2]
    run(argv("--resume"))
    assert [r["epoch"] for r in json.loads((d / "trlog.json").read_text())] == [1, 2, 3]
    assert_same_run(pre_runs["dirs"]["full1"], d)
    for tag, points in tb_scalars(d).items():
        assert [s for s, _ in points] == [1, 2, 3], tag


def test_resume_of_a_finished_run_changes_nothing(pre_runs, tmp_path):
    src = pre_runs["base"] / "full2"
    root = tmp_path / "copy"
    shutil.copytree(src, root)
    before = hashes(root)
    run(pre_runs["argv"](str(root), "--resume"))
    assert hashes(root) == before


@pytest.mark.parametrize("flag,value,expect", [
    ("--way", "3", "was started with --way 5, not 3"),
    ("--pre_lr", "0.01", "was started with --pre_lr 0.002, not 0.01"),
    ("--pre_optimizer", "sgd", "was started with --pre_optimizer adam, not sgd"),
    ("--dataset_dir", "OTHER", "was started with --dataset_dir "),
    ("--backbone", "resnet12", "no checkpoint to resume from in "),  # another backbone = another log folder
])
def test_resume_with_contradicting_settings_is_a_one_line_error(pre_runs, tmp_path, capsys, flag, value, expect):
    root = tmp_path / "copy"
    shutil.copytree(pre_runs["base"] / "resumed", root)
    argv = pre_runs["argv"](str(root), "--resume", "--pre_max_epoch", "4")
    if value == "OTHER":
        value = make_npz(str(tmp_path / "other.npz"), per_class=20, classes=(10, 6, 6), seed=5)
    i = argv.index(flag) if flag in argv else None
    if i is None:
        argv += [flag, value]
    else:
        argv[i + 1] = value
    before = hashes(root)
    capsys.readouterr()
    assert main.cli(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume: ") and expect in lines[0], err
    assert "Traceback" not in err
    assert hashes(root) == before


def test_resume_with_seed_0_takes_the_drawn_seed(npz, tmp_path):
    argv = (COMMON + PRE + ["--dataset_dir", npz, "--log_root", str(tmp_path), "--pre_max_epoch", "2"])
    argv[argv.index("--seed") + 1] = "0"
    run(argv + ["--stop_after_epoch", "1"])
    d = tmp_path / PRE_DIR
    drawn = json.loads((d / "args.json").read_text())["seed"]
    assert drawn != 0
    run(argv + ["--resume"])
    assert json.loads((d / "args.json").read_text())["seed"] == drawn
    assert [r["epoch"] for r in trlog(d)] == [1, 2]
    # ... and it is the run that seed gives
    ref = list(argv)
    ref[ref.index("--seed") + 1] = str(drawn)
    ref[ref.index("--log_root") + 1] = str(tmp_path / "ref")
    run(ref)
    assert_same_run(tmp_path / "ref" / PRE_DIR, d)


# --------------------------------------------------------------------------------------------- meta-train
def test_meta_same_seed_is_bit_identical(meta_runs):
    d = meta_runs["dirs"]
    assert len(trlog(d["full1"])) == 3
    assert_same_run(d["full1"], d["full2"])


def test_meta_stop_after_epoch_1_and_resume_equals_uninterrupted(meta_runs):
    d = meta_runs["dirs"]
    assert_same_run(d["full1"], d["resumed"])
    assert [r["epoch"] for r in json.loads((d["resumed"] / "trlog.json").read_text())] == [1, 2, 3]
    for tag, points in tb_scalars(d["resumed"]).items():
        assert [s for s, _ in points] == [1, 2, 3], tag
    if meta_runs["ht"]:
        logs = [(d[k] / "hard_tasks.jsonl").read_text() for k in ("full1", "resumed")]
        assert logs[0] == logs[1]
        assert [json.loads(x)["iteration"] for x in logs[1].splitlines()] == list(range(1, 13))


def _assert_tb_matches_trlog(run_dir: Path, kind: str) -> None:
    """Every number of trlog.json is a tensorboardX scalar ``<kind>/<key>`` at its epoch (stored as float32)."""
    import numpy as np
    assert list((run_dir / "tb").glob("events.out.tfevents.*")), "no event file"
    tb = read_tb(run_dir / "tb", skip_time=False)
    log = json.loads((run_dir / "trlog.json").read_text())  # with the timings
    keys = {k for r in log for k, v in r.items() if k != "epoch" and isinstance(v, (int, float))}
    assert {f"{kind}/{k}" for k in keys} == set(tb), (sorted(keys), sorted(tb))
    for k in keys:
        want = [(r["epoch"], float(np.float32(r[k]))) for r in log]
        assert tb[f"{kind}/{k}"] == want, k


def test_tensorboard_event_file_holds_the_trlog_scalars(pre_runs, meta_runs):
    _assert_tb_matches_trlog(pre_runs["dirs"]["full1"], "pre")
    _assert_tb_matches_trlog(pre_runs["dirs"]["resumed"], "pre")
    _assert_tb_matches_trlog(meta_runs["dirs"]["resumed"], "meta")
