"""run_experiment.py: every seed constant reaches main.py; modes; the no-data message."""
import os
import subprocess
import sys

import pytest

import run_experiment as rx
from utils.options import parse_args


def parsed(mode="META", recipe="paper", index=0):
    cmd = rx.commands(mode, recipe)[index]
    assert cmd[:2] == [sys.executable, "main.py"]
    return parse_args(cmd[2:])


# constant -> (new value, attribute of main.py's args, expected value there)
CASES = {
    "LOG_DIR": ("/tmp/somewhere", "log_root", "/tmp/somewhere"),
    "GPU_ID": ("3", "gpu", "3"),
    "PRE_TRA_LABEL": ("flipped", "pre_label", "flipped"),
    "PRE_TRA_ITER_MAX": (30000, "pre_max_epoch", 30),
    "PRE_TRA_DROP": (0.5, "pre_dropout_keep", 0.5),
    "PRE_DROP_STEP": (2000, "pre_step_size", 2),
    "PRE_LR": (0.01, "pre_lr", 0.01),
    "SHOT_NUM": (5, "shot", 5),
    "WAY_NUM": (10, "way", 10),
    "MAX_MAX_ITER": (5000, "max_epoch", 50),
    "META_BATCH_SIZE": (4, "meta_batch_size", 4),
    "PRE_ITER": (7000, "pre_init_epoch", 7),
    "UPDATE_NUM": (13, "update_step", 13),
    "SAVE_STEP": (50, "num_batch", 50),
    "META_LR": (0.005, "meta_lr1", 0.005),
    "META_LR_MIN": (0.00002, "meta_lr_min", 0.00002),
    "LR_DROP_STEP": (3000, "step_size", 30),
    "BASE_LR": (0.02, "base_lr", 0.02),
    "PRE_TRA_DIR": ("/d/pre", "pre_train_dir", "/d/pre"),
    "META_TRA_DIR": ("/d/tr", "meta_train_dir", "/d/tr"),
    "META_VAL_DIR": ("/d/va", "meta_val_dir", "/d/va"),
    "META_TES_DIR": ("/d/te", "meta_test_dir", "/d/te"),
    # ours
    "NET_ARCH": ("resnet12_wide", "backbone", "resnet12_wide"),
    "IMAGE_SIZE": (96, "image_size", 96),
    "PREPROCESS": ("pytorch", "preprocess", "pytorch"),
    "PRE_BATCH_SIZE": (32, "pre_batch_size", 32),
    "PRE_EPOCH_ITERS": (500, "pre_iters_per_epoch", 500),
    "TEST_UPDATE_NUM": (60, "test_update_step", 60),
    "TRAIN_QUERY": (10, "train_query", 10),
    "TEST_QUERY": (1, "val_query", 1),
    "INNER_LOSS": ("mean", "inner_loss", "mean"),
    "SECOND_ORDER": (False, "second_order", False),
    "NUM_TEST_EPISODES": (2000, "num_test_episodes", 2000),
    "HARD_TASK": (True, "hard_task", True),
    "RESUME": (True, "resume", True),
    "OVERWRITE": (True, "overwrite", True),
    "DEVICE": ("cpu", "device", "cpu"),
    "DATASET": ("FC100", "dataset", "FC100"),
    "META_LABEL": ("run7", "meta_label", "run7"),
    "TF_PROTOCOL": (True, "bn_mode", "tf"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_constant_reaches_main(name, monkeypatch):
    value, attr, expected = CASES[name]
    before = getattr(parsed(), attr)
    monkeypatch.setattr(rx, name, value)
    after = getattr(parsed(), attr)
    assert after == pytest.approx(expected) if isinstance(expected, float) else after == expected
    assert after != before, f"{name} did not change --{attr}"


def test_meta_lr_sets_both_groups(monkeypatch):
    monkeypatch.setattr(rx, "META_LR", 0.004)
    a = parsed()
    assert a.meta_lr1 == a.meta_lr2 == 0.004


def test_modes_build_the_right_phases(monkeypatch):
    assert [parse_args(c[2:]).phase for c in rx.commands("PRE")] == ["pre_train"]
    assert [parse_args(c[2:]).phase for c in rx.commands("META")] == ["meta_train", "meta_eval"]
    assert [parse_args(c[2:]).phase for c in rx.commands("TEST")] == ["meta_eval"]
    load = [parse_args(c[2:]) for c in rx.commands("META_LOAD")]
    assert load[0].init_weights.endswith("download_weights/pretrain.pth")
    test_load = parse_args(rx.commands("TEST_LOAD")[0][2:])
    assert test_load.eval_weights.endswith("download_weights/meta_1shot.pth")


def test_tf_protocol_sets_the_tf_flags_in_every_phase(monkeypatch):
    monkeypatch.setattr(rx, "TF_PROTOCOL", True)
    monkeypatch.setattr(rx, "SHOT_NUM", 5)
    for mode in ("PRE", "META"):
        for a in (parse_args(c[2:]) for c in rx.commands(mode)):
            assert (a.bn_mode, a.shortcut_ss, a.test_flip_support, a.test_query) == ("tf", "off", True, 5)


def test_load_modes_read_tf_weights_when_the_download_folder_holds_them(monkeypatch, tmp_path):
    monkeypatch.setattr(rx, "DOWNLOAD_DIR", str(tmp_path))
    assert parse_args(rx.commands("TEST_LOAD")[0][2:]).bn_mode == "pytorch"   # no weights.npy: the .pth files
    (tmp_path / "weights.npy").write_bytes(b"")
    meta_train, meta_eval = (parse_args(c[2:]) for c in rx.commands("META_LOAD"))
    assert meta_train.init_weights == str(tmp_path) and meta_train.bn_mode == meta_eval.bn_mode == "tf"
    test = parse_args(rx.commands("TEST_LOAD")[0][2:])
    assert test.eval_weights == str(tmp_path) and test.test_flip_support and test.test_query == test.shot == 1


def test_pytorch_recipe_keeps_main_defaults():
    a = parsed(recipe="pytorch")
    assert (a.backbone, a.image_size, a.update_step, a.meta_lr1, a.pre_optimizer) == ("resnet25", 80, 50, 1e-4, "sgd")
    assert a.meta_train_dir == rx.META_TRA_DIR


def test_paper_recipe_is_the_default_and_uses_resnet12():
    a = parsed()
    assert a.recipe == "paper" and a.backbone == "resnet12" and a.image_size == 84


def test_iteration_constants_must_divide(monkeypatch):
    monkeypatch.setattr(rx, "MAX_MAX_ITER", 1234)
    with pytest.raises(SystemExit, match="MAX_MAX_ITER"):
        rx.commands("META")


@pytest.mark.parametrize("argv", [[], ["NOPE"]])
def test_unknown_or_missing_mode(argv):
    p = subprocess.run([sys.executable, "run_experiment.py"] + argv, capture_output=True, text=True)
    assert p.returncode == 2
    assert "modes: PRE, META, TEST, META_LOAD, TEST_LOAD, DEMO, BENCH, ABLATION" in p.stderr
    assert "Traceback" not in p.stderr


def test_pre_without_data_is_one_clear_message(tmp_path):
    # the default constants point at ./data/mini-imagenet, which is not there in a fresh clone
    p = subprocess.run([sys.executable, os.path.abspath("run_experiment.py"), "PRE"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: dataset folder not found: ./data/mini-imagenet/train")
    assert "<root>/{train,val,test}/<class>/<image>" in err[0] and "DEMO" in err[0]
    assert p.stdout.startswith("$ ")  # the command is printed before it runs


def test_dry_run_prints_commands_only():
    p = subprocess.run([sys.executable, "run_experiment.py", "META", "--dry_run"], capture_output=True, text=True)
    assert p.returncode == 0
    lines = [ln for ln in p.stdout.splitlines() if not ln.startswith("# ")]  # "# ...": the earlier-run notes
    assert len(lines) == 2 and all(ln.startswith("$ ") and "main.py --phase meta_" in ln for ln in lines)
    assert len(p.stdout.splitlines()) == 3  # one note, under the meta-train command


def test_training_commands_say_what_happens_to_an_earlier_run(monkeypatch, capsys):
    cmd = rx.commands("PRE")[0]
    assert "--resume" not in cmd and "--overwrite" not in cmd
    assert "stops and leaves it as it is" in rx.earlier_run_note(cmd)
    monkeypatch.setattr(rx, "OVERWRITE", True)
    assert "moved aside" in rx.earlier_run_note(rx.commands("PRE")[0])
    monkeypatch.setattr(rx, "RESUME", True)
    assert "continues" in rx.earlier_run_note(rx.commands("META")[0])
    assert rx.earlier_run_note(rx.commands("META")[1]) is None  # meta_eval only reads
    for name, c in rx.demo_commands(smoke=True):
        assert ("--overwrite" in c) == (name == "pre-train" or name.endswith("meta-train")), name
    rx.run(rx.demo_commands(smoke=True)[0][1], dry=True)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("$ python") and out[1].startswith("# an earlier run in its folder is moved aside")


def test_several_gpus_launch_through_torchrun(monkeypatch, capsys):
    """GPU_ID = "0,1,2,3": every phase runs as torchrun --nproc_per_node=4 main.py ..., printed as such."""
    monkeypatch.setattr(rx, "GPU_ID", "0,1,2,3")
    monkeypatch.setattr(rx, "DEVICE", "cuda")
    for mode, phases in (("PRE", ["pre_train"]), ("META", ["meta_train", "meta_eval"])):
        cmds = rx.commands(mode)
        for c in cmds:
            assert c[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
        assert [parse_args(c[6:]).phase for c in cmds] == phases
        assert parse_args(cmds[0][6:]).gpu == "0,1,2,3"
    rx.run(rx.commands("PRE")[0], dry=True)
    shown = capsys.readouterr().out.splitlines()[0]
    assert shown.startswith("$ torchrun --standalone --nproc_per_node=4 main.py --phase pre_train ")
    monkeypatch.setattr(rx, "DEVICE", "cpu")  # one process on the CPU, whatever GPU_ID says
    assert rx.commands("PRE")[0][1] == rx.script("main.py")
    monkeypatch.setattr(rx, "DEVICE", "cuda")
    monkeypatch.setattr(rx, "GPU_ID", "0")
    assert rx.commands("PRE")[0][1] == rx.script("main.py")
