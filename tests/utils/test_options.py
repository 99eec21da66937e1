import pytest

from utils.options import RECIPES, parse_args

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
