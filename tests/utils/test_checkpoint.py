import os

import pytest
import torch
from torch import nn

from models.resnet_mtl import build_backbone
from utils.checkpoint import FORMAT, load_checkpoint, load_strict, read_weights, save_atomic
from utils.errors import UserError


def test_save_atomic_roundtrip_and_no_temp_left(tmp_path):
    p = tmp_path / "a" / "ck.pth"
    save_atomic({"x": torch.arange(3)}, str(p))
    assert torch.equal(load_checkpoint(str(p))["x"], torch.arange(3))
    assert os.listdir(p.parent) == ["ck.pth"]


def test_truncated_checkpoint_is_a_user_error(tmp_path):
    p = tmp_path / "ck.pth"
    save_atomic({"x": torch.randn(100)}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(str(p))


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(str(tmp_path / "nope.pth"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"params": _Evil()}, str(p))
    with pytest.raises(UserError, match="weights_only"):
        load_checkpoint(str(p))


def _official_pre(sd):
    return {"params": sd}


def test_official_pretrain_checkpoint_maps_to_encoder():
    plain = build_backbone("resnet25", mtl=False)
    kind, enc, head = read_weights(_official_pre(plain.state_dict()), "x")
    assert kind == "pre" and head is None
    mtl = build_backbone("resnet25", mtl=True)
    load_strict(mtl, enc, "official", allow_missing=("mtl_weight", "mtl_bias"))
    assert torch.equal(mtl.conv1.weight, plain.conv1.weight)
    assert torch.equal(mtl.layer3[3].conv2.weight, plain.layer3[3].conv2.weight)
    assert torch.all(mtl.conv1.mtl_weight == 1) and torch.all(mtl.conv1.mtl_bias == 0)


def test_official_meta_checkpoint_with_duplicate_aliases():
    enc = build_backbone("resnet25", mtl=True)
    w, b = torch.randn(5, 640), torch.randn(5)
    sd = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    sd.update({"base_learner.fc1_w": w, "base_learner.fc1_b": b, "base_learner.vars.0": w,
               "base_learner.vars.1": b})
    kind, enc_sd, head = read_weights({"params": sd}, "x")
    assert kind == "meta"
    assert torch.equal(head["weight"], w) and torch.equal(head["bias"], b)
    fresh = build_backbone("resnet25", mtl=True)
    load_strict(fresh, enc_sd, "official meta")
    assert torch.equal(fresh.layer1[0].conv1.mtl_weight, enc.layer1[0].conv1.mtl_weight)


def test_strict_load_names_missing_unexpected_and_shapes():
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    sd = m.state_dict()
    bad = dict(sd)
    bad.pop("1.bias")
    bad["2.weight"] = torch.zeros(1)
    bad["0.weight"] = torch.zeros(5, 4)
    with pytest.raises(UserError) as e:
        load_strict(m, bad, "ck.pth")
    msg = str(e.value)
    assert "1.bias" in msg and "2.weight" in msg and "0.weight (5, 4) vs model (3, 4)" in msg
    assert "\n" not in msg


def test_other_backbone_checkpoint_is_rejected():
    r12 = build_backbone("resnet12_slim", mtl=False).state_dict()
    with pytest.raises(UserError, match="does not fit"):
        load_strict(build_backbone("resnet12", mtl=True), r12, "ck", allow_missing=("mtl_weight", "mtl_bias"))


def test_our_format_roundtrip():
    enc = build_backbone("conv4", mtl=False)
    ck = {"format": FORMAT, "kind": "pre", "encoder": enc.state_dict(), "pre_fc": {}}
    kind, e, _ = read_weights(ck, "x")
    assert kind == "pre" and set(e) == set(enc.state_dict())
