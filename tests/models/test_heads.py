"""models/heads.py: one few-shot head interface (``fit`` on T tasks' supports, ``logits`` of their queries) and one
registry; adding a classifier is one class and its line in ``HEADS`` (the toy cosine head below goes through
``main.py --phase meta_eval --eval_classifier cosine`` end to end, on the feature bank and episode by episode)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import main
from config.options import build_parser
from data_generator.meta_data_generator import by_class, episode_labels
from models.heads import (HEADS, CentroidHead, FewShotHead, FinetuneHead, InnerLoop, class_means, fresh_init,
                          inner_loop, make_head)
from models.mtl import MetaLearner
from tests.helpers import assert_close_f64

ROOT = Path(__file__).resolve().parents[2]
V1 = ROOT / "tests" / "data" / "checkpoints_v1"
FLAGS = ["--dataset", "glyphs", "--dataset_dir", str(ROOT / "data" / "glyphs100.npz"), "--backbone", "conv4",
         "--image_size", "16", "--preprocess", "paper", "--quiet", "--device", "cpu", "--cache_dir", "none",
         "--num_test_episodes", "40", "--val_query", "5", "--test_update_step", "10", "--base_lr", "0.1"]


def _tasks(t=3, way=5, shot=2, query=3, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(t, way * shot, d, generator=g, dtype=dtype)
    f_q = torch.randn(t, way * query, d, generator=g, dtype=dtype)
    y_s = episode_labels(way, shot).expand(t, -1)
    return f_s, y_s, f_q


def test_the_registry_is_the_choices_of_eval_classifier():
    assert list(HEADS) == ["finetune", "centroid"]
    action = next(a for a in build_parser()._actions if a.dest == "eval_classifier")
    assert action.choices == list(HEADS)
    with pytest.raises(ValueError, match="unknown few-shot head 'knn'; registered: finetune, centroid"):
        make_head("knn", 5)


@pytest.mark.parametrize("order", ["first", "autograd", "second"])
def test_finetune_head_is_the_inner_loop_then_the_linear_logits(order):
    """fit = Eq. 3 from the initialisation (the same inner_loop call), logits = X W_T^T + b_T per task, bit for bit."""
    f_s, y_s, f_q = _tasks()
    w0, b0 = fresh_init(5, 8, seed=2)
    head = make_head("finetune", 5, (w0, b0), InnerLoop(7, 0.3, 5.0), order)
    logits = head.fit(f_s, y_s).logits(f_q)
    w, b = inner_loop(f_s, y_s, w0.expand(3, -1, -1), b0.expand(3, -1), 7, 0.3, order=order, loss_scale=5.0)
    assert logits.shape == (3, 15, 5)
    by_task = torch.stack([F.linear(f_q[i], w[i], b[i]) for i in range(3)])
    assert torch.equal(logits.detach(), by_task.detach())
    # a task's logits do not depend on the tasks fitted with it (one linear map per task)
    one = make_head("finetune", 5, (w0, b0), InnerLoop(7, 0.3, 5.0), order).fit(f_s[1:2], y_s[1:2]).logits(f_q[1:2])
    wi, bi = inner_loop(f_s[1:2], y_s[1:2], w0[None], b0[None], 7, 0.3, order=order, loss_scale=5.0)
    assert torch.equal(one.detach(), F.linear(f_q[1], wi[0], bi[0]).detach()[None])
    assert FinetuneHead(5, (w0, b0), InnerLoop(1, 0.1, second_order=True)).order == "second"
    with pytest.raises(ValueError, match="needs its initialisation"):
        FinetuneHead(5)


def test_meta_training_adapts_through_the_same_head(monkeypatch):
    """MetaLearner.forward_tasks fits the finetune head from its base learner: a spy on the head sees the
    base learner's parameters as the initialisation and the inner loop's settings."""
    seen = []
    real_fit = FinetuneHead.fit

    def spy(self, feat_s, y_s):
        seen.append((self.init, self.inner, self.order, tuple(feat_s.shape)))
        return real_fit(self, feat_s, y_s)
    monkeypatch.setattr(FinetuneHead, "fit", spy)
    torch.manual_seed(0)
    model = MetaLearner("conv4", way=5)
    x = torch.rand(2, 10, 3, 16, 16)
    logits = model.forward_tasks(x[:, :5], torch.arange(5), x[:, 5:], InnerLoop(3, 0.1, 5.0))
    assert logits.shape == (2, 5, 5)
    (init, inner, order, shape), = seen
    assert init[0] is model.base_learner.weight and init[1] is model.base_learner.bias
    assert (inner.steps, inner.lr, inner.loss_scale, order, shape) == (3, 0.1, 5.0, "first", (2, 5, 64))


def test_centroid_head_is_minus_the_squared_distance_to_the_class_means():
    f_s, y_s, f_q = _tasks(dtype=torch.float64)
    logits = make_head("centroid", 5).fit(f_s, y_s).logits(f_q)
    means = by_class(f_s, 5, dim=1).mean(1)                                 # (T, way, D): the layout's classes
    want = -((f_q[:, :, None] - means[:, None]) ** 2).sum(-1)
    assert_close_f64({"logits": logits}, {"logits": want})


def test_class_means_of_any_label_order_and_of_unbalanced_supports():
    f_s, y_s, _ = _tasks(t=2, shot=3)
    layout = by_class(f_s, 5, dim=1).mean(1)
    assert torch.equal(class_means(f_s, y_s, 5), layout)                    # the episode layout: the same reduction
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(1))
    f64 = f_s.double()
    assert_close_f64({"means": class_means(f64[:, perm], y_s[:, perm], 5)},  # any order: the same means
                     {"means": by_class(f64, 5, dim=1).mean(1)})
    y = torch.tensor([[0, 0, 0, 1, 2], [2, 1, 1, 0, 0]])
    f = torch.randn(2, 5, 4, dtype=torch.float64)
    got = class_means(f, y, 3)
    want = torch.stack([torch.stack([f[t][y[t] == k].mean(0) for k in range(3)]) for t in range(2)])
    assert_close_f64({"means": got}, {"means": want})
    with pytest.raises(ValueError, match="every class needs a support image"):
        class_means(f, torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 0, 0]]), 3)


def test_result_names_come_from_the_head():
    assert (FinetuneHead.method("meta"), FinetuneHead.method("pre")) == ("mtl", "pretrained")
    assert (CentroidHead.method("meta"), CentroidHead.method("pre")) == ("mtl+centroid", "pretrained+centroid")


# ---------------------------------------------------------------------------------------------- a new classifier
class CosineHead(FewShotHead):
    """The toy classifier a user adds: cosine similarity to the class means, scaled by 10 (one class + one line)."""

    name = "cosine"

    def fit(self, feat_s, y_s):
        self.protos = F.normalize(class_means(feat_s, y_s, self.way), dim=-1)
        return self

    def logits(self, feat_q):
        return 10 * F.normalize(feat_q, dim=-1) @ self.protos.transpose(1, 2)


def test_a_registered_toy_head_runs_meta_eval_end_to_end(tmp_path, monkeypatch, capsys):
    ck = tmp_path / "meta.pth"
    ck.write_bytes((V1 / "meta_conv4_5way1shot.pth").read_bytes())
    argv = ["--phase", "meta_eval", "--eval_weights", str(ck), "--log_root", str(tmp_path), "--eval_classifier",
            "cosine"] + FLAGS
    with pytest.raises(SystemExit) as e:  # not registered: not a choice (argparse's one line, exit 2)
        main.cli(argv)
    assert e.value.code == 2
    assert "argument --eval_classifier: invalid choice: 'cosine'" in capsys.readouterr().err
    monkeypatch.setitem(HEADS, "cosine", CosineHead)  # the registry line
    means = {}
    for mode in ("bank", "episodic"):
        assert main.cli(argv + ["--eval_mode", mode]) == 0
        out = capsys.readouterr().out
        assert "test accuracy:" in out
        res = json.loads((tmp_path / "results_mtl_cosine_5way1shot.json").read_text())
        assert (res["method"], res["classifier"], res["eval_mode"], res["episodes"]) == ("mtl+cosine", "cosine",
                                                                                       mode, 40)
        means[mode] = res["mean"]
    assert means["bank"] == means["episodic"]  # (pytorch BatchNorm: the two paths encode the same features)
    assert means["bank"] > 30                   # 5-way chance is 20%: the head classifies
