"""run_experiment.py: every seed constant reaches main.py; modes; the no-data message; every constant is checked
(type, range, relations, main.py's checks) before any command runs, naming the constant and its line."""
import os
import re
import subprocess
import sys
from pathlib import Path

import json

import numpy as np
import pytest
import torch

import run_experiment as rx
from config.options import parse_args
from tests.test_errors import RUN_EXPERIMENT_ROWS, check_output

ROOT = Path(__file__).resolve().parents[1]


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
    with pytest.raises(rx.ConstantError, match=r"MAX_MAX_ITER = 1234 is not a multiple of SAVE_STEP = 100"):
        rx.commands("META")


@pytest.mark.parametrize("argv", [[], ["NOPE"]])
def test_unknown_or_missing_mode(argv):
    p = subprocess.run([sys.executable, "run_experiment.py"] + argv, capture_output=True, text=True)
    assert p.returncode == 2
    assert "modes: PRE, META, TEST, META_LOAD, TEST_LOAD, DEMO, BENCH, ABLATION, SUMMARY" in p.stderr
    assert "Traceback" not in p.stderr


def test_pre_without_data_is_one_clear_message(tmp_path):
    # the default constants point at ./data/mini-imagenet, which is not there in a fresh clone
    p = subprocess.run([sys.executable, os.path.abspath("run_experiment.py"), "PRE"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err) == 2 and err[0].startswith("error: dataset folder not found: ./data/mini-imagenet/train")
    assert "<root>/{train,val,test}/<class>/<image>" in err[0] and "DEMO" in err[0]
    # the flag that named the folder (not --dataset_dir, which this command does not pass), and the constant behind it
    assert "set --pre_train_dir," in err[0]
    assert err[1] == f"note: in run_experiment.py, --pre_train_dir is PRE_TRA_DIR (line {_line('PRE_TRA_DIR')})"
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



# ------------------------------------------------------------------ issue 20: the check of the constants
def line_of(text: str, name: str, key: str | None = None) -> int:
    """The line that sets the constant ``name`` (``NAME = `` at the start of a line), or its entry ``key``
    (``"key":`` before the next constant; the constant's own line if it has none), found by text."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"{name} = "))
    if key is None:
        return start + 1
    for i in range(start, len(lines)):
        if i > start and re.match(r"^[A-Z_]+ = ", lines[i]):
            break
        if f'"{key}":' in lines[i]:
            return i + 1
    return start + 1


def run_edited_copy(tmp_path: Path, old: str, new: str, *argv: str) -> tuple[subprocess.CompletedProcess, str]:
    """``python run_experiment.py ARGV`` from a copy in ``tmp_path`` with ``old`` replaced by ``new`` and three comment
    lines put above it (so that its line differs from the real file's: the check must read the file it runs)."""
    text = (ROOT / "run_experiment.py").read_text()
    assert text.count(old) == 1, old
    text = text.replace(old, "# shifted\n# by\n# three lines\n" + new)
    (tmp_path / "run_experiment.py").write_text(text)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "run_experiment.py", *argv], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    return p, text


def assert_refused(p: subprocess.CompletedProcess, tmp_path: Path, text: str, name: str, *parts: str) -> str:
    """Exit 2, one line naming ``name`` at its line in the edited copy, nothing printed on stdout (no command shown
    or run) and nothing written next to the copy."""
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(err) == 1, p.stderr
    const, _, key = name.partition("[")
    assert err[0].startswith(f"error: run_experiment.py line {line_of(text, const, key.strip(chr(39) + ']') or None)}"
                             f": {name}"), err[0]
    assert all(x in err[0] for x in parts), (parts, err[0])
    assert p.stdout == "" and sorted(os.listdir(tmp_path)) == ["run_experiment.py"]
    return err[0]


CATALOGUE = {  # row -> (the line of run_experiment.py, its edit, the constant named)
    "E127": ("PRE_TRA_ITER_MAX = 20000 ", 'PRE_TRA_ITER_MAX = "20000" ', "PRE_TRA_ITER_MAX"),
    "E128": ("SHOT_NUM = 1 ", "SHOT_NUM = 0 ", "SHOT_NUM"),
    "E129": ("IMAGE_SIZE = 84 ", "IMAGE_SIZE = 8 ", "IMAGE_SIZE"),
    "E189": ("SEEDS = [1] ", "SEEDS = [1, 1] ", "SEEDS"),
}


@pytest.mark.parametrize("cid", RUN_EXPERIMENT_ROWS)
def test_catalogue_row(cid, tmp_path):
    """The run_experiment.py rows of docs/ERRORS.md: the message, exit code and one line (tests/test_errors.py
    check_output), from an edited copy run as a script; no command was printed or run."""
    old, new, name = CATALOGUE[cid]
    p, text = run_edited_copy(tmp_path, old, new, "PRE")
    check_output(cid, p.returncode, p.stderr)
    assert_refused(p, tmp_path, text, name)


def test_a_string_switch_is_refused_not_emitted(tmp_path):
    """SECOND_ORDER = "False" (a non-empty str, hence true) was emitted as --second_order; --dry_run prints nothing."""
    p, text = run_edited_copy(tmp_path, "SECOND_ORDER = True ", 'SECOND_ORDER = "False" ', "META", "--dry_run")
    assert_refused(p, tmp_path, text, "SECOND_ORDER", "must be True or False (without quotes), not a str")


def test_a_dict_entry_is_named_at_its_own_line(tmp_path):
    p, text = run_edited_copy(tmp_path, '"test_update_step": 100, "base_lr": 0.1,', '"test_update_step": 100,\n'
                              '    "base_lr": "0.1",', "DEMO", "--dry_run")
    assert_refused(p, tmp_path, text, "DEMO['base_lr']", "DEMO['base_lr'] = '0.1' must be a number (a number")


def _line(name: str, key: str | None = None) -> int:
    return line_of((ROOT / "run_experiment.py").read_text(), name, key)


# (constant or (dict, key), wrong value, mode, what the line must say after "NAME = value")
WRONG = [
    ("SHOT_NUM", True, "PRE", "must be an int, not a bool (True and False are not numbers here)"),
    ("WAY_NUM", 5.0, "PRE", "must be an int, not a float"),
    ("WAY_NUM", 1, "PRE", ": main.py refuses it: --way 1: a few-shot task needs at least 2 classes"),
    ("PRE_LR", float("nan"), "PRE", "must be a finite number > 0 (it sets main.py --pre_lr)"),
    ("BASE_LR", "0.001", "TEST", "must be a number (a number without quotes), not a str"),
    ("PRE_TRA_DROP", 1.5, "PRE", "must be a number in (0, 1] (it sets main.py --pre_dropout_keep)"),
    ("GPU_ID", "-1", "PRE", 'must be GPU indices separated by commas (0 or 0,1) or GPU-/MIG- UUIDs (it sets main.py '
                            '--gpu; to run on the CPU: DEVICE = "cpu")'),
    ("DEVICE", "gpu", "META", "must be one of auto, cpu, cuda (it sets main.py --device)"),
    ("NET_ARCH", "resnet13", "PRE", "must be one of resnet12, "),
    ("LOG_DIR", None, "DEMO", "must be a str (text in quotes), not None"),
    ("PRE_TRA_LABEL", "a/b", "PRE", "must be a label without / or \\"),
    ("HARD_TASK", 1, "META", "must be True or False (without quotes), not an int"),
    ("TF_FLAGS", ["--bn_mode", 1], "PRE", "must be a list of str (main.py flags and their values); item 1 is an int"),
    ("META_WEIGHTS_FILE", "meta_{shots}.pth", "TEST_LOAD", "must be a file name in which {{shot}} stands for SHOT_NUM"),
    ("META_LR_MIN", 0.01, "META", "(with META_LR = 0.001, line {META_LR}): main.py refuses it: --meta_lr_min 0.01 is "
                                  "above --meta_lr1 0.001"),
    ("MAX_MAX_ITER", 20050, "META", "is not a multiple of SAVE_STEP = 100 (line {SAVE_STEP}): main.py counts"),
    (("DEMO_SMOKE", "pre_max_epoch"), 0, "DEMO --smoke",
     "must be a positive integer (it sets main.py --pre_max_epoch)"),
    (("ABLATION", "benchmark_seed"), -1, "ABLATION", "must be an integer in [0, 4294967295]"),
    (("DEMO", "bse_lr"), 0.1, "DEMO", "DEMO['bse_lr']: 'bse_lr' is not a main.py flag"),
]


@pytest.mark.parametrize("key,value,mode,says", WRONG,
                         ids=[f"{'-'.join(k) if isinstance(k, tuple) else k}={v!r}" for k, v, _, _ in WRONG])
def test_a_wrong_constant_stops_before_any_command(key, value, mode, says, monkeypatch, tmp_path, capsys):
    """One line: the constant, its line in run_experiment.py, its value and what it must be; exit 2; no command
    printed, started (subprocess.Popen would fail the test) or file written (the working folder stays empty)."""
    if isinstance(key, tuple):
        monkeypatch.setattr(rx, key[0], {**getattr(rx, key[0]), key[1]: value})
        shown, line = f"{key[0]}[{key[1]!r}]", _line(*key)
    else:
        monkeypatch.setattr(rx, key, value)
        shown, line = key, _line(key)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a command was started"))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        rx.cli(mode.split())
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(lines) == 1 and out == "", (out, err)
    assert lines[0].startswith(f"error: run_experiment.py line {line}: {shown}"), lines[0]
    assert says.format(**{n: _line(n) for n in ("META_LR", "SAVE_STEP")}) in lines[0], lines[0]
    assert f"{shown} = {value!r}" in lines[0] or f"{shown}: " in lines[0], lines[0]
    assert os.listdir(tmp_path) == []


def test_resume_and_overwrite_together_are_refused(monkeypatch, capsys):
    """RESUME wins silently today's way (OVERWRITE ignored); both True is now a contradiction naming both lines."""
    monkeypatch.setattr(rx, "RESUME", True)
    monkeypatch.setattr(rx, "OVERWRITE", True)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a command was started"))
    with pytest.raises(SystemExit) as e:
        rx.cli(["PRE", "--dry_run"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == (
        f"error: run_experiment.py line {_line('RESUME')}: RESUME = True and OVERWRITE = True (line "
        f"{_line('OVERWRITE')}) contradict each other: RESUME continues the runs in their folders, OVERWRITE moves "
        "them aside and starts afresh; set one of them to False")


def test_friendly_forms_are_accepted(monkeypatch):
    """An int where a float is needed, and GPU_ID = 0 for "0", are not errors."""
    monkeypatch.setattr(rx, "PRE_LR", 1)
    monkeypatch.setattr(rx, "GPU_ID", 0)
    rx.check_constants("PRE")
    a = parsed("PRE")
    assert a.pre_lr == 1.0 and a.gpu == "0"


def test_every_mode_passes_the_check_with_the_shipped_constants():
    for mode in rx.MODES:
        for smoke in (False, True):
            rx.check_constants(mode, "paper", smoke)
        rx.check_constants(mode, "pytorch")


def test_meta_load_does_not_pass_a_second_starting_checkpoint(monkeypatch, tmp_path):
    """META_LOAD starts from the downloaded weights: PRE_ITER's --pre_init_epoch (E121 with --init_weights) is left
    out of its meta-train command, and main.py's checks accept every command of the mode."""
    monkeypatch.setattr(rx, "DOWNLOAD_DIR", str(tmp_path))
    train, _ = rx.commands("META_LOAD")
    assert "--init_weights" in train and "--pre_init_epoch" not in train
    rx.check_commands("META_LOAD", "paper", False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_later_main_py_error_names_the_constant_behind_its_flag(monkeypatch, tmp_path, capfd):
    """main.py's own line (DEVICE = "cuda" on a machine without a GPU fails in main.py, not in the check), then one
    note naming the constant that set the flag it names."""
    monkeypatch.setattr(rx, "DEVICE", "cuda")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        rx.cli(["PRE"])
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err) == 2 and "Traceback" not in "".join(err), err
    assert err[0].startswith("error: --device cuda was requested but no CUDA GPU is available")
    assert err[1] == f"note: in run_experiment.py, --device is DEVICE (line {_line('DEVICE')})"


def test_ctrl_c_reaches_main_py_which_says_how_to_continue(tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) during a command: main.py stops with its own line and exit
    130; run_experiment.py waits for it and exits with its status, without a traceback of its own (it used to raise
    KeyboardInterrupt and kill main.py after 0.25 s)."""
    import signal
    import time
    code = ("import run_experiment as rx, sys; rx.DEVICE = 'cpu'; "
            f"rx.DEMO_SMOKE = dict(rx.DEMO_SMOKE, log_root={str(tmp_path / 'logs')!r}, pre_max_epoch=50); "
            "rx.cli(['DEMO', '--smoke'])")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not p.stdout.readline().startswith("phase pre_train") and time.time() < deadline:  # main.py's header:
        pass                                                                                 # its handlers are set
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the launcher and main.py both get it
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (p.returncode, err[-3000:])
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    # (tqdm's progress bars share stderr; whether one is drawn before the signal depends on the machine's speed)
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln
             and "s/it]" not in ln]
    assert 1 <= len(lines) <= 3 and lines[0].startswith("interrupted"), err


def test_sigterm_to_the_launcher_alone_reaches_main_py(tmp_path):
    """A scheduler (Kubernetes, kill) may signal run_experiment.py alone: it passes SIGTERM on to main.py, waits for
    it and exits as it did (143 = 128 + SIGTERM), without a traceback of its own (it used to die at once and leave
    main.py running)."""
    import signal
    import time
    code = ("import run_experiment as rx, sys; rx.DEVICE = 'cpu'; "
            f"rx.DEMO_SMOKE = dict(rx.DEMO_SMOKE, log_root={str(tmp_path / 'logs')!r}, pre_max_epoch=50); "
            "rx.cli(['DEMO', '--smoke'])")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not p.stdout.readline().startswith("phase pre_train") and time.time() < deadline:
        pass
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)  # the launcher only
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, (p.returncode, err[-3000:])
    assert "Traceback" not in err, err


# ------------------------------------------------------------------ issue 24: DEMO and ABLATION own their log roots
def _fake_main(log: list):
    """Stands in for ``run_experiment.run``: each main.py command leaves the files DEMO / ABLATION read afterwards
    (a training's trlog.json, a test's results file), stamped with the start's number ``log[0]``."""
    import json

    from config.settings import RunPaths

    def run(cmd, dry, sources=None):
        if cmd[1] != rx.script("main.py"):
            return  # the glyph benchmark, the report
        args = parse_args(cmd[2:])
        paths = RunPaths.from_args(args)
        if args.phase == "meta_eval":
            folder = os.path.dirname(args.eval_weights) if args.eval_weights else paths.meta_dir
            name = f"results_pretrained_5way{args.shot}shot.json" if args.eval_weights else "results.json"
        else:
            folder, name = (paths.pre_dir if args.phase == "pre_train" else paths.meta_dir), "trlog.json"
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            json.dump({"start": log[0], "mean": 50.0, "ci95": 1.0, "episodes": 50}, f)
    return run


@pytest.mark.parametrize("mode", ["DEMO", "ABLATION"])
def test_demo_and_ablation_keep_only_the_previous_run(mode, monkeypatch, tmp_path, capsys):
    """Three starts leave the root and ``<root>.previous`` (the second start's files) and no ``.old-<time>``
    folder; each start says so in its first line."""
    import json
    root = tmp_path / "logs" / mode.lower()
    smoke = "DEMO_SMOKE" if mode == "DEMO" else "ABLATION_SMOKE"
    monkeypatch.setattr(rx, smoke, dict(getattr(rx, smoke), log_root=str(root),
                                        **({"report_dir": str(root / "report")} if mode == "ABLATION" else {})))
    start = [0]
    monkeypatch.setattr(rx, "run", _fake_main(start))
    lines = []
    for start[0] in (1, 2, 3):
        rx.cli([mode, "--smoke"])
        lines.append(capsys.readouterr().out.splitlines()[0])
    assert lines[0] == (f"{mode} owns {root} (no earlier run there): the next {mode} keeps this one's files as "
                        f"{root}.previous and deletes older ones")
    assert lines[1] == (f"{mode} owns {root}: the previous {mode}'s files are now {root}.previous; a {mode} keeps "
                        "only the previous one")
    assert lines[2] == (f"{mode} owns {root}: the previous {mode}'s files are now {root}.previous (the one before "
                        f"was deleted); a {mode} keeps only the previous one")
    assert sorted(os.listdir(root.parent)) == [mode.lower(), f"{mode.lower()}.previous"]
    trlogs = {p.parents[2].name: p for p in root.parent.rglob("pre/*/trlog.json")}
    assert {k: json.loads(p.read_text())["start"] for k, p in trlogs.items()} == {root.name: 3,
                                                                                 f"{root.name}.previous": 2}
    assert not [p for p in root.parent.rglob("*") if ".old-" in p.name or ".deleting-" in p.name]


def test_a_root_with_files_no_demo_wrote_or_a_live_run_is_left_alone(monkeypatch, tmp_path, capsys):
    """DEMO deletes only what a DEMO wrote: a root holding another file, a root whose run is still going on
    (its lock's process is alive), and a ``.previous`` that is not a DEMO's are not moved or deleted; a root of
    an earlier DEMO version (no ``.owner``, only DEMO's entries) is taken as DEMO's."""
    from tests.trainer.test_resume import hashes
    from utils.run_lock import claim_owned_folder
    root = tmp_path / "demo"
    (root / "pre" / "glyphs_conv4").mkdir(parents=True)
    (root / "pre" / "glyphs_conv4" / "trlog.json").write_text("[]")
    (root / "notes.txt").write_text("mine")
    before = hashes(tmp_path)
    assert claim_owned_folder(str(root), "DEMO", rx.DEMO_ENTRIES) == (
        f"{root} holds files that no DEMO wrote (no .owner naming DEMO): nothing is moved or deleted; an earlier "
        "run in a run folder is moved aside to <folder>.old-<time> (--overwrite)")
    assert hashes(tmp_path) == before
    (root / "notes.txt").unlink()  # now as an earlier DEMO version left it
    lock = root / "pre" / "glyphs_conv4" / ".lock"
    lock.write_text(f'{{"pid": {os.getpid()}, "host": "{__import__("socket").gethostname()}", "started": "now"}}')
    before = hashes(tmp_path)
    assert claim_owned_folder(str(root), "DEMO", rx.DEMO_ENTRIES).startswith(
        f"{root} is in use by process {os.getpid()} on ")
    assert hashes(tmp_path) == before
    lock.unlink()
    (tmp_path / "demo.previous").mkdir()
    (tmp_path / "demo.previous" / "keep.txt").write_text("not a DEMO's")
    before = hashes(tmp_path)
    assert claim_owned_folder(str(root), "DEMO", rx.DEMO_ENTRIES).startswith(
        f"{root}.previous is not an earlier DEMO's folder (no .owner naming DEMO): nothing is moved or deleted")
    assert hashes(tmp_path) == before
    (tmp_path / "demo.previous" / "keep.txt").unlink()
    (tmp_path / "demo.previous").rmdir()
    assert "the previous DEMO's files are now" in claim_owned_folder(str(root), "DEMO", rx.DEMO_ENTRIES)
    assert (tmp_path / "demo.previous" / "pre" / "glyphs_conv4" / "trlog.json").read_text() == "[]"
    assert sorted(os.listdir(root)) == [".owner"]


# ------------------------------------------------------------------ issue 23: SEEDS, one run per seed, SUMMARY
def _in_process(extra: list[str]):
    """A stand-in for run_experiment.run_child that runs main.py and tools.report in this process (no interpreter
    start per command), with ``extra`` flags added to every main.py command (a short validation)."""
    import main
    from tools import report

    def run_child(cmd: list[str]) -> tuple[int, bytes]:
        if cmd[1:3] == ["-m", "tools.report"]:
            return report.main(cmd[3:]), b""
        assert cmd[1] == rx.script("main.py"), cmd
        return main.cli(cmd[2:] + extra), b""
    return run_child


TINY = {"DATASET": "custom", "NET_ARCH": "conv4", "IMAGE_SIZE": 16, "PREPROCESS": "paper", "PRE_BATCH_SIZE": 32,
        "PRE_EPOCH_ITERS": 4, "PRE_TRA_ITER_MAX": 8, "PRE_DROP_STEP": 4, "PRE_ITER": 4, "SAVE_STEP": 3,
        "MAX_MAX_ITER": 3, "LR_DROP_STEP": 3, "META_BATCH_SIZE": 1, "UPDATE_NUM": 3, "TEST_UPDATE_NUM": 3,
        "TRAIN_QUERY": 5, "TEST_QUERY": 5, "NUM_TEST_EPISODES": 20, "SECOND_ORDER": False, "DEVICE": "cpu",
        "BASE_LR": 0.1}


@pytest.mark.parametrize("bad,says", [([], "must be a list of seeds"), (1, "must be a list of seeds"),
                                      ([0, 2], "seed 0 draws a random seed"),
                                      ([1, -1], "SEEDS[1] = -1 must be an integer in [0, 4294967295]")])
def test_a_wrong_seed_list_is_one_line(bad, says, monkeypatch):
    monkeypatch.setattr(rx, "SEEDS", bad)
    with pytest.raises(rx.ConstantError, match=re.escape(says)) as e:
        rx.check_constants("PRE")
    assert str(e.value).startswith(f"run_experiment.py line {_line('SEEDS')}: SEEDS")


def test_one_seed_keeps_the_single_run_and_passes_its_seed(monkeypatch):
    monkeypatch.setattr(rx, "SEEDS", [7])
    a = [parse_args(c[2:]) for c in rx.commands("META")]
    assert [x.seed for x in a] == [7, 7] and {x.log_root for x in a} == {rx.LOG_DIR} and a[0].cache_dir is None
    assert len(rx.commands("META")) == 2  # no summary of one seed unless asked for (SUMMARY)
    summary = rx.commands("SUMMARY")
    assert len(summary) == 1 and summary[0][1:4] == ["-m", "tools.report", "--seeds"]


def test_a_seed_list_of_two_runs_two_folders_and_the_summary_std_is_numpys(monkeypatch, tmp_path):
    """SEEDS = [1, 2] on a tiny pack (conv4, 16 px, a few iterations): PRE and META run each seed into
    <LOG_DIR>/seed<N>/ with one shared cache; META ends with the summary, whose std across seeds is numpy's
    (ddof = 1) of the two results.json means, next to each seed's own interval."""
    from tests.helpers import make_npz
    npz = make_npz(str(tmp_path / "d.npz"), size=16, per_class=20, classes=(8, 6, 6))
    logs = tmp_path / "logs"
    for k, v in {**TINY, "LOG_DIR": str(logs), "SEEDS": [1, 2], "PRE_TRA_DIR": npz, "META_TRA_DIR": npz,
                 "META_VAL_DIR": npz, "META_TES_DIR": npz}.items():
        monkeypatch.setattr(rx, k, v)
    monkeypatch.setattr(rx, "run_child", _in_process(["--num_val_episodes", "10", "--pre_val_update_step", "3",
                                                      "--quiet"]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rx.cli(["PRE"])
    rx.cli(["META"])
    assert sorted(p.name for p in logs.iterdir()) == ["seed1", "seed2", "seeds"]  # (a pack needs no cache entry)
    run = "custom_conv4_5way1shot_exp1"
    args = [json.loads((logs / f"seed{s}" / "meta" / run / "args.json").read_text()) for s in (1, 2)]
    assert [(a["seed"], a["log_root"], a["cache_dir"]) for a in args] == [
        (s, str(logs / f"seed{s}"), str(logs / "cache")) for s in (1, 2)]
    res = [json.loads((logs / f"seed{s}" / "meta" / run / "results.json").read_text()) for s in (1, 2)]
    assert [r["settings"]["seed"] for r in res] == [1, 2]
    assert [json.loads((logs / f"seed{s}" / "pre" / "custom_conv4_normal" / "args.json").read_text())["seed"]
            for s in (1, 2)] == [1, 2]
    summary = json.loads((logs / "seeds" / run / "summary.json").read_text())
    row = summary["results"]["results.json"]
    means = np.array([r["mean"] for r in res])
    assert row["std"] == pytest.approx(np.std(means, ddof=1), abs=1e-4)  # (both rounded to 4 decimals)
    assert row["mean"] == pytest.approx(means.mean(), abs=1e-4) and row["n_seeds"] == 2
    assert [(p["seed"], p["mean"], p["ci95"]) for p in row["per_seed"]] == [(1, res[0]["mean"], res[0]["ci95"]),
                                                                            (2, res[1]["mean"], res[1]["ci95"])]
    md = (logs / "seeds" / run / "summary.md").read_text()
    assert "| std across seeds |" in md and f"{res[0]['mean']:.2f} ± {res[0]['ci95']:.2f}" in md
