"""The trainers read typed settings only (``config/settings.py``), and every flag reaches its typed field.

* No trainer reads a raw flag: no ``.args`` anywhere in ``trainer/*.py`` (``self.args.x``, ``settings.args.x``,
  ``a = self.args``), checked on the source with ``ast``. ``Settings.args`` is the record only (``Settings.record``,
  ``Settings.check_resume``), so one flag has one reading and two paths cannot drift apart, as pre-training's did
  (``args.amp`` in the torchrun step, ``settings.amp`` in the single-process one: under torchrun on a CPU
  ``--amp_dtype bfloat16`` was ignored).
* Every field of the typed objects the trainers read is set from its flag (a table; a field the table misses fails).
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import trainer.pre
from config.options import parse_args
from config.settings import MetaTrainSettings, ModelSettings, PreTrainSettings, Runtime, Settings
from data_generator.dataset_loader import ImageSet
from models.mtl import PreLearner

ROOT = Path(__file__).resolve().parents[2]
TRAINERS = sorted((ROOT / "trainer").glob("*.py"))


def raw_reads(source: str) -> list[str]:
    """``"line N: <code>"`` for every ``.args`` attribute in ``source`` (read or written)."""
    return [f"line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and node.attr == "args"]


def test_the_trainers_are_found():
    assert {p.name for p in TRAINERS} >= {"base.py", "pre.py", "meta.py"}


@pytest.mark.parametrize("path", TRAINERS, ids=lambda p: p.name)
def test_no_trainer_reads_a_raw_flag(path):
    bad = raw_reads(path.read_text())
    assert not bad, f"trainer/{path.name} reads the flags' record; read a typed setting instead: {'; '.join(bad)}"


@pytest.mark.parametrize("source", [
    "x = self.args.way", "a = self.args\ny = a.pre_lr", "amp = settings.args.amp", "getattr(self.settings.args, 'k')",
    "def f(s):\n    return s.args.seed",
])
def test_a_raw_read_is_caught(source):
    assert raw_reads(source)


def test_typed_reads_pass():
    assert not raw_reads("lr = self.settings.pre_train.lr\nrec = self.settings.record()\nargs = 1")


# ------------------------------------------------------------------------------------- every flag, its typed field
# (flag, value given, where the trainers read it, the value they read)
FIELDS = [
    (["--amp", "--amp_dtype", "bfloat16"], lambda s: s.run.amp, "bfloat16"),
    (["--channels_last"], lambda s: s.run.channels_last, True),
    (["--compile"], lambda s: s.run.compile, True),
    (["--deterministic"], lambda s: s.run.deterministic, True),
    (["--quiet"], lambda s: s.run.progress, False),
    (["--resume"], lambda s: s.run.resume, True),
    (["--overwrite"], lambda s: s.run.overwrite, True),
    (["--stop_after_epoch", "3"], lambda s: s.run.stop_after_epoch, 3),
    (["--pre_max_epoch", "7"], lambda s: s.pre_train.epochs, 7),
    (["--pre_batch_size", "9"], lambda s: s.pre_train.batch_size, 9),
    (["--pre_iters_per_epoch", "11"], lambda s: s.pre_train.iters_per_epoch, 11),
    (["--pre_optimizer", "adam"], lambda s: s.pre_train.optimizer, "adam"),
    (["--pre_lr", "0.25"], lambda s: s.pre_train.lr, 0.25),
    (["--pre_custom_momentum", "0.5"], lambda s: s.pre_train.momentum, 0.5),
    (["--pre_custom_weight_decay", "0.125"], lambda s: s.pre_train.weight_decay, 0.125),
    (["--pre_step_size", "13"], lambda s: s.pre_train.step_size, 13),
    (["--pre_gamma", "0.375"], lambda s: s.pre_train.gamma, 0.375),
    (["--pre_save_every", "4"], lambda s: s.pre_train.save_every, 4),
    (["--sync_bn"], lambda s: s.pre_train.sync_bn, True),
    (["--max_epoch", "17"], lambda s: s.meta_train.epochs, 17),
    (["--num_batch", "19"], lambda s: s.meta_train.iterations, 19),
    (["--meta_batch_size", "3"], lambda s: s.meta_train.meta_batch, 3),
    (["--way", "7"], lambda s: s.meta_train.way, 7),
    (["--shot", "6"], lambda s: s.meta_train.shot, 6),
    (["--train_query", "8"], lambda s: s.meta_train.query, 8),
    (["--update_step", "23", "--base_lr", "0.0625", "--inner_loss", "sum", "--way", "4", "--second_order"],
     lambda s: s.meta_train.inner, (23, 0.0625, 4.0, True)),
    (["--meta_lr1", "0.0078125"], lambda s: s.meta_train.lr1, 0.0078125),
    (["--meta_lr2", "0.00390625"], lambda s: s.meta_train.lr2, 0.00390625),
    (["--step_size", "29"], lambda s: s.meta_train.step_size, 29),
    (["--gamma", "0.875"], lambda s: s.meta_train.gamma, 0.875),
    (["--meta_lr_min", "0.00001"], lambda s: s.meta_train.lr_min, 0.00001),
    (["--init_weights", "scratch"], lambda s: s.meta_train.init_weights, "scratch"),
    (["--pre_init_epoch", "10"], lambda s: s.meta_train.init_epoch, 10),
    (["--backbone", "conv4"], lambda s: s.model.backbone, "conv4"),
    (["--bn_mode", "tf"], lambda s: s.model.bn_mode, "tf"),
    (["--way", "9"], lambda s: s.model.way, 9),
    (["--shortcut_ss", "off"], lambda s: s.model.shortcut_ss, False),
    (["--pre_head", "linear"], lambda s: s.model.pre_head, "linear"),
    (["--pre_dropout_keep", "0.75"], lambda s: s.model.dropout_keep, 0.75),
    (["--image_size", "40"], lambda s: s.model.image_size, 40),
    (["--preprocess", "paper"], lambda s: s.model.preprocess, "paper"),
    (["--seed", "31"], lambda s: s.seed, 31),
    (["--phase", "meta_eval", "--eval_weights", "x.pth"], lambda s: (s.eval_weights, s.eval_checkpoint),
     ("x.pth", "x.pth")),
]


def _value(v):
    return (v.steps, v.lr, v.loss_scale, v.second_order) if dataclasses.is_dataclass(v) else v


@pytest.mark.parametrize("flags, read, want", FIELDS, ids=[" ".join(f[0]) for f in FIELDS])
def test_each_flag_reaches_its_typed_field(flags, read, want):
    default = _value(read(Settings.from_args(parse_args([]))))
    assert default != want, "pick a value that is not the default, or the test cannot fail"
    assert _value(read(Settings.from_args(parse_args(flags)))) == want


def test_the_table_covers_every_field_the_trainers_read():
    """Every field of config/settings.py's own types is changed by some row of FIELDS (so each is wired)."""
    typed = {"run": Runtime, "pre_train": PreTrainSettings, "meta_train": MetaTrainSettings, "model": ModelSettings}
    every = {(part, f.name) for part, cls in typed.items() for f in dataclasses.fields(cls)}
    default = Settings.from_args(parse_args([]))
    covered = set()
    for flags, _, _ in FIELDS:
        changed = Settings.from_args(parse_args(flags))
        covered |= {(p, n) for p, n in every if getattr(getattr(default, p), n) != getattr(getattr(changed, p), n)}
    assert every <= covered, f"no row of FIELDS sets {sorted(every - covered)}"


