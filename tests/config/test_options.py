import argparse
import math

import pytest

from config import options
from config.options import RECIPES, SEED_MAX, build_parser, explicit_flags, parse_args

OFFICIAL = {  # reference section 7.1: name -> official default
    "model_type": "ResNet", "phase": "meta_train", "seed": 0, "dataset_dir": "./data/mini/", "max_epoch": 100,
    "num_batch": 100, "shot": 1, "way": 5, "train_query": 15, "val_query": 15, "meta_lr1": 1e-4, "meta_lr2": 1e-3,
    "base_lr": 0.01, "update_step": 50, "step_size": 10, "gamma": 0.5, "init_weights": None, "eval_weights": None,
    "meta_label": "exp1", "pre_max_epoch": 100, "pre_batch_size": 128, "pre_lr": 0.1, "pre_gamma": 0.2,
    "pre_step_size": 30, "pre_custom_momentum": 0.9, "pre_custom_weight_decay": 5e-4,
}


def test_every_official_flag_with_its_default():
    args = parse_args([])
    for k, v in OFFICIAL.items():
        assert getattr(args, k) == v, k
    assert args.dataset == "miniImageNet"      # the official default was not one of its choices
    assert args.gpu is None                     # the official '1' hid the only GPU
    assert args.backbone == "resnet25" and args.image_size == 80
    assert args.test_update_step == args.update_step


def test_recipe_sets_defaults_but_explicit_flags_win():
    args = parse_args(["--recipe", "paper"])
    for k, v in RECIPES["paper"].items():
        assert getattr(args, k) == v, k
    args = parse_args(["--recipe", "paper", "--backbone", "resnet12_wide", "--update_step", "7"])
    assert args.backbone == "resnet12_wide" and args.update_step == 7 and args.test_update_step == 100


@pytest.mark.parametrize("flag", ["--shot", "--way", "--train_query", "--val_query", "--max_epoch",
                                  "--pre_max_epoch", "--update_step", "--num_batch"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_nonpositive_counts_are_rejected(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "positive" in err and err.count("\n") == 1


# ------------------------------------------------------------------ issue 20: every flag's range at parse time


def test_every_flag_with_a_value_has_a_checking_type_or_choices():
    """No flag parses with a bare int / float / str: each numeric, path, label and GPU flag has a type of
    config/options.py that checks its range (and says what it accepts, for run_experiment.py's messages)."""
    for a in build_parser()._actions:
        if not a.option_strings or a.nargs == 0 or a.dest == "help":
            continue
        if a.choices is not None:
            continue
        assert a.type not in (None, int, float, str), a.option_strings
        assert isinstance(getattr(a.type, "requirement", None), str), a.option_strings


@pytest.mark.parametrize("fn,good,bad", [
    (options.seed_int, ["0", str(SEED_MAX)], ["-1", str(SEED_MAX + 1), "1.0", ""]),
    (options.positive_int, ["1", str(options.INT_MAX)], ["0", "-1", str(options.INT_MAX + 1), "1e3", "nan", " "]),
    (options.nonneg_int, ["0"], ["-1", "x"]),
    (options.positive_float, ["1e-30", "3e38", "5"], ["0", "-1", "nan", "inf", "-inf", "1e39", ""]),
    (options.nonneg_float, ["0", "5e-4"], ["-1e-9", "nan", "inf"]),
    (options.momentum, ["0.9", "1e-3"], ["0", "1", "-0.5", "nan"]),
    (options.keep_rate, ["1", "0.5"], ["0", "1.01", "nan"]),
    (options.timeout_seconds, ["1", "600", "1e9"], ["0.5", "0", "inf", "1.1e9"]),
    (options.image_px, ["16", "4096"], ["0", "4097"]),
    (options.gpu_list, ["0", "0,1", " 2 , 3", "GPU-8f1c", "MIG-GPU-1/2/0", ""], ["-1", "cpu", "0,x", "0,,1"]),
    (options.path_text, ["./logs", "x"], ["", "  "]),
    (options.label_text, ["", "exp1", "a.b"], ["a/b", "a\\b", ".", ".."]),
    (options.query_count, ["shot", "3"], ["0", "shots", ""]),
])
def test_each_value_type_accepts_its_range_only(fn, good, bad):
    for text in good:
        fn(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match="^must be"):
            fn(text)


def test_float_flags_refuse_nan_and_inf_everywhere(capsys):
    for a in build_parser()._actions:
        if a.type in (options.positive_float, options.nonneg_float, options.keep_rate, options.momentum,
                      options.timeout_seconds):
            for v in ("nan", "inf"):
                with pytest.raises(SystemExit):
                    parse_args([f"{a.option_strings[0]}={v}"])
                assert f"argument {a.option_strings[0]}: must be" in capsys.readouterr().err
    assert math.isfinite(parse_args(["--base_lr", "1e30"]).base_lr)  # large and finite: the run's checks decide


def test_explicit_flags_are_what_the_command_line_gives():
    """Not the parser's defaults, not a recipe's presets; abbreviations and --first_order (dest second_order)
    resolved."""
    assert explicit_flags(["--recipe", "paper"]) == {"recipe"}
    assert explicit_flags(["--pre_init", "3", "--first", "--hard_task"]) == {"pre_init_epoch", "second_order",
                                                                              "hard_task"}
    assert explicit_flags([]) == frozenset()
    assert parse_args(["--recipe", "paper"]).pre_init_epoch == 10  # a preset, yet not "given"


@pytest.mark.parametrize("argv", [["--resume", "--overwrite"], ["--overwrite", "--resume"],
                                  ["--first_order", "--second_order"], ["--second", "--first"]])
def test_flags_that_set_one_switch_twice_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and " contradict each other: " in err
