"""models/loading.py and models/spec.py: one loader rebuilds the model of every source from the file alone (our
checkpoints with their spec and from before it, the official PyTorch ``{"params": ...}``, the TF ``.npy`` folder), and
flags only verify it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import main
from models.heads import fresh_init
from models.loading import OFFICIAL, OURS, OURS_BEFORE_SPEC, detect_backbone, init_meta_model, load, read_weights
from models.mtl import MetaLearner, PreLearner
from models.resnet_mtl import BACKBONES, build_backbone
from models.spec import Expect, ModelSpec
from models.tf_weights import TENSORFLOW
from tests.helpers import make_npz
from tests.tf_files import SLIM, official_files
from utils.checkpoint import FORMAT, load_strict
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
V1 = ROOT / "tests" / "data" / "checkpoints_v1"


def _save(obj, path) -> str:
    torch.save(obj, path)
    return str(path)


# ---------------------------------------------------------------------------------------------- official PyTorch
def test_official_pretrain_checkpoint_maps_to_encoder(tmp_path):
    plain = build_backbone("resnet25", mtl=False)
    w = read_weights(_save({"params": plain.state_dict()}, tmp_path / "pre.pth"))
    assert w.kind == "pre" and w.head is None and w.source == OFFICIAL and w.spec.backbone == "resnet25"
    mtl = build_backbone("resnet25", mtl=True)
    load_strict(mtl, w.encoder, "official", allow_missing=("mtl_weight", "mtl_bias"))
    assert torch.equal(mtl.conv1.weight, plain.conv1.weight)
    assert torch.equal(mtl.layer3[3].conv2.weight, plain.layer3[3].conv2.weight)
    assert torch.all(mtl.conv1.mtl_weight == 1) and torch.all(mtl.conv1.mtl_bias == 0)


def _official_meta(backbone: str, way: int = 5) -> dict:
    enc = build_backbone(backbone, mtl=True)
    w, b = torch.randn(way, enc.out_dim), torch.randn(way)
    sd = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    sd.update({"base_learner.fc1_w": w, "base_learner.fc1_b": b, "base_learner.vars.0": w, "base_learner.vars.1": b})
    return {"params": sd}, enc, w, b


def test_official_meta_checkpoint_with_duplicate_aliases(tmp_path):
    ck, enc, w, b = _official_meta("resnet25")
    got = read_weights(_save(ck, tmp_path / "meta.pth"))
    assert got.kind == "meta" and got.spec.way == 5 and got.spec.backbone == "resnet25"
    assert torch.equal(got.head["weight"], w) and torch.equal(got.head["bias"], b)
    fresh = build_backbone("resnet25", mtl=True)
    load_strict(fresh, got.encoder, "official meta")
    assert torch.equal(fresh.layer1[0].conv1.mtl_weight, enc.layer1[0].conv1.mtl_weight)


@pytest.mark.parametrize("name", ["conv4", "resnet12_slim", "resnet18"])
def test_the_official_format_with_another_backbone_is_detected_from_its_shapes(name, tmp_path):
    """The file names no backbone: resnet25 unless its keys and shapes fit another one (then that one)."""
    ck, enc, w, _ = _official_meta(name, way=3)
    path = _save(ck, tmp_path / "meta.pth")
    model = load(path)  # no flag needed
    assert (model.spec.backbone, model.spec.way, model.kind) == (name, 3, "meta")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), enc.eval()(x), rtol=0, atol=0)
    assert torch.equal(model.init[0], w)
    # a --backbone given that the shapes contradict: one line naming the one they fit (docs/ERRORS.md E140)
    with pytest.raises(UserError) as e:
        read_weights(path, Expect(backbone="resnet25"))
    assert str(e.value) == (f"checkpoint {path} (the official code's {{'params': ...}}) holds a {name}, by its keys "
                            f"and shapes, not a resnet25; pass --backbone {name}")


def test_shapes_that_fit_no_backbone_are_named_key_by_key(tmp_path):
    sd = build_backbone("resnet25", mtl=False).state_dict()
    sd["layer9.weight"] = torch.zeros(3)
    assert detect_backbone(sd) == []
    with pytest.raises(UserError, match=r"does not fit the model: 1 unexpected keys \(first: layer9.weight\)"):
        load(_save({"params": sd}, tmp_path / "odd.pth"))


def test_every_registered_backbone_has_its_own_signature():
    sds = {name: build_backbone(name, mtl=False).state_dict() for name in BACKBONES if name != "wrn28_10"}
    for name, sd in sds.items():
        assert detect_backbone(sd) == [name], name


# ---------------------------------------------------------------------------------------------- ours
def _ours(model, kind: str, spec: ModelSpec | None) -> dict:
    ck = {"format": FORMAT, "kind": kind, "backbone": spec.backbone if spec else "conv4", "args": {},
          "encoder": model.encoder.state_dict()}
    ck["base_learner" if kind == "meta" else "pre_fc"] = (model.base_learner if kind == "meta" else
                                                          model.pre_fc).state_dict()
    if spec is not None:
        ck["spec"] = spec.to_dict()
    return ck


def test_a_checkpoint_with_a_spec_rebuilds_its_model(tmp_path):
    torch.manual_seed(0)
    net = MetaLearner("conv4", way=4, bn_mode="tf", shortcut_ss=False)
    spec = ModelSpec(kind="meta", backbone="conv4", bn_mode="tf", way=4, shortcut_ss=False, image_size=20,
                     preprocess="paper")
    ck = _ours(net, "meta", spec)
    ck["backbone"], ck["args"] = "resnet25", {"bn_mode": "pytorch"}  # the spec, not these, says what it is
    model = load(_save(ck, tmp_path / "m.pth"))
    assert model.spec == spec and model.source == OURS and model.kind == "meta"
    x = torch.rand(6, 3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), net.encoder.eval()(x), rtol=0, atol=0)
    assert torch.equal(model.head_init(4, 1)[0], net.base_learner.weight)
    with pytest.raises(UserError, match=r"has a 4-way base learner, but --way is 5"):
        model.head_init(5, 1)
    assert ModelSpec.from_dict(spec.to_dict(), "x") == spec


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.update(version=2), "model spec version 2, this program reads version 1"),
    (lambda s: s.update(backbone="vit_b16"), "holds a 'vit_b16' backbone, which this program does not have"),
    (lambda s: s.update(kind="pre"), "is a 'meta' checkpoint, but its model spec says 'pre'"),
    (lambda s: s.update(way=7), "its model spec says 7-way, but its base learner has 4 rows"),
    (lambda s: s.update(colour="red"), "unknown model spec field(s) colour"),
])
def test_a_damaged_spec_is_one_line(edit, message, tmp_path):
    net = MetaLearner("conv4", way=4)
    ck = _ours(net, "meta", net.spec)
    edit(ck["spec"])
    with pytest.raises(UserError) as e:
        read_weights(_save(ck, tmp_path / "m.pth"))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_checkpoint_from_before_the_spec_gets_one_from_its_args():
    w = read_weights(str(V1 / "meta_conv4_5way1shot.pth"))
    assert w.source == OURS_BEFORE_SPEC
    assert w.spec == ModelSpec(kind="meta", backbone="conv4", bn_mode="pytorch", way=5, shortcut_ss=True,
                               image_size=16, preprocess="paper")  # (bf1d96f had no --bn_mode, --shortcut_ss)
    pre = read_weights(str(V1 / "pre_conv4.pth")).spec
    assert (pre.kind, pre.pre_head, pre.num_classes, pre.backbone_kwargs) == ("pre", "linear", 64,
                                                                             {"dropout_keep": 1.0})


@pytest.mark.parametrize("expect,message", [
    (Expect(backbone="resnet12"), "was trained with --backbone conv4, not resnet12; pass --backbone conv4"),
    (Expect(bn_mode="tf"), "was trained with --bn_mode pytorch, not tf; pass --bn_mode pytorch"),
    (Expect(way=3), "has a 5-way base learner, but --way is 3"),
])
def test_flags_only_verify(expect, message):
    with pytest.raises(UserError) as e:
        read_weights(str(V1 / "meta_conv4_5way1shot.pth"), expect)
    assert message in str(e.value) and "\n" not in str(e.value)
    read_weights(str(V1 / "meta_conv4_5way1shot.pth"), Expect("conv4", "pytorch", 5))  # agreeing flags pass


def test_a_pre_checkpoint_gets_a_fresh_seeded_head():
    model = load(str(V1 / "pre_conv4.pth"))
    assert model.init is None and model.pre_fc is not None
    w, b = model.head_init(7, 3)
    w0, b0 = fresh_init(7, 64, 3)
    assert torch.equal(w, w0) and torch.equal(b, b0)


def test_meta_training_starts_from_a_pre_checkpoint_through_the_same_reader():
    weights = read_weights(str(V1 / "pre_conv4.pth"), Expect("conv4", "pytorch", 5))
    net = MetaLearner("conv4", way=5)
    theta = net.base_learner.weight.detach().clone()
    init_meta_model(net, weights)
    assert torch.equal(net.encoder.layers[0][0].weight, weights.encoder["layers.0.0.weight"])
    assert torch.all(net.encoder.layers[0][0].mtl_weight == 1)       # Phi_S1 = 1, Phi_S2 = 0: not in the file
    assert torch.equal(net.base_learner.weight, theta)                # a pre checkpoint has no base learner


# ---------------------------------------------------------------------------------------------- TensorFlow
def test_tf_files_give_the_resnet12_of_their_widths(tmp_path):
    official_files(str(tmp_path), widths=SLIM, way=4)
    w = read_weights(str(tmp_path))
    assert (w.source, w.spec.backbone, w.spec.bn_mode, w.spec.way, w.spec.shortcut_ss) == (
        TENSORFLOW, "resnet12_slim", "tf", 4, False)
    assert w.path == str(tmp_path / "fc_weights.npy")
    pre = read_weights(str(tmp_path / "weights.npy"), parts="pre")
    assert pre.kind == "pre" and pre.path == str(tmp_path / "weights.npy")
    with pytest.raises(UserError, match="weights.npy: key block1_conv1 has shape \\(3, 3, 3, 32\\), the model needs "
                                        "\\(3, 3, 3, 64\\)"):
        read_weights(str(tmp_path), Expect(backbone="resnet12"))
    with pytest.raises(UserError, match="TensorFlow weights are a ResNet-12; use --backbone resnet12"):
        read_weights(str(tmp_path), Expect(backbone="conv4"))
    with pytest.raises(UserError, match="TensorFlow weights need --bn_mode tf"):
        read_weights(str(tmp_path), Expect(bn_mode="pytorch"))
    with pytest.raises(UserError, match=r"fc_weights.npy has a 4-way base learner, but --way is 5"):
        read_weights(str(tmp_path), Expect(way=5))


# ---------------------------------------------------------------------------------------------- the trainers
def test_the_trainers_write_the_spec_and_meta_eval_takes_the_model_flags_from_it(tmp_path, capsys):
    """A pre-train run writes ``spec``; meta_eval of that file with none of the model flags builds it as it was
    (its backbone, BatchNorm mode, input) and says so; a given input size that differs is a warning, not a model
    change; a given backbone that differs is E11."""
    npz = make_npz(str(tmp_path / "d.npz"), per_class=12, classes=(6, 5, 5))
    common = ["--dataset", "custom", "--dataset_dir", npz, "--log_root", str(tmp_path / "logs"), "--quiet",
              "--device", "cpu", "--seed", "1", "--num_val_episodes", "4", "--num_test_episodes", "6",
              "--val_query", "3", "--pre_val_update_step", "3", "--test_update_step", "3", "--base_lr", "0.1"]
    model_flags = ["--backbone", "conv4", "--image_size", "20", "--preprocess", "paper", "--bn_mode", "tf"]
    assert main.cli(["--phase", "pre_train", "--pre_max_epoch", "1", "--pre_iters_per_epoch", "2",
                     "--pre_batch_size", "8", "--pre_head", "linear", "--pre_dropout_keep", "0.8"]
                    + model_flags + common) == 0
    path = tmp_path / "logs" / "pre" / "custom_conv4" / "max_acc.pth"
    ck = torch.load(path, weights_only=True)
    assert ck["spec"] == ModelSpec(kind="pre", backbone="conv4", bn_mode="tf", image_size=20, preprocess="paper",
                                   backbone_kwargs={"dropout_keep": 0.8}, pre_head="linear",
                                   num_classes=6).to_dict()
    assert "_explicit" not in ck["args"] and "_explicit" not in json.loads((path.parent / "args.json").read_text())
    assert isinstance(PreLearner.from_spec(ModelSpec.from_dict(ck["spec"], str(path))), PreLearner)
    capsys.readouterr()
    assert main.cli(["--phase", "meta_eval", "--eval_weights", str(path)] + common) == 0
    out = capsys.readouterr().out
    assert ("the checkpoint sets --backbone conv4 --bn_mode tf --image_size 20 --preprocess paper "
            "(conv4 pre, --bn_mode tf, 20 px --preprocess paper)") in out
    assert "phase meta_eval  backbone conv4" in out  # the run's header already names the checkpoint's backbone
    res = json.loads((path.parent / "results_pretrained_5way1shot.json").read_text())
    assert (res["settings"]["backbone"], res["settings"]["image_size"], res["eval_mode"]) == ("conv4", 20, "episodic")
    assert main.cli(["--phase", "meta_eval", "--eval_weights", str(path), "--image_size", "24"] + common) == 0
    out = capsys.readouterr().out
    assert f"warning: {path} was trained with --image_size 20; it is evaluated with --image_size 24 as given" in out
    assert json.loads((path.parent / "results_pretrained_5way1shot.json").read_text())["settings"]["image_size"] == 24
    assert main.cli(["--phase", "meta_eval", "--eval_weights", str(path), "--backbone", "resnet12"] + common) == 2
    assert capsys.readouterr().err == (f"error: checkpoint {path} was trained with --backbone conv4, not resnet12; "
                                       "pass --backbone conv4\n")
