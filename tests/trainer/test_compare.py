"""``--phase compare`` against ``meta_eval``: the same per-episode accuracies for every method, the paired differences
computed here from them, one encoding of the test split per checkpoint, and a ``--bn_mode tf`` checkpoint evaluated
episode by episode beside a bank one. The checkpoints are the committed fixtures of tests/data (no training here)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import main
import models.evaluate

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
FLAGS = ["--dataset", "glyphs", "--dataset_dir", str(ROOT / "data" / "glyphs100.npz"), "--quiet", "--device", "cpu",
         "--cache_dir", "none", "--num_test_episodes", "60", "--val_query", "5", "--test_update_step", "10",
         "--base_lr", "0.1", "--eval_seed", "3"]


@pytest.fixture()
def ckpts(tmp_path) -> dict[str, str]:
    """Copies of the fixtures in their own folders (meta_eval writes its results file next to the checkpoint)."""
    out = {}
    for key, folder, name in (("pre", "checkpoints_v1", "pre_conv4.pth"), ("meta", "checkpoints_v1",
                                                                          "meta_conv4_5way1shot.pth"),
                              ("meta_tf", "checkpoints_v2", "meta_conv4_tf_5way1shot.pth")):
        d = tmp_path / key
        d.mkdir()
        shutil.copy(DATA / folder / name, d / name)
        out[key] = str(d / name)
    return out


def count_encodings(monkeypatch) -> list[int]:
    """Counts calls of models.evaluate.encode_split (one per split encoded)."""
    calls, real = [], models.evaluate.encode_split

    def counted(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(models.evaluate, "encode_split", counted)
    return calls


def test_compare_gives_meta_evals_accuracies_and_the_paired_differences(ckpts, tmp_path, capsys, monkeypatch):
    pre, meta = ckpts["pre"], ckpts["meta"]
    logs = tmp_path / "logs"
    calls = count_encodings(monkeypatch)
    assert main.cli(["--phase", "compare", "--eval_weights", pre, f"{pre}:centroid", meta, "--log_root", str(logs)]
                    + FLAGS) == 0
    printed = capsys.readouterr().out
    assert len(calls) == 2  # one encoding per checkpoint: the FT and nearest-mean heads share the pre one's bank
    cmp = json.loads((logs / "compare" / "glyphs_5way1shot" / "compare.json").read_text())
    assert cmp["table_markdown"] in printed and (logs / "compare" / "glyphs_5way1shot" / "compare.md").is_file()
    methods = {m["id"]: m for m in cmp["methods"]}
    assert [(m["method"], m["eval_mode"]) for m in cmp["methods"]] == [
        ("pretrained", "bank"), ("pretrained+centroid", "bank"), ("mtl", "bank")]
    # each method alone through meta_eval with the same flags: the same per-episode accuracies, mean and interval
    for mid, path, extra, name in (("A", pre, [], "results_pretrained_5way1shot.json"),
                                   ("B", pre, ["--eval_classifier", "centroid"],
                                    "results_pretrained_centroid_5way1shot.json"),
                                   ("C", meta, [], "results.json")):
        assert main.cli(["--phase", "meta_eval", "--eval_weights", path, "--log_root", str(logs)] + extra + FLAGS) == 0
        res = json.loads((Path(path).parent / name).read_text())
        assert res["episodes"] == 60 and len(res["episode_accs"]) == 60
        assert methods[mid]["episode_accs"] == res["episode_accs"], mid
        assert (methods[mid]["mean"], methods[mid]["ci95"]) == (res["mean"], res["ci95"]), mid
    # the paired differences, computed here from the per-episode accuracies
    assert [(p["a"], p["b"]) for p in cmp["pairs"]] == [("A", "B"), ("A", "C"), ("B", "C")]
    for p in cmp["pairs"]:
        a, b = (np.array(methods[k]["episode_accs"], dtype=np.float64) for k in (p["a"], p["b"]))
        d = np.round(b - a, 6)
        assert p["mean"] == pytest.approx(100 * d.mean(), abs=5e-5)  # (stored to 4 decimals)
        assert p["ci95"] == pytest.approx(100 * 1.96 * d.std() / math.sqrt(len(d)), abs=5e-5)
        assert (p["b_better"], p["a_better"], p["ties"]) == ((d > 0).sum(), (d < 0).sum(), (d == 0).sum())
        t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
        assert p["t_test"]["t"] == pytest.approx(t, rel=1e-9) and p["t_test"]["df"] == 59
        nz = d[d != 0]
        assert p["wilcoxon"]["n"] == nz.size and p["wilcoxon"]["method"] == ("exact" if nz.size <= 50 else "normal")
        assert 0 < p["t_test"]["p"] <= 1 and 0 < p["wilcoxon"]["p"] <= 1
        assert f"| {p['b']} - {p['a']} (" in printed


def test_a_tf_batchnorm_checkpoint_is_compared_episode_by_episode(ckpts, tmp_path, capsys, monkeypatch):
    """--bn_mode tf (batch statistics): no bank for it, the same episodes and the accuracies meta_eval gives it."""
    pre, tf = ckpts["pre"], ckpts["meta_tf"]
    logs = tmp_path / "logs"
    flags = FLAGS[:FLAGS.index("--num_test_episodes") + 1] + ["12"] + FLAGS[FLAGS.index("--num_test_episodes") + 2:]
    calls = count_encodings(monkeypatch)
    assert main.cli(["--phase", "compare", "--eval_weights", pre, tf, "--log_root", str(logs)] + flags) == 0
    out = capsys.readouterr().out
    assert "B = " in out and "--bn_mode tf" in out  # its checkpoint sets --bn_mode tf for it alone
    assert len(calls) == 1  # the pre-trained encoder's bank; the tf one per episode
    cmp = json.loads((logs / "compare" / "glyphs_5way1shot" / "compare.json").read_text())
    a, b = cmp["methods"]
    assert (a["eval_mode"], b["eval_mode"]) == ("bank", "episodic")
    assert main.cli(["--phase", "meta_eval", "--eval_weights", tf, "--log_root", str(logs)] + flags) == 0
    res = json.loads((Path(tf).parent / "results.json").read_text())
    assert b["episode_accs"] == res["episode_accs"] and res["eval_mode"] == "episodic"


def test_a_path_holding_a_colon_is_a_path(ckpts, tmp_path, capsys):
    """``PATH:HEAD`` splits only when the whole text is not a file: a checkpoint named ``a:b.pth`` is read whole."""
    from config.compare import parse_methods
    odd = tmp_path / "run:1.pth"
    shutil.copy(ckpts["meta"], odd)
    methods = parse_methods([str(odd), f"{odd}:centroid"], "finetune")
    assert [(m.path, m.head) for m in methods] == [(str(odd), "finetune"), (str(odd), "centroid")]


def test_class_accuracies_average_to_the_episode_accuracy(ckpts, tmp_path):
    """results.json's per-class accuracies: each episode's class accuracies average to its accuracy, and the classes'
    accuracies weighted by their episodes average to the mean (every class has the same queries per episode)."""
    logs = tmp_path / "logs"
    assert main.cli(["--phase", "meta_eval", "--eval_weights", ckpts["meta"], "--log_root", str(logs)] + FLAGS) == 0
    res = json.loads((Path(ckpts["meta"]).parent / "results.json").read_text())
    classes = res["class_accs"]
    assert sum(c["episodes"] for c in classes.values()) == 5 * 60
    weighted = sum(c["acc"] * c["episodes"] for c in classes.values()) / (5 * 60)
    assert weighted == pytest.approx(res["mean"], abs=1e-3)
    report = (Path(ckpts["meta"]).parent / "report.md").read_text()  # the end-of-phase report names the files
    assert "`results.json`" in report and "hardest" in report
