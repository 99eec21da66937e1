"""``--phase predict`` and ``--phase embed`` through the command line (``main.cli``), and the Python API behind them
(``models/predict.py``), on glyph classes of the embedded pack written to disk as PNG files of mixed sizes and modes
(L, RGB, P, RGBA, 16-bit grey; square and not: ``tools.predict_bench.write_glyph_folders``).

The central claim: predict's accuracy on a labelled query folder is ``meta_eval``'s accuracy on the episode made of
the same support and query images (same model, head, steps and step size). The test builds that episode for real:
``fixed_episodes`` says which image of which class each position of the one test episode takes, and a class-folder
split is written whose files land exactly there, so ``meta_eval --meta_test_dir <it> --num_test_episodes 1`` scores
those images with the support classes in predict's order; then the two command lines' numbers are compared, and
predict's per-query probabilities with the logits meta-test computes on the same features.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from data_generator.dataset_loader import load_split
from data_generator.meta_data_generator import episode_labels, fixed_episodes
from models.evaluate import encode_split
from models.heads import make_head
from models.loading import load
from models.predict import LOW_CONFIDENCE, FewShotPredictor, head_init_for_way
from tests.helpers import assert_close_f64
from tools.predict_bench import write_glyph_folders
from trainer.contact_sheet import Layout, LOW_FRAME
from models.heads import InnerLoop

ROOT = Path(__file__).resolve().parents[1]
V1 = ROOT / "tests" / "data" / "checkpoints_v1"   # conv4, 16 px, --preprocess paper (trained on the glyph pack)
META = V1 / "meta_conv4_5way1shot.pth"
PRE = V1 / "pre_conv4.pth"
META_TF = ROOT / "tests" / "data" / "checkpoints_v2" / "meta_conv4_tf_5way1shot.pth"  # --bn_mode tf
WAY, SHOT, QUERY, SEED = 5, 2, 3, 1
INNER = ["--test_update_step", "100", "--base_lr", "0.1"]
RUN = ["--device", "cpu", "--quiet", "--seed", "1"]


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    """5 glyph test classes, 2 support and 3 query images each (mixed modes and sizes), labelled query folders."""
    base = tmp_path_factory.mktemp("glyphs")
    return write_glyph_folders(str(base), WAY, SHOT, QUERY)


def predict(tmp: Path, ck, support, query, *extra) -> tuple[int, dict | None]:
    out = tmp / "out"
    rc = main.cli(["--phase", "predict", "--eval_weights", str(ck), "--support", str(support), "--query", str(query),
                   "--out", str(out), "--log_root", str(tmp / "logs")] + RUN + INNER + list(extra))
    path = out / "predictions.json"
    return rc, (json.loads(path.read_text()) if rc == 0 else None)


def episode_folder(g: dict, root: Path) -> tuple[Path, np.ndarray]:
    """A class-folder split whose one fixed test episode (``fixed_episodes(..., seed=SEED)``) is made of exactly the
    support and query images of ``g``, episode class k = the k-th support class (predict's column k): position
    ``i * WAY + k`` of the support holds the i-th support image of class k, and likewise for the query."""
    n = SHOT + QUERY
    labels = np.repeat(np.arange(WAY), n)                  # the split's labels: WAY classes of n images, by class
    ep = fixed_episodes(labels, 1, WAY, SHOT, QUERY, SEED)[0]
    for pos, idx in enumerate(ep):
        k = pos % WAY                                      # episode class of this position (the layout)
        c = int(labels[ep[k]])                             # the split class that episode class k was drawn as
        name = g["classes"][k]
        src = (g["support_files"][name][pos // WAY] if pos < WAY * SHOT
               else g["query_files"][name][(pos - WAY * SHOT) // WAY])
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / f"{idx - n * c:02d}.png")  # sorted file order = the index within its class
    return root, ep


CASES = {"mtl": (META, "finetune", []), "centroid": (META, "centroid", []), "ft-baseline": (PRE, "finetune", []),
         "flipped-support": (META, "finetune", ["--test_flip_support"]), "tf-batchnorm": (META_TF, "finetune", [])}


@pytest.mark.parametrize("case", list(CASES))
def test_predict_accuracy_equals_meta_eval_on_the_same_images(case, glyphs, tmp_path):
    """The same support and query images, the same model, head, steps and step size: predict's accuracy is
    meta_eval's accuracy of the episode made of those images (both command lines), and predict's per-query
    probabilities are the softmax of the logits meta-test's head gives on the split's features."""
    src, head, extra = CASES[case]
    ck = tmp_path / "ck" / src.name                     # (meta_eval writes its results next to the checkpoint)
    ck.parent.mkdir()
    shutil.copy(src, ck)
    flags = ["--eval_classifier", head] + extra
    rc, res = predict(tmp_path, ck, glyphs["support"], glyphs["query"], *flags)
    assert rc == 0
    split, ep = episode_folder(glyphs, tmp_path / "episode")
    assert main.cli(["--phase", "meta_eval", "--eval_weights", str(ck), "--meta_test_dir", str(split), "--dataset_dir",
                     str(tmp_path / "no_dataset"), "--way", str(WAY), "--shot", str(SHOT), "--test_query", str(QUERY),
                     "--num_test_episodes", "1", "--eval_seed", str(SEED), "--cache_dir", "none",
                     "--log_root", str(tmp_path / "logs")] + RUN + INNER + flags) == 0
    (results,) = [json.loads(p.read_text()) for p in ck.parent.glob("results*.json")]
    acc = res["accuracy"]
    assert acc["total"] == WAY * QUERY and results["episodes"] == 1
    assert round(100 * acc["correct"] / acc["total"], 4) == results["mean"], (acc, results["mean"])
    assert len({r["predicted"] for r in res["predictions"]}) >= 2  # (not a degenerate one-class answer)
    if case == "tf-batchnorm":
        assert results["eval_mode"] == "episodic"
        return
    # per query: meta-test's bank head on the features of the split, queries in episode order
    model = load(str(ck))
    p = FewShotPredictor(model)
    imageset = load_split(str(split), p.stored_size)
    feats = encode_split(model.encoder, imageset, p.transform, torch.device("cpu"))
    f = feats[torch.from_numpy(ep)]
    n_s, copies = WAY * SHOT, 2 if extra else 1
    f_s = f[:n_s]
    if extra:
        f_s = torch.cat([f_s, encode_split(model.encoder, imageset, p.transform, torch.device("cpu"),
                                           flipped=True)[torch.from_numpy(ep[:n_s])]])
    w, b = model.head_init(WAY, 1)
    h = make_head(head, WAY, (w, b), InnerLoop(100, 0.1), order="first")
    logits = h.fit(f_s[None], episode_labels(WAY, SHOT * copies)[None]).logits(f[n_s:][None])[0]
    by_path = {r["path"]: r for r in res["predictions"]}
    for pos in range(n_s, len(ep)):
        k, i = pos % WAY, (pos - n_s) // WAY
        row = by_path[glyphs["query_files"][glyphs["classes"][k]][i]]
        assert row["predicted"] == glyphs["classes"][int(logits[pos - n_s].argmax())]
        np.testing.assert_allclose(row["probabilities"], torch.softmax(logits[pos - n_s].double(), -1).numpy(),
                                   rtol=0, atol=1e-5)  # float32 logits of two encoder batchings


def test_the_outputs_have_one_row_per_query_and_probabilities_that_sum_to_one(glyphs, tmp_path, capsys):
    rc, res = predict(tmp_path, META, glyphs["support"], glyphs["query"])
    assert rc == 0
    out = capsys.readouterr().out
    n = WAY * QUERY
    classes = glyphs["classes"]
    paths = sorted(p for c in classes for p in glyphs["query_files"][c])
    # json: the rows in path order, each a distribution over the support's classes
    assert [r["path"] for r in res["predictions"]] == paths
    assert res["support"]["classes"] == classes and res["support"]["counts"] == [SHOT] * WAY
    tol_json = 4 * WAY * 2.0 ** -52                              # float64 softmax and sum: a few roundings per term
    for r in res["predictions"]:
        assert len(r["probabilities"]) == WAY and min(r["probabilities"]) >= 0
        assert abs(sum(r["probabilities"]) - 1) <= tol_json
        assert r["predicted"] == classes[int(np.argmax(r["probabilities"]))]
        assert r["probability"] == max(r["probabilities"])
        assert r["label"] == Path(r["path"]).parent.name and r["correct"] == (r["label"] == r["predicted"])
    assert sum(res["summary"].values()) == n
    assert res["low_confidence"] == sum(r["probability"] < LOW_CONFIDENCE for r in res["predictions"])
    conf = np.array(res["confusion"]["matrix"])
    assert conf.sum() == n and (conf.sum(1) == QUERY).all() and list(conf.sum(0)) == list(res["summary"].values())
    assert res["accuracy"]["correct"] == np.trace(conf) == sum(r["correct"] for r in res["predictions"])
    lo, hi = res["accuracy"]["ci95_low"], res["accuracy"]["ci95_high"]
    assert 0 <= lo < res["accuracy"]["mean"] < hi <= 100
    # csv: a header and one row per query, the class columns in the support's order, 6 decimals
    with open(tmp_path / "out" / "predictions.csv", newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == ["path", "predicted", "probability"] + [f"prob_{c}" for c in classes] + ["label", "correct"]
    assert len(table) == n + 1 and [row[0] for row in table[1:]] == paths
    for row in table[1:]:
        assert abs(sum(float(v) for v in row[3:3 + WAY]) - 1) <= WAY * 0.5e-6 + tol_json  # each printed to 1e-6
    # the summary printed
    assert f"accuracy: {res['accuracy']['mean']:.2f}% ({res['accuracy']['correct']} of {n})" in out
    assert "confusion matrix (rows: true class, columns: predicted class):" in out
    # png: the layout's size; the low-confidence queries (and only they) framed in red
    sheet = Image.open(tmp_path / "out" / "predictions.png")
    lay = Layout((SHOT,) * WAY, n, labelled=True)
    assert sheet.size == lay.size and sheet.mode == "RGB"
    for i, r in enumerate(res["predictions"]):
        x0, y0, _, _ = lay.query_box(i)
        framed = sheet.getpixel((x0 - 2, y0 - 2)) == LOW_FRAME
        assert framed == (r["probability"] < LOW_CONFIDENCE), (i, r["probability"])


def test_an_unlabelled_folder_and_a_single_image(glyphs, tmp_path):
    """A flat query folder: predictions without accuracy (no label columns, no matrix in the sheet); one image: one
    row, with the same probabilities as in the folder run (each query is scored on its own)."""
    flat = write_glyph_folders(str(tmp_path / "flat"), WAY, SHOT, QUERY, labelled=False)
    rc, res = predict(tmp_path / "a", META, flat["support"], flat["query"])
    assert rc == 0 and res["accuracy"] is None and res["confusion"] is None and not res["query"]["labelled"]
    header = (tmp_path / "a" / "out" / "predictions.csv").read_text().splitlines()[0]
    assert not header.endswith("label,correct")
    assert Image.open(tmp_path / "a" / "out" / "predictions.png").size == Layout((SHOT,) * WAY, WAY * QUERY,
                                                                                False).size
    one = res["predictions"][3]
    rc, single = predict(tmp_path / "b", META, flat["support"], one["path"])
    assert rc == 0 and [r["path"] for r in single["predictions"]] == [one["path"]]
    np.testing.assert_allclose(single["predictions"][0]["probabilities"], one["probabilities"], rtol=0, atol=1e-6)


def test_a_non_image_file_in_a_support_class_is_skipped_with_one_line(glyphs, tmp_path, capsys):
    support = tmp_path / "support"
    shutil.copytree(glyphs["support"], support)
    rc, clean = predict(tmp_path / "a", META, support, glyphs["query"])
    (support / glyphs["classes"][1] / "notes.txt").write_text("where these came from\n")
    capsys.readouterr()
    rc, res = predict(tmp_path / "b", META, support, glyphs["query"])
    out = capsys.readouterr().out
    assert rc == 0
    skips = [ln for ln in out.splitlines() if ln.startswith("skipped")]
    assert skips == [f"skipped 1 file(s) in {support} that are hidden or not images by extension "
                     f"(first: {glyphs['classes'][1]}/notes.txt)"]
    assert res["support"]["counts"] == clean["support"]["counts"]
    assert [r["probabilities"] for r in res["predictions"]] == [r["probabilities"] for r in clean["predictions"]]


@pytest.mark.parametrize("way", [3, 7])
def test_another_way_than_the_checkpoints_starts_every_row_from_the_mean_row(way, tmp_path, capsys):
    """A 5-way meta checkpoint on a 3- and a 7-class support: the header says what the head starts from, and that
    start gives the probabilities of a start from zero (float64: softmax ignores a row added to every class)."""
    g = write_glyph_folders(str(tmp_path / "g"), way, SHOT, 1)
    capsys.readouterr()
    rc, res = predict(tmp_path, META, g["support"], g["query"])
    assert rc == 0 and len(res["support"]["classes"]) == way
    assert f"the mean of the checkpoint's 5 meta-learned rows, repeated for the {way} support classes" in \
        capsys.readouterr().out
    model = load(str(META))
    w, b, note = head_init_for_way(model, way, 1)
    assert w.shape == (way, model.out_dim) and torch.equal(w, model.init[0].mean(0).expand(way, -1))
    g64 = torch.Generator().manual_seed(0)
    feat_s = torch.randn(1, way * 2, model.out_dim, generator=g64, dtype=torch.float64)
    feat_q = torch.randn(1, 9, model.out_dim, generator=g64, dtype=torch.float64)
    y = episode_labels(way, 2)[None]
    inner = InnerLoop(20, 0.1)
    mean = make_head("finetune", way, (w.double(), b.double()), inner).fit(feat_s, y).logits(feat_q).softmax(-1)
    zero = make_head("finetune", way, (torch.zeros_like(w).double(), torch.zeros_like(b).double()), inner)
    assert_close_f64(mean, zero.fit(feat_s, y).logits(feat_q).softmax(-1))
    w5, b5, note5 = head_init_for_way(model, 5, 1)
    assert w5 is model.init[0] and "the meta-learned 5-way initialisation" in note5


def test_the_encoder_runs_batched(glyphs, tmp_path, monkeypatch):
    """Query images go through the encoder --eval_batch_size at a time (not one by one), and the features do not
    depend on the batching (eval-mode BatchNorm)."""
    import models.evaluate
    calls = []
    real = models.evaluate.encode_split

    def spy(encoder, imageset, *a, **kw):
        hook = encoder.register_forward_hook(lambda m, i, o: calls.append((imageset.source, len(i[0]))))
        try:
            return real(encoder, imageset, *a, **kw)
        finally:
            hook.remove()
    monkeypatch.setattr("models.predict.encode_split", spy)
    rc, big = predict(tmp_path / "a", META, glyphs["support"], glyphs["query"])
    assert [n for s, n in calls if s == glyphs["query"]] == [WAY * QUERY]
    calls.clear()
    rc, small = predict(tmp_path / "b", META, glyphs["support"], glyphs["query"], "--eval_batch_size", "4")
    assert [n for s, n in calls if s == glyphs["query"]] == [4, 4, 4, 3]
    np.testing.assert_allclose([r["probabilities"] for r in small["predictions"]],
                               [r["probabilities"] for r in big["predictions"]], rtol=0, atol=1e-6)


def test_embed_writes_the_features_meta_test_encodes(glyphs, tmp_path, capsys):
    """--query of class folders: features (N, D) float32, paths, labels and class names, equal to what meta-test's
    encode_split gives for that folder read as a split; --dataset_dir: every split of a pack."""
    out = tmp_path / "q.npz"
    base = ["--phase", "embed", "--eval_weights", str(META), "--log_root", str(tmp_path / "logs")] + RUN
    assert main.cli(base + ["--query", glyphs["query"], "--out", str(out)]) == 0
    with np.load(out) as z:
        feats, paths, labels, classes = z["features"], list(z["paths"]), z["labels"], list(z["classes"])
        meta = json.loads(str(z["meta_json"]))
    model = load(str(META))
    p = FewShotPredictor(model)
    split = load_split(glyphs["query"], p.stored_size)  # the labelled query folder is a class-folder split
    ref = encode_split(model.encoder, split, p.transform, torch.device("cpu")).numpy()
    assert feats.dtype == np.float32 and feats.shape == (WAY * QUERY, model.out_dim)
    assert np.array_equal(feats, ref)
    assert paths == [os.path.join(glyphs["query"], f) for f in split.files]
    assert classes == split.class_names and np.array_equal(labels, split.labels)
    assert meta["image_size"] == 16 and meta["preprocess"] == "paper"
    out2 = tmp_path / "pack.npz"
    assert main.cli(base + ["--dataset_dir", str(ROOT / "data" / "glyphs100.npz"), "--out", str(out2)]) == 0
    with np.load(out2) as z, np.load(ROOT / "data" / "glyphs100.npz") as pack:
        for s in ("train", "val", "test"):
            assert z[f"{s}_features"].shape == (len(pack[f"{s}_labels"]), model.out_dim)
            assert np.array_equal(z[f"{s}_labels"], pack[f"{s}_labels"])
    assert "features written to" in capsys.readouterr().out


def test_the_python_api_takes_images_of_any_kind_or_features(glyphs, tmp_path):
    """fit on paths, PIL images of other modes, arrays (grey and colour) or on the features of encode: the same
    head; classes_ sorted whatever the label order; predict_proba rows sum to 1."""
    p = FewShotPredictor.from_checkpoint(str(META), steps=100, lr=0.1)
    classes = glyphs["classes"]
    paths = [f for c in classes[::-1] for f in glyphs["support_files"][c]]  # labels given in another order
    labels = [c for c in classes[::-1] for _ in range(SHOT)]
    queries = [f for c in classes for f in glyphs["query_files"][c]]
    ref = p.fit(paths, labels).predict_proba(queries)
    assert p.classes_ == classes and ref.shape == (WAY * QUERY, WAY)
    assert np.allclose(ref.sum(1), 1, rtol=0, atol=4 * WAY * 2.0 ** -52)
    pil = [Image.open(f) for f in paths]                                    # P, RGBA, I;16, ... as opened
    arrays = [np.asarray(Image.open(f).convert("L" if i % 2 else "RGB")) for i, f in enumerate(paths)]
    for support in (pil, arrays, p.encode(paths)):
        assert np.allclose(p.fit(support, labels).predict_proba(queries), ref, rtol=0, atol=1e-6)
    assert p.predict(p.encode(queries)) == [classes[i] for i in ref.argmax(1)]
    with pytest.raises(ValueError, match="at least 2 classes"):
        p.fit(paths[:SHOT], labels[:SHOT])


def test_run_experiment_predict_prints_its_command(monkeypatch, capsys):
    """PREDICT is the checkpoint TEST tests, with SUPPORT_DIR and QUERY_DIR (and no --way: the support sets it)."""
    import run_experiment as rx
    monkeypatch.setattr(rx, "SUPPORT_DIR", "/my/support")
    monkeypatch.setattr(rx, "QUERY_DIR", "/my/query")
    (cmd,) = rx.commands("PREDICT")
    test = rx.commands("TEST")[0]
    assert cmd[cmd.index("--phase") + 1] == "predict" and "--way" not in cmd
    assert cmd[cmd.index("--support") + 1] == "/my/support" and cmd[cmd.index("--query") + 1] == "/my/query"
    from config.options import parse_args
    from config.settings import RunPaths
    assert cmd[cmd.index("--eval_weights") + 1] == RunPaths.from_args(parse_args(test[2:])).meta_checkpoint
    capsys.readouterr()
    rx.cli(["PREDICT", "--dry_run"])  # (the constants are checked; nothing runs)
    assert "main.py --phase predict" in capsys.readouterr().out


def test_run_experiment_predict_under_several_seeds_uses_the_first_seeds_model(monkeypatch):
    """SEEDS = [3, 4]: PREDICT is one command (one set of output files), classifying with the model the first seed's
    TEST tests (its own --log_root), not a checkpoint of the single-seed folder."""
    import run_experiment as rx
    from config.options import parse_args
    from config.settings import RunPaths
    monkeypatch.setattr(rx, "SEEDS", [3, 4])
    (cmd,) = rx.commands("PREDICT")
    first_test = rx.commands("TEST")[0]
    assert "seed3" in first_test[first_test.index("--log_root") + 1]
    assert cmd[cmd.index("--eval_weights") + 1] == RunPaths.from_args(parse_args(first_test[2:])).meta_checkpoint
    assert cmd[cmd.index("--seed") + 1] == "3" and rx.predict_checkpoint() == cmd[cmd.index("--eval_weights") + 1]


@pytest.mark.parametrize("value,says", [("", "SUPPORT_DIR = '' must be a path (not empty)"),
                                        (3, "SUPPORT_DIR = 3 must be a str (text in quotes), not an int")])
def test_run_experiment_checks_the_predict_constants(value, says, monkeypatch, capsys):
    import run_experiment as rx
    monkeypatch.setattr(rx, "SUPPORT_DIR", value)
    with pytest.raises(SystemExit) as e:
        rx.cli(["PREDICT", "--dry_run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and says in err[0] and err[0].startswith("error: run_experiment.py line")
