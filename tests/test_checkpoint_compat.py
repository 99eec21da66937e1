"""Checkpoints written by earlier code still load (``models.load``) and evaluate to the same accuracies.

* ``tests/data/checkpoints_v1/``: a conv4 pre-train and a meta checkpoint written by commit bf1d96f (the code before
  the first architecture change, issue #10), with ``make_fixture.py`` beside them;
* ``tests/data/checkpoints_v2/``: a conv4 pre-train checkpoint and a meta checkpoint trained with ``--bn_mode tf``
  (evaluated episode by episode) written by commit e418ecf, the code just before the model spec (issue 21): they have
  ``backbone`` and ``args`` but no ``"spec"``, so ``models/loading.py`` derives it (the tf one's ``--bn_mode`` from its
  ``args``).

``expected.json`` holds the per-episode accuracies that code gave on 100 fixed episodes of the embedded glyph pack's
test split. Today's code must give the same accuracy on every episode none of whose queries is within float32
rounding of a tie (float64 margins, the bound of ``tests/trainer/test_evaluate.py``): on the machine that wrote the
files that is every one of them; another CPU may round the last bits differently, and only a near-tie could then
flip.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from config.options import parse_args
from config.settings import Settings
from data_generator.meta_data_generator import fixed_episodes
from models.evaluate import encode_split, evaluate_bank, evaluate_episodic
from models.heads import InnerLoop, make_head
from models.loading import OURS_BEFORE_SPEC, load
from tests.trainer.test_evaluate import _tie_free, protocol, tie_free_features
from trainer.base import DataBundle

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
FLAGS = ["--dataset", "glyphs", "--dataset_dir", str(ROOT / "data" / "glyphs100.npz"), "--backbone", "conv4",
         "--image_size", "16", "--preprocess", "paper", "--quiet", "--device", "cpu", "--cache_dir", "none",
         "--num_test_episodes", "100", "--val_query", "5", "--test_update_step", "10", "--base_lr", "0.1"]
FILES = [("checkpoints_v1", "pre_conv4.pth"), ("checkpoints_v1", "meta_conv4_5way1shot.pth"),
         ("checkpoints_v2", "pre_conv4.pth"), ("checkpoints_v2", "meta_conv4_tf_5way1shot.pth")]


def _episodic_features(encoder, imageset, transform, eps, n_s):
    """(E, n, D): each episode encoded as the per-episode path does (query, then support, as their own batches)."""
    with torch.no_grad():
        out = []
        for ep in eps:
            x = transform(torch.from_numpy(np.ascontiguousarray(imageset.images[ep])))
            out.append(torch.cat([encoder(x[:n_s]), encoder(x[n_s:])]))
    return torch.stack(out)


@pytest.mark.parametrize("folder,name", FILES)
def test_checkpoint_of_earlier_code_evaluates_the_same(folder, name, tmp_path, capsys):
    expected = json.loads((DATA / folder / "expected.json").read_text())[name]
    tf_bn = "_tf_" in name
    settings = Settings.from_args(parse_args(FLAGS + ["--log_root", str(tmp_path)]))
    data = DataBundle(settings.data)
    test = data.load("test")
    model = load(str(DATA / folder / name))
    assert model.kind == expected["kind"] and model.source == OURS_BEFORE_SPEC
    assert (model.spec.backbone, model.spec.bn_mode, model.spec.image_size) == ("conv4", "tf" if tf_bn else "pytorch",
                                                                             16)
    w, b = model.head_init(5, 1)
    eps = fixed_episodes(test.labels, 100, 5, 1, 5, 1)
    inner = InnerLoop(10, 0.1)
    if tf_bn:  # batch statistics at test time: episode by episode (the recorded eval_mode)
        assert expected["eval_mode"] == "episodic"
        accs = evaluate_episodic(model.encoder, test, data.eval_transform, eps,
                                 make_head("finetune", 5, (w, b), inner, "autograd"), protocol(5, 1),
                                 torch.device("cpu"))
        feats = _episodic_features(model.encoder, test, data.eval_transform, eps, 5)
        clear = tie_free_features(feats, 5, 1, w, b, 10, 0.1, "finetune")
    else:
        feats = encode_split(model.encoder, test, data.eval_transform, torch.device("cpu"))
        accs = evaluate_bank(feats, eps, make_head("finetune", 5, (w, b), inner, "first"), protocol(5, 1))
        clear = _tie_free(feats, eps, 5, 1, w, b, 10, 0.1, "finetune")
    want = np.asarray(expected["accuracies"], dtype=np.float32)
    assert clear.sum() >= 80, clear.sum()
    np.testing.assert_array_equal(accs[clear], want[clear])
    # and through main.py, as a user runs it, without --bn_mode: the checkpoint sets it
    out = tmp_path / name
    out.write_bytes((DATA / folder / name).read_bytes())
    capsys.readouterr()
    assert main.cli(["--phase", "meta_eval", "--eval_weights", str(out), "--log_root", str(tmp_path)] + FLAGS) == 0
    said = capsys.readouterr().out
    assert ("the checkpoint sets --bn_mode tf" in said) == tf_bn, said
    res = json.loads(next(tmp_path.glob("results*.json")).read_text())
    assert res["episodes"] == 100 and res["eval_mode"] == expected.get("eval_mode", "bank")
    assert res["settings"]["bn_mode"] == ("tf" if tf_bn else "pytorch")
    assert abs(res["mean"] - 100 * expected["mean"]) <= 100 * (~clear).sum() / 100 + 1e-3