def test_the_record_is_the_flags_and_resume_adopts_the_stored_seed(tmp_path):
    from utils.errors import UserError
    s = Settings.from_args(parse_args(["--resume", "--seed", "0"]))
    stored = dict(s.record(), seed=1234)
    resumed = s.check_resume(stored, str(tmp_path))
    assert resumed.seed == 1234 and resumed.record()["seed"] == 1234 and resumed.run == s.run
    with pytest.raises(UserError, match=r"was started with --pre_lr 0.5, not 0.1; use the same settings"):
        s.check_resume(dict(stored, pre_lr=0.5), str(tmp_path))
    s.check_resume(dict(stored, max_epoch=1000, quiet=True), str(tmp_path))  # flags that may change on resume


# ---------------------------------------------------------------- pre-training: one precision for both of its steps
def test_pre_train_steps_one_process_and_torchrun_run_the_same_precision(monkeypatch, tmp_path):
    """``train_step`` (one process) and ``train_step_distributed`` (torchrun; run here in a world of one, where every
    collective is a no-op) both autocast with ``Settings.run.amp``, i.e. ``--amp`` with its ``--amp_dtype``. (The
    torchrun step read ``args.amp``, a bool, so ``--amp_dtype bfloat16`` was lost there: on a CPU without native
    bfloat16, ``True`` means "auto", which runs float32.)"""
    seen = []

    def spy(device, amp):
        seen.append(amp)
        return torch.autocast("cpu", enabled=False)

    monkeypatch.setattr(trainer.pre, "autocast", spy)
    args = parse_args(["--backbone", "conv4", "--image_size", "16", "--preprocess", "paper", "--pre_augment", "off",
                       "--log_root", str(tmp_path), "--amp", "--amp_dtype", "bfloat16"])
    tr = trainer.pre.PreTrainer(Settings.from_args(args), torch.device("cpu"))
    rng = np.random.default_rng(0)
    tr.train_set = ImageSet(images=rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8),
                            labels=np.repeat(np.arange(4), 2).astype(np.int64), class_names=list("abcd"), source="t")
    tr.labels_t = torch.from_numpy(tr.train_set.labels)
    tr.model = PreLearner("conv4", num_classes=4)
    tr.train_encoder = tr.model.encoder
    tr.optimizer = torch.optim.SGD(tr.model.parameters(), lr=0.01)
    tr.train_step(*tr.load_batch(np.arange(4)))
    tr.ddp = tr.model  # (DistributedDataParallel's call, in a world of one)
    tr.train_step_distributed(np.arange(4))
    assert seen == ["bfloat16", "bfloat16"]


def test_ht_normal_tasks_defaults_to_the_meta_batch_size_as_its_help_says():
    from config.options import build_parser
    help_text = " ".join(next(a.help for a in build_parser()._actions if a.dest == "ht_normal_tasks").split())
    assert "(default: --meta_batch_size)" in help_text
    assert Settings.from_args(parse_args(["--hard_task", "--meta_batch_size", "3"])).hard.normal_tasks == 3
    given = parse_args(["--hard_task", "--meta_batch_size", "3", "--ht_normal_tasks", "5"])
    assert Settings.from_args(given).hard.normal_tasks == 5
