import os

import pytest
import torch
from torch import nn

from models.resnet_mtl import build_backbone
from utils.checkpoint import load_checkpoint, load_strict, save_atomic
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
